"""Helpers to launch the real entry point under torchrun (gloo, CPU) and read what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from motif_train.metrics import default_local_dir, read_metrics

REPO = Path(__file__).resolve().parents[2]

# 12 steps: stage 0 = steps 1-6 (REPA, dual->single route), stage 1 = steps 7-12 (decoder route).
FAST = ["experiment=tiny_cpu", "data=synthetic", "logger.wandb=false", "curriculum.stages.0.steps=6",
        "curriculum.stages.1.steps=6", "checkpoint.every=3", "checkpoint.keep_last=0", "logger.log_every=3",
        "eval.every=0", "eval.at_end=false"]


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
         "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # the repo on the path: test-only data sources (tests/faults/_sources.py) are selected by `data._target_`
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def torchrun_cmd(run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    base = [o for o in FAST if not (o.startswith("data=") and any(x.startswith("data=") for x in overrides))]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "motif_train.cli.train", *base, f"run_dir={run_dir}", *overrides]


def launch(run_dir: Path, nproc: int = 2, *overrides: str, **env_extra) -> subprocess.Popen:
    return subprocess.Popen(torchrun_cmd(run_dir, nproc, *overrides), env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_all(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal every worker (each in a session of its own, so not reached through torchrun) and torchrun."""
    for pid in workers(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


def finish(proc: subprocess.Popen, args, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a launched run under a hard timeout; on expiry kill every rank (no orphans) and raise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        out, err = proc.communicate()
        raise AssertionError(f"run still going after {timeout}s (killed):\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def train(run_dir: Path, nproc: int = 2, *overrides: str, check: bool = True, timeout: float = 600,
          **env_extra) -> subprocess.CompletedProcess:
    p = finish(launch(run_dir, nproc, *overrides, **env_extra), overrides, timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def records(run_dir: Path) -> dict[int, dict]:
    """The run dir's metrics.jsonl (as synced at checkpoints / exit), last line per step."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}


def local_metrics(run_dir: Path) -> Path:
    """Rank 0's live local copy of metrics.jsonl (written every step; the run dir's lags until a sync)."""
    return default_local_dir(run_dir) / "metrics.jsonl"


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def workers(proc) -> list[int]:
    """torchrun's worker pids (children of the launcher; each in a session of its own)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def ckpt_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def load_dcp(ckpt: Path, tmp: Path) -> dict:
    """A DCP checkpoint as plain tensors (flattened keys), via torch's converter; weights_only load."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", torch.load(out, weights_only=True))
    return flat


def step_values(rec: dict) -> dict:
    """The per-step numbers that must match bit for bit between runs."""
    return {k: v for k, v in rec.items() if k.startswith("loss/") or k in ("grad_norm", "lr", "samples", "stage")}
