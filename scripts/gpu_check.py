"""The one-shot GPU check (run by `python scripts/bench_train.py --gpu`): what it measures and how.

One process, one GPU, a wall-clock budget (default 540 s, so the command ends inside 10 minutes):

1. `attention_check`: every `model.attention_backend` (sdpa / flex / varlen) against sdpa on one padded
   bf16 problem, forward and backward, plus FA3 / FA4 (`model.flash_impl`) where their package is
   installed (else "skipped" with the reason), recording the kernels each case launched.
2. `run_variant` per variant of `SUITE` (480p x 81 and 720p x 121; `parallel.ac` full / selective;
   sdpa / flex / varlen; TREAD 2..23 r=0.5): the real `Trainer` on the full 2B recipe with synthetic
   data. s/step and MFU from the measured steps' metrics.jsonl rows, the peak memory of the measured
   window (`PeakWindow`: reset at its start, max allocated / reserved at its end: the logger's
   `mem/peak_gib` is per log window and was once read after a reset), and the dynamo graphs /
   recompiles counted over the variant and over its measured window (`CompileCounter`).
   Variants run in order in one process: compiled block graphs (dynamic sequence dims, the recipe's
   `parallel.compile_dynamic=null`) are shared by later variants with the same AC mode and backend, so
   a 720p variant after its 480p twin needs no warm-up step; the window's graph count shows whether it
   compiled anything. A variant that fails (OOM, compile error, per-variant timeout) is recorded with
   its error; one that would not fit the remaining budget is recorded as skipped.
3. `run_check`: 1 then 2 under the budget, the JSON (`docs/bench/gpu_check.json`: device, capability,
   torch / CUDA versions, every row) written after every variant and, after a CUDA run, the table of
   docs/benchmarks.md re-rendered from it. The JSON (its schema, a row's timings from metrics.jsonl,
   reading / writing) and the table's rendering are scripts/gpu_report.py; this module's CLI renders /
   checks that table through it.

    python scripts/bench_train.py --gpu                 # the check (needs CUDA); updates the docs table
    python scripts/gpu_check.py --render-docs           # re-render docs/benchmarks.md from the JSON
    python scripts/gpu_check.py --check-docs            # exit 1 if the docs table is stale

Everything but the CUDA-only parts runs on CPU in tests/unit/test_gpu_check.py (attention check in
fp64 under `cpu_reference_kernels`, the variants' configs composed from the real Hydra configs, a
tiny-model rehearsal of `run_check` through the real Trainer, counters; and gpu_report's rendering).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_BUDGET_S = 540.0
DEFAULT_VARIANT_TIMEOUT_S = 300.0
_T0 = time.monotonic()  # the budget counts from the script's start (imports and CUDA init included)

SHAPES = {"480p": (81, 480, 832), "720p": (121, 720, 1280)}
# The CPU rehearsal's stand-ins (tiny model): two bucket sizes, so the dynamic-shape reuse is exercised.
TINY_SHAPES = {"480p": (5, 32, 48), "720p": (9, 48, 64)}
AC_MODES = ("full", "selective")
BACKENDS = ("sdpa", "flex", "varlen")
# Within a shape: the issue-9 rows first (what a short budget keeps), then the rest.
ORDER = (("full", "sdpa"), ("selective", "sdpa"), ("selective", "flex"), ("selective", "varlen"),
         ("full", "flex"), ("full", "varlen"))
SUITE = tuple(f"{s}:{ac}:{b}" for s in SHAPES for ac, b in ORDER)
# (steps, warm-up steps) per shape. 480p: the first step compiles; two measured. 720p: one measured step,
# no warm-up when a 480p variant with the same AC / backend ran before in this process (its dynamic
# graphs serve 720p), else one warm-up step. ~3 s and ~25-45 s per step on an H100 / H200 (estimates).
STEP_PLAN = {"480p": (3, 1), "720p": (1, 0)}
COLD_PLAN = {"480p": (3, 1), "720p": (2, 1)}
# Seconds a variant is expected to take before one of its shape has run (first-compile guess); after,
# the last measured wall time of its shape is the estimate.
GUESS_S = {"480p": 90.0, "720p": 60.0}
SETUP = ("full 2B recipe (experiment=motif_video_2b_64xh200, parallel=fsdp on 1 GPU), synthetic data, batch 1, "
         "T2V, text 128..256 tokens padded to 256, 16 image tokens, bf16 params + fp32 reduce, compile (inductor, "
         "compile_dynamic=null), TREAD 2..23 r=0.5, fused AdamW + EMA every step; MFU = counted model FLOPs of "
         "the measured steps / (their time x the device's spec dense bf16 peak); AC recompute not counted")


class Variant(NamedTuple):
    shape: str
    ac: str
    backend: str
    flash_impl: str | None = None

    @property
    def key(self) -> str:
        return ":".join([self.shape, self.ac, self.backend] + ([self.flash_impl] if self.flash_impl else []))

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`SHAPE:AC:BACKEND[:FLASH_IMPL]`, e.g. `720p:selective:varlen` or `480p:full:sdpa:fa3`."""
        from motif_train.models.attention_backends import FLASH_IMPLS

        parts = text.strip().split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"variant {text!r}: use SHAPE:AC:BACKEND[:FLASH_IMPL]")
        shape, ac, backend, *rest = parts
        flash = rest[0] if rest else None
        if shape not in SHAPES:
            raise ValueError(f"variant {text!r}: shape {shape!r} not in {sorted(SHAPES)}")
        if ac not in ("none", "full", "selective", "every_k"):
            raise ValueError(f"variant {text!r}: parallel.ac={ac!r}")
        if backend not in BACKENDS:
            raise ValueError(f"variant {text!r}: model.attention_backend={backend!r} not in {BACKENDS}")
        if flash is not None and flash not in FLASH_IMPLS:
            raise ValueError(f"variant {text!r}: model.flash_impl={flash!r} not in {sorted(FLASH_IMPLS)}")
        return cls(shape, ac, backend, flash)


def parse_per_shape(text: str | None, name: str) -> dict[str, int]:
    """`--steps 4` (every shape) or `--steps 480p=4,720p=2` -> {shape: n}; None -> {}."""
    if text is None:
        return {}
    text = str(text)
    if "=" not in text:
        return dict.fromkeys(SHAPES, int(text))
    out = {}
    for item in text.split(","):
        shape, _, n = item.partition("=")
        if shape not in SHAPES:
            raise ValueError(f"--{name} {text!r}: shape {shape!r} not in {sorted(SHAPES)}")
        out[shape] = int(n)
    return out


def plan_steps(v: Variant, warm: bool, steps: dict[str, int] | None = None,
               warmup: dict[str, int] | None = None) -> tuple[int, int]:
    """(steps, warm-up) for `v`; `warm`: a variant with the same AC / backend / flash_impl already ran in this
    process (its compiled graphs serve this shape). `--steps` / `--warmup` overrides win."""
    s, w = (STEP_PLAN if warm else COLD_PLAN)[v.shape]
    s, w = (steps or {}).get(v.shape, s), (warmup or {}).get(v.shape, w)
    if not 0 <= w < s:
        raise ValueError(f"{v.key}: {s} steps with {w} warm-up leaves no measured step")
    return s, w


def variant_overrides(v: Variant, steps: int, run_dir: str | Path, *, compile: bool = True,
                      tiny: bool = False) -> list[str]:
    """The Hydra overrides of one variant onto the real configs (configs/): the full recipe, one GPU.
    `tiny`: the CPU rehearsal (model=tiny, fp32 on CPU, eager compile backend, tiny buckets and route)."""
    f, h, w = (TINY_SHAPES if tiny else SHAPES)[v.shape]
    text_len, pad, image, route = ([8, 16], 16, 4, (1, 3)) if tiny else ([128, 256], 256, 16, (2, 23))
    out = [
        "experiment=motif_video_2b_64xh200", "data=synthetic", "parallel=fsdp", f"run_dir={run_dir}",
        "logger.wandb=false", "encoders.root=null", "eval.every=0", "eval.at_end=false",
        "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
        "objective.conditioning.text_dropout=0", "objective.conditioning.i2v_prob=0",
        # captions of 128..256 real tokens padded to 256: the masked path, as with real data
        f"data.text_len=[{text_len[0]},{text_len[1]}]", f"data.text_pad_to=[{pad}]", f"data.image_tokens={image}",
        f"parallel.compile={str(compile).lower()}", f"parallel.ac={v.ac}", f"model.attention_backend={v.backend}",
        f"model.flash_impl={v.flash_impl or 'null'}", "ema.every=1", f"logger.log_every={steps}",
        "curriculum.stages=[{name: bench, steps: %d, buckets: [[%d, %d, %d]], global_batch: 1, repa: false, "  # noqa: UP031
        "shift: 8.0, routing: {start: %d, end: %d, ratio: 0.5}}]" % (steps, f, h, w, *route),
    ]
    if tiny:
        out += ["model=tiny", "train.device=cpu", "parallel.param_dtype=float32", "parallel.compile_backend=eager"]
    return out


def compose_variant(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


# =========================================================================== measurement helpers


class PeakWindow:
    """Allocator peaks of one window: `begin` at the variant's start, `start` at the measured window's
    start (reads the warm-up peak, then `reset_peak_memory_stats`), `stop` at its end (max allocated /
    reserved). `mem`: the `torch.cuda`-like module (injectable for tests); None off CUDA: no peaks."""

    def __init__(self, mem=None):
        self.mem = mem
        self.result: dict[str, Any] = {}

    def _gib(self, fn) -> float:
        return fn() / 2**30

    def begin(self) -> None:
        if self.mem is not None:
            self.mem.reset_peak_memory_stats()

    def start(self) -> None:
        if self.mem is None:
            return
        self.result["warmup_peak_allocated_gib"] = self._gib(self.mem.max_memory_allocated)
        self.result["warmup_peak_reserved_gib"] = self._gib(self.mem.max_memory_reserved)
        self.mem.reset_peak_memory_stats()

    def stop(self) -> None:
        if self.mem is None:
            self.result["peak_note"] = "no CUDA allocator on this device: no peak"
            return
        self.result["peak_allocated_gib"] = self._gib(self.mem.max_memory_allocated)
        self.result["peak_reserved_gib"] = self._gib(self.mem.max_memory_reserved)
        stats = self.mem.memory_stats()
        self.result["alloc_retries"] = int(stats.get("num_alloc_retries", 0))
        self.result["ooms"] = int(stats.get("num_ooms", 0))


class CompileCounter:
    """Dynamo's compile counters at named marks: graphs (`counters["stats"]["unique_graphs"]`), graph
    breaks, and recompiles (compilation metrics with a `recompile_reason`: a frame compiled
    again because an existing entry's guards failed), with the first few reasons."""

    def __init__(self):
        from torch._dynamo import utils

        if (utils._compilation_metrics.maxlen or 0) < 100_000:
            utils.set_compilation_metrics_limit(100_000)  # default 64: would drop entries and miscount
        self.marks: dict[str, dict] = {}

    @staticmethod
    def snapshot() -> dict:
        from torch._dynamo.utils import counters, get_compilation_metrics

        metrics = get_compilation_metrics()
        return {"graphs": int(counters["stats"]["unique_graphs"]),
                "graph_breaks": int(sum(counters["graph_break"].values())), "_n": len(metrics),
                "_reasons": [m.recompile_reason for m in metrics]}

    def mark(self, name: str) -> None:
        self.marks[name] = self.snapshot()

    def between(self, a: str, b: str) -> dict:
        x, y = self.marks[a], self.marks[b]
        reasons = [r for r in y["_reasons"][x["_n"]:y["_n"]] if r]
        return {"graphs": y["graphs"] - x["graphs"],
                "graph_breaks": y["graph_breaks"] - x["graph_breaks"], "recompiles": len(reasons),
                "recompile_reasons": [r[:300] for r in reasons[:3]]}


class VariantTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float | None):
    """Raise `VariantTimeout` in this (main) thread after `seconds` (None / <= 0: no limit)."""
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise VariantTimeout(f"per-variant time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def elapsed() -> float:
    return time.monotonic() - _T0


def say(msg: str) -> None:
    print(f"[{elapsed():6.0f} s] {msg}", flush=True)


# =========================================================================== 1. attention check

# Cases: (name, backend, flash_impl, padded). Each compares with sdpa on the same problem, padded or not
# (the flash kernel FA3 / FA4 replace runs sdpa only without a mask; varlen runs it padded).
ATTENTION_CASES = (("sdpa", "sdpa", None, True), ("flex", "flex", None, True), ("varlen", "varlen", None, True),
                   ("sdpa unpadded", "sdpa", None, False),
                   ("sdpa+fa3 unpadded", "sdpa", "fa3", False), ("varlen+fa3", "varlen", "fa3", True),
                   ("sdpa+fa4 unpadded", "sdpa", "fa4", False), ("varlen+fa4", "varlen", "fa4", True))
FLASH_MODULES = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute.interface"}
_KERNEL_WORDS = ("attention", "attn", "flash", "fmha", "flex", "sdpa", "cudnn", "triton")


def flash_impl_missing(flash_impl: str, device) -> str | None:
    """Why `flash_impl` cannot run here (None: it can be tried)."""
    from motif_train.models.attention_backends import FLASH_IMPLS

    module = FLASH_MODULES[flash_impl]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"not installed: {FLASH_IMPLS[flash_impl][1]} (module {module} not importable)"
    if getattr(device, "type", str(device)) != "cuda":
        return "CUDA kernel: not run on " + str(device)
    return None


def _rel(a, b) -> float:
    """max |a - b| / max |b| (inf / nan kept: a non-finite result fails)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def attention_check(device: str = "cuda", dtype=None, *, batch: int = 2, n: int = 4096, image: int = 16,
                    text: int = 256, lens: tuple[int, ...] = (256, 77), heads: int = 12, head_dim: int = 128,
                    cases=ATTENTION_CASES, tol: float | None = None) -> dict:
    """Forward + backward of `attend` for every case of `cases` against sdpa on one problem: joint keys
    [video n | image | text] with captions of `lens` real tokens padded to `text`. Records per case its
    relative errors (max |x - sdpa| / max |sdpa|, output and q/k/v gradients), pass / fail against `tol`,
    and the kernels the profiler saw. Off CUDA it needs `cpu_reference_kernels()` for flex / varlen."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from motif_train.models.attention_backends import activate_flash_impl, attend, build_key_masks

    dev = torch.device(device)
    dtype = dtype or torch.bfloat16
    low = dtype in (torch.bfloat16, torch.float16)
    g = torch.Generator().manual_seed(0)
    s = n + image + text
    base = [torch.randn(batch, s, heads, head_dim, generator=g).to(dev, dtype) for _ in range(3)]
    text_mask = (torch.arange(text)[None] < torch.tensor(lens)[:, None]).to(dev)
    cot = torch.sin(torch.arange(batch * s * heads * head_dim, dtype=torch.float32)).view(batch, s, -1).to(dev)
    act = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]

    def run(backend: str, padded: bool, inputs_dtype=dtype, profiled: bool = False):
        q, k, v = (x.to(inputs_dtype).clone().requires_grad_() for x in base)
        masks = build_key_masks(backend, text_mask if padded else None, n, image, inputs_dtype)
        with profile(activities=act) if profiled else contextlib.nullcontext() as prof:
            o = attend(q, k, v, None if masks is None else masks.joint, backend)
            (o.float() * cot).sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        kernels = []
        if prof is not None:
            kernels = sorted({e.key for e in prof.key_averages()
                              if any(w in e.key.lower() for w in _KERNEL_WORDS)})
        grads = torch.cat([x.grad.float().flatten() for x in (q, k, v)])
        return o.detach().float(), grads, kernels

    out: dict[str, Any] = {"device": str(dev), "dtype": str(dtype).removeprefix("torch."),
                           "problem": {"batch": batch, "video": n, "image": image, "text": text, "lens": list(lens),
                                       "heads": heads, "head_dim": head_dim}, "cases": {}}
    refs = {}
    for padded in (True, False):  # the references: sdpa in the check's dtype
        try:
            refs[padded] = run("sdpa", padded)
        except Exception as e:  # noqa: BLE001
            refs[padded] = e
    floor = None
    if low and not isinstance(refs[True], Exception):  # the dtype's own error: sdpa bf16 vs sdpa fp32
        o32, g32, _ = run("sdpa", True, torch.float32)
        floor = {"rel_out": _rel(refs[True][0], o32), "rel_grad": _rel(refs[True][1], g32)}
        out["floor_vs_fp32"] = floor
    if tol is None:
        tol = max(0.05, 3 * max(floor.values())) if floor else (1e-4 if dtype == torch.float32 else 1e-9)
    out["tolerance"] = tol
    for name, backend, flash, padded in cases:
        rec: dict[str, Any] = {"backend": backend, "flash_impl": flash, "padded": padded}
        out["cases"][name] = rec
        if flash is not None:
            why = flash_impl_missing(flash, dev)
            if why:
                rec.update(status="skipped", reason=why)
                continue
        ref = refs[padded]
        if isinstance(ref, Exception):
            rec.update(status="error", error=f"sdpa reference failed: {type(ref).__name__}: {ref}"[:400])
            continue
        activated = False
        try:
            if flash is not None:
                activate_flash_impl(flash)
                activated = True
            run(backend, padded)  # first call: compiles (flex on CUDA), builds plans; not profiled
            o, grads, kernels = run(backend, padded, profiled=True)
        except Exception as e:  # noqa: BLE001  (record, keep the other cases)
            rec.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
            continue
        finally:
            if activated:
                torch.nn.attention.restore_flash_attention_impl()
        rel_out, rel_grad = _rel(o, ref[0]), _rel(grads, ref[1])
        ok = rel_out <= tol and rel_grad <= tol  # False for nan
        rec.update(status="ok" if ok else "fail", rel_out=rel_out, rel_grad=rel_grad, kernels=kernels[:12])
    return out


# =========================================================================== 2. training-step variants


def instrument(trainer, warmup: int, peak: PeakWindow, compiles: CompileCounter, label: str = "") -> None:
    """Hook the measured window onto a Trainer: it starts before step `warmup + 1` reads its batch and
    ends when the last step's `train_step` returns (its allocations are all issued by then; the logger's
    flush, which resets the CUDA peak, comes after)."""
    next_step, train_step, last = trainer.data.next_step, trainer.train_step, trainer.total_steps

    def next_step_(step):
        if step == warmup + 1:
            compiles.mark("window")
            peak.start()
        say(f"{label} step {step}/{last}" + (" (warm-up)" if step <= warmup else ""))
        return next_step(step)

    def train_step_(batches):
        result = train_step(batches)
        if trainer.step == last:
            peak.stop()
            compiles.mark("end")
        return result

    trainer.data.next_step, trainer.train_step = next_step_, train_step_


def run_variant(v: Variant, steps: int, warmup: int, peak_tflops: float | None, *, compile: bool = True,
                tiny: bool = False, mem=None) -> dict:
    """One run of the Trainer for `steps` steps; errors are recorded, never raised (VariantTimeout aside)."""
    import gpu_report as report  # here, not at the top: gpu_report imports this module's definitions
    import torch

    from motif_train.trainer import Trainer

    run = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    f, h, w = (TINY_SHAPES if tiny else SHAPES)[v.shape]
    res: dict[str, Any] = {"variant": v.key, "shape": f"{f}x{h}x{w}", "ac": v.ac, "attention_backend": v.backend,
                           "flash_impl": v.flash_impl, "compile": compile, "steps": steps, "warmup": warmup}
    peak, compiles = PeakWindow(mem), CompileCounter()
    if mem is not None:  # what earlier variants left allocated (a leak across variants would show here)
        res["allocated_before_gib"] = mem.memory_allocated() / 2**30
    compiles.mark("start")
    t0 = time.perf_counter()
    trainer = None
    try:
        cfg = compose_variant(variant_overrides(v, steps, run, compile=compile, tiny=tiny))
        peak.begin()
        trainer = Trainer(cfg)
        res["build_s"] = time.perf_counter() - t0
        instrument(trainer, warmup, peak, compiles, v.key)
        trainer.train()
        trainer.close()
        res.update(report.summarize(run / "metrics.jsonl", warmup, peak_tflops))
        res.update(peak.result)
        res["compiled"] = compiles.between("start", "end")
        res["compiled_in_window"] = compiles.between("window", "end")
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (one failing variant (OOM, compile, timeout) must not lose the others)
        res.update(status="error", error=f"{type(e).__name__}: {e}"[:600],
                   traceback="".join(traceback.format_exception(e))[-2000:])
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.close(error=e)
        e.__traceback__ = None  # drop the frames holding the model before freeing memory
    finally:
        trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(run, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t0
    return res


# =========================================================================== 3. the run


def require_cuda() -> None:
    """Exit non-zero with one line when there is no CUDA device (before any other work)."""
    import torch

    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
        raise SystemExit(f"bench_train.py --gpu: no CUDA device visible (torch {torch.__version__}, {build}); the "
                         "GPU check needs one GPU. Nothing was measured.")


def run_check(variants: list[Variant], *, out: Path | None, device: str = "cuda", tiny: bool = False,
              budget_s: float = DEFAULT_BUDGET_S, variant_timeout_s: float = DEFAULT_VARIANT_TIMEOUT_S,
              steps: dict[str, int] | None = None, warmup: dict[str, int] | None = None, compile: bool = True,
              fresh_compile: bool = False, attention: bool = True, attention_kw: dict | None = None,
              mem=None, docs: Path | None = None) -> dict:
    """The whole check; writes `out` after every phase and re-renders `docs` at the end (if given)."""
    import gpu_report as report  # here, not at the top: gpu_report imports this module's definitions
    import torch

    from motif_train.metrics import peak_tflops

    dev = torch.device(device)
    if mem is None and dev.type == "cuda":
        mem = torch.cuda
    peak = peak_tflops(dev)
    results = report.new_results(device, measured=dev.type == "cuda" and not tiny, rehearsal=tiny, budget_s=budget_s)

    def save():
        results["wall_s"] = elapsed()
        if out is not None:
            report.write_json(out, results)

    if attention:
        say("attention check: sdpa / flex / varlen (+ FA3 / FA4 where installed), forward + backward")
        kw = {"dtype": torch.bfloat16} if dev.type == "cuda" else {"dtype": torch.float64}
        results["attention_check"] = attention_check(device, **{**kw, **(attention_kw or {})})
        for name, rec in results["attention_check"]["cases"].items():
            say(report.case_line(name, rec))
        save()
    seen: set[tuple] = set()
    last_wall: dict[str, float] = {}
    for i, v in enumerate(variants):
        warm = (v.ac, v.backend, v.flash_impl) in seen and not fresh_compile
        n, w = plan_steps(v, warm, steps, warmup)
        left = budget_s - elapsed()
        need = last_wall.get(v.shape, GUESS_S[v.shape])  # the last run of this shape, else the guess
        if left < need:
            results["variants"].append({"variant": v.key, "status": "skipped", "steps": n, "warmup": w,
                                        "reason": f"time budget: ~{need:.0f} s needed, {max(left, 0):.0f} s of "
                                                  f"{budget_s:.0f} s left"})
            say(f"== {v.key}: skipped ({results['variants'][-1]['reason']})")
            save()
            continue
        say(f"== [{i + 1}/{len(variants)}] {v.key}: {n} steps, {w} warm-up" + (" (graphs reused)" if warm else ""))
        if fresh_compile:
            torch._dynamo.reset()
        with alarm(min(variant_timeout_s, left)):
            try:
                res = run_variant(v, n, w, peak, compile=compile, tiny=tiny, mem=mem)
            except VariantTimeout as e:  # raised outside run_variant's own handler (between its steps)
                res = {"variant": v.key, "status": "error", "error": f"VariantTimeout: {e}", "steps": n, "warmup": w}
                gc.collect()
        results["variants"].append(res)
        if res["status"] == "ok":
            seen.add((v.ac, v.backend, v.flash_impl))
            last_wall[v.shape] = res["wall_s"]
        say(report.variant_line(res))
        save()
    save()
    if docs is not None and results["measured"]:
        report.update_docs(docs, results)
        say(f"wrote {out} and the table in {docs}")
    return results


def main(argv: list[str] | None = None) -> int:
    """`--render-docs` / `--check-docs`: the docs table from the JSON, through gpu_report."""
    import gpu_report as report  # here, not at the top: gpu_report imports this module's definitions

    ap = argparse.ArgumentParser(description="Render / check the GPU-check table of docs/benchmarks.md "
                                             "(the check itself: python scripts/bench_train.py --gpu)")
    ap.add_argument("--json", type=Path, default=report.JSON_PATH)
    ap.add_argument("--md", type=Path, default=report.DOCS_MD)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--render-docs", action="store_true")
    g.add_argument("--check-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.check_docs:
        return report.check_docs(args.md, args.json)
    print(("wrote " if report.update_docs(args.md, json_path=args.json) else "up to date: ") + str(args.md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
