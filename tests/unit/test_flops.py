"""Analytic FLOPs against FlopCounterMode on the real model (fake tensors)."""

import json

import pytest

from motif_train.flops import flop_table, main
from motif_train.models import RoutingConfig, load_model_config
from motif_train.models.flops import count_with_flop_counter, latent_shape, model_flops

from ._model_utils import tiny


@pytest.mark.parametrize("routing", [None, RoutingConfig(1, 3, 0.5), RoutingConfig(4, 5, 0.3)],
                         ids=["full", "encoder-route", "decoder-route"])
@pytest.mark.parametrize("image_len", [0, 5])
@pytest.mark.parametrize("shared_kv", [True, False])
def test_tiny_analytic_matches_counter(tiny_cfg, routing, image_len, shared_kv):
    cfg = tiny(tiny_cfg, shared_kv=shared_kv)
    lat = latent_shape(9, 64, 96)
    a = model_flops(cfg, lat, text_len=11, image_len=image_len, routing=routing)
    m = count_with_flop_counter(cfg, lat, text_len=11, image_len=image_len, routing=routing)
    assert abs(a.total / m - 1) < 0.01
    fwd = count_with_flop_counter(cfg, lat, text_len=11, image_len=image_len, routing=routing, backward=False)
    assert abs(a.fwd / fwd - 1) < 0.01


def test_full_preset_matches_counter_with_route():
    cfg = load_model_config("motif_video_2b")
    lat = latent_shape(33, 256, 448)
    for r in (None, cfg.routing):
        a = model_flops(cfg, lat, text_len=128, image_len=16, routing=r)
        m = count_with_flop_counter(cfg, lat, text_len=128, image_len=16, routing=r)
        assert abs(a.total / m - 1) < 0.01


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
