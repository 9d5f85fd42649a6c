"""Rectified flow against diffusers' FlowMatchEulerDiscreteScheduler, plus sampling and loss numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from motif_train.objectives.flow import (
    FlowConfig,
    add_noise,
    euler_step,
    flow_loss,
    model_timestep,
    sample_sigmas,
    shift_for_tokens,
    shift_sigma,
    velocity_target,
)

SHIFTS = [1.0, 5.0]


def _latents(seed: int, shape=(3, 16, 3, 4, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("shift", SHIFTS)
def test_add_noise_matches_scheduler_scale_noise(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(20)
    x0, noise = _latents(0)
    idx = torch.tensor([0, 7, 19])  # first, middle, last timestep: one per sample
    ts = sched.timesteps[idx]
    ref = sched.scale_noise(x0, ts, noise)
    # σ from the scheduler's own table: bit-equal.
    assert torch.equal(add_noise(x0, noise, sched.sigmas[idx]), ref)
    # σ recovered from the timestep the model sees (t / 1000): equal to float32 rounding.
    torch.testing.assert_close(add_noise(x0, noise, ts / 1000.0), ref, rtol=0, atol=1e-6)
    # The same timestep for the whole batch, one at a time.
    for i in (2, 11, 15):
        t = sched.timesteps[i].repeat(x0.shape[0])
        torch.testing.assert_close(add_noise(x0, noise, sched.sigmas[i]), sched.scale_noise(x0, t, noise),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_step_matches_scheduler_step(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    x, _ = _latents(1)
    g = torch.Generator().manual_seed(2)
    ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        x = sched.step(v, t, x).prev_sample
        ours = euler_step(ours, v, sched.sigmas[i], sched.sigmas[i + 1])
        assert torch.equal(ours, x), f"step {i}"
        # The transformer is fed t = 1000 σ, which is what the scheduler's timesteps are.
        torch.testing.assert_close(model_timestep(sched.sigmas[i], FlowConfig()), t, rtol=0, atol=1e-4)


def test_euler_step_per_sample_sigma_and_exact_velocity_recovers_x0():
    x0, noise = _latents(3)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    x_t = add_noise(x0, noise, sigma)
    v = velocity_target(x0, noise)
    torch.testing.assert_close(euler_step(x_t, v, sigma, torch.zeros(3)), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(euler_step(x_t, v, sigma, torch.ones(3)), noise, rtol=0, atol=1e-6)
    half = euler_step(x_t, v, sigma, sigma / 2)
    torch.testing.assert_close(half, add_noise(x0, noise, sigma / 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", SHIFTS + [15.0])
def test_shift_sigma_matches_scheduler(shift):
    n = 25
    base = np.linspace(1.0, 1.0 / n, n)  # what MotifVideoPipeline passes as `sigmas`
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=base)
    ours = shift_sigma(torch.from_numpy(base.astype(np.float32)), shift)
    assert torch.equal(ours, sched.sigmas[:-1])
    # The training table built in __init__ uses the same map.
    train = torch.from_numpy(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy()) / 1000
    assert torch.equal(shift_sigma(train, shift), FlowMatchEulerDiscreteScheduler(shift=shift).sigmas)
    assert shift_sigma(0.5, shift) == pytest.approx(shift / (1 + shift))


def test_shift_for_tokens():
    assert shift_for_tokens(114080) == pytest.approx(15.0)
    assert shift_for_tokens(114080 // 4) == pytest.approx(7.5)
    assert shift_for_tokens(32760) == pytest.approx(15.0 * math.sqrt(32760 / 114080))
    assert shift_for_tokens(400, ref_shift=3.0, ref_tokens=100) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        shift_for_tokens(0)


def test_sample_sigmas_deterministic_and_in_range():
    cfg = FlowConfig(shift=3.0)
    a = sample_sigmas(64, cfg, generator=torch.Generator().manual_seed(7))
    b = sample_sigmas(64, cfg, generator=torch.Generator().manual_seed(7))
    c = sample_sigmas(64, cfg, generator=torch.Generator().manual_seed(8))
    assert a.shape == (64,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Extreme logits would round to exactly 0 or 1 without the clamp.
    wide = sample_sigmas(20000, FlowConfig(logit_std=40.0, shift=20.0), generator=torch.Generator().manual_seed(0))
    assert bool(((wide > 0) & (wide < 1)).all())


def test_sample_sigmas_median_moves_with_shift():
    def median(shift: float) -> float:
        cfg = FlowConfig(shift=shift)
        return sample_sigmas(20000, cfg, generator=torch.Generator().manual_seed(0)).median().item()

    m1, m3, m15 = median(1.0), median(3.0), median(15.0)
    assert abs(m1 - 0.5) < 0.02
    # The shift is monotone, so it maps the median: 0.5 -> s / (1 + s).
    assert abs(m3 - 0.75) < 0.02
    assert abs(m15 - 15 / 16) < 0.02
    assert m1 < m3 < m15
    # A positive logit mean moves the unshifted median to sigmoid(mean).
    m = sample_sigmas(20000, FlowConfig(logit_mean=1.0), generator=torch.Generator().manual_seed(1)).median()
    assert abs(m.item() - 1 / (1 + math.exp(-1.0))) < 0.02


def test_flow_loss_values_buckets_and_grad():
    g = torch.Generator().manual_seed(4)
    b = 7
    pred = torch.randn(b, 16, 2, 4, 4, generator=g).requires_grad_(True)
    target = torch.randn(b, 16, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.05, 0.20, 0.30, 0.55, 0.60, 0.95, 1.0])  # bucket 4 gets 0.95 and 1.0
    out = flow_loss(pred, target, sigma, num_buckets=4)

    torch.testing.assert_close(out["denoise"], F.mse_loss(pred, target), rtol=1e-6, atol=0)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3, 4)).detach()
    groups = {1: [0, 1], 2: [2], 3: [3, 4], 4: [5, 6]}
    for q, ids in groups.items():
        torch.testing.assert_close(out[f"sigma_q{q}"], per_sample[ids].mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(out[f"sigma_q{q}_sum"], per_sample[ids].sum(), rtol=1e-6, atol=0)
        assert out[f"sigma_q{q}_count"].item() == len(ids)
        assert not out[f"sigma_q{q}"].requires_grad
    assert sum(out[f"sigma_q{q}_count"].item() for q in range(1, 5)) == b

    out["denoise"].backward()
    expected = 2 * (pred - target).detach() / pred.numel()
    torch.testing.assert_close(pred.grad, expected, rtol=1e-5, atol=1e-9)


def test_flow_loss_empty_bucket_and_weight():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(4, 16, 1, 2, 2, generator=g)
    target = torch.randn(4, 16, 1, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.15, 0.2, 0.9])
    out = flow_loss(pred, target, sigma, num_buckets=5)
    assert set(out) == {"denoise"} | {f"sigma_q{i}{s}" for i in range(1, 6) for s in ("", "_sum", "_count")}
    for q in (3, 4):  # no samples in [0.4, 0.8)
        assert out[f"sigma_q{q}_count"].item() == 0
        assert out[f"sigma_q{q}"].item() == 0.0 and out[f"sigma_q{q}_sum"].item() == 0.0
    assert all(torch.isfinite(v).all() for v in out.values())

    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    sq = ((pred - target) ** 2).mean(dim=(1, 2, 3, 4))
    weighted = flow_loss(pred, target, sigma, weight=w)
    torch.testing.assert_close(weighted["denoise"], (w * sq).mean(), rtol=1e-6, atol=0)
    # Diagnostics stay unweighted.
    torch.testing.assert_close(weighted["sigma_q1"], flow_loss(pred, target, sigma)["sigma_q1"])


def test_flow_loss_bf16_pred_is_reduced_in_float32():
    g = torch.Generator().manual_seed(6)
    pred = torch.randn(2, 16, 1, 4, 4, generator=g).bfloat16()
    target = torch.randn(2, 16, 1, 4, 4, generator=g)
    out = flow_loss(pred, target, torch.tensor([0.3, 0.7]))
    assert out["denoise"].dtype == torch.float32
    torch.testing.assert_close(out["denoise"], F.mse_loss(pred.float(), target), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"logit_std": 0.0}, "logit_std"), ({"shift": -1.0}, "shift"), ({"num_sigma_buckets": 0}, "num_sigma_buckets"),
     ({"timestep_scale": 0.0}, "timestep_scale")],
)
def test_flow_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FlowConfig(**kwargs)
