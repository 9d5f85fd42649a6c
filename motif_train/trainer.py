"""The training loop. Components are built by their own modules; the loop only wires them:

    data.next_step ─► Batch ─► objective(model) ─► named losses ─► backward ─► clip ─► step
        ─► EMA ─► checkpoint ─► metrics
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf

from motif_train.checkpoint import CheckpointManager, ModelState, OptimizerState, TensorDictState
from motif_train.config import TrainConfig, validate
from motif_train.data.curriculum import Curriculum
from motif_train.distributed import build_mesh, init_distributed, parallelize_model
from motif_train.ema import EMA, clean_name
from motif_train.metrics import MetricsLogger, Profiler
from motif_train.models import MotifDiT, RoutingConfig
from motif_train.models.convert import check_tied_copies, drop_tied_duplicates, load_diffusers_folder
from motif_train.models.flops import model_flops, num_video_tokens
from motif_train.objectives import DiffusionObjective, ObjectiveConfig, total_loss
from motif_train.optim import build_lr_scheduler, build_optimizer
from motif_train.utils import stable_seed


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_min, cfg.train.device)
        validate(cfg, world_size=self.dist.world_size, local_world_size=self.dist.local_world_size)
        self.device = self.dist.device
        torch.manual_seed(cfg.train.seed)  # model init and training draws use explicit seeded generators
        self.run_dir = Path(cfg.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        self.mesh = build_mesh(cfg.parallel, self.dist)
        self.curriculum = Curriculum(cfg.curriculum)
        self.total_steps = cfg.train.steps or self.curriculum.total_steps
        self.teacher = self.build_teacher()
        self.model, self.parallel_info = self.build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, self.total_steps,
                                            lambda s: self.curriculum.stage_at(s).lr)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema.enabled else None
        self.data = instantiate(cfg.data, text_dim=self.model.config.text_embed_dim,
                                image_dim=self.model.config.image_embed_dim, seed=cfg.train.seed,
                                dp_rank=self.dist.rank, dp_size=self.dist.world_size,
                                grad_accum=cfg.train.grad_accum)
        self.empty_text = self.empty_prompt() if cfg.objective.conditioning.text_dropout > 0 else None
        if cfg.objective.conditioning.text_dropout > 0 and self.empty_text is None:
            raise ValueError("objective.conditioning.text_dropout > 0 but neither the data (empty_prompt.npy) nor "
                             "encoders.root provides the empty-prompt embedding")
        obj = cfg.objective
        self.objective = DiffusionObjective(
            ObjectiveConfig(flow=obj.flow, conditioning=obj.conditioning, repa=obj.repa, seed=cfg.train.seed),
            empty_text=self.empty_text, teacher=self.teacher)
        self.checkpointer = CheckpointManager(cfg.checkpoint, self.run_dir, rank=self.dist.rank,
                                              world_size=self.dist.world_size, device=self.device)
        self.step = self.samples = self.tokens = self.skipped_steps = self.bad_in_a_row = 0
        self.stage_idx = -1
        self._stop_signal = 0
        self._val = None
        self.last_window: dict | None = None  # the last logged window (rates, MFU, peak memory)
        resumed = self.resume()
        self.metrics = MetricsLogger(cfg.logger, self.run_dir, rank=self.dist.rank, world_size=self.dist.world_size,
                                     device=self.device, run_name=cfg.name,
                                     config=OmegaConf.to_container(OmegaConf.structured(cfg)), resume_step=self.step)
        self.profiler = Profiler(cfg.profile.steps, self.run_dir, self.device, start_step=self.step)
        self.metrics.log_event(self.step, "start", world_size=self.dist.world_size, total_steps=self.total_steps,
                               resumed_from=str(resumed) if resumed else "none", **self.parallel_info)

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
        if not (any(s.repa for s in self.cfg.curriculum.stages) and self.cfg.objective.repa.weight > 0):
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
        config.routing = RoutingConfig(ratio=0.0)  # the curriculum sets the route per stage
        with torch.device("meta"):
            model = MotifDiT(config)
        info = parallelize_model(model, self.cfg.parallel, self.mesh, self.device)
        model.to_empty(device=self.device)
        with torch.no_grad():
            model.init_weights(self.cfg.train.seed)  # also the REPA head's init when fine-tuning
        if spec.init_from:
            self.load_pretrained(model, spec.init_from)
        return model.train(), info

    def load_pretrained(self, model: MotifDiT, folder: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        _, state = load_diffusers_folder(folder)  # safetensors, memory-mapped on every rank
        if model.config.shared_kv:
            check_tied_copies(state, model.config)
        state = drop_tied_duplicates(state, model.config)
        keys = {clean_name(n) for n, _ in model.named_parameters()}
        missing = [k for k in keys - set(state) if not k.startswith("repa_projector.")]
        unexpected = set(state) - keys
        if missing or unexpected:
            raise ValueError(f"model.init_from={folder}: weights do not fit model.* (missing {sorted(missing)[:6]}, "
                             f"unexpected {sorted(unexpected)[:6]}); is the model preset the checkpoint's config?")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able train state (the tensors go through DCP, see `checkpoint_states`)."""
        return {"step": self.step, "samples": self.samples, "tokens": self.tokens, "stage": self.stage_idx,
                "skipped_steps": self.skipped_steps, "data": self.data.state_dict(),
                "scheduler": self.scheduler.state_dict(), "seed": self.cfg.train.seed,
                "world_size": self.dist.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples, self.tokens = state["step"], state["samples"], state["tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.data.load_state_dict(state["data"])
        self.scheduler.load_state_dict(state["scheduler"])

    def checkpoint_states(self) -> dict:
        states = {"model": ModelState(self.model), "optim": OptimizerState(self.model, self.optimizer)}
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

    def save(self, *, force_sync: bool = False) -> None:
        blocked = self.checkpointer.save(self.step, self.checkpoint_states(), self.state_dict(), force_sync=force_sync)
        self.metrics.log_event(self.step, "checkpoint", **{"checkpoint/blocking_s": blocked})

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> list:
        """Sample the fixed prompts (+ the I2V frame) with the EMA weights on every rank (sharded
        model), write mp4s + a PNG grid under <run_dir>/samples/step_XXXXXXXX, log videos to W&B."""
        from motif_train.sampling import build_requests, generate, write_outputs

        ev = self.cfg.eval
        if self._val is None:
            self._val = build_requests(ev, self.cfg.encoders.root, self.device)
        items, negative, vae = self._val
        use_ema = ev.ema and self.ema is not None
        self.model.eval()
        try:
            if use_ema:
                with self.ema.swapped_in():
                    videos = generate(self.model, items, negative, vae, ev, device=self.device, rank=self.dist.rank,
                                      world_size=self.dist.world_size)
            else:
                videos = generate(self.model, items, negative, vae, ev, device=self.device, rank=self.dist.rank,
                                  world_size=self.dist.world_size)
        finally:
            self.model.train()
        if self.dist.is_main:
            out = self.run_dir / "samples" / f"step_{self.step:08d}"
            paths, grid = write_outputs(videos, out, ev.fps)
            for name, v in videos:
                self.metrics.log_video(self.step, f"val/{name}", v.numpy(), ev.fps)
            self.metrics.log_event(self.step, f"validation: {len(paths)} videos, grid {grid}",
                                   weights="ema" if use_ema else "raw")
        return videos

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
        obj = self.objective.config
        obj.flow.shift = stage.shift if stage.shift is not None else self.cfg.objective.flow.shift
        obj.conditioning.i2v_prob = (stage.i2v_prob if stage.i2v_prob is not None
                                     else self.cfg.objective.conditioning.i2v_prob)
        self.repa_on = stage.repa and self.teacher is not None
        self.data.set_stage(stage, teacher=self.repa_on)
        route = stage.routing
        self.metrics.log_event(step, f"stage {idx} ({stage.name})", **{
            "curriculum/stage": idx, "repa": int(self.repa_on), "shift": obj.flow.shift,
            "routing": f"{route.start}..{route.end} r={route.ratio}" if route else "off"})

    # ---- one step ------------------------------------------------------------------------
    def generator(self, step: int, micro: int) -> torch.Generator:
        """Every random draw of a micro-step (σ, noise, dropout, TREAD ids) comes from here: a pure
        function of (seed, step, micro, rank), so a resumed run draws exactly the same numbers."""
        return torch.Generator(self.device).manual_seed(stable_seed(self.cfg.train.seed, step, micro, self.dist.rank))

    def forward_backward(self, batch, step: int, micro: int, weight: float) -> dict[str, torch.Tensor]:
        """One micro-batch; `weight` = its share of this rank's samples (micro-batches may differ in
        size), so the accumulated gradient is the mean over the rank's samples."""
        out = self.objective(self.model, batch.to(self.device), step=step, micro_step=micro,
                             generator=self.generator(step, micro), repa=self.repa_on)
        loss = total_loss(out.losses, self.objective.config.weights)
        if step in self.cfg.train.debug_nan_steps:
            loss = loss * float("nan")
        (loss * weight).backward()
        terms = {k: v.detach().float() * weight for k, v in out.losses.items()}
        terms["total"] = loss.detach().float() * weight
        return {**terms, **{k: v.float() for k, v in out.metrics.items()}}

    def train_step(self, batches: list) -> dict:
        """Accumulate over this rank's micro-batches, reduce, clip, guard, step. Returns logs."""
        n = len(batches)
        total = sum(len(b) for b in batches)
        sums: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(batches):
            self.model.set_requires_gradient_sync(micro == n - 1)  # reduce-scatter once per step
            for k, v in self.forward_backward(batch, self.step, micro, len(batch) / total).items():
                sums[k] = sums.get(k, 0) + v
        flops, tokens = self.step_flops(batches)
        sums.update(_samples=total, _tokens=tokens, _flops=flops)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        logs = self.reduce_logs(sums)
        ok = all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if not k.startswith(("sigma_q", "_"))) and \
            torch.isfinite(grad_norm).item()
        if ok:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.metrics.log_event(self.step, "non-finite loss or gradient: step skipped",
                                   grad_norm=grad_norm.item(), skipped=self.skipped_steps)
            if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
                terms = {k: v for k, v in logs.items() if not k.startswith(("sigma_q", "_"))}
                raise RuntimeError(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps), last at "
                                   f"step {self.step}: loss terms {terms}, grad norm {grad_norm.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if ok and self.ema is not None:
            self.ema.update(self.step)
        return {"logs": logs, "grad_norm": grad_norm.item(), "ok": ok}

    def reduce_logs(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean loss terms over ranks (already sample-weighted within a rank); σ-bucket means from
        exact sums / counts; `_samples`, `_tokens`, `_flops` summed over ranks."""
        keys = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys])
        dist.all_reduce(vec)
        vals = dict(zip(keys, vec.tolist(), strict=True))
        out = {}
        for k, v in vals.items():
            if k.startswith("sigma_q"):
                if k.endswith("_count"):
                    b = k[: -len("_count")]
                    out[b] = vals[f"{b}_sum"] / v if v else float("nan")
                    out[k] = v
                continue
            out[k] = v if k.startswith("_") else v / self.dist.world_size
        return out

    def step_flops(self, batches: list) -> tuple[float, int]:
        """Analytic model FLOPs and video tokens of this rank's share of the step."""
        flops, tokens = 0.0, 0
        cfg = self.model.config
        for b in batches:
            lat = tuple(b.latents.shape[2:])
            img = b.image_embeds.shape[1] if b.image_embeds is not None else 0
            fl = model_flops(cfg, lat, text_len=b.text.shape[1], image_len=img, routing=cfg.routing,
                             repa=self.repa_on)
            flops += fl.total * len(b)
            tokens += num_video_tokens(cfg, lat) * len(b)
        return flops, tokens

    # ---- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def stop_requested(self) -> bool:
        flag = torch.tensor([self._stop_signal], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        self._stop_signal = int(flag.item())
        return self._stop_signal != 0

    def train(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        with self.profiler:
            self._loop()

    def _loop(self) -> None:
        last = min(self.total_steps, self.cfg.train.stop_at or self.total_steps)
        saved_at = self.step
        while self.step < last:
            self.step += 1
            self.enter_stage(self.step)
            t0 = time.perf_counter()
            batches = self.data.next_step(self.step)
            data_wait = time.perf_counter() - t0
            lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses (the scheduler moves it after)
            result = self.train_step(batches)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - t0
            logs = result["logs"]
            n_samples, tokens, flops = int(logs.pop("_samples")), int(logs.pop("_tokens")), logs.pop("_flops")
            self.samples += n_samples
            self.tokens += tokens
            skipped = getattr(self.data, "last_skipped", [])
            for msg in skipped:
                self.metrics.log_event(self.step, f"corrupt sample skipped: {msg}")
            losses = {k: v for k, v in logs.items() if not k.startswith("sigma_q")}
            extra = {k: v for k, v in logs.items() if k.startswith("sigma_q") and not k.endswith(("_sum", "_count"))}
            extra.update({"train/skipped_steps": float(self.skipped_steps),
                          "data/skipped_samples": float(getattr(self.data, "skipped_total", 0))})
            window = self.metrics.log_step(self.step, losses=losses, grad_norm=result["grad_norm"], lr=lr,
                                           samples=n_samples, tokens=tokens, step_time=step_time, data_wait=data_wait,
                                           flops=flops, stage=self.stage_idx, extra=extra)
            self.last_window = window or self.last_window
            self.profiler.step(self.step)
            if self.should_validate(self.step, self.step == last):
                self.validate()
            self.checkpointer.maybe_finalize()
            if self.stop_requested():
                self.metrics.log_event(self.step, f"signal {signal.Signals(self._stop_signal).name}: saving and "
                                       "exiting")
                self.save(force_sync=True)
                saved_at = self.step
                break
            if self.checkpointer.should_save(self.step):
                self.save()
                saved_at = self.step
        if saved_at != self.step and self.cfg.checkpoint.save_at_end:
            self.save(force_sync=True)
        self.checkpointer.wait()

    def close(self) -> None:
        self.checkpointer.wait()
        png = self.metrics.close()
        if self.dist.is_main:
            summary = {"run_dir": str(self.run_dir), "step": self.step, "checkpoint": str(self.checkpointer.latest()),
                       "loss_png": str(png) if png else None,
                       "wandb_dir": str(getattr(self.metrics, "wandb_dir", None))}
            print("run summary: " + json.dumps(summary))
        return None

