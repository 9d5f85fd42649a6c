"""The shard dataset's on-disk contract: file names and versions, the per-shard member index, member names.

The names the writer (`shards.py`), the consolidated sample index (`sample_index.py`) and the readers
(`tar_index.py`, `loader.py`) must agree on, in one place below all of them: this module imports no other
module of `motif_train.data`, so none of them has to import another just for a name (the data package's
import graph is acyclic; `tests/unit/test_data_imports.py`). The layout and the sample members are described
in `shards.py`, which re-exports these names (`from motif_train.data.shards import CorruptSample` keeps
working).

Member index (`<shard>.tar.idx.json`, beside every tar)::

    {"version": INDEX_VERSION, "tar_bytes": N, "members": [[name, data_offset, size, crc32], ...]}   (tar order)

A member is named `<key>.<field>` (`latents.npy`, `text.npy`, `image.npy`, `teacher.npy`, `json`): the key
is everything before the first dot, as webdataset splits it.
"""

from __future__ import annotations

import json

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_NAME = "empty_prompt.npy"
FAILURES_NAME = "failures.jsonl"
SHARDS_DIR = "shards"
INDEX_SUFFIX = ".idx.json"  # <shard>.tar.idx.json: member offsets, sizes and crc32 (module doc)
INDEX_VERSION = 1

__all__ = [
    "EMPTY_PROMPT_NAME", "FAILURES_NAME", "INDEX_SUFFIX", "INDEX_VERSION", "MANIFEST_NAME", "MANIFEST_VERSION",
    "SHARDS_DIR", "CorruptSample", "index_name", "member_key", "parse_index",
]


class CorruptSample(ValueError):
    """A sample is missing a member, has unreadable bytes, or its arrays disagree with its meta.

    `CorruptSample(key, field, problem)` (attributes `key`, `field`) or `CorruptSample(message)`.
    """

    def __init__(self, key: str, field: str | None = None, problem: str | None = None):
        self.key, self.field = (key, field) if field is not None else (None, None)
        super().__init__(key if field is None else f"corrupt sample {key!r}: field {field!r}: {problem}")


def member_key(name: str) -> str:
    """The sample key of a tar member `<key>.<field>` (everything before the first dot, as webdataset)."""
    return name.split(".", 1)[0]


def index_name(shard: str) -> str:
    """Relative path of a shard's member index: `<shard>.tar` + INDEX_SUFFIX."""
    return shard + INDEX_SUFFIX


def parse_index(data: bytes) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """Bytes of a `<shard>.tar.idx.json` -> (tar_bytes, {member name: (data offset, size, crc32)});
    ValueError when it is not a valid index."""
    idx = json.loads(bytes(data).decode("utf-8"))
    if not isinstance(idx, dict) or idx.get("version") != INDEX_VERSION:
        raise ValueError(f"not a shard index of version {INDEX_VERSION}")
    members: dict[str, tuple[int, int, int]] = {}
    for row in idx["members"]:
        name, off, size, crc = row
        if not (isinstance(name, str) and all(isinstance(v, int) and v >= 0 for v in (off, size, crc))):
            raise ValueError(f"bad index row {row!r}")
        members[name] = (off, size, crc)
    return int(idx["tar_bytes"]), members
