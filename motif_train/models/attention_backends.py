"""Attention kernels and the key-padding forms each one takes (`model.attention_backend`).

Only keys are ever padded here: the joint sequence is [video | image | text] and a micro-batch's
captions are zero-padded at the end of the text (`motif_train.batch.pad_text`); every real video and
image key is visible. Under context parallelism the video (and TREAD's kept subset) is padded to a
multiple of cp (`distributed/context_parallel.CPGroup.pad`): those pad keys sit after the real video
keys, [video | pad | image | text] (DDT decoder: [video | pad | encoder video | pad]), and are masked
like padded text. So a key-padding mask per sample is all the model needs (queries are never masked:
a pad query's output is dropped by the model), and it is built ONCE per forward and sequence layout
(full / TREAD-routed / decoder), never per attention call:

    sdpa    `F.scaled_dot_product_attention`. Unpadded calls get no mask (flash, or FA3 / FA4 with
            `model.flash_impl`); padded ones get an additive fp mask (B, 1, 1, Sk) in the compute
            dtype whose last dim is stored padded to a multiple of 16, so the mem-efficient kernel
            neither converts a bool mask nor re-pads it per call.
    flex    FlexAttention with a `BlockMask` made from the key mask directly (no (S, S) mask is
            ever materialised: 75k tokens at 720p): blocks wholly visible run unmasked, the one
            partial block per sample (text end, CP pad) runs the mask_mod, wholly padded blocks are
            skipped; any key pattern works, not only a suffix.
            Compiled on CUDA (eager flex materialises the scores); on CPU it is a forward-only
            reference (no backward there), used by the tests.
    varlen  `torch.nn.attention.varlen.varlen_attn` over packed keys (`VarlenKeys`): each sample's
            visible keys (wherever they sit: text suffix or CP pad in the middle) are gathered, in
            order, to the front of a (B*Sk, H, Dh) buffer, `cu_seq_k` = their running count; queries
            keep their (B*Sq) layout. The buffer keeps its static size (no data-dependent shape, no
            host read), and rows past the last segment are zeroed going in, so whatever the kernel
            leaves in their gradient never reaches a parameter. Trains
            (`seqused_k`, which would avoid the gather, is inference-only in torch 2.13). CUDA only;
            `flash_impl` (FA3 / FA4) replaces the flash kernel used here as well.

Every backend returns the same numbers (tests/unit/test_attention_backends.py, fp32/fp64 on
CPU); they differ in speed and in what a compiled graph sees.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "flex", "varlen")
FLASH_IMPLS = {"fa3": ("FA3", "flash_attn_3 (FlashAttention-3's hopper build: flash_attn_interface)"),
               "fa4": ("FA4", "flash-attn-4 (pip install flash-attn-4; Hopper / Blackwell)")}
FLEX_BLOCK = 128  # FlexAttention's default tile: the unit its BlockMask counts in


class VarlenKeys(NamedTuple):
    """varlen's key padding for one layout of B samples x Sk keys (built once per forward).

    index: (B*Sk,) int64 rows of the flattened keys, each sample's visible keys first, in order.
    valid: (B*Sk,) bool, True for the packed rows [0, cu_k[-1]) that belong to some sample.
    cu_k: (B+1,) int32 offsets of each sample's visible keys in the packed buffer.
    """

    index: torch.Tensor
    valid: torch.Tensor
    cu_k: torch.Tensor


class KeyMasks(NamedTuple):
    """Key padding in the backend's form for one sequence layout; None = nothing padded.

    joint: for the joint self-attention over [video | image | text] (keys N + I + T).
    cross: for the video -> text cross-attention (keys T).
    """

    joint: Any
    cross: Any


def check_backend(backend: str, flash_impl: str | None, device: torch.device | str | None = None) -> None:
    """Raise, naming the key and the fix, for a backend this build or device cannot run."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if flash_impl is not None and flash_impl not in FLASH_IMPLS:
        raise ValueError(f"model.flash_impl={flash_impl!r}: use null, {' or '.join(FLASH_IMPLS)}")
    if backend == "flex" and flash_impl is not None:
        raise ValueError(f"model.flash_impl={flash_impl} with model.attention_backend=flex: flash_impl replaces the "
                         "flash kernel of sdpa and varlen, FlexAttention runs its own, so it would do nothing; set "
                         "model.flash_impl=null or model.attention_backend=sdpa|varlen")
    if device is None:
        return
    dev = torch.device(device)
    if backend == "varlen" and dev.type != "cuda":
        raise ValueError(f"model.attention_backend=varlen runs flash kernels, CUDA only (device {dev}); use "
                         "model.attention_backend=sdpa on this device")
    if backend == "flex" and dev.type != "cuda":
        raise ValueError(f"model.attention_backend=flex: FlexAttention has no backward on CPU (device {dev}), so "
                         "it cannot train here; use model.attention_backend=sdpa (flex runs forward-only on CPU)")
    if flash_impl is not None and dev.type != "cuda":
        raise ValueError(f"model.flash_impl={flash_impl} is a CUDA kernel (device {dev}); set model.flash_impl=null")


def activate_flash_impl(flash_impl: str | None) -> None:
    """Route the flash kernel of SDPA and varlen to FA3 / FA4 (process-wide), or leave it.

    The kernels come from an optional package (`pip install -e .[fa4]` on a GPU machine); without
    it this raises naming the package rather than silently training on the default kernel.
    """
    if flash_impl is None:
        return
    name, package = FLASH_IMPLS[flash_impl]
    try:
        torch.nn.attention.activate_flash_attention_impl(name)
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(f"model.flash_impl={flash_impl} needs {package}: {e}. Install it on the GPU "
                           "machine or set model.flash_impl=null") from e


# --------------------------------------------------------------------------- mask builders


def _sdpa_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) bool -> additive (B, 1, 1, S) view of a (B, 1, 1, ceil16(S)) buffer: 0 / -inf."""
    b, s = key_mask.shape
    width = -(-s // 16) * 16  # the mem-efficient kernel wants 16-aligned mask strides
    bias = torch.full((b, 1, 1, width), float("-inf"), dtype=dtype, device=key_mask.device)
    bias[..., :s].masked_fill_(key_mask[:, None, None], 0.0)
    return bias[..., :s]


def varlen_keys(key_mask: torch.Tensor) -> VarlenKeys:
    """(B, Sk) bool key mask, any pattern -> `VarlenKeys`, on the mask's device, without a host read."""
    flat = key_mask.reshape(-1)  # (B*Sk,)
    index = torch.sort((~flat).to(torch.int8), stable=True).indices  # visible rows first, in order
    counts = key_mask.sum(-1, dtype=torch.int32)  # (B,)
    cu_k = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))  # (B+1,)
    valid = torch.arange(flat.shape[0], device=key_mask.device) < cu_k[-1]
    return VarlenKeys(index, valid, cu_k)


def prefix_block_mask(key_mask: torch.Tensor, q_len: int, block: int = FLEX_BLOCK):
    """(B, Sk) bool key mask -> FlexAttention `BlockMask` for Sq = `q_len` queries, O(B * blocks).

    A block of keys is FULL when every in-range key is visible (run without mask_mod), PARTIAL
    when some are (mask_mod reads `key_mask`), skipped when none are. No (Sq, Sk) tensor exists.
    Any visible pattern works (a text suffix, the CP pad after the video keys), not only a prefix.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, s = key_mask.shape
    nk, nq = -(-s // block), -(-q_len // block)
    padded = F.pad(key_mask, (0, nk * block - s), value=False).view(b, nk, block)
    visible = padded.sum(-1)  # (B, nk) visible keys per block
    in_range = torch.full((nk,), block, device=key_mask.device)
    in_range[-1] = s - (nk - 1) * block
    full = visible == in_range  # (B, nk)
    partial = (visible > 0) & ~full
    idx = torch.arange(nk, device=key_mask.device)

    def listing(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Selected block indices first (stable), as BlockMask expects; the rest is never read.
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices  # (B, nk)
        count = sel.sum(-1, dtype=torch.int32)  # (B,)
        return (count[:, None, None].expand(b, 1, nq).contiguous(),
                idx[order].to(torch.int32)[:, None, None].expand(b, 1, nq, nk).contiguous())

    kv_num, kv_idx = listing(partial)
    full_num, full_idx = listing(full)

    def mask_mod(bi, hi, qi, ki):
        return key_mask[bi, ki]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_len, s))


def _video_keys(batch: int, n_video: int, video_pad: int, device) -> torch.Tensor:
    """(B, n_video + video_pad) bool: the real video keys visible, the CP pad tail not."""
    return (torch.arange(n_video + video_pad, device=device) < n_video).expand(batch, -1)


def _joint_form(backend: str, key_mask: torch.Tensor, dtype: torch.dtype):
    """(B, Sk) bool key mask of a joint self-attention (queries = the same Sk tokens) -> backend form."""
    if backend == "sdpa":
        return _sdpa_bias(key_mask, dtype)
    if backend == "flex":
        return prefix_block_mask(key_mask, key_mask.shape[1])
    return varlen_keys(key_mask)


def build_key_masks(backend: str, text_mask: torch.Tensor | None, n_video: int, n_image: int,
                    dtype: torch.dtype, n_query: int | None = None, *, video_pad: int = 0, n_text: int = 0,
                    batch: int | None = None, device: torch.device | str | None = None) -> KeyMasks | None:
    """text_mask (B, T) bool (True = real token) or None -> `KeyMasks` for `n_video` video tokens.

    The joint keys are [video (n_video) | CP pad (video_pad) | image (n_image) | text (T)]; video and
    image keys are always visible. `video_pad`: invisible video keys after the real ones, which context
    parallelism appends to make the sequence a multiple of cp (`CPGroup.pad`); `n_text` (all real) /
    `batch` / `device` size that mask when `text_mask` is None. `n_query`: the cross-attention's video
    queries on this rank ((n_video + video_pad) / cp under context parallelism; default n_video).

    None when nothing is masked: `text_mask` is None (the objective passes None only when nothing is
    padded and the backend / compile setting allows the mask-free path) and there is no pad; `cross`
    is None whenever `text_mask` is (the text keys are then all real).
    """
    if text_mask is None and video_pad == 0:
        return None
    if text_mask is not None:
        text_mask = text_mask.to(torch.bool)
        batch, device = text_mask.shape[0], text_mask.device
    parts = [_video_keys(batch, n_video, video_pad, device)]
    n_visible = n_image + (0 if text_mask is not None else n_text)  # image (and unmasked text) keys
    if n_visible:
        parts.append(torch.ones(batch, n_visible, dtype=torch.bool, device=device))
    if text_mask is not None:
        parts.append(text_mask)
    joint = _joint_form(backend, torch.cat(parts, dim=1), dtype)  # (B, N+pad+I+T) keys
    if text_mask is None:
        return KeyMasks(joint, None)
    if backend == "sdpa":
        cross = _sdpa_bias(text_mask, dtype)
    elif backend == "flex":
        cross = prefix_block_mask(text_mask, n_query or n_video)
    else:
        cross = varlen_keys(text_mask)
    return KeyMasks(joint, cross)


def decoder_key_masks(backend: str, n_video: int, video_pad: int, batch: int, dtype: torch.dtype,
                      device: torch.device | str | None = None) -> KeyMasks | None:
    """The DDT decoder's keys [decoder video | encoder video], each `n_video` real tokens followed by
    `video_pad` CP pad ones (context parallelism) -> `KeyMasks` (no cross-attention there), or None
    when nothing is padded (the decoder never sees text)."""
    if video_pad == 0:
        return None
    video = _video_keys(batch, n_video, video_pad, device)
    return KeyMasks(_joint_form(backend, torch.cat([video, video], dim=1), dtype), None)


# --------------------------------------------------------------------------- kernels


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    # Inside a compiled block dynamo traces flex_attention itself; in eager on CUDA the compiled
    # wrapper is what runs the fused kernel. On CPU the eager reference is exact (tests).
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=block_mask)


def _varlen_attn(*args, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*args, **kwargs)


# The varlen kernel: torch's flash `varlen_attn` (CUDA). `kernel_reference.cpu_reference_kernels`
# swaps in a per-segment CPU reference with the same contract for the tests.
varlen_kernel = _varlen_attn


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: VarlenKeys | None) -> torch.Tensor:
    """(B, H, S, Dh) -> (B, H, Sq, Dh): one varlen segment per sample, its visible keys packed."""
    b, h, sq, dh = q.shape
    sk = k.shape[2]
    q, k, v = (t.transpose(1, 2).reshape(b * t.shape[2], h, dh) for t in (q, k, v))  # (B*S, H, Dh)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    if keys is None:  # nothing padded: every sample's keys are its own segment already
        cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device)
    else:
        cu_k = keys.cu_k
        # The tail rows [cu_k[-1], B*Sk) lie in no segment: zeroed, so their gradient (never written
        # by the kernel) is dropped by `where`'s backward instead of flowing into to_k / to_v.
        k, v = (t.index_select(0, keys.index).where(keys.valid[:, None, None], 0) for t in (k, v))
    out = varlen_kernel(q, k, v, cu_q, cu_k, sq, sk)  # (B*Sq, H, Dh)
    return out.view(b, sq, h, dh).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, backend: str = "sdpa") -> torch.Tensor:
    """q (B, Sq, H, Dh), k / v (B, Sk, H, Dh); `mask` from `build_key_masks` (or None).

    Returns (B, Sq, H*Dh) in q's dtype.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, Dh)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif backend == "flex":
        out = _flex(q, k, v, mask)
    elif backend == "varlen":
        out = _varlen(q, k, v, mask)
    else:
        raise ValueError(f"model.attention_backend={backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, Sq, H*Dh)
