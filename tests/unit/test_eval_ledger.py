"""The `motif-eval` ledger (motif_train/evaluation/ledger.py): every complete checkpoint scored exactly once,
a real sidecar process SIGKILLed mid-score and restarted without duplicates or gaps, a checkpoint pruned
while scored recorded as deleted, incomplete saves ignored, one sidecar per run dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from motif_train.evaluation.ledger import (
    DELETED,
    SCORED,
    Ledger,
    SidecarLock,
    complete_checkpoints,
    score_pending,
    watch,
)

ROOT = Path(__file__).resolve().parents[2]


def _ckpt(run: Path, step: int, *, complete: bool = True) -> Path:
    p = run / "checkpoints" / f"step_{step:08d}"
    p.mkdir(parents=True)
    (p / "train_state.json").write_text(json.dumps({"step": step, "value": step * 0.5}))
    if complete:
        (p / "COMPLETE").write_text("")
    return p


def _score(step: int, path: Path) -> dict:
    return {"value": json.loads((path / "train_state.json").read_text())["value"]}


def test_scores_each_complete_checkpoint_once_in_step_order(tmp_path):
    for s in (30, 10, 20):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 40, complete=False)  # an interrupted save: no marker
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20, 30]
    ledger = Ledger(tmp_path)
    got = score_pending(ledger, _score)
    assert [(r["step"], r["status"], r["value"]) for r in got] == [(10, SCORED, 5.0), (20, SCORED, 10.0),
                                                                    (30, SCORED, 15.0)]
    assert score_pending(Ledger(tmp_path), _score) == []  # a new sidecar reads the ledger: nothing twice
    (tmp_path / "checkpoints" / "step_00000040" / "COMPLETE").write_text("")
    assert [r["step"] for r in score_pending(Ledger(tmp_path), _score)] == [40]
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="already"):
        Ledger(tmp_path).record({"step": 20})


def test_a_checkpoint_pruned_while_scored_is_recorded_as_deleted(tmp_path):
    for s in (10, 20, 30):
        _ckpt(tmp_path, s)

    def prune_then_read(step, path):
        if step == 20:  # keep_last removes it under the sidecar
            shutil.rmtree(path)
        return _score(step, path)

    got = score_pending(Ledger(tmp_path), prune_then_read)
    assert [(r["step"], r["status"]) for r in got] == [(10, SCORED), (20, DELETED), (30, SCORED)]
    assert "pruned while scored" in got[1]["error"] and "FileNotFoundError" in got[1]["error"]

    def broken(step, path):  # a real failure on a checkpoint that is still there is not swallowed
        raise RuntimeError("bad weights")

    _ckpt(tmp_path, 40)
    with pytest.raises(RuntimeError, match="bad weights"):
        score_pending(Ledger(tmp_path), broken)


def test_watch_waits_for_new_checkpoints_and_stops_when_told(tmp_path):
    _ckpt(tmp_path, 10)
    naps = []

    def sleep(s):  # the "trainer" writes a checkpoint while the sidecar waits
        naps.append(s)
        if len(naps) == 1:
            _ckpt(tmp_path, 20)

    got = list(watch(Ledger(tmp_path), _score, poll_s=7, until=lambda: len(naps) >= 2, sleep=sleep))
    assert [r["step"] for r in got] == [10, 20] and naps == [7, 7]


SIDECAR = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from motif_train.evaluation.ledger import Ledger, SidecarLock, watch
    run = Path(sys.argv[1])
    def score(step, path):
        (run / f"started_{step}").write_text("")
        time.sleep(0.4)
        return {"value": json.loads((path / "train_state.json").read_text())["value"]}
    with SidecarLock(run):
        for _ in watch(Ledger(run), score, poll_s=0.05, until=lambda: (run / "STOP").exists()):
            pass
""")


def test_sigkilled_sidecar_restarts_without_duplicates_or_gaps(tmp_path):
    for s in range(1, 7):
        _ckpt(tmp_path, s * 10)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", SIDECAR, str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started_30").exists():  # two scored, the third in progress
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [r["step"] for r in Ledger(tmp_path).lines]
    assert before == [10, 20]  # the one being scored has no line
    assert (tmp_path / "eval.lock").exists()  # left behind by the kill; the restart takes it over (pid dead)
    _ckpt(tmp_path, 70)  # the trainer went on meanwhile
    (tmp_path / "STOP").write_text("")
    subprocess.run(cmd, env=env, check=True, timeout=120)
    steps = [r["step"] for r in Ledger(tmp_path).lines]
    assert steps == [10, 20, 30, 40, 50, 60, 70]  # each once, in order, none missing
    assert not (tmp_path / "eval.lock").exists()


def test_one_sidecar_per_run_dir(tmp_path):
    with SidecarLock(tmp_path), pytest.raises(RuntimeError, match="one motif-eval per run dir"):
        with SidecarLock(tmp_path):
            pass
    assert not (tmp_path / "eval.lock").exists()


def test_wandb_sink_resumes_the_run_id_offline(tmp_path, monkeypatch):
    """motif-eval's W&B sink: the run's id from wandb_id.txt, offline, files on local disk while it runs and
    copied whole into <run_dir>/wandb_eval at close; a scored line logged with eval/step."""
    from types import SimpleNamespace

    from motif_train.cli.eval import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb_id.txt").write_text("abc123xy")
    cfg = SimpleNamespace(logger=SimpleNamespace(wandb=True, mode="offline", project="p", entity=None))
    sink = WandbSink(cfg, run)
    assert sink.run is not None and sink.run.id == "abc123xy"
    sink({"step": 12, "status": "scored", "val_loss/low-res": 1.5, "checkpoint": "x"})
    sink({"step": 18, "status": "deleted"})
    sink.close()
    files = list((tmp_path / "tmp").rglob("*.wandb"))
    copies = list((run / "wandb_eval").rglob("*.wandb"))  # brought over whole at close, syncable from the bucket
    assert files and [f.read_bytes() for f in copies] == [f.read_bytes() for f in files]
    data = b"".join(f.read_bytes() for f in files)
    assert b"val_loss/low-res" in data and b"eval/step" in data
