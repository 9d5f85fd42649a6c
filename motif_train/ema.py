"""Sharded EMA of the trained weights (fp32, updated every k steps, on local shards only)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """Parameter name without AC / compile / FSDP wrapper prefixes (stable across those options)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    every: int = 1  # update every k optimizer steps with decay**k (same time constant, less work)

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay={self.decay} must lie in (0, 1)")
        if self.every < 1:
            raise ValueError(f"ema.every={self.every} must be >= 1")


class EMA:
    """`shadow[name]` mirrors each trainable parameter (a DTensor under FSDP, sharded the same way).

    Checkpointed as a dict of tensors (`checkpoint.TensorDictState`), so DCP reshards it like the
    model on a world-size change.
    """

    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.params = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.shadow = {n: p.detach().clone().float() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        if step % self.cfg.every:
            return False
        weight = 1.0 - self.cfg.decay ** self.cfg.every
        names = list(self.shadow)
        torch._foreach_lerp_([_local(self.shadow[n]) for n in names],
                             [_local(self.params[n]).float() for n in names], weight)
        return True

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily load the EMA weights into the model (validation, export)."""
        backup = {n: _local(p).detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            _local(p).copy_(_local(self.shadow[n]))
        try:
            yield
        finally:
            for n, p in self.params.items():
                _local(p).copy_(backup[n])
