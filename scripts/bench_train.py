"""Benchmark of the whole training step (data -> objective -> FSDP backward -> AdamW -> EMA).

    # CPU: experiment=tiny_cpu under torchrun with 2 gloo ranks: samples/s and data-wait share
    python scripts/bench_train.py
    # one GPU, one command (~10 min on an H200): the full 2B recipe at 480p x 81 and 720p x 121, AC
    # full vs selective, sdpa vs flex, TREAD on; s/step, MFU, whole-run peak memory, and a check that
    # every attention backend matches sdpa (forward + backward, bf16) with the kernels it ran
    python scripts/bench_train.py --gpu --steps 6 --warmup 2 --out docs/bench/train_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarize(metrics: Path, warmup: int, peak_tflops: float | None) -> dict:
    from motif_train.metrics import read_metrics

    rows = [r for r in read_metrics(metrics) if r["step"] > warmup]
    t = sum(r["step_time"] for r in rows)
    out = {"steps_measured": len(rows), "samples_per_s": sum(r["samples"] for r in rows) / t,
           "tokens_per_s": sum(r["tokens"] for r in rows) / t,
           "data_wait_share": sum(r["data_wait"] for r in rows) / t,
           "step_time_s": t / len(rows), "model_tflops_per_s": sum(r["flops"] for r in rows) / t / 1e12}
    if peak_tflops:
        out["mfu"] = out["model_tflops_per_s"] / peak_tflops
    return out


def bench_cpu(args) -> dict:
    run = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "motif_train.cli.train", "experiment=tiny_cpu", f"run_dir={run}", "logger.wandb=false",
           "checkpoint.every=0", "checkpoint.save_at_end=false"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = {"setup": "experiment=tiny_cpu, 2 gloo ranks, 24 steps (2 stages)", **summarize(run / "metrics.jsonl",
                                                                                        args.warmup, None)}
    return res


SHAPES = {"480p": (81, 480, 832), "720p": (121, 720, 1280)}
# The issue-9 suite: both stage shapes, AC full vs selective with sdpa, and flex at selective.
SUITE = ("480p:full:sdpa", "480p:selective:sdpa", "480p:selective:flex",
         "720p:full:sdpa", "720p:selective:sdpa", "720p:selective:flex")


def attention_check() -> dict:
    """GPU only: every attention backend against sdpa on one padded problem (bf16, forward and
    backward; what the CPU tests cannot run: flex backward, varlen), and the SDPA kernel picked."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from motif_train.models.attention_backends import attend, build_key_masks

    torch.manual_seed(0)
    n, i, t, lens = 4096, 16, 256, (256, 77)
    text_mask = torch.arange(t, device="cuda")[None] < torch.tensor(lens, device="cuda")[:, None]
    base = [torch.randn(2, n + i + t, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    ref = None
    out = {}
    for backend in ("sdpa", "flex", "varlen"):
        q, k, v = (x.clone().requires_grad_() for x in base)
        try:
            masks = build_key_masks(backend, text_mask, n, i, torch.bfloat16)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                o = attend(q, k, v, masks.joint, backend)
                torch.cuda.synchronize()
            o.float().square().mean().backward()
        except Exception as e:  # record, keep the other backends
            out[backend] = {"error": repr(e)[:300]}
            continue
        kernels = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "flash" in e.key.lower()
                          or "fmha" in e.key.lower() or "flex" in e.key.lower() or "triton" in e.key.lower()})
        grads = torch.cat([x.grad.flatten() for x in (q, k, v)]).float()
        if ref is None:
            ref = (o.detach().float(), grads)
        out[backend] = {"max_abs_out_vs_sdpa": (o.detach().float() - ref[0]).abs().max().item(),
                        "max_abs_grad_vs_sdpa": (grads - ref[1]).abs().max().item(), "kernels": kernels[:6]}
    return out


def run_variant(args, shape: str, ac: str, backend: str, peak: float) -> dict:
    """One full-recipe run (bf16, AdamW, EMA every step, TREAD 2..23 r=0.5) at one stage shape."""
    import torch
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config
    from motif_train.trainer import Trainer

    f, h, w = SHAPES[shape]
    run = Path(tempfile.mkdtemp(prefix="bench_train_gpu_"))
    overrides = [
        "experiment=motif_video_2b_64xh200", f"run_dir={run}", "logger.wandb=false", "encoders.root=null",
        "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
        "objective.conditioning.text_dropout=0", "objective.conditioning.i2v_prob=0",
        # captions of 128..256 real tokens padded to 256: the masked path, as with real data
        "data.text_len=[128,256]", "data.text_pad_to=[256]", "data.image_tokens=16",
        f"parallel.compile={not args.no_compile}", f"parallel.ac={ac}", f"model.attention_backend={backend}",
        "ema.every=1", f"logger.log_every={args.steps}",
        "curriculum.stages=[{name: bench, steps: %d, buckets: [[%d, %d, %d]], global_batch: 1, repa: false, "  # noqa: UP031
        "shift: 8.0, routing: {start: 2, end: 23, ratio: 0.5}}]" % (args.steps, f, h, w),
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_train_config(compose(config_name="train", overrides=overrides))
    res = {"shape": f"{f}x{h}x{w}", "ac": ac, "attention_backend": backend, "compile": bool(cfg.parallel.compile)}
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer = Trainer(cfg)
        trainer.train()
        trainer.close()
    except Exception as e:  # one failing variant (OOM, compile) must not lose the others
        res["error"] = repr(e)[:500]
        return res
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    res.update(summarize(run / "metrics.jsonl", args.warmup, peak))
    # logger.log_every = steps: one window, so its peak is the run's (the logger resets it per window)
    res["peak_mem_gib"] = (trainer.last_window or {}).get("mem/peak_gib")
    del trainer
    shutil.rmtree(run, ignore_errors=True)
    return res


def bench_gpu(args) -> dict:
    import torch

    from motif_train.metrics import peak_tflops

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "setup": "full 2B recipe, batch 1, text 128..256 padded to 256, 16 image tokens, bf16 params + fp32 "
                        f"reduce, compile={not args.no_compile}, TREAD 2..23 r=0.5, FSDP2 on 1 GPU, fused AdamW + "
                        "EMA every step; MFU = counted model FLOPs / (s x 989 TFLOP/s)",
               "attention_check": attention_check(), "variants": []}
    peak = peak_tflops(torch.device("cuda"))
    for variant in args.variants.split(","):
        shape, ac, backend = variant.split(":")
        print(f"== {variant}", flush=True)
        results["variants"].append({"variant": variant, **run_variant(args, shape, ac, backend, peak)})
        print(json.dumps(results["variants"][-1], indent=2), flush=True)
        if args.out:  # after every variant: a time limit keeps what was measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the averages (compile, caches)")
    ap.add_argument("--variants", default=",".join(SUITE),
                    help="GPU: comma list of SHAPE:AC:BACKEND (shapes 480p|720p; parallel.ac; model.attention_backend)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = bench_gpu(args) if args.gpu else bench_cpu(args)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
