"""The shard loader: follows the offline plan, reads samples by index from bucket-grouped tars.

    plan (per stage, per epoch) ─► step s: bucket + this rank's sample ids
        ─► DataLoader workers (worker w prepares steps s ≡ w mod W, in order) ─► indexed tar reads
        ─► decode (.npy, allow_pickle=False) ─► collate ─► grad_accum micro-batches of `Batch`

Random access: each tar is indexed once per worker (member name -> byte offset, via the stdlib
`tarfile` headers; webdataset 1.0's `wids` is not shipped any more), then a sample is a few
`seek`+`read`s. The position is (stage, epoch, step-in-epoch, world-size segments), so a resumed
run — on any number of ranks — continues with exactly the next batch of the plan.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import Batch
from .curriculum import StageConfig
from .plan import Plan, build_plan, replan
from .shards import CorruptSample, bucket_name, decode_sample, load_manifest, teacher_from_uint8


@dataclass
class ShardDataConfig:
    _target_: str = "motif_train.data.loader.ShardSource"
    root: str = "data"
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool | None = None  # None: on with CUDA


class TarIndex:
    """member name -> (offset, size) of one tar; built from the headers once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with tarfile.open(path, "r:") as tf:
            self.members = {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}
        self._fh = None

    def read(self, name: str) -> bytes:
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the worker's lifetime
        off, size = self.members[name]
        self._fh.seek(off)
        return self._fh.read(size)

    def sample(self, key: str) -> dict[str, bytes]:
        prefix = key + "."
        return {n[len(prefix):]: self.read(n) for n in self.members if n.startswith(prefix)}


_READ_ERRORS = (CorruptSample, KeyError, OSError, ValueError, tarfile.TarError)


class _StepStream(IterableDataset):
    """Yields (step_in_epoch, micro-batches, messages, #skipped) for steps [start, end) of one plan."""

    def __init__(self, source: ShardSource, plan: Plan, offset: int, start: int) -> None:
        self.root, self.shards, self.locate = source.root, source.shard_paths, source.locate
        self.shard_bucket = source.shard_bucket
        self.rank, self.accum, self.teacher = source.dp_rank, source.grad_accum, source.want_teacher
        self.plan, self.offset, self.start = plan, offset, start

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        indexes: dict[int, TarIndex] = {}

        def read(gid: int) -> dict:
            shard, key = self.locate[gid]
            if shard not in indexes:
                indexes[shard] = TarIndex(self.root / self.shards[shard])
            return decode_sample(indexes[shard].sample(key))

        for s in range(self.start, self.offset + self.plan.num_steps):
            if (s - self.start) % nw != wid:
                continue
            step = self.plan.steps[s - self.offset]
            samples, skipped, notes = [], [], []
            for gid in step.samples[self.rank].tolist():
                try:
                    samples.append(read(gid))
                except _READ_ERRORS as e:
                    skipped.append(f"{self.locate[gid][1]}: {type(e).__name__}: {e}")
            if not samples:
                # Keep the rank in the step with a spare of the same bucket: one the plan left out this
                # epoch if any, else (logged as a repeat) another sample of the bucket.
                same = [g for g in range(len(self.locate)) if self.shard_bucket[self.locate[g][0]] == step.bucket]
                left_out = set(self.plan.dropped.tolist())
                spares = [g for g in same if g in left_out] + [g for g in same if g not in left_out]
                for gid in spares[self.rank:] + spares[:self.rank]:
                    if gid in step.samples[self.rank]:
                        continue
                    if gid not in left_out:
                        notes.append(f"{self.locate[gid][1]}: repeated as a spare for the corrupt sample(s)")
                    try:
                        samples.append(read(gid))
                        break
                    except _READ_ERRORS as e:
                        skipped.append(f"{self.locate[gid][1]}: {type(e).__name__}: {e}")
            yield s, collate_micro(samples, self.accum, self.teacher), skipped + notes, len(skipped)


def collate(samples: list[dict], teacher: bool) -> Batch:
    """Decoded samples of one bucket -> Batch (text padded to the longest, mask True on tokens)."""
    width = max(s["text"].shape[0] for s in samples)
    dim = samples[0]["text"].shape[1]
    text = torch.zeros(len(samples), width, dim)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["text"].shape[0]
        text[i, :n] = torch.from_numpy(s["text"].astype(np.float32))
        mask[i, :n] = True
    image = None
    if all("image" in s for s in samples):
        image = torch.from_numpy(np.stack([s["image"] for s in samples]).astype(np.float32))
    tpx = None
    if teacher:
        if not all("teacher" in s for s in samples):
            raise CorruptSample("a sample has no teacher pixels but REPA is on for this stage: re-run "
                                "motif-preprocess with the teacher enabled")
        tpx = torch.from_numpy(teacher_from_uint8(np.stack([s["teacher"] for s in samples])))
    latents = torch.from_numpy(np.stack([s["latents"] for s in samples]).astype(np.float32))
    return Batch(latents=latents, text=text, text_mask=mask, image_embeds=image, teacher_pixels=tpx,
                 keys=tuple(s["meta"]["key"] for s in samples))


def collate_micro(samples: list[dict], accum: int, teacher: bool) -> list[Batch]:
    """This rank's samples of one step split into <= accum micro-batches (sizes differ by <= 1)."""
    if not samples:
        return []
    parts = [p for p in np.array_split(np.arange(len(samples)), min(accum, len(samples))) if len(p)]
    return [collate([samples[i] for i in p], teacher) for p in parts]


class ShardSource:
    """Data source for the trainer (same interface as `SyntheticSource`)."""

    def __init__(self, *, root: str, num_workers: int = 2, prefetch_factor: int = 2, pin_memory: bool | None = None,
                 text_dim: int, image_dim: int | None, seed: int, dp_rank: int, dp_size: int, grad_accum: int) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)  # a missing shard fails here, at start-up
        self.shard_paths = [s["path"] for s in self.manifest["shards"]]
        self.locate = [(i, k) for i, s in enumerate(self.manifest["shards"]) for k in s["keys"]]
        self.shard_bucket = [s["bucket"] for s in self.manifest["shards"]]
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed, self.dp_rank, self.dp_size, self.grad_accum = seed, dp_rank, dp_size, grad_accum
        self.text_dim, self.image_dim = text_dim, image_dim
        self.stage: StageConfig | None = None
        self.want_teacher = False
        # position within the current stage
        self.stage_key: str | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.segments: list[list[int]] = [[0, dp_size]]
        self.skipped_total = 0
        self.last_skipped: list[str] = []
        self._iter = None
        self._plan: Plan | None = None
        self._offset = 0

    # ---- interface ---------------------------------------------------------------------
    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The empty-prompt embedding written by preprocessing (L0, C) and its all-True mask."""
        name = self.manifest.get("empty_prompt")
        if not name or not (self.root / name).exists():
            return None
        e = torch.from_numpy(np.load(self.root / name, allow_pickle=False).astype(np.float32))
        return e, torch.ones(e.shape[0], dtype=torch.bool)

    def set_stage(self, stage: StageConfig, *, teacher: bool) -> None:
        if stage.token_budget is None:
            raise ValueError(f"curriculum stage {stage.name!r}: token_budget is required with shard data "
                             "(video tokens per rank per step)")
        key = json.dumps([stage.name, stage.buckets, stage.token_budget, stage.attention_aware])
        if key != self.stage_key:  # a new stage starts at epoch 0 (a resume restores the position after)
            self.stage_key, self.epoch, self.step_in_epoch = key, 0, 0
            self.segments = [[0, self.dp_size]]
        self.stage, self.want_teacher = stage, teacher
        self._reset()

    def next_step(self, step: int) -> list[Batch]:
        if self._iter is None:
            self._start()
        try:
            s, batches, skipped, n_bad = next(self._iter)
        except StopIteration:  # epoch done: the next epoch has a fresh (seed, epoch) plan
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.segments = [[0, self.dp_size]]
            self._reset()
            self._start()
            s, batches, skipped, n_bad = next(self._iter)
        assert s == self.step_in_epoch, (s, self.step_in_epoch)
        self.step_in_epoch += 1
        self.last_skipped = skipped  # messages: skipped keys (and spares used), logged by the trainer
        self.skipped_total += n_bad
        if not batches:
            raise RuntimeError(f"step {step}: every sample of this rank's batch is corrupt and no spare sample of "
                               f"the bucket is left ({skipped}); re-run motif-preprocess for these clips")
        return batches

    def state_dict(self) -> dict:
        return {"stage_key": self.stage_key, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "segments": self.segments, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.stage_key, self.epoch = state["stage_key"], state["epoch"]
        self.step_in_epoch, self.skipped_total = state["step_in_epoch"], state.get("skipped_total", 0)
        self.segments = [list(s) for s in state["segments"]]
        if self.segments[-1][1] != self.dp_size:  # world size changed: re-plan the rest of this epoch
            if self.segments[-1][0] == self.step_in_epoch:
                self.segments[-1][1] = self.dp_size
            else:
                self.segments.append([self.step_in_epoch, self.dp_size])
        self._reset()

    # ---- internals -----------------------------------------------------------------------
    def _reset(self) -> None:
        self._iter, self._plan = None, None

    def _stage_plan(self) -> tuple[Plan, int]:
        st = self.stage
        names = [bucket_name(*b) for b in st.buckets]
        kw = dict(token_budget=st.token_budget, seed=self.seed, epoch=self.epoch,
                  attention_aware=st.attention_aware)
        if len(self.segments) == 1:
            return build_plan(self.manifest, names, world_size=self.dp_size, **kw), 0
        return replan(self.manifest, names, segments=[tuple(s) for s in self.segments], **kw)

    def _start(self) -> None:
        self._plan, self._offset = self._stage_plan()
        stream = _StepStream(self, self._plan, self._offset, self.step_in_epoch)
        if self.num_workers > 0:
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                persistent_workers=False)
        else:
            loader = stream
        self._iter = iter(loader)
