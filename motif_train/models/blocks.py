"""Transformer blocks of the training DiT (parameter names = diffusers' Motif blocks).

Every block has the call signature ``block(x, ctx, temb, mask, rope, img_len) -> (x, ctx)``
so the model can walk all 36 blocks in one loop and FSDP / activation checkpointing /
compile can wrap each block the same way. `mask` is the `KeyMasks` of the block's sequence
layout (built once per forward by the model, in the attention backend's form) or None.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from torch import nn

from .attention import MotifAttention, MotifCrossAttention, Rope
from .attention_backends import KeyMasks


def _joint(mask: KeyMasks | None):
    return None if mask is None else mask.joint


def _cross(mask: KeyMasks | None):
    return None if mask is None else mask.cross


class DualStreamBlock(nn.Module):
    """Separate video / context weights, joint attention (diffusers `MotifVideoTransformerBlock`)."""

    def __init__(self, heads: int, head_dim: int, mlp_ratio: float, *, qk_norm: str | None,
                 norm_type: str, cross_attention: bool, shared_kv: bool, backend: str = "sdpa") -> None:
        super().__init__()
        dim = heads * head_dim
        self.norm1 = AdaLayerNormZero(dim, norm_type=norm_type)
        self.norm1_context = AdaLayerNormZero(dim, norm_type=norm_type)
        self.attn = MotifAttention(dim, heads, head_dim, qk_norm=qk_norm, context_proj=True, backend=backend)
        self.cross_attn = (MotifCrossAttention(dim, heads, head_dim, qk_norm=qk_norm, backend=backend)
                           if cross_attention else None)
        if self.cross_attn is not None and shared_kv:
            self.cross_attn.tie(self.attn)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.ff_context = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, mask: KeyMasks | None,
                rope: Rope | None, img_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) video, ctx (B, L, D) [image; text], temb (B, D)."""
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)  # (B, N, D)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, emb=temb)
        attn_out, ctx_attn_out, _ = self.attn(nx, nc, _joint(mask), rope)  # (B, N, D), (B, L, D)
        x = x + attn_out * gate_msa.unsqueeze(1)
        if self.cross_attn is not None:
            x = x + self.cross_attn(attn_out, nc[:, img_len:], _cross(mask), rope)
        ctx = ctx + ctx_attn_out * c_gate_msa.unsqueeze(1)

        nx = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        nc = self.norm2_context(ctx) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * self.ff(nx)  # (B, N, D)
        ctx = ctx + c_gate_mlp.unsqueeze(1) * self.ff_context(nc)  # (B, L, D)
        return x, ctx


class SingleStreamBlock(nn.Module):
    """One set of weights over [video; context] (diffusers `MotifVideoSingleTransformerBlock`).

    In the encoder it carries the Shared Cross-Attention; in the DDT decoder `x` is the
    decoder stream and `ctx` the encoder's video output.
    """

    def __init__(self, heads: int, head_dim: int, mlp_ratio: float, *, qk_norm: str | None,
                 norm_type: str, cross_attention: bool, shared_kv: bool, backend: str = "sdpa") -> None:
        super().__init__()
        dim = heads * head_dim
        mlp_dim = int(dim * mlp_ratio)
        self.attn = MotifAttention(dim, heads, head_dim, qk_norm=qk_norm, pre_only=True, backend=backend)
        self.cross_attn = (MotifCrossAttention(dim, heads, head_dim, qk_norm=qk_norm, backend=backend)
                           if cross_attention else None)
        if self.cross_attn is not None and shared_kv:
            self.cross_attn.tie(self.attn)
        self.norm = AdaLayerNormZeroSingle(dim, norm_type=norm_type)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, mask: KeyMasks | None,
                rope: Rope | None, img_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D), ctx (B, L, D), temb (B, D); mask `KeyMasks` or None."""
        n = x.shape[1]
        h = torch.cat([x, ctx], dim=1)  # (B, N+L, D)
        nh, gate = self.norm(h, emb=temb)
        mlp = self.act_mlp(self.proj_mlp(nh))  # (B, N+L, Dmlp)
        attn_out, ctx_attn_out, ctx_kv = self.attn(nh[:, :n], nh[:, n:], _joint(mask), rope)  # (B, N, D), (B, L, D)
        if self.cross_attn is not None:
            # Tied K/V: the text keys/values of the self-attention are exactly the cross-attention's.
            txt_kv = (ctx_kv[0][:, img_len:], ctx_kv[1][:, img_len:]) if self.cross_attn.tied else None
            attn_out = attn_out + self.cross_attn(attn_out, nh[:, n + img_len:], _cross(mask), rope, txt_kv)
        out = torch.cat([torch.cat([attn_out, ctx_attn_out], dim=1), mlp], dim=2)  # (B, N+L, D+Dmlp)
        h = h + gate.unsqueeze(1) * self.proj_out(out)
        return h[:, :n], h[:, n:]
