"""docs/scaling.md's tracked memory table: the `motif-dryrun` report of the 64xH200 recipe, analytic estimate beside it.

`scripts/gen_config_docs.py` calls `render_tracker_block(memory_model())` for the `memory-tracker` block. The
report is a committed file (docs/bench/dryrun_2b_64xh200.json), written by

    python -m motif_train.cli.dryrun --no-trainer --out docs/bench/dryrun_2b_64xh200.json \
        experiment=motif_video_2b_64xh200 parallel.simulate_world=64 parallel.simulate_local=8

(about 5 minutes on 2 CPU cores: the 2B model on fake tensors), so the docs check stays fast and
deterministic; rerun it when the model, the recipe or the AC policy change.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "bench" / "dryrun_2b_64xh200.json"
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
        + f". Step time: FLOPs / ({rep['peak_tflops']:.0f} TFLOP/s × MFU {100 * rep['mfu']:.1f} %).",
        "",
        *table(["stage", "step per rank", "tokens per rank", "params + grads + AdamW + EMA + teacher GiB",
                "all-gather / reduce-scatter GiB", "activations GiB", "tracked peak GiB", "analytic GiB",
                "step time s"], rows),
    ]
    return "\n".join(lines)
