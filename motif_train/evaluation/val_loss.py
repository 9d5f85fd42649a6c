"""The held-out validation loss: the rectified-flow training loss on the held-out samples at a fixed σ grid.

For one curriculum stage, every held-out sample of its buckets (data/split.py, read through
:class:`~motif_train.data.heldout.HeldOutReader`) is noised at each σ of a fixed grid and scored with the
objective's own denoising loss (objectives/objective.py: ``add_noise``, ``velocity_target``, the I2V condition
with its timestep blur, ``text_for_model``, ``model_input``, ``model_timestep``; the per-sample velocity MSE in
float32 of ``flow_loss``): what ``loss/denoise`` is on a one-sample micro-batch at that σ, without REPA and without
text dropout, with the model in eval mode (no TREAD routing, as validation sampling runs it).

* **σ grid**: ``sigmas`` values ``σ_j = shift(u_j)``, ``u_j = (j + 0.5) / sigmas`` (equal-width bins of the
  unshifted σ, each at its midpoint, mapped through the stage's ``shift`` exactly as training σ is,
  ``flow.shift_sigma``; the stage's ``shift``, else the run's ``objective.flow.shift``).
* **noise**: per (sample key, σ index) from a CPU ``torch.Generator`` seeded with a SHA-256 of
  ``"<key>:<j>"`` (never Python's salted ``hash``), so a sample's noise does not depend on the rank, the batch
  or the device.
* **tasks**: T2V for every sample; I2V too where the bucket has frames to condition on (F > 1) and every
  sample of the bucket carries SigLIP tokens (the same decision on every rank).
* **distribution**: bucket b's held-out ids (ascending) are dealt to ranks by index (id i -> rank i mod world);
  every rank runs ``ceil(n_b / world)`` sample slots per bucket and task, the missing ones as dummy forwards
  of the bucket's first sample weighted 0, so FSDP's collectives match; per-sample losses are summed into
  (sum, count) per (bucket, σ, task) in float64 and reduced with ONE ``all_reduce`` (no all_gather). The result
  is therefore the same on 1 or N ranks up to fp32 forward noise, and bit-identical when run twice.

:func:`validation_loss` takes no trainer object: a `motif-eval` sidecar calls it with a loaded model (EMA or raw
weights already in place), a :class:`DiffusionObjective`, a reader, the stage and its rank / world size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from motif_train.batch import Batch
from motif_train.objectives.conditioning import build_i2v_condition, build_t2v_condition, model_input, timestep_blur
from motif_train.objectives.flow import add_noise, model_timestep, shift_sigma, velocity_target

TASKS = ("t2v", "i2v")


def noise_seed(key: str, j: int) -> int:
    """The generator seed of (sample key, σ index j): 63 bits of SHA-256("<key>:<j>")."""
    return int.from_bytes(hashlib.sha256(f"{key}:{int(j)}".encode()).digest()[:8], "little") & (2**63 - 1)


def sigma_grid(n: int, shift: float) -> torch.Tensor:
    """(n,) float32: ``shift_sigma((j + 0.5) / n, shift)``, j = 0..n-1 (module doc)."""
    if int(n) < 1:
        raise ValueError(f"eval.loss_sigmas={n} must be >= 1")
    u = (torch.arange(int(n), dtype=torch.float32) + 0.5) / int(n)
    return shift_sigma(u, float(shift))


def bucket_name(b) -> str:
    return b if isinstance(b, str) else "x".join(str(int(v)) for v in b)


@dataclass
class ValLossResult:
    """sums / counts: (buckets, sigmas, tasks) float64, reduced over ranks; ``mean`` per cell (NaN where empty),
    ``stage_loss``: all per-sample losses of the stage (both tasks, every σ) averaged."""

    stage: str
    buckets: list[str]
    sigmas: list[float]
    sums: torch.Tensor
    counts: torch.Tensor
    tasks: tuple[str, ...] = TASKS
    forwards: int = 0  # model forwards this rank ran (dummies included)
    samples: dict[str, int] = field(default_factory=dict)  # held-out samples per bucket

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), torch.full_like(self.sums, math.nan))

    @property
    def stage_loss(self) -> float:
        n = float(self.counts.sum())
        return float(self.sums.sum()) / n if n else math.nan

    def task_loss(self, task: str) -> float:
        t = self.tasks.index(task)
        n = float(self.counts[..., t].sum())
        return float(self.sums[..., t].sum()) / n if n else math.nan

    def metrics(self, prefix: str = "val_loss") -> dict[str, float]:
        """Flat W&B / metrics.jsonl values (metric_keys.val_loss_key): ``<prefix>/<stage>``,
        ``<prefix>/<stage>/<task>``, ``<prefix>/<stage>/<bucket>/<task>/s<j>`` (empty cells left out)."""
        from motif_train import metric_keys as mk

        out: dict[str, float] = {}
        if float(self.counts.sum()) == 0:
            return out
        out[mk.val_loss_key(self.stage, prefix=prefix)] = self.stage_loss
        mean = self.mean
        for t, task in enumerate(self.tasks):
            if float(self.counts[..., t].sum()) == 0:
                continue
            out[mk.val_loss_key(self.stage, task=task, prefix=prefix)] = self.task_loss(task)
            for i, b in enumerate(self.buckets):
                for j in range(len(self.sigmas)):
                    if float(self.counts[i, j, t]) > 0:
                        out[mk.val_loss_key(self.stage, bucket=b, task=task, sigma=j, prefix=prefix)] = \
                            float(mean[i, j, t])
        return out


def _repeat(batch: Batch, n: int) -> Batch:
    """A one-sample batch as n rows (the σ grid of one sample in one forward)."""
    def rep(x):
        return None if x is None else x.expand(n, *x.shape[1:]).contiguous()

    return dataclasses.replace(batch, latents=rep(batch.latents), text=rep(batch.text), text_mask=rep(batch.text_mask),
                               image_embeds=rep(batch.image_embeds), teacher_pixels=None,
                               keys=tuple(batch.keys) * n, text_lengths=tuple(batch.text_lengths) * n)


def sample_losses(model, objective, batch: Batch, sigmas: torch.Tensor, task: str, *, key: str,
                  sigma_index: list[int] | None = None) -> torch.Tensor:
    """(len(sigmas),) float32 on the model's device: the objective's denoising loss of ONE sample (``batch`` has
    one row) at each σ, the noise of σ index j drawn from ``noise_seed(key, j)`` (module doc)."""
    c = objective.config
    device = batch.latents.device
    n = int(sigmas.numel())
    idx = list(range(n)) if sigma_index is None else list(sigma_index)
    rows = _repeat(batch, n)
    x0 = rows.latents.float()  # (n, 16, F, H, W)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(noise_seed(key, j)),
                                     dtype=torch.float32) for j in idx]).to(device=device, dtype=x0.dtype)
    sigma = sigmas.to(device=device, dtype=torch.float32)
    x_t = add_noise(x0, noise, sigma)
    target = velocity_target(x0, noise)
    if task == "i2v":
        cond, cmask = build_i2v_condition(x0)
        cond[:, :, 0] = timestep_blur(cond[:, :, 0], sigma, c.conditioning)
        image_embeds = rows.image_embeds
    else:
        cond, cmask = build_t2v_condition(x0)
        image_embeds = None
    text, text_mask = objective.text_for_model(rows, [False] * n)  # no CFG text dropout
    inp = model_input(x_t, cond, cmask).to(rows.text.dtype)
    out = model(hidden_states=inp, timestep=model_timestep(sigma, c.flow), encoder_hidden_states=text,
                encoder_attention_mask=text_mask, image_embeds=image_embeds, return_repa=False)
    # flow_loss's definition: the float32 squared error's mean, per sample (its `denoise` at batch 1)
    return (out.sample.float() - target.float()).square().flatten(1).mean(dim=1)


@torch.no_grad()
def validation_loss(model, objective, reader, stage, *, rank: int = 0, world_size: int = 1, group=None,
                    sigmas: int = 8, device: torch.device | str | None = None, token_budget: int | None = None,
                    dtype: torch.dtype | None = None) -> ValLossResult:
    """The stage's held-out validation loss (module doc); collective when ``world_size > 1`` (every rank calls it).

    model: the DiT with the weights to score in place (EMA swapped in by the caller), eval mode set here and
    restored. objective: the run's ``DiffusionObjective``. reader: ``bucket_ids(b)``, ``key(gid)``, ``read(gid)`` ->
    one-sample Batch, ``has_image(b)``, ``buckets`` (the manifest's bucket table, ``tokens``). stage: a
    ``StageConfig`` (``name``, ``buckets``, ``shift``, ``token_budget``). token_budget: the most video tokens in one
    forward (default the stage's): a sample's σ grid is cut into forwards of ``max(1, budget // tokens)`` rows.
    dtype: cast of the batch's floating tensors (the trainer's param dtype), default as read.
    """
    names = [bucket_name(b) for b in stage.buckets]
    shift = stage.shift if getattr(stage, "shift", None) is not None else objective.config.flow.shift
    grid = sigma_grid(sigmas, shift)
    budget = token_budget if token_budget is not None else getattr(stage, "token_budget", None)
    if device is None:
        device = next(model.parameters()).device
    sums = torch.zeros(len(names), len(grid), len(TASKS), dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    forwards = 0
    samples = {}
    was_training = model.training
    model.eval()
    try:
        for i, b in enumerate(names):
            ids = reader.bucket_ids(b)
            samples[b] = int(ids.size)
            if not ids.size:
                continue
            info = reader.buckets.get(b, {})
            frames = int(info.get("frames", b.split("x")[0]))
            tasks = [0] + ([1] if frames > 1 and reader.has_image(b) else [])
            tokens = int(info.get("tokens", 0)) or 1
            chunk = max(1, int(budget) // tokens) if budget else len(grid)
            slots = -(-int(ids.size) // int(world_size))
            for s in range(slots):
                pos = s * int(world_size) + int(rank)
                real = pos < ids.size
                gid = int(ids[pos] if real else ids[0])
                batch = reader.read(gid)
                if dtype is not None:
                    batch = _cast(batch, dtype)
                batch = batch.to(device) if hasattr(batch, "to") else batch
                key = reader.key(gid)
                for t in tasks:
                    for lo in range(0, len(grid), chunk):
                        j = list(range(lo, min(lo + chunk, len(grid))))
                        loss = sample_losses(model, objective, batch, grid[j], TASKS[t], key=key, sigma_index=j)
                        forwards += 1
                        if real:
                            sums[i, j[0]:j[-1] + 1, t] += loss.double()
                            counts[i, j[0]:j[-1] + 1, t] += 1.0
    finally:
        model.train(was_training)
    if int(world_size) > 1:
        both = torch.stack([sums, counts])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        sums, counts = both[0], both[1]
    return ValLossResult(stage=str(stage.name), buckets=names, sigmas=[float(x) for x in grid], sums=sums.cpu(),
                         counts=counts.cpu(), forwards=forwards, samples=samples)


def _cast(batch: Batch, dtype: torch.dtype) -> Batch:
    def c(x):
        return None if x is None else x.to(dtype)

    return dataclasses.replace(batch, latents=c(batch.latents), text=c(batch.text), image_embeds=c(batch.image_embeds))
