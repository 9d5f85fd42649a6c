"""Reading the held-out (validation) samples of a preprocessed dataset (the split: data/split.py).

:class:`HeldOutReader` is what `evaluation/val_loss.py` takes: the held-out global ids per bucket (from the
sample index's head, O(held-out)), whether a bucket's samples carry SigLIP tokens (I2V), and one sample as a
one-row :class:`~motif_train.batch.Batch` read with the loader's own reader (crc32-checked members). It holds no
worker processes and imports nothing of the trainer, so the trainer and a `motif-eval` sidecar share it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from motif_train.batch import Batch

from .loader import _Reader, collate
from .sample_index import SampleIndex
from .shards import load_manifest
from .split import heldout_ids_by_bucket


class HeldOutReader:
    """``bucket_ids(b)``: held-out ids of bucket ``b`` (int64, ascending); ``key(gid)``; ``read(gid)`` -> Batch of one
    sample; ``has_image(b)``: every sample of ``b`` has image tokens (so I2V can be evaluated on every rank)."""

    def __init__(self, root: str | Path, *, text_pad_to: list[int] | tuple[int, ...] = (64, 128, 256, 512),
                 max_open_files: int = 16, io_retries: int = 3) -> None:
        self.root = Path(root)
        index = SampleIndex.open(self.root)
        if index is None:
            index = SampleIndex.from_manifest(load_manifest(self.root))
        index.check_version(self.root)
        self.index = index
        self.text_pad_to = tuple(text_pad_to)
        self.buckets = index.head.get("buckets", {})
        self.split = index.head.get("val_split") or {}
        self._ids = heldout_ids_by_bucket(index.head)
        self._reader = _Reader(self.root, int(max_open_files), int(io_retries))

    @property
    def num_samples(self) -> int:
        return int(sum(v.size for v in self._ids.values()))

    def bucket_ids(self, bucket: str) -> np.ndarray:
        return self._ids.get(bucket, np.zeros(0, np.int64))

    def has_image(self, bucket: str) -> bool:
        b = self.buckets.get(bucket, {})
        n = b.get("image_samples")
        return isinstance(n, int) and n == int(b.get("samples", -1)) and n > 0

    def key(self, gid: int) -> str:
        return self.index.key(int(gid))

    def read(self, gid: int, *, teacher: bool = False) -> Batch:
        """One held-out sample (CorruptSample propagates: a damaged validation sample is an error to fix);
        `teacher`: with its stored teacher pixels (the video metrics' fd_vjepa reference)."""
        (loc,) = self.index.locate(np.asarray([int(gid)], np.int64))
        return collate([self._reader.read(loc)], teacher, self.text_pad_to)

    def close(self) -> None:
        self._reader.files.close()
