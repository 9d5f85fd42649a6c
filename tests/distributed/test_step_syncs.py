"""The per-step sync budget of the real Trainer (docs/training.md#host-syncs), counted.

One gloo process (a FileStore-initialised world of 1; the budget is per rank, so the count is
the same on more), the tiny CPU experiment with synthetic data, 2 micro-batches per step, REPA
and TREAD in stage 0, a NaN step. `SyncCounter` (tests/unit/test_host_syncs.py) records every
host read, data-dependent-size op, CUDA synchronize and blocking collective, labelled with the
step and with whether it happened inside a micro-step; the data loader's own host work is not
counted (it produces the host batch).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

LOG_EVERY, GC_EVERY, NAN_STEP, STEPS = 4, 3, 2, 8


def _worker(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config
    from motif_train.trainer import Trainer
    from tests.unit.test_host_syncs import SyncCounter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    overrides = ["experiment=tiny_cpu", "data=synthetic", "logger.wandb=false", f"run_dir={run_dir}",
                 "curriculum.stages.0.steps=4", "curriculum.stages.1.steps=4", "train.grad_accum=2",
                 f"logger.log_every={LOG_EVERY}", f"train.gc_every={GC_EVERY}", f"train.debug_nan_steps=[{NAN_STEP}]",
                 "checkpoint.every=0", "checkpoint.save_at_end=false", "eval.every=0", "eval.at_end=false",
                 # fused AdamW keeps its step count on the parameters' device, as it does on GPU by default;
                 # the unfused CPU path reads a host-side counter with .item() (no device read, but counted here)
                 "optim.fused=true"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_train_config(compose(config_name="train", overrides=overrides))
    trainer = Trainer(cfg)
    where = {"micro": False}
    counter = SyncCounter(phase=lambda: (trainer.step, where["micro"]))

    next_step, forward_backward, collect = trainer.data.next_step, trainer.forward_backward, gc.collect
    collected, gc_state = [], []

    def paused_next_step(step):
        counter.paused = True
        try:
            return next_step(step)
        finally:
            counter.paused = False

    def marked_forward_backward(*a, **k):
        where["micro"] = True
        try:
            return forward_backward(*a, **k)
        finally:
            where["micro"] = False

    def counted_collect(*a):
        collected.append(trainer.step)
        gc_state.append(gc.isenabled())
        return collect(*a)

    trainer.data.next_step, trainer.forward_backward, gc.collect = paused_next_step, marked_forward_backward, \
        counted_collect
    try:
        with counter:
            trainer.train()
    finally:
        gc.collect = collect
    after = gc.isenabled()
    trainer.close()
    events = [[p[0], p[1], k, n] for p, k, n in counter.events]
    Path(out, f"events_{rank}.json").write_text(json.dumps({"events": events, "collected": collected,
                                                            "gc_state": gc_state, "gc_after": after}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncs")
    mp.spawn(_worker, args=(1, str(tmp / "pg"), str(tmp / "run"), str(tmp)), nprocs=1, join=True)
    res = json.loads((tmp / "events_0.json").read_text())
    res["run"] = tmp / "run"
    return res


def _at(res, step: int, micro: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    for s, m, kind, name in res["events"]:
        if s == step and m == micro:
            key = f"{kind}:{name}"
            out[key] = out.get(key, 0) + 1
    return out


def test_no_host_read_inside_a_micro_step(counted):
    assert [e for e in counted["events"] if e[1]] == []


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_step_budget(counted, step):
    """A non-log step: exactly the control all-reduce and its one read. A log step adds the
    stacked log reduction and its one read; the NaN step adds its grad norm read (for the event)."""
    want = {"collective:all_reduce": 1, "read:tolist": 1}
    if step % LOG_EVERY == 0:
        want = {"collective:all_reduce": 2, "read:tolist": 2}
    if step == NAN_STEP:
        want["read:item"] = 1
    assert _at(counted, step, micro=False) == want


def test_gc_collects_at_the_configured_steps_only(counted):
    # one full collection before the start-up objects are frozen, then every GC_EVERY steps
    assert counted["collected"] == [0] + [s for s in range(1, STEPS + 1) if s % GC_EVERY == 0]
    assert counted["gc_state"] == [True] + [False] * (len(counted["collected"]) - 1)  # automatic GC off meanwhile
    assert counted["gc_after"]  # and back on after the run


def test_every_step_still_written(counted):
    from motif_train.metrics import read_metrics

    rows = read_metrics(counted["run"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["flops"] > 0 and r["step_time"] > 0 for r in rows)
    assert [r["teacher_flops"] > 0 for r in rows] == [True] * 4 + [False] * 4  # REPA in stage 0 only
    assert rows[NAN_STEP - 1]["train/skipped_steps"] == 1 and rows[NAN_STEP - 1]["grad_norm"] != 0


def test_gc_every_is_validated():
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config
    from motif_train.config import validate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_train_config(compose(config_name="train", overrides=["experiment=tiny_cpu", "data=synthetic",
                                                                      "train.gc_every=-1"]))
    with pytest.raises(ValueError, match=r"train.gc_every=-1 must be >= 0"):
        validate(cfg, world_size=2)
