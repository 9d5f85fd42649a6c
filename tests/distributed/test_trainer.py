"""End-to-end trainer behaviour under torchrun with 2 gloo ranks: exact and elastic resume,
preemption signals, the NaN guard (a save killed mid-way: tests/faults/test_checkpoint_faults.py)."""

import math
import signal
import subprocess
import time

import pytest
import torch

from ._runs import (
    ckpt_dir,
    env,
    load_dcp,
    local_metrics,
    records,
    step_values,
    torchrun_cmd,
    train,
    train_state,
    workers,
)

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
    while time.time() < deadline and not (local_metrics(run).exists() and local_metrics(run).read_text()):
        time.sleep(0.5)  # step 1 logged (to rank 0's local copy: the run dir's waits for a sync)
    time.sleep(1.0)
    pids = workers(proc)
    assert len(pids) == 2
    assert not (run / "metrics.jsonl").exists()  # checkpoint.every=0: nothing synced to the run dir yet
    subprocess.run(["kill", f"-{sig.name[3:]}", str(pids[0])])  # one rank is told; all stop at the same step
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = max(records(run))
    assert last < 206 and (ckpt_dir(run, last) / "COMPLETE").exists()
    assert f"signal {sig.name}" in out
    assert sorted(records(run)) == list(range(1, last + 1))  # synced whole at the signal's checkpoint


def test_nan_guard_skips_then_stops(tmp_path):
    run = tmp_path / "skip"
    train(run, 2, "train.stop_at=4", "train.debug_nan_steps=[2]")
    rec = records(run)
    assert math.isnan(rec[2]["loss/total"]) and rec[2]["train/skipped_steps"] == 1
    assert math.isfinite(rec[3]["loss/total"]) and rec[4]["train/skipped_steps"] == 1
    assert (ckpt_dir(run, 3) / "COMPLETE").exists()  # step 3 was good again: the periodic save ran
    run = tmp_path / "stop"
    p = train(run, 2, "train.debug_nan_steps=[2,3,4]", "train.max_bad_steps=3", check=False)
    assert p.returncode != 0
    assert "3 non-finite steps in a row (train.max_bad_steps), last at step 4" in p.stderr
    assert "denoise" in p.stderr and "No complete checkpoint exists yet" in p.stderr
    assert not ckpt_dir(run, 3).exists()  # the save at step 3 fell inside the streak: deferred, never written
    assert sorted(records(run)) == [1, 2, 3, 4]  # synced on the error path
