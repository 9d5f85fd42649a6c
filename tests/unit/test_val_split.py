"""The held-out split (issue 18 §1) on a real manifest: real tiny clips -> real motif-preprocess -> plans."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from motif_train.cli.plan import main as plan_main
from motif_train.data.clips import default_specs, write_clip_folder
from motif_train.data.plan import build_plan, carries, replan, sample_ids_by_bucket
from motif_train.data.preprocess import preprocess
from motif_train.data.sample_index import SampleIndex
from motif_train.data.split import choose_heldout, heldout_ids_by_bucket, split_hash
from motif_train.objectives.encoders import build_tiny_encoders

VID, TALL, IMG = [9, 64, 96], [5, 96, 64], [1, 64, 64]
NAMES = {"vid": "9x64x96", "tall": "5x96x64", "img": "1x64x64"}
STAGES = {"s0": ["1x64x64", "9x64x96"], "s1": ["9x64x96", "5x96x64"]}
VAL = dict(val_fraction=0.15, val_min_per_bucket=3, val_max_share=0.25)


def _specs(n: int, seed: int, prefix: str):
    base = default_specs(n, seed=seed)
    out = []
    for i, s in enumerate(base):
        f, h, w = (VID, TALL, IMG)[i % 3]
        out.append(dataclasses.replace(s, key=f"{prefix}{i:03d}", frames=f, height=h, width=w, fps=8.0))
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """One root preprocessed twice: 24 clips, then 12 more added (the same --out, a re-run)."""
    root = tmp_path_factory.mktemp("split")
    build_tiny_encoders(root / "enc")
    write_clip_folder(root / "a", _specs(24, 3, "a"), broken=False)
    write_clip_folder(root / "b", _specs(12, 4, "b"), broken=False)
    kw = dict(buckets=[VID, TALL, IMG], shard_samples=4, progress=False, teacher=False, **VAL)
    first = preprocess([str(root / "a")], root / "data", root / "enc", **kw)
    snap = root / "first"
    shutil.copytree(root / "data", snap)
    second = preprocess([str(root / "a"), str(root / "b")], root / "data", root / "enc", **kw)
    return {"root": root, "first": first, "second": second, "snap": snap}


def _held_keys(manifest) -> dict[str, set[str]]:
    return {b: set(v["keys"]) for b, v in manifest["val_split"]["buckets"].items()}


def _key_of(manifest) -> list[str]:
    return [k for s in manifest["shards"] for k in s["keys"]]


def test_manifest_records_the_split(grown):
    for m in (grown["first"], grown["second"]):
        split = m["val_split"]
        keys = _key_of(m)
        assert split["fraction"] == VAL["val_fraction"] and split["min_per_bucket"] == 3
        assert split["samples"] == sum(v["samples"] for v in split["buckets"].values()) > 0
        for b, v in split["buckets"].items():
            assert [keys[i] for i in v["ids"]] == v["keys"] and v["ids"] == sorted(v["ids"])
            assert m["buckets"][b]["val_samples"] == v["samples"] and v["of"] == m["buckets"][b]["samples"]
            bucket_keys = [k for s in m["shards"] if s["bucket"] == b for k in s["keys"]]
            assert {k for k in bucket_keys if split_hash(k) < VAL["val_fraction"]} <= set(v["keys"])
            assert len(v["keys"]) >= min(3, int(0.25 * len(bucket_keys)))
    # the sample index (what the loader reads) carries the same held-out ids
    idx = SampleIndex.open(grown["root"] / "data")
    assert idx is not None
    pm = idx.plan_manifest()
    assert {b: v.tolist() for b, v in heldout_ids_by_bucket(pm).items()} == \
        {b: v["ids"] for b, v in grown["second"]["val_split"]["buckets"].items()}


def _all_plans(manifest):
    """Every plan the loader can make: both stages, epochs 0-3, 1-3 ranks, carry on/off, a world-size change."""
    for stage, names in STAGES.items():
        for epoch in range(4):
            for ws in (1, 2, 3):
                for carry in (False, True):
                    if carry and not carries(ws):
                        continue
                    yield (stage, epoch, ws, carry), build_plan(manifest, names, world_size=ws, token_budget=400,
                                                                seed=1, epoch=epoch, carry=carry)
            for carry in (False, True):
                plan, _ = replan(manifest, names, segments=[(0, 2), (1, 3), (2, 1)], token_budget=400, seed=1,
                                 epoch=epoch, carry=carry)
                yield (stage, epoch, "replan", carry), plan


@pytest.mark.parametrize("which", ["first", "second"])
def test_heldout_never_planned(grown, which):
    m = grown[which]
    held = np.concatenate([v for v in heldout_ids_by_bucket(m).values()])
    assert held.size
    idx = SampleIndex.open(grown["root"] / "data") if which == "second" else None
    manifests = [m] + ([idx.plan_manifest()] if idx is not None else [])
    n_plans = 0
    for man in manifests:
        train = np.concatenate(list(sample_ids_by_bucket(man).values()))
        assert not np.isin(train, held).any()  # no spare either: the loader's spares come from these ids
        for tag, plan in _all_plans(man):
            ids = np.concatenate([plan.scheduled_ids(), plan.carried, plan.carried_in, plan.dropped])
            assert not np.isin(ids, held).any(), tag
            assert plan.scheduled > 0 or tag[2] == "replan", tag
            n_plans += 1
    assert n_plans >= 2 * (3 * 4 * 2 + 2 * 4 * 2) // 2
    # and the loader's own plans, epoch by epoch, through its sample index
    from motif_train.data.curriculum import StageConfig
    from motif_train.data.loader import ShardSource

    if idx is not None:
        keys = set().union(*_held_keys(m).values())
        for ws in (1, 2):
            for r in range(ws):
                src = ShardSource(root=str(grown["root"] / "data"), num_workers=0, text_dim=64, image_dim=48,
                                  seed=0, dp_rank=r, dp_size=ws, grad_accum=1)
                st = StageConfig(name="s1", steps=40, buckets=[VID, TALL], token_budget=400, lr=1e-3, shift=1.0)
                src.set_stage(st, teacher=False)
                seen: set[str] = set()
                try:
                    for step in range(1, 25):  # several epochs of this stage
                        seen.update(k for b in src.next_step(step) if not b.padding for k in b.keys)
                finally:
                    src.close()
                assert seen and not (seen & keys)


def test_split_is_stable_when_data_is_added(grown):
    first, second = grown["first"], grown["second"]
    old_held, new_held = _held_keys(first), _held_keys(second)
    old_keys = set(_key_of(first))
    for b in old_held:
        assert old_held[b] <= new_held[b]  # held out stays held out
        old_trained = {k for k in old_keys if k in set(_key_of(second))} - old_held[b]
        bucket_keys = [k for s in second["shards"] if s["bucket"] == b for k in s["keys"]]
        moved = new_held[b] & old_trained
        # the only way a trained key becomes validation: the per-bucket minimum, once the new keys cannot fill it
        rule1 = {k for k in bucket_keys if split_hash(k) < VAL["val_fraction"]} | old_held[b]
        target = min(3, int(0.25 * len(bucket_keys)))
        new_keys = [k for k in bucket_keys if k not in old_keys and k not in rule1]
        assert len(moved) == max(0, target - len(rule1) - len(new_keys))
        assert not moved or all(split_hash(k) >= VAL["val_fraction"] for k in moved)


def test_choose_heldout_rules():
    keys = [f"k{i}" for i in range(100)]
    a = choose_heldout(keys, fraction=0.05, min_per_bucket=0)
    assert a == {k for k in keys if split_hash(k) < 0.05}
    b = choose_heldout(keys, fraction=0.0, min_per_bucket=8)  # the 8 smallest hashes (cap 10 % = 10)
    assert b == set(sorted(keys, key=split_hash)[:8])
    c = choose_heldout(keys[:30], fraction=0.0, min_per_bucket=8)  # capped at floor(0.1 * 30) = 3
    assert len(c) == 3
    # adding keys: the previous held-out stay; top-up from new keys before trained ones
    grown_keys = keys + [f"n{i}" for i in range(20)]
    d = choose_heldout(grown_keys, fraction=0.0, min_per_bucket=12, max_share=0.5, previous=b,
                       trained=set(keys) - b)
    assert b <= d and len(d) == 12 and all(k.startswith("n") for k in d - b)
    assert choose_heldout([], fraction=0.5, min_per_bucket=3) == set()


def test_motif_plan_reports_heldout(grown, tmp_path, capsys):
    root = grown["root"] / "data"
    report = tmp_path / "r.json"
    plan_main(["--manifest", str(root), "--buckets", *STAGES["s1"], "--world-size", "2", "--token-budget", "400",
               "--report", str(report), "--carry"])
    out = capsys.readouterr().out
    r = json.loads(report.read_text())
    want = {b: grown["second"]["val_split"]["buckets"][b]["samples"] for b in STAGES["s1"]}
    assert r["held_out"] == sum(want.values()) and {b: r["per_bucket"][b]["held_out"] for b in want} == want
    assert f"held out for validation: {sum(want.values())} sample(s)" in out
    # samples / total count the training part only
    assert r["total"] == sum(grown["second"]["buckets"][b]["samples"] - want[b] for b in want)


def test_the_fixture_exercises_every_rule(grown):
    """Not vacuous: every bucket holds some out, the minimum tops up somewhere, and the re-run added keys."""
    first, second = grown["first"]["val_split"], grown["second"]["val_split"]
    assert all(v["samples"] > 0 for v in second["buckets"].values())
    assert second["samples"] > first["samples"]
    topped = [b for b, v in second["buckets"].items()
              if any(split_hash(k) >= VAL["val_fraction"] for k in v["keys"])]
    assert topped
