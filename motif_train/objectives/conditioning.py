"""I2V first-frame conditioning, timestep-aware blur and classifier-free-guidance text dropout.

The transformer input is `cat(x_t, cond, mask)` (16 + 16 + 1 = 33 channels), exactly as
`MotifVideoImage2VideoPipeline` builds it: for I2V `cond[:, :, 0]` is the normalised latent of
frame 0 (with the causal Wan VAE that equals `x0[:, :, 0]`) and `mask[:, :, 0] = 1`; for T2V
both are zero. One set of weights serves both tasks, so the task is chosen per micro-batch
(`choose_task`) identically on every rank: all ranks then share the input layout and the
`image_embeds` / no-`image_embeds` code path, which keeps FSDP collectives in lockstep.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class ConditioningConfig:
    """Task mix and conditioning augmentation.

    i2v_prob: probability that a micro-batch is trained as I2V (else T2V).
    text_dropout: probability a sample's prompt is replaced by the empty prompt (for CFG).
    blur_sigma_max: Gaussian blur σ (in pixels of the blurred tensor) at flow σ = 1; 0 disables.
    blur_gamma: σ_blur = blur_sigma_max · σ^blur_gamma (γ > 1 keeps low-noise samples sharper).
    blur_kernel_max: largest (odd) kernel size; wider blurs are truncated and renormalised.
    """

    i2v_prob: float = 0.0
    text_dropout: float = 0.1
    blur_sigma_max: float = 0.0
    blur_gamma: float = 1.0
    blur_kernel_max: int = 31

    def __post_init__(self) -> None:
        if not 0.0 <= self.i2v_prob <= 1.0:
            raise ValueError(f"ConditioningConfig.i2v_prob must be in [0, 1], got {self.i2v_prob}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"ConditioningConfig.text_dropout must be in [0, 1], got {self.text_dropout}")
        if not (self.blur_sigma_max >= 0.0 and math.isfinite(self.blur_sigma_max)):
            raise ValueError(f"ConditioningConfig.blur_sigma_max must be >= 0, got {self.blur_sigma_max}")
        if not (self.blur_gamma > 0.0 and math.isfinite(self.blur_gamma)):
            raise ValueError(f"ConditioningConfig.blur_gamma must be > 0, got {self.blur_gamma}")
        k = self.blur_kernel_max
        if int(k) != k or k < 1 or k % 2 == 0:
            raise ValueError(f"ConditioningConfig.blur_kernel_max must be an odd integer >= 1, got {k}")


# --------------------------------------------------------------------------- task choice


def _uniform01(*keys: int) -> float:
    """A uniform draw in [0, 1) that is a pure function of `keys` (no RNG state anywhere)."""
    digest = hashlib.blake2b(":".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def choose_task(seed: int, step: int, micro_step: int, i2v_prob: float) -> str:
    """"i2v" with probability `i2v_prob`, else "t2v"; a pure function of (seed, step, micro_step).

    Hash-based, so every rank agrees without communication, resume at any step replays the
    same choices, and neither the global torch RNG nor any generator is touched.
    """
    if not 0.0 <= i2v_prob <= 1.0:
        raise ValueError(f"i2v_prob must be in [0, 1], got {i2v_prob}")
    return "i2v" if _uniform01(seed, step, micro_step) < i2v_prob else "t2v"


# --------------------------------------------------------------------------- blur


def blur_sigmas(sigma: Tensor, cfg: ConditioningConfig) -> Tensor:
    """Per-sample blur width: (B,) flow σ → (B,) float32 σ_blur = blur_sigma_max · σ^blur_gamma."""
    return cfg.blur_sigma_max * sigma.detach().float().clamp(min=0.0).pow(cfg.blur_gamma)


def gaussian_kernels(sigma_blur: Tensor, radius: int) -> Tensor:
    """Normalised 1-D Gaussians, (B,) σ_blur >= 0 → (B, 2R+1) float32 with R = `radius`.

    `radius` is a python int (the widest truncation any sample can need, known from the config),
    so the kernel width is not read back from the device. Sample i is truncated at its own
    radius r_i = min(ceil(3 σ_i), R) and zero beyond, so its output does not depend on the other
    samples in the batch; σ_blur = 0 gives the identity kernel (a 1 at the centre).
    """
    s = sigma_blur.float().clamp(min=1e-6)
    big_r = max(1, int(radius))
    radii = torch.ceil(3.0 * s).clamp(1, big_r)  # (B,) float, integral values
    offsets = torch.arange(-big_r, big_r + 1, device=s.device, dtype=torch.float32)  # (K,)
    k = torch.exp(-0.5 * (offsets[None, :] / s[:, None]).square())
    k = k * (offsets.abs()[None, :] <= radii[:, None])
    return k / k.sum(dim=1, keepdim=True)


def _separable_blur(x: Tensor, kernels: Tensor) -> Tensor:
    """x (B, C, H, W) float32, kernels (B, K) → (B, C, H, W); reflect padding, one group per channel."""
    b, c, h, w = x.shape
    r = kernels.shape[1] // 2
    weight = kernels.repeat_interleave(c, dim=0)  # (B*C, K): sample i's kernel for each of its channels
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), weight[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), weight[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def timestep_blur(frames: Tensor, sigma: Tensor, cfg: ConditioningConfig) -> Tensor:
    """Timestep-aware Gaussian blur of the I2V conditioning frame (training only).

    frames: (B, 3, H, W) pixels or (B, C, H, W) latents of frame 0; sigma: (B,) flow σ of each
    sample. Sample i is blurred with σ_blur = blur_sigma_max · σ_i^blur_gamma (in pixels of
    `frames`), so the condition is vaguer exactly when the noisy video says least, which stops
    the model from learning to copy it. Kernel: separable Gaussian, odd size ≤ blur_kernel_max
    (and < 2·min(H, W) so reflect padding is defined), reflect padding, renormalised after
    truncation, so a constant image stays constant. Computed in float32, returned in the
    input's dtype. Samples with σ_blur = 0 are returned bit-identical (in a new tensor; with
    blur_sigma_max = 0 the input tensor itself). No device->host read: the kernel width comes
    from the config. Inference never blurs: the pipeline conditions on the sharp frame.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (B, C, H, W), got {tuple(frames.shape)}")
    if sigma.shape != (frames.shape[0],):
        raise ValueError(f"sigma must be (B,) with B={frames.shape[0]}, got {tuple(sigma.shape)}")
    if cfg.blur_sigma_max == 0.0:
        return frames
    sb = blur_sigmas(sigma.to(frames.device), cfg)  # (B,)
    h, w = frames.shape[-2:]
    # Flow σ < 1, so σ_blur <= blur_sigma_max: the widest radius is known on the host, and every
    # sample is blurred (no data-dependent subset: that would be a device->host read per call).
    radius_max = min(cfg.blur_kernel_max // 2, min(h, w) - 1, max(1, math.ceil(3.0 * cfg.blur_sigma_max)))
    if radius_max < 1:
        return frames  # a 1-pixel side cannot be blurred along
    blurred = _separable_blur(frames.float(), gaussian_kernels(sb, radius_max)).to(frames.dtype)
    return torch.where((sb > 0).view(-1, *([1] * (frames.ndim - 1))), blurred, frames)


# --------------------------------------------------------------------------- I2V / T2V inputs


def build_i2v_condition(x0: Tensor) -> tuple[Tensor, Tensor]:
    """First-frame conditioning from the clean latents.

    x0: (B, 16, F, H, W) normalised VAE latents, F ≥ 2. Returns cond (B, 16, F, H, W) with
    cond[:, :, 0] = x0[:, :, 0] and zeros elsewhere, and mask (B, 1, F, H, W) with 1 at frame 0
    and 0 elsewhere, both in x0's dtype. With the causal Wan VAE the latent of frame 0 alone
    equals x0[:, :, 0], so no second VAE pass is needed (apply `timestep_blur` to this slice,
    or to the pixels before encoding, to get the blurred condition). F = 1 is rejected: the
    condition would be the target itself, and the diffusers pipeline turns I2V off there.
    """
    if x0.ndim != 5:
        raise ValueError(f"x0 must be (B, C, F, H, W), got {tuple(x0.shape)}")
    if x0.shape[2] < 2:
        raise ValueError("I2V needs at least 2 latent frames (frame 0 is the condition); use T2V for images")
    cond = torch.zeros_like(x0)
    cond[:, :, 0] = x0[:, :, 0]
    mask = x0.new_zeros(x0.shape[0], 1, *x0.shape[2:])
    mask[:, :, 0] = 1.0
    return cond, mask


def build_t2v_condition(x0: Tensor) -> tuple[Tensor, Tensor]:
    """T2V: cond zeros (B, C, F, H, W) and mask zeros (B, 1, F, H, W), in x0's dtype and device."""
    if x0.ndim != 5:
        raise ValueError(f"x0 must be (B, C, F, H, W), got {tuple(x0.shape)}")
    return torch.zeros_like(x0), x0.new_zeros(x0.shape[0], 1, *x0.shape[2:])


def model_input(x_t: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
    """cat(x_t, cond, mask) along channels: (B,16,F,H,W)+(B,16,F,H,W)+(B,1,F,H,W) → (B,33,F,H,W).

    cond and mask are cast to x_t's dtype (the transformer's patch embedding sees one dtype).
    """
    if cond.shape != x_t.shape or mask.shape != (x_t.shape[0], 1, *x_t.shape[2:]):
        raise ValueError(
            f"shape mismatch: x_t {tuple(x_t.shape)}, cond {tuple(cond.shape)}, mask {tuple(mask.shape)}"
        )
    return torch.cat([x_t, cond.to(x_t.dtype), mask.to(x_t.dtype)], dim=1)


# --------------------------------------------------------------------------- text dropout


def draw_text_dropout(batch: int, p: float, generator: torch.Generator | None = None) -> list[bool]:
    """Which of `batch` samples get the empty prompt (probability p each), decided on the host.

    The objective needs the answer as python bools (to pick SDPA's mask-free kernel without a
    device read), so the draw is not a device RNG draw: with a generator, sample i is dropped when
    a uniform that is a pure function of (generator.initial_seed(), i) is < p (no generator state
    is touched, so the σ / noise / TREAD draws are independent of it); without one, the global
    torch RNG on the CPU.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p == 0.0:
        return [False] * batch
    if generator is None:
        return (torch.rand(batch) < p).numpy().tolist()  # a host tensor: no device involved
    seed = generator.initial_seed()
    return [_uniform01(seed, 0xD209, i) < p for i in range(batch)]


def apply_text_dropout(
    embeds: Tensor,
    mask: Tensor,
    p: float,
    empty_embeds: Tensor,
    empty_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
    dropped: Sequence[bool] | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Replace each sample's prompt by the empty prompt with probability p (CFG training).

    embeds: (B, L, D) padded text embeddings; mask: (B, L) (bool or 0/1 of any dtype).
    empty_embeds: (L0, D) encoding of ""; empty_mask: (L0,). A dropped row gets
    empty_embeds[:min(L0, L)] followed by zeros and empty_mask[:min(L0, L)] followed by 0
    (truncation is harmless: "" encodes to a handful of tokens).
    Returns (embeds (B, L, D), mask (B, L), dropped (B,) bool), new tensors in the input
    dtypes/devices. `dropped`: the (B,) decisions made by the caller (`draw_text_dropout`);
    without it the draw uses `generator` (on its own device) or else the global RNG; with
    p = 0 and no decisions nothing is drawn and the inputs are returned unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if embeds.ndim != 3 or mask.shape != embeds.shape[:2]:
        raise ValueError(f"embeds (B, L, D) / mask (B, L) expected, got {tuple(embeds.shape)} / {tuple(mask.shape)}")
    if empty_embeds.ndim != 2 or empty_embeds.shape[1] != embeds.shape[2] or empty_mask.shape != empty_embeds.shape[:1]:
        raise ValueError(
            f"empty_embeds (L0, D={embeds.shape[2]}) / empty_mask (L0,) expected, "
            f"got {tuple(empty_embeds.shape)} / {tuple(empty_mask.shape)}"
        )
    b, length, _ = embeds.shape
    if dropped is not None:
        drop = torch.as_tensor(dropped, dtype=torch.bool)
        if drop.shape != (b,):
            raise ValueError(f"dropped must be (B,) with B={b}, got {tuple(drop.shape)}")
        # non_blocking: a host->device copy that does not wait for the device's queue
        drop = drop.to(embeds.device, non_blocking=True)
    elif p == 0.0:
        return embeds, mask, torch.zeros(b, dtype=torch.bool, device=embeds.device)
    else:
        gen_device = generator.device if generator is not None else embeds.device
        drop = (torch.rand(b, generator=generator, device=gen_device) < p).to(embeds.device, non_blocking=True)

    n = min(empty_embeds.shape[0], length)
    empty_e = embeds.new_zeros(length, embeds.shape[2])
    empty_e[:n] = empty_embeds[:n].to(device=embeds.device, dtype=embeds.dtype)
    empty_m = mask.new_zeros(length)
    empty_m[:n] = empty_mask[:n].to(device=mask.device, dtype=mask.dtype)

    out_e = torch.where(drop[:, None, None], empty_e[None], embeds)
    out_m = torch.where(drop[:, None], empty_m[None], mask)
    return out_e, out_m, drop
