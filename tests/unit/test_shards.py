"""The shard format: bucket names, sample encode/decode, ShardWriter, manifests."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from motif_train.data import shards as S
from motif_train.data.shards import (
    CorruptSample,
    ShardWriter,
    bucket_name,
    decode_sample,
    encode_sample,
    load_manifest,
    merge_manifests,
    parse_bucket,
    save_manifest,
)


def _meta(key: str, bucket: str = "9x32x48") -> dict:
    f, h, w = parse_bucket(bucket)
    return {"key": key, "caption": "a dog", "source": f"/x/{key}.mp4", "bucket": bucket, "frames": f, "fps": 8.0,
            "orig_size": [90, 160], "orig_frames": 40, "tokens": S.video_tokens(f, h, w)}


def _arrays(bucket: str = "9x32x48", seed: int = 0, text_len: int = 7):
    f, h, w = parse_bucket(bucket)
    g = np.random.default_rng(seed)
    return {"latents": g.standard_normal(S.latent_shape(f, h, w)).astype(np.float32),
            "text": g.standard_normal((text_len, 32)).astype(np.float32),
            "image": g.standard_normal((16, 24)).astype(np.float32),
            "teacher": torch.rand(3, f + 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


def test_bucket_names():
    assert bucket_name(9, 64, 96) == "9x64x96"
    assert parse_bucket("9x64x96") == (9, 64, 96)
    assert S.latent_shape(9, 64, 96) == [16, 3, 8, 12]
    assert S.video_tokens(9, 64, 96) == 3 * 4 * 6
    assert S.shard_name("9x64x96", 1, 3) == "shards/9x64x96/9x64x96-r01-00003.tar"
    assert S.parse_shard_name("shards/9x64x96/9x64x96-r01-00003.tar") == ("9x64x96", 1, 3)
    for bad, what in [("8x64x96", r"1\+4k"), ("9x60x96", "multiples of 16"), ("9x64", "FRAMESxHEIGHTxWIDTH")]:
        with pytest.raises(ValueError, match=what):
            parse_bucket(bad)
    with pytest.raises(ValueError, match="9x64x72"):
        bucket_name(9, 64, 72)


def test_round_trip_through_webdataset(tmp_path):
    import webdataset as wds

    samples = {}
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path), encoder=False) as tw:
        for i, bucket in enumerate(["9x32x48", "1x32x32", "5x48x32"]):
            key = f"k{i}"
            arr = _arrays(bucket, seed=i)
            if i == 1:  # no optional members
                arr.pop("image"), arr.pop("teacher")
            samples[key] = arr
            tw.write(encode_sample(key, meta=_meta(key, bucket), **arr))
    got = {}
    for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        d = decode_sample(raw)
        got[d["key"]] = d
    assert sorted(got) == sorted(samples)
    for key, arr in samples.items():
        d = got[key]
        assert d["latents"].dtype == np.float16 and d["text"].dtype == np.float16
        np.testing.assert_array_equal(d["latents"], arr["latents"].astype(np.float16))
        np.testing.assert_array_equal(d["text"], arr["text"].astype(np.float16))
        assert d["meta"]["latent_shape"] == list(arr["latents"].shape)
        assert d["meta"]["text_len"] == arr["text"].shape[0] and d["meta"]["key"] == key
        if "image" in arr:
            assert d["image"].dtype == np.float16
            np.testing.assert_array_equal(d["image"], arr["image"].astype(np.float16))
            assert d["teacher"].dtype == np.uint8 and d["teacher"].shape == tuple(arr["teacher"].shape)
            want = np.rint((arr["teacher"].numpy() + 1) * 127.5).astype(np.uint8)
            np.testing.assert_array_equal(d["teacher"], want)
            back = S.teacher_from_uint8(d["teacher"])
            assert np.abs(back - arr["teacher"].numpy()).max() <= 0.5 / 127.5 + 1e-6
        else:
            assert "image" not in d and "teacher" not in d  # absent, not None (the loader checks `in`)


def test_decode_accepts_loader_and_raw_member_dicts():
    raw = encode_sample("abc", meta=_meta("abc"), **_arrays())
    loader_style = {k: v for k, v in raw.items() if k != "__key__"}  # the loader's TarIndex.sample()
    assert decode_sample(loader_style)["key"] == "abc"
    members = {f"abc.{k}": v for k, v in loader_style.items()}  # tar member names
    d = decode_sample(members)
    assert d["key"] == "abc" and d["latents"].shape == (16, 3, 4, 6)


def _corrupt(raw: dict, **changes) -> dict:
    out = dict(raw)
    for k, v in changes.items():
        k = k.replace("_npy", ".npy")
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def test_corrupt_samples_name_key_and_field():
    raw = encode_sample("clip7", meta=_meta("clip7"), **_arrays())
    bad_meta = json.loads(raw["json"])
    bad_meta["latent_shape"] = [16, 2, 4, 6]
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3), np.float32), allow_pickle=False)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    teacher_meta = json.loads(raw["json"])
    teacher_meta["frames"] = 5
    cases = [
        (_corrupt(raw, latents_npy=None), "latents", "missing"),
        (_corrupt(raw, text_npy=None), "text", "missing"),
        (_corrupt(raw, json=None), "json", "missing"),
        (_corrupt(raw, json=b"{not json"), "json", "unreadable"),
        (_corrupt(raw, json=json.dumps(bad_meta).encode()), "latents", "latent_shape"),
        (_corrupt(raw, latents_npy=raw["latents.npy"][:-10]), "latents", "unreadable"),
        (_corrupt(raw, text_npy=b"garbage bytes"), "text", "unreadable"),
        (_corrupt(raw, text_npy=obj.getvalue()), "text", "unreadable"),  # pickled object array refused
        (_corrupt(raw, text_npy=buf.getvalue()), "text", "float16"),
        (_corrupt(raw, image_npy=S.npy_bytes(np.zeros((2, 3, 4), np.float16))), "image", "shape"),
        (_corrupt(raw, json=json.dumps(teacher_meta).encode()), "teacher", "shape"),
    ]
    for members, field, problem in cases:
        with pytest.raises(CorruptSample, match=problem) as e:
            decode_sample(members)
        assert e.value.key == "clip7" and e.value.field == field, (field, str(e.value))
        assert "clip7" in str(e.value) and field in str(e.value)
    # a sample whose latents do not fit its bucket
    m = _meta("k", "5x32x48")
    with pytest.raises(CorruptSample, match="bucket"):
        decode_sample(encode_sample("k", meta=m, **{**_arrays("9x32x48"), "teacher": None}))
    assert isinstance(CorruptSample("plain message"), ValueError)


def test_encode_sample_checks():
    arr = _arrays()
    with pytest.raises(ValueError, match="dots"):
        encode_sample("a.b", meta=_meta("a.b"), **arr)
    with pytest.raises(ValueError, match="text_len"):
        encode_sample("a", meta={**_meta("a"), "text_len": 3}, **arr)
    with pytest.raises(ValueError, match="meta is required"):
        encode_sample("a", arr["latents"], arr["text"])


def test_shard_writer_rolls_over_and_continues_numbering(tmp_path):
    closed = []
    w = ShardWriter(tmp_path, rank=3, target_samples=2, on_close=closed.append)
    for i in range(5):
        w.write("9x32x48", encode_sample(f"a{i}", meta=_meta(f"a{i}"), **_arrays(seed=i)), source=f"s{i}")
    w.write("1x32x32", encode_sample("b0", meta=_meta("b0", "1x32x32"), **_arrays("1x32x32")), source="t0")
    assert [e["path"] for e in closed] == ["shards/9x32x48/9x32x48-r03-00000.tar",
                                           "shards/9x32x48/9x32x48-r03-00001.tar"]
    assert list(tmp_path.glob("shards/*/*.tar.tmp")) and len(list(tmp_path.glob("shards/*/*.tar"))) == 2
    entries = w.close()
    assert len(entries) == 4 and not list(tmp_path.glob("shards/*/*.tmp"))
    assert [e["samples"] for e in entries] == [2, 2, 1, 1]
    assert entries[0]["keys"] == ["a0", "a1"] and entries[0]["sources"] == ["s0", "s1"]
    for e in entries:
        p = tmp_path / e["path"]
        assert e["bytes"] == p.stat().st_size and S.read_tar_keys(p) == e["keys"]
    # a new writer continues after the highest index; byte target closes a shard early
    w2 = ShardWriter(tmp_path, rank=3, target_samples=100, target_bytes=1)
    e = w2.write("9x32x48", encode_sample("c0", meta=_meta("c0"), **_arrays()))
    assert e["path"].endswith("9x32x48-r03-00003.tar")
    w4 = ShardWriter(tmp_path, rank=3, target_samples=1, first_index={"9x32x48": 7})  # never reuse a lost name
    assert w4.write("9x32x48", encode_sample("c1", meta=_meta("c1"), **_arrays()))["path"].endswith("-r03-00007.tar")
    # an exception inside the context leaves the unfinished .tmp (like a crash)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, rank=0) as w3:
            w3.write("9x32x48", encode_sample("d0", meta=_meta("d0"), **_arrays()))
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.glob("shards/*/*.tmp")] == ["9x32x48-r00-00000.tar.tmp"]


def test_identical_content_gives_identical_tar_bytes(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(tmp_path / d) as w:
            w.write("9x32x48", encode_sample("k", meta=_meta("k"), **_arrays()))
    rel = "shards/9x32x48/9x32x48-r00-00000.tar"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def _part(tmp_path, rank: int, keys: list[str], bucket: str = "9x32x48") -> dict:
    with ShardWriter(tmp_path, rank=rank) as w:
        for k in keys:
            w.write(bucket, encode_sample(k, meta=_meta(k, bucket), **_arrays(bucket)))
    return S.build_manifest(w.entries, dropped={"too_short": rank + 1}, stages={"s1": [bucket]},
                            encoders={"text": {"dim": 32}}, buckets=["1x32x32"])


def test_manifest_save_load_merge(tmp_path):
    m0 = _part(tmp_path, 0, ["a", "b", "c"])
    m1 = _part(tmp_path, 1, ["d"], "5x48x32")
    assert m0["totals"] == {"samples": 3, "tokens": 3 * 18, "shards": 1, "bytes": m0["shards"][0]["bytes"]}
    assert m0["buckets"]["1x32x32"]["samples"] == 0 and m0["stages"]["s1"] == {"samples": 3, "tokens": 54}
    m = merge_manifests([m0, m1])
    assert m["totals"]["samples"] == 4 and m["totals"]["shards"] == 2
    assert m["dropped"] == {"too_short": 3}
    assert sum(b["samples"] for b in m["buckets"].values()) == sum(s["samples"] for s in m["shards"]) == 4
    for name, b in m["buckets"].items():
        assert all(m["shards"][i]["bucket"] == name for i in b["shards"])
    assert m["stages"]["s1"]["samples"] == 4  # each part counts its own samples of the stage
    save_manifest(tmp_path, m)
    assert load_manifest(tmp_path) == json.loads(json.dumps(m))
    with pytest.raises(ValueError, match="duplicate key"):
        merge_manifests([m0, {**m1, "shards": [{**m1["shards"][0], "path": "x.tar", "keys": ["a"]}]}])
    with pytest.raises(ValueError, match="encoders"):
        merge_manifests([m0, {**m1, "encoders": {"text": {"dim": 64}}}])
    # a missing shard is named, with the fix
    (tmp_path / m["shards"][1]["path"]).unlink()
    with pytest.raises(FileNotFoundError, match="motif-preprocess") as e:
        load_manifest(tmp_path)
    assert m["shards"][1]["path"] in str(e.value)
    save_manifest(tmp_path, {**m, "version": 99})
    with pytest.raises(ValueError, match="version"):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="motif-preprocess"):
        load_manifest(tmp_path / "nothing")


def test_shard_members_are_plain_npy(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write("9x32x48", encode_sample("k", meta=_meta("k"), **_arrays()))
    with tarfile.open(tmp_path / w.entries[0]["path"]) as tf:
        names = tf.getnames()
        assert names == ["k.image.npy", "k.json", "k.latents.npy", "k.teacher.npy", "k.text.npy"]
        for n in names:
            if n.endswith(".npy"):
                np.load(io.BytesIO(tf.extractfile(n).read()), allow_pickle=False)


def test_member_index_is_written_and_carried(tmp_path):
    import zlib

    with ShardWriter(tmp_path, target_samples=2) as w:
        for k in ("a", "b", "c"):
            w.write("9x32x48", encode_sample(k, meta=_meta(k), **_arrays()))
    e = w.entries[0]
    raw = (tmp_path / e["index"]).read_bytes()
    assert e["index"] == e["path"] + ".idx.json" and e["index_crc"] == zlib.crc32(raw)
    tar_bytes, members = S.parse_index(raw)
    assert tar_bytes == e["bytes"] == (tmp_path / e["path"]).stat().st_size
    with tarfile.open(tmp_path / e["path"]) as tf:
        want = {m.name: (m.offset_data, m.size, zlib.crc32(tf.extractfile(m).read())) for m in tf}
    assert members == want and len(want) == 10
    # the manifest keeps it, also through a merge; index_entry finds it again from the files
    m = S.build_manifest(w.entries)
    assert [(s["index"], s["index_crc"]) for s in m["shards"]] == [(x["index"], x["index_crc"]) for x in w.entries]
    assert merge_manifests([m])["shards"] == m["shards"]
    assert S.index_entry(tmp_path, e["path"]) == {"index": e["index"], "index_crc": e["index_crc"]}
    with open(tmp_path / e["path"], "r+b") as f:  # an index that does not describe the tar is not used
        f.truncate(e["bytes"] - 1024)
    assert S.index_entry(tmp_path, e["path"]) == {}
    (tmp_path / e["index"]).write_bytes(b"{garbage")
    assert S.index_entry(tmp_path, e["path"]) == {}
    with pytest.raises(ValueError, match="version"):
        S.parse_index(b'{"version": 9, "tar_bytes": 0, "members": []}')
    # manifests from before the index (no such keys) still build
    old = [{k: v for k, v in x.items() if not k.startswith("index")} for x in w.entries]
    assert all("index" not in s for s in S.build_manifest(old)["shards"])


def test_non_finite_arrays_are_corrupt():
    raw = encode_sample("k", meta=_meta("k"), **_arrays())
    for field, bad in (("latents", np.nan), ("text", np.inf), ("image", -np.inf)):
        arr = decode_sample(raw)[field].copy()
        arr.reshape(-1)[3] = bad
        with pytest.raises(CorruptSample, match="1 non-finite") as e:
            decode_sample({**raw, f"{field}.npy": S.npy_bytes(arr)})
        assert e.value.key == "k" and e.value.field == field
