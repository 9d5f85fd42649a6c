"""The one-shot GPU check (`scripts/bench_train.py --gpu`, scripts/gpu_check.py; its JSON and docs table:
scripts/gpu_report.py) up to where it needs CUDA:
its 12 variants compose and validate against the real Hydra configs, the attention check runs (fp64,
CPU reference kernels) and catches a wrong backend, the compile counters and the peak window count what
they claim, a tiny-model rehearsal of the whole run goes through the real Trainer, the docs table is
rendered from the JSON ("not measured" for every row the JSON lacks) and is current, and `--gpu` without
CUDA exits non-zero with one line."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc_mod():
    sys.path.insert(0, str(ROOT / "scripts"))
    return _load("gpu_check")


@pytest.fixture(scope="module")
def report_mod(gc_mod):
    return _load("gpu_report")  # after gpu_check: it imports gpu_check's definitions


# ---------------------------------------------------------------------------------------- variants


def test_suite_is_every_shape_ac_backend(gc_mod):
    variants = [gc_mod.Variant.parse(k) for k in gc_mod.SUITE]
    assert len(set(gc_mod.SUITE)) == 12
    assert {(v.shape, v.ac, v.backend) for v in variants} == {
        (s, a, b) for s in ("480p", "720p") for a in ("full", "selective") for b in ("sdpa", "flex", "varlen")}
    assert [v.shape for v in variants] == ["480p"] * 6 + ["720p"] * 6  # cheap shape first: a short budget keeps it
    assert all(gc_mod.Variant.parse(v.key) == v for v in variants)
    assert gc_mod.Variant.parse("480p:full:sdpa:fa3").flash_impl == "fa3"
    for bad in ("480p:full", "1080p:full:sdpa", "480p:full:xformers", "480p:full:sdpa:fa2"):
        with pytest.raises(ValueError, match="variant"):
            gc_mod.Variant.parse(bad)


def test_step_plan(gc_mod):
    v480, v720 = gc_mod.Variant.parse("480p:full:flex"), gc_mod.Variant.parse("720p:full:flex")
    assert gc_mod.plan_steps(v480, False) == (3, 1)
    assert gc_mod.plan_steps(v720, True) == (1, 0)  # graphs compiled by its 480p twin: no warm-up
    assert gc_mod.plan_steps(v720, False) == (2, 1)  # cold: one warm-up step compiles
    steps, warm = gc_mod.parse_per_shape("480p=5,720p=3", "steps"), gc_mod.parse_per_shape("2", "warmup")
    assert gc_mod.plan_steps(v480, True, steps, warm) == (5, 2)
    with pytest.raises(ValueError, match="no measured step"):
        gc_mod.plan_steps(v720, True, {"720p": 1}, {"720p": 1})


def test_every_variant_composes_and_validates_against_the_real_configs(gc_mod):
    from motif_train.config import validate

    for key in gc_mod.SUITE:
        v = gc_mod.Variant.parse(key)
        steps, _ = gc_mod.plan_steps(v, True)
        cfg = gc_mod.compose_variant(gc_mod.variant_overrides(v, steps, "/tmp/gpu_check_run"))
        validate(cfg, world_size=1, local_world_size=1)
        f, h, w = gc_mod.SHAPES[v.shape]
        (stage,) = cfg.curriculum.stages
        assert list(stage.buckets[0]) == [f, h, w] and stage.steps == steps and not stage.repa
        assert (stage.routing.start, stage.routing.end, stage.routing.ratio) == (2, 23, 0.5)  # TREAD on
        assert cfg.parallel.ac == v.ac and cfg.model.attention_backend == v.backend and cfg.model.flash_impl is None
        assert cfg.parallel.compile and cfg.parallel.compile_backend == "inductor"
        assert cfg.parallel.compile_dynamic is None
        assert cfg.parallel.param_dtype == "bfloat16" and cfg.parallel.degrees(1, 1) == (1, 1)
        assert cfg.model.num_layers == 12 and cfg.model.num_single_layers == 24  # the full 2B
        assert cfg.train.device == "cuda" and cfg.logger.log_every == steps and cfg.ema.every == 1
        assert cfg.data["_target_"].endswith("SyntheticSource") and list(cfg.data["text_pad_to"]) == [256]
        assert cfg.encoders.root is None and cfg.eval.every == 0 and not cfg.checkpoint.save_at_end


# ---------------------------------------------------------------------------------------- attention check

SMALL = dict(n=64, image=4, text=16, lens=(16, 5), heads=2, head_dim=16)


def test_attention_check_runs_on_cpu_reference_kernels(gc_mod):
    from motif_train.models.kernel_reference import cpu_reference_kernels

    with cpu_reference_kernels():
        res = gc_mod.attention_check("cpu", torch.float64, **SMALL)
    cases = res["cases"]
    assert set(cases) == {c[0] for c in gc_mod.ATTENTION_CASES}
    for name in ("sdpa", "flex", "varlen", "sdpa unpadded"):
        assert cases[name]["status"] == "ok", cases[name]
        assert cases[name]["rel_out"] <= 1e-9 and cases[name]["rel_grad"] <= 1e-9
        assert cases[name]["kernels"], name  # the profiler saw the attention ops
    assert any("Flex" in k for k in cases["flex"]["kernels"])
    for name, _, flash, _ in gc_mod.ATTENTION_CASES:
        if flash:  # no FA3 / FA4 package here, and not a CUDA device: skipped, the reason recorded
            assert cases[name]["status"] == "skipped" and cases[name]["reason"]
    assert res["problem"]["lens"] == [16, 5] and res["tolerance"] == 1e-9


def test_attention_check_fails_a_wrong_backend(gc_mod, monkeypatch):
    from motif_train.models import attention_backends
    from motif_train.models.kernel_reference import cpu_reference_kernels

    with cpu_reference_kernels():
        good = attention_backends.varlen_kernel
        monkeypatch.setattr(attention_backends, "varlen_kernel", lambda *a, **k: good(*a, **k) * 1.001)
        res = gc_mod.attention_check("cpu", torch.float64, cases=gc_mod.ATTENTION_CASES[:3], **SMALL)
    assert res["cases"]["varlen"]["status"] == "fail" and res["cases"]["varlen"]["rel_out"] > 1e-4
    assert res["cases"]["flex"]["status"] == "ok"


def test_flash_impl_missing_names_the_package(gc_mod):
    for impl in ("fa3", "fa4"):
        why = gc_mod.flash_impl_missing(impl, torch.device("cpu"))
        assert why and ("not installed" in why or "CUDA" in why)


# ---------------------------------------------------------------------------------------- counters, window


def test_compile_counter_counts_graphs_and_recompiles(gc_mod):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    c = gc_mod.CompileCounter()
    c.mark("start")
    fn(torch.ones(2))
    c.mark("window")
    fn(torch.ones(2))  # cached: nothing new
    c.mark("end")
    fn(torch.ones(3))  # static shapes: a guard fails, a recompile
    c.mark("after")
    assert c.between("start", "window")["graphs"] == 1 and c.between("start", "window")["recompiles"] == 0
    assert c.between("window", "end") == {"graphs": 0, "graph_breaks": 0, "recompiles": 0, "recompile_reasons": []}
    late = c.between("end", "after")
    assert late["graphs"] == 1 and late["recompiles"] == 1 and "size mismatch" in late["recompile_reasons"][0]
    torch._dynamo.reset()


class FakeMem:
    """`torch.cuda`'s allocator-statistics API, recording calls with the step the fake trainer is at."""

    def __init__(self, where=lambda: None):
        self.calls, self.where, self.peak = [], where, 1.0

    def reset_peak_memory_stats(self):
        self.calls.append(("reset", self.where()))
        self.peak = 1.0

    def max_memory_allocated(self):
        self.calls.append(("alloc", self.where()))
        return self.peak * 2**30

    def max_memory_reserved(self):
        return (self.peak + 1) * 2**30

    def memory_allocated(self):
        return 0

    def memory_stats(self):
        return {"num_alloc_retries": 0, "num_ooms": 0}


class FakeTrainer:
    def __init__(self, steps, mem):
        self.step, self.total_steps, self.mem = 0, steps, mem
        self.data = type("D", (), {"next_step": lambda _, step: ["batch", step]})()

    def train_step(self, batches):
        self.mem.peak = max(self.mem.peak, 10.0 * self.step)  # each step peaks higher than the last
        return {"ok": True}

    def train(self):
        while self.step < self.total_steps:
            self.step += 1
            self.train_step(self.data.next_step(self.step))


def test_peak_window_spans_the_measured_steps(gc_mod):
    trainer = None
    mem = FakeMem(lambda: trainer.step)
    trainer = FakeTrainer(4, mem)
    peak, compiles = gc_mod.PeakWindow(mem), gc_mod.CompileCounter()
    peak.begin()
    gc_mod.instrument(trainer, 2, peak, compiles, "fake")
    trainer.train()
    # reset before step 3 reads its batch (after the warm-up peak is read), read after step 4's train_step
    assert mem.calls == [("reset", 0), ("alloc", 3), ("reset", 3), ("alloc", 4)]
    assert peak.result["warmup_peak_allocated_gib"] == 20.0 and peak.result["peak_allocated_gib"] == 40.0
    assert peak.result["peak_reserved_gib"] == 41.0 and set(compiles.marks) == {"window", "end"}
    assert gc_mod.PeakWindow(None).result == {}  # off CUDA: no numbers at all


def test_alarm_interrupts_a_variant(gc_mod):
    import time

    with pytest.raises(gc_mod.VariantTimeout), gc_mod.alarm(0.05):
        time.sleep(2)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------- the rehearsal


def test_cpu_rehearsal_through_the_real_trainer(gc_mod, report_mod, tmp_path):
    """run_check on CPU with the tiny model: 480p (cold: compiles in its warm-up step), then 720p with no
    warm-up reusing those graphs (dynamic sequence dims): the window compiles nothing; a budget skip."""
    import torch.distributed as dist

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    torch._dynamo.reset()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    variants = [gc_mod.Variant.parse(k) for k in ("480p:full:sdpa", "720p:full:sdpa", "720p:selective:sdpa")]
    mem = FakeMem()
    try:
        res = gc_mod.run_check(variants[:2], out=tmp_path / "r.json", device="cpu", tiny=True, mem=mem,
                               attention=False, budget_s=1e6)
        skipped = gc_mod.run_check(variants[2:], out=None, device="cpu", tiny=True, attention=False, budget_s=0)
    finally:
        dist.destroy_process_group()
        for s, h in handlers.items():
            signal.signal(s, h)
        torch._dynamo.reset()
    a, b = res["variants"]
    assert a["status"] == "ok" and b["status"] == "ok", (a.get("traceback"), b.get("traceback"))
    assert (a["steps"], a["warmup"], a["steps_measured"]) == (3, 1, 2) and a["shape"] == "5x32x48"
    assert (b["steps"], b["warmup"], b["steps_measured"]) == (1, 0, 1) and b["shape"] == "9x48x64"
    assert a["compiled"]["graphs"] >= 2 and a["compiled"]["graph_breaks"] == 0
    for r in (a, b):
        assert r["compiled_in_window"]["graphs"] == 0 and r["compiled_in_window"]["recompiles"] == 0
        assert r["step_time_s"] > 0 and "mfu" not in r  # no peak FLOP/s on CPU: no MFU
        assert r["peak_allocated_gib"] == 1.0 and r["peak_reserved_gib"] == 2.0  # read through the (fake) API
    assert [c[0] for c in mem.calls].count("reset") == 4  # begin + window start, per variant
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["measured"] is False and on_disk["rehearsal"] and on_disk["device"]["type"] == "cpu"
    assert len(on_disk["variants"]) == 2
    assert all("not measured" in r[3] for r in report_mod.table_rows(on_disk))  # a rehearsal is never a number
    (s,) = skipped["variants"]
    assert s["status"] == "skipped" and "time budget" in s["reason"]


# ---------------------------------------------------------------------------------------- JSON -> table


def _fixture(measured=True):
    return {
        "schema": 1, "measured": measured, "date": "2027-01-01", "wall_s": 512.0, "budget_s": 540.0,
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "torch": "2.13.0+cu130",
                   "cuda": "13.0", "cudnn": 91000, "total_memory_gib": 79.2, "peak_tflops": 989.0},
        "attention_check": {"tolerance": 0.05, "floor_vs_fp32": {"rel_out": 0.004, "rel_grad": 0.006}, "cases": {
            "flex": {"status": "ok", "rel_out": 0.0061, "rel_grad": 0.0123, "kernels": ["triton_tem_fused_0"]},
            "sdpa+fa3 unpadded": {"status": "skipped", "reason": "not installed: flash_attn_3"}}},
        "variants": [
            {"variant": "480p:full:sdpa", "status": "ok", "steps": 3, "steps_measured": 2, "step_time_s": 3.2104,
             "mfu": 0.3641, "peak_allocated_gib": 45.12, "peak_reserved_gib": 52.5,
             "compiled": {"graphs": 7, "recompiles": 5}, "compiled_in_window": {"graphs": 0, "recompiles": 0}},
            {"variant": "720p:full:sdpa", "status": "ok", "steps": 1, "steps_measured": 1, "step_time_s": 31.5,
             "mfu": 0.35, "peak_allocated_gib": 61.0, "peak_reserved_gib": 66.0,
             "compiled": {"graphs": 1, "recompiles": 1}, "compiled_in_window": {"graphs": 1, "recompiles": 1}},
            {"variant": "720p:selective:flex", "status": "error", "error": "OutOfMemoryError: CUDA out of memory"},
            {"variant": "720p:full:varlen", "status": "skipped", "reason": "time budget: ~45 s needed, 20 s left"},
        ]}


def _row(rows, clip, ac, backend):
    (row,) = [r for r in rows if r[:3] == [clip, ac, backend]]
    return row


def test_table_rows_from_the_json(report_mod):
    rows = report_mod.table_rows(_fixture())
    assert len(rows) == 12
    assert _row(rows, "81 × 480 × 832", "full", "sdpa") == [
        "81 × 480 × 832", "full", "sdpa", "3.210", "36.4 %", "45.1", "52.5", "7 / 0 / 0", "ok (2 of 3 steps)"]
    assert _row(rows, "121 × 720 × 1280", "full", "sdpa")[3] == "31.500 †"  # compiled inside its window: flagged
    oom = _row(rows, "121 × 720 × 1280", "selective", "flex")
    assert oom[3:8] == ["not measured"] * 5 and oom[8] == "failed: OutOfMemoryError"
    assert _row(rows, "121 × 720 × 1280", "full", "varlen")[8].startswith("skipped: time budget")
    absent = _row(rows, "81 × 480 × 832", "selective", "varlen")
    assert absent[3:] == ["not measured"] * 6
    numbers = {c for r in rows for c in r[3:8] if c != "not measured"}
    assert numbers == {"3.210", "36.4 %", "45.1", "52.5", "7 / 0 / 0", "31.500 †", "35.0 %", "61.0", "66.0",
                       "1 / 1 / 1"}  # nothing but the fixture's measurements


def test_unmeasured_json_renders_no_number(report_mod):
    for results in (None, _fixture(measured=False), {**_fixture(), "device": {"type": "cpu", "name": "cpu"}}):
        block = report_mod.render_block(results)
        assert "3.210" not in block and "45.1" not in block and "0.0061" not in block
        assert "Device: none. **Not measured**" in block
        rows = report_mod.table_rows(results) + report_mod.attention_rows(results)
        assert all(set(r[3:7]) <= {"not measured", "padded", "unpadded"} for r in rows)


def test_render_block_and_docs(report_mod):
    block = report_mod.render_block(_fixture())
    assert "Device: NVIDIA H100 80GB HBM3 (compute capability 9.0, 79 GiB), torch 2.13.0+cu130, CUDA 13.0" in block
    assert "| flex | flex | — | padded | 6.10e-03 | 1.23e-02 | `triton_tem_fused_0` | ok |" in block
    assert "| sdpa+fa3 unpadded | sdpa | fa3 | unpadded | not measured | not measured | not measured | skipped: " \
           "not installed: flash_attn_3 |" in block
    assert "| varlen | varlen | — | padded | not measured |" in block  # absent case
    assert "† the measured window compiled" in block
    md = "intro\n<!-- BEGIN GENERATED: gpu-check -->\nold\n<!-- END GENERATED: gpu-check -->\nafter\n"
    out = report_mod.render_docs(md, _fixture())
    assert out.startswith("intro\n<!-- BEGIN GENERATED: gpu-check -->\n<!-- Generated by") and out.endswith(
        "<!-- END GENERATED: gpu-check -->\nafter\n") and "old" not in out
    assert report_mod.render_docs(out, _fixture()) == out
    with pytest.raises(SystemExit, match="gpu-check"):
        report_mod.render_docs("no block", None)


def test_docs_table_is_current(report_mod):
    md = report_mod.DOCS_MD.read_text()
    assert report_mod.render_docs(md, report_mod.load_results()) == md, "run python scripts/gpu_check.py --render-docs"


# ---------------------------------------------------------------------------------------- the command


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_flag_without_cuda_exits_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--gpu"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "Nothing was measured" in lines[0], p.stderr
