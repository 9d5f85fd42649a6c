"""Offline bucket-balanced plan (motif_train/data/plan.py) and the `motif-plan` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from motif_train.cli.plan import main
from motif_train.data.plan import (
    MAX_DROP,
    Plan,
    _bucket_steps,
    _carry_steps,
    bucket_batch_size,
    build_plan,
    carried_in_per_rank,
    full_batch_need,
    naive_plan_utilization,
    plan_stats,
    replan,
    sample_ids_by_bucket,
)

WORLD_SIZES = [1, 2, 3, 4, 8, 64]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_manifest(counts, tokens, *, seed: int = 0, max_shard: int = 500) -> dict:
    """In-memory manifest; shards of random size, shard order shuffled so buckets interleave in id space."""
    rng = np.random.default_rng(seed)
    buckets, shards = {}, []
    for i, (c, t) in enumerate(zip(counts, tokens, strict=True)):
        f, h, w = 1 + 4 * i, 64 + 16 * (i % 3), 96
        name = f"{f}x{h}x{w}"
        buckets[name] = {"frames": f, "height": h, "width": w, "latent_shape": [16, 1 + i, h // 8, w // 8],
                         "tokens": int(t), "samples": int(c)}
        start = 0
        while start < c:
            n = int(min(c - start, rng.integers(1, max_shard + 1)))
            shards.append({"path": f"shards/{name}/{name}-{len(shards):05d}.tar", "bucket": name, "samples": n,
                           "keys": [f"{name}-{start + j}" for j in range(n)]})
            start += n
    order = rng.permutation(len(shards))
    return {"version": 1, "buckets": buckets, "shards": [shards[i] for i in order]}


def draw_counts(rng: np.random.Generator, n: int, kind: str, scale: int) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, scale + 1, n)
    if kind == "zipf":
        return np.minimum(rng.zipf(1.5, n) * max(1, scale // 20), 4 * scale)
    return np.minimum(np.round(rng.lognormal(np.log(max(scale, 1) / 4), 1.5, n)), 4 * scale).astype(np.int64)


@st.composite
def stages(draw, min_per_bucket: int = 0):
    n = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["uniform", "zipf", "lognormal"]))
    world_size = draw(st.sampled_from(WORLD_SIZES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    counts = draw_counts(rng, n, kind, draw(st.sampled_from([5, 50, 400])))
    counts = np.maximum(counts, min_per_bucket)
    tokens = draw(st.lists(st.integers(64, 40000), min_size=n, max_size=n))
    manifest = make_manifest(counts, tokens, seed=seed)
    names = list(manifest["buckets"])
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    return dict(manifest=manifest, buckets=chosen, world_size=world_size,
                token_budget=draw(st.integers(64, 200000)), seed=draw(st.integers(0, 10**6)),
                epoch=draw(st.integers(0, 50)), attention_aware=draw(st.booleans()))


def stage_ids(manifest, buckets) -> dict[str, np.ndarray]:
    by = sample_ids_by_bucket(manifest)
    return {b: by[b] for b in buckets}


def own_instances(plan: Plan) -> np.ndarray:
    """The scheduled ids without one instance of each carried-in id (with carry: this epoch's own instances)."""
    sched = np.sort(plan.scheduled_ids())
    if not plan.carried_in.size:
        return sched
    first = np.searchsorted(sched, np.sort(plan.carried_in))
    assert np.array_equal(sched[first], np.sort(plan.carried_in))  # every carried-in id trains in the plan
    return np.delete(sched, first)


def check_plan(plan: Plan, manifest: dict, buckets: list[str], exclude=None) -> np.ndarray:
    """Invariants of any plan; returns the scheduled ids."""
    ids = stage_ids(manifest, buckets)
    if exclude is not None:
        ids = {b: np.setdiff1d(v, exclude) for b, v in ids.items()}
    bucket_of = {int(i): b for b, v in ids.items() for i in v}
    w = plan.world_size
    for s in plan.steps:
        assert s.samples.dtype == np.int64 and s.samples.ndim == 2
        assert s.samples.shape[0] == w and s.samples.shape[1] >= 1  # one row per rank, equal lengths
        assert {bucket_of[int(i)] for i in s.samples.ravel()} == {s.bucket}  # same bucket on every rank
    sched = plan.scheduled_ids()
    for s in plan.steps:
        assert np.unique(s.samples).size == s.samples.size  # never one id twice in a step
    own = own_instances(plan)  # this epoch's instances: every scheduled id without carry
    assert np.unique(own).size == own.size  # no repeats across ranks and steps
    allv = np.concatenate([own, plan.carried, plan.dropped])
    stage = np.sort(np.concatenate(list(ids.values())))
    assert np.array_equal(np.sort(allv), stage)  # scheduled ∪ (carried ∪) dropped == stage samples, disjoint
    assert plan.total == stage.size
    dropped = np.array([bucket_of[int(i)] for i in plan.dropped])
    inevitable = 0
    for b in buckets:
        n_b, d_b = ids[b].size, int((dropped == b).sum())
        inevitable += n_b % w
        assert d_b == n_b % w or (d_b - n_b % w) % w == 0  # < world_size, or whole folded tail rows on top
    # folding leaves tails out only within MAX_DROP (1 %) of the stage, in total
    assert plan.dropped.size <= max(inevitable, int(MAX_DROP * plan.total))
    tokens = {b: int(manifest["buckets"][b]["tokens"]) for b in buckets}
    for s in plan.steps:  # the budget bounds the raw video tokens a rank holds (one oversized sample aside)
        assert s.per_rank * tokens[s.bucket] <= max(plan.token_budget, tokens[s.bucket])
        assert s.per_rank <= plan.per_rank_batch[plan.buckets.index(s.bucket)]
    return sched


@settings(max_examples=60, **SETTINGS)
@given(stages())
def test_plan_invariants(s):
    plan = build_plan(s["manifest"], s["buckets"], world_size=s["world_size"], token_budget=s["token_budget"],
                      seed=s["seed"], epoch=s["epoch"], attention_aware=s["attention_aware"])
    check_plan(plan, s["manifest"], s["buckets"])
    counts = [v.size for v in stage_ids(s["manifest"], s["buckets"]).values()]
    if min(counts) >= 34 * s["world_size"]:
        assert plan.utilization >= 0.97
    stats = plan_stats(plan, s["manifest"])
    assert stats["scheduled"] + stats["dropped"] == stats["total"] == sum(counts)
    assert sum(b["steps"] for b in stats["per_bucket"].values()) == plan.num_steps


@settings(max_examples=15, **SETTINGS)
@given(stages(min_per_bucket=34 * 64))
def test_utilization_bound_on_big_buckets(s):
    plan = build_plan(s["manifest"], s["buckets"], world_size=s["world_size"], token_budget=s["token_budget"],
                      seed=s["seed"], epoch=s["epoch"])
    assert plan.utilization >= 0.97


def long_tailed_manifest(n_buckets=30, total=200_000, seed=0):
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_buckets + 1) ** 1.1  # Zipf-like bucket popularity
    counts = np.maximum(1, np.round(w / w.sum() * total)).astype(np.int64)
    tokens = rng.integers(256, 40000, n_buckets)
    return make_manifest(counts, tokens, seed=seed, max_shard=2000), counts, tokens


def test_realistic_long_tailed_64_ranks():
    manifest, _, _ = long_tailed_manifest()
    names = list(manifest["buckets"])
    plan = build_plan(manifest, names, world_size=64, token_budget=32768, seed=0, epoch=0)
    naive = naive_plan_utilization(manifest, names, world_size=64, token_budget=32768, seed=0)
    assert plan.utilization >= 0.97
    # The naive simulation loses ~20-30% here (ranks run out of a bucket at different times).
    assert naive <= 0.85 and plan.utilization - naive >= 0.15


def test_naive_collapses_when_batches_match_per_rank_counts():
    # 30 long-tailed image-like buckets (~256 tokens), 32768-token budget: per-rank batches of ~120, while the
    # 28 smaller buckets hold fewer samples than that per rank, so naive bucketing never fills them (~43% here);
    # the offline plan still uses >= 97%.
    rng = np.random.default_rng(1)
    w = 1.0 / np.arange(1, 31) ** 1.1
    counts = np.maximum(1, np.round(w / w.sum() * 200_000)).astype(np.int64)
    manifest = make_manifest(counts, rng.integers(240, 290, 30), seed=1, max_shard=2000)
    names = list(manifest["buckets"])
    plan = build_plan(manifest, names, world_size=64, token_budget=32768, seed=0, epoch=0)
    naive = naive_plan_utilization(manifest, names, world_size=64, token_budget=32768, seed=0)
    assert plan.utilization >= 0.97
    assert naive <= 0.5


@settings(max_examples=25, **SETTINGS)
@given(stages())
def test_determinism_and_epochs(s):
    kw = dict(world_size=s["world_size"], token_budget=s["token_budget"], seed=s["seed"],
              attention_aware=s["attention_aware"])
    a = build_plan(s["manifest"], s["buckets"], epoch=s["epoch"], **kw).to_arrays()
    b = build_plan(s["manifest"], s["buckets"], epoch=s["epoch"], **kw).to_arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_different_epoch_changes_order():
    manifest, _, _ = long_tailed_manifest(n_buckets=8, total=5000)
    names = list(manifest["buckets"])
    p0 = build_plan(manifest, names, world_size=4, token_budget=4096, seed=3, epoch=0)
    p1 = build_plan(manifest, names, world_size=4, token_budget=4096, seed=3, epoch=1)
    assert p0.num_steps == p1.num_steps
    assert [s.bucket for s in p0.steps] != [s.bucket for s in p1.steps]
    assert not np.array_equal(p0.scheduled_ids(), p1.scheduled_ids())
    p2 = build_plan(manifest, names, world_size=4, token_budget=4096, seed=4, epoch=0)
    assert not np.array_equal(p0.scheduled_ids(), p2.scheduled_ids())


@settings(max_examples=20, **SETTINGS)
@given(stages())
def test_save_load_round_trip(tmp_path_factory, s):
    plan = build_plan(s["manifest"], s["buckets"], world_size=s["world_size"], token_budget=s["token_budget"],
                      seed=s["seed"], epoch=s["epoch"], attention_aware=s["attention_aware"])
    path = tmp_path_factory.mktemp("plan") / "plan.npz"
    plan.save(path)
    back = Plan.load(path)
    a, b = plan.to_arrays(), back.to_arrays()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [x.bucket for x in back.steps] == [x.bucket for x in plan.steps]
    assert all(np.array_equal(x.samples, y.samples) for x, y in zip(plan.steps, back.steps, strict=True))
    assert (back.world_size, back.epoch, back.seed, back.total, back.buckets, back.per_rank_batch) == \
        (plan.world_size, plan.epoch, plan.seed, plan.total, plan.buckets, plan.per_rank_batch)
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)


@settings(max_examples=30, **SETTINGS)
@given(stages(), st.floats(0.0, 1.0))
def test_replan_world_size_change(s, frac):
    m, bk = s["manifest"], s["buckets"]
    kw = dict(token_budget=s["token_budget"], seed=s["seed"], epoch=s["epoch"], attention_aware=s["attention_aware"])
    p4 = build_plan(m, bk, world_size=4, **kw)
    k = int(round(frac * p4.num_steps))
    final, offset = replan(m, bk, segments=[(0, 4), (k, 2)], **kw)
    assert offset == k and final.world_size == 2
    consumed = np.concatenate([x.samples.ravel() for x in p4.steps[:k]] + [np.zeros(0, np.int64)])
    later = check_plan(final, m, bk, exclude=consumed)
    assert np.intersect1d(consumed, later).size == 0  # nothing scheduled twice in the epoch
    stage = np.concatenate(list(stage_ids(m, bk).values()))
    covered = np.concatenate([consumed, later, final.dropped])
    assert np.array_equal(np.sort(covered), np.sort(stage))  # consumed, scheduled later, or dropped
    # resume exactness: rebuilding from (seed, epoch, segments) gives the same step at every position
    again, off2 = replan(m, bk, segments=[(0, 4), (k, 2)], **kw)
    assert off2 == offset
    for pos in range(offset, offset + final.num_steps):
        x, y = final.steps[pos - offset], again.steps[pos - off2]
        assert x.bucket == y.bucket and np.array_equal(x.samples, y.samples)
    # segment 0 of a replan is the plain plan
    first, off0 = replan(m, bk, segments=[(0, 4)], **kw)
    assert off0 == 0 and first.num_steps == p4.num_steps
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(first.steps, p4.steps, strict=True))


def test_replan_three_segments_and_errors():
    manifest, _, _ = long_tailed_manifest(n_buckets=6, total=4000)
    names = list(manifest["buckets"])
    kw = dict(token_budget=8192, seed=1, epoch=2)
    p8 = build_plan(manifest, names, world_size=8, **kw)
    p3 = build_plan(manifest, names, world_size=3, exclude=np.concatenate([s.samples.ravel() for s in p8.steps[:5]]),
                    **kw)
    final, off = replan(manifest, names, segments=[(0, 8), (5, 3), (9, 2)], **kw)
    used = np.concatenate([s.samples.ravel() for s in p8.steps[:5]] + [s.samples.ravel() for s in p3.steps[:4]])
    assert off == 9 and np.intersect1d(used, final.scheduled_ids()).size == 0
    with pytest.raises(ValueError, match="non-decreasing"):
        replan(manifest, names, segments=[(0, 8), (5, 3), (4, 2)], **kw)
    with pytest.raises(ValueError, match="first start 0|\\(0, world_size\\)"):
        replan(manifest, names, segments=[(1, 8)], **kw)
    same, off = replan(manifest, names, segments=[(0, 8), (0, 3)], **kw)  # restart before the first step
    assert off == 0 and same.to_arrays()["ids"].tolist() == build_plan(
        manifest, names, world_size=3, **kw).to_arrays()["ids"].tolist()
    with pytest.raises(ValueError, match="cannot start"):
        replan(manifest, names, segments=[(0, 8), (p8.num_steps + 1, 2)], **kw)


def test_bucket_batch_size():
    assert bucket_batch_size(72, 4096) == 56
    assert bucket_batch_size(5000, 4096) == 1
    assert bucket_batch_size(1000, 4096, attention_aware=True, ref_tokens=1000) == 4  # == plain at ref
    # the shortest bucket fills the budget (it used to get 74 x 100 = 7400 tokens: 1.8x the budget) ...
    assert bucket_batch_size(100, 4096, attention_aware=True, ref_tokens=1000, base_tokens=100) == 40
    # ... and a clip 10x longer gets the batch of equal compute, N + N^2/ref: round(40 * 110 / 2000) = 2
    assert bucket_batch_size(1000, 4096, attention_aware=True, ref_tokens=1000, base_tokens=100) == 2
    # the recipe's 480p stage: 2 clips of 32,760 next to 31,941-token ones (rounded, not floored to 1)
    assert bucket_batch_size(32760, 65536, attention_aware=True, ref_tokens=32760, base_tokens=31941) == 2
    with pytest.raises(ValueError):
        bucket_batch_size(0, 4096)


@settings(max_examples=200, **SETTINGS)
@given(st.integers(64, 40000), st.integers(64, 40000), st.integers(64, 40000), st.integers(1, 10**6))
def test_attention_aware_within_budget_and_monotone(tokens, ref, base, budget):
    aa = bucket_batch_size(tokens, budget, attention_aware=True, ref_tokens=ref, base_tokens=base)
    plain = bucket_batch_size(tokens, budget)
    assert 1 <= aa <= plain  # never more raw tokens than the plain rule: token_budget is a memory bound
    assert aa * tokens <= max(budget, tokens)
    assert bucket_batch_size(tokens + 1, budget, attention_aware=True, ref_tokens=ref, base_tokens=base) <= aa


def test_attention_aware_plan_batches():
    manifest = make_manifest([500, 500, 500], [256, 4096, 16384])
    names = list(manifest["buckets"])
    plain = build_plan(manifest, names, world_size=2, token_budget=65536, seed=0, epoch=0)
    aa = build_plan(manifest, names, world_size=2, token_budget=65536, seed=0, epoch=0, attention_aware=True)
    assert aa.per_rank_batch[2] <= plain.per_rank_batch[2]  # the largest bucket is the reference
    assert aa.per_rank_batch == sorted(aa.per_rank_batch, reverse=True)
    # long clips get proportionally smaller batches than short ones under the N^2 model
    assert aa.per_rank_batch[0] / aa.per_rank_batch[2] > plain.per_rank_batch[0] / plain.per_rank_batch[2]
    check_plan(aa, manifest, names)


def test_unknown_bucket_and_exclude():
    manifest = make_manifest([10, 20], [72, 144])
    with pytest.raises(ValueError, match=r"'1x2x3'.*1x64x96, 5x80x96"):
        build_plan(manifest, ["1x2x3"], world_size=1, token_budget=100, seed=0, epoch=0)
    names = list(manifest["buckets"])
    full = build_plan(manifest, names, world_size=1, token_budget=100, seed=0, epoch=0)
    assert full.utilization == 1.0 and full.dropped.size == 0  # one rank never drops anything
    gone = build_plan(manifest, names, world_size=1, token_budget=100, seed=0, epoch=0,
                      exclude=full.scheduled_ids())
    assert gone.num_steps == 0 and gone.total == 0


def write_inputs(tmp_path):
    manifest = make_manifest([300, 120, 7], [72, 144, 2000], seed=2)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    names = list(manifest["buckets"])
    (tmp_path / "cur.yaml").write_text("stages:\n  - name: a\n    buckets: [[1, 64, 96], [5, 80, 96]]\n"
                                       "    token_budget: 2048\n  - name: b\n    buckets: [[9, 64, 96]]\n")
    return manifest, names


def test_cli_writes_plan_and_report(tmp_path, capsys):
    manifest, names = write_inputs(tmp_path)
    out, rep = tmp_path / "o" / "plan.npz", tmp_path / "o" / "report.json"
    assert main(["--manifest", str(tmp_path / "manifest.json"), "--buckets", *names, "--world-size", "4",
                 "--token-budget", "4096", "--seed", "0", "--epoch", "0", "--out", str(out),
                 "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "utilization" in text and names[0] in text
    report = json.loads(rep.read_text())
    for key in ("utilization", "steps", "dropped", "per_bucket", "naive_utilization", "world_size", "seed",
                "epoch", "token_budget"):
        assert key in report
    assert set(report["per_bucket"]) == set(names)
    assert (tmp_path / "o" / "report.png").stat().st_size > 1000
    plan = Plan.load(out)
    assert plan.world_size == 4 and plan.num_steps == report["steps"]
    check_plan(plan, manifest, names)


def test_cli_stage_from_config(tmp_path, capsys):
    manifest, _ = write_inputs(tmp_path)
    out = tmp_path / "plan.npz"
    main(["--manifest", str(tmp_path / "manifest.json"), "--stage-from-config", str(tmp_path / "cur.yaml"),
          "--stage", "0", "--world-size", "2", "--out", str(out), "--segments", "0:2", "3:1"])
    plan = Plan.load(out)
    assert plan.buckets == ["1x64x96", "5x80x96"] and plan.token_budget == 2048 and plan.world_size == 1


@pytest.mark.parametrize("extra, needle", [
    (["--buckets", "1x2x3", "--token-budget", "100"], "1x2x3"),
    (["--buckets", "1x64x96"], "--token-budget"),
    (["--stage-from-config", "cur.yaml", "--stage", "1", "--token-budget", "64"], "9x64x96"),
    (["--stage-from-config", "cur.yaml", "--stage", "5"], "out of range"),
    (["--stage-from-config", "nope.yaml"], "not found"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, monkeypatch, extra, needle):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--manifest", "manifest.json", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_missing_manifest(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--manifest", str(tmp_path / "missing.json"), "--buckets", "9x64x96", "--token-budget", "64"])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err


# ---- tail folding and the budget at 64 ranks (issue 10, section 4) ---------------------------------------


def test_bucket_steps_folds_short_tails():
    assert _bucket_steps(0, 32, 29) == ([], 0)
    assert _bucket_steps(96, 32, 29) == ([32, 32, 32], 0)  # no tail
    assert _bucket_steps(94, 32, 29) == ([32, 32, 30], 0)  # the tail is full enough
    assert _bucket_steps(291, 32, 29) == ([30] + [29] * 9, 0)  # 9 x 32 + 3: balanced over 10 steps
    assert _bucket_steps(67, 32, 29) == ([32, 32, 3], 3)  # balancing gives 22-23: the 3-image tail is short
    assert _bucket_steps(5, 32, 29) == ([5], 5)  # smaller than one step


def test_short_tail_left_out_within_max_drop():
    # bucket A: 2 full steps + a 3-per-rank tail that balancing cannot fix; bucket B: 4000 per rank
    manifest = make_manifest([64 * 67, 64 * 4000], [256, 256])
    names = list(manifest["buckets"])
    plan = build_plan(manifest, names, world_size=64, token_budget=8192, seed=0, epoch=0)
    check_plan(plan, manifest, names)
    assert sorted(s.per_rank for s in plan.steps if s.bucket == names[0]) == [32, 32]  # the tail is left out
    assert plan.dropped.size == 64 * 3 and plan.utilization >= 0.99
    kept = build_plan(manifest, names, world_size=64, token_budget=8192, seed=0, epoch=0, max_drop=0.0)
    assert sorted(s.per_rank for s in kept.steps if s.bucket == names[0]) == [3, 32, 32]  # no allowance: kept
    other = build_plan(manifest, names, world_size=64, token_budget=8192, seed=0, epoch=1)
    assert not np.array_equal(np.sort(plan.dropped), np.sort(other.dropped))  # random ids, not the same each epoch


def _bench_plan():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_plan.py"
    spec = importlib.util.spec_from_file_location("bench_plan", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_long_tailed_48_buckets_64_ranks():
    """The figures of docs/benchmarks.md ("Planner: steps against the token budget"): 10⁶ samples in 48 Zipf
    buckets, 64 ranks, the recipe's four stages and three long-tail stages, 3 consecutive epochs (the
    benchmark runs 8). With carry every stage has >= 98 % of its steps at >= 90 % of the full batch; the
    standalone epoch (the planner before) does not: the tails of b = 8 / b = 2 buckets."""
    bench = _bench_plan()
    manifest = bench.long_tailed_manifest(1_000_000, seed=0)
    assert len(manifest["buckets"]) == 48
    recipe = bench.recipe_stages()
    assert [len(st["buckets"]) for st in recipe] == [5, 3, 3, 3]  # configs/curriculum/motif_4stage.yaml
    assert all(b in manifest["buckets"] for st in recipe for b in st["buckets"])
    worst_before = 1.0
    for stage in recipe + bench.long_tail_stages(recipe):
        kw = dict(world=64, epochs=3, seed=0)
        c = bench.stage_epochs(manifest, stage, carry=True, **kw)
        name = stage["name"]
        assert c["full_share_worst_epoch"] >= 0.98 and c["utilization_min"] >= 0.99, (name, c)
        assert c["left_out_twice_in_a_row"] == 0 and c["carry_lost"] == 0, (name, c)
        assert c["smallest_step_share"] >= 0.9, (name, c)
        before = bench.stage_epochs(manifest, stage, carry=False, **kw)
        worst_before = min(worst_before, before["full_share"])
    assert worst_before < 0.97  # the issue: 96-97 % of steps full in the 256p and 480p stages


# ---- carried remainders (carry=True: the trainer's loader from two ranks on) ------------------------------


def test_full_batch_need():
    assert [full_batch_need(b) for b in (1, 2, 8, 9, 10, 14, 32, 34)] == [1, 2, 8, 9, 9, 13, 29, 31]


@pytest.mark.parametrize("q_n, b, need", [(87, 2, 2), (77, 8, 8), (40, 32, 29), (63, 32, 29), (1227, 32, 29)])
def test_carried_in_per_rank_is_the_recursion_and_periodic(q_n, b, need):
    t, seen = 0, []
    for _ in range(200):
        seen.append(t)
        t = _carry_steps(q_n, t, b, need)[1]
    for e in (0, 1, 2, 3, 17, 199):
        assert carried_in_per_rank(q_n * 64 + 5, 64, b, need, e) == seen[e]
    assert carried_in_per_rank(q_n * 64 + 5, 64, b, need, 10**9) < need  # O(need): cycles are jumped
    for t_in in range(need):  # every step full, the carry below one full step
        sizes, t_out = _carry_steps(q_n, t_in, b, need)
        assert all(need <= x <= b for x in sizes) and 0 <= t_out < need and sum(sizes) + t_out == q_n + t_in
    assert carried_in_per_rank(5 * 64, 64, 8, 8, 3) == 0  # smaller than one full step of its own: no carry


def check_epochs(manifest: dict, names: list[str], epochs: int, **kw) -> list[Plan]:
    """Consecutive carry plans: each one's invariants, and between them what was carried out is carried in,
    nothing left out twice in a row, and every sample of an epoch trained once for it (in its own plan or,
    carried, in the next one's) unless left out."""
    plans = [build_plan(manifest, names, epoch=e, carry=True, **kw) for e in range(epochs)]
    for e, plan in enumerate(plans):
        assert plan.carry and plan.carry_lost.size == 0
        check_plan(plan, manifest, names)
        if e:
            prev = plans[e - 1]
            assert np.array_equal(plan.carried_in, prev.carried)  # the remainder trains in the next plan
            assert np.intersect1d(plan.dropped, prev.dropped).size == 0  # never left out twice in a row
        else:
            assert plan.carried_in.size == 0
    return plans


@settings(max_examples=40, **SETTINGS)
@given(stages(), st.integers(1, 4))
def test_carry_invariants(s, epochs):
    """Random stages: one per-rank shape per step, no id twice in a step, the budget bound, the carry chain."""
    m, names = s["manifest"], s["buckets"]
    big = [b for b in names if sample_ids_by_bucket(m)[b].size >= s["world_size"]]  # smaller ones: all left out
    if not big:
        return
    kw = dict(world_size=s["world_size"], token_budget=s["token_budget"], seed=s["seed"],
              attention_aware=s["attention_aware"])
    for plan in check_epochs(m, big, epochs, **kw):
        b = dict(zip(plan.buckets, plan.per_rank_batch, strict=True))
        n = {x: sample_ids_by_bucket(m)[x].size // s["world_size"] for x in big}
        for step in plan.steps:  # a step under 90 % of its full batch only for a bucket smaller than one
            assert step.per_rank >= full_batch_need(b[step.bucket]) or n[step.bucket] < b[step.bucket]
        again = build_plan(m, big, epoch=plan.epoch, carry=True, **kw).to_arrays()  # recomputed exactly on resume
        assert all(np.array_equal(v, again[k]) for k, v in plan.to_arrays().items())


def test_carry_moderate_long_tailed_manifest():
    """A moderate version of the benchmark (200k samples, 48 Zipf buckets, 16 ranks): every stage >= 98 % of
    its steps at >= 90 % of the full batch and >= 99 % utilization in each of 4 epochs, no sample left out two
    epochs in a row; the standalone epoch misses the 98 % somewhere."""
    bench = _bench_plan()
    manifest = bench.long_tailed_manifest(200_000, seed=0)
    recipe = bench.recipe_stages()
    before = []
    for stage in recipe + bench.long_tail_stages(recipe):
        kw = dict(world_size=16, token_budget=stage["token_budget"], seed=0,
                  attention_aware=stage["attention_aware"])
        for plan in check_epochs(manifest, stage["buckets"], 4, **kw):
            stats = plan_stats(plan, manifest)
            assert stats["batch_full_fraction"] >= 0.98 and stats["utilization"] >= 0.99, (stage["name"], stats)
            assert stats["max_budget_ratio"] <= 1.0
            assert all(step.samples.shape == (16, step.per_rank) for step in plan.steps)
        legacy = plan_stats(build_plan(manifest, stage["buckets"], epoch=1, **kw), manifest)
        before.append(legacy["batch_full_fraction"])
    assert min(before) < 0.98


def test_carry_epoch_zero_is_the_standalone_plan_without_its_tails():
    """Where both agree on which steps are full, epoch 0 with carry keeps every other step of the standalone
    plan, the same ids on the same ranks (the tails are carried), so a run's first epoch is what `build_plan`
    says it is minus those tails."""
    manifest = make_manifest([64 * 67 + 5, 64 * 192 + 9, 64 * 30], [256, 256, 256])
    names = list(manifest["buckets"])
    kw = dict(world_size=64, token_budget=8192, seed=3, epoch=0, max_drop=0.0)
    plain, carry = build_plan(manifest, names, **kw), build_plan(manifest, names, carry=True, **kw)
    rows = {s.samples.tobytes() for s in plain.steps}
    assert all(s.samples.tobytes() in rows for s in carry.steps)
    assert carry.num_steps == plain.num_steps - 1 and carry.carried.size == 64 * 3  # 67 = 2 x 32 + 3 per rank
    assert np.array_equal(np.sort(carry.dropped), np.sort(plain.dropped))  # the < 64 remainders


def test_carry_replan_after_a_world_size_change():
    manifest, _, _ = long_tailed_manifest(n_buckets=8, total=40_000, seed=2)
    names = list(manifest["buckets"])
    kw = dict(token_budget=8192, seed=1, epoch=3, carry=True)
    p8 = build_plan(manifest, names, world_size=8, **kw)
    final, off = replan(manifest, names, segments=[(0, 8), (7, 3)], **kw)
    consumed = np.concatenate([s.samples.ravel() for s in p8.steps[:7]])
    later = final.scheduled_ids()
    assert off == 7 and final.world_size == 3 and np.intersect1d(consumed, later).size == 0
    for s in final.steps:
        assert s.samples.shape[0] == 3 and np.unique(s.samples).size == s.samples.size
    stage = np.concatenate([sample_ids_by_bucket(manifest)[b] for b in names])
    assert np.array_equal(np.unique(np.concatenate([consumed, later, final.carried, final.dropped])),
                          np.unique(stage))  # every sample of the epoch: trained, carried on, or left out
    again, _ = replan(manifest, names, segments=[(0, 8), (7, 3)], **kw)
    assert all(np.array_equal(v, again.to_arrays()[k]) for k, v in final.to_arrays().items())


def test_carry_plan_save_load_and_format_1(tmp_path):
    manifest = make_manifest([64 * 67 + 5, 64 * 41], [256, 300])
    names = list(manifest["buckets"])
    plan = build_plan(manifest, names, world_size=64, token_budget=8192, seed=0, epoch=1, carry=True)
    assert plan.carried_in.size and plan.repeats().size
    plan.save(tmp_path / "p.npz")
    back = Plan.load(tmp_path / "p.npz")
    assert back.carry and all(np.array_equal(getattr(back, k), getattr(plan, k))
                              for k in ("carried_in", "carried", "carry_lost", "dropped"))
    old = build_plan(manifest, names, world_size=64, token_budget=8192, seed=0, epoch=1).to_arrays()
    old["format"], old["meta"] = np.array([1]), old["meta"][:6]
    for k in ("carried_in", "carried", "carry_lost"):
        del old[k]
    with open(tmp_path / "old.npz", "wb") as f:
        np.savez_compressed(f, **old)
    legacy = Plan.load(tmp_path / "old.npz")
    assert not legacy.carry and legacy.carried_in.size == 0 and legacy.num_steps == len(old["step_shape"])


def test_repeats_are_never_spares():
    from motif_train.data.rank_plan import RankPlan

    manifest = make_manifest([64 * 67 + 5, 64 * 41], [256, 300])
    names = list(manifest["buckets"])
    plan = build_plan(manifest, names, world_size=64, token_budget=8192, seed=0, epoch=1, carry=True)
    twice = set(plan.repeats().tolist())
    assert twice
    for rank in (0, 63):
        view = RankPlan.of(plan, 0, rank, 1, sample_ids_by_bucket(manifest))
        assert not twice & {int(c) for v in view.cands.values() for c in v}


def test_cli_reports_the_carry(tmp_path, capsys):
    manifest = make_manifest([64 * 67 + 5, 64 * 41], [256, 300])
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    args = ["--manifest", str(tmp_path / "m.json"), "--buckets", *manifest["buckets"], "--world-size", "64",
            "--token-budget", "8192", "--epoch", "1", "--no-naive", "--report", str(tmp_path / "r.json"), "--carry"]
    assert main(args) == 0
    out = capsys.readouterr().out
    plan = build_plan(manifest, list(manifest["buckets"]), world_size=64, token_budget=8192, seed=0, epoch=1,
                      carry=True)
    assert f"carried in from epoch 0: {plan.carried_in.size:,} sample(s)" in out
    assert f"{plan.repeats().size:,} of them also train for epoch 1 here" in out
    assert f"carried to epoch 2: {plan.carried.size:,} sample(s)" in out and plan.carried.size
    assert "never the same ones two epochs in a row" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["carry"] and report["carried_in"] == plan.carried_in.size and report["batch_full_fraction"] == 1.0
    assert main(args[:-1]) == 0  # without --carry: the standalone epoch, like replan's default and the dry run
    assert "carry: off" in capsys.readouterr().out
    one = [*args, "--world-size", "1"]  # the last one counts
    assert main(one) == 0  # one rank: the standalone epoch even with --carry, as the loader plans it
    assert "carry: off" in capsys.readouterr().out
