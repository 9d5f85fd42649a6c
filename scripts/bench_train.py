"""Benchmark of the whole training step (data -> objective -> FSDP backward -> AdamW -> EMA).

    # CPU: experiment=tiny_cpu under torchrun with 2 gloo ranks: samples/s and data-wait share
    python scripts/bench_train.py
    # one GPU: the full 2B preset at 81x480x832, bf16, activation checkpointing, compile, with and
    # without TREAD (2..23, r=0.5): MFU from the analytic FLOPs
    python scripts/bench_train.py --gpu --steps 8 --warmup 3
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
           "motif_train.train", "experiment=tiny_cpu", f"run_dir={run}", "logger.wandb=false",
           "checkpoint.every=0", "checkpoint.save_at_end=false"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = {"setup": "experiment=tiny_cpu, 2 gloo ranks, 24 steps (2 stages)", **summarize(run / "metrics.jsonl",
                                                                                        args.warmup, None)}
    return res


def bench_gpu(args) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from motif_train.metrics import peak_tflops
    from motif_train.train import CONFIG_DIR, to_train_config
    from motif_train.trainer import Trainer

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    peak = peak_tflops(torch.device("cuda"))
    for name, ratio in (("no routing", 0.0), ("TREAD 2..23 r=0.5", 0.5)):
        run = Path(tempfile.mkdtemp(prefix="bench_train_gpu_"))
        overrides = [
            "experiment=motif_video_2b_64xh200", f"run_dir={run}", "logger.wandb=false", "encoders.root=null",
            "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
            "objective.conditioning.text_dropout=0", "objective.conditioning.i2v_prob=0",
            "data.text_len=[256,256]", "data.image_tokens=16", f"parallel.compile={not args.no_compile}",
            f"parallel.ac={args.ac}", "ema.every=1", f"logger.log_every={args.steps}",
            "curriculum.stages=[{name: bench, steps: %d, buckets: [[81, 480, 832]], global_batch: 1, repa: false, "  # noqa: UP031
            "shift: 8.0, routing: {start: 2, end: 23, ratio: %s}}]" % (args.steps, ratio),
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = to_train_config(compose(config_name="train", overrides=overrides))
        try:
            trainer = Trainer(cfg)
            trainer.train()
            trainer.close()
        except Exception as e:  # record why, then measure without compile rather than lose the row
            if not cfg.parallel.compile:
                raise
            results[name + " (compile failed)"] = repr(e)[:500]
            print(f"compile failed for {name}: {e!r}; retrying without compile", flush=True)
            shutil.rmtree(run, ignore_errors=True)
            cfg.parallel.compile = False
            trainer = Trainer(cfg)
            trainer.train()
            trainer.close()
        results[name] = summarize(run / "metrics.jsonl", args.warmup, peak)
        results[name]["compile"] = bool(cfg.parallel.compile)
        # logger.log_every = steps: one window, so its peak is the run's (the logger resets it per window)
        results[name]["peak_mem_gib"] = (trainer.last_window or {}).get("mem/peak_gib")
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps(results, indent=2), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    a, b = results["no routing"], results["TREAD 2..23 r=0.5"]
    results["routed_speedup"] = a["step_time_s"] / b["step_time_s"]
    results["setup"] = (f"full 2B preset, 81x480x832, batch 1, text 256, bf16 params + fp32 reduce, AC={args.ac}, "
                        f"compile={not args.no_compile}, FSDP2 on 1 GPU, AdamW (fused) + EMA every step")
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the averages (compile, caches)")
    ap.add_argument("--ac", default="full", choices=["none", "full", "every_k", "selective"])
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
