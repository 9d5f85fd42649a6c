"""Shared helpers for model tests: random weights and inputs for the tiny preset."""

import copy

import torch

from motif_train.models import MotifDiTConfig, RoutingConfig, build_model


def tiny(cfg: MotifDiTConfig, **overrides) -> MotifDiTConfig:
    c = copy.deepcopy(cfg)
    for k, v in overrides.items():
        setattr(c, k, v)
    c.validate()
    return c


def randomized(cfg: MotifDiTConfig, seed: int = 0, std: float = 0.2):
    """A tiny model with every parameter random, so zero inits cannot hide a wrong path."""
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m


def inputs(cfg: MotifDiTConfig, *, b: int = 2, f: int = 3, h: int = 8, w: int = 12, t: int = 7,
           mask: bool = False, image: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(b, cfg.in_channels, f, h, w, generator=g),
        timestep=torch.rand(b, generator=g) * 1000,
        encoder_hidden_states=torch.randn(b, t, cfg.text_embed_dim, generator=g),
    )
    if mask:
        m = torch.ones(b, t, dtype=torch.long)
        m[0, t // 2:] = 0
        kw["encoder_attention_mask"] = m
    if image:
        kw["image_embeds"] = torch.randn(b, 5, cfg.image_embed_dim, generator=g)
    return kw


def route(start: int, end: int, ratio: float) -> RoutingConfig:
    return RoutingConfig(start=start, end=end, ratio=ratio)


def encoded_batch(encoders, *, seed: int, width: int, prompts=("a red ball rolls", "two boxes"),
                  max_length: int = 16):
    """A 2-sample Batch of random 9 x 64 x `width` clips through the tiny encoders (VAE latents, text,
    SigLIP frame-0 tokens, REPA teacher pixels)."""
    from motif_train.batch import Batch
    from motif_train.objectives.repa import teacher_pixels

    g = torch.Generator().manual_seed(seed)
    clip = torch.rand(2, 3, 9, 64, width, generator=g) * 2 - 1  # 9 frames -> 3 latent frames
    text, mask = encoders.text.encode(list(prompts), max_length=max_length)
    return Batch(latents=encoders.vae.encode(clip), text=text, text_mask=mask,
                 image_embeds=encoders.image.encode(clip[:, :, 0]),
                 teacher_pixels=teacher_pixels(clip, encoders.teacher.crop_size), keys=("a", "b"))
