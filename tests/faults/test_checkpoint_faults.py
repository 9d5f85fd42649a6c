"""A real SIGKILL in the middle of a checkpoint save (torchrun, 2 gloo ranks, the tiny CPU experiment):
no COMPLETE marker, auto-resume from the previous complete checkpoint, the partial dir pruned, and
the resumed losses equal an uninterrupted run's bit for bit.

How the kill lands inside `dcp.save`, deterministically: DCP writes each rank's data to
`<step dir>/__<rank>_0.distcp` (one file per rank, opened with `open(path, "wb")` on the saving
thread). The manager removes a stale step dir before saving, so the file cannot be planted in
advance. Instead the test polls for the step dir, SIGSTOPs both ranks the moment it appears (the
ranks are then still writing train_state / RNG files or planning: well before DCP opens its data
files), plants a FIFO at each data-file path not yet created, and SIGCONTs them. Opening a FIFO for
writing blocks until a reader comes, and none does: both ranks now sit inside `dcp.save`; a second
later (a save takes well under that here) there is still no COMPLETE, and every process is SIGKILLed.
If a rank had already created its file when stopped, it is simply killed while stopped, which is
still mid-save (COMPLETE is checked to be absent at that moment).
"""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from tests.distributed._runs import (
    ckpt_dir,
    events,
    finish,
    kill_all,
    launch,
    records,
    step_values,
    train,
    workers,
)

pytestmark = pytest.mark.distributed

KILL_AT = 6  # the second save of FAST (checkpoint.every=3): step 3 is complete before it


def _kill_inside_save(run, step: int) -> dict:
    proc = launch(run, 2)
    target = ckpt_dir(run, step)
    deadline = time.monotonic() + 300
    while not target.exists():
        assert proc.poll() is None, finish(proc, (), 10).stderr[-3000:]
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.002)
    pids = workers(proc)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    state = {"stopped_with_complete": (target / "COMPLETE").exists(), "fifos": []}
    for rank in range(2):
        path = target / f"__{rank}_0.distcp"
        if not path.exists():
            os.mkfifo(path)
            state["fifos"].append(path.name)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    if state["fifos"]:
        time.sleep(1.5)  # an unblocked save would have finished (and been marked) by now
    state["blocked_alive"] = all(os.path.exists(f"/proc/{pid}") for pid in pids)
    state["complete_before_kill"] = (target / "COMPLETE").exists()
    state["metadata_before_kill"] = (target / ".metadata").exists()
    kill_all(proc, signal.SIGKILL)
    p = finish(proc, (), 60)
    state["returncode"] = p.returncode
    return state


def test_sigkill_inside_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    ref = tmp_path / "reference"
    train(ref)  # the uninterrupted run
    run = tmp_path / "run"
    st = _kill_inside_save(run, KILL_AT)
    assert not st["stopped_with_complete"] and not st["complete_before_kill"], st
    assert st["fifos"] == ["__0_0.distcp", "__1_0.distcp"], st  # both ranks blocked inside dcp.save
    assert st["blocked_alive"] and not st["metadata_before_kill"], st
    assert st["returncode"] != 0
    partial = ckpt_dir(run, KILL_AT)
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    assert all(stat.S_ISFIFO((partial / f).stat().st_mode) for f in st["fifos"])
    assert (ckpt_dir(run, 3) / "COMPLETE").exists()
    assert sorted(records(run)) == [1, 2, 3]  # the run dir has what the last complete save synced

    # Relaunch (auto-resume). Saves every 4 steps now, so step 6 is never re-saved: the partial dir
    # can only disappear by the prune of the first successful save (step 4).
    p = train(run, 2, "checkpoint.every=4")
    assert f"resumed_from={ckpt_dir(run, 3)}" in p.stdout
    starts = [e for e in events(run) if e["event"] == "start"]
    assert [e["resumed_from"] for e in starts] == ["none", str(ckpt_dir(run, 3))]  # both legs' events kept
    assert not partial.exists()
    assert [s for s in (4, 8, 12) if (ckpt_dir(run, s) / "COMPLETE").exists()] == [4, 8, 12]
    a, b = records(ref), records(run)
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert step_values(a[s]) == step_values(b[s]), f"step {s} differs from the uninterrupted run"
