"""DCP checkpoint manager on 2 gloo ranks (FSDP2 on CPU): round trip, 2 -> 1 reshard,
interrupted saves, keep-last, async save on a dedicated gloo group, exact RNG resume."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from motif_train.checkpoint import (
    COMPLETE,
    CheckpointConfig,
    CheckpointManager,
    ModelState,
    OptimizerState,
    TensorDictState,
    derive_rng_seed,
)
from motif_train.distributed.mesh import group_timeout

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
EXTRA = {"seed": 7, "samples": 16, "stage": "s0", "data": {"epoch": 0, "pos": [1, 2]}}


# ----------------------------------------------------------------------------- shared helpers


class Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 21) -> None:  # 21: uneven shards on 2 ranks
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def _init_pg(rank: int, world: int, init_file: Path) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _build(seed: int, lr: float = 1e-2):
    torch.manual_seed(seed)
    model = nn.Sequential(Block(), Block(), nn.Linear(16, 6))
    for block in model[:2]:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    ema = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    return model, opt, ema


def _states(model, opt, ema) -> dict:
    return {"model": ModelState(model), "optim": OptimizerState(model, opt), "ema": TensorDictState(ema)}


def _train_step(model, opt, ema, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 16, generator=g)
    target = torch.randn(4, 6)  # the global RNG: exact continuation needs it restored
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            ema[n].lerp_(p.detach(), 0.1)


def _full(v):
    return (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().contiguous()


def _full_state(model, opt, ema) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": _full(v) for k, v in get_model_state_dict(model).items()}
    for fqn, st in get_optimizer_state_dict(model, opt)["state"].items():
        out.update({f"optim.{fqn}.{k}": _full(v) for k, v in st.items()})
    out.update({f"ema.{k}": _full(v) for k, v in ema.items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _draw() -> list:
    return [torch.rand(5).tolist(), np.random.rand(3).tolist(), random.random()]


def _rng_state():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng_state(s) -> None:
    torch.set_rng_state(s[0])
    np.random.set_state(s[1])
    random.setstate(s[2])


def _cfg(**kw) -> CheckpointConfig:
    kw.setdefault("async_mode", "sync")
    kw.setdefault("keep_last", 0)
    return CheckpointConfig(**kw)


# ----------------------------------------------------------------------------- 2-rank worker


def _two_rank_main(rank: int, world: int, tmp: str) -> None:
    tmp = Path(tmp)
    _init_pg(rank, world, tmp / "pg_2")
    run = tmp / "run"
    res: dict = {}
    A = _build(0)
    for step in (1, 2):
        _train_step(*A, rank, step)
    res["params_are_dtensors"] = all(isinstance(p, DTensor) for p in A[0].parameters())
    res["ema_is_dtensor"] = all(isinstance(v, DTensor) for v in A[2].values())

    # (a) + (f): sync save at step 2, fresh model loads it bit for bit, continues bit for bit.
    mgr = CheckpointManager(_cfg(every=2), run, rank=rank, world_size=world, device=CPU)
    res["should_save"] = [mgr.should_save(s) for s in (0, 1, 2, 3, 4)]
    np.random.seed(100 + rank)
    random.seed(200 + rank)
    torch.manual_seed(300 + rank)
    res["blocked"] = mgr.save(2, _states(*A), EXTRA)
    snap = _rng_state()
    res["rng_expect"] = _draw()
    _set_rng_state(snap)
    full2 = _full_state(*A)
    if rank == 0:
        save_file(full2, str(tmp / "full_step2.safetensors"))
        (tmp / "rng_expect_rank0.json").write_text(json.dumps(res["rng_expect"]))
    _train_step(*A, rank, 3)
    ref3 = _full_state(*A)

    B = _build(1, lr=5e-3)
    res["fresh_differs"] = not _same(_full_state(*B), full2)
    torch.manual_seed(12345)  # scramble RNGs: load must restore them
    np.random.seed(1)
    random.seed(2)
    res["latest"] = str(mgr.latest())
    extra = mgr.load(mgr.resolve_resume(), _states(*B))
    res["extra"] = extra
    loaded_rng = _rng_state()
    res["rng_after_load"] = _draw()
    _set_rng_state(loaded_rng)  # the continuation below relies on the RNG restored by load()
    res["roundtrip_equal"] = _same(_full_state(*B), full2)
    res["lr_restored"] = B[1].param_groups[0]["lr"]
    _train_step(*B, rank, 3)
    res["continue_equal"] = _same(_full_state(*B), ref3)

    # (c) + (d): interrupted dir ignored and pruned, keep_last=2, missing RNG file derived.
    mgk = CheckpointManager(_cfg(keep_last=2, folder="keep"), run, rank=rank, world_size=world, device=CPU)
    mgk.save(1, _states(*A), EXTRA)
    if rank == 0:
        (run / "keep" / "step_00000099").mkdir()
        (run / "keep" / "step_00000099" / "__0_0.distcp").write_bytes(b"partial")
    dist.barrier()
    res["keep_latest_with_partial"] = mgk.latest().name
    res["keep_auto_with_partial"] = mgk.resolve_resume().name
    mgk.save(2, _states(*A), EXTRA)
    dist.barrier()
    res["partial_pruned"] = not (run / "keep" / "step_00000099").exists()
    for step in (3, 4):
        mgk.save(step, _states(*A), EXTRA)
    dist.barrier()
    res["keep_dirs"] = sorted(p.name for p in (run / "keep").iterdir())
    if rank == 1:  # as if the saving run had a single rank
        for f in (run / "keep" / "step_00000004" / "rng").glob("rank_1.*"):
            f.unlink()
    dist.barrier()
    C = _build(2)
    extra4 = mgk.load(mgk.latest(), _states(*C))
    res["rng_restored_4"] = extra4["rng_restored"]
    res["rng_4"] = torch.rand(3).tolist()
    torch.manual_seed(derive_rng_seed(7, rank, 4))
    res["rng_4_derived"] = torch.rand(3).tolist()
    res["keep_load_equal"] = _same(_full_state(*C), ref3)

    # (e): async save on the dedicated gloo group while training continues.
    mga = CheckpointManager(_cfg(async_mode="async", folder="async"), run, rank=rank, world_size=world, device=CPU,
                            timeout=datetime.timedelta(minutes=3))
    res["async_enabled"] = mga.use_async
    res["async_pg_timeouts_s"] = [group_timeout(pg).total_seconds() for pg in (mga._save_pg, mga._ctrl_pg)]
    res["async_blocked"] = mga.save(3, _states(*A), EXTRA)
    _train_step(*A, rank, 4)  # mutate params / optimizer / EMA while the save is in flight
    polls = 0
    while not mga.maybe_finalize():
        polls += 1
        assert polls < 3000, "async save never finalized"
        time.sleep(0.01)
    res["async_polls"] = polls
    dist.barrier()
    res["async_marker_3"] = (run / "async" / "step_00000003" / COMPLETE).is_file()
    D = _build(3)
    mga.load(run / "async" / "step_00000003", _states(*D))
    res["async_load_equal"] = _same(_full_state(*D), ref3)
    full4 = _full_state(*A)
    mga.save(4, _states(*A), EXTRA)
    _train_step(*A, rank, 5)
    mga.save(5, _states(*A), EXTRA)  # waits for (and marks) step 4 first
    res["async_marker_4_before_wait"] = (run / "async" / "step_00000004" / COMPLETE).is_file() if rank == 0 else True
    mga.wait()
    dist.barrier()
    res["async_markers"] = sorted(p.parent.name for p in (run / "async").glob(f"*/{COMPLETE}"))
    E = _build(4)
    mga.load(run / "async" / "step_00000004", _states(*E))
    res["async_load4_equal"] = _same(_full_state(*E), full4)
    mga.close()

    (tmp / f"res_{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- 1-rank worker


def _one_rank_main(tmp: str) -> None:
    """Loads the 2-rank checkpoint on 1 rank, then leaves what a save killed between the DCP files and
    the marker leaves: a full `dcp.save` without COMPLETE (the real SIGKILL mid-save is in
    tests/faults/test_checkpoint_faults.py)."""
    tmp = Path(tmp)
    _init_pg(0, 1, tmp / "pg_1")
    run = tmp / "run"
    mgr = CheckpointManager(_cfg(), run, rank=0, world_size=1, device=CPU)
    model, opt, ema = _build(5)
    extra = mgr.load(mgr.step_dir(2), _states(model, opt, ema))
    res = {
        "extra": extra,
        "rng": _draw(),
        "params_are_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "equal": _same(_full_state(model, opt, ema), load_file(str(tmp / "full_step2.safetensors"))),
    }
    (tmp / "res_1rank.json").write_text(json.dumps(res))
    dcp.save(_states(model, opt, ema), checkpoint_id=str(mgr.step_dir(9)))  # the data, never marked
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    mp.spawn(_two_rank_main, args=(2, str(tmp)), nprocs=2, join=True)
    res = [json.loads((tmp / f"res_{r}.json").read_text()) for r in range(2)]
    return tmp, res


@pytest.fixture(scope="module")
def one_rank(two_rank):
    tmp, _ = two_rank
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    code = f"from tests.distributed.test_checkpoint import _one_rank_main; _one_rank_main({str(tmp)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    res_file = tmp / "res_1rank.json"
    assert res_file.is_file(), proc.stderr[-4000:]
    return tmp, proc, json.loads(res_file.read_text())


# ----------------------------------------------------------------------------- tests


def test_fsdp_params_are_dtensors(two_rank):
    _, res = two_rank
    for r in res:
        assert r["params_are_dtensors"] and r["ema_is_dtensor"]
        assert r["should_save"] == [False, False, True, False, True]
        assert r["blocked"] >= 0


def test_roundtrip_bit_exact_and_continuation(two_rank):
    tmp, res = two_rank
    step2 = tmp / "run" / "checkpoints" / "step_00000002"
    assert (step2 / COMPLETE).is_file() and (step2 / ".metadata").is_file()
    assert (step2 / "train_state.json").is_file()
    for rank, r in enumerate(res):
        assert (step2 / "rng" / f"rank_{rank}.safetensors").is_file() and (
            step2 / "rng" / f"rank_{rank}.json"
        ).is_file()
        assert r["latest"] == str(step2)
        assert r["fresh_differs"]
        assert r["roundtrip_equal"], "model / optimizer / EMA differ after load"
        assert r["lr_restored"] == 1e-2
        assert r["continue_equal"], "one step after load differs from one step without save/load"
        assert r["extra"] == {**EXTRA, "step": 2, "rng_restored": True}


def test_rng_restored_per_rank(two_rank):
    _, res = two_rank
    for r in res:
        assert r["rng_after_load"] == r["rng_expect"]
    assert res[0]["rng_expect"] != res[1]["rng_expect"]  # per-rank streams


def test_load_two_ranks_into_one(one_rank):
    tmp, _, res = one_rank
    assert res["params_are_dtensors"]
    assert res["equal"], "2 -> 1 reshard differs from the saved full state"
    assert res["extra"]["rng_restored"] is True
    assert res["rng"] == json.loads((tmp / "rng_expect_rank0.json").read_text())


def test_unmarked_save_is_never_resumed(one_rank):
    tmp, proc, _ = one_rank
    assert proc.returncode == 0, proc.stderr[-4000:]
    crashed = tmp / "run" / "checkpoints" / "step_00000009"
    assert (crashed / ".metadata").is_file() and not (crashed / COMPLETE).exists()
    mgr = CheckpointManager(_cfg(), tmp / "run", rank=0, world_size=1, device=CPU)
    assert mgr.latest().name == "step_00000002"
    assert mgr.resolve_resume().name == "step_00000002"
    bad = CheckpointManager(_cfg(resume=str(crashed)), tmp / "run", rank=0, world_size=1, device=CPU)
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        bad.resolve_resume()
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        bad.load(crashed, {})


def test_partial_dir_pruned_and_keep_last(two_rank):
    _, res = two_rank
    for r in res:
        assert r["keep_latest_with_partial"] == "step_00000001"
        assert r["keep_auto_with_partial"] == "step_00000001"
        assert r["partial_pruned"]
        assert r["keep_dirs"] == ["step_00000003", "step_00000004"]
        assert r["keep_load_equal"]


def test_missing_rank_rng_is_derived(two_rank):
    _, res = two_rank
    assert res[0]["rng_restored_4"] is True
    assert res[1]["rng_restored_4"] is False
    assert res[1]["rng_4"] == res[1]["rng_4_derived"]


def test_async_save_on_gloo(two_rank):
    _, res = two_rank
    for r in res:
        assert r["async_enabled"]
        assert r["async_pg_timeouts_s"] == [180.0, 180.0]  # the configured timeout, not gloo's 30 min
        assert r["async_marker_3"]
        assert r["async_load_equal"], "async snapshot does not match the state at save time"
        assert r["async_marker_4_before_wait"]
        assert r["async_markers"] == ["step_00000003", "step_00000004", "step_00000005"]
        assert r["async_load4_equal"]


def test_resume_modes(tmp_path):
    mgr = CheckpointManager(_cfg(resume="none"), tmp_path, rank=0, world_size=1, device=CPU)
    assert mgr.resolve_resume() is None and mgr.latest() is None
    assert CheckpointManager(_cfg(), tmp_path, rank=0, world_size=1, device=CPU).resolve_resume() is None
    assert not CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world_size=1, device=CPU).use_async
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        CheckpointManager(
            _cfg(resume=str(tmp_path / "nope")), tmp_path, rank=0, world_size=1, device=CPU
        ).resolve_resume()
    never = CheckpointManager(_cfg(every=0), tmp_path, rank=0, world_size=1, device=CPU)
    assert not any(never.should_save(s) for s in range(0, 2000, 500))
    # a save repeated at the same step in one process is a no-op (end-of-run after a periodic save)
    mgr._last_step = 5
    assert mgr.save(5, {}, {}) >= 0 and not mgr.step_dir(5).exists()


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"every": -1}, "every"),
        ({"keep_last": -2}, "keep_last"),
        ({"async_mode": "maybe"}, "async_mode"),
        ({"resume": ""}, "resume"),
        ({"folder": ""}, "folder"),
        ({"save_at_end": "yes"}, "save_at_end"),
        ({"max_abs_weight": -1.0}, "max_abs_weight"),
        ({"max_abs_weight": float("inf")}, "max_abs_weight"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"checkpoint.{field}"):
        CheckpointConfig(**kw)
