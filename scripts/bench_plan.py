"""Planner benchmark: the plan's steps on a long-tailed 48-bucket manifest at 64 ranks, stage by stage, over
consecutive epochs.

    python scripts/bench_plan.py [--world 64] [--samples 1000000] [--epochs 8] [--seed 0] [--json out.json]

The manifest (a synthetic dict, metadata only, deterministic from --samples and --seed): 48 buckets = 15 aspect
ratios x {1 x 256 px images, 33 x 256p clips, 81 x 480p clips} + the 3 buckets of 121 x 720p, each family
holding the recipe's buckets; Zipf(1.1) bucket sizes in a seeded random order, so every family has head and
tail buckets. Stages: the recipe's (the curriculum of configs/experiment/motif_video_2b_64xh200.yaml, read with
motif-plan's `stage_from_config`: buckets, token_budget, attention_aware) and three long-tail stages (the 15
buckets of each of the first three families, with the budget of the recipe stage of that frame count).

Per stage, over epochs 0 .. --epochs-1 (each planned from (seed, epoch) as the trainer's loader does), for the
planner with carry (what the loader uses from two ranks on) and without (the standalone epoch: the planner
before the carry, unchanged): utilization (worst epoch; used = trained in the epoch's plan or carried into the
next), the smallest step's share of its bucket's full per-rank batch, the share of steps carrying >= 90 % of it
(all epochs' steps together, and the worst epoch), samples left out per epoch and how many of them were left out
in the epoch before too, samples carried per epoch and the carried-in samples that also train for their own
epoch in the same plan (never in one step). Pure CPU, ~20 s at 10⁶ samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXPERIMENT = ROOT / "configs" / "experiment" / "motif_video_2b_64xh200.yaml"

# 15 (height, width) pairs per family (multiples of 16 px); the recipe's buckets first
ASPECTS_256 = [(256, 256), (224, 288), (288, 224), (192, 336), (336, 192), (240, 272), (272, 240), (208, 320),
               (320, 208), (176, 368), (368, 176), (160, 400), (400, 160), (240, 256), (256, 240)]
ASPECTS_256P = [(256, 448), (448, 256), (320, 320), (288, 400), (400, 288), (272, 416), (416, 272), (240, 480),
                (480, 240), (224, 512), (512, 224), (208, 544), (544, 208), (304, 368), (368, 304)]
ASPECTS_480 = [(480, 832), (832, 480), (624, 624), (576, 672), (672, 576), (528, 736), (736, 528), (448, 864),
               (864, 448), (416, 960), (960, 416), (384, 1024), (1024, 384), (608, 640), (640, 608)]
ASPECTS_720 = [(736, 1280), (1280, 736), (960, 960)]
FAMILIES = [(1, ASPECTS_256), (33, ASPECTS_256P), (81, ASPECTS_480), (121, ASPECTS_720)]
FULL = 0.9  # a step is full at >= 90 % of its bucket's full per-rank batch


def video_tokens(f: int, h: int, w: int) -> int:
    return (1 + (f - 1) // 4) * (h // 16) * (w // 16)


def long_tailed_manifest(total: int = 1_000_000, seed: int = 0, zipf: float = 1.1) -> dict:
    """48 buckets, Zipf-like counts in a seeded random order; one shard entry per bucket (keys omitted: the
    planner only needs the counts)."""
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


def curriculum_of(experiment: Path = EXPERIMENT) -> Path:
    """The curriculum YAML an experiment selects (`- override /curriculum: NAME` in its defaults)."""
    cfg = yaml.safe_load(experiment.read_text())
    for entry in cfg.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.split()[-1].strip("/") == "curriculum":
                    return experiment.parents[1] / "curriculum" / f"{value}.yaml"
    raise ValueError(f"{experiment} selects no curriculum")


def recipe_stages(experiment: Path = EXPERIMENT) -> list[dict]:
    """{'name', 'buckets', 'token_budget', 'attention_aware'} of every stage of the experiment's curriculum."""
    from motif_train.cli.plan import stage_from_config

    path = curriculum_of(experiment)
    names = [st["name"] for st in yaml.safe_load(path.read_text())["stages"]]
    return [{"name": f"recipe {i}: {name}", **stage_from_config(path, i)} for i, name in enumerate(names)]


def long_tail_stages(recipe: list[dict]) -> list[dict]:
    """The 15 buckets of each family that has 15, with the budget and mode of the recipe stage of its frames."""
    out = []
    for f, aspects in FAMILIES:
        if len(aspects) < 15:
            continue
        like = next(st for st in recipe if int(st["buckets"][0].split("x")[0]) == f)
        out.append({"name": f"long tail: {f} frames x 15", "buckets": [f"{f}x{h}x{w}" for h, w in aspects],
                    "token_budget": like["token_budget"], "attention_aware": like["attention_aware"]})
    return out


def stage_epochs(manifest: dict, stage: dict, *, world: int, epochs: int, seed: int, carry: bool) -> dict:
    """The per-stage figures (module doc) of epochs 0 .. epochs-1 of one stage."""
    from motif_train.data.plan import build_plan, full_batch_need

    kw = dict(world_size=world, token_budget=stage["token_budget"], seed=seed,
              attention_aware=stage["attention_aware"], carry=carry)
    util, full, steps, share_min, left, twice, carried, repeats, worst, lost = [], 0, 0, 1.0, [], 0, [], [], 1.0, 0
    prev = None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        plan = build_plan(manifest, stage["buckets"], epoch=epoch, **kw)
        batch = dict(zip(plan.buckets, plan.per_rank_batch, strict=True))
        n_full = 0
        for s in plan.steps:
            assert s.samples.shape == (world, s.per_rank), "one per-rank shape on every rank"
            share_min = min(share_min, s.per_rank / batch[s.bucket])
            n_full += s.per_rank >= full_batch_need(batch[s.bucket], FULL)
        full, steps = full + n_full, steps + plan.num_steps
        worst = min(worst, n_full / plan.num_steps if plan.num_steps else 1.0)
        util.append(plan.utilization)
        left.append(int(plan.dropped.size))
        carried.append(int(plan.carried.size))
        repeats.append(int(plan.repeats().size))
        lost += int(plan.carry_lost.size)
        if prev is not None:
            twice += int(np.intersect1d(prev, plan.dropped).size)
        prev = plan.dropped
    return {"utilization_min": min(util), "smallest_step_share": share_min, "full_share": full / max(1, steps),
            "full_share_worst_epoch": worst, "steps_per_epoch": steps / epochs, "left_out_per_epoch": float(
                np.mean(left)), "left_out_twice_in_a_row": twice, "carried_per_epoch": float(np.mean(carried)),
            "repeats_per_epoch": float(np.mean(repeats)), "carry_lost": lost, "plan_s": time.perf_counter() - t0}


def bench(world: int, total: int, epochs: int, seed: int) -> list[dict]:
    manifest = long_tailed_manifest(total, seed)
    recipe = recipe_stages()
    rows = []
    for st in recipe + long_tail_stages(recipe):
        rows.append({"stage": st["name"], "buckets": len(st["buckets"]), "token_budget": st["token_budget"],
                     "attention_aware": st["attention_aware"],
                     "samples": sum(manifest["buckets"][b]["samples"] for b in st["buckets"]),
                     **{mode: stage_epochs(manifest, st, world=world, epochs=epochs, seed=seed, carry=carry)
                        for mode, carry in (("carry", True), ("standalone", False))}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=8, help="consecutive epochs planned per stage (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = bench(args.world, args.samples, args.epochs, args.seed)
    print(f"{args.world} ranks, {args.samples:,} samples in 48 buckets, epochs 0-{args.epochs - 1}, seed {args.seed}; "
          "each cell: with carry / without (the standalone epoch, the planner before)")
    print("| stage | budget | samples | steps / epoch | utilization (worst epoch) | smallest step (of its full "
          "batch) | steps >= 90 % of the full batch | left out / epoch | left out twice in a row | carried / epoch "
          "| carried-in also trained for their epoch / epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, s = r["carry"], r["standalone"]
        mode = " (attention-aware)" if r["attention_aware"] else ""
        print(f"| {r['stage']} ({r['buckets']} buckets){mode} | {r['token_budget']:,} | {r['samples']:,} | "
              f"{c['steps_per_epoch']:,.0f} / {s['steps_per_epoch']:,.0f} | "
              f"{c['utilization_min']:.2%} / {s['utilization_min']:.2%} | "
              f"{c['smallest_step_share']:.0%} / {s['smallest_step_share']:.0%} | "
              f"{c['full_share']:.1%} / {s['full_share']:.1%} | "
              f"{c['left_out_per_epoch']:,.0f} / {s['left_out_per_epoch']:,.0f} | "
              f"{c['left_out_twice_in_a_row']:,} / {s['left_out_twice_in_a_row']:,} | "
              f"{c['carried_per_epoch']:,.0f} / - | {c['repeats_per_epoch']:,.0f} / - |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
