"""The training loop. Components are built by their own modules; the loop only wires them:

    data.next_step ─► Batch ─► objective(model) ─► named losses ─► backward ─► clip ─► step
        ─► EMA ─► checkpoint ─► metrics

Host syncs: none inside a micro-step; per step one control all-reduce read once (the NaN guard,
the stop signal, counts); the loss records are reduced and written at log steps
(`motif_train/step_stats.py`, docs/training.md#host-syncs).
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf

from motif_train import metric_keys as mk
from motif_train.checkpoint import CheckpointManager, ModelState, OptimizerState, TensorDictState
from motif_train.config import TrainConfig, uses_shards, validate
from motif_train.data.curriculum import Curriculum
from motif_train.distributed import build_mesh, init_distributed, parallelize_model
from motif_train.distributed.context_parallel import apply_cp, cp_disabled
from motif_train.distributed.cost import recompute_factor
from motif_train.distributed.mesh import build_cp_group, gather_lists
from motif_train.ema import EMA, clean_name
from motif_train.guard import DivergedError, resume_hint, weight_stats, weights_problem
from motif_train.metrics import MetricsLogger, Profiler, ProgressPlan
from motif_train.models import MotifDiT, RoutingConfig, apply_repa_freeze
from motif_train.models.attention_backends import activate_flash_impl, check_backend
from motif_train.models.convert import (
    Release,
    check_tied_copies,
    drop_tied_duplicates,
    load_release_weights,
    open_release,
)
from motif_train.models.flops import latent_shape, num_video_tokens
from motif_train.models.lora import apply_lora, base_state_keys, checkpoint_state, init_lora_weights, is_lora
from motif_train.models.lora import summary as lora_summary
from motif_train.objectives import DiffusionObjective, ObjectiveConfig, ObjectiveOutput, total_loss
from motif_train.objectives.repa import repa_stages
from motif_train.optim import build_lr_scheduler, build_optimizer
from motif_train.step_stats import (
    StepClock,
    StepLog,
    batch_video_tokens,
    control_reduce,
    micro_flops,
    stage_step_flops,
)
from motif_train.utils import stable_seed


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_min, cfg.train.device,
                                     init_timeout_min=cfg.parallel.init_timeout_min, run_dir=cfg.run_dir)
        validate(cfg, world_size=self.dist.world_size, local_world_size=self.dist.local_world_size)
        self.device = self.dist.device
        torch.manual_seed(cfg.train.seed)  # model init and training draws use explicit seeded generators
        self.run_dir = Path(cfg.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        self.mesh = build_mesh(cfg.parallel, self.dist)
        # Context parallelism: the cp consecutive ranks of a group share one data-parallel rank (same
        # samples, same σ / noise / TREAD draws) and each holds 1/cp of every sequence.
        self.cp_group = build_cp_group(cfg.parallel, self.dist)
        self.dp_rank, self.cp_rank = divmod(self.dist.rank, cfg.parallel.cp)
        self.dp_size = self.dist.world_size // cfg.parallel.cp
        self.curriculum = Curriculum(cfg.curriculum)
        self.total_steps = cfg.train.steps or self.curriculum.total_steps
        # REPA runs at some step of the run (a stage with repa, weight > 0, before until_step): else neither the
        # teacher is loaded nor the REPA head trained (frozen: out of the optimizer, the EMA, a LoRA checkpoint)
        self.repa_used = cfg.model.repa.block is not None and any(
            repa_stages(cfg.curriculum.stages, cfg.objective.repa, self.total_steps))
        self.teacher = self.build_teacher()
        self.model, self.parallel_info = self.build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, self.total_steps,
                                            lambda s: self.curriculum.stage_at(s).lr)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema.enabled else None
        self.data = instantiate(cfg.data, text_dim=self.model.config.text_embed_dim,
                                image_dim=self.model.config.image_embed_dim, seed=cfg.train.seed,
                                dp_rank=self.dp_rank, dp_size=self.dp_size,
                                grad_accum=cfg.train.grad_accum)
        self.check_image_tokens()  # before any step: every rank refuses the same dataset alike
        self.empty_text = self.empty_prompt() if cfg.objective.conditioning.text_dropout > 0 else None
        if cfg.objective.conditioning.text_dropout > 0 and self.empty_text is None:
            raise ValueError("objective.conditioning.text_dropout > 0 but neither the data (empty_prompt.npy) nor "
                             "encoders.root provides the empty-prompt embedding")
        obj = cfg.objective
        self.objective = DiffusionObjective(
            ObjectiveConfig(flow=obj.flow, conditioning=obj.conditioning, repa=obj.repa, seed=cfg.train.seed),
            empty_text=self.empty_text, teacher=self.teacher, text_pad_to=getattr(self.data, "text_pad_to", None),
            # compiled sdpa blocks: one graph with the mask, not a second one for unpadded micro-batches
            drop_unpadded_mask=not (self.parallel_info["compile"] and self.model.config.attention_backend == "sdpa"))
        self.checkpointer = CheckpointManager(cfg.checkpoint, self.run_dir, rank=self.dist.rank,
                                              world_size=self.dist.world_size, device=self.device,
                                              timeout=cfg.parallel.timeout)
        self.step = self.samples = self.tokens = self.skipped_steps = self.bad_in_a_row = 0
        self.skipped_samples = 0  # corrupt samples skipped by the data, summed over ranks
        self._save_due = False  # a periodic save deferred by a skip streak, taken at the next good step
        self.stage_idx = -1
        self._stop_signal = 0
        self._val = None
        self._heldout = None  # the held-out reader of eval.loss_every (False: checked, none)
        self.last_window: dict | None = None  # the last logged window (rates, MFU, peak memory)
        self.step_log = StepLog(self.dist.world_size)  # steps not yet reduced / written (on the device)
        self.clock = StepClock(self.device)
        self._last_record: dict | None = None  # the newest step written to metrics.jsonl
        self.teacher_config = getattr(getattr(self.teacher, "model", None), "config", None)
        resumed = self.resume()
        self.metrics = MetricsLogger(cfg.logger, self.run_dir, rank=self.dist.rank, world_size=self.dist.world_size,
                                     device=self.device, run_name=cfg.name,
                                     config=OmegaConf.to_container(OmegaConf.structured(cfg)), resume_step=self.step,
                                     progress=self.progress_plan())
        self.profiler = Profiler(cfg.profile.steps, self.run_dir, self.device, start_step=self.step,
                                 ranks=cfg.profile.ranks)
        self.metrics.log_event(self.step, "start", world_size=self.dist.world_size, total_steps=self.total_steps,
                               resumed_from=str(resumed) if resumed else "none", **self.parallel_info)
        if self.frozen_repa:
            self.metrics.log_event(self.step, "REPA head frozen: no step of the run uses REPA (stage repa, "
                                   f"objective.repa.weight / until_step); {len(self.frozen_repa)} tensors not trained")
        notes = list(getattr(self.data, "startup_notes", []))
        if notes:
            self.metrics.log_event(self.step, "data: " + "; ".join(notes), notes=notes)

    # ---- construction --------------------------------------------------------------------
    def build_teacher(self):
        """The frozen REPA teacher: a plain module on every rank, never sharded or optimized."""
        enc = self.cfg.encoders
        if enc.root is None:
            return None
        from motif_train.objectives.encoders import VJEPA2Teacher, build_tiny_encoders

        root = Path(enc.root)
        if enc.build_tiny and self.dist.is_main and not (root / "teacher").exists():
            build_tiny_encoders(root, seed=self.cfg.train.seed)
        dist.barrier()
        if not self.repa_used:
            return None
        teacher = VJEPA2Teacher.from_pretrained(root / "teacher", device=self.device)
        if teacher.hidden_size != self.cfg.model.repa.teacher_dim:
            raise ValueError(f"model.repa.teacher_dim={self.cfg.model.repa.teacher_dim} but the teacher in "
                             f"{root / 'teacher'} has hidden size {teacher.hidden_size}")
        return teacher

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The CFG-dropout embedding: the dataset's `empty_prompt.npy` when it has one, else encoded
        once with <encoders.root>/text_encoder (trimmed, like the shards' text)."""
        found = self.data.empty_text() if hasattr(self.data, "empty_text") else None
        root = Path(self.cfg.encoders.root) if self.cfg.encoders.root else None
        if found is None and root is not None and (root / "text_encoder").exists():
            from motif_train.objectives.encoders import TextEncoder

            e, m = TextEncoder.from_pretrained(root / "text_encoder", root / "tokenizer").encode([""])
            n = int(m[0].sum())
            found = (e[0, :n], m[0, :n])
        return None if found is None else tuple(t.to(self.device) for t in found)

    def build_model(self) -> tuple[MotifDiT, dict]:
        """Meta-device build -> AC / compile / FSDP2 -> materialise -> init or load weights.
        The full model never exists unsharded on one rank."""
        spec = self.cfg.model
        config = spec.dit_config()
        # The release's config.json must be model.*'s (refused naming each key), checked before any work.
        release = open_release(spec.init_from, expect=config) if spec.init_from else None
        config.routing = RoutingConfig(ratio=0.0)  # the curriculum sets the route per stage
        check_backend(config.attention_backend, config.flash_impl, self.device)  # before any GPU work
        activate_flash_impl(config.flash_impl)
        with torch.device("meta"):
            model = MotifDiT(config)
        if spec.lora.enabled:  # adapters first: compile / AC / FSDP2 wrap and shard them with their base
            apply_lora(model, spec.lora)
        self.frozen_repa = apply_repa_freeze(model, used=self.repa_used)  # the dry run does the same
        info = parallelize_model(model, self.cfg.parallel, self.mesh, self.device)
        cp = apply_cp(model, self.cp_group)
        info["cp"] = cp.size if cp is not None else 1  # ranks the model's sequence is really split over
        model.to_empty(device=self.device)
        with torch.no_grad():
            model.init_weights(self.cfg.train.seed)  # also the REPA head's init when fine-tuning
            if spec.lora.enabled:
                init_lora_weights(model, self.cfg.train.seed)  # B = 0: the model starts equal to its base
                info["lora"] = lora_summary(model)
        if release is not None:
            self.load_pretrained(model, release)
        return model.train(), info

    def load_pretrained(self, model: MotifDiT, release: Release) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        folder = release.folder
        state = load_release_weights(release)  # safetensors, memory-mapped on every rank
        if model.config.shared_kv:
            check_tied_copies(state, model.config)
        state = drop_tied_duplicates(state, model.config)
        if is_lora(model):
            state = base_state_keys(model, state)  # X.weight -> X.base_layer.weight for every adapted X
        keys = {clean_name(n) for n, _ in model.named_parameters()}
        missing = [k for k in keys - set(state) if not k.startswith("repa_projector.") and ".lora_" not in k]
        unexpected = set(state) - keys
        if missing or unexpected:
            raise ValueError(f"model.init_from={folder}: weights do not fit model.* (missing {sorted(missing)[:6]}, "
                             f"unexpected {sorted(unexpected)[:6]}); is the model preset the checkpoint's config?")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def stage_i2v_prob(self, stage) -> float:
        return float(stage.i2v_prob if stage.i2v_prob is not None else self.cfg.objective.conditioning.i2v_prob)

    def check_image_tokens(self) -> None:
        """Refuse, at start-up, a run whose I2V steps would meet video samples without SigLIP tokens: the task of
        a step is the same on every rank (objectives/conditioning.choose_task), so a rank without them cannot
        fall back to T2V (its graph would differ from the others'). Stages with i2v_prob 0 need none."""
        stages, start = [], 1
        for i, st in enumerate(self.curriculum.stages):
            if start <= self.total_steps:  # a stage the run reaches
                stages.append((f"curriculum stage {i} ({st.name!r})", f"curriculum.stages[{i}].i2v_prob",
                               self.stage_i2v_prob(st), st))
            start += st.steps
        video = [(label, key) for label, key, p, st in stages if p > 0 and any(b[0] > 1 for b in st.buckets)]
        if video and self.model.config.image_embed_dim is None:
            raise ValueError(f"{video[0][0]} trains I2V but model.image_embed_dim is null (no image embedder): set "
                             f"{' / '.join(k for _, k in video)}=0 (or objective.conditioning.i2v_prob=0)")
        if hasattr(self.data, "check_image_tokens"):
            self.data.check_image_tokens(stages)

    def progress_plan(self) -> ProgressPlan:
        """The run's steps per stage, as `enter_stage` runs them, and each stage's predicted model FLOPs
        per step (its relative cost), for the progress / ETA keys (`metrics.Progress`,
        docs/training.md#progress-and-eta)."""
        pads = getattr(self.data, "text_pad_to", None)
        text_len = max(pads) if isinstance(pads, list | tuple) and pads else int(pads or 512)
        repa = repa_stages(self.cfg.curriculum.stages, self.cfg.objective.repa, self.total_steps)
        flops = [stage_step_flops(self.model.config, st, dp_size=self.dp_size, planned=uses_shards(self.cfg),
                                  text_len=text_len, repa=on and self.teacher is not None)
                 for st, on in zip(self.curriculum.stages, repa, strict=True)]
        return ProgressPlan.from_curriculum(self.curriculum.ends, self.total_steps, flops)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able train state (the tensors go through DCP, see `checkpoint_states`)."""
        return {"step": self.step, "samples": self.samples, "tokens": self.tokens, "stage": self.stage_idx,
                "skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                "skipped_samples": self.skipped_samples, "data": self.data.state_dict(),
                "scheduler": self.scheduler.state_dict(), "seed": self.cfg.train.seed,
                "world_size": self.dist.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples, self.tokens = state["step"], state["samples"], state["tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        # Always 0 in checkpoints this trainer writes (no save inside a streak); restored for exactness.
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.skipped_samples = state.get("skipped_samples", 0)
        self.data.load_state_dict(state["data"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rebase_lr()

    def rebase_lr(self) -> None:
        """The next step's LR from the CURRENT config: the checkpoint's optimizer / scheduler state
        carry the LR computed (from the old config) at the end of the saved step, and the base LR.
        Only the step count is kept, so a relaunch with a lower `optim.lr` / stage `lr` after a
        divergence takes effect from the first resumed step; with the same config this is the very
        value LambdaLR computes (`base_lr * lambda(last_epoch)`), so exact resume is unchanged."""
        sched, base = self.scheduler, self.cfg.optim.lr
        sched.base_lrs = [base] * len(sched.base_lrs)
        for group, lam in zip(self.optimizer.param_groups, sched.lr_lambdas, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def checkpoint_states(self) -> dict:
        # LoRA: the adapters only (the frozen base is model.init_from's, reloaded on resume)
        model = checkpoint_state(self.model) if is_lora(self.model) else ModelState(self.model)
        states = {"model": model, "optim": OptimizerState(self.model, self.optimizer)}
        if self.ema is not None:
            states["ema"] = TensorDictState(self.ema.shadow)
        return states

    def resume(self) -> Path | None:
        path = self.checkpointer.resolve_resume()
        if path is None:
            return None
        extra = self.checkpointer.load(path, self.checkpoint_states())
        self.load_state_dict(extra)
        return path

    def save(self, *, force_sync: bool = False, final: bool = False) -> bool:
        """Checkpoint now unless the run is in a skip streak (then deferred: False); raises
        `DivergedError` when the weights are non-finite or exploded. Every rank decides alike.
        `final`: the run ends here (signal, end of run), so there is no next step to defer to."""
        if self.cfg.train.dry_run:  # DCP's global plan validation fails under the fake process group
            self.metrics.log_event(self.step, "checkpoint not written: train.dry_run (fake process group)")
            return False
        self.flush_logs()  # metrics.jsonl is published with the checkpoint: every step up to it
        if self.bad_in_a_row > 0:
            self._save_due = not final
            then = ("the newest complete checkpoint stays the last good one" if final
                    else "saving at the next good step")
            self.metrics.log_event(self.step, f"checkpoint not written: inside a skip streak ({self.bad_in_a_row} "
                                   f"non-finite step(s) in a row); {then}", bad_in_a_row=self.bad_in_a_row)
            return False
        self.check_weights()
        blocked = self.checkpointer.save(self.step, self.checkpoint_states(), self.state_dict(), force_sync=force_sync)
        self._save_due = False
        self.metrics.log_event(self.step, "checkpoint", **{mk.CHECKPOINT_BLOCKING_S: blocked})
        self.metrics.sync()  # the run dir's metrics / events files are rewritten here and at exit only
        return True

    def check_weights(self) -> None:
        """One all-reduce of the local shards' max |w| (model + EMA) before a save."""
        tensors = list(self.model.parameters())
        if self.ema is not None:
            tensors += list(self.ema.shadow.values())
        biggest, finite = weight_stats(tensors, self.device)
        problem = weights_problem(biggest, finite, self.cfg.checkpoint.max_abs_weight)
        if problem is not None:
            self.diverged(f"step {self.step}: not saving a checkpoint: {problem}")

    def diverged(self, what: str) -> None:
        """Stop a diverged run (on every rank alike), naming the last good checkpoint."""
        self.flush_logs()  # the steps up to this one are in metrics.jsonl (synced on the error path)
        self.checkpointer.wait()  # a pending save was taken at a good step: mark it, it is the one to go back to
        stage = self.curriculum.stages[max(self.stage_idx, 0)]
        lr_key, lr = ((f"curriculum.stages[{self.stage_idx}].lr", stage.lr) if stage.lr is not None
                      else ("optim.lr", self.cfg.optim.lr))
        raise DivergedError(f"{what}. {resume_hint(self.checkpointer.latest(), lr_key=lr_key, lr=lr)}")

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> list:
        """Sample the fixed prompts (+ the I2V frame) with the EMA weights on every rank (sharded
        model), write mp4s + a PNG grid under <run_dir>/samples/step_XXXXXXXX, log videos to W&B."""
        from motif_train.sampling import build_requests, generate, request_labels, write_outputs

        ev = self.cfg.eval
        if self._val is None:
            self._val = build_requests(ev, self.cfg.encoders.root, self.device, cache_dir=self.run_dir / "samples",
                                       rank=self.dist.rank, world_size=self.dist.world_size)
        items, negative, vae = self._val
        use_ema = ev.ema and self.ema is not None
        self.model.eval()
        try:
            # each rank samples its own prompt over the whole sequence (no CP split while sampling)
            with cp_disabled(self.model), (self.ema.swapped_in() if use_ema else contextlib.nullcontext()):
                videos = generate(self.model, items, negative, vae, ev, device=self.device, rank=self.dist.rank,
                                  world_size=self.dist.world_size, shard_size=self.mesh.shape[-1])
        finally:
            self.model.train()
        if self.dist.is_main:
            out = self.run_dir / "samples" / f"step_{self.step:08d}"
            paths, grid = write_outputs(videos, out, ev.fps, request_labels(ev, [n for n, _ in videos]))
            for name, v in videos:
                self.metrics.log_video(self.step, mk.video_key(name), v.numpy(), ev.fps)
            scores = self.video_scores(videos)
            self.metrics.log_event(self.step, f"validation: {len(paths)} videos, grid {grid}",
                                   weights="ema" if use_ema else "raw", **scores)
        return videos

    def heldout_reader(self):
        """The dataset's held-out samples (data/heldout.py), or None (synthetic data, no held-out samples: noted
        once). The same answer on every rank (one manifest)."""
        if self._heldout is None:
            self._heldout = False
            root = getattr(self.data, "root", None)
            if root is not None:
                from motif_train.data.heldout import HeldOutReader

                reader = HeldOutReader(root, text_pad_to=getattr(self.data, "text_pad_to", (64, 128, 256, 512)))
                if reader.num_samples:
                    self._heldout = reader
            if self._heldout is False:
                self.metrics.log_event(self.step, "validation loss off: the data has no held-out samples (shard "
                                       "data preprocessed with --val-fraction / --val-min-per-bucket)")
        return self._heldout or None

    def validation_loss(self) -> dict[str, float]:
        """The current stage's held-out validation loss (evaluation/val_loss.py) with the EMA weights (and the
        raw ones with eval.loss_raw), logged as `val_loss/...` through a log_event. Collective: every rank
        calls it at the same step, between optimizer steps (no host read inside a micro-step)."""
        from motif_train.evaluation.val_loss import validation_loss

        reader = self.heldout_reader()
        if reader is None:
            return {}
        ev, stage = self.cfg.eval, self.curriculum.stages[self.stage_idx]
        kw = dict(rank=self.dist.rank, world_size=self.dist.world_size, sigmas=ev.loss_sigmas, device=self.device)
        t0 = time.perf_counter()
        values: dict[str, float] = {}
        with cp_disabled(self.model):  # every rank scores its own samples over the whole sequence
            with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
                res = validation_loss(self.model, self.objective, reader, stage, **kw)
            values.update(res.metrics(mk.VAL_LOSS_PREFIX.rstrip("/")))
            if ev.loss_raw and self.ema is not None:
                values.update(validation_loss(self.model, self.objective, reader, stage, **kw)
                              .metrics(mk.VAL_LOSS_RAW_PREFIX.rstrip("/")))
        dt = time.perf_counter() - t0
        if values:
            self.metrics.log_event(self.step, f"validation loss ({stage.name}): {res.stage_loss:.5g} on "
                                   f"{sum(res.samples.values())} held-out samples", weights="ema" if self.ema
                                   is not None else "raw", **values, **{mk.VAL_LOSS_SECONDS: dt})
        return values

    def should_validate_loss(self, step: int, last: bool) -> bool:
        ev = self.cfg.eval
        return bool(ev.loss_every and step % ev.loss_every == 0) or bool(last and ev.loss_at_end)

    def video_scores(self, videos: list) -> dict[str, float]:
        """Rank 0: the validation videos' metrics (evaluation/video_metrics.score_validation, as motif-eval scores
        them) when `<encoders.root>/clip` holds the metric encoder; {} (said once) without one."""
        enc = Path(self.cfg.encoders.root)
        if not (enc / "clip" / "config.json").is_file():
            if getattr(self, "_vmetrics", None) is None:
                self._vmetrics = False
                self.metrics.log_event(self.step, f"validation metrics off: no metric encoder at {enc / 'clip'}")
            return {}
        from motif_train.evaluation.video_metrics import VideoMetrics, heldout_reference_features, score_validation

        if not getattr(self, "_vmetrics", None):
            self._vmetrics = VideoMetrics(enc, self.device)
            reader = self.heldout_reader() if (enc / "teacher" / "config.json").is_file() else None
            self._vref = None if reader is None else heldout_reference_features(self._vmetrics, reader)
        return score_validation(self._vmetrics, videos, self.cfg.eval, self._vref)

    def should_validate(self, step: int, last: bool) -> bool:
        ev = self.cfg.eval
        if not ev.prompts or self.cfg.encoders.root is None:
            return False
        return bool((ev.every and step % ev.every == 0) or (last and ev.at_end))

    # ---- curriculum ----------------------------------------------------------------------
    def enter_stage(self, step: int) -> None:
        idx = self.curriculum.index_at(step)
        if idx == self.stage_idx:
            return
        self.stage_idx = idx
        stage = self.curriculum.stages[idx]
        self.model.set_routing(stage.routing)
        # the predicted s / step uses the stage's AC recompute, as motif-dryrun does (distributed/cost.py)
        tokens = max(num_video_tokens(self.model.config, latent_shape(*b)) for b in stage.buckets)
        self.metrics.recompute = recompute_factor(self.cfg.parallel.ac, tokens, self.cfg.parallel.ac_every)
        obj = self.objective.config
        obj.flow.shift = stage.shift if stage.shift is not None else self.cfg.objective.flow.shift
        obj.conditioning.i2v_prob = self.stage_i2v_prob(stage)
        self.repa_on = stage.repa and self.teacher is not None
        kw = {}
        if getattr(self.data, "takes_stage_hints", False):  # ShardSource: prefetch across the next boundary
            # the last stage runs on to train.steps, which may also end the run mid-curriculum
            last = idx + 1 == len(self.curriculum.stages)
            end = self.total_steps if last else min(self.curriculum.ends[idx], self.total_steps)
            nxt = self.curriculum.stages[idx + 1] if end < self.total_steps else None
            kw = {"steps": end - step + 1,
                  "upcoming": None if nxt is None else (nxt, nxt.repa and self.teacher is not None)}
        self.data.set_stage(stage, teacher=self.repa_on, **kw)
        route = stage.routing
        self.metrics.log_event(step, f"stage {idx} ({stage.name})", **{
            mk.CURRICULUM_STAGE: idx, "repa": int(self.repa_on), "shift": obj.flow.shift,
            "routing": f"{route.start}..{route.end} r={route.ratio}" if route else "off"})

    # ---- one step ------------------------------------------------------------------------
    def generator(self, step: int, micro: int) -> torch.Generator:
        """Every random draw of a micro-step (σ, noise, TREAD ids; the CFG dropout hashes its seed) comes
        from here: a pure function of (seed, step, micro, rank), so a resumed run draws the same numbers."""
        return torch.Generator(self.device).manual_seed(stable_seed(self.cfg.train.seed, step, micro, self.dp_rank))

    def forward_backward(self, batch, step: int, micro: int,
                         weight: float) -> tuple[dict[str, torch.Tensor], list[str], ObjectiveOutput]:
        """One micro-batch; `weight` = its share of this rank's samples (micro-batches may differ in
        size), so the accumulated gradient is the mean over the rank's samples; 0 for padding.
        Returns (detached terms and metrics, the loss-term keys, the objective's output). No
        device->host read: the padding question is answered from the loader's host lengths
        (`Batch.text_lengths`), the copy to the device does not wait for the device's queue."""
        out = self.objective(self.model, batch.to(self.device, non_blocking=True), step=step, micro_step=micro,
                             generator=self.generator(step, micro), repa=self.repa_on)
        loss = total_loss(out.losses, self.objective.config.weights)
        if step in self.cfg.train.debug_nan_steps:
            loss = loss * float("nan")
        (loss * weight).backward()
        terms = {k: v.detach().float() * weight for k, v in out.losses.items()}
        terms["total"] = loss.detach().float() * weight
        return {**terms, **{k: v.float() for k, v in out.metrics.items()}}, list(terms), out

    def train_step(self, batches: list) -> dict:
        """Accumulate over this rank's micro-batches, clip, guard, step. Returns the step's control
        values (host, summed over ranks) and its device-side sums for the step log.

        Every rank runs the same number of micro-batches (the loader pads with `padding=True`
        batches), so the FSDP collectives line up; a padding batch runs forward + backward with
        weight 0 and stays out of the loss terms and the sample / token counts (not the FLOPs:
        the model ran it)."""
        n = len(batches)
        total = sum(len(b) for b in batches if not getattr(b, "padding", False))
        sums: dict[str, torch.Tensor] = {}
        flops = teacher_flops = 0.0
        tokens = 0
        cfg = self.model.config
        for micro, batch in enumerate(batches):
            self.model.set_requires_gradient_sync(micro == n - 1)  # reduce-scatter once per step
            pad = getattr(batch, "padding", False)
            out, loss_keys, fed = self.forward_backward(batch, self.step, micro,
                                                        0.0 if pad or not total else len(batch) / total)
            for k, v in out.items():  # padding adds zeros: same keys on every rank for the reduction
                sums[k] = sums.get(k, 0) + (torch.zeros_like(v) if pad else v)
            fl, tf = micro_flops(cfg, batch, fed, self.teacher_config)  # what this micro-batch ran
            flops, teacher_flops = flops + fl, teacher_flops + tf
            tokens += 0 if pad else batch_video_tokens(cfg, batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        guarded = torch.stack([sums[k] for k in loss_keys] + [grad_norm.float()])
        # The cp ranks of a group read the same samples: one of them counts them. Each ran 1/cp of the
        # model (its FLOPs); the teacher runs whole on every one of them.
        lead = self.cp_rank == 0
        ctrl = control_reduce(~torch.isfinite(guarded).all(), stop_signal=self._stop_signal,
                              skipped=getattr(self.data, "last_skipped_count", 0) if lead else 0,
                              skip_msgs=len(getattr(self.data, "last_skipped", [])) if lead else 0,
                              samples=total if lead else 0, tokens=tokens if lead else 0,
                              flops=flops / self.cfg.parallel.cp, teacher_flops=teacher_flops)
        ok = ctrl.nonfinite == 0  # the same answer on every rank: it is a sum over all of them
        # The LR schedule advances on skipped steps too: it is a function of the global step, like the
        # data position and the curriculum's stage boundaries (docs/training.md).
        if ok:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.metrics.log_event(self.step, "non-finite loss or gradient: step skipped",
                                   grad_norm=grad_norm.item(), skipped=self.skipped_steps)  # a bad step only
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if ok and self.ema is not None:
            self.ema.update(self.step)
        return {"control": ctrl, "sums": sums, "grad_norm": grad_norm, "ok": ok}

    def flush_logs(self) -> list[dict]:
        """Reduce the pending steps (one all-reduce, one read) and write each to metrics.jsonl
        (rank 0) in step order; the console / W&B window closes at its log step as before.
        Collective: every rank calls it at the same steps."""
        records = self.step_log.flush()
        for r in records:
            window = self.metrics.log_step(
                r["step"], losses=r["losses"], grad_norm=r["grad_norm"], lr=r["lr"], samples=r["samples"],
                tokens=r["tokens"], step_time=r["step_time"], data_wait=r["data_wait"], flops=r["flops"],
                teacher_flops=r["teacher_flops"], stage=r["stage"], extra={**r["sigma"], **r["extra"]})
            self.last_window = window or self.last_window
        if records:
            self._last_record = records[-1]
        return records

    def log_skipped_samples(self, n_messages: int) -> None:
        """Every rank's skip messages for this step into events.jsonl (with their rank). Collective
        only on steps where the step's all-reduce counted a message somewhere: a gather to rank 0."""
        if n_messages <= 0:
            return
        per_rank = gather_lists(getattr(self.data, "last_skipped", []) if self.cp_rank == 0 else [])
        for rank, messages in enumerate(per_rank or []):
            for msg in messages:
                self.metrics.log_event(self.step, f"data (rank {rank}): {msg}", rank=rank)

    # ---- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def train(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        # GC (train.gc_every): the start-up objects (modules, parameters, configs) are frozen out of
        # every collection, automatic collection is off, and every rank collects at the same steps,
        # so a collection never stalls one rank while the others wait in a collective.
        every, was_on = self.cfg.train.gc_every, gc.isenabled()
        if every:
            gc.collect()
            gc.freeze()
            gc.disable()
        try:
            with self.profiler:
                self._loop()
        finally:
            if every:
                gc.unfreeze()
                if was_on:
                    gc.enable()

    def _loop(self) -> None:
        stop_at = self.cfg.train.stop_at  # None: not set (validated >= 1 otherwise)
        last = self.total_steps if stop_at is None else min(self.total_steps, stop_at)
        log_every, gc_every = self.cfg.logger.log_every, self.cfg.train.gc_every
        saved_at = self.step
        while self.step < last:
            self.step += 1
            self.enter_stage(self.step)
            start = self.clock.mark()
            t0 = time.perf_counter()
            batches = self.data.next_step(self.step)
            data_wait = time.perf_counter() - t0
            if gc_every and self.step % gc_every == 0:
                gc.collect()  # inside the timed step: its cost shows in step_time
            lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses (the scheduler moves it after)
            result = self.train_step(batches)
            end = self.clock.mark()
            ctrl = result["control"]
            self.samples += ctrl.samples
            self.tokens += ctrl.tokens
            self.skipped_samples += ctrl.skipped
            self.log_skipped_samples(ctrl.skip_msgs)
            self.step_log.add(self.step, result["sums"], result["grad_norm"], (start, end), stage=self.stage_idx,
                              lr=lr, data_wait=data_wait, samples=ctrl.samples, tokens=ctrl.tokens,
                              flops=ctrl.flops, teacher_flops=ctrl.teacher_flops,
                              extra={mk.TRAIN_SKIPPED_STEPS: float(self.skipped_steps),
                                     mk.DATA_SKIPPED_SAMPLES: float(self.skipped_samples)})
            if ctrl.stop_signal:  # never clear the local flag: a signal that lands during the reduce counts next step
                self._stop_signal = ctrl.stop_signal
            log_step = self.step % log_every == 0
            diverging = self.bad_in_a_row >= self.cfg.train.max_bad_steps
            if log_step or self.step == last or diverging:
                self.flush_logs()
            if diverging:  # after logging: the last bad step is recorded
                rec = self._last_record or {}
                self.diverged(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps), last at step "
                              f"{self.step}: loss terms {rec.get('losses')}, grad norm {rec.get('grad_norm')}")
            self.profiler.step(self.step)
            if self.should_validate_loss(self.step, self.step == last):
                self.validation_loss()
            if self.should_validate(self.step, self.step == last):
                self.validate()
            if log_step:
                self.checkpointer.maybe_finalize()  # its gloo all-reduce: at log steps only
            if ctrl.stop_signal:
                self.metrics.log_event(self.step, f"signal {signal.Signals(self._stop_signal).name}: saving and "
                                       "exiting")
                self.save(force_sync=True, final=True)  # in a skip streak: not saved, the last good one stays
                saved_at = self.step  # saved, or deliberately not: no second attempt at the end
                break
            if (self.checkpointer.should_save(self.step) or self._save_due) and self.save():
                saved_at = self.step
        if saved_at != self.step and self.cfg.checkpoint.save_at_end:
            self.save(force_sync=True, final=True)
        self.flush_logs()  # nothing pending after the last step's flush; kept for loops that end early
        self.checkpointer.wait()

    def close(self, error: BaseException | None = None) -> None:
        """End of run. With `error` (this rank failed) it enters no collective: a peer may be dead or
        stuck in another collective, so waiting on the pending save's barrier could hang until the
        timeout. The pending save is abandoned (left without COMPLETE), the error is logged and the
        local metrics are synced to the run dir; the caller then exits non-zero. The steps since the
        last flush (log step, checkpoint) are not written: reducing them would be a collective."""
        if error is not None:
            self.checkpointer.abandon()
            self.metrics.log_event(self.step, f"error: {type(error).__name__}: {error}",
                                   traceback="".join(traceback.format_exception(error))[-4000:])
            self.metrics.close(failed=True)
            return None
        self.checkpointer.wait()
        png = self.metrics.close()
        if self.dist.is_main:
            summary = {"run_dir": str(self.run_dir), "step": self.step, "checkpoint": str(self.checkpointer.latest()),
                       "loss_png": str(png) if png else None,
                       "wandb_dir": str(getattr(self.metrics, "wandb_dir", None))}
            print("run summary: " + json.dumps(summary))
        return None

