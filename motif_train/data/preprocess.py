"""Offline preprocessing: raw clips -> bucketed WebDataset shards of latents/embeddings (shards.py).

clip (mp4 + caption; folder or video2dataset tar) -> decord decode of the chosen frames only -> bucket
(nearest aspect among the buckets the clip is long enough for) -> resize (cover) + centre crop -> Wan VAE
latents, T5Gemma2 text (trimmed), SigLIP frame 0, REPA teacher pixels -> ShardWriter.

Resumable and rank-parallel, all through files under `<out>/progress/`:

    config.json               the content settings; a re-run with other settings is refused
    encoders.json             encoder dims (written by the first rank to load them)
    rank<r>.jsonl             journal: {"shard", "sources", "keys", ...} per closed shard
    rank<r>.failures.jsonl    {"source", "reason"} per clip that could not be used
    rank<r>.done              written when rank r has finished its slice

Rank r takes items i % world_size == r of the sorted input list, minus the sources already in a
closed shard or a failure record. Rank 0 waits for every rank, then writes manifest.json,
empty_prompt.npy and failures.jsonl from the journals and the tars. Each shard gets its member
index `<shard>.tar.idx.json` (offsets, sizes, crc32 per member; written by `ShardWriter` before the
tar is renamed into place) and the manifest names it with its own crc32 (format in shards.py), so
the loader can verify every member it reads.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import shards as S
from .split import apply_split

log = logging.getLogger(__name__)
PathLike = str | Path
Bucket = tuple[int, int, int]

VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
PROGRESS = "progress"
_RESIZE_CHUNK = 16  # frames resized at once (bounds the float32 working set of long clips)

__all__ = ["ClipItem", "choose_bucket", "list_items", "load_frames", "preprocess", "resize_crop", "sample_indices"]


# ------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ClipItem:
    """One input clip; `source` (file path, or "<tar>::<member>") identifies it for resume/failures.
    path: the video/image file or the tar; member/caption/meta: names in the tar (or file paths)."""

    key: str
    source: str
    path: str
    member: str | None = None
    caption: str | None = None
    meta: str | None = None

    @property
    def is_image(self) -> bool:
        return Path(self.member or self.path).suffix.lower() in IMAGE_EXTS


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for p in braceexpand(str(pattern)):
        hits = (sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else []) or [p] * os.path.exists(p)
        if not hits:
            raise FileNotFoundError(f"input {p!r} matches no file")
        out += hits
    return out


def _tar_items(tar: str) -> list[ClipItem]:
    """video2dataset-style tar: members grouped by key (basename up to its first dot, as webdataset)."""
    groups: dict[str, dict[str, str]] = {}
    with tarfile.open(tar, "r:") as tf:
        for m in tf:
            if m.isfile():
                folder, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                groups.setdefault(f"{folder}/{stem}" if folder else stem, {})["." + ext.lower()] = m.name
    items = []
    for key, mem in groups.items():
        video = next((mem[e] for e in sorted(mem) if e in VIDEO_EXTS | IMAGE_EXTS), None)
        if video is not None:
            items.append(ClipItem(key, f"{tar}::{video}", tar, video, mem.get(".txt"), mem.get(".json")))
    return items


def _file_item(path: str) -> ClipItem:
    p = Path(path)
    stem = p.name[: -len(p.suffix)]
    cap, meta = p.with_name(stem + ".txt"), p.with_name(stem + ".json")
    return ClipItem(stem, path, path, None, str(cap) if cap.is_file() else None, str(meta) if meta.is_file() else None)


def list_items(inputs: Iterable[PathLike] | PathLike) -> list[ClipItem]:
    """Clips of the inputs (folders, video/image files, `.tar`s, globs, brace patterns), sorted by
    source, with unique keys: a key clashing with another clip's gets "-<hash of its source>"."""
    items: list[ClipItem] = []
    for inp in [inputs] if isinstance(inputs, str | Path) else inputs:
        for hit in _expand(str(inp)):
            for f in sorted(str(f) for f in Path(hit).rglob("*") if f.is_file()) if os.path.isdir(hit) else [hit]:
                ext, f = Path(f).suffix.lower(), os.path.abspath(f)
                if ext == ".tar":
                    items += _tar_items(f)
                elif ext in VIDEO_EXTS | IMAGE_EXTS:
                    items.append(_file_item(f))
    items = sorted({it.source: it for it in items}.values(), key=lambda it: it.source)
    clean = [re.sub(r"[^A-Za-z0-9_\-]", "_", it.key) or "clip" for it in items]
    n = Counter(clean)
    return [replace(it, key=k if n[k] == 1 else f"{k}-{hashlib.sha1(it.source.encode()).hexdigest()[:8]}")
            for it, k in zip(items, clean, strict=True)]


class _Reader:
    """Reads caption/json/video bytes; tar members from one open tar at a time (items are sorted)."""

    _tar = _path = None

    def read(self, item: ClipItem, name: str) -> bytes:
        if item.member is None:
            return Path(name).read_bytes()
        if self._path != item.path:
            self.close()
            self._tar, self._path = tarfile.open(item.path, "r:"), item.path
        return self._tar.extractfile(name).read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar = self._path = None


def sample_indices(n: int, src_fps: float | None, fps: float | None) -> tuple[list[int], float | None]:
    """Frame indices of an n-frame clip resampled to `fps` (nearest frame, never above the source
    fps: no frame is duplicated), and the effective fps."""
    if fps is None or not src_fps or fps >= src_fps * (1 - 1e-6):
        return list(range(n)), src_fps
    step = src_fps / fps
    return [min(n - 1, int(k * step + 0.5)) for k in range(int(math.floor((n - 1) / step + 1e-9)) + 1)], float(fps)


def choose_bucket(frames: int, height: int, width: int, buckets: Sequence[Bucket]) -> Bucket | None:
    """The bucket of a clip with `frames` usable frames of size height x width, or None (too short).

    A video (frames > 1) goes to the video buckets with F <= frames (to 1-frame buckets only when
    there are no video buckets at all); an image / 1-frame clip to the 1-frame buckets. Among
    those: the nearest aspect ratio (|log(h/w) - log(H/W)|), ties -> more frames, then larger area.
    """
    if frames < 1:
        return None
    if frames > 1 and any(b[0] > 1 for b in buckets):
        cands = [b for b in buckets if 1 < b[0] <= frames]
    else:
        cands = [b for b in buckets if b[0] == 1]
    r = math.log(height / width)
    return min(cands, key=lambda b: (round(abs(r - math.log(b[1] / b[2])), 9), -b[0], -b[1] * b[2]), default=None)


def resize_crop(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (3, T, height, width) float32 in [-1, 1]: resize keeping the aspect so the
    frame covers the bucket (bilinear, antialias), then centre crop."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2)  # (T, 3, h, w) uint8
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (nh - height) // 2, (nw - width) // 2
    out = []
    for chunk in x.split(_RESIZE_CHUNK):
        c = chunk.float() / 127.5 - 1.0
        if (nh, nw) != (h, w):
            c = F.interpolate(c, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out.append(c[:, :, top:top + height, left:left + width])
    return torch.cat(out).clamp_(-1, 1).permute(1, 0, 2, 3).contiguous()


class _Frames:
    """Frame reader over PyAV (the fallback: counts packets without decoding, decodes from the start
    up to the last wanted frame; identical RGB to decord where both work) or over one still image."""

    def __init__(self, data: bytes | str | None = None, still: np.ndarray | None = None) -> None:
        self.data, self.still = data, still
        if still is not None:
            self.size, self.n = tuple(still.shape[:2]), 1
            return
        with self._open() as c:
            s = c.streams.video[0]
            self.size = (int(s.codec_context.height), int(s.codec_context.width))
            self.n = sum(1 for p in c.demux(s) if p.size > 0)

    def _open(self):
        import av

        return av.open(io.BytesIO(self.data) if isinstance(self.data, bytes) else self.data)

    def __len__(self) -> int:
        return self.n

    def get_batch(self, idx):
        if self.still is not None:
            return np.stack([self.still for _ in idx])
        got = {}
        with self._open() as c:
            for i, frame in zip(range(max(idx) + 1), c.decode(video=0), strict=False):
                if i in idx:
                    got[i] = frame.to_ndarray(format="rgb24")
        if len(got) < len(set(idx)):
            raise ValueError(f"only {len(got)} of the frames {idx} are decodable")
        return np.stack([got[i] for i in idx])


def _decode(data: bytes | str, is_image: bool, threads: int):
    """-> (reader with __len__/get_batch, (h, w), fps or None). decord first; PyAV when decord
    cannot give RGB frames of this size (decord 0.6.0 returns 4-6 "channels" and then fails in
    get_batch for some small widths: 16, 24, 48, 72 px)."""
    if is_image:
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))
        return _Frames(still=img), img.shape[:2], None
    import decord

    if (not data) if isinstance(data, bytes) else os.path.getsize(data) == 0:
        raise ValueError("zero-length video")
    vr = decord.VideoReader(io.BytesIO(data) if isinstance(data, bytes) else data, num_threads=threads)
    if len(vr) < 1:
        raise ValueError("no frames")
    first, fps = vr[0].shape, float(vr.get_avg_fps())
    fps = fps if math.isfinite(fps) and fps > 0 else None
    if first[-1] != 3:
        vr = _Frames(data)
        return vr, vr.size, fps
    return vr, (int(first[0]), int(first[1])), fps


def _window(n: int, src_fps, fps, buckets, size, max_frames) -> tuple[Bucket | None, list[int], float | None]:
    """(bucket, the centred window of resampled frame indices, effective fps)."""
    idx, eff = sample_indices(n, src_fps, fps)
    b = choose_bucket(len(idx) if max_frames is None else min(len(idx), max_frames), *size, buckets)
    start = (len(idx) - b[0]) // 2 if b else 0
    return b, (idx[start:start + b[0]] if b else idx), eff


def load_frames(path: PathLike, bucket: Bucket | None = None, *, fps: float | None = None,
                buckets: Sequence[Bucket] | None = None, max_frames: int | None = None):
    """The pixels preprocessing feeds the encoders for a video/image file: (3, F, H, W) in [-1, 1],
    the bucket (given, or chosen among `buckets`) and the source frame indices."""
    reader, size, src_fps = _decode(str(path), _file_item(str(path)).is_image, 0)
    b, idx, _ = _window(len(reader), src_fps, fps, buckets or [tuple(bucket)], size, max_frames)
    if b is None:
        raise ValueError(f"{path}: too short for {bucket or buckets}")
    frames = reader.get_batch(idx)
    return resize_crop(frames.asnumpy() if hasattr(frames, "asnumpy") else frames, b[1], b[2]), b, idx


def _journal_entries(out: Path) -> list[dict]:
    """Journal entries of every rank whose shard exists."""
    return [e for j in sorted((out / PROGRESS).glob("rank*.jsonl")) if re.fullmatch(r"rank\d+\.jsonl", j.name)
            for e in S.read_jsonl(j) if (out / e["shard"]).is_file()]


def _failures(out: Path) -> dict[str, str]:
    return {r["source"]: r["reason"] for f in sorted((out / PROGRESS).glob("rank*.failures.jsonl"))
            for r in S.read_jsonl(f)}


def _recover(out: Path, rank: int) -> dict[str, int]:
    """Make rank's journal match its shards: drop entries whose tar is gone, adopt finished tars the
    journal missed (a crash between rename and journal append), delete stale `.tar.tmp`.
    Returns {bucket: next shard index} over every shard the journal ever named."""
    for tmp in (out / S.SHARDS_DIR).glob(f"*/*-r{rank:02d}-*.tar.tmp"):
        log.info("discarding unfinished shard %s", tmp)
        tmp.unlink()
    journal = out / PROGRESS / f"rank{rank}.jsonl"
    entries = S.read_jsonl(journal)
    first: dict[str, int] = {}
    for e in entries:
        if (p := S.parse_shard_name(e["shard"])) is not None:
            first[p[0]] = max(first.get(p[0], 0), p[2] + 1)
    kept = [e for e in entries if (out / e["shard"]).is_file()]
    known = {e["shard"] for e in kept}
    for tar in sorted((out / S.SHARDS_DIR).glob(f"*/*-r{rank:02d}-*.tar")):
        rel = tar.relative_to(out).as_posix()
        if rel in known or S.parse_shard_name(tar) is None:
            continue
        try:
            with tarfile.open(tar, "r:") as tf:
                metas = [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
            kept.append({"shard": rel, "sources": [m["source"] for m in metas], "keys": [m["key"] for m in metas],
                         "samples": len(metas), "bytes": tar.stat().st_size})
            log.warning("adopted shard %s missing from the journal", rel)
        except (OSError, tarfile.TarError, ValueError, KeyError) as e:
            log.warning("deleting unreadable shard %s (%s)", rel, e)
            tar.unlink()
    if kept != entries:
        S.write_atomic(journal, "".join(json.dumps(e) + "\n" for e in kept))
    return first


def _check_config(out: Path, settings: dict) -> None:
    path = out / PROGRESS / "config.json"
    if not path.is_file():
        return S.write_atomic(path, json.dumps(settings, indent=1, sort_keys=True))
    old = json.loads(path.read_text())
    if old != settings:
        diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
        raise ValueError(f"{out} was preprocessed with other settings (old, new): {diff}. Use a new --out, "
                         "or delete this one to start over.")


class _Encoders:
    """Loads the frozen encoders on first use (a re-run with nothing to do loads nothing). The REPA
    teacher model itself is never loaded: its pixels only need `crop_size` from its config.json."""

    def __init__(self, root, *, image: bool, teacher: bool, device, dtype, out: Path) -> None:
        self.root, self.device, self.dtype, self.info_path = root, device, dtype, out / PROGRESS / "encoders.json"
        self.which, self.teacher, self.crop = ["vae", "text"] + ["image"] * image, teacher, None
        self._enc = None if isinstance(root, str | Path) else root

    def get(self):
        if self._enc is None:
            from motif_train.objectives.encoders import load_encoders

            t0 = time.perf_counter()
            self._enc = load_encoders(self.root, which=self.which, device=self.device, dtype=self.dtype)
            log.info("loaded encoders %s in %.1fs", self.which, time.perf_counter() - t0)
        if self.teacher and self.crop is None:
            self.crop = int(json.loads((Path(self.root) / "teacher/config.json").read_text())["crop_size"]
                            if self._enc.teacher is None else self._enc.teacher.crop_size)
        if not self.info_path.is_file():
            e = self._enc
            info = {"vae": {"z_dim": e.vae.z_dim, "temporal": e.vae.temporal_compression,
                            "spatial": e.vae.spatial_compression}, "text": {"dim": e.text.hidden_size},
                    "image": {"tokens": e.image.tokens_per_image, "dim": e.image.hidden_size}
                    if "image" in self.which else None, "teacher": {"crop_size": self.crop} if self.teacher else None}
            S.write_atomic(self.info_path, json.dumps(info, indent=1, sort_keys=True))
        return self._enc


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy().astype(np.float16)


def _encode_clip(enc, pixels: torch.Tensor, caption: str, *, image: bool, teacher: int | None,
                 max_text_len: int) -> dict:
    """pixels (3, F, H, W) in [-1, 1] -> {"latents", "text", ["image"], ["teacher" at teacher x teacher
    px]} numpy arrays."""
    from motif_train.objectives.repa import teacher_pixels

    pix = pixels.unsqueeze(0).to(enc.vae.device)
    out = {"latents": _f16(enc.vae.encode(pix)[0]), "text": _f16(enc.text.encode_trimmed([caption], max_text_len)[0])}
    if image:
        out["image"] = _f16(enc.image.encode(pix[:, :, 0])[0])
    if teacher:
        out["teacher"] = S.teacher_to_uint8(teacher_pixels(pix, teacher)[0].float().cpu().numpy())
    for name in ("latents", "text", "image"):
        if name in out and not np.isfinite(out[name]).all():
            raise FloatingPointError(f"nonfinite: {name} (after float16 conversion)")
    return out


# ---------------------------------------------------------------------------- the run


def _names(buckets) -> list[str]:
    return [S.bucket_name(*(S.parse_bucket(b) if isinstance(b, str) else (int(x) for x in b))) for b in buckets]


def preprocess(inputs, out: PathLike, encoders_root, *, buckets, fps: float | None = None,
               teacher: bool | Iterable[str] = True, image: bool = True, shard_samples: int = 64,
               shard_bytes: int = 512 << 20, device: str = "cpu", rank: int = 0, world_size: int = 1,
               max_text_len: int = 512, max_frames: int | None = None, stages: Mapping | None = None,
               dtype: torch.dtype = torch.float32, progress: bool = True, decode_threads: int = 0,
               wait_timeout: float = 24 * 3600.0, val_fraction: float = 0.0, val_min_per_bucket: int = 0,
               val_max_share: float = 0.1) -> dict:
    """Preprocess `inputs` into `<out>` (module doc; format in shards.py). Returns the manifest on rank 0,
    this rank's summary {"rank", "written", "failed", "skipped", "seconds"} elsewhere.

    encoders_root: folder for `load_encoders`, or an already loaded `FrozenEncoders`. buckets: (F, H, W)
    triples or "FxHxW" names. teacher: True (every bucket), False, or the buckets that get REPA teacher
    pixels. stages: {stage name: [bucket, ...]} for the manifest's per-stage totals. fps: target fps
    (None keeps the source fps; a lower source fps is kept, never upsampled). val_fraction, val_min_per_bucket,
    val_max_share: the held-out split recorded in the manifest (data/split.py; default none); not a content
    setting, so a re-run may change it, and keys held out by this root's previous manifest stay held out.
    """
    out = Path(out)
    names = sorted(set(_names(buckets)), key=S.parse_bucket)
    if not names:
        raise ValueError("preprocess: no buckets given (--buckets or --curriculum)")
    blist = [S.parse_bucket(b) for b in names]
    tb = set(names) if teacher is True else set() if teacher is False else set(_names(teacher))
    stage_map = {k: _names(v) for k, v in (stages or {}).items()}
    settings = {"buckets": names, "fps": fps, "max_frames": max_frames, "image": bool(image),
                "teacher_buckets": sorted(tb, key=S.parse_bucket), "max_text_len": int(max_text_len),
                "dtype": str(dtype)}
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    _check_config(out, settings)
    fingerprint = hashlib.sha1(json.dumps([settings, world_size], sort_keys=True).encode()).hexdigest()[:16]
    done_marker = out / PROGRESS / f"rank{rank}.done"
    done_marker.unlink(missing_ok=True)
    first_index = _recover(out, rank)

    items = list_items(inputs)
    finished = {s for e in _journal_entries(out) for s in e["sources"]} | set(_failures(out))
    mine = [it for i, it in enumerate(items) if i % world_size == rank and it.source not in finished]
    enc = _Encoders(encoders_root, image=image, teacher=bool(tb), device=device, dtype=dtype, out=out)
    journal, fail_log = out / PROGRESS / f"rank{rank}.jsonl", out / PROGRESS / f"rank{rank}.failures.jsonl"

    def on_close(e: dict) -> None:
        S.append_jsonl(journal, {"shard": e["path"], **{k: e[k] for k in ("sources", "keys", "samples", "bytes")}})

    def fail(item: ClipItem, reason: str) -> None:
        S.append_jsonl(fail_log, {"source": item.source, "reason": reason})

    from tqdm.auto import tqdm

    written, t0, reader = 0, time.perf_counter(), _Reader()
    bar = tqdm(total=len(mine), desc=f"preprocess rank {rank}", unit="clip", position=rank,
               disable=not progress or not mine, dynamic_ncols=True, mininterval=1.0)
    with S.ShardWriter(out, rank=rank, target_samples=shard_samples, target_bytes=shard_bytes,
                       on_close=on_close, first_index=first_index) as writer:
        for i, item in enumerate(mine):
            written += _process(item, reader, enc, writer, fail, blist=blist, fps=fps, max_frames=max_frames,
                                teacher_buckets=tb, image=image, max_text_len=max_text_len, threads=decode_threads)
            bar.update(1)
            bar.set_postfix(ok=written, failed=i + 1 - written, refresh=False)
    reader.close()
    bar.close()
    dt = time.perf_counter() - t0
    if mine:
        log.info("rank %d: %d clips in %.1fs (%.2f clips/s), %d written, %d failed, %d done before",
                 rank, len(mine), dt, len(mine) / max(dt, 1e-9), written, len(mine) - written, len(finished))
    S.write_atomic(done_marker, json.dumps({"rank": rank, "world_size": world_size, "fingerprint": fingerprint}))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return {"rank": rank, "written": written, "failed": len(mine) - written, "skipped": len(finished),
                "seconds": dt}
    _wait_for_ranks(out, items, world_size, fingerprint, wait_timeout)
    return _finalize(out, enc, settings, stage_map, names, max_text_len, world_size, inputs,
                     val=(float(val_fraction), int(val_min_per_bucket), float(val_max_share)))


def _process(item: ClipItem, reader: _Reader, enc: _Encoders, writer: S.ShardWriter, fail, *, blist, fps,
             max_frames, teacher_buckets, image, max_text_len, threads) -> bool:
    """One clip -> one sample in its bucket's shard, or a failure record. Never raises an Exception."""
    try:
        caption = reader.read(item, item.caption).decode("utf-8").strip() if item.caption else None
        meta_in = json.loads(reader.read(item, item.meta)) if item.meta else {}
    except Exception as e:  # noqa: BLE001
        fail(item, f"decode_error: caption/json: {type(e).__name__}: {e}")
        return False
    if not caption:
        fail(item, "missing_caption" if caption is None else "empty_caption")
        return False
    try:
        data = reader.read(item, item.member) if item.member else item.path
        vr, size, src_fps = _decode(data, item.is_image, threads)
        src_fps = src_fps or (float(meta_in["fps"]) if meta_in.get("fps") else None)
        b, idx, eff = _window(len(vr), src_fps, fps, blist, size, max_frames)
        if b is None:
            fail(item, "too_short")
            return False
        frames = vr.get_batch(idx)  # only the window's frames are decoded
        frames, n_total = (frames.asnumpy() if hasattr(frames, "asnumpy") else frames), len(vr)
        del vr
    except Exception as e:  # noqa: BLE001
        fail(item, f"decode_error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300])
        return False
    bname = S.bucket_name(*b)
    try:
        arrays = _encode_clip(enc.get(), resize_crop(frames, b[1], b[2]), caption, image=image,
                              teacher=enc.crop if bname in teacher_buckets else None, max_text_len=max_text_len)
    except Exception as e:  # noqa: BLE001
        fail(item, str(e) if isinstance(e, FloatingPointError) else f"encode_error: {type(e).__name__}: {e}"[:300])
        return False
    meta = {"key": item.key, "caption": caption, "source": item.source, "bucket": bname, "frames": b[0],
            "fps": round(eff, 4) if eff else None, "orig_fps": round(src_fps, 4) if src_fps else None,
            "orig_size": list(size), "orig_frames": n_total, "frame_indices": [int(i) for i in idx],
            "latent_shape": list(arrays["latents"].shape), "text_len": int(arrays["text"].shape[0]),
            "tokens": S.video_tokens(*b)}
    if meta_in.get("source") or meta_in.get("url"):
        meta["origin"] = meta_in.get("source") or meta_in.get("url")
    writer.write(bname, S.encode_sample(item.key, meta=meta, **arrays), source=item.source)
    return True


def _marker(path: Path) -> str | None:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text()).get("fingerprint")


def _wait_for_ranks(out: Path, items: list[ClipItem], world_size: int, fingerprint: str, timeout: float) -> None:
    """Rank 0: until every rank's done marker (these settings) is there and every input is in a
    closed shard or a failure record."""
    deadline, sources = time.monotonic() + timeout, {it.source for it in items}
    while True:
        missing = [r for r in range(world_size) if _marker(out / PROGRESS / f"rank{r}.done") != fingerprint]
        left = sources - {s for e in _journal_entries(out) for s in e["sources"]} - set(_failures(out))
        if not missing and not left:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"preprocess rank 0: ranks {missing} did not finish and {len(left)} inputs are "
                               f"not done (e.g. {sorted(left)[:3]}); re-run the missing ranks")
        time.sleep(1.0)


def _member_names(index: Path) -> list[str]:
    """Member names of a shard in tar order, from its `<shard>.tar.idx.json`."""
    return list(S.parse_index(index.read_bytes())[1])


def _tar_member_names(path: Path) -> list[str]:
    """Member names of a shard in tar order, from its headers (a shard without a usable index)."""
    with tarfile.open(path, "r:") as tf:
        return [m.name for m in tf if m.isfile()]


def _finalize(out: Path, enc: _Encoders, settings: dict, stage_map: dict, names: list[str], max_text_len: int,
              world_size: int, inputs, val: tuple[float, int, float] = (0.0, 0, 0.1)) -> dict:
    entries = []
    for e in _journal_entries(out):
        path = out / e["shard"]
        # The member index (offsets + crc32) the writer put beside the tar, if it matches the tar: its keys
        # then come from it (10⁵ shards: no tar is walked at merge either), else from the tar's headers.
        index = S.index_entry(out, e["shard"])
        members = _member_names(out / index["index"]) if index else _tar_member_names(path)
        keys = list(dict.fromkeys(n.split(".", 1)[0] for n in members))  # as index_keys / read_tar_keys
        if keys != e.get("keys", keys):
            log.warning("%s: journal keys differ from the tar's; using the tar", e["shard"])
        # samples with SigLIP tokens, per shard -> per bucket in the manifest (the trainer's I2V start-up check)
        entries.append({"path": e["shard"], "bucket": S.parse_shard_name(path)[0], "samples": len(keys),
                        "keys": keys, "bytes": path.stat().st_size, **index,
                        "image_samples": S.count_image_samples(members)})
    fails = _failures(out)
    S.write_atomic(out / S.FAILURES_NAME,
                   "".join(json.dumps({"source": s, "reason": r}) + "\n" for s, r in sorted(fails.items())))
    empty = out / S.EMPTY_PROMPT_NAME
    if not empty.is_file() or not enc.info_path.is_file():
        tmp = empty.with_name(".empty_prompt.tmp.npy")
        np.save(tmp, _f16(enc.get().text.encode_trimmed([""], max_text_len)[0]), allow_pickle=False)
        os.replace(tmp, empty)
    encoders = json.loads(enc.info_path.read_text())
    encoders["text"]["max_len"] = max_text_len
    if encoders.get("teacher"):
        encoders["teacher"]["buckets"] = settings["teacher_buckets"]
    config = {**settings, "world_size": world_size,
              "inputs": [str(i) for i in ([inputs] if isinstance(inputs, str | Path) else inputs)]}
    manifest = S.build_manifest(entries, dropped=Counter(r.split(":")[0] for r in fails.values()),
                                stages=stage_map or None, encoders=encoders, config=config, buckets=names)
    for name, b in manifest["buckets"].items():
        b["teacher"] = name in settings["teacher_buckets"]
    previous = None
    if (out / S.MANIFEST_NAME).is_file():  # a re-run: its held-out keys stay held out (data/split.py)
        try:
            previous = json.loads((out / S.MANIFEST_NAME).read_text())
        except ValueError:
            log.warning("%s is not valid JSON: the held-out split starts afresh", out / S.MANIFEST_NAME)
    apply_split(manifest, fraction=val[0], min_per_bucket=val[1], max_share=val[2], previous=previous)
    S.save_manifest(out, manifest)
    return manifest
