"""An unused REPA head is frozen (issue 16 §3b): when no step of the run uses REPA (no stage with `repa`,
`objective.repa.weight == 0`, or `until_step` before every REPA stage), `models.apply_repa_freeze` takes the head
out of the trainable set, so the optimizer, the EMA and a LoRA checkpoint leave it out, in full training and LoRA
alike; the dry run counts the same trainable bytes; export reads such a checkpoint. Used, it keeps training."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed.checkpoint as dcp

from motif_train.data.curriculum import StageConfig
from motif_train.ema import EMA, EMAConfig, clean_name
from motif_train.models import RoutingConfig, apply_repa_freeze, build_model
from motif_train.models.lora import LoraConfig, apply_lora, checkpoint_state, trainable_names
from motif_train.objectives.repa import RepaLossConfig, repa_stages
from motif_train.optim import OptimConfig, build_optimizer

from ._model_utils import tiny

HEAD = "repa_projector."


def _stages(*repa: bool, steps: int = 6) -> list[StageConfig]:
    return [StageConfig(name=f"s{i}", steps=steps, repa=r) for i, r in enumerate(repa)]


def test_which_stages_run_repa():
    on = RepaLossConfig(weight=0.5)
    assert repa_stages(_stages(True, False), on) == [True, False]
    assert repa_stages(_stages(False, False), on) == [False, False]
    assert repa_stages(_stages(True, True), RepaLossConfig(weight=0.0)) == [False, False]
    assert repa_stages(_stages(True, True), RepaLossConfig(until_step=0)) == [False, False]
    # until_step before the REPA stage starts (steps 7..12): it never runs; from step 7 it does
    assert repa_stages(_stages(False, True), RepaLossConfig(until_step=6)) == [False, False]
    assert repa_stages(_stages(False, True), RepaLossConfig(until_step=7)) == [False, True]
    # a run cut short by train.steps never reaches the second stage; a longer one runs the last stage on
    assert repa_stages(_stages(False, True), on, total_steps=6) == [False, False]
    assert repa_stages(_stages(False, True), on, total_steps=20) == [False, True]


def _param_names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {clean_name(n) for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("used", [False, True])
def test_full_training_freezes_an_unused_head(tiny_cfg, used):
    model = build_model(tiny(tiny_cfg, routing=RoutingConfig(ratio=0.0)))
    head = {clean_name(n) for n, _ in model.named_parameters() if n.startswith(HEAD)}
    assert head
    frozen = apply_repa_freeze(model, used=used)
    assert set(frozen) == (set() if used else head)
    trainable = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert (head <= trainable) == used and bool(head & trainable) == used
    assert trainable - head == {clean_name(n) for n, _ in model.named_parameters()} - head  # the rest trains
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    in_opt = _param_names(model, [p for g in opt.param_groups for p in g["params"]])
    assert in_opt == trainable
    ema = EMA(model, EMAConfig())
    assert set(ema.shadow) == trainable


@pytest.mark.parametrize("used", [False, True])
def test_lora_freezes_an_unused_head(tiny_cfg, used):
    model = build_model(tiny(tiny_cfg, routing=RoutingConfig(ratio=0.0)))
    apply_lora(model, LoraConfig(rank=2))
    assert any(n.startswith(HEAD) for n in trainable_names(model))  # apply_lora leaves the decision to the freeze
    apply_repa_freeze(model, used=used)
    names = trainable_names(model)
    assert all(".lora_" in n or n.startswith(HEAD) for n in names)
    assert any(n.startswith(HEAD) for n in names) == used
    assert set(checkpoint_state(model).state_dict()) == set(names)  # the checkpoint holds what trains
    assert set(EMA(model, EMAConfig()).shadow) == set(names)


def test_no_head_nothing_to_freeze(tiny_cfg):
    cfg = tiny(tiny_cfg, routing=RoutingConfig(ratio=0.0))
    cfg.repa = dataclasses.replace(cfg.repa, block=None)
    model = build_model(cfg)
    assert apply_repa_freeze(model, used=False) == [] and all(p.requires_grad for p in model.parameters())


def _compose(tmp_path, *extra):
    from motif_train.cli import dryrun

    return dryrun.compose(["experiment=tiny_cpu", "data=synthetic", "parallel=hsdp", "parallel.simulate_world=64",
                           "parallel.simulate_local=8", "curriculum.stages.0.global_batch=128",
                           "curriculum.stages.1.global_batch=64", f"run_dir={tmp_path}", *extra])


def test_dry_run_counts_the_same_trainable_bytes(tmp_path):
    """The dry run builds its own (fake) model: the same freeze, so its trainable bytes (grads, moments, EMA)
    leave the head out exactly when the trainer does."""
    from motif_train import dryrun
    from motif_train.distributed.memory_model import FakeModel, teacher_gib
    from motif_train.distributed.mesh import build_mesh

    out = {}
    for name, extra in (("used", ()), ("unused", ("curriculum.stages.0.repa=false",)),
                        ("until0", ("objective.repa.until_step=0",))):
        cfg = _compose(tmp_path, *extra)
        with dryrun.fake_world(64, 8, 63) as info:
            fake = FakeModel(cfg, build_mesh(cfg.parallel, info), repa_used=any(dryrun.repa_on(cfg)))
            head = sum(p.to_local().numel() for n, p in fake.model.named_parameters() if HEAD in n) * 4
            out[name] = (fake.local_bytes(4, trainable=True), fake.local_bytes(4), head,
                         dryrun.repa_on(cfg), teacher_gib(cfg.encoders.root, any(dryrun.repa_on(cfg)))[0])
    used, unused, until0 = out["used"], out["unused"], out["until0"]
    assert used[2] > 0 and used[1] == unused[1] == until0[1]  # same model, same resident bytes
    assert used[0] - unused[0] == used[0] - until0[0] == used[2]  # minus the head's shard, exactly
    assert used[3] == [True, False] and unused[3] == until0[3] == [False, False]
    assert used[4] > 0 and unused[4] == until0[4] == 0.0  # no teacher either


def test_export_reads_a_checkpoint_with_a_frozen_head(tiny_cfg, tmp_path):
    """Full training without REPA: the head has no EMA copy (frozen); EMA export takes the raw (initial) head."""
    from omegaconf import OmegaConf

    from motif_train.cli.export import load_checkpoint_model
    from motif_train.config import ModelSpec

    spec = ModelSpec(**{f.name: copy.deepcopy(getattr(tiny_cfg, f.name)) for f in dataclasses.fields(tiny_cfg)})
    model = build_model(spec.dit_config(), seed=1)
    apply_repa_freeze(model, used=False)
    ema = EMA(model, EMAConfig())
    with torch.no_grad():
        for t in ema.shadow.values():
            t.add_(1.0)  # the EMA differs from the raw weights everywhere it exists
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    dcp.save({"model": model.state_dict(), "ema": ema.shadow}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "COMPLETE").touch()
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.structured(spec)}), tmp_path / "run" / "config.yaml")
    out = load_checkpoint_model(ckpt, weights="ema")
    got = {clean_name(n): p for n, p in out.named_parameters()}
    for n, p in model.named_parameters():
        n = clean_name(n)
        want = p if n.startswith(HEAD) else ema.shadow[n]
        assert torch.equal(got[n], want), n
