"""Typed run configuration (Hydra ConfigStore schema) and the checks that run before any work.

`configs/train.yaml` composes YAML groups onto the `train_schema` dataclass below, so an
unknown key or a wrong type fails at composition; `validate` then checks the cross-field rules
(bucket shapes, batch divisibility, routes, REPA) and names the offending key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore

from motif_train.checkpoint import CheckpointConfig
from motif_train.data.curriculum import CurriculumConfig, validate_stage
from motif_train.data.synthetic import SyntheticDataConfig
from motif_train.distributed.context_parallel import check_cp_degree
from motif_train.distributed.mesh import ParallelConfig, run_device_type
from motif_train.ema import EMAConfig
from motif_train.metrics import LoggerConfig
from motif_train.models.attention_backends import check_backend
from motif_train.models.config import MotifDiTConfig, RoutingConfig
from motif_train.models.lora import LoraConfig
from motif_train.objectives.conditioning import ConditioningConfig
from motif_train.objectives.flow import FlowConfig
from motif_train.objectives.repa import RepaLossConfig
from motif_train.optim import OptimConfig
from motif_train.sampling import EvalConfig


@dataclass
class ModelSpec(MotifDiTConfig):
    """The DiT config plus where its weights come from."""

    init_from: str | None = None  # a diffusers MotifVideoTransformer3DModel folder (fine-tuning)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train peft adapters on a frozen base

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        super().__post_init__()

    def dit_config(self) -> MotifDiTConfig:
        names = {f.name for f in fields(MotifDiTConfig)}
        return MotifDiTConfig(**{k: v for k, v in asdict(self).items() if k in names})


@dataclass
class TrainSection:
    steps: int | None = None  # None: the sum of the curriculum's stage steps
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    stop_at: int | None = None  # end the run after this step >= 1 (save included), like a clean preemption; None: off
    debug_nan_steps: list[int] = field(default_factory=list)  # inject a NaN loss at these steps (tests)
    # Python GC: start-up objects frozen, automatic collection off, a collection every this many
    # steps on every rank at once (a GC pause on one rank stalls the others' collectives); 0: automatic
    gc_every: int = 50
    # Simulate the run instead of training it (motif-dryrun): the fake process group at parallel.simulate_world,
    # memory per stage on fake tensors, no checkpoint written
    dry_run: bool = False


@dataclass
class ObjectiveSection:
    flow: FlowConfig = field(default_factory=FlowConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    repa: RepaLossConfig = field(default_factory=RepaLossConfig)


@dataclass
class EncodersConfig:
    root: str | None = None  # folder with vae/ text_encoder/ tokenizer/ teacher/ (diffusers layout)
    build_tiny: bool = False  # first write random tiny encoders there (demo, tests)


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # [first, last] step to trace
    # ranks that trace (and record a CUDA memory snapshot); the others do nothing. At 64 GPUs e.g. [0, 7]:
    # rank 0 and the last rank of the first node
    ranks: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in self.ranks):
            raise ValueError(f"profile.ranks={list(self.ranks)}: give one or more ranks >= 0, e.g. [0] or [0, 7] "
                             "(turn profiling off with profile.steps=[] instead)")


@dataclass
class TrainConfig:
    name: str = "motif"
    run_dir: str = "runs/${name}"
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Swap point: `_target_` names the source class, whose keyword arguments are the other keys
    # (an unknown key fails when the source is instantiated, before training starts).
    data: Any = field(default_factory=lambda: {"_target_": SyntheticDataConfig._target_})
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def check_lora(cfg: TrainConfig) -> None:
    """`model.lora` rules (the targets are checked against the built model, `models/lora.resolve_targets`)."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    if not cfg.model.init_from:
        raise ValueError(f"model.lora.rank={lora.rank} but model.init_from is null: LoRA adapts released weights; "
                         "set model.init_from=<a diffusers transformer folder> (or model.lora.rank=0 to train "
                         "the whole model)")
    if lora.dropout > 0 and cfg.parallel.ac != "none":
        raise ValueError(f"model.lora.dropout={lora.dropout} with parallel.ac={cfg.parallel.ac}: activation "
                         "checkpointing recomputes blocks without replaying the dropout RNG; set "
                         "model.lora.dropout=0 or parallel.ac=none")


def uses_shards(cfg: TrainConfig) -> bool:
    target = cfg.data.get("_target_", "") if isinstance(cfg.data, dict) else getattr(cfg.data, "_target_", "")
    return target.endswith("ShardSource")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: TrainConfig, *, world_size: int, local_world_size: int | None = None) -> None:
    """Cross-field checks before any work; each error names the key and the fix."""
    rep, shard = cfg.parallel.degrees(world_size, local_world_size or world_size)
    dp = rep * shard
    t = cfg.train
    if t.grad_accum < 1:
        raise ValueError(f"train.grad_accum={t.grad_accum} must be >= 1 (micro-batches per optimizer step)")
    if t.steps is not None and t.steps < 1:
        raise ValueError(f"train.steps={t.steps} must be >= 1 (or null for the curriculum's total)")
    if t.stop_at is not None and t.stop_at < 1:
        raise ValueError(f"train.stop_at={t.stop_at} must be a step >= 1 to stop after (or null to run to the end)")
    if t.max_bad_steps < 1:
        raise ValueError(f"train.max_bad_steps={t.max_bad_steps} must be >= 1 (non-finite steps in a row before "
                         "the run stops)")
    if t.gc_every < 0:
        raise ValueError(f"train.gc_every={t.gc_every} must be >= 0 (steps between Python GC collections; "
                         "0 leaves GC automatic)")
    if t.dry_run and cfg.parallel.simulate_world != world_size:
        raise ValueError(f"train.dry_run=true in a world of {world_size} rank(s): the dry run fakes "
                         f"parallel.simulate_world={cfg.parallel.simulate_world} ranks in one process; run "
                         "`motif-dryrun` (python -m motif_train.cli.dryrun) with the same overrides, or drop "
                         "train.dry_run")
    if cfg.parallel.simulate_world is not None and not t.dry_run:
        raise ValueError("parallel.simulate_world is set but train.dry_run is false: only the dry run (motif-dryrun) "
                         "simulates a world; unset parallel.simulate_world / parallel.simulate_local to train")
    if not cfg.curriculum.stages:
        raise ValueError("curriculum.stages is empty: give at least one stage")
    target = cfg.data.get("_target_", "") if isinstance(cfg.data, dict) else getattr(cfg.data, "_target_", "")
    if target == SyntheticDataConfig._target_ and isinstance(cfg.data, dict):
        keys = {k: v for k, v in cfg.data.items() if k != "_target_"}
        unknown = sorted(set(keys) - {f.name for f in fields(SyntheticDataConfig)})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} under 'data' for the synthetic source; check the spelling")
        SyntheticDataConfig(**keys)  # its __post_init__ checks the data.* sizes
    check_lora(cfg)
    dit = cfg.model.dit_config()
    # The attention kernel this device can train with, before any work (the dry run builds on a CPU for a
    # GPU run: its device is not the run's).
    if not t.dry_run:
        check_backend(dit.attention_backend, dit.flash_impl, run_device_type(t.device))
    # Ulysses splits the heads over parallel.cp; the sequence need not split: the model pads every
    # bucket's video tokens (and TREAD's kept ones) to a multiple of cp and masks the pad.
    check_cp_degree(cfg.parallel.cp, dit.num_attention_heads)
    any_repa = False
    planned = uses_shards(cfg)
    for i, stage in enumerate(cfg.curriculum.stages):
        validate_stage(i, stage, dp_size=dp, grad_accum=cfg.train.grad_accum, planned=planned)
        route = stage.routing if stage.routing is not None else RoutingConfig(ratio=0.0)
        try:
            MotifDiTConfig(**{**asdict(dit), "routing": asdict(route)})
        except ValueError as e:
            raise ValueError(f"curriculum.stages[{i}].routing: {e}") from None
        any_repa |= stage.repa
    if any_repa and dit.repa.block is None:
        raise ValueError("a curriculum stage has repa: true but model.repa.block is null; set model.repa.block "
                         "(an encoder block index, e.g. 8) or turn REPA off in every stage")
    if any_repa and cfg.objective.repa.weight > 0 and cfg.encoders.root is None:
        raise ValueError("REPA is on but encoders.root is null: the V-JEPA 2 teacher is loaded from "
                         "<encoders.root>/teacher")
    if cfg.objective.conditioning.text_dropout > 0 and cfg.encoders.root is None and not planned:
        raise ValueError("objective.conditioning.text_dropout > 0 needs the empty-prompt embedding: from the "
                         "shards (data=shards) or <encoders.root>/text_encoder; set one or text_dropout: 0")
    if (cfg.eval.every or cfg.eval.at_end) and cfg.eval.prompts and cfg.encoders.root is None:
        raise ValueError("eval needs the VAE and text encoder from encoders.root; set encoders.root, or disable "
                         "validation with eval.every=0 eval.at_end=false")
    if cfg.profile.steps and (len(cfg.profile.steps) != 2 or not 1 <= cfg.profile.steps[0] <= cfg.profile.steps[1]):
        raise ValueError(f"profile.steps={cfg.profile.steps}: give [first, last] with 1 <= first <= last")
