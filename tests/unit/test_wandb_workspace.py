"""The W&B workspace as code (`motif_train.cli.wandb_workspace`) and the one key list it shares with
`metrics.py` (`motif_train.metric_keys`): the spec builds without a network, every panel key is a key
a real (offline) run logs, and every key the run logs is in the list."""

import ast
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from motif_train import metric_keys as mk
from motif_train.cli import wandb_workspace as wsmod
from motif_train.metrics import LoggerConfig, MetricsLogger, ProgressPlan

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SECTIONS = ["losses", "throughput", "memory", "schedule", "checkpoint", "data health", "validation", "evaluation"]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline W&B, no API key, and any attempt to save or open a socket fails the test."""
    import wandb
    import wandb_workspaces.workspaces as ws

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    home = tmp_path / "wandb_home"
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))

    def refuse(*a, **k):
        raise AssertionError("the workspace tried to reach W&B")

    real_connect = socket.socket.connect

    def local_only(sock, address):  # the offline wandb service talks over a local socket: that is fine
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            refuse()
        return real_connect(sock, address)

    for name in ("save", "save_as_new_view"):
        monkeypatch.setattr(ws.Workspace, name, refuse)
    monkeypatch.setattr(ws.internal, "upsert_view2", refuse)
    monkeypatch.setattr(wandb, "Api", refuse)
    monkeypatch.setattr(socket.socket, "connect", local_only)
    return tmp_path


def test_spec_builds_offline(no_network):
    w = wsmod.build_workspace("my-team", "motif-video", name="unit", num_prompts=3, i2v=True)
    assert [s.name for s in w.sections] == SECTIONS
    spec = wsmod.workspace_spec(w)
    json.dumps(spec)  # plain JSON data
    assert (spec["entity"], spec["project"], spec["displayName"]) == ("my-team", "motif-video", "unit")
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == SECTIONS
    by_name = {s["name"]: s["panels"] for s in sections}
    lines = [s for s in SECTIONS if s != "validation"]
    assert all(p["viewType"] == "Run History Line Plot" for s in lines for p in by_name[s])
    plotted = {m for s in lines for p in by_name[s] for m in p["config"]["metrics"]}
    assert {mk.LOSS_DENOISE, mk.LOSS_REPA, *mk.sigma_keys(4), mk.PERF_MFU, mk.PERF_TOKENS_PER_S, mk.PERF_DATA_WAIT,
            mk.MEM_PEAK_GIB, mk.SCHED_LR, mk.CURRICULUM_STAGE, mk.CHECKPOINT_BLOCKING_S, mk.DATA_SKIPPED_SAMPLES,
            mk.TRAIN_SKIPPED_STEPS} <= plotted
    (media,) = by_name["validation"]
    assert media["viewType"] == "Media Browser"
    assert media["config"]["mediaKeys"] == ["val/t2v_00", "val/t2v_01", "val/t2v_02", "val/i2v_00"]
    assert spec["spec"]["section"]["settings"]["xAxis"] == "_step"
    # evaluation: the recipe's stages' validation loss (per stage, per task, by σ bin) and motif-eval's metrics
    ev = {m for p in by_name["evaluation"] for m in p["config"]["metrics"]}
    assert {"val_loss/video-720p-121f", "val_loss/images-256px/t2v", "val_loss/video-480p-81f/81x480x832/t2v/s7",
            "eval/clip_score", "eval/fd_vjepa"} <= ev and all(mk.covers(k) for k in ev)


def test_every_panel_key_is_in_the_list(no_network):
    for kw in ({}, {"num_prompts": 1, "i2v": False}, {"num_sigma_buckets": 8}):
        keys = wsmod.panel_keys(wsmod.build_workspace("e", "p", **kw))
        assert keys and all(mk.covers(k) for k in keys), [k for k in keys if not mk.covers(k)]
    keys = wsmod.panel_keys(wsmod.build_workspace("e", "p"))
    # defaults: listed keys, or the evaluation families (known by stage / bucket names at run time)
    assert {k for k in set(keys) - set(mk.video_keys(wsmod.DEFAULT_PROMPTS))
            if mk.family_of(k) not in ("val_loss", "eval")} <= mk.LOGGED_KEYS


def test_cli_dry_run_prints_the_spec_and_save_refuses_without_network(no_network, capsys):
    assert wsmod.main(["--entity", "e", "--project", "p", "--name", "n", "--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]] == SECTIONS
    assert wsmod.main(["--entity", "e", "--project", "p"]) == 0
    assert "8 sections" in capsys.readouterr().out
    assert wsmod.main(["--entity", "e", "--project", "p", "--save"]) != 0  # WANDB_MODE=offline
    assert "needs the network" in capsys.readouterr().err


def test_save_without_api_key_exits_nonzero(no_network, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(no_network / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(no_network / "home" / ".netrc"))
    assert wsmod.main(["--entity", "e", "--project", "p", "--save"]) == 2
    assert "no W&B API key" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    env = {"WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "motif_train.cli.wandb_workspace", "--entity", "e", "--project", "p",
                          "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["project"] == "p"
    text = (ROOT / "pyproject.toml").read_text()
    assert 'motif-wandb-workspace = "motif_train.cli.wandb_workspace:main"' in text


def _trainer_like_steps(n: int) -> list[dict]:
    """log_step arguments shaped as Trainer.flush_logs passes them (losses incl. total; σ buckets + the
    trainer's running skip counts as extras)."""
    out = []
    for i in range(1, n + 1):
        denoise, repa = 1.0 / (i + 1), 0.2 / i
        out.append(dict(
            losses={"denoise": denoise, "repa": repa, "total": denoise + 0.5 * repa}, grad_norm=0.5 + 0.01 * i,
            lr=1e-4, samples=4, tokens=4 * 512, step_time=0.1, data_wait=0.01, flops=1e12, teacher_flops=1e11,
            stage=i // 4,
            extra={**{mk.sigma_name(q): 0.1 * q for q in range(1, mk.NUM_SIGMA_BUCKETS + 1)},
                   mk.TRAIN_SKIPPED_STEPS: float(i // 5), mk.DATA_SKIPPED_SAMPLES: float(i // 3)}))
    return out


def test_real_offline_run_logs_exactly_what_the_list_and_panels_name(no_network):
    """panels ⊆ logged ⊆ list: a real offline MetricsLogger run, fed like the trainer feeds it."""
    run_dir = no_network / "run"
    cfg = LoggerConfig(log_every=4, mode="offline", peak_tflops=100.0, local_dir=str(no_network / "local"))
    # the trainer passes its curriculum's steps (the stages of _trainer_like_steps: 1-3, 4-7, 8)
    logger = MetricsLogger(cfg, run_dir, rank=0, world_size=1, device=CPU, run_name="ws-unit",
                           progress=ProgressPlan.from_curriculum([3, 7, 8], 8))
    assert logger.wandb_run is not None, "offline wandb.init failed"
    logged: set[str] = set()
    real_log = logger._wandb_log

    def recording(data, step):
        logged.update(data)
        real_log(data, step)

    logger._wandb_log = recording
    # the trainer's events, with its value names (start, stage, checkpoint, skipped step, skip streak, data)
    logger.log_event(0, "start", world_size=1, total_steps=8, resumed_from="none", ac="full", ac_blocks=2,
                     compile=False, param_dtype="torch.bfloat16", reduce_dtype="torch.float32", mesh=(1, 1), cp=1)
    logger.log_event(1, "stage 0 (s)", **{mk.CURRICULUM_STAGE: 0, "repa": 1, "shift": 3.0, "routing": "off"})
    for i, v in enumerate(_trainer_like_steps(8), start=1):
        logger.log_step(i, **v)
    logger.log_event(5, "non-finite loss or gradient: step skipped", grad_norm=float("nan"), skipped=1)
    logger.log_event(6, "checkpoint not written: inside a skip streak", bad_in_a_row=1)
    logger.log_event(7, "data (rank 0): bad sample", rank=0)
    logger.log_event(8, "checkpoint", **{mk.CHECKPOINT_BLOCKING_S: 0.25})
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), np.uint8)
    for key in mk.video_keys(2, i2v=True):
        logger.log_video(8, key, frames, fps=8)
    logger.log_event(8, "validation: 3 videos", weights="ema")
    logger.close()

    assert not [k for k in logged if not mk.covers(k)], "logged keys missing from metric_keys"
    assert logged >= mk.LOGGED_KEYS, f"listed but never logged: {sorted(mk.LOGGED_KEYS - logged)}"
    panels = set(wsmod.panel_keys(wsmod.build_workspace("e", "p", num_prompts=2, i2v=True)))
    # the evaluation section's keys come from the held-out validation loss (named by the recipe's stages and
    # buckets) and motif-eval's lines: families, covered above, not logged by this synthetic trainer feed
    panels = {k for k in panels if mk.family_of(k) not in ("val_loss", "eval")}
    assert panels <= logged, f"panel keys no run logs: {sorted(panels - logged)}"
    # metrics.jsonl: the raw names the list gives
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert set(rec) == set(mk.RAW_KEYS) | {mk.loss_key(t) for t in ("denoise", "repa", "total")} | {
        mk.sigma_name(q) for q in range(1, 5)} | set(mk.TRAINER_EXTRA_KEYS) | set(mk.DERIVED_KEYS)


def test_window_and_event_names():
    assert mk.window_key("sigma_q3") == "loss/sigma_q3" and mk.window_key("tread_ratio") == "train/tread_ratio"
    assert mk.window_key("grad/clip_frac") == "grad/clip_frac"
    assert mk.event_key("stage") == "event/stage" and mk.event_key("checkpoint/blocking_s") == "checkpoint/blocking_s"
    assert mk.family_of("loss/sigma_q12") == "sigma" and mk.family_of("val/i2v_00") == "video"
    assert not mk.covers("loss/sigma_q0") and not mk.covers("perf/nope") and not mk.covers("samples/t2v_00")


# ---------------------------------------------------------------- the trainer builds some key names itself
def _source(rel: str) -> ast.Module:
    return ast.parse((ROOT / rel).read_text())


def test_trainer_and_sampling_key_literals_are_in_the_list():
    """Key strings written out in trainer.py (log_step extras, event values, the video prefix) are listed,
    and sampling.py names its requests as `metric_keys.video_keys` assumes."""
    namespaces = r"(loss|perf|mem|sched|optim|curriculum|checkpoint|train|data|event|val|grad)/"
    tree = _source("motif_train/trainer.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # f"val/{name}": a family prefix
            head = node.values[0]
            if isinstance(head, ast.Constant) and re.match(namespaces, str(head.value)):
                assert head.value == mk.VIDEO_PREFIX, ast.unparse(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                namespaces + r"[a-z0-9_]+", node.value):
            assert node.value in mk.LOGGED_KEYS, node.value
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "log_event":
            names = [k.arg for k in node.keywords if k.arg]
            names += [c.value for k in node.keywords if k.arg is None and isinstance(k.value, ast.Dict)
                      for c in k.value.keys if isinstance(c, ast.Constant)]
            for name in names:
                assert (mk.event_key(name) in mk.LOGGED_KEYS or name in mk.TRAINER_EVENT_TEXT), name
    # the start event's **parallel_info: parallelize_model's returned keys + the trainer's "cp"
    par = _source("motif_train/distributed/parallelize.py")
    (fn,) = [n for n in ast.walk(par) if isinstance(n, ast.FunctionDef) and n.name == "parallelize_model"]
    info = {c.value for r in ast.walk(fn) if isinstance(r, ast.Return) and isinstance(r.value, ast.Dict)
            for c in r.value.keys if isinstance(c, ast.Constant)} | {"cp"}
    assert info and all(mk.event_key(k) in mk.LOGGED_KEYS or k in mk.TRAINER_EVENT_TEXT for k in info), info
    sampling = (ROOT / "motif_train/sampling.py").read_text()
    if "metric_keys" not in sampling:
        assert 'f"t2v_{i:02d}"' in sampling and '"i2v_00"' in sampling
    assert mk.T2V_NAME == "t2v_{i:02d}" and mk.I2V_NAME == "i2v_00"
