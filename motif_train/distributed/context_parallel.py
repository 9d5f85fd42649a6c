"""Ulysses context parallelism (`parallel.cp`): the video sequence split across the ranks of a
`cp` group, heads split inside attention.

Outside attention every CP rank holds N'/cp video tokens (linear layers, norms, MLPs, RoPE on its
slice), where N' is the video token count N padded up to a multiple of cp: any bucket works. Inside
a joint attention two all-to-alls swap the split: sequence-sharded q / k / v (B, N'/cp, H, Dh)
become head-sharded (B, N', H/cp, Dh), attention runs over the whole sequence for H/cp heads, and
the output goes back. The text / image context is the same on every CP rank (replicated, it is
small): its heads are sliced locally, no communication, and its attention output is all-gathered
over heads. The video -> text cross-attention needs nothing: each rank's queries see all text keys.
In the DDT decoder the context is the encoder's video output, itself sequence-sharded (and padded),
so it takes the all-to-all path too.

Padding (`CPGroup.pad`, in `MotifDiT.forward`; TREAD's K kept tokens are padded the same way inside
a route): the N' - N pad tokens follow the real ones, their key is masked in every attention
(`attention_backends.build_key_masks(video_pad=)` / `decoder_key_masks`), a pad query's output is
never read, and the gathered output and REPA tokens are cut back to the real N (or K) before they
are returned. So pad values reach no real token and no gradient, and nothing counts them as tokens
(FLOPs and token counts come from the batch's shapes). The pad amount is known from shapes: no host
read, one static shape per bucket.

Gradients: every collective here is autograd-aware (`_functional_collectives`). The model's output
and REPA tokens are all-gathered, so every CP rank computes the same loss; the all-gather's
backward sums the cp identical gradients, and FSDP, which averages over dp_shard x cp, divides
them back: the step equals the unsharded one (tests/distributed/test_context_parallel.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

# The model's heads (12 for the 2B preset) must split evenly: cp in 2, 3, 4, 6 there. The sequence
# need not: it is padded to a multiple of cp.


def padded_len(n: int, cp: int) -> int:
    """`n` tokens rounded up to a multiple of `cp`: the sequence the CP ranks split."""
    return -(-n // cp) * cp


class CPGroup:
    """The context-parallel process group a model's sequence is split over (rank, size, group)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def __deepcopy__(self, memo) -> CPGroup:  # a process group is not copied with the module
        return self

    # ---- sequence split ---------------------------------------------------------------------
    def pad(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`t` zero-padded at the end of `dim` to a multiple of cp (itself when it already is); the
        caller masks the pad as keys and drops it from what it returns."""
        extra = padded_len(t.shape[dim], self.size) - t.shape[dim]
        if extra == 0:
            return t
        return torch.cat([t, t.new_zeros(*t.shape[:dim], extra, *t.shape[dim + 1:])], dim=dim)

    def chunk(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1/cp of `t` along `dim` (no communication); `t` is already padded."""
        n = t.shape[dim]
        if n % self.size:
            raise ValueError(f"parallel.cp={self.size}: chunk got a sequence of {n} tokens, not a multiple of "
                             f"{self.size}; pad it first (CPGroup.pad, as MotifDiT.forward does) and mask the pad")
        return t.narrow(dim, self.rank * (n // self.size), n // self.size)

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All CP ranks' chunks of `t` concatenated along `dim`, in rank order (autograd: backward sums)."""
        moved = t.movedim(dim, 0).contiguous()
        full = funcol.all_gather_single_autograd(moved, 0, self.group)  # (cp * n, ...)
        return full.movedim(0, dim)

    # ---- Ulysses all-to-alls ----------------------------------------------------------------
    def seq_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S/cp, H, Dh) sequence-sharded -> (B, S, H/cp, Dh) head-sharded."""
        b, s, h, d = t.shape
        cp = self.size
        send = t.reshape(b, s, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # (cp, B, S/cp, H/cp, Dh)
        recv = funcol.all_to_all_single_autograd(send.flatten(), None, None, self.group)
        recv = recv.view(cp, b, s, h // cp, d)  # chunk j: rank j's tokens, this rank's heads
        return recv.permute(1, 0, 2, 3, 4).reshape(b, cp * s, h // cp, d)

    def heads_to_seq(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, H/cp, Dh) head-sharded -> (B, S/cp, H, Dh) sequence-sharded."""
        b, s, hh, d = t.shape
        cp = self.size
        send = t.reshape(b, cp, s // cp, hh, d).permute(1, 0, 2, 3, 4).contiguous()  # (cp, B, S/cp, H/cp, Dh)
        recv = funcol.all_to_all_single_autograd(send.flatten(), None, None, self.group)
        recv = recv.view(cp, b, s // cp, hh, d)  # chunk j: rank j's heads of this rank's tokens
        return recv.permute(1, 2, 0, 3, 4).reshape(b, s // cp, cp * hh, d)

    def local_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, H, Dh) replicated -> this rank's (B, L, H/cp, Dh) (no communication)."""
        hh = t.shape[2] // self.size
        return t[:, :, self.rank * hh:(self.rank + 1) * hh]

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, H/cp, Dh) -> (B, L, H, Dh) over the CP ranks (autograd: backward sums)."""
        b, length, hh, d = t.shape
        full = funcol.all_gather_single_autograd(t.contiguous(), 0, self.group)  # (cp * B, L, H/cp, Dh)
        return full.view(self.size, b, length, hh, d).permute(1, 2, 0, 3, 4).reshape(b, length, self.size * hh, d)


def check_cp_degree(cp: int, heads: int, key: str = "parallel.cp") -> None:
    """Raise, naming the key, for a degree the model's heads cannot be split by."""
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"{key}={cp!r} must be an int >= 1 (1: no context parallelism)")
    if heads % cp:
        ok = [d for d in range(2, heads + 1) if heads % d == 0]
        raise ValueError(f"{key}={cp}: Ulysses splits the {heads} attention heads evenly across the CP ranks; use "
                         f"one of {ok} (or 1)")


def apply_cp(model: nn.Module, group: dist.ProcessGroup | None) -> CPGroup | None:
    """Split the model's video sequence over `group` in place (None or a 1-rank group: off).

    Sets the `CPGroup` on the model (sequence split, gathers) and on every attention module
    (all-to-alls), and marks the DDT decoder's attentions, whose context is sharded video.
    """
    if group is None or dist.get_world_size(group) == 1:
        return None
    cp = CPGroup(group)
    check_cp_degree(cp.size, model.config.num_attention_heads)
    model.cp = cp
    enc_single = model.config.num_encoder_single
    for i, blk in enumerate([*model.transformer_blocks, *model.single_transformer_blocks]):
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        inner.attn.cp = cp
        inner.attn.cp_ctx_sharded = i >= model.config.num_layers + enc_single  # decoder: ctx = encoder video
    return cp


@contextlib.contextmanager
def cp_disabled(model: nn.Module):
    """Run the model unsplit for a while (validation sampling: each rank samples its own prompt over
    the whole sequence; FSDP still gathers parameters in lockstep), then restore the split."""
    cp = getattr(model, "cp", None)
    if cp is None:
        yield
        return
    attns = [m for m in model.modules() if hasattr(m, "cp_ctx_sharded")]
    model.cp = None
    for m in attns:
        m.cp = None
    try:
        yield
    finally:
        model.cp = cp
        for m in attns:
            m.cp = cp


def ulysses_bytes(n_video: int, n_ctx: int, dim: int, cp: int, *, ctx_sharded: bool = False,
                  dtype_bytes: int = 2) -> float:
    """Bytes one CP rank sends in one joint attention's forward: q, k, v to heads and the output
    back (four all-to-alls of its (N'/cp, dim) slice, N' = `n_video` padded to a multiple of cp,
    (cp-1)/cp of which leaves the rank), plus the replicated context's output all-gather (its
    (n_ctx, dim/cp) heads to cp-1 peers), or the context's own four all-to-alls when it is sharded
    (and padded) video (DDT decoder). Backward sends the same again; selective AC's recompute sends
    nothing (the collectives' outputs are saved)."""
    if cp == 1:
        return 0.0
    out = 4 * (padded_len(n_video, cp) / cp) * dim * dtype_bytes * (cp - 1) / cp
    if ctx_sharded:
        return out + 4 * (padded_len(n_ctx, cp) / cp) * dim * dtype_bytes * (cp - 1) / cp
    return out + n_ctx * (dim / cp) * dtype_bytes * (cp - 1)
