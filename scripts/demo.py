"""`make demo`: the whole pipeline on CPU, from mp4 files to a trained, resumed checkpoint.

    1. make clips        real mp4 + caption files (varied sizes / lengths, a few broken ones)
    2. tiny encoders     random tiny Wan VAE / T5Gemma2 / SigLIP / V-JEPA 2 (the real classes)
    3. motif-preprocess  clips -> latents, text / image embeddings, teacher pixels -> bucket shards
    4. motif-plan        the bucket-balanced plan report for stage 0 (utilization vs naive)
    5. torchrun --nproc_per_node=2 -m motif_train.cli.train experiment=tiny_cpu   (2 stages, REPA, TREAD)
         -> SIGKILL of every rank once step 8 is logged (a crash, not a clean preemption)
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

from motif_train.metrics import default_local_dir


def prepare_data(root: Path, n_clips: int, env: dict) -> list[str]:
    from motif_train.data.clips import default_specs, write_clip_folder
    from motif_train.objectives.encoders import build_tiny_encoders

    curriculum = Path(__file__).resolve().parents[1] / "configs" / "curriculum" / "tiny.yaml"
    print(f"[1/5] {n_clips} clips (+3 broken ones) -> {root / 'clips'}", flush=True)
    write_clip_folder(root / "clips", default_specs(n_clips, seed=0), broken=True)
    print(f"[2/5] tiny random encoders -> {root / 'encoders'}", flush=True)
    build_tiny_encoders(root / "encoders", metric_encoder=True)  # + clip/: the validation videos are scored
    print("[3/5] motif-preprocess", flush=True)
    subprocess.run([sys.executable, "-m", "motif_train.cli.preprocess", "--input", str(root / "clips"), "--out",
                    str(root / "data"), "--encoders", str(root / "encoders"), "--curriculum", str(curriculum)],
                   env=env, check=True)
    print("[4/5] motif-plan (stage 0, 2 ranks)", flush=True)
    subprocess.run([sys.executable, "-m", "motif_train.cli.plan", "--manifest", str(root / "data" / "manifest.json"),
                    "--stage-from-config", str(curriculum), "--stage", "0", "--world-size", "2",
                    "--out", str(root / "plan" / "stage0.npz"), "--report", str(root / "plan" / "report.json")],
                   env=env, check=True)
    print("[5/5] train", flush=True)
    return [f"data.root={root / 'data'}", f"encoders.root={root / 'encoders'}",
            f"eval.i2v_frame={root / 'clips' / 'clip0002.mp4'}"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--kill-after", type=int, default=8,
                    help="kill every rank once this step is logged (steps reach the live metrics copy at each "
                         "log step: every 4 in tiny_cpu; 8 lies between the checkpoints of steps 6 and 12)")
    ap.add_argument("--clips", type=int, default=32, help="number of generated clips")
    ap.add_argument("--synthetic", action="store_true", help="skip steps 1-4 and train on synthetic data")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)
    root = Path(args.run_dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = root / "train"
    data_args = ["data=synthetic"]
    if not args.synthetic:
        data_args = prepare_data(root, args.clips, env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "motif_train.cli.train", "experiment=tiny_cpu", f"run_dir={run}", *data_args, *args.overrides]
    print("$ " + " ".join(cmd[2:]), flush=True)

    # The live copy: the run dir's metrics.jsonl is only published at checkpoints and at exit.
    metrics = default_local_dir(run) / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # a previous demo's copy (the run dir itself was removed above)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
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
    evals = []
    if not args.synthetic:  # score the kept checkpoints off the training path: held-out validation loss per stage
        print(f"$ motif-eval --run-dir {run} --no-videos", flush=True)
        subprocess.run([sys.executable, "-m", "motif_train.cli.eval", "--run-dir", str(run), "--device", "cpu",
                        "--no-videos"], env=env, check=True)
        evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    wandb_runs = sorted(str(p) for p in (run / "wandb").glob("offline-run-*"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, last = rows[0]["loss/denoise"], rows[-1]["loss/denoise"]
    print("\n=== demo done ===")
    if not args.synthetic:
        print(f"clips            {root / 'clips'}")
        print(f"shards+manifest  {root / 'data'} (failures: {root / 'data' / 'failures.jsonl'})")
        print(f"plan report      {root / 'plan' / 'report.json'}, {root / 'plan' / 'report.png'}")
    print(f"run dir          {run}")
    print(f"resolved config  {run / 'config.yaml'}")
    print(f"checkpoints      {run / 'checkpoints'}: {', '.join(ckpts)}")
    print(f"W&B offline runs {', '.join(wandb_runs)}  (wandb sync <dir> to upload)")
    print(f"metrics          {metrics} ({len(rows)} step records, resumed steps appear twice)")
    print(f"loss plot        {run / 'loss.png'}")
    samples = sorted((run / "samples").glob("step_*"))
    if samples:
        print(f"validation       {samples[-1]}: {', '.join(p.name for p in sorted(samples[-1].iterdir()))}")
    print(f"denoise loss     step {rows[0]['step']}: {first:.4f} -> step {rows[-1]['step']}: {last:.4f}")
    if evals:
        a, b = evals[0], evals[-1]
        stages = sorted(k for k in a if k.startswith("val_loss/") and k.count("/") == 1)
        print(f"validation loss  {run / 'eval.jsonl'} (held-out samples, EMA, fixed σ grid; {run / 'eval.png'})")
        for k in stages:
            print(f"  {k:<24} step {a['step']}: {a[k]:.4f} -> step {b['step']}: {b[k]:.4f}")


if __name__ == "__main__":
    main()
