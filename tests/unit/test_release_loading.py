"""A release folder's config.json is honoured or refused by key, the same way by `from_diffusers`
and by the trainer's `model.init_from`; keys it omits take diffusers' defaults; variant weights
are picked explicitly; `motif-export` writes the config the model was built with."""

import inspect
import json
import subprocess
import sys

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel

from motif_train.models import MotifDiTConfig, from_diffusers, to_diffusers
from motif_train.models.config import DIFFUSERS_KEYS, diffusers_defaults
from motif_train.models.convert import check_release_config, load_release_weights, open_release

from ._model_utils import inputs, randomized, tiny

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
# tiny_cpu on synthetic data without the tiny encoders (REPA, CFG dropout and validation off): the
# shortest real `motif-train` run.
RUN = ["experiment=tiny_cpu", "data=synthetic", "logger.wandb=false", "encoders.root=null",
       "objective.repa.weight=0", "objective.conditioning.text_dropout=0", "eval.every=0", "eval.at_end=false",
       "curriculum.stages.0.steps=1", "curriculum.stages.1.steps=1", "checkpoint.every=2"]


def save_release(cfg: MotifDiTConfig, folder, *, drop=(), dtype=torch.float32, **save_kw):
    """A release as diffusers writes one (`save_pretrained`), optionally without some config keys."""
    to_diffusers(randomized(cfg)).to(dtype).save_pretrained(folder, **save_kw)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for k in drop:
        del data[k]
    path.write_text(json.dumps(data))
    return folder


def train(run_dir, *overrides):
    return subprocess.run([sys.executable, "-m", "motif_train.cli.train", *RUN, f"run_dir={run_dir}", *overrides],
                          capture_output=True, text=True, env=ENV, timeout=300)


def test_defaults_are_read_from_diffusers_signature():
    params = inspect.signature(MotifVideoTransformer3DModel.__init__).parameters
    assert diffusers_defaults() == {k: params[k].default for k in DIFFUSERS_KEYS}
    # Why it matters: ours are the 2B release's, diffusers' are not.
    ours = MotifDiTConfig().diffusers_config()
    assert {k for k in DIFFUSERS_KEYS if ours[k] != diffusers_defaults()[k]} >= {"num_decoder_layers",
                                                                                 "image_embed_dim"}


def test_missing_keys_take_diffusers_defaults(tiny_cfg, tmp_path):
    # The diffusers defaults for these three differ from MotifDiTConfig's (8, 1152, True).
    cfg = tiny(tiny_cfg, num_decoder_layers=0, image_embed_dim=None, enable_text_cross_attention_single=False)
    folder = save_release(cfg, tmp_path / "r", drop=("num_decoder_layers", "image_embed_dim",
                                                     "enable_text_cross_attention_single"))
    ours = from_diffusers(folder).eval()
    assert ours.config.diffusers_config() == cfg.diffusers_config()
    theirs = MotifVideoTransformer3DModel.from_pretrained(folder).eval()
    assert dict(theirs.config)["num_decoder_layers"] == 0  # diffusers builds the same model from the file
    kw = inputs(cfg)
    with torch.no_grad():
        assert (ours(**kw).sample - theirs(**kw).sample).abs().max() <= 1e-5
    # The trainer's check compares against the same completed config: the tiny preset differs there.
    with pytest.raises(ValueError) as e:
        open_release(folder, expect=tiny_cfg)
    msg = str(e.value)
    assert "model.num_decoder_layers=2" in msg and "model.image_embed_dim=24" in msg
    assert "model.num_decoder_layers=0 model.image_embed_dim=null model.enable_text_cross_attention_single=false" in msg
    check_release_config(open_release(folder), cfg)  # and accepts the model it describes


def test_unknown_config_key_is_refused(tiny_cfg, tmp_path):
    folder = save_release(tiny_cfg, tmp_path / "r")
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "num_refiner_layers": 2}))
    with pytest.raises(ValueError, match="num_refiner_layers"):
        from_diffusers(folder)


@pytest.mark.slow
def test_rope_theta_release_refused_by_the_trainer_then_trained_and_exported(tiny_cfg, tmp_path):
    """The reported bug: rope_theta changes no weight shape, so it used to load and train silently."""
    release = save_release(tiny(tiny_cfg, rope_theta=10000.0), tmp_path / "release")
    assert from_diffusers(release).config.rope_theta == 10000.0
    with pytest.raises(ValueError, match=r"model.rope_theta=256.0 but config.json has 10000.0"):
        open_release(release, expect=tiny_cfg)

    bad = train(tmp_path / "bad", f"model.init_from={release}")
    assert bad.returncode != 0
    assert "model.rope_theta=256.0 but config.json has 10000.0" in bad.stderr
    assert "Train the release's model with: model.rope_theta=10000.0" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before any work

    ok = train(tmp_path / "ok", f"model.init_from={release}", "model.rope_theta=10000.0")
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = tmp_path / "export"
    exp = subprocess.run([sys.executable, "-m", "motif_train.cli.export", f"checkpoint={tmp_path}/ok/checkpoints/"
                          "step_00000002", f"out={out}", "weights=raw"], capture_output=True, text=True, env=ENV)
    assert exp.returncode == 0, exp.stderr[-3000:]
    written = json.loads((out / "config.json").read_text())
    source = json.loads((release / "config.json").read_text())
    assert written["rope_theta"] == 10000.0
    assert {k: written[k] for k in DIFFUSERS_KEYS} == {k: source[k] for k in DIFFUSERS_KEYS}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_variant_weights_are_picked_explicitly(tiny_cfg, tmp_path, sharded):
    shards = {"max_shard_size": "20KB"} if sharded else {}
    folder = save_release(tiny_cfg, tmp_path / "r", dtype=torch.float16, variant="fp16", **shards)
    name = ("diffusion_pytorch_model.safetensors.index.fp16.json" if sharded
            else "diffusion_pytorch_model.fp16.safetensors")
    assert (folder / name).is_file() and not (folder / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(FileNotFoundError) as e:
        open_release(folder)
    assert "only variant weights ['fp16']" in str(e.value)
    assert f"model.init_from={folder / name}" in str(e.value) and "variant='fp16'" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"no 'bf16' variant; variants found: \['fp16'\]"):
        open_release(folder, "bf16")

    by_file = open_release(folder / name, expect=tiny_cfg)  # what model.init_from=<file> does
    assert by_file.variant == "fp16" and by_file.folder == folder and (len(by_file.files) > 1) == sharded
    state = load_release_weights(by_file)
    assert {t.dtype for t in state.values()} == {torch.float16}
    model = from_diffusers(folder, variant="fp16")
    ref = MotifVideoTransformer3DModel.from_pretrained(folder, variant="fp16")
    got = dict(model.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v.float()), k


def test_variant_next_to_default_weights(tiny_cfg, tmp_path):
    folder = save_release(tiny_cfg, tmp_path / "r")
    to_diffusers(randomized(tiny_cfg, seed=1)).save_pretrained(folder, variant="fp16")
    assert open_release(folder).files == [folder / "diffusion_pytorch_model.safetensors"]  # diffusers' choice too
    assert open_release(folder, "fp16").files == [folder / "diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(FileNotFoundError, match="not a diffusers weights file"):
        open_release(folder / "config.json")


def test_export_warns_about_runs_that_trained_another_model_than_their_release(tiny_cfg, tmp_path, capsys):
    """Runs from before the check: the export still writes what was trained, and says so."""
    from omegaconf import OmegaConf

    from motif_train.cli.export import warn_release_mismatch

    release = save_release(tiny(tiny_cfg, rope_theta=10000.0), tmp_path / "release")
    warn_release_mismatch(randomized(tiny_cfg), OmegaConf.create({"model": {"init_from": str(release)}}))
    assert "trained with rope_theta=256.0 (release 10000.0)" in capsys.readouterr().err
    warn_release_mismatch(randomized(tiny_cfg), OmegaConf.create({"model": {"init_from": str(tmp_path / "gone")}}))
    assert capsys.readouterr().err == ""
