"""Benchmark: forward+backward of our training DiT vs diffusers' MotifVideoTransformer3DModel
(same weights, same inputs, one process, interleaved repetitions), and the TREAD speed-up
next to the analytic FLOP cut.

    # CPU (default): a narrow model with the 2B block layout (12 dual / 16 single / 8 decoder)
    python scripts/bench_model.py
    # GPU: the full 2B preset at 81x480x832, bf16
    python scripts/bench_model.py --device cuda --preset motif_video_2b --shape 81x480x832 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from motif_train.models import build_model, load_model_config, to_diffusers
from motif_train.models.flops import latent_shape, model_flops, num_video_tokens

# The 2B block layout (so the 2..23 route means the same thing), narrow enough for 2 CPU cores.
CPU_SMALL = dict(num_attention_heads=4, attention_head_dim=32, rope_axes_dim=[8, 12, 12], text_embed_dim=64,
                 image_embed_dim=32, repa={"block": None})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _checkpoint_blocks(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """Per-block activation checkpointing for the benchmark only (the trainer's AC lives in distributed/)."""
    from torch.utils.checkpoint import checkpoint

    for blk in blocks:
        fwd = blk.forward
        blk.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="model preset (default: the narrow CPU config)")
    ap.add_argument("--shape", default="17x128x224", help="FRAMESxHEIGHTxWIDTH pixels")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ac", action="store_true", help="checkpoint every block (both models)")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = load_model_config(args.preset) if args.preset else load_model_config("motif_video_2b", **CPU_SMALL)
    route = type(cfg.routing)(cfg.routing.start, cfg.routing.end, args.ratio)
    f, h, w = (int(v) for v in args.shape.split("x"))
    lat = latent_shape(f, h, w)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).train()
    with torch.no_grad():  # trained-like random weights: zero-init gates/outputs make nothing cheaper, but be safe
        for p in model.parameters():
            p.normal_(0, 0.02)
    ref = None if args.skip_diffusers else to_diffusers(model).to(device=device, dtype=dtype).train()
    if args.ac:
        _checkpoint_blocks(model, model.blocks())
        if ref is not None:
            ref.enable_gradient_checkpointing()
    g = torch.Generator(device="cpu").manual_seed(1)
    b = args.batch
    kw = dict(hidden_states=torch.randn(b, cfg.in_channels, *lat, generator=g).to(device, dtype),
              timestep=(torch.rand(b, generator=g) * 1000).to(device),
              encoder_hidden_states=torch.randn(b, args.text_len, cfg.text_embed_dim, generator=g).to(device, dtype))

    def ours():
        model.set_routing(None)
        return model(**kw, route=False).sample

    def routed():
        model.set_routing(route)
        return model(**kw).sample

    def diffusers_fwd():
        return ref(**kw).sample

    modes = {"ours": ours, "routed": routed}
    if ref is not None:
        modes["diffusers"] = diffusers_fwd
    times = {k: [] for k in modes}
    peak = {}
    for it in range(args.warmup + args.reps):
        for name, fn in modes.items():  # interleaved: slow drift hits every mode alike
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            out.float().square().mean().backward()
            _sync(device)
            dt = time.perf_counter() - t0
            for m in (model, ref):
                if m is not None:
                    m.zero_grad(set_to_none=True)
            if it >= args.warmup:
                times[name].append(dt)
                if device.type == "cuda":
                    peak[name] = torch.cuda.max_memory_allocated() / 2**30
    med = {k: statistics.median(v) for k, v in times.items()}
    full = model_flops(cfg, lat, text_len=args.text_len)
    cut = model_flops(cfg, lat, text_len=args.text_len, routing=route)
    res = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, "
        f"{torch.get_num_threads()} threads)",
        torch=torch.__version__, preset=args.preset or "cpu-small (2B layout, D=128)", shape=args.shape,
        tokens=num_video_tokens(cfg, lat),
        batch=b, dtype=args.dtype, ac=args.ac, route=f"{route.start}..{route.end} r={route.ratio}",
        median_s={k: round(v, 4) for k, v in med.items()},
        routed_speedup=med["ours"] / med["routed"], analytic_speedup=full.total / cut.total,
        analytic_flop_cut=1 - cut.total / full.total,
        tflops_per_s={"ours": b * full.total / med["ours"] / 1e12,
                      "routed (useful FLOPs)": b * cut.total / med["routed"] / 1e12},
    )
    if "diffusers" in med:
        res["ours_over_diffusers"] = med["ours"] / med["diffusers"]
        res["tflops_per_s"]["diffusers"] = b * full.total / med["diffusers"] / 1e12
    if peak:
        res["peak_mem_gib"] = {k: round(v, 1) for k, v in peak.items()}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
