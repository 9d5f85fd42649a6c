"""Analytic FLOPs of the Motif DiT, per sample, for any config, shape, text length and route.

Convention (the one MFU uses): a matmul of (m, k) x (k, n) costs 2mkn; the backward pass
costs twice the forward (input and weight gradients), except where the input needs no
gradient (the patch embedding, the text projection, the timestep MLP's first layer), where
it costs once. Attention's backward is twice its forward (no recompute counted). This is
what `torch.utils.flop_counter.FlopCounterMode` reports on the real model with the math
SDPA backend (`count_with_flop_counter`): the tests hold the two equal (ratio 1 within 1e-6).

What MFU counts (docs/training.md#mfu): the model FLOPs of what each micro-batch actually ran
(`model_flops` with the text length, the SigLIP tokens the objective fed, 0 for a T2V
micro-batch even when the batch carries them, the route and the REPA head), forward and
backward. The frozen REPA teacher's forward (`teacher_forward_flops`) is work the step does but
not model FLOPs: the trainer logs it apart (`teacher_flops`, `perf/teacher_flops_share`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import MotifDiTConfig, RoutingConfig
from .routing import num_kept


@dataclass
class FlopBreakdown:
    """Forward FLOPs split into linear (incl. conv) and attention matmuls, plus the backward."""

    linear_fwd: float = 0.0
    attn_fwd: float = 0.0
    bwd: float = 0.0
    per_block: list[float] = field(default_factory=list)  # forward FLOPs of each block

    @property
    def fwd(self) -> float:
        return self.linear_fwd + self.attn_fwd

    @property
    def total(self) -> float:
        return self.fwd + self.bwd


def latent_shape(frames: int, height: int, width: int, *, t_down: int = 4, s_down: int = 8) -> tuple[int, int, int]:
    """Pixel clip (frames, height, width) -> Wan VAE latent (F, H, W)."""
    if (frames - 1) % t_down:
        raise ValueError(f"frames={frames} must be 1+{t_down}k for the Wan VAE")
    if height % (2 * s_down) or width % (2 * s_down):
        raise ValueError(f"height={height}, width={width} must be divisible by {2 * s_down}")
    return 1 + (frames - 1) // t_down, height // s_down, width // s_down


def num_video_tokens(config: MotifDiTConfig, latent: tuple[int, int, int]) -> int:
    f, h, w = latent
    return (f // config.patch_size_t) * (h // config.patch_size) * (w // config.patch_size)


class _Acc:
    def __init__(self) -> None:
        self.lin = self.attn = self.bwd = 0.0

    def linear(self, rows: float, fan_in: int, fan_out: int, *, input_grad: bool = True) -> float:
        f = 2.0 * rows * fan_in * fan_out
        self.lin += f
        self.bwd += f * (2.0 if input_grad else 1.0)
        return f

    def attention(self, sq: float, sk: float, dim: int) -> float:
        f = 4.0 * sq * sk * dim  # QK^T and AV
        self.attn += f
        self.bwd += 2.0 * f
        return f


def model_flops(config: MotifDiTConfig, latent: tuple[int, int, int], *, text_len: int = 512,
                image_len: int = 0, routing: RoutingConfig | None = None, repa: bool = False) -> FlopBreakdown:
    """FLOPs of one training sample (batch 1) with `latent` = (F, H, W) latent frames / size.

    `routing` defaults to none (inference / eval); pass `config.routing` for training.
    `image_len` = number of SigLIP tokens (I2V), 0 for T2V. `repa` adds the projector head.
    """
    c = config
    d, dm = c.inner_dim, int(c.inner_dim * c.mlp_ratio)
    n = num_video_tokens(c, latent)
    ctx = text_len + image_len
    r = routing if routing is not None and routing.enabled else None
    k = num_kept(n, r.ratio) if r else n
    acc = _Acc()

    # Embeddings (the decoder's query stream is a clone of the same patch embedding).
    acc.linear(n, c.in_channels * c.patch_size_t * c.patch_size ** 2, d, input_grad=False)
    acc.linear(text_len, c.text_embed_dim, d, input_grad=False)
    acc.linear(text_len, d, d)
    if image_len:
        acc.linear(image_len, c.image_embed_dim, c.image_embed_dim)
        acc.linear(image_len, c.image_embed_dim, d)
    acc.linear(1, 256, d, input_grad=False)
    acc.linear(1, d, d)

    per_block = []
    for idx in range(c.num_blocks):
        before = acc.lin + acc.attn
        v = k if r and r.start <= idx <= r.end else n  # video tokens in this block
        kind = c.block_kind(idx)
        if kind == "dual":
            acc.linear(1, d, 6 * d)
            acc.linear(1, d, 6 * d)
            for rows in (v, ctx):
                acc.linear(rows, d, 3 * d)  # q, k, v
                acc.linear(rows, d, d)  # out
                acc.linear(rows, d, dm)  # ff in
                acc.linear(rows, dm, d)  # ff out
            acc.attention(v + ctx, v + ctx, d)
            cross = c.enable_text_cross_attention_dual
        else:
            s = v + (ctx if kind == "single" else v)  # decoder context = encoder video tokens
            acc.linear(1, d, 3 * d)
            acc.linear(s, d, 3 * d)
            acc.linear(s, d, dm)
            acc.linear(s, d + dm, d)
            acc.attention(s, s, d)
            cross = kind == "single" and c.enable_text_cross_attention_single
        if cross:
            acc.linear(v, d, d)  # own query
            acc.linear(v, d, d)  # output projection
            acc.attention(v, text_len, d)
            if not (c.shared_kv and kind == "single"):  # tied K/V are reused from the self-attention
                acc.linear(text_len, d, 2 * d)
        if repa and idx == c.repa.block:
            acc.linear(v, d, c.repa.hidden_dim)
            acc.linear(v, c.repa.hidden_dim, c.repa.hidden_dim)
            acc.linear(v, c.repa.hidden_dim, c.repa.teacher_dim)
        per_block.append(acc.lin + acc.attn - before)

    acc.linear(1, d, 2 * d)  # norm_out modulation
    acc.linear(n, d, c.patch_size_t * c.patch_size ** 2 * c.out_channels)
    return FlopBreakdown(linear_fwd=acc.lin, attn_fwd=acc.attn, bwd=acc.bwd, per_block=per_block)


def teacher_forward_flops(config, frames: int, size: int) -> float:
    """Forward FLOPs of one sample through the V-JEPA 2 encoder (the REPA teacher, no backward).

    `config`: the teacher's `VJEPA2Config` (hidden_size, num_hidden_layers, mlp_ratio,
    patch_size, tubelet_size, in_chans); input (3, frames, size, size), frames a multiple of the
    tubelet. Counted like `model_flops`: the 3-D patch convolution, q / k / v / out and the
    two MLP matmuls per layer, 4·N²·D of attention; norms, RoPE and biases are not matmuls.
    """
    d = int(config.hidden_size)
    dm = int(d * config.mlp_ratio)
    t, p = int(config.tubelet_size), int(config.patch_size)
    n = (frames // t) * (size // p) ** 2
    conv = 2.0 * n * (int(config.in_chans) * t * p * p) * d
    per_layer = 2.0 * n * d * d * 4 + 2.0 * n * d * dm * 2 + 4.0 * n * n * d
    return conv + int(config.num_hidden_layers) * per_layer


def count_with_flop_counter(config: MotifDiTConfig, latent: tuple[int, int, int], *, text_len: int = 512,
                            image_len: int = 0, routing: RoutingConfig | None = None,
                            backward: bool = True) -> int:
    """Measured FLOPs of one real forward (+ backward) of `MotifDiT` on fake tensors.

    Nothing is allocated, so the full 2B model at 720p x 121 frames runs on a laptop. The
    math SDPA backend is forced because CPU's fused attention kernel has no FLOP formula.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .dit import MotifDiT

    c = MotifDiTConfig(**{**config.to_dict(), "routing": routing or RoutingConfig(ratio=0.0)})
    f, h, w = latent
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = MotifDiT(c)
        model.train(routing is not None and routing.enabled)
        x = torch.randn(1, c.in_channels, f, h, w)
        t = torch.rand(1) * 1000
        txt = torch.randn(1, text_len, c.text_embed_dim)
        img = torch.randn(1, image_len, c.image_embed_dim) if image_len else None
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = model(x, t, txt, image_embeds=img).sample
            if backward:
                out.backward(torch.ones_like(out))
    return counter.get_total_flops()
