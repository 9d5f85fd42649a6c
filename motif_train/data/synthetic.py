"""Deterministic synthetic data with the shapes of the configured buckets.

Stands in for the real shard loader (data issue) behind the same interface: every rank draws
the same bucket at each step; a step consumes `global_batch` consecutive global sample ids and
rank r takes its slice, so the position (samples consumed) is world-size independent and a
resume on a different number of ranks neither repeats nor skips a sample. Sample content is a
pure function of (seed, sample id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from motif_train.batch import Batch, check_pad_to, pad_text
from motif_train.utils import stable_seed

from .curriculum import StageConfig


@dataclass
class SyntheticDataConfig:
    _target_: str = "motif_train.data.synthetic.SyntheticSource"
    text_len: list[int] = field(default_factory=lambda: [4, 16])  # [min, max] true text tokens
    image_tokens: int = 16  # SigLIP tokens per first frame
    teacher_size: int = 32  # square side of the REPA teacher input
    # text lengths batches are padded to (smallest that fits); None: text_len's max, one fixed length
    text_pad_to: list[int] | None = None

    def __post_init__(self) -> None:
        lo_hi = list(self.text_len)
        if len(lo_hi) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi) or \
                not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"data.text_len={self.text_len!r} must be [min, max] true text tokens with "
                             "1 <= min <= max")
        if self.text_pad_to is not None:
            self.text_pad_to = check_pad_to(self.text_pad_to)
            if self.text_pad_to[-1] < lo_hi[1]:
                raise ValueError(f"data.text_pad_to={self.text_pad_to} cannot hold data.text_len max {lo_hi[1]}: "
                                 f"add a length >= {lo_hi[1]}")
        for name in ("image_tokens", "teacher_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"data.{name}={v!r} must be an int >= 1")


class SyntheticSource:
    """`next_step(step) -> list[Batch]`: this rank's `grad_accum` micro-batches for one step."""

    def __init__(self, *, text_len: list[int] | tuple[int, int] = (4, 16), image_tokens: int = 16,
                 teacher_size: int = 32, text_pad_to: list[int] | None = None, text_dim: int,
                 image_dim: int | None, seed: int, dp_rank: int,
                 dp_size: int, grad_accum: int) -> None:
        self.cfg = SyntheticDataConfig(text_len=list(text_len), image_tokens=image_tokens, teacher_size=teacher_size,
                                       text_pad_to=None if text_pad_to is None else list(text_pad_to))
        self.text_pad_to = self.cfg.text_pad_to or [self.cfg.text_len[1]]
        self.text_dim, self.image_dim, self.seed = text_dim, image_dim, seed
        self.dp_rank, self.dp_size, self.grad_accum = dp_rank, dp_size, grad_accum
        self.consumed = 0  # global samples handed out before the next step
        self.stage: StageConfig | None = None
        self.want_teacher = False

    # ---- interface shared with the real loader -------------------------------------------
    def set_stage(self, stage: StageConfig, *, teacher: bool) -> None:
        per_step = self.dp_size * self.grad_accum
        if stage.global_batch < 1 or stage.global_batch % per_step:  # `validate` catches it first in a run
            raise ValueError(f"curriculum stage {stage.name!r}: global_batch={stage.global_batch} must be a positive "
                             f"multiple of data-parallel size {self.dp_size} x train.grad_accum {self.grad_accum}")
        self.stage, self.want_teacher = stage, teacher

    def bucket_for(self, step: int) -> list[int]:
        """Same bucket on every rank: a function of (seed, step) only."""
        buckets = self.stage.buckets
        return list(buckets[stable_seed(self.seed, step, 0xB0) % len(buckets)])

    def next_step(self, step: int) -> list[Batch]:
        g = self.stage.global_batch
        per_rank = g // self.dp_size
        micro = per_rank // self.grad_accum
        start = self.consumed + self.dp_rank * per_rank
        bucket = self.bucket_for(step)
        batches = [self._batch(range(start + m * micro, start + (m + 1) * micro), bucket)
                   for m in range(self.grad_accum)]
        self.consumed += g
        return batches

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    # ---- content -------------------------------------------------------------------------
    def _sample(self, idx: int, bucket: list[int]) -> dict:
        f, h, w = bucket
        gen = torch.Generator().manual_seed(stable_seed(self.seed, idx))
        lo, hi = self.cfg.text_len
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        lat_f, lat_h, lat_w = 1 + (f - 1) // 4, h // 8, w // 8
        # Smooth fields (a 2x2 grid upsampled) plus a little noise: structure a model can learn, so
        # the loss visibly falls, at unit variance like normalised VAE latents.
        coarse = torch.randn(16, lat_f, 2, 2, generator=gen)
        smooth = torch.nn.functional.interpolate(coarse, size=(lat_h, lat_w), mode="bilinear", align_corners=True)
        latents = (smooth + 0.3 * torch.randn(16, lat_f, lat_h, lat_w, generator=gen)) / (1 + 0.3**2) ** 0.5
        s = {
            "key": f"synthetic/{idx:09d}",
            "latents": latents,
            "text": torch.randn(length, self.text_dim, generator=gen),
        }
        if self.image_dim is not None:
            s["image"] = torch.randn(self.cfg.image_tokens, self.image_dim, generator=gen)
        if self.want_teacher:
            t = self.cfg.teacher_size
            s["teacher"] = torch.rand(3, f + 1, t, t, generator=gen) * 2 - 1
        return s

    def _batch(self, ids: range, bucket: list[int]) -> Batch:
        samples = [self._sample(i, bucket) for i in ids]
        text, mask = pad_text([s["text"] for s in samples], self.text_pad_to)
        stack = lambda k: torch.stack([s[k] for s in samples]) if k in samples[0] else None  # noqa: E731
        return Batch(latents=stack("latents"), text=text, text_mask=mask, image_embeds=stack("image"),
                     teacher_pixels=stack("teacher"), keys=tuple(s["key"] for s in samples))
