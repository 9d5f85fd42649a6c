"""Data faults injected for real into real shards (written by ShardWriter, read by ShardSource):
truncated tars, flipped bytes, spares over two ranks, padded micro-batches, bounded open files,
and machine I/O errors (EMFILE, a vanished shard) that must stop the run instead of being skipped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from motif_train.data import loader as L
from motif_train.data import tar_index as T
from motif_train.data.curriculum import StageConfig
from motif_train.data.shards import (
    CorruptSample,
    ShardWriter,
    build_manifest,
    encode_sample,
    latent_shape,
    parse_bucket,
    save_manifest,
    video_tokens,
)

A, B = "9x32x48", "1x32x32"  # 18 and 4 video tokens per sample
TOKENS = {A: video_tokens(*parse_bucket(A)), B: video_tokens(*parse_bucket(B))}


def _write(root: Path, layout: dict[str, list[int]]) -> dict:
    """{bucket: [samples per shard, ...]} -> real tars + manifest under root; keys s000, s001, ... in order."""
    entries, n = [], 0
    for bucket, sizes in layout.items():
        f, h, w = parse_bucket(bucket)
        for size in sizes:
            with ShardWriter(root, target_samples=size) as wr:  # one writer per shard: exact shard sizes
                for _ in range(size):
                    key, g = f"s{n:03d}", np.random.default_rng(n)
                    meta = {"key": key, "caption": "c", "source": key, "bucket": bucket, "frames": f,
                            "tokens": TOKENS[bucket]}
                    wr.write(bucket, encode_sample(key, g.standard_normal(latent_shape(f, h, w)),
                                                   g.standard_normal((3 + n % 4, 32)), g.standard_normal((16, 24)),
                                                   meta=meta), source=key)
                    n += 1
            entries += wr.entries
    manifest = build_manifest(entries, buckets=list(layout))
    save_manifest(root, manifest)
    return manifest


def _strip_index(root: Path) -> None:
    """Make the manifest look like one from before member indexes/checksums existed."""
    m = json.loads((root / "manifest.json").read_text())
    for s in m["shards"]:
        s.pop("index"), s.pop("index_crc")
    save_manifest(root, m)


def _member(root: Path, shard: str, name: str) -> tuple[int, int]:
    """(data offset, size) of a member, read with the stdlib from the intact tar (before the fault)."""
    with tarfile.open(root / shard) as tf:
        m = tf.getmember(name)
    return m.offset_data, m.size


def _flip(path: Path, offset: int, xor: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(xor))
        f.seek(offset)
        f.write(bytes(a ^ b for a, b in zip(old, xor, strict=True)))


def _source(root, rank=0, size=1, accum=1, **kw):
    return L.ShardSource(root=str(root), num_workers=kw.pop("workers", 0), text_dim=32, image_dim=24, seed=3,
                         dp_rank=rank, dp_size=size, grad_accum=accum, **kw)


def _stage(bucket: str, per_rank: int) -> StageConfig:
    return StageConfig(name="s", steps=100, buckets=[list(parse_bucket(bucket))],
                       token_budget=per_rank * TOKENS[bucket])


def _epoch(src: L.ShardSource, stage: StageConfig) -> list[tuple[list, list[str], int]]:
    """Every step of one epoch: (micro-batches, messages, skipped count)."""
    src.set_stage(stage, teacher=False)
    n = src._stage_plan()[0].num_steps
    out = []
    for step in range(1, n + 1):
        out.append((src.next_step(step), list(src.last_skipped), src.last_skipped_count))
    return out


def _keys(batches) -> list[str]:
    return [k for b in batches if not b.padding for k in b.keys]


# ------------------------------------------------------------------------------ truncation


@pytest.mark.parametrize("index", [True, False], ids=["member-index", "header-scan"])
def test_truncated_shard_keeps_its_intact_samples(tmp_path, monkeypatch, index):
    m = _write(tmp_path, {A: [4, 4, 4], B: [4]})
    shard_of = {k: s["path"] for s in m["shards"] for k in s["keys"]}
    cut_a, cut_b = shard_of["s004"], shard_of["s012"]  # A: s004..s007 of 3 shards, B: s012..s015 (its only one)
    for shard, key in ((cut_a, "s006"), (cut_b, "s014")):
        off, size = _member(tmp_path, shard, f"{key}.latents.npy")
        os.truncate(tmp_path / shard, off + size // 2)  # in the middle of the member's payload
        with pytest.raises(tarfile.ReadError), tarfile.open(tmp_path / shard) as tf:
            tf.getmembers()  # what the stdlib makes of it: the whole shard is lost
    if not index:
        _strip_index(tmp_path)
    built, orig = [], L.TarIndex
    monkeypatch.setattr(L, "TarIndex", type("Counted", (orig,), {
        "__init__": lambda self, path, *a: (built.append(path.name), orig.__init__(self, path, *a))[1]}))

    src = _source(tmp_path)
    (note,) = src.startup_notes  # ONE line for all mismatches
    assert "\n" not in note and note.startswith("2 shard(s)") and cut_a in note and cut_b in note
    assert f"manifest {next(s['bytes'] for s in m['shards'] if s['path'] == cut_a)}" in note
    assert "motif-preprocess" in note

    steps = _epoch(src, _stage(A, 1))
    assert len(steps) == 12 and all(len(_keys(b)) == 1 and not any(x.padding for x in b) for b, _, _ in steps)
    trained = [k for b, _, _ in steps for k in _keys(b)]
    intact = {f"s{i:03d}" for i in range(12)} - {"s006", "s007"}
    assert intact <= set(trained) and not {"s006", "s007"} & set(trained)
    assert src.skipped_total == sum(n for _, _, n in steps) == 2
    skipped = [msg for _, msgs, _ in steps for msg in msgs if ": skipped: " in msg]
    assert sorted(msg.split(" ", 1)[0] for msg in skipped) == ["s006", "s007"]
    assert all(cut_a in msg and "truncated" in msg for msg in skipped)
    for b, msgs, n in steps:  # each skip has its spare, named after it was read
        spares = [msg.split(" ", 1)[0] for msg in msgs if "as a spare for" in msg]
        assert len(spares) == n and set(spares) <= set(_keys(b))
    # with the sample index no shard is indexed at run time; without, each shard of the bucket once
    assert sorted(built) == ([] if index else sorted(Path(s["path"]).name for s in m["shards"] if s["bucket"] == A))

    # a bucket whose only shard is truncated still trains on its intact samples
    steps = _epoch(src, _stage(B, 1))
    assert len(steps) == 4 and [len(_keys(b)) for b, _, _ in steps] == [1, 1, 1, 1]
    assert {k for b, _, _ in steps for k in _keys(b)} == {"s012", "s013"}
    assert sum(n for _, _, n in steps) == 2 and src.skipped_total == 4


def test_damaged_header_without_index_costs_only_its_neighbours(tmp_path):
    m = _write(tmp_path, {A: [4]})
    shard = m["shards"][0]["path"]
    off, _ = _member(tmp_path, shard, "s002.image.npy")  # s002's first member
    _flip(tmp_path / shard, off - 512 + 10, b"\x55")  # inside its header's name: the checksum fails
    got = {}
    for index in (True, False):
        if not index:
            _strip_index(tmp_path)
        steps = _epoch(_source(tmp_path), _stage(A, 4))
        got[index] = (sorted(_keys(steps[0][0])), steps[0][2])
    assert got[True] == (["s000", "s001", "s002", "s003"], 0)  # the index never reads headers
    # the scan resyncs after the bad header: s003 survives; s001/s002 may lack a member, so both go
    # (no spare: the bucket's other samples are all in this step)
    assert got[False] == (["s000", "s003"], 2)


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_header_scan_matches_the_stdlib(tmp_path, fmt):
    names = ["a.json", "p" * 130 + "/k.latents.npy", "b.text.npy"]  # ustar: a long path goes into the prefix
    names += [] if fmt == "USTAR_FORMAT" else ["q" * 150 + ".json", "\u00e9t\u00e9.json"]  # long name / pax
    with tarfile.open(tmp_path / "x.tar", "w", format=getattr(tarfile, fmt)) as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 3
            tf.addfile(info, io.BytesIO(bytes(range(256)) * 3 * (i + 1)))
    with tarfile.open(tmp_path / "x.tar") as tf:
        want = {m.name: (m.offset_data, m.size, None) for m in tf}
    idx = T.TarIndex(tmp_path / "x.tar", T.Files(1, 0))
    assert idx.members == want and len(want) == len(names) and not idx.bad and idx.damage == ""


# ------------------------------------------------------------------------------ flipped bytes


def test_flipped_bytes_are_caught_by_checksum_and_finite_check(tmp_path):
    m = _write(tmp_path, {A: [4, 4]})
    s0, s1 = m["shards"][0]["path"], m["shards"][1]["path"]
    off, size = _member(tmp_path, s0, "s001.latents.npy")
    with open(tmp_path / s0, "rb") as f:
        f.seek(off + size - 2)
        last = f.read(2)
    _flip(tmp_path / s0, off + size - 2, bytes(a ^ b for a, b in zip(last, b"\xff\x7f", strict=True)))  # -> NaN
    off, size = _member(tmp_path, s1, "s005.text.npy")
    _flip(tmp_path / s1, off + size - 2, b"\x01")  # a finite, wrong float16: only a checksum can tell
    # the .npy header is intact and the value really is NaN: the decode checks alone would pass it
    with tarfile.open(tmp_path / s0) as tf:
        arr = np.load(io.BytesIO(tf.extractfile("s001.latents.npy").read()), allow_pickle=False)
    assert np.isnan(arr.reshape(-1)[-1]) and np.isfinite(arr.reshape(-1)[:-1]).all()

    src = _source(tmp_path)
    steps = _epoch(src, _stage(A, 1))
    trained = {k for b, _, _ in steps for k in _keys(b)}
    assert not {"s001", "s005"} & trained and src.skipped_total == 2 and src.startup_notes == []
    msgs = {msg.split(" ", 1)[0]: msg for _, ms, _ in steps for msg in ms if ": skipped: " in msg}
    assert sorted(msgs) == ["s001", "s005"]
    assert "checksum mismatch" in msgs["s001"] and "'latents'" in msgs["s001"] and s0 in msgs["s001"]
    assert "checksum mismatch" in msgs["s005"] and "'text'" in msgs["s005"] and s1 in msgs["s005"]
    for b, _, _ in steps:  # what reaches the model is finite
        assert all(np.isfinite(x.latents.numpy()).all() and np.isfinite(x.text.numpy()).all() for x in b)

    _strip_index(tmp_path)  # an old manifest: no checksums
    src = _source(tmp_path)
    steps = _epoch(src, _stage(A, 1))
    trained = {k for b, _, _ in steps for k in _keys(b)}
    msgs = [msg for _, ms, _ in steps for msg in ms if ": skipped: " in msg]
    assert src.skipped_total == 1 and len(msgs) == 1 and "s001" not in trained
    assert msgs[0].startswith(f"s001 ({s0}): skipped: ") and "non-finite" in msgs[0] and "'latents'" in msgs[0]
    assert "s005" in trained  # without a checksum a finite flip is undetectable: why the index exists


# ------------------------------------------------------------------------------ spares over ranks


def test_spares_are_unique_over_ranks_and_keep_the_planned_count(tmp_path):
    m = _write(tmp_path, {A: [5, 8, 8]})  # 21 samples, 2 ranks x 2: 5 steps, 1 left out of the plan
    keys = [k for s in m["shards"] for k in s["keys"]]
    ranks = [_source(tmp_path, r, 2) for r in range(2)]
    stage = _stage(A, 2)
    ranks[0].set_stage(stage, teacher=False)
    plan = ranks[0]._stage_plan()[0]
    assert plan.num_steps == 5 and plan.dropped.size == 1
    rows = [[[keys[g] for g in row] for row in st.samples.tolist()] for st in plan.steps]
    corrupt = {rows[0][0][0], rows[0][1][1], rows[1][1][0], rows[1][1][1]}  # rank 1 loses both in step 1
    where = {k: s["path"] for s in m["shards"] for k in s["keys"]}
    for k in corrupt:
        off, size = _member(tmp_path, where[k], f"{k}.latents.npy")
        _flip(tmp_path / where[k], off + size // 2, b"\x01")

    per_rank = [_epoch(src, stage) for src in ranks]
    for i in range(5):
        real = [_keys(per_rank[r][i][0]) for r in range(2)]
        union = real[0] + real[1]
        assert len(union) == len(set(union)) == 4 and [len(x) for x in real] == [2, 2]
        assert not corrupt & set(union)
        for r in range(2):
            _, msgs, n = per_rank[r][i]
            lost = [k for k in rows[i][r] if k in corrupt]
            assert n == len(lost) and sorted(x.split(" ", 1)[0] for x in msgs if ": skipped: " in x) == sorted(lost)
            notes = [x for x in msgs if "as a spare for" in x]
            assert len(notes) == len(lost) and all(x.split(" ", 1)[0] in real[r] for x in notes)
            assert all(k in rows[i][r] or k in {x.split(" ", 1)[0] for x in notes} for k in real[r])
    # the sample the plan left out is the first spare (rank 0's share), not noted as a repeat
    left = keys[int(plan.dropped[0])]
    assert any(x.startswith(f"{left} (") and "left out of this epoch's plan" in x for x in per_rank[0][0][1])
    assert [src.skipped_total for src in ranks] == [1, 3]


# ------------------------------------------------------------------------------ micro-batches


@pytest.mark.parametrize("per_rank, lost", [(2, 1), (3, 2)])
def test_a_rank_short_of_samples_pads_to_the_same_micro_batches(tmp_path, per_rank, lost):
    m = _write(tmp_path, {A: [2 * per_rank]})  # one step, every sample of the bucket in it: no spare
    keys = m["shards"][0]["keys"]
    ranks = [_source(tmp_path, r, 2, accum=2) for r in range(2)]
    stage = _stage(A, per_rank)
    ranks[1].set_stage(stage, teacher=False)
    row1 = [keys[g] for g in ranks[1]._stage_plan()[0].steps[0].samples[1].tolist()]
    for k in row1[:lost]:
        off, size = _member(tmp_path, m["shards"][0]["path"], f"{k}.text.npy")
        _flip(tmp_path / m["shards"][0]["path"], off + size - 1, b"\x10")
    (b0, _, n0), = _epoch(ranks[0], stage)
    (b1, msgs, n1), = _epoch(ranks[1], stage)
    assert len(b0) == len(b1) == 2 and (n0, n1) == (0, lost)
    assert [x.padding for x in b0] == [False, False] and [x.padding for x in b1] == [False, True]
    assert b1[1].keys == b1[0].keys == tuple(row1[lost:]) and len(b1[1]) == 1
    assert sum(1 for x in msgs if "no spare" in x) == lost

    for k in row1[lost:]:  # now nothing of rank 1 is left: the step fails, naming it, the keys and the fix
        off, size = _member(tmp_path, m["shards"][0]["path"], f"{k}.text.npy")
        _flip(tmp_path / m["shards"][0]["path"], off + size - 1, b"\x10")
    src = _source(tmp_path, 1, 2, accum=2)
    src.set_stage(stage, teacher=False)
    with pytest.raises(RuntimeError, match="step 7: every sample") as e:
        src.next_step(7)
    assert all(k in str(e.value) for k in row1) and "motif-preprocess" in str(e.value)
    assert src.last_skipped_count == per_rank


# ------------------------------------------------------------------------------ open files, I/O errors


def _tar_fds(root: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(str(root)) and target.endswith(".tar")
    return n


def test_open_tars_are_bounded_per_worker(tmp_path, monkeypatch):
    _write(tmp_path, {A: [2] * 8})
    with pytest.raises(ValueError, match="max_open_files=0 must be >= 1"):
        _source(tmp_path, max_open_files=0)
    seen, real = [], L.decode_sample
    monkeypatch.setattr(L, "decode_sample", lambda members: (seen.append(_tar_fds(tmp_path)), real(members))[1])
    src = _source(tmp_path, max_open_files=2)
    steps = _epoch(src, _stage(A, 3))  # a step reads from up to 3 shards
    assert len(steps) == 6 and len(seen) == 16 and max(seen) == 2 and src.skipped_total == 0
    assert sorted(k for b, _, _ in steps for k in _keys(b)) == [f"s{i:03d}" for i in range(16)]


_EMFILE = """
import errno, json, os, resource, sys
from motif_train.data import loader as L
from motif_train.data import tar_index as T
from motif_train.data.curriculum import StageConfig
T._IO_BACKOFF_S = 0.001
stage = StageConfig(name="s", steps=10, buckets=[[9, 32, 48]], token_budget=18)
for i in range(2):  # a first source only warms up (lazy imports open files too); the second one meets EMFILE
    src = L.ShardSource(root=sys.argv[1], num_workers=0, text_dim=32, image_dim=24, seed=3, dp_rank=0, dp_size=1,
                        grad_accum=1, io_retries=2)
    src.set_stage(stage, teacher=False)
    if i == 0:
        src.next_step(1)
        del src
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
hog = []
try:
    while True:
        hog.append(os.open(os.devnull, os.O_RDONLY))
except OSError as e:
    assert e.errno == errno.EMFILE, e
try:
    src.next_step(1)
    out = {"raised": None}
except Exception as e:
    out = {"raised": type(e).__name__, "errno": getattr(e, "errno", None), "msg": str(e)}
for fd in hog:
    os.close(fd)
out["skipped"] = src.skipped_total
print(json.dumps(out))
"""


def test_emfile_is_a_machine_error_not_a_skip(tmp_path):
    m = _write(tmp_path, {A: [2]})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _EMFILE, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["raised"] == "DataIOError" and out["errno"] == 24 and out["skipped"] == 0
    assert "EMFILE" in out["msg"] and "after 3 attempt(s)" in out["msg"] and "max_open_files" in out["msg"]
    assert str(tmp_path / m["shards"][0]["path"]) in out["msg"]


@pytest.mark.parametrize("workers", [0, 1])
def test_vanished_shard_stops_the_run(tmp_path, monkeypatch, workers):
    m = _write(tmp_path, {A: [2, 2]})
    monkeypatch.setattr(T, "_IO_BACKOFF_S", 0.001)
    src = _source(tmp_path, io_retries=1, workers=workers)
    src.set_stage(_stage(A, 4), teacher=False)
    for s in m["shards"]:  # gone after start-up, as when the mount drops
        (tmp_path / s["path"]).unlink()
    with pytest.raises(L.DataIOError, match="ENOENT") as e:
        src.next_step(1)
    assert "vanished" in str(e.value) and "after 2 attempt(s)" in str(e.value)
    assert any(str(tmp_path / s["path"]) in str(e.value) for s in m["shards"]) and src.skipped_total == 0
    assert not isinstance(e.value, CorruptSample)
