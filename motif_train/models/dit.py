"""The Motif-Video DiT for training.

Same parameters and forward math as diffusers' `MotifVideoTransformer3DModel` (weights
load both ways with strict=True), plus what training needs: TREAD routing, a REPA
projector head, tied Shared Cross-Attention K/V reused from the self-attention, and a
block list uniform enough for FSDP2 / activation checkpointing / compile to wrap.

    latents (B,33,F,H,W) ──x_embedder──► video tokens (B,N,D) ─┬─────────────────────┐
    text (B,T,2560) ─context_embedder─┐                        │                     │ clone
    image (B,I,1152) ─image_embedder──┴► ctx (B,I+T,D)         │                     ▼
                                       dual blocks 0..11 ─► single encoder 12..27 ─► decoder 28..35
                                       (video ‖ ctx)        ([video; ctx] + X-attn)   (dec ‖ enc video)
                                                                                     │
                                                          norm_out ─► proj_out ─► velocity (B,16,F,H,W)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_motif_video import (
    MotifVideoConditionEmbedding,
    MotifVideoImageProjection,
    MotifVideoPatchEmbed,
    MotifVideoRotaryPosEmbed,
)
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._pytree import register_dataclass

from motif_train.utils import stable_seed

from .attention_backends import build_key_masks, decoder_key_masks
from .blocks import DualStreamBlock, SingleStreamBlock
from .config import MotifDiTConfig, RoutingConfig
from .routing import gather_rope, gather_tokens, sample_keep_ids, scatter_tokens


@dataclass
class DiTOutput:
    """sample: velocity (B, C_out, F, H, W).

    repa_tokens: projected video tokens (B, K, C_teacher) after `repa.block`, when asked.
    repa_ids: (B, K) indices of those tokens among the N video tokens in (f, h, w) raster
    order, or None when all N tokens are returned in order.
    keep_ids: (B, K) TREAD ids used in this forward, or None without routing.
    """

    sample: torch.Tensor
    repa_tokens: torch.Tensor | None = None
    repa_ids: torch.Tensor | None = None
    keep_ids: torch.Tensor | None = None


# A pytree node, so FSDP2 (pre-backward hooks, output casting), compile and AC see the tensors
# inside the model output instead of treating it as an opaque leaf.
register_dataclass(DiTOutput)


class RepaProjector(nn.Sequential):
    """REPA MLP: (.., D) -> (.., C_teacher) with two SiLU hidden layers of `hidden` units."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out))


def clean_module_name(name: str) -> str:
    """Module path without activation-checkpoint / compile wrapper segments."""
    return name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, keeping only this rank's shard of a DTensor."""
    if isinstance(p, DTensor):
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(full.to(p.dtype))


class MotifDiT(nn.Module):
    def __init__(self, config: MotifDiTConfig) -> None:
        super().__init__()
        self.config = c = copy.deepcopy(config)  # set_routing mutates it: never share with the caller
        d = c.inner_dim
        self.x_embedder = MotifVideoPatchEmbed((c.patch_size_t, c.patch_size, c.patch_size), c.in_channels, d)
        self.context_embedder = PixArtAlphaTextProjection(in_features=c.text_embed_dim, hidden_size=d)
        if c.image_embed_dim is not None:
            self.image_embedder = MotifVideoImageProjection(in_features=c.image_embed_dim, hidden_size=d)
        self.time_text_embed = MotifVideoConditionEmbedding(d)
        self.rope = MotifVideoRotaryPosEmbed(c.patch_size, c.patch_size_t, list(c.rope_axes_dim), c.rope_theta)
        block_kw = dict(qk_norm=c.qk_norm, norm_type=c.norm_type, shared_kv=c.shared_kv, backend=c.attention_backend)
        self.transformer_blocks = nn.ModuleList([
            DualStreamBlock(c.num_attention_heads, c.attention_head_dim, c.mlp_ratio,
                            cross_attention=c.enable_text_cross_attention_dual, **block_kw)
            for _ in range(c.num_layers)
        ])
        self.single_transformer_blocks = nn.ModuleList([
            SingleStreamBlock(c.num_attention_heads, c.attention_head_dim, c.mlp_ratio,
                              cross_attention=c.enable_text_cross_attention_single and i < c.num_encoder_single,
                              **block_kw)
            for i in range(c.num_single_layers)
        ])
        self.norm_out = AdaLayerNormContinuous(d, d, elementwise_affine=False, eps=1e-6, norm_type=c.norm_type)
        self.proj_out = nn.Linear(d, c.patch_size_t * c.patch_size * c.patch_size * c.out_channels)
        self.repa_projector = (RepaProjector(d, c.repa.hidden_dim, c.repa.teacher_dim)
                               if c.repa.block is not None else None)
        self.cp = None  # CPGroup when the video sequence is split (distributed/context_parallel.apply_cp)

    # ---- structure ---------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """All blocks in execution order; list index = absolute block index."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def set_routing(self, routing: RoutingConfig | None) -> None:
        """Switch the TREAD route (e.g. at a curriculum stage change); validated like the config."""
        routing = routing or RoutingConfig(ratio=0.0)
        old = self.config.routing
        self.config.routing = routing
        try:
            self.config.validate()
        except ValueError:
            self.config.routing = old
            raise

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Fresh-training init (DiT style): xavier linears, zero biases, zero AdaLN modulation, zero
        final projection and zero cross-attention output (so the block equals one without it).

        Each parameter is drawn in full from a generator seeded by (seed, its name) and, when the
        model is sharded (FSDP2 DTensors), only the local shard is kept: the result is the same for
        any world size and never needs the whole model on one rank.
        """
        zero = {"norm_out.linear", "proj_out"}
        for blk_list in ("transformer_blocks", "single_transformer_blocks"):
            for i, blk in enumerate(getattr(self, blk_list)):
                for name in ("norm1", "norm1_context", "norm"):
                    if hasattr(blk, name):
                        zero.add(f"{blk_list}.{i}.{name}.linear")
                if blk.cross_attn is not None:
                    zero.add(f"{blk_list}.{i}.cross_attn.to_out.0")
        normal = {"time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"}
        for mod_name, mod in self.named_modules():
            mod_name = clean_module_name(mod_name)
            for p_name, p in mod.named_parameters(recurse=False):
                full = torch.empty(p.shape, dtype=torch.float32, device=_local(p).device)
                g = torch.Generator(full.device).manual_seed(stable_seed(seed, f"{mod_name}.{p_name}"))
                if mod_name in zero or p_name == "bias":
                    full.zero_()
                elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                    full.fill_(1.0)
                elif mod_name in normal:
                    full.normal_(0.0, std, generator=g)
                else:  # Linear / Conv3d weights: xavier over (fan_out, fan_in)
                    nn.init.xavier_uniform_(full.view(full.shape[0], -1), generator=g)
                _assign(p, full)

    # ---- forward -----------------------------------------------------------------------
    def time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """timestep (B,) -> temb (B, D) in `dtype`.

        The timestep and its 256 sinusoidal features stay fp32 (bf16 has 8 mantissa bits: 998.7
        would become 1000.0); only the time MLP's input is cast, as in diffusers'
        `MotifVideoConditionEmbedding`.
        """
        emb = self.time_text_embed
        proj = emb.time_proj(timestep.float())  # (B, 256) fp32
        return emb.timestep_embedder(proj.to(dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        *,
        return_repa: bool = False,
        route: bool | None = None,
        generator: torch.Generator | None = None,
        keep_ids: torch.Tensor | None = None,
    ) -> DiTOutput:
        """hidden_states (B, C_in, F, H, W) = cat(x_t, cond, mask); timestep (B,) = 1000 σ;
        encoder_hidden_states (B, T, C_text); encoder_attention_mask (B, T) or None;
        image_embeds (B, I, C_img) or None (T2V).

        `route` defaults to `self.training`: TREAD runs in training only; `keep_ids` (B, K)
        replays a given token subset instead of drawing one. Returns `DiTOutput`.
        """
        c = self.config
        b, _, f, h, w = hidden_states.shape
        p, pt = c.patch_size, c.patch_size_t
        # Compute dtype = the parameters' (under FSDP2 the unsharded param_dtype copies, which are the
        # registered parameters during forward). Activations are cast here rather than by FSDP's
        # `cast_forward_inputs`, which would also round the timestep and the RoPE tables to bf16.
        dtype = self.x_embedder.proj.weight.dtype
        rope = self.rope(hidden_states)  # 2 x (N, Dh), fp32 whatever the compute dtype
        temb = self.time_embedding(timestep, dtype)  # (B, D)
        x = self.x_embedder(hidden_states.to(dtype))  # (B, N, D)
        ctx = self.context_embedder(encoder_hidden_states.to(dtype))  # (B, T, D)
        img_len = 0
        if image_embeds is not None:
            img = self.image_embedder(image_embeds.to(dtype))  # (B, I, D)
            img_len = img.shape[1]
            ctx = torch.cat([img, ctx], dim=1)  # (B, I+T, D)
        n = x.shape[1]
        dec = x.clone() if c.num_decoder_layers > 0 else None  # DDT query stream: fresh patch embedding

        r = c.routing
        routed = (self.training if route is None else route) and r.enabled
        ids = None
        if routed:
            ids = keep_ids if keep_ids is not None else sample_keep_ids(b, n, r.ratio, device=x.device,
                                                                        generator=generator)
        if return_repa and self.repa_projector is None:
            raise ValueError("return_repa=True but the model has no REPA head: set model.repa.block")

        # Context parallelism (distributed/context_parallel.py): the video tokens (and their RoPE
        # rows) are zero-padded to N' = a multiple of cp, this rank keeps 1/cp of them; the pad keys
        # are masked in every attention and the pad rows cut off whatever is gathered back (output,
        # REPA, a TREAD route's end). `pad` / `full` / `local` are identities without CP.
        cp = self.cp

        def ident(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return t

        pad = ident if cp is None else cp.pad
        full = ident if cp is None else cp.gather
        local = ident if cp is None else cp.chunk
        x, dec = local(pad(x)), (None if dec is None else local(pad(dec)))
        rope_full, rope = rope, tuple(local(pad(t, 0), 0) for t in rope)  # 2 x (N'/cp, Dh)
        n_pad = x.shape[1] * (1 if cp is None else cp.size) - n  # N' - N, from shapes (no host read)

        # Key padding in the backend's form, once per layout (full N here, routed K below, the decoder's
        # two), not per call: `masks(n_real, extra, decoder)` for n_real video tokens + `extra` CP pad.
        def masks(n_real: int, extra: int, decoder: bool, n_image: int = img_len):
            if decoder:  # keys [decoder video | encoder video]: no text, no image
                return decoder_key_masks(c.attention_backend, n_real, extra, b, dtype, x.device)
            return build_key_masks(c.attention_backend, encoder_attention_mask, n_real, n_image, dtype,
                                   (n_real + extra) // (1 if cp is None else cp.size), video_pad=extra,
                                   n_text=encoder_hidden_states.shape[1], batch=b, device=x.device)

        full_mask = masks(n, n_pad, False)
        mask, blk_rope = full_mask, rope
        saved = None
        repa_tokens = repa_ids = None
        enc_end = c.num_encoder_blocks
        k = k_pad = 0
        for idx, block in enumerate(self.blocks()):
            if idx == enc_end:  # DDT decoder: query = fresh embedding, context = encoder video output
                x, ctx, img_len = dec, x, 0
                full_mask = mask = masks(n, n_pad, True)  # None unless CP padded the video
            if ids is not None and idx == r.start:
                saved = (full(x), full(ctx) if idx >= enc_end else None)  # (B, N', D): the tokens that wait
                k = ids.shape[1]
                x = local(pad(gather_tokens(saved[0], ids)))  # (B, K'/cp, D), K' = K padded to cp
                k_pad = x.shape[1] * (1 if cp is None else cp.size) - k
                if idx >= enc_end:  # in the decoder the context is video too: route it with the same ids
                    ctx = local(pad(gather_tokens(saved[1], ids)))
                blk_rope = tuple(local(pad(t)) for t in gather_rope(rope_full, ids))  # 2 x (B, K'/cp, Dh)
                mask = masks(k, k_pad, idx >= enc_end)
            x, ctx = block(x, ctx, temb, mask, blk_rope, img_len)
            if return_repa and idx == c.repa.block:
                inside = ids is not None and r.start <= idx <= r.end
                real = k if inside else n
                repa_tokens = full(self.repa_projector(x))[:, :real]  # (B, K|N, C_t): the pad cut off
                repa_ids = ids if inside else None
            if ids is not None and idx == r.end:
                x = local(scatter_tokens(saved[0], full(x)[:, :k], ids))  # (B, N'/cp, D)
                if idx >= enc_end:
                    ctx = local(scatter_tokens(saved[1], full(ctx)[:, :k], ids))
                mask, blk_rope, saved = full_mask, rope, None

        x = self.norm_out(x, temb)  # (B, N'/cp, D)
        x = full(self.proj_out(x))[:, :n]  # (B, N, pt*p*p*C_out): per-token work on 1/cp, gathered, pad cut
        x = x.reshape(b, f // pt, h // p, w // p, -1, pt, p, p)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C_out, F, H, W)
        return DiTOutput(sample=x, repa_tokens=repa_tokens, repa_ids=repa_ids, keep_ids=ids)


def build_model(config: MotifDiTConfig | dict, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, init: bool = True, seed: int = 0) -> MotifDiT:
    """Construct from config; `device="meta"` builds without allocating (FSDP / FLOP counting)."""
    if isinstance(config, dict):
        config = MotifDiTConfig(**config)
    with torch.device(device or "cpu"):
        model = MotifDiT(config)
    if init and str(device) != "meta":
        model.init_weights(seed)
    if dtype is not None:
        model.to(dtype)
    return model


def apply_repa_freeze(model: nn.Module, *, used: bool) -> list[str]:
    """Freeze the REPA head when no step of the run uses REPA (`objectives.repa.repa_stages`); returns the
    frozen parameter names ([] when it stays trainable or there is no head).

    A head that never runs gets no gradient, so training it would only carry random weights, moments and an
    EMA copy along: frozen (`requires_grad=False`) it is out of the optimizer, the EMA and, in a LoRA run,
    the checkpoint (all of them take the trainable parameters). Call it on the built model before
    parallelize (after `apply_lora`, which leaves the head trainable), in the trainer and the dry run alike.
    """
    head = getattr(model, "repa_projector", None)
    if head is None or used:
        return []
    for p in head.parameters():
        p.requires_grad_(False)
    return [f"repa_projector.{n}" for n, _ in head.named_parameters()]
