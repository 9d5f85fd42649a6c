"""The training objective: rectified flow + I2V conditioning + CFG dropout + early REPA.

    Batch ─► task (t2v|i2v, same on every rank) ─► σ, ε ─► x_t, v* ─► model ─► named losses

Losses come back as named terms (`denoise`, `repa`, per-σ-bucket diagnostics); the
trainer weights them with `ObjectiveConfig.weights` via `total_loss`. The REPA teacher is
passed in (frozen, not part of the trained model) and is only run when REPA is active.

No device->host read happens in a call (tests/unit/test_host_syncs.py): the task is a hash,
the text-dropout draw and the "is any text padded" decision are made on the host, the blur's
kernel width comes from the config. The output says what the model was fed (task, image and
text tokens, REPA), which is what the trainer's FLOP count (MFU) is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from motif_train.data.batch import Batch

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


def mask_has_padding(mask: torch.Tensor | None) -> bool | None:
    """Whether a (B, L) text mask has any padding, as a python bool, for a mask on the host;
    None for a mask on an accelerator (unknown: finding out there is a device->host read).

    Read through numpy, which refuses device tensors, so this can never become a device sync.
    The trainer calls it on the loader's CPU batch before moving it to the device."""
    if mask is None:
        return False
    if mask.device.type != "cpu":
        return None
    return not bool(mask.numpy().all())


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
                 teacher: nn.Module | None = None) -> None:
        self.config = config
        self.empty_text = empty_text
        self.teacher = teacher
        if config.conditioning.text_dropout > 0 and empty_text is None:
            raise ValueError("conditioning.text_dropout > 0 needs the empty-prompt embedding (empty_text=...)")
        # Host facts about the empty prompt, read once here (start-up), not per micro-batch: a
        # dropped row's mask is all True only for L <= this length (-1: the mask has a 0).
        self._empty_full = -1
        if empty_text is not None and bool(empty_text[1].bool().all()):
            self._empty_full = int(empty_text[1].shape[0])

    def repa_active(self, step: int) -> bool:
        return self.teacher is not None and self.config.repa.active(step)

    def __call__(self, model: nn.Module, batch: Batch, *, step: int, micro_step: int = 0,
                 generator: torch.Generator | None = None, repa: bool = True,
                 text_padded: bool | None = None) -> ObjectiveOutput:
        """One micro-batch. `repa=False` switches REPA off for this call (e.g. the curriculum stage
        has it off) on top of the `repa.until_step` cut-off. `text_padded`: whether
        `batch.text_mask` has padding, worked out on the host before the batch was moved to the
        device (`mask_has_padding`); None: from the mask here if it is on the host, else unknown
        (the mask is then always passed: right, maybe a slower attention kernel)."""
        c = self.config
        x0 = batch.latents.float()  # (B, 16, F, H, W)
        b, _, f, h, w = x0.shape
        task = choose_task(c.seed, step, micro_step, c.conditioning.i2v_prob)
        if f < 2 or batch.image_embeds is None:
            task = "t2v"  # an image (or a sample without SigLIP tokens) cannot be conditioned on itself

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

        text, text_mask = batch.text, batch.text_mask
        padded = text_padded if text_padded is not None else mask_has_padding(text_mask)
        dropped = draw_text_dropout(b, c.conditioning.text_dropout, generator)
        if any(dropped):
            text, text_mask, _ = apply_text_dropout(text, text_mask, c.conditioning.text_dropout,
                                                    *self.empty_text, dropped=dropped)
            if padded is not None:  # a dropped row is padded unless the empty prompt fills all L
                padded = (padded and not all(dropped)) or text.shape[1] > self._empty_full
        if text_mask is not None and padded is False:
            text_mask = None  # nothing padded: lets SDPA pick its fastest (mask-free) kernel
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
