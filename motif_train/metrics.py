"""Training metrics: console line, W&B, `metrics.jsonl`, throughput, MFU, data-wait, profiling.

Every rank builds a `MetricsLogger`; only rank 0 prints, writes files or talks to W&B. The
trainer calls `log_step` once per optimizer step, in step order, with GLOBAL counts (samples,
tokens, FLOPs); it reduces the steps' values only at log steps (and before a checkpoint, a stop
or a divergence report), so it calls `log_step` for all the steps since the last one then.

`metrics.jsonl` (rank 0, one JSON object per `log_step` call) holds the step's raw values,
exactly as passed (floats are written by `json.dumps`, i.e. repr-exact):

    {"step": int, "stage": int, "loss/<term>": float, ..., "grad_norm": float, "lr": float,
     "samples": int, "tokens": int, "flops": float, "teacher_flops": float, "step_time": float,
     "data_wait": float, "<extra key>": float, ...,
     "perf/predicted_step_s": float, "perf/step_time_rel_error": float,   # with a known device peak
     "progress/step_of_run": int, ..., "progress/eta_run_s": float}       # with a ProgressPlan

followed by the values the logger derives itself (`metric_keys.DERIVED_KEYS`): the FLOP model's
predicted s/step of the step (its model FLOPs per rank at `distributed/cost.MEASURED_MFU` of the
peak) and the measured time's relative error to it, and the progress keys (`Progress`: step of the
run and of its stage, the stage's and the run's ETA as estimated at that step).

`flops` are the model's FLOPs (forward + backward) of what each micro-batch ran (its task's
SigLIP tokens, route, REPA head); `teacher_flops` the frozen REPA teacher's forward, which is
not model work and stays out of MFU.

Non-finite floats are written with `allow_nan=True` (`NaN`, `Infinity`): not strict JSON, but
`json.loads` reads them back, which is all the plot and the tests use. Events (`log_event`) go
to `events.jsonl` the same way.

Where the lines go: the run dir may be a bucket mount (SkyPilot) where closing a changed file
re-uploads all of it and appends may be refused, so nothing appends there. Lines go to a LOCAL
copy (`logger.local_dir`, default `<tempdir>/motif_metrics/<name>-<hash of the run dir>`), and
`sync()` publishes each whole file to the run dir atomically (temp + rename): the trainer calls it
at every checkpoint and at exit (also after an error). A resumed run starts its local copy from
the run dir's, so earlier lines are kept; a repeated step appears twice and readers keep the last
line. A failing write (local or sync) never stops training: it warns once, keeps the lines in
memory if the local copy is unusable, and the next sync tries again.

W&B's own files (the `.wandb` transaction log, `files/` with media and output.log, `logs/`) are
appended all run long, so they too stay local: `wandb.init(dir=logger.local_dir)` writes them to
`<local_dir>/wandb/<leg>/` (`<leg>`: `offline-run-<ts>-<id>` or `run-<ts>-<id>`), and `sync()` / `close()`
copy each changed file (size + mtime; W&B's `tmp/` and its `logs/` symlinks left out) whole to
`<run_dir>/wandb/<leg>/` (temp + rename), W&B's own layout, so the bucket copy can be `wandb sync`ed.
`close()` copies after `wandb.finish` and `wandb.teardown` (the service writes the log's last blocks
only when it stops). The run id is kept in `<run_dir>/wandb_id.txt`: a resumed leg, on any machine,
continues the same W&B run in a new `<leg>` dir, copied the same way beside the earlier ones. A failed
copy warns once and is retried at the next sync. If the local dir cannot be made, W&B writes into the
run dir as before (warned once).

MFU = window model FLOPs/s / (peak_tflops * 1e12 * world_size), against the spec dense bf16 peak;
`perf/teacher_flops_share` = teacher / (model + teacher) FLOPs of the window. A window's
`perf/predicted_step_s` = `cost.predicted_step_s`(its model FLOPs per step and rank), beside the
measured `perf/step_time`; both prediction keys, like MFU, only where the peak is known (said once on
the console otherwise). Progress and ETA are computed at the flush from the step times already read
there (`Progress`), so they add no device read.
This module must never import the trainer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import secrets
import shutil
import stat
import statistics
import string
import sys
import tempfile
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from motif_train import metric_keys as mk
from motif_train.utils import JsonlFile, write_atomic

# Spec dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, keyed by a substring of
# `torch.cuda.get_device_name()`. Matching is case-insensitive, longest key first, so
# "H100 PCIe" wins over "H100" and "GH200" over "H200". A plain "H100" (the SXM name is
# "NVIDIA H100 80GB HBM3") is the SXM part.
DEVICE_PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H800": 989.0,
    "H200": 989.0, "GH200": 989.0, "H20": 148.0,
    "B200": 2250.0, "GB200": 2500.0, "B100": 1750.0,
    "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "MI300X": 1307.0, "MI325X": 1307.0,
}
WANDB_MODES = ("auto", "online", "offline", "disabled")


def match_device_name(name: str) -> float | None:
    """Peak TFLOP/s of a device name from `DEVICE_PEAK_TFLOPS`, or None when unknown."""
    low = name.lower()
    for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in low:
            return DEVICE_PEAK_TFLOPS[key]
    return None


def peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    """Per-device peak for MFU: the override if given, the table on CUDA, else None (CPU)."""
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return match_device_name(torch.cuda.get_device_name(device))


@dataclass
class LoggerConfig:
    log_every: int = 10
    wandb: bool = True
    project: str = "motif-video"
    entity: str | None = None
    mode: str = "auto"  # auto | online | offline | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    peak_tflops: float | None = None  # overrides DEVICE_PEAK_TFLOPS
    # rank 0's local copy of metrics.jsonl / events.jsonl and W&B's own files (wandb/), synced whole to the run
    # dir at checkpoints and exit; None: <tempdir>/motif_metrics/<name>-<hash of the run dir> (unique per run)
    local_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={self.mode!r}: expected one of {', '.join(WANDB_MODES)}")
        if self.log_every < 1:
            raise ValueError(f"logger.log_every={self.log_every}: must be >= 1")

    def resolved_mode(self) -> str:
        """"auto": $WANDB_MODE if it names a mode, else online with $WANDB_API_KEY, else offline."""
        if self.mode != "auto":
            return self.mode
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("online", "offline", "disabled"):
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(peak GiB, label): CUDA max allocated since the last reset, else the process max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "rss"


def default_local_dir(run_dir: str | Path) -> Path:
    """`<tempdir>/motif_metrics/<run dir name>-<hash of its absolute path>`: one per run dir."""
    run_dir = Path(run_dir).absolute()
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / "motif_metrics" / f"{run_dir.name}-{digest}"


def _fmt_count(x: float) -> str:
    div, suffix = next(((d, s) for d, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(x) >= d), (1.0, ""))
    return f"{x / div:.1f}{suffix}"


def fmt_duration(seconds: float) -> str:
    """42s, 12m05s, 8h26m, 1d10h (two units at most); n/a when not finite."""
    if not math.isfinite(seconds):
        return "n/a"
    s = max(0, round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


# the ETA's s/step: the median of the means of the stage's last ETA_WINDOWS logged windows
ETA_WINDOWS = 5


@dataclass(frozen=True)
class ProgressPlan:
    """The run's steps, for the progress / ETA keys (`MetricsLogger(progress=...)`).

    `total_steps`: train.steps, or the sum of the curriculum's stage steps. `bounds`: per stage the run
    reaches, its (first, last) global step, 1-based and inclusive (the last stage runs on to
    `total_steps`; a stage that starts after it is not in the plan). `step_flops`: per stage, the
    predicted model FLOPs of one optimizer step (`step_stats.stage_step_flops`), used as a relative cost
    for stages not measured yet; None where unknown."""

    total_steps: int
    bounds: tuple[tuple[int, int], ...]
    step_flops: tuple[float | None, ...] = ()

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not self.bounds:
            raise ValueError(f"ProgressPlan: total_steps={self.total_steps}, bounds={self.bounds}: need >= 1 step")
        if not self.step_flops:
            object.__setattr__(self, "step_flops", (None,) * len(self.bounds))
        if len(self.step_flops) != len(self.bounds):
            raise ValueError(f"ProgressPlan: {len(self.step_flops)} step_flops for {len(self.bounds)} stages")

    @classmethod
    def from_curriculum(cls, ends: Sequence[int], total_steps: int,
                        step_flops: Sequence[float | None] | None = None) -> ProgressPlan:
        """From `Curriculum.ends` (each stage's configured last step) as the trainer runs them: stage i
        starts after stage i-1's end, the last one runs on to `total_steps`, and the run may end
        (train.steps) inside an earlier stage."""
        bounds: list[tuple[int, int]] = []
        start = 1
        for i, end in enumerate(ends):
            if start > total_steps:
                break
            bounds.append((start, total_steps if i == len(ends) - 1 else min(int(end), total_steps)))
            start = int(end) + 1
        flops = tuple(step_flops[:len(bounds)]) if step_flops else ()
        return cls(int(total_steps), tuple(bounds), flops)

    def stage_of(self, step: int) -> int:
        """The stage of a global step, as `Curriculum.index_at` (past the end: the last stage)."""
        return next((i for i, (_, last) in enumerate(self.bounds) if step <= last), len(self.bounds) - 1)


class Progress:
    """Step of the run and of its stage, and the ETAs, from host numbers only (each step's `step_time`,
    already read at the flush): nothing here touches the device.

    s/step of a stage = the median of the means of its last `windows` logged windows (`close_window`
    at each console / W&B window; the open one counts as one), over the steps THIS process ran in that
    stage. The first of them is left out (warm-up: torch.compile, the allocator, the loader's first
    batches; a new stage and a resumed process both start with one) and used only while it is the
    stage's one measurement. A resumed run's logger is a new one, so its ETA starts from its own steps.

    ETA stage = the stage's steps left x its s/step. ETA run = that + each later stage's steps x its
    estimate: its own s/step if measured, else the current stage's s/step x (its predicted FLOPs per
    step / the current stage's, `ProgressPlan.step_flops`), i.e. the FLOP model's predicted step time
    ratio with the current stage's measured error carried over; the current s/step where a figure is
    missing. Step time only: checkpoint saves, validation and start-up are not in it."""

    def __init__(self, plan: ProgressPlan, windows: int = ETA_WINDOWS) -> None:
        if windows < 1:
            raise ValueError(f"Progress: windows={windows} must be >= 1")
        self.plan, self.windows = plan, windows
        self._warmup: dict[int, float] = {}  # per stage: the first step this process ran in it
        self._open: dict[int, list[float]] = {}  # per stage: the open window's step times (warm-up excluded)
        self._closed: dict[int, deque[float]] = {}  # per stage: the last `windows` closed windows' means

    def add(self, step: int, step_time: float) -> dict[str, float]:
        """Record one step's time; returns its progress values (`at(step)`)."""
        i, t = self.plan.stage_of(step), float(step_time)
        if math.isfinite(t) and t >= 0:
            if i not in self._warmup:
                self._warmup[i] = t
            else:
                self._open.setdefault(i, []).append(t)
        return self.at(step)

    def close_window(self) -> None:
        """End of a logged window: each stage's open step times become one window mean."""
        for i, times in self._open.items():
            if times:
                self._closed.setdefault(i, deque(maxlen=self.windows)).append(sum(times) / len(times))
                times.clear()

    def sec_per_step(self, stage: int) -> float | None:
        """The stage's measured s/step estimate, or None before any step of it ran here."""
        means = list(self._closed.get(stage, ()))
        times = self._open.get(stage)
        if times:
            means.append(sum(times) / len(times))
        if means:
            return statistics.median(means[-self.windows:])
        return self._warmup.get(stage)

    def _later(self, cur: int, j: int, est: float) -> float:
        own = self.sec_per_step(j)
        if own is not None:
            return own
        f_cur, f_j = self.plan.step_flops[cur], self.plan.step_flops[j]
        return est * f_j / f_cur if f_cur and f_j and f_cur > 0 and f_j > 0 else est

    def at(self, step: int) -> dict[str, float]:
        """The progress keys at `step` with the estimates as they stand (NaN ETAs before any measurement)."""
        i = self.plan.stage_of(step)
        first, last = self.plan.bounds[i]
        est = self.sec_per_step(i)
        if est is None:
            eta_stage = eta_run = math.nan
        else:
            eta_stage = max(last - step, 0) * est
            eta_run = eta_stage + sum((b - a + 1) * self._later(i, j, est)
                                      for j, (a, b) in enumerate(self.plan.bounds) if j > i)
        return {mk.PROGRESS_STEP_OF_RUN: int(step), mk.PROGRESS_RUN_STEPS: self.plan.total_steps,
                mk.PROGRESS_STAGE_STEP: int(step) - first + 1, mk.PROGRESS_STAGE_STEPS: last - first + 1,
                mk.PROGRESS_ETA_STAGE_S: eta_stage, mk.PROGRESS_ETA_RUN_S: eta_run}


class MetricsLogger:
    """Console + W&B + metrics.jsonl on rank 0; a cheap no-op on every other rank."""

    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, *, rank: int, world_size: int,
                 device: torch.device, run_name: str, config: dict | None = None, resume_step: int = 0,
                 progress: ProgressPlan | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.run_name, self.resume_step = run_name, resume_step
        self.peak = peak_tflops(self.device, cfg.peak_tflops)
        self.is_main = rank == 0
        # progress / ETA keys (with the run's plan; a resumed process starts its estimates afresh)
        self.progress = Progress(progress) if progress is not None and self.is_main else None
        from motif_train.distributed.cost import MEASURED_RECOMPUTE, predicted_step_s  # cost imports this module

        # executed / counted FLOPs of the current stage's AC mode (the trainer sets it per stage; default: the
        # MFU run's, AC full); the prediction counts compute only, not motif-dryrun's CP all-to-all term
        self.recompute = MEASURED_RECOMPUTE
        self._predict: Callable[[float], float] | None = None  # model FLOPs per rank of a step -> s
        if self.peak and self.is_main:
            peak = self.peak
            self._predict = lambda flops: predicted_step_s(flops, peak_tflops=peak, recompute=self.recompute)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.events_path = self.run_dir / "events.jsonl"
        self.console = Console(soft_wrap=True, highlight=False)
        self.wandb_run: Any = None
        # this leg's W&B dir in the run dir (`<run_dir>/wandb/<leg>`, filled by `sync` / `close`), and the
        # local one W&B writes to (`wandb.run.dir`'s parent); the same dir where W&B writes to the run dir
        self.wandb_dir: Path | None = None
        self.wandb_local_dir: Path | None = None
        self.wandb_id: str | None = None
        self._wandb_root: Path | None = None  # the local `wandb/` holding this run's legs; None: nothing to copy
        self._wandb_copied: dict[Path, tuple[int, int]] = {}  # local file -> (size, mtime_ns) at its last copy
        self.last_line: str | None = None  # the last console step line
        self._window: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._closed = False
        self._warned: set[str] = set()
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.local_dir = Path(cfg.local_dir) if cfg.local_dir else default_local_dir(self.run_dir)
        self._files = {name: JsonlFile(self.run_dir / name, self.local_dir / name, self._warn_once)
                       for name in ("metrics.jsonl", "events.jsonl")}
        if cfg.wandb and cfg.resolved_mode() != "disabled":
            self._init_wandb(config)

    def _warn_once(self, kind: str, msg: str) -> None:
        """Metrics I/O problems are reported once per kind and never raised (training goes on)."""
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(f"metrics: {msg}", RuntimeWarning, stacklevel=3)
        self.console.print(f"metrics: {msg}", markup=False)

    def _write(self, name: str, rec: dict) -> None:
        try:
            line = json.dumps(rec, allow_nan=True, default=str) + "\n"
        except (TypeError, ValueError) as e:
            self._warn_once("encode", f"a {name} record could not be encoded ({type(e).__name__}: {e})")
            return
        self._files[name].write(line)

    def sync(self) -> bool:
        """Publish metrics.jsonl / events.jsonl and W&B's changed files whole to the run dir (rank 0;
        others: no-op). True when everything reached it; never raises."""
        if not self.is_main:
            return True
        return all([self._sync_files(), self._sync_wandb()])

    def _sync_files(self) -> bool:
        return all([f.sync() for f in self._files.values()])

    # ---------------------------------------------------------------- W&B
    def _init_wandb(self, config: dict | None) -> None:
        mode = self.cfg.resolved_mode()
        id_path = self.run_dir / "wandb_id.txt"
        try:
            import wandb

            if id_path.exists() and id_path.read_text().strip():
                run_id = id_path.read_text().strip()
            else:
                run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
                write_atomic(id_path, run_id + "\n")
            try:  # W&B appends to its files all run long: keep them on local disk, copied at syncs
                self.local_dir.mkdir(parents=True, exist_ok=True)
                wandb_parent = self.local_dir
            except OSError as e:
                self._warn_once("wandb_local", f"W&B's local dir {self.local_dir} unusable ({type(e).__name__}: {e}); "
                                               f"W&B writes into {self.run_dir / 'wandb'} directly")
                wandb_parent = self.run_dir
            t0 = time.perf_counter()
            self.wandb_run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, name=self.run_name, group=self.cfg.group,
                tags=list(self.cfg.tags) or None, dir=str(wandb_parent), mode=mode, config=config,
                id=run_id, resume="allow", settings=wandb.Settings(silent=True, init_timeout=120),
            )
            self.wandb_id = run_id
            # where W&B really wrote (it falls back to a temp dir when `dir` is not writable)
            self.wandb_local_dir = Path(self.wandb_run.dir).parent
            self.wandb_dir = self.run_dir / "wandb" / self.wandb_local_dir.name
            if self.wandb_local_dir.absolute() != self.wandb_dir.absolute():
                self._wandb_root = self.wandb_local_dir.parent
            self.console.print(f"W&B {mode} run {run_id} ({time.perf_counter() - t0:.1f}s) -> {self.wandb_local_dir}"
                               + (f" (copied to {self.wandb_dir} at checkpoints and exit)" if self._wandb_root else ""),
                               markup=False)
        except Exception as e:  # noqa: BLE001 - never let W&B take the run down
            self.wandb_run = None
            msg = f"W&B disabled for this run: wandb.init ({mode}) failed: {type(e).__name__}: {e}"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self.console.print(f"[bold red]{msg}[/]", markup=True)

    def _sync_wandb(self) -> bool:
        """Copy every changed file of this run's local W&B legs to `<run_dir>/wandb/` (same layout), each
        whole and atomically; unchanged files (size + mtime_ns as of their last copy) are skipped. A
        failure warns once and returns False; the next sync copies what is still missing or stale."""
        root, run_id = self._wandb_root, self.wandb_id
        if root is None or run_id is None:
            return True
        dest_root = self.run_dir / "wandb"
        errors: list[OSError] = []
        try:
            # every leg of this run id left in the local dir (an earlier leg on this machine too)
            legs = sorted(p for p in root.iterdir() if p.name.endswith(f"-{run_id}")
                          and p.name.startswith(("run-", "offline-run-")) and p.is_dir() and not p.is_symlink())
        except OSError as e:
            legs, errors = [], [e]
        for leg in legs:
            for dirpath, dirnames, filenames in os.walk(leg, onerror=errors.append):
                here = Path(dirpath)
                if here == leg:
                    dirnames[:] = [d for d in dirnames if d != "tmp"]  # W&B's scratch files
                for name in filenames:
                    src = here / name
                    if here.name == "logs" and src.is_symlink():
                        continue  # debug-core.log: a link to the W&B service's shared log
                    try:  # one file failing does not keep the others from the run dir
                        self._copy_if_changed(src, dest_root / src.relative_to(root))
                    except OSError as e:
                        errors.append(e)
        if errors:
            e = errors[0]
            self._warn_once("wandb_sync", f"copying W&B's files to {dest_root} failed ({len(errors)} file(s); "
                                          f"{type(e).__name__}: {e}); retrying at the next checkpoint")
            return False
        return True

    def _copy_if_changed(self, src: Path, dst: Path) -> None:
        try:
            st = src.stat()
        except FileNotFoundError:
            return  # a file W&B removed meanwhile
        if not stat.S_ISREG(st.st_mode):
            return
        key = (st.st_size, st.st_mtime_ns)
        seen = self._wandb_copied.get(src)
        if seen == key:
            return
        if seen is None:  # first look in this process: an earlier process may have copied it already
            with contextlib.suppress(OSError):
                d = dst.stat()
                if d.st_size == st.st_size and d.st_mtime_ns // 10**9 == st.st_mtime_ns // 10**9:
                    self._wandb_copied[src] = key
                    return
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_atomic(src, dst, st)
        except FileNotFoundError:
            if src.exists():
                raise
            return
        self._wandb_copied[src] = key

    def _wandb_log(self, data: dict[str, Any], step: int) -> None:
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.log(data, step=step)
        except Exception as e:  # noqa: BLE001
            self.console.print(f"W&B log failed at step {step}: {type(e).__name__}: {e}", markup=False)

    # ---------------------------------------------------------------- steps
    def log_step(self, step: int, *, losses: dict[str, float], grad_norm: float, lr: float, samples: int,
                 tokens: int, step_time: float, data_wait: float, flops: float, stage: int,
                 extra: dict[str, float] | None = None, teacher_flops: float = 0.0) -> dict | None:
        """Record one optimizer step; at `step % log_every == 0` log the window and return it."""
        if not self.is_main:
            return None
        rec: dict[str, Any] = {mk.STEP: int(step), mk.STAGE: int(stage)}
        rec.update({mk.loss_key(k): float(v) for k, v in losses.items()})
        rec.update({mk.GRAD_NORM: float(grad_norm), mk.LR: float(lr), mk.SAMPLES: int(samples),
                    mk.TOKENS: int(tokens), mk.FLOPS: float(flops), mk.TEACHER_FLOPS: float(teacher_flops),
                    mk.STEP_TIME: float(step_time), mk.DATA_WAIT: float(data_wait)})
        for k, v in (extra or {}).items():
            rec[k] = float(v)
        if self._predict is not None:
            pred = self._predict(float(flops) / self.world_size)
            rec[mk.PERF_PREDICTED_STEP_S] = pred
            if pred > 0:
                rec[mk.PERF_STEP_TIME_REL_ERROR] = float(step_time) / pred - 1
        if self.progress is not None:
            rec.update(self.progress.add(int(step), float(step_time)))
        self._write("metrics.jsonl", rec)
        self._window.append(rec)
        self._last_step = int(step)
        if step % self.cfg.log_every == 0:
            return self.flush(step)
        return None

    def flush(self, step: int | None = None) -> dict | None:
        """Log the accumulated window now (no-op when empty); returns the logged dict."""
        if not self.is_main or not self._window:
            return None
        step = self._last_step if step is None else int(step)
        win, self._window = self._window, []
        n, last = len(win), win[-1]
        keys = list(dict.fromkeys(k for r in win for k in r))  # union, first-seen order

        def mean(k: str) -> float:
            vals = [r[k] for r in win if k in r]
            return sum(vals) / len(vals)

        time_sum = sum(r[mk.STEP_TIME] for r in win)
        rate = (lambda k: sum(r[k] for r in win) / time_sum) if time_sum > 0 else (lambda k: math.nan)
        mfu = rate(mk.FLOPS) / (self.peak * 1e12 * self.world_size) if self.peak else None
        mem, mem_label = _peak_memory_gib(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # next window reports its own peak

        out: dict[str, Any] = {k: mean(k) for k in keys if k.startswith(mk.LOSS_PREFIX)}
        terms = [k for k in out if k != mk.LOSS_TOTAL and not k.startswith(mk.loss_key(mk.SIGMA_PREFIX))]
        if mk.LOSS_TOTAL not in out and terms:
            out[mk.LOSS_TOTAL] = sum(out[k] for k in terms)
        for k in keys:
            if k not in mk.RAW_KEYS and k not in mk.DERIVED_KEYS and not k.startswith(mk.LOSS_PREFIX):
                out[mk.window_key(k)] = mean(k)
        step_s = time_sum / n
        # predicted s/step of the window's mean step: its model FLOPs per rank at the measured MFU of the
        # device's peak (distributed/cost.py); absent, like MFU, where the peak is unknown
        pred = self._predict(sum(r[mk.FLOPS] for r in win) / n / self.world_size) if self._predict else None
        err = step_s / pred - 1 if pred else None
        prog = None
        if self.progress is not None:
            self.progress.close_window()
            prog = self.progress.at(step)
        out.update({
            mk.PERF_SAMPLES_PER_S: rate(mk.SAMPLES),
            mk.PERF_TOKENS_PER_S: rate(mk.TOKENS),
            mk.PERF_FLOPS_PER_S: rate(mk.FLOPS),
            mk.PERF_MFU: mfu,
            mk.PERF_TEACHER_FLOPS_SHARE: _share(win),
            mk.PERF_DATA_WAIT: rate(mk.DATA_WAIT),
            mk.PERF_STEP_TIME: step_s,
            mk.PERF_PREDICTED_STEP_S: pred,
            mk.PERF_STEP_TIME_REL_ERROR: err,
            mk.MEM_PEAK_GIB: mem,
            mk.SCHED_LR: last[mk.LR],
            mk.OPTIM_GRAD_NORM: mean(mk.GRAD_NORM),
            mk.CURRICULUM_STAGE: last[mk.STAGE],
        })
        if prog is not None:
            out.update(prog)
        if pred is None and "predicted" not in self._warned:  # said once, as MFU's "n/a" says it per line
            self._warned.add("predicted")
            self.console.print(f"metrics: no bf16 peak known for device {self.device} ({self._device_name()}): "
                               f"{mk.PERF_MFU}, {mk.PERF_PREDICTED_STEP_S} and {mk.PERF_STEP_TIME_REL_ERROR} are "
                               "not logged (set logger.peak_tflops)", markup=False)

        terms_str = " ".join(f"{k[len(mk.LOSS_PREFIX):]} {out[k]:.4f}" for k in terms)
        total = out.get(mk.LOSS_TOTAL)
        mfu_str = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        if prog is None:
            where = f"step {step:>5} | stage {last[mk.STAGE]}"
        else:
            where = (f"step {step}/{prog[mk.PROGRESS_RUN_STEPS]} (stage {last[mk.STAGE]}: "
                     f"{prog[mk.PROGRESS_STAGE_STEP]}/{prog[mk.PROGRESS_STAGE_STEPS]})")
        line = (where + " | loss " + ("n/a" if total is None else f"{total:.4f}")
                + (f" ({terms_str})" if terms_str else "")
                + f" | gnorm {out[mk.OPTIM_GRAD_NORM]:.2f} | lr {last[mk.LR]:.2e}"
                + f" | {out[mk.PERF_SAMPLES_PER_S]:.1f} samples/s | {_fmt_count(out[mk.PERF_TOKENS_PER_S])} tok/s"
                + f" | mfu {mfu_str} | data {100 * out[mk.PERF_DATA_WAIT]:.1f}%"
                + f" | mem {mem:.1f} GiB" + ("" if mem_label == "cuda" else f" ({mem_label})")
                + f" | {step_s:.3g} s/step" + ("" if pred is None else f" (pred {pred:.3g})")
                + ("" if prog is None else f" | ETA stage {fmt_duration(prog[mk.PROGRESS_ETA_STAGE_S])}, "
                   f"run {fmt_duration(prog[mk.PROGRESS_ETA_RUN_S])}"))
        self.last_line = line
        self.console.print(line, markup=False)
        self._wandb_log({k: v for k, v in out.items() if v is not None}, step)
        return out

    def _device_name(self) -> str:
        if self.device.type != "cuda":
            return "no table entry for a non-CUDA device"
        try:
            return f"{torch.cuda.get_device_name(self.device)!r} not in DEVICE_PEAK_TFLOPS"
        except Exception:  # noqa: BLE001 - a name for a message only
            return "unnamed CUDA device"

    # ---------------------------------------------------------------- events, media
    def log_event(self, step: int, message: str, **values: Any) -> None:
        """Highlighted console line + `event/<k>` (or `<k>` when it has a '/') to W&B + events.jsonl."""
        if not self.is_main:
            return
        shown = {k: v for k, v in values.items() if k != "traceback"}  # the traceback is already on stderr
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        self.console.print(f">> step {step} | {message}" + (f" {vals}" if vals else ""), style="bold yellow",
                           markup=False)
        self._write("events.jsonl", {"step": int(step), "event": message, **values})
        data = {mk.event_key(k): v for k, v in values.items() if isinstance(v, int | float)}
        if data:
            self._wandb_log(data, step)

    def log_video(self, step: int, key: str, frames_uint8: np.ndarray, fps: int | float) -> None:
        """Log (T, H, W, 3) uint8 frames as a `wandb.Video` (mp4 encoded with PyAV); no-op without W&B."""
        if not self.is_main or self.wandb_run is None:
            return
        import wandb

        frames = np.asarray(frames_uint8)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"log_video: expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
        # encoded locally: W&B copies it into its files/media/, which `sync` brings to the run dir
        media = (self.run_dir if self._wandb_root is None else self._wandb_root.parent) / "media"
        path = media / f"{key.replace('/', '_')}_step{step}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_mp4(frames, path, fps)
        self._wandb_log({key: wandb.Video(str(path), fps=int(round(fps)), format="mp4")}, step)

    # ---------------------------------------------------------------- close
    def close(self, *, failed: bool = False) -> Path | None:
        """Flush the open window, sync the files to the run dir, plot `loss.png` (not after a
        failure: exit promptly), finish W&B and copy its files to the run dir; returns the PNG path."""
        if not self.is_main or self._closed:
            return None
        self._closed = True
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - the files below matter more than the last console line
            self.console.print(f"last metrics window failed: {type(e).__name__}: {e}", markup=False)
        self._sync_files()
        png = None
        if not failed:
            try:
                png = plot_losses(self._files["metrics.jsonl"].path_for_reading(), self.run_dir / "loss.png")
            except Exception as e:  # noqa: BLE001 - a plot must not fail the run's end
                self.console.print(f"loss plot failed: {type(e).__name__}: {e}", markup=False)
        for f in self._files.values():
            f.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=1 if failed else 0)
            except Exception as e:  # noqa: BLE001
                self.console.print(f"wandb.finish failed: {type(e).__name__}: {e}", markup=False)
            self.wandb_run = None
            try:  # `finish` can return before the service wrote the transaction log's last blocks; this waits
                import wandb

                wandb.teardown()
            except Exception as e:  # noqa: BLE001
                self.console.print(f"wandb.teardown failed: {type(e).__name__}: {e}", markup=False)
        self._sync_wandb()
        return png


def _copy_atomic(src: Path, dst: Path, st: os.stat_result) -> None:
    """Copy a file whole via a temp file + fsync + rename (readers see the old or the new copy), with
    the source's mtime where the target file system keeps it."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        with contextlib.suppress(OSError):  # some bucket mounts keep no mtime: the copy is then redone once
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _share(win: list[dict[str, Any]]) -> float:
    """Teacher forward FLOPs / (model + teacher) FLOPs over a window (0 when nothing ran)."""
    teacher = sum(r.get(mk.TEACHER_FLOPS, 0.0) for r in win)
    work = teacher + sum(r[mk.FLOPS] for r in win)
    return teacher / work if work > 0 else 0.0


def _write_mp4(frames: np.ndarray, path: Path, fps: int | float) -> None:
    import av

    h, w = frames.shape[1:3]
    frames = frames[:, : h - h % 2, : w - w % 2]  # yuv420p needs even sizes
    with av.open(str(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=int(round(fps)))
        except Exception:  # noqa: BLE001 - FFmpeg builds without x264
            stream = container.add_stream("mpeg4", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in [*frames, None]:  # None flushes the encoder
            vf = None if frame is None else av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(vf))


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl lines sorted by step, the last line winning where a resume repeated a step."""
    path = Path(path)
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec[mk.STEP])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Loss terms vs step (+ sigma-bucket panel when present) with a moving average; None if empty."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in recs:
        for k, v in r.items():
            if k.startswith(mk.LOSS_PREFIX) or k.startswith(mk.SIGMA_PREFIX):
                name = k[len(mk.LOSS_PREFIX):] if k.startswith(mk.LOSS_PREFIX) else k
                if v is not None and math.isfinite(v):
                    series[name][0].append(r[mk.STEP])
                    series[name][1].append(v)
    main = {k: v for k, v in series.items() if not k.startswith(mk.SIGMA_PREFIX)}
    sigma = {k: v for k, v in series.items() if k.startswith(mk.SIGMA_PREFIX)}
    panels = [(main, "loss terms")] + ([(sigma, "loss by sigma quartile")] if sigma else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.6 * len(panels)), squeeze=False, sharex=True)
    for ax, (group, title) in zip(axes[:, 0], panels, strict=True):
        for i, (name, (xs, ys)) in enumerate(sorted(group.items())):
            color = f"C{i % 10}"
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
            win = max(1, min(50, len(ys) // 10))  # always <= len(ys)
            ma = np.convolve(ys, np.ones(win) / win, mode="valid")
            ax.plot(xs[win - 1:], ma, color=color, linewidth=1.6, label=f"{name} (MA{win})")
        ax.set(title=title, ylabel="loss")
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path := Path(out_path), dpi=110)
    plt.close(fig)
    return out_path


class Profiler:
    """torch.profiler trace (+ CUDA memory snapshot) over training steps a..b inclusive.

    Use as `with Profiler(steps, run_dir, device, start_step=resume_step) as prof:` and call
    `prof.step(step)` at the end of each step: the profiler starts before step a (at the end of
    step a-1, or on entry when a == start_step + 1) and exports at the end of step b to
    `run_dir/profile/trace_steps_a-b[_rank{r}].json` (rank suffix only when world_size > 1).

    Only the `ranks` listed (`profile.ranks`) trace and, on CUDA, record a memory snapshot
    (`memory_snapshot_rank{r}.pickle`); every other rank's Profiler does nothing. FSDP ranks run
    the same step, so a few traces show it; 64 would slow every rank for the window and write 64
    large files to the run dir (often a bucket mount).
    """

    def __init__(self, steps: list[int] | tuple[int, ...] | None, run_dir: str | Path, device: torch.device | str,
                 *, start_step: int = 0, rank: int | None = None, world_size: int | None = None,
                 ranks: list[int] | tuple[int, ...] = (0,)):
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if dist_on else 1)
        self.device = torch.device(device)
        self.out_dir = Path(run_dir) / "profile"
        self.start_step, self.window = start_step, None
        self.trace_path: Path | None = None
        self.snapshot_path: Path | None = None
        self._prof: torch.profiler.profile | None = None
        if steps:
            steps = list(steps)
            if len(steps) != 2 or not all(isinstance(s, int) for s in steps):
                raise ValueError(f"profile.steps={steps}: expected [first, last] (inclusive step numbers)")
            a, b = steps
            if a < 1 or a > b:
                raise ValueError(f"profile.steps={steps}: need 1 <= first <= last")
            outside = sorted(r for r in ranks if not 0 <= r < self.world_size)
            if outside:  # checked on every rank, so a typo fails the whole run, not only the listed ranks
                raise ValueError(f"profile.ranks={list(ranks)}: rank(s) {outside} not in this world of "
                                 f"{self.world_size} (0..{self.world_size - 1}); list ranks that exist")
            if self.rank in ranks:
                self.window = (a, b)

    @property
    def active(self) -> bool:
        return self._prof is not None

    def __enter__(self) -> Profiler:
        self._maybe_start(self.start_step + 1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:  # loop ended inside the window: keep what was recorded
            self._stop()

    def step(self, step: int) -> None:
        """Call at the end of training step `step`."""
        if self.window is None:
            return
        if self._prof is not None and step >= self.window[1]:
            self._stop()
        else:
            self._maybe_start(step + 1)

    def _maybe_start(self, next_step: int) -> None:
        if self.window is None or self._prof is not None or next_step != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
        self._prof.__enter__()

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        assert prof is not None and self.window is not None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        a, b = self.window
        suffix = f"_rank{self.rank}" if self.world_size > 1 else ""
        self.trace_path = self.out_dir / f"trace_steps_{a}-{b}{suffix}.json"
        prof.export_chrome_trace(str(self.trace_path))
        if self.device.type == "cuda":
            self.snapshot_path = self.out_dir / f"memory_snapshot_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.window = None  # one window per run
