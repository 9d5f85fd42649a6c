"""Corrupt shards under the real trainer: 2 gloo ranks under torchrun, `train.grad_accum=2`.

One bucket holds exactly 4 clips, all of them planned in every step (2 ranks x 2), so when one of
them is corrupt there is no spare: the rank that drew it runs a padding micro-batch, and before the
fix it ran one micro-batch fewer than its peer and the job hung in FSDP's collectives. A second
bucket has spares and one truncated shard. The run must finish (hard timeout), never train a corrupt
sample, and report exactly the skips that an in-process replay of the same plan predicts.
"""

import dataclasses
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from motif_train.data.clips import default_specs, write_clip_folder
from motif_train.data.curriculum import StageConfig
from motif_train.data.loader import ShardSource
from motif_train.data.preprocess import preprocess
from motif_train.models import RoutingConfig
from motif_train.objectives.encoders import build_tiny_encoders

from ..distributed._runs import env, records, torchrun_cmd

pytestmark = pytest.mark.distributed

STEPS = 6
SMALL, SPARE = [9, 64, 96], [5, 96, 64]  # 4 clips (no spare) / 10 clips in shards of 4 (spares)


def _member(tar: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(tar) as tf:
        return tf.getmember(name)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty")
    build_tiny_encoders(root / "enc")
    base = default_specs(14, seed=5)
    specs = [dataclasses.replace(s, frames=9, height=64, width=96, fps=8.0) for s in base[:4]]
    specs += [dataclasses.replace(s, frames=5, height=96, width=64, fps=8.0) for s in base[4:]]
    write_clip_folder(root / "clips", specs, broken=False)
    manifest = preprocess([str(root / "clips")], root / "data", root / "enc", buckets=[SMALL, SPARE],
                          shard_samples=4, progress=False)
    by_bucket = {}
    for s in manifest["shards"]:
        by_bucket.setdefault(s["bucket"], []).append(s)
    small, spare = by_bucket["9x64x96"], by_bucket["5x96x64"]
    assert [s["samples"] for s in small] == [4] and sum(s["samples"] for s in spare) == 10
    # Flip 8 bytes in the middle of one latents payload of the 4-clip bucket (the .npy header stays valid).
    flipped = small[0]["keys"][1]
    tar = root / "data" / small[0]["path"]
    m = _member(tar, f"{flipped}.latents.npy")
    with open(tar, "r+b") as f:
        f.seek(m.offset_data + m.size // 2)
        chunk = f.read(8)
        f.seek(m.offset_data + m.size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))
    # Cut a shard of the spare bucket inside its third sample's latents: samples 3 and 4 are gone.
    cut = spare[0]
    tar = root / "data" / cut["path"]
    m = _member(tar, f"{cut['keys'][2]}.latents.npy")
    os.truncate(tar, m.offset_data + m.size // 3)
    return root, {flipped} | set(cut["keys"][2:])


def _stage() -> StageConfig:
    return StageConfig(name="faulty", steps=STEPS, buckets=[SMALL, SPARE], token_budget=144, lr=4e-3, shift=1.0,
                       repa=True, routing=RoutingConfig(start=1, end=3, ratio=0.5))


def _replay(root: Path) -> dict:
    """What each rank's loader does at every step: the same code and plan, in this process."""
    out = {"events": set(), "skipped": 0, "samples": {}, "padding": 0}
    sources = [ShardSource(root=str(root), num_workers=0, text_dim=64, image_dim=48, seed=0, dp_rank=r, dp_size=2,
                           grad_accum=2) for r in range(2)]
    for src in sources:
        src.set_stage(_stage(), teacher=True)
    for step in range(1, STEPS + 1):
        keys = []
        for rank, src in enumerate(sources):
            batches = src.next_step(step)
            assert len(batches) == 2  # the same work on every rank: always 2 micro-batches
            keys += [k for b in batches if not b.padding for k in b.keys]
            out["padding"] += sum(b.padding for b in batches)
            out["skipped"] += src.last_skipped_count
            out["events"] |= {(step, rank, m) for m in src.last_skipped}
        assert len(keys) == len(set(keys)), f"step {step}: a sample is trained twice: {keys}"
        out["samples"][step] = len(keys)
    return out


def test_corrupt_shards_with_grad_accum_on_two_ranks(dataset, tmp_path):
    root, corrupt = dataset
    run = tmp_path / "run"
    cmd = torchrun_cmd(run, 2, "data=shards", f"data.root={root / 'data'}", f"encoders.root={root / 'enc'}",
                       "data.num_workers=1", "train.grad_accum=2", f"train.steps={STEPS}", "checkpoint.every=0",
                       f"curriculum.stages.0.buckets=[{SMALL},{SPARE}]", "curriculum.stages.0.token_budget=144")
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)  # the old code hung here
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    want = _replay(root / "data")
    assert want["skipped"] >= 4 and want["padding"] >= 1  # the faults were really drawn, padding included
    recs = records(run)
    assert sorted(recs) == list(range(1, STEPS + 1))
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    got = {(e["step"], e["rank"], e["event"].split(": ", 1)[1]) for e in events if e["event"].startswith("data (rank")}
    assert got == want["events"]  # every rank's messages, each once, at its step
    named = {m.split(" ", 1)[0] for _, _, m in got if ": skipped: " in m}
    assert named == corrupt  # exactly the damaged samples are named as skipped
    assert recs[STEPS]["data/skipped_samples"] == want["skipped"]  # summed over both ranks
    start = next(e for e in events if "differ in size from manifest.json" in e["event"])
    assert "5x96x64-r00-00000.tar" in start["event"]
    for s in range(1, STEPS + 1):
        assert recs[s]["samples"] == want["samples"][s]  # padding micro-batches are not counted as samples
        assert recs[s]["train/skipped_steps"] == 0  # no corrupt sample reached the model: no NaN step
    print(f"[drill] corrupt shards, 2 ranks, grad_accum=2: {STEPS} steps, {want['skipped']} samples skipped and "
          f"named ({sorted(named)}), {want['padding']} padding micro-batches, samples per step "
          f"{[recs[s]['samples'] for s in range(1, STEPS + 1)]}")
