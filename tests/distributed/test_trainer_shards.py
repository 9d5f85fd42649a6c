"""The trainer on real shards (clips -> motif-preprocess -> plan -> loader) under torchrun with 2
gloo ranks: an interrupted and resumed run equals the uninterrupted one bit for bit."""

import pytest

from motif_train.data.clips import default_specs, write_clip_folder
from motif_train.data.preprocess import preprocess
from motif_train.objectives.encoders import build_tiny_encoders

from ._runs import ckpt_dir, records, step_values, train, train_state

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    build_tiny_encoders(root / "enc")
    write_clip_folder(root / "clips", default_specs(24, seed=2), broken=True)
    preprocess([str(root / "clips")], root / "data", root / "enc", buckets=[[9, 64, 96], [5, 96, 64], [9, 96, 128]],
               progress=False)
    return root


def test_exact_resume_on_shards(dataset, tmp_path):
    data = ["data=shards", f"data.root={dataset / 'data'}", f"encoders.root={dataset / 'enc'}", "data.num_workers=1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, 2, *data)
    train(run, 2, *data, "train.stop_at=8")  # stage 1 starts at step 7: stop inside it
    train(run, 2, *data)
    a, b = records(ref), records(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert step_values(a[s]) == step_values(b[s]), s
    state = train_state(ckpt_dir(run, 12))["data"]
    assert state == train_state(ckpt_dir(ref, 12))["data"] and state["epoch"] >= 0
