"""Progress and ETA (`metrics.Progress`, `ProgressPlan`) and the predicted step time beside the measured
one (`perf/predicted_step_s`): fixed step times fed by hand (no timing dependence), including a stage
change and a resume; then a real tiny CPU run, stopped and resumed, whose metrics.jsonl is checked."""

import json
import math
import signal

import pytest
import torch

from motif_train import metric_keys as mk
from motif_train.data.curriculum import Curriculum, CurriculumConfig, StageConfig
from motif_train.distributed.cost import MEASURED_MFU, MEASURED_RECOMPUTE
from motif_train.metrics import LoggerConfig, MetricsLogger, Progress, ProgressPlan, fmt_duration, read_metrics

CPU = torch.device("cpu")
ETA_S, ETA_RUN = mk.PROGRESS_ETA_STAGE_S, mk.PROGRESS_ETA_RUN_S


def test_plan_follows_the_curriculum():
    assert ProgressPlan.from_curriculum([5, 9], 9).bounds == ((1, 5), (6, 9))
    assert ProgressPlan.from_curriculum([5, 9], 12).bounds == ((1, 5), (6, 12))  # the last stage runs on
    assert ProgressPlan.from_curriculum([5, 9, 20], 7).bounds == ((1, 5), (6, 7))  # train.steps ends it early
    assert ProgressPlan.from_curriculum([5, 9], 4).bounds == ((1, 4),)
    for total in (4, 7, 9, 12):
        cur = Curriculum(CurriculumConfig(stages=[StageConfig(steps=5), StageConfig(steps=4)]))
        plan = ProgressPlan.from_curriculum(cur.ends, total, [1.0, 2.0])
        assert all(plan.stage_of(s) == cur.index_at(s) for s in range(1, total + 1))
    with pytest.raises(ValueError, match="step_flops"):
        ProgressPlan(10, ((1, 10),), (1.0, 2.0))


def _feed(progress: Progress, steps, time_of, log_every: int) -> dict[int, dict]:
    """log_step's order: each step added, the window closed at its log step."""
    out = {}
    for s in steps:
        out[s] = progress.add(s, time_of(s))
        if s % log_every == 0:
            progress.close_window()
    return out


def test_eta_with_fixed_step_times_and_a_stage_change():
    # stage 0: steps 1-10 at 1 s (step 1: a 10 s warm-up); stage 1: steps 11-30, 4x the FLOPs per step,
    # measured at 3 s (step 11: a 7 s warm-up); a 9 s stall at step 7
    plan = ProgressPlan(30, ((1, 10), (11, 30)), (1e12, 4e12))
    times = {1: 10.0, 7: 9.0, 11: 7.0}
    rec = _feed(Progress(plan), range(1, 31), lambda s: times.get(s, 1.0 if s <= 10 else 3.0), log_every=5)

    assert [rec[s][mk.PROGRESS_STEP_OF_RUN] for s in range(1, 31)] == list(range(1, 31))
    assert {rec[s][mk.PROGRESS_RUN_STEPS] for s in rec} == {30}
    assert [rec[s][mk.PROGRESS_STAGE_STEP] for s in (1, 10, 11, 30)] == [1, 10, 1, 20]
    assert [rec[s][mk.PROGRESS_STAGE_STEPS] for s in (1, 10, 11, 30)] == [10, 10, 20, 20]
    # step 1: only the warm-up measured, so it is the estimate; stage 1 by the FLOP ratio
    assert rec[1][ETA_S] == 9 * 10.0 and rec[1][ETA_RUN] == 9 * 10.0 + 20 * 10.0 * 4
    # then the warm-up is left out: steps 2..5 at 1 s
    assert rec[5][ETA_S] == 5 * 1.0 and rec[5][ETA_RUN] == 5 + 20 * 4.0
    # window 6-10 holds the stall (mean 2.6); the estimate is the median of the windows (1.0, 2.6) = 1.8
    assert rec[8][ETA_S] == pytest.approx(2 * (1.0 + (1 + 9 + 1) / 3) / 2)
    assert rec[10][ETA_S] == 0 and rec[10][ETA_RUN] == pytest.approx(20 * 1.8 * 4)
    # the new stage starts from its own measurement: the warm-up alone, then its steps at 3 s
    assert rec[11][ETA_S] == 19 * 7.0 == rec[11][ETA_RUN]
    assert rec[12][ETA_S] == 18 * 3.0 == rec[12][ETA_RUN]
    assert rec[30][ETA_S] == 0 == rec[30][ETA_RUN]
    assert all(rec[s][ETA_RUN] >= rec[s][ETA_S] >= 0 for s in rec)


def test_median_of_the_last_windows_forgets_old_ones():
    plan = ProgressPlan(100, ((1, 100),))
    prog = Progress(plan, windows=3)
    rec = _feed(prog, range(1, 41), lambda s: 2.0 if s <= 20 else 1.0, log_every=5)
    assert rec[20][ETA_S] == 80 * 2.0
    assert prog.sec_per_step(0) == 1.0 and rec[40][ETA_S] == 60 * 1.0  # windows 26-30, 31-35, 36-40
    assert rec[22][ETA_S] == 78 * 2.0  # windows (2, 2, 2) + the open one (1): median of the last 3 is 2


def test_resume_continues_the_steps_and_restarts_the_estimate():
    plan = ProgressPlan(20, ((1, 10), (11, 20)), (1.0, 1.0))
    before = _feed(Progress(plan), range(1, 9), lambda s: 1.0, log_every=4)
    assert before[8][ETA_S] == 2 * 1.0
    # a new process resumes after step 8 (restore time is not a step: its first step is measured as it
    # ran, e.g. 5 s with compile) on slower hardware (2 s/step): nothing of the old 1 s/step is used
    after = _feed(Progress(plan), range(9, 21), lambda s: 5.0 if s == 9 else 2.0, log_every=4)
    assert after[9][mk.PROGRESS_STEP_OF_RUN] == 9 and after[9][mk.PROGRESS_STAGE_STEP] == 9
    assert after[9][ETA_S] == 1 * 5.0 and after[9][ETA_RUN] == 5.0 + 10 * 5.0
    assert after[10][ETA_S] == 0 and after[10][ETA_RUN] == 10 * 2.0
    assert after[11][mk.PROGRESS_STAGE_STEP] == 1 and after[11][ETA_S] == 9 * 2.0  # stage 1's warm-up: 2 s
    assert after[20][ETA_RUN] == 0


def test_later_stages_without_a_flop_figure_take_the_current_rate():
    plan = ProgressPlan(30, ((1, 10), (11, 20), (21, 30)), (2e12, None, 6e12))
    rec = _feed(Progress(plan), range(1, 4), lambda s: 1.5, log_every=10)
    assert rec[3][ETA_S] == 7 * 1.5 and rec[3][ETA_RUN] == 7 * 1.5 + 10 * 1.5 + 10 * 1.5 * 3


def testfmt_duration():
    assert [fmt_duration(s) for s in (0, 42.4, 725, 8 * 3600 + 26 * 60 + 10, 34 * 3600 + 59, math.nan)] == [
        "0s", "42s", "12m05s", "8h26m", "1d10h", "n/a"]


def _step(i: int, stage: int) -> dict:
    return dict(losses={"denoise": 1.0 / i, "total": 1.0 / i}, grad_norm=1.0, lr=1e-4, samples=4, tokens=4096,
                step_time=2.0 if i == 1 else 0.5 + 0.01 * i, data_wait=0.01, flops=3e14 * (1 + stage),
                teacher_flops=0.0, stage=stage)


def test_logger_records_windows_and_console(tmp_path, capsys):
    plan = ProgressPlan.from_curriculum([6, 10], 10)
    cfg = LoggerConfig(log_every=4, wandb=False, peak_tflops=500.0, local_dir=str(tmp_path / "local"))
    logger = MetricsLogger(cfg, tmp_path / "run", rank=0, world_size=2, device=CPU, run_name="p", progress=plan)
    windows = {}
    for i in range(1, 11):
        out = logger.log_step(i, **_step(i, 0 if i <= 6 else 1))
        if out is not None:
            windows[i] = (out, logger.last_line)
    logger.close()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for r in recs:  # each record: the FLOP model's s/step of its own FLOPs per rank
        pred = r["flops"] / 2 / (500e12 * MEASURED_MFU)
        assert r[mk.PERF_PREDICTED_STEP_S] == pytest.approx(pred, rel=1e-12)
        assert r[mk.PERF_STEP_TIME_REL_ERROR] == pytest.approx(r["step_time"] / pred - 1, rel=1e-12)
    assert [r[mk.PROGRESS_STAGE_STEP] for r in recs] == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]
    w, line = windows[8]
    steps = [_step(i, 0 if i <= 6 else 1) for i in range(5, 9)]
    step_s = sum(v["step_time"] for v in steps) / 4
    pred = sum(v["flops"] for v in steps) / 4 / 2 / (500e12 * MEASURED_MFU)
    assert w[mk.PERF_STEP_TIME] == pytest.approx(step_s) and w[mk.PERF_PREDICTED_STEP_S] == pytest.approx(pred)
    assert w[mk.PERF_STEP_TIME_REL_ERROR] == pytest.approx(step_s / pred - 1)
    # a window's progress is its last step's, as written in that step's record
    assert {k: w[k] for k in mk.PROGRESS_KEYS} == {k: recs[7][k] for k in mk.PROGRESS_KEYS}
    assert "train/eta_run_s" not in w and "progress/eta_run_s" in w  # not averaged as an extra
    assert line.startswith("step 8/10 (stage 1: 2/4) | loss ")
    assert f"| {step_s:.3g} s/step (pred {pred:.3g}) | ETA stage " in line
    assert line.endswith(f"run {fmt_duration(w[ETA_RUN])}")
    assert "no bf16 peak" not in capsys.readouterr().out


def test_unknown_peak_leaves_the_prediction_out_and_says_so_once(tmp_path, capsys):
    logger = MetricsLogger(LoggerConfig(log_every=2, wandb=False, local_dir=str(tmp_path / "local")), tmp_path / "run",
                           rank=0, world_size=1, device=CPU, run_name="q")
    outs = [logger.log_step(i, **_step(i, 0)) for i in range(1, 7)]
    logger.close()
    for w in outs[1::2]:
        assert w[mk.PERF_PREDICTED_STEP_S] is None and w[mk.PERF_MFU] is None  # None: not sent to W&B
        assert not any(k.startswith("progress/") for k in w)  # no plan given: no progress keys
    assert "(pred" not in logger.last_line and "ETA" not in logger.last_line and " s/step" in logger.last_line
    assert logger.last_line.startswith("step     6 | stage 0 | loss ")
    assert capsys.readouterr().out.count("no bf16 peak known for device cpu") == 1
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert not mk.DERIVED_KEYS & set(rec)


# ------------------------------------------------------------------ a real tiny CPU run, stopped and resumed
def _run(run_dir, local_dir, *extra: str):
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config
    from motif_train.trainer import Trainer

    overrides = ["experiment=tiny_cpu", "data=synthetic", "logger.wandb=false", f"run_dir={run_dir}",
                 f"logger.local_dir={local_dir}", "curriculum.stages.0.steps=4", "curriculum.stages.1.steps=3",
                 "logger.log_every=3", "logger.peak_tflops=1.0", "checkpoint.every=0", "eval.every=0",
                 "eval.at_end=false", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_train_config(compose(config_name="train", overrides=overrides))
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    return trainer


def test_real_run_logs_consistent_progress(tmp_path):
    import torch.distributed as dist

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        first = _run(tmp_path / "run", tmp_path / "local", "train.stop_at=3")  # stops, saves at step 3
        again = _run(tmp_path / "run", tmp_path / "local")  # resumes: steps 4..7 (stage 1 from step 5)
    finally:
        dist.destroy_process_group()
        for s, h in handlers.items():
            signal.signal(s, h)
    assert first.step == 3 and again.step == 7
    plan = again.metrics.progress.plan
    assert plan.bounds == ((1, 4), (5, 7)) and all(f > 0 for f in plan.step_flops)
    ratio = plan.step_flops[1] / plan.step_flops[0]
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))  # the stop was at a flush: nothing repeated
    rec = {r["step"]: r for r in lines}
    assert [rec[s][mk.PROGRESS_STEP_OF_RUN] for s in rec] == list(range(1, 8))
    assert {rec[s][mk.PROGRESS_RUN_STEPS] for s in rec} == {7}
    assert [rec[s][mk.PROGRESS_STAGE_STEP] for s in rec] == [1, 2, 3, 4, 1, 2, 3]
    assert [rec[s][mk.PROGRESS_STAGE_STEPS] for s in rec] == [4] * 4 + [3] * 3
    assert all(rec[s][ETA_RUN] >= rec[s][ETA_S] >= 0 for s in rec)
    assert rec[4][ETA_S] == 0 and rec[7][ETA_S] == 0 == rec[7][ETA_RUN]
    t = {s: rec[s]["step_time"] for s in rec}
    # the first process: step 1 alone is its estimate; later stages by the FLOP ratio
    assert rec[1][ETA_S] == pytest.approx(3 * t[1]) and rec[1][ETA_RUN] == pytest.approx(3 * t[1] + 3 * t[1] * ratio)
    assert rec[3][ETA_S] == pytest.approx((t[2] + t[3]) / 2)  # the warm-up step 1 left out
    # the resumed process starts afresh: step 4 is its first (its only measurement of stage 0)
    assert rec[4][ETA_RUN] == pytest.approx(3 * t[4] * ratio)
    assert rec[5][ETA_S] == pytest.approx(2 * t[5]) == pytest.approx(rec[5][ETA_RUN])  # stage 1's warm-up
    assert rec[6][ETA_S] == pytest.approx(t[6])
    for r in lines:  # logger.peak_tflops=1.0, world size 1, parallel.ac=none: no recompute (the MFU run's was 1.293x)
        pred = r["flops"] / MEASURED_RECOMPUTE / (1.0e12 * MEASURED_MFU)
        assert r[mk.PERF_PREDICTED_STEP_S] == pytest.approx(pred, rel=1e-12)
        assert r[mk.PERF_STEP_TIME_REL_ERROR] == pytest.approx(r["step_time"] / pred - 1, rel=1e-9)
    assert again.last_window[mk.PROGRESS_STEP_OF_RUN] == 6  # the window at step 6 (7: closed by close())
    assert again.metrics.last_line.startswith("step 7/7 (stage 1: 3/3) | loss ")
