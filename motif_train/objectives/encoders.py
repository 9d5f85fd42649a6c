"""Frozen encoders around the real diffusers / transformers classes.

Every wrapper loads one local folder with `from_pretrained` (safetensors only, no remote
code, no hub access), is frozen (`requires_grad_(False)`) and stays in eval mode even if a
parent calls `.train()`. Each reproduces the convention of diffusers' Motif pipelines
(`MotifVideoPipeline`, `MotifVideoImage2VideoPipeline`, diffusers 0.42.1), so latents and
embeddings computed offline are exactly what the released model saw:

- `WanVAE`: `AutoencoderKLWan`; latents are normalised `(z - latents_mean) / latents_std`
  (the pipeline's `_normalize_latents`) and decoded via `z * std + mean` (`_denormalize_latents`).
- `TextEncoder`: `T5Gemma2Encoder` + tokenizer, `padding="max_length"`, `max_length=512`,
  truncation, special tokens, `last_hidden_state` + boolean attention mask.
- `ImageEncoder`: SigLIP vision tower (`text_encoder.vision_tower` in the pipeline), first
  frame mapped to [0, 1], resized/normalised per the `feature_extractor` config,
  `last_hidden_state`.
- `VJEPA2Teacher`: `VJEPA2Model` encoder tokens for REPA (not used by the pipelines).

Outputs are computed under `torch.no_grad()` (not `inference_mode`): REPA's loss saves the
teacher tokens for backward, which inference tensors forbid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from motif_train.objectives.tiny_encoders import SUBFOLDERS, TINY_DIMS, build_tiny_encoders

Tensor = torch.Tensor
PathLike = str | Path

# transformers' IMAGENET_DEFAULT_MEAN / STD: what VJEPA2VideoProcessor normalises with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resample codes (as stored in preprocessor_config.json) -> torch interpolate modes, as
# transformers' torchvision backend maps them (it substitutes bicubic for lanczos).
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic"}

__all__ = [
    "SUBFOLDERS", "TINY_DIMS", "FrozenEncoders", "ImageEncoder", "TextEncoder", "VJEPA2Teacher", "WanVAE",
    "build_tiny_encoders", "load_encoders",
]


class _Frozen(nn.Module):
    """Holds a pretrained module frozen and in eval mode for good."""

    def _freeze(self, module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()

    def train(self, mode: bool = True) -> _Frozen:
        # A trainer's model.train() must not re-enable dropout/drop-path in a frozen encoder.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _check_dir(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: no folder at {p} (expected a save_pretrained folder)")
    return p


# --------------------------------------------------------------------------------------- VAE


class WanVAE(_Frozen):
    """Wan2.1 VAE (`diffusers.AutoencoderKLWan`) with Motif's latent normalisation.

    Shapes (scale factors from the config: 4 in time, 8 in space for Wan2.1):
        pixels  (B, 3, F, H, W) in [-1, 1], F = 1 + 4k, H and W multiples of 8
        latents (B, z_dim=16, 1 + (F-1)/4, H/8, W/8), normalised `(z - mean) / std`
    """

    def __init__(self, vae: nn.Module, *, tiling: bool = False, tile_kwargs: dict | None = None,
                 slicing: bool = False):
        super().__init__()
        self.vae = vae
        self._freeze(vae)
        if tiling:
            vae.enable_tiling(**(tile_kwargs or {}))
        if slicing:
            vae.enable_slicing()
        cfg = vae.config
        self.z_dim: int = int(cfg.z_dim)
        self.temporal_compression: int = int(cfg.scale_factor_temporal)
        self.spatial_compression: int = int(cfg.scale_factor_spatial)
        # Plain lists, as the pipeline reads them from vae.config on every call.
        self.latents_mean: list[float] = list(cfg.latents_mean)
        self.latents_std: list[float] = list(cfg.latents_std)
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std must have z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")

    @classmethod
    def from_pretrained(cls, path: PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, tiling: bool = False,
                        tile_kwargs: dict | None = None, slicing: bool = False) -> WanVAE:
        """Load `AutoencoderKLWan` from a local folder (e.g. `<checkpoint>/vae`)."""
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(
            _check_dir(path, "WanVAE"), torch_dtype=dtype, use_safetensors=True, local_files_only=True)
        return cls(vae.to(device), tiling=tiling, tile_kwargs=tile_kwargs, slicing=slicing)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F_lat, H_lat, W_lat) of the latents of a (3, frames, height, width) clip."""
        return (self.z_dim, 1 + (frames - 1) // self.temporal_compression,
                height // self.spatial_compression, width // self.spatial_compression)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # Same construction and dtype as MotifVideoPipeline._normalize_latents, so a
        # round trip through the pipeline is bit-exact.
        mean = torch.tensor(self.latents_mean).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(self.latents_std).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        """Raw VAE latents (B,16,f,h,w) -> model-space latents `(z - mean) / std`."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, latents: Tensor) -> Tensor:
        """Model-space latents (B,16,f,h,w) -> raw VAE latents `latents * std + mean`."""
        mean, std = self._stats(latents)
        return latents * std + mean

    @torch.no_grad()
    def encode(self, pixels: Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Encode a clip to normalised latents.

        Args:
            pixels: (B, 3, F, H, W) in [-1, 1] with F = 1 + 4k and H, W divisible by 8.
            sample: draw from the posterior (what the I2V pipeline does for its condition
                frame, with `generator`) instead of taking its mode (deterministic caching).
        Returns:
            (B, 16, 1 + (F-1)/4, H/8, W/8) in the VAE's dtype, `(z - mean) / std`.
        """
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"WanVAE.encode wants pixels (B,3,F,H,W), got {tuple(pixels.shape)}")
        f, h, w = pixels.shape[2:]
        t, s = self.temporal_compression, self.spatial_compression
        if (f - 1) % t or h % s or w % s:
            raise ValueError(f"WanVAE.encode needs F = 1 + {t}k frames and H, W divisible by {s}; got "
                             f"pixels of shape {tuple(pixels.shape)}: trim or pad the clip first")
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return self.normalize(z)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, 16, f, h, w) -> pixels (B, 3, 1 + 4(f-1), 8h, 8w) in [-1, 1].

        Same steps as the pipeline's output path: cast to the VAE dtype, de-normalise,
        `vae.decode` (which clamps to [-1, 1]).
        """
        z = self.denormalize(latents.to(device=self.device, dtype=self.dtype))
        return self.vae.decode(z, return_dict=False)[0]


# -------------------------------------------------------------------------------------- text


class TextEncoder(_Frozen):
    """T5Gemma2 encoder + tokenizer, as `MotifVideoPipeline._get_prompt_embeds` uses them.

    Shapes: embeds (B, max_length, D) with D = text hidden size (2560 for the real model),
    mask (B, max_length) bool, True on real tokens (incl. special tokens).
    """

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._freeze(model)
        self.hidden_size: int = int(model.config.text_config.hidden_size)

    @classmethod
    def from_pretrained(cls, path: PathLike, tokenizer_path: PathLike, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
        """Load `T5Gemma2Encoder` from `path` (e.g. `<ckpt>/text_encoder`) and the tokenizer
        from `tokenizer_path` (e.g. `<ckpt>/tokenizer`)."""
        from transformers import AutoTokenizer, T5Gemma2Encoder

        model = T5Gemma2Encoder.from_pretrained(
            _check_dir(path, "TextEncoder"), dtype=dtype, use_safetensors=True, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(
            _check_dir(tokenizer_path, "TextEncoder tokenizer"), local_files_only=True, trust_remote_code=False)
        return cls(model.to(device), tok)

    def tokenize(self, prompts: str | Sequence[str], max_length: int = 512):
        """Tokenizer call identical to the pipeline's (pad to `max_length`, truncate)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """Encode prompts exactly as `MotifVideoPipeline.encode_prompt` does.

        Returns:
            embeds (B, max_length, D): `last_hidden_state` (after the final norm), in the
            encoder's dtype; padded positions hold values but are masked.
            mask (B, max_length) bool: True where a real token is.
        """
        inputs = self.tokenize(prompts, max_length)
        ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device)
        embeds = self.model(input_ids=ids, attention_mask=mask)[0]
        return embeds.to(dtype=self.dtype), mask.bool()

    def encode_trimmed(self, prompts: str | Sequence[str], max_length: int = 512) -> list[Tensor]:
        """Per-prompt embeddings (L_i, D) of the real tokens only, L_i = mask[i].sum().

        Computed at full `max_length` padding (bit-identical to `encode`), then the masked
        rows are selected, which works for either tokenizer padding side.
        """
        embeds, mask = self.encode(prompts, max_length)
        return [e[m] for e, m in zip(embeds, mask, strict=False)]

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side


# ------------------------------------------------------------------------------------- image


def _read_image_processor(path: Path | None, vision_config) -> dict:
    # The pipeline's SiglipImageProcessor defaults to the torchvision backend, which is not
    # installable here; its preprocessing is reimplemented in torch from the saved config.
    cfg = {"size": {"height": vision_config.image_size, "width": vision_config.image_size},
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3, "do_normalize": True}
    if path is not None:
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            raise FileNotFoundError(f"ImageEncoder: no preprocessor_config.json in {path}")
        cfg.update({k: v for k, v in json.loads(f.read_text()).items() if k in cfg})
    size = cfg["size"]
    if "height" not in size or "width" not in size:
        raise ValueError(f"ImageEncoder: processor size must be {{height, width}}, got {size}")
    if cfg["resample"] not in _RESAMPLE:
        raise ValueError(f"ImageEncoder: unsupported resample code {cfg['resample']}")
    return cfg


class ImageEncoder(_Frozen):
    """SigLIP vision tower for I2V `image_embeds`, as `MotifVideoImage2VideoPipeline` computes them.

    Shapes: frames (B, 3, H, W) in [-1, 1] -> (B, T_img, C_img), with
    T_img = (image_size / patch_size)^2 (4096 for 896/14 SigLIP) and C_img = 1152 for so400m.
    """

    def __init__(self, tower: nn.Module, processor_cfg: dict):
        super().__init__()
        self.tower = tower
        self._freeze(tower)
        vc = tower.config
        self.hidden_size: int = int(vc.hidden_size)
        self.tokens_per_image: int = (int(vc.image_size) // int(vc.patch_size)) ** 2
        self.image_size: tuple[int, int] = (int(processor_cfg["size"]["height"]),
                                            int(processor_cfg["size"]["width"]))
        self._mode = _RESAMPLE[processor_cfg["resample"]]
        self._normalize = bool(processor_cfg["do_normalize"])
        self.register_buffer("_mean", torch.tensor(processor_cfg["image_mean"]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_std", torch.tensor(processor_cfg["image_std"]).view(1, 3, 1, 1),
                             persistent=False)

    @classmethod
    def from_pretrained(cls, path: PathLike, processor_path: PathLike | None = None, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
        """Load the tower from a `SiglipVisionModel` folder, or from a `T5Gemma2Encoder`
        folder (the released layout: the tower is `text_encoder.vision_tower`; this loads the
        whole encoder once, then keeps only the tower). `processor_path` is the
        `feature_extractor` folder; without it SigLIP defaults are used (config image_size,
        bicubic, mean = std = 0.5)."""
        from transformers import SiglipVisionModel, T5Gemma2Encoder

        p = _check_dir(path, "ImageEncoder")
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        kw = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
        if model_type == "t5gemma2_encoder":
            tower = T5Gemma2Encoder.from_pretrained(p, **kw).vision_tower
        elif model_type == "siglip_vision_model":
            tower = SiglipVisionModel.from_pretrained(p, **kw)
        else:
            raise ValueError(f"ImageEncoder: {p} holds a {model_type!r} model; expected "
                             "siglip_vision_model or t5gemma2_encoder")
        proc = _read_image_processor(Path(processor_path) if processor_path else None, tower.config)
        return cls(tower, proc).to(device)

    @classmethod
    def from_text_encoder(cls, text: TextEncoder, processor_path: PathLike | None = None) -> ImageEncoder:
        """Share the vision tower already loaded inside a `TextEncoder` (no second copy)."""
        tower = text.model.vision_tower
        return cls(tower, _read_image_processor(Path(processor_path) if processor_path else None,
                                                tower.config)).to(text.device)

    def preprocess(self, frames: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> SigLIP pixel_values (B, 3, h, w) float32.

        The pipeline maps the frame to [0, 1] with a clamp, then the processor resizes
        (torchvision: float interpolate, align_corners=False, antialias) with rescaling off,
        and normalises `(x - mean) / std` in float32.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"ImageEncoder wants frames (B,3,H,W), got {tuple(frames.shape)}")
        x = ((frames.float() + 1) / 2).clamp(0, 1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode=self._mode,
                              align_corners=None if self._mode == "nearest" else False,
                              antialias=self._mode != "nearest")
        if self._normalize:
            x = (x - self._mean.to(x.device, torch.float32)) / self._std.to(x.device, torch.float32)
        return x

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """First frames (B, 3, H, W) in [-1, 1] -> `last_hidden_state` (B, T_img, C_img)."""
        x = self.preprocess(frames.to(self.device))
        return self.tower(pixel_values=x.to(self.dtype)).last_hidden_state


# ------------------------------------------------------------------------------------ teacher


class VJEPA2Teacher(_Frozen):
    """Frozen V-JEPA 2 encoder: the REPA target.

    Shapes: pixels (B, 3, T, S, S) in [-1, 1], T a multiple of `tubelet_size` (2), S == crop_size
    -> tokens (B, T / tubelet_size, S / patch_size, S / patch_size, hidden_size).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._freeze(model)
        cfg = model.config
        self.patch_size: int = int(cfg.patch_size)
        self.tubelet_size: int = int(cfg.tubelet_size)
        self.hidden_size: int = int(cfg.hidden_size)
        self.crop_size: int = int(cfg.crop_size)
        self.register_buffer("_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> VJEPA2Teacher:
        """Load `VJEPA2Model` from a local folder (e.g. `<root>/teacher`)."""
        from transformers import VJEPA2Model

        model = VJEPA2Model.from_pretrained(
            _check_dir(path, "VJEPA2Teacher"), dtype=dtype, use_safetensors=True, local_files_only=True)
        return cls(model).to(device)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the teacher's spatial map (crop_size / patch_size)."""
        return self.crop_size // self.patch_size

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, T, S, S) in [-1, 1] -> (B, T / tubelet, S / patch, S / patch, hidden) encoder tokens."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"VJEPA2Teacher wants pixels (B,3,T,S,S), got {tuple(pixels.shape)}")
        b, _, t, h, w = pixels.shape
        c = self.crop_size
        if h != w or h != c:
            # V-JEPA 2 derives its 3-D RoPE grid from config.crop_size, not from the input:
            # any other size (non-square in particular) runs but assigns wrong positions.
            raise ValueError(
                f"VJEPA2Teacher needs square frames of exactly crop_size={c}: got pixels of shape "
                f"{tuple(pixels.shape)} (H={h}, W={w}). Non-square or other-size input silently gives "
                f"wrongly positioned tokens. Resize/center-crop the clip to {c}x{c} before the teacher "
                f"and resize its {self.grid_size}x{self.grid_size} token map to the DiT grid afterwards.")
        if t % self.tubelet_size:
            raise ValueError(f"VJEPA2Teacher needs T divisible by tubelet_size={self.tubelet_size}; got "
                             f"pixels of shape {tuple(pixels.shape)} (prepend a copy of frame 0 to 1+4k frames)")
        x = (pixels.float() + 1) / 2
        x = (x - self._mean.to(x.device, torch.float32)) / self._std.to(x.device, torch.float32)
        x = x.to(self.device, self.dtype).permute(0, 2, 1, 3, 4)  # VJEPA2 takes (B, T, 3, H, W)
        tokens = self.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        g = self.grid_size
        return tokens.reshape(b, t // self.tubelet_size, g, g, self.hidden_size)


# ---------------------------------------------------------------------------------- loading


@dataclass
class FrozenEncoders:
    """The encoders `load_encoders` was asked for; the others are None."""

    vae: WanVAE | None = None
    text: TextEncoder | None = None
    image: ImageEncoder | None = None
    teacher: VJEPA2Teacher | None = None


_WHICH = ("vae", "text", "image", "teacher")


def load_encoders(root: PathLike, which: Sequence[str] = _WHICH, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, *, vae_dtype: torch.dtype | None = None,
                  vae_tiling: bool = False, vae_slicing: bool = False) -> FrozenEncoders:
    """Load frozen encoders from a checkpoint-style folder (layout: `SUBFOLDERS`).

    The image tower comes from `root/image_encoder` if present, otherwise from the
    released layout `root/text_encoder` (shared with the text encoder when both are loaded).

    Args:
        which: any of "vae", "text", "image", "teacher".
        dtype: dtype of all encoders; `vae_dtype` overrides it for the VAE.
    """
    unknown = set(which) - set(_WHICH)
    if unknown:
        raise ValueError(f"load_encoders: unknown encoders {sorted(unknown)}; choose from {_WHICH}")
    root = _check_dir(root, "load_encoders")
    sub = {k: root / v for k, v in SUBFOLDERS.items()}
    out = FrozenEncoders()
    if "vae" in which:
        out.vae = WanVAE.from_pretrained(sub["vae"], device=device, dtype=vae_dtype or dtype,
                                         tiling=vae_tiling, slicing=vae_slicing)
    if "text" in which:
        out.text = TextEncoder.from_pretrained(sub["text_encoder"], sub["tokenizer"], device=device, dtype=dtype)
    if "image" in which:
        proc = sub["feature_extractor"] if sub["feature_extractor"].is_dir() else None
        if sub["image_encoder"].is_dir():
            out.image = ImageEncoder.from_pretrained(sub["image_encoder"], proc, device=device, dtype=dtype)
        elif out.text is not None:
            out.image = ImageEncoder.from_text_encoder(out.text, proc)
        else:
            out.image = ImageEncoder.from_pretrained(sub["text_encoder"], proc, device=device, dtype=dtype)
    if "teacher" in which:
        out.teacher = VJEPA2Teacher.from_pretrained(sub["teacher"], device=device, dtype=dtype)
    return out
