"""Apply activation checkpointing, torch.compile and FSDP2 to the DiT, block by block.

Order (torchtitan's): AC wraps each block, compile compiles each (wrapped) block, then
`fully_shard` makes each block an FSDP unit and the root the last one. Tied Shared
Cross-Attention parameters live inside their block, so they stay in that block's unit.

AC modes (`parallel.ac`): `none`; `full` (every block recomputed in backward); `every_k`
(every k-th block); `selective` (every block, but the outputs of the fused attention ops are
kept, so backward recomputes only the linear layers / norms / RoPE around them: at 720p
attention is most of a block's FLOPs and a small part of its activations).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .mesh import AC_MODES, ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [model.transformer_blocks, model.single_transformer_blocks]


def _aten_ops(names: tuple[str, ...]) -> frozenset:
    # Looked up by name so a torch build without one of them (e.g. no cuDNN attention) still imports.
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


# The fused SDPA forwards F.scaled_dot_product_attention dispatches to: flash / efficient / cuDNN on
# CUDA, `_flash_attention_for_cpu` on CPU (torch 2.13 picks it for fp32 and bf16, with or without
# our bool mask). Each returns (out, logsumexp, ...), all of which its backward needs. The math
# fallbacks are composite (they decompose into bmm/softmax before a dispatch mode sees them), so
# listing them is harmless; when SDPA falls back to math, attention is simply recomputed.
SDPA_OPS = _aten_ops((
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps",
))


def save_attention_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective-AC policy: keep the SDPA outputs, recompute everything else.

    PREFER (not MUST) recompute, so torch.compile's partitioner may still keep a cheap tensor when
    that saves memory traffic.
    """
    return CheckpointPolicy.MUST_SAVE if func in SDPA_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """`context_fn` for `torch.utils.checkpoint`: fresh (forward, recompute) modes per call."""
    return create_selective_checkpoint_contexts(save_attention_policy)


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> int:
    """Wrap blocks in activation checkpointing in place; returns how many were wrapped.

    `full` and `selective` wrap every block, `every_k` every `every`-th one (absolute index 0, k,
    2k, ...). The wrapper is non-reentrant, so the tied cross-attention K/V (one module under two
    names) and TREAD's gather/scatter (outside the blocks) need nothing special.
    """
    if mode not in AC_MODES:
        raise ValueError(f"parallel.ac={mode!r}: use one of {', '.join(AC_MODES)}")
    if mode == "none":
        return 0
    # Dropout is 0 in every block, so no RNG state needs replaying in the recompute.
    kw = {"context_fn": selective_context_fn} if mode == "selective" else {}
    idx, n = 0, 0
    for blocks in _block_lists(model):
        for i, blk in enumerate(blocks):
            if mode != "every_k" or idx % every == 0:
                blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False, **kw)
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
    """The FSDP2 policy for `cfg`, with `cast_forward_inputs=False`.

    FSDP2's default casts every floating forward input to `param_dtype`: the timestep at the
    root (bf16 turns 998.7 into 1000.0) and the fp32 RoPE tables at every block. The model
    instead casts its activations to the parameter dtype at its entry (`MotifDiT.forward`) and
    keeps the timestep, its sinusoidal features and RoPE in fp32, as diffusers' inference does.
    """
    param = cfg.param_dtype
    if param == "auto":
        param = "bfloat16" if device.type == "cuda" else "float32"
    reduce = "float32" if cfg.reduce_dtype == "auto" else cfg.reduce_dtype
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[reduce], cast_forward_inputs=False)


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


def parallelize_model(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device, *,
                      mp: MixedPrecisionPolicy | None = None) -> dict:
    """AC -> compile -> FSDP2, per `cfg`. Returns a summary for logging.

    `mp` replaces the policy `mixed_precision(cfg, device)` would build (tests compare policies).
    """
    n_ac = apply_ac(model, cfg.ac, cfg.ac_every)
    compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compile_on:
        apply_compile(model)
    mp = mp or mixed_precision(cfg, device)
    apply_fsdp(model, mesh, mp, reshard_after_forward=cfg.reshard_after_forward)
    return {"ac": cfg.ac, "ac_blocks": n_ac, "compile": compile_on, "param_dtype": str(mp.param_dtype),
            "reduce_dtype": str(mp.reduce_dtype), "mesh": tuple(mesh.shape)}
