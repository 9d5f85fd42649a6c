"""Data benchmarks.

    python scripts/bench_data.py                 # loader, planner, preprocessing (CPU)
    python scripts/bench_data.py --gpu-vae       # full Wan 2.1 VAE encode of 81x480x832 clips (GPU)

1. loader: samples/s of `ShardSource` with 2 workers on shards of 480p x 81-frame-sized samples
   (latents (16, 21, 60, 104), 256 text tokens x 2560, 4096 SigLIP tokens x 1152, fp16), next to
   what one training step consumes (bench_train's measured H200 step, 2 samples per rank).
2. planner: utilization of our plan vs naive per-rank bucketing, uniform and long-tailed buckets,
   64 ranks.
3. preprocessing: clips/s of `motif-preprocess` with the tiny encoders on this CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def bench_loader(n_samples: int, steps: int, workers: int) -> dict:
    from motif_train.data.curriculum import StageConfig
    from motif_train.data.loader import ShardSource
    from motif_train.data.shards import ShardWriter, build_manifest, encode_sample, save_manifest

    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rng = np.random.default_rng(0)
    bucket, f, h, w = "81x480x832", 81, 480, 832
    lat = (16, 1 + (f - 1) // 4, h // 8, w // 8)
    with ShardWriter(root, target_samples=16) as writer:
        for i in range(n_samples):
            meta = {"caption": "bench", "source": "bench", "bucket": bucket, "frames": f, "fps": 16.0,
                    "tokens": lat[1] * (h // 16) * (w // 16)}
            writer.write(bucket, encode_sample(f"s{i:05d}", rng.standard_normal(lat, dtype=np.float32),
                                               rng.standard_normal((256, 2560), dtype=np.float32),
                                               image=rng.standard_normal((4096, 1152), dtype=np.float32),
                                               meta=meta))
    save_manifest(root, build_manifest(writer.entries))
    sample_mb = sum(p.stat().st_size for p in root.rglob("*.tar")) / n_samples / 2**20
    stage = StageConfig(name="b", steps=10**6, buckets=[[f, h, w]], token_budget=2 * 32760)  # 2 per rank
    src = ShardSource(root=str(root), num_workers=workers, text_dim=2560, image_dim=1152, seed=0, dp_rank=0,
                      dp_size=1, grad_accum=1)
    src.set_stage(stage, teacher=False)
    src.next_step(1)  # worker start-up
    t0 = time.perf_counter()
    got = sum(len(b) for s in range(steps) for b in src.next_step(s + 2))
    dt = time.perf_counter() - t0
    h200 = json.loads((ROOT / "docs" / "bench" / "train_gpu.json").read_text())
    need = max(v["samples_per_s"] for k, v in h200.items() if isinstance(v, dict) and "samples_per_s" in v)
    return {"workers": workers, "sample_mib": round(sample_mb, 2), "samples_per_s": got / dt,
            "mib_per_s": got * sample_mb / dt, "h200_step_consumes_samples_per_s": need,
            "headroom": got / dt / need}


def bench_planner(world: int = 64) -> dict:
    from motif_train.data.plan import build_plan, naive_plan_utilization

    out = {}
    rng = np.random.default_rng(0)
    for dist in ("uniform", "long-tailed"):
        n_buckets, total = 30, 200_000
        if dist == "uniform":
            counts = np.full(n_buckets, total // n_buckets)
        else:
            w = 1.0 / np.arange(1, n_buckets + 1) ** 1.1
            counts = np.maximum(1, (w / w.sum() * total).astype(int))
        tokens = np.sort(rng.integers(256, 40_000, n_buckets))
        buckets, shards = {}, []
        for i, (c, t) in enumerate(zip(counts, tokens, strict=True)):
            name = f"{1 + 4 * i}x256x256"
            buckets[name] = {"frames": 1 + 4 * i, "height": 256, "width": 256, "latent_shape": [16, 1, 32, 32],
                             "tokens": int(t), "samples": int(c)}
            shards.append({"path": f"shards/{name}.tar", "bucket": name, "samples": int(c),
                           "keys": [f"{name}_{j}" for j in range(c)]})
        manifest = {"version": 1, "buckets": buckets, "shards": shards}
        names = list(buckets)
        plan = build_plan(manifest, names, world_size=world, token_budget=32768, seed=0, epoch=0)
        naive = naive_plan_utilization(manifest, names, world_size=world, token_budget=32768, seed=0)
        out[dist] = {"samples": int(counts.sum()), "buckets": n_buckets, "world_size": world,
                     "ours": plan.utilization, "naive": naive}
    return out


def bench_preprocess(n_clips: int) -> dict:
    from motif_train.data.clips import default_specs, write_clip_folder
    from motif_train.data.preprocess import preprocess
    from motif_train.objectives.encoders import build_tiny_encoders

    root = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    build_tiny_encoders(root / "enc")
    write_clip_folder(root / "clips", default_specs(n_clips, seed=0), broken=False)
    t0 = time.perf_counter()
    m = preprocess([str(root / "clips")], root / "data", root / "enc", buckets=[[1, 64, 64], [9, 64, 96],
                                                                             [5, 96, 64], [9, 96, 128]])
    dt = time.perf_counter() - t0
    return {"clips": n_clips, "samples": m["totals"]["samples"], "clips_per_s": n_clips / dt,
            "encoders": "tiny (real classes)"}


def bench_gpu_vae(n: int) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()  # the Wan 2.1 VAE config, random weights
    x = torch.rand(1, 3, 81, 480, 832, device="cuda", dtype=torch.bfloat16) * 2 - 1
    with torch.no_grad():
        vae.encode(x)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            vae.encode(x).latent_dist.mode()
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"device": torch.cuda.get_device_name(), "clip": "81x480x832", "dtype": "bf16", "clips_per_s": n / dt,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-vae", action="store_true")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.gpu_vae:
        res = {"vae": bench_gpu_vae(3)}
    else:
        res = {"loader": bench_loader(args.samples, args.steps, 2), "planner": bench_planner(),
               "preprocess": bench_preprocess(args.clips)}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
