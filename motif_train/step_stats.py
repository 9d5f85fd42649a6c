"""What a training step reports, without device->host syncs inside it.

The step's host reads and collectives (the budget docs/training.md#host-syncs states and
tests/unit/test_host_syncs.py counts):

* every step: ONE all-reduce of a few float64 numbers (`control_reduce`) and ONE read of it:
  the NaN-guard flag (the optimizer step must be decided on the host before it is taken), the
  stop signal, the data's skip counts, and the step's samples / tokens / FLOPs (known on the
  host, summed over ranks here so the train state is current at every step);
* at a log step (and before a checkpoint, a stop or a divergence report): ONE more all-reduce
  of every pending step's loss terms and σ-bucket sums stacked into one tensor, and ONE read
  of it together with the grad norms (`StepLog.flush`);
* only when it happens: the grad norm of a skipped step (for its event), a gather of the skip
  messages when the control reduce counted one.

Everything else of a step (loss sums, σ buckets, grad norm) stays on the device until the
flush. `StepClock` times steps with CUDA events, so no synchronize is needed either.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from motif_train.batch import Batch
from motif_train.data.plan import bucket_batch_size
from motif_train.models.config import MotifDiTConfig
from motif_train.models.flops import latent_shape, model_flops, num_video_tokens, teacher_forward_flops
from motif_train.objectives.objective import ObjectiveOutput

# Signals that stop the run at the end of a step; one slot each in the control vector, so a SUM
# all-reduce tells which arrived where. When ranks got different ones, the highest number wins.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Control:
    """The host's view of the step's control all-reduce: summed over ranks."""

    nonfinite: int  # ranks whose loss terms or grad norm were non-finite (0: take the step)
    stop_signal: int  # the signal every rank agrees to stop on, 0 for none
    skipped: int  # corrupt samples the data skipped this step
    skip_msgs: int  # their messages (gathered to rank 0 when > 0)
    samples: int  # real samples (padding micro-batches excluded)
    tokens: int  # their video tokens
    flops: float  # model FLOPs that ran (padding micro-batches included)
    teacher_flops: float  # REPA teacher forward FLOPs


def control_reduce(nonfinite: torch.Tensor, *, stop_signal: int, skipped: int, skip_msgs: int, samples: int,
                   tokens: int, flops: float, teacher_flops: float) -> Control:
    """The step's one per-step collective: a SUM all-reduce of (2 + len(STOP_SIGNALS) + 5,)
    float64 on `nonfinite`'s device, read back once. `nonfinite`: 0-d bool computed on the
    device (this rank's loss terms or the grad norm not finite). Counts are exact in float64
    up to 2**53; FLOPs are float sums."""
    host = [float(stop_signal == s) for s in STOP_SIGNALS] + [skipped, skip_msgs, samples, tokens, flops,
                                                               teacher_flops]
    # non_blocking: the host->device copy does not wait for the queued backward
    tail = torch.tensor(host, dtype=torch.float64).to(nonfinite.device, non_blocking=True)
    vec = torch.cat([nonfinite.to(torch.float64).reshape(1), tail])
    dist.all_reduce(vec)
    v = vec.tolist()  # the step's one host read: every value above, summed over ranks
    k = 1 + len(STOP_SIGNALS)
    agreed = max((int(s) for s, n in zip(STOP_SIGNALS, v[1:k], strict=True) if n > 0), default=0)
    nskip, nmsg, ns, nt, fl, tf = v[k:]
    return Control(nonfinite=int(v[0]), stop_signal=agreed, skipped=int(nskip), skip_msgs=int(nmsg),
                   samples=int(ns), tokens=int(nt), flops=fl, teacher_flops=tf)


def micro_flops(config: MotifDiTConfig, batch: Batch, fed: ObjectiveOutput,
                teacher_config: Any | None = None) -> tuple[float, float]:
    """(model FLOPs fwd+bwd, teacher forward FLOPs) of one micro-batch as it ran, from shapes only.

    The model is counted with what the objective fed it (`fed`): the text width, the SigLIP
    tokens (0 for a T2V micro-batch even when the batch carries image embeds), the route of
    the current stage, and the REPA head only when it ran. The teacher (a `VJEPA2Config` in
    `teacher_config`) only when REPA ran; it is not model work and is reported apart."""
    lat = tuple(batch.latents.shape[2:])
    model = model_flops(config, lat, text_len=fed.text_tokens, image_len=fed.image_tokens, routing=config.routing,
                        repa=fed.repa).total * len(batch)
    teacher = 0.0
    if fed.repa and teacher_config is not None and batch.teacher_pixels is not None:
        _, _, frames, size, _ = batch.teacher_pixels.shape  # (B, 3, T, S, S)
        teacher = teacher_forward_flops(teacher_config, frames, size) * len(batch)
    return model, teacher


def stage_step_flops(config: MotifDiTConfig, stage: Any, *, dp_size: int, planned: bool, text_len: int,
                     repa: bool) -> float:
    """Predicted model FLOPs (fwd + bwd, all ranks) of one optimizer step of curriculum `stage`
    (a `StageConfig`), from its config alone, host arithmetic: the mean over its buckets (equal
    weights: the plan's bucket mix is not known here) of samples per step x one T2V sample's
    `model_flops` under the stage's route (+ the REPA head when `repa`). Samples per step: the
    stage's `global_batch` (synthetic data), or with shard data (`planned`) dp_size x the
    planner's per-rank batch of the bucket (`data.plan.bucket_batch_size`: token budget,
    attention-aware). The ETA's relative cost of a stage not run yet (`metrics.Progress`); not in
    it: the SigLIP tokens of I2V steps, the REPA teacher, text padding per step, short last steps."""
    route = stage.routing if stage.routing is not None and stage.routing.enabled else None
    lats = [latent_shape(*b) for b in stage.buckets]
    toks = [num_video_tokens(config, lat) for lat in lats]
    per_step = []
    for lat, n in zip(lats, toks, strict=True):
        if planned and stage.token_budget:
            samples = dp_size * bucket_batch_size(n, stage.token_budget, attention_aware=stage.attention_aware,
                                                  ref_tokens=max(toks), base_tokens=min(toks))
        else:
            samples = stage.global_batch
        per_step.append(samples * model_flops(config, lat, text_len=text_len, routing=route, repa=repa).total)
    return sum(per_step) / len(per_step)


def batch_video_tokens(config: MotifDiTConfig, batch: Batch) -> int:
    return num_video_tokens(config, tuple(batch.latents.shape[2:])) * len(batch)


class StepClock:
    """Step wall time without a host sync.

    CUDA: a timing event recorded on the current stream at the step's start and end, read at
    the next flush (whose read has waited for both). The interval runs from the stream reaching
    the start mark to it finishing the step's last kernel (optimizer and EMA included), with any
    idle wait for the host (data, Python) inside it; bookkeeping between steps is outside.
    CPU: `perf_counter` (the ops ran synchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(start: Any, end: Any) -> float:
        if isinstance(start, float):
            return end - start
        if not end.query():  # not expected after the flush's read; never a wrong number
            end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass
class _Pending:
    step: int
    keys: list[str]
    values: torch.Tensor  # (len(keys),) float64 on the device, this rank's sums
    grad_norm: torch.Tensor  # 0-d, already global (the same on every rank)
    clock: tuple[Any, Any]
    host: dict[str, Any] = field(default_factory=dict)


class StepLog:
    """The steps since the last flush, their loss terms kept on the device.

    `add` per step (no sync); `flush` reduces them all with ONE all-reduce of the concatenated
    values and ONE read (values + grad norms), and returns one record per step in step order.
    Every rank adds the same keys at the same steps (the task, REPA and the σ buckets are
    decided alike everywhere), so the concatenations line up. Collective: call `flush` at the
    same steps on every rank; with nothing pending it is a no-op everywhere."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._pending: list[_Pending] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: int, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor, clock: tuple[Any, Any],
            **host: Any) -> None:
        """`sums`: this rank's per-term sums (loss terms sample-weighted, σ-bucket `_sum` /
        `_count`); per-rank σ-bucket means are dropped (the global mean comes from sums / counts).
        `host`: the step's host values (stage, lr, data_wait, counts, ...), logged as they are."""
        keys = sorted(k for k in sums if not (k.startswith("sigma_q") and not k.endswith(("_sum", "_count"))))
        values = torch.stack([sums[k].detach().to(torch.float64) for k in keys])
        self._pending.append(_Pending(step, keys, values, grad_norm.detach(), clock, host))

    def flush(self) -> list[dict[str, Any]]:
        """Per pending step: {"step", "losses" (means over ranks), "sigma" (global σ-bucket
        means, NaN for an empty bucket), "grad_norm", "step_time", **host}."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        flat = torch.cat([p.values for p in pending])
        dist.all_reduce(flat)
        norms = torch.stack([p.grad_norm.to(torch.float64) for p in pending])
        vals = torch.cat([flat, norms]).tolist()  # the flush's one host read
        out, i = [], 0
        for j, p in enumerate(pending):
            got = dict(zip(p.keys, vals[i:i + len(p.keys)], strict=True))
            i += len(p.keys)
            losses = {k: v / self.world_size for k, v in got.items() if not k.startswith("sigma_q")}
            sigma = {}
            for k, v in got.items():
                if k.startswith("sigma_q") and k.endswith("_count"):
                    b = k[: -len("_count")]
                    sigma[b] = got[f"{b}_sum"] / v if v else float("nan")
            out.append({"step": p.step, "losses": losses, "sigma": sigma, "grad_norm": vals[len(flat) + j],
                        "step_time": StepClock.seconds(*p.clock), **p.host})
        return out
