"""TREAD token routing: per-sample random token subsets that skip a contiguous block span.

A route keeps `K = max(1, round(N * (1 - ratio)))` of the N video tokens per sample; the
kept tokens run the routed blocks, the rest wait unchanged and are scattered back after the
last routed block. Ids are sorted so that kept tokens stay in raster order (attention is
permutation-equivariant, but sorted ids make gathers contiguous and debugging sane).
"""

from __future__ import annotations

import torch

from .attention import Rope


def num_kept(num_tokens: int, ratio: float) -> int:
    return max(1, int(round(num_tokens * (1.0 - ratio))))


def sample_keep_ids(batch: int, num_tokens: int, ratio: float, *, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh uniform subset per sample: (B, K) int64, sorted ascending along dim 1."""
    k = num_kept(num_tokens, ratio)
    scores = torch.rand(batch, num_tokens, device=device, generator=generator)  # (B, N)
    return scores.argsort(dim=1)[:, :k].sort(dim=1).values  # (B, K)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, kept: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Out-of-place: `full` (B, N, D) with rows `ids` (B, K) replaced by `kept` (B, K, D)."""
    return full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]), kept)


def gather_rope(rope: Rope, ids: torch.Tensor) -> Rope:
    """Shared tables (N, Dh) -> per-sample tables (B, K, Dh) at the kept positions."""
    cos, sin = rope
    return cos[ids], sin[ids]
