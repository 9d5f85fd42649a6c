"""motif-preprocess: clips -> bucketed shards, failures, resume, rank slicing, CLI."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from motif_train.data import preprocess as P
from motif_train.data.clips import BROKEN_KEYS, ClipSpec, render_frames, write_clip_folder, write_video2dataset_tars
from motif_train.data.shards import decode_sample, load_manifest, parse_bucket, teacher_to_uint8
from motif_train.objectives.encoders import build_tiny_encoders, load_encoders
from motif_train.objectives.repa import teacher_pixels

BUCKETS = [[1, 32, 32], [5, 32, 48], [9, 48, 32], [9, 32, 32]]
SPECS = [
    ClipSpec("portrait", 12, 96, 64, 12.0, "A red square slides down over a dark gradient.", 1),
    ClipSpec("landscape", 10, 64, 96, 10.0, "A blue circle moves left over a grey gradient.", 2),
    ClipSpec("square", 16, 64, 64, 16.0, "Two white squares bounce in a dark room.", 3),
    ClipSpec("still", 1, 40, 40, 24.0, "A yellow circle on a teal background.", 4),
    ClipSpec("short", 3, 64, 64, 12.0, "A green square flies up.", 5),
    ClipSpec("wide", 30, 72, 128, 24.0, "An orange circle glides right at sunset.", 6),
    ClipSpec("tall", 20, 128, 72, 20.0, "A purple square drifts down at night.", 7),
]
EXPECTED_BUCKET = {"portrait": "9x48x32", "landscape": "5x32x48", "square": "9x32x32", "still": "1x32x32",
                   "wide": "5x32x48", "tall": "9x48x32"}
GOOD = sorted(EXPECTED_BUCKET)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    build_tiny_encoders(root / "enc")
    enc = load_encoders(root / "enc")
    clips = write_clip_folder(root / "clips", SPECS, broken=True)
    return {"root": root, "enc": enc, "clips": root / "clips", "broken": clips["broken"]}


def _run(env, out, inputs=None, **kw):
    kw = {"buckets": BUCKETS, "shard_samples": 2, "progress": False, **kw}
    return P.preprocess(inputs or [env["clips"]], out, env["enc"], **kw)


@pytest.fixture(scope="module")
def clean(env):
    out = env["root"] / "clean"
    return out, _run(env, out)


def _samples(out: Path, manifest: dict) -> dict[str, dict]:
    got = {}
    for s in manifest["shards"]:
        with tarfile.open(out / s["path"]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for key in s["keys"]:
            d = decode_sample({n: v for n, v in members.items() if n.startswith(key + ".")})
            assert d["meta"]["bucket"] == s["bucket"]
            assert key not in got
            got[key] = d
    return got


def _tar_digests(out: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(out).as_posix(): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.glob("shards/*/*"))}


def _keys(manifest: dict) -> list[str]:
    return sorted(k for s in manifest["shards"] for k in s["keys"])


# ------------------------------------------------------------------------------ pure parts


def test_choose_bucket():
    b = [tuple(x) for x in BUCKETS]
    assert P.choose_bucket(12, 96, 64, b) == (9, 48, 32)  # portrait -> portrait
    assert P.choose_bucket(12, 64, 96, b) == (5, 32, 48)  # landscape, nearest aspect among <= 12 frames
    assert P.choose_bucket(12, 64, 64, b) == (9, 32, 32)  # square: more frames wins the aspect tie
    assert P.choose_bucket(6, 96, 64, b) == (5, 32, 48)   # too short for 9: best remaining
    assert P.choose_bucket(1, 96, 64, b) == (1, 32, 32)   # images only to 1-frame buckets
    assert P.choose_bucket(4, 64, 64, b) is None          # a short video never becomes an image
    assert P.choose_bucket(1, 64, 64, [(5, 32, 32)]) is None
    assert P.choose_bucket(30, 64, 64, [(1, 32, 32), (1, 32, 48)]) == (1, 32, 32)  # image-only bucket set
    assert P.choose_bucket(9, 64, 64, [(9, 32, 32), (9, 64, 64)]) == (9, 64, 64)  # then larger area


def test_sample_indices():
    assert P.sample_indices(30, 24.0, 8.0) == ([0, 3, 6, 9, 12, 15, 18, 21, 24, 27], 8.0)
    assert P.sample_indices(10, 10.0, 4.0) == ([0, 3, 5, 8], 4.0)  # step 2.5, rounded half up
    assert P.sample_indices(5, 8.0, 24.0) == ([0, 1, 2, 3, 4], 8.0)  # never upsampled
    assert P.sample_indices(5, 8.0, None) == ([0, 1, 2, 3, 4], 8.0)


def test_resize_crop_covers_and_centres():
    img = np.zeros((1, 40, 80, 3), np.uint8)
    img[:, :, 20:60] = 255  # the middle half of the width: exactly what a 32x32 cover crop keeps
    out = P.resize_crop(img, 32, 32)
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32
    assert out[:, :, :, 2:30].min() > 0.99
    tall = np.zeros((2, 80, 40, 3), np.uint8)
    tall[:, 20:60] = 255
    out = P.resize_crop(tall, 32, 32)
    assert out.shape == (3, 2, 32, 32) and out[:, :, 2:30].min() > 0.99
    up = P.resize_crop(np.full((1, 8, 8, 3), 255, np.uint8), 32, 48)  # upscaling covers too
    assert up.shape == (3, 1, 32, 48) and torch.allclose(up, torch.ones_like(up))


def test_list_items_unique_keys(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.y.mp4").write_bytes(b"")
    (tmp_path / "a" / "z.mp4").write_bytes(b"")
    items = P.list_items([tmp_path / "a", str(tmp_path / "b" / "*.mp4")])
    keys = [it.key for it in items]
    assert len(set(keys)) == 3 and "z" in keys
    assert all(k.startswith("x_y-") for k in keys if k != "z")
    with pytest.raises(FileNotFoundError, match="nothing"):
        P.list_items([tmp_path / "nothing"])


# ------------------------------------------------------------------------------ a full run


def test_folder_run(env, clean):
    out, m = clean
    enc = env["enc"]
    got = _samples(out, m)
    # counts agree everywhere
    assert sorted(got) == GOOD == _keys(m)
    assert m["totals"]["samples"] == sum(s["samples"] for s in m["shards"]) == \
        sum(b["samples"] for b in m["buckets"].values()) == len(GOOD)
    assert m["totals"]["tokens"] == sum(b["samples"] * b["tokens"] for b in m["buckets"].values())
    assert m["totals"]["bytes"] == sum((out / s["path"]).stat().st_size for s in m["shards"])
    for name, b in m["buckets"].items():
        assert [m["shards"][i]["bucket"] for i in b["shards"]] == [name] * len(b["shards"])
        assert sum(m["shards"][i]["samples"] for i in b["shards"]) == b["samples"]
    assert load_manifest(out)["totals"] == m["totals"]
    # every sample fits its bucket; text is trimmed to the tokenizer's true length
    for key, d in got.items():
        f, h, w = parse_bucket(d["meta"]["bucket"])
        assert d["meta"]["bucket"] == EXPECTED_BUCKET[key]
        assert d["latents"].shape == (16, 1 + (f - 1) // 4, h // 8, w // 8) == tuple(d["meta"]["latent_shape"])
        n = int(enc.text.tokenize([d["meta"]["caption"]])["attention_mask"].sum())
        assert d["text"].shape == (n, 32) == (d["meta"]["text_len"], 32)
        assert d["image"].shape == (16, 24) and d["teacher"].shape == (3, f + 1, 32, 32)
        assert d["meta"]["tokens"] == (1 + (f - 1) // 4) * (h // 16) * (w // 16)
        assert d["meta"]["source"] == str(env["clips"] / f"{key}.mp4")
    assert got["square"]["meta"]["frame_indices"] == list(range(3, 12))  # centred window of 16 frames
    assert got["wide"]["meta"]["orig_size"] == [72, 128] and got["wide"]["meta"]["orig_frames"] == 30
    # broken inputs are failures with reasons, the run went on
    fails = {Path(r["source"]).stem: r["reason"] for r in map(json.loads, (out / "failures.jsonl").open())}
    assert fails["short"] == "too_short"
    assert fails[BROKEN_KEYS["empty_caption"]] == "empty_caption"
    assert fails[BROKEN_KEYS["truncated"]].startswith("decode_error: ")
    assert fails[BROKEN_KEYS["zero_bytes"]].startswith("decode_error: ")
    assert m["dropped"] == {"decode_error": 2, "empty_caption": 1, "too_short": 1}
    # the CFG empty prompt
    empty = np.load(out / "empty_prompt.npy", allow_pickle=False)
    assert empty.dtype == np.float16
    np.testing.assert_allclose(empty, enc.text.encode_trimmed([""])[0].numpy().astype(np.float16), atol=1e-3)
    assert m["encoders"]["text"]["dim"] == 32 and m["encoders"]["image"] == {"tokens": 16, "dim": 24}
    assert m["config"]["buckets"] == sorted(["1x32x32", "5x32x48", "9x48x32", "9x32x32"])


def test_shard_tensors_equal_the_encoders(env, clean):
    out, m = clean
    enc = env["enc"]
    got = _samples(out, m)
    for key in ("portrait", "wide"):
        spec = next(s for s in SPECS if s.key == key)
        pixels, bucket, idx = P.load_frames(env["clips"] / f"{key}.mp4", buckets=[tuple(b) for b in BUCKETS])
        assert "x".join(map(str, bucket)) == EXPECTED_BUCKET[key] and idx == got[key]["meta"]["frame_indices"]
        # decode + window + resize agree with the rendered (pre-compression) frames
        ref = P.resize_crop(render_frames(spec)[idx], *bucket[1:])
        assert (pixels - ref).abs().mean() < 0.03
        d = got[key]
        lat = enc.vae.encode(pixels[None])[0].numpy()
        np.testing.assert_allclose(d["latents"].astype(np.float32), lat, rtol=2e-3, atol=2e-3)
        img = enc.image.encode(pixels[None, :, 0])[0].numpy()
        np.testing.assert_allclose(d["image"].astype(np.float32), img, rtol=2e-3, atol=2e-3)
        tp = teacher_to_uint8(teacher_pixels(pixels[None], enc.teacher.crop_size)[0].numpy())
        assert np.abs(d["teacher"].astype(int) - tp.astype(int)).max() <= 1


def test_fps_resampling(env, tmp_path):
    pixels, bucket, idx = P.load_frames(env["clips"] / "wide.mp4", fps=8, buckets=[tuple(b) for b in BUCKETS])
    assert bucket == (5, 32, 48) and idx == [6, 9, 12, 15, 18]  # 30 frames @24 -> 10 @8, centred 5
    m = _run(env, tmp_path / "o", inputs=[env["clips"] / "wide.mp4", env["clips"] / "portrait.mp4"], fps=8)
    got = _samples(tmp_path / "o", m)
    assert got["wide"]["meta"]["fps"] == 8 and got["wide"]["meta"]["frame_indices"] == idx
    assert got["portrait"]["meta"]["bucket"] == "5x32x48"  # 12 frames @12 -> 8 @8: too short for 9


def test_tar_input_gives_the_same_samples(env, clean, tmp_path):
    tars = write_video2dataset_tars(tmp_path / "v2d", SPECS, per_tar=3, broken=True, mp4_from=env["clips"])
    m = _run(env, tmp_path / "o", inputs=[str(tmp_path / "v2d" / "*.tar")])
    assert len(tars) == 3
    a, b = _samples(clean[0], clean[1]), _samples(tmp_path / "o", m)
    assert sorted(a) == sorted(b) == GOOD
    for k in GOOD:
        for field in ("latents", "text", "image", "teacher"):
            np.testing.assert_array_equal(a[k][field], b[k][field], err_msg=f"{k} {field}")
        assert b[k]["meta"]["source"].endswith(f".tar::{k}.mp4")
    reasons = {r["source"].split("::")[1]: r["reason"] for r in map(json.loads, (tmp_path / "o/failures.jsonl").open())}
    assert reasons["short.mp4"] == "too_short" and reasons[f"{BROKEN_KEYS['empty_caption']}.mp4"] == "empty_caption"
    assert reasons[f"{BROKEN_KEYS['truncated']}.mp4"].startswith("decode_error")


class _Crash(BaseException):
    """Not an Exception: gets past the per-clip handlers, like a kill."""


def test_resume_after_crash_and_lost_shard(env, clean, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real, calls = P._encode_clip, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:  # after "tall" closed the first 9x48x32 shard
            raise _Crash
        return real(*a, **k)

    monkeypatch.setattr(P, "_encode_clip", flaky)
    with pytest.raises(_Crash):
        _run(env, out)
    monkeypatch.setattr(P, "_encode_clip", real)
    assert list(out.glob("shards/*/*.tar.tmp")) and not (out / "manifest.json").exists()
    journal = [json.loads(x) for x in (out / "progress/rank0.jsonl").read_text().splitlines()]
    assert journal and all((out / e["shard"]).is_file() for e in journal)
    m = _run(env, out)
    assert _keys(m) == _keys(clean[1]) == GOOD
    assert not list(out.glob("shards/*/*.tmp"))
    assert m["dropped"] == clean[1]["dropped"] and len((out / "failures.jsonl").read_text().splitlines()) == 4
    # nothing left to do: nothing rewritten
    before = _tar_digests(out)
    m2 = _run(env, out)
    assert _tar_digests(out) == before and _keys(m2) == GOOD and m2["totals"] == m["totals"]
    # a lost shard (journal kept) and a lost manifest: the shard's clips are redone into a new shard
    lost = m["shards"][0]
    (out / lost["path"]).unlink()
    (out / "manifest.json").unlink()
    m3 = _run(env, out)
    assert _keys(m3) == GOOD and lost["path"] not in {s["path"] for s in m3["shards"]}
    assert {k: v for k, v in _tar_digests(out).items() if k in before} == \
        {k: v for k, v in before.items() if k != lost["path"]}
    journal = [json.loads(x) for x in (out / "progress/rank0.jsonl").read_text().splitlines()]
    assert lost["path"] not in {e["shard"] for e in journal}
    # a finished shard the journal never heard of (crash between rename and journal write) is adopted
    (out / "progress/rank0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in journal[1:]))
    m4 = _run(env, out)
    assert _keys(m4) == GOOD and m4["totals"] == m3["totals"]


def test_two_ranks_file_merge(env, clean, tmp_path):
    out = tmp_path / "o"
    r1 = _run(env, out, rank=1, world_size=2)  # sequential: rank 1 first, rank 0 then merges
    assert r1["rank"] == 1 and r1["written"] > 0 and not (out / "manifest.json").exists()
    m = _run(env, out, rank=0, world_size=2)
    assert _keys(m) == _keys(clean[1])
    ranks = {s["path"].split("-r")[1][:2] for s in m["shards"]}
    assert ranks == {"00", "01"}
    src = [{s for e in map(json.loads, (out / f"progress/rank{r}.jsonl").open()) for s in e["sources"]}
           for r in (0, 1)]
    assert src[0] and src[1] and not src[0] & src[1]
    assert m["dropped"] == clean[1]["dropped"] and m["config"]["world_size"] == 2


def test_other_settings_are_refused(env, clean):
    with pytest.raises(ValueError, match="other settings"):
        _run(env, clean[0], fps=4)


def test_cli_curriculum(env, tmp_path, capsys):
    from motif_train.cli.preprocess import main, read_curriculum

    cur = tmp_path / "cur.yaml"
    cur.write_text("stages:\n"
                   "  - {name: early, buckets: [[9, 48, 32], [5, 32, 48]], repa: true}\n"
                   "  - {name: late, buckets: [[9, 32, 32], [1, 32, 32]], repa: false}\n")
    inputs = [str(env["clips"] / f"{k}.mp4") for k in ("portrait", "square", "still", "landscape")]
    out = tmp_path / "o"
    assert main(["--input", *inputs, "--out", str(out), "--encoders", str(env["root"] / "enc"),
                 "--curriculum", str(cur), "--shard-samples", "8", "--no-progress"]) == 0
    m = load_manifest(out)
    got = _samples(out, m)
    assert sorted(got) == ["landscape", "portrait", "square", "still"]
    for k, d in got.items():
        assert ("teacher" in d) == (d["meta"]["bucket"] in ("9x48x32", "5x32x48")), k
    assert m["stages"] == {"early": {"samples": 2, "tokens": 18 + 12}, "late": {"samples": 2, "tokens": 12 + 4}}
    assert m["encoders"]["teacher"]["buckets"] == ["5x32x48", "9x48x32"]
    assert json.loads(capsys.readouterr().out)["samples"] == 4
    with pytest.raises(SystemExit):
        main(["--input", "x", "--out", "y", "--encoders", "z", "--buckets", "9x60x96"])
    assert "9x60x96" in capsys.readouterr().err
    cur.write_text("stages:\n  - {name: bad, buckets: [[8, 32, 32]]}\n")
    with pytest.raises(ValueError, match="bad.*8x32x32"):
        read_curriculum(cur)
    tiny = read_curriculum(Path(__file__).parents[2] / "configs/curriculum/tiny.yaml")
    assert [s["repa"] for s in tiny] == [True, False] and tiny[0]["buckets"] == ["9x64x96", "5x96x64"]


def test_decord_width_bug_falls_back_to_pyav(env):
    # decord 0.6.0 returns 4-6 "channels" (then fails in get_batch) for some small widths, 72 among them
    reader, size, fps = P._decode(str(env["clips"] / "tall.mp4"), False, 0)
    assert isinstance(reader, P._Frames) and size == (128, 72) and fps == 20.0 and len(reader) == 20
    frames = reader.get_batch([3, 0, 19])
    spec = next(s for s in SPECS if s.key == "tall")
    assert frames.shape == (3, 128, 72, 3)
    assert np.abs(frames.astype(int) - render_frames(spec)[[3, 0, 19]].astype(int)).mean() < 6  # lossy mp4
    reader, size, _ = P._decode(str(env["clips"] / "portrait.mp4"), False, 0)
    assert not isinstance(reader, P._Frames) and size == (96, 64)
