"""torch.distributed plumbing: process group + mesh, FSDP2, activation checkpointing, compile.

Nothing here imports the trainer; each `apply_*` changes a model in place.
"""

from .mesh import DistInfo, ParallelConfig, build_mesh, destroy_distributed, init_distributed
from .parallelize import apply_ac, apply_compile, apply_fsdp, parallelize_model

__all__ = ["DistInfo", "ParallelConfig", "apply_ac", "apply_compile", "apply_fsdp", "build_mesh",
           "destroy_distributed", "init_distributed", "parallelize_model"]
