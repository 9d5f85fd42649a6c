"""Apply activation checkpointing, torch.compile and FSDP2 to the DiT, block by block.

Per block: compile replaces the block's `forward`, AC wraps the block, `fully_shard` makes the
(wrapped) block an FSDP unit, and the root the last one. FSDP's hooks and the checkpoint stay
eager around the compiled forward. Tied Shared Cross-Attention parameters live inside their block,
so they stay in that block's unit.

AC modes (`parallel.ac`): `none`; `full` (every block recomputed in backward); `every_k`
(every k-th block); `selective` (every block, but the outputs of the fused attention ops are
kept, so backward recomputes only the linear layers / norms / RoPE around them: at 720p
attention is most of a block's FLOPs and a small part of its activations).

Compile (`parallel.compile`, `parallel.compile_dynamic`): one `torch.compile(fullgraph=True)`
function per block CLASS (`DualStreamBlock.forward`, `SingleStreamBlock.forward`), so each class
has its own dynamo cache; blocks of one class share graphs. Inputs are made contiguous first (the
model hands blocks slices such as `h[:, :n]`, whose strides would otherwise be guarded on). A
graph is compiled the first time a block class sees a new *variant*: its sub-module structure
(with / without cross-attention), `mask` None vs `KeyMasks` (DDT decoder blocks; the trainer has
the objective keep the mask of unpadded micro-batches for compiled sdpa blocks, so that is not one),
RoPE (N, Dh) vs TREAD-gathered (B, K, Dh), the python `img_len` (0 vs the image-token count), a
dtype, or a dimension of size 1. With
`compile_dynamic=None` (default) the batch and sequence dims (video tokens N / kept K, context
L, mask) are marked dynamic from the first call, so a new bucket, a new text pad length
(`data.text_pad_to`) or new TREAD ids never recompile. `False`: static shapes, one graph per
variant x (bucket, text pad length, micro-batch size); `True`: `dynamic=True` (every dim).
"""

from __future__ import annotations

import functools
import types
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




def _kernel_ops() -> frozenset:
    """The other attention backends' kernels (model.attention_backend): FlexAttention's higher-order
    op (what a compiled flex call is; eager flex on CPU is a composite reference, so recomputed) and
    varlen's custom op (returns out + logsumexp)."""
    ops = []
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_hop

        ops.append(flex_hop)
    except ImportError:
        pass
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch.ops.torch_attn)

        ops.append(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError):
        pass
    return frozenset(ops)


ATTENTION_OPS = SDPA_OPS | _kernel_ops()
# Context parallelism's all-to-alls and head all-gathers (distributed/context_parallel.py): saved only
# with `parallel.ac_save_collectives` (then a recompute sends nothing: their outputs are what the saved
# attention read; the async collective's result is the wait's output). Off by default: the received
# q / k / v and the output's all-to-all are 4 x a rank's (N/cp, D) slice per attention, about twice the
# attention output selective AC keeps, so saving them cancels most of the memory cp is used to save
# (motif-dryrun, 2B at 480p x 81: 32.4 GiB of activations at cp=2 with them, 16.6 without, 31.8 at cp=1);
# re-sending them in the recompute costs the all-to-alls once more (~1 % of the attention time at 720p).
CP_COMM_OPS = frozenset(getattr(torch.ops._c10d_functional, n).default
                        for n in ("all_to_all_single", "all_gather_into_tensor", "wait_tensor")
                        if hasattr(torch.ops._c10d_functional, n))


def save_attention_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective-AC policy: keep the attention kernels' outputs, recompute everything else.

    PREFER (not MUST) recompute, so torch.compile's partitioner may still keep a cheap tensor when
    that saves memory traffic.
    """
    return CheckpointPolicy.MUST_SAVE if func in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def save_attention_and_collectives_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """`save_attention_policy` that also keeps CP's collective outputs (`parallel.ac_save_collectives`)."""
    saved = func in ATTENTION_OPS or func in CP_COMM_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn(save_collectives: bool = False):
    """`context_fn` for `torch.utils.checkpoint`: fresh (forward, recompute) modes per call."""
    policy = save_attention_and_collectives_policy if save_collectives else save_attention_policy
    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: nn.Module, mode: str, every: int = 2, *, save_collectives: bool = False) -> int:
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
    kw = {"context_fn": functools.partial(selective_context_fn, save_collectives)} if mode == "selective" else {}
    idx, n = 0, 0
    for blocks in _block_lists(model):
        for i, blk in enumerate(blocks):
            if mode != "every_k" or idx % every == 0:
                blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False, **kw)
                n += 1
            idx += 1
    return n


# One compiled function per (block class, torch.compile options): dynamo keeps its cache on the code
# object, so DualStreamBlock and SingleStreamBlock get separate caches and recompile limits.
_COMPILED: dict = {}


def _compiled_forward(cls: type, opts: tuple):
    key = (cls, opts)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(cls.forward, **dict(opts))
    return _COMPILED[key]


def _mark(t: torch.Tensor | None, dims: tuple[int, ...], contiguous: bool = True) -> torch.Tensor | None:
    if t is None:
        return None
    if contiguous:
        t = t.contiguous()
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d % t.dim())
    return t


def _mark_masks(mask, dynamic: bool):
    """`KeyMasks` fields: tensors (sdpa's (B, 1, 1, S) bias, varlen's (B*S,) / (B+1,) `VarlenKeys`) get
    their batch / key dims marked; they are not made contiguous (the bias is a 16-aligned view on
    purpose). A FlexAttention BlockMask passes as it is (its shapes follow the bucket: static)."""
    if mask is None or not dynamic:
        return mask

    def mark(m):
        if isinstance(m, torch.Tensor):
            return _mark(m, (0, -1) if m.dim() > 1 else (0,), contiguous=False)
        if isinstance(m, tuple) and hasattr(m, "_fields"):  # VarlenKeys
            return type(m)(*(mark(t) for t in m))
        return m

    return mark(mask)


def _block_forward(self, x, ctx, temb, mask, rope, img_len=0):
    """Installed as a compiled block's `forward` (a bound method, so deepcopy rebinds it): contiguous
    inputs, batch / sequence dims marked dynamic (`compile_dynamic=None`), then the class's graph."""
    if self._motif_mark_dynamic:
        x, ctx, temb = _mark(x, (0, 1)), _mark(ctx, (0, 1)), _mark(temb, (0,))
        if rope is not None:
            rope = tuple(_mark(r, (0, 1) if r.dim() == 3 else (0,)) for r in rope)
    else:
        x, ctx, temb = x.contiguous(), ctx.contiguous(), temb.contiguous()
        rope = None if rope is None else tuple(r.contiguous() for r in rope)
    mask = _mark_masks(mask, self._motif_mark_dynamic)
    return self._motif_compiled(self, x, ctx, temb, mask, rope, img_len)


def apply_compile(model: nn.Module, dynamic: bool | None = None, **kwargs) -> None:
    """Compile each block's forward in place (module and parameter names unchanged), before or after
    `apply_ac`. `dynamic`: `parallel.compile_dynamic` (module docstring); `kwargs` go to
    `torch.compile` (`backend=...`; `fullgraph=True` unless given)."""
    kwargs.setdefault("fullgraph", True)
    opts = tuple(sorted({**kwargs, "dynamic": dynamic}.items(), key=lambda kv: kv[0]))
    # Variants per class are few (module docstring); the limit only guards against a runaway.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for blocks in _block_lists(model):
        for blk in blocks:
            inner = getattr(blk, "_checkpoint_wrapped_module", blk)
            inner._motif_compiled = _compiled_forward(type(inner), opts)
            inner._motif_mark_dynamic = dynamic is None
            inner.forward = types.MethodType(_block_forward, inner)


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
    once); forcing `reshard_after_forward` on it frees parameters backward is about to use. The last
    block is never resharded after forward for the same reason (as torchtitan does): backward starts
    with it, so resharding would free its parameters only to all-gather them again at once. That
    costs one block's unsharded parameters kept through the loss, and saves one all-gather per step.
    """
    blocks = [blk for group in _block_lists(model) for blk in group]
    for i, blk in enumerate(blocks):
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


# Our blocks return slices of one tensor (video / context halves). FSDP2 warns that an in-place op
# on such a view would skip its pre-backward hook; nothing downstream modifies block outputs in
# place (routing scatters out of place), so the warning is noise here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def parallelize_model(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device, *,
                      mp: MixedPrecisionPolicy | None = None) -> dict:
    """compile -> AC -> FSDP2, per `cfg`. Returns a summary for logging.

    `mp` replaces the policy `mixed_precision(cfg, device)` would build (tests compare policies).
    """
    compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compile_on:
        apply_compile(model, dynamic=cfg.compile_dynamic, backend=cfg.compile_backend)
    n_ac = apply_ac(model, cfg.ac, cfg.ac_every, save_collectives=cfg.ac_save_collectives)
    mp = mp or mixed_precision(cfg, device)
    apply_fsdp(model, mesh, mp, reshard_after_forward=cfg.reshard_after_forward)
    return {"ac": cfg.ac, "ac_blocks": n_ac, "compile": compile_on, "compile_backend": cfg.compile_backend,
            "param_dtype": str(mp.param_dtype), "reduce_dtype": str(mp.reduce_dtype), "mesh": tuple(mesh.shape)}
