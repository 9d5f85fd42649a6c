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


# ------------------------------------------------------------------ I2V needs image tokens on every rank (issue 16 §3)

STAGE0 = ["9x64x96", "5x96x64"]  # configs/curriculum/tiny.yaml stage 0 (video buckets, token_budget 144)


def _rank1_keys(manifest: dict) -> set[str]:
    """Rank 1's samples in the first epoch of stage 0 of a 2-rank run (the trainer's plan: seed 0)."""
    import numpy as np

    from motif_train.data.plan import build_plan

    plan = build_plan(manifest, STAGE0, world_size=2, token_budget=144, seed=0, epoch=0)
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    return {keys[g] for g in np.concatenate([st.samples[1] for st in plan.steps]).tolist()}


def _strip_images(src, dst, keys: set[str]) -> dict:
    """A copy of the dataset at `src` whose samples `keys` have no image.npy: the same shards (names, order,
    keys), written again by ShardWriter, and a manifest with the per-bucket image counts."""
    import shutil
    import tarfile

    from motif_train.data import shards as S

    manifest = S.load_manifest(src)
    entries = []
    for shard in manifest["shards"]:
        bucket, rank, idx = S.parse_shard_name(shard["path"])
        samples: dict[str, dict] = {}
        with tarfile.open(src / shard["path"]) as tf:
            for m in tf:
                key, field = m.name.split(".", 1)
                if not (field == "image.npy" and key in keys):
                    samples.setdefault(key, {"__key__": key})[field] = tf.extractfile(m).read()
        with S.ShardWriter(dst, rank=rank, target_samples=len(samples), first_index={bucket: idx}) as w:
            for key in shard["keys"]:
                w.write(bucket, samples[key])
        assert [e["path"] for e in w.entries] == [shard["path"]]
        entries += w.entries
    out = S.build_manifest(entries, buckets=list(manifest["buckets"]), encoders=manifest["encoders"],
                           config=manifest["config"])
    for name in (S.EMPTY_PROMPT_NAME, S.FAILURES_NAME):
        shutil.copy(src / name, dst / name)
    S.save_manifest(dst, out)
    return out


@pytest.fixture(scope="module")
def rank1_without_images(dataset, tmp_path_factory):
    """The dataset with every stage-0 sample of rank 1's first epoch stripped of its SigLIP tokens: rank 0's
    micro-batches carry image tokens, rank 1's do not."""
    from motif_train.data.shards import load_manifest

    src = dataset / "data"
    manifest = load_manifest(src)
    assert all(b["image_samples"] == b["samples"] > 0 for b in manifest["buckets"].values())  # preprocess counts
    keys = _rank1_keys(manifest)
    dst = tmp_path_factory.mktemp("no_images") / "data"
    out = _strip_images(src, dst, keys)
    assert keys and _rank1_keys(out) == keys  # the same plan on the copy
    return dst, out


def _args(root, dataset) -> list[str]:
    return ["data=shards", f"data.root={root}", f"encoders.root={dataset / 'enc'}", "data.num_workers=0"]


def test_i2v_stage_without_image_tokens_on_one_rank_is_refused_at_start(rank1_without_images, dataset, tmp_path):
    root, manifest = rank1_without_images
    lacking = [b for b in STAGE0 if manifest["buckets"][b]["image_samples"] < manifest["buckets"][b]["samples"]]
    assert lacking
    p = train(tmp_path / "run", 2, *_args(root, dataset), check=False, timeout=240)
    assert p.returncode != 0
    assert "curriculum stage 0 ('low-res') trains I2V (i2v_prob=0.5)" in p.stderr
    for b in lacking:
        t = manifest["buckets"][b]
        assert f"{b} ({t['image_samples']} of {t['samples']} samples have them)" in p.stderr
    line = next(x for x in p.stderr.splitlines() if "trains I2V (i2v_prob" in x)
    assert "9x96x128" not in line and "stage 1" not in line  # stage 1's bucket is complete
    assert "re-run motif-preprocess with the image encoder".lower() in p.stderr.lower()
    assert "curriculum.stages[0].i2v_prob=0" in p.stderr
    assert "training failed at step" not in p.stderr and records(tmp_path / "run") == {}  # before step 1
    # The fix it names: stage 0 as T2V only trains on the same data (stage 1 keeps I2V, its bucket is complete).
    q = train(tmp_path / "t2v", 2, *_args(root, dataset), "curriculum.stages.0.i2v_prob=0", "train.steps=2",
              "checkpoint.save_at_end=false", timeout=240)
    assert q.returncode == 0 and sorted(records(tmp_path / "t2v")) == [1, 2]


def test_a_sample_that_slips_through_stops_every_rank_with_a_clear_error(rank1_without_images, dataset, tmp_path):
    """A manifest from before the counts, without a sample index, whose settings say the image encoder was on: the
    start-up check trusts it, so rank 1's first I2V micro-batch meets samples without image tokens. It raises
    (never trains that rank as T2V) and the run ends promptly on every rank, under a hard timeout."""
    import json
    import shutil
    import time

    from motif_train.data.sample_index import SAMPLE_INDEX_DIR

    root, _ = rank1_without_images
    old = tmp_path / "old"
    shutil.copytree(root, old)
    shutil.rmtree(old / SAMPLE_INDEX_DIR)
    m = json.loads((old / "manifest.json").read_text())
    for entry in (*m["shards"], *m["buckets"].values()):
        entry.pop("image_samples", None)
    (old / "manifest.json").write_text(json.dumps(m))
    t0 = time.monotonic()
    p = train(tmp_path / "run", 2, *_args(old, dataset), check=False, timeout=240)
    assert p.returncode != 0 and time.monotonic() - t0 < 240
    assert "trains I2V on every rank, but this rank's micro-batch has no SigLIP image tokens" in p.stderr
    assert "[rank 1] training failed at step" in p.stderr and "MissingImageTokens" in p.stderr
    # rank 0's samples all carry image tokens: it never raises it (at most a collective error once rank 1 is gone)
    assert p.stderr.count("MissingImageTokens: step") == 1
