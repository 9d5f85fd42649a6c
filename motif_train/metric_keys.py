"""The one list of metric keys: what the trainer logs to W&B (through `MetricsLogger`) and what the
dashboard (`motif_train.cli.wandb_workspace`) plots.

`metrics.py` takes its key strings from here, the workspace builds its panels from here, and
tests/unit/test_wandb_workspace.py checks both directions: every panel key is a key listed here
that a real (offline) run logs, and every key a run logs is covered here (`covers`).

Two name spaces:

* the RAW names of a step record in `metrics.jsonl` (`RAW_KEYS`, `loss/<term>`, the σ buckets as
  `sigma_q<i>`, the trainer's extras as passed);
* the W&B WINDOW names `MetricsLogger.flush` logs once per `logger.log_every` steps (means of the
  losses, rates, MFU, peak memory, the last LR / stage), `window_key` mapping an extra's raw name;
  the keys the logger derives itself (`DERIVED_KEYS`: progress / ETA, predicted step time) carry the
  same name in a step record and in a window;
  events (`log_event`) add `event/<value>` or a slashed value name as is; validation videos are
  `val/<request name>`; the held-out validation loss `val_loss/<stage>/...` (`val_loss_key`).

Families (a key built from a name known only at run time) have a concrete builder and a regex in
`FAMILIES`. This module imports nothing from the package (metrics.py and the trainer import it).
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- raw step record (metrics.jsonl)
STEP = "step"
STAGE = "stage"
GRAD_NORM = "grad_norm"
LR = "lr"
SAMPLES = "samples"
TOKENS = "tokens"
FLOPS = "flops"
TEACHER_FLOPS = "teacher_flops"
STEP_TIME = "step_time"
DATA_WAIT = "data_wait"
# the record's own fields: reduced into the window's rates / last values, not logged as `train/<k>`
RAW_KEYS = frozenset({STEP, STAGE, GRAD_NORM, LR, SAMPLES, TOKENS, FLOPS, TEACHER_FLOPS, STEP_TIME, DATA_WAIT})

# ---------------------------------------------------------------- prefixes
LOSS_PREFIX = "loss/"  # loss/<term>: the objective's terms, the weighted total, the σ buckets
SIGMA_PREFIX = "sigma_q"  # a σ bucket's raw name (`sigma_q1`..): logged as loss/sigma_q<i>
TRAIN_PREFIX = "train/"  # a slash-less extra `k` is logged as train/<k>
EVENT_PREFIX = "event/"  # a slash-less numeric log_event value `k` is logged as event/<k>
VIDEO_PREFIX = "val/"  # validation videos: val/<request name>

# ---------------------------------------------------------------- losses (window: means)
LOSS_TOTAL = "loss/total"
LOSS_DENOISE = "loss/denoise"
LOSS_REPA = "loss/repa"
LOSS_TERMS = (LOSS_DENOISE, LOSS_REPA)  # the objective's terms (objectives/objective.py: denoise, repa)
NUM_SIGMA_BUCKETS = 4  # FlowConfig.num_sigma_buckets' default: σ quartiles


def loss_key(term: str) -> str:
    """loss/<term> for an objective term (or "total")."""
    return f"{LOSS_PREFIX}{term}"


def sigma_name(i: int) -> str:
    """The raw name of σ bucket i (1-based), as objectives/flow.py and StepLog produce it."""
    return f"{SIGMA_PREFIX}{i}"


def sigma_keys(n: int = NUM_SIGMA_BUCKETS) -> list[str]:
    """The window keys of the n σ buckets: loss/sigma_q1 .. loss/sigma_q<n>."""
    return [loss_key(sigma_name(i)) for i in range(1, n + 1)]


# ---------------------------------------------------------------- throughput, memory, schedule (window)
PERF_SAMPLES_PER_S = "perf/samples_per_s"
PERF_TOKENS_PER_S = "perf/tokens_per_s"
PERF_FLOPS_PER_S = "perf/flops_per_s"  # model FLOPs (fwd + bwd) / s, all ranks
PERF_MFU = "perf/mfu"  # absent where the device's peak is unknown (CPU without logger.peak_tflops)
PERF_TEACHER_FLOPS_SHARE = "perf/teacher_flops_share"
PERF_DATA_WAIT = "perf/data_wait"  # fraction of the window's step time spent waiting for data
PERF_STEP_TIME = "perf/step_time"  # mean seconds per step
# the FLOP model's seconds per step (distributed/cost.predicted_step_s: model FLOPs per rank / (peak x the
# measured MFU), motif-dryrun's figure); absent, like MFU, where the device's peak is unknown
PERF_PREDICTED_STEP_S = "perf/predicted_step_s"
PERF_STEP_TIME_REL_ERROR = "perf/step_time_rel_error"  # measured / predicted s/step - 1 (+0.1: 10 % slower)
MEM_PEAK_GIB = "mem/peak_gib"  # CUDA max allocated over the window (CPU: process max RSS)
SCHED_LR = "sched/lr"
OPTIM_GRAD_NORM = "optim/grad_norm"
CURRICULUM_STAGE = "curriculum/stage"  # the window's last stage; also a stage event's value

# ---------------------------------------------------------------- progress (a step record's and its window's)
# where the run is (the trainer's global step of train.steps; the step within its curriculum stage) and the
# ETA from the measured s/step (metrics.Progress); logged when the logger is given the run's ProgressPlan
PROGRESS_STEP_OF_RUN = "progress/step_of_run"  # the global step, 1..run_steps (continues across a resume)
PROGRESS_RUN_STEPS = "progress/run_steps"  # the run's total: train.steps or the sum of the stages' steps
PROGRESS_STAGE_STEP = "progress/stage_step"  # the step within its stage, 1..stage_steps (1 again at a new stage)
PROGRESS_STAGE_STEPS = "progress/stage_steps"  # the stage's steps in this run (the last stage runs on to the end)
PROGRESS_ETA_STAGE_S = "progress/eta_stage_s"  # seconds of step time left in the stage (0 at its last step)
PROGRESS_ETA_RUN_S = "progress/eta_run_s"  # seconds of step time left in the run (>= eta_stage_s, 0 at the end)
PROGRESS_KEYS = (PROGRESS_STEP_OF_RUN, PROGRESS_RUN_STEPS, PROGRESS_STAGE_STEP, PROGRESS_STAGE_STEPS,
                 PROGRESS_ETA_STAGE_S, PROGRESS_ETA_RUN_S)
PREDICTION_KEYS = (PERF_PREDICTED_STEP_S, PERF_STEP_TIME_REL_ERROR)
# what MetricsLogger adds to a step record itself (not passed to log_step): never averaged as an extra; a
# window logs its own value (progress: its last step's; prediction: the window's FLOPs and step time)
DERIVED_KEYS = frozenset({*PROGRESS_KEYS, *PREDICTION_KEYS})

PERF_KEYS = (PERF_SAMPLES_PER_S, PERF_TOKENS_PER_S, PERF_FLOPS_PER_S, PERF_MFU, PERF_TEACHER_FLOPS_SHARE,
             PERF_DATA_WAIT, PERF_STEP_TIME, *PREDICTION_KEYS)
# every key a window logs besides the losses and the extras, in the order flush() builds them
WINDOW_KEYS = (*PERF_KEYS, MEM_PEAK_GIB, SCHED_LR, OPTIM_GRAD_NORM, CURRICULUM_STAGE, *PROGRESS_KEYS)

# ---------------------------------------------------------------- the trainer's extras and events
TRAIN_SKIPPED_STEPS = "train/skipped_steps"  # non-finite steps skipped so far (a running count)
DATA_SKIPPED_SAMPLES = "data/skipped_samples"  # corrupt samples the data skipped so far, all ranks
TRAINER_EXTRA_KEYS = (TRAIN_SKIPPED_STEPS, DATA_SKIPPED_SAMPLES)  # log_step(extra=...), every step
CHECKPOINT_BLOCKING_S = "checkpoint/blocking_s"  # the "checkpoint" event: seconds the save held the loop
# the trainer's numeric log_event values without a slash (start, stage, skipped step, skip streak, data
# message): logged as event/<k>
TRAINER_EVENT_VALUES = ("world_size", "total_steps", "ac_blocks", "compile", "cp", "repa", "shift", "grad_norm",
                        "skipped", "bad_in_a_row", "rank")
# their other log_event values: text, lists, tuples (events.jsonl only: log_event sends numbers to W&B)
TRAINER_EVENT_TEXT = ("resumed_from", "notes", "routing", "weights", "traceback", "ac", "param_dtype", "reduce_dtype",
                      "mesh", "compile_backend")

# ---------------------------------------------------------------- validation videos
T2V_NAME = "t2v_{i:02d}"  # sampling.build_requests' request names: t2v_00, t2v_01, ... then i2v_00
I2V_NAME = "i2v_00"


def video_key(name: str) -> str:
    """The W&B key of a validation video of request `name` (trainer.validate)."""
    return f"{VIDEO_PREFIX}{name}"


def video_keys(num_prompts: int, i2v: bool = True) -> list[str]:
    """The keys of a run's validation videos: one per `eval.prompts` entry, + the I2V one with `eval.i2v_frame`."""
    names = [T2V_NAME.format(i=i) for i in range(num_prompts)] + ([I2V_NAME] if i2v else [])
    return [video_key(n) for n in names]


# ---------------------------------------------------------------- held-out validation loss (evaluation/val_loss.py)
# logged by the trainer's "validation loss" event every eval.loss_every steps (values with a slash: as is)
VAL_LOSS_PREFIX = "val_loss/"  # the EMA weights' (or the raw weights' without EMA)
VAL_LOSS_RAW_PREFIX = "val_loss_raw/"  # the raw weights' beside the EMA's (eval.loss_raw)
VAL_LOSS_SECONDS = "eval/val_loss_s"  # wall-clock seconds of the pass (all of its stages' forwards)
# motif-eval (cli/eval.py): the training step a line scores (its W&B x-axis), and the video metrics'
# values (evaluation/video_metrics.py) as eval/<metric>
EVAL_STEP = "eval/step"
EVAL_METRICS = ("clip_score", "clip_cosine", "temporal_consistency", "psnr_first_frame", "ssim_first_frame",
                "fd_vjepa")


def val_loss_key(stage: str, *, bucket: str | None = None, task: str | None = None, sigma: int | None = None,
                 prefix: str = "val_loss") -> str:
    """val_loss/<stage> (the stage's number), val_loss/<stage>/<task> (t2v | i2v), or
    val_loss/<stage>/<bucket>/<task>/s<j> (one bucket at σ index j of the grid, 0-based); prefix val_loss_raw
    for the raw weights."""
    key = f"{prefix}/{stage}"
    if bucket is not None:
        if task is None or sigma is None:
            raise ValueError("val_loss_key: a bucket key needs task and sigma")
        return f"{key}/{bucket}/{task}/s{int(sigma)}"
    return key if task is None else f"{key}/{task}"


# ---------------------------------------------------------------- raw -> W&B name mapping (used by metrics.py)
def window_key(raw: str) -> str:
    """The window name of a raw extra: sigma_q<i> -> loss/sigma_q<i>; a slashed name as is; else train/<k>."""
    if raw.startswith(SIGMA_PREFIX):
        return loss_key(raw)
    return raw if "/" in raw else f"{TRAIN_PREFIX}{raw}"


def event_key(name: str) -> str:
    """The W&B name of a numeric log_event value: a slashed name as is, else event/<name>."""
    return name if "/" in name else f"{EVENT_PREFIX}{name}"


# ---------------------------------------------------------------- the list, and what it covers
# every concrete W&B key the trainer logs (σ buckets at the default count; videos are a family)
LOGGED_KEYS: frozenset[str] = frozenset({
    LOSS_TOTAL, *LOSS_TERMS, *sigma_keys(), *WINDOW_KEYS, *TRAINER_EXTRA_KEYS, CHECKPOINT_BLOCKING_S,
    *(event_key(k) for k in TRAINER_EVENT_VALUES),
})

# families of keys whose last part is known only at run time: name -> full-match regex
FAMILIES: dict[str, str] = {
    "sigma": r"loss/sigma_q[1-9][0-9]*",  # loss/sigma_q<i>, i = 1..objective.flow.num_sigma_buckets
    "video": r"val/(t2v_[0-9]{2,}|i2v_00)",  # val/<request name>
    # val_loss[_raw]/<stage>[/<task> | /<bucket FxHxW>/<task>/s<j>]
    "val_loss": r"val_loss(_raw)?/[^/]+(/(t2v|i2v)|/[0-9]+x[0-9]+x[0-9]+/(t2v|i2v)/s[0-9]+)?",
    "val_loss_seconds": r"eval/val_loss_s",  # only on data with held-out samples (not a synthetic run)
    # motif-eval's lines (a sidecar run, not the trainer): the step axis and the video metrics
    "eval": r"eval/(step|fd_samples_generated|fd_samples_reference|" + "|".join(EVAL_METRICS) + ")",
}


def family_of(key: str) -> str | None:
    """The family a key belongs to, or None."""
    return next((name for name, rx in FAMILIES.items() if re.fullmatch(rx, key)), None)


def covers(key: str) -> bool:
    """Is `key` a W&B key this list knows (a listed key or a member of a family)?"""
    return key in LOGGED_KEYS or family_of(key) is not None
