"""The shard loader: follows the offline plan, reads samples at indexed offsets from bucket-grouped tars.

    plan (per stage, per epoch; from 2 ranks on each epoch's remainder is carried into the next)
        ─► this rank's row of each step (rank_plan.RankPlan)
        ─► a feed in this process: one task per step (this rank's samples resolved to shard + member offsets
           through the memory-mapped sample index) ─► persistent DataLoader workers (prefetching) ─► reads
        ─► crc32 check ─► decode (.npy, allow_pickle=False, finite) ─► collate ─► n_micro micro-batches

Memory per rank is O(its share of the plan): the consolidated sample index (sample_index.py) is memory-
mapped and only this rank's rows are read; the full plan exists only while its rank view is built; workers
hold no table at all (each task carries the locations of its samples). Nothing scans a tar when the index
exists; a shard it cannot serve falls back to `tar_index.TarIndex` (its `.idx.json`, or a header walk).

Workers persist for the life of the source: the feed moves on to the next epoch's plan by itself, and on to
the next curriculum stage when `set_stage(..., steps=, upcoming=)` announced it, so neither boundary stops
the pipeline. The position is (stage, epoch, step-in-epoch, world-size segments) of the last step *handed
to the trainer* (not the last one prefetched), so a resumed run — on any number of ranks — continues with
exactly the next batch of the plan.

Faults:
- A content problem (`CorruptSample`: crc32 mismatch, a member cut off by a truncated file or a
  damaged header, unreadable .npy, NaN/Inf, arrays that disagree with the meta) skips the sample: it is
  named in `last_skipped` (key, shard, reason) and counted in `last_skipped_count` / `skipped_total`.
  A spare of the same bucket takes its place, read by this process (rare, so the workers need no spare
  table). Spares come from this rank's share of the bucket (candidates i ≡ rank mod world size, the ids
  the plan left out this epoch first, then the others, noted as repeats), never one planned on any rank
  in this step, so no two ranks take the same spare.
- A machine problem (any OSError of a read: EMFILE, ENFILE, ENOSPC, EIO, ENOENT/ESTALE of a shard that
  was there at start-up, ENOTCONN, ...) is retried `io_retries` times with a short backoff, then
  `DataIOError` stops the run: skipping there would silently throw away good data.
- Every rank yields n_micro = min(grad_accum, planned samples per rank of the step) micro-batches,
  whatever it lost, so FSDP collectives stay matched; a rank short of samples pads with micro-batches
  that repeat one of its samples and carry `padding=True` (the trainer gives them loss weight 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from motif_train.batch import Batch, check_pad_to, pad_text

from .curriculum import StageConfig
from .plan import Plan, build_plan, carries, replan, sample_ids_by_bucket
from .rank_plan import RankPlan
from .sample_index import FIELDS, SampleIndex
from .shard_format import MANIFEST_NAME, CorruptSample
from .shards import bucket_name, check_image_tokens, decode_sample, load_manifest, teacher_from_uint8
from .tar_index import DataIOError, Files, TarIndex, io_error

__all__ = ["DataIOError", "ShardDataConfig", "ShardSource", "collate", "collate_micro"]

log = logging.getLogger(__name__)


@dataclass
class ShardDataConfig:
    _target_: str = "motif_train.data.loader.ShardSource"
    root: str = "data"
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool | None = None  # None: on with CUDA
    max_open_files: int = 64  # tar files each DataLoader worker keeps open (least recently used closed first)
    io_retries: int = 3  # retries of a read failing with a machine I/O error before the run stops (DataIOError)
    # text lengths a micro-batch's captions are padded to (the smallest that fits): a few fixed shapes for compile
    text_pad_to: list[int] = field(default_factory=lambda: [64, 128, 256, 512])


# ------------------------------------------------------------------------------ reading one step

_TAR_CACHE = 4096  # per-shard TarIndex objects a process keeps (shards the sample index cannot serve)


class _Reader:
    """One process's sample reads: open files, fallback per-shard indexes (LRU), per-sample failures (cached).

    A location is `SampleIndex.locate`'s tuple (gid, shard path, key, indexed, index, index_crc, off, size, crc).
    """

    def __init__(self, root: Path, max_open: int, retries: int) -> None:
        self.root = root
        self.files = Files(max_open, retries)
        self.tars: OrderedDict[str, TarIndex] = OrderedDict()
        self.bad: dict[int, str] = {}
        self.notes: list[str] = []

    def _members(self, loc: tuple) -> dict[str, bytes]:
        _, path, key, indexed, index, index_crc, off, size, crc = loc
        if not indexed:
            tar = self.tars.pop(path, None)
            if tar is None:
                tar = TarIndex(self.root / path, self.files, None if index is None else self.root / index, index_crc)
                if tar.note:
                    self.notes.append(tar.note)
                while len(self.tars) >= _TAR_CACHE:
                    self.tars.popitem(last=False)
            self.tars[path] = tar
            return tar.sample(key, self.files)
        have = [j for j, n in enumerate(size) if n >= 0]
        if not have:
            raise CorruptSample(key, "tar", f"the sample index lists no member of it in {path}")
        # A sample's members are adjacent in its tar: one read covers them all.
        lo, hi = min(off[j] for j in have), max(off[j] + size[j] for j in have)
        span = self.files.read(self.root / path, lo, hi - lo)
        out = {"__key__": key}
        for j in have:
            name, o, n = FIELDS[j], off[j] - lo, size[j]
            data = span[o:o + n]
            if len(data) != n:
                raise CorruptSample(key, name.removesuffix(".npy"), f"truncated: {len(data)} of {n} bytes (member "
                                    f"ends at byte {off[j] + n}, the file holds {lo + len(span)})")
            if zlib.crc32(data) != crc[j]:
                raise CorruptSample(key, name.removesuffix(".npy"), f"checksum mismatch (crc32 "
                                    f"{zlib.crc32(data):08x}, index {crc[j]:08x}): flipped bytes")
            out[name] = data
        return out

    def read(self, loc: tuple) -> dict:
        gid = loc[0]
        if gid in self.bad:
            raise CorruptSample(self.bad[gid])
        try:
            return decode_sample(self._members(loc))
        except CorruptSample as e:
            self.bad[gid] = str(e)
            raise


def _where(loc: tuple) -> str:
    return f"{loc[2]} ({loc[1]})"


class _Tasks(Dataset):
    """What a worker holds: the dataset root, limits and text pad lengths; the rest comes with each task.

    task = (plan id, stage key, epoch, step, segments, teacher, n_micro, locations) ->
    (plan id, stage key, epoch, step, segments, teacher, micro-batches or None, samples or None, skip messages,
    notes): micro-batches when every sample was read, else the decoded samples (None where one was corrupt)
    for the main process to fill with spares."""

    def __init__(self, root: Path, max_open: int, retries: int, text_pad_to: tuple[int, ...]) -> None:
        self.root, self.max_open, self.retries, self.text_pad_to = root, max_open, retries, text_pad_to
        self._reader: _Reader | None = None
        self.pid = None

    def reader(self) -> _Reader:
        """This process's reader (open files, caches), made on first use in each process."""
        if self._reader is None or self.pid != os.getpid():
            self._reader, self.pid = _Reader(self.root, self.max_open, self.retries), os.getpid()
        return self._reader

    def __getitem__(self, task: tuple) -> tuple:
        reader = self.reader()
        pid, key, epoch, s, segments, teacher, n_micro, locs = task
        slots, fails = [], []
        for loc in locs:
            try:
                slots.append(reader.read(loc))
            except CorruptSample as e:
                slots.append(None)
                fails.append(f"{_where(loc)}: skipped: {e}")
        notes, reader.notes = reader.notes, []
        batches = None if fails else collate_micro(slots, n_micro, teacher, self.text_pad_to)
        return pid, key, epoch, s, segments, teacher, batches, (slots if fails else None), fails, notes

    def close(self) -> None:
        if self._reader is not None:
            self._reader.files.close()


def _identity(x):
    return x  # the default collate would turn the decoded numpy arrays of a failed step into tensors


class _Feed(Sampler):
    """The DataLoader's sampler: tasks from the source's dispatch cursor, pulled as workers need them.

    Holds the source weakly (the source owns the DataLoader, whose iterator owns this): a dropped source is
    freed at once, and with it the DataLoader iterator, which stops the workers."""

    def __init__(self, source: ShardSource) -> None:
        self._source = weakref.ref(source)

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        src = self._source()
        if src is None:
            raise StopIteration
        return src._next_task()


@dataclass
class _Cursor:
    """Where the feed dispatches next: a stage position plus how many tasks of this stage it may still send
    (None: no end announced) and the feed's task count when the stage began."""

    stage: StageConfig
    teacher: bool
    key: str
    epoch: int
    step: int
    segments: list[list[int]]
    left: int | None
    began: int = 0
    pid: int | None = None  # id of the rank plan being dispatched


def _stage_key(stage: StageConfig) -> str:
    return json.dumps([stage.name, stage.buckets, stage.token_budget, stage.attention_aware])



# ------------------------------------------------------------------------------ collation


def collate(samples: list[dict], teacher: bool,
            text_pad_to: list[int] | tuple[int, ...] = (64, 128, 256, 512)) -> Batch:
    """Decoded samples of one bucket -> Batch (text zero-padded to the smallest `data.text_pad_to` length
    holding the longest caption, mask True on tokens; a longer caption raises naming the key)."""
    text, mask = pad_text([torch.from_numpy(s["text"].astype(np.float32)) for s in samples], text_pad_to)
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


def collate_micro(samples: list[dict], n_micro: int, teacher: bool,
                  text_pad_to: list[int] | tuple[int, ...] = (64, 128, 256, 512)) -> list[Batch]:
    """This rank's samples of one step -> exactly `n_micro` micro-batches (sizes differ by <= 1); [] without
    samples. With fewer samples than n_micro each is its own micro-batch and the rest are `padding=True`
    micro-batches repeating them in turn (the same number of passes on every rank)."""
    if not samples:
        return []
    if len(samples) >= n_micro:
        parts = np.array_split(np.arange(len(samples)), n_micro)
        return [collate([samples[i] for i in p], teacher, text_pad_to) for p in parts]
    real = [collate([s], teacher, text_pad_to) for s in samples]
    return real + [dataclasses.replace(real[i % len(real)], padding=True) for i in range(n_micro - len(real))]



# ------------------------------------------------------------------------------ the source


class ShardSource:
    """Data source for the trainer (same interface as `SyntheticSource`).

    After `next_step`: `last_skipped` — this rank's messages of that step (sample key, shard path, reason;
    spare notes too); `last_skipped_count` — how many of this rank's planned samples of that step were
    corrupt (spare notes and corrupt spare candidates are not counted); `skipped_total` — their running
    sum on this rank (checkpointed). `startup_notes` — one line naming every shard of this rank's share
    (shards i ≡ dp_rank mod dp_size: all ranks together check each shard once) whose size differs from the
    manifest's `bytes` (also logged as a warning at construction); `check_image_tokens` may add one.
    """

    takes_stage_hints = True  # set_stage(..., steps=, upcoming=): the trainer may announce the next stage

    def __init__(self, *, root: str, num_workers: int = 2, prefetch_factor: int = 2, pin_memory: bool | None = None,
                 max_open_files: int = 64, io_retries: int = 3,
                 text_pad_to: list[int] | tuple[int, ...] = (64, 128, 256, 512), text_dim: int,
                 image_dim: int | None, seed: int,
                 dp_rank: int, dp_size: int, grad_accum: int) -> None:
        if int(max_open_files) < 1:
            raise ValueError(f"data.max_open_files={max_open_files} must be >= 1 (tar files each DataLoader worker "
                             "keeps open)")
        if int(io_retries) < 0:
            raise ValueError(f"data.io_retries={io_retries} must be >= 0 (retries of a failing shard read)")
        self.text_pad_to = check_pad_to(text_pad_to)
        self.root = Path(root)
        index = SampleIndex.open(self.root)
        if index is None:  # a dataset from before the sample index, or a manifest edited since
            index = SampleIndex.from_manifest(load_manifest(self.root))
        index.check_version(self.root)
        self.index = index
        self.manifest = index.head  # the manifest without its per-shard list (buckets, totals, encoders, ...)
        max_text = self.manifest.get("max_text_len")
        if isinstance(max_text, int) and max_text > self.text_pad_to[-1]:
            raise ValueError(f"data.text_pad_to={self.text_pad_to}: the shards hold captions of up to {max_text} "
                             f"text tokens (manifest max_text_len) but the largest pad length is "
                             f"{self.text_pad_to[-1]}: add a length >= {max_text} to data.text_pad_to")
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.max_open_files, self.io_retries = int(max_open_files), int(io_retries)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed, self.dp_rank, self.dp_size, self.grad_accum = seed, dp_rank, dp_size, grad_accum
        self.text_dim, self.image_dim = text_dim, image_dim
        self.stage: StageConfig | None = None
        self.want_teacher = False
        # position of the last step handed out, within the current stage (what the checkpoint stores)
        self.stage_key: str | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.segments: list[list[int]] = [[0, dp_size]]
        self.skipped_total = 0
        self.last_skipped: list[str] = []
        self.last_skipped_count = 0
        self.startup_notes = self._check_shards()
        self._tasks_ds = _Tasks(self.root, self.max_open_files, self.io_retries, self.text_pad_to)
        # spares are read here; without workers by the same reader as the steps (one set of open files)
        self._spare_reader = (self._tasks_ds.reader() if num_workers == 0
                              else _Reader(self.root, self.max_open_files, self.io_retries))
        self._loader: DataLoader | None = None
        self._iter = None
        self._cursor: _Cursor | None = None
        self._left: int | None = None  # tasks of the current stage the feed may still send (None: unbounded)
        self._upcoming: tuple[StageConfig, bool] | None = None
        self._plans: dict[int, RankPlan] = {}  # plans with tasks in flight or being consumed, by id
        self._plan_id = 0
        self._dispatched = self._consumed = 0

    def _check_shards(self) -> list[str]:
        """This rank's share of the shards (i ≡ dp_rank mod dp_size) must exist; one line naming each whose size
        on disk differs from the manifest (truncated, rewritten)."""
        sh = self.index.shards
        mine = np.arange(self.dp_rank, sh.shape[0], self.dp_size)
        rows = sh[mine]
        bad, missing = [], []
        for path, want in zip(rows["path"].tolist(), rows["bytes"].tolist(), strict=True):
            path = path.decode()
            try:
                size = (self.root / path).stat().st_size
            except FileNotFoundError:
                missing.append(path)
                continue
            except OSError as e:
                raise io_error(self.root / path, e, 1) from e
            if want >= 0 and size != want:
                bad.append(f"{path} ({size} bytes, manifest {want})")
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise FileNotFoundError(f"{self.root / MANIFEST_NAME} lists {len(missing)} shard(s) missing on disk under "
                                    f"{self.root}: {shown}. Re-run motif-preprocess with the same --input/--out to "
                                    "rebuild them.")
        if not bad:
            return []
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        note = (f"{len(bad)} shard(s) under {self.root} differ in size from {MANIFEST_NAME}: {shown}; their damaged "
                "samples will be skipped and counted, the intact ones used. Re-run motif-preprocess to rebuild them")
        log.warning(note)
        return [note]

    def image_samples(self) -> tuple[dict[str, int | None], str | None]:
        """Samples with SigLIP tokens per bucket ({bucket: count, None: unknown}) and a note when they were not
        counted at preprocessing (manifests from before `image_samples`): then counted from the sample index's
        member rows where every shard of the bucket is indexed, else taken from the manifest's preprocessing
        settings (motif-preprocess encodes frame 0 of every sample or of none: `--no-image`)."""
        table = self.manifest.get("buckets", {})
        counts = {b: t.get("image_samples") for b, t in table.items()}
        unknown = [b for b, c in counts.items() if c is None and table[b].get("samples", 0) > 0]
        if not unknown:
            return counts, None
        ix = self.index
        if ix.mapped and ix.num_samples:
            names = {b: i for i, b in enumerate(ix.bucket_names)}
            nb = len(ix.bucket_names)
            sh_bucket = np.asarray(ix.shards["bucket"], np.int64)
            unindexed = np.bincount(sh_bucket, weights=~np.asarray(ix.shards["indexed"], bool), minlength=nb)
            rows = ix.samples
            has = np.asarray(rows["size"][:, FIELDS.index("image.npy")]) >= 0
            per = np.bincount(sh_bucket[np.asarray(rows["shard"], np.int64)][has], minlength=nb)
            for b in list(unknown):
                if b in names and unindexed[names[b]] == 0:
                    counts[b] = int(per[names[b]])
                    unknown.remove(b)
        if not unknown:
            return counts, None
        settings = self.manifest.get("config") or {}
        encoders = self.manifest.get("encoders") or {}
        if "image" in settings or "image" in encoders:
            on = bool(settings["image"]) if "image" in settings else bool(encoders["image"])
            for b in unknown:
                counts[b] = int(table[b]["samples"]) if on else 0
            if not on:
                return counts, None
            return counts, (f"{self.root / MANIFEST_NAME} does not count the samples with SigLIP image tokens "
                            f"(written before image_samples); assuming every sample of {', '.join(unknown)} has them "
                            "(the image encoder was on). A sample without them stops the run at its I2V step; "
                            "re-running motif-preprocess rewrites the manifest with the counts")
        return counts, (f"{self.root / MANIFEST_NAME} does not say which samples carry SigLIP image tokens in "
                        f"{', '.join(unknown)}: not checked at start-up; a sample without them stops the run at "
                        "its I2V step")

    def check_image_tokens(self, stages) -> None:
        """Start-up check (the trainer, every rank alike): every video bucket of a stage with I2V must hold
        SigLIP tokens for ALL its samples (shards.check_image_tokens: ValueError naming the buckets and the
        fix). `stages`: (label, config key, i2v probability, StageConfig) per stage of the run."""
        counts, note = self.image_samples()
        check_image_tokens(self.manifest.get("buckets", {}),
                           [(label, key, p, [bucket_name(*b) for b in st.buckets]) for label, key, p, st in stages],
                           root=self.root, counts=counts)
        if note and any(p > 0 for _, _, p, _ in stages):
            log.warning(note)
            self.startup_notes.append(note)

    # ---- interface ---------------------------------------------------------------------
    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The empty-prompt embedding written by preprocessing (L0, C) and its all-True mask."""
        name = self.manifest.get("empty_prompt")
        if not name or not (self.root / name).exists():
            return None
        e = torch.from_numpy(np.load(self.root / name, allow_pickle=False).astype(np.float32))
        return e, torch.ones(e.shape[0], dtype=torch.bool)

    def set_stage(self, stage: StageConfig, *, teacher: bool, steps: int | None = None,
                  upcoming: tuple[StageConfig, bool] | None = None) -> None:
        """Serve `stage` from now on. `steps`: how many `next_step` calls this stage gets (the feed stops
        there instead of prefetching past the stage's end); `upcoming`: (next stage, its teacher flag), which
        the feed then prefetches into, so the workers never idle at the boundary. Both are optional hints."""
        if stage.token_budget is None:
            raise ValueError(f"curriculum stage {stage.name!r}: token_budget is required with shard data "
                             "(video tokens per rank per step)")
        key = _stage_key(stage)
        if self._continues(key, teacher, steps):
            self.stage, self.want_teacher, self._upcoming = stage, teacher, upcoming
            return
        if key != self.stage_key:  # a new stage starts at epoch 0 (a resume restores the position after)
            self.stage_key, self.epoch, self.step_in_epoch = key, 0, 0
            self.segments = [[0, self.dp_size]]
        self.stage, self.want_teacher = stage, teacher
        self._left, self._upcoming = steps, upcoming
        self._reset()

    def _continues(self, key: str, teacher: bool, steps: int | None) -> bool:
        """True when the feed is already dispatching `key` from where the trainer is: keep the pipeline."""
        c = self._cursor
        if self._iter is None or c is None or c.key != key or c.teacher != teacher:
            return False
        if key == self.stage_key:  # the same stage again
            ahead = self._dispatched - self._consumed
            if c.began > self._consumed:
                return False
        else:  # the feed moved on into this stage (`upcoming`): the trainer must have consumed all before it
            if c.began != self._consumed:
                return False
            ahead = self._dispatched - c.began
        if steps is not None:
            if steps < ahead:
                return False  # prefetched past this stage's end: start over from the trainer's position
            c.left = steps - ahead
        if key != self.stage_key:
            self.stage_key, self.epoch, self.step_in_epoch = key, 0, 0
            self.segments = [[0, self.dp_size]]
        return True

    def next_step(self, step: int) -> list[Batch]:
        if self._iter is None:
            self._start()
        try:
            res = next(self._iter)
        except StopIteration:  # the announced end of the stage passed: keep serving it
            self._left = None
            self._start()
            res = next(self._iter)
        self._consumed += 1
        pid, key, epoch, s, segments, teacher, batches, slots, fails, notes = res
        self.stage_key, self.epoch, self.step_in_epoch, self.segments = key, epoch, s + 1, segments
        for old in [p for p in self._plans if p < pid]:
            del self._plans[old]  # every task of it has been consumed
        rp = self._plans[pid]
        msgs, n_bad = list(notes), len(fails)
        if batches is None:
            batches, more = self._with_spares(rp, s, teacher, slots, fails)
            msgs += more
        self.last_skipped, self.last_skipped_count = msgs, n_bad  # logged / summed over ranks by the trainer
        self.skipped_total += n_bad
        if not batches:
            bucket, ids, _ = rp.step(s)
            keys = [self.index.key(g) for g in ids.tolist()]
            raise RuntimeError(f"step {step}: every sample of this rank's batch {keys} (bucket {bucket}) "
                               f"is corrupt and no spare sample of the bucket is left: {msgs}. Re-run "
                               "motif-preprocess for these clips, or drop the bucket from the stage")
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

    def close(self) -> None:
        """Stop the workers (they otherwise live as long as the source) and close this process's files."""
        it, self._iter, self._loader = (self._loader._iterator if self._loader is not None else None), None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._spare_reader.files.close()
        self._tasks_ds.close()

    # ---- internals -----------------------------------------------------------------------
    def _reset(self) -> None:
        self._iter, self._cursor = None, None

    def _stage_plan(self, stage: StageConfig | None = None, epoch: int | None = None,
                    segments: list[list[int]] | None = None) -> tuple[Plan, int]:
        """The full plan (every rank's rows) of a stage position (default: the current one) and its offset."""
        st = self.stage if stage is None else stage
        epoch, segments = (self.epoch, self.segments) if epoch is None else (epoch, segments)
        names = [bucket_name(*b) for b in st.buckets]
        # an epoch's remainder trains in the next one (plan.py, "Carried remainders"), from two ranks on
        kw = dict(token_budget=st.token_budget, seed=self.seed, epoch=epoch, attention_aware=st.attention_aware,
                  carry=carries(int(segments[0][1])))
        manifest = self.index.plan_manifest()
        if len(segments) == 1:
            return build_plan(manifest, names, world_size=self.dp_size, **kw), 0
        return replan(manifest, names, segments=[tuple(s) for s in segments], **kw)

    def _rank_plan(self, c: _Cursor) -> int:
        """Build this rank's view of the cursor's plan; returns its id (the full plan is dropped here)."""
        plan, offset = self._stage_plan(c.stage, c.epoch, c.segments)
        if plan.num_steps == 0:
            raise ValueError(f"curriculum stage {c.stage.name!r} plans no step at {self.dp_size} ranks: its buckets "
                             f"{c.stage.buckets} hold fewer samples than the world size; add data or drop them")
        ids = sample_ids_by_bucket(self.index.plan_manifest())
        self._plan_id += 1
        self._plans[self._plan_id] = RankPlan.of(plan, offset, self.dp_rank, self.grad_accum, ids)
        return self._plan_id

    def _next_task(self) -> tuple:
        """The feed: the next step's task from the dispatch cursor, across epochs and into `upcoming`;
        StopIteration when the announced end of the stage is reached and nothing comes after it."""
        while True:
            c = self._cursor
            if c is None:
                raise StopIteration
            if c.left == 0:
                if self._upcoming is None:
                    raise StopIteration
                stage, teacher = self._upcoming
                self._upcoming = None
                self._cursor = _Cursor(stage, teacher, _stage_key(stage), 0, 0, [[0, self.dp_size]], None,
                                       began=self._dispatched)
                continue
            if c.pid not in self._plans:
                c.pid = self._rank_plan(c)
            if c.step >= self._plans[c.pid].end:  # epoch done: the next epoch has a fresh (seed, epoch) plan
                c.epoch, c.step, c.segments = c.epoch + 1, 0, [[0, self.dp_size]]
                c.pid = self._rank_plan(c)
            _, ids, n_micro = self._plans[c.pid].step(c.step)
            task = (c.pid, c.key, c.epoch, c.step, [list(x) for x in c.segments], c.teacher, n_micro,
                    self.index.locate(ids))
            c.step += 1
            if c.left is not None:
                c.left -= 1
            self._dispatched += 1
            return task

    def _local(self):
        """Without workers: the steps, read in this process."""
        while True:
            try:
                task = self._next_task()
            except StopIteration:
                return
            yield self._tasks_ds[task]

    def _start(self) -> None:
        """(Re)start the feed at the trainer's position; the workers, once started, are reused."""
        self._cursor = _Cursor(self.stage, self.want_teacher, self.stage_key, self.epoch, self.step_in_epoch,
                               [list(s) for s in self.segments], self._left)
        self._dispatched = self._consumed = 0
        self._plans.clear()
        if self.num_workers > 0:
            if self._loader is None:
                self._loader = DataLoader(self._tasks_ds, batch_size=None, sampler=_Feed(self),
                                          collate_fn=_identity, num_workers=self.num_workers,
                                          prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                          persistent_workers=True)
            self._iter = iter(self._loader)  # persistent workers: a reset drains in-flight tasks, no respawn
        else:
            self._iter = self._local()

    def _with_spares(self, rp: RankPlan, s: int, teacher: bool, slots: list, fails: list[str]):
        """Fill the corrupt slots of step s with spares (module doc); (micro-batches, messages)."""
        bucket, ids, n_micro = rp.step(s)
        cands, left = rp.cands[bucket], rp.cand_left[bucket]
        samples, msgs, c, fail = [], [], 0, iter(fails)
        for gid, slot in zip(ids.tolist(), slots, strict=True):
            if slot is not None:
                samples.append(slot)
                continue
            msgs.append(next(fail))
            key = self.index.key(gid)
            while True:
                c = rp.next_spare(bucket, s, c)
                if c >= cands.shape[0]:
                    msgs.append(f"{self.index.where(gid)}: no spare of bucket {bucket} left for this rank")
                    break
                spare, is_left, c = int(cands[c]), bool(left[c]), c + 1
                try:
                    samples.append(self._spare_reader.read(self.index.locate([spare])[0]))
                except CorruptSample as e:  # counted when it is planned, not each time it is tried
                    msgs.append(f"{self.index.where(spare)}: spare candidate is corrupt too, not used: {e}")
                    continue
                msgs.append(f"{self.index.where(spare)}: " + (
                    f"used as a spare for {key} (left out of this epoch's plan)" if is_left
                    else f"repeated as a spare for {key}"))
                break
        notes, self._spare_reader.notes = self._spare_reader.notes, []
        return collate_micro(samples, n_micro, teacher, self.text_pad_to), notes + msgs
