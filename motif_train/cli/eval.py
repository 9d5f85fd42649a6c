"""`motif-eval`: score a run's checkpoints off the training path, on its own device.

    motif-eval --run-dir runs/tiny_cpu                        # every complete checkpoint not yet scored
    motif-eval --run-dir runs/tiny_cpu --checkpoint runs/tiny_cpu/checkpoints/step_00000012
    motif-eval --run-dir /data/runs/motif_video_2b_64xh200 --watch --device cuda   # beside a live run

Per checkpoint (its EMA weights, `--weights raw` for the raw ones): the held-out validation loss of every
curriculum stage (`evaluation/val_loss.py`, the function the trainer's `eval.loss_every` calls), and, when
the run has validation prompts and the encoders root has a metric encoder (`<encoders.root>/clip`), the
validation videos sampled as the trainer samples them and scored (`evaluation/video_metrics.py`). One line
per checkpoint goes to `<run_dir>/eval.jsonl` (`evaluation/ledger.py`: each checkpoint exactly once, a
killed sidecar resumes without duplicates or gaps, a checkpoint pruned while scored is reported), to the
run's W&B run (resumed by the id in `<run_dir>/wandb_id.txt`, x-axis `eval/step` = the training step) and
to `<run_dir>/eval.png` (the curves). The trainer is never waited on: it only writes checkpoints.
`--watch` polls for new `COMPLETE` checkpoints until the run's last step is scored (or forever with
`--forever`). Overrides (`key=value`) apply to the run's saved config, e.g. `eval.loss_sigmas=4`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from motif_train import metric_keys as mk
from motif_train.evaluation.ledger import SCORED, Ledger, SidecarLock, score_pending, watch

EXIT_ERROR = 2


def load_run_config(run_dir: Path, overrides: list[str]):
    """The run's saved `config.yaml` on the typed schema, with `key=value` overrides (an unknown key fails)."""
    from omegaconf import OmegaConf

    from motif_train.cli.train import to_train_config
    from motif_train.config import TrainConfig

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run-dir must be a motif-train run dir")
    saved = OmegaConf.load(path)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved, OmegaConf.from_dotlist(overrides))
    return to_train_config(cfg)


class Scorer:
    """Scores one checkpoint: validation loss per stage (+ video metrics). Built once per sidecar."""

    def __init__(self, cfg, run_dir: Path, *, device: str, weights: str, videos: bool | None) -> None:
        from motif_train.objectives import DiffusionObjective, ObjectiveConfig

        self.cfg, self.run_dir, self.device, self.weights = cfg, run_dir, torch.device(device), weights
        data = cfg.data
        get = data.get if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
        self.text_pad_to = get("text_pad_to", None) or (64, 128, 256, 512)
        root = get("root", None)
        self.reader = None
        if root is not None:
            from motif_train.data.heldout import HeldOutReader

            reader = HeldOutReader(root, text_pad_to=self.text_pad_to)
            self.reader = reader if reader.num_samples else None
        obj = cfg.objective
        # the validation loss has no text dropout (and so needs no empty-prompt embedding)
        cond = dataclasses.replace(obj.conditioning, text_dropout=0.0)
        self.objective = DiffusionObjective(ObjectiveConfig(flow=obj.flow, conditioning=cond,
                                                            repa=obj.repa, seed=cfg.train.seed),
                                            text_pad_to=list(self.text_pad_to))
        enc = Path(cfg.encoders.root) if cfg.encoders.root else None
        can_video = bool(cfg.eval.prompts) and enc is not None and (enc / "clip" / "config.json").is_file()
        self.videos = can_video if videos is None else videos
        if self.videos and not can_video:
            raise FileNotFoundError(f"--videos: needs eval.prompts and a metric encoder at {enc}/clip "
                                    "(build_tiny_encoders(..., metric_encoder=True) for tiny runs)")
        self._requests = None

    def __call__(self, step: int, path: Path) -> dict:
        from motif_train.cli.export import load_checkpoint_model
        from motif_train.evaluation.val_loss import validation_loss

        model = load_checkpoint_model(path, weights=self.weights).to(self.device)
        out: dict = {"weights": self.weights}
        if self.reader is not None:
            for stage in self.cfg.curriculum.stages:
                res = validation_loss(model, self.objective, self.reader, stage, sigmas=self.cfg.eval.loss_sigmas,
                                      device=self.device)
                out.update(res.metrics("val_loss"))
        if self.videos:
            out.update(self.video_metrics(model))
        return out

    def video_metrics(self, model) -> dict:
        from motif_train.evaluation.video_metrics import VideoMetrics, heldout_reference_features, score_validation
        from motif_train.sampling import build_requests, generate

        ev = self.cfg.eval
        if self._requests is None:
            self._requests = build_requests(ev, self.cfg.encoders.root, self.device,
                                            cache_dir=self.run_dir / "samples")
            self._metrics = VideoMetrics(self.cfg.encoders.root, self.device)
            teacher = Path(self.cfg.encoders.root) / "teacher" / "config.json"
            self._reference = (heldout_reference_features(self._metrics, self.reader)
                               if self.reader is not None and teacher.is_file() else None)
        items, negative, vae = self._requests
        with torch.no_grad():
            videos = generate(model, items, negative, vae, ev, device=self.device, rank=0, world_size=1, shard_size=1)
        return score_validation(self._metrics, videos, ev, self._reference)


def plot(ledger: Ledger, out: Path) -> Path | None:
    """`eval.png`: every `val_loss/<stage>` (and `eval/*` metric) over the training step."""
    rows = [r for r in ledger.lines if r.get("status") == SCORED]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float) and (
        (k.startswith("val_loss/") and k.count("/") == 1) or k.startswith("eval/"))})
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
    for ax, k in zip(axes[:, 0], keys, strict=True):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


class WandbSink:
    """The run's W&B run, resumed by id, with eval keys plotted against `eval/step` (the training step)."""

    def __init__(self, cfg, run_dir: Path) -> None:
        self.run, self.local, self.run_dir = None, None, run_dir
        id_path = run_dir / "wandb_id.txt"
        if not cfg.logger.wandb or cfg.logger.mode == "disabled" or not id_path.is_file():
            return
        import tempfile

        import wandb

        mode = cfg.logger.mode if cfg.logger.mode != "auto" else ("online" if wandb.api.api_key else "offline")
        local = Path(tempfile.gettempdir()) / "motif_eval" / run_dir.name  # W&B's files: local disk, not the bucket
        local.mkdir(parents=True, exist_ok=True)
        self.local = local
        try:
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, id=id_path.read_text().strip(),
                                  resume="allow", dir=str(local), mode=mode, settings=wandb.Settings(silent=True))
            self.run.define_metric(mk.EVAL_STEP)
            for pattern in ("val_loss/*", "eval/*"):
                self.run.define_metric(pattern, step_metric=mk.EVAL_STEP)
        except Exception as e:  # noqa: BLE001 - W&B never stops the scoring
            print(f"motif-eval: W&B off: {type(e).__name__}: {e}", file=sys.stderr)
            self.run = None

    def __call__(self, rec: dict) -> None:
        if self.run is not None and rec.get("status") == SCORED:
            self.run.log({mk.EVAL_STEP: rec["step"], **{k: v for k, v in rec.items() if isinstance(v, int | float)
                                                       and (k.startswith(("val_loss/", "eval/")))}})

    def close(self) -> None:
        """Finish the run and bring its files to `<run_dir>/wandb_eval/` whole (once, at exit: no appends on the
        bucket), so an offline sidecar run can be `wandb sync`ed from there."""
        if self.run is None:
            return
        self.run.finish()
        import shutil

        try:
            shutil.copytree(self.local / "wandb", self.run_dir / "wandb_eval", symlinks=True, dirs_exist_ok=True)
        except OSError as e:
            print(f"motif-eval: W&B files not copied to {self.run_dir / 'wandb_eval'}: {e}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="motif-eval", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run's config.yaml")
    ap.add_argument("--run-dir", required=True, help="the motif-train run dir (config.yaml, checkpoints/)")
    ap.add_argument("--checkpoint", default=None, help="score this checkpoint only (a step dir under the run)")
    ap.add_argument("--watch", action="store_true", help="score new checkpoints as the run writes them")
    ap.add_argument("--forever", action="store_true", help="with --watch: do not stop at the run's last step")
    ap.add_argument("--poll-s", type=float, default=30.0, help="seconds between looks for new checkpoints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema")
    vids = ap.add_mutually_exclusive_group()
    vids.add_argument("--videos", dest="videos", action="store_true", default=None,
                      help="sample + score the validation videos (default: when a metric encoder exists)")
    vids.add_argument("--no-videos", dest="videos", action="store_false")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        cfg = load_run_config(run_dir, args.overrides)
        scorer = Scorer(cfg, run_dir, device=args.device, weights=args.weights, videos=args.videos)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"motif-eval: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    folder = cfg.checkpoint.folder
    total = cfg.train.steps or sum(s.steps for s in cfg.curriculum.stages)
    sink = WandbSink(cfg, run_dir)

    def on_record(rec: dict) -> None:
        vals = {k: round(v, 5) for k, v in rec.items() if k.count("/") == 1 and k.startswith("val_loss/")}
        print(f"motif-eval: step {rec['step']} {rec['status']} {json.dumps(vals)}", flush=True)
        sink(rec)
        plot(ledger, run_dir / "eval.png")

    with SidecarLock(run_dir):
        ledger = Ledger(run_dir)
        if args.checkpoint:
            path = Path(args.checkpoint)
            step = int(path.name.removeprefix("step_"))
            if step not in ledger.steps:
                rec = {"step": step, "checkpoint": path.as_posix(), "status": SCORED, **scorer(step, path)}
                ledger.record(rec)
                on_record(rec)
        elif args.watch:
            def finished() -> bool:
                return not args.forever and total in ledger.steps

            for _ in watch(ledger, scorer, folder=folder, poll_s=args.poll_s, until=finished, on_record=on_record):
                pass
        else:
            score_pending(ledger, scorer, folder=folder, on_record=on_record)
    sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
