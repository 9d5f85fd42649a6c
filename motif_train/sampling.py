"""Validation sampling: flow-matching Euler with classifier-free guidance, as the Motif pipelines do.

`FlowMatchEulerDiscreteScheduler` (sigmas = linspace(1, 1/steps), the configured shift) steps the
latents; diffusers' `ClassifierFreeGuidance` combines the conditional and unconditional velocity.

Where we differ from `MotifVideoImageToVideoPipeline`, on purpose: (1) the I2V condition is the VAE
posterior's mode, not a sample of it: training conditions on frame 0 of the preprocessed latents,
which are the mode (data/preprocess.py), so validation shows the model on its training condition
and the same request gives the same video at every validation; (2) the shift is `eval.shift`, fixed,
where the pipeline passes `mu` from the sequence length (used only when its scheduler config turns
dynamic shifting on): a fixed shift keeps validations at different buckets comparable; to mimic a
dynamic-shifting scheduler set `eval.shift` = exp(mu) for the clip's sequence length.

At 64 ranks (issue 10): the prompts are encoded once, on rank 0 (the only rank that loads the text
and image encoders), cached in the run dir as safetensors and broadcast as those bytes; request i is
sampled by rank ``i % world_size`` only, which decodes it with the frozen VAE (loaded only on ranks
that own a request) and sends the uint8 frames to rank 0 point-to-point — no all-gather, and no
gather either (a gather pads every rank's share to the largest, so 64 x a video would reach rank 0).
The DiT may be FSDP-sharded: the ranks of one FSDP shard group run the same number of forwards (its
weights are all-gathered within the group), so a rank of a busy group without a request runs
padding forwards it neither decodes nor sends; groups with no request skip sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    fps: int = 8  # validation mp4s (short tiny clips); motif-sample writes fps= (default 24)
    ema: bool = True  # sample with the EMA weights when the run keeps them
    # held-out validation loss (evaluation/val_loss.py; docs/training.md): every k optimizer steps (0: off), on the
    # current stage's held-out samples at `loss_sigmas` σ values, with the EMA weights (+ raw with loss_raw)
    loss_every: int = 500
    loss_sigmas: int = 8
    loss_raw: bool = False
    loss_at_end: bool = False  # one more pass after the last step (when it is not already a loss_every step)

    def __post_init__(self) -> None:
        if int(self.loss_every) < 0 or int(self.loss_sigmas) < 1:
            raise ValueError(f"eval.loss_every={self.loss_every} must be >= 0 and eval.loss_sigmas="
                             f"{self.loss_sigmas} >= 1")
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


def frame_grid(videos: list[torch.Tensor], max_cols: int = 8, labels: list[str] | None = None) -> np.ndarray:
    """Videos (T, H, W, 3) uint8 -> one image: a row per video, up to `max_cols` evenly spaced frames.

    With `labels` (one per video: task, prompt, seed) a strip of frame indices tops the grid and each
    row gets a caption strip above it, so a grid read alone says what each tile is."""
    from PIL import Image, ImageDraw

    rows, indices = [], []
    for v in videos:
        idx = np.linspace(0, v.shape[0] - 1, min(max_cols, v.shape[0])).round().astype(int)
        rows.append(np.concatenate([v[i].numpy() for i in idx], axis=1))
        indices.append((idx, v.shape[2]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    if labels is None:
        return np.concatenate(rows, axis=0)
    strip = 14  # px: one line of PIL's default bitmap font
    top = Image.new("RGB", (width, strip), (16, 16, 16))
    idx, w = indices[0]
    for j, f in enumerate(idx):
        ImageDraw.Draw(top).text((j * w + 2, 1), f"frame {f}", fill=(250, 200, 60))
    parts = [np.asarray(top)]
    for row, label in zip(rows, labels, strict=True):
        head = Image.new("RGB", (width, strip), (16, 16, 16))
        ImageDraw.Draw(head).text((2, 1), label[: width // 6], fill=(235, 235, 235))  # ~6 px a glyph
        parts += [np.asarray(head), row]
    return np.concatenate(parts, axis=0)


def request_labels(cfg: EvalConfig, names: list[str]) -> list[str]:
    """Row captions for `frame_grid`: request name (task), its seed and its prompt."""
    out = []
    for i, name in enumerate(names):
        prompt = cfg.i2v_prompt if name.startswith("i2v") else cfg.prompts[int(name.split("_")[-1])]
        out.append(f"{name} | seed {cfg.seed * 1000 + i} | {prompt}")
    return out


def _comm_device(device: torch.device) -> torch.device:
    """Where tensors must live for the default group's backend (NCCL: the GPU; gloo: the CPU)."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sampling_rounds(n_items: int, rank: int, world_size: int, shard_size: int) -> int:
    """Forwards-rounds this rank runs: request i belongs to rank i % world_size in round i // world_size,
    and every rank of a shard group (consecutive ranks) runs as many rounds as its first rank, which owns
    the most; 0 for a group that owns no request."""
    first = rank - rank % shard_size
    return max(0, -(-(n_items - first) // world_size))


def generate(model, items: list[SampleItem], negative, vae, cfg: EvalConfig, *, device: torch.device,
             rank: int = 0, world_size: int = 1, shard_size: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """Sample every request once across the ranks; returns [(name, (T, H, W, 3) uint8)] on rank 0, in
    request order (an empty list elsewhere). Collective: call it on every rank.

    ``shard_size``: ranks per FSDP shard group (``parallel.dp_shard`` under HSDP; None: the whole world,
    1-D FSDP). Request i's noise is seeded by (cfg.seed, i) alone, so the videos do not depend on the
    world size or on which rank sampled them. ``vae`` may be None on ranks that own no request.
    """
    n = len(items)
    shard = world_size if shard_size is None else int(shard_size)
    if shard < 1 or world_size % shard:
        raise ValueError(f"generate: shard_size={shard_size} must divide the world size {world_size} "
                         "(parallel.dp_shard)")
    lat = (16, 1 + (cfg.frames - 1) // 4, cfg.height // 8, cfg.width // 8)
    mine = []
    for k in range(sampling_rounds(n, rank, world_size, shard)):
        i = rank + k * world_size
        g = torch.Generator(device).manual_seed(cfg.seed * 1000 + i % n)
        latents = flow_sample(model, items[i % n], negative, latent_shape=lat, steps=cfg.steps, shift=cfg.shift,
                              guidance_scale=cfg.guidance_scale, generator=g, device=device)
        if i < n:  # i >= n: a padding forward, only so that the shard group's all-gathers match
            if vae is None:
                raise ValueError(f"generate: rank {rank} samples request {i} but was given no VAE "
                                 "(build_requests loads it on the ranks that own a request)")
            mine.append(to_uint8_frames(vae.decode(latents.to(vae.dtype))))
    videos = _gather_to_rank0(mine, n, rank, world_size, device) if world_size > 1 else mine
    return [(items[j].name, videos[j]) for j in range(n)] if rank == 0 else []


def _gather_to_rank0(mine: list[torch.Tensor], n: int, rank: int, world_size: int,
                     device: torch.device) -> list[torch.Tensor]:
    """Rank 0 receives request i from rank i % world_size, in request order (each sender sends its own in
    that order, so the pairs match); a sender that died fails the recv after the group's timeout."""
    comm = _comm_device(device)
    if rank != 0:
        for v in mine:
            dist.send(v.contiguous().to(comm), dst=0)
        return []
    out: list[torch.Tensor | None] = [None] * n
    for k, v in enumerate(mine):
        out[k * world_size] = v
    for i in range(n):
        if i % world_size:
            buf = torch.empty(mine[0].shape, dtype=torch.uint8, device=comm)  # every request has one shape
            dist.recv(buf, src=i % world_size)
            out[i] = buf.cpu()
    return out


def write_outputs(videos: list[tuple[str, torch.Tensor]], out_dir: Path, fps: int,
                  labels: list[str] | None = None) -> tuple[list[Path], Path]:
    """mp4 per video at `fps` + a PNG frame grid of all of them (rows captioned with `labels`)."""
    from PIL import Image

    from motif_train.data.clips import write_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, v in videos:
        p = out_dir / f"{name}.mp4"
        write_mp4(p, v.numpy(), fps)
        paths.append(p)
    grid = out_dir / "grid.png"
    Image.fromarray(frame_grid([v for _, v in videos], labels=labels)).save(grid)
    return paths, grid


def _cache_key(cfg: EvalConfig, prompts: list[str], encoders_root) -> str:
    """Everything the cached embeddings depend on, as canonical JSON (the frame by content, not path)."""
    key = {"version": 1, "encoders": str(Path(encoders_root).resolve()), "prompts": prompts,
           "negative_prompt": cfg.negative_prompt, "i2v_prompt": cfg.i2v_prompt}
    if cfg.i2v_frame:
        h = hashlib.sha256()
        with open(cfg.i2v_frame, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        key.update(i2v_frame_sha256=h.hexdigest(), height=cfg.height, width=cfg.width)
    return json.dumps(key, sort_keys=True)


def _encode(cfg: EvalConfig, prompts: list[str], encoders_root, device: torch.device):
    """({name: tensor} on the CPU, the VAE): text embeddings trimmed like the shards', the I2V condition."""
    from motif_train.objectives.encoders import load_encoders

    enc = load_encoders(encoders_root, which=("vae", "text", "image") if cfg.i2v_frame else ("vae", "text"),
                        device=device)
    texts = enc.text.encode_trimmed(prompts + [cfg.negative_prompt, cfg.i2v_prompt])
    out = {f"text.{i:04d}": texts[i] for i in range(len(prompts))}
    out["negative"] = texts[len(prompts)]
    if cfg.i2v_frame:
        frame = load_first_frame(cfg.i2v_frame, cfg.height, cfg.width).to(device)  # (3, H, W)
        out["i2v.text"] = texts[-1]
        out["i2v.cond"] = enc.vae.encode(frame[None, :, None])[0, :, 0]  # (16, h, w): frame 0 alone (causal VAE)
        out["i2v.image"] = enc.image.encode(frame[None])[0]  # (I, C_img)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, enc.vae


def _blob_key(blob: bytes) -> str | None:
    """The "key" metadata of safetensors bytes (8-byte header length, JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__", {}).get("key")


def _rank0_encodings(cfg: EvalConfig, prompts: list[str], encoders_root, device: torch.device,
                     cache_dir: Path | None) -> tuple[bytes, object]:
    """(safetensors bytes of the embeddings, the VAE): from the run dir's cache when its key matches,
    else encoded (and cached: written to a temporary name, then renamed, so a crash leaves no half file)."""
    from safetensors.torch import load, save

    from motif_train.objectives.encoders import load_encoders

    key = _cache_key(cfg, prompts, encoders_root)
    path = None if cache_dir is None else \
        Path(cache_dir) / f"prompts-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path is not None and path.is_file():
        try:
            blob = path.read_bytes()
            if _blob_key(blob) == key:
                load(blob)  # a damaged file is encoded again, not broadcast
                return blob, load_encoders(encoders_root, which=("vae",), device=device).vae
        except (OSError, ValueError, RuntimeError):  # unreadable: encode again, overwriting it
            pass
    tensors, vae = _encode(cfg, prompts, encoders_root, device)
    blob = save(tensors, metadata={"key": key})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    return blob, vae


def _broadcast_blob(blob: bytes | None, rank: int, device: torch.device) -> bytes | None:
    """Rank 0's bytes on every rank; None everywhere when rank 0 has none (it failed: every rank still
    leaves the collective, instead of waiting for a broadcast that never comes)."""
    comm = _comm_device(device)
    size = torch.tensor([-1 if blob is None else len(blob)], dtype=torch.int64, device=comm)
    dist.broadcast(size, src=0)
    if int(size.item()) < 0:
        return None
    if rank == 0:
        buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(comm)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=comm)
    dist.broadcast(buf, src=0)
    return blob if rank == 0 else buf.cpu().numpy().tobytes()


def build_requests(cfg: EvalConfig, encoders_root: str | Path, device: torch.device, *,
                   prompts: list[str] | None = None, cache_dir: str | Path | None = None, rank: int = 0,
                   world_size: int = 1):
    """The requests (T2V prompts, then the I2V frame), the negative prompt and the VAE.

    Rank 0 encodes them (text / image encoders loaded there only) or reads them from
    ``cache_dir/prompts-<key>.safetensors`` (the key: prompts, negative / I2V prompt, the frame's bytes,
    size, encoders root), and broadcasts the bytes; every rank builds the same items. Collective when
    ``world_size > 1``: call it on every rank. Returns (items, negative (emb (L, C), mask (L,)), vae);
    ``vae`` is None on ranks that own no request (see :func:`generate`).
    """
    from safetensors.torch import load

    from motif_train.objectives.encoders import load_encoders

    prompts = list(prompts if prompts is not None else cfg.prompts)
    n_items = len(prompts) + (1 if cfg.i2v_frame else 0)
    blob, vae, failure = None, None, None
    try:  # a rank that fails still joins the broadcast, so no rank waits on it until the timeout
        if rank == 0:
            blob, vae = _rank0_encodings(cfg, prompts, encoders_root, device,
                                         None if cache_dir is None else Path(cache_dir))
        elif rank < n_items:  # decodes its own requests
            vae = load_encoders(encoders_root, which=("vae",), device=device).vae
    except Exception as e:
        if world_size == 1:
            raise
        failure = e
    if world_size > 1:
        blob = _broadcast_blob(blob if rank == 0 and failure is None else None, rank, device)
        if failure is not None:
            raise failure
        if blob is None:
            raise RuntimeError("validation: rank 0 could not encode the eval prompts (its log has the error); "
                               "check encoders.root, or switch validation off with eval.every=0 eval.at_end=false")
    t = load(blob)
    on = lambda e: (e.float(), torch.ones(e.shape[0], dtype=torch.bool))  # noqa: E731
    items = [SampleItem(f"t2v_{i:02d}", *on(t[f"text.{i:04d}"])) for i in range(len(prompts))]
    if cfg.i2v_frame:
        items.append(SampleItem("i2v_00", *on(t["i2v.text"]), cond_frame=t["i2v.cond"].float(),
                                image_embeds=t["i2v.image"].float()))
    return items, on(t["negative"]), (vae if rank < n_items else None)
