"""The data path at 10⁶ samples: loader start-up and memory per rank, steady state and boundary stalls (CPU).

    python scripts/bench_loader.py                       # writes docs/bench/loader_cpu.json
    python scripts/bench_loader.py --samples 100000 --shards 10000 --ranks 0 63   # a quicker look

1. scale (metadata only): a synthetic manifest of N samples in S shards (4 buckets), each shard's
   `<shard>.tar.idx.json`, the consolidated `sample_index/` (`save_manifest`), and empty sparse tar files
   of the manifest's sizes (no tar byte is read at start-up). For rank r of 64, in a fresh subprocess:
   `ShardSource(...)` + `set_stage` + this rank's view of the epoch plan + the first step's locations —
   seconds and VmRSS / RssAnon / VmHWM (from /proc/self/status) above the process after its imports.
   The same for the loader before this change (`git show <rev>:motif_train/data/loader.py`), which parsed
   the whole manifest and held a (shard, key) tuple per sample.
2. steady state (real shards): samples/s of 2 workers and the data-wait share of a loop whose "model"
   takes a fixed time per step; and the wait at epoch and stage boundaries, new loader vs the old one
   (which built a new DataLoader, and forked new workers, at every boundary).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUCKETS = ["9x64x96", "5x96x64", "17x64x64", "1x128x128"]


def _proc_status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024  # kB -> MiB
    return out


def make_synthetic(root: Path, n_samples: int, n_shards: int) -> dict:
    from motif_train.data.shards import build_manifest, index_name, save_manifest, shard_name

    per = n_samples // n_shards
    entries = []
    for i in tqdm(range(n_shards), desc="synthetic shards", mininterval=2):
        bucket = BUCKETS[i * len(BUCKETS) // n_shards]
        rel = shard_name(bucket, 0, i)
        keys = [f"c{i:06d}_{j:02d}" for j in range(per)]
        rows, off = [], 512
        for k in keys:
            for field, size in (("latents.npy", 40_000), ("text.npy", 30_000), ("image.npy", 12_000), ("json", 300)):
                rows.append([f"{k}.{field}", off, size, 0])
                off += -(-size // 512) * 512 + 512
        size = off + 1024
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: the size the manifest states, no bytes on disk
        text = json.dumps({"version": 1, "tar_bytes": size, "members": rows}, separators=(",", ":"))
        (root / index_name(rel)).write_text(text)
        entries.append({"path": rel, "bucket": bucket, "samples": per, "keys": keys, "bytes": size,
                        "index": index_name(rel), "index_crc": zlib.crc32(text.encode())})
    manifest = build_manifest(entries, buckets=BUCKETS)
    t0 = time.perf_counter()
    save_manifest(root, manifest)
    return {"consolidate_s": time.perf_counter() - t0,
            "manifest_mib": (root / "manifest.json").stat().st_size / 2**20,
            "sample_index_mib": sum(p.stat().st_size for p in (root / "sample_index").iterdir()) / 2**20}


_STARTUP = r"""
import json, sys, time, importlib.util
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from motif_train.data.curriculum import StageConfig
from bench_loader import _proc_status, old_loader
root, rank, world, which = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
L = old_loader(sys.argv[6]) if which == "old" else __import__("motif_train.data.loader", fromlist=["x"])
stage = StageConfig(name="s", steps=10**6, buckets=[[9, 64, 96], [5, 96, 64], [17, 64, 64], [1, 128, 128]],
                    token_budget=4 * 120)
base = _proc_status()
t0 = time.perf_counter()
src = L.ShardSource(root=root, num_workers=0, text_dim=32, image_dim=24, seed=0, dp_rank=rank, dp_size=world,
                    grad_accum=1)
t_ctor = time.perf_counter() - t0
src.set_stage(stage, teacher=False)
src._start()  # old: the full plan and the stream (num_workers=0: no fork)
if which == "new":
    src._next_task()  # this rank's view of the plan + the first step's locations
t_all = time.perf_counter() - t0
now = _proc_status()
print(json.dumps({"ctor_s": t_ctor, "startup_s": t_all,
                  **{f"{k}_mib": now[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")},
                  "VmHWM_mib": now["VmHWM"] - base["VmRSS"], "rss_after_imports_mib": base["VmRSS"]}))
"""


def old_loader(rev: str):
    """The loader module as of git revision `rev` (read-only `git show`), imported inside motif_train.data."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:motif_train/data/loader.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="old_loader_")) / "loader_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("motif_train.data._loader_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_startup(root: Path, ranks: list[int], world: int, rev: str) -> dict:
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'scripts'}"}
    for which in ("new", "old"):
        for r in ranks:
            res = subprocess.run([sys.executable, "-c", _STARTUP, str(ROOT / "scripts"), str(root), str(r),
                                  str(world), which, rev], capture_output=True, text=True, env=env, timeout=1800)
            if res.returncode:
                raise RuntimeError(res.stderr[-3000:])
            out[f"{which}_rank{r}"] = json.loads(res.stdout.strip().splitlines()[-1])
            print(which, r, out[f"{which}_rank{r}"], flush=True)
    return out


def make_real(root: Path, n: int) -> None:
    from motif_train.data.shards import ShardWriter, build_manifest, encode_sample, latent_shape, save_manifest

    rng = np.random.default_rng(0)
    with ShardWriter(root, target_samples=16) as w:
        for i in tqdm(range(n), desc="real shards", mininterval=2):
            bucket = BUCKETS[i % 2]
            f, h, wd = (int(x) for x in bucket.split("x"))
            meta = {"caption": "b", "source": "b", "bucket": bucket, "frames": f, "tokens": 24 * 4}
            # ~0.4 MiB a sample (text 128 x 1024, 64 SigLIP tokens x 1152): reads and decodes, not seeks, dominate
            w.write(bucket, encode_sample(f"r{i:05d}", rng.standard_normal(latent_shape(f, h, wd)),
                                          rng.standard_normal((128, 1024)), image=rng.standard_normal((64, 1152)),
                                          meta=meta))
    save_manifest(root, build_manifest(w.entries))


def bench_steady(root: Path, rev: str, steps: int, compute_s: float) -> dict:
    from motif_train.data import loader as new
    from motif_train.data.curriculum import StageConfig

    old = old_loader(rev)
    a = StageConfig(name="a", steps=10**6, buckets=[[9, 64, 96]], token_budget=8 * 72)  # 8 samples a step
    b = StageConfig(name="b", steps=10**6, buckets=[[5, 96, 64]], token_budget=8 * 48)
    out = {}
    for name, L in (("new", new), ("old", old)):
        src = L.ShardSource(root=str(root), num_workers=2, text_dim=256, image_dim=256, seed=0, dp_rank=0,
                            dp_size=1, grad_accum=1)
        src.set_stage(a, teacher=False)
        per_epoch = src._stage_plan()[0].num_steps
        src.next_step(0)  # worker start-up, not steady state
        waits, first, got, t0 = [], [], 0, time.perf_counter()
        for s in tqdm(range(steps), desc=f"steady {name}", mininterval=2):
            t = time.perf_counter()
            got += sum(len(x) for x in src.next_step(s + 1))
            waits.append(time.perf_counter() - t)
            first.append(src.step_in_epoch == 1)  # the first step of an epoch
            time.sleep(compute_s)
        wall = time.perf_counter() - t0
        epoch_waits = [w for w, f in zip(waits, first, strict=True) if f]
        inner = [w for w, f in zip(waits, first, strict=True) if not f]
        # stage boundary: switch to b (announced to the new loader, as the trainer does), then back
        stall = []
        for st, nxt in ((b, a), (a, b)):
            if name == "new":
                src.set_stage(st, teacher=False, steps=10, upcoming=(nxt, False))
            else:
                src.set_stage(st, teacher=False)
            t = time.perf_counter()
            src.next_step(0)
            stall.append(time.perf_counter() - t)
            for _ in range(9):
                time.sleep(compute_s)
                src.next_step(0)
        out[name] = {"samples_per_s": got / wall, "data_wait_share": sum(waits) / wall,
                     "median_wait_ms": 1e3 * float(np.median(inner)), "epoch_boundaries": len(epoch_waits),
                     "epoch_boundary_wait_ms": 1e3 * float(np.mean(epoch_waits)) if epoch_waits else None,
                     # new loader: the first switch was not announced (in-flight tasks drained), the second was
                     "stage_boundary_wait_ms": {"unannounced": 1e3 * stall[0], "announced": 1e3 * stall[1]},
                     "steps_per_epoch": per_epoch,
                     "compute_s_per_step": compute_s}
        if hasattr(src, "close"):
            src.close()
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 63])
    ap.add_argument("--rev", default="HEAD", help="git revision of the old loader to compare against")
    ap.add_argument("--real-samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--compute-s", type=float, default=0.08)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "loader_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        syn, real = Path(tmp) / "syn", Path(tmp) / "real"
        res = {"machine": f"{os.cpu_count()} CPU cores (this CPU), no GPU", "samples": args.samples,
               "shards": args.shards, "world": args.world}
        res["synthetic"] = make_synthetic(syn, args.samples, args.shards)
        res["startup"] = bench_startup(syn, args.ranks, args.world, args.rev)
        make_real(real, args.real_samples)
        res["steady"] = bench_steady(real, args.rev, args.steps, args.compute_s)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
