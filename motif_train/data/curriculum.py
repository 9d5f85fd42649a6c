"""Curriculum: training stages inside one run (resolution, batch, LR, shift, REPA, routing)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from motif_train.models.config import RoutingConfig


@dataclass
class StageConfig:
    """One stage. buckets: (frames, height, width) pixel shapes, frames = 1+4k, sizes % 16 == 0.

    global_batch: samples per optimizer step over all ranks (synthetic data). token_budget:
    the most DiT video tokens one rank holds in a step, per-rank batch x bucket tokens, tail steps
    included: size activation memory with it (shard data: each bucket's batch is token_budget //
    its tokens; a bucket whose one sample is larger runs one per rank). attention_aware: also shrink
    the batches of the stage's longer clips so every step costs about the compute of the shortest
    bucket's (N + N^2/N_ref per sample, N_ref = the largest bucket), never above token_budget.
    lr / shift / i2v_prob: None keeps the run-level value. routing: None = no TREAD in this stage.
    """

    name: str = "stage"
    steps: int = 100
    buckets: list[list[int]] = field(default_factory=lambda: [[9, 64, 96]])
    global_batch: int = 2
    token_budget: int | None = None
    attention_aware: bool = False
    lr: float | None = None
    shift: float | None = None
    repa: bool = False
    routing: RoutingConfig | None = None
    i2v_prob: float | None = None


@dataclass
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_stage(i: int, s: StageConfig, *, dp_size: int, grad_accum: int, planned: bool = False) -> None:
    """`planned`: the data source batches by token budget (shards + plan) instead of global_batch.

    Every size is checked before any work: a zero or negative one would otherwise pass the
    divisibility rules (0 % n == 0) and crash at the stage's first step."""
    key = f"curriculum.stages[{i}]"
    if not _is_int(s.steps) or s.steps < 1:
        raise ValueError(f"{key}.steps={s.steps!r} must be an int >= 1 (optimizer steps in this stage)")
    if not s.buckets:
        raise ValueError(f"{key}.buckets is empty: give at least one [frames, height, width]")
    for b in s.buckets:
        if len(b) != 3:
            raise ValueError(f"{key}.buckets: {b} must be [frames, height, width]")
        f, h, w = b
        if not all(_is_int(x) for x in b):
            raise ValueError(f"{key}.buckets: {b} must be three ints [frames, height, width]")
        if f < 1 or (f - 1) % 4:
            raise ValueError(f"{key}.buckets: frames={f} must be 1+4k (1, 5, 9, ..., 121) for the Wan VAE")
        if h < 16 or w < 16:
            raise ValueError(f"{key}.buckets: {h}x{w}: height and width must be >= 16 pixels (and divisible by 16)")
        if h % 16 or w % 16:
            raise ValueError(f"{key}.buckets: {h}x{w} must be divisible by 16 (VAE x8, patch x2)")
    if not _is_int(s.global_batch) or s.global_batch < 1:
        raise ValueError(f"{key}.global_batch={s.global_batch!r} must be an int >= 1 (samples per optimizer step "
                         f"over all ranks), e.g. a multiple of data-parallel size {dp_size} x train.grad_accum "
                         f"{grad_accum}")
    if s.token_budget is not None and (not _is_int(s.token_budget) or s.token_budget < 1):
        raise ValueError(f"{key}.token_budget={s.token_budget!r} must be an int >= 1 (the most video tokens a "
                         "rank holds in a step) or null")
    if s.lr is not None and not (0 < s.lr < float("inf")):
        raise ValueError(f"{key}.lr={s.lr!r} must be a finite number > 0, or null for optim.lr")
    if s.shift is not None and not (0 < s.shift < float("inf")):
        raise ValueError(f"{key}.shift={s.shift!r} must be a finite number > 0, or null for objective.flow.shift")
    if s.i2v_prob is not None and not 0 <= s.i2v_prob <= 1:
        raise ValueError(f"{key}.i2v_prob={s.i2v_prob!r} must be in [0, 1], or null for "
                         "objective.conditioning.i2v_prob")
    if planned:
        if s.token_budget is None:
            raise ValueError(f"{key}.token_budget is required with shard data: the most video tokens a rank "
                             "holds in a step (each bucket's per-rank batch = token_budget // its tokens)")
        return
    per_step = dp_size * grad_accum
    if s.global_batch % per_step:
        raise ValueError(f"{key}.global_batch={s.global_batch} is not divisible by data-parallel size {dp_size} x "
                         f"train.grad_accum {grad_accum} = {per_step}; use a multiple of {per_step}")


class Curriculum:
    """Maps a global optimizer step (1-based) to its stage."""

    def __init__(self, cfg: CurriculumConfig) -> None:
        if not cfg.stages:
            raise ValueError("curriculum.stages is empty")
        self.stages = list(cfg.stages)
        self.ends = []  # last step of each stage
        total = 0
        for s in self.stages:
            total += s.steps
            self.ends.append(total)

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def index_at(self, step: int) -> int:
        return min(bisect.bisect_left(self.ends, step), len(self.stages) - 1)

    def stage_at(self, step: int) -> StageConfig:
        return self.stages[self.index_at(step)]
