"""The GPU check's report: its JSON (`docs/bench/gpu_check.json`) and the docs/benchmarks.md table rendered from it.

The measuring is scripts/gpu_check.py (`run_check`, run by `python scripts/bench_train.py --gpu`); this module is
what it records and what is rendered from that:

1. The JSON: `new_results` is the document `run_check` fills (schema, command, date, the device record of
   `device_info`: device, capability, torch / CUDA / cuDNN versions, packages, commit; then every row),
   `write_json` writes it (atomically) after every variant, `load_results` reads it back. A variant row's
   timings and MFU come from its run's metrics.jsonl (`summarize`); `case_line` / `variant_line` are the
   lines the run logs per attention case / variant row.
2. The table of docs/benchmarks.md (`render_block`, between the `gpu-check` markers, `render_docs`): a row
   absent from the JSON, failed or skipped says "not measured"; only a CUDA run's rows carry numbers.
3. The helpers of `python scripts/gpu_check.py --render-docs` (`update_docs`) and `--check-docs`
   (`check_docs`: 1 if the table is stale).

It imports the check's definitions (the suite, the attention cases, the setup line) from gpu_check, which
imports this module inside the functions that need it. Tested on CPU in tests/unit/test_gpu_check.py.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpu_check import AC_MODES, ATTENTION_CASES, BACKENDS, ROOT, SETUP, SHAPES, SUITE, Variant

JSON_PATH = ROOT / "docs" / "bench" / "gpu_check.json"
DOCS_MD = ROOT / "docs" / "benchmarks.md"
BLOCK = "gpu-check"
SCHEMA = 1
COMMAND = "python scripts/bench_train.py --gpu"


# =========================================================================== the JSON


def new_results(device: str, *, measured: bool, rehearsal: bool, budget_s: float) -> dict:
    """The JSON document of one run before its first phase: what ran where, no row yet."""
    return {"schema": SCHEMA, "command": COMMAND, "measured": measured, "rehearsal": rehearsal,
            "date": datetime.date.today().isoformat(), "device": device_info(device), "setup": SETUP,
            "budget_s": budget_s, "variants": []}


def device_info(device: str) -> dict:
    """The JSON's device record: type, name, capability, memory, peak FLOP/s, versions, packages, commit."""
    import torch

    from motif_train.metrics import peak_tflops

    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "python": sys.version.split()[0]}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=torch.cuda.get_device_name(dev), capability=list(torch.cuda.get_device_capability(dev)),
                    total_memory_gib=props.total_memory / 2**30, count=torch.cuda.device_count(),
                    peak_tflops=peak_tflops(dev))
    else:
        info["name"] = "cpu"
    from importlib import metadata

    for pkg in ("triton", "flash-attn", "flash_attn_3", "flash-attn-3", "flash-attn-4"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info.setdefault("packages", {})[pkg] = metadata.version(pkg)
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    return info


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_results(path: Path = JSON_PATH) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarize(metrics: Path, warmup: int, peak_tflops: float | None) -> dict:
    """The measured steps (step > warmup) of a run's metrics.jsonl: s/step, rates, MFU."""
    from motif_train.metrics import read_metrics

    rows = [r for r in read_metrics(metrics) if r["step"] > warmup]
    if not rows:
        raise RuntimeError(f"{metrics}: no step after the {warmup} warm-up step(s) was logged")
    t = sum(r["step_time"] for r in rows)
    out = {"steps_measured": len(rows), "step_times_s": [r["step_time"] for r in rows], "step_time_s": t / len(rows),
           "samples_per_s": sum(r["samples"] for r in rows) / t, "tokens_per_s": sum(r["tokens"] for r in rows) / t,
           "data_wait_share": sum(r["data_wait"] for r in rows) / t,
           "model_tflops_per_s": sum(r["flops"] for r in rows) / t / 1e12}
    if peak_tflops:
        out["mfu"] = out["model_tflops_per_s"] / peak_tflops
    return out


def case_line(name: str, rec: dict) -> str:
    """One attention case of the JSON as the run logs it."""
    return f"  {name}: {rec['status']} " + (f"rel out {rec['rel_out']:.2e} grad {rec['rel_grad']:.2e}"
                                          if "rel_out" in rec else rec.get("reason", rec.get("error", "")))


def variant_line(res: dict) -> str:
    """One variant row of the JSON as the run logs it."""
    if res["status"] != "ok":
        return f"   {res['variant']}: {res['status']}: {res.get('error', '')[:200]}"
    return (f"   {res['variant']}: {res['step_time_s']:.3f} s/step" +
            (f", MFU {100 * res['mfu']:.1f} %" if res.get("mfu") else "") +
            (f", peak {res['peak_allocated_gib']:.1f} GiB allocated / {res['peak_reserved_gib']:.1f} reserved"
             if "peak_allocated_gib" in res else "") +
            f", graphs {res['compiled']['graphs']} (window {res['compiled_in_window']['graphs']}), "
            f"{res['wall_s']:.0f} s")


# =========================================================================== docs table


def _measured(results: dict | None) -> bool:
    return bool(results) and bool(results.get("measured")) and results.get("device", {}).get("type") == "cuda"


def _clip(shape: str) -> str:
    return " × ".join(str(x) for x in SHAPES[shape])


def table_rows(results: dict | None, suite: tuple[str, ...] = SUITE) -> list[list[str]]:
    """One row per variant of `suite` (in the order shape, AC, backend), then any other variant the JSON
    holds. A variant absent from the JSON, not ok, or from a run that was not a CUDA measurement says
    "not measured"; never a number that was not measured."""
    by_key = {r["variant"]: r for r in (results or {}).get("variants", [])} if _measured(results) else {}
    keys = sorted(suite, key=lambda k: (list(SHAPES).index(k.split(":")[0]), AC_MODES.index(k.split(":")[1]),
                                        BACKENDS.index(k.split(":")[2])))
    keys += [k for k in by_key if k not in keys]
    rows = []
    for key in keys:
        v = Variant.parse(key)
        r = by_key.get(key)
        backend = v.backend + (f" + {v.flash_impl}" if v.flash_impl else "")
        row = [_clip(v.shape), v.ac, backend]
        nm = "not measured"
        if r is None or r.get("status") != "ok":
            status = nm if r is None else (f"skipped: {r.get('reason', '')}" if r.get("status") == "skipped"
                                           else "failed: " + r.get("error", "?").split(":")[0])
            rows.append(row + [nm] * 5 + [status])
            continue
        win = r["compiled_in_window"]
        dagger = " †" if win["graphs"] or win["recompiles"] else ""
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else nm
        alloc = f"{r['peak_allocated_gib']:.1f}" if r.get("peak_allocated_gib") is not None else nm
        res_ = f"{r['peak_reserved_gib']:.1f}" if r.get("peak_reserved_gib") is not None else nm
        rows.append(row + [f"{r['step_time_s']:.3f}{dagger}", mfu, alloc, res_,
                           f"{r['compiled']['graphs']} / {win['graphs']} / {win['recompiles']}",
                           f"ok ({r['steps_measured']} of {r['steps']} steps)"])
    return rows


ATTN_HEADER = ["case", "backend", "`flash_impl`", "keys", "out rel. err", "grad rel. err", "kernels", "status"]
STEP_HEADER = ["clip", "`parallel.ac`", "`model.attention_backend`", "s / step", "MFU", "peak alloc. GiB",
               "peak reserved GiB", "graphs: run / window / recompiles", "status"]


def attention_rows(results: dict | None) -> list[list[str]]:
    cases = ((results or {}).get("attention_check") or {}).get("cases", {}) if _measured(results) else {}
    rows = []
    for name, backend, flash, padded in ATTENTION_CASES:
        r = cases.get(name)
        row = [name, backend, flash or "—", "padded" if padded else "unpadded"]
        if r is None:
            rows.append(row + ["not measured"] * 3 + ["not measured"])
        elif "rel_out" in r:
            kern = ", ".join(f"`{k[:60]}`" for k in r.get("kernels", [])[:3]) or "—"
            rows.append(row + [f"{r['rel_out']:.2e}", f"{r['rel_grad']:.2e}", kern, r["status"]])
        else:
            why = r.get("reason") or r.get("error", "")
            rows.append(row + ["not measured"] * 3 + [f"{r['status']}: {why[:120]}".replace("|", "/")])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_block(results: dict | None) -> str:
    """The generated part of docs/benchmarks.md for `results` (the JSON; None: no JSON)."""
    lines = [f"<!-- Generated by scripts/gpu_check.py from docs/bench/gpu_check.json; run `{COMMAND}` on a GPU "
             "machine (or `python scripts/gpu_check.py --render-docs`). -->", ""]
    if _measured(results):
        d = results["device"]
        cap = ".".join(map(str, d.get("capability", [])))
        lines.append(f"Device: {d['name']} (compute capability {cap}, {d.get('total_memory_gib', 0):.0f} GiB), torch "
                     f"{d['torch']}, CUDA {d['cuda']}, cuDNN {d.get('cudnn')}; {results.get('date')}, "
                     f"{results.get('wall_s', 0):.0f} s of a {results.get('budget_s', 0):.0f} s budget. MFU against "
                     f"{d.get('peak_tflops')} TFLOP/s.")
    else:
        lines.append("Device: none. **Not measured**: no GPU was lent to the session that prepared this check, so "
                     "`docs/bench/gpu_check.json` holds no CUDA measurement and every row below says so.")
    ac = (results or {}).get("attention_check") if _measured(results) else None
    lines += ["", "Attention backends against sdpa (forward + backward, relative error = max |x − sdpa| / max "
              "|sdpa| over the output and the q / k / v gradients" +
              (f"; tolerance {ac['tolerance']:.2g}, the bf16 floor (sdpa bf16 vs fp32) "
               f"{max(ac['floor_vs_fp32'].values()):.2e}" if ac and ac.get("floor_vs_fp32") else "") + "):", ""]
    lines += _table(ATTN_HEADER, attention_rows(results))
    lines += ["", "Training step (s / step over the measured steps; peaks of the measured window; graphs compiled "
              "over the variant's run / in its measured window / recompiles in the window):", ""]
    rows = table_rows(results)
    lines += _table(STEP_HEADER, rows)
    if any("†" in r[3] for r in rows):
        lines += ["", "† the measured window compiled a graph or recompiled: that time includes compilation."]
    return "\n".join(lines)


MARKER = re.compile(rf"(<!-- BEGIN GENERATED: {BLOCK} -->\n)(.*?)(<!-- END GENERATED: {BLOCK} -->)", re.S)


def render_docs(md: str, results: dict | None) -> str:
    if not MARKER.search(md):
        raise SystemExit(f"no `<!-- BEGIN GENERATED: {BLOCK} -->` / `<!-- END GENERATED: {BLOCK} -->` block")
    return MARKER.sub(lambda m: m.group(1) + render_block(results) + "\n" + m.group(3), md, count=1)


def update_docs(md_path: Path = DOCS_MD, results: dict | None = None, json_path: Path = JSON_PATH) -> bool:
    """Re-render the table in `md_path` from `results` (None: read `json_path`); True if the file changed."""
    results = load_results(json_path) if results is None else results
    old = md_path.read_text()
    new = render_docs(old, results)
    if new != old:
        md_path.write_text(new)
    return new != old


def check_docs(md_path: Path = DOCS_MD, json_path: Path = JSON_PATH) -> int:
    """1 (and one line on stderr) if the table in `md_path` is not what `json_path` renders, else 0."""
    results = load_results(json_path)
    md = md_path.read_text()
    if render_docs(md, results) != md:
        print(f"{md_path}: the {BLOCK} table is stale; run python scripts/gpu_check.py --render-docs",
              file=sys.stderr)
        return 1
    return 0
