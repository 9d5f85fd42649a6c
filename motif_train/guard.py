"""Divergence guard: the checks that keep a diverged run from writing a checkpoint it would later
resume from, and the message that tells the user where to go back to.

Two rules (the trainer applies them on every save path: periodic, signal, end of run):

- no save while the run is inside a skip streak (the last step was non-finite): the weights that
  produced the streak are suspect even though skipped steps leave them unchanged; the periodic
  save is deferred to the next good step;
- no save when the weights about to be written are non-finite, or their largest magnitude exceeds
  `checkpoint.max_abs_weight`: one all-reduce of every rank's local-shard max, at save time only.

Collective where noted; never imports the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist


class DivergedError(RuntimeError):
    """The run stopped because it diverged; the message names the last good checkpoint."""


def weight_stats(tensors: Iterable[torch.Tensor], device: torch.device) -> tuple[float, bool]:
    """(largest finite |w|, all finite) over every rank's local shards of `tensors`.

    Collective: one all-reduce (MAX) of two numbers. NaN never goes on the wire (MAX of NaN is
    backend-defined): a rank with a non-finite value sends its flag and a 0 magnitude instead.
    """
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    with torch.no_grad():
        maxes = [t.detach().abs().amax().float() for t in local if t.numel()]  # NaN propagates through amax
        top = torch.stack(maxes).amax() if maxes else torch.zeros((), device=device)
        finite = torch.isfinite(top)
        vec = torch.stack([torch.where(finite, top, torch.zeros_like(top)), (~finite).float()]).to(device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    biggest, bad = vec.tolist()
    return biggest, bad == 0


def weights_problem(biggest: float, finite: bool, limit: float) -> str | None:
    """Why these weights must not be saved, or None when they may."""
    if not finite:
        return "the weights are not finite (NaN / inf in the model or EMA)"
    if limit > 0 and biggest > limit:
        return (f"the weights exploded: max |w| = {biggest:.3g} > checkpoint.max_abs_weight={limit:g} "
                "(0 disables this check)")
    return None


def resume_hint(last_good: Path | None, *, lr_key: str, lr: float) -> str:
    """What to do after a divergence: which checkpoint to go back to, and how."""
    lower = f"{lr_key}={lr / 10:.3g}"
    if last_good is None:
        return (f"No complete checkpoint exists yet: relaunch from scratch with a lower LR (e.g. {lower}), "
                "in a fresh run_dir or with checkpoint.resume=none")
    return (f"The last good checkpoint is {last_good}: relaunch with a lower LR (e.g. {lower}); "
            f"checkpoint.resume=auto resumes from it (no later checkpoint was written), or name it with "
            f"checkpoint.resume={last_good}")
