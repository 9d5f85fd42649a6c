"""File access for the shard loader: a bounded set of open tars with retried reads, and the per-shard member
index (name -> offset, size, crc32) for shards the consolidated sample index cannot serve.

A shard's member index is its `<shard>.tar.idx.json` (format in shard_format.py) or, for a shard without a usable
one (datasets from before it), a tolerant walk over its 512-byte tar headers: stdlib `tarfile` gives up on
the whole archive at the first truncated member, this walk loses only the samples around the damage.

Every OSError of a read is the machine's (a short file gives short bytes, it does not raise): it is retried
`retries` times with a doubling backoff, then `DataIOError` names the shard, the errno and the fix.
"""

from __future__ import annotations

import errno
import os
import time
import zlib
from collections import OrderedDict
from pathlib import Path

from .shard_format import CorruptSample, member_key, parse_index


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


def io_error(path: Path, err: OSError, attempts: int) -> DataIOError:
    name = errno.errorcode.get(err.errno, str(err.errno))
    return DataIOError(err.errno, f"reading shard {path} failed with {name} ({err.strerror or err}) after "
                       f"{attempts} attempt(s): {_HINTS.get(err.errno, 'check the data filesystem')}. A machine "
                       "error, not a corrupt sample: the run stops rather than skip good data")


class Files:
    """One process's open tars — at most `max_open`, the least recently used closed first — and reads
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
        raise io_error(path, err, self.retries + 1) from err

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


def _resync(files: Files, path: Path, pos: int, size: int) -> int | None:
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


class TarIndex:
    """Member index of one shard: `members` {name: (data offset, size, crc32 or None)}, `bad` {key: why
    that sample cannot be served}, `note` (how it was built, when not from its own index file)."""

    def __init__(self, path: Path, files: Files, index: Path | None = None, index_crc: int | None = None):
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
            self.by_key.setdefault(member_key(name), []).append(name)

    def _from_index(self, files: Files, index: Path, crc: int | None, size: int) -> str | None:
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
                self.bad.setdefault(member_key(name), f"truncated: member {name} ends at byte {off + n}, the file has "
                                                f"{size} bytes")
                self.damage = f"the file is truncated at byte {size}"
            else:
                self.members[name] = (off, n, c)
        return None

    def _scan(self, files: Files, size: int) -> None:
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
            self.bad.setdefault(member_key(name), why)

    def sample(self, key: str, files: Files) -> dict[str, bytes]:
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

