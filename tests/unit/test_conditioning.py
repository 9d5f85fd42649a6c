"""I2V conditioning, timestep-aware blur, task choice and CFG text dropout, checked with numbers."""

from __future__ import annotations

import pytest
import torch

from motif_train.objectives.conditioning import (
    ConditioningConfig,
    apply_text_dropout,
    build_i2v_condition,
    build_t2v_condition,
    choose_task,
    draw_text_dropout,
    gaussian_kernels,
    model_input,
    timestep_blur,
)

# ----------------------------------------------------------------------------- choose_task


def test_choose_task_deterministic_and_frequency():
    tasks = [choose_task(1234, step, 0, 0.3) for step in range(2000)]
    assert tasks == [choose_task(1234, step, 0, 0.3) for step in range(2000)]
    assert set(tasks) == {"t2v", "i2v"}
    assert abs(tasks.count("i2v") / 2000 - 0.3) < 0.05
    # Micro-steps and seeds give different, equally fair streams.
    micro = [choose_task(1234, 5, m, 0.5) for m in range(2000)]
    assert abs(micro.count("i2v") / 2000 - 0.5) < 0.05
    other = [choose_task(99, step, 0, 0.3) for step in range(2000)]
    assert other != tasks
    assert all(choose_task(0, s, 0, 0.0) == "t2v" for s in range(200))
    assert all(choose_task(0, s, 0, 1.0) == "i2v" for s in range(200))


def test_choose_task_leaves_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [choose_task(7, s, 1, 0.5) for s in range(50)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # a different global state must not change the choice
    assert [choose_task(7, s, 1, 0.5) for s in range(50)] == first


# ----------------------------------------------------------------------------- blur


def _hf_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared horizontal+vertical finite difference: (B, C, H, W) -> (B,)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return dx.square().mean(dim=(1, 2, 3)) + dy.square().mean(dim=(1, 2, 3))


def test_blur_sigma_zero_is_bit_identical():
    cfg = ConditioningConfig(blur_sigma_max=3.0)
    x = torch.randn(3, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    out = timestep_blur(x, torch.tensor([0.0, 0.5, 0.0]), cfg)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.allclose(out[1], x[1])
    # blur_sigma_max = 0 turns the blur off for every σ.
    assert torch.equal(timestep_blur(x, torch.ones(3), ConditioningConfig()), x)


def test_blur_reduces_high_frequency_monotonically():
    cfg = ConditioningConfig(blur_sigma_max=4.0, blur_gamma=1.0)
    one = torch.randn(1, 16, 24, 24, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
    out = timestep_blur(one.expand(len(sigmas), -1, -1, -1), sigmas, cfg)
    energy = _hf_energy(out)
    assert bool((energy[1:] < energy[:-1]).all()), energy
    assert energy[-1] < 0.1 * energy[0]


def test_blur_gamma_keeps_low_noise_sharper():
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.3])
    e_lin = _hf_energy(timestep_blur(x, s, ConditioningConfig(blur_sigma_max=3.0, blur_gamma=1.0)))
    e_sq = _hf_energy(timestep_blur(x, s, ConditioningConfig(blur_sigma_max=3.0, blur_gamma=2.0)))
    assert e_sq > e_lin


def test_blur_is_per_sample_independent():
    cfg = ConditioningConfig(blur_sigma_max=5.0, blur_kernel_max=15)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 12, 10, generator=g)
    sigma = torch.tensor([0.2, 1.0, 0.0, 0.6])
    batch = timestep_blur(x, sigma, cfg)
    for i in range(4):
        alone = timestep_blur(x[i : i + 1], sigma[i : i + 1], cfg)
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-6)
    # Changing one sample's pixels leaves the others untouched.
    y = x.clone()
    y[1] = torch.randn(16, 12, 10, generator=g)
    other = timestep_blur(y, sigma, cfg)
    torch.testing.assert_close(other[[0, 2, 3]], batch[[0, 2, 3]], rtol=0, atol=1e-6)


def test_blur_preserves_constant_and_mean():
    cfg = ConditioningConfig(blur_sigma_max=6.0)
    const = torch.full((2, 3, 9, 13), 0.37)
    torch.testing.assert_close(timestep_blur(const, torch.tensor([0.5, 1.0]), cfg), const, rtol=0, atol=1e-6)
    # The normalised kernel keeps every channel's spatial mean: only reflect padding at the border
    # moves it, by O(radius / side). 64x64 N(offset, 1) images, σ_blur = 1.5 .. 6 (radius up to 15):
    # the drift is < 1e-2 while the image itself changes by ~0.8 per pixel and its std drops ~10x.
    g = torch.Generator().manual_seed(7)
    offset = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(4, 1, 1, 1)
    x = torch.randn(4, 16, 64, 64, generator=g) + offset
    y = timestep_blur(x, torch.tensor([0.25, 0.5, 0.75, 1.0]), cfg)
    drift = (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs()  # (4, 16)
    assert drift.max() < 1e-2, drift.max()
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), offset.flatten(), rtol=0, atol=2e-2)
    assert (y - x).abs().mean() > 0.5 and bool((y.std(dim=(2, 3)) < 0.3).all())
    # Kernel wider than the image (reflect pad is clamped) still gives a finite, in-range result.
    tiny = torch.rand(1, 16, 3, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = timestep_blur(tiny, torch.tensor([1.0]), cfg)
    assert out.shape == tiny.shape and bool(out.abs().max() <= tiny.abs().max() + 1e-6)


def test_gaussian_kernels_width_is_given_by_the_host():
    """The width is the python radius passed in (no read of the σ back from the device); each
    sample is still cut at its own ceil(3σ), and σ = 0 is the identity."""
    k = gaussian_kernels(torch.tensor([0.0, 0.5, 4.0]), 5)
    assert k.shape == (3, 11)
    assert torch.equal(k[0], torch.eye(11)[5])
    assert (k[1] > 0).tolist() == [abs(o) <= 2 for o in range(-5, 6)]  # ceil(1.5) = 2
    assert bool((k[2] > 0).all())  # ceil(12) clamped to 5
    torch.testing.assert_close(k.sum(dim=1), torch.ones(3))


def test_blur_matches_explicit_gaussian_and_keeps_dtype():
    cfg = ConditioningConfig(blur_sigma_max=1.0, blur_kernel_max=31)
    x = torch.randn(1, 1, 1, 20, generator=torch.Generator().manual_seed(5)).repeat(1, 1, 20, 1)
    out = timestep_blur(x, torch.tensor([1.0]), cfg)  # σ_blur = 1 -> radius 3, rows identical
    offs = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-0.5 * offs**2)
    k = k / k.sum()
    row = x[0, 0, 0]
    j = 10
    torch.testing.assert_close(out[0, 0, 5, j], (row[j - 3 : j + 4] * k).sum(), rtol=0, atol=1e-6)
    half = timestep_blur(x.bfloat16(), torch.tensor([1.0]), cfg)
    assert half.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- I2V / T2V inputs


def test_build_i2v_condition_values_and_shapes():
    x0 = torch.randn(2, 16, 5, 4, 6, generator=torch.Generator().manual_seed(6))
    cond, mask = build_i2v_condition(x0)
    assert cond.shape == (2, 16, 5, 4, 6) and mask.shape == (2, 1, 5, 4, 6)
    assert torch.equal(cond[:, :, 0], x0[:, :, 0])
    assert torch.count_nonzero(cond[:, :, 1:]) == 0
    assert bool((mask[:, :, 0] == 1).all()) and torch.count_nonzero(mask[:, :, 1:]) == 0
    assert mask.sum().item() == 2 * 4 * 6
    with pytest.raises(ValueError):
        build_i2v_condition(x0[:, :, :1])  # a single frame would hand the model its target

    tc, tm = build_t2v_condition(x0)
    assert tc.shape == cond.shape and tm.shape == mask.shape
    assert torch.count_nonzero(tc) == 0 and torch.count_nonzero(tm) == 0


def test_model_input_channels():
    x0 = torch.randn(2, 16, 3, 4, 4)
    x_t = torch.randn(2, 16, 3, 4, 4)
    cond, mask = build_i2v_condition(x0)
    inp = model_input(x_t, cond, mask)
    assert inp.shape == (2, 33, 3, 4, 4)
    assert torch.equal(inp[:, :16], x_t) and torch.equal(inp[:, 16:32], cond) and torch.equal(inp[:, 32:], mask)
    with pytest.raises(ValueError):
        model_input(x_t, cond, mask[:, :, :2])


# ----------------------------------------------------------------------------- text dropout


def _text(b=6, length=8, d=5):
    g = torch.Generator().manual_seed(7)
    embeds = torch.randn(b, length, d, generator=g)
    lengths = torch.tensor([8, 3, 5, 1, 8, 6])[:b]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return embeds, mask


def test_text_dropout_p0_unchanged():
    embeds, mask = _text()
    empty_e, empty_m = torch.randn(2, 5), torch.ones(2, dtype=torch.bool)
    e, m, dropped = apply_text_dropout(embeds, mask, 0.0, empty_e, empty_m)
    assert torch.equal(e, embeds) and torch.equal(m, mask) and not bool(dropped.any())


@pytest.mark.parametrize("l0", [3, 8, 11])  # shorter, equal, longer (truncated) than L = 8
def test_text_dropout_p1_writes_empty_prompt(l0):
    embeds, mask = _text()
    empty_e = torch.randn(l0, 5, generator=torch.Generator().manual_seed(8))
    empty_m = torch.ones(l0, dtype=torch.bool)
    e, m, dropped = apply_text_dropout(embeds, mask, 1.0, empty_e, empty_m)
    n = min(l0, 8)
    assert bool(dropped.all()) and e.shape == embeds.shape and m.dtype == mask.dtype
    for i in range(6):
        assert torch.equal(e[i, :n], empty_e[:n]) and torch.count_nonzero(e[i, n:]) == 0
        assert m[i, :n].all() and not m[i, n:].any()


def test_text_dropout_deterministic_with_generator_and_rate():
    embeds, mask = _text()
    mask_i = mask.long()  # integer masks keep their dtype
    empty_e, empty_m = torch.zeros(2, 5), torch.ones(2, dtype=torch.long)
    a = apply_text_dropout(embeds, mask_i, 0.5, empty_e, empty_m, generator=torch.Generator().manual_seed(3))
    b = apply_text_dropout(embeds, mask_i, 0.5, empty_e, empty_m, generator=torch.Generator().manual_seed(3))
    for x, y in zip(a, b, strict=False):
        assert torch.equal(x, y)
    e, m, dropped = a
    assert m.dtype == torch.long
    assert torch.equal(e[~dropped], embeds[~dropped]) and torch.equal(m[~dropped], mask_i[~dropped])
    assert bool((m[dropped].sum(dim=1) == 2).all())

    big_e, big_m = torch.randn(4000, 2, 3), torch.ones(4000, 2, dtype=torch.bool)
    _, _, d = apply_text_dropout(big_e, big_m, 0.1, torch.zeros(1, 3), torch.ones(1, dtype=torch.bool),
                                 generator=torch.Generator().manual_seed(0))
    assert abs(d.float().mean().item() - 0.1) < 0.02


def test_text_dropout_drawn_on_the_host():
    """Python bools, a pure function of the generator's seed (its state is not touched, so σ / noise
    / TREAD draws do not move), at the requested rate."""
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = draw_text_dropout(4000, 0.1, g)
    assert torch.equal(g.get_state(), state) and all(type(x) is bool for x in a)
    assert a == draw_text_dropout(4000, 0.1, torch.Generator().manual_seed(5))
    assert a != draw_text_dropout(4000, 0.1, torch.Generator().manual_seed(6))
    assert abs(sum(a) / 4000 - 0.1) < 0.02
    assert draw_text_dropout(3, 0.0, g) == [False] * 3 and draw_text_dropout(3, 1.0, g) == [True] * 3


def test_text_dropout_applies_given_decisions():
    embeds, mask = _text()
    empty_e, empty_m = torch.randn(2, 5), torch.ones(2, dtype=torch.bool)
    dropped = [True, False, False, True, False, False]
    e, m, d = apply_text_dropout(embeds, mask, 0.3, empty_e, empty_m, dropped=dropped)
    assert d.tolist() == dropped
    for i, drop in enumerate(dropped):
        if drop:
            assert torch.equal(e[i, :2], empty_e) and m[i, :2].all() and not m[i, 2:].any()
        else:
            assert torch.equal(e[i], embeds[i]) and torch.equal(m[i], mask[i])
    with pytest.raises(ValueError, match="dropped must be"):
        apply_text_dropout(embeds, mask, 0.3, empty_e, empty_m, dropped=[True])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"i2v_prob": 1.5}, "i2v_prob"), ({"text_dropout": -0.1}, "text_dropout"),
     ({"blur_sigma_max": -1.0}, "blur_sigma_max"), ({"blur_gamma": 0.0}, "blur_gamma"),
     ({"blur_kernel_max": 8}, "blur_kernel_max")],
)
def test_conditioning_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ConditioningConfig(**kwargs)
