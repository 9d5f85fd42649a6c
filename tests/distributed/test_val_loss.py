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
