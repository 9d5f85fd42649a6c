"""The held-out validation loss (issue 18 §2): determinism, held-out samples only, the objective's own loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from motif_train import metric_keys as mk
from motif_train.data.heldout import HeldOutReader
from motif_train.data.plan import sample_ids_by_bucket
from motif_train.evaluation.val_loss import TASKS, noise_seed, sigma_grid, validation_loss
from motif_train.objectives import objective as objective_mod
from motif_train.objectives.flow import shift_sigma

from ._val_loss_env import STAGE, build_dataset, model_and_objective


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data = build_dataset(tmp_path_factory.mktemp("vl"))
    reader = HeldOutReader(data)
    model, obj = model_and_objective()
    yield {"data": data, "reader": reader, "model": model, "obj": obj}
    reader.close()


def test_sigma_grid_is_the_stage_shift_of_equal_bins():
    g = sigma_grid(8, 3.0)
    u = (torch.arange(8) + 0.5) / 8
    assert torch.equal(g, shift_sigma(u, 3.0)) and bool((g[1:] > g[:-1]).all())
    assert torch.allclose(sigma_grid(4, 1.0), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert noise_seed("a", 0) == noise_seed("a", 0) != noise_seed("a", 1)


def test_twice_identical_and_keys(env):
    a = validation_loss(env["model"], env["obj"], env["reader"], STAGE, sigmas=4)
    b = validation_loss(env["model"], env["obj"], env["reader"], STAGE, sigmas=4)
    assert torch.equal(a.sums, b.sums) and torch.equal(a.counts, b.counts)
    assert a.metrics() == b.metrics()
    n_vid, n_img = a.samples["9x64x96"], a.samples["1x64x64"]
    assert n_vid > 0 and n_img > 0
    # T2V for every sample and σ; I2V for the video bucket (it has image tokens), never for the image bucket
    assert a.counts[0, :, 0].tolist() == [n_vid] * 4 and a.counts[0, :, 1].tolist() == [n_vid] * 4
    assert a.counts[1, :, 0].tolist() == [n_img] * 4 and a.counts[1, :, 1].sum() == 0
    m = a.metrics()
    assert all(mk.covers(k) for k in m), [k for k in m if not mk.covers(k)]
    assert math.isclose(m["val_loss/val"], a.stage_loss) and "val_loss/val/9x64x96/i2v/s3" in m
    assert "val_loss/val/1x64x64/i2v/s0" not in m and math.isfinite(m["val_loss/val/t2v"])
    assert len(m) == 1 + 2 + 4 * 3  # stage, two tasks, (2 buckets t2v + 1 bucket i2v) x 4 σ
    assert mk.family_of("val_loss_raw/val/9x64x96/t2v/s0") == "val_loss"


def test_heldout_samples_only(env, monkeypatch):
    reader = env["reader"]
    seen = []
    real_read = reader.read
    monkeypatch.setattr(reader, "read", lambda gid: seen.append(int(gid)) or real_read(gid))
    validation_loss(env["model"], env["obj"], reader, STAGE, sigmas=2)
    held = {int(g) for b in ("9x64x96", "1x64x64") for g in reader.bucket_ids(b)}
    train = {int(g) for v in sample_ids_by_bucket(reader.index.plan_manifest()).values() for g in v}
    assert set(seen) == held and not (set(seen) & train) and len(seen) == len(held)
    keys = {reader.key(g) for g in seen}
    assert keys == set().union(*(set(v["keys"]) for v in reader.split["buckets"].values()))


def test_dummy_slots_and_forward_count(env):
    """Rank 1 of 3: the same forwards as every other rank, its missing slots weighted 0."""
    reader, model, obj = env["reader"], env["model"], env["obj"]
    counts = []
    for r in range(3):
        res = validation_loss(model, obj, reader, STAGE, sigmas=2, rank=r, world_size=1)  # no collective
        counts.append(res.forwards)
    assert len(set(counts)) == 1


@pytest.mark.parametrize("task", TASKS)
def test_hand_check_equals_the_objective(env, monkeypatch, task):
    """Loss at one σ of one sample == DiffusionObjective's own `denoise` on that sample, σ and noise."""
    reader, model, obj = env["reader"], env["model"], env["obj"]
    gid = int(reader.bucket_ids("9x64x96")[0])
    key, j, n = reader.key(gid), 2, 4
    res = validation_loss(model, obj, reader, STAGE, sigmas=n)
    got_all = res.sums[0, j, TASKS.index(task)] / res.counts[0, j, TASKS.index(task)]
    # the same sample alone, through the objective: its σ fixed at the grid's σ_j (the draw patched out), the
    # noise the generator of (key, j) draws — exactly what the objective draws after σ
    sigma = sigma_grid(n, STAGE.shift)[j:j + 1]
    monkeypatch.setattr(objective_mod, "sample_sigmas", lambda b, cfg, generator=None, device=None: sigma.clone())
    obj.config.conditioning.i2v_prob = 1.0 if task == "i2v" else 0.0
    try:
        model.eval()
        with torch.no_grad():
            out = obj(model, reader.read(gid), step=1, generator=torch.Generator().manual_seed(noise_seed(key, j)),
                      repa=False)
    finally:
        obj.config.conditioning.i2v_prob = 0.0
        model.train()
    assert out.task == task
    want = float(out.losses["denoise"])
    # the stage's cell averages the bucket's samples; recompute this one sample's value from a one-sample reader
    one = _OneSample(reader, "9x64x96", gid)
    mine = validation_loss(model, obj, one, STAGE, sigmas=n)
    assert abs(float(mine.sums[0, j, TASKS.index(task)]) - want) <= 1e-6 * max(1.0, abs(want))
    assert math.isfinite(float(got_all)) and want > 0


class _OneSample:
    """A reader of one held-out sample (the hand check)."""

    def __init__(self, reader, bucket, gid):
        self.r, self.bucket, self.gid, self.buckets = reader, bucket, gid, reader.buckets

    def bucket_ids(self, b):
        return np.asarray([self.gid] if b == self.bucket else [], np.int64)

    def has_image(self, b):
        return self.r.has_image(b)

    def key(self, gid):
        return self.r.key(gid)

    def read(self, gid):
        return self.r.read(gid)
