"""Apply activation checkpointing, torch.compile and FSDP2 to the DiT, block by block.

Order (torchtitan's): AC wraps each block, compile compiles each (wrapped) block, then
`fully_shard` makes each block an FSDP unit and the root the last one. Tied Shared
Cross-Attention parameters live inside their block, so they stay in that block's unit.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .mesh import ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [model.transformer_blocks, model.single_transformer_blocks]


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> int:
    """Checkpoint every block (`full`) or every `every`-th block (`every_k`). Returns how many."""
    if mode == "none":
        return 0
    idx, n = 0, 0
    for blocks in _block_lists(model):
        for i, blk in enumerate(blocks):
            if mode == "full" or idx % every == 0:
                blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)
                n += 1
            idx += 1
    return n


def apply_compile(model: nn.Module, **kwargs) -> None:
    """`torch.compile` each block in place (module names unchanged). Shapes change only with the
    bucket, and TREAD keeps K fixed per shape, so routing adds no recompiles."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for blocks in _block_lists(model):
        for blk in blocks:
            blk.compile(**kwargs)


def mixed_precision(cfg: ParallelConfig, device: torch.device) -> MixedPrecisionPolicy:
    param = cfg.param_dtype
    if param == "auto":
        param = "bfloat16" if device.type == "cuda" else "float32"
    reduce = "float32" if cfg.reduce_dtype == "auto" else cfg.reduce_dtype
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[reduce])


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy, *,
               reshard_after_forward: bool = True) -> None:
    """fully_shard each block, then the root (embedders, norm_out, proj_out, REPA head).

    The root is left to FSDP's own heuristic (kept unsharded after forward: backward needs it at
    once); forcing `reshard_after_forward` on it frees parameters backward is about to use.
    """
    for blocks in _block_lists(model):
        for blk in blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)


# Our blocks return slices of one tensor (video / context halves). FSDP2 warns that an in-place op
# on such a view would skip its pre-backward hook; nothing downstream modifies block outputs in
# place (routing scatters out of place), so the warning is noise here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def parallelize_model(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> dict:
    """AC -> compile -> FSDP2, per `cfg`. Returns a summary for logging."""
    n_ac = apply_ac(model, cfg.ac, cfg.ac_every)
    compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compile_on:
        apply_compile(model)
    mp = mixed_precision(cfg, device)
    apply_fsdp(model, mesh, mp, reshard_after_forward=cfg.reshard_after_forward)
    return {"ac_blocks": n_ac, "compile": compile_on, "param_dtype": str(mp.param_dtype),
            "reduce_dtype": str(mp.reduce_dtype), "mesh": tuple(mesh.shape)}
