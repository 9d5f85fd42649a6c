"""Automatic metrics on generated videos (issue 18 §3): the validation samples, scored offline or inline.

A library module (no trainer imports): videos in, numbers out. Every encoder is a transformers class
loaded from a local `save_pretrained` folder (safetensors only, no hub, no remote code), frozen, in
eval mode, run under `torch.no_grad()`; inputs are processed in fixed order and fixed batches, so the
same call gives the same numbers (bit-identical on CPU; on GPU up to the kernels' own determinism).

Pixel conventions, decided by dtype (no guessing from values):

- a video is uint8 `(T, H, W, 3)` in [0, 255] (`sampling.to_uint8_frames`), a batch uint8
  `(N, T, H, W, 3)` or a list of videos (sizes may differ);
- a condition image is uint8 `(H, W, 3)` in [0, 255] (a video frame) or floating `(3, H, W)` in
  [-1, 1] (`sampling.load_first_frame`); a floating image outside [-1, 1] (by > 1e-3) is refused.

Metrics (definitions; their limits are in docs/training.md, "Evaluation metrics"):

- `clip_score`: per frame t, cos_t = cosine(image embedding of frame t, text embedding of the
  prompt) from the image-text model's own `get_image_features` / `get_text_features` (the projected
  embeddings); CLIPScore per frame = 100 * max(cos_t, 0) (torchmetrics' CLIPScore convention); a
  video's score is the mean over its frames. `clip_cosine` is the same mean of the raw, unclamped
  cos_t (what a tiny or mismatched encoder still lets one compare).
- `temporal_consistency`: mean over t of cosine(image embedding of frame t, of frame t+1), same
  image encoder and embeddings; 1 for a static clip; undefined (None) for a 1-frame video.
- `psnr_first_frame`: PSNR in dB of the generated frame 0 against the condition image, both mapped to
  [0, 1] (uint8 / 255, [-1, 1] as (x + 1) / 2), so PSNR = 10 log10(1 / MSE) = 20 log10(255 / RMSE
  in uint8 levels). Identical frames (MSE = 0) give `PSNR_CAP_DB` = 100 dB, and every value is capped
  there, so means stay finite.
- `ssim_first_frame`: SSIM (Wang et al. 2004) of the same pair on [0, 1] (L = 1, K1 = 0.01,
  K2 = 0.03) with an 11 x 11 Gaussian window, sigma 1.5, 'valid' filtering (no padding), computed per
  RGB channel and averaged over the map and the three channels (no luminance conversion).
- `fd_vjepa`: Fréchet distance between Gaussians fitted to V-JEPA 2 clip features of the generated
  and the reference clips: each clip goes through the REPA teacher (`VJEPA2Model` from
  `<encoders root>/teacher`, input prepared as REPA does: frame 0 duplicated to a multiple of the
  tubelet, frames resized to crop_size x crop_size) and its encoder tokens are mean-pooled to one
  vector. Not FVD (that is I3D features); `fd_samples` reports (n_generated, n_reference).

The image-text model lives in `<encoders root>/clip` (`METRIC_SUBFOLDER`): a `CLIPModel` or a
`SiglipModel` folder with its tokenizer and `preprocessor_config.json`; images are preprocessed by
the folder's own image processor (transformers' PIL backend, no torchvision), text by its tokenizer
(CLIP: padded to the longest prompt with an attention mask, truncated at the text context; SigLIP:
padded to `max_length` = the text context without a mask, as SigLIP was trained). The tiny random
instance for tests and demos: `build_tiny_encoders(root, metric_encoder=True)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from motif_train.objectives.tiny_encoders import METRIC_SUBFOLDER, SUBFOLDERS

Tensor = torch.Tensor
PathLike = str | Path

PSNR_CAP_DB = 100.0  # PSNR of identical images (infinite) and the cap of every PSNR value
CLIP_SCORE_SCALE = 100.0  # CLIPScore = 100 * max(cos, 0)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_RANGE_TOL = 1e-3

__all__ = [
    "CLIP_SCORE_SCALE", "PSNR_CAP_DB", "SSIM_SIGMA", "SSIM_WINDOW", "VideoMetrics", "frechet_distance",
    "frechet_distance_from_stats", "gaussian_stats", "image_to_unit", "psnr", "ssim", "vjepa_pixels",
]


# ------------------------------------------------------------------------------ pixel conventions


def _as_tensor(x) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        return x.detach().cpu()
    raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")


def image_to_unit(image) -> Tensor:
    """One image -> (3, H, W) float64 in [0, 1].

    uint8 (H, W, 3) in [0, 255] -> / 255; floating (3, H, W) in [-1, 1] -> (x + 1) / 2 (values more
    than 1e-3 outside [-1, 1] raise; the rest is clamped). Any other dtype or layout raises.
    """
    x = _as_tensor(image)
    if x.dtype == torch.uint8:
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"a uint8 image must be (H, W, 3), got {tuple(x.shape)}")
        return x.permute(2, 0, 1).double() / 255.0
    if x.is_floating_point():
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"a floating image must be (3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = x.double()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"a floating image must lie in [-1, 1] (the VAE's pixel range); got [{lo:.4g}, "
                             f"{hi:.4g}]: pass uint8 for [0, 255] images")
        return ((x + 1) / 2).clamp(0, 1)
    raise TypeError(f"images are uint8 (H, W, 3) or floating (3, H, W) in [-1, 1]; got dtype {x.dtype}")


def _pair(a, b) -> tuple[Tensor, Tensor]:
    x, y = image_to_unit(a), image_to_unit(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])} (H, W); resize "
                         "the condition image to the video's size first")
    return x, y


def psnr(a, b, *, cap: float = PSNR_CAP_DB) -> float:
    """PSNR in dB of two images (each uint8 (H, W, 3) or floating (3, H, W) in [-1, 1]).

    On [0, 1]: 10 log10(1 / MSE), i.e. 20 log10(255 / RMSE) in uint8 levels, 20 log10(2 / RMSE) in
    [-1, 1] units. MSE = 0 (identical images, PSNR infinite) gives `cap` (100 dB), and values are
    min(PSNR, cap).
    """
    x, y = _pair(a, b)
    mse = float(((x - y) ** 2).mean())
    if mse == 0.0:
        return float(cap)
    return min(10.0 * math.log10(1.0 / mse), float(cap))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(k**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """SSIM of two images (each uint8 (H, W, 3) or floating (3, H, W) in [-1, 1]), in [-1, 1].

    Both mapped to [0, 1] (data range L = 1, C1 = (0.01 L)^2, C2 = (0.03 L)^2); local means,
    variances and covariance from a separable `window` x `window` Gaussian (sigma 1.5), 'valid'
    filtering (the map is (H - 10) x (W - 10)); computed per RGB channel, averaged over the map and
    the channels. H and W must be at least `window`.
    """
    x, y = _pair(a, b)
    h, w = x.shape[1:]
    if h < window or w < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {h}x{w}")
    g = _gaussian_window(window, sigma)
    gh, gw = g.view(1, 1, window, 1).repeat(3, 1, 1, 1), g.view(1, 1, 1, window).repeat(3, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:  # (1, 3, H, W) -> (1, 3, H - window + 1, W - window + 1)
        return F.conv2d(F.conv2d(t, gh, groups=3), gw, groups=3)

    x, y = x[None], y[None]
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(smap.mean())


# ------------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(features) -> tuple[Tensor, Tensor]:
    """Features (N, D) -> (mean (D,), unbiased covariance (D, D)), float64. Needs N >= 2; for N <= D
    the covariance is singular (rank <= N - 1), which `frechet_distance_from_stats` handles."""
    f = _as_tensor(features).double()
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {f.shape[0]}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrt_psd(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), float64, clamped at 0.

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (the same eigenvalues as S1 S2), with S1^(1/2) from an eigen-
    decomposition; negative rounding eigenvalues are clamped to 0. No inverse is taken, so singular
    covariances (fewer samples than dimensions) are fine and no regularising offset is added.
    """
    mu1, mu2 = _as_tensor(mu1).double(), _as_tensor(mu2).double()
    s1, s2 = _as_tensor(sigma1).double(), _as_tensor(sigma2).double()
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"Fréchet stats disagree: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; covariances "
                         f"{tuple(s1.shape)}, {tuple(s2.shape)}")
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = ((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    return max(float(d), 0.0)


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussians fitted to features x (N, D) and y (M, D); N, M >= 2."""
    return frechet_distance_from_stats(*gaussian_stats(x), *gaussian_stats(y))


# -------------------------------------------------------------------------------------- inputs


def _as_videos(videos) -> list[Tensor]:
    """(N, T, H, W, 3) uint8 or a list of (T, H, W, 3) uint8 -> list of CPU uint8 tensors."""
    if isinstance(videos, (Tensor, np.ndarray)):
        v = _as_tensor(videos)
        if v.ndim != 5:
            raise ValueError(f"a batch of videos must be (N, T, H, W, 3), got {tuple(v.shape)}; pass a list "
                             "for one video or for videos of different sizes")
        videos = list(v)
    out = []
    for i, v in enumerate(videos):
        v = _as_tensor(v)
        if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] < 1:
            raise ValueError(f"video {i}: expected uint8 (T, H, W, 3), got {v.dtype} {tuple(v.shape)}")
        out.append(v)
    return out


def _as_cond_images(cond_images, n: int) -> list:
    if cond_images is None:
        return [None] * n
    if isinstance(cond_images, (Tensor, np.ndarray)):
        c = _as_tensor(cond_images)
        if c.ndim != 4:
            raise ValueError(f"a batch of condition images must be (N, H, W, 3) uint8 or (N, 3, H, W) in "
                             f"[-1, 1], got {tuple(c.shape)}")
        cond_images = list(c)
    cond_images = list(cond_images)
    if len(cond_images) != n:
        raise ValueError(f"{len(cond_images)} condition images for {n} videos (use None for a T2V video)")
    return cond_images


def vjepa_pixels(video, crop_size: int, tubelet_size: int = 2, max_frames: int | None = None) -> Tensor:
    """A uint8 video (T, H, W, 3) -> V-JEPA 2 input (3, T', S, S) float32 in [-1, 1], S = crop_size,
    on the video's device.

    `max_frames`: first keep that many frames evenly spaced over the clip (rounded linspace, both
    ends kept). Then copies of frame 0 are prepended up to a multiple of `tubelet_size` and every
    frame is resized (bilinear, antialiased, not cropped) to S x S: for a 1+4k-frame clip exactly
    `objectives.repa.teacher_pixels`, the teacher's training-time input.
    """
    v = video if isinstance(video, Tensor) else _as_tensor(video)  # a tensor stays on its device
    if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"vjepa_pixels wants a uint8 (T, H, W, 3) video, got {v.dtype} {tuple(v.shape)}")
    x = v.permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W), as sampling.load_first_frame scales
    t = x.shape[0]
    if max_frames is not None and t > max_frames:
        x = x[torch.linspace(0, t - 1, max_frames, dtype=torch.float64, device=x.device).round().long()]
        t = max_frames
    pad = (-t) % tubelet_size
    if pad:
        x = torch.cat([x[:1].expand(pad, -1, -1, -1), x])
    x = F.interpolate(x, size=(crop_size, crop_size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T', S, S)


def _mean_or_none(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _features_out(out) -> Tensor:
    # transformers >= 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected
    # embedding; earlier versions returned the tensor itself.
    return out if isinstance(out, Tensor) else out.pooler_output


# -------------------------------------------------------------------------------------- metrics


class VideoMetrics:
    """Scores generated videos: clip score, temporal consistency, I2V first-frame PSNR / SSIM, fd_vjepa.

    Encoders are loaded on first use only (the image-text model for clip score / temporal
    consistency, the V-JEPA 2 teacher only when a reference set is given), frozen, on `device`.

    Args:
        encoders_root: the encoders folder (`encoders.root`): the image-text model is read from
            `<root>/clip`, the V-JEPA 2 teacher from `<root>/teacher`.
        device: where the encoders run.
        clip_path / teacher_path: override either folder.
        dtype: the encoders' dtype (float32 default; bf16 on GPU is faster, slightly less exact).
        batch_size: frames per image-text forward and clips per V-JEPA 2 forward.
        fd_max_frames: frames kept (evenly spaced) per clip before V-JEPA 2 (None: all), e.g. the
            teacher's `frames_per_clip` (64 for the released V-JEPA 2) to bound its cost.
    """

    def __init__(self, encoders_root: PathLike | None = None, device: str | torch.device = "cpu", *,
                 clip_path: PathLike | None = None, teacher_path: PathLike | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, fd_max_frames: int | None = None):
        root = None if encoders_root is None else Path(encoders_root)
        self.clip_path = Path(clip_path) if clip_path is not None else (
            None if root is None else root / METRIC_SUBFOLDER)
        self.teacher_path = Path(teacher_path) if teacher_path is not None else (
            None if root is None else root / SUBFOLDERS["teacher"])
        self.device = torch.device(device)
        self.dtype = dtype
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        if fd_max_frames is not None and fd_max_frames < 1:
            raise ValueError(f"fd_max_frames={fd_max_frames} must be >= 1 or None")
        self.fd_max_frames = fd_max_frames
        self._clip = None
        self._teacher = None

    # ---- encoders -------------------------------------------------------------------------
    def _clip_parts(self):
        """(model, tokenizer, image processor, model_type), loaded once."""
        if self._clip is None:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

            p = self.clip_path
            if p is None or not p.is_dir():
                raise FileNotFoundError(f"VideoMetrics: no image-text model folder at {p} (a CLIPModel / SiglipModel "
                                        "save_pretrained folder with tokenizer and preprocessor_config.json; "
                                        "build_tiny_encoders(root, metric_encoder=True) writes a tiny one)")
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
            cls = {"clip": CLIPModel, "siglip": SiglipModel}.get(model_type)
            if cls is None:
                raise ValueError(f"VideoMetrics: {p} holds a {model_type!r} model; expected clip or siglip")
            model = cls.from_pretrained(p, dtype=self.dtype, use_safetensors=True, local_files_only=True)
            model = model.to(self.device).eval().requires_grad_(False)
            tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
            proc = AutoImageProcessor.from_pretrained(p, backend="pil", local_files_only=True,
                                                      trust_remote_code=False)
            self._clip = (model, tok, proc, model_type)
        return self._clip

    def _teacher_model(self):
        if self._teacher is None:
            from motif_train.objectives.encoders import VJEPA2Teacher

            if self.teacher_path is None:
                raise FileNotFoundError("VideoMetrics: fd_vjepa needs the V-JEPA 2 teacher: give encoders_root "
                                        "or teacher_path")
            self._teacher = VJEPA2Teacher.from_pretrained(self.teacher_path, device=self.device, dtype=self.dtype)
        return self._teacher

    # ---- embeddings -----------------------------------------------------------------------
    @torch.no_grad()
    def image_embeddings(self, frames) -> Tensor:
        """Frames uint8 (K, H, W, 3) (or a list of (H, W, 3)) -> unit-norm image embeddings (K, P) float64
        (CPU), P = the model's projection dim; `batch_size` frames per forward."""
        model, _, proc, _ = self._clip_parts()
        frames = [_as_tensor(f).numpy() for f in frames]
        out = []
        for i in range(0, len(frames), self.batch_size):
            px = proc(images=frames[i:i + self.batch_size], return_tensors="pt",
                      input_data_format="channels_last")["pixel_values"]
            e = _features_out(model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
            out.append(e.double().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Prompts (N,) -> unit-norm text embeddings (N, P) float64 (CPU), `batch_size` per forward."""
        model, tok, _, model_type = self._clip_parts()
        ctx = int(model.config.text_config.max_position_embeddings)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[i:i + self.batch_size])
            if model_type == "siglip":
                ids = tok(chunk, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
                inputs = {"input_ids": ids["input_ids"]}
            else:
                ids = tok(chunk, padding=True, truncation=True, max_length=ctx, return_tensors="pt")
                inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
            e = _features_out(model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()}))
            out.append(e.double().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def vjepa_features(self, clips) -> Tensor:
        """Clips (uint8 (N, T, H, W, 3) or a list of (T, H, W, 3)) -> (N, C) float64 (CPU): V-JEPA 2
        encoder tokens (B, T'/tubelet, S/p, S/p, C) mean-pooled per clip. Clips of equal prepared shape
        run together, `batch_size` per forward. Cache a reference set's features with this and pass
        them as `score(reference_features=...)`."""
        teacher = self._teacher_model()
        vids = _as_videos(clips)
        crop, tub, cap = teacher.crop_size, teacher.tubelet_size, self.fd_max_frames
        feats: list[Tensor | None] = [None] * len(vids)
        groups: dict[int, list[int]] = {}  # prepared frame count T' -> clips (all are S x S)
        for i, v in enumerate(vids):
            t = v.shape[0] if cap is None else min(v.shape[0], cap)
            groups.setdefault(t + (-t) % tub, []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), self.batch_size):
                part = idx[j:j + self.batch_size]  # prepared per batch (on the device), not all at once
                x = torch.stack([vjepa_pixels(vids[i].to(self.device), crop, tub, cap) for i in part])
                pooled = teacher(x).double().mean(dim=(1, 2, 3)).cpu()  # (B, T'/tub, g, g, C) -> (B, C)
                for i, f in zip(part, pooled, strict=True):
                    feats[i] = f
        return torch.stack(feats)

    @torch.no_grad()
    def vjepa_features_from_pixels(self, pixels: Tensor) -> Tensor:
        """Teacher inputs (N, 3, T', S, S) in [-1, 1] — what `vjepa_pixels` prepares, and what the shards store
        as a sample's teacher pixels for REPA — -> (N, C) float64 (CPU), mean-pooled as `vjepa_features`."""
        teacher = self._teacher_model()
        out = [teacher(pixels[i:i + self.batch_size].to(self.device, self.dtype)).double().mean(dim=(1, 2, 3)).cpu()
               for i in range(0, pixels.shape[0], self.batch_size)]
        return torch.cat(out)

    # ---- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, videos, prompts: Sequence[str] | None = None, cond_images=None, reference_clips=None, *,
              reference_features=None) -> dict:
        """Score N generated videos.

        Args:
            videos: uint8 (N, T, H, W, 3), or a list of N uint8 (T_i, H_i, W_i, 3).
            prompts: N prompts (None: no clip score).
            cond_images: per video the I2V condition image, uint8 (H, W, 3) or floating (3, H, W) in
                [-1, 1] at the video's size, or None for a T2V video; or a batch (N, H, W, 3) uint8 /
                (N, 3, H, W) floating. None: no first-frame metrics.
            reference_clips: held-out real clips (uint8 (M, T, H, W, 3) or a list) for fd_vjepa.
            reference_features: their cached `vjepa_features` (M, C) instead of `reference_clips`.
        Returns:
            {"clip_score", "clip_cosine", "temporal_consistency", "psnr_first_frame",
            "ssim_first_frame": means over the videos that have the value (None if none);
            "fd_vjepa": float (NaN if either set has < 2 clips) or None without a reference set;
            "fd_samples": (n_generated, n_reference) or None; "per_video": N dicts with the first five
            keys (None where not applicable: no prompt, 1 frame, T2V)}.
        """
        vids = _as_videos(videos)
        n = len(vids)
        if n == 0:
            raise ValueError("score: no videos")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if len(prompts) != n:
                raise ValueError(f"{len(prompts)} prompts for {n} videos")
        conds = _as_cond_images(cond_images, n)
        if reference_clips is not None and reference_features is not None:
            raise ValueError("give reference_clips or reference_features, not both")

        per = [dict.fromkeys(("clip_score", "clip_cosine", "temporal_consistency", "psnr_first_frame",
                              "ssim_first_frame")) for _ in range(n)]
        need_images = prompts is not None or any(v.shape[0] > 1 for v in vids)
        if need_images:
            emb = self.image_embeddings([f for v in vids for f in v])  # (sum T_i, P)
            text = self.text_embeddings(prompts) if prompts is not None else None
            start = 0
            for i, v in enumerate(vids):
                e = emb[start:start + v.shape[0]]  # (T_i, P)
                start += v.shape[0]
                if text is not None:
                    cos = e @ text[i]  # (T_i,)
                    per[i]["clip_cosine"] = float(cos.mean())
                    per[i]["clip_score"] = float((CLIP_SCORE_SCALE * cos.clamp(min=0)).mean())
                if v.shape[0] > 1:
                    per[i]["temporal_consistency"] = float((e[:-1] * e[1:]).sum(-1).mean())
        for i, (v, c) in enumerate(zip(vids, conds, strict=True)):
            if c is not None:
                per[i]["psnr_first_frame"] = psnr(v[0], c)
                per[i]["ssim_first_frame"] = ssim(v[0], c)

        out = {k: _mean_or_none([p[k] for p in per]) for k in per[0]}
        out["fd_vjepa"], out["fd_samples"] = None, None
        if reference_clips is not None or reference_features is not None:
            ref = (self.vjepa_features(reference_clips) if reference_clips is not None
                   else _as_tensor(reference_features).double())
            gen = self.vjepa_features(vids)
            out["fd_samples"] = (gen.shape[0], ref.shape[0])
            if ref.ndim != 2 or ref.shape[1] != gen.shape[1]:
                raise ValueError(f"reference features {tuple(ref.shape)} do not match the teacher's "
                                 f"(M, {gen.shape[1]})")
            out["fd_vjepa"] = frechet_distance(gen, ref) if min(gen.shape[0], ref.shape[0]) >= 2 else float("nan")
        out["per_video"] = per
        return out


def heldout_reference_features(metrics: VideoMetrics, reader, max_clips: int = 64) -> Tensor | None:
    """V-JEPA 2 features (N, C) of up to `max_clips` held-out video clips (data/heldout.HeldOutReader: their
    stored teacher pixels, in bucket then id order: deterministic), None when none has teacher pixels."""
    feats = []
    for bucket in sorted(reader.buckets):
        for gid in reader.bucket_ids(bucket):
            if len(feats) >= max_clips:
                break
            pix = reader.read(int(gid), teacher=True).teacher_pixels  # (1, 3, T', S, S) or None
            if pix is not None and pix.shape[2] > 2:  # a clip (an image is one tubelet)
                feats.append(metrics.vjepa_features_from_pixels(pix))
    return torch.cat(feats) if len(feats) >= 2 else None


def score_validation(metrics: VideoMetrics, videos: list, cfg, reference_features: Tensor | None = None
                     ) -> dict[str, float]:
    """The validation videos' metrics as flat `eval/<metric>` values (+ `eval/fd_samples_*` when computed).

    `videos`: `sampling.generate`'s [(name, uint8 (T, H, W, 3))] — "t2v_<i>" with `cfg.prompts[i]`, "i2v_00"
    with `cfg.i2v_prompt`, conditioned on `cfg.i2v_frame`'s first frame; `cfg`: the run's `EvalConfig`;
    `reference_features`: `heldout_reference_features(...)` for `fd_vjepa` (absent without). The one
    implementation the trainer's validation and `motif-eval` share."""
    from motif_train.sampling import load_first_frame

    frames, prompts, cond = [], [], []
    for name, v in videos:
        frames.append(v.numpy() if hasattr(v, "numpy") else np.asarray(v))
        i2v = name.startswith("i2v")
        prompts.append(cfg.i2v_prompt if i2v else cfg.prompts[int(name.split("_")[-1])])
        cond.append(load_first_frame(cfg.i2v_frame, cfg.height, cfg.width) if i2v and cfg.i2v_frame else None)
    got = metrics.score(frames, prompts, cond_images=cond, reference_features=reference_features)
    out = {f"eval/{k}": float(v) for k, v in got.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if got.get("fd_samples"):
        out["eval/fd_samples_generated"], out["eval/fd_samples_reference"] = map(float, got["fd_samples"])
    return out
