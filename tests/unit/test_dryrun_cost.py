"""The dry run as the run's calculator (motif_train/dryrun.py, distributed/cost.py, distributed/memory_model.py):
context parallelism applied (tokens per rank, activations, all-to-all buffers, plan over the data-parallel
ranks), per-stage steps / time and the run's GPU-hours, checkpoints and cost by hand, a recommendation that
the dry run verified, and the shortcuts that make it fast checked against the slow way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from motif_train import dryrun
from motif_train.cli import dryrun as cli
from motif_train.distributed import cost
from motif_train.distributed.memory_model import GIB, FakeModel, PeakMemTracker
from motif_train.distributed.mesh import build_mesh
from motif_train.models.config import RoutingConfig
from motif_train.models.flops import latent_shape, model_flops

from .test_dryrun import motif_plan_steps, write_manifest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=tiny_cpu", "data=synthetic", "parallel=fsdp", "parallel.ac=selective",
        "curriculum.stages.1.global_batch=2"]


def _cfg(tmp: Path, world: int, cp: int, *extra: str):
    return cli.compose([*TINY, f"parallel.simulate_world={world}", f"parallel.simulate_local={world}",
                        f"parallel.cp={cp}", f"run_dir={tmp}", *extra])


@pytest.fixture(scope="module")
def cp_reports(tmp_path_factory):
    """Stage 1 (9x96x128, batch 2 per data-parallel rank) at world 1 / cp 1 and world 2 / cp 2."""
    out = {}
    for world, cp in ((1, 1), (2, 2)):
        tmp = tmp_path_factory.mktemp(f"cp{cp}")
        out[cp] = dryrun.run(_cfg(tmp, world, cp), trainer=False, stages=[1], advise=False)
    return out


def test_cp_splits_tokens_activations_and_shows_the_all_to_alls(cp_reports):
    one, two = cp_reports[1]["steps"][0], cp_reports[2]["steps"][0]
    assert one["batch"] == two["batch"] == 2 and one["cp"] == 1 and two["cp"] == 2
    assert two["video_tokens_per_rank"] * 2 == one["video_tokens_per_rank"] == 2 * 144
    # text / image context is replicated on every CP rank: the rest of the tokens stays
    ctx = [r["tokens_per_rank"] - r["video_tokens_per_rank"] for r in (one, two)]
    assert ctx[0] == ctx[1]
    m1, m2 = one["memory_gib"], two["memory_gib"]
    assert m2["activations"] < 0.75 * m1["activations"]  # video activations halve, the context's do not
    assert m2["params"] < 0.7 * m1["params"]  # FSDP shards over dp_shard x cp
    assert m1["cp_buffers"] == 0 and one["comm_bytes"] == 0
    # one joint attention's q, k, v all-to-all buffers: send + receive of (B, N/cp, D) fp32
    assert m2["cp_buffers"] * GIB == 6 * 2 * 72 * 32 * 4
    assert two["comm_bytes"] > 0 and two["flops"] * 2 == pytest.approx(one["flops"])
    assert cp_reports[2]["checks"]["mesh"] == [2] and cp_reports[2]["checks"]["dp_world"] == 1


def test_a_stage_that_does_not_fit_at_cp1_fits_at_cp2(cp_reports, tmp_path):
    p1, p2 = (cp_reports[c]["steps"][0]["memory_gib"]["peak"] for c in (1, 2))
    limit = (p1 + p2) / 2
    reps = [dryrun.run(_cfg(tmp_path, w, c, f"parallel.gpu_memory_gib={limit}"), trainer=False, stages=[1],
                       advise=False) for w, c in ((1, 1), (2, 2))]
    assert not reps[0]["fits"] and "parallel.cp=1" in reps[0]["error"]
    assert reps[1]["fits"]


def test_recommendation_is_traced_and_holds(tmp_path):
    """World 2 on shards (the token budget is per data-parallel rank, so cp=2 halves a GPU's tokens): at a
    limit between the cp=1 and cp=2 peaks the dry run recommends overrides, and a dry run with them fits at
    the peak the recommendation reported."""
    root = write_manifest(tmp_path, {(9, 64, 96): 40, (5, 96, 64): 40, (9, 96, 128): 40})
    base = ["data=shards", f"data.root={root}", "curriculum.stages.1.token_budget=288"]
    peaks = [dryrun.run(_cfg(tmp_path, 2, c, *base), trainer=False, stages=[1], advise=False)["steps"][0]
             for c in (1, 2)]
    assert peaks[1]["video_tokens_per_rank"] * 2 == peaks[0]["video_tokens_per_rank"]
    limit = f"parallel.gpu_memory_gib={(peaks[0]['memory_gib']['peak'] + peaks[1]['memory_gib']['peak']) / 2}"
    rep = dryrun.run(_cfg(tmp_path, 2, 1, *base, limit), trainer=False, stages=[1])
    rec = rep["steps"][0]["recommendation"]
    assert not rep["fits"] and rec["fits"] and rec["tried"][-1]["fits"]
    assert all(not t["fits"] for t in rec["tried"][:-1])
    assert "the dry run found" in rep["error"] and " ".join(rec["overrides"]) in rep["error"]
    again = dryrun.run(_cfg(tmp_path, 2, 1, *base, limit, *rec["overrides"]), trainer=False, stages=[1])
    assert again["fits"] and again["steps"][0]["memory_gib"]["peak"] == pytest.approx(rec["peak_gib"])
    cli.render(rep, Console(file=open(tmp_path / "out.txt", "w"), width=200))
    assert "the dry run traced" in (tmp_path / "out.txt").read_text()


def test_plan_steps_at_cp2_are_motif_plans_over_the_data_parallel_ranks(tmp_path):
    root = write_manifest(tmp_path, {(9, 64, 96): 700, (5, 96, 64): 333, (9, 96, 128): 257})
    cfg = cli.compose([*TINY, "parallel=hsdp", "parallel.simulate_world=64", "parallel.simulate_local=8",
                       "parallel.cp=2", "data=shards", f"data.root={root}", f"run_dir={tmp_path}"])
    checks, _ = dryrun.check(cfg)
    want = motif_plan_steps(root, 32)
    assert checks["plan_steps"] == want and checks["dp_world"] == 32
    assert checks["mesh"] == [8, 8] and checks["mesh_dims"] == ["dp_replicate", "dp_shard x cp"]


def test_time_and_cost_by_hand(cp_reports, tmp_path):
    """Stage 1 at cp 1: one bucket, batch 2, I2V share 0.5, no REPA; the run at $2 / GPU-hour."""
    rep = dryrun.run(_cfg(tmp_path, 1, 1), trainer=False, stages=[1], advise=False, usd_per_gpu_hour=2.0)
    cfg = _cfg(tmp_path, 1, 1)
    dit = cfg.model.dit_config()
    st = cfg.curriculum.stages[1]
    lat = latent_shape(9, 96, 128)
    t2v = model_flops(dit, lat, text_len=16, routing=st.routing).total
    i2v = model_flops(dit, lat, text_len=16, image_len=16, routing=st.routing).total
    rec = cost.AC_RECOMPUTE[32760][cfg.parallel.ac] if cfg.parallel.ac != "every_k" else None
    want = 2 * (0.5 * t2v + 0.5 * i2v) * rec / 1.293 / (989.0e12 * 0.364)
    s1 = rep["stages"][1]
    assert s1["step_s"] == pytest.approx(want, rel=1e-9) and s1["steps"] == 12
    assert s1["wall_s"] == pytest.approx(12 * want)
    run = rep["run"]
    assert run["wall_s"] == pytest.approx(sum(s["wall_s"] for s in rep["stages"]))
    assert run["gpu_hours"] == pytest.approx(run["wall_s"] / 3600) and run["usd"] == pytest.approx(2 * run["gpu_hours"])
    assert run["checkpoints"] == 4 and run["checkpoints_kept"] == 3  # every 6 of 24 steps, keep_last 3
    assert run["checkpoint_gib"] * GIB == 4 * run["params"] + 12 * run["trainable_params"]  # params + m, v, EMA
    assert run["storage_gib"] == pytest.approx(3 * run["checkpoint_gib"])


def test_step_peak_is_the_whole_step_trace_and_i2v_covers_t2v(tmp_path):
    """The dry run traces forward + backward per stage and the clip + AdamW step once: the larger of the two
    is within 2 % of tracing the whole step in one go (it leaves out the loss and the inputs, which a
    whole-step trace still holds while the optimizer runs); I2V's peak is T2V's or more (one trace per stage)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    cfg = _cfg(tmp_path, 1, 1)
    kw = dict(latent=latent_shape(9, 96, 128), batch=2, text_len=16, routing=RoutingConfig(ratio=0.0), repa=False)
    with dryrun.fake_world(1, 1, 0) as info:
        fake = FakeModel(cfg, build_mesh(cfg.parallel, info))
        derived = fake.step_peak(image_len=0, **kw)["tracker_peak"]
        i2v = fake.step_peak(image_len=16, **kw)["tracker_peak"]
        c = fake.config
        peaks = {}
        for cls in (FSDPMemTracker, PeakMemTracker):
            with fake.mode:
                x = torch.randn(2, c.in_channels, *kw["latent"])
                target, t = torch.randn(2, c.out_channels, *kw["latent"]), torch.rand(2) * 1000
                txt = torch.randn(2, 16, c.text_embed_dim)
                tracker = cls(fake.model, fake.optimizer)
                tracker.track_inputs((x, target, t, txt))
                with tracker:
                    loss = (fake.model(x, t, txt).sample.float() - target).pow(2).mean()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(fake.model.parameters(), 1.0)
                    fake.optimizer.step()
                    fake.optimizer.zero_grad(set_to_none=True)
                peaks[cls] = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"] / GIB
    assert peaks[FSDPMemTracker] == peaks[PeakMemTracker]  # the fast tracker's peak is the stock one's
    assert derived == pytest.approx(peaks[FSDPMemTracker], rel=0.02)
    assert i2v >= derived


def test_recompute_factor_and_durations():
    assert cost.recompute_factor("full", 32760) == 1.293 and cost.recompute_factor("selective", 114080) == 1.017
    assert cost.recompute_factor("selective", 4000) == 1.054  # nearest measured clip: 480p
    assert cost.recompute_factor("every_k", 32760, 2) == pytest.approx(1 + 0.293 / 2)
    assert cost.predicted_step_s(989e12 * 0.364) == pytest.approx(1.0)  # AC full: the measured run's setting
    assert cost.checkpoint_count(24, 6) == 4 and cost.checkpoint_count(25, 6) == 5 and cost.checkpoint_count(9, 0) == 1
    from motif_train.metrics import fmt_duration

    assert [fmt_duration(s) for s in (41, 725, 19200, 360000)] == ["41s", "12m05s", "5h20m", "4d04h"]
