"""Two "nodes" on one machine: one `launch/train.sh` (torchrun agent, c10d rendezvous) per node rank,
each agent in a process group of its own, output to files, under hard deadlines. Anything still
running when a helper gives up (or a test fails) is SIGKILLed: agents and workers, group by group."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed._runs import FAST, REPO, env, local_metrics, workers

TRAIN_SH = REPO / "launch" / "train.sh"
SBATCH = REPO / "launch" / "slurm_train.sbatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch_env() -> dict[str, str]:
    """What launch/slurm_train.sbatch exports for torchrun's signal handling (read from the script, so
    a drill follows the script as it is): the signals torchrun forwards, how long it waits for them."""
    text = SBATCH.read_text()
    (signals,) = re.findall(r'^export PET_SIGNALS_TO_HANDLE="([^"]+)"', text, flags=re.M)
    (grace,) = re.findall(r'^export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="\$\{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)\}"',
                          text, flags=re.M)
    return {"PET_SIGNALS_TO_HANDLE": signals, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": grace}


@dataclass
class Node:
    rank: int
    proc: subprocess.Popen
    log: Path
    workers: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time) of each worker seen

    def tail(self, n: int = 4000) -> str:
        return f"--- node {self.rank} (rc {self.proc.poll()}) {self.log}:\n" + self.log.read_text(errors="replace")[-n:]


def _identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks) of a live process: a pid alone may be reused once it exits."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] == "Z" else (pid, int(fields[19]))


def alive(ident: tuple[int, int]) -> bool:
    return _identity(ident[0]) == ident


def _kill_group(ident: tuple[int, int], sig: int = signal.SIGKILL) -> None:
    """SIGKILL a worker's process group (it leads a session of its own), only while it is still the
    process we saw: never a reused pid."""
    if alive(ident):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ident[0], sig)


class Cluster:
    """`with Cluster(run_dir, logs) as c:` launches both nodes; leaving the block (normally or by an
    exception) SIGKILLs whatever of them is still alive, so no test leaves processes behind."""

    def __init__(self, run_dir: Path, logs: Path, *overrides: str, nnodes: int = 2, nproc: int = 1, **env_extra):
        self.run_dir, self.nodes = run_dir, []
        port = free_port()
        logs.mkdir(parents=True, exist_ok=True)
        args = [*FAST, f"run_dir={run_dir}", *overrides]
        for rank in range(nnodes):
            e = env(NNODES=nnodes, NODE_RANK=rank, NPROC_PER_NODE=nproc, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                    RDZV_ID=f"motif-test-{port}", PYTHON=sys.executable, **env_extra)
            log = logs / f"node{rank}-{port}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen([str(TRAIN_SH), *args], cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self.nodes.append(Node(rank, proc, log))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()

    def tails(self) -> str:
        return "\n".join(n.tail() for n in self.nodes)

    def refresh_workers(self) -> None:
        for n in self.nodes:
            if n.proc.poll() is None:
                n.workers |= {i for i in map(_identity, workers(n.proc)) if i}

    def kill_node(self, node: Node, sig: int = signal.SIGKILL) -> list[tuple[int, int]]:
        """The node's agent and every worker it started, group by group (the workers are found as the
        agent's children: torchrun starts them in sessions of their own, so the agent's group misses them)."""
        if node.proc.poll() is None:
            self.refresh_workers()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.proc.pid, sig)  # the agent leads its group (start_new_session) and is not reaped
        for ident in node.workers:
            _kill_group(ident, sig)
        return sorted(node.workers)

    def kill_all(self) -> None:
        for n in self.nodes:
            self.kill_node(n)
        for n in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=10)

    def wait_for(self, cond, timeout: float, what: str) -> None:
        """Poll `cond()` until true; past the deadline, or if a node exits first, kill all and fail."""
        deadline, polls = time.monotonic() + timeout, 0
        while not cond():
            if polls % 20 == 0:  # every 2 s: the workers each agent started (for kill_node / kill_all)
                self.refresh_workers()
            polls += 1
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.kill_all()
                why = f"node {dead[0].rank} exited ({dead[0].proc.returncode})" if dead else f"not after {timeout}s"
                raise AssertionError(f"waiting for {what}: {why}\n{self.tails()}")
            time.sleep(0.1)

    def wait_logged(self, step: int, timeout: float = 300) -> None:
        """Until rank 0's live metrics copy has `step` (needs logger.log_every dividing it)."""
        path = local_metrics(self.run_dir)

        def logged() -> bool:
            return path.exists() and f'"step": {step},' in path.read_text()

        self.wait_for(logged, timeout, f"step {step} in {path}")

    def wait(self, timeout: float = 300, nodes: list[Node] | None = None) -> list[int]:
        """Every (given) node's exit code, all under one deadline; past it, kill all and fail."""
        deadline = time.monotonic() + timeout
        for n in nodes or self.nodes:
            try:
                n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                raise AssertionError(f"node {n.rank} still running after {timeout}s (all killed)\n"
                                     f"{self.tails()}") from None
        return [n.proc.returncode for n in nodes or self.nodes]


def two_nodes(run_dir: Path, logs: Path, *overrides: str, timeout: float = 300, **env_extra) -> Cluster:
    """Launch both nodes and wait for both to exit 0."""
    with Cluster(run_dir, logs, *overrides, **env_extra) as c:
        rcs = c.wait(timeout)
        assert rcs == [0, 0], f"exit codes {rcs}\n{c.tails()}"
    return c
