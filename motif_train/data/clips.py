"""Deterministic test/demo clips: moving shapes as mp4 files, caption `.txt`, metadata `.json`.

Used by the unit tests, the demo and the preprocessing tests in place of real footage. Two layouts:

* a clip folder (`write_clip_folder`): `<key>.mp4`, `<key>.txt`, `<key>.json` per clip;
* video2dataset-style WebDataset tars (`write_video2dataset_tars`): `00000.tar`, `00001.tar`, ... whose
  members are `<key>.mp4`, `<key>.txt`, `<key>.json`.

Both can include deliberately broken samples (a truncated mp4, an empty caption, a zero-byte mp4) so
that the preprocessing can be tested to skip them. Pixels are a pure function of the `ClipSpec`
(seed included); the mp4 bytes come from libx264 (mpeg4 when libx264 is not built into PyAV), run on
one thread. They are not always a pure function of the frames (on some machines an encode depends on
what the process encoded before), and another PyAV/FFmpeg build encodes other bytes: tests compare
decoded frames, or share one encode's bytes (`write_video2dataset_tars(mp4_from=...)`), never two
encodes' bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = ["ClipSpec", "default_specs", "render_frames", "write_mp4", "write_clip_folder",
           "write_video2dataset_tars", "default_codec", "BROKEN_KEYS"]

# reason -> key of the deliberately broken samples
BROKEN_KEYS = {"truncated": "broken_truncated", "empty_caption": "broken_emptycaption", "zero_bytes": "broken_zero"}
TRUNCATE_FRACTION = 0.4


@dataclass
class ClipSpec:
    key: str
    frames: int
    height: int
    width: int
    fps: float
    caption: str
    seed: int


# (height, width): portrait, square, landscape, all even (yuv420p) and mostly not multiples of 16
_SIZES = [(160, 96), (128, 128), (96, 160), (126, 74), (136, 240), (72, 128),
          (112, 112), (176, 144), (90, 160), (120, 200), (144, 96), (100, 100)]
# (frames, fps): a still image, ~0.3 s to ~3 s at 8-24 fps
_DURATIONS = [(1, 24.0), (8, 24.0), (12, 12.0), (24, 8.0), (33, 16.0), (49, 24.0),
              (17, 8.0), (25, 12.5), (45, 15.0), (72, 24.0), (10, 10.0), (20, 20.0)]

_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 80, 230), "yellow": (235, 215, 40),
            "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 210, 220)}
_KINDS = ["square", "circle"]
_BACKGROUNDS = ["dark", "grey", "teal", "sunset", "night"]
_BG_RGB = {"dark": ((10, 10, 20), (60, 60, 80)), "grey": ((90, 90, 90), (170, 170, 170)),
           "teal": ((0, 70, 80), (40, 150, 150)), "sunset": ((90, 30, 60), (200, 110, 40)),
           "night": ((5, 10, 40), (30, 50, 110))}
_VERBS = ["drifts", "slides", "bounces", "glides", "moves"]
_COUNT = {1: "one", 2: "two", 3: "three", 4: "four"}


def _scene(spec: ClipSpec) -> dict:
    """Everything random about a clip, drawn from `spec.seed` (positions/velocities in pixels)."""
    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    n = int(rng.integers(2, 5))
    shapes = []
    for _ in range(n):
        size = float(rng.uniform(0.18, 0.32) * min(h, w))
        speed = float(rng.uniform(0.03, 0.06) * min(h, w))  # pixels per frame, so short clips still move
        angle = float(rng.uniform(0, 2 * np.pi))
        shapes.append({"colour": str(rng.choice(list(_COLOURS))), "kind": str(rng.choice(_KINDS)), "size": size,
                       "x0": float(rng.uniform(0, w - size)), "y0": float(rng.uniform(0, h - size)),
                       "vx": speed * np.cos(angle), "vy": speed * np.sin(angle)})
    return {"background": str(rng.choice(_BACKGROUNDS)), "gradient_angle": float(rng.uniform(0, 2 * np.pi)),
            "shapes": shapes}


def _describe(scene: dict, verb: str) -> str:
    s = scene["shapes"][0]
    dx = "right" if s["vx"] > 0 else "left"
    dy = "down" if s["vy"] > 0 else "up"
    main = dx if abs(s["vx"]) >= abs(s["vy"]) else dy
    rest = len(scene["shapes"]) - 1
    others = f" while {_COUNT[rest]} other shape{'s' * (rest > 1)} move{'s' * (rest == 1)} around" if rest else ""
    article = "An" if s["colour"][0] in "aeiou" else "A"
    return f"{article} {s['colour']} {s['kind']} {verb} {main} over a {scene['background']} gradient{others}."


def default_specs(n: int = 12, seed: int = 0) -> list[ClipSpec]:
    """`n` clips with varied sizes/aspect ratios, lengths (one 1-frame clip) and distinct captions."""
    rng = np.random.default_rng([seed, 7919])
    specs: list[ClipSpec] = []
    captions: set[str] = set()
    for i in range(n):
        h, w = _SIZES[i % len(_SIZES)]
        frames, fps = _DURATIONS[i % len(_DURATIONS)]
        if i >= len(_DURATIONS):  # later rounds: vary the length but keep it in range
            frames = max(2, frames + int(rng.integers(-4, 5)))
        clip_seed = int(rng.integers(0, 2**31 - 1))
        spec = ClipSpec(key=f"clip{i:04d}", frames=frames, height=h, width=w, fps=fps, caption="", seed=clip_seed)
        for _ in range(100):  # redraw the seed until the caption is new
            caption = _describe(_scene(spec), _VERBS[int(rng.integers(len(_VERBS)))])
            if caption not in captions:
                break
            spec.seed = int(rng.integers(0, 2**31 - 1))
        captions.add(caption)
        spec.caption = caption
        specs.append(spec)
    return specs


def render_frames(spec: ClipSpec) -> np.ndarray:
    """(T, H, W, 3) uint8: coloured squares/circles bouncing over a gradient; deterministic from the spec."""
    scene = _scene(spec)
    h, w, t = spec.height, spec.width, spec.frames
    lo, hi = _BG_RGB[scene["background"]]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = scene["gradient_angle"]
    g = (np.cos(a) * xx / max(w - 1, 1) + np.sin(a) * yy / max(h - 1, 1))
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    bg = np.asarray(lo, np.float32) + g[..., None] * (np.asarray(hi, np.float32) - np.asarray(lo, np.float32))
    out = np.empty((t, h, w, 3), np.uint8)
    steps = np.arange(t, dtype=np.float64)
    for i in range(t):
        frame = bg.copy()
        for s in scene["shapes"]:
            size = s["size"]
            x = _reflect(s["x0"] + s["vx"] * steps[i], w - size)
            y = _reflect(s["y0"] + s["vy"] * steps[i], h - size)
            if s["kind"] == "square":
                mask = (xx >= x) & (xx < x + size) & (yy >= y) & (yy < y + size)
            else:
                r = size / 2
                mask = (xx - x - r + 0.5) ** 2 + (yy - y - r + 0.5) ** 2 <= r * r
            frame[mask] = _COLOURS[s["colour"]]
        out[i] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def _reflect(p: float, hi: float) -> float:
    """Fold a free coordinate into [0, hi] as if it bounced off both walls."""
    if hi <= 0:
        return 0.0
    q = np.mod(p, 2 * hi)
    return float(2 * hi - q if q > hi else q)


def default_codec() -> str:
    """The encoder `write_mp4` uses: libx264 when PyAV was built with it, else mpeg4."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(path: str | Path | io.BytesIO, frames: np.ndarray, fps: float, *, codec: str | None = None) -> str:
    """Encode (T, H, W, 3) uint8 frames as yuv420p mp4; odd sizes are padded (edge) to even.

    libx264 (crf 18) when PyAV has it, else mpeg4; `codec` forces one. Returns the codec used.
    """
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected (T>=1, H, W, 3) uint8 frames, got {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = codec or default_codec()
    rate = Fraction(fps).limit_denominator(1001)
    target = path if hasattr(path, "write") else str(path)
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One encoder thread: left at 0 ("auto"), x264 picks its thread count from the process's CPU
        # affinity at each call, and the count changes the bitstream (slices, lookahead, the SEI text),
        # so the same frames gave different mp4 bytes after something in the process pinned CPUs.
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 4_000_000
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return codec


def _meta(spec: ClipSpec) -> dict:
    return {"fps": spec.fps, "source": "make_clips", "frames": spec.frames,
            "width": spec.width + spec.width % 2, "height": spec.height + spec.height % 2}


def _broken_specs(seed: int) -> dict[str, ClipSpec]:
    base = dict(frames=24, height=128, width=128, fps=12.0)
    return {"truncated": ClipSpec(key=BROKEN_KEYS["truncated"], caption="A red square is cut off halfway.",
                                  seed=seed + 101, **base),
            "empty_caption": ClipSpec(key=BROKEN_KEYS["empty_caption"], caption="", seed=seed + 102, **base),
            "zero_bytes": ClipSpec(key=BROKEN_KEYS["zero_bytes"], caption="A clip with no bytes at all.",
                                   seed=seed + 103, **base)}


def _mp4_bytes(spec: ClipSpec) -> bytes:
    buf = io.BytesIO()
    write_mp4(buf, render_frames(spec), spec.fps)
    return buf.getvalue()


def _samples(specs: list[ClipSpec], broken: bool) -> list[tuple[ClipSpec, bytes]]:
    """(spec, mp4 bytes) for every sample to write; broken ones last (truncated, empty caption, zero)."""
    out = [(s, _mp4_bytes(s)) for s in specs]
    if broken:
        b = _broken_specs(specs[0].seed if specs else 0)
        data = _mp4_bytes(b["truncated"])
        out.append((b["truncated"], data[: int(len(data) * TRUNCATE_FRACTION)]))
        out.append((b["empty_caption"], _mp4_bytes(b["empty_caption"])))
        out.append((b["zero_bytes"], b""))
    return out


def write_clip_folder(out_dir: str | Path, specs: list[ClipSpec] | None = None, *, broken: bool = True) -> dict:
    """Write `<key>.mp4/.txt/.json` per clip (plus the broken samples).

    Returns {"clips": [good mp4 paths], "broken": {"truncated"|"empty_caption"|"zero_bytes": mp4 path}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = default_specs() if specs is None else specs
    reasons = {v: k for k, v in BROKEN_KEYS.items()}
    result: dict = {"clips": [], "broken": {}}
    for spec, data in _samples(specs, broken):
        mp4 = out / f"{spec.key}.mp4"
        mp4.write_bytes(data)
        (out / f"{spec.key}.txt").write_text(spec.caption, encoding="utf-8")
        (out / f"{spec.key}.json").write_text(json.dumps(_meta(spec)), encoding="utf-8")
        if broken and spec.key in reasons:
            result["broken"][reasons[spec.key]] = mp4
        else:
            result["clips"].append(mp4)
    return result


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = "motif"
    tar.addfile(info, io.BytesIO(data))


def write_video2dataset_tars(out_dir: str | Path, specs: list[ClipSpec] | None = None, *, per_tar: int = 5,
                             broken: bool = True, mp4_from: str | Path | None = None) -> list[Path]:
    """The same clips as WebDataset tars `00000.tar`, ... (`<key>.mp4/.txt/.json` members, `per_tar` samples
    each); with `broken` the truncated and empty-caption samples go into the last tar.

    `mp4_from`: a folder `write_clip_folder` wrote for the same specs; its `<key>.mp4` bytes go into the tars
    instead of a fresh encode, so the two inputs differ in container only. (x264 is not byte-stable across
    encodes in one process on every machine: measured here, 5 of 12 clips came out with other bytes when
    encoded again after other clips, so a folder-vs-tar comparison must share the bytes.)"""
    if per_tar < 1:
        raise ValueError("per_tar must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = default_specs() if specs is None else specs
    samples = [s for s in _samples(specs, broken) if s[0].key != BROKEN_KEYS["zero_bytes"]]
    if mp4_from is not None:
        samples = [(spec, (Path(mp4_from) / f"{spec.key}.mp4").read_bytes()) for spec, _ in samples]
    good = samples[: len(specs)]
    shards = [good[i: i + per_tar] for i in range(0, len(good), per_tar)] or [[]]
    shards[-1] = shards[-1] + samples[len(specs):]
    paths = []
    for idx, shard in enumerate(shards):
        path = out / f"{idx:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for spec, data in shard:
                _add_member(tar, f"{spec.key}.mp4", data)
                _add_member(tar, f"{spec.key}.txt", spec.caption.encode("utf-8"))
                _add_member(tar, f"{spec.key}.json", json.dumps(_meta(spec)).encode("utf-8"))
        paths.append(path)
    return paths
