"""motif_train.evaluation.video_metrics: hand-checked values of every metric, on tiny random instances of the real
classes (CLIPModel / SiglipModel / VJEPA2Model saved to tmp folders and loaded back)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from motif_train.evaluation.video_metrics import (
    PSNR_CAP_DB,
    SSIM_K1,
    SSIM_K2,
    VideoMetrics,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    psnr,
    ssim,
    vjepa_pixels,
)
from motif_train.objectives.repa import teacher_pixels
from motif_train.objectives.tiny_encoders import METRIC_SUBFOLDER, _build_tokenizer, build_tiny_encoders

PROMPTS = ["a red dog runs on the beach", "two cats sitting in a dark room", "cinematic aerial shot of a city"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_encoders")
    paths = build_tiny_encoders(root, seed=0, metric_encoder=True)
    assert paths["clip"] == root / METRIC_SUBFOLDER and (paths["clip"] / "model.safetensors").is_file()
    assert not [f for f in root.rglob("*") if f.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    return root


@pytest.fixture(scope="module")
def vm(root) -> VideoMetrics:
    return VideoMetrics(root, "cpu")


def _videos(n, t, h, w, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, h, w, 3), generator=g, dtype=torch.uint8)


def _smooth_image(h, w, seed=0) -> torch.Tensor:
    """uint8 (H, W, 3) with structure at the SSIM window's scale (blurred noise in [20, 235])."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(1, 3, h + 4, w + 4, generator=g, dtype=torch.float64), 5, stride=1)
    x = (x - x.min()) / (x.max() - x.min())
    return (20 + 215 * x[0]).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def test_default_tiny_layout_unchanged(tmp_path):
    paths = build_tiny_encoders(tmp_path, seed=0)
    assert "clip" not in paths and not (tmp_path / METRIC_SUBFOLDER).exists()


# --------------------------------------------------------------------------- temporal consistency


def test_static_clip_temporal_consistency_is_one(vm):
    frame = _videos(1, 1, 40, 56)[0, 0]
    static = frame[None].expand(6, -1, -1, -1).contiguous()  # (T, H, W, 3), every frame the same
    moving = _videos(1, 6, 40, 56, seed=1)[0]
    out = vm.score([static, moving])
    assert abs(out["per_video"][0]["temporal_consistency"] - 1.0) < 1e-6
    assert out["per_video"][1]["temporal_consistency"] < 1.0 - 1e-6
    assert out["clip_score"] is None and out["fd_vjepa"] is None and out["psnr_first_frame"] is None


def test_one_frame_video_has_no_temporal_consistency(vm):
    out = vm.score(_videos(1, 1, 32, 32), PROMPTS[:1])
    assert out["temporal_consistency"] is None and out["clip_score"] is not None


# ------------------------------------------------------------------------------------------ PSNR


def test_psnr_identical_frames_is_the_cap():
    x = _smooth_image(24, 32)
    assert psnr(x, x) == PSNR_CAP_DB == 100.0
    # the same image in the other convention ((3, H, W) in [-1, 1]) is still identical
    assert psnr(x, x.permute(2, 0, 1).double() / 127.5 - 1) == PSNR_CAP_DB


@pytest.mark.parametrize("offset", [1, 4, 25])
def test_psnr_uniform_offset_closed_form_uint8(offset):
    x = torch.randint(0, 256 - offset, (16, 20, 3), generator=torch.Generator().manual_seed(offset),
                      dtype=torch.uint8)
    assert psnr(x, x + offset) == pytest.approx(20 * math.log10(255 / offset), abs=1e-9)


def test_psnr_uniform_offset_closed_form_signed_range():
    x = torch.rand(3, 16, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5 - 1
    d = 0.1  # in [-1, 1] units: 0.05 on [0, 1] -> 20 log10(2 / d)
    assert psnr(x, x + d) == pytest.approx(20 * math.log10(2 / d), abs=1e-9)


def test_image_conventions_are_explicit():
    x = _smooth_image(16, 16)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        psnr(x, x.permute(2, 0, 1).float())  # float in [0, 255]: refused, not guessed
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        psnr(x.permute(2, 0, 1).contiguous(), x)  # uint8 channels-first
    with pytest.raises(TypeError):
        psnr(x.long(), x)
    with pytest.raises(ValueError, match="differ in size"):
        psnr(x, x[:8])


# ------------------------------------------------------------------------------------------ SSIM


def test_ssim_identical_is_one_and_negative_is_low():
    x = _smooth_image(32, 40)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, 255 - x) < 0.1
    assert ssim(x, 255 - x) < 0  # structure inverted: negative covariance everywhere


def test_ssim_constant_images_closed_form():
    # constant images a, b on [0, 1]: the variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 50, 200
    x = torch.full((16, 16, 3), a, dtype=torch.uint8)
    y = torch.full((16, 16, 3), b, dtype=torch.uint8)
    u, v, c1 = a / 255, b / 255, SSIM_K1**2
    assert ssim(x, y) == pytest.approx((2 * u * v + c1) / (u * u + v * v + c1), abs=1e-9)
    assert SSIM_K2 == 0.03
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:10], y[:10])


def test_first_frame_metrics_in_score(vm):
    videos = _videos(3, 5, 32, 48)
    cond_same = videos[1, 0]  # uint8 (H, W, 3): the generated frame 0 itself
    cond_off = (videos[2, 0].double() / 127.5 - 1).permute(2, 0, 1).contiguous()  # (3, H, W) in [-1, 1]
    out = vm.score(videos, PROMPTS, cond_images=[None, cond_same, cond_off])
    per = out["per_video"]
    assert per[0]["psnr_first_frame"] is None and per[0]["ssim_first_frame"] is None  # T2V
    assert per[1]["psnr_first_frame"] == PSNR_CAP_DB and per[1]["ssim_first_frame"] == pytest.approx(1.0)
    assert per[2]["psnr_first_frame"] == PSNR_CAP_DB  # same pixels in the other convention
    assert out["psnr_first_frame"] == PSNR_CAP_DB
    with pytest.raises(ValueError, match="2 condition images for 3 videos"):
        vm.score(videos, PROMPTS, cond_images=[None, cond_same])


# ------------------------------------------------------------------------------ Fréchet distance


def _exact_set(mu, cov, n, seed):
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly cov."""
    d = mu.numel()
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    w, v = torch.linalg.eigh(z.T @ z / (n - 1))
    wc, vc = torch.linalg.eigh(cov)
    z = z @ (v * w.rsqrt()) @ v.T @ (vc * wc.sqrt()) @ vc.T
    return z + mu


def test_frechet_distance_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    for n, d in [(200, 8), (5, 32)]:  # the second: N < D, singular covariance of rank 4
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
        assert frechet_distance(x, x) < 1e-6 * float(x.var(0).sum())


def test_frechet_distance_diagonal_gaussians_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, -1.0]).double(), torch.tensor([1.0, 1.0, 0.0, 0.5]).double()
    a, b = torch.tensor([1.0, 4.0, 0.25, 2.0]).double(), torch.tensor([9.0, 1.0, 0.25, 0.5]).double()
    x, y = _exact_set(mu1, torch.diag(a), 60, 1), _exact_set(mu2, torch.diag(b), 40, 2)
    mx, sx = gaussian_stats(x)
    assert torch.allclose(mx, mu1, atol=1e-12) and torch.allclose(sx, torch.diag(a), atol=1e-10)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())  # 3.25 + 6.0858
    assert frechet_distance(x, y) == pytest.approx(expected, abs=1e-8)


def test_frechet_distance_scaled_full_covariance_closed_form():
    # S2 = c^2 S1 with a full (non-diagonal) S1: tr((S1 S2)^1/2) = c tr(S1), FD = |dmu|^2 + (1 - c)^2 tr(S1)
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1 = m @ m.T + 0.1 * torch.eye(6, dtype=torch.float64)
    c, dmu = 2.5, torch.randn(6, generator=g, dtype=torch.float64)
    expected = float((dmu**2).sum() + (1 - c) ** 2 * torch.trace(s1))
    assert frechet_distance_from_stats(torch.zeros(6), s1, dmu, c * c * s1) == pytest.approx(expected, rel=1e-10)
    x, y = _exact_set(torch.zeros(6, dtype=torch.float64), s1, 50, 4), _exact_set(dmu, c * c * s1, 30, 5)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x[:1], y)


# --------------------------------------------------------------------------------------- fd_vjepa


def test_vjepa_pixels_match_repa_teacher_input():
    clip = _videos(1, 9, 24, 40)[0]  # 1+4k frames
    mine = vjepa_pixels(clip, 32, 2)
    x = (clip.permute(3, 0, 1, 2).float() / 127.5 - 1)[None]  # (1, 3, T, H, W) in [-1, 1]
    assert mine.shape == (3, 10, 32, 32)
    assert torch.equal(mine, teacher_pixels(x, 32)[0])
    assert vjepa_pixels(clip[:4], 32, 2).shape == (3, 4, 32, 32)  # already a multiple: nothing added
    sub = vjepa_pixels(clip, 32, 2, max_frames=3)  # frames 0, 4, 8, then frame 0 prepended
    assert sub.shape == (3, 4, 32, 32) and torch.equal(sub[:, 3], mine[:, 9]) and torch.equal(sub[:, 0], sub[:, 1])


def test_fd_vjepa_in_score(vm):
    gen = _videos(4, 5, 32, 48, seed=1)
    ref = list(_videos(3, 9, 40, 40, seed=2))
    out = vm.score(gen, PROMPTS + ["zebra"], reference_clips=ref)
    assert out["fd_samples"] == (4, 3) and out["fd_vjepa"] > 0
    feats = vm.vjepa_features(ref)
    assert feats.shape == (3, 32) and feats.dtype == torch.float64
    cached = vm.score(gen, PROMPTS + ["zebra"], reference_features=feats)
    assert cached["fd_vjepa"] == out["fd_vjepa"]
    same = vm.score(gen, reference_clips=gen)
    assert same["fd_vjepa"] < 1e-6 * float(vm.vjepa_features(gen).var(0).sum())
    assert math.isnan(vm.score(gen[:1], reference_clips=ref)["fd_vjepa"])  # < 2 clips: undefined, not raised


def test_reference_features_from_stored_teacher_pixels(vm):
    """The shards' teacher pixels (REPA's input, what vjepa_pixels prepares) give the clip's own features, and
    heldout_reference_features reads them from a held-out reader (teacher=True), clips only, in order."""
    from types import SimpleNamespace

    from motif_train.evaluation.video_metrics import heldout_reference_features, vjepa_pixels

    clips = list(_videos(3, 9, 40, 40, seed=2))
    pix = torch.stack([vjepa_pixels(c, vm._teacher_model().crop_size) for c in clips])  # (3, 3, 10, S, S)
    assert torch.allclose(vm.vjepa_features_from_pixels(pix), vm.vjepa_features(clips), atol=1e-6)
    image = vjepa_pixels(_videos(1, 1, 40, 40, seed=3)[0], vm._teacher_model().crop_size)  # one tubelet: skipped
    stored = {0: pix[0], 1: image, 2: pix[1], 3: pix[2]}
    calls = []

    def read(gid, *, teacher=False):
        calls.append(teacher)
        return SimpleNamespace(teacher_pixels=stored[gid][None])

    reader = SimpleNamespace(buckets={"b1": {}, "a0": {}}, bucket_ids=lambda b: {"a0": [0, 1], "b1": [2, 3]}[b],
                             read=read)
    got = heldout_reference_features(vm, reader, max_clips=2)
    assert all(calls) and torch.allclose(got, vm.vjepa_features(clips[:2]), atol=1e-6)


# ------------------------------------------------------------------------------------- clip score


def _tiny_siglip(path):
    from transformers import SiglipConfig, SiglipModel

    tok = _build_tokenizer(16)
    torch.manual_seed(7)
    cfg = SiglipConfig(
        # SigLIP has no projection: text and vision widths must agree (1152 in so400m, 24 here)
        text_config={"vocab_size": len(tok), "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 0,
                     "bos_token_id": 2, "eos_token_id": 1},
        vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8})
    SiglipModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32}}))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_score_equals_hand_cosine(root, tmp_path, kind):
    from transformers import AutoTokenizer, CLIPModel, SiglipModel

    if kind == "clip":
        path, cls = root / METRIC_SUBFOLDER, CLIPModel
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        tok_kw = {"padding": True}
    else:
        path, cls = tmp_path / "siglip", SiglipModel
        _tiny_siglip(path)
        mean, std, tok_kw = [0.5] * 3, [0.5] * 3, {"padding": "max_length", "max_length": 16}
    model = cls.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    # frame-constant videos at the model's 32x32 input size: preprocessing is only (x / 255 - mean) / std
    frames = _videos(3, 1, 32, 32, seed=4)[:, 0]  # (3, 32, 32, 3)
    videos = frames[:, None].expand(-1, 4, -1, -1, -1).contiguous()  # (3, 4, 32, 32, 3)
    out = VideoMetrics(clip_path=path).score(videos, PROMPTS)

    px = (frames.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px).pooler_output
        for i, prompt in enumerate(PROMPTS):
            ids = tok([prompt], return_tensors="pt", **tok_kw)
            if kind == "siglip":
                ids = {"input_ids": ids["input_ids"]}
            txt = model.get_text_features(**ids).pooler_output
            cos = float(F.cosine_similarity(img[i:i + 1], txt).item())
            per = out["per_video"][i]
            assert per["clip_cosine"] == pytest.approx(cos, abs=1e-5)
            assert per["clip_score"] == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
            assert abs(per["temporal_consistency"] - 1) < 1e-6
    assert out["clip_score"] == pytest.approx(np.mean([p["clip_score"] for p in out["per_video"]]))


# ----------------------------------------------------------------------------------- determinism


def test_score_is_deterministic_and_batch_invariant(root, vm):
    videos = list(_videos(3, 5, 32, 48, seed=5)) + [_videos(1, 3, 40, 40, seed=6)[0]]
    conds = [None, videos[1][0], None, _smooth_image(40, 40)]  # the last one is not the frame: finite PSNR
    ref = _videos(3, 5, 32, 32, seed=7)
    prompts = PROMPTS + ["a dog"]
    a = vm.score(videos, prompts, cond_images=conds, reference_clips=ref)
    b = vm.score(videos, prompts, cond_images=conds, reference_clips=ref)
    assert a == b
    small = VideoMetrics(root, batch_size=2).score(videos, prompts, cond_images=conds, reference_clips=ref)
    for k in ("clip_score", "clip_cosine", "temporal_consistency", "psnr_first_frame", "ssim_first_frame",
              "fd_vjepa"):
        assert small[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert a["per_video"][3]["psnr_first_frame"] < PSNR_CAP_DB
    with pytest.raises(ValueError, match="differ in size"):
        vm.score(videos, prompts, cond_images=[None, None, None, videos[0][0]])
