"""Small helpers shared across modules (no torch.distributed, no trainer imports)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path


def stable_seed(*keys) -> int:
    """A 63-bit seed that is a pure function of `keys` (unlike `hash`, stable across processes)."""
    digest = hashlib.blake2b(":".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temp file + fsync + rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no stray temp file next to the target after a failed write
        raise


class JsonlFile:
    """One JSONL file kept on local disk and published whole to `remote` by `sync`.

    Local appends are cheap and safe; the remote copy is only ever replaced atomically, so a
    reader (or a resume) sees the file as of the last sync. Write errors warn once per kind and
    never raise: if the local copy fails, lines are kept in memory from then on."""

    def __init__(self, remote: Path, local: Path, warn) -> None:
        self.remote, self.local, self._warn = remote, local, warn
        self._fh = None
        self._mem: list[str] | None = None  # the whole file, when the local copy is unusable
        self._since_sync: list[str] = []  # to rebuild the file if the local copy fails later
        self._dirty = False
        self._base_ok = True
        base = ""
        try:
            if remote.is_file():  # a resumed run keeps the earlier lines
                base = remote.read_text()
        except (OSError, ValueError) as e:
            self._base_ok = False  # never replace a remote file we could not read
            self._warn("read", f"could not read {remote} ({type(e).__name__}: {e}); it will not be overwritten")
        if base and not base.endswith("\n"):
            base = base[: base.rfind("\n") + 1]  # a torn last line (never written by sync) is dropped
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(local, base)
            self._fh = open(local, "a")  # noqa: SIM115 - kept open for the run: one append per line
        except (OSError, ValueError) as e:
            self._warn("local", f"local metrics copy {local} unusable ({type(e).__name__}: {e}); keeping the "
                                "lines in memory and syncing them to the run dir")
            self._mem = [base]

    def write(self, line: str) -> None:
        self._dirty = True
        self._since_sync.append(line)
        if self._mem is not None:
            self._mem.append(line)
            return
        try:
            self._fh.write(line)
            self._fh.flush()
        except (OSError, ValueError) as e:
            self._warn("local", f"writing {self.local} failed ({type(e).__name__}: {e}); keeping the lines in "
                                "memory and syncing them to the run dir")
            self._to_memory()

    def _to_memory(self) -> None:
        """Rebuild the whole file in memory: the run dir's copy (as of the last sync) + lines since."""
        try:
            base = self.remote.read_text() if self.remote.is_file() else ""
        except (OSError, ValueError):
            base, self._base_ok = "", False
        self._mem = [base, *self._since_sync]
        try:
            self._fh.close()
        except (OSError, ValueError):
            pass
        self._fh = None

    def text(self) -> str:
        if self._mem is not None:
            return "".join(self._mem)
        try:
            self._fh.flush()
            return self.local.read_text()
        except (OSError, ValueError) as e:
            self._warn("local", f"reading {self.local} failed ({type(e).__name__}: {e}); keeping the lines in "
                                "memory")
            self._to_memory()
            return "".join(self._mem)

    def sync(self) -> bool:
        """Replace the run dir's copy with the whole file (atomic); False (and one warning) on failure."""
        if not self._dirty:
            return True
        if not self._base_ok:
            self._warn("sync", f"not syncing {self.remote}: its earlier content could not be read")
            return False
        try:
            write_atomic(self.remote, self.text())
        except (OSError, ValueError) as e:
            self._warn("sync", f"syncing {self.remote} failed ({type(e).__name__}: {e}); retrying at the next "
                               "checkpoint")
            return False
        self._dirty = False
        self._since_sync.clear()
        return True

    def path_for_reading(self) -> Path:
        return self.local if self._mem is None else self.remote

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except (OSError, ValueError):
                pass
            self._fh = None
