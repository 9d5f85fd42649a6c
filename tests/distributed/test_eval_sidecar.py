"""`motif-eval --watch` beside a live 2-rank tiny run on real shards with a held-out split: every checkpoint
scored exactly once with the validation loss of every stage, the sidecar SIGKILLed in the middle and
restarted (no duplicates, no gaps), its figures equal to scoring the same checkpoint again, the trainer
never waiting on it; keep_last pruning under the sidecar reported, not fatal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._runs import env, launch, torchrun_cmd

pytestmark = pytest.mark.distributed


def _eval_cmd(run: Path, *extra: str, videos: bool = False) -> list[str]:
    return [sys.executable, "-m", "motif_train.cli.eval", "--run-dir", str(run), "--device", "cpu",
            "--videos" if videos else "--no-videos", "--poll-s", "0.2", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from motif_train.data.clips import default_specs, write_clip_folder
    from motif_train.data.preprocess import preprocess
    from motif_train.objectives.encoders import build_tiny_encoders

    tmp = tmp_path_factory.mktemp("sidecar")
    build_tiny_encoders(tmp / "enc", metric_encoder=True)  # + clip/: the video metrics' image-text encoder
    write_clip_folder(tmp / "clips", default_specs(24, seed=2), broken=False)
    preprocess([str(tmp / "clips")], tmp / "data", tmp / "enc", buckets=[[9, 64, 96], [5, 96, 64], [9, 96, 128]],
               progress=False, val_fraction=0.1, val_min_per_bucket=2, val_max_share=0.3)
    return tmp


def test_sidecar_scores_a_live_run_once_each_across_a_kill(data, tmp_path):
    run = tmp_path / "run"
    args = ("data=shards", f"data.root={data / 'data'}", f"encoders.root={data / 'enc'}", "data.num_workers=1",
            "checkpoint.every=2", "checkpoint.keep_last=0")
    trainer = launch(run, 2, *args)
    deadline = time.monotonic() + 400
    while not (run / "config.yaml").exists():  # the sidecar reads the run's saved config
        assert time.monotonic() < deadline and trainer.poll() is None, trainer.communicate()
        time.sleep(0.2)
    side = subprocess.Popen(_eval_cmd(run, "--watch"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ledger = run / "eval.jsonl"
    while not ledger.exists() or len(ledger.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline and side.poll() is None, side.communicate()[0][-3000:]
        time.sleep(0.2)
    side.send_signal(signal.SIGKILL)  # in the middle of the run (and maybe of a checkpoint's scoring)
    side.wait()
    out, err = trainer.communicate(timeout=400)
    assert trainer.returncode == 0, out[-2000:] + err[-4000:]
    again = subprocess.run(_eval_cmd(run, "--watch"), env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    saved = sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*")
                   if (p / "COMPLETE").exists())
    assert [r["step"] for r in lines] == saved == list(range(2, 13, 2))  # each once, in order, none missing
    assert all(r["status"] == "scored" and r["weights"] == "ema" for r in lines)
    for r in lines:  # both stages scored on their own held-out buckets
        assert r["val_loss/low-res"] > 0 and r["val_loss/hi-res"] > 0
        assert any(k.startswith("val_loss/low-res/") and k.endswith("/s0") for k in r)
    assert (run / "eval.png").stat().st_size > 0 and not (run / "eval.lock").exists()
    # deterministic: the same checkpoint scored again (a fresh run dir copy of the ledger-less state)
    again = subprocess.run([*_eval_cmd(run, "--checkpoint", str(run / "checkpoints" / "step_00000006"))],
                           env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0  # already in the ledger: nothing is rescored
    assert len(ledger.read_text().splitlines()) == len(lines)


def test_sidecar_survives_pruning(data, tmp_path):
    """keep_last=1 prunes every checkpoint but the newest while the sidecar is slow to start: whatever it saw
    is scored or reported deleted; the last one is always scored — here with the validation videos sampled
    (EMA, the run's fixed prompts and seeds) and scored by the video metrics."""
    run = tmp_path / "run"
    p = subprocess.run(torchrun_cmd(run, 2, "data=shards", f"data.root={data / 'data'}",
                                    f"encoders.root={data / 'enc'}", "data.num_workers=1", "checkpoint.every=2",
                                    "checkpoint.keep_last=1"), env=env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    got = subprocess.run(_eval_cmd(run, videos=True), env=env(), capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["status"]) for r in lines] == [(12, "scored")]
    r = lines[0]
    assert 0 <= r["eval/clip_score"] <= 100 and -1 <= r["eval/temporal_consistency"] <= 1
    assert r["val_loss/hi-res"] > 0
