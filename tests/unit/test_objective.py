"""The composed objective on real tiny encoders: named terms, I2V inputs, REPA on/off."""

import copy

import pytest
import torch

from motif_train.batch import Batch
from motif_train.models import RoutingConfig, build_model
from motif_train.objectives import DiffusionObjective, ObjectiveConfig, total_loss
from motif_train.objectives.conditioning import ConditioningConfig, timestep_blur
from motif_train.objectives.encoders import build_tiny_encoders, load_encoders
from motif_train.objectives.flow import FlowConfig, sample_sigmas

from ._model_utils import encoded_batch, randomized, tiny


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    build_tiny_encoders(root)
    return load_encoders(root)


@pytest.fixture(scope="module")
def batch(encoders):
    return encoded_batch(encoders, seed=0, width=96)  # 8x12 latents


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _objective(encoders, **cfg):
    empty = encoders.text.encode([""], max_length=16)
    return DiffusionObjective(ObjectiveConfig(**cfg), empty_text=(empty[0][0], empty[1][0]),
                              teacher=Counting(encoders.teacher))


def test_named_terms_and_backward(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    obj = _objective(encoders, repa={"weight": 0.5, "until_step": 10})
    out = obj(model, batch, step=3)
    assert set(out.losses) == {"denoise", "repa"}
    assert {"sigma_q1", "sigma_q4_count"} <= set(out.metrics)
    assert obj.teacher.calls == 1
    loss = total_loss(out.losses, obj.config.weights)
    torch.testing.assert_close(loss, out.losses["denoise"] + 0.5 * out.losses["repa"])
    loss.backward()
    assert model.repa_projector[0].weight.grad.abs().sum() > 0
    # Past the cut-off neither the teacher nor the projector runs.
    model.zero_grad()
    out = obj(model, batch, step=11)
    assert set(out.losses) == {"denoise"} and obj.teacher.calls == 1
    out.losses["denoise"].backward()
    assert model.repa_projector[0].weight.grad is None


def _square_batch(encoders):
    """64x64 clip: DiT grid (3, 4, 4) == teacher map (5 tubelets, 4x4), so matching is pure indexing."""
    return encoded_batch(encoders, seed=1, width=64)


def _hand_repa(proj, teacher, ids):
    """-mean cos(proj[b, k], matched teacher token ids[b, k]) with DESIGN's matching, by loops:
    latent frame 0 <- tubelet 0, latent f <- mean(tubelets 2f-1, 2f); token n = (f, h, w) raster."""
    b, tt, gh, gw, _ = teacher.shape
    cos = []
    for i in range(b):
        for k, n in enumerate(ids[i].tolist()):
            f, hw = divmod(n, gh * gw)
            hh, ww = divmod(hw, gw)
            t = teacher[i, 0, hh, ww] if f == 0 else (teacher[i, 2 * f - 1, hh, ww] + teacher[i, 2 * f, hh, ww]) / 2
            p = proj[i, k]
            cos.append((p @ t) / (p.norm() * t.norm()))
    return -torch.stack(cos).mean()


def test_repa_inside_route_uses_kept_tokens(tiny_cfg, encoders):
    batch = _square_batch(encoders)
    assert batch.latents.shape == (2, 16, 3, 8, 8)
    model = randomized(tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))).train()  # repa.block 2 in route
    seen = {}
    model.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    model.single_transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0]))  # block 2
    obj = _objective(encoders, conditioning={"text_dropout": 0.0})
    loss = obj(model, batch, step=0, generator=torch.Generator().manual_seed(2)).losses["repa"]
    out = seen["out"]
    ids = out.keep_ids
    assert ids.shape == (2, 24) and torch.equal(out.repa_ids, ids) and not torch.equal(ids[0], ids[1])
    with torch.no_grad():
        proj = model.repa_projector(seen["h"])  # (B, K, C) kept block-2 tokens through the head
        teacher = encoders.teacher(batch.teacher_pixels)  # (B, 5, 4, 4, C)
        assert teacher.shape == (2, 5, 4, 4, 32)
        torch.testing.assert_close(out.repa_tokens, proj, rtol=0, atol=0)
        expect = _hand_repa(proj, teacher, ids)
        assert abs(loss.item() - expect.item()) < 1e-6, (loss.item(), expect.item())
    # A teacher built so that the DESIGN-matched token at every kept id IS the projected token
    # (tubelets 2f-1, 2f = proj +- d: only their mean matches): the loss must be exactly -1, and
    # any misaligned ids (shifted by one, the other sample's, the first K as if unrouted) >= 0.05 above.
    g = torch.Generator().manual_seed(3)
    crafted = torch.randn(teacher.shape, generator=g)  # (B, 5, 4, 4, C); non-kept positions random
    for i in range(2):
        for k, tok in enumerate(ids[i].tolist()):
            f, hw = divmod(tok, 16)
            hh, ww = divmod(hw, 4)
            if f == 0:
                crafted[i, 0, hh, ww] = proj[i, k]
            else:
                d = torch.randn(proj.shape[-1], generator=g) * proj[i, k].norm()
                crafted[i, 2 * f - 1, hh, ww], crafted[i, 2 * f, hh, ww] = proj[i, k] + d, proj[i, k] - d

    class Fixed(torch.nn.Module):
        def forward(self, px):
            assert px.shape == (2, 3, 10, 32, 32)
            return crafted

    obj = DiffusionObjective(ObjectiveConfig(conditioning={"text_dropout": 0.0}), teacher=Fixed())
    loss = obj(model, batch, step=0, generator=torch.Generator().manual_seed(2)).losses["repa"]
    assert torch.equal(seen["out"].keep_ids, ids)  # same generator: same route, same tokens
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)
    for w in (ids.roll(1, dims=1), ids.flip(0), torch.arange(24).expand(2, 24)):
        assert _hand_repa(proj, crafted, w).item() > -0.95  # -0.88, -0.43, -0.54 here


def test_i2v_inputs(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    obj = _objective(encoders, conditioning={"i2v_prob": 1.0, "text_dropout": 0.0, "blur_sigma_max": 0.0})
    out = obj(model, batch, step=0)
    assert out.task == "i2v"
    # what the model was fed, for the FLOP count: the SigLIP tokens, the text width (16, narrowed to the
    # longest caption without data pad lengths), REPA (on by default)
    assert batch.text.shape[1] == 16 and max(batch.text_lengths) == 13
    assert (out.image_tokens, out.text_tokens, out.repa) == (batch.image_embeds.shape[1], 13, True)
    hs = seen["hidden_states"]
    assert hs.shape == (2, 33, 3, 8, 12)
    torch.testing.assert_close(hs[:, 16:32, 0], batch.latents[:, :, 0])  # condition = clean frame-0 latent
    assert hs[:, 16:32, 1:].eq(0).all() and hs[:, 32, 0].eq(1).all() and hs[:, 32, 1:].eq(0).all()
    assert seen["image_embeds"] is batch.image_embeds
    # T2V: zero condition, no image tokens; images (F == 1) are always T2V.
    obj = _objective(encoders, conditioning={"i2v_prob": 0.0, "text_dropout": 0.0})
    out = obj(model, batch, step=0)
    assert out.task == "t2v" and seen["image_embeds"] is None
    assert out.image_tokens == 0 and out.repa  # the batch carries SigLIP tokens, the model did not see them
    assert seen["hidden_states"][:, 16:].eq(0).all()
    img = Batch(latents=batch.latents[:, :, :1], text=batch.text, text_mask=batch.text_mask,
                image_embeds=batch.image_embeds)
    obj = _objective(encoders, conditioning={"i2v_prob": 1.0, "text_dropout": 0.0}, repa={"weight": 0.0})
    assert obj(model, img, step=0).task == "t2v"


def test_i2v_condition_blurred_at_drawn_sigma(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond_cfg = {"i2v_prob": 1.0, "text_dropout": 0.0, "blur_sigma_max": 2.0, "blur_gamma": 1.0}
    obj = _objective(encoders, conditioning=cond_cfg, repa={"weight": 0.0})
    out = obj(model, batch, step=0, generator=torch.Generator().manual_seed(0))
    assert out.task == "i2v"
    # The objective's first draw from the generator is σ (logit-normal, shift 1); the model gets 1000 σ.
    sigma = sample_sigmas(2, FlowConfig(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["timestep"], sigma * 1000)
    torch.testing.assert_close(sigma, torch.tensor([0.8236, 0.4272]), rtol=0, atol=1e-4)  # σ_blur 1.65, 0.85
    x0 = batch.latents[:, :, 0].float()  # (B, 16, 8, 12) clean frame-0 latent
    want = timestep_blur(x0, sigma, ConditioningConfig(**cond_cfg))
    cond0 = seen["hidden_states"][:, 16:32, 0]
    torch.testing.assert_close(cond0, want, rtol=0, atol=1e-6)
    swapped = timestep_blur(x0, sigma.flip(0), ConditioningConfig(**cond_cfg))  # blur at the other σ
    assert (cond0 - x0).abs().amax(dim=(1, 2, 3)).min() > 0.1  # blurred: 0.23 / 0.18 off the sharp latent
    assert (cond0 - swapped).abs().amax(dim=(1, 2, 3)).min() > 0.03  # and not at the other σ (0.07)
    # The rest of the input is untouched by the blur: frames 1.. of cond zero, mask 1 at frame 0 only.
    hs = seen["hidden_states"]
    assert hs[:, 16:32, 1:].eq(0).all() and hs[:, 32, 0].eq(1).all() and hs[:, 32, 1:].eq(0).all()


def test_text_dropout_feeds_empty_prompt(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    obj = _objective(encoders, conditioning={"text_dropout": 1.0})
    obj(model, batch, step=0)
    empty, emask = obj.empty_text
    n = int(emask.sum())
    assert 0 < n < batch.text.shape[1]
    # Every caption dropped: the text is the empty prompt at its real length, so nothing is padded
    # and no mask is passed (the mask-free kernel), rather than the caption width of zeros.
    assert seen["encoder_attention_mask"] is None and seen["encoder_hidden_states"].shape[1] == n
    torch.testing.assert_close(seen["encoder_hidden_states"], empty[:n].expand(2, -1, -1))


def test_same_generator_same_loss(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    obj = _objective(encoders)
    a = obj(model, batch, step=5, generator=torch.Generator().manual_seed(9)).losses
    b = obj(model, batch, step=5, generator=torch.Generator().manual_seed(9)).losses
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_repa_without_teacher_pixels_is_an_error(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    bad = Batch(latents=batch.latents, text=batch.text, text_mask=batch.text_mask)
    with pytest.raises(ValueError, match="teacher_pixels"):
        _objective(encoders)(model, bad, step=0)


def test_i2v_without_image_tokens_is_an_error_not_t2v(tiny_cfg, encoders, batch):
    """The task is the same on every rank (a hash of seed/step/micro-step): a micro-batch without SigLIP tokens
    must not switch its rank to T2V (the ranks would run different graphs, FSDP collectives would not match)."""
    from motif_train.objectives.objective import MissingImageTokens

    model = build_model(copy.deepcopy(tiny_cfg)).train()
    bare = Batch(latents=batch.latents, text=batch.text, text_mask=batch.text_mask, teacher_pixels=batch.teacher_pixels,
                 keys=("clip_a", "clip_b"))
    obj = _objective(encoders, conditioning={"i2v_prob": 1.0, "text_dropout": 0.0}, repa={"weight": 0.0})
    with pytest.raises(MissingImageTokens) as e:
        obj(model, bare, step=4, micro_step=1)
    msg = str(e.value)
    assert "step 4 micro-step 1 trains I2V on every rank" in msg and "clip_a, clip_b" in msg
    assert "motif-preprocess with the image encoder" in msg and "i2v_prob=0" in msg
    # T2V steps and images (F == 1: always T2V, on every rank alike) need no image tokens
    assert _objective(encoders, conditioning={"i2v_prob": 0.0, "text_dropout": 0.0},
                      repa={"weight": 0.0})(model, bare, step=4).task == "t2v"
    img = Batch(latents=batch.latents[:, :, :1], text=batch.text, text_mask=batch.text_mask)
    assert obj(model, img, step=4).task == "t2v"
