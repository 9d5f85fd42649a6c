"""`make demo` as a test: torchrun experiment=tiny_cpu, SIGKILL mid-run, resume, everything written."""

import json
import re
import subprocess
import sys
from pathlib import Path

from motif_train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_tiny_cpu_kill_and_resume(tmp_path):
    run = tmp_path / "demo"
    p = subprocess.run([sys.executable, "scripts/demo.py", "--run-dir", str(run), "--kill-after", "8",
                        "profile.steps=[2,3]"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "killed all ranks (SIGKILL)" in p.stdout and "=== demo done ===" in p.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))  # both stages, nothing missing after the crash
    assert {r["stage"] for r in rows} == {0, 1}
    state = json.loads((run / "checkpoints" / "step_00000024" / "train_state.json").read_text())
    assert state["step"] == 24 and state["data"]["consumed"] == 12 * 4 + 12 * 2
    assert (run / "checkpoints" / "step_00000024" / "COMPLETE").exists()
    assert re.search(r"resumed_from=\S+step_000000(06|12)", p.stdout)  # the newest complete save before the kill
    assert (run / "config.yaml").read_text().count("tiny_cpu") >= 1
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(f.suffix == ".wandb" for d in offline for f in d.iterdir())
    assert list((run / "profile").glob("trace_steps_2-3*.json"))
    first = sum(r["loss/denoise"] for r in rows[:4]) / 4
    last = sum(r["loss/denoise"] for r in rows[8:12]) / 4  # end of stage 0 (same shapes as the start)
    assert last < first
