"""Which checkpoints of a run have been scored: `<run_dir>/eval.jsonl`, the sidecar's ledger.

`motif-eval --watch` scores every complete checkpoint (`COMPLETE` marker) of a live run exactly
once, off the training path: the trainer only writes checkpoints, the sidecar only reads them and
writes this file. One JSON line per checkpoint, in step order:

    {"step": 1200, "checkpoint": "checkpoints/step_00001200", "status": "scored", ...metrics}
    {"step": 1800, "checkpoint": "checkpoints/step_00001800", "status": "deleted", "error": "..."}

`status` is "scored", or "deleted" when `checkpoint.keep_last` pruned the checkpoint before or while
it was scored (survived and reported, never retried). The ledger is rewritten whole through a
temporary file and `os.replace` at each checkpoint (never appended in place on the bucket mount), so
a sidecar killed at any moment leaves the old or the new file: restarted, it rescores the checkpoint
it was on and nothing twice, without gaps. A single sidecar per run dir is assumed (its lock file,
`eval.lock`, names the holder's pid and host and refuses a second live one on the same host).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LEDGER = "eval.jsonl"
LOCK = "eval.lock"
COMPLETE = "COMPLETE"
SCORED, DELETED = "scored", "deleted"


def complete_checkpoints(run_dir: Path, folder: str = "checkpoints") -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint with its `COMPLETE` marker, by step (an interrupted save has none)."""
    root = Path(run_dir) / folder
    out = []
    for p in root.glob("step_*") if root.is_dir() else ():
        try:
            step = int(p.name.removeprefix("step_"))
        except ValueError:
            continue
        if (p / COMPLETE).is_file():
            out.append((step, p))
    return sorted(out)


class Ledger:
    """The scored / deleted checkpoints of one run (`<run_dir>/eval.jsonl`)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER
        self.lines: list[dict] = self._read()

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, text in enumerate(self.path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:  # the file is replaced whole, so this is damage, not a torn write
                raise ValueError(f"{self.path}:{n}: not JSON ({e}); move the file aside to rescore the run") from None
            out.append(rec)
        return out

    @property
    def steps(self) -> set[int]:
        return {int(r["step"]) for r in self.lines}

    def record(self, rec: dict) -> None:
        """Add one checkpoint's line (replacing none: a step is recorded once) and rewrite the file atomically."""
        if int(rec["step"]) in self.steps:
            raise ValueError(f"step {rec['step']} is already in {self.path}")
        self.lines = sorted([*self.lines, rec], key=lambda r: int(r["step"]))
        tmp = self.path.with_name(f".{LEDGER}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True, default=float) + "\n" for r in self.lines))
        os.replace(tmp, self.path)


class SidecarLock:
    """`<run_dir>/eval.lock`: one sidecar per run dir. A lock whose pid is dead on this host is taken over
    (a killed sidecar leaves it behind); a live one, or one from another host, is refused by name."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> SidecarLock:
        if self.path.exists():
            held = json.loads(self.path.read_text() or "{}")
            alive = held.get("host") == self.me["host"] and _pid_alive(int(held.get("pid", -1)))
            if alive or held.get("host") not in (None, self.me["host"]):
                raise RuntimeError(f"{self.path}: held by pid {held.get('pid')} on {held.get('host')}; one "
                                   "motif-eval per run dir (delete the lock if that sidecar is gone)")
        self.path.write_text(json.dumps(self.me))
        return self

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending(ledger: Ledger, run_dir: Path, folder: str = "checkpoints") -> list[tuple[int, Path]]:
    """Complete checkpoints not yet in the ledger, oldest first."""
    done = ledger.steps
    return [(s, p) for s, p in complete_checkpoints(run_dir, folder) if s not in done]


def score_pending(ledger: Ledger, score: Callable[[int, Path], dict], *, folder: str = "checkpoints",
                  on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Score every pending checkpoint once; a checkpoint that disappears (pruned) is recorded as deleted.

    `score(step, path)` returns the checkpoint's metrics (JSON-able); it raises FileNotFoundError (or any
    OSError / RuntimeError) when the files vanish under it — the path's absence afterwards tells a deletion
    from a real failure, which is re-raised."""
    out = []
    for step, path in pending(ledger, ledger.run_dir, folder):
        rel = path.relative_to(ledger.run_dir).as_posix()
        t0 = time.monotonic()
        try:
            rec = {"step": step, "checkpoint": rel, "status": SCORED, **score(step, path)}
        except (OSError, RuntimeError) as e:
            if path.exists() and (path / COMPLETE).exists():
                raise
            rec = {"step": step, "checkpoint": rel, "status": DELETED,
                   "error": f"pruned while scored ({type(e).__name__}: {str(e)[:200]})"}
        rec["eval_seconds"] = round(time.monotonic() - t0, 3)
        ledger.record(rec)
        out.append(rec)
        if on_record is not None:
            on_record(rec)
    return out


def watch(ledger: Ledger, score: Callable[[int, Path], dict], *, folder: str = "checkpoints", poll_s: float = 30.0,
          until: Callable[[], bool] | None = None, on_record: Callable[[dict], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """Score checkpoints as they become complete, forever or until `until()` is true after a pass with
    nothing pending (e.g. the run's final checkpoint is scored). Yields each ledger line."""
    while True:
        done = score_pending(ledger, score, folder=folder, on_record=on_record)
        yield from done
        if not done and until is not None and until():
            return
        if not done:
            sleep(poll_s)
