"""Attention modules of the training DiT.

Parameter names match diffusers' `MotifVideoAttention` / `MotifVideoCrossAttention` so that
state dicts are interchangeable. Unlike the diffusers processors, RoPE tables may be per
sample (`(B, S, Dh)`), which TREAD routing needs: each sample keeps its own token subset.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_backends import attend

Rope = tuple[torch.Tensor, torch.Tensor]


def _qk_norm(kind: str | None, head_dim: int, eps: float) -> nn.Module | None:
    if kind == "rms_norm":
        return nn.RMSNorm(head_dim, eps=eps)
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=eps)
    return None


def _init_qkv(m: nn.Module, dim: int, heads: int, head_dim: int, qk_norm: str | None, eps: float) -> None:
    """The q/k/v projections and per-head q/k norms, under diffusers' names."""
    inner = heads * head_dim
    m.heads = heads
    m.to_q = nn.Linear(dim, inner)
    m.to_k = nn.Linear(dim, inner)
    m.to_v = nn.Linear(dim, inner)
    m.norm_q = _qk_norm(qk_norm, head_dim, eps)
    m.norm_k = _qk_norm(qk_norm, head_dim, eps)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*Dh) -> (B, S, H, Dh)."""
    return x.unflatten(-1, (heads, -1))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved pairs of `x` (B, S, H, Dh) by cos/sin tables (S, Dh) or (B, S, Dh).

    Same arithmetic as diffusers' `apply_rotary_emb(use_real=True, unbind_dim=-1)`, computed
    in fp32 and cast back, so outputs match the inference model bit for bit. The tables are
    fp32 (FSDP2 must not cast them: `cast_forward_inputs=False` in distributed/parallelize.py);
    a bf16 table would put a 2^-9 relative error on every rotation angle's cos/sin.
    """
    cos, sin = rope
    cos = cos[None, :, None] if cos.dim() == 2 else cos[:, :, None]  # (B|1, S, 1, Dh)
    sin = sin[None, :, None] if sin.dim() == 2 else sin[:, :, None]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, S, H, Dh/2)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(3)  # (B, S, H, Dh)
    return (x.float() * cos + x_rot.float() * sin).to(x.dtype)


class MotifAttention(nn.Module):
    """Joint self-attention over [video; context].

    Dual-stream blocks (`context_proj=True`) give the context its own projections
    (`add_*_proj`, `to_add_out`); single-stream blocks (`pre_only=True`) project the
    concatenated sequence with one set and leave the output projection to the block.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, qk_norm: str | None, eps: float = 1e-6,
                 context_proj: bool = False, pre_only: bool = False, backend: str = "sdpa") -> None:
        super().__init__()
        inner = heads * head_dim
        _init_qkv(self, dim, heads, head_dim, qk_norm, eps)
        self.backend = backend
        # Context parallelism (distributed/context_parallel.apply_cp): the CPGroup, and whether the
        # context is sequence-sharded video (DDT decoder) rather than replicated text / image tokens.
        self.cp = None
        self.cp_ctx_sharded = False
        self.to_out = None if pre_only else nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if context_proj:
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)
        else:
            self.add_q_proj = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = split_heads(self.to_q(x), self.heads)  # (B, S, H, Dh)
        k = split_heads(self.to_k(x), self.heads)
        v = split_heads(self.to_v(x), self.heads)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask, rope: Rope | None):
        """x (B, N, D) video (RoPE'd), ctx (B, L, D) context (no RoPE); mask: `KeyMasks.joint`
        for this layout (attention_backends.build_key_masks) or None.

        Returns (x_out (B, N, Dinner), ctx_out (B, L, Dinner), (k, v) of the context (B, L, H, Dh)).
        The context K/V are returned so a tied cross-attention can reuse them for free.
        """
        n = x.shape[1]
        if self.add_q_proj is None:
            q, k, v = self._qkv(torch.cat([x, ctx], dim=1))  # (B, N+L, H, Dh)
            if rope is not None:
                q = torch.cat([apply_rope(q[:, :n], rope), q[:, n:]], dim=1)
                k = torch.cat([apply_rope(k[:, :n], rope), k[:, n:]], dim=1)
            ctx_kv = (k[:, n:], v[:, n:])
        else:
            q, k, v = self._qkv(x)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            cq = self.norm_added_q(split_heads(self.add_q_proj(ctx), self.heads))
            ck = self.norm_added_k(split_heads(self.add_k_proj(ctx), self.heads))
            cv = split_heads(self.add_v_proj(ctx), self.heads)
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
            ctx_kv = None  # context K/V come from add_*_proj: not what the cross-attention ties to
        if self.cp is None:
            out = attend(q, k, v, mask, self.backend)  # (B, N+L, Dinner)
            x_out, ctx_out = out[:, :n], out[:, n:]
        else:
            x_out, ctx_out = self._attend_cp(q, k, v, n, mask)
        if self.to_out is not None:
            x_out = self.to_out[1](self.to_out[0](x_out))
        if self.add_q_proj is not None:
            ctx_out = self.to_add_out(ctx_out)
        return x_out, ctx_out, ctx_kv

    def _attend_cp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, mask):
        """Ulysses: q / k / v (B, n+L, H, Dh) with this rank's n = N'/cp video tokens (N' = N padded to
        a multiple of cp by the model; `mask` hides the pad keys) -> attention over all N' + L tokens
        for H/cp heads -> (x_out (B, n, Dinner), ctx_out (B, L, Dinner))."""
        cp = self.cp

        def to_heads(t: torch.Tensor) -> torch.Tensor:  # (B, n+L, H, Dh) -> (B, N'+L, H/cp, Dh)
            c = t[:, n:]
            c = cp.seq_to_heads(c) if self.cp_ctx_sharded else cp.local_heads(c)
            return torch.cat([cp.seq_to_heads(t[:, :n]), c], dim=1)

        out = attend(to_heads(q), to_heads(k), to_heads(v), mask, self.backend)  # (B, N'+L, H/cp*Dh)
        out = out.unflatten(-1, (self.heads // cp.size, -1))  # (B, N'+L, H/cp, Dh)
        big_n = n * cp.size
        x_out = cp.heads_to_seq(out[:, :big_n])  # (B, n, H, Dh)
        c = out[:, big_n:]
        ctx_out = cp.heads_to_seq(c) if self.cp_ctx_sharded else cp.gather_heads(c)  # (B, L, H, Dh)
        return x_out.flatten(2), ctx_out.flatten(2)


class MotifCrossAttention(nn.Module):
    """Residual video->text cross-attention (Shared Cross-Attention when tied).

    With `tie(attn)` its `to_k`, `to_v`, `norm_k` become the self-attention's modules
    (same parameters); its own query and output projection stay separate, and the output
    projection starts at zero so a fresh block equals one without cross-attention.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, qk_norm: str | None, eps: float = 1e-6,
                 backend: str = "sdpa"):
        super().__init__()
        _init_qkv(self, dim, heads, head_dim, qk_norm, eps)
        self.backend = backend
        inner = heads * head_dim
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.tied = False

    def tie(self, attn: MotifAttention) -> None:
        self.to_k, self.to_v, self.norm_k = attn.to_k, attn.to_v, attn.norm_k
        self.tied = True

    def forward(self, x: torch.Tensor, txt: torch.Tensor | None, txt_mask, rope: Rope | None,
                txt_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, Dinner) query source; txt (B, T, D) normed text; txt_mask: `KeyMasks.cross` or None.

        `txt_kv` (B, T, H, Dh) pairs, when given, are the tied projections already computed by
        the self-attention and are used instead of projecting `txt` again. Returns (B, N, D).
        """
        q = split_heads(self.to_q(x), self.heads)  # (B, N, H, Dh)
        if txt_kv is None:
            k = split_heads(self.to_k(txt), self.heads)  # (B, T, H, Dh)
            v = split_heads(self.to_v(txt), self.heads)
            if self.norm_k is not None:
                k = self.norm_k(k)
        else:
            k, v = txt_kv
        if self.norm_q is not None:
            q = self.norm_q(q)
        if rope is not None:
            q = apply_rope(q, rope)
        out = attend(q, k, v, txt_mask, self.backend)  # (B, N, Dinner)
        return self.to_out[1](self.to_out[0](out))
