"""The validation loss on 1 vs 2 gloo ranks (torchrun, hard timeout): the same numbers to 1e-5 in fp32."""

import json
import subprocess
import sys

import pytest
import torch

from motif_train.data.heldout import HeldOutReader
from motif_train.evaluation.val_loss import validation_loss

from ..unit._val_loss_env import STAGE, build_dataset, model_and_objective
from ._runs import REPO, env

pytestmark = pytest.mark.distributed


def test_one_vs_two_ranks(tmp_path):
    data = build_dataset(tmp_path)
    reader = HeldOutReader(data)
    model, obj = model_and_objective()
    one = validation_loss(model, obj, reader, STAGE, sigmas=4)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "distributed" / "_val_loss_worker.py"), str(data), str(out)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["forwards"] == r1["forwards"] > 0  # the same forwards on both ranks (dummies weighted 0)
    assert torch.equal(torch.tensor(r0["counts"], dtype=torch.float64), one.counts)
    two = torch.tensor(r0["sums"], dtype=torch.float64) / one.counts.clamp(min=1)
    assert (two - one.mean.nan_to_num()).abs().max() <= 1e-5
    assert abs(r0["stage"] - one.stage_loss) <= 1e-5 and r0["sums"] == r1["sums"]


def test_in_loop_on_two_ranks(tmp_path):
    """The trainer's hook (eval.loss_every=4, EMA swapped in, FSDP on 2 gloo ranks): logged at steps 4, 8, 12."""
    from motif_train.data.clips import default_specs, write_clip_folder
    from motif_train.data.preprocess import preprocess
    from motif_train.objectives.encoders import build_tiny_encoders

    from ._runs import torchrun_cmd

    build_tiny_encoders(tmp_path / "enc")
    write_clip_folder(tmp_path / "clips", default_specs(24, seed=2), broken=False)
    preprocess([str(tmp_path / "clips")], tmp_path / "data", tmp_path / "enc",
               buckets=[[9, 64, 96], [5, 96, 64], [9, 96, 128]], progress=False, val_fraction=0.1,
               val_min_per_bucket=2, val_max_share=0.3)
    run = tmp_path / "run"
    cmd = torchrun_cmd(run, 2, "data=shards", f"data.root={tmp_path / 'data'}", f"encoders.root={tmp_path / 'enc'}",
                       "data.num_workers=1", "eval.loss_every=4", "checkpoint.every=0")
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    vl = [e for e in events if e["event"].startswith("validation loss (")]
    assert [e["step"] for e in vl] == [4, 8, 12] and all(e["weights"] == "ema" for e in vl)
    for e in vl:
        stage = e["event"].split("(")[1].split(")")[0]
        assert e[f"val_loss/{stage}"] > 0 and e["eval/val_loss_s"] > 0
