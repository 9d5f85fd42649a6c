"""The project's W&B workspace as code: `motif-wandb-workspace --entity E --project P`.

Builds a `wandb_workspaces` Workspace whose panels plot the keys the trainer logs, taken from
`motif_train.metric_keys` (the one list `metrics.py` logs with), in eight sections:

    losses       total, denoise, REPA, loss by σ quartile, grad norm
    throughput   MFU, tokens/s, samples/s, data wait (fraction of step time), s/step measured and predicted,
                 the measured step time's error to the prediction, teacher FLOPs share
    memory       peak GiB per window
    schedule     LR, curriculum stage, step within the stage, ETA of the stage and of the run
    checkpoint   seconds each save blocked the loop
    data health  skipped (corrupt) samples, skipped (non-finite) steps
    validation   a media panel of the validation videos, by step
    evaluation   the held-out validation loss per stage (EMA), per task, by σ bin of each stage's first
                 bucket, and motif-eval's video metrics, over the training step (`eval/step`)

Building needs no network: `--dry-run` prints the workspace's spec JSON (what `save` would upload).
`--save` uploads it (a new saved view of the project) and needs the network and a W&B API key
($WANDB_API_KEY or `wandb login`); without them it exits non-zero saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from motif_train import metric_keys as mk

DEFAULT_NAME = "motif-train"
# sampling.EvalConfig's default prompt count (2); the 2B experiment has 3, so the panel asks for a few more:
# a key no run logged shows nothing in a media panel
DEFAULT_PROMPTS = 4


def _line(title: str, keys: list[str] | tuple[str, ...], **kw: Any):
    import wandb_workspaces.reports.v2 as wr

    return wr.LinePlot(title=title, y=list(keys), **kw)


def curriculum_stages(name: str = "motif_4stage") -> list[dict]:
    """The stages (name, buckets) of `configs/curriculum/<name>.yaml`: the evaluation panels' keys."""
    import yaml

    from motif_train.paths import config_dir

    return yaml.safe_load((config_dir() / "curriculum" / f"{name}.yaml").read_text())["stages"]


def evaluation_panels(stages: list[dict], loss_sigmas: int = 8) -> list:
    """Validation loss per stage, per task, per σ bin (first bucket, T2V), and the video metrics."""
    names = [s["name"] for s in stages]
    panels = [_line("validation loss per stage (held-out, EMA)", [mk.val_loss_key(n) for n in names]),
              _line("validation loss per task", [mk.val_loss_key(n, task=t) for n in names for t in ("t2v", "i2v")])]
    for st in stages:
        bucket = "x".join(map(str, st["buckets"][0]))
        keys = [mk.val_loss_key(st["name"], bucket=bucket, task="t2v", sigma=j) for j in range(loss_sigmas)]
        panels.append(_line(f"{st['name']}: validation loss by σ bin ({bucket}, T2V)", keys))
    panels += [_line(f"motif-eval: {m}", [f"eval/{m}"], x=mk.EVAL_STEP) for m in mk.EVAL_METRICS]
    return panels


def build_sections(num_prompts: int = DEFAULT_PROMPTS, i2v: bool = True,
                   num_sigma_buckets: int = mk.NUM_SIGMA_BUCKETS, stages: list[dict] | None = None) -> list:
    """The workspace's sections, every panel key from `metric_keys` (`stages`: the curriculum's, default the
    recipe's)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def section(name: str, panels: list, columns: int = 3) -> Any:
        return ws.Section(name=name, panels=panels, is_open=True,
                          layout_settings=ws.SectionLayoutSettings(columns=columns, rows=2))

    return [
        section("losses", [
            _line("loss (weighted total)", [mk.LOSS_TOTAL]),
            _line("denoise (velocity MSE)", [mk.LOSS_DENOISE]),
            _line("REPA", [mk.LOSS_REPA]),
            _line("loss by σ quartile", mk.sigma_keys(num_sigma_buckets)),
            _line("grad norm", [mk.OPTIM_GRAD_NORM]),
        ]),
        section("throughput", [
            _line("MFU", [mk.PERF_MFU]),
            _line("tokens/s", [mk.PERF_TOKENS_PER_S]),
            _line("samples/s", [mk.PERF_SAMPLES_PER_S]),
            _line("data wait (fraction of step time)", [mk.PERF_DATA_WAIT]),
            _line("s/step (measured, predicted)", [mk.PERF_STEP_TIME, mk.PERF_PREDICTED_STEP_S]),
            _line("step time vs predicted (measured / predicted - 1)", [mk.PERF_STEP_TIME_REL_ERROR]),
            _line("REPA teacher FLOPs share", [mk.PERF_TEACHER_FLOPS_SHARE]),
        ]),
        section("memory", [_line("peak memory (GiB)", [mk.MEM_PEAK_GIB])], columns=2),
        section("schedule", [_line("learning rate", [mk.SCHED_LR]), _line("curriculum stage", [mk.CURRICULUM_STAGE]),
                             _line("step within the stage", [mk.PROGRESS_STAGE_STEP]),
                             _line("ETA (s of step time): stage, run", [mk.PROGRESS_ETA_STAGE_S,
                                                                        mk.PROGRESS_ETA_RUN_S])],
                columns=2),
        section("checkpoint", [_line("checkpoint blocking (s)", [mk.CHECKPOINT_BLOCKING_S])], columns=2),
        section("data health", [_line("skipped samples (corrupt, all ranks)", [mk.DATA_SKIPPED_SAMPLES]),
                                _line("skipped steps (non-finite)", [mk.TRAIN_SKIPPED_STEPS])], columns=2),
        section("validation", [wr.MediaBrowser(title="validation videos", media_keys=mk.video_keys(num_prompts, i2v),
                                               gallery_axis="step", num_columns=min(4, num_prompts + int(i2v)))],
                columns=1),
        section("evaluation", evaluation_panels(stages if stages is not None else curriculum_stages())),
    ]


def build_workspace(entity: str, project: str, name: str = DEFAULT_NAME, *, num_prompts: int = DEFAULT_PROMPTS,
                    i2v: bool = True, num_sigma_buckets: int = mk.NUM_SIGMA_BUCKETS):
    """The workspace (not saved: no network). `num_prompts` / `i2v`: the runs' `eval.prompts` count and
    whether they set `eval.i2v_frame`; `num_sigma_buckets`: `objective.flow.num_sigma_buckets`."""
    import wandb_workspaces.workspaces as ws

    return ws.Workspace(entity=entity, project=project, name=name,
                        sections=build_sections(num_prompts, i2v, num_sigma_buckets),
                        settings=ws.WorkspaceSettings(x_axis="Step"))


def workspace_spec(workspace) -> dict:
    """The workspace's wire model as JSON-able data (what `save` uploads, before it names the view)."""
    return json.loads(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True))


def panel_keys(workspace) -> list[str]:
    """Every metric / media key the workspace's panels plot."""
    keys: list[str] = []
    for section in workspace.sections:
        for panel in section.panels:
            keys += [str(k) for k in getattr(panel, "y", None) or []]
            keys += list(getattr(panel, "media_keys", None) or [])
            for attr in ("metric", "metrics"):  # ScalarChart / BarPlot, should one be added
                v = getattr(panel, attr, None)
                keys += [str(v)] if isinstance(v, str) else [str(x) for x in v or []]
    return keys


def _save_refusal() -> str | None:
    """Why saving cannot work here (no network mode, no API key), or None; never touches the network."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}: saving a workspace needs the network (unset WANDB_MODE or set it to online)"
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if read_netrc_auth(host=host):
            return None
    except Exception:  # noqa: BLE001 - an internal wandb helper; treat as "no key found"
        pass
    return "no W&B API key: set WANDB_API_KEY or run `wandb login` (saving needs the network and a key)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="motif-wandb-workspace", description=__doc__.split("\n\n")[0])
    p.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    p.add_argument("--project", required=True, help="W&B project the runs log to (logger.project)")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"the workspace's (view's) name (default {DEFAULT_NAME})")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS,
                   help=f"validation prompts (eval.prompts) to show videos of (default {DEFAULT_PROMPTS})")
    p.add_argument("--no-i2v", action="store_true", help="no I2V validation video (eval.i2v_frame unset)")
    p.add_argument("--sigma-buckets", type=int, default=mk.NUM_SIGMA_BUCKETS,
                   help="objective.flow.num_sigma_buckets of the runs (default %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the workspace spec JSON; no network")
    mode.add_argument("--save", action="store_true", help="save the workspace to W&B (network + API key)")
    args = p.parse_args(argv)
    if args.prompts < 0 or args.sigma_buckets < 1:
        p.error("--prompts must be >= 0 and --sigma-buckets >= 1")

    workspace = build_workspace(args.entity, args.project, args.name, num_prompts=args.prompts,
                                i2v=not args.no_i2v, num_sigma_buckets=args.sigma_buckets)
    if args.dry_run:
        print(json.dumps(workspace_spec(workspace), indent=2))
        return 0
    if not args.save:
        n = sum(len(s.panels) for s in workspace.sections)
        print(f"built workspace {args.name!r} for {args.entity}/{args.project}: {len(workspace.sections)} sections "
              f"({', '.join(s.name for s in workspace.sections)}), {n} panels; "
              "--dry-run prints its spec, --save uploads it")
        return 0
    refusal = _save_refusal()
    if refusal is not None:
        print(f"motif-wandb-workspace: cannot save: {refusal}", file=sys.stderr)
        return 2
    try:
        workspace.save()
    except Exception as e:  # noqa: BLE001 - network / auth / permission: say so, exit non-zero
        print(f"motif-wandb-workspace: saving to {args.entity}/{args.project} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    print(f"saved: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
