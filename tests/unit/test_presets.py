"""Every model preset loads, validates and has the documented size."""

import subprocess
import sys

import pytest
import torch

from motif_train.models import build_model, load_model_config
from motif_train.models.config import CONFIG_DIR


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_builds(path):
    cfg = load_model_config(path.stem)
    model = build_model(cfg, device="meta")
    assert len(model.blocks()) == cfg.num_blocks


def test_2b_parameter_counts():
    cfg = load_model_config("motif_video_2b", repa={"block": None})
    model = build_model(cfg, device="meta")
    tied = sum(p.numel() for p in model.parameters())  # named_parameters dedupes the tied K/V
    layout = sum(t.numel() for t in model.state_dict().values())  # diffusers layout: both copies
    assert layout / 1e9 == pytest.approx(2.038, abs=0.002)
    assert tied / 1e9 == pytest.approx(1.962, abs=0.002)
    assert cfg.block_kind(11) == "dual" and cfg.block_kind(12) == "single" and cfg.block_kind(28) == "decoder"


def test_unknown_key_and_missing_preset():
    with pytest.raises(ValueError, match="unknown model keys"):
        load_model_config("tiny", num_layer=3)
    with pytest.raises(FileNotFoundError, match="presets"):
        load_model_config("motif_video_9b")
    with pytest.raises(ValueError, match="rope_axes_dim"):
        load_model_config("tiny", rope_axes_dim=[4, 4, 4])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "motif_train.cli.flops", "--model", "tiny", "--shapes", "5x64x96",
                          "--json"], capture_output=True, text=True, check=True)
    assert '"tokens": 48' in out.stdout  # latent (1+1) x (64/16) x (96/16)


def test_meta_build_allocates_nothing():
    m = build_model(load_model_config("motif_video_2b"), device="meta")
    assert all(p.device == torch.device("meta") for p in m.parameters())


@pytest.mark.parametrize("cp, error", [(2, None), (4, None),
                                       (8, r"parallel.cp=8: Ulysses splits the 12 attention heads")])
def test_64xh200_recipe_validates_at_any_cp_that_splits_the_heads(cp, error):
    """Context parallelism pads each bucket's video (and TREAD's kept) tokens to a multiple of cp, so the
    real curriculum validates at cp=2 and 4 although e.g. 81x624x624 has 31941 video tokens (15970 kept);
    a cp that does not divide the 12 heads is still refused, naming the key."""
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR as TRAIN_CONFIGS
    from motif_train.cli.train import to_train_config
    from motif_train.config import validate
    from motif_train.models.flops import latent_shape, num_video_tokens
    from motif_train.models.routing import num_kept

    with initialize_config_dir(config_dir=str(TRAIN_CONFIGS), version_base="1.3"):
        cfg = to_train_config(compose(config_name="train",
                                      overrides=["experiment=motif_video_2b_64xh200", f"parallel.cp={cp}"]))
    n = num_video_tokens(cfg.model.dit_config(), latent_shape(81, 624, 624))
    assert [81, 624, 624] in [list(b) for b in cfg.curriculum.stages[2].buckets]
    assert (n, num_kept(n, cfg.curriculum.stages[2].routing.ratio)) == (31941, 15970)  # odd / not a multiple of 4
    if error is None:
        validate(cfg, world_size=64, local_world_size=8)
    else:
        with pytest.raises(ValueError, match=error):
            validate(cfg, world_size=64, local_world_size=8)
