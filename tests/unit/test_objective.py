"""The composed objective on real tiny encoders: named terms, I2V inputs, REPA on/off."""

import copy

import pytest
import torch

from motif_train.data import Batch
from motif_train.models import RoutingConfig, build_model
from motif_train.objectives import DiffusionObjective, ObjectiveConfig, total_loss
from motif_train.objectives.encoders import build_tiny_encoders, load_encoders
from motif_train.objectives.repa import teacher_pixels


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    build_tiny_encoders(root)
    return load_encoders(root)


@pytest.fixture(scope="module")
def batch(encoders):
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 3, 9, 64, 96, generator=g) * 2 - 1  # 9 frames -> 3 latent frames, 8x12 latents
    latents = encoders.vae.encode(clip)
    text, mask = encoders.text.encode(["a red ball rolls", "two boxes"], max_length=16)
    return Batch(latents=latents, text=text, text_mask=mask, image_embeds=encoders.image.encode(clip[:, :, 0]),
                 teacher_pixels=teacher_pixels(clip, encoders.teacher.crop_size), keys=("a", "b"))


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


def test_repa_inside_route_uses_kept_tokens(tiny_cfg, encoders, batch):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.routing = RoutingConfig(1, 3, 0.5)
    model = build_model(cfg).train()
    seen = {}
    model.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    out = _objective(encoders)(model, batch, step=0)
    k = seen["out"].keep_ids.shape[1]
    assert seen["out"].repa_tokens.shape == (2, k, 32) and k < 3 * 4 * 6
    assert torch.isfinite(out.losses["repa"])


def test_i2v_inputs(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    obj = _objective(encoders, conditioning={"i2v_prob": 1.0, "text_dropout": 0.0, "blur_sigma_max": 0.0})
    out = obj(model, batch, step=0)
    assert out.task == "i2v"
    hs = seen["hidden_states"]
    assert hs.shape == (2, 33, 3, 8, 12)
    torch.testing.assert_close(hs[:, 16:32, 0], batch.latents[:, :, 0])  # condition = clean frame-0 latent
    assert hs[:, 16:32, 1:].eq(0).all() and hs[:, 32, 0].eq(1).all() and hs[:, 32, 1:].eq(0).all()
    assert seen["image_embeds"] is batch.image_embeds
    # T2V: zero condition, no image tokens; images (F == 1) are always T2V.
    obj = _objective(encoders, conditioning={"i2v_prob": 0.0, "text_dropout": 0.0})
    assert obj(model, batch, step=0).task == "t2v" and seen["image_embeds"] is None
    assert seen["hidden_states"][:, 16:].eq(0).all()
    img = Batch(latents=batch.latents[:, :, :1], text=batch.text, text_mask=batch.text_mask,
                image_embeds=batch.image_embeds)
    obj = _objective(encoders, conditioning={"i2v_prob": 1.0, "text_dropout": 0.0}, repa={"weight": 0.0})
    assert obj(model, img, step=0).task == "t2v"


def test_text_dropout_feeds_empty_prompt(tiny_cfg, encoders, batch):
    model = build_model(copy.deepcopy(tiny_cfg)).train()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    obj = _objective(encoders, conditioning={"text_dropout": 1.0})
    obj(model, batch, step=0)
    empty, emask = obj.empty_text
    assert torch.equal(seen["encoder_attention_mask"][:, :emask.shape[0]], emask.expand(2, -1))
    torch.testing.assert_close(seen["encoder_hidden_states"][:, :empty.shape[0]], empty.expand(2, -1, -1))


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
