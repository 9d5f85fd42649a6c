"""Small helpers shared across modules (no torch.distributed, no trainer imports)."""

from __future__ import annotations

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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
