"""Planner benchmark: what the plan's steps carry against the token budget, on a long-tailed manifest.

    python scripts/bench_plan.py [--world 64] [--samples 1000000] [--seed 0] [--json out.json]

A synthetic manifest (metadata only, no shards): 48 buckets = 16 aspect ratios x {1 x 256 px images,
33 x 256p clips, 81 x 480p clips}, Zipf(1.1) bucket popularity in a random order, so every family has
head and tail buckets. Three stages like the recipe's first three (images: plain budget 8192; 256p x 33:
attention-aware 32768; 480p x 81: attention-aware 65536). Per stage: utilization, steps, short steps
(< 90 % of the bucket's per-rank batch), steps whose fill (per-rank effective tokens / budget) is
>= 90 %, the largest raw video tokens a rank holds / token_budget, and the same plan without tail
folding (``min_fill`` ~ 0: full steps plus one tail step per bucket) for comparison. Pure CPU, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# 16 (height, width) pairs per family, area <= the family's first (multiples of 16 px), aspect 0.4 .. 2.7
ASPECTS_256 = [(256, 256), (240, 272), (272, 240), (224, 288), (288, 224), (208, 320), (320, 208), (192, 336),
               (336, 192), (176, 368), (368, 176), (160, 400), (400, 160), (240, 256), (256, 240), (224, 304)]
ASPECTS_480 = [(480, 832), (832, 480), (624, 624), (576, 672), (672, 576), (528, 736), (736, 528), (448, 864),
               (864, 448), (416, 960), (960, 416), (384, 1024), (1024, 384), (608, 640), (640, 608), (544, 704)]
FAMILIES = [(1, ASPECTS_256), (33, ASPECTS_256), (81, ASPECTS_480)]


def video_tokens(f: int, h: int, w: int) -> int:
    return (1 + (f - 1) // 4) * (h // 16) * (w // 16)


def long_tailed_manifest(total: int = 1_000_000, seed: int = 0, zipf: float = 1.1) -> dict:
    """48 buckets, Zipf-like counts in a seeded random order; one shard entry per bucket (keys omitted:
    the planner only needs the counts)."""
    rng = np.random.default_rng(seed)
    shapes = [(f, h, w) for f, aspects in FAMILIES for h, w in aspects]
    weight = 1.0 / np.arange(1, len(shapes) + 1) ** zipf
    counts = np.maximum(1, np.round(weight / weight.sum() * total)).astype(np.int64)[rng.permutation(len(shapes))]
    buckets, shards = {}, []
    for (f, h, w), c in zip(shapes, counts, strict=True):
        name = f"{f}x{h}x{w}"
        buckets[name] = {"frames": f, "height": h, "width": w, "tokens": video_tokens(f, h, w), "samples": int(c),
                         "latent_shape": [16, 1 + (f - 1) // 4, h // 8, w // 8]}
        shards.append({"path": f"shards/{name}/{name}-r0-00000.tar", "bucket": name, "samples": int(c)})
    return {"version": 1, "buckets": buckets, "shards": shards}


def stages() -> list[dict]:
    """(name, buckets, token_budget, attention_aware) of the three benchmark stages."""
    return [{"name": f"{f}f-{label}", "buckets": [f"{f}x{h}x{w}" for h, w in aspects], "token_budget": budget,
             "attention_aware": aa}
            for (f, aspects), label, budget, aa in zip(FAMILIES, ("256px-images", "256p", "480p"),
                                                       (8192, 32768, 65536), (False, True, True), strict=True)]


def bench(world: int, total: int, seed: int) -> list[dict]:
    from motif_train.data.plan import build_plan, plan_stats

    manifest = long_tailed_manifest(total, seed)
    rows = []
    for st in stages():
        kw = dict(world_size=world, token_budget=st["token_budget"], seed=seed, epoch=0,
                  attention_aware=st["attention_aware"])
        t0 = time.perf_counter()
        plan = build_plan(manifest, st["buckets"], **kw)
        dt = time.perf_counter() - t0
        unfolded = build_plan(manifest, st["buckets"], min_fill=1e-9, max_drop=0.0, **kw)
        s, u = plan_stats(plan, manifest), plan_stats(unfolded, manifest)
        rows.append({"stage": st["name"], "attention_aware": st["attention_aware"],
                     "token_budget": st["token_budget"], "samples": s["total"], "steps": s["steps"],
                     "utilization": s["utilization"], "short_fraction": s["short_fraction"],
                     "full_fraction": s["full_fraction"], "fill_mean": s["fill_mean"],
                     "max_budget_ratio": s["max_budget_ratio"], "plan_s": dt,
                     "unfolded": {"steps": u["steps"], "utilization": u["utilization"],
                                  "short_fraction": u["short_fraction"], "full_fraction": u["full_fraction"]}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = bench(args.world, args.samples, args.seed)
    print("| stage | budget | samples | steps | utilization | steps >= 90 % of budget | short steps | "
          "max raw tokens / budget | unfolded: utilization, short steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["unfolded"]
        print(f"| {r['stage']}{' (attention-aware)' if r['attention_aware'] else ''} | {r['token_budget']:,} | "
              f"{r['samples']:,} | {r['steps']:,} | {r['utilization']:.2%} | {r['full_fraction']:.1%} | "
              f"{r['short_fraction']:.1%} | {r['max_budget_ratio']:.3f} | {u['utilization']:.2%}, "
              f"{u['short_fraction']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
