"""Time and money of a run from the FLOP model: the predicted step time the dry run reports and
the trainer logs beside the measured one (`perf/predicted_step_s`), so the prediction's error is
a number a user sees; per stage its wall-clock, and per run GPU-hours, checkpoints and cost.

The speed is one measured figure, not a guess: a real 2B training step (81x480x832, TREAD 2..23
r=0.5, AC full, compile, AdamW + EMA, bf16 + fp32 reduce, FSDP2 on one H200) ran at MFU 36.4 %,
docs/bench/train_gpu.json row "TREAD 2..23 r=0.5" (docs/benchmarks.md); a constant because the
wheel ships no docs, and tests/unit/test_dryrun.py holds it equal to that file. That step also
executed 1.293x its counted FLOPs (full AC re-runs every block's forward, docs/bench/ac_cpu.json).
The model: every step executes its counted FLOPs x its AC mode's recompute factor at that run's
executed rate, and Ulysses CP adds its all-to-alls at the NVLink rate, not overlapped with compute.
What it leaves out: data loading, validation, checkpoint stalls, kernel-efficiency differences
between resolutions and attention backends (the GPU check measures those).
"""

from __future__ import annotations

from motif_train.metrics import DEVICE_PEAK_TFLOPS

MEASURED_MFU = 0.364
MFU_SOURCE = "docs/bench/train_gpu.json 'TREAD 2..23 r=0.5' (2B, 81x480x832, AC=full, compile, 1 H200)"
DEFAULT_DEVICE = "H200"  # the recipe's GPU; the dry run predicts for it
# Executed / counted FLOPs per `parallel.ac` mode, FlopCounterMode on the 2B model (docs/bench/ac_cpu.json),
# at (video tokens of the clip): 480p x 81 (32,760) and 720p x 121 (114,080). The nearer clip's figure is used.
AC_RECOMPUTE = {32760: {"none": 1.0, "selective": 1.054, "full": 1.293},
                114080: {"none": 1.0, "selective": 1.017, "full": 1.288}}
MEASURED_RECOMPUTE = AC_RECOMPUTE[32760]["full"]  # what the MFU run executed
# NVLink 4 on an H200 node: 900 GB/s per GPU both ways, 450 GB/s each way (spec; a CP group stays inside a node).
NVLINK_BYTES_PER_S = 450e9
AC_ORDER = ("none", "every_k", "selective", "full")  # least to most recompute (and least to most memory saved)


def recompute_factor(ac: str, video_tokens: int, every: int = 2) -> float:
    """Executed / counted FLOPs of a step in `parallel.ac` mode `ac` for a clip of `video_tokens`.
    `every_k` re-runs 1 block in `every`: full's extra work / every (an estimate, not measured)."""
    row = AC_RECOMPUTE[min(AC_RECOMPUTE, key=lambda n: abs(n - video_tokens))]
    if ac == "every_k":
        return 1.0 + (row["full"] - 1.0) / max(1, every)
    return row[ac]


def predicted_step_s(flops_per_rank: float, *, peak_tflops: float | None = None, mfu: float = MEASURED_MFU,
                     recompute: float = MEASURED_RECOMPUTE, comm_bytes: float = 0.0) -> float:
    """Seconds of one optimizer step whose counted model FLOPs on one rank are `flops_per_rank`.

    At `mfu` of `peak_tflops` (default the H200's dense bf16 peak) for a step that executes `recompute` x
    its counted FLOPs (default: as the MFU run did, AC full), plus `comm_bytes` the rank's CP
    collectives move off-rank at `NVLINK_BYTES_PER_S`."""
    peak = DEVICE_PEAK_TFLOPS[DEFAULT_DEVICE] if peak_tflops is None else peak_tflops
    compute = flops_per_rank * recompute / MEASURED_RECOMPUTE / (peak * 1e12 * mfu)
    return compute + comm_bytes / NVLINK_BYTES_PER_S


def checkpoint_bytes(params: int, trainable: int, *, ema: bool) -> int:
    """One DCP checkpoint, all ranks' shards together: fp32 parameters, AdamW's two fp32 moments and the
    fp32 EMA of the trainable ones (the train state and loader state are kilobytes)."""
    return 4 * params + 4 * trainable * (2 + (1 if ema else 0))


def checkpoint_count(total_steps: int, every: int) -> int:
    """Saves a run writes: every `every` steps and the final one (`checkpoint.every=0`: only the final)."""
    if every <= 0:
        return 1
    return total_steps // every + (1 if total_steps % every else 0)


def run_totals(stage_seconds: list[float], *, world: int, total_steps: int, every: int, keep_last: int,
               ckpt_bytes: int, usd_per_gpu_hour: float | None) -> dict:
    """The whole run: wall-clock, GPU-hours, checkpoint count, the storage the kept ones need, cost."""
    wall = float(sum(stage_seconds))
    n = checkpoint_count(total_steps, every)
    kept = n if keep_last <= 0 else min(n, keep_last)
    gpu_h = wall * world / 3600
    return {"wall_s": wall, "gpu_hours": gpu_h, "checkpoints": n, "checkpoints_kept": kept,
            "checkpoint_gib": ckpt_bytes / 2**30, "storage_gib": kept * ckpt_bytes / 2**30,
            "usd_per_gpu_hour": usd_per_gpu_hour,
            "usd": None if usd_per_gpu_hour is None else gpu_h * usd_per_gpu_hour}
