"""`motif-dryrun`: the real trainer at a simulated world size in one CPU process, before a GPU is
reserved; it tells whether every stage fits, and how long and how much the run takes.

    motif-dryrun experiment=motif_video_2b_64xh200 parallel.simulate_world=64 parallel.simulate_local=8
    python -m motif_train.cli.dryrun --no-trainer --usd-per-gpu-hour 3.5 --out dry.json experiment=... \
        parallel.simulate_world=64 parallel.simulate_local=8 parallel.cp=2

The phases, the memory and the cost models live in `motif_train.dryrun` (and `distributed.`
`memory_model` / `cost`); this module parses, renders and writes the JSON report (`--out`, default
`<run_dir>/dryrun.json`). Exit codes: 0 fits; 1 a stage's peak exceeds `parallel.gpu_memory_gib`
(the message names the stage and what the dry run found would fit); 2 a config / mesh / plan error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from motif_train.config import TrainConfig
from motif_train.dryrun import DryRunError, run
from motif_train.metrics import fmt_duration

EXIT_OOM, EXIT_CONFIG = 1, 2


def _money(x: float | None) -> str:
    return "—" if x is None else f"${x:,.0f}"


def render(report: dict, console) -> None:
    from rich.table import Table

    ch = report["checks"]
    console.print(f"dry run: world {ch['world_size']} ({ch['local_world_size']} per node), mesh "
                  f"{dict(zip(report['mesh_dims'], report['mesh'], strict=True))} (FSDP shards over dp_shard x cp), "
                  f"parallel.cp={report['cp']} ({report['dp_world']} data-parallel ranks), rank {report['rank']} "
                  f"(coordinate {report['shard_coordinate']}), parallel.ac={report['ac']}, "
                  f"params {report['param_dtype']}")
    tr = report["trainer"]
    console.print(f"trainer: {'built as rank ' + str(tr['rank']) if tr['built'] else tr['note']}"
                  + (f"; step ran ({tr['step']['skipped_nonfinite']} skipped as non-finite)" if tr.get("step") else "")
                  + (f"; {tr['step_note']}" if tr.get("step_note") else "")
                  + ("; checkpoints are not written in a dry run" if tr["built"] else ""))
    console.print(f"plan: {ch['plan_note']}")
    small = max((r["memory_gib"]["tracker_peak"] for r in report["steps"]), default=0) < 1  # the tiny preset
    scale, unit = (1024, "MiB") if small else (1, "GiB")
    t = Table(title=f"per-rank memory of each stage's largest step ({unit}, FSDPMemTracker peak)")
    cols = ["stage", "step", "video tok/rank", "params", "grads", "optim", "EMA", "teacher", "comm", "act",
            "cp a2a", "peak"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "step") else "right")
    for r in report["steps"]:
        m = r["memory_gib"]
        ok = "✅" if r["fits"] else "❌"
        t.add_row(f"{r['stage']} {r['name']}", f"{r['kind'].upper()} {r['bucket']} x {r['batch']}",
                  f"{r['video_tokens_per_rank']:,}",
                  *(f"{m[k] * scale:.2f}" for k in ("params", "grads", "optimizer", "ema", "teacher", "comm_buffers",
                                                    "activations", "cp_buffers")),
                  f"{m['peak'] * scale:.2f} {ok}")
    t.caption = (f"limit parallel.gpu_memory_gib={report['gpu_memory_gib']:g}; EMA and teacher are added to the "
                 f"tracker's peak; cp a2a: one attention's all-to-all buffers, inside act; teacher: "
                 f"{report['teacher_source']}")
    console.print(t)
    for r in report["steps"]:
        rec = r.get("recommendation")
        if rec is None:
            continue
        if rec["fits"]:
            console.print(f"stage {r['stage']} does not fit; the dry run traced {' '.join(rec['overrides'])}: "
                          f"{rec['peak_gib'] * scale:.2f} {unit} ✅, predicted {rec['step_s']:.2f} s / step "
                          f"(now {rec['step_s_now']:.2f})")
        else:
            tried = ", ".join(f"ac={x['ac']} cp={x['cp']}: {x['peak_gib'] * scale:.2f}" for x in rec["tried"])
            console.print(f"stage {r['stage']} does not fit, nor does any candidate the dry run traced ({tried} "
                          f"{unit}): lower its token_budget / global_batch or add GPUs")
    t = Table(title=f"time: predicted s / step = FLOPs x AC recompute / ({report['peak_tflops']:.0f} TFLOP/s x MFU "
                    f"{report['mfu']:.1%} x 1.293) + CP all-to-alls at NVLink rate")
    for c in ("stage", "steps", "plan steps / epoch", "epochs", "s / step", "wall-clock", "GPU-hours"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    world = ch["world_size"]
    for s in report["stages"]:
        t.add_row(f"{s['stage']} {s['name']}", f"{s['steps']:,}",
                  "—" if s["plan_steps_per_epoch"] is None else f"{s['plan_steps_per_epoch']:,}",
                  "—" if s["epochs"] is None else f"{s['epochs']:.2f}",
                  f"{s['step_s']:.3g}" + ("" if s["comm_traced"] else " *"), fmt_duration(s["wall_s"]),
                  f"{s['wall_s'] * world / 3600:,.1f}")
    run = report["run"]
    t.add_row("run", f"{run['total_steps']:,}", "", "", "", fmt_duration(run["wall_s"]), f"{run['gpu_hours']:,.1f}")
    t.caption = (f"MFU: {report['mfu_source']}; * stage not traced: no CP all-to-all time. Checkpoints: "
                 f"{run['checkpoints']} saves of {run['checkpoint_gib']:.1f} GiB, {run['checkpoints_kept']} kept = "
                 f"{run['storage_gib']:.1f} GiB of bucket storage; cost {_money(run['usd'])}"
                 + (f" at ${run['usd_per_gpu_hour']:g} / GPU-hour" if run["usd_per_gpu_hour"] else
                    " (--usd-per-gpu-hour not given)"))
    console.print(t)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="motif-dryrun", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for motif-train")
    ap.add_argument("--rank", type=int, default=None, help="the rank to build as (default: the last)")
    ap.add_argument("--no-trainer", action="store_true",
                    help="skip building the real Trainer (no data / encoders on this machine); a missing "
                         "manifest then skips the plan instead of failing")
    ap.add_argument("--out", default=None, help="report JSON (default <run_dir>/dryrun.json)")
    ap.add_argument("--stage", type=int, action="append", default=None,
                    help="track only this stage's memory (repeatable; default every stage)")
    ap.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, for the run's cost")
    ap.add_argument("--no-advise", action="store_true",
                    help="do not search a fitting parallel.ac / parallel.cp for a stage that does not fit")
    return ap


def compose(overrides: list[str]) -> TrainConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_train_config(hydra_compose("train", overrides=[*overrides, "train.dry_run=true"]))


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        cfg = compose(args.overrides)
        report = run(cfg, rank=args.rank, trainer=not args.no_trainer, stages=args.stage,
                     usd_per_gpu_hour=args.usd_per_gpu_hour, advise=not args.no_advise)
    except DryRunError as e:
        print(f"motif-dryrun: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 - composition / schema errors: one line, the key is in the message
        if type(e).__module__.startswith(("hydra", "omegaconf")) or isinstance(e, ValueError):
            print(f"motif-dryrun: config error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        raise
    render(report, console)
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "dryrun.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    console.print(f"report: {out}")
    if not report["fits"]:
        print(f"motif-dryrun: out of memory: {report['error']}", file=sys.stderr)
        return EXIT_OOM
    return 0


if __name__ == "__main__":
    sys.exit(main())
