"""`make demo` as a test: clips -> preprocess -> plan -> torchrun experiment=tiny_cpu, SIGKILL
mid-run, resume; everything a user looks at is written."""

import json
import re
import subprocess
import sys
from pathlib import Path

from motif_train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_demo_pipeline_kill_and_resume(tmp_path):
    root = tmp_path / "demo"
    p = subprocess.run([sys.executable, "scripts/demo.py", "--run-dir", str(root), "--kill-after", "8",
                        "profile.steps=[2,3]"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "killed all ranks (SIGKILL)" in p.stdout and "=== demo done ===" in p.stdout
    # data: real shards, failures recorded, a plan report with our utilization vs naive
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] > 20
    failures = [json.loads(line) for line in (root / "data" / "failures.jsonl").read_text().splitlines()]
    assert any("empty_caption" in f["reason"] for f in failures) and len(failures) >= 3
    report = json.loads((root / "plan" / "report.json").read_text())
    assert {"utilization", "steps", "dropped", "per_bucket", "naive_utilization"} <= set(report)
    assert (root / "plan" / "report.png").read_bytes()[:4] == b"\x89PNG"
    # training: both stages, nothing missing after the crash, checkpoints, W&B offline, plots, trace
    run = root / "train"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert {r["stage"] for r in rows} == {0, 1}
    assert "loss/repa" in rows[0] and "loss/repa" not in rows[-1]
    state = json.loads((run / "checkpoints" / "step_00000024" / "train_state.json").read_text())
    assert state["step"] == 24 and (run / "checkpoints" / "step_00000024" / "COMPLETE").exists()
    assert re.search(r"resumed_from=\S+step_000000(06|12)", p.stdout)
    assert (run / "config.yaml").read_text().count("tiny_cpu") >= 1
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(f.suffix == ".wandb" for d in offline for f in d.iterdir())
    assert list((run / "profile").glob("trace_steps_2-3*.json"))
    # validation: EMA samples at the end of stage 0 and of the run (T2V prompts + one I2V frame)
    for step in ("step_00000012", "step_00000024"):
        names = sorted(p.name for p in (run / "samples" / step).iterdir())
        assert names == ["grid.png", "i2v_00.mp4", "t2v_00.mp4", "t2v_01.mp4"]
    wandb_bytes = b"".join(f.read_bytes() for d in offline for f in d.iterdir() if f.suffix == ".wandb")
    assert b"val/t2v_00" in wandb_bytes and b"val/i2v_00" in wandb_bytes
    # the trainer's validation scores its videos (evaluation/video_metrics, the demo's tiny CLIP)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    val = [e for e in events if e["event"].startswith("validation: ")]
    assert val and all(0 <= e["eval/clip_score"] <= 100 and e["eval/psnr_first_frame"] > 0 for e in val)
    # fd_vjepa: the 3 generated clips against the held-out clips' stored teacher pixels, counts logged beside it
    assert all(e["eval/fd_vjepa"] >= 0 and e["eval/fd_samples_generated"] == 3 and e["eval/fd_samples_reference"] >= 2
               for e in val)
    # motif-eval over the kept checkpoints: each once, the held-out validation loss goes down, printed
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [12, 18, 24] and all(e["status"] == "scored" for e in evals)
    assert evals[-1]["val_loss/low-res"] < evals[0]["val_loss/low-res"]
    assert "validation loss" in p.stdout and (run / "eval.png").read_bytes()[:4] == b"\x89PNG"
