"""Benchmark of the whole training step (data -> objective -> FSDP backward -> AdamW -> EMA).

    # CPU: experiment=tiny_cpu under torchrun with 2 gloo ranks: samples/s and data-wait share
    python scripts/bench_train.py
    # the one-shot GPU check (one H100 / H200, <= 10 min, budget --budget-s): every attention backend
    # (+ FA3 / FA4 where installed) against sdpa, forward + backward in bf16, with the kernels it ran; then
    # the full 2B recipe at 480p x 81 and 720p x 121, AC full / selective, sdpa / flex / varlen, TREAD
    # on: s/step, MFU, measured-window peak memory, compiled graphs / recompiles. Writes
    # docs/bench/gpu_check.json and re-renders its table in docs/benchmarks.md (scripts/gpu_check.py,
    # scripts/gpu_report.py)
    python scripts/bench_train.py --gpu
    # the same run on CPU with the tiny model (sdpa only; what the GPU run executes but the kernels)
    python scripts/bench_train.py --gpu --cpu-rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # gpu_check, gpu_report (scripts/ is not a package)


def summarize(metrics: Path, warmup: int, peak_tflops: float | None) -> dict:
    import gpu_report

    return gpu_report.summarize(metrics, warmup, peak_tflops)


def bench_cpu(args) -> dict:
    run = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "motif_train.cli.train", "experiment=tiny_cpu", f"run_dir={run}", "logger.wandb=false",
           "checkpoint.every=0", "checkpoint.save_at_end=false"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = {"setup": "experiment=tiny_cpu, 2 gloo ranks, 24 steps (2 stages)", **summarize(run / "metrics.jsonl",
                                                                                        args.warmup, None)}
    return res


def bench_gpu(args) -> dict:
    """The one-shot GPU check (scripts/gpu_check.py); `--cpu-rehearsal`: the same run on CPU, tiny model."""
    import gpu_check
    import gpu_report

    if not args.cpu_rehearsal:
        gpu_check.require_cuda()  # before any other work: one line and a non-zero exit without CUDA
    variants = [gpu_check.Variant.parse(v) for v in (args.variants or ",".join(
        gpu_check.SUITE if not args.cpu_rehearsal else ("480p:full:sdpa", "480p:selective:sdpa",
                                                       "720p:full:sdpa"))).split(",")]
    kw = dict(budget_s=args.budget_s, variant_timeout_s=args.variant_timeout,
              steps=gpu_check.parse_per_shape(args.steps, "steps"),
              warmup=gpu_check.parse_per_shape(args.warmup, "warmup"), compile=not args.no_compile,
              fresh_compile=args.fresh_compile, attention=not args.no_attention_check)
    if args.cpu_rehearsal:  # never the docs JSON: nothing here is a GPU measurement
        import torch

        from motif_train.models.kernel_reference import cpu_reference_kernels

        out = Path(args.out or Path(tempfile.gettempdir()) / "gpu_check_rehearsal.json")
        with cpu_reference_kernels():
            res = gpu_check.run_check(variants, out=out, device="cpu", tiny=True, mem=None, docs=None,
                                      attention_kw=dict(dtype=torch.float64, n=64, image=4, text=16, lens=(16, 5),
                                                        heads=2, head_dim=16), **kw)
    else:
        out = Path(args.out) if args.out else gpu_report.JSON_PATH
        res = gpu_check.run_check(variants, out=out, device="cuda",
                                  docs=None if args.no_docs else gpu_report.DOCS_MD, **kw)
    print(f"wrote {out}")
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the one-shot GPU check (scripts/gpu_check.py)")
    ap.add_argument("--steps", default=None,
                    help="GPU: steps per variant, N or 480p=N,720p=M (default 3 at 480p; 720p 1, or 2 when its "
                         "graphs were not compiled earlier in the run)")
    ap.add_argument("--warmup", default=None,
                    help="steps left out of the averages (compile, caches); CPU default 2, GPU N or 480p=N,720p=M "
                         "(default 1 at 480p; 720p 0, or 1 when its graphs were not compiled earlier)")
    ap.add_argument("--variants", default=None,
                    help="GPU: comma list of SHAPE:AC:BACKEND[:FLASH_IMPL] (shapes 480p|720p; parallel.ac; "
                         "model.attention_backend; model.flash_impl); default: the 12-variant suite")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="GPU: wall-clock budget of the whole command from its start; a variant that would not "
                         "fit is recorded as skipped")
    ap.add_argument("--variant-timeout", type=float, default=300.0, help="GPU: seconds one variant may take")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--fresh-compile", action="store_true",
                    help="GPU: torch._dynamo.reset() before every variant (each compiles cold; slower)")
    ap.add_argument("--no-attention-check", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="GPU: do not re-render the table in docs/benchmarks.md")
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    help="with --gpu: run the check on CPU with the tiny model (sdpa; fp64 attention check)")
    ap.add_argument("--out", default=None, help="JSON path (GPU default: docs/bench/gpu_check.json)")
    args = ap.parse_args(argv)
    if args.gpu:
        return bench_gpu(args)
    if args.cpu_rehearsal:
        ap.error("--cpu-rehearsal goes with --gpu")
    args.warmup = 2 if args.warmup is None else int(args.warmup)
    res = bench_cpu(args)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
