"""docs/scaling.md's tables from `motif-dryrun` reports of the 64xH200 recipe: the tracked memory (analytic
estimate beside it) and the per-stage steps / time / GPU-hours at cp = 1, 2, 4.

`scripts/gen_config_docs.py` calls `render_tracker_block(memory_model(), table)` for the `memory-tracker` block
and `render_stages_block(table)` for `dryrun-stages`. The reports are committed files (docs/bench/
dryrun_2b_64xh200.json, ..._cp2.json, ..._cp4.json), written by

    for cp in 1 2 4; do python -m motif_train.cli.dryrun --no-trainer --usd-per-gpu-hour 3.5 \
        --out docs/bench/dryrun_2b_64xh200$( [ $cp = 1 ] || echo _cp$cp ).json \
        experiment=motif_video_2b_64xh200 parallel.simulate_world=64 parallel.simulate_local=8 parallel.cp=$cp; done

(about a minute each on one CPU core: the 2B model on fake tensors), so the docs check stays fast and
deterministic; rerun them when the model, the recipe, the AC policy or the cost model change.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "bench" / "dryrun_2b_64xh200.json"
CP_REPORTS = {1: REPORT, 2: REPORT.with_name("dryrun_2b_64xh200_cp2.json"),
              4: REPORT.with_name("dryrun_2b_64xh200_cp4.json")}
# Selective AC holds the attention outputs on top of full AC's block inputs: +0.128 MiB per token at 720p
# (docs/bench/ac_cpu.json, the figure docs/scaling.md's AC section quotes).
SELECTIVE_EXTRA_MIB = 0.128


def _slope(model: dict, ac: str) -> float | None:
    """Analytic activation GiB per token for `ac` (None when the analytic model has no figure for it)."""
    return {"none": model["act_noac"], "full": model["act_ac"], "every_k": model["act_every_k"],
            "selective": model["act_ac"] + SELECTIVE_EXTRA_MIB / 1024}.get(ac)


def render_tracker_block(model: dict, table) -> str:
    """Markdown of the tracked table; `model`: gen_config_docs.memory_model(), `table`: its table()."""
    if not REPORT.exists():
        return f"(no dry-run report at `{REPORT.relative_to(ROOT)}`: run the command in `scripts/dryrun_table.py`)"
    rep = json.loads(REPORT.read_text())
    slope = _slope(model, rep["ac"])
    limit = rep["gpu_memory_gib"]
    rows = []
    for r in rep["steps"]:
        m = r["memory_gib"]
        state = m["params"] + m["grads"] + m["optimizer"] + m["ema"] + m["teacher"]
        fixed = model["fixed"] - (model["teacher"] if not m["teacher"] else 0.0)  # teacher only with REPA on
        est = "—" if slope is None else f"{fixed + r['tokens_per_rank'] * slope:.1f}"
        rows.append([f"{r['stage']} `{r['name']}`", f"{r['kind'].upper()} {r['bucket']} × {r['batch']}",
                     f"{r['tokens_per_rank']:,}", f"{state:.1f}", f"{m['comm_buffers']:.2f}", f"{m['activations']:.1f}",
                     f"{m['peak']:.1f} " + ("✅" if m["peak"] <= limit else "❌"), est, f"{r['step_s']:.2f}"])
    lines = [
        f"`motif-dryrun` ({REPORT.relative_to(ROOT).as_posix()}): rank {rep['rank']} of {rep['checks']['world_size']} "
        f"(mesh {' × '.join(map(str, rep['mesh']))}, `parallel.ac={rep['ac']}`, params {rep['param_dtype']}), "
        f"`FSDPMemTracker` peak of one training step on fake tensors + EMA + teacher ({rep['teacher_source']}); "
        f"limit `parallel.gpu_memory_gib` = {limit:g}. Analytic: the estimate below for the same AC mode"
        + (f" (selective = full AC + {SELECTIVE_EXTRA_MIB} MiB / token)" if rep["ac"] == "selective" else "")
        + f". Step time: FLOPs × AC recompute / ({rep['peak_tflops']:.0f} TFLOP/s × MFU {100 * rep['mfu']:.1f} % × "
        "1.293) (`motif_train/distributed/cost.py`).",
        "",
        *table(["stage", "step per rank", "tokens per rank", "params + grads + AdamW + EMA + teacher GiB",
                "all-gather / reduce-scatter GiB", "activations GiB", "tracked peak GiB", "analytic GiB",
                "step time s"], rows),
    ]
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    from motif_train.metrics import fmt_duration

    return fmt_duration(seconds)


def render_stages_block(table) -> str:
    """Markdown of the per-stage calculator table: each cell "cp=1 / cp=2 / cp=4" from the three reports."""
    missing = [p for p in CP_REPORTS.values() if not p.exists()]
    if missing:
        return f"(no dry-run report at `{missing[0].relative_to(ROOT)}`: run the command in `scripts/dryrun_table.py`)"
    reps = {cp: json.loads(p.read_text()) for cp, p in CP_REPORTS.items()}
    cps = list(reps)
    base = reps[1]
    limit = base["gpu_memory_gib"]

    def cell(fn) -> str:
        return " / ".join(fn(reps[cp]) for cp in cps)

    rows = []
    for i, st in enumerate(base["stages"]):
        def peak(rep, i=i):
            r = next(r for r in rep["steps"] if r["stage"] == i)
            return f"{r['memory_gib']['peak']:.1f}" + ("" if r["fits"] else " ❌")

        rows.append([f"{i} `{st['name']}`", f"{st['steps']:,}", cell(peak),
                     cell(lambda rep, i=i: f"{rep['stages'][i]['step_s']:.2f}"),
                     cell(lambda rep, i=i: _dur(rep["stages"][i]["wall_s"])),
                     cell(lambda rep, i=i: f"{rep['stages'][i]['wall_s'] * rep['checks']['world_size'] / 3600:,.0f}")])
    run = base["run"]
    rows.append(["run", f"{run['total_steps']:,}", "", "", cell(lambda rep: _dur(rep["run"]["wall_s"])),
                 cell(lambda rep: f"{rep['run']['gpu_hours']:,.0f}")])
    price = run["usd_per_gpu_hour"]
    names = ", ".join(f"`{p.name}`" for p in CP_REPORTS.values())
    lines = [
        f"`motif-dryrun` at `parallel.cp` = {' / '.join(map(str, cps))} ({names}): rank {base['rank']} of "
        f"{base['checks']['world_size']}, `parallel.ac={base['ac']}`, params {base['param_dtype']}; each stage's "
        f"largest step traced (peak per rank, limit {limit:g} GiB); time from the FLOP model (stage-mean s / step "
        "over its buckets, AC recompute, CP all-to-alls at 450 GB/s).",
        "",
        *table(["stage", "steps", "peak GiB (cp 1 / 2 / 4)", "s / step", "wall-clock", "GPU-hours"], rows),
        "",
        f"Run: {run['checkpoints']} checkpoints of {run['checkpoint_gib']:.1f} GiB (fp32 params + AdamW m, v + EMA), "
        f"{run['checkpoints_kept']} kept (`checkpoint.keep_last`) = {run['storage_gib']:.0f} GiB of bucket storage; "
        f"cost at ${price:g} / GPU-hour (`--usd-per-gpu-hour`, an example price): "
        + cell(lambda rep: f"${rep['run']['usd']:,.0f}") + ".",
    ]
    return "\n".join(lines)
