"""Analytic FLOPs against FlopCounterMode on the real model (fake tensors), and the trainer's per-step
count (what MFU divides) against the forward + backward that actually ran."""

import json

import pytest

from motif_train.cli.flops import flop_table, main
from motif_train.models import RoutingConfig, load_model_config
from motif_train.models.flops import count_with_flop_counter, latent_shape, model_flops

from ._model_utils import encoded_batch, tiny


@pytest.mark.parametrize("routing", [None, RoutingConfig(1, 3, 0.5), RoutingConfig(4, 5, 0.3)],
                         ids=["full", "encoder-route", "decoder-route"])
@pytest.mark.parametrize("image_len", [0, 5])
@pytest.mark.parametrize("shared_kv", [True, False])
def test_tiny_analytic_matches_counter(tiny_cfg, routing, image_len, shared_kv):
    cfg = tiny(tiny_cfg, shared_kv=shared_kv)
    lat = latent_shape(9, 64, 96)
    a = model_flops(cfg, lat, text_len=11, image_len=image_len, routing=routing)
    m = count_with_flop_counter(cfg, lat, text_len=11, image_len=image_len, routing=routing)
    assert abs(a.total / m - 1) < 1e-6
    fwd = count_with_flop_counter(cfg, lat, text_len=11, image_len=image_len, routing=routing, backward=False)
    assert abs(a.fwd / fwd - 1) < 1e-6


def test_full_preset_matches_counter_with_route():
    cfg = load_model_config("motif_video_2b")
    lat = latent_shape(33, 256, 448)
    for r in (None, cfg.routing):
        a = model_flops(cfg, lat, text_len=128, image_len=16, routing=r)
        m = count_with_flop_counter(cfg, lat, text_len=128, image_len=16, routing=r)
        assert abs(a.total / m - 1) < 1e-6


def test_full_preset_design_figures():
    cfg = load_model_config("motif_video_2b")
    full = model_flops(cfg, latent_shape(121, 736, 1280))
    assert full.linear_fwd / 1e12 == pytest.approx(302, rel=0.01)
    assert full.attn_fwd / 1e12 == pytest.approx(4823, rel=0.01)
    assert full.total / 1e15 == pytest.approx(15.4, rel=0.01)
    routed = model_flops(cfg, latent_shape(121, 736, 1280), routing=RoutingConfig(2, 23, 0.5))
    assert 1 - routed.total / full.total == pytest.approx(0.274, abs=0.005)
    # The DDT decoder (8 of 36 blocks) attends over 2N tokens: about half the FLOPs at 720p.
    assert 0.45 < sum(full.per_block[28:]) / sum(full.per_block) < 0.6


def test_cli_table_and_json(capsys):
    main(["--shapes", "121x736x1280", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["tokens"] == 114080 and rows[0]["cut"] == pytest.approx(0.274, abs=0.005)
    main(["--model", "tiny", "--shapes", "5x64x96", "--route", "1:3:0.5"])
    assert "FLOP cut" in capsys.readouterr().out


def test_cli_refuses_bad_input():
    with pytest.raises(ValueError, match="crosses"):
        flop_table("motif_video_2b", [(121, 736, 1280)], route=RoutingConfig(20, 30, 0.5))
    with pytest.raises(ValueError, match="1\\+4k"):
        latent_shape(120, 736, 1280)
    with pytest.raises(SystemExit):
        main(["--shapes", "121by736"])


# ---------------------------------------------------------------- the step's count (MFU) vs what ran


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from motif_train.objectives.encoders import build_tiny_encoders, load_encoders

    root = tmp_path_factory.mktemp("enc")
    build_tiny_encoders(root)
    return load_encoders(root)


def _counted(fn) -> int:
    """FLOPs FlopCounterMode sees while `fn` runs (math SDPA: CPU's fused kernel has no formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def _micro_batch(encoders):
    return encoded_batch(encoders, seed=0, width=96, max_length=11)


def test_teacher_analytic_matches_counter(encoders):
    import torch

    from motif_train.models.flops import teacher_forward_flops

    px = torch.rand(2, 3, 10, 32, 32) * 2 - 1
    measured = _counted(lambda: encoders.teacher(px))
    assert teacher_forward_flops(encoders.teacher.model.config, 10, 32) * 2 / measured == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("i2v_prob", [0.0, 1.0], ids=["t2v", "i2v"])
def test_step_count_is_what_ran(tiny_cfg, encoders, i2v_prob):
    """A micro-batch that carries SigLIP tokens, run as T2V (the objective drops them) or I2V, with
    TREAD, REPA and CFG dropout: the trainer's analytic count (model fwd+bwd + teacher fwd) equals
    FlopCounterMode's count of the forward and backward that actually ran."""
    import torch

    from motif_train.objectives import DiffusionObjective, ObjectiveConfig, total_loss
    from motif_train.step_stats import micro_flops

    from ._model_utils import randomized

    model = randomized(tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))).train()
    empty = encoders.text.encode([""], max_length=11)
    obj = DiffusionObjective(ObjectiveConfig(conditioning={"i2v_prob": i2v_prob, "text_dropout": 0.5},
                                             repa={"weight": 0.5}),
                             empty_text=(empty[0][0], empty[1][0]), teacher=encoders.teacher)
    batch = _micro_batch(encoders)
    ran = {}

    def step():
        ran["out"] = out = obj(model, batch, step=1, generator=torch.Generator().manual_seed(4))
        total_loss(out.losses, obj.config.weights).backward()

    measured = _counted(step)
    out = ran["out"]
    assert out.task == ("i2v" if i2v_prob else "t2v") and out.repa
    assert out.image_tokens == (batch.image_embeds.shape[1] if i2v_prob else 0)
    fl, teacher = micro_flops(model.config, batch, out, encoders.teacher.model.config)
    assert teacher > 0 and (fl + teacher) / measured == pytest.approx(1, abs=1e-6)
    if not i2v_prob:  # the old count (image tokens whenever the batch has them) overstates a T2V step
        lat = tuple(batch.latents.shape[2:])
        old = model_flops(model.config, lat, text_len=11, image_len=batch.image_embeds.shape[1],
                          routing=model.config.routing, repa=True).total * 2
        assert old > fl * 1.01
