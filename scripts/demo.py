"""`make demo`: the main job end-to-end on CPU with two gloo ranks, killed mid-run and resumed.

    torchrun --nproc_per_node=2 -m motif_train.train experiment=tiny_cpu   (tiny DiT, tiny real
    encoders, synthetic clips, 2 curriculum stages with REPA and TREAD)
      -> SIGKILL of every process after step 10 (a crash, not a clean preemption)
      -> the same command again: resume=auto picks the newest complete checkpoint and finishes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--kill-after", type=int, default=10, help="kill every rank once this step is logged")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)
    run = Path(args.run_dir).resolve()
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "motif_train.train", "experiment=tiny_cpu", f"run_dir={run}", *args.overrides]
    print("$ " + " ".join(cmd[2:]), flush=True)

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    metrics = run / "metrics.jsonl"
    while proc.poll() is None:
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= args.kill_after:
            # torchrun starts its workers in sessions of their own: kill them by pid, then torchrun.
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            for pid in workers:
                os.kill(int(pid), signal.SIGKILL)  # every rank, mid-step: nothing gets to save
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"\n*** killed all ranks (SIGKILL) after step {max(steps)} ***\n", flush=True)
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"the run ended (exit {proc.returncode}) before step {args.kill_after}")

    print("$ " + " ".join(cmd[2:]) + "   # same command: resume=auto", flush=True)
    subprocess.run(cmd, env=env, check=True)

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    wandb_runs = sorted(str(p) for p in (run / "wandb").glob("offline-run-*"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, last = rows[0]["loss/denoise"], rows[-1]["loss/denoise"]
    print("\n=== demo done ===")
    print(f"run dir          {run}")
    print(f"resolved config  {run / 'config.yaml'}")
    print(f"checkpoints      {run / 'checkpoints'}: {', '.join(ckpts)}")
    print(f"W&B offline runs {', '.join(wandb_runs)}  (wandb sync <dir> to upload)")
    print(f"metrics          {metrics} ({len(rows)} step records, resumed steps appear twice)")
    print(f"loss plot        {run / 'loss.png'}")
    print(f"denoise loss     step {rows[0]['step']}: {first:.4f} -> step {rows[-1]['step']}: {last:.4f}")


if __name__ == "__main__":
    main()
