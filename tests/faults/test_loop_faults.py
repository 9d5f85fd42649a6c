"""Faults of the training loop, for real, under torchrun with 2 gloo ranks (the tiny CPU experiment,
synthetic data): a NaN streak across saves, nonsense sizes, a crashed rank with a save pending,
buffered metrics and their write failures, skip counts summed over ranks, group timeouts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from motif_train.cli.train import CONFIG_DIR, to_train_config
from motif_train.config import validate
from tests.distributed._runs import (
    REPO,
    ckpt_dir,
    env,
    events,
    finish,
    launch,
    load_dcp,
    local_metrics,
    records,
    train,
)

pytestmark = pytest.mark.distributed

LIMIT = 1e4  # checkpoint.max_abs_weight's default
SANE = ["curriculum.stages.1.lr=2e-3"]
BLOW_UP = ["curriculum.stages.1.lr=1e30", "train.max_bad_steps=2"]  # stage 1 starts at step 7


def _complete(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())


def _line_steps(path: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- (a) + (d)


def test_nan_streak_never_saves_wrecked_weights_and_metrics_sync_only_at_checkpoints(tmp_path):
    run = tmp_path / "run"
    good = ckpt_dir(run, 6)
    hint = f"The last good checkpoint is {good}"

    # Leg 1: saves every 2 steps. Step 7 (lr 1e30) is finite but blows the weights up; 8 and 9 are
    # non-finite: the save due at 8 falls inside the streak and is deferred; the run stops at 9.
    p = train(run, 2, "checkpoint.every=2", *BLOW_UP, check=False, timeout=300)
    assert p.returncode != 0
    assert "2 non-finite steps in a row (train.max_bad_steps), last at step 9" in p.stderr
    assert hint in p.stderr and "relaunch with a lower LR (e.g. curriculum.stages[1].lr=" in p.stderr
    assert "checkpoint.resume=auto resumes from it" in p.stderr
    assert not ckpt_dir(run, 8).exists()
    ev = events(run)
    assert any(e["step"] == 8 and e["event"].startswith("checkpoint not written: inside a skip streak") for e in ev)
    assert any(e["step"] == 9 and e["event"].startswith("error: DivergedError") for e in ev)
    assert sorted(records(run)) == list(range(1, 10))  # synced on the error path
    assert math.isnan(records(run)[8]["loss/total"]) and math.isfinite(records(run)[7]["loss/total"])

    # Leg 2: same LR, a save every step: the save at step 7 (finite loss, exploded weights) is refused.
    p = train(run, 2, "checkpoint.every=1", *BLOW_UP, check=False, timeout=300)
    assert p.returncode != 0 and f"resumed_from={good}" in p.stdout
    assert "step 7: not saving a checkpoint: the weights exploded: max |w| = " in p.stderr
    assert "> checkpoint.max_abs_weight=10000" in p.stderr and hint in p.stderr
    assert not ckpt_dir(run, 7).exists()

    # Every complete checkpoint holds finite weights below the limit; none is from the streak.
    assert [c.name for c in _complete(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    for c in _complete(run):
        flat = load_dcp(c, tmp_path / "dcp")
        weights = [v for k, v in flat.items() if k.startswith(("model.", "ema.")) and torch.is_tensor(v)]
        assert len(weights) > 50
        assert all(torch.isfinite(w).all() for w in weights), c
        assert max(w.abs().max().item() for w in weights) < LIMIT, c

    # Leg 3: a sane LR resumes from the last good checkpoint and trains to the end. Meanwhile the
    # run dir's metrics.jsonl is only rewritten whole at checkpoints (9, 12) and exit.
    before = len(_line_steps(run / "metrics.jsonl"))  # legs 1 + 2: steps 1..9, then 7 again
    assert before == 10
    proc = launch(run, 2, *SANE)
    seen, stamps = set(), set()
    while proc.poll() is None:
        try:
            st = (run / "metrics.jsonl").stat()
            seen.add(len(_line_steps(run / "metrics.jsonl")))
            stamps.add(st.st_mtime_ns)
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    p = finish(proc, SANE, 300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed_from={good}" in p.stdout
    rec = records(run)
    assert sorted(rec) == list(range(1, 13))
    assert all(math.isfinite(rec[s]["loss/total"]) and rec[s]["lr"] == 2e-3 for s in range(7, 13))
    assert (ckpt_dir(run, 12) / "COMPLETE").exists()
    # the earlier legs' lines are kept (a resumed step appears again; readers keep the last)
    assert _line_steps(run / "metrics.jsonl") == [*range(1, 10), 7, *range(7, 13)]
    assert seen <= {before, before + 3, before + 6}, seen  # at step 9 and 12, never per step
    assert len(stamps) <= 3
    assert local_metrics(run).read_text() == (run / "metrics.jsonl").read_text()


# ---------------------------------------------------------------------------------- (b)


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tiny_cpu", "data=synthetic", *overrides])
    return to_train_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("curriculum.stages.0.global_batch=0", r"curriculum.stages\[0\].global_batch=0 must be an int >= 1"),
    ("curriculum.stages.1.global_batch=-2", r"curriculum.stages\[1\].global_batch=-2 must be an int >= 1"),
    ("curriculum.stages.0.token_budget=0", r"curriculum.stages\[0\].token_budget=0 must be an int >= 1"),
    ("curriculum.stages.1.steps=0", r"curriculum.stages\[1\].steps=0 must be an int >= 1"),
    ("curriculum.stages.0.buckets=[[9,0,96]]", r"curriculum.stages\[0\].buckets: 0x96: height and width must be"),
    ("curriculum.stages.0.buckets=[[9,-16,96]]", r"curriculum.stages\[0\].buckets: -16x96"),
    ("curriculum.stages.0.buckets=[[-3,64,96]]", r"curriculum.stages\[0\].buckets: frames=-3 must be 1\+4k"),
    ("curriculum.stages.0.lr=0", r"curriculum.stages\[0\].lr=0.0 must be a finite number > 0"),
    ("curriculum.stages.0.i2v_prob=1.5", r"curriculum.stages\[0\].i2v_prob=1.5 must be in \[0, 1\]"),
    ("train.stop_at=0", r"train.stop_at=0 must be a step >= 1"),
    ("train.grad_accum=0", r"train.grad_accum=0 must be >= 1"),
    ("train.max_bad_steps=0", r"train.max_bad_steps=0 must be >= 1"),
    ("train.steps=0", r"train.steps=0 must be >= 1"),
    ("data.image_tokens=0", r"data.image_tokens=0 must be an int >= 1"),
    ("data.text_len=[0,4]", r"data.text_len=\[0, 4\] must be \[min, max\]"),
])
def test_nonsense_sizes_fail_validation(override, message):
    with pytest.raises(ValueError, match=message):
        validate(_compose(override), world_size=2)


@pytest.mark.parametrize("override, message", [
    ("checkpoint.max_abs_weight=-1", "checkpoint.max_abs_weight must be a finite number >= 0"),
    ("parallel.timeout_min=0", "parallel.timeout_min=0 must be an int >= 1"),
])
def test_nonsense_values_fail_at_composition(override, message):
    with pytest.raises(Exception, match=message):
        _compose(override)


def test_nonsense_size_fails_the_real_cli_before_any_work(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "motif_train.cli.train", "experiment=tiny_cpu", "data=synthetic",
                        "logger.wandb=false", f"run_dir={run}", "curriculum.stages.1.global_batch=0"],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "curriculum.stages[1].global_batch=0 must be an int >= 1" in p.stderr
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()  # before any work
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------------- (c) + (e)


def test_a_crashed_rank_exits_promptly_with_a_save_pending(tmp_path):
    run = tmp_path / "run"
    overrides = ["data._target_=tests.faults._sources.FaultySource", "+data.crash_step=5", "+data.skip_step=2",
                 "checkpoint.async_mode=async", "checkpoint.every=2", "parallel.timeout_min=10"]
    t0 = time.monotonic()
    p = train(run, 2, *overrides, check=False, timeout=120)  # hard timeout: kills every rank and fails
    elapsed = time.monotonic() - t0
    assert p.returncode != 0 and elapsed < 120
    assert "[rank 1] training failed at step 5" in p.stderr
    assert "RuntimeError: injected data fault on rank 1 at step 5" in p.stderr
    # the async save of step 4 was pending: abandoned without its barrier, so never marked
    assert (ckpt_dir(run, 2) / "COMPLETE").exists() and not (ckpt_dir(run, 4) / "COMPLETE").exists()
    rec = records(run)
    assert sorted(rec) == [1, 2, 3, 4]  # lines up to step k-1 are in the run dir
    ev = events(run)
    assert any(e["step"] == 5 and e["event"].startswith("error: ") for e in ev)  # only the exit sync wrote this
    # (e) skipped samples summed over ranks (3 + 5) in the step's all-reduce; every rank's messages
    assert [rec[s]["data/skipped_samples"] for s in (1, 2, 3, 4)] == [0, 8, 8, 8]
    msgs = [e for e in ev if e["event"].startswith("data (rank ")]
    assert sorted((e["rank"], e["event"]) for e in msgs) == sorted(
        [(r, f"data (rank {r}): fake/r{r}/{i:03d}: skipped: injected") for r in (0, 1) for i in range(3 + 2 * r)])
    assert all(e["step"] == 2 for e in msgs)
    notes = [e for e in ev if e["event"] == "data: faulty source on rank 0: crash_step=5 skip_step=2"]
    assert len(notes) == 1 and notes[0]["step"] == 0 and notes[0]["notes"] == [notes[0]["event"][6:]]
    assert (ckpt_dir(run, 2) / "train_state.json").read_text().count('"skipped_samples": 8') == 1


def _mesh_worker(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from datetime import timedelta

    from motif_train.distributed.mesh import DistInfo, ParallelConfig, build_mesh, gather_lists, group_timeout

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=7))
    info = DistInfo(rank, world, rank, 2, torch.device("cpu"))
    hsdp = build_mesh(ParallelConfig(dp_replicate=-1, dp_shard=-1, timeout_min=7), info)
    flat = build_mesh(ParallelConfig(timeout_min=7), info)
    res = {"hsdp": [group_timeout(hsdp.get_group(d)).total_seconds() for d in ("dp_replicate", "dp_shard")],
           "flat": group_timeout(flat.get_group()).total_seconds(), "shape": tuple(hsdp.shape),
           "coord": hsdp.get_coordinate()}
    x = torch.ones(1)
    dist.all_reduce(x, group=hsdp.get_group("dp_shard"))
    res["shard_sum"] = x.item()
    got = gather_lists([f"m{rank}"] * rank)
    res["gathered"] = got
    torch.save(res, Path(out) / f"mesh_{rank}.pt")
    dist.destroy_process_group()


def test_every_mesh_group_gets_the_configured_timeout_and_gather_reaches_rank0(tmp_path):
    mp.spawn(_mesh_worker, args=(4, str(tmp_path / "pg"), str(tmp_path)), nprocs=4, join=True)
    res = [torch.load(tmp_path / f"mesh_{r}.pt", weights_only=False) for r in range(4)]
    for r, x in enumerate(res):
        assert x["hsdp"] == [420.0, 420.0] and x["flat"] == 420.0  # not init_device_mesh's 30 min
        assert x["shape"] == (2, 2) and tuple(x["coord"]) == (r // 2, r % 2) and x["shard_sum"] == 2
    assert res[0]["gathered"] == [[], ["m1"], ["m2", "m2"], ["m3"] * 3]
    assert all(x["gathered"] is None for x in res[1:])


# ---------------------------------------------------------------------------------- (d) failures


def test_metrics_write_failures_never_stop_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").mkdir()  # the run dir refuses this file: every sync of it fails for real
    blocker = tmp_path / "a_file"
    blocker.write_text("logger.local_dir cannot be a directory here")
    p = train(run, 2, f"logger.local_dir={blocker}", "curriculum.stages.0.steps=2", "curriculum.stages.1.steps=2",
              timeout=300)
    assert p.returncode == 0
    assert p.stdout.count("metrics: local metrics copy") == 1  # warned once, not per line or per file
    assert p.stdout.count(f"metrics: syncing {run / 'events.jsonl'} failed") == 1
    assert sorted(records(run)) == [1, 2, 3, 4]  # kept in memory, synced to the run dir
    assert (ckpt_dir(run, 4) / "COMPLETE").exists() and (run / "events.jsonl").is_dir()
