"""AdamW and the learning-rate schedule (warmup, then constant or cosine; per-stage peak LR)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool | None = None  # None: fused on CUDA
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"optim.decay={self.decay!r}: use constant or cosine")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps >= 0, 0 <= optim.min_lr_ratio <= 1, optim.grad_clip >= 0 required")


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (norm gains and biases are left alone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int, stage_lr: Callable[[int], float | None]) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (1-based)."""
    peak = stage_lr(step) or cfg.lr
    f = peak / cfg.lr
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return f * step / cfg.warmup_steps
    if cfg.decay == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return f * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return f


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                       stage_lr: Callable[[int], float | None] = lambda step: None) -> LambdaLR:
    """LambdaLR whose epoch k sets the LR of optimizer step k+1; its state is JSON-able."""
    return LambdaLR(optimizer, lambda k: lr_factor(k + 1, cfg, total_steps, stage_lr))
