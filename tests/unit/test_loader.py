"""The shard loader over a real preprocessed dataset: plan-following batches, exact resume,
world-size change, corrupt samples, missing shards, workers."""

import json
import shutil

import numpy as np
import pytest
import torch

from motif_train.data.clips import default_specs, write_clip_folder
from motif_train.data.curriculum import StageConfig
from motif_train.data.loader import ShardSource
from motif_train.data.preprocess import preprocess
from motif_train.objectives.encoders import build_tiny_encoders

BUCKETS = [[9, 64, 96], [5, 96, 64], [9, 96, 128]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    build_tiny_encoders(root / "enc")
    write_clip_folder(root / "clips", default_specs(24, seed=1), broken=False)
    preprocess([str(root / "clips")], root / "data", root / "enc", buckets=BUCKETS, teacher=True)
    return root / "data"


def _source(root, rank=0, size=1, workers=0, accum=1):
    return ShardSource(root=str(root), num_workers=workers, text_dim=32, image_dim=24, seed=7, dp_rank=rank,
                       dp_size=size, grad_accum=accum)


STAGE = StageConfig(name="s0", steps=10, buckets=BUCKETS[:2], token_budget=144, repa=True)


def _same(a, b):
    assert a.keys == b.keys
    assert torch.equal(a.latents, b.latents) and torch.equal(a.text, b.text)
    assert torch.equal(a.text_mask, b.text_mask) and torch.equal(a.teacher_pixels, b.teacher_pixels)


def test_batches_follow_the_plan(dataset):
    ranks = [_source(dataset, r, 2) for r in range(2)]
    for s in ranks:
        s.set_stage(STAGE, teacher=True)
    seen = set()
    manifest = json.loads((dataset / "manifest.json").read_text())
    for step in range(1, 7):
        b0, b1 = (s.next_step(step)[0] for s in ranks)
        assert b0.latents.shape[1:] == b1.latents.shape[1:]  # same bucket on every rank
        keys = set(b0.keys) | set(b1.keys)
        assert len(keys) == len(b0) + len(b1) and not keys & seen or ranks[0].epoch > 0
        seen |= keys
        f = 1 + (b0.teacher_pixels.shape[2] - 2)  # teacher clip = frame 0 twice + the F frames
        assert b0.latents.shape[2] == 1 + (f - 1) // 4
        assert b0.teacher_pixels.min() >= -1 and b0.teacher_pixels.max() <= 1
        assert b0.image_embeds.shape[1:] == (16, 24) and b0.text_mask.any(1).all()
    assert manifest["totals"]["samples"] > 0


def test_resume_gives_the_identical_next_batch(dataset):
    a = _source(dataset)
    a.set_stage(STAGE, teacher=True)
    for step in range(1, 4):
        a.next_step(step)
    state = json.loads(json.dumps(a.state_dict()))  # what the checkpoint stores
    b = _source(dataset, workers=2)
    b.load_state_dict(state)
    b.set_stage(STAGE, teacher=True)
    for step in range(4, 9):  # also across the epoch boundary
        for x, y in zip(a.next_step(step), b.next_step(step), strict=True):
            _same(x, y)


def test_workers_match_in_process(dataset):
    a, b = _source(dataset, workers=0, accum=2), _source(dataset, workers=2, accum=2)
    for s in (a, b):
        s.set_stage(STAGE, teacher=True)
    for step in range(1, 5):
        for x, y in zip(a.next_step(step), b.next_step(step), strict=True):
            _same(x, y)


def test_world_size_change_never_repeats(dataset):
    two = [_source(dataset, r, 2) for r in range(2)]
    for s in two:
        s.set_stage(STAGE, teacher=True)
    consumed = []
    for step in range(1, 3):
        for s in two:
            consumed += [k for b in s.next_step(step) for k in b.keys]
    one = _source(dataset, 0, 1)
    one.load_state_dict(two[0].state_dict())
    one.set_stage(STAGE, teacher=True)
    epoch = one.epoch
    while one.epoch == epoch:
        batches = one.next_step(0)
        if one.epoch != epoch:
            break
        consumed += [k for b in batches for k in b.keys]
    assert len(consumed) == len(set(consumed))


def test_corrupt_sample_is_skipped_and_counted(dataset, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(dataset, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["bucket"] == "9x64x96")
    key = shard["keys"][0]
    import tarfile

    with tarfile.open(bad / shard["path"]) as tf:
        m = tf.getmember(f"{key}.latents.npy")
    with open(bad / shard["path"], "r+b") as f:  # same size, garbage content: not a valid .npy any more
        f.seek(m.offset_data)
        f.write(b"\x00" * m.size)
    assert shard["index"] == shard["path"] + ".idx.json" and isinstance(shard["index_crc"], int)
    for budget in (144, 72):  # 2 or 1 samples per step: a spare takes the skipped one's place either way
        src = _source(bad)
        src.set_stage(StageConfig(name="s", steps=50, buckets=[[9, 64, 96]], token_budget=budget), teacher=False)
        keys = []
        for step in range(1, shard["samples"] * 2 + 1):
            batches = src.next_step(step)
            keys += [k for b in batches for k in b.keys]
            if src.skipped_total:
                assert sum(len(b) for b in batches) == budget // 72  # the planned count: skipped one + spare
                break
        assert src.skipped_total == src.last_skipped_count == 1
        assert key in src.last_skipped[0] and shard["path"] in src.last_skipped[0]
        assert "checksum mismatch" in src.last_skipped[0] and "'latents'" in src.last_skipped[0]
        (note,) = src.last_skipped[1:]  # the spare, named only once it was read
        spare = note.split(" ", 1)[0]
        assert "as a spare for " + key in note and spare in [k for b in batches for k in b.keys]
        assert key not in keys and not any(b.padding for b in batches)


def test_missing_shard_fails_at_start(dataset, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(dataset, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / manifest["shards"][0]["path"]).unlink()
    with pytest.raises(FileNotFoundError, match="motif-preprocess"):
        _source(bad)


def test_empty_prompt_from_the_dataset(dataset):
    e, m = _source(dataset).empty_text()
    assert e.shape[1] == 32 and m.all() and e.dtype == torch.float32
    assert np.isfinite(e.numpy()).all()
