"""The data path at 10⁶ samples: loader start-up and memory per rank, steady state and boundary stalls (CPU).

    python scripts/bench_loader.py                       # writes docs/bench/loader_cpu.json
    python scripts/bench_loader.py --samples 100000 --shards 10000 --ranks 0 63   # a quicker look
    python scripts/bench_loader.py --no-baseline         # the current loader only

1. scale (metadata only): a synthetic manifest of N samples in S shards (4 buckets), each shard's
   `<shard>.tar.idx.json`, the consolidated `sample_index/` (`save_manifest`), and empty sparse tar files
   of the manifest's sizes (no tar byte is read at start-up). For rank r of 64, in a fresh subprocess:
   `ShardSource(...)` + `set_stage` + this rank's view of the epoch plan + the first step's locations —
   seconds and VmRSS / RssAnon / VmHWM (from /proc/self/status) above the process after its imports.
2. steady state (real shards): samples/s of 2 workers and the data-wait share of a loop whose "model"
   takes a fixed time per step; and the wait at epoch and stage boundaries.

Both are measured for the working tree and for the baseline: the whole `motif_train` package as of
`--baseline` (default BASELINE_REV, the commit before issue 10 replaced the loader: it parsed the whole
manifest, held a (shard, key) tuple per sample, and built a new DataLoader — forking new workers — at every
epoch and stage boundary), extracted with `git archive` into a temporary directory and imported from there
in its own subprocess. The baseline is a fixed commit, not HEAD, so a rerun after later commits still
compares against the same code. A clone without that commit (a shallow clone) stops with an error naming
it and the fix (`git fetch --unshallow`, or `--no-baseline`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUCKETS = ["9x64x96", "5x96x64", "17x64x64", "1x128x128"]
# 307e1c2^ (issue 10, "data path at 1e6 shards", replaced the loader in 307e1c2): the loader it replaced.
BASELINE_REV = "c4c7e7a4c0458a2287e6d500dac78fe9d5bf87ae"


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


_PRELUDE = r"""
import json, sys, time
from pathlib import Path
tree = sys.argv[1]
sys.path.insert(0, tree)
import numpy as np, torch
import motif_train
assert Path(motif_train.__file__).resolve().is_relative_to(Path(tree).resolve()), motif_train.__file__
from motif_train.data import loader as L
from motif_train.data.curriculum import StageConfig

def proc_status():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024  # kB -> MiB
    return out
"""

_STARTUP = _PRELUDE + r"""
root, rank, world = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stage = StageConfig(name="s", steps=10**6, buckets=[[9, 64, 96], [5, 96, 64], [17, 64, 64], [1, 128, 128]],
                    token_budget=4 * 120)
base = proc_status()
t0 = time.perf_counter()
src = L.ShardSource(root=root, num_workers=0, text_dim=32, image_dim=24, seed=0, dp_rank=rank, dp_size=world,
                    grad_accum=1)
t_ctor = time.perf_counter() - t0
src.set_stage(stage, teacher=False)
src._start()  # baseline: the full plan and the stream (num_workers=0: no fork)
if hasattr(src, "_next_task"):
    src._next_task()  # this rank's view of the plan + the first step's locations
t_all = time.perf_counter() - t0
now = proc_status()
print(json.dumps({"ctor_s": t_ctor, "startup_s": t_all,
                  **{f"{k}_mib": now[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")},
                  "VmHWM_mib": now["VmHWM"] - base["VmRSS"], "rss_after_imports_mib": base["VmRSS"]}))
"""


def baseline_tree(rev: str, dest: Path) -> tuple[Path, str]:
    """`motif_train/` as of commit `rev`, extracted under `dest` (read-only `git archive`); (tree, full sha).
    SystemExit naming the commit and the fix when this clone does not have it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True)

    found = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode:
        shallow = git("rev-parse", "--is-shallow-repository").stdout.decode().strip() == "true"
        raise SystemExit(
            f"bench_loader: the baseline commit {rev} is not in this clone{' (a shallow clone)' if shallow else ''}: "
            "its loader is what the figures compare against. Fetch the history (git fetch --unshallow, or "
            f"git fetch origin {rev}), or run with --no-baseline to measure the current loader only.")
    sha = found.stdout.decode().strip()
    tar = git("archive", "--format=tar", sha, "motif_train")
    if tar.returncode:
        raise SystemExit(f"bench_loader: git archive {sha} failed: {tar.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as tf:
        tf.extractall(dest, filter="data")
    return dest, sha


def _run(code: str, tree: Path, *args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    res = subprocess.run([sys.executable, "-c", code, str(tree), *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=1800, cwd=tempfile.gettempdir())
    if res.returncode:
        raise RuntimeError(f"{tree}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_startup(root: Path, ranks: list[int], world: int, trees: dict[str, Path]) -> dict:
    out = {}
    for which, tree in trees.items():
        for r in ranks:
            out[f"{which}_rank{r}"] = _run(_STARTUP, tree, root, r, world)
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


_STEADY = _PRELUDE + r"""
import inspect
root, steps, compute_s = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
a = StageConfig(name="a", steps=10**6, buckets=[[9, 64, 96]], token_budget=8 * 72)  # 8 samples a step
b = StageConfig(name="b", steps=10**6, buckets=[[5, 96, 64]], token_budget=8 * 48)
announce = "upcoming" in inspect.signature(L.ShardSource.set_stage).parameters  # the baseline cannot
src = L.ShardSource(root=root, num_workers=2, text_dim=256, image_dim=256, seed=0, dp_rank=0, dp_size=1,
                    grad_accum=1)
src.set_stage(a, teacher=False)
per_epoch = src._stage_plan()[0].num_steps
src.next_step(0)  # worker start-up, not steady state
waits, first, got, t0 = [], [], 0, time.perf_counter()
for s in range(steps):
    t = time.perf_counter()
    got += sum(len(x) for x in src.next_step(s + 1))
    waits.append(time.perf_counter() - t)
    first.append(src.step_in_epoch == 1)  # the first step of an epoch
    time.sleep(compute_s)
wall = time.perf_counter() - t0
epoch_waits = [w for w, f in zip(waits, first) if f]
inner = [w for w, f in zip(waits, first) if not f]
# stage boundary: switch to b (announced where the loader takes it, as the trainer does), then back
stall = []
for st, nxt in ((b, a), (a, b)):
    if announce:
        src.set_stage(st, teacher=False, steps=10, upcoming=(nxt, False))
    else:
        src.set_stage(st, teacher=False)
    t = time.perf_counter()
    src.next_step(0)
    stall.append(time.perf_counter() - t)
    for _ in range(9):
        time.sleep(compute_s)
        src.next_step(0)
if hasattr(src, "close"):
    src.close()
print(json.dumps({
    "samples_per_s": got / wall, "data_wait_share": sum(waits) / wall,
    "median_wait_ms": 1e3 * float(np.median(inner)), "epoch_boundaries": len(epoch_waits),
    "epoch_boundary_wait_ms": 1e3 * float(np.mean(epoch_waits)) if epoch_waits else None,
    # current loader: the first switch was not announced (in-flight tasks drained), the second was
    "stage_boundary_wait_ms": {"unannounced": 1e3 * stall[0], "announced": 1e3 * stall[1]},
    "announced_stage_switch": announce, "steps_per_epoch": per_epoch, "compute_s_per_step": compute_s}))
"""


def bench_steady(root: Path, trees: dict[str, Path], steps: int, compute_s: float) -> dict:
    out = {}
    for which, tree in trees.items():
        out[which] = _run(_STEADY, tree, root, steps, compute_s)
        print(which, out[which], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 63])
    ap.add_argument("--baseline", default=BASELINE_REV,
                    help=f"git commit of the loader to compare against (default {BASELINE_REV[:7]}, the commit "
                         "before issue 10 replaced it)")
    ap.add_argument("--no-baseline", action="store_true", help="measure the working tree's loader only")
    ap.add_argument("--real-samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--compute-s", type=float, default=0.08)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "loader_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        syn, real = Path(tmp) / "syn", Path(tmp) / "real"
        trees = {"new": ROOT}
        res = {"machine": f"{os.cpu_count()} CPU cores (this CPU), no GPU", "samples": args.samples,
               "shards": args.shards, "world": args.world, "baseline_rev": None}
        if not args.no_baseline:
            trees["baseline"], res["baseline_rev"] = baseline_tree(args.baseline, Path(tmp) / "baseline")
        res["synthetic"] = make_synthetic(syn, args.samples, args.shards)
        res["startup"] = bench_startup(syn, args.ranks, args.world, trees)
        make_real(real, args.real_samples)
        res["steady"] = bench_steady(real, trees, args.steps, args.compute_s)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
