"""Launch details: a short init timeout then the training one, the NCCL flight recorder dumping into
the run dir, the last FSDP block kept unsharded after forward, profiling on a few ranks only.

Process groups are made in child processes so this (single-process) test session never holds one."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from motif_train.config import ProfileConfig
from motif_train.distributed import ParallelConfig
from motif_train.distributed.mesh import flight_recorder_env, init_distributed
from motif_train.metrics import Profiler

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
FR_KEYS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE",
           "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_NCCL_DUMP_ON_TIMEOUT")

# A 1-rank gloo init through init_distributed: the group's and the store's timeout as
# init_process_group left them (read inside it) and after init_distributed returns.
_INIT_PROBE = """
import json, os, sys
from unittest import mock
import torch.distributed as dist
from motif_train.distributed import mesh

seen = {}
real = dist.init_process_group
def spy(*a, **kw):
    real(*a, **kw)
    seen["group_at_init"] = mesh.group_timeout(dist.group.WORLD).total_seconds()
    seen["store_at_init"] = dist.distributed_c10d._get_default_store().timeout.total_seconds()
with mock.patch.object(dist, "init_process_group", spy):
    info = mesh.init_distributed("auto", 7, "cpu", init_timeout_min=2, run_dir=sys.argv[1])
seen["group"] = mesh.group_timeout(dist.group.WORLD).total_seconds()
seen["store"] = dist.distributed_c10d._get_default_store().timeout.total_seconds()
seen["world"] = info.world_size
seen["fr_env"] = sorted(k for k in os.environ if k.startswith(("TORCH_FR_", "TORCH_NCCL_")))
dist.all_reduce(__import__("torch").ones(1))  # the raised group still works
dist.destroy_process_group()
print(json.dumps(seen))
"""


def test_init_timeout_is_short_then_the_training_timeout(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("TORCH_FR_", "TORCH_NCCL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _INIT_PROBE, str(tmp_path / "run")], env=env, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["group_at_init"] == seen["store_at_init"] == 120.0  # parallel.init_timeout_min=2
    assert seen["group"] == seen["store"] == 420.0  # parallel.timeout_min=7
    assert seen["world"] == 1
    assert seen["fr_env"] == [] and not (tmp_path / "run").exists()  # gloo: no flight recorder set-up


def test_init_timeout_config_field():
    assert ParallelConfig().init_timeout_min == 5 and ParallelConfig().timeout_min == 30
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(ValueError, match="parallel.init_timeout_min"):
            ParallelConfig(init_timeout_min=bad)


def test_flight_recorder_env_points_into_the_run_dir(tmp_path):
    env = flight_recorder_env(tmp_path / "run", environ={})
    assert env == {"TORCH_FR_BUFFER_SIZE": "2000",
                   "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "run" / "flight_recorder" / "rank_"),
                   "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    rel = flight_recorder_env("runs/x", environ={})["TORCH_FR_DUMP_TEMP_FILE"]
    assert os.path.isabs(rel) and rel.endswith(os.path.join("runs", "x", "flight_recorder", "rank_"))
    # what the launcher set, under torch's new or old name, wins
    launcher = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_",
                "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    assert flight_recorder_env(tmp_path, environ=launcher) == {}
    assert set(flight_recorder_env(tmp_path, environ={"TORCH_FR_DUMP_TEMP_FILE": "/x/"})) == {
        "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT"}


class _Stop(Exception):
    pass


def test_nccl_init_sets_the_flight_recorder_before_the_group(tmp_path):
    """The variables are in the environment (and the folder exists) when init_process_group runs,
    with the short timeout; NCCL itself is not available here, so the call is intercepted."""
    seen = {}

    def fake_init(**kw):
        seen.update(kw, env={k: os.environ.get(k) for k in FR_KEYS})
        raise _Stop

    with mock.patch.dict(os.environ), mock.patch.object(dist, "init_process_group", fake_init), \
            mock.patch.object(dist, "is_initialized", lambda: False):
        for k in FR_KEYS + ("RANK",):
            os.environ.pop(k, None)
        with pytest.raises(_Stop):
            init_distributed("nccl", 30, "cpu", init_timeout_min=3, run_dir=tmp_path / "run")
    assert seen["backend"] == "nccl" and seen["timeout"].total_seconds() == 180
    prefix = tmp_path / "run" / "flight_recorder" / "rank_"
    assert seen["env"]["TORCH_FR_DUMP_TEMP_FILE"] == str(prefix) and prefix.parent.is_dir()
    assert seen["env"]["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and seen["env"]["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert "TORCH_FR_DUMP_TEMP_FILE" not in os.environ  # (patch.dict restored the test's environment)


def _fsdp_worker(rank: int, init_file: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    from motif_train.distributed import parallelize_model
    from motif_train.distributed.mesh import DistInfo, build_mesh
    from motif_train.models import build_model, load_model_config
    from motif_train.models.convert import drop_tied_duplicates
    from tests.unit._model_utils import inputs, randomized

    cfg = load_model_config("tiny")
    ref = randomized(cfg)
    kw = inputs(cfg, mask=True)
    ref(**kw, route=False).sample.square().mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    info = DistInfo(0, 1, 0, 1, CPU)
    res = {}
    for name, pcfg in (("default", ParallelConfig()), ("no_reshard", ParallelConfig(reshard_after_forward=False))):
        model = build_model(cfg, device="meta")
        parallelize_model(model, pcfg, build_mesh(pcfg, info), CPU)
        model.to_empty(device="cpu")
        set_model_state_dict(model, drop_tied_duplicates(ref.state_dict(), cfg),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        groups = [b._get_fsdp_state()._fsdp_param_group for b in blocks]
        res[name + "_reshards"] = [g.post_forward_mesh_info is not None for g in groups]
        loss = model(**kw, route=False).sample.square().mean()
        res[name + "_unsharded_after_forward"] = [g._sharded_state == ShardedState.UNSHARDED for g in groups]
        loss.backward()
        res[name + "_grad"] = max((p.grad.full_tensor() - ref_grads[n]).abs().max().item()
                                  for n, p in model.named_parameters() if ref_grads[n] is not None)
        res[name + "_missing"] = [n for n, p in model.named_parameters() if (p.grad is None) != (ref_grads[n] is None)]
    torch.save(res, os.path.join(out, "fsdp.pt"))
    dist.destroy_process_group()


def test_last_block_is_not_resharded_after_forward(tmp_path):
    mp.spawn(_fsdp_worker, args=(tempfile.mktemp(dir=tmp_path), str(tmp_path)), nprocs=1, join=True)
    res = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    n = len(res["default_reshards"])
    assert n == 6 and res["default_reshards"] == [True] * (n - 1) + [False]
    # observable after forward: only the last block still holds its unsharded parameters for backward
    assert res["default_unsharded_after_forward"] == [False] * (n - 1) + [True]
    assert res["no_reshard_reshards"] == [False] * n and all(res["no_reshard_unsharded_after_forward"])
    for name in ("default", "no_reshard"):
        assert res[name + "_missing"] == [] and res[name + "_grad"] <= 1e-6, (name, res[name + "_grad"])


def _profile(run_dir, rank, world, ranks):
    x = torch.randn(32, 32)
    with Profiler([1, 2], run_dir, CPU, rank=rank, world_size=world, ranks=ranks) as prof:
        for step in (1, 2, 3):
            (x @ x).sum()
            prof.step(step)
    return prof


def test_profiler_traces_only_the_listed_ranks(tmp_path):
    for rank in range(4):
        prof = _profile(tmp_path, rank, 4, [0, 3])
        assert (prof.trace_path is not None) == (rank in (0, 3)) and prof.snapshot_path is None  # CPU: no snapshot
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "trace_steps_1-2_rank0.json", "trace_steps_1-2_rank3.json"]
    prof = _profile(tmp_path / "quiet", 1, 4, [0])  # a rank not listed: nothing written, not even the folder
    assert prof.trace_path is None and not (tmp_path / "quiet").exists()
    with pytest.raises(ValueError, match=r"profile.ranks=\[0, 7\].*\[7\].*world of 4"):
        Profiler([1, 2], tmp_path, CPU, rank=1, world_size=4, ranks=[0, 7])  # every rank raises, not only 0
    Profiler([], tmp_path, CPU, rank=1, world_size=4, ranks=[0, 7])  # profiling off: ranks not checked


def test_profile_ranks_config():
    assert ProfileConfig().ranks == [0]
    for bad in ([], [-1], [0, True], [1.0]):
        with pytest.raises(ValueError, match="profile.ranks"):
            ProfileConfig(ranks=bad)
