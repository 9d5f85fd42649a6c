"""The shard loader: follows the offline plan, reads samples by index from bucket-grouped tars.

    plan (per stage, per epoch) ─► step s: bucket + this rank's sample ids
        ─► DataLoader workers (worker w prepares steps s ≡ w mod W, in order) ─► indexed tar reads
        ─► crc32 check ─► decode (.npy, allow_pickle=False, finite) ─► collate ─► n_micro micro-batches of `Batch`

Random access: a shard's member index (name -> offset, size, crc32) is the `<shard>.tar.idx.json` written
by preprocessing (format in shards.py) or, for a shard without a usable one, a tolerant walk over its
512-byte tar headers (stdlib `tarfile` gives up on the whole archive at the first truncated member).
Each index is built once per shard per worker and cached, with what it could not serve; a sample is
then a few `seek`+`read`s through an LRU of at most `max_open_files` open tars per worker. The position
is (stage, epoch, step-in-epoch, world-size segments), so a resumed run — on any number of ranks —
continues with exactly the next batch of the plan.

Faults:
- A content problem (`CorruptSample`: crc32 mismatch, a member cut off by a truncated file or a
  damaged header, unreadable .npy, NaN/Inf, arrays that disagree with the meta) skips the sample: it is
  named in `last_skipped` (key, shard, reason) and counted in `last_skipped_count` / `skipped_total`.
  A spare of the same bucket takes its place. Spares come from this rank's share of the bucket
  (candidates i ≡ rank mod world size, the ids the plan left out this epoch first, then the others,
  noted as repeats), never one planned on any rank in this step, so no two ranks take the same spare.
- A machine problem (any OSError of a read: EMFILE, ENFILE, ENOSPC, EIO, ENOENT/ESTALE of a shard that
  was there at start-up, ENOTCONN, ...) is retried `io_retries` times with a short backoff, then
  `DataIOError` stops the run: skipping there would silently throw away good data.
- Every rank yields n_micro = min(grad_accum, planned samples per rank of the step) micro-batches,
  whatever it lost, so FSDP collectives stay matched; a rank short of samples pads with micro-batches
  that repeat one of its samples and carry `padding=True` (the trainer gives them loss weight 0).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import Batch, check_pad_to, pad_text
from .curriculum import StageConfig
from .plan import Plan, build_plan, replan, sample_ids_by_bucket
from .shards import (
    MANIFEST_NAME,
    CorruptSample,
    bucket_name,
    decode_sample,
    load_manifest,
    parse_index,
    teacher_from_uint8,
)

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


# ------------------------------------------------------------------------------ file access


class DataIOError(OSError):
    """A shard could not be read because of the machine (too many open files, full or failing disk, a
    vanished mount), not because of its content. Raised after the retries; it stops the run."""


_IO_BACKOFF_S = 0.05  # first retry delay; doubles on each retry
_HINTS = {
    errno.EMFILE: "this process has too many open files: lower data.max_open_files or data.num_workers, "
                  "or raise `ulimit -n`",
    errno.ENFILE: "the system's open-file table is full: lower data.max_open_files / data.num_workers, or "
                  "raise fs.file-max",
    errno.ENOSPC: "no space left on the device",
    errno.EIO: "the storage reported an I/O error: check the disk / network filesystem",
    errno.ENOENT: "the shard was there at start-up and has vanished: is the data mount still up?",
    errno.ESTALE: "stale file handle: the network filesystem was remounted or the shard replaced",
    errno.ENOTCONN: "the network filesystem is disconnected: is the data mount still up?",
}


def _io_error(path: Path, err: OSError, attempts: int) -> DataIOError:
    name = errno.errorcode.get(err.errno, str(err.errno))
    return DataIOError(err.errno, f"reading shard {path} failed with {name} ({err.strerror or err}) after "
                       f"{attempts} attempt(s): {_HINTS.get(err.errno, 'check the data filesystem')}. A machine "
                       "error, not a corrupt sample: the run stops rather than skip good data")


class _Files:
    """One worker's open tars — at most `max_open`, the least recently used closed first — and reads
    retried on OSError (a short file gives short bytes, it does not raise: every OSError is the machine's)."""

    def __init__(self, max_open: int, retries: int) -> None:
        self.max_open, self.retries = max_open, retries
        self._open: OrderedDict[Path, object] = OrderedDict()

    def _handle(self, path: Path):
        fh = self._open.pop(path, None)
        if fh is None:
            while len(self._open) >= self.max_open:  # close first: never more than max_open at once
                self._open.popitem(last=False)[1].close()
            fh = open(path, "rb")  # noqa: SIM115 - owned by the LRU
        self._open[path] = fh
        return fh

    def _retry(self, path: Path, op, missing_ok: bool = False):
        for attempt in range(self.retries + 1):
            try:
                return op()
            except OSError as e:
                if missing_ok and isinstance(e, FileNotFoundError):
                    return None
                err = e
            fh = self._open.pop(path, None)  # a stale handle is reopened on the next try
            if fh is not None:
                fh.close()
            if err.errno in (errno.EMFILE, errno.ENFILE):
                self.close()  # give our own descriptors back before trying again
            if attempt < self.retries:
                time.sleep(_IO_BACKOFF_S * 2 ** attempt)
        raise _io_error(path, err, self.retries + 1) from err

    def read(self, path: Path, offset: int, size: int) -> bytes:
        def op() -> bytes:
            fh = self._handle(path)
            fh.seek(offset)
            return fh.read(size)

        return self._retry(path, op)

    def size(self, path: Path) -> int:
        return self._retry(path, lambda: os.fstat(self._handle(path).fileno()).st_size)

    def read_file(self, path: Path) -> bytes | None:
        """A small side file (the member index), not kept open; None when it does not exist."""
        return self._retry(path, path.read_bytes, missing_ok=True)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


# ------------------------------------------------------------------------------ tar index

_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")


def _num(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _header(block: bytes) -> tuple[str, int, bytes] | None:
    """One 512-byte tar header -> (name, size, typeflag); None when its checksum is wrong."""
    try:
        stored, size = _num(block[148:156]), _num(block[124:136])
    except ValueError:
        return None
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000" and block[345] != 0:  # POSIX: long names are split into a prefix
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def _resync(files: _Files, path: Path, pos: int, size: int) -> int | None:
    """First offset >= pos (block aligned) holding a valid ustar header, or None."""
    chunk = 2048 * _BLOCK
    while pos + _BLOCK <= size:
        buf = files.read(path, pos, min(chunk, size - pos))
        j = buf.find(b"ustar", 257)
        while j != -1:
            i = j - 257
            if i % _BLOCK == 0 and i + _BLOCK <= len(buf) and _header(buf[i:i + _BLOCK]) is not None:
                return pos + i
            j = buf.find(b"ustar", j + 1)
        if len(buf) < chunk:
            return None
        pos += chunk - _BLOCK  # overlap one block: a header across the chunk boundary is seen whole
    return None


def _key(name: str) -> str:
    return name.split(".", 1)[0]  # as webdataset and `read_tar_keys`


class TarIndex:
    """Member index of one shard: `members` {name: (data offset, size, crc32 or None)}, `bad` {key: why
    that sample cannot be served}, `note` (how it was built, when not from its own index file)."""

    def __init__(self, path: Path, files: _Files, index: Path | None = None, index_crc: int | None = None):
        self.path, self.note, self.damage = path, None, ""
        self.members: dict[str, tuple[int, int, int | None]] = {}
        self.bad: dict[str, str] = {}
        size = files.size(path)
        why = self._from_index(files, index, index_crc, size) if index is not None else None
        if index is None or why:
            if why:
                self.note = (f"{path}: member index {index.name} unusable ({why}): scanned the tar headers "
                             "instead, no checksums for this shard")
            self._scan(files, size)
        self.by_key: dict[str, list[str]] = {}
        for name in self.members:
            self.by_key.setdefault(_key(name), []).append(name)

    def _from_index(self, files: _Files, index: Path, crc: int | None, size: int) -> str | None:
        data = files.read_file(index)
        if data is None:
            return "missing"
        if crc is not None and zlib.crc32(data) != crc:
            return "crc32 differs from the manifest's"
        try:
            _, members = parse_index(data)
        except (ValueError, KeyError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        for name, (off, n, c) in members.items():
            if off + n > size:
                self.bad.setdefault(_key(name), f"truncated: member {name} ends at byte {off + n}, the file has "
                                                f"{size} bytes")
                self.damage = f"the file is truncated at byte {size}"
            else:
                self.members[name] = (off, n, c)
        return None

    def _scan(self, files: _Files, size: int) -> None:
        """Walk the headers; a member past the end of the file or a damaged header costs only the
        sample(s) around it (the one in progress may lack members), the walk resumes after a bad header."""
        pos, last, pending, resumed = 0, None, {}, False
        while True:
            block = files.read(self.path, pos, _BLOCK) if pos + _BLOCK <= size else b""
            if len(block) < _BLOCK:  # cut inside or before a header: the sample in progress may be partial
                self._damaged(last, f"the tar ends at byte {size} without its end-of-archive blocks (truncated)")
                return
            if block == bytes(_BLOCK):
                return
            head = _header(block)
            if head is None:
                self._damaged(last, f"damaged tar header at byte {pos}")
                pos, resumed = _resync(files, self.path, pos + _BLOCK, size), True
                if pos is None:
                    return
                continue
            name, n, kind = head
            if kind not in (b"L", b"x", b"g"):  # a long name / pax size given just before applies here
                name, n = pending.pop("path", name), pending.pop("size", n)
                pending.clear()
            data = pos + _BLOCK
            if data + n > size:
                self._damaged(name if kind in _FILE_TYPES else last,
                              f"truncated: member {name} ends at byte {data + n}, the file has {size} bytes")
                return
            if kind == b"L":  # GNU long name of the next member
                raw = files.read(self.path, data, n).split(b"\0", 1)[0]
                pending["path"] = raw.decode("utf-8", "surrogateescape")
            elif kind == b"x":  # pax header of the next member
                for rec in files.read(self.path, data, n).decode("utf-8", "replace").split("\n"):
                    k, _, v = rec.partition(" ")[2].partition("=")
                    if k == "path":
                        pending[k] = v
                    elif k == "size" and v.isdigit():
                        pending[k] = int(v)
            elif kind in _FILE_TYPES:
                self.members[name] = (data, n, None)
                if resumed:  # the sample after a gap may lack the member whose header was lost
                    self._damaged(name, "follows a damaged tar header")
                last, resumed = name, False
            pos = data + -(-n // _BLOCK) * _BLOCK

    def _damaged(self, name: str | None, why: str) -> None:
        self.damage = why
        if name is not None:
            self.bad.setdefault(_key(name), why)

    def sample(self, key: str, files: _Files) -> dict[str, bytes]:
        """{"__key__", "<field>": bytes} of one sample, each member's crc32 checked; CorruptSample otherwise."""
        if key in self.bad:
            raise CorruptSample(key, "tar", self.bad[key])
        if key not in self.by_key:
            raise CorruptSample(key, "tar", f"no member in {self.path.name}"
                                + (f" ({self.damage})" if self.damage else ""))
        out = {"__key__": key}
        for name in self.by_key[key]:
            off, n, crc = self.members[name]
            data, field = files.read(self.path, off, n), name[len(key) + 1:]
            if len(data) != n:
                raise CorruptSample(key, field.removesuffix(".npy"), f"truncated: {len(data)} of {n} bytes")
            if crc is not None and zlib.crc32(data) != crc:
                raise CorruptSample(key, field.removesuffix(".npy"), f"checksum mismatch (crc32 "
                                    f"{zlib.crc32(data):08x}, index {crc:08x}): flipped bytes")
            out[field] = data
        return out


# ------------------------------------------------------------------------------ steps


class _Reader:
    """One worker's sample reads: open files, per-shard indexes (built once) and per-sample failures (cached)."""

    def __init__(self, stream: _StepStream) -> None:
        self.s = stream
        self.files = _Files(stream.max_open_files, stream.io_retries)
        self.indexes: dict[int, TarIndex] = {}
        self.bad: dict[int, str] = {}
        self.notes: list[str] = []

    def where(self, gid: int) -> str:
        shard, key = self.s.locate[gid]
        return f"{key} ({self.s.shards[shard]})"

    def read(self, gid: int) -> dict:
        if gid in self.bad:
            raise CorruptSample(self.bad[gid])
        shard, key = self.s.locate[gid]
        if shard not in self.indexes:
            index, crc = self.s.shard_index[shard]
            self.indexes[shard] = TarIndex(self.s.root / self.s.shards[shard], self.files,
                                           None if index is None else self.s.root / index, crc)
            if self.indexes[shard].note:
                self.notes.append(self.indexes[shard].note)
        try:
            return decode_sample(self.indexes[shard].sample(key, self.files))
        except CorruptSample as e:
            self.bad[gid] = str(e)
            raise


class _StepStream(IterableDataset):
    """Yields (step_in_epoch, micro-batches, messages, #skipped) for steps [start, end) of one plan."""

    def __init__(self, source: ShardSource, plan: Plan, offset: int, start: int) -> None:
        self.root, self.shards, self.locate = source.root, source.shard_paths, source.locate
        self.shard_index, self.bucket_ids = source.shard_index, source.bucket_ids
        self.rank, self.accum, self.teacher = source.dp_rank, source.grad_accum, source.want_teacher
        self.max_open_files, self.io_retries = source.max_open_files, source.io_retries
        self.text_pad_to = source.text_pad_to
        self.plan, self.offset, self.start = plan, offset, start
        self._spares: dict[str, tuple[list[int], set[int]]] = {}

    def spares(self, bucket: str) -> tuple[list[int], set[int]]:
        """(this rank's spare candidates of the bucket, in order; the ones the plan left out), once per stream.
        Candidates are dealt i ≡ rank mod world size so two ranks never take the same spare."""
        if bucket not in self._spares:
            ids = self.bucket_ids.get(bucket, np.zeros(0, np.int64))
            left = np.intersect1d(np.asarray(self.plan.dropped, np.int64), ids)
            order = np.concatenate([left, np.setdiff1d(ids, left)])
            self._spares[bucket] = order[self.rank::self.plan.world_size].tolist(), set(left.tolist())
        return self._spares[bucket]

    def run_step(self, s: int, reader: _Reader) -> tuple[list[Batch], list[str], int]:
        step = self.plan.steps[s - self.offset]
        planned = set(step.samples.ravel().tolist())  # every rank's row: a spare is none of them
        cands, left_out = self.spares(step.bucket)
        samples, msgs, n_bad, c = [], [], 0, 0
        for gid in step.samples[self.rank].tolist():
            try:
                samples.append(reader.read(gid))
                continue
            except CorruptSample as e:
                n_bad += 1
                msgs.append(f"{reader.where(gid)}: skipped: {e}")
            key = self.locate[gid][1]
            while c < len(cands):
                spare, c = cands[c], c + 1
                if spare in planned:
                    continue
                try:
                    samples.append(reader.read(spare))
                except CorruptSample as e:  # counted when it is planned, not each time it is tried
                    msgs.append(f"{reader.where(spare)}: spare candidate is corrupt too, not used: {e}")
                    continue
                msgs.append(f"{reader.where(spare)}: " + (
                    f"used as a spare for {key} (left out of this epoch's plan)" if spare in left_out
                    else f"repeated as a spare for {key}"))
                break
            else:
                msgs.append(f"{reader.where(gid)}: no spare of bucket {step.bucket} left for this rank")
        # A function of the plan only (all rows of a step have the same length; max() in case one did not):
        # every rank runs the same number of forward/backward passes.
        n_micro = min(self.accum, max(len(r) for r in step.samples))
        notes, reader.notes = reader.notes, []
        return collate_micro(samples, n_micro, self.teacher, self.text_pad_to), notes + msgs, n_bad

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = _Reader(self)
        try:
            for s in range(self.start, self.offset + self.plan.num_steps):
                if (s - self.start) % nw == wid:
                    yield (s, *self.run_step(s, reader))
        finally:
            reader.files.close()


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
    sum on this rank (checkpointed). `startup_notes` — one line naming every shard whose size differs
    from the manifest's `bytes` (also logged as a warning at construction).
    """

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
        self.manifest = load_manifest(self.root)  # a missing shard fails here, at start-up
        max_text = self.manifest.get("max_text_len")
        if isinstance(max_text, int) and max_text > self.text_pad_to[-1]:
            raise ValueError(f"data.text_pad_to={self.text_pad_to}: the shards hold captions of up to {max_text} "
                             f"text tokens (manifest max_text_len) but the largest pad length is "
                             f"{self.text_pad_to[-1]}: add a length >= {max_text} to data.text_pad_to")
        self.shard_paths = [s["path"] for s in self.manifest["shards"]]
        self.shard_index = [(s.get("index"), s.get("index_crc")) for s in self.manifest["shards"]]
        self.locate = [(i, k) for i, s in enumerate(self.manifest["shards"]) for k in s["keys"]]
        self.shard_bucket = [s["bucket"] for s in self.manifest["shards"]]
        self.bucket_ids = sample_ids_by_bucket(self.manifest)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.max_open_files, self.io_retries = int(max_open_files), int(io_retries)
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
        self.last_skipped_count = 0
        self.startup_notes = self._check_sizes()
        self._iter = None
        self._plan: Plan | None = None
        self._offset = 0

    def _check_sizes(self) -> list[str]:
        """One line naming every shard whose size on disk differs from the manifest (truncated, rewritten)."""
        bad = []
        for s in self.manifest["shards"]:
            path = self.root / s["path"]
            try:
                size = path.stat().st_size
            except OSError as e:
                raise _io_error(path, e, 1) from e
            if "bytes" in s and size != int(s["bytes"]):
                bad.append(f"{s['path']} ({size} bytes, manifest {s['bytes']})")
        if not bad:
            return []
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        note = (f"{len(bad)} shard(s) under {self.root} differ in size from {MANIFEST_NAME}: {shown}; their damaged "
                "samples will be skipped and counted, the intact ones used. Re-run motif-preprocess to rebuild them")
        log.warning(note)
        return [note]

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
            s, batches, msgs, n_bad = next(self._iter)
        except StopIteration:  # epoch done: the next epoch has a fresh (seed, epoch) plan
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.segments = [[0, self.dp_size]]
            self._reset()
            self._start()
            s, batches, msgs, n_bad = next(self._iter)
        assert s == self.step_in_epoch, (s, self.step_in_epoch)
        self.step_in_epoch += 1
        self.last_skipped, self.last_skipped_count = msgs, n_bad  # logged / summed over ranks by the trainer
        self.skipped_total += n_bad
        if not batches:
            plan_step = self._plan.steps[s - self._offset]
            keys = [self.locate[g][1] for g in plan_step.samples[self.dp_rank].tolist()]
            raise RuntimeError(f"step {step}: every sample of this rank's batch {keys} (bucket {plan_step.bucket}) "
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
