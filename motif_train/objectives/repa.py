"""Early-phase REPA: align projected DiT video tokens with a frozen V-JEPA 2 teacher.

Token matching between the teacher grid and the DiT grid (DESIGN.md):

* time: the clip has 1+4k frames -> 1+k latent frames. A copy of frame 0 is prepended
  (2+4k frames -> 1+2k teacher tubelets of 2 frames); latent 0 <- tubelet 0 and
  latent i <- mean(tubelets 2i-1, 2i), mirroring the causal VAE's 1 + 4-frame grouping.
* space: the teacher runs on an S x S square (its RoPE grid is built from crop_size; other
  shapes are silently wrong, so they are refused) and its (S/p, S/p) map is resized
  bilinearly to the DiT token grid (H/16, W/16).

Inside a TREAD route only the kept tokens exist in the DiT; the loss gathers the teacher
tokens at the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass
class RepaLossConfig:
    """weight: λ of the REPA term; until_step: last optimizer step with REPA (None = always)."""

    weight: float = 0.5
    until_step: int | None = None

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"repa.weight={self.weight} must be >= 0")

    def active(self, step: int) -> bool:
        return self.weight > 0 and (self.until_step is None or step <= self.until_step)


def repa_stages(stages, loss: RepaLossConfig, total_steps: int | None = None) -> list[bool]:
    """Per curriculum stage, whether REPA runs at some step of it, as the trainer decides it: the stage has
    `repa: true`, `weight > 0`, and the stage starts at or before `until_step` and the run's last step
    (`total_steps`, default the curriculum's: the last stage runs on to it). `stages`: StageConfig-like
    (`.steps`, `.repa`). No stage: the REPA head never gets a gradient (`models.apply_repa_freeze`)."""
    last = sum(int(s.steps) for s in stages) if total_steps is None else int(total_steps)
    if loss.until_step is not None:
        last = min(last, int(loss.until_step))
    out, start = [], 1
    for s in stages:
        out.append(bool(s.repa) and loss.weight > 0 and start <= last)
        start += int(s.steps)
    return out


def teacher_pixels(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Teacher input from a clip: frames (B, 3, 1+4k, H, W) in [-1, 1] -> (B, 3, 2+4k, S, S).

    Frame 0 is duplicated so tubelet 0 covers only the first frame; every frame is resized
    (not cropped) to the square so each teacher position maps back onto the full DiT grid.
    """
    b, c, t, h, w = frames.shape
    if (t - 1) % 4:
        raise ValueError(f"teacher_pixels: {t} frames; expected 1+4k (a Wan VAE clip)")
    x = rearrange(torch.cat([frames[:, :, :1], frames], dim=2), "b c t h w -> (b t) c h w")  # (B*(2+4k), 3, H, W)
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return rearrange(x, "(b t) c h w -> b c t h w", b=b).to(frames.dtype)  # (B, 3, 2+4k, S, S)


def match_teacher_tokens(teacher: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Teacher map (B, 1+2k, Sh, Sw, C) -> (B, F*Hg*Wg, C) on the DiT token grid (F=1+k, Hg, Wg).

    Rows come out in the DiT's (f, h, w) raster order, so row n matches video token n.
    """
    b, tt, sh, sw, c = teacher.shape
    f, hg, wg = grid
    if tt != 2 * f - 1:
        raise ValueError(f"teacher has {tt} tubelets but the DiT grid has {f} latent frames; expected "
                         f"{2 * f - 1} (prepend frame 0 with teacher_pixels)")
    first = teacher[:, :1]  # (B, 1, Sh, Sw, C)
    rest = teacher[:, 1:].unflatten(1, (f - 1, 2)).mean(dim=2)  # (B, F-1, Sh, Sw, C)
    t = rearrange(torch.cat([first, rest], dim=1), "b f h w c -> (b f) c h w")  # (B*F, C, Sh, Sw)
    if (sh, sw) != (hg, wg):
        t = F.interpolate(t.float(), size=(hg, wg), mode="bilinear", align_corners=False).to(teacher.dtype)
    return rearrange(t, "(b f) c h w -> b (f h w) c", b=b)  # (B, F*Hg*Wg, C)


def repa_loss(projected: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mean cosine similarity.

    projected (B, K, C) from the REPA head; target (B, N, C) teacher tokens on the DiT grid;
    ids (B, K) positions of the projected tokens among the N (TREAD), None when K == N.
    """
    if ids is not None:
        target = target.gather(1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))  # (B, K, C)
    if projected.shape != target.shape:
        raise ValueError(f"REPA shapes differ: projected {tuple(projected.shape)} vs teacher {tuple(target.shape)}")
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
