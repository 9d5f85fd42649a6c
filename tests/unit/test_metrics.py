"""MetricsLogger (console, metrics.jsonl / events.jsonl buffered locally and synced whole, offline
W&B, loss plot), peak TFLOP/s table, Profiler."""

import json
import math
import os
import resource
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from motif_train.distributed.cost import MEASURED_MFU
from motif_train.metrics import (
    LoggerConfig,
    MetricsLogger,
    Profiler,
    default_local_dir,
    match_device_name,
    peak_tflops,
    read_metrics,
)

CPU = torch.device("cpu")


def step_values(i: int) -> dict:
    samples = 4 + i % 3
    denoise, repa = 1.0 / (i + 2), -0.1 * i / 7
    return dict(
        losses={"denoise": denoise, "repa": repa, "total": denoise + 0.5 * repa},
        grad_norm=0.1 * i + 1 / 3, lr=1e-4 * i / 25, samples=samples, tokens=samples * 1234,
        step_time=0.5 + 0.013 * i, data_wait=0.007 * (i % 5), flops=1.1e12 * i, teacher_flops=0.2e12 * (i % 2),
        stage=1 + i // 15,
        extra={"sigma_q1": 0.9 / i, "sigma_q2": 0.7 / i, "sigma_q3": 0.5 / i, "sigma_q4": 0.3 / i,
               "tread_ratio": 0.5, "grad/clip_frac": 0.25},
    )


def test_log_25_steps_offline(wandb_env, capsys):
    run_dir = wandb_env / "run"
    cfg = LoggerConfig(log_every=10, mode="offline", peak_tflops=100.0, tags=["unit"],
                       local_dir=str(wandb_env / "local"))
    logger = MetricsLogger(cfg, run_dir, rank=0, world_size=2, device=CPU, run_name="unit", config={"a": 1})
    assert logger.wandb_run is not None, "offline wandb.init failed"
    # W&B writes on the local disk; its files are copied to <run_dir>/wandb/<leg> at syncs (test_wandb_files.py)
    assert logger.wandb_dir is not None and logger.wandb_dir.parent == run_dir / "wandb"
    assert logger.wandb_local_dir == wandb_env / "local" / "wandb" / logger.wandb_dir.name
    assert logger.wandb_dir.name.startswith("offline-run-")

    windows = {}
    for i in range(1, 26):
        out = logger.log_step(i, **step_values(i))
        if out is not None:
            windows[i] = out
    assert sorted(windows) == [10, 20]

    # nothing in the run dir until a sync (a checkpoint / exit); the local copy has every step
    assert not (run_dir / "metrics.jsonl").exists()
    assert len((wandb_env / "local" / "metrics.jsonl").read_text().splitlines()) == 25
    assert logger.sync()

    # metrics.jsonl: one line per step with the exact raw values
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 25
    for i, line in enumerate(lines, start=1):
        rec, v = json.loads(line), step_values(i)
        assert rec["step"] == i and rec["stage"] == v["stage"]
        for k, x in v["losses"].items():
            assert rec[f"loss/{k}"] == x
        for k in ("grad_norm", "lr", "samples", "tokens", "step_time", "data_wait", "flops", "teacher_flops"):
            assert rec[k] == v[k], k
        for k, x in v["extra"].items():
            assert rec[k] == x

    # the window ending at step 20 covers steps 11..20
    w, vals = windows[20], [step_values(i) for i in range(11, 21)]
    time_sum = sum(v["step_time"] for v in vals)
    assert w["perf/samples_per_s"] == pytest.approx(sum(v["samples"] for v in vals) / time_sum, rel=1e-12)
    assert w["perf/tokens_per_s"] == pytest.approx(sum(v["tokens"] for v in vals) / time_sum, rel=1e-12)
    assert w["perf/data_wait"] == pytest.approx(sum(v["data_wait"] for v in vals) / time_sum, rel=1e-12)
    assert w["perf/step_time"] == pytest.approx(time_sum / 10, rel=1e-12)
    flops_per_s = sum(v["flops"] for v in vals) / time_sum
    assert w["perf/mfu"] == pytest.approx(flops_per_s / (100e12 * 2), rel=1e-12)  # model FLOPs only
    # the FLOP model's s/step beside the measured one: model FLOPs per step and rank at the measured MFU
    pred = sum(v["flops"] for v in vals) / 10 / 2 / (100e12 * MEASURED_MFU)
    assert w["perf/predicted_step_s"] == pytest.approx(pred, rel=1e-12)
    assert w["perf/step_time_rel_error"] == pytest.approx(time_sum / 10 / pred - 1, rel=1e-12)
    teacher = sum(v["teacher_flops"] for v in vals)
    assert w["perf/teacher_flops_share"] == pytest.approx(teacher / (teacher + sum(v["flops"] for v in vals)),
                                                          rel=1e-12)
    assert "train/teacher_flops" not in w  # a raw count, not a mean
    assert w["loss/denoise"] == pytest.approx(sum(v["losses"]["denoise"] for v in vals) / 10, rel=1e-12)
    assert w["loss/total"] == pytest.approx(sum(v["losses"]["total"] for v in vals) / 10, rel=1e-12)
    assert w["loss/sigma_q3"] == pytest.approx(sum(v["extra"]["sigma_q3"] for v in vals) / 10, rel=1e-12)
    assert w["train/tread_ratio"] == 0.5 and w["grad/clip_frac"] == 0.25
    assert w["sched/lr"] == vals[-1]["lr"] and w["curriculum/stage"] == vals[-1]["stage"]
    assert w["optim/grad_norm"] == pytest.approx(sum(v["grad_norm"] for v in vals) / 10, rel=1e-12)
    assert w["mem/peak_gib"] > 0

    # one console line per window with step, loss and lr
    line = logger.last_line
    assert line.startswith("step    20 | stage 2 | loss ")  # no ProgressPlan given: no total, no ETA
    assert f"| {time_sum / 10:.3g} s/step (pred {pred:.3g})" in line and "ETA" not in line
    assert f"loss {w['loss/total']:.4f} (denoise {w['loss/denoise']:.4f} repa {w['loss/repa']:.4f})" in line
    assert f"lr {vals[-1]['lr']:.2e}" in line and f"mfu {100 * w['perf/mfu']:.1f}%" in line
    assert "(rss)" in line
    assert line in capsys.readouterr().out

    logger.log_event(25, "stage change", stage=2, **{"checkpoint/blocking_s": 0.5})
    assert not (run_dir / "events.jsonl").exists()
    logger.sync()
    events = [json.loads(s) for s in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events == [{"step": 25, "event": "stage change", "stage": 2, "checkpoint/blocking_s": 0.5}]
    assert "stage change" in capsys.readouterr().out

    logger.log_video(25, "val/sample", np.random.default_rng(0).integers(0, 255, (4, 17, 18, 3), np.uint8), fps=8)
    assert (wandb_env / "local" / "media" / "val_sample_step25.mp4").stat().st_size > 0  # encoded locally
    assert not (run_dir / "media").exists()

    png = logger.close()  # flushes the open window 21..25
    assert "step    25" in logger.last_line
    assert png == run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert logger.close() is None  # idempotent

    # the offline run's transaction log, copied to the run dir by close() after finish + teardown (finish
    # can return before the service has flushed the file), holds the namespaced history keys
    (wandb_file,) = logger.wandb_dir.glob("run-*.wandb")
    blob = wandb_file.read_bytes()
    assert blob == (logger.wandb_local_dir / wandb_file.name).read_bytes()
    assert list((logger.wandb_dir / "files" / "media" / "videos").rglob("*.mp4"))  # W&B's media copy
    for key in (b"loss/denoise", b"loss/sigma_q1", b"perf/mfu", b"perf/predicted_step_s", b"sched/lr", b"event/stage",
                b"val/sample"):
        assert key in blob, key
    assert logger.wandb_dir.name.endswith(logger.wandb_id)

    # a second logger in the same run dir (a resume) continues the same W&B run id
    again = MetricsLogger(cfg, run_dir, rank=0, world_size=2, device=CPU, run_name="unit", resume_step=25)
    assert again.wandb_id == logger.wandb_id == (run_dir / "wandb_id.txt").read_text().strip()
    assert again.wandb_run.id == logger.wandb_id
    again.close()


def test_rank1_writes_nothing(wandb_env):
    run_dir = wandb_env / "rank1"
    logger = MetricsLogger(LoggerConfig(mode="offline"), run_dir, rank=1, world_size=2, device=CPU, run_name="r1")
    for i in range(1, 12):
        assert logger.log_step(i, **step_values(i)) is None
    logger.log_event(11, "nothing")
    assert logger.close() is None
    assert logger.wandb_run is None and not run_dir.exists()


def test_no_wandb_no_steps_and_cpu_mfu(wandb_env):
    run_dir = wandb_env / "quiet"
    logger = MetricsLogger(LoggerConfig(wandb=False, log_every=2), run_dir, rank=0, world_size=1, device=CPU,
                           run_name="q")
    assert logger.wandb_run is None and logger.peak is None
    assert logger.close() is None and not (run_dir / "loss.png").exists()
    assert not (run_dir / "wandb").exists()

    logger = MetricsLogger(LoggerConfig(mode="disabled", log_every=2), run_dir, rank=0, world_size=1, device=CPU,
                           run_name="q")
    assert logger.wandb_run is None
    assert logger.log_step(1, **step_values(1)) is None
    out = logger.log_step(2, **step_values(2))
    assert out["perf/mfu"] is None and "mfu n/a" in logger.last_line
    assert out["perf/predicted_step_s"] is None and "(pred" not in logger.last_line  # no peak on a CPU
    logger.log_video(2, "val/x", np.zeros((2, 4, 4, 3), np.uint8), fps=4)  # no-op without W&B
    assert logger.close() == run_dir / "loss.png"


def test_wandb_init_failure_warns_and_continues(wandb_env, monkeypatch, capsys):
    import wandb

    def boom(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="no network"):
        logger = MetricsLogger(LoggerConfig(mode="online"), wandb_env / "fail", rank=0, world_size=1, device=CPU,
                               run_name="f")
    assert logger.wandb_run is None and "no network" in capsys.readouterr().out
    assert logger.log_step(10, **step_values(10)) is not None
    logger.close()


def test_read_metrics_last_line_wins_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss/denoise": v}) + "\n"
                            for s, v in [(1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0), (3, float("nan"))]))
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["loss/denoise"] == 20.0 and math.isnan(recs[2]["loss/denoise"])


def test_logger_config_validation(monkeypatch):
    with pytest.raises(ValueError, match="logger.mode"):
        LoggerConfig(mode="cloud")
    with pytest.raises(ValueError, match="logger.log_every"):
        LoggerConfig(log_every=0)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert LoggerConfig().resolved_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert LoggerConfig().resolved_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert LoggerConfig().resolved_mode() == "offline"
    assert LoggerConfig(mode="disabled").resolved_mode() == "disabled"


def test_peak_tflops(monkeypatch):
    assert match_device_name("NVIDIA H100 PCIe") == 756
    assert match_device_name("NVIDIA H100 80GB HBM3") == 989
    assert match_device_name("NVIDIA H100 NVL") == 835
    assert match_device_name("NVIDIA H200") == 989
    assert match_device_name("NVIDIA GH200 480GB") == 989
    assert match_device_name("NVIDIA A100-SXM4-80GB") == 312
    assert match_device_name("NVIDIA L40S") == 362
    assert match_device_name("NVIDIA B200") == 2250
    assert match_device_name("Some Future GPU") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0)) == 756
    assert peak_tflops("cuda", override=500.0) == 500.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops("cuda") == 989
    assert peak_tflops("cpu") is None
    assert peak_tflops(CPU, override=1.5) == 1.5


def test_profiler_cpu_trace(tmp_path):
    x = torch.randn(64, 64)
    with Profiler([2, 3], tmp_path, CPU) as prof:
        assert not prof.active
        for step in range(1, 6):
            (x @ x).sum()
            prof.step(step)
            assert prof.active == (step in (1, 2)), step
    trace = tmp_path / "profile" / "trace_steps_2-3.json"
    assert prof.trace_path == trace and "traceEvents" in trace.read_text()

    with Profiler([1, 1], tmp_path / "first", CPU, rank=1, world_size=2, ranks=[1]) as prof:
        assert prof.active  # step 1 is the first step: started on entry
        (x @ x).sum()
        prof.step(1)
    assert (tmp_path / "first" / "profile" / "trace_steps_1-1_rank1.json").exists()

    with Profiler(None, tmp_path / "none", CPU) as prof:
        prof.step(1)
    assert not (tmp_path / "none").exists()
    for bad in ([3, 2], [0, 1], [1, 2, 3], [1]):
        with pytest.raises(ValueError, match="profile.steps"):
            Profiler(bad, tmp_path, CPU)


def _quiet(tmp_path, name="run", **kw) -> MetricsLogger:
    cfg = LoggerConfig(wandb=False, log_every=1000, local_dir=str(tmp_path / f"{name}_local"), **kw)
    return MetricsLogger(cfg, tmp_path / name, rank=0, world_size=1, device=CPU, run_name=name)


def test_resume_keeps_the_earlier_lines(tmp_path):
    first = _quiet(tmp_path)
    for i in range(1, 6):
        first.log_step(i, **step_values(i))
    first.log_event(5, "checkpoint")
    first.sync()
    for i in (6, 7):  # logged after the last sync, then the process dies: lost with the local copy
        first.log_step(i, **step_values(i))
    # the resumed leg (a fresh local dir, e.g. another node) starts from the run dir's copy
    cfg = LoggerConfig(wandb=False, log_every=1000, local_dir=str(tmp_path / "other_node"))
    again = MetricsLogger(cfg, tmp_path / "run", rank=0, world_size=1, device=CPU, run_name="run", resume_step=5)
    for i in range(6, 9):
        again.log_step(i, **step_values(i))
    again.log_event(8, "end")
    again.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 9))
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events == ["checkpoint", "end"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0  # plotted from the local copy


def test_default_local_dir_is_unique_per_run_dir(tmp_path):
    a, b = default_local_dir(tmp_path / "x" / "run"), default_local_dir(tmp_path / "y" / "run")
    assert a != b and a.name.startswith("run-") and a == default_local_dir(tmp_path / "x" / "run")
    assert str(a).startswith(str(Path(tempfile.gettempdir()) / "motif_metrics"))


def test_unusable_local_dir_warns_once_and_keeps_every_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="unusable") as caught:
        cfg = LoggerConfig(wandb=False, log_every=2, local_dir=str(blocker))
        logger = MetricsLogger(cfg, tmp_path / "run", rank=0, world_size=1, device=CPU, run_name="r")
        for i in range(1, 5):
            logger.log_step(i, **step_values(i))
        logger.log_event(4, "still training")
        assert logger.sync()
    assert len([w for w in caught if "unusable" in str(w.message)]) == 1  # once, not per file or line
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    logger.close()


def test_sync_failure_warns_once_and_recovers(tmp_path):
    logger = _quiet(tmp_path)
    (tmp_path / "run" / "metrics.jsonl").mkdir()  # the run dir refuses the file: a real rename failure
    with pytest.warns(RuntimeWarning, match="syncing") as caught:
        for i in range(1, 4):
            logger.log_step(i, **step_values(i))
            assert logger.sync() is False  # never raises
    assert len(caught) == 1
    (tmp_path / "run" / "metrics.jsonl").rmdir()
    assert logger.sync()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_local_write_failure_mid_run_keeps_every_line(tmp_path):
    """A real write error on the open local copy (RLIMIT_FSIZE: EFBIG), not a mock."""
    logger = _quiet(tmp_path)
    for i in range(1, 3):
        logger.log_step(i, **step_values(i))
    logger.sync()
    size = (tmp_path / "run_local" / "metrics.jsonl").stat().st_size
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, old_limit[1]))
        with pytest.warns(RuntimeWarning, match="writing .* failed"):
            for i in range(3, 7):
                logger.log_step(i, **step_values(i))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert logger.sync()  # rebuilt from the run dir's copy + the lines since the last sync
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))
    logger.close()
    assert os.path.getsize(tmp_path / "run" / "metrics.jsonl") > size
