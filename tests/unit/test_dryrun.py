"""The dry run (motif_train/dryrun.py, cli/dryrun.py) of the 64-rank HSDP recipe on the tiny preset: the 8 x 8
mesh, 1/8 local shards, plan steps equal to motif-plan's, FSDPMemTracker figures that move as the analytic
model says (AC none > full; activations grow with the bucket), an OOM exit naming the stage, early config
errors. Context parallelism, time / cost and the recommendation: tests/unit/test_dryrun_cost.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from motif_train import dryrun
from motif_train.cli import dryrun as cli
from motif_train.data.shards import bucket_name
from motif_train.distributed import cost
from motif_train.distributed.memory_model import FakeModel
from motif_train.models.config import RoutingConfig

ROOT = Path(__file__).resolve().parents[2]
WORLD = ["parallel.simulate_world=64", "parallel.simulate_local=8"]
# tiny_cpu (tiny DiT, tiny encoders, REPA + TREAD, the 2-stage tiny curriculum) on HSDP, synthetic data
# with global batches that divide over 64 ranks.
TINY = ["experiment=tiny_cpu", "data=synthetic", "parallel=hsdp", "curriculum.stages.0.global_batch=128",
        "curriculum.stages.1.global_batch=64"]


def _cfg(tmp: Path, *extra: str):
    return cli.compose([*TINY, *WORLD, f"run_dir={tmp}", *extra])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("dry"))
    return dryrun.run(cfg, trainer=True, step=True, stages=[1])


def test_mesh_trainer_and_local_shards(report):
    assert report["checks"]["mesh"] == [8, 8] and report["mesh"] == [8, 8]
    assert report["mesh_dims"] == ["dp_replicate", "dp_shard"]
    assert report["rank"] == 63 and report["shard_coordinate"] == [7, 7]
    tr = report["trainer"]
    assert tr["built"] and tr["mesh"] == [8, 8] and tr["step"]["steps"] == 1  # the real Trainer ran a step
    c = report["shard_coordinate"][1]
    for p in report["shards"]:  # FSDP2 chunks dim 0 into ceil(d / 8) rows; rank 7 of a node holds the last chunk
        d0, chunk = p["global"][0], math.ceil(p["global"][0] / 8)
        assert p["local"][0] == min(chunk, max(0, d0 - c * chunk)), p
        assert p["local"][1:] == p["global"][1:], p
    assert sum(p["local"][0] * 8 == p["global"][0] for p in report["shards"]) > 0.9 * len(report["shards"])


def test_report_has_every_figure(report, tmp_path):
    rows = report["steps"]
    assert [(r["stage"], r["kind"]) for r in rows] == [(1, "i2v")]  # the stage's worst task, traced once
    for r in rows:
        m = r["memory_gib"]
        assert set(m) >= {"params", "grads", "optimizer", "ema", "teacher", "activations", "peak", "cp_buffers"}
        assert m["peak"] == pytest.approx(m["tracker_peak"] + m["ema"] + m["teacher"])
        assert m["activations"] > 0 and m["params"] > 0 and m["optimizer"] > 0 and r["step_s"] > 0
        assert m["tracker_peak"] == max(m["forward_backward_peak"], m["optimizer_peak"])
    assert report["fits"] and report["param_dtype"] == "torch.float32"  # tiny_cpu: train.device=cpu
    assert [s["steps"] for s in report["stages"]] == [12, 12]  # every stage timed, traced or not
    cli.render(report, Console(file=open(tmp_path / "out.txt", "w"), width=200))
    json.dumps(report, default=str)


def test_mfu_constant_is_the_benchmark():
    bench = json.loads((ROOT / "docs" / "bench" / "train_gpu.json").read_text())
    assert cost.MEASURED_MFU == pytest.approx(bench["TREAD 2..23 r=0.5"]["mfu"], abs=5e-4)


def _tracked(cfg, ac: str, buckets: list[tuple[int, int, int]]) -> list[dict]:
    from motif_train.distributed.mesh import build_mesh
    from motif_train.models.flops import latent_shape

    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ac=ac))
    with dryrun.fake_world(64, 8, 63) as info:
        fake = FakeModel(cfg, build_mesh(cfg.parallel, info))
        return [fake.track(latent=latent_shape(*b), batch=1, text_len=16, image_len=0,
                           routing=RoutingConfig(ratio=0.0), repa=False) for b in buckets]


def test_tracker_moves_like_the_analytic_model(report, tmp_path):
    small, large = (9, 96, 128), (17, 128, 192)  # 144 and 480 video tokens
    none = _tracked(_cfg(tmp_path), "none", [small])[0]
    full_small, full_large = _tracked(_cfg(tmp_path), "full", [small, large])
    # AC keeps only block inputs: fewer bytes held for backward than without AC, same state.
    assert none["activations"] > 1.3 * full_small["activations"]
    assert none["peak" if "peak" in none else "tracker_peak"] > full_small["tracker_peak"]
    assert none["optimizer"] == pytest.approx(full_small["optimizer"])
    # Activations are linear in tokens (analytic model): 480 + 16 vs 144 + 16 tokens.
    ratio = full_large["activations"] / full_small["activations"]
    assert 0.5 * (496 / 160) < ratio < 1.5 * (496 / 160)
    assert full_large["tracker_peak"] > full_small["tracker_peak"]


TINY_TOKENS = {(9, 64, 96): 72, (5, 96, 64): 48, (9, 96, 128): 144}  # the tiny curriculum's buckets


def write_manifest(root: Path, counts: dict) -> Path:
    """A manifest of the tiny curriculum's buckets with `counts` samples each (the plan needs only counts and
    token sizes)."""
    manifest = {"buckets": {bucket_name(*b): {"tokens": TINY_TOKENS[b]} for b in counts},
                "shards": [{"bucket": bucket_name(*b), "samples": n, "path": f"{bucket_name(*b)}.tar"}
                           for b, n in counts.items()]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def motif_plan_steps(root: Path, world: int) -> list[int]:
    """`motif-plan --carry --world-size <world> --stage-from-config tiny.yaml --stage i` steps, for both stages."""
    from motif_train.cli import plan as motif_plan

    out = []
    for i in range(2):
        args = argparse.Namespace(manifest=str(root), buckets=None, stage_from_config=str(
            ROOT / "configs" / "curriculum" / "tiny.yaml"), stage=i, world_size=world, segments=None,
            token_budget=None, attention_aware=False, seed=0, epoch=0, out=None, report=None, no_naive=True,
            carry=True)
        out.append(motif_plan.run(args, Console(file=open(root / "plan.txt", "w")))["steps"])
    return out


def test_plan_steps_equal_motif_plan(tmp_path):
    write_manifest(tmp_path, {(9, 64, 96): 700, (5, 96, 64): 333, (9, 96, 128): 257})
    cfg = _cfg(tmp_path, "data=shards", f"data.root={tmp_path}")
    got = dryrun.check(cfg)[0]["plan_steps"]
    want = motif_plan_steps(tmp_path, 64)
    assert got == want and all(s > 0 for s in got)


def test_oom_exit_names_the_stage(tmp_path, capsys):
    rc = cli.main(["--no-trainer", "--no-advise", "--stage", "1", "--out", str(tmp_path / "dry.json"), *TINY, *WORLD,
                      f"run_dir={tmp_path}", "parallel.gpu_memory_gib=0.001"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_OOM
    assert "curriculum.stages[1] (hi-res)" in err and "parallel.gpu_memory_gib=0.001" in err
    assert not json.loads((tmp_path / "dry.json").read_text())["fits"]


@pytest.mark.parametrize("bad, needle", [
    (["parallel.simulate_world=60", "parallel.simulate_local=8"], "parallel.simulate_world=60"),
    (["parallel.simulate_local=8"], "parallel.simulate_world is null"),
    (["parallel.simulate_world=64", "parallel.dp_replicate=3"], "parallel.dp_replicate"),
])
def test_bad_world_fails_before_any_work(tmp_path, capsys, monkeypatch, bad, needle):
    def boom(*a, **k):
        raise AssertionError("no fake group may be built for a bad config")

    monkeypatch.setattr(dryrun, "init_fake_world", boom)
    rc = cli.main(["--no-trainer", *TINY, f"run_dir={tmp_path}", *bad])
    assert rc == cli.EXIT_CONFIG
    assert needle in capsys.readouterr().err


def test_motif_train_refuses_a_dry_run(tmp_path):
    from motif_train.config import validate

    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="motif-dryrun"):
        validate(cfg, world_size=1, local_world_size=1)


@pytest.mark.parametrize("backend, traced", [("flex", "sdpa"), ("varlen", "varlen")])
def test_gpu_only_backends_dry_run(tmp_path, backend, traced):
    """A run configured for flex / varlen (CUDA only) is still dry-run on a CPU: the trainer phase builds with
    sdpa, the memory phase traces varlen's own fake kernel and flex as sdpa (FSDPMemTracker has no rule
    for flex's higher-order op; both save out + logsumexp), and the report says which was traced."""
    cfg = _cfg(tmp_path, f"model.attention_backend={backend}")
    rep = dryrun.run(cfg, trainer=True, step=False, stages=[1])
    assert rep["attention_backend"] == backend and rep["traced_backend"] == traced
    assert rep["trainer"]["built"] and rep["steps"] and all(s["memory_gib"]["peak"] > 0 for s in rep["steps"])
