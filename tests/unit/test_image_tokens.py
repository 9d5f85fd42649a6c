"""I2V needs SigLIP tokens in every sample of a video bucket: the task of a step is the same on every rank, so no
rank may fall back to T2V (issue 16 §3). The manifest counts them per bucket (`image_samples`); the trainer's
start-up check refuses an I2V stage whose buckets lack them, naming the buckets and the fix; old manifests fall
back to the sample index or the preprocessing settings; an I2V micro-batch without them raises."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from motif_train.data import shards as S
from motif_train.data.curriculum import StageConfig
from motif_train.data.loader import ShardSource
from motif_train.data.sample_index import SAMPLE_INDEX_DIR

A, V, IMG = "9x32x48", "5x32x48", "1x32x32"  # two video buckets and an image bucket


def _write(root, layout: dict[str, list[bool]]) -> dict:
    """{bucket: [sample has image tokens, ...]} -> tars + manifest (+ sample index) under root."""
    entries, n = [], 0
    for bucket, images in layout.items():
        f, h, w = S.parse_bucket(bucket)
        with S.ShardWriter(root, target_samples=3) as wr:
            for has in images:
                key, g = f"s{n:03d}", np.random.default_rng(n)
                meta = {"key": key, "caption": "c", "source": key, "bucket": bucket, "frames": f,
                        "tokens": S.video_tokens(f, h, w)}
                wr.write(bucket, S.encode_sample(key, g.standard_normal(S.latent_shape(f, h, w)),
                                                 g.standard_normal((4, 32)),
                                                 g.standard_normal((16, 24)) if has else None, meta=meta), source=key)
                n += 1
        entries += wr.entries
    manifest = S.build_manifest(entries, buckets=list(layout), encoders={"image": {"tokens": 16, "dim": 24}},
                                config={"image": True})
    S.save_manifest(root, manifest)
    return manifest


def _source(root, **kw) -> ShardSource:
    return ShardSource(root=str(root), num_workers=0, text_dim=32, image_dim=24, seed=0, dp_rank=0, dp_size=2,
                       grad_accum=1, **kw)


def _stage(name, buckets, i2v=None) -> StageConfig:
    return StageConfig(name=name, steps=5, buckets=[list(S.parse_bucket(b)) for b in buckets], token_budget=64,
                       i2v_prob=i2v)


def _stages(*rows):
    """(StageConfig, i2v prob) -> the trainer's (label, key, prob, stage) rows."""
    return [(f"curriculum stage {i} ({st.name!r})", f"curriculum.stages[{i}].i2v_prob", p, st)
            for i, (st, p) in enumerate(rows)]


LAYOUT = {A: [True, False, True, True, False, True], V: [True] * 4, IMG: [False] * 4}


def test_manifest_counts_image_samples_per_shard_and_bucket(tmp_path):
    m = _write(tmp_path, LAYOUT)
    assert {b: (t["samples"], t["image_samples"]) for b, t in m["buckets"].items()} == {
        IMG: (4, 0), A: (6, 4), V: (4, 4)}
    assert sorted(s["image_samples"] for s in m["shards"] if s["bucket"] == A) == [2, 2]  # shards of 3
    assert S.merge_manifests([m])["buckets"][A]["image_samples"] == 4  # a merge re-sums the shards' counts
    # a shard without the count (a manifest from before it) leaves its bucket's count unknown
    old = [{k: v for k, v in s.items() if k != "image_samples"} if s["bucket"] == A else s for s in m["shards"]]
    again = S.build_manifest(old)
    assert "image_samples" not in again["buckets"][A] and again["buckets"][V]["image_samples"] == 4


def test_startup_check_names_the_buckets_and_the_fix(tmp_path):
    m = _write(tmp_path, LAYOUT)
    rows = [("curriculum stage 0 ('low')", "curriculum.stages[0].i2v_prob", 0.5, [A, V, IMG]),
            ("curriculum stage 1 ('hi')", "curriculum.stages[1].i2v_prob", 0.3, [V])]
    with pytest.raises(ValueError) as e:
        S.check_image_tokens(m["buckets"], rows, root=tmp_path)
    msg = str(e.value)
    assert "curriculum stage 0 ('low') trains I2V (i2v_prob=0.5)" in msg and "9x32x48 (4 of 6 samples have them)" in msg
    assert V not in msg and IMG not in msg  # complete video bucket / image bucket (always T2V): fine
    assert "stage 1" not in msg
    assert "motif-preprocess with the image encoder" in msg and "--no-image" in msg
    assert "curriculum.stages[0].i2v_prob=0" in msg and "objective.conditioning.i2v_prob=0" in msg
    assert str(tmp_path / "manifest.json") in msg
    # i2v_prob 0 needs no image tokens at all; a complete bucket passes at any probability
    S.check_image_tokens(m["buckets"], [("s", "k", 0.0, [A, V, IMG]), ("t", "k2", 1.0, [V, IMG])], root=tmp_path)


def test_shard_source_refuses_before_any_step(tmp_path):
    _write(tmp_path, LAYOUT)
    src = _source(tmp_path)
    with pytest.raises(ValueError, match=r"stage 1 \('b'\).*9x32x48 \(4 of 6"):
        src.check_image_tokens(_stages((_stage("a", [V, IMG]), 0.5), (_stage("b", [A]), 0.2)))
    src.check_image_tokens(_stages((_stage("a", [V, IMG]), 0.5), (_stage("b", [A]), 0.0)))  # that stage T2V only
    assert src.startup_notes == []


def test_old_manifests_count_from_the_sample_index_or_trust_the_settings(tmp_path):
    m = _write(tmp_path, LAYOUT)
    stages = _stages((_stage("a", [A, V]), 0.5))
    # a manifest from before image_samples: its sample index (member rows of every shard) counts them
    for s in m["shards"]:
        s.pop("image_samples")
    for b in m["buckets"].values():
        b.pop("image_samples")
    S.save_manifest(tmp_path, m)
    src = _source(tmp_path)
    assert src.image_samples() == ({IMG: 0, A: 4, V: 4}, None)
    with pytest.raises(ValueError, match=r"9x32x48 \(4 of 6 samples"):
        src.check_image_tokens(stages)
    # no sample index either: the preprocessing settings say whether frame 0 was encoded (all or none)
    shutil.rmtree(tmp_path / SAMPLE_INDEX_DIR)
    src = _source(tmp_path)
    counts, note = src.image_samples()
    assert counts == {IMG: 4, A: 6, V: 4} and "assuming every sample" in note and A in note
    src.check_image_tokens(stages)  # passes; a sample that slipped through raises at its I2V step
    assert src.startup_notes == [note]
    m["config"]["image"] = False  # --no-image: no sample has them
    S.save_manifest(tmp_path, m, sample_index=False)
    with pytest.raises(ValueError, match=r"9x32x48 \(0 of 6 samples.*5x32x48 \(0 of 4"):
        _source(tmp_path).check_image_tokens(stages)
    del m["config"]["image"], m["encoders"]["image"]  # nothing recorded: not checked, said so
    S.save_manifest(tmp_path, m, sample_index=False)
    src = _source(tmp_path)
    src.check_image_tokens(stages)
    assert len(src.startup_notes) == 1 and "not checked at start-up" in src.startup_notes[0]


def test_preprocess_counts_image_samples(tmp_path):
    from motif_train.data.clips import default_specs, write_clip_folder
    from motif_train.data.preprocess import preprocess
    from motif_train.objectives.encoders import build_tiny_encoders

    build_tiny_encoders(tmp_path / "enc")
    write_clip_folder(tmp_path / "clips", default_specs(4, seed=5), broken=False)
    buckets = [[1, 64, 96], [5, 64, 96], [5, 96, 64]]
    m = preprocess([str(tmp_path / "clips")], tmp_path / "data", tmp_path / "enc", buckets=buckets, teacher=False,
                   image=False, progress=False)
    assert all(t["image_samples"] == 0 for t in m["buckets"].values()) and m["totals"]["samples"] > 0
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["buckets"] == m["buckets"]
    video = [b for b, t in m["buckets"].items() if t["frames"] > 1 and t["samples"]]
    src = _source(tmp_path / "data")
    stage = StageConfig(name="v", steps=5, buckets=buckets, token_budget=256)
    src.check_image_tokens(_stages((stage, 0.0)))  # T2V only: fine without image tokens
    with pytest.raises(ValueError) as e:
        src.check_image_tokens(_stages((stage, 0.5)))
    assert all(f"{b} (0 of" in str(e.value) for b in video) and "1x64x96" not in str(e.value)
