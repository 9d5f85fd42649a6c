"""The held-out (validation) split: a deterministic share of every bucket that is never planned for training.

`motif-preprocess` chooses it when it writes the manifest (:func:`apply_split`), so every consumer — the
planner, the loader, `motif-plan`, the in-loop validation loss and a `motif-eval` sidecar — reads the same
split from one place and nothing recomputes it at training time. The rule, per bucket of ``n`` samples:

1. a key is held out when its *split hash* ``u(key) = sha256("motif-val:" + key)[:8] (little-endian) / 2**64``
   (in [0, 1), independent of the data around it) is below ``fraction``;
2. a bucket with fewer than ``target = min(min_per_bucket, floor(max_share * n))`` held-out keys is topped up to
   ``target``: keys new to this run first (never trained), then previously trained ones, smallest hash first;
3. *sticky*: every key the previous manifest of the same root held out (and that is still in the data) stays
   held out, whatever the settings now.

So adding data (a re-run with more inputs) never moves a held-out key into training, and a previously trained
key moves into validation only through rule 2 — when its bucket holds fewer than ``target`` held-out keys after
rules 1 and 3 *and* the bucket's new keys cannot fill the gap (e.g. a bucket that grew from 10 to 100 samples
with ``min_per_bucket=8``: its target rises from 1 to 8, filled from the 90 new keys). Lowering ``fraction`` on
an existing root keeps the old held-out keys (rule 3): they were never trained, so they stay clean validation.

Manifest record (``manifest["val_split"]``; ``buckets[b]["val_samples"]`` is its count per bucket)::

    {"version": 1, "fraction": f, "min_per_bucket": m, "max_share": s, "hash": "...", "samples": N_val,
     "buckets": {bucket: {"samples": n_val, "of": n, "ids": [global ids, ascending], "keys": [keys, in id order]}}}

``ids`` are global sample ids of this manifest (positions in the concatenation of the shards' keys), which
change when shards are added; ``keys`` do not. At 10⁶ samples and 1 % that is 10⁴ ids and keys (~0.4 MB of
JSON, in ``sample_index/head.json`` too): the only split state a rank holds, O(held-out), not O(dataset).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import numpy as np

SPLIT_VERSION = 1
MAX_SHARE = 0.1  # the per-bucket minimum never holds out more than this share of a bucket
HASH_DOC = "sha256('motif-val:' + key)[:8] little-endian / 2**64 < fraction"


def split_hash(key: str) -> float:
    """u(key) in [0, 1): the split's stable hash of a sample key (never Python's salted ``hash``)."""
    d = hashlib.sha256(b"motif-val:" + key.encode("utf-8")).digest()
    return int.from_bytes(d[:8], "little") / 2.0**64


def choose_heldout(keys: Iterable[str], *, fraction: float, min_per_bucket: int, max_share: float = MAX_SHARE,
                   previous: Iterable[str] = (), trained: Iterable[str] = ()) -> set[str]:
    """Held-out keys of ONE bucket (module doc): ``previous`` = keys held out before (kept), ``trained`` = keys
    that were in the previous manifest's training part (topped up last)."""
    keys = list(keys)
    present = set(keys)
    u = {k: split_hash(k) for k in keys}
    out = {k for k in keys if u[k] < fraction} | (set(previous) & present)
    target = min(int(min_per_bucket), int(math.floor(max_share * len(keys) + 1e-9)))
    if len(out) < target:
        old = set(trained)
        rest = sorted((k for k in keys if k not in out), key=lambda k: (k in old, u[k], k))
        out.update(rest[:target - len(out)])
    return out


def apply_split(manifest: dict, *, fraction: float = 0.0, min_per_bucket: int = 0, max_share: float = MAX_SHARE,
                previous: Mapping | None = None) -> dict:
    """Record the split in ``manifest`` (in place, returned): ``val_split`` and ``buckets[b]["val_samples"]``.
    ``previous``: the manifest this root had before (its held-out keys stay held out, its other keys count as
    trained), or None."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"val_fraction={fraction} must be in [0, 1)")
    if int(min_per_bucket) < 0 or not 0.0 <= float(max_share) < 1.0:
        raise ValueError(f"val_min_per_bucket={min_per_bucket} must be >= 0 and max_share={max_share} in [0, 1)")
    prev_held: set[str] = set()
    prev_all: set[str] = set()
    if previous:
        for b in (previous.get("val_split") or {}).get("buckets", {}).values():
            prev_held.update(b.get("keys", []))
        prev_all = {k for s in previous.get("shards", []) for k in s.get("keys", [])}
    by_bucket: dict[str, list[tuple[int, str]]] = {b: [] for b in manifest.get("buckets", {})}
    gid = 0
    for s in manifest.get("shards", []):
        for k in s["keys"]:
            by_bucket.setdefault(s["bucket"], []).append((gid, k))
            gid += 1
    record: dict[str, dict] = {}
    total = 0
    for name, rows in by_bucket.items():
        keys = [k for _, k in rows]
        held = choose_heldout(keys, fraction=float(fraction), min_per_bucket=int(min_per_bucket),
                              max_share=float(max_share), previous=prev_held, trained=prev_all - prev_held)
        chosen = [(g, k) for g, k in rows if k in held]
        record[name] = {"samples": len(chosen), "of": len(rows), "ids": [g for g, _ in chosen],
                        "keys": [k for _, k in chosen]}
        if name in manifest.get("buckets", {}):
            manifest["buckets"][name]["val_samples"] = len(chosen)
        total += len(chosen)
    manifest["val_split"] = {"version": SPLIT_VERSION, "fraction": float(fraction),
                             "min_per_bucket": int(min_per_bucket), "max_share": float(max_share),
                             "hash": HASH_DOC, "samples": total, "buckets": record}
    return manifest


def heldout_ids_by_bucket(manifest: Mapping) -> dict[str, np.ndarray]:
    """Held-out global ids (int64, ascending) per bucket of the manifest's ``val_split`` (empty: none)."""
    split = manifest.get("val_split") or {}
    return {b: np.asarray(v.get("ids", []), np.int64) for b, v in (split.get("buckets") or {}).items()}


def heldout_counts(manifest: Mapping, buckets: Iterable[str] | None = None) -> dict[str, int]:
    """Held-out sample count per bucket (all buckets of the split, or the given ones; 0 where none)."""
    by = heldout_ids_by_bucket(manifest)
    names = list(by) if buckets is None else list(buckets)
    return {b: int(by[b].size) if b in by else 0 for b in names}
