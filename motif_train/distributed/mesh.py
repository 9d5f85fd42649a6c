"""Process group and DeviceMesh from the world: 1-D FSDP or 2-D HSDP (replicate x shard)."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

# parallel.ac values (distributed/parallelize.py: apply_ac).
AC_MODES = ("none", "full", "every_k", "selective")
# The H200's 141 GB of HBM3e as the driver exposes it: nvidia-smi reports 143,771 MiB = 140.4 GiB (the
# figure docs/scaling.md uses). The dry run compares its tracked per-rank peak against this.
H200_GIB = 140.4


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class ParallelConfig:
    """Data-parallel layout and precision.

    dp_replicate x dp_shard must equal the world size. -1 means "derive": dp_replicate=-1
    replicates across nodes (world / LOCAL_WORLD_SIZE) so parameters are sharded within a node
    only; dp_shard=-1 takes whatever is left.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    # Ulysses context parallelism (distributed/context_parallel.py): consecutive ranks of a node split
    # each sample's video sequence; FSDP shards over dp_shard x cp. It must divide the attention heads.
    cp: int = 1
    param_dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (no bf16 units)
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True
    ac: str = "none"  # none | full | every_k | selective
    ac_every: int = 2
    # selective AC under parallel.cp: also keep CP's all-to-all / gather outputs, so the recompute sends
    # nothing, for ~2x the attention's held bytes per rank (false: re-send them; distributed/parallelize.py)
    ac_save_collectives: bool = False
    compile: bool | None = None  # None: on for GPU, off for CPU
    compile_dynamic: bool | None = None  # None: batch/sequence dims dynamic; False: static; True: all dims
    # torch.compile backend of the blocks: inductor (GPU kernels); aot_eager traces the same forward and
    # backward graphs and runs them eagerly (the CPU contract suite, or bisecting an inductor bug)
    compile_backend: str = "inductor"
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    timeout_min: int = 30
    init_timeout_min: int = 5  # minutes start-up waits for every rank to join; training then gets timeout_min
    # dry run (motif-dryrun): the world to fake in one CPU process; None outside a dry run
    simulate_world: int | None = None  # ranks of the simulated run, e.g. 64 (8 nodes x 8 GPUs)
    simulate_local: int | None = None  # GPUs per node of the simulated run; None: 8, or simulate_world if smaller
    gpu_memory_gib: float = H200_GIB  # per-GPU memory the dry run's tracked peak must fit (default: an H200)

    def __post_init__(self) -> None:
        if self.ac not in AC_MODES:
            raise ValueError(f"parallel.ac={self.ac!r}: use one of {', '.join(AC_MODES)} (selective: save the "
                             "attention outputs, recompute the rest of each block)")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"parallel.compile_backend={self.compile_backend!r}: use one of "
                             f"{', '.join(COMPILE_BACKENDS)}")
        if self.ac_every < 1:
            raise ValueError(f"parallel.ac_every={self.ac_every} must be >= 1")
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) not in ("auto", "float32", "bfloat16", "float16"):
                raise ValueError(f"parallel.{key}={getattr(self, key)!r}: use auto, float32, bfloat16 or float16")
        if isinstance(self.cp, bool) or not isinstance(self.cp, int) or self.cp < 1:
            raise ValueError(f"parallel.cp={self.cp!r} must be an int >= 1 (1: no context parallelism)")
        if self.dp_replicate == 0 or self.dp_shard == 0 or self.dp_replicate < -1 or self.dp_shard < -1:
            raise ValueError("parallel.dp_replicate / parallel.dp_shard must be positive or -1 (derive)")
        if isinstance(self.timeout_min, bool) or not isinstance(self.timeout_min, int) or self.timeout_min < 1:
            raise ValueError(f"parallel.timeout_min={self.timeout_min!r} must be an int >= 1 (minutes a collective "
                             "may wait before the rank aborts)")
        if (isinstance(self.init_timeout_min, bool) or not isinstance(self.init_timeout_min, int)
                or self.init_timeout_min < 1):
            raise ValueError(f"parallel.init_timeout_min={self.init_timeout_min!r} must be an int >= 1 (minutes "
                             "start-up waits for every rank to join before it fails)")
        self._check_simulation()

    def _check_simulation(self) -> None:
        for key in ("simulate_world", "simulate_local"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"parallel.{key}={v!r} must be an int >= 1 (or null)")
        if self.simulate_local is not None and self.simulate_world is None:
            raise ValueError("parallel.simulate_local is set but parallel.simulate_world is null; set both (e.g. "
                             "parallel.simulate_world=64 parallel.simulate_local=8)")
        if self.simulate_world is not None and self.simulate_world % self.local_world_simulated:
            raise ValueError(f"parallel.simulate_world={self.simulate_world} is not a whole number of nodes of "
                             f"parallel.simulate_local={self.local_world_simulated} GPUs; use a multiple of it")
        if not 0 < self.gpu_memory_gib < float("inf"):
            raise ValueError(f"parallel.gpu_memory_gib={self.gpu_memory_gib!r} must be a finite number > 0 (GiB of "
                             f"one GPU; an H200 is {H200_GIB})")

    @property
    def local_world_simulated(self) -> int:
        """GPUs per node of the simulated world (`simulate_local`, else 8 or the whole world if smaller)."""
        if self.simulate_local is not None:
            return self.simulate_local
        return min(8, self.simulate_world or 8)

    @property
    def timeout(self) -> datetime.timedelta:
        """The collective timeout every process group of the run gets."""
        return datetime.timedelta(minutes=self.timeout_min)

    def degrees(self, world: int, local_world: int) -> tuple[int, int]:
        """Data-parallel (replicate, shard) for this world: replicate x shard x cp = world. Raises naming
        the keys when they do not multiply out or a CP group would span nodes."""
        cp = self.cp
        if cp > 1 and (world % cp or local_world % cp):
            raise ValueError(f"parallel.cp={cp} must divide the GPUs per node ({local_world}) and the world ({world}): "
                             "a CP group's all-to-alls stay inside one node")
        dp_world = world // cp
        rep = self.dp_replicate if self.dp_replicate != -1 else max(1, world // max(1, local_world))
        if self.dp_shard == -1:
            if dp_world % rep:
                raise ValueError(f"parallel.dp_replicate={rep} does not divide the data-parallel size {dp_world} "
                                 f"(world {world} / parallel.cp {cp})")
            shard = dp_world // rep
        else:
            shard = self.dp_shard
        if rep * shard * cp != world:
            raise ValueError(f"parallel.dp_replicate ({rep}) x parallel.dp_shard ({shard}) x parallel.cp ({cp}) = "
                             f"{rep * shard * cp} but the world size is {world}; set one of them to -1 to derive it")
        return rep, shard


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flight_recorder_env(run_dir: str | os.PathLike, environ=os.environ) -> dict[str, str]:
    """The NCCL flight-recorder variables still to set for a run in `run_dir` (set them before the
    first NCCL process group: torch reads them when it creates one).

    torch dumps to /tmp/nccl_trace_rank_<rank> by default, which is gone with the node when a managed
    job is torn down and recovered on new ones; under <run_dir>/flight_recorder/ the dumps outlive the
    cluster and sit next to the run's logs (docs/troubleshooting.md reads them). torch 2.13's names
    are used (the older TORCH_NCCL_TRACE_BUFFER_SIZE / TORCH_NCCL_DEBUG_INFO_TEMP_FILE still work but
    warn); a variable the launcher already set, under either name, is left alone.
    """
    prefix = os.path.join(os.path.abspath(run_dir), "flight_recorder", "rank_")
    wanted = {("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"): "2000",  # 2000: torch 2.13's default
              ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"): prefix,
              ("TORCH_NCCL_DUMP_ON_TIMEOUT",): "1"}
    return {names[0]: value for names, value in wanted.items() if not any(n in environ for n in names)}


def run_device_type(device: str = "auto") -> str:
    """`train.device` as the device type a run gets: "cuda" or "cpu" (auto: CUDA when present)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    return "cuda" if use_cuda else "cpu"


def init_distributed(backend: str = "auto", timeout_min: int = 30, device: str = "auto", *,
                     init_timeout_min: int = 5, run_dir: str | os.PathLike | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's env, or a 1-rank group without it.

    gloo on CPU, nccl on GPU (`backend="auto"`). Idempotent. The group is created with the short
    `init_timeout_min` (`parallel.init_timeout_min`): it bounds the rendezvous (the store, gloo's
    connections, NCCL's unique-id exchange), so a node that never comes up fails the launch in
    minutes, not after the training timeout. Then the group and the store get `timeout_min`
    (`parallel.timeout_min`) for training. With NCCL and a `run_dir`, the flight recorder is pointed
    at <run_dir>/flight_recorder/ first (`flight_recorder_env`).
    """
    use_cuda = run_device_type(device) == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m motif_train.cli.train`: a 1-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        if run_dir is not None and "nccl" in backend:
            fr = flight_recorder_env(run_dir)
            if "TORCH_FR_DUMP_TEMP_FILE" in fr:  # torch does not create the folder; every node needs it
                os.makedirs(os.path.dirname(fr["TORCH_FR_DUMP_TEMP_FILE"]), exist_ok=True)
            os.environ.update(fr)
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=init_timeout_min), **kw)
        train_timeout = datetime.timedelta(minutes=timeout_min)
        # The store keeps the init timeout too: lazily created communicators (NCCL sub-groups) and
        # store-based waits later in the run may legitimately wait longer than a start-up.
        dist.distributed_c10d._get_default_store().set_timeout(train_timeout)
        dist.distributed_c10d._set_pg_timeout(train_timeout, dist.group.WORLD)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), device=dev)


def build_mesh(cfg: ParallelConfig, info: DistInfo) -> DeviceMesh:
    """The FSDP mesh: 1-D ("dp_shard",) or 2-D ("dp_replicate", "dp_shard") for HSDP, where the shard
    dim spans dp_shard x cp ranks (context-parallel ranks shard the parameters too).

    `init_device_mesh` would create sub-groups (2-D, or gloo on a CUDA host) with the backend's
    default timeout (10 min NCCL, 30 min gloo) instead of `parallel.timeout_min`, so the groups are
    built here with the configured one (1-D: the default group itself) and wrapped with `from_group`.
    """
    rep, shard = cfg.degrees(info.world_size, info.local_world_size)
    shard *= cfg.cp
    if rep == 1:
        return DeviceMesh.from_group(dist.group.WORLD, info.device.type, mesh_dim_names=("dp_shard",))
    grid = torch.arange(info.world_size).view(rep, shard)
    replicate, _ = dist.new_subgroups_by_enumeration([grid[:, j].tolist() for j in range(shard)], timeout=cfg.timeout)
    sharded, _ = dist.new_subgroups_by_enumeration([grid[i].tolist() for i in range(rep)], timeout=cfg.timeout)
    return DeviceMesh.from_group([replicate, sharded], info.device.type, mesh=grid,
                                 mesh_dim_names=("dp_replicate", "dp_shard"))


def build_cp_group(cfg: ParallelConfig, info: DistInfo) -> dist.ProcessGroup | None:
    """This rank's context-parallel group (ranks k*cp .. k*cp+cp-1, inside a node), None for cp=1.
    Collective: every rank calls it."""
    if cfg.cp == 1:
        return None
    groups = [list(range(k * cfg.cp, (k + 1) * cfg.cp)) for k in range(info.world_size // cfg.cp)]
    group, _ = dist.new_subgroups_by_enumeration(groups, timeout=cfg.timeout)
    return group


def group_timeout(group) -> datetime.timedelta | None:
    """The timeout a process group's backend was created with (None when it does not say)."""
    for dev in (torch.device("cuda"), torch.device("cpu")):
        try:
            return group._get_backend(dev).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def gather_lists(items: list, dst: int = 0) -> list[list] | None:
    """Every rank's `items` on rank `dst` (a list per rank, in rank order), None elsewhere.

    A gather, not an all-gather: only `dst` needs them. Collective: call it on every rank, and only
    on steps where some rank has something to send (decide that from an existing all-reduce)."""
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(list(items), out, dst=dst)
    return out


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
