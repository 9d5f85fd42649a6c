"""`motif-dryrun`: the real trainer at a simulated world size in one CPU process, before a GPU is reserved.

    motif-dryrun experiment=motif_video_2b_64xh200 parallel.simulate_world=64 parallel.simulate_local=8
    python -m motif_train.cli.dryrun --no-trainer --out dry.json experiment=... parallel.simulate_world=64

Three phases, each failing with the config key to fix:

1. checks (no tensors): the config's cross-field rules at the simulated world, the mesh degrees, and the
   offline plan of every stage for the simulated ranks (`motif_train.data.plan.replan`, the function
   `motif-plan` calls), so the steps per stage are `motif-plan --world-size <simulate_world>`'s;
2. the real `Trainer`, built as one rank (default the last) on torch's fake process group
   (`FakeStore`, backend "fake": collectives return at once, without data), and one training step when
   the first step is cheap enough for a CPU (the tiny preset; a 2B step is hours on a CPU). DCP saves
   are skipped in this mode (`Trainer.save`): DCP's global plan validation fails under the fake group;
3. per curriculum stage, its largest bucket as a T2V and an I2V step (forward, loss, backward, clipping,
   AdamW step) of the FSDP2-sharded model on fake tensors (`FakeTensorMode`: shapes only, so the full 2B
   model at 720p fits a laptop) with `FSDPMemTracker` counting every tensor that is alive, in the
   configured AC mode and the run's parameter dtype (bf16 on GPU). EMA and the frozen REPA teacher are
   constant resident tensors the tracker does not see: their bytes are added to its peak.

Prints a table and writes JSON (`--out`, default `<run_dir>/dryrun.json`). Exit codes: 0 fits; 1 a stage's
peak exceeds `parallel.gpu_memory_gib` (the message names the stage); 2 a config / mesh / plan error.

What it cannot show: time (the step time is predicted from the FLOP model and a measured MFU), the CUDA
context, NCCL buffers and allocator fragmentation (keep ~10 % headroom), torch.compile's effect on what
AC saves (the tracker runs eager), the REPA teacher's forward activations, and the data loader's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from motif_train.config import TrainConfig, uses_shards, validate
from motif_train.data.curriculum import StageConfig
from motif_train.data.plan import bucket_batch_size, replan
from motif_train.data.shards import bucket_name
from motif_train.distributed.mesh import DistInfo, build_mesh
from motif_train.metrics import DEVICE_PEAK_TFLOPS
from motif_train.models.config import RoutingConfig
from motif_train.models.flops import latent_shape, model_flops, num_video_tokens
from motif_train.objectives.repa import repa_stages

GIB = 2**30
# MFU of a real 2B training step (81x480x832, TREAD 2..23 r=0.5, AC full, compile, AdamW + EMA, bf16 + fp32
# reduce, FSDP2 on one H200): docs/bench/train_gpu.json, row "TREAD 2..23 r=0.5" (docs/benchmarks.md). A
# constant because the wheel ships no docs; tests/unit/test_dryrun.py holds it equal to that file.
MEASURED_MFU = 0.364
MFU_SOURCE = "docs/bench/train_gpu.json 'TREAD 2..23 r=0.5' (2B, 81x480x832, AC=full, compile, 1 H200)"
PEAK_TFLOPS = DEVICE_PEAK_TFLOPS["H200"]  # dense bf16
SIGLIP_TOKENS = (896 // 14) ** 2  # SigLIP so400m tokens of one I2V first frame (shard data)
TEXT_TOKENS = 512  # shard data: captions padded up to the largest data.text_pad_to (the worst case)
VJEPA2_VITL_PARAMS = 0.33e9  # the REPA teacher when <encoders.root>/teacher is absent (V-JEPA 2 ViT-L)
CPU_STEP_FLOPS = 5e12  # a real trainer step above this many FLOPs is skipped (minutes on a 2-core CPU)
EXIT_OOM, EXIT_CONFIG = 1, 2


class DryRunError(Exception):
    """A config, mesh or plan error: one line naming the key, exit code 2."""


# ---------------------------------------------------------------------------------------------- phase 1


def world_of(cfg: TrainConfig) -> tuple[int, int]:
    """(simulated world size, GPUs per node) from `parallel.simulate_world` / `simulate_local`."""
    p = cfg.parallel
    if p.simulate_world is None:
        raise DryRunError("parallel.simulate_world is null: give the world to simulate, e.g. "
                          "parallel.simulate_world=64 parallel.simulate_local=8")
    return p.simulate_world, p.local_world_simulated


def _data(cfg: TrainConfig, key: str, default):
    data = cfg.data
    return data.get(key, default) if isinstance(data, dict) else getattr(data, key, default)


def text_tokens(cfg: TrainConfig) -> int:
    """Text tokens per sample of the worst step: synthetic text_len's max, else the largest pad length."""
    if not uses_shards(cfg):
        pads = _data(cfg, "text_pad_to", None)
        return int(max(pads)) if pads else int(max(_data(cfg, "text_len", [4, 16])))
    pads = _data(cfg, "text_pad_to", None)
    return int(max(pads)) if pads else TEXT_TOKENS


def image_tokens(cfg: TrainConfig) -> int:
    return int(_data(cfg, "image_tokens", 16)) if not uses_shards(cfg) else SIGLIP_TOKENS


def per_rank_batch(cfg: TrainConfig, stage: StageConfig, tokens: int, ref_tokens: int, dp: int) -> int:
    """Samples per rank per optimizer step, as the data source computes it (planner rule for shards)."""
    if uses_shards(cfg):
        return bucket_batch_size(tokens, stage.token_budget, attention_aware=stage.attention_aware,
                                 ref_tokens=ref_tokens)
    return stage.global_batch // dp


def i2v_share(cfg: TrainConfig, stage: StageConfig) -> float:
    return float(stage.i2v_prob if stage.i2v_prob is not None else cfg.objective.conditioning.i2v_prob)


def plan_steps(cfg: TrainConfig, manifest: dict, world: int) -> list[int]:
    """Steps of one epoch per stage for `world` ranks: `replan` with motif-plan's arguments."""
    out = []
    for i, st in enumerate(cfg.curriculum.stages):
        names = [bucket_name(*b) for b in st.buckets]
        try:
            plan, _ = replan(manifest, names, segments=[(0, world)], token_budget=st.token_budget,
                             seed=cfg.train.seed, epoch=0, attention_aware=st.attention_aware)
        except (ValueError, KeyError) as e:
            raise DryRunError(f"curriculum.stages[{i}] ({st.name}): plan for {world} ranks: {e}") from None
        if plan.num_steps == 0:
            raise DryRunError(f"curriculum.stages[{i}] ({st.name}): the plan for {world} ranks has no step (every "
                              f"bucket holds fewer than {world} samples); add data or simulate fewer ranks")
        out.append(plan.num_steps)
    return out


def check(cfg: TrainConfig, *, need_manifest: bool = True) -> dict:
    """Phase 1: config rules, mesh degrees and plan steps at the simulated world; raises DryRunError."""
    world, local = world_of(cfg)
    try:
        validate(cfg, world_size=world, local_world_size=local)
        rep, shard = cfg.parallel.degrees(world, local)
    except ValueError as e:
        raise DryRunError(str(e)) from None
    out = {"world_size": world, "local_world_size": local, "mesh": [rep, shard] if rep > 1 else [shard],
           "mesh_dims": ["dp_replicate", "dp_shard"] if rep > 1 else ["dp_shard"], "plan_steps": None,
           "plan_note": "synthetic data: no plan (global_batch per stage)"}
    if uses_shards(cfg):
        from motif_train.cli.plan import PlanInputError, load_manifest

        root = _data(cfg, "root", None)
        try:
            manifest = load_manifest(root)
        except PlanInputError as e:
            if need_manifest:
                raise DryRunError(f"data.root={root}: {e}; run motif-preprocess first") from None
            out["plan_note"] = f"not checked: {e}"
            return out
        out["plan_steps"] = plan_steps(cfg, manifest, world)
        out["plan_note"] = f"replan(..., segments=[(0, {world})]) per stage, epoch 0, seed {cfg.train.seed}"
    return out


# ---------------------------------------------------------------------------------------------- phase 2


def init_fake_world(world: int, local: int, rank: int) -> DistInfo:
    """The fake process group as `rank` of `world` (env as torchrun would set it, for the Trainer)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world:
        raise DryRunError(f"--rank {rank} is outside the simulated world of {world} ranks")
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local),
                      LOCAL_WORLD_SIZE=str(local))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=rank % local, local_world_size=local,
                    device=torch.device("cpu"))


@contextlib.contextmanager
def fake_world(world: int, local: int, rank: int):
    """`init_fake_world` for the duration of a `with`: afterwards the group is destroyed and the
    torchrun variables are what they were (a later group, preprocessing or webdataset's node split in
    the same process would otherwise read WORLD_SIZE=64)."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    try:
        yield init_fake_world(world, local, rank)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trainer_config(cfg: TrainConfig) -> TrainConfig:
    """The run's config for a CPU build under the fake group: what only a GPU run or a save needs is off."""
    c = copy.deepcopy(cfg)
    c.train.dry_run = True
    c.train.device = "cpu"
    c.train.stop_at = 1
    # flex / varlen cannot run a real step on a CPU; the trainer phase checks the build, mesh and plan, and
    # phase 3 traces the configured kernel's memory on fake tensors (its fake kernels).
    c.model.attention_backend, c.model.flash_impl = "sdpa", None
    c.parallel.compile = False  # a compile of the 2B blocks on a CPU takes minutes and changes no shape
    c.checkpoint.async_mode = "sync"  # async saves create gloo groups, which cannot form over a fake store
    c.logger.wandb = False
    c.eval.every, c.eval.at_end = 0, False
    return c


def first_step_flops(cfg: TrainConfig, dp: int) -> float:
    st = cfg.curriculum.stages[0]
    rows = stage_buckets(cfg, st, dp)
    return max(r["batch"] * r["t2v_flops"] for r in rows)


def run_trainer(cfg: TrainConfig, info: DistInfo, *, step: bool) -> dict:
    """Phase 2: the real Trainer as `info.rank`; one step when `step`. Errors become DryRunError."""
    from motif_train.trainer import Trainer

    try:
        trainer = Trainer(trainer_config(cfg))
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise DryRunError(f"building the trainer as rank {info.rank}: {type(e).__name__}: {e}") from None
    out = {"built": True, "rank": info.rank, "mesh": list(trainer.mesh.shape), "step": None}
    if step:
        trainer.train()  # stop_at=1: one step; the save at the end is skipped (train.dry_run)
        out["step"] = {"steps": trainer.step, "skipped_nonfinite": trainer.skipped_steps,
                       "note": "the fake group moves no data: all-gathered weights are uninitialised, so a "
                               "non-finite loss (a skipped step) is expected"}
    trainer.checkpointer.wait()
    trainer.metrics.close()
    return out


# ---------------------------------------------------------------------------------------------- phase 3


def stage_buckets(cfg: TrainConfig, stage: StageConfig, dp: int) -> list[dict]:
    """Per bucket of `stage`: latent, tokens, per-rank batch, T2V / I2V training FLOPs per sample."""
    dit = cfg.model.dit_config()
    route = stage.routing if stage.routing is not None and stage.routing.enabled else None
    lats = [latent_shape(*b) for b in stage.buckets]
    toks = [num_video_tokens(dit, lat) for lat in lats]
    repa = stage.repa and dit.repa.block is not None and cfg.objective.repa.weight > 0
    txt, img = text_tokens(cfg), image_tokens(cfg)
    rows = []
    for b, lat, n in zip(stage.buckets, lats, toks, strict=True):
        video = lat[0] >= 2  # one latent frame: an image, always T2V
        rows.append(dict(bucket="x".join(map(str, b)), latent=lat, tokens=n, video=video,
                         batch=per_rank_batch(cfg, stage, n, max(toks), dp),
                         t2v_flops=model_flops(dit, lat, text_len=txt, routing=route, repa=repa).total,
                         i2v_flops=model_flops(dit, lat, text_len=txt, image_len=img, routing=route,
                                               repa=repa).total if video else None))
    return rows


def repa_on(cfg: TrainConfig) -> list[bool]:
    """Per stage, whether REPA runs in it, as the trainer decides (a head, stage repa, weight, until_step)."""
    steps = cfg.train.steps or sum(s.steps for s in cfg.curriculum.stages)
    head = cfg.model.repa.block is not None
    return [head and on for on in repa_stages(cfg.curriculum.stages, cfg.objective.repa, steps)]


def teacher_gib(cfg: TrainConfig) -> tuple[float, str]:
    """Resident fp32 bytes of the frozen REPA teacher on every rank (0 when no stage runs REPA)."""
    if not any(repa_on(cfg)):
        return 0.0, "no stage runs REPA"
    folder = Path(cfg.encoders.root) / "teacher" if cfg.encoders.root else None
    if folder is not None and (folder / "config.json").is_file():
        from transformers import VJEPA2Config, VJEPA2Model

        with torch.device("meta"):
            n = sum(p.numel() for p in VJEPA2Model(VJEPA2Config.from_pretrained(folder)).parameters())
        return 4 * n / GIB, f"{folder} ({n / 1e6:.1f} M params, fp32)"
    return 4 * VJEPA2_VITL_PARAMS / GIB, f"assumed V-JEPA 2 ViT-L ({VJEPA2_VITL_PARAMS / 1e9:.2f} B params, fp32)"


class FakeModel:
    """The run's DiT, AC-wrapped and fully_shard-ed on `mesh`, with parameters as fake tensors."""

    def __init__(self, cfg: TrainConfig, mesh) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from motif_train.distributed.parallelize import mixed_precision, parallelize_model
        from motif_train.models import MotifDiT, apply_repa_freeze
        from motif_train.optim import build_optimizer

        config = cfg.model.dit_config()
        config.routing = RoutingConfig(ratio=0.0)
        # FSDPMemTracker has no rule for flex's higher-order op: flex is traced as sdpa, which saves the same
        # (out, logsumexp) per attention. varlen runs its own fake kernel (+ its packed K / V copies).
        self.traced_backend = "sdpa" if config.attention_backend == "flex" else config.attention_backend
        config.attention_backend, config.flash_impl = self.traced_backend, None
        pcfg = dataclasses.replace(cfg.parallel, compile=False)
        # The dtype of the run's device: a dry run stands in for a GPU run unless the run is a CPU one.
        device = torch.device("cpu" if cfg.train.device == "cpu" else "cuda")
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)  # meta storage -> fake in to_empty
        with torch.device("meta"):
            self.model = MotifDiT(config)
        if cfg.model.lora.enabled:  # as the trainer: adapters injected before AC / FSDP2, the base frozen
            from motif_train.models.lora import apply_lora

            apply_lora(self.model, cfg.model.lora)
        apply_repa_freeze(self.model, used=any(repa_on(cfg)))  # as the trainer: an unused head is not trained
        parallelize_model(self.model, pcfg, mesh, torch.device("cpu"), mp=mixed_precision(pcfg, device))
        self.param_dtype = str(mixed_precision(pcfg, device).param_dtype)
        with self.mode:
            self.model.to_empty(device="cpu")
            self.optimizer = build_optimizer(self.model, cfg.optim, torch.device("cpu"))
            for p in self.model.parameters():  # AdamW's moments exist from the first step on: create them now
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.config = config
        self.grad_clip = cfg.optim.grad_clip

    def shards(self) -> list[dict]:
        """Every parameter's global and local (this rank's) shape."""
        return [{"name": n, "global": list(p.shape), "local": list(p.to_local().shape)}
                for n, p in self.model.named_parameters()]

    def local_bytes(self, dtype_bytes: int = 4, *, trainable: bool = False) -> int:
        """This rank's shard of the parameters (`trainable`: only those the optimizer and EMA hold)."""
        return sum(p.to_local().numel() for p in self.model.parameters()
                   if p.requires_grad or not trainable) * dtype_bytes

    def track(self, *, latent, batch: int, text_len: int, image_len: int, routing, repa: bool) -> dict:
        """One training step on fake tensors under FSDPMemTracker; the peak snapshot in GiB by category."""
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        c = self.config
        self.model.set_routing(routing)
        self.model.train()
        from motif_train.models.kernel_reference import cpu_reference_kernels

        # varlen=False: varlen's own fake kernel; flex's CPU-only front-end guard lifted (fake tensors here
        # stand in for a GPU step, where flex has its backward).
        with self.mode, cpu_reference_kernels(varlen=False):
            x = torch.randn(batch, c.in_channels, *latent)  # cat(x_t, cond, mask), fp32 as the objective builds it
            target = torch.randn(batch, c.out_channels, *latent)
            t = torch.rand(batch) * 1000
            txt = torch.randn(batch, text_len, c.text_embed_dim)
            img = torch.randn(batch, image_len, c.image_embed_dim) if image_len else None
            tracker = FSDPMemTracker(self.model, self.optimizer)
            tracker.track_inputs((x, target, t, txt, img))
            with tracker:
                out = self.model(x, t, txt, image_embeds=img, return_repa=repa)
                loss = (out.sample.float() - target).pow(2).mean()
                if repa:
                    tok = out.repa_tokens.float()
                    loss = loss - torch.nn.functional.cosine_similarity(tok, torch.randn_like(tok), dim=-1).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
        by = {getattr(k, "value", k): v / GIB for k, v in snap.items()}
        return {"params": by.get("Sharded Param", 0) + by.get("Unsharded Param", 0) + by.get("Buffer", 0),
                "grads": by.get("Sharded Grad", 0) + by.get("Unsharded Grad", 0),
                "optimizer": by.get("OptState", 0),
                "comm_buffers": by.get("All Gather", 0) + by.get("Reduce Scatter", 0),
                "activations": by.get("Activation", 0) + by.get("Temp", 0) + by.get("Inputs", 0),
                "tracker_peak": by.get("Total", 0)}


def track_stages(cfg: TrainConfig, fake: FakeModel, dp: int, *, stages: list[int] | None = None) -> list[dict]:
    """Phase 3: per stage, its largest bucket (tokens per rank) as T2V and, for video with I2V, as I2V."""
    ema = fake.local_bytes(4, trainable=True) / GIB if cfg.ema.enabled else 0.0  # LoRA: the adapters only
    teacher, _ = teacher_gib(cfg)
    txt, img = text_tokens(cfg), image_tokens(cfg)
    out, on = [], repa_on(cfg)
    for i, st in enumerate(cfg.curriculum.stages):
        if stages is not None and i not in stages:
            continue
        rows = stage_buckets(cfg, st, dp)
        worst = max(rows, key=lambda r: r["batch"] * r["tokens"])
        repa = on[i]
        route = st.routing if st.routing is not None else RoutingConfig(ratio=0.0)
        kinds = ["t2v"] + (["i2v"] if worst["video"] and i2v_share(cfg, st) > 0 else [])
        for kind in kinds:
            m = fake.track(latent=worst["latent"], batch=worst["batch"], text_len=txt,
                           image_len=img if kind == "i2v" else 0, routing=route, repa=repa)
            m.update(ema=ema, teacher=teacher if repa else 0.0)
            m["peak"] = m["tracker_peak"] + m["ema"] + m["teacher"]
            flops = worst["batch"] * worst[f"{kind}_flops"]
            out.append(dict(stage=i, name=st.name, kind=kind, bucket=worst["bucket"], batch=worst["batch"],
                            tokens_per_rank=worst["batch"] * (worst["tokens"] + txt + (img if kind == "i2v" else 0)),
                            flops=flops, step_s=flops / (PEAK_TFLOPS * 1e12 * MEASURED_MFU), memory_gib=m))
    return out


def analytic_state_gib(fake: FakeModel, cfg: TrainConfig) -> float:
    """fp32 params, + grads, AdamW m, v (+ EMA) of the trainable ones, this rank's shards: the analytic
    state term (with LoRA the frozen base has no grads, moments or EMA)."""
    trainable = fake.local_bytes(4, trainable=True) * (3 + (1 if cfg.ema.enabled else 0))
    return (fake.local_bytes(4) + trainable) / GIB


# ---------------------------------------------------------------------------------------------- driver


def run(cfg: TrainConfig, *, rank: int | None = None, trainer: bool = True, step: bool | None = None,
        stages: list[int] | None = None) -> dict:
    """All three phases; returns the report (JSON-able; `fits` false and `error` naming the stage when a
    peak exceeds `parallel.gpu_memory_gib`). Raises DryRunError.

    `trainer=False` skips phase 2 (and tolerates a missing manifest); `step=None` runs the trainer step
    when the first step is under `CPU_STEP_FLOPS`; `stages` limits phase 3 to those stage indices."""
    cfg = copy.deepcopy(cfg)
    cfg.train.dry_run = True
    report = {"checks": check(cfg, need_manifest=trainer)}
    world, local = report["checks"]["world_size"], report["checks"]["local_world_size"]
    rep_shard = cfg.parallel.degrees(world, local)
    dp = rep_shard[0] * rep_shard[1]
    rank = world - 1 if rank is None else rank
    enc = cfg.encoders
    if trainer and enc.build_tiny and enc.root and not (Path(enc.root) / "teacher").exists():
        from motif_train.objectives.encoders import build_tiny_encoders

        # What rank 0 does before the trainer's barrier; before the fake group, whose rank (not 0) would
        # make transformers' save_pretrained skip writing the weights.
        build_tiny_encoders(Path(enc.root), seed=cfg.train.seed)
    with fake_world(world, local, rank) as info:
        if trainer:
            flops = first_step_flops(cfg, dp)
            do_step = flops <= CPU_STEP_FLOPS if step is None else step
            report["trainer"] = run_trainer(cfg, info, step=do_step)
            if not do_step:
                report["trainer"]["step_note"] = (f"step 1 is {flops / 1e12:.1f} TFLOP, too slow for a CPU: not run; "
                                                  "phase 3 runs every stage's largest step on fake tensors")
        else:
            report["trainer"] = {"built": False, "rank": rank, "note": "skipped (--no-trainer)"}
        mesh = build_mesh(cfg.parallel, info)
        fake = FakeModel(cfg, mesh)
        teacher, teacher_src = teacher_gib(cfg)
        report.update(rank=rank, mesh=list(mesh.shape), mesh_dims=list(mesh.mesh_dim_names),
                      shard_coordinate=[int(c) for c in mesh.get_coordinate()], ac=cfg.parallel.ac,
                      ac_every=cfg.parallel.ac_every, param_dtype=fake.param_dtype,
                      attention_backend=cfg.model.attention_backend, traced_backend=fake.traced_backend,
                      gpu_memory_gib=cfg.parallel.gpu_memory_gib, mfu=MEASURED_MFU, mfu_source=MFU_SOURCE,
                      peak_tflops=PEAK_TFLOPS, text_tokens=text_tokens(cfg), image_tokens=image_tokens(cfg),
                      teacher_source=teacher_src, state_gib=analytic_state_gib(fake, cfg), shards=fake.shards())
        report["steps"] = track_stages(cfg, fake, dp, stages=stages)
        steps = report["plan_steps"] = report["checks"]["plan_steps"]
        for r in report["steps"]:
            r["plan_steps"] = None if steps is None else steps[r["stage"]]
    over = [r for r in report["steps"] if r["memory_gib"]["peak"] > cfg.parallel.gpu_memory_gib]
    report["fits"] = not over
    if over:
        r = max(over, key=lambda r: r["memory_gib"]["peak"])
        report["error"] = (f"curriculum.stages[{r['stage']}] ({r['name']}): the {r['kind'].upper()} step "
                           f"{r['bucket']} x {r['batch']} peaks at {r['memory_gib']['peak']:.1f} GiB per rank > "
                           f"parallel.gpu_memory_gib={cfg.parallel.gpu_memory_gib:g} with parallel.ac="
                           f"{cfg.parallel.ac}; use parallel.ac=selective or full, or lower "
                           f"curriculum.stages[{r['stage']}].token_budget / global_batch")
    return report


def render(report: dict, console) -> None:
    from rich.table import Table

    ch = report["checks"]
    console.print(f"dry run: world {ch['world_size']} ({ch['local_world_size']} per node), mesh "
                  f"{dict(zip(report['mesh_dims'], report['mesh'], strict=True))}, rank {report['rank']} "
                  f"(coordinate {report['shard_coordinate']}), parallel.ac={report['ac']}, "
                  f"params {report['param_dtype']}")
    tr = report["trainer"]
    console.print(f"trainer: {'built as rank ' + str(tr['rank']) if tr['built'] else tr['note']}"
                  + (f"; step ran ({tr['step']['skipped_nonfinite']} skipped as non-finite)" if tr.get("step") else "")
                  + (f"; {tr['step_note']}" if tr.get("step_note") else "")
                  + ("; checkpoints are not written in a dry run" if tr["built"] else ""))
    console.print(f"plan: {ch['plan_note']}")
    small = max((r["memory_gib"]["peak"] for r in report["steps"]), default=0) < 1  # the tiny preset
    scale, unit = (1024, "MiB") if small else (1, "GiB")
    t = Table(title=f"per-rank memory ({unit}, FSDPMemTracker peak) and predicted step time "
                    f"({report['peak_tflops']:.0f} TFLOP/s x MFU {report['mfu']:.1%})")
    cols = ["stage", "step", "tokens/rank", "params", "grads", "optim", "EMA", "teacher", "comm", "act", "peak",
            "plan steps", "step s"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "step") else "right")
    for r in report["steps"]:
        m = r["memory_gib"]
        ok = "❌" if m["peak"] > report["gpu_memory_gib"] else "✅"
        t.add_row(f"{r['stage']} {r['name']}", f"{r['kind'].upper()} {r['bucket']} x {r['batch']}",
                  f"{r['tokens_per_rank']:,}", *(f"{m[k] * scale:.2f}" for k in ("params", "grads", "optimizer", "ema",
                                                                         "teacher", "comm_buffers", "activations")),
                  f"{m['peak'] * scale:.2f} {ok}", "—" if r["plan_steps"] is None else f"{r['plan_steps']:,}",
                  f"{r['step_s']:.2f}")
    t.caption = (f"limit parallel.gpu_memory_gib={report['gpu_memory_gib']:g}; EMA and teacher are added to the "
                 f"tracker's peak; teacher: {report['teacher_source']}; MFU: {report['mfu_source']}")
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
        report = run(cfg, rank=args.rank, trainer=not args.no_trainer, stages=args.stage)
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
