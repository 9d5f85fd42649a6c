"""REPA token matching and loss."""

import pytest
import torch

from motif_train.objectives.repa import RepaLossConfig, match_teacher_tokens, repa_loss, teacher_pixels


def test_teacher_pixels_prepends_frame_zero_and_squares():
    frames = torch.rand(2, 3, 9, 40, 72) * 2 - 1
    px = teacher_pixels(frames, 32)
    assert px.shape == (2, 3, 10, 32, 32)
    torch.testing.assert_close(px[:, :, 0], px[:, :, 1])
    with pytest.raises(ValueError, match="1\\+4k"):
        teacher_pixels(frames[:, :, :8], 32)


def test_time_matching_first_and_pairs():
    # 9 frames -> 3 latent frames; teacher saw 10 frames -> 5 tubelets.
    b, sh, c = 2, 4, 3
    tub = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(b, 5, sh, sh, c)
    out = match_teacher_tokens(tub, (3, sh, sh))  # (B, 3*16, C)
    per_frame = out.view(b, 3, sh * sh, c)
    assert per_frame[:, 0].eq(0).all()  # latent 0 <- tubelet 0
    assert per_frame[:, 1].eq(1.5).all()  # latent 1 <- mean(tubelet 1, 2)
    assert per_frame[:, 2].eq(3.5).all()  # latent 2 <- mean(tubelet 3, 4)


def test_space_matching_raster_order_and_resize():
    t = torch.randn(1, 1, 4, 4, 5)
    same = match_teacher_tokens(t, (1, 4, 4))
    torch.testing.assert_close(same, t.flatten(1, 3))  # row n == token (f, h, w) in raster order
    const = torch.full((1, 3, 4, 4, 2), 7.0)
    resized = match_teacher_tokens(const, (2, 3, 6))
    assert resized.shape == (1, 2 * 3 * 6, 2) and torch.allclose(resized, torch.tensor(7.0))
    with pytest.raises(ValueError, match="tubelets"):
        match_teacher_tokens(const, (3, 4, 4))


def test_loss_values_and_ids():
    target = torch.randn(2, 10, 8)
    assert repa_loss(target.clone(), target).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(-target, target).item() == pytest.approx(1.0, abs=1e-6)
    ids = torch.tensor([[1, 4, 7], [0, 2, 9]])
    kept = target.gather(1, ids[..., None].expand(-1, -1, 8)) * 3.0  # cosine ignores scale
    assert repa_loss(kept, target, ids).item() == pytest.approx(-1.0, abs=1e-6)
    proj = torch.randn(2, 3, 8, requires_grad=True)
    repa_loss(proj, target, ids).backward()
    assert proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes differ"):
        repa_loss(torch.randn(2, 4, 8), target, ids)


def test_cutoff():
    cfg = RepaLossConfig(weight=0.5, until_step=100)
    assert cfg.active(100) and not cfg.active(101)
    assert not RepaLossConfig(weight=0.0).active(0)
    with pytest.raises(ValueError, match="repa.weight"):
        RepaLossConfig(weight=-1)
