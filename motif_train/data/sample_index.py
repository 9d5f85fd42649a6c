"""The consolidated sample index beside the manifest: where every sample's bytes are, as flat numpy arrays.

At 10⁶ samples in 10⁵ shards, parsing manifest.json (every key of every shard) on every rank, holding a
Python tuple per sample and reading 10⁵ `<shard>.tar.idx.json` files at run time would cost each rank
O(dataset) memory and start-up. `save_manifest` therefore also writes, from the per-shard indexes::

    <root>/sample_index/head.json    {"version", "manifest": {bytes, mtime_ns, crc32}, "samples", "shards",
                                      "head": the manifest without its "shards" list}
    <root>/sample_index/shards.npy   structured (n_shards,): path, bucket, samples, bytes, index, index_crc,
                                      indexed (its member rows below are usable)
    <root>/sample_index/samples.npy  structured (n_samples,), row = global sample id: shard, key,
                                      off/size/crc (5,) for the members in FIELDS (size -1: no such member)

The loader memory-maps the two `.npy` files (plain dtypes, `allow_pickle=False`), so a rank only faults in
the rows of the samples it reads and the page cache is shared by all ranks of a node. head.json is written
last: it names the manifest it was built from, and a manifest changed since (a different size and mtime,
and a different crc32) makes the index stale: the loader then reads the manifest as before (with a warning).
A shard without a usable per-shard index (older datasets, an index whose crc32 differs from the manifest's)
has `indexed=False`: its samples are served by `tar_index.TarIndex` (its own index file, or a header walk).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from motif_train.utils import write_atomic

from .shard_format import MANIFEST_NAME, MANIFEST_VERSION, member_key, parse_index

log = logging.getLogger(__name__)

SAMPLE_INDEX_DIR = "sample_index"
SAMPLE_INDEX_VERSION = 1
FIELDS = ("latents.npy", "text.npy", "image.npy", "teacher.npy", "json")  # member suffixes a row locates
_NF = len(FIELDS)


def _shard_dtype(path_w: int, index_w: int) -> np.dtype:
    return np.dtype([("path", f"S{path_w}"), ("bucket", "<i4"), ("samples", "<i8"), ("bytes", "<i8"),
                     ("index", f"S{index_w}"), ("index_crc", "<i8"), ("indexed", "?")])


def _sample_dtype(key_w: int) -> np.dtype:
    return np.dtype([("shard", "<i4"), ("key", f"S{key_w}"), ("off", "<i8", (_NF,)), ("size", "<i8", (_NF,)),
                     ("crc", "<u4", (_NF,))])


def _width(strings) -> int:
    return max((len(s) for s in strings), default=0) or 1


def build_arrays(root: str | Path | None, manifest: Mapping) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(shards (n_shards,), samples (n_samples,), bucket names) of a manifest. With `root`, every shard's
    `<shard>.tar.idx.json` whose crc32 and tar size match the manifest fills its samples' member rows;
    without (or for a shard without one), the rows stay -1 and the shard is `indexed=False`."""
    shards = manifest.get("shards", [])
    buckets = list(manifest.get("buckets", {}))
    for s in shards:
        if s["bucket"] not in buckets:
            buckets.append(s["bucket"])
    bucket_id = {b: i for i, b in enumerate(buckets)}
    enc = [(s["path"].encode(), (s.get("index") or "").encode()) for s in shards]
    keys = [k.encode() for s in shards for k in s["keys"]]
    sh = np.zeros(len(shards), _shard_dtype(_width(p for p, _ in enc), _width(i for _, i in enc)))
    rows = np.zeros(len(keys), _sample_dtype(_width(keys)))
    rows["off"], rows["size"] = -1, -1
    rows["key"] = keys
    start = 0
    for i, s in enumerate(shards):
        n = len(s["keys"])
        sh[i] = (enc[i][0], bucket_id[s["bucket"]], n, int(s.get("bytes", -1)), enc[i][1],
                 int(s["index_crc"]) if s.get("index_crc") is not None else -1, False)
        rows["shard"][start:start + n] = i
        if root is not None and s.get("index"):
            sh["indexed"][i] = _fill(Path(root), s, rows[start:start + n])
        start += n
    return sh, rows, buckets


def _fill(root: Path, shard: Mapping, rows: np.ndarray) -> bool:
    """Member rows of one shard from its index file; False (rows untouched) when it cannot be trusted."""
    try:
        data = (root / shard["index"]).read_bytes()
        if shard.get("index_crc") is not None and zlib.crc32(data) != int(shard["index_crc"]):
            return False
        tar_bytes, members = parse_index(data)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if "bytes" in shard and tar_bytes != int(shard["bytes"]):
        return False
    slot = {k: j for j, k in enumerate(shard["keys"])}
    col = {f: j for j, f in enumerate(FIELDS)}
    off, size, crc = np.full((len(slot), _NF), -1, np.int64), np.full((len(slot), _NF), -1, np.int64), \
        np.zeros((len(slot), _NF), np.uint32)
    for name, (o, n, c) in members.items():
        key = member_key(name)
        j, f = slot.get(key), col.get(name[len(key) + 1:])
        if j is not None and f is not None:
            off[j, f], size[j, f], crc[j, f] = o, n, c
    rows["off"], rows["size"], rows["crc"] = off, size, crc
    return True


def _stamp(path: Path) -> dict:
    st = path.stat()
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "crc32": crc}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_sample_index(root: str | Path, manifest: Mapping) -> Path:
    """Write `<root>/sample_index/` for the manifest just saved as `<root>/manifest.json` (module doc)."""
    root = Path(root)
    out = root / SAMPLE_INDEX_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "head.json").unlink(missing_ok=True)  # no head: never a half-written index that looks valid
    sh, rows, buckets = build_arrays(root, manifest)
    _save_npy(out / "shards.npy", sh)
    _save_npy(out / "samples.npy", rows)
    head = {k: v for k, v in manifest.items() if k != "shards"}
    write_atomic(out / "head.json", json.dumps({
        "version": SAMPLE_INDEX_VERSION, "manifest": _stamp(root / MANIFEST_NAME), "samples": int(rows.size),
        "shards": int(sh.size), "indexed_shards": int(sh["indexed"].sum()), "bucket_names": buckets,
        "head": head}) + "\n")
    return out


class SampleIndex:
    """Read side: `head` (the manifest without "shards"), `shards` / `samples` (arrays, module doc; memory-
    mapped when opened from disk), `bucket_names`, `runs` (consecutive shards of one bucket merged: what the
    planner needs instead of the per-shard key lists), `mapped` (True when read from `sample_index/`)."""

    def __init__(self, head: dict, shards: np.ndarray, samples: np.ndarray, bucket_names: list[str],
                 mapped: bool) -> None:
        self.head, self.shards, self.samples = head, shards, samples
        self.bucket_names, self.mapped = bucket_names, mapped
        self.runs: list[dict] = []
        for b, n in zip(shards["bucket"].tolist(), shards["samples"].tolist(), strict=True):
            if self.runs and self.runs[-1]["_b"] == b:
                self.runs[-1]["samples"] += n
            else:
                self.runs.append({"_b": b, "bucket": bucket_names[b], "samples": n})
        for r in self.runs:
            del r["_b"]

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    def plan_manifest(self) -> dict:
        """What `plan.build_plan` reads (bucket table + per-shard counts + the held-out split), O(buckets + held-out)
        instead of O(samples)."""
        out = {"buckets": self.head.get("buckets", {}), "shards": self.runs}
        if self.head.get("val_split"):  # the held-out ids: O(held-out), never planned for training
            out["val_split"] = self.head["val_split"]
        return out

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> SampleIndex:
        """In-memory index of a parsed manifest (no member rows): every shard served by `TarIndex`."""
        sh, rows, buckets = build_arrays(None, manifest)
        return cls({k: v for k, v in manifest.items() if k != "shards"}, sh, rows, buckets, mapped=False)

    @classmethod
    def open(cls, root: str | Path) -> SampleIndex | None:
        """The index under `root`, memory-mapped; None when there is none or it is stale (logged)."""
        root = Path(root)
        d = root / SAMPLE_INDEX_DIR
        try:
            meta = json.loads((d / "head.json").read_text())
        except (OSError, ValueError):
            return None
        why = None
        try:
            st = (root / MANIFEST_NAME).stat()
            want = meta["manifest"]
            if (st.st_size, st.st_mtime_ns) != (want["bytes"], want["mtime_ns"]) and (
                    st.st_size != want["bytes"] or _stamp(root / MANIFEST_NAME)["crc32"] != want["crc32"]):
                why = f"{MANIFEST_NAME} changed since it was written"
            elif meta.get("version") != SAMPLE_INDEX_VERSION:
                why = f"version {meta.get('version')!r}, this code reads {SAMPLE_INDEX_VERSION}"
            else:
                shards = np.load(d / "shards.npy", mmap_mode="r", allow_pickle=False)
                samples = np.load(d / "samples.npy", mmap_mode="r", allow_pickle=False)
                if (shards.shape[0], samples.shape[0]) != (meta["shards"], meta["samples"]):
                    why = "array lengths differ from head.json"
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            log.warning("%s is stale or unreadable (%s): reading %s instead; saving the manifest again "
                        "(a motif-preprocess re-run) rewrites it", d, why, root / MANIFEST_NAME)
            return None
        return cls(meta["head"], shards, samples, meta["bucket_names"], mapped=True)

    def check_version(self, root: Path) -> None:
        if self.head.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{root / MANIFEST_NAME}: manifest version {self.head.get('version')!r}, this code "
                             f"reads version {MANIFEST_VERSION}; re-run motif-preprocess into a new --out")

    def locate(self, gids: np.ndarray) -> list[tuple]:
        """Global sample ids -> one picklable tuple per sample, everything a worker needs to read it:
        (gid, shard path, key, indexed, index path or None, index crc or None, off (5,), size (5,), crc (5,))."""
        gids = np.asarray(gids, np.int64)
        rows = self.samples[gids]
        sh = self.shards[rows["shard"]]
        out = []
        for g, r, s in zip(gids.tolist(), rows, sh, strict=True):
            index = s["index"].decode() or None
            out.append((g, s["path"].decode(), r["key"].decode(), bool(s["indexed"]), index,
                        None if s["index_crc"] < 0 else int(s["index_crc"]), r["off"].tolist(),
                        r["size"].tolist(), r["crc"].tolist()))
        return out

    def where(self, gid: int) -> str:
        """"<key> (<shard path>)" of one sample, for messages."""
        r = self.samples[int(gid)]
        return f"{r['key'].decode()} ({self.shards[int(r['shard'])]['path'].decode()})"

    def key(self, gid: int) -> str:
        return self.samples[int(gid)]["key"].decode()
