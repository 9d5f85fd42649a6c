"""The training objective: rectified flow + I2V conditioning + CFG dropout + early REPA.

    Batch ─► task (t2v|i2v, same on every rank) ─► σ, ε ─► x_t, v* ─► model ─► named losses

Losses come back as named terms (`denoise`, `repa`, per-σ-bucket diagnostics); the
trainer weights them with `ObjectiveConfig.weights` via `total_loss`. The REPA teacher is
passed in (frozen, not part of the trained model) and is only run when REPA is active.

The task never depends on one rank's data: an I2V micro-batch without SigLIP tokens is an error
(`MissingImageTokens`), not a silent switch of that rank to T2V (a graph the other ranks do not run).

No device->host read happens in a call (tests/unit/test_host_syncs.py): the task is a hash,
the text-dropout draw and the "is any text padded" decision are made on the host, the blur's
kernel width comes from the config. The output says what the model was fed (task, image and
text tokens, REPA), which is what the trainer's FLOP count (MFU) is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from motif_train.batch import Batch, pad_length

from .conditioning import (
    ConditioningConfig,
    apply_text_dropout,
    build_i2v_condition,
    build_t2v_condition,
    choose_task,
    draw_text_dropout,
    model_input,
    timestep_blur,
)
from .flow import FlowConfig, add_noise, flow_loss, model_timestep, sample_sigmas, velocity_target
from .repa import RepaLossConfig, match_teacher_tokens, repa_loss


@dataclass
class ObjectiveConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    repa: RepaLossConfig = field(default_factory=RepaLossConfig)
    seed: int = 0  # drives the per-step task choice, identical on every rank

    def __post_init__(self) -> None:
        for name, cls in (("flow", FlowConfig), ("conditioning", ConditioningConfig), ("repa", RepaLossConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))

    @property
    def weights(self) -> dict[str, float]:
        return {"denoise": 1.0, "repa": self.repa.weight}


@dataclass
class ObjectiveOutput:
    """losses: differentiable terms by name; metrics: detached diagnostics (σ buckets).

    What the model ran on, as host values (the trainer's FLOP count is computed from them):
    task "t2v" | "i2v"; image_tokens: SigLIP tokens per sample fed to the model (0 for T2V, also
    when the batch carries them); text_tokens: text positions per sample (the padded width L);
    repa: the REPA head ran, and the teacher's forward on `batch.teacher_pixels`.
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    task: str
    image_tokens: int = 0
    text_tokens: int = 0
    repa: bool = False


class MissingImageTokens(ValueError):
    """An I2V micro-batch without SigLIP tokens. The task is a hash of (seed, step, micro-step), the same on every
    rank, so this rank cannot train it as T2V instead: the ranks would run different graphs (the image
    embedder's all-gather and gradient on some ranks only). The trainer's start-up check refuses datasets
    whose video buckets lack them (data/shards.py `check_image_tokens`); this is a sample that slipped through."""

    def __init__(self, step: int, micro_step: int, keys: tuple[str, ...] = ()) -> None:
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        super().__init__(
            f"step {step} micro-step {micro_step} trains I2V on every rank, but this rank's micro-batch has no "
            f"SigLIP image tokens (no image.npy in at least one of its samples{' (' + shown + ')' if shown else ''}). "
            "Re-run motif-preprocess with the image encoder (without --no-image), or set the stage's i2v_prob=0 / "
            "objective.conditioning.i2v_prob=0 to train T2V only.")


def total_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ weight·term over the terms present; an unknown term is an error, not a silent 0."""
    unknown = set(losses) - set(weights)
    if unknown:
        raise KeyError(f"loss terms without a weight: {sorted(unknown)}")
    return sum(weights[k] * v for k, v in losses.items())


class DiffusionObjective:
    """Callable `(model, batch, step=, micro_step=) -> ObjectiveOutput`.

    `empty_text` is the empty-prompt embedding (L0, C) and mask (L0,) used for text dropout.
    `teacher` maps teacher pixels (B, 3, T, S, S) to (B, T/2, S/p, S/p, C) (a frozen
    `VJEPA2Teacher`), required while REPA is active.
    """

    def __init__(self, config: ObjectiveConfig, *, empty_text: tuple[torch.Tensor, torch.Tensor] | None = None,
                 teacher: nn.Module | None = None, text_pad_to: list[int] | None = None,
                 drop_unpadded_mask: bool = True) -> None:
        """`text_pad_to`: the data's pad lengths (`data.text_pad_to`), so a micro-batch whose
        captions were all dropped is narrowed to the empty prompt's pad length (None: to its exact
        length). `drop_unpadded_mask`: pass no mask when nothing is padded (SDPA's mask-free
        kernel); False keeps one graph per block under compile with the sdpa backend."""
        self.config = config
        self.empty_text = empty_text
        self.teacher = teacher
        self.text_pad_to = sorted(text_pad_to) if text_pad_to else None
        self.drop_unpadded_mask = drop_unpadded_mask
        if config.conditioning.text_dropout > 0 and empty_text is None:
            raise ValueError("conditioning.text_dropout > 0 needs the empty-prompt embedding (empty_text=...)")
        # The empty prompt's real length, read once here (start-up), not per micro-batch.
        self._empty_len = int(empty_text[1].bool().sum()) if empty_text is not None else 0

    def text_for_model(self, batch: Batch, dropped: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text (B, L', C), mask (B, L') or None) after CFG dropout, decided on the host.

        Dropped rows get the empty prompt; L' is the pad length of the longest real caption left
        (all dropped: the empty prompt's), never more than L, so a dropped caption at batch 1 does
        not carry 512 zero tokens. The mask is None when no row is padded at L' and
        `drop_unpadded_mask`: only real padding sends attention to a masked kernel.
        """
        text, text_mask = batch.text, batch.text_mask
        width = text.shape[1]
        if any(dropped):
            text, text_mask, _ = apply_text_dropout(text, text_mask, self.config.conditioning.text_dropout,
                                                    *self.empty_text, dropped=dropped)
        if not batch.text_lengths:
            return text, text_mask
        lengths = [min(self._empty_len, width) if d else n for d, n in zip(dropped, batch.text_lengths, strict=True)]
        longest = max(max(lengths), 1)
        narrow = min(width, pad_length(longest, self.text_pad_to) if self.text_pad_to else longest)
        if narrow < width:
            text, text_mask = text[:, :narrow].contiguous(), text_mask[:, :narrow].contiguous()
        if self.drop_unpadded_mask and min(lengths) == narrow:
            text_mask = None  # nothing padded: SDPA may pick its fastest (mask-free) kernel
        return text, text_mask

    def repa_active(self, step: int) -> bool:
        return self.teacher is not None and self.config.repa.active(step)

    def __call__(self, model: nn.Module, batch: Batch, *, step: int, micro_step: int = 0,
                 generator: torch.Generator | None = None, repa: bool = True) -> ObjectiveOutput:
        """One micro-batch. `repa=False` switches REPA off for this call (e.g. the curriculum stage
        has it off) on top of the `repa.until_step` cut-off. The text is narrowed and its mask
        dropped from `batch.text_lengths` (host ints, `text_for_model`); without them the mask is
        always passed (right, at worst a slower kernel)."""
        c = self.config
        x0 = batch.latents.float()  # (B, 16, F, H, W)
        b, _, f, h, w = x0.shape
        task = choose_task(c.seed, step, micro_step, c.conditioning.i2v_prob)
        if f < 2:
            task = "t2v"  # an image cannot be conditioned on itself; every rank has this shape (one bucket a step)
        elif task == "i2v" and batch.image_embeds is None:
            raise MissingImageTokens(step, micro_step, batch.keys)

        sigma = sample_sigmas(b, c.flow, generator=generator, device=x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = add_noise(x0, noise, sigma)  # (B, 16, F, H, W)
        target = velocity_target(x0, noise)

        if task == "i2v":
            cond, cmask = build_i2v_condition(x0)
            cond[:, :, 0] = timestep_blur(cond[:, :, 0], sigma, c.conditioning)  # blur more when noisier
            image_embeds = batch.image_embeds
        else:
            cond, cmask = build_t2v_condition(x0)
            image_embeds = None

        dropped = draw_text_dropout(b, c.conditioning.text_dropout, generator)
        text, text_mask = self.text_for_model(batch, dropped)
        use_repa = repa and self.repa_active(step)
        if use_repa and batch.teacher_pixels is None:
            raise ValueError(f"REPA is active at step {step} but the batch has no teacher_pixels; "
                             "preprocess with the teacher enabled for this stage or set repa.until_step")
        inp = model_input(x_t, cond, cmask).to(batch.text.dtype)  # (B, 33, F, H, W)
        out = model(hidden_states=inp, timestep=model_timestep(sigma, c.flow), encoder_hidden_states=text,
                    encoder_attention_mask=text_mask, image_embeds=image_embeds, return_repa=use_repa,
                    generator=generator)
        terms = flow_loss(out.sample, target, sigma, num_buckets=c.flow.num_sigma_buckets)
        losses = {"denoise": terms.pop("denoise")}
        if use_repa:
            with torch.no_grad():
                teacher = self.teacher(batch.teacher_pixels)  # (B, 1+2k, S/p, S/p, C)
            p, pt = model.config.patch_size, model.config.patch_size_t
            grid = (f // pt, h // p, w // p)
            target_tokens = match_teacher_tokens(teacher.float(), grid)  # (B, N, C)
            losses["repa"] = repa_loss(out.repa_tokens, target_tokens, out.repa_ids)
        return ObjectiveOutput(losses=losses, metrics={k: v.detach() for k, v in terms.items()}, task=task,
                               image_tokens=image_embeds.shape[1] if image_embeds is not None else 0,
                               text_tokens=text.shape[1], repa=use_repa)
