"""Frozen encoder wrappers: shapes, Motif-pipeline conventions, freezing, save/reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from motif_train.objectives import tiny_encoders as te
from motif_train.objectives.encoders import (
    TINY_DIMS,
    FrozenEncoders,
    ImageEncoder,
    TextEncoder,
    VJEPA2Teacher,
    WanVAE,
    build_tiny_encoders,
    load_encoders,
)

PROMPTS = ["a man walks on the beach at sunset", "zebra", ""]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_encoders")
    paths = build_tiny_encoders(root, seed=0)
    assert set(paths) == {"vae", "text_encoder", "tokenizer", "feature_extractor", "image_encoder", "teacher"}
    for p in paths.values():
        assert p.is_dir() and p.parent == root
    # safetensors only: nothing a pickle loader would read
    assert not [f for f in root.rglob("*") if f.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    return root


@pytest.fixture(scope="module")
def enc(root) -> FrozenEncoders:
    return load_encoders(root)


def _video(b, f, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_vae_latent_shapes(enc, frames):
    z = enc.vae.encode(_video(2, frames, 16, 24))
    assert z.shape == (2, 16, 1 + (frames - 1) // 4, 2, 3)
    assert enc.vae.latent_shape(frames, 16, 24) == tuple(z.shape[1:])
    assert enc.vae.decode(z).shape == (2, 3, frames, 16, 24)


def test_vae_rejects_bad_frame_count(enc):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        enc.vae.encode(_video(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        enc.vae.encode(_video(1, 5, 12, 16))


def test_vae_normalisation_matches_pipeline(enc):
    from diffusers import MotifVideoImage2VideoPipeline, MotifVideoPipeline

    vae, cfg = enc.vae.vae, enc.vae.vae.config
    x = _video(2, 5, 16, 16)
    raw = vae.encode(x).latent_dist.mode()
    ref = MotifVideoImage2VideoPipeline._normalize_latents(raw, cfg.latents_mean, cfg.latents_std)
    z = enc.vae.encode(x)
    assert torch.equal(z, ref)
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z * std + mean, raw, rtol=1e-5, atol=1e-5)
    # decode(normalised) == vae.decode(pipeline de-normalisation), bit for bit
    ref_px = vae.decode(MotifVideoPipeline._denormalize_latents(z, cfg.latents_mean, cfg.latents_std),
                        return_dict=False)[0]
    assert torch.equal(enc.vae.decode(z), ref_px)
    # posterior sampling follows the I2V pipeline's `latent_dist.sample(generator)`
    s = enc.vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    raw_s = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(s, MotifVideoPipeline._normalize_latents(raw_s, cfg.latents_mean, cfg.latents_std))
    assert not torch.equal(s, z)


def test_vae_first_latent_frame_is_causal(enc):
    # I2V conditioning encodes frame 0 alone; with the causal VAE it equals x0[:, :, 0].
    x = _video(1, 9, 16, 16, seed=1)
    # (equal up to float reassociation: conv kernels may pick other algorithms per shape)
    torch.testing.assert_close(enc.vae.encode(x)[:, :, 0], enc.vae.encode(x[:, :, :1])[:, :, 0],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- text


def test_text_encode_shapes_masks_and_trim(enc):
    tok = enc.text.tokenizer
    embeds, mask = enc.text.encode(PROMPTS)
    assert embeds.shape == (3, 512, TINY_DIMS["text_hidden_size"])
    assert mask.shape == (3, 512) and mask.dtype == torch.bool
    true_len = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert mask.sum(1).tolist() == true_len
    assert true_len[2] == 2  # "" -> <bos> <eos>: the CFG null prompt still has tokens
    trimmed = enc.text.encode_trimmed(PROMPTS)
    assert [t.shape for t in trimmed] == [(n, TINY_DIMS["text_hidden_size"]) for n in true_len]
    for t, e, n in zip(trimmed, embeds, true_len, strict=False):
        torch.testing.assert_close(t, e[:n], rtol=0, atol=1e-6)


def test_text_matches_pipeline_get_prompt_embeds(enc):
    from diffusers import MotifVideoPipeline

    embeds, mask = enc.text.encode(PROMPTS, max_length=64)
    # `self` is only used for the default device, which is passed explicitly here
    ref, ref_mask = MotifVideoPipeline._get_prompt_embeds(
        None, text_encoder=enc.text.model, tokenizer=enc.text.tokenizer, prompt=PROMPTS,
        max_sequence_length=64, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(embeds, ref)
    assert torch.equal(mask, ref_mask.bool())


def test_text_truncates_to_max_length(enc):
    long = " ".join(["the cat walks"] * 20)
    embeds, mask = enc.text.encode([long], max_length=16)
    assert embeds.shape[1] == 16 and int(mask.sum()) == 16
    assert enc.text.encode_trimmed([long], max_length=16)[0].shape[0] == 16


# -------------------------------------------------------------------------------------- image


def test_image_encoder_shape(enc):
    out = enc.image.encode(torch.rand(2, 3, 48, 40) * 2 - 1)
    assert out.shape == (2, TINY_DIMS["image_tokens"], TINY_DIMS["image_hidden_size"])
    assert enc.image.tokens_per_image == TINY_DIMS["image_tokens"]


def test_image_resize_matches_pil_float_bicubic(enc):
    # The torchvision backend of SiglipImageProcessor (antialiased bicubic on float tensors)
    # is built to match PIL's bicubic; check against PIL on float ("F") images.
    from PIL import Image

    frames = torch.rand(1, 3, 48, 40) * 2 - 1
    x01 = ((frames + 1) / 2).clamp(0, 1)[0].numpy()
    pil = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((32, 32), Image.BICUBIC)) for c in x01])
    ref = (torch.from_numpy(pil)[None] - 0.5) / 0.5
    torch.testing.assert_close(enc.image.preprocess(frames), ref, rtol=0, atol=1e-5)
    # already at processor size: no resampling, only (x - mean) / std
    same = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(enc.image.preprocess(same), same, rtol=0, atol=1e-6)


def test_image_tower_from_text_encoder_folder(root, enc):
    frames = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = enc.image.encode(frames)
    from_te = ImageEncoder.from_pretrained(root / "text_encoder", root / "feature_extractor")
    torch.testing.assert_close(from_te.encode(frames), ref, rtol=0, atol=1e-6)
    shared = ImageEncoder.from_text_encoder(enc.text, root / "feature_extractor")
    assert shared.tower is enc.text.model.vision_tower
    torch.testing.assert_close(shared.encode(frames), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ teacher


def test_teacher_shape_and_attributes(enc):
    t = enc.teacher
    assert (t.patch_size, t.tubelet_size, t.hidden_size, t.crop_size) == (
        TINY_DIMS["teacher_patch_size"], TINY_DIMS["teacher_tubelet_size"],
        TINY_DIMS["teacher_hidden_size"], TINY_DIMS["teacher_crop_size"])
    s, p = t.crop_size, t.patch_size
    out = t(_video(2, 6, s, s))
    assert out.shape == (2, 3, s // p, s // p, t.hidden_size)


# V-JEPA 2's published preprocessing (facebookresearch/vjepa2, transformers VJEPA2VideoProcessor):
# rescale to [0, 1], then ImageNet mean / std per RGB channel. Hard-coded here on purpose.
_VJEPA2_MEAN = (0.485, 0.456, 0.406)
_VJEPA2_STD = (0.229, 0.224, 0.225)


def test_teacher_input_is_published_vjepa2_preprocessing(enc):
    t = enc.teacher
    s, frames = t.crop_size, 4
    # A distinct [0, 1] value per (sample, channel, frame), constant over space...
    u = torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.1, 0.3, 0.6, 0.9], [0.2, 0.4, 0.8, 0.7]])  # (C, T)
    u = torch.stack([u, 1 - u])  # (B=2, C, T)
    pixels = (u * 2 - 1)[..., None, None].expand(2, 3, frames, s, s).clone()  # [-1, 1]
    pixels[1, 1, 2, 3, 5] = 1.0  # ...plus one white G pixel at sample 1, frame 2, (h=3, w=5)
    seen = {}
    hooks = [
        t.model.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("videos", kw["pixel_values_videos"]),
                                          with_kwargs=True),
        # What the Conv3d patch embedding convolves: (B, C, T, H, W) after VJEPA2's own permute.
        t.model.encoder.embeddings.patch_embeddings.proj.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("conv", a[0])),
    ]
    try:
        out = t(pixels)
    finally:
        for hk in hooks:
            hk.remove()
    vid = seen["videos"]
    assert vid.shape == (2, frames, 3, s, s)  # transformers' VJEPA2 layout: (B, T, C, H, W)
    assert vid.dtype == torch.float32
    for b in range(2):
        for c in range(3):
            for f in range(frames):
                want = (u[b, c, f].item() - _VJEPA2_MEAN[c]) / _VJEPA2_STD[c]
                got = vid[b, f, c].clone()
                if (b, c, f) == (1, 1, 2):
                    got[3, 5] = want  # the white pixel is checked below
                torch.testing.assert_close(got, torch.full((s, s), want), rtol=0, atol=1e-6)
    # Known pixels, exact numbers (published constants).
    assert vid[0, 3, 0, 0, 0].item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-6)  # 2.2489083
    assert vid[0, 0, 0, 1, 1].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)  # black R: -2.1179039
    assert vid[0, 2, 1, 4, 4].item() == pytest.approx((0.6 - 0.456) / 0.224, abs=1e-6)  # 0.6428571
    assert vid[1, 2, 1, 3, 5].item() == pytest.approx((1.0 - 0.456) / 0.224, abs=1e-6)  # 2.4285714
    assert vid[1, 2, 1, 3, 4].item() == pytest.approx((0.4 - 0.456) / 0.224, abs=1e-6)  # neighbour: -0.25
    # Channels / frames land on the Conv3d's channel / time axes.
    conv = seen["conv"]
    assert conv.shape == (2, 3, frames, s, s)
    assert conv[1, 1, 2, 3, 5].item() == pytest.approx((1.0 - 0.456) / 0.224, abs=1e-6)
    assert conv[0, 0, 3, 0, 0].item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-6)
    assert conv[0, 2, 0, 0, 0].item() == pytest.approx((0.2 - 0.406) / 0.225, abs=1e-6)  # -0.9155556
    # Output tokens are the encoder's (t, h, w)-ordered last_hidden_state on that input.
    ref = t.model(pixel_values_videos=vid, skip_predictor=True).last_hidden_state
    assert out.shape == (2, frames // 2, s // t.patch_size, s // t.patch_size, t.hidden_size)
    assert torch.equal(out.flatten(1, 3), ref)


def test_teacher_rejects_bad_input(enc):
    s = enc.teacher.crop_size
    with pytest.raises(ValueError, match="square") as err:
        enc.teacher(_video(1, 4, s, s - 8))
    assert f"crop_size={s}" in str(err.value) and str((1, 3, 4, s, s - 8)) in str(err.value)
    with pytest.raises(ValueError, match="crop_size"):
        enc.teacher(_video(1, 4, 2 * s, 2 * s))
    with pytest.raises(ValueError, match="tubelet"):
        enc.teacher(_video(1, 5, s, s))


# ------------------------------------------------------------------------- frozen and reload


def test_everything_frozen_and_outputs_detached(enc):
    wrappers = [enc.vae, enc.text, enc.image, enc.teacher]
    for w in wrappers:
        w.train()  # a parent's .train() must not unfreeze or un-eval
        assert not any(p.requires_grad for p in w.parameters())
        assert not any(m.training for m in w.modules())
    out = enc.teacher(_video(1, 2, enc.teacher.crop_size, enc.teacher.crop_size))
    assert not out.requires_grad
    # not an inference tensor: the REPA loss can save it for backward
    w = torch.ones(out.shape[-1], requires_grad=True)
    (out * w).sum().backward()
    assert w.grad is not None


def test_reload_equals_in_memory(root, enc):
    tok = te._build_tokenizer(TINY_DIMS["tokenizer_max_length"])
    x = _video(1, 5, 16, 16, seed=2)
    assert torch.equal(WanVAE(te._tiny_vae(0)).encode(x), enc.vae.encode(x))

    text_model = te._tiny_text_encoder(0, vocab_size=len(tok))
    mem = TextEncoder(text_model, tok)
    assert mem.tokenize(PROMPTS)["input_ids"].equal(enc.text.tokenize(PROMPTS)["input_ids"])
    a, am = mem.encode(PROMPTS, max_length=32)
    b, bm = enc.text.encode(PROMPTS, max_length=32)
    assert torch.equal(a, b) and torch.equal(am, bm)

    frames = torch.rand(2, 3, 40, 40) * 2 - 1
    img = ImageEncoder.from_text_encoder(mem, root / "feature_extractor")
    assert torch.equal(img.encode(frames), enc.image.encode(frames))

    s = TINY_DIMS["teacher_crop_size"]
    v = _video(1, 4, s, s, seed=3)
    assert torch.equal(VJEPA2Teacher(te._tiny_teacher(0))(v), enc.teacher(v))


def test_build_is_deterministic_and_seeded(tmp_path, enc):
    x = _video(1, 1, 16, 16)
    again = WanVAE.from_pretrained(build_tiny_encoders(tmp_path / "a", seed=0)["vae"])
    other = WanVAE.from_pretrained(build_tiny_encoders(tmp_path / "b", seed=1)["vae"])
    assert torch.equal(again.encode(x), enc.vae.encode(x))
    assert not torch.equal(other.encode(x), enc.vae.encode(x))


def test_load_encoders_subset_and_errors(root, tmp_path):
    only = load_encoders(root, which=("teacher",))
    assert only.teacher is not None and only.vae is only.text is only.image is None
    with pytest.raises(ValueError, match="unknown"):
        load_encoders(root, which=("vae", "clip"))
    with pytest.raises(FileNotFoundError):
        load_encoders(tmp_path / "missing")


def test_image_from_released_layout_without_image_encoder(root, tmp_path):
    # The released Motif checkpoint has no image_encoder/: the tower lives in text_encoder/.
    import shutil

    rel = tmp_path / "released"
    for sub in ("text_encoder", "tokenizer", "feature_extractor"):
        shutil.copytree(root / sub, rel / sub)
    encs = load_encoders(rel, which=("text", "image"))
    assert encs.image.tower is encs.text.model.vision_tower
    alone = load_encoders(rel, which=("image",)).image
    frames = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(alone.encode(frames), encs.image.encode(frames), rtol=0, atol=1e-6)
