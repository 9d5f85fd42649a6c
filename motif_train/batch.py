"""The one batch type that flows from the loader to the objective.

It lives below both (data/ builds it, objectives/ and the trainer read it), so no component imports
another's module for a shared type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


def pad_length(longest: int, pad_to: list[int] | tuple[int, ...], key: str = "data.text_pad_to") -> int:
    """The smallest length in `pad_to` >= `longest` (the text length a micro-batch is padded to).

    Raises, naming `key`, when the caption is longer than every length: raise the largest one (or
    re-run motif-preprocess with a smaller --max-text-len)."""
    fit = [n for n in pad_to if n >= longest]
    if not fit:
        raise ValueError(f"a caption has {longest} text tokens, more than the largest {key} length "
                         f"{max(pad_to)}: add a length >= {longest} to {key} (or re-run motif-preprocess with "
                         f"--max-text-len <= {max(pad_to)})")
    return min(fit)


def check_pad_to(pad_to, key: str = "data.text_pad_to") -> list[int]:
    """`pad_to` as a sorted list of distinct ints >= 1; raises naming `key` otherwise."""
    # Any sequence but a string: Hydra hands the config's list over as a ListConfig.
    vals = list(pad_to) if isinstance(pad_to, Sequence) and not isinstance(pad_to, str) else None
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals):
        raise ValueError(f"{key}={pad_to!r} must be a non-empty list of text lengths >= 1 (e.g. [64, 128, 256, 512])")
    return sorted(set(vals))


def pad_text(texts: list[torch.Tensor], pad_to: list[int] | tuple[int, ...],
             key: str = "data.text_pad_to") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i, C) captions -> zero-padded (B, L, C) fp32 text and (B, L) bool mask, L = `pad_length`."""
    width = pad_length(max(t.shape[0] for t in texts), pad_to, key)
    text = torch.zeros(len(texts), width, texts[0].shape[1])
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for i, t in enumerate(texts):
        text[i, :t.shape[0]], mask[i, :t.shape[0]] = t, True
    return text, mask


@dataclass
class Batch:
    """Precomputed training inputs of one micro-batch; every sample has the same shape.

    latents: normalised Wan VAE latents x0 (B, 16, F, H, W).
    text: text-encoder hidden states (B, L, C_text), zero-padded to L = the smallest length of
        `data.text_pad_to` that holds the longest caption (`pad_length`), so compiled blocks see a
        few fixed text lengths rather than a new one per micro-batch and rank.
    text_mask: (B, L) bool, True on real tokens.
    image_embeds: SigLIP first-frame tokens (B, I, C_img), or None (no I2V possible).
    teacher_pixels: REPA teacher input (B, 3, 2+4k, S, S) in [-1, 1] (frame 0 already
        duplicated, see `objectives.repa.teacher_pixels`), or None when REPA is off.
    keys: sample ids, for logging skipped / bad samples.
    text_lengths: real text tokens per sample, host ints (what decides, without a device read,
        whether attention needs a mask and how far the text can be narrowed); computed from
        `text_mask` whenever the batch is built on the host and kept by `.to(device)`; () when
        unknown (built on a device: the mask is then always passed).
    padding: True for a micro-batch the loader added only so every rank runs the same number of
        micro-batches (FSDP collectives must match) after it lost samples; it repeats one of the
        rank's real samples. The trainer runs it forward+backward with loss weight 0 and leaves its
        samples out of the sample/token counts.
    """

    latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    image_embeds: torch.Tensor | None = None
    teacher_pixels: torch.Tensor | None = None
    keys: tuple[str, ...] = ()
    padding: bool = False
    text_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        b = self.latents.shape[0]
        if self.latents.dim() != 5:
            raise ValueError(f"Batch.latents must be (B, C, F, H, W), got {tuple(self.latents.shape)}")
        if self.text.shape[:2] != self.text_mask.shape or self.text.shape[0] != b:
            raise ValueError(f"Batch.text {tuple(self.text.shape)} / text_mask {tuple(self.text_mask.shape)} "
                             f"do not match batch size {b}")
        if self.text_mask.device.type == "cpu":
            # A host mask is the truth (also after dataclasses.replace); numpy refuses device
            # tensors, so this can never turn into a device->host sync.
            self.text_lengths = tuple(int(n) for n in self.text_mask.numpy().astype(bool).sum(1))
        if self.text_lengths and len(self.text_lengths) != b:
            raise ValueError(f"Batch.text_lengths has {len(self.text_lengths)} entries for batch size {b}")
        for name in ("image_embeds", "teacher_pixels"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != b:
                raise ValueError(f"Batch.{name} has batch {t.shape[0]}, latents have {b}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so host->GPU copies can be asynchronous."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return Batch(**moved)
