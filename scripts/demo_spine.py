"""End-to-end spine demo on CPU: tiny real encoders -> latents -> tiny DiT trained with
rectified flow + TREAD + REPA -> diffusers export that `MotifVideoTransformer3DModel`
loads strictly. Prints the loss falling and writes a loss PNG.

    python scripts/demo_spine.py --out runs/demo_spine --steps 80
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def moving_square_clips(n: int, frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, frames, h, w) in [-1, 1]: a coloured square sliding over a gradient."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    clips = torch.empty(n, 3, frames, h, w)
    for i in range(n):
        colour = torch.rand(3, generator=g) * 2 - 1
        bg = torch.stack([xx, yy, -xx]) * 0.5
        vx, vy = (torch.rand(2, generator=g) * 6 - 3).tolist()
        for t in range(frames):
            frame = bg.clone()
            cx, cy = int(w / 3 + vx * t) % (w - 12), int(h / 3 + vy * t) % (h - 12)
            frame[:, cy:cy + 12, cx:cx + 12] = colour[:, None, None]
            clips[i, :, t] = frame
    return clips


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo_spine")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from diffusers import MotifVideoTransformer3DModel
    from tqdm import tqdm

    from motif_train.batch import Batch
    from motif_train.models import build_model, from_diffusers, load_model_config, to_diffusers
    from motif_train.models.flops import model_flops
    from motif_train.objectives import DiffusionObjective, ObjectiveConfig, total_loss
    from motif_train.objectives.encoders import build_tiny_encoders, load_encoders
    from motif_train.objectives.repa import teacher_pixels

    print(f"[1/4] tiny random encoders (real diffusers/transformers classes) -> {out / 'encoders'}")
    build_tiny_encoders(out / "encoders")
    enc = load_encoders(out / "encoders")

    print("[2/4] encode 4 synthetic 9-frame 64x96 clips: Wan VAE latents, T5Gemma2 text, SigLIP frame 0")
    clips = moving_square_clips(4, 9, 64, 96)
    prompts = ["a red square slides right", "a blue box drifts down", "a green tile moves", "a square"]
    with torch.no_grad():
        text, mask = enc.text.encode(prompts, max_length=16)
        batch = Batch(latents=enc.vae.encode(clips), text=text, text_mask=mask,
                      image_embeds=enc.image.encode(clips[:, :, 0]),
                      teacher_pixels=teacher_pixels(clips, enc.teacher.crop_size))
        empty = enc.text.encode([""], max_length=16)

    cfg = load_model_config("tiny", routing={"start": 1, "end": 3, "ratio": 0.5})
    model = build_model(cfg).train()
    objective = DiffusionObjective(
        ObjectiveConfig(flow={"shift": 1.0}, conditioning={"i2v_prob": 0.5, "text_dropout": 0.1},
                        repa={"weight": 0.5, "until_step": args.steps // 2}),
        empty_text=(empty[0][0], empty[1][0]), teacher=enc.teacher)
    lat = tuple(batch.latents.shape[2:])
    f_full = model_flops(cfg, lat, text_len=16, image_len=16)
    f_route = model_flops(cfg, lat, text_len=16, image_len=16, routing=cfg.routing)
    print(f"[3/4] train the tiny DiT ({sum(p.numel() for p in model.parameters()):,} params) for {args.steps} "
          f"steps: TREAD {cfg.routing.start}..{cfg.routing.end} r={cfg.routing.ratio} "
          f"({100 * (1 - f_route.total / f_full.total):.0f}% fewer FLOPs), REPA until step {args.steps // 2}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    history = []
    t0 = time.time()
    for step in (bar := tqdm(range(1, args.steps + 1), desc="train", leave=False, disable=None)):
        o = objective(model, batch, step=step)
        loss = total_loss(o.losses, objective.config.weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in o.losses.items()})
        bar.set_postfix(denoise=f"{history[-1]['denoise']:.3f}")
        if step % 10 == 0:
            window = history[-10:]
            den = sum(h["denoise"] for h in window) / len(window)
            rep = [h["repa"] for h in window if "repa" in h]
            rep_s = f"  repa {sum(rep) / len(rep):+.3f}" if rep else "  repa off"
            tqdm.write(f"  step {step:4d}  denoise {den:.4f}{rep_s}  ({time.time() - t0:.1f}s)")
    first = sum(h["denoise"] for h in history[:10]) / 10
    last = sum(h["denoise"] for h in history[-10:]) / 10
    print(f"  denoise loss: first 10 steps {first:.4f} -> last 10 steps {last:.4f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["denoise"] for h in history], label="denoise", alpha=0.5)
    k = 10
    ma = [sum(h["denoise"] for h in history[max(0, i - k + 1):i + 1]) / min(k, i + 1) for i in range(len(history))]
    ax.plot(ma, label="denoise (moving avg)")
    ax.plot([i for i, h in enumerate(history) if "repa" in h], [h["repa"] for h in history if "repa" in h],
            label="repa")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)

    print(f"[4/4] export to diffusers -> {out / 'transformer'}")
    model.eval()
    to_diffusers(model).save_pretrained(out / "transformer")
    ref = MotifVideoTransformer3DModel.from_pretrained(out / "transformer").eval()
    back = from_diffusers(out / "transformer").eval()
    x = torch.randn(1, 33, *lat)
    kw = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=batch.text[:1],
              encoder_attention_mask=batch.text_mask[:1], image_embeds=batch.image_embeds[:1])
    with torch.no_grad():
        d = (ref(x, **kw).sample - model(x, **kw).sample).abs().max().item()
        r = (back(x, **kw).sample - model(x, **kw).sample).abs().max().item()
    print(f"  diffusers MotifVideoTransformer3DModel vs ours: max |diff| {d:.2e}; re-import: {r:.2e}")
    print(f"done: loss plot {out / 'loss.png'}, diffusers folder {out / 'transformer'}")
    if not (last < first and d <= 1e-5 and r == 0 and all(math.isfinite(h["denoise"]) for h in history)):
        raise SystemExit("demo check failed: loss did not fall or export mismatch")


if __name__ == "__main__":
    main()
