"""The dry run: the real trainer at a simulated world size in one CPU process, before a GPU is
reserved, and the run's calculator (memory, steps, time, GPU-hours, cost) per stage.

Three phases, each failing with the config key to fix:

1. checks (no tensors): the config's cross-field rules at the simulated world, the mesh degrees, and the
   offline plan of every stage over the data-parallel ranks (world / parallel.cp; a CP group shares one
   batch), the function `motif-plan` calls, so the plan's steps are `motif-plan --world-size <world/cp>`'s;
2. the real `Trainer`, built as one rank (default the last) on torch's fake process group
   (`FakeStore`, backend "fake": collectives return at once, without data), and one training step when
   the first step is cheap enough for a CPU (the tiny preset; a 2B step is hours on a CPU). DCP saves
   are skipped in this mode (`Trainer.save`): DCP's global plan validation fails under the fake group;
3. per curriculum stage, its largest bucket in its worst task (I2V when the stage trains I2V video: its
   graph is T2V's plus the image tokens) as one training step of the model built through the trainer's
   parallelize path (LoRA, REPA freeze, Ulysses CP, AC, FSDP2) on fake tensors, under `FSDPMemTracker`
   (`distributed/memory_model.py`), in the configured AC mode and the run's parameter dtype. EMA and the
   frozen REPA teacher are constant resident tensors the tracker does not see: their bytes are added.

Then the cost model (`distributed/cost.py`): per stage the steps it runs, the predicted s / step and its
wall-clock; the run's wall-clock, GPU-hours, checkpoints and their storage, and the cost at a price. A stage
that does not fit gets a recommendation: the next `parallel.ac` modes and the CP degrees the heads allow,
cheapest predicted step first, each traced (only for the stages that do not fit) until one fits.

What it cannot show: the CUDA context, NCCL buffers and allocator fragmentation (keep ~10 % headroom),
torch.compile's effect on what AC saves (the tracker runs eager), the REPA teacher's activations, the
padded-text attention path (traced without a text mask) and the data loader's speed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from motif_train.config import TrainConfig, uses_shards, validate
from motif_train.data.curriculum import StageConfig
from motif_train.data.plan import Plan, bucket_batch_size, carries, replan
from motif_train.data.shards import bucket_name
from motif_train.distributed import cost
from motif_train.distributed.memory_model import GIB, FakeModel, analytic_state_gib, teacher_gib
from motif_train.distributed.mesh import DistInfo, build_cp_group, build_mesh
from motif_train.metrics import DEVICE_PEAK_TFLOPS
from motif_train.models.config import RoutingConfig
from motif_train.models.flops import latent_shape, model_flops, num_video_tokens, teacher_forward_flops
from motif_train.objectives.repa import repa_stages

SIGLIP_TOKENS = (896 // 14) ** 2  # SigLIP so400m tokens of one I2V first frame (shard data)
TEXT_TOKENS = 512  # shard data: captions padded up to the largest data.text_pad_to (the worst case)
CPU_STEP_FLOPS = 5e12  # a real trainer step above this many FLOPs is skipped (minutes on a 2-core CPU)
PEAK_TFLOPS = DEVICE_PEAK_TFLOPS[cost.DEFAULT_DEVICE]  # dense bf16


class DryRunError(Exception):
    """A config, mesh or plan error: one line naming the key, exit code 2."""


# ---------------------------------------------------------------------------------------------- inputs


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
    pads = _data(cfg, "text_pad_to", None)
    if pads:
        return int(max(pads))
    return TEXT_TOKENS if uses_shards(cfg) else int(max(_data(cfg, "text_len", [4, 16])))


def image_tokens(cfg: TrainConfig) -> int:
    return int(_data(cfg, "image_tokens", 16)) if not uses_shards(cfg) else SIGLIP_TOKENS


def per_rank_batch(cfg: TrainConfig, stage: StageConfig, tokens: int, ref_tokens: int, dp: int) -> int:
    """Samples per data-parallel rank (one CP group) per optimizer step, as the data source computes it."""
    if uses_shards(cfg):
        return bucket_batch_size(tokens, stage.token_budget, attention_aware=stage.attention_aware,
                                 ref_tokens=ref_tokens)
    return stage.global_batch // dp


def i2v_share(cfg: TrainConfig, stage: StageConfig) -> float:
    return float(stage.i2v_prob if stage.i2v_prob is not None else cfg.objective.conditioning.i2v_prob)


def repa_on(cfg: TrainConfig) -> list[bool]:
    """Per stage, whether REPA runs in it, as the trainer decides (a head, stage repa, weight, until_step)."""
    head = cfg.model.repa.block is not None
    return [head and on for on in repa_stages(cfg.curriculum.stages, cfg.objective.repa, total_steps(cfg))]


def total_steps(cfg: TrainConfig) -> int:
    return cfg.train.steps or sum(s.steps for s in cfg.curriculum.stages)


def stage_steps(cfg: TrainConfig) -> list[int]:
    """Optimizer steps each stage runs (a `train.steps` shorter than the curriculum cuts the last ones)."""
    left, out = total_steps(cfg), []
    for st in cfg.curriculum.stages:
        out.append(max(0, min(st.steps, left)))
        left -= out[-1]
    return out


# ---------------------------------------------------------------------------------------------- phase 1


def stage_plans(cfg: TrainConfig, manifest: dict, dp: int) -> list[Plan]:
    """One epoch's plan per stage over `dp` data-parallel ranks as the trainer's loader builds it (a tail carried
    into the next epoch from two ranks on, `plan.carries`): `motif-plan --carry`'s plan."""
    out = []
    for i, st in enumerate(cfg.curriculum.stages):
        names = [bucket_name(*b) for b in st.buckets]
        try:
            plan, _ = replan(manifest, names, segments=[(0, dp)], token_budget=st.token_budget,
                             seed=cfg.train.seed, epoch=0, attention_aware=st.attention_aware, carry=carries(dp))
        except (ValueError, KeyError) as e:
            raise DryRunError(f"curriculum.stages[{i}] ({st.name}): plan for {dp} data-parallel ranks: {e}") from None
        if plan.num_steps == 0:
            raise DryRunError(f"curriculum.stages[{i}] ({st.name}): the plan for {dp} data-parallel ranks has no "
                              f"step (every bucket holds fewer than {dp} samples); add data or simulate fewer ranks")
        out.append(plan)
    return out


def check(cfg: TrainConfig, *, need_manifest: bool = True) -> tuple[dict, list[Plan] | None]:
    """Phase 1: config rules, mesh degrees and plans at the simulated world; raises DryRunError."""
    world, local = world_of(cfg)
    try:
        validate(cfg, world_size=world, local_world_size=local)
        rep, shard = cfg.parallel.degrees(world, local)
    except ValueError as e:
        raise DryRunError(str(e)) from None
    cp = cfg.parallel.cp
    fsdp = shard * cp  # FSDP shards over dp_shard x cp (distributed/mesh.build_mesh)
    out = {"world_size": world, "local_world_size": local, "cp": cp, "dp_world": world // cp,
           "mesh": [rep, fsdp] if rep > 1 else [fsdp],
           "mesh_dims": ["dp_replicate", "dp_shard x cp"] if rep > 1 else ["dp_shard x cp"],
           "plan_steps": None, "plan_note": "synthetic data: no plan (global_batch per stage)"}
    plans = None
    if uses_shards(cfg):
        from motif_train.cli.plan import PlanInputError, load_manifest

        root = _data(cfg, "root", None)
        try:
            manifest = load_manifest(root)
        except PlanInputError as e:
            if need_manifest:
                raise DryRunError(f"data.root={root}: {e}; run motif-preprocess first") from None
            out["plan_note"] = f"not checked: {e}"
            return out, None
        plans = stage_plans(cfg, manifest, world // cp)
        out["plan_steps"] = [p.num_steps for p in plans]
        out["plan_note"] = (f"replan(..., segments=[(0, {world // cp})]) per stage (the data-parallel ranks: world "
                            f"{world} / parallel.cp {cp}), carry={carries(world // cp)}, epoch 0, "
                            f"seed {cfg.train.seed}")
    return out, plans


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


def stage_buckets(cfg: TrainConfig, stage: StageConfig, dp: int, repa: bool) -> list[dict]:
    """Per bucket of `stage`: latent, tokens, per-rank batch, T2V / I2V training FLOPs per sample
    (the REPA head only when `repa`: the stage runs it)."""
    dit = cfg.model.dit_config()
    route = stage.routing if stage.routing is not None and stage.routing.enabled else None
    lats = [latent_shape(*b) for b in stage.buckets]
    toks = [num_video_tokens(dit, lat) for lat in lats]
    txt, img = text_tokens(cfg), image_tokens(cfg)
    rows = []
    for b, lat, n in zip(stage.buckets, lats, toks, strict=True):
        video = lat[0] >= 2  # one latent frame: an image, always T2V
        rows.append(dict(bucket="x".join(map(str, b)), frames=b[0], latent=lat, tokens=n, video=video,
                         batch=per_rank_batch(cfg, stage, n, max(toks), dp),
                         t2v_flops=model_flops(dit, lat, text_len=txt, routing=route, repa=repa).total,
                         i2v_flops=model_flops(dit, lat, text_len=txt, image_len=img, routing=route,
                                               repa=repa).total if video else None))
    return rows


def teacher_sample_flops(cfg: TrainConfig, frames: int) -> float:
    """The REPA teacher's forward FLOPs for one clip of `frames` (frame 0 duplicated, the teacher's square)."""
    from transformers import VJEPA2Config

    folder = Path(cfg.encoders.root) / "teacher" if cfg.encoders.root else None
    tc = VJEPA2Config.from_pretrained(folder) if folder is not None and (folder / "config.json").is_file() \
        else VJEPA2Config()  # transformers' default: V-JEPA 2 ViT-L, 256 px
    return teacher_forward_flops(tc, frames + 1, int(tc.crop_size))


def stage_time(cfg: TrainConfig, i: int, rows: list[dict], plan: Plan | None, *, cp: int, ac: str,
               repa: bool, comm_per_token: float) -> dict:
    """Predicted mean s / step of stage `i` over its buckets (weighted by the plan's steps with shards, equal
    without), T2V / I2V mixed by the stage's I2V share; its steps and wall-clock."""
    st = cfg.curriculum.stages[i]
    p = i2v_share(cfg, st)
    by = {r["bucket"]: r for r in rows}
    # bucket names are "FxHxW" (data/shards.bucket_name), the rows' keys
    draws = [(by[s.bucket], s.per_rank) for s in plan.steps] if plan is not None else [(r, r["batch"]) for r in rows]
    secs = []
    for r, batch in draws:
        flops = r["t2v_flops"] if not r["video"] else (1 - p) * r["t2v_flops"] + p * r["i2v_flops"]
        if repa and r["video"]:
            flops += teacher_sample_flops(cfg, r["frames"])
        rec = cost.recompute_factor(ac, r["tokens"], cfg.parallel.ac_every)
        secs.append(cost.predicted_step_s(batch * flops / cp, peak_tflops=PEAK_TFLOPS, recompute=rec,
                                          comm_bytes=comm_per_token * batch * r["tokens"]))
    step_s = sum(secs) / len(secs)
    steps = stage_steps(cfg)[i]
    return {"steps": steps, "step_s": step_s, "wall_s": steps * step_s,
            "plan_steps_per_epoch": None if plan is None else plan.num_steps,
            "epochs": None if plan is None else steps / plan.num_steps,
            "weights": "the plan's steps" if plan is not None else "each bucket once (synthetic data)"}


def candidate_config(cfg: TrainConfig, *, ac: str | None = None, cp: int | None = None) -> TrainConfig:
    c = copy.deepcopy(cfg)
    c.parallel = dataclasses.replace(c.parallel, ac=ac or c.parallel.ac, cp=cp or c.parallel.cp)
    return c


class Models:
    """FakeModels by (ac, cp), built once each under the current fake world (a build of the 2B model and its
    optimizer's first step on fake tensors takes seconds)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info, self._built = cfg, info, {}
        self.repa_used = any(repa_on(cfg))

    def get(self, ac: str, cp: int) -> FakeModel:
        if (ac, cp) not in self._built:
            c = candidate_config(self.cfg, ac=ac, cp=cp)
            mesh = build_mesh(c.parallel, self.info)
            self._built[(ac, cp)] = FakeModel(c, mesh, cp_group=build_cp_group(c.parallel, self.info),
                                              repa_used=self.repa_used)
        return self._built[(ac, cp)]


def track_stage(cfg: TrainConfig, models: Models, i: int, *, ac: str, cp: int, dp: int) -> dict:
    """Phase 3 for stage `i`: its largest bucket (tokens per rank) in its worst task, one traced step."""
    st = cfg.curriculum.stages[i]
    on = repa_on(cfg)[i]
    rows = stage_buckets(cfg, st, dp, on)
    worst = max(rows, key=lambda r: r["batch"] * r["tokens"])
    kind = "i2v" if worst["video"] and i2v_share(cfg, st) > 0 else "t2v"
    txt, img = text_tokens(cfg), image_tokens(cfg) if kind == "i2v" else 0
    fake = models.get(ac, cp)
    route = st.routing if st.routing is not None else RoutingConfig(ratio=0.0)
    m = fake.step_peak(latent=worst["latent"], batch=worst["batch"], text_len=txt, image_len=img, routing=route,
                       repa=on)
    ema = fake.local_bytes(4, trainable=True) / GIB if cfg.ema.enabled else 0.0  # LoRA: the adapters only
    m.update(ema=ema, teacher=teacher_gib(cfg.encoders.root, on)[0])
    m["peak"] = m["tracker_peak"] + m["ema"] + m["teacher"]
    # One joint attention's all-to-all buffers (send + receive of q, k, v), bf16 / fp32 as the params: part of
    # the tracker's activations at that moment, shown apart.
    dim = fake.config.num_attention_heads * fake.config.attention_head_dim
    n_local = -(-worst["tokens"] // cp)
    dbytes = 2 if "bfloat16" in fake.param_dtype else 4
    m["cp_buffers"] = 0.0 if cp == 1 else 6 * worst["batch"] * n_local * dim * dbytes / GIB
    comm = m.pop("cp_bytes") * (cp - 1) / cp  # off-rank share of what the collectives received
    flops = worst["batch"] * worst[f"{kind}_flops"] / cp
    return dict(stage=i, name=st.name, kind=kind, bucket=worst["bucket"], batch=worst["batch"], cp=cp, ac=ac,
                video_tokens_per_rank=worst["batch"] * n_local,
                tokens_per_rank=worst["batch"] * (n_local + txt + img), flops=flops,
                comm_bytes=comm, comm_per_token=comm / (worst["batch"] * worst["tokens"]),
                step_s=cost.predicted_step_s(flops, peak_tflops=PEAK_TFLOPS, comm_bytes=comm, recompute=cost.
                                             recompute_factor(ac, worst["tokens"], cfg.parallel.ac_every)),
                memory_gib=m, fits=m["peak"] <= cfg.parallel.gpu_memory_gib)


def candidates(cfg: TrainConfig, world: int, local: int) -> list[tuple[str, int]]:
    """(ac, cp) to try when a stage does not fit: the next AC modes, the CP degrees the heads and a node
    allow, and both, in that order (the caller sorts them by predicted step time)."""
    from motif_train.distributed.context_parallel import check_cp_degree

    p = cfg.parallel
    acs = [p.ac, *cost.AC_ORDER[cost.AC_ORDER.index(p.ac) + 1:]] if p.ac in cost.AC_ORDER else [p.ac]
    cps = []
    for c in range(p.cp, local + 1):
        try:
            check_cp_degree(c, cfg.model.dit_config().num_attention_heads)
            candidate_config(cfg, cp=c).parallel.degrees(world, local)
        except ValueError:
            continue
        cps.append(c)
    return [(a, c) for c in cps for a in acs if (a, c) != (p.ac, p.cp)]


def recommend(cfg: TrainConfig, models: Models, row: dict, *, world: int, local: int) -> dict:
    """For a stage that does not fit: trace the candidates, cheapest predicted step first, until one fits."""
    i, tried = row["stage"], []
    order = []
    for ac, cp in candidates(cfg, world, local):
        dp = world // cp
        st = cfg.curriculum.stages[i]
        rows = stage_buckets(cfg, st, dp, repa_on(cfg)[i])
        worst = max(rows, key=lambda r: r["batch"] * r["tokens"])
        kind = "i2v" if worst["video"] and i2v_share(cfg, st) > 0 else "t2v"
        est = cost.predicted_step_s(worst["batch"] * worst[f"{kind}_flops"] / cp, peak_tflops=PEAK_TFLOPS,
                                    comm_bytes=row["comm_per_token"] * worst["batch"] * worst["tokens"] if cp ==
                                    row["cp"] else 0.0,
                                    recompute=cost.recompute_factor(ac, worst["tokens"], cfg.parallel.ac_every))
        order.append((est, ac, cp))
    for _, ac, cp in sorted(order):
        got = track_stage(candidate_config(cfg, ac=ac, cp=cp), models, i, ac=ac, cp=cp, dp=world // cp)
        tried.append({"ac": ac, "cp": cp, "peak_gib": got["memory_gib"]["peak"], "step_s": got["step_s"],
                      "fits": got["fits"]})
        if got["fits"]:
            return {"fits": True, "ac": ac, "cp": cp, "peak_gib": got["memory_gib"]["peak"],
                    "step_s": got["step_s"], "step_s_now": row["step_s"], "tried": tried,
                    "overrides": [f"parallel.ac={ac}"] * (ac != cfg.parallel.ac)
                    + [f"parallel.cp={cp}"] * (cp != cfg.parallel.cp)}
    return {"fits": False, "tried": tried}


# ---------------------------------------------------------------------------------------------- driver


def run(cfg: TrainConfig, *, rank: int | None = None, trainer: bool = True, step: bool | None = None,
        stages: list[int] | None = None, usd_per_gpu_hour: float | None = None, advise: bool = True) -> dict:
    """All three phases and the cost model; returns the report (JSON-able; `fits` false and `error` naming
    the stage when a peak exceeds `parallel.gpu_memory_gib`). Raises DryRunError.

    `trainer=False` skips phase 2 (and tolerates a missing manifest); `step=None` runs the trainer step
    when the first step is under `CPU_STEP_FLOPS`; `stages` limits phase 3 to those stage indices (time
    is reported for every stage; the CP all-to-all time only for traced ones); `advise`: search a fitting
    (ac, cp) for every stage that does not fit."""
    cfg = copy.deepcopy(cfg)
    cfg.train.dry_run = True
    checks, plans = check(cfg, need_manifest=trainer)
    report = {"checks": checks}
    world, local, cp = checks["world_size"], checks["local_world_size"], cfg.parallel.cp
    dp = world // cp
    rank = world - 1 if rank is None else rank
    enc = cfg.encoders
    if trainer and enc.build_tiny and enc.root and not (Path(enc.root) / "teacher").exists():
        from motif_train.objectives.encoders import build_tiny_encoders

        # What rank 0 does before the trainer's barrier; before the fake group, whose rank (not 0) would
        # make transformers' save_pretrained skip writing the weights.
        build_tiny_encoders(Path(enc.root), seed=cfg.train.seed)
    on = repa_on(cfg)
    with fake_world(world, local, rank) as info:
        if trainer:
            st0 = stage_buckets(cfg, cfg.curriculum.stages[0], dp, on[0])
            flops = max(r["batch"] * r["t2v_flops"] for r in st0) / cp
            do_step = flops <= CPU_STEP_FLOPS if step is None else step
            report["trainer"] = run_trainer(cfg, info, step=do_step)
            if not do_step:
                report["trainer"]["step_note"] = (f"step 1 is {flops / 1e12:.1f} TFLOP, too slow for a CPU: not run; "
                                                  "phase 3 runs every stage's largest step on fake tensors")
        else:
            report["trainer"] = {"built": False, "rank": rank, "note": "skipped (--no-trainer)"}
        models = Models(cfg, info)
        fake = models.get(cfg.parallel.ac, cp)
        mesh = fake.mesh
        teacher, teacher_src = teacher_gib(enc.root, any(on))
        report.update(rank=rank, mesh=list(mesh.shape), mesh_dims=list(mesh.mesh_dim_names), cp=cp, dp_world=dp,
                      shard_coordinate=[int(c) for c in mesh.get_coordinate()], ac=cfg.parallel.ac,
                      ac_every=cfg.parallel.ac_every, param_dtype=fake.param_dtype,
                      attention_backend=cfg.model.attention_backend, traced_backend=fake.traced_backend,
                      gpu_memory_gib=cfg.parallel.gpu_memory_gib, mfu=cost.MEASURED_MFU, mfu_source=cost.MFU_SOURCE,
                      peak_tflops=PEAK_TFLOPS, text_tokens=text_tokens(cfg), image_tokens=image_tokens(cfg),
                      teacher_source=teacher_src, state_gib=analytic_state_gib(fake, cfg.ema.enabled),
                      shards=fake.shards())
        rows = [track_stage(cfg, models, i, ac=cfg.parallel.ac, cp=cp, dp=dp)
                for i in range(len(cfg.curriculum.stages)) if stages is None or i in stages]
        if advise:
            for r in rows:
                if not r["fits"]:
                    r["recommendation"] = recommend(cfg, models, r, world=world, local=local)
        report["steps"] = rows
    traced = {r["stage"]: r for r in rows}
    report["stages"] = []
    for i, st in enumerate(cfg.curriculum.stages):
        comm = traced[i]["comm_per_token"] if i in traced else 0.0
        t = stage_time(cfg, i, stage_buckets(cfg, st, dp, on[i]), None if plans is None else plans[i], cp=cp,
                       ac=cfg.parallel.ac, repa=on[i], comm_per_token=comm)
        report["stages"].append({"stage": i, "name": st.name, "repa": on[i], **t,
                                 "comm_traced": i in traced or cp == 1})
    glob, train = fake.global_numel(), fake.global_numel(trainable=True)
    ck = cfg.checkpoint
    report["run"] = cost.run_totals([s["wall_s"] for s in report["stages"]], world=world,
                                    total_steps=total_steps(cfg), every=ck.every, keep_last=ck.keep_last,
                                    ckpt_bytes=cost.checkpoint_bytes(glob, train, ema=cfg.ema.enabled),
                                    usd_per_gpu_hour=usd_per_gpu_hour)
    report["run"].update(total_steps=total_steps(cfg), params=glob, trainable_params=train)
    over = [r for r in rows if not r["fits"]]
    report["fits"] = not over
    if over:
        r = max(over, key=lambda r: r["memory_gib"]["peak"])
        rec = r.get("recommendation")
        hint = (f"the dry run found {' '.join(rec['overrides'])} fits ({rec['peak_gib']:.1f} GiB, predicted "
                f"{rec['step_s']:.2f} s / step vs {r['step_s']:.2f})" if rec and rec["fits"] else
                "no parallel.ac / parallel.cp the dry run tried fits" if rec else
                "use parallel.ac=selective or full, or parallel.cp")
        report["error"] = (f"curriculum.stages[{r['stage']}] ({r['name']}): the {r['kind'].upper()} step "
                           f"{r['bucket']} x {r['batch']} peaks at {r['memory_gib']['peak']:.1f} GiB per rank > "
                           f"parallel.gpu_memory_gib={cfg.parallel.gpu_memory_gib:g} with parallel.ac="
                           f"{cfg.parallel.ac} parallel.cp={cp}; {hint}; or lower "
                           f"curriculum.stages[{r['stage']}].token_budget / global_batch")
    return report
