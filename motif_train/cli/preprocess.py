"""`motif-preprocess` (also `python -m motif_train.cli.preprocess`): raw clips -> training shards.

    motif-preprocess --input clips/ 'v2d/{00000..00009}.tar' --out data/tiny --encoders ckpt/ \\
        --curriculum configs/curriculum/tiny.yaml [--fps 8] [--no-image] [--device cuda]

Buckets come from `--buckets 9x64x96 5x96x64 ...` or from the union of the curriculum's stage
buckets; the REPA teacher pixels are written (by default) for the buckets of the stages with
`repa: true` (`--teacher`: every bucket, `--no-teacher`: none). Under torchrun (RANK/WORLD_SIZE
set) each rank takes its slice of the inputs; rank 0 writes the manifest once all are done.
The format is described in `motif_train/data/shards.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import yaml

from motif_train.data.shards import bucket_name, parse_bucket, validate_bucket

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def read_curriculum(path: str | Path) -> list[dict]:
    """Stages [{"name", "buckets": ["FxHxW", ...], "repa"}] of a curriculum YAML (top-level
    `stages:` or `curriculum: {stages: ...}`), every bucket validated."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    cfg = cfg.get("curriculum", cfg)
    stages = cfg.get("stages") if isinstance(cfg, dict) else None
    if not stages:
        raise ValueError(f"{path}: no `stages:` list (expected stages: [{{name, buckets: [[F, H, W], ...], "
                         "repa}, ...])")
    out = []
    for i, st in enumerate(stages):
        name = str(st.get("name", f"stage{i}"))
        bs = []
        for b in st.get("buckets") or []:
            if len(b) != 3:
                raise ValueError(f"{path}: stage {name!r} bucket {b} must be [frames, height, width]")
            try:
                bs.append(bucket_name(*(int(x) for x in b)))
            except ValueError as e:
                raise ValueError(f"{path}: stage {name!r}: {e}") from None
        if not bs:
            raise ValueError(f"{path}: stage {name!r} has no buckets")
        out.append({"name": name, "buckets": bs, "repa": bool(st.get("repa", False))})
    return out


def _bucket_arg(text: str) -> str:
    try:
        return bucket_name(*parse_bucket(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="motif-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="clip folders (<key>.mp4 + <key>.txt [+ <key>.json]), video/image files, video2dataset "
                        "tars, globs or brace patterns")
    p.add_argument("--out", required=True, help="dataset root (shards/, manifest.json, ...)")
    p.add_argument("--encoders", required=True, help="encoder checkpoint folder (vae/, text_encoder/, tokenizer/, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--curriculum", help="curriculum YAML: the union of its stage buckets")
    src.add_argument("--buckets", nargs="+", type=_bucket_arg, help="buckets FxHxW (frames 1+4k, sizes %% 16 == 0)")
    p.add_argument("--fps", type=float, default=None, help="target fps (default: keep the source fps)")
    p.add_argument("--max-frames", type=int, default=None, help="use at most this many (resampled) frames per clip")
    p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="REPA teacher pixels: --teacher for every bucket, --no-teacher for none (default: the "
                        "buckets of the curriculum's repa stages; none with --buckets)")
    p.add_argument("--no-image", action="store_true", help="skip the SigLIP first-frame embeddings")
    p.add_argument("--shard-samples", type=int, default=64, help="samples per shard (default 64)")
    p.add_argument("--shard-mb", type=float, default=512, help="close a shard at this size in MiB (default 512)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (cuda:<LOCAL_RANK> under torchrun) or cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="encoder dtype (default float32)")
    p.add_argument("--max-text-len", type=int, default=512, help="tokenizer max_length (default 512)")
    p.add_argument("--decode-threads", type=int, default=0, help="decord threads per reader (0: auto)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="held-out (validation) share of every bucket, by a stable hash of the sample key "
                        "(default 0.01; 0: none beyond --val-min-per-bucket); never planned for training")
    p.add_argument("--val-min-per-bucket", type=int, default=8,
                   help="hold out at least this many samples per bucket, at most 10%% of the bucket "
                        "(default 8; docs/data.md, 'The held-out split')")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    stages = None
    if args.curriculum:
        cur = read_curriculum(args.curriculum)
        buckets = sorted({b for st in cur for b in st["buckets"]}, key=parse_bucket)
        stages = {st["name"]: st["buckets"] for st in cur}
        repa = sorted({b for st in cur if st["repa"] for b in st["buckets"]}, key=parse_bucket)
        teacher = repa if args.teacher is None else args.teacher
    else:
        buckets = args.buckets
        teacher = bool(args.teacher)
    for b in buckets:
        validate_bucket(*parse_bucket(b))

    from motif_train.data.preprocess import preprocess

    result = preprocess(args.input, args.out, args.encoders, buckets=buckets, fps=args.fps, teacher=teacher,
                        image=not args.no_image, shard_samples=args.shard_samples,
                        shard_bytes=int(args.shard_mb * (1 << 20)), device=device, rank=rank, world_size=world,
                        max_text_len=args.max_text_len, max_frames=args.max_frames, stages=stages,
                        dtype=_DTYPES[args.dtype], progress=not args.no_progress,
                        decode_threads=args.decode_threads, val_fraction=args.val_fraction,
                        val_min_per_bucket=args.val_min_per_bucket)
    if rank == 0:
        t = result["totals"]
        print(json.dumps({"out": str(args.out), "samples": t["samples"], "tokens": t["tokens"],
                          "shards": t["shards"], "bytes": t["bytes"], "dropped": result["dropped"],
                          "buckets": {k: v["samples"] for k, v in result["buckets"].items()},
                          "held_out": {k: v["samples"] for k, v in result["val_split"]["buckets"].items()}},
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
