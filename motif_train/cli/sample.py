"""`motif-sample`: generate videos offline from a training checkpoint, like validation does.

    motif-sample checkpoint=runs/x/checkpoints/step_00012000 prompt="a red fox in the snow" \
        [out=<dir>] [weights=ema|raw] [image=<first frame for I2V>] [frames=33 height=256 width=448]
        [steps=30 shift=8 guidance=5 seed=0 fps=24] [encoders=<folder>]

Writes one mp4 per request (at fps=, default 24 as the model card's example) and a PNG frame grid
whose rows say the task, seed and prompt. Encoders (VAE, text, SigLIP) come from the run's
`encoders.root` unless `encoders=` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from motif_train.cli.export import load_checkpoint_model, parse_kv, run_config
from motif_train.sampling import EvalConfig, build_requests, generate, request_labels, write_outputs

USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    keys = {"checkpoint": "required", "prompt": "required", "out": "", "weights": "ema", "image": "", "frames": "",
            "height": "", "width": "", "steps": "", "shift": "", "guidance": "", "seed": "", "fps": "", "encoders": "",
            "config": ""}
    a = parse_kv(sys.argv[1:] if argv is None else argv, keys, USAGE)
    ckpt = Path(a["checkpoint"])
    cfg = run_config(ckpt, a.get("config"))
    from omegaconf import OmegaConf

    ev = OmegaConf.to_container(cfg.eval, resolve=True) if "eval" in cfg else {}
    for key, field, cast in (("frames", "frames", int), ("height", "height", int), ("width", "width", int),
                             ("steps", "steps", int), ("shift", "shift", float), ("guidance", "guidance_scale", float),
                             ("seed", "seed", int)):
        if a.get(key):
            ev[field] = cast(a[key])
    ev["fps"] = int(a.get("fps") or 24)
    ev["i2v_frame"] = a.get("image") or None
    ev["i2v_prompt"] = a["prompt"]
    ev["prompts"] = [a["prompt"]]
    ev_cfg = EvalConfig(**{k: v for k, v in ev.items() if k in EvalConfig.__dataclass_fields__})
    encoders = a.get("encoders") or cfg.encoders.root
    if not encoders:
        raise SystemExit("error: the run has no encoders.root: pass encoders=<folder with vae/ text_encoder/ ...>")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint_model(ckpt, weights=a.get("weights", "ema"), config=a.get("config")).to(device)
    items, negative, vae = build_requests(ev_cfg, encoders, device)
    if ev_cfg.i2v_frame:
        items = items[-1:]  # with image=, the one request is the I2V one
    videos = generate(model, items, negative, vae, ev_cfg, device=device)
    out = Path(a.get("out") or ckpt.parent.parent / "samples" / f"offline_{ckpt.name}")
    paths, grid = write_outputs(videos, out, ev_cfg.fps, request_labels(ev_cfg, [n for n, _ in videos]))
    print("\n".join(str(p) for p in [*paths, grid]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
