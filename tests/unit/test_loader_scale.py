"""The loader at scale, in numbers: per-rank state that does not grow with the dataset beyond the rank's
share, no tar header walk and no per-shard index read when the sample index exists, workers that persist
across epoch and stage boundaries, and spares that stay disjoint over ranks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from motif_train.data import loader as L
from motif_train.data import tar_index as T
from motif_train.data.curriculum import StageConfig
from motif_train.data.sample_index import SAMPLE_INDEX_DIR, SampleIndex
from motif_train.data.shards import (
    ShardWriter,
    build_manifest,
    encode_sample,
    latent_shape,
    parse_bucket,
    save_manifest,
    video_tokens,
)

A, B = "9x32x48", "1x32x32"
TOK = {A: video_tokens(*parse_bucket(A)), B: video_tokens(*parse_bucket(B))}


def _write(root, layout: dict[str, list[int]]) -> dict:
    entries, n = [], 0
    for bucket, sizes in layout.items():
        f, h, w = parse_bucket(bucket)
        for size in sizes:
            with ShardWriter(root, target_samples=size) as wr:
                for _ in range(size):
                    key, g = f"s{n:04d}", np.random.default_rng(n)
                    meta = {"key": key, "caption": "c", "source": key, "bucket": bucket, "frames": f,
                            "tokens": TOK[bucket]}
                    wr.write(bucket, encode_sample(key, g.standard_normal(latent_shape(f, h, w)),
                                                   g.standard_normal((3, 32)), meta=meta), source=key)
                    n += 1
            entries += wr.entries
    m = build_manifest(entries, buckets=list(layout))
    save_manifest(root, m)
    return m


def _synthetic(root, n_shards: int, per_shard: int) -> None:
    """Metadata only: a manifest + sample index of n_shards x per_shard samples in bucket A, empty tar files."""
    shards = []
    for i in range(n_shards):
        path = f"shards/{A}/{A}-r00-{i:05d}.tar"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
        shards.append({"path": path, "bucket": A, "samples": per_shard, "bytes": 0,
                       "keys": [f"k{i:05d}_{j:02d}" for j in range(per_shard)]})
    save_manifest(root, build_manifest(shards, buckets=[A]))


def _source(root, rank=0, size=1, workers=0, accum=1):
    return L.ShardSource(root=str(root), num_workers=workers, text_dim=32, image_dim=None, seed=1, dp_rank=rank,
                         dp_size=size, grad_accum=accum)


def _stage(bucket, per_rank, name="s", steps=100):
    return StageConfig(name=name, steps=steps, buckets=[list(parse_bucket(bucket))],
                       token_budget=per_rank * TOK[bucket])


def test_per_rank_state_is_the_ranks_share_not_the_dataset(tmp_path):
    """The rank view of a plan at 64 ranks: its bytes grow with samples / 64, and the rank holds no per-sample
    Python object of the dataset (the index is memory-mapped, the full plan dropped once the view is built)."""
    sizes = {}
    for n_shards in (200, 800):  # 2 000 and 8 000 samples
        root = tmp_path / str(n_shards)
        _synthetic(root, n_shards, 10)
        src = _source(root, rank=5, size=64)
        assert src.index.mapped and isinstance(src.index.samples, np.memmap)
        assert not hasattr(src, "locate") and "shards" not in src.manifest
        src.set_stage(_stage(A, 2), teacher=False)
        src._cursor = L._Cursor(src.stage, False, src.stage_key, 0, 0, [[0, 64]], None)
        rp = src._plans[src._rank_plan(src._cursor)]
        total = n_shards * 10
        # this rank's ids: exactly its share of the scheduled samples; candidates: 1/64 of the bucket
        plan = src._stage_plan()[0]
        assert rp.ids.size == plan.scheduled // 64 and rp.num_steps == plan.num_steps
        assert rp.cands[A].size == -(-(total - 5) // 64)
        assert len(src.index.runs) == 1  # the planner sees one run of consecutive shards, not 10^n entries
        sizes[total] = rp.nbytes()
    small, big = sizes[2000], sizes[8000]
    # 4x the data: 4x the per-rank state (its share), and per sample of the dataset a few bytes, not a tuple
    assert 3.5 < big / small < 4.5
    assert big / 8000 < 8  # bytes per dataset sample on one rank of 64 (a Python (shard, key) tuple: ~120)


def test_no_tar_is_walked_and_no_shard_index_is_read_with_the_sample_index(tmp_path, monkeypatch):
    _write(tmp_path, {A: [4, 4, 4]})
    calls = {"scan": 0, "side": 0, "reads": 0}
    scan, side, read = T.TarIndex._scan, T.Files.read_file, T.Files.read
    monkeypatch.setattr(T.TarIndex, "_scan", lambda self, *a: (calls.__setitem__("scan", calls["scan"] + 1),
                                                               scan(self, *a))[1])
    monkeypatch.setattr(T.Files, "read_file", lambda self, *a: (calls.__setitem__("side", calls["side"] + 1),
                                                                side(self, *a))[1])
    monkeypatch.setattr(T.Files, "read", lambda self, *a: (calls.__setitem__("reads", calls["reads"] + 1),
                                                           read(self, *a))[1])

    def epoch():
        for k in calls:
            calls[k] = 0
        src = _source(tmp_path)
        src.set_stage(_stage(A, 2), teacher=False)
        keys = sorted(k for s in range(1, 7) for b in src.next_step(s) for k in b.keys)
        assert keys == [f"s{i:04d}" for i in range(12)]
        return dict(calls)

    got = epoch()
    assert got == {"scan": 0, "side": 0, "reads": 12}  # one read per sample: its members are adjacent

    # per-shard index files but no consolidated index (a dataset of the previous format): each shard's
    # index is read once, still no header walk
    import shutil

    shutil.rmtree(tmp_path / SAMPLE_INDEX_DIR)
    got = epoch()
    assert got["scan"] == 0 and got["side"] == 3 and got["reads"] == 12 * 3  # one read per member (latents, text, json)

    # no index at all (manifest without "index"): the fallback walks each shard's headers once
    m = json.loads((tmp_path / "manifest.json").read_text())
    for s in m["shards"]:
        del s["index"], s["index_crc"]
    save_manifest(tmp_path, m)
    assert not SampleIndex.open(tmp_path).shards["indexed"].any()
    got = epoch()
    assert got["scan"] == 3 and got["side"] == 0


def test_a_stale_sample_index_is_not_used(tmp_path, caplog):
    m = _write(tmp_path, {A: [4]})
    assert SampleIndex.open(tmp_path) is not None
    m["shards"][0]["keys"] = list(reversed(m["shards"][0]["keys"]))  # edited by hand, index not rewritten
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert SampleIndex.open(tmp_path) is None and "stale" in caplog.text
    src = _source(tmp_path)
    assert not src.index.mapped and src.index.key(0) == m["shards"][0]["keys"][0]


def _pid_probe(monkeypatch):
    """Record the pid of the process that decodes each sample (a worker, or this process)."""
    real = L.decode_sample

    def probe(members):
        out = real(members)
        out["meta"]["key"] = f"{out['meta']['key']}@{os.getpid()}"
        return out

    monkeypatch.setattr(L, "decode_sample", probe)


def test_workers_persist_across_epoch_and_stage_boundaries(tmp_path, monkeypatch):
    _write(tmp_path, {A: [4, 4], B: [4]})
    _pid_probe(monkeypatch)
    src = _source(tmp_path, workers=2)
    one, two = _stage(A, 2, "one", steps=6), _stage(B, 2, "two", steps=5)
    src.set_stage(one, teacher=False, steps=6, upcoming=(two, False))  # 4 steps an epoch: 1.5 epochs
    pids, keys = [], []
    for step in range(1, 7):
        for b in src.next_step(step):
            keys += [k.split("@")[0] for k in b.keys]
            pids += [int(k.split("@")[1]) for k in b.keys]
    assert src.epoch == 1 and src.step_in_epoch == 2
    it = src._iter
    src.set_stage(two, teacher=False, steps=5)  # prefetched already (4 tasks ahead): the pipeline is kept
    assert src._iter is it and src.stage_key == L._stage_key(two) and (src.epoch, src.step_in_epoch) == (0, 0)
    for step in range(7, 12):  # 2 steps an epoch in bucket B: across its epoch boundaries too
        for b in src.next_step(step):
            assert b.latents.shape[2] == 1  # bucket B
            pids += [int(k.split("@")[1]) for k in b.keys]
    assert os.getpid() not in pids and len(set(pids)) == 2  # the same two workers all along
    assert set(pids) == {w.pid for w in src._loader._iterator._workers}
    assert sorted(keys[:8]) == [f"s{i:04d}" for i in range(8)]  # epoch 0: every sample of A once

    # a stage the feed did not expect: the workers are reused (the in-flight tasks drained), not respawned
    src.set_stage(one, teacher=False)
    assert src._iter is None
    for b in src.next_step(12):
        pids += [int(k.split("@")[1]) for k in b.keys]
    assert len(set(pids)) == 2 and src.epoch == 0 and src.step_in_epoch == 1
    src.close()


def test_resume_inside_prefetch_gives_the_next_batch(tmp_path):
    """The checkpointed position is the last step handed out, not the last one prefetched."""
    _write(tmp_path, {A: [4, 4]})
    a = _source(tmp_path, workers=2)
    a.set_stage(_stage(A, 2), teacher=False)
    ref = [[k for b in a.next_step(s) for k in b.keys] for s in range(1, 10)]  # over two epoch boundaries
    a.close()
    b = _source(tmp_path, workers=2)
    b.set_stage(_stage(A, 2), teacher=False)
    for s in range(1, 4):
        b.next_step(s)
    state = json.loads(json.dumps(b.state_dict()))
    assert state["step_in_epoch"] == 3 and b._dispatched > 3  # the workers ran ahead
    b.close()
    c = _source(tmp_path, workers=0)
    c.load_state_dict(state)
    c.set_stage(_stage(A, 2), teacher=False)
    assert [[k for x in c.next_step(s) for k in x.keys] for s in range(4, 10)] == ref[3:]


@pytest.mark.parametrize("world", [2, 4])
def test_spares_stay_disjoint_and_never_planned_in_their_step(tmp_path, world):
    m = _write(tmp_path, {A: [10, 10, 5]})  # 25 samples
    keys = [k for s in m["shards"] for k in s["keys"]]
    ranks = [_source(tmp_path, r, world) for r in range(world)]
    for src in ranks:
        src.set_stage(_stage(A, 2), teacher=False)
    plan = ranks[0]._stage_plan()[0]
    # every rank's candidates: disjoint, together the whole bucket; the left-out ids first
    views = [RankView(src) for src in ranks]
    cands = [v.cands[A].tolist() for v in views]
    assert sorted(sum(cands, [])) == list(range(25)) and len(set(sum(cands, []))) == 25
    for v in views:
        n_left = int(v.cand_left[A].sum())
        assert v.cand_left[A][:n_left].all() and not v.cand_left[A][n_left:].any()
        for i, st in enumerate(plan.steps):  # cand_step is where the candidate is planned on any rank
            on = set(st.samples.ravel().tolist())
            assert {c for c, s in zip(v.cands[A].tolist(), v.cand_step[A].tolist(), strict=True) if s == i} == \
                {c for c in v.cands[A].tolist() if c in on}
    # corrupt the whole first step: every rank takes spares, none planned in step 0, none taken twice
    step0 = plan.steps[0].samples
    for g in step0.ravel().tolist():
        shard = next(s for s in m["shards"] if keys[g] in s["keys"])
        with open(tmp_path / shard["path"], "r+b") as f:
            idx = json.loads((tmp_path / shard["index"]).read_text())
            off, size = next((o, n) for name, o, n, _ in idx["members"] if name == f"{keys[g]}.latents.npy")
            f.seek(off + size - 1)
            byte = f.read(1)
            f.seek(off + size - 1)
            f.write(bytes([byte[0] ^ 0x01]))
    got = []
    for src in ranks:
        got += [k for b in src.next_step(1) for k in b.keys if not b.padding]
    planned0 = {keys[g] for g in step0.ravel().tolist()}
    assert len(got) == len(set(got)) == step0.size and not planned0 & set(got)
    assert sum(src.last_skipped_count for src in ranks) == step0.size


class RankView:
    def __init__(self, src):
        src._cursor = L._Cursor(src.stage, False, src.stage_key, 0, 0, [[0, src.dp_size]], None)
        rp = src._plans[src._rank_plan(src._cursor)]
        self.cands, self.cand_step, self.cand_left = rp.cands, rp.cand_step, rp.cand_left


def test_a_dropped_source_stops_its_workers(tmp_path):
    import time

    _write(tmp_path, {A: [4]})
    src = _source(tmp_path, workers=2)
    src.set_stage(_stage(A, 2), teacher=False)
    src.next_step(1)
    pids = [w.pid for w in src._loader._iterator._workers]
    del src  # no reference cycle through the feed: freed now, not at some later garbage collection
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


def test_two_ranks_carry_a_short_tail_into_the_next_epoch(tmp_path):
    """11 samples, 2 ranks, 2 a step: 5 per rank = 2 full steps and a tail of 1, carried (plan.py, "Carried
    remainders"): every step the loader hands out is full and holds no sample twice, the tail trains in the next
    epoch; one rank plans the standalone epoch."""
    _write(tmp_path, {A: [11]})
    ranks = [_source(tmp_path, r, 2) for r in range(2)]
    for src in ranks:
        src.set_stage(_stage(A, 2), teacher=False)
    plans = [ranks[0]._stage_plan(ranks[0].stage, e, [[0, 2]])[0] for e in range(3)]
    assert all(p.carry for p in plans) and plans[0].carried.size == 2 and plans[0].dropped.size == 1
    assert np.array_equal(plans[1].carried_in, plans[0].carried)
    keys = {int(k[1:]): k for k in (f"s{i:04d}" for i in range(11))}
    for step in range(1, sum(p.num_steps for p in plans) + 1):
        got = [k for src in ranks for b in src.next_step(step) for k in b.keys]
        assert len(got) == 4 == len(set(got))  # 2 per rank, no sample twice in a step
        epoch, in_epoch = ranks[0].epoch, ranks[0].step_in_epoch - 1
        plan = plans[epoch]
        assert sorted(got) == sorted(keys[int(g)] for g in plan.steps[in_epoch].samples.ravel())
    one = _source(tmp_path, 0, 1)
    one.set_stage(_stage(A, 2), teacher=False)
    assert not one._stage_plan()[0].carry  # one rank: nothing to carry, every sample of the epoch in it
