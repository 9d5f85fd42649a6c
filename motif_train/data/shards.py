"""The shard format: WebDataset tars of precomputed training tensors, grouped by bucket.

Layout under a dataset root (written by `motif-preprocess`, read by the planner and loader)::

    <root>/manifest.json                      per-shard keys/counts, per-bucket totals (MANIFEST_VERSION)
                                              and per-bucket `image_samples` (samples with image.npy)
    <root>/empty_prompt.npy                   float16 (L0, C_text): trimmed embedding of "" (CFG dropout)
    <root>/failures.jsonl                     {"source", "reason"} per clip that could not be used
    <root>/shards/<bucket>/<bucket>-r<rank:02d>-<idx:05d>.tar

A bucket is named "FxHxW" (pixel frames x height x width, frames = 1+4k, H and W multiples
of 16). One sample per key; tar members (`<key>.<field>`):

    latents.npy   float16 (16, 1+(F-1)/4, H/8, W/8)  normalised Wan VAE latents
    text.npy      float16 (L, C_text)                 text embeddings trimmed to the true length
    image.npy     float16 (I, C_img)                  SigLIP tokens of frame 0 (optional)
    teacher.npy   uint8 (3, 2+4k, S, S)               REPA teacher pixels, round((x+1)*127.5) (optional)
    json          {"key", "caption", "source", "bucket", "frames", "fps", "orig_size", "orig_frames",
                   "latent_shape", "text_len", "tokens", ...}

Arrays are `.npy` written by `np.save` and read with `allow_pickle=False`: nothing is pickled.

Image tokens. A shard entry and a bucket of the manifest count their samples that carry `image.npy`
(`image_samples`): I2V needs them in EVERY sample of a video bucket (the task of a step is the same on
every rank, so no rank may fall back to T2V), which `check_image_tokens` verifies at start-up. Manifests
from before the count have no such key (the loader then counts from its sample index, or trusts the
manifest's encoders; `ShardSource.image_samples`).

Member index and checksums. Beside every tar, `ShardWriter` writes `<shard>.tar.idx.json` (before the
tar's atomic rename, so a finished tar always has one)::

    {"version": 1, "tar_bytes": N, "members": [[name, data_offset, size, crc32], ...]}   (tar order)

crc32 (`zlib.crc32`) is over each member's payload bytes. The manifest's shard entry names it
(`"index"`, relative to the root) with the crc32 of the index file itself (`"index_crc"`). The loader
reads members at those offsets without parsing the tar, verifies each crc, and treats a member that
ends past the end of the file as truncated. `save_manifest` also consolidates all shards' indexes into
`<root>/sample_index/` (flat numpy arrays, memory-mapped by the loader; format in sample_index.py), so at
run time no per-shard index file is read either. A shard without an index (datasets from before it; the
manifest version is unchanged and such manifests still load), or whose index does not match its
`index_crc`, is indexed by a tolerant walk of its 512-byte tar headers instead: no checksums then,
only the decode checks below. `decode_sample` also rejects non-finite float arrays (NaN/Inf), so
flipped bytes that keep a valid `.npy` header are caught even without a checksum.

The names every data module shares (file names and versions, `CorruptSample`, `parse_index`, `index_name`,
`member_key`) live in `shard_format.py`, below this module and the sample index; they are re-exported here.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from motif_train.utils import write_atomic

from .sample_index import write_sample_index
from .shard_format import (
    EMPTY_PROMPT_NAME,
    FAILURES_NAME,
    INDEX_SUFFIX,
    INDEX_VERSION,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SHARDS_DIR,
    CorruptSample,
    index_name,
    member_key,
    parse_index,
)

PathLike = str | Path

# Tar member suffixes (webdataset "extensions") of one sample.
ARRAY_FIELDS = ("latents", "text", "image", "teacher")
REQUIRED_FIELDS = ("latents", "text")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_BUCKET_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_SHARD_RE = re.compile(r"^(?P<bucket>\d+x\d+x\d+)-r(?P<rank>\d+)-(?P<idx>\d+)\.tar$")

__all__ = [
    "MANIFEST_VERSION", "CorruptSample", "ShardWriter", "bucket_name", "bucket_info", "decode_sample",
    "check_image_tokens", "count_image_samples", "encode_sample", "index_entry", "index_keys", "latent_shape",
    "load_manifest", "merge_manifests", "parse_bucket", "parse_index", "save_manifest", "shard_name", "validate_bucket",
    "video_tokens",
    # the on-disk names, defined in shard_format.py and re-exported here
    "EMPTY_PROMPT_NAME", "FAILURES_NAME", "INDEX_SUFFIX", "INDEX_VERSION", "MANIFEST_NAME", "SHARDS_DIR", "index_name",
    "member_key",
]


# ------------------------------------------------------------------------------- buckets


def validate_bucket(f: int, h: int, w: int) -> None:
    """Raise ValueError unless frames = 1+4k (Wan VAE) and H, W are multiples of 16 (VAE x8, patch x2)."""
    name = f"{f}x{h}x{w}"
    if int(f) < 1 or (int(f) - 1) % 4:
        raise ValueError(f"bucket {name}: frames={f} must be 1+4k (1, 5, 9, ..., 121) for the Wan VAE")
    if int(h) < 16 or int(w) < 16 or int(h) % 16 or int(w) % 16:
        raise ValueError(f"bucket {name}: height x width {h}x{w} must be positive multiples of 16 "
                         "(VAE /8 then patch /2)")


def bucket_name(f: int, h: int, w: int) -> str:
    """(frames, height, width) -> "FxHxW", validated."""
    validate_bucket(f, h, w)
    return f"{int(f)}x{int(h)}x{int(w)}"


def parse_bucket(name: str) -> tuple[int, int, int]:
    """"FxHxW" -> (frames, height, width), validated."""
    m = _BUCKET_RE.match(str(name).strip())
    if not m:
        raise ValueError(f"bucket {name!r} is not of the form FRAMESxHEIGHTxWIDTH, e.g. 9x64x96")
    f, h, w = (int(x) for x in m.groups())
    validate_bucket(f, h, w)
    return f, h, w


def latent_shape(f: int, h: int, w: int, z_dim: int = 16) -> list[int]:
    """Shape of the normalised Wan VAE latents of an (F, H, W) clip."""
    return [z_dim, 1 + (f - 1) // 4, h // 8, w // 8]


def video_tokens(f: int, h: int, w: int) -> int:
    """DiT video tokens of an (F, H, W) clip: latent frames x (H/16) x (W/16)."""
    return (1 + (f - 1) // 4) * (h // 16) * (w // 16)


def bucket_info(name: str) -> dict:
    """Manifest fields derived from a bucket name (samples/shards are filled in by the caller)."""
    f, h, w = parse_bucket(name)
    return {"frames": f, "height": h, "width": w, "latent_shape": latent_shape(f, h, w),
            "tokens": video_tokens(f, h, w)}


def shard_name(bucket: str, rank: int, idx: int) -> str:
    """Relative path of a shard: shards/<bucket>/<bucket>-r<rank:02d>-<idx:05d>.tar."""
    return f"{SHARDS_DIR}/{bucket}/{bucket}-r{rank:02d}-{idx:05d}.tar"


def parse_shard_name(path: PathLike) -> tuple[str, int, int] | None:
    """shards/.../<bucket>-r<rank>-<idx>.tar -> (bucket, rank, idx), None for other names."""
    m = _SHARD_RE.match(Path(path).name)
    return (m["bucket"], int(m["rank"]), int(m["idx"])) if m else None


# ------------------------------------------------------------------------------- samples


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def teacher_to_uint8(x: np.ndarray) -> np.ndarray:
    """Teacher pixels in [-1, 1] -> uint8 round((x+1)*127.5); uint8 input is kept."""
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def teacher_from_uint8(x: np.ndarray) -> np.ndarray:
    """Inverse of `teacher_to_uint8` (up to rounding): uint8 -> float32 in [-1, 1]."""
    return x.astype(np.float32) / 127.5 - 1.0


def encode_sample(key: str, latents, text, image=None, teacher=None, meta: Mapping | None = None) -> dict:
    """Arrays + meta -> a webdataset sample {"__key__", "latents.npy", "text.npy", ["image.npy"],
    ["teacher.npy"], "json"} of bytes, ready for `webdataset.TarWriter(encoder=False)`.

    latents (16, f, h, w), text (L, C) and image (I, C) are stored as float16; teacher pixels
    (3, 2+4k, S, S) in [-1, 1] (or already uint8) as uint8. `meta` gets "key", "latent_shape"
    and "text_len" filled in from the arrays; a conflicting value there is an error.
    """
    if meta is None:
        raise ValueError(f"encode_sample({key!r}): meta is required")
    if not _KEY_RE.match(key):
        raise ValueError(f"encode_sample: key {key!r} must match {_KEY_RE.pattern} (no dots or slashes: "
                         "webdataset splits member names at the first dot)")
    lat = _to_numpy(latents).astype(np.float16)
    txt = _to_numpy(text).astype(np.float16)
    if lat.ndim != 4:
        raise ValueError(f"encode_sample({key!r}): latents must be (C, F, H, W), got {lat.shape}")
    if txt.ndim != 2:
        raise ValueError(f"encode_sample({key!r}): text must be (L, C), got {txt.shape}")
    meta = dict(meta)
    for name, value in (("key", key), ("latent_shape", list(lat.shape)), ("text_len", int(txt.shape[0]))):
        if name in meta and meta[name] != value:
            raise ValueError(f"encode_sample({key!r}): meta[{name!r}]={meta[name]!r} but the data say {value!r}")
        meta[name] = value
    out = {"__key__": key, "latents.npy": npy_bytes(lat), "text.npy": npy_bytes(txt)}
    if image is not None:
        img = _to_numpy(image).astype(np.float16)
        if img.ndim != 2:
            raise ValueError(f"encode_sample({key!r}): image must be (I, C), got {img.shape}")
        out["image.npy"] = npy_bytes(img)
    if teacher is not None:
        tp = teacher_to_uint8(_to_numpy(teacher))
        if tp.ndim != 4 or tp.shape[0] != 3:
            raise ValueError(f"encode_sample({key!r}): teacher must be (3, 2+4k, S, S), got {tp.shape}")
        out["teacher.npy"] = npy_bytes(tp)
    out["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return out


_FIELD_NAMES = {"json", *(f"{f}.npy" for f in ARRAY_FIELDS)}


def _members_by_field(members: Mapping[str, bytes]) -> tuple[str | None, dict[str, bytes]]:
    """Accepts {"__key__", "<field>": bytes} (webdataset), {"<field>": bytes} (the loader's tar
    index) or raw member names {"<key>.<field>": bytes}; returns (key or None, {field: bytes})."""
    key = members.get("__key__")
    by_field: dict[str, bytes] = {}
    for name, value in members.items():
        if name.startswith("__"):
            continue
        if name not in _FIELD_NAMES and "." in name:
            k, name = name.split(".", 1)
            key = key if key is not None else k
        by_field[name] = value
    return (str(key) if key is not None else None), by_field


def _load_npy(key: str, field: str, data) -> np.ndarray:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptSample(key, field, f"expected .npy bytes, got {type(data).__name__}")
    if not bytes(data[:6]) == b"\x93NUMPY":
        raise CorruptSample(key, field, "unreadable .npy (no .npy magic: garbage or truncated bytes)")
    try:
        return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except Exception as e:  # truncated / not an .npy / an object array
        raise CorruptSample(key, field, f"unreadable .npy ({type(e).__name__}: {e})") from None


def decode_sample(members: Mapping[str, bytes]) -> dict:
    """Sample members -> {"key", "meta", "latents", "text", ["image"], ["teacher"]} (numpy arrays;
    the optional fields are absent, not None, when the sample has none).

    `members` is a webdataset sample ({"__key__", "latents.npy", ..., "json"}), the same without
    "__key__" (the key then comes from the meta) or raw tar members ({"<key>.latents.npy", ...}).
    Validates presence, dtypes and shapes against the meta;
    raises `CorruptSample` naming the key and the field.
    """
    key, by = _members_by_field(members)
    if "json" not in by:
        raise CorruptSample(key or "?", "json", "missing member")
    try:
        meta = json.loads(bytes(by["json"]).decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except Exception as e:
        raise CorruptSample(key or "?", "json", f"unreadable ({e})") from None
    if key is None:
        key = str(meta.get("key", "?"))
    if meta.get("key", key) != key:
        raise CorruptSample(key, "json", f"meta key {meta.get('key')!r} differs from the sample key")
    for field in REQUIRED_FIELDS:
        if f"{field}.npy" not in by:
            raise CorruptSample(key, field, "missing member")
    out: dict = {"key": key, "meta": meta}
    for field in ARRAY_FIELDS:
        if f"{field}.npy" in by:
            out[field] = _load_npy(key, field, by[f"{field}.npy"])
    lat, txt = out["latents"], out["text"]
    for field in ("latents", "text", "image"):
        a = out.get(field)
        if a is not None and a.dtype != np.float16:
            raise CorruptSample(key, field, f"dtype {a.dtype}, expected float16")
        # Preprocessing refuses non-finite encoder outputs, so a NaN/Inf here means flipped bytes
        # (caught even for shards without checksums); one would poison the whole step's gradient.
        if a is not None and not np.isfinite(a).all():
            raise CorruptSample(key, field, f"{int((~np.isfinite(a)).sum())} non-finite value(s) (NaN/Inf): "
                                "flipped bytes")
    if list(lat.shape) != list(meta.get("latent_shape", [])):
        raise CorruptSample(key, "latents", f"shape {list(lat.shape)} != meta latent_shape {meta.get('latent_shape')}")
    if "bucket" in meta:
        try:
            want = latent_shape(*parse_bucket(meta["bucket"]), z_dim=lat.shape[0])
        except ValueError as e:
            raise CorruptSample(key, "json", f"bad bucket: {e}") from None
        if list(lat.shape) != want:
            raise CorruptSample(key, "latents", f"shape {list(lat.shape)} does not fit bucket {meta['bucket']}")
    if txt.ndim != 2 or txt.shape[0] < 1:
        raise CorruptSample(key, "text", f"shape {list(txt.shape)}, expected (L>=1, C)")
    if "text_len" in meta and txt.shape[0] != meta["text_len"]:
        raise CorruptSample(key, "text", f"length {txt.shape[0]} != meta text_len {meta['text_len']}")
    if "image" in out and out["image"].ndim != 2:
        raise CorruptSample(key, "image", f"shape {list(out['image'].shape)}, expected (I, C)")
    tp = out.get("teacher")
    if tp is not None:
        if tp.dtype != np.uint8:
            raise CorruptSample(key, "teacher", f"dtype {tp.dtype}, expected uint8")
        frames = int(meta.get("frames", (lat.shape[1] - 1) * 4 + 1))
        if tp.ndim != 4 or tp.shape[0] != 3 or tp.shape[1] != frames + 1 or tp.shape[2] != tp.shape[3]:
            raise CorruptSample(key, "teacher", f"shape {list(tp.shape)}, expected (3, {frames + 1}, S, S)")
    return out


def read_tar_keys(path: PathLike) -> list[str]:
    """Sample keys of a shard in tar order (member names only; no data is decoded)."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            k = member_key(m.name)
            if m.isfile() and (not keys or keys[-1] != k):
                keys.append(k)
    return keys


def index_keys(path: PathLike) -> list[str]:
    """Sample keys of a shard in tar order, from its `<shard>.tar.idx.json` (no tar header is read)."""
    _, members = parse_index(Path(path).read_bytes())
    return list(dict.fromkeys(member_key(name) for name in members))


def index_entry(root: PathLike, shard: str) -> dict:
    """{"index", "index_crc"} for a manifest shard entry when `<shard>.tar.idx.json` exists and describes
    the tar as it is on disk (same size), else {} (the loader then scans the tar's headers)."""
    path = Path(root) / index_name(shard)
    try:
        data = path.read_bytes()
        tar_bytes, _ = parse_index(data)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if tar_bytes != (Path(root) / shard).stat().st_size:
        return {}
    return {"index": index_name(shard), "index_crc": zlib.crc32(data)}


# -------------------------------------------------------------------------------- writer


class ShardWriter:
    """Writes samples into per-bucket tars `<root>/shards/<b>/<b>-r<rank>-<idx>.tar`.

    Each open shard is written as `<name>.tar.tmp` through `webdataset.TarWriter` and renamed to
    `<name>.tar` (after an fsync) once it holds `target_samples` samples or `target_bytes`
    bytes, or on `close()`. Indices continue after the highest existing `.tar` of the same
    bucket and rank, and are at least `first_index[bucket]` (a deleted shard's name is not reused).
    `on_close(entry)` runs after each rename; `entries` collects them:
    {"path" (relative to root), "bucket", "samples", "keys", "bytes", "index", "index_crc", "image_samples",
    "sources"} (image_samples: how many of its samples carry `image.npy`).
    The member index `<name>.tar.idx.json` (offsets, sizes, crc32; module doc) is written just
    before the rename.

    Used as a context manager, an exception leaves the open `.tar.tmp` files behind unfinished
    (as a crash would); a re-run discards them.
    """

    def __init__(self, root: PathLike, *, rank: int = 0, target_samples: int = 64,
                 target_bytes: int = 512 << 20, on_close: Callable[[dict], None] | None = None,
                 first_index: Mapping[str, int] | None = None):
        if target_samples < 1 or target_bytes < 1:
            raise ValueError("ShardWriter: target_samples and target_bytes must be >= 1")
        self.root = Path(root)
        self.rank = int(rank)
        self.target_samples, self.target_bytes = int(target_samples), int(target_bytes)
        self.on_close = on_close
        self.entries: list[dict] = []
        self._open: dict[str, dict] = {}
        self._next: dict[str, int] = {}
        self._first = dict(first_index or {})

    def _next_index(self, bucket: str) -> int:
        if bucket not in self._next:
            used = [p[2] for f in (self.root / SHARDS_DIR / bucket).glob(f"{bucket}-r{self.rank:02d}-*.tar")
                    if (p := parse_shard_name(f)) is not None]
            self._next[bucket] = max(max(used, default=-1) + 1, self._first.get(bucket, 0))
        idx = self._next[bucket]
        self._next[bucket] += 1
        return idx

    def _start(self, bucket: str) -> dict:
        import webdataset as wds

        rel = shard_name(bucket, self.rank, self._next_index(bucket))
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path.with_name(path.name + ".tmp"), "wb")
        # mtime fixed: identical content gives identical tar bytes.
        writer = wds.TarWriter(stream, encoder=False, mtime=0)
        return {"rel": rel, "path": path, "stream": stream, "writer": writer, "keys": [], "sources": [], "crc": {},
                "images": 0}

    def write(self, bucket: str, sample: Mapping, source: str | None = None) -> dict | None:
        """Append an `encode_sample` dict to the bucket's open shard; returns the entry if that closed it."""
        parse_bucket(bucket)
        cur = self._open.get(bucket) or self._open.setdefault(bucket, self._start(bucket))
        cur["writer"].write(dict(sample))
        for field, value in sample.items():  # the bytes TarWriter writes as member "<key>.<field>"
            if not field.startswith("_"):
                cur["crc"][f"{sample['__key__']}.{field}"] = zlib.crc32(
                    value.encode("utf-8") if isinstance(value, str) else value)
        cur["keys"].append(sample["__key__"])
        cur["images"] += "image.npy" in sample
        cur["sources"].append(source)
        if len(cur["keys"]) >= self.target_samples or cur["stream"].tell() >= self.target_bytes:
            return self._finish(bucket)
        return None

    def _finish(self, bucket: str) -> dict:
        cur = self._open.pop(bucket)
        cur["writer"].close()  # closes the tar stream (end-of-archive blocks), not our file
        cur["stream"].flush()
        os.fsync(cur["stream"].fileno())
        cur["stream"].close()
        tmp = cur["path"].with_name(cur["path"].name + ".tmp")
        # Offsets from the finished file's own headers (TarWriter streams, so tell() is not exact).
        with tarfile.open(tmp, "r:") as tf:
            rows = [[m.name, m.offset_data, m.size, cur["crc"][m.name]] for m in tf if m.isfile()]
        size = tmp.stat().st_size
        text = json.dumps({"version": INDEX_VERSION, "tar_bytes": size, "members": rows}, separators=(",", ":"))
        write_atomic(self.root / index_name(cur["rel"]), text)
        os.replace(tmp, cur["path"])
        entry = {"path": cur["rel"], "bucket": bucket, "samples": len(cur["keys"]), "keys": cur["keys"],
                 "bytes": size, "index": index_name(cur["rel"]), "index_crc": zlib.crc32(text.encode("utf-8")),
                 "image_samples": cur["images"], "sources": cur["sources"]}
        self.entries.append(entry)
        if self.on_close is not None:
            self.on_close(entry)
        return entry

    def close(self) -> list[dict]:
        """Finish every open shard (even below target); returns all entries written."""
        for bucket in sorted(self._open):
            self._finish(bucket)
        return self.entries

    def abort(self) -> None:
        """Close file handles without finishing: the `.tar.tmp` files stay, as after a crash."""
        for cur in self._open.values():
            try:
                cur["writer"].close()  # lets tarfile flush its buffer now rather than in __del__
            except Exception:  # noqa: BLE001 - the shard is discarded anyway
                pass
            cur["stream"].close()
        self._open.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------ image tokens


def count_image_samples(member_names: Iterable[str]) -> int:
    """How many samples of a shard carry SigLIP tokens, from its tar member names (`<key>.image.npy`)."""
    return len({n[: -len(".image.npy")] for n in member_names if n.endswith(".image.npy")})


def check_image_tokens(buckets: Mapping[str, Mapping], stages: Iterable[tuple[str, str, float, Iterable[str]]],
                       *, root: PathLike, counts: Mapping[str, int | None] | None = None) -> None:
    """Refuse a dataset on which an I2V stage would meet a sample without SigLIP image tokens.

    `buckets`: the manifest's bucket table; `stages`: (label, config key, i2v probability, bucket names) per
    stage of the run, e.g. ("curriculum stage 0 ('low-res')", "curriculum.stages[0].i2v_prob", 0.5, [...]);
    `counts`: samples with image tokens per bucket (default: the table's `image_samples`; None or a missing
    entry: unknown, not checked). Stages with probability 0 and image buckets (1 frame: always T2V) need none;
    a bucket that is not in the manifest or holds no sample is left to the planner. Raises ValueError naming
    every stage's buckets that lack them, with the fix.
    """
    if counts is None:
        counts = {b: t.get("image_samples") for b, t in buckets.items()}
    problems, keys = [], []
    for label, key, prob, names in stages:
        if not prob > 0:
            continue
        bad = []
        for b in dict.fromkeys(names):
            t, have = buckets.get(b), counts.get(b)
            if t is None or have is None or int(t.get("frames", parse_bucket(b)[0])) < 2:
                continue
            if int(have) < int(t["samples"]):
                bad.append(f"{b} ({int(have)} of {int(t['samples'])} samples have them)")
        if bad:
            problems.append(f"{label} trains I2V (i2v_prob={prob:g}) but bucket(s) {', '.join(bad)} lack SigLIP "
                            "image tokens")
            keys.append(key)
    if problems:
        raise ValueError(
            f"{'; '.join(problems)} in {Path(root) / MANIFEST_NAME}. Every rank trains the same task in a step, "
            "so a sample without image tokens cannot be trained as I2V (and must not switch its rank to T2V: the "
            "ranks would run different graphs). Re-run motif-preprocess with the image encoder (without --no-image) "
            f"into a new --out, or set {' / '.join(dict.fromkeys(keys))}=0 "
            "(or objective.conditioning.i2v_prob=0) to train those stages as T2V only.")


# ------------------------------------------------------------------------------ manifest


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(shards: Iterable[Mapping], *, dropped: Mapping[str, int] | None = None,
                   stages: Mapping[str, Iterable[str]] | None = None, encoders: Mapping | None = None,
                   config: Mapping | None = None, buckets: Iterable[str] = ()) -> dict:
    """A manifest from shard entries ({"path", "bucket", "samples", "keys", "bytes", ["index", "index_crc"],
    ["image_samples"]}).

    Shards are sorted by path; `buckets` lists buckets to include even when empty; `stages`
    maps a stage name to its bucket names (for the per-stage totals). Keys must be unique. A bucket
    gets `image_samples` (its samples with SigLIP tokens) when every one of its shards has the count.
    """
    entries = sorted(({**{k: s[k] for k in ("path", "bucket", "samples", "keys", "bytes")},
                       **{k: s[k] for k in ("index", "index_crc", "image_samples") if k in s}} for s in shards),
                     key=lambda s: s["path"])
    seen: dict[str, str] = {}
    for s in entries:
        if len(s["keys"]) != s["samples"]:
            raise ValueError(f"shard {s['path']}: {len(s['keys'])} keys but samples={s['samples']}")
        for k in s["keys"]:
            if k in seen:
                raise ValueError(f"duplicate key {k!r} in {seen[k]} and {s['path']}")
            seen[k] = s["path"]
    names = sorted(set(buckets) | {s["bucket"] for s in entries}, key=lambda b: (parse_bucket(b), b))
    table = {b: {**bucket_info(b), "samples": 0, "shards": []} for b in names}
    for i, s in enumerate(entries):
        table[s["bucket"]]["samples"] += s["samples"]
        table[s["bucket"]]["shards"].append(i)
    for b in table.values():  # unknown (no key) as soon as one shard of the bucket lacks the count
        counts = [entries[i].get("image_samples") for i in b["shards"]]
        if all(isinstance(c, int) for c in counts):
            b["image_samples"] = sum(counts)
    totals = {"samples": sum(b["samples"] for b in table.values()),
              "tokens": sum(b["samples"] * b["tokens"] for b in table.values()),
              "shards": len(entries), "bytes": sum(s["bytes"] for s in entries)}
    manifest = {"version": MANIFEST_VERSION, "created": now_iso(), "buckets": table, "shards": entries,
                "totals": totals, "dropped": dict(sorted((dropped or {}).items())), "failures": FAILURES_NAME,
                "empty_prompt": EMPTY_PROMPT_NAME, "encoders": dict(encoders or {}), "config": dict(config or {})}
    if stages:
        manifest["stages"] = {
            name: {"samples": sum(table[b]["samples"] for b in set(bs) if b in table),
                   "tokens": sum(table[b]["samples"] * table[b]["tokens"] for b in set(bs) if b in table)}
            for name, bs in stages.items()}
    return manifest


def merge_manifests(parts: Iterable[Mapping]) -> dict:
    """Union of manifests over disjoint shards (e.g. per rank or per dataset part, same root).

    Shards are re-indexed, bucket/stage totals and drop counts summed; keys must stay unique
    and the encoders must agree. `config` and `created` come from the first part.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_manifests: no manifests given")
    for p in parts:
        if p.get("version") != MANIFEST_VERSION:
            raise ValueError(f"merge_manifests: manifest version {p.get('version')} != {MANIFEST_VERSION}")
        if p.get("encoders", {}) != parts[0].get("encoders", {}):
            raise ValueError("merge_manifests: parts were encoded with different encoders: "
                             f"{p.get('encoders')} vs {parts[0].get('encoders')}")
    shards = [s for p in parts for s in p["shards"]]
    paths = [s["path"] for s in shards]
    if len(set(paths)) != len(paths):
        raise ValueError("merge_manifests: a shard is listed in more than one part")
    dropped: dict[str, int] = {}
    for p in parts:
        for k, v in p.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + int(v)
    out = build_manifest(shards, dropped=dropped, encoders=parts[0].get("encoders"),
                         config=parts[0].get("config"), buckets=[b for p in parts for b in p["buckets"]])
    stage_names = [n for p in parts for n in p.get("stages", {})]
    if stage_names:
        out["stages"] = {n: {f: sum(p.get("stages", {}).get(n, {}).get(f, 0) for p in parts)
                             for f in ("samples", "tokens")} for n in dict.fromkeys(stage_names)}
    out["created"] = parts[0].get("created", out["created"])
    return out


def read_jsonl(path: PathLike) -> list[dict]:
    """Records of a JSON-lines file ([] if absent); a last line cut short by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: PathLike, record: Mapping) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_manifest(root: PathLike, manifest: Mapping, *, sample_index: bool = True) -> Path:
    """Write `<root>/manifest.json` atomically (temp file, fsync, rename), then (`sample_index`) the
    consolidated sample index beside it (`sample_index.py`): what the loader reads instead of the manifest's
    per-shard key lists and the per-shard index files, so its start-up does not grow with the dataset."""
    path = Path(root) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    if sample_index and "shards" in manifest:
        write_sample_index(root, manifest)
    return path


def load_manifest(root: PathLike) -> dict:
    """Read and check `<root>/manifest.json`: version, and every listed shard present on disk."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}: preprocess the data first (motif-preprocess "
                                f"--input ... --out {root} --encoders ...)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')!r}, this code reads version "
                         f"{MANIFEST_VERSION}; re-run motif-preprocess into a new --out")
    missing = [s["path"] for s in manifest["shards"] if not (root / s["path"]).is_file()]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise FileNotFoundError(f"{path} lists {len(missing)} shard(s) missing on disk under {root}: {shown}. "
                                f"Re-run motif-preprocess with the same --input/--out to rebuild them.")
    return manifest
