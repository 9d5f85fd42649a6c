"""W&B's own files (the `.wandb` transaction log, files/, logs/) are written on rank 0's local disk
(`logger.local_dir`) and copied whole to `<run_dir>/wandb/` only at `sync()` (checkpoints) and `close()`
(exit): a real offline W&B run through MetricsLogger, no network."""

import os
import stat
import struct
import time
import warnings
import zlib
from pathlib import Path

import torch

from motif_train.metrics import LoggerConfig, MetricsLogger

CPU = torch.device("cpu")
BLOCK = 32768  # the transaction log's block size (a leveldb-style log)


def _step(i: int) -> dict:
    # 60 extra keys: enough history per step that W&B writes whole 32 KiB blocks while the run goes on
    return dict(losses={"denoise": 1.0 / (i + 2)}, grad_norm=0.5, lr=1e-4, samples=4, tokens=4096, step_time=0.1,
                data_wait=0.01, flops=1e12, stage=0, extra={f"extra/value_{j:02d}": j + 1 / i for j in range(60)})


def _logger(env: Path, local: str, **kw) -> MetricsLogger:
    cfg = LoggerConfig(log_every=1, mode="offline", local_dir=str(env / local), **kw)
    logger = MetricsLogger(cfg, env / "run", rank=0, world_size=1, device=CPU, run_name="wb")
    assert logger.wandb_run is not None, "offline wandb.init failed"
    return logger


def _snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under root (dirs: None) with its (size, mtime_ns)."""
    out: dict[str, tuple[int, int] | None] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = None if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns)
    return out


def _wait_for_size(path: Path, at_least: int, timeout: float = 10.0) -> int:
    """W&B's service writes the log asynchronously, a whole block at a time: wait until it has."""
    deadline = time.monotonic() + timeout
    while (size := path.stat().st_size) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return size


def _records(blob: bytes) -> list[str]:
    """Parse a `.wandb` transaction log: the 7-byte header (":W&B", magic 0xBEE1, version 0), then per
    32 KiB block records of (crc32 of type + data, length, type) fragments; a torn tail is left out.
    Returns each whole record's type (wandb's `Record` protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert blob[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), blob[:7]
    pos, kinds, buf = 7, [], b""
    while pos + 7 <= len(blob):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a fragment header is zero padding
            pos += left
            continue
        crc, n, typ = struct.unpack("<IHB", blob[pos:pos + 7])
        data = blob[pos + 7:pos + 7 + n]
        if len(data) < n:
            break
        assert zlib.crc32(bytes([typ]) + data) == crc, f"bad checksum at byte {pos}"
        assert typ in (1, 2, 3, 4), typ  # full, first, middle, last
        buf += data
        pos += 7 + n
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            kinds.append(rec.WhichOneof("record_type"))
            buf = b""
    return kinds


def _local_files(leg: Path) -> dict[str, bytes]:
    """What the run dir's copy must hold: every file of a local leg but W&B's tmp/ and its logs/ links."""
    return {str(p.relative_to(leg)): p.read_bytes() for p in leg.rglob("*")
            if p.is_file() and not str(p.relative_to(leg)).startswith("tmp")
            and not (p.parent.name == "logs" and p.is_symlink())}


def test_wandb_files_reach_the_run_dir_only_at_syncs(wandb_env):
    logger = _logger(wandb_env, "local")
    run_dir, run_id = wandb_env / "run", logger.wandb_id
    leg = logger.wandb_local_dir
    assert leg.parent == wandb_env / "local" / "wandb" and leg.name == f"{leg.name.split('-' + run_id)[0]}-{run_id}"
    assert leg.name.startswith("offline-run-") and logger.wandb_dir == run_dir / "wandb" / leg.name
    local_log, copy_log = leg / f"run-{run_id}.wandb", logger.wandb_dir / f"run-{run_id}.wandb"
    start = _snapshot(run_dir)
    assert set(start) == {"wandb_id.txt"}  # W&B wrote nothing into the run dir

    for i in range(1, 61):
        logger.log_step(i, **_step(i))
    logger.log_event(60, "checkpoint", **{"checkpoint/blocking_s": 0.5})
    size = _wait_for_size(local_log, 2 * BLOCK)
    assert size >= 2 * BLOCK, f"W&B wrote only {size} bytes of 60 steps' history"
    assert _snapshot(run_dir) == start  # 60 steps, nothing in the run dir changed (not even W&B's files)

    assert logger.sync()
    blob = copy_log.read_bytes()
    assert len(blob) >= size and local_log.read_bytes().startswith(blob)  # a whole snapshot of the local log
    kinds = _records(blob)
    assert kinds[0] == "header" and "run" in kinds and kinds.count("history") >= 30
    synced = _snapshot(run_dir)
    assert {"metrics.jsonl", "events.jsonl", f"wandb/{leg.name}/run-{run_id}.wandb",
            f"wandb/{leg.name}/files/output.log", f"wandb/{leg.name}/logs/debug.log"} <= set(synced)
    assert not [k for k in synced if "/tmp" in k or k.endswith(".tmp")]  # no W&B scratch, no temp copies

    for i in range(61, 121):
        logger.log_step(i, **_step(i))
    _wait_for_size(local_log, size + BLOCK)
    assert _snapshot(run_dir) == synced  # again nothing between syncs

    # close: finish + teardown (the service writes the last blocks), then the final copy, byte-identical
    logger.close()
    assert copy_log.read_bytes() == local_log.read_bytes()
    assert {k: (logger.wandb_dir / k).read_bytes() for k in _local_files(leg)} == _local_files(leg)
    kinds = _records(copy_log.read_bytes())
    assert kinds.count("history") == 120 and kinds[-1] == "exit"  # the whole run, as `wandb sync` reads it
    assert len(copy_log.read_bytes()) == len(local_log.read_bytes())

    # a sync with nothing changed rewrites nothing
    closed = _snapshot(run_dir)
    assert logger.sync()
    assert _snapshot(run_dir) == closed


def test_resume_on_a_fresh_machine_continues_the_run_id(wandb_env):
    first = _logger(wandb_env, "node_a")
    run_id = first.wandb_id
    for i in range(1, 6):
        first.log_step(i, **_step(i))
    first.close()
    leg_a = first.wandb_dir
    before = _snapshot(leg_a)
    time.sleep(1.1)  # a leg's dir is named by its start second: a real resume starts later than this

    again = _logger(wandb_env, "node_b")  # same run dir, empty local dir
    assert again.wandb_id == run_id == (wandb_env / "run" / "wandb_id.txt").read_text().strip()
    assert again.wandb_run.id == run_id
    assert again.wandb_local_dir.parent == wandb_env / "node_b" / "wandb"
    assert again.wandb_dir != leg_a and again.wandb_dir.name.endswith(f"-{run_id}")
    for i in range(6, 11):
        again.log_step(i, **_step(i))
    again.close()
    legs = sorted(p.name for p in (wandb_env / "run" / "wandb").iterdir())
    assert legs == sorted([leg_a.name, again.wandb_dir.name])  # `wandb sync <run_dir>/wandb/*-<id>`: both legs
    copy = (again.wandb_dir / f"run-{run_id}.wandb").read_bytes()
    assert copy == (again.wandb_local_dir / f"run-{run_id}.wandb").read_bytes()
    assert _records(copy).count("history") == 5
    assert _snapshot(leg_a) == before  # the earlier leg's copy untouched

    # a third leg back on the first machine: its old leg is still there locally and already copied
    time.sleep(1.1)
    third = _logger(wandb_env, "node_a")
    assert third.wandb_id == run_id
    assert third.sync()
    assert _snapshot(leg_a) == before  # not copied again (same size and mtime)
    third.close()
    assert len(list((wandb_env / "run" / "wandb").iterdir())) == 3


def _block(run_dir: Path):
    """Make the run dir refuse W&B's copies; returns the undo. chmod read-only, or, as root (which ignores
    the mode), a file where `<run_dir>/wandb` goes: each copy then fails for real (ENOTDIR / EEXIST)."""
    run_dir.chmod(0o555)
    if not os.access(run_dir, os.W_OK):
        return lambda: run_dir.chmod(0o755)
    run_dir.chmod(0o755)
    blocker = run_dir / "wandb"
    if blocker.is_dir():
        blocker.rename(run_dir / "wandb_aside")
    blocker.write_text("a file where a directory should be")

    def undo():
        blocker.unlink()
        if (run_dir / "wandb_aside").exists():
            (run_dir / "wandb_aside").rename(blocker)
    return undo


def _w_and_b_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("metrics: copying W&B")]


def test_unwritable_run_dir_warns_once_and_never_raises(wandb_env):
    logger = _logger(wandb_env, "local")
    run_dir = wandb_env / "run"
    for i in range(1, 4):
        logger.log_step(i, **_step(i))
    undo = _block(run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4, 7):
            logger.log_step(i, **_step(i))
            assert logger.sync() is False  # never raises
    assert len(_w_and_b_warnings(caught)) == 1, [str(w.message) for w in caught]
    undo()
    assert logger.sync()  # the next sync after the fault copies everything
    copy = logger.wandb_dir / f"run-{logger.wandb_id}.wandb"
    assert copy.is_file()

    undo = _block(run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.close()  # the final copy fails too: no exception, and the run was warned already
    assert not _w_and_b_warnings(caught)
    undo()
    assert logger.sync()  # still possible by hand after close: the local files are complete
    assert copy.read_bytes() == (logger.wandb_local_dir / copy.name).read_bytes()
