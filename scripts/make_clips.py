"""Write the deterministic moving-shape test clips: a clip folder or video2dataset-style tars.

    python scripts/make_clips.py --out data/clips                 # <key>.mp4/.txt/.json (+ broken samples)
    python scripts/make_clips.py --out data/v2d --tars --per-tar 5  # 00000.tar, 00001.tar, ...
"""

from __future__ import annotations

import argparse
import tarfile

from motif_train.data.clips import default_codec, default_specs, write_clip_folder, write_video2dataset_tars


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n", type=int, default=12, help="number of good clips")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tars", action="store_true", help="write video2dataset-style WebDataset tars instead")
    ap.add_argument("--per-tar", type=int, default=5, help="good samples per tar (with --tars)")
    ap.add_argument("--no-broken", action="store_true", help="omit the truncated / empty-caption / zero-byte samples")
    args = ap.parse_args(argv)

    specs = default_specs(args.n, args.seed)
    broken = not args.no_broken
    print(f"codec {default_codec()} | {len(specs)} clips | seed {args.seed} -> {args.out}")
    for s in specs:
        print(f"  {s.key}  {s.height:>4}x{s.width:<4} {s.frames:>3} frames @ {s.fps:g} fps  {s.caption!r}")
    if args.tars:
        tars = write_video2dataset_tars(args.out, specs, per_tar=args.per_tar, broken=broken)
        for t in tars:
            with tarfile.open(t) as tf:
                keys = sorted({m.name.rsplit(".", 1)[0] for m in tf.getmembers()})
            print(f"  {t.name}: {len(keys)} samples ({', '.join(keys)})")
        return {"tars": tars}
    result = write_clip_folder(args.out, specs, broken=broken)
    print(f"  {len(result['clips'])} good mp4s in {args.out}")
    for reason, path in result["broken"].items():
        print(f"  broken ({reason}): {path.name}")
    return result


if __name__ == "__main__":
    main()
