"""The multi-node launch path: two `launch/train.sh` agents on one machine (NNODES=2, c10d rendezvous,
NPROC_PER_NODE=1, parallel=hsdp: mesh 2 x 1), each in a process group of its own, every wait under a
hard deadline (tests/smoke/_multinode.py). Every run is compared bit for bit with one single-node
2-rank run of the same mesh (module fixture): a clean two-node run, a node lost after step 8 and both
relaunched, and SLURM's pre-timeout SIGUSR1 (as launch/slurm_train.sbatch has torchrun forward it)."""

import json
import signal
import time

import pytest
import torch

from ..distributed._runs import ckpt_dir, events, load_dcp, local_metrics, records, step_values, train, train_state
from ._multinode import Cluster, alive, sbatch_env, two_nodes

pytestmark = pytest.mark.distributed

STEPS = 12  # _runs.FAST: stage 0 = steps 1-6, stage 1 = 7-12, a checkpoint every 3 steps
COMMON = ["parallel=hsdp", "logger.log_every=1"]  # every step in rank 0's live metrics: the drills key on it
TIMEOUT_MIN = 1  # parallel.timeout_min in the node-loss drill: the survivor must not wait for it


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One node, 2 ranks (torchrun --standalone), the mesh HSDP derives for 2 nodes x 1: dp_replicate=2."""
    run = tmp_path_factory.mktemp("reference")
    train(run, 2, *COMMON, "parallel.dp_replicate=2", timeout=300)
    rec = records(run)
    assert sorted(rec) == list(range(1, STEPS + 1))
    return run, rec


def _starts(run) -> list[dict]:
    return [e for e in events(run) if e["event"] == "start"]


def _assert_same_steps(ref: dict, rec: dict) -> None:
    assert sorted(rec) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert step_values(rec[s]) == step_values(ref[s]), f"step {s} differs"


def _resumed_step(start: dict, run) -> int:
    resumed = start["resumed_from"]
    assert resumed.startswith(str(run / "checkpoints" / "step_")), resumed
    return int(resumed.rsplit("_", 1)[1])


def _rank_of(ident) -> int:
    """A worker's global rank, from its environment (torchrun sets RANK)."""
    env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{ident[0]}/environ", "rb").read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"])


def test_two_nodes_train_and_checkpoint(reference, tmp_path):
    ref_run, ref = reference
    run = tmp_path / "run"
    t0 = time.monotonic()
    two_nodes(run, tmp_path / "logs", *COMMON)
    (start,) = _starts(run)
    assert start["world_size"] == 2 and start["mesh"] == [2, 1]  # 2 nodes x 1 rank: replicate across nodes
    _assert_same_steps(ref, records(run))  # losses, grad norm, LR, samples: every step, exactly
    ck = ckpt_dir(run, STEPS)
    assert (ck / "COMPLETE").exists() and train_state(ck)["step"] == STEPS and train_state(ck)["world_size"] == 2
    a, b = load_dcp(ck, tmp_path / "a"), load_dcp(ckpt_dir(ref_run, STEPS), tmp_path / "b")
    keys = [k for k in a if k.startswith(("model.", "ema."))]
    assert len(keys) > 50 and any(k.startswith("ema.") for k in keys)
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    print(f"[multinode] 2 nodes x 1 rank (c10d): {STEPS} steps equal the 1-node 2-rank run, "
          f"{len(keys)} model/EMA tensors equal, {time.monotonic() - t0:.0f}s")


def test_node_loss_fails_fast_then_relaunch_resumes_exactly(reference, tmp_path):
    _, ref = reference
    run, logs = tmp_path / "run", tmp_path / "logs"
    drill = [f"parallel.timeout_min={TIMEOUT_MIN}"]
    with Cluster(run, logs, *drill, *COMMON) as c:
        c.wait_logged(8)
        c.refresh_workers()
        assert [len(n.workers) for n in c.nodes] == [1, 1], c.tails()
        # lose the node that runs global rank 0 (metrics, the COMPLETE marker): agent and worker, SIGKILL
        victim = next(n for n in c.nodes if _rank_of(next(iter(n.workers))) == 0)
        (survivor,) = [n for n in c.nodes if n is not victim]
        t0 = time.monotonic()
        killed = c.kill_node(victim)
        assert len(killed) == 1  # its one worker, by (pid, start time)
        (rc,) = c.wait(timeout=TIMEOUT_MIN * 60 + 30, nodes=[survivor])
        took = time.monotonic() - t0
        assert rc != 0, survivor.tail()
        assert took < TIMEOUT_MIN * 60 / 4, f"survivor took {took:.1f}s (timeout {TIMEOUT_MIN} min)\n{c.tails()}"
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        time.sleep(0.5)
        assert not any(alive(w) for n in c.nodes for w in n.workers), c.tails()  # no orphaned rank on either node
    last = max(json.loads(line)["step"] for line in local_metrics(run).read_text().splitlines() if line.strip())
    assert 8 <= last < STEPS  # killed mid-run
    two_nodes(run, logs, *drill, *COMMON)  # both nodes relaunched: resume=auto, the newest COMPLETE checkpoint
    first, again = _starts(run)
    resumed = _resumed_step(again, run)
    assert resumed in (6, 9) and first["resumed_from"] == "none"  # step 9's save only if it finished before the kill
    _assert_same_steps(ref, records(run))  # the steps before the kill and every step after the resume
    assert (ckpt_dir(run, STEPS) / "COMPLETE").exists()
    print(f"[multinode] node of rank 0 SIGKILLed after step {last}: survivor exited {rc} in {took:.1f}s "
          f"(timeout_min={TIMEOUT_MIN}); relaunch resumed at step {resumed}, steps 1-{STEPS} equal the reference")


def test_sigusr1_to_both_agents_saves_and_resumes_exactly(reference, tmp_path):
    """SLURM's --signal=USR1@120 signals each node's job step: here, each agent, with the variables
    launch/slurm_train.sbatch exports (PET_SIGNALS_TO_HANDLE lists SIGUSR1, so torchrun forwards it)."""
    _, ref = reference
    run, logs = tmp_path / "run", tmp_path / "logs"
    sb = sbatch_env()
    assert "SIGUSR1" in sb["PET_SIGNALS_TO_HANDLE"].split(",")
    # no periodic checkpoint: the one the resume starts from is the signal's
    with Cluster(run, logs, *COMMON, "checkpoint.every=0", **sb) as c:
        c.wait_logged(4)
        t0 = time.monotonic()
        for n in c.nodes:
            n.proc.send_signal(signal.SIGUSR1)
        rcs = c.wait(timeout=int(sb["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) + 60)
        took = time.monotonic() - t0
        c.refresh_workers()
        assert not any(alive(w) for n in c.nodes for w in n.workers)
    logs_text = c.tails()
    # torchrun re-raises the forwarded signal as its SignalException: exit 1 on every node (the sbatch
    # requeues on any non-zero exit), after the trainer itself finished cleanly (its run summary)
    assert rcs == [1, 1], f"exit codes {rcs}\n{logs_text}"
    for n in c.nodes:
        assert f"got signal: {int(signal.SIGUSR1)}" in n.log.read_text(), logs_text
    assert took < int(sb["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]), logs_text  # the ranks saved; torchrun never SIGKILLed
    assert "closing signal SIGKILL" not in logs_text
    rec = records(run)
    stop = max(rec)
    assert 4 <= stop < STEPS and sorted(rec) == list(range(1, stop + 1))
    saves = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saves == [ckpt_dir(run, stop).name]  # written synchronously at the step it stopped
    assert (ckpt_dir(run, stop) / "COMPLETE").exists() and train_state(ckpt_dir(run, stop))["step"] == stop
    sig = [e for e in events(run) if e["event"].startswith("signal ")]
    assert [(e["step"], e["event"]) for e in sig] == [(stop, "signal SIGUSR1: saving and exiting")]
    assert any(f'"step": {stop}, "checkpoint": "{ckpt_dir(run, stop)}"' in n.log.read_text() for n in c.nodes)
    two_nodes(run, logs, *COMMON, **sb)  # the requeued job: both nodes again
    assert _resumed_step(_starts(run)[1], run) == stop
    _assert_same_steps(ref, records(run))
    print(f"[multinode] SIGUSR1 to both agents after step 4: stopped and saved at step {stop}, exit codes {rcs} "
          f"in {took:.1f}s; the relaunch resumed there, steps 1-{STEPS} equal the reference")
