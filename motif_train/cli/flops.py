"""`motif-flops`: analytic training FLOPs of a model preset over a list of workloads.

    motif-flops --model motif_video_2b --shapes 121x736x1280 81x480x832 --route 2:23:0.5
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from motif_train.models.config import RoutingConfig, load_model_config
from motif_train.models.flops import latent_shape, model_flops, num_video_tokens

DEFAULT_SHAPES = ["121x736x1280", "81x480x832", "33x256x448", "1x256x256"]


def parse_shape(s: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 121x736x1280") from None
    return f, h, w


def parse_route(s: str) -> RoutingConfig:
    try:
        start, end, ratio = s.split(":")
        return RoutingConfig(int(start), int(end), float(ratio))
    except ValueError:
        raise argparse.ArgumentTypeError(f"route {s!r}: expected START:END:RATIO, e.g. 2:23:0.5") from None


def flop_table(model: str, shapes: list[tuple[int, int, int]], *, route: RoutingConfig | None = None,
               text_len: int = 512, image_len: int = 0) -> list[dict]:
    """One row per workload: tokens, forward split, fwd+bwd without and with the route, the cut."""
    cfg = load_model_config(model)
    route = route if route is not None else cfg.routing
    cfg.routing = route
    cfg.validate()  # refuse a route that crosses the decoder boundary before printing anything
    rows = []
    for shp in shapes:
        lat = latent_shape(*shp)
        full = model_flops(cfg, lat, text_len=text_len, image_len=image_len)
        routed = model_flops(cfg, lat, text_len=text_len, image_len=image_len, routing=route)
        rows.append(dict(
            workload="x".join(map(str, shp)), tokens=num_video_tokens(cfg, lat),
            linear_fwd_tflop=full.linear_fwd / 1e12, attn_fwd_tflop=full.attn_fwd / 1e12,
            total_pflop=full.total / 1e15, routed_total_pflop=routed.total / 1e15,
            cut=1.0 - routed.total / full.total,
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="motif-flops", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="motif_video_2b", help="preset name in configs/model or a YAML path")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                    help="FRAMESxHEIGHTxWIDTH pixel workloads")
    ap.add_argument("--route", type=parse_route, default=None,
                    help="TREAD route START:END:RATIO (default: the preset's)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens per sample")
    ap.add_argument("--image-len", type=int, default=0, help="SigLIP tokens per sample (I2V), 0 for T2V")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)

    rows = flop_table(args.model, args.shapes, route=args.route, text_len=args.text_len, image_len=args.image_len)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    route = args.route or load_model_config(args.model).routing
    table = Table(title=f"{args.model}: training FLOPs per sample (text {args.text_len}, image {args.image_len}; "
                        f"route {route.start}..{route.end} r={route.ratio})")
    for col in ("workload FxHxW", "tokens N", "linear fwd TFLOP", "attn fwd TFLOP", "fwd+bwd PFLOP",
                "routed fwd+bwd PFLOP", "FLOP cut"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["workload"], f"{r['tokens']:,}", f"{r['linear_fwd_tflop']:,.1f}", f"{r['attn_fwd_tflop']:,.1f}",
                      f"{r['total_pflop']:.3f}", f"{r['routed_total_pflop']:.3f}", f"{100 * r['cut']:.1f}%")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
