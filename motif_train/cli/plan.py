"""`motif-plan`: compute the offline bucket-balanced sampling plan of one epoch from a data manifest.

    motif-plan --manifest DATA/manifest.json --buckets 9x64x96 5x96x64 --world-size 64 --token-budget 4096 \
        --seed 0 --epoch 0 --out plan.npz --report report.json
    motif-plan --manifest DATA/manifest.json --stage-from-config configs/curriculum/tiny.yaml --stage 0 ...

Prints a per-bucket table, the utilization next to the naive per-rank bucketing baseline, the share of steps
carrying >= 90 % of their bucket's full per-rank batch (and of the token budget), the smallest step, and the
most video tokens a rank holds in a step (<= --token-budget unless a bucket's single sample is larger: then a
warning names it). --carry plans as the trainer's loader does from two ranks on (``plan.carries``): each
bucket's remainder that would be a short step is carried into the next epoch's plan; the output then says how
many samples this epoch's plan carries in (trained in its first step of the bucket) and carries out (trained
in epoch N+1's plan), how many of the carried-in also train for this epoch (never in one step), and how many
are left out (never the same ones two epochs in a row). Without it (the default, like ``replan`` and the dry
run) it plans the standalone epoch and says so. With
--stage-from-config the buckets, token budget and attention_aware flag come from stage N of the curriculum
YAML (``stages: [{buckets: [[F, H, W], ...], token_budget: ..., attention_aware: ...}, ...]``); an explicit
--buckets / --token-budget on the command line overrides them. --segments START:WORLD ... plans the rest of
an epoch after world-size changes (see ``motif_train.data.plan.replan``). Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from motif_train.data.plan import (
    carries,
    naive_plan_utilization,
    plan_stats,
    replan,
    write_report,
)
from motif_train.data.shards import bucket_name


class PlanInputError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2."""


def _fail(msg: str) -> None:
    print(f"motif-plan: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _parse_segment(s: str) -> tuple[int, int]:
    try:
        start, ws = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"segment {s!r}: expected START_STEP:WORLD_SIZE, e.g. 1000:32") from None
    return start, ws


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():  # a data root
        path = path / "manifest.json"
    if not path.is_file():
        raise PlanInputError(f"manifest {str(path)!r} not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanInputError(f"manifest {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("buckets"), dict) \
            or not isinstance(manifest.get("shards"), list):
        raise PlanInputError(f"manifest {str(path)!r} needs a 'buckets' mapping and a 'shards' list")
    return manifest


def stage_from_config(path: str | Path, stage: int) -> dict:
    """{'buckets': ["FxHxW", ...], 'token_budget': int | None, 'attention_aware': bool} of stage ``stage``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PlanInputError(f"curriculum config {str(path)!r} not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanInputError(f"curriculum config {str(path)!r} is not valid YAML: {e}") from None
    if isinstance(cfg, dict) and "stages" not in cfg and isinstance(cfg.get("curriculum"), dict):
        cfg = cfg["curriculum"]
    stages = cfg.get("stages") if isinstance(cfg, dict) else None
    if not isinstance(stages, list) or not stages:
        raise PlanInputError(f"curriculum config {str(path)!r} has no 'stages' list")
    if not 0 <= stage < len(stages):
        raise PlanInputError(f"--stage {stage} is out of range: {str(path)!r} has {len(stages)} stage(s)")
    st = stages[stage]
    try:
        buckets = [bucket_name(*b) for b in st["buckets"]]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanInputError(f"{str(path)!r} stage {stage}: 'buckets' must be a list of [frames, height, width] "
                             f"({type(e).__name__}: {e})") from None
    tb = st.get("token_budget")
    return {"buckets": buckets, "token_budget": None if tb is None else int(tb),
            "attention_aware": bool(st.get("attention_aware", False))}


def _table(stats: dict, naive: float | None, world_size: int) -> Table:
    t = Table(title=f"motif-plan: world size {world_size}")
    cols = ["bucket", "tokens", "samples", "per-rank batch", "steps", "short steps", "scheduled"]
    cols += ["carried in", "carried out"] if stats["carry"] else []
    width = max((len(n) for n in stats["per_bucket"]), default=6)
    for col in [*cols, "left out", "held out"]:
        if col == "bucket":  # bucket names whole, the numbers' headers wrap instead
            t.add_column(col, justify="left", no_wrap=True, min_width=max(6, width))
        else:
            t.add_column(col, justify="right")
    for name, b in stats["per_bucket"].items():
        carry = [f"{b['carried_in']:,}", f"{b['carried']:,}"] if stats["carry"] else []
        t.add_row(name, f"{b['tokens']:,}", f"{b['samples']:,}", str(b["per_rank_batch"]), f"{b['steps']:,}",
                  f"{b['short_steps']:,}", f"{b['scheduled']:,}", *carry, f"{b['dropped']:,}", f"{b['held_out']:,}")
    t.add_section()
    carry = [f"{stats['carried_in']:,}", f"{stats['carried']:,}"] if stats["carry"] else []
    t.add_row("total", "", f"{stats['total']:,}", "", f"{stats['steps']:,}", f"{stats['short_steps']:,}",
              f"{stats['scheduled']:,}", *carry, f"{stats['dropped']:,}", f"{stats['held_out']:,}")
    naive_txt = "n/a" if naive is None else f"{naive:.1%}"
    t.caption = (f"utilization: ours {stats['utilization']:.2%}  vs naive per-rank bucketing {naive_txt}\n"
                 f"steps >= 90 % of their bucket's full per-rank batch: {stats['batch_full_fraction']:.1%}  "
                 f"smallest step: {stats['batch_share_min']:.0%} of its full batch  steps >= 90 % of the budget: "
                 f"{stats['full_fraction']:.1%}\nmost video tokens on a rank: {stats['max_tokens_per_rank']:,} "
                 f"({stats['max_budget_ratio']:.2f} x token_budget)")
    return t


def heldout_line(stats: dict, manifest: dict) -> str:
    """The stage's held-out (validation) samples: never planned for training (docs/data.md)."""
    split = manifest.get("val_split")
    if not split:
        return "held out for validation: none (a manifest without val_split; re-run motif-preprocess to add one)"
    return (f"held out for validation: {stats['held_out']:,} sample(s) of these buckets, never planned for training "
            f"(val_fraction {split.get('fraction', 0):g}, val_min_per_bucket {split.get('min_per_bucket', 0)}; "
            f"{split.get('samples', 0):,} in the whole manifest)")


def carry_lines(stats: dict, epoch: int) -> list[str]:
    """What the plan carries (with carry) or that it carries nothing (without)."""
    if not stats["carry"]:
        return [f"carry: off (the standalone epoch {epoch}: nothing carried in or out; {stats['dropped']:,} "
                "sample(s) left out). The trainer's loader carries each bucket's short tail into the next epoch "
                "from two ranks on: --carry shows that plan"]
    if epoch > 0:
        first = (f"carried in from epoch {epoch - 1}: {stats['carried_in']:,} sample(s), trained in this plan (the "
                 f"first step of their bucket); {stats['repeats']:,} of them also train for epoch {epoch} here, in "
                 "another step")
    else:
        first = "carried in: nothing (epoch 0)"
    lines = [first, f"carried to epoch {epoch + 1}: {stats['carried']:,} sample(s) (a bucket's tail that would be a "
                    f"short step), trained in its plan; left out: {stats['dropped']:,} (< world size per bucket, "
                    "never the same ones two epochs in a row)"]
    if stats["carry_lost"]:
        lines.append(f"carried in but not trainable after the world-size change: {stats['carry_lost']:,} sample(s)")
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="motif-plan", description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True,
                    help="<data_root>/manifest.json written by preprocessing (or the data root)")
    ap.add_argument("--buckets", nargs="+", default=None, help="stage buckets as FxHxW names")
    ap.add_argument("--stage-from-config", default=None, help="curriculum YAML; buckets/token budget of --stage")
    ap.add_argument("--stage", type=int, default=0, help="stage index in --stage-from-config (default 0)")
    ap.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    ap.add_argument("--segments", nargs="+", type=_parse_segment, default=None,
                    help="world-size changes inside the epoch: 0:64 1000:32 (overrides --world-size)")
    ap.add_argument("--token-budget", type=int, default=None,
                    help="the most video tokens a rank holds in one step (per-rank batch x bucket tokens)")
    ap.add_argument("--attention-aware", action="store_true", help="shrink batches of long clips (N^2 attention)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the plan here (.npz)")
    ap.add_argument("--report", default=None, help="write report.json here (and report.png next to it)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive-bucketing baseline simulation")
    ap.add_argument("--carry", action="store_true",
                    help="plan as the trainer's loader does from 2 ranks on: a bucket's tail that cannot fill a step "
                         "is carried into the next epoch's plan (reported below the table)")
    return ap


def run(args: argparse.Namespace, console: Console) -> dict:
    manifest = load_manifest(args.manifest)
    buckets, token_budget, attention_aware = args.buckets, args.token_budget, args.attention_aware
    if args.stage_from_config:
        st = stage_from_config(args.stage_from_config, args.stage)
        buckets = buckets or st["buckets"]
        token_budget = token_budget if token_budget is not None else st["token_budget"]
        attention_aware = attention_aware or st["attention_aware"]
    if not buckets:
        raise PlanInputError("give --buckets FxHxW ... or --stage-from-config CONFIG --stage N")
    if token_budget is None:
        raise PlanInputError("give --token-budget (the stage in --stage-from-config has no token_budget)")
    if token_budget < 1:
        raise PlanInputError(f"--token-budget {token_budget} must be >= 1")
    segments = args.segments or [(0, args.world_size)]
    if any(ws < 1 for _, ws in segments):
        raise PlanInputError("world sizes must be >= 1")
    known = manifest["buckets"]
    for b in buckets:
        if b not in known:
            raise PlanInputError(f"bucket {b!r} is not in the manifest {args.manifest!r}; "
                                 f"it has: {', '.join(sorted(known)) or '(none)'}")
    try:
        plan, offset = replan(manifest, buckets, segments=segments, token_budget=token_budget, seed=args.seed,
                              epoch=args.epoch, attention_aware=attention_aware,
                              carry=bool(getattr(args, "carry", False)) and carries(segments[0][1]))
        naive = None if args.no_naive else naive_plan_utilization(
            manifest, buckets, world_size=segments[-1][1], token_budget=token_budget, seed=args.seed)
    except (ValueError, KeyError) as e:
        raise PlanInputError(str(e)) from None
    stats = plan_stats(plan, manifest)
    console.print(_table(stats, naive, plan.world_size))
    for line in carry_lines(stats, args.epoch) + [heldout_line(stats, manifest)]:
        console.print(line, markup=False, soft_wrap=True)
    if stats["over_budget"]:
        console.print(f"warning: one sample of {', '.join(stats['over_budget'])} is over the token budget "
                      f"{token_budget:,}: those steps hold {stats['max_tokens_per_rank']:,} video tokens per rank; "
                      "raise token_budget (curriculum.stages[i].token_budget / --token-budget) to the largest "
                      "bucket's tokens to size memory with it", markup=False)
    if offset:
        console.print(f"plan starts at step {offset} of epoch {args.epoch} (after world-size changes {segments})")
    if args.out:
        plan.save(args.out)
        console.print(f"plan: {args.out} ({plan.num_steps} steps)")
    if args.report:
        write_report(plan, manifest, args.report, naive=naive)
        console.print(f"report: {args.report} and {Path(args.report).with_suffix('.png')}")
    return stats


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: rich would cut the table to 80 columns
        console = Console(width=160)
    try:
        run(args, console)
    except PlanInputError as e:
        _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
