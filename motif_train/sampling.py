"""Validation sampling: flow-matching Euler with classifier-free guidance, as the Motif pipelines do.

`FlowMatchEulerDiscreteScheduler` (sigmas = linspace(1, 1/steps), the configured shift) steps the
latents; diffusers' `ClassifierFreeGuidance` combines the conditional and unconditional velocity.
The DiT may be FSDP-sharded: every rank runs the same number of forwards (prompts are dealt out
round-robin and padded), decodes its own videos with the frozen VAE, and rank 0 gathers the uint8
frames — the 2B weights are never gathered onto one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class EvalConfig:
    every: int = 0  # validate every k optimizer steps (0: only at the end)
    at_end: bool = True
    prompts: list[str] = field(default_factory=lambda: ["a red square slides across a blue gradient",
                                                        "two circles bounce around each other"])
    negative_prompt: str = ""
    i2v_frame: str | None = None  # image or video whose first frame conditions one extra I2V sample
    i2v_prompt: str = "the shapes start to move"
    frames: int = 9
    height: int = 64
    width: int = 96
    steps: int = 12
    shift: float = 5.0  # inference shift (the released pipelines use ~15 for 720p T2V, ~8 for I2V)
    guidance_scale: float = 5.0
    seed: int = 0
    fps: int = 8
    ema: bool = True  # sample with the EMA weights when the run keeps them

    def __post_init__(self) -> None:
        if (self.frames - 1) % 4 or self.height % 16 or self.width % 16:
            raise ValueError(f"eval: {self.frames}x{self.height}x{self.width} must be 1+4k frames and sizes "
                             "divisible by 16")


@dataclass
class SampleItem:
    """One request: text (L, C) + mask (L,), optional I2V condition (cond latent (16, h, w) for frame
    0 and image tokens (I, C_img))."""

    name: str
    text: torch.Tensor
    text_mask: torch.Tensor
    cond_frame: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


def load_first_frame(path: str | Path, height: int, width: int) -> torch.Tensor:
    """First frame of a video (decord) or an image (PIL) -> (3, H, W) in [-1, 1], resized + centre-cropped."""
    path = Path(path)
    if path.suffix.lower() in (".mp4", ".mov", ".webm", ".mkv", ".avi"):
        import decord

        frame = decord.VideoReader(str(path), ctx=decord.cpu(0))[0].asnumpy()
    else:
        from PIL import Image

        frame = np.asarray(Image.open(path).convert("RGB"))
    x = torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 127.5 - 1  # (1, 3, h, w)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[0, :, top:top + height, left:left + width].clamp(-1, 1)


@torch.no_grad()
def flow_sample(model, item: SampleItem, negative: tuple[torch.Tensor, torch.Tensor], *, latent_shape: tuple,
                steps: int, shift: float, guidance_scale: float, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Latents (1, 16, F, h, w) for one item; the model gets cat(x_t, cond, mask) like the pipelines."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "guiders are experimental", once per sample otherwise
    guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    dlogging.set_verbosity(level)
    x = torch.randn((1, *latent_shape), generator=generator, device=generator.device).to(device)
    cond = torch.zeros_like(x)
    mask = torch.zeros_like(x[:, :1])
    image = None
    if item.cond_frame is not None:
        cond[:, :, 0] = item.cond_frame.to(device)
        mask[:, :, 0] = 1.0
        image = item.image_embeds[None].to(device)
    width = max(item.text.shape[0], negative[0].shape[0])
    text = torch.zeros(2, width, item.text.shape[1], device=device)
    tmask = torch.zeros(2, width, dtype=torch.bool, device=device)
    for i, (e, m) in enumerate(((item.text, item.text_mask), negative)):
        text[i, :e.shape[0]], tmask[i, :e.shape[0]] = e.to(device), m.to(device)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        inp = torch.cat([x, cond, mask], dim=1).expand(2, -1, -1, -1, -1)  # (2, 33, F, h, w): cond | uncond
        v = model(hidden_states=inp, timestep=t.expand(2).to(device), encoder_hidden_states=text,
                  encoder_attention_mask=tmask, image_embeds=None if image is None else image.expand(2, -1, -1),
                  route=False).sample.float()
        pred = guider.forward(v[:1], v[1:]).pred  # (__call__ takes pipeline batches; forward the tensors)
        x = scheduler.step(pred, t, x).prev_sample
    return x


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


def frame_grid(videos: list[torch.Tensor], max_cols: int = 8) -> np.ndarray:
    """Videos (T, H, W, 3) uint8 -> one image: a row per video, up to `max_cols` evenly spaced frames."""
    rows = []
    for v in videos:
        idx = np.linspace(0, v.shape[0] - 1, min(max_cols, v.shape[0])).round().astype(int)
        row = np.concatenate([v[i].numpy() for i in idx], axis=1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def generate(model, items: list[SampleItem], negative, vae, cfg: EvalConfig, *, device: torch.device,
             rank: int = 0, world_size: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Every rank samples its share (round-robin, padded so all ranks run the same forwards) and
    decodes it; returns [(name, (T, H, W, 3) uint8)] on rank 0 (empty list elsewhere)."""
    lat = (16, 1 + (cfg.frames - 1) // 4, cfg.height // 8, cfg.width // 8)
    per_rank = -(-len(items) // world_size)
    mine = [(i, items[i % len(items)]) for i in range(rank, per_rank * world_size, world_size)]
    out = []
    for i, item in mine:
        g = torch.Generator(device).manual_seed(cfg.seed * 1000 + i % len(items))
        latents = flow_sample(model, item, negative, latent_shape=lat, steps=cfg.steps, shift=cfg.shift,
                              guidance_scale=cfg.guidance_scale, generator=g, device=device)
        out.append(to_uint8_frames(vae.decode(latents.to(vae.dtype))))
    local = torch.stack(out)  # (per_rank, T, H, W, 3)
    if world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        if local.device.type != device.type:
            local = local.to(device)
            gathered = [g.to(device) for g in gathered]
        dist.all_gather(gathered, local)
        ordered = [gathered[j % world_size][j // world_size].cpu() for j in range(len(items))]
    else:
        ordered = list(local)
    return [(items[j].name, ordered[j]) for j in range(len(items))] if rank == 0 else []


def write_outputs(videos: list[tuple[str, torch.Tensor]], out_dir: Path, fps: int) -> tuple[list[Path], Path]:
    """mp4 per video + a PNG frame grid of all of them."""
    from PIL import Image

    from motif_train.data.clips import write_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, v in videos:
        p = out_dir / f"{name}.mp4"
        write_mp4(p, v.numpy(), fps)
        paths.append(p)
    grid = out_dir / "grid.png"
    Image.fromarray(frame_grid([v for _, v in videos])).save(grid)
    return paths, grid


def build_requests(cfg: EvalConfig, encoders_root: str | Path, device: torch.device, *,
                   prompts: list[str] | None = None):
    """Encode the prompts (and the I2V frame) once with the frozen encoders; keep only the VAE.

    Returns (items, negative (emb, mask), vae). Text embeddings are trimmed like the shards'.
    """
    from motif_train.objectives.encoders import load_encoders

    enc = load_encoders(encoders_root, which=("vae", "text", "image") if cfg.i2v_frame else ("vae", "text"),
                        device=device)
    prompts = list(prompts if prompts is not None else cfg.prompts)
    texts = enc.text.encode_trimmed(prompts + [cfg.negative_prompt, cfg.i2v_prompt])
    on = lambda e: (e.float(), torch.ones(e.shape[0], dtype=torch.bool))  # noqa: E731
    items = [SampleItem(f"t2v_{i:02d}", *on(texts[i])) for i in range(len(prompts))]
    if cfg.i2v_frame:
        frame = load_first_frame(cfg.i2v_frame, cfg.height, cfg.width).to(device)  # (3, H, W)
        cond = enc.vae.encode(frame[None, :, None])[0, :, 0]  # (16, h, w): frame 0 alone (causal VAE)
        image = enc.image.encode(frame[None])[0]  # (I, C_img)
        items.append(SampleItem("i2v_00", *on(texts[-1]), cond_frame=cond.float(), image_embeds=image.float()))
    negative = on(texts[len(prompts)])
    return items, negative, enc.vae
