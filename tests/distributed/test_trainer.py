"""End-to-end trainer behaviour under torchrun with 2 gloo ranks: exact and elastic resume,
interrupted saves, preemption signals, the NaN guard."""

import math
import signal
import subprocess
import time

import pytest
import torch

from ._runs import ckpt_dir, env, load_dcp, records, step_values, torchrun_cmd, train, train_state

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run every resume is compared with."""
    run = tmp_path_factory.mktemp("reference")
    train(run)
    return run


def _assert_same_steps(a: dict, b: dict, steps) -> None:
    for s in steps:
        assert step_values(a[s]) == step_values(b[s]), f"step {s} differs"


def _assert_same_ema_and_model(ck_a, ck_b, tmp):
    a, b = load_dcp(ck_a, tmp / "a"), load_dcp(ck_b, tmp / "b")
    keys = [k for k in a if k.startswith(("ema.", "model."))]
    assert any(k.startswith("ema.") for k in keys) and len(keys) > 50
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_reference_run(reference):
    rec = records(reference)
    assert sorted(rec) == list(range(1, 13))
    assert [rec[s]["stage"] for s in (6, 7)] == [0, 1]
    assert "loss/repa" in rec[6] and "loss/repa" not in rec[7]  # REPA stops with stage 0 on every rank
    assert all(math.isfinite(r["loss/denoise"]) for r in rec.values())
    state = train_state(ckpt_dir(reference, 12))
    assert state["step"] == 12 and state["data"]["consumed"] == 6 * 4 + 6 * 2
    assert (ckpt_dir(reference, 12) / "COMPLETE").exists() and (reference / "loss.png").stat().st_size > 0


def test_exact_resume_across_stage_change(reference, tmp_path):
    run = tmp_path / "run"
    train(run, 2, "train.stop_at=5")  # stops (and saves) mid stage 0
    assert train_state(ckpt_dir(run, 5))["step"] == 5
    train(run, 2)  # resume=auto: continues from step 5, crosses the stage change at 7
    _assert_same_steps(records(reference), records(run), range(1, 13))
    _assert_same_ema_and_model(ckpt_dir(reference, 12), ckpt_dir(run, 12), tmp_path)


def test_save_killed_half_way_is_never_resumed(reference, tmp_path):
    run = tmp_path / "run"
    p = train(run, 2, check=False, MOTIF_TEST_CRASH_IN_SAVE=6)
    assert p.returncode != 0
    assert ckpt_dir(run, 6).exists() and not (ckpt_dir(run, 6) / "COMPLETE").exists()
    p = train(run, 2)
    assert "resumed_from=" + str(ckpt_dir(run, 3)) in p.stdout
    _assert_same_steps(records(reference), records(run), range(4, 13))
    assert not ckpt_dir(run, 6).exists() or (ckpt_dir(run, 6) / "COMPLETE").exists()


def test_elastic_resume_two_ranks_to_one(reference, tmp_path):
    run = tmp_path / "run"
    train(run, 2, "train.stop_at=6")
    p = train(run, 1)  # same global batch: one rank now takes both halves
    assert "resumed_from=" + str(ckpt_dir(run, 6)) in p.stdout and "world_size=1" in p.stdout
    rec = records(run)
    assert sorted(rec) == list(range(1, 13))
    assert [rec[s]["samples"] for s in (6, 7, 12)] == [4, 2, 2]
    state = train_state(ckpt_dir(run, 12))
    assert state["data"]["consumed"] == 36 and state["world_size"] == 1  # nothing repeated or skipped
    # ...and back to two ranks.
    train(run, 2, "curriculum.stages.1.steps=8")
    assert train_state(ckpt_dir(run, 14))["data"]["consumed"] == 40


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_zero(tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(run, 2, "checkpoint.every=0", "curriculum.stages.1.steps=200"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    subprocess.run(["kill", f"-{sig.name[3:]}", workers[0]])  # one rank is told; all stop at the same step
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = max(records(run))
    assert last < 206 and (ckpt_dir(run, last) / "COMPLETE").exists()
    assert f"signal {sig.name}" in out


def test_nan_guard_skips_then_stops(tmp_path):
    run = tmp_path / "skip"
    train(run, 2, "train.stop_at=4", "train.debug_nan_steps=[2]")
    rec = records(run)
    assert math.isnan(rec[2]["loss/total"]) and rec[2]["train/skipped_steps"] == 1
    assert math.isfinite(rec[3]["loss/total"]) and rec[4]["train/skipped_steps"] == 1
    run = tmp_path / "stop"
    p = train(run, 2, "train.debug_nan_steps=[2,3,4]", "train.max_bad_steps=3", check=False)
    assert p.returncode != 0
    assert "3 non-finite steps in a row (train.max_bad_steps), last at step 4" in p.stderr
    assert "denoise" in p.stderr
