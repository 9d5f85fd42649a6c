"""DCP checkpoint manager: sharded model / optimizer / EMA, train state, per-rank RNG.

Layout of one checkpoint (``run_dir/<folder>/step_{step:08d}/``)::

    .metadata, __{rank}_0.distcp   torch.distributed.checkpoint files (model, optim, ema, ...)
    train_state.json               the JSON-able ``extra`` dict given to ``save`` (rank 0)
    rng/rank_{r}.safetensors       torch CPU (+ CUDA) generator state, numpy MT19937 keys
    rng/rank_{r}.json              numpy scalars + python ``random`` state
    COMPLETE                       atomic marker, written by rank 0 after every rank finished

A directory without ``COMPLETE`` is an interrupted save: resume ignores it and the next
successful save prunes it. Nothing here pickles: RNG and train state are safetensors / JSON,
and non-tensor DCP entries (optimizer ``param_groups``) are loaded with ``weights_only=True``.
This module never imports the trainer.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from motif_train.utils import write_atomic

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "ModelState",
    "OptimizerState",
    "TensorDictState",
    "derive_rng_seed",
]

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_ASYNC_MODES = ("auto", "sync", "async")


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between saves; 0 = only at the end / on signal
    keep_last: int = 3  # complete checkpoints kept; 0 = keep all
    resume: str = "auto"  # "auto" | "none" | path to a checkpoint dir
    async_mode: str = "auto"  # "auto" (async on CUDA, sync on CPU) | "sync" | "async"
    save_at_end: bool = True
    folder: str = "checkpoints"  # relative to the run dir
    # Refuse to save (the run stops, naming the last good checkpoint) when the largest |weight| of the
    # model or EMA exceeds this; 0 disables the magnitude check. Non-finite weights are always refused.
    max_abs_weight: float = 1e4

    def __post_init__(self) -> None:
        for name in ("every", "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"checkpoint.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError(f"checkpoint.resume must be 'auto', 'none' or a path, got {self.resume!r}")
        if self.async_mode not in _ASYNC_MODES:
            raise ValueError(f"checkpoint.async_mode must be one of {_ASYNC_MODES}, got {self.async_mode!r}")
        if not isinstance(self.save_at_end, bool):
            raise ValueError(f"checkpoint.save_at_end must be a bool, got {self.save_at_end!r}")
        if not isinstance(self.folder, str) or not self.folder.strip():
            raise ValueError(f"checkpoint.folder must be a non-empty path, got {self.folder!r}")
        if isinstance(self.max_abs_weight, bool) or not isinstance(self.max_abs_weight, int | float) or not (
                0 <= self.max_abs_weight < float("inf")):
            raise ValueError(f"checkpoint.max_abs_weight must be a finite number >= 0 (0 disables the check), got "
                             f"{self.max_abs_weight!r}")


# --------------------------------------------------------------------------- Stateful wrappers


class ModelState(Stateful):
    """A (possibly FSDP2-sharded) module; FQNs are cleaned of wrapper prefixes by DSD.

    `keys`: save / load only these FQNs (a LoRA run: the trainable ones; load with `strict=False`).
    """

    def __init__(self, model: nn.Module, options: StateDictOptions | None = None,
                 keys: set[str] | None = None) -> None:
        self.model = model
        self.options = options or StateDictOptions()
        self.keys = keys

    def state_dict(self) -> dict[str, Any]:
        sd = get_model_state_dict(self.model, options=self.options)
        return sd if self.keys is None else {k: v for k, v in sd.items() if k in self.keys}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=self.options)


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter FQN (sharded like the params under FSDP2)."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, options: StateDictOptions | None = None
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = options or StateDictOptions()

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


class TensorDictState(Stateful):
    """A dict of tensors / DTensors (e.g. the sharded EMA) that is updated in place on load.

    ``dcp.load`` reads (and reshards) straight into the existing tensors, whose placements
    belong to the current mesh; ``load_state_dict`` only copies what is not already there.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = sorted(set(self.tensors) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.tensors))
        if missing or unexpected:
            raise KeyError(f"TensorDictState: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                if v is not self.tensors[k]:
                    self.tensors[k].copy_(v)


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that unpickles non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# --------------------------------------------------------------------------- helpers


def derive_rng_seed(seed: int, rank: int, step: int) -> int:
    """Deterministic 63-bit seed for a rank that has no saved RNG state."""
    digest = hashlib.sha256(f"motif_train.rng:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


# --------------------------------------------------------------------------- manager


@dataclass
class _Pending:
    step: int
    path: Path
    future: Future


class CheckpointManager:
    def __init__(
        self, cfg: CheckpointConfig, run_dir: str | Path, *, rank: int, world_size: int, device: torch.device,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / cfg.folder
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        if cfg.async_mode == "auto":
            self.use_async = self.device.type == "cuda"
        else:
            self.use_async = cfg.async_mode == "async"
        self._pending: _Pending | None = None
        self._last_step: int | None = None
        # Dedicated gloo groups, created once (collectively) only when async saving is used:
        # one carries DCP's collectives in the background thread, the other the per-step
        # done-flag all_reduce (two threads must never share one gloo group). `new_group` does not
        # inherit the world's timeout (gloo's default is 30 min), so the configured one is passed.
        self._save_pg = None
        self._ctrl_pg = None
        if self.use_async:
            self._save_pg = dist.new_group(backend="gloo", timeout=timeout)
            self._ctrl_pg = dist.new_group(backend="gloo", timeout=timeout)

    # ------------------------------------------------------------------ queries
    def step_dir(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step > 0 and step % self.cfg.every == 0

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        out = [(s, p) for p in self.folder.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
        return sorted(out)

    def latest(self) -> Path | None:
        complete = [p for _, p in self._step_dirs() if _is_complete(p)]
        return complete[-1] if complete else None

    def resolve_resume(self) -> Path | None:
        r = self.cfg.resume.strip()
        if r.lower() == "none":
            return None
        if r.lower() == "auto":
            return self.latest()
        path = Path(r).expanduser()
        if not path.is_absolute() and not path.exists() and (self.run_dir / path).exists():
            path = self.run_dir / path
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint.resume={r!r}: {path} is not a directory")
        if not _is_complete(path):
            raise FileNotFoundError(
                f"checkpoint.resume={r!r}: {path} has no {COMPLETE} marker (an interrupted or "
                f"partial save); pick a complete checkpoint or use checkpoint.resume=auto"
            )
        return path

    @property
    def pending(self) -> bool:
        return self._pending is not None

    # ------------------------------------------------------------------ save
    def save(self, step: int, states: dict[str, Stateful], extra: dict, *, force_sync: bool = False) -> float:
        """Save ``states`` at ``step``; returns the seconds the caller was blocked."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        if self._last_step == step:  # e.g. the end-of-run save right after a periodic one (same state)
            return time.perf_counter() - t0
        train_state = dict(extra)
        train_state.setdefault("step", step)
        train_state_text = json.dumps(train_state, indent=1, sort_keys=True)  # fail on every rank alike
        path = self.step_dir(step)
        if self.rank == 0 and path.exists():  # a stale dir from an earlier (crashed / diverged) run
            shutil.rmtree(path)
        dist.barrier()
        (path / "rng").mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_atomic(path / TRAIN_STATE, train_state_text)
        self._save_rng(path)
        self._last_step = step
        if self.use_async and not force_sync:
            fut = dcp.async_save(states, checkpoint_id=str(path), process_group=self._save_pg)
            if not isinstance(fut, Future):  # AsyncSaveResponse (only with async staging)
                fut = fut.upload_completion
            self._pending = _Pending(step, path, fut)
        else:
            dcp.save(states, checkpoint_id=str(path))
            dist.barrier()
            self._mark_and_prune(step, path)
            dist.barrier()  # no rank returns (and, on a signal, exits) before COMPLETE exists
        blocked = time.perf_counter() - t0
        log.info("checkpoint step %d: %s save, blocked %.2fs", step, "async" if self._pending else "sync", blocked)
        return blocked

    def maybe_finalize(self) -> bool:
        """Non-blocking (one tiny gloo all_reduce while a save is pending); call every step."""
        if self._pending is None:
            return False
        flag = torch.tensor([1 if self._pending.future.done() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._ctrl_pg)
        if int(flag.item()) == 0:
            return False
        self._finalize()
        return True

    def wait(self) -> None:
        """Block until the pending save (if any) is written on every rank and marked."""
        if self._pending is None:
            return
        self._pending.future.result()
        dist.barrier(group=self._ctrl_pg)
        self._finalize()

    def abandon(self) -> None:
        """Forget the pending save without any collective (the error path: a peer may be dead, so
        no barrier). Its directory stays without COMPLETE: resume ignores it, a later save prunes it."""
        if self._pending is not None:
            log.warning("checkpoint step %d abandoned before it was marked complete", self._pending.step)
        self._pending = None

    def close(self) -> None:
        self.wait()
        for pg in (self._save_pg, self._ctrl_pg):
            if pg is not None:
                dist.destroy_process_group(pg)
        self._save_pg = self._ctrl_pg = None

    def _finalize(self) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        pending.future.result()  # re-raise a failed background save
        self._mark_and_prune(pending.step, pending.path)

    def _mark_and_prune(self, step: int, path: Path) -> None:
        if self.rank != 0:
            return
        marker = {"step": step, "world_size": self.world_size, "time": time.time()}
        write_atomic(path / COMPLETE, json.dumps(marker))
        self._prune(keep=path)
        log.info("checkpoint step %d complete: %s", step, path)

    def _prune(self, keep: Path) -> None:
        dirs = self._step_dirs()
        complete = [p for _, p in dirs if _is_complete(p)]
        doomed = [p for _, p in dirs if not _is_complete(p) and p != keep]  # interrupted saves
        if self.cfg.keep_last > 0:
            doomed += [p for p in complete[: -self.cfg.keep_last] if p != keep]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: str | Path, states: dict[str, Stateful]) -> dict:
        """Load ``states`` in place (resharding to this world size); returns the train state."""
        path = Path(path)
        if not _is_complete(path):
            raise FileNotFoundError(f"checkpoint.resume: {path} has no {COMPLETE} marker")
        self.wait()
        dcp.load(states, checkpoint_id=str(path), planner=_SafeLoadPlanner())
        extra = json.loads((path / TRAIN_STATE).read_text())
        extra["rng_restored"] = self._load_rng(path, seed=int(extra.get("seed", 0)), step=int(extra.get("step", 0)))
        # A save at the resumed step would rewrite the same state: skip it only if it is ours.
        step = int(extra.get("step", -1))
        same_dir = path.resolve() == self.step_dir(step).resolve()
        self._last_step = step if same_dir else None
        return extra

    # ------------------------------------------------------------------ RNG
    def _rng_paths(self, path: Path) -> tuple[Path, Path]:
        return path / "rng" / f"rank_{self.rank}.safetensors", path / "rng" / f"rank_{self.rank}.json"

    def _save_rng(self, path: Path) -> None:
        st_path, js_path = self._rng_paths(path)
        tensors = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        py_version, py_state, py_gauss = random.getstate()
        meta = {
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        }
        tmp = st_path.with_name(f".{st_path.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, st_path)
        write_atomic(js_path, json.dumps(meta))

    def _load_rng(self, path: Path, *, seed: int, step: int) -> bool:
        st_path, js_path = self._rng_paths(path)
        if not (st_path.is_file() and js_path.is_file()):
            s = derive_rng_seed(seed, self.rank, step)
            torch.manual_seed(s)  # also seeds every CUDA device
            np.random.seed(s % (1 << 32))
            random.seed(s)
            log.warning("no RNG state for rank %d in %s: derived from (seed, rank, step)", self.rank, path)
            return False
        tensors = load_file(str(st_path))
        meta = json.loads(js_path.read_text())
        torch.set_rng_state(tensors["torch_cpu"])
        if "torch_cuda" in tensors and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"], self.device)
        n = meta["numpy"]
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
        return True
