"""LoRA under torchrun, 2 gloo ranks, FSDP2 + selective AC, frozen base in bf16: adapters-only DCP
checkpoints, exact resume, and `motif-export --lora / --merge` against diffusers' `load_lora_adapter`."""

import subprocess
import sys

import pytest
import torch

from ._runs import REPO, ckpt_dir, env, load_dcp, records, step_values, train, train_state

pytestmark = pytest.mark.distributed

STEPS = ["curriculum.stages.0.steps=3", "curriculum.stages.1.steps=3", "checkpoint.every=3"]


def lora_args(release):
    return [f"model.init_from={release}", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.base_dtype=bfloat16",
            "parallel.ac=selective", "optim.lr=2e-2", "ema.decay=0.9", *STEPS]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A 'released' tiny transformer folder (random weights: every path of every block is live)."""
    from motif_train.models import load_model_config, to_diffusers

    from ..unit._model_utils import randomized

    folder = tmp_path_factory.mktemp("release") / "transformer"
    to_diffusers(randomized(load_model_config("tiny"), seed=3, std=0.05)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, release):
    run = tmp_path_factory.mktemp("lora_ref")
    train(run, 2, *lora_args(release))
    return run


def test_adapters_only_in_the_checkpoint(reference, tmp_path):
    p = (reference / "events.jsonl").read_text()
    assert "lora" in p and "rank 4 alpha 8" in p
    flat = load_dcp(ckpt_dir(reference, 6), tmp_path)
    model = [k for k in flat if k.startswith("model.")]
    assert model and all(".lora_" in k or k.startswith("model.repa_projector.") for k in model)
    assert all(".lora_" in k or ".repa_projector." in k for k in flat if k.startswith(("ema.", "optim.state.")))
    assert all(flat[k].dtype == torch.float32 for k in model)
    trained = [flat[k].abs().max().item() for k in model if ".lora_B." in k]
    assert max(trained) > 0  # B starts at zero: the adapters learned


def test_exact_resume(reference, release, tmp_path):
    run = tmp_path / "run"
    train(run, 2, *lora_args(release), "train.stop_at=2")
    train(run, 2, *lora_args(release))
    a, b = records(reference), records(run)
    for s in range(1, 7):
        assert step_values(a[s]) == step_values(b[s]), f"step {s} differs"
    assert train_state(ckpt_dir(run, 6))["step"] == 6
    fa, fb = load_dcp(ckpt_dir(reference, 6), tmp_path / "a"), load_dcp(ckpt_dir(run, 6), tmp_path / "b")
    keys = [k for k in fa if k.startswith(("model.", "ema."))]
    assert keys and sorted(keys) == sorted(k for k in fb if k.startswith(("model.", "ema.")))
    for k in keys:
        assert torch.equal(fa[k], fb[k]), k


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_export_lora_and_merge_match_diffusers(reference, release, tmp_path, weights):
    from diffusers import MotifVideoTransformer3DModel

    from motif_train.cli.export import load_lora_checkpoint, run_config
    from motif_train.config import ModelSpec

    ckpt = ckpt_dir(reference, 6)
    for flag, out in (("--lora", tmp_path / "lora"), ("--merge", tmp_path / "merged")):
        subprocess.run([sys.executable, "-m", "motif_train.cli.export", f"checkpoint={ckpt}", f"out={out}",
                        f"weights={weights}", flag], check=True, capture_output=True, env=env(), cwd=REPO)
    from omegaconf import OmegaConf

    spec = ModelSpec(**{k: v for k, v in OmegaConf.to_container(run_config(ckpt).model, resolve=True).items()
                        if k in ModelSpec.__dataclass_fields__})
    ours = load_lora_checkpoint(ckpt, spec, weights=weights)
    theirs = MotifVideoTransformer3DModel.from_pretrained(release).eval()
    theirs.load_lora_adapter(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    merged = MotifVideoTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 33, 3, 8, 12, generator=g)
    kw = dict(timestep=torch.tensor([400.0]), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
              image_embeds=torch.randn(1, 4, 24, generator=g))
    with torch.no_grad():
        y = ours(x, **kw).sample
        base = MotifVideoTransformer3DModel.from_pretrained(release).eval()(x, **kw).sample
        assert (y - base).abs().max() > 2e-4  # the adapter does something (20x the tolerance below)
        assert (theirs(x, **kw).sample - y).abs().max() <= 1e-5
        assert (merged(x, **kw).sample - y).abs().max() <= 1e-5


def test_unused_repa_head_is_frozen_and_resumes_exactly(release, tmp_path):
    """model.repa.block set (the tiny preset) and no stage using REPA: the head is frozen, so it is in neither the
    checkpoint, the optimizer state nor the EMA, and a run resumed from the step-3 checkpoint continues the
    uninterrupted one bit for bit (two launches: the second resumes the first's checkpoint in a run dir of its own)."""
    from motif_train.cli.export import load_lora_checkpoint, run_config
    from motif_train.config import ModelSpec

    args = [*lora_args(release), "curriculum.stages.0.repa=false"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, 2, *args)
    assert "REPA head frozen" in (ref / "events.jsonl").read_text()
    fr = load_dcp(ckpt_dir(ref, 6), tmp_path / "a")
    assert not [k for k in fr if "repa_projector" in k]
    assert [k for k in fr if k.startswith("optim.state.")]
    assert all(".lora_" in k for k in fr if k.startswith(("model.", "ema.", "optim.state.")))
    train(run, 2, *args, f"checkpoint.resume={ckpt_dir(ref, 3)}")
    a, b = records(ref), records(run)
    for s in (4, 5, 6):
        assert step_values(a[s]) == step_values(b[s]), f"step {s} differs"
    fb = load_dcp(ckpt_dir(run, 6), tmp_path / "b")
    keys = [k for k in fr if k.startswith(("model.", "ema."))]
    assert keys and sorted(keys) == sorted(k for k in fb if k.startswith(("model.", "ema.")))
    for k in keys:
        assert torch.equal(fr[k], fb[k]), k
    # motif-export reads the adapters of such a checkpoint (it never needed the head)
    from omegaconf import OmegaConf

    spec = ModelSpec(**{k: v for k, v in OmegaConf.to_container(run_config(ckpt_dir(run, 6)).model,
                                                                  resolve=True).items()
                        if k in ModelSpec.__dataclass_fields__})
    model = load_lora_checkpoint(ckpt_dir(run, 6), spec, weights="ema", with_base=False)
    lora_b = dict(model.named_parameters())
    some = next(k for k in keys if k.startswith("ema.") and ".lora_B." in k)
    assert torch.equal(lora_b[some[len("ema."):]], fr[some])
