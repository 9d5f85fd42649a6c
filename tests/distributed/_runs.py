"""Helpers to launch the real entry point under torchrun (gloo, CPU) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from motif_train.metrics import read_metrics

# 12 steps: stage 0 = steps 1-6 (REPA, dual->single route), stage 1 = steps 7-12 (decoder route).
FAST = ["experiment=tiny_cpu", "data=synthetic", "logger.wandb=false", "curriculum.stages.0.steps=6",
        "curriculum.stages.1.steps=6", "checkpoint.every=3", "checkpoint.keep_last=0", "logger.log_every=3",
        "eval.every=0", "eval.at_end=false"]


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
         "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def torchrun_cmd(run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    base = [o for o in FAST if not (o.startswith("data=") and any(x.startswith("data=") for x in overrides))]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "motif_train.train", *base, f"run_dir={run_dir}", *overrides]


def train(run_dir: Path, nproc: int = 2, *overrides: str, check: bool = True,
          **env_extra) -> subprocess.CompletedProcess:
    p = subprocess.run(torchrun_cmd(run_dir, nproc, *overrides), env=env(**env_extra), capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}


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
