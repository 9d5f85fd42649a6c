"""Rectified flow in the diffusers convention (`FlowMatchEulerDiscreteScheduler`).

Noise level σ ∈ (0, 1): σ = 0 is data, σ = 1 is pure noise.

    x_t = (1 - σ) x0 + σ ε          (forward process, `add_noise`)
    v   = ε - x0                    (velocity target, `velocity_target`)
    x_{σ'} = x_σ + (σ' - σ) v       (Euler step towards σ' < σ, `euler_step`)
    t   = 1000 σ                    (timestep fed to the transformer, `model_timestep`)

Training σ is drawn logit-normal and then shifted, `σ' = s σ / (1 + (s - 1) σ)`: the same map
the scheduler applies to its inference sigmas, so a model trained at shift s sees the noise
levels it will be sampled at. Larger token counts need a larger shift (more tokens carry
more redundant signal, so the same σ destroys less information); `shift_for_tokens`
scales it with sqrt(N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# Keeps sampled σ strictly inside (0, 1) in float32: sigmoid and the shift both round to
# exactly 0 or 1 for extreme logits, and 1 - 1e-6 is still distinct from 1 in float32.
_SIGMA_EPS = 1e-6


@dataclass
class FlowConfig:
    """Rectified-flow training hyper-parameters.

    logit_mean, logit_std: σ = sigmoid(N(logit_mean, logit_std²)) before the shift.
    shift: the stage's timestep shift s (1 = none; ≈15 at 720p×121f, see `shift_for_tokens`).
    num_sigma_buckets: equal-width σ buckets over [0, 1] for per-noise-level loss metrics.
    timestep_scale: model timestep = timestep_scale · σ (diffusers: num_train_timesteps = 1000).
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    num_sigma_buckets: int = 4
    timestep_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"FlowConfig.logit_mean must be finite, got {self.logit_mean}")
        if not (self.logit_std > 0 and math.isfinite(self.logit_std)):
            raise ValueError(f"FlowConfig.logit_std must be > 0, got {self.logit_std}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"FlowConfig.shift must be > 0, got {self.shift}")
        if int(self.num_sigma_buckets) != self.num_sigma_buckets or self.num_sigma_buckets < 1:
            raise ValueError(f"FlowConfig.num_sigma_buckets must be an integer >= 1, got {self.num_sigma_buckets}")
        if not (self.timestep_scale > 0 and math.isfinite(self.timestep_scale)):
            raise ValueError(f"FlowConfig.timestep_scale must be > 0, got {self.timestep_scale}")


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """σ' = s σ / (1 + (s - 1) σ), elementwise; any shape, dtype kept.

    Operation order matches `FlowMatchEulerDiscreteScheduler.set_timesteps`, so float32 inputs
    give the scheduler's float32 sigmas bit for bit. Fixes 0 and 1; s > 1 moves σ towards 1.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def shift_for_tokens(num_tokens: int, ref_shift: float = 15.0, ref_tokens: int = 114080) -> float:
    """Heuristic shift for a workload of `num_tokens` video tokens: ref_shift · sqrt(N / ref_tokens).

    Reference: shift 15 at 720p (1280×736) × 121 frames = 114,080 tokens (the T2V inference
    shift). A sqrt(N) law keeps the signal-to-noise ratio per token group roughly constant
    (SD3's resolution-shift argument). Not clamped: small workloads get shift < 1 (e.g.
    ≈0.71 for 256 tokens); a curriculum that wants a floor applies `max(1, ...)` itself.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    if ref_tokens <= 0 or ref_shift <= 0:
        raise ValueError(f"ref_tokens and ref_shift must be > 0, got {ref_tokens}, {ref_shift}")
    return float(ref_shift) * math.sqrt(num_tokens / ref_tokens)


def sample_sigmas(
    batch_size: int,
    cfg: FlowConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels: (B,) float32 in the open interval (0, 1), logit-normal then shifted.

    Draws on the generator's device (CPU when no generator is given) and then moves to
    `device`, so a seeded CPU generator yields the same σ on every accelerator type.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float32)
    sigma = torch.sigmoid(z * cfg.logit_std + cfg.logit_mean)
    sigma = shift_sigma(sigma, cfg.shift)
    sigma = sigma.clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)
    return sigma.to(device) if device is not None else sigma


def _expand_sigma(sigma: Tensor | float, like: Tensor) -> Tensor | float:
    """(B,) → (B, 1, ..., 1) to broadcast over `like`'s trailing dims; scalars pass through."""
    if not isinstance(sigma, Tensor):
        return sigma
    sigma = sigma.to(device=like.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a scalar or (B,) with B={like.shape[0]}, got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward process x_t = (1 - σ) x0 + σ ε.

    x0, noise: (B, ...) same shape; sigma: (B,) or scalar, broadcast over the trailing dims.
    Returns (B, ...) in x0's dtype. σ is cast to x0's dtype and the terms are formed in the
    order `FlowMatchEulerDiscreteScheduler.scale_noise` uses, so results are bit-identical.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _expand_sigma(sigma, x0)
    if isinstance(s, Tensor):
        s = s.to(x0.dtype)
    return s * noise + (1.0 - s) * x0


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = ε - x0 = d x_t / dσ; (B, ...) → (B, ...)."""
    return noise - x0


def model_timestep(sigma: Tensor, cfg: FlowConfig) -> Tensor:
    """Transformer timestep t = timestep_scale · σ; (B,) → (B,), same dtype (0..1000 for diffusers)."""
    return sigma * cfg.timestep_scale


def euler_step(x_t: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE: x_{σ'} = x_σ + (σ' - σ) v.

    x_t, v: (B, ...); sigma, sigma_next: scalars or (B,) (per-sample levels). Accumulates in
    float32 (as the scheduler does, so bf16 sampling does not drift) and returns x_t's dtype.
    With sigma/sigma_next taken from `scheduler.sigmas[i]`, `[i + 1]` this equals
    `FlowMatchEulerDiscreteScheduler.step(v, scheduler.timesteps[i], x_t).prev_sample`.
    """
    s = _expand_sigma(sigma, x_t)
    s_next = _expand_sigma(sigma_next, x_t)
    dt = s_next - s
    if isinstance(dt, Tensor):
        dt = dt.to(torch.float32)
    return (x_t.to(torch.float32) + dt * v.to(torch.float32)).to(x_t.dtype)


def sigma_bucket_index(sigma: Tensor, num_buckets: int) -> Tensor:
    """(B,) σ → (B,) int64 bucket in [0, num_buckets): equal-width bins over [0, 1], σ = 1 in the last."""
    return (sigma.detach().float() * num_buckets).floor().long().clamp_(0, num_buckets - 1)


def flow_loss(
    pred: Tensor,
    target: Tensor,
    sigma: Tensor,
    *,
    num_buckets: int = 4,
    weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """Velocity MSE plus per-noise-level diagnostics.

    pred, target: (B, C, F, H, W) (any (B, ...) works); sigma: (B,) the σ each sample was noised at.
    weight: optional per-sample loss weight (B,) or a tensor broadcastable to pred; it scales
    the squared error inside `denoise` only (diagnostics stay unweighted, so they remain
    comparable across weighting schemes).

    Returns 0-d float32 tensors:
      denoise             mean squared error over all elements (differentiable; the training loss).
      sigma_q{i}          mean of the per-sample MSE over samples with σ in bucket i
                          (i = 1..num_buckets, bucket i = [(i-1)/n, i/n)), detached.
      sigma_q{i}_sum      sum of those per-sample MSEs, detached.
      sigma_q{i}_count    number of samples in bucket i (float32, exact up to 2^24).
    Every key is always present so all ranks reduce the same set; an empty bucket reports
    sum = count = 0 and mean 0 (never NaN). For a global metric, all-reduce `_sum` and
    `_count` and divide (skip buckets whose global count is 0).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if sigma.shape != (pred.shape[0],):
        raise ValueError(f"sigma must be (B,) with B={pred.shape[0]}, got {tuple(sigma.shape)}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    # float32 so that a bf16 prediction does not make the loss reduction itself lossy.
    sq = (pred.float() - target.float()).square()
    if weight is None:
        denoise = sq.mean()
    else:
        w = weight.to(device=sq.device, dtype=torch.float32)
        if w.ndim == 1:
            w = w.reshape(-1, *([1] * (sq.ndim - 1)))
        denoise = (sq * w).mean()

    per_sample = sq.detach().flatten(1).mean(dim=1)  # (B,)
    idx = sigma_bucket_index(sigma.to(per_sample.device), num_buckets)
    sums = torch.zeros(num_buckets, dtype=torch.float32, device=per_sample.device)
    sums.index_add_(0, idx, per_sample)
    # index_add_, not bincount: CUDA's bincount reads the max index back to size its output (a sync)
    counts = torch.zeros(num_buckets, dtype=torch.float32, device=per_sample.device)
    counts.index_add_(0, idx, torch.ones_like(per_sample))
    means = sums / counts.clamp(min=1.0)

    out: dict[str, Tensor] = {"denoise": denoise}
    for i in range(num_buckets):
        out[f"sigma_q{i + 1}"] = means[i]
        out[f"sigma_q{i + 1}_sum"] = sums[i]
        out[f"sigma_q{i + 1}_count"] = counts[i]
    return out
