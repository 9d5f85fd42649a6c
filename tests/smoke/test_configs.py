"""Every config group option and experiment composes onto the typed schema and validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from motif_train.cli.train import CONFIG_DIR, to_train_config
from motif_train.config import TrainConfig, validate

GROUPS = ["model", "optim", "parallel", "checkpoint", "logger", "data", "curriculum", "experiment"]


def _compose(overrides=()) -> TrainConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return to_train_config(cfg)


def _options(group):
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("experiment,world,local", [("tiny_cpu", 2, 2), ("tiny_cpu", 1, 1),
                                                    ("motif_video_2b_64xh200", 64, 8), ("finetune_i2v", 8, 8)])
def test_experiments_validate(experiment, world, local):
    cfg = _compose([f"experiment={experiment}"])
    validate(cfg, world_size=world, local_world_size=local)
    if experiment == "motif_video_2b_64xh200":
        assert cfg.parallel.degrees(world, local) == (8, 8)  # HSDP: shard in a node, replicate across nodes
        assert cfg.model.num_layers == 12 and cfg.model.repa.block == 8 and len(cfg.curriculum.stages) == 4
        assert cfg.parallel.ac == "selective" and cfg.parallel.compile and cfg.parallel.param_dtype == "bfloat16"


def test_resolved_config_round_trips():
    cfg = _compose(["experiment=tiny_cpu", "run_dir=/tmp/x"])
    assert cfg.encoders.root == "/tmp/x/encoders"
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.structured(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override", ["optim.lrr=1", "train.grad_accum=two", "model.num_layers=two"])
def test_typos_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose(["experiment=tiny_cpu", override])


@pytest.mark.parametrize("override", ["+optim.lrr=1", "+model.num_layerz=3", "+train.foo=1"])
def test_force_added_keys_fail_too(override):
    with pytest.raises((ConfigAttributeError, ConfigKeyError, ValidationError)):
        _compose(["experiment=tiny_cpu", override])


@pytest.mark.parametrize("override,message", [
    ("curriculum.stages.0.buckets=[[8,64,96]]", r"curriculum.stages\[0\].buckets: frames=8 must be 1\+4k"),
    ("curriculum.stages.0.buckets=[[9,72,96]]", r"curriculum.stages\[0\].buckets: 72x96 must be divisible by 16"),
    ("curriculum.stages.0.global_batch=3", r"curriculum.stages\[0\].global_batch=3 is not divisible"),
    ("curriculum.stages.0.routing.end=4", r"curriculum.stages\[0\].routing.*crosses the encoder->decoder"),
    ("model.repa.block=4", r"model.repa.block"),
    ("parallel.dp_replicate=3", r"parallel.dp_replicate"),
    ("parallel.cp=3", r"parallel.cp=3 must divide the GPUs per node"),
    ("parallel.cp=0", r"parallel.cp=0 must be an int >= 1"),
    ("encoders.root=null", r"encoders.root"),
])
def test_bad_configs_fail_before_work_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate(_compose(["experiment=tiny_cpu", "data=synthetic", override]), world_size=2)


def test_shard_data_needs_a_token_budget():
    validate(_compose(["experiment=tiny_cpu"]), world_size=2)  # shards: batches come from the budget
    with pytest.raises(ValueError, match=r"curriculum.stages\[1\].token_budget is required"):
        validate(_compose(["experiment=tiny_cpu", "curriculum.stages.1.token_budget=null"]), world_size=2)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiments_instantiate_where_cheap(experiment):
    from hydra.utils import instantiate

    from motif_train.data.curriculum import Curriculum
    from motif_train.models import MotifDiT
    from motif_train.optim import build_lr_scheduler, build_optimizer

    cfg = _compose([f"experiment={experiment}", "data=synthetic"])  # shards need a dataset on disk
    import torch

    with torch.device("meta"):
        model = MotifDiT(cfg.model.dit_config())  # the full 2B preset too: no memory on the meta device
    src = instantiate(cfg.data, text_dim=cfg.model.text_embed_dim, image_dim=cfg.model.image_embed_dim, seed=0,
                      dp_rank=0, dp_size=1, grad_accum=1)
    cur = Curriculum(cfg.curriculum)
    assert cur.total_steps == sum(s.steps for s in cfg.curriculum.stages)
    assert hasattr(src, "next_step") and hasattr(src, "state_dict")
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    sched = build_lr_scheduler(opt, cfg.optim, cur.total_steps, lambda s: cur.stage_at(s).lr)
    assert sched.get_last_lr()[0] > 0


def test_experiment_values_win_over_the_root_config():
    cfg = _compose(["experiment=tiny_cpu"])
    assert cfg.name == "tiny_cpu" and cfg.run_dir == "runs/tiny_cpu"
    assert _compose(["experiment=tiny_cpu", "name=x"]).run_dir == "runs/x"  # command line wins over both
