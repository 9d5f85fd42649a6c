"""The synthetic source: same bucket on every rank, disjoint slices, world-size independent position."""

import torch

from motif_train.data.curriculum import StageConfig
from motif_train.data.synthetic import SyntheticSource


def _source(rank, size, accum=1):
    s = SyntheticSource(text_dim=8, image_dim=6, seed=3, dp_rank=rank, dp_size=size, grad_accum=accum)
    s.set_stage(StageConfig(buckets=[[9, 64, 96], [5, 32, 48]], global_batch=4), teacher=True)
    return s


def test_same_bucket_disjoint_slices_and_shapes():
    a, b = _source(0, 2), _source(1, 2)
    for step in range(1, 6):
        ba, bb = a.next_step(step), b.next_step(step)
        assert ba[0].latents.shape == bb[0].latents.shape  # every rank draws the same shape
        assert not set(ba[0].keys) & set(bb[0].keys)
        f, h, w = a.bucket_for(step)
        assert ba[0].latents.shape == (2, 16, 1 + (f - 1) // 4, h // 8, w // 8)
        assert ba[0].teacher_pixels.shape == (2, 3, f + 1, 32, 32)
        assert ba[0].text_mask.sum(1).tolist() == [int(m.sum()) for m in ba[0].text_mask]


def test_resume_on_another_world_size_neither_repeats_nor_skips():
    two = [_source(0, 2), _source(1, 2)]
    seen = []
    for step in range(1, 4):
        for s in two:
            seen += [k for b in s.next_step(step) for k in b.keys]
    one = _source(0, 1, accum=2)
    one.load_state_dict(two[0].state_dict())
    for step in range(4, 7):
        seen += [k for b in one.next_step(step) for k in b.keys]
    ids = sorted(int(k.split("/")[1]) for k in seen)
    assert ids == list(range(6 * 4))


def test_content_is_a_function_of_the_sample_id():
    a, b = _source(0, 1), _source(0, 1)
    b.load_state_dict({"consumed": 0})
    x, y = a.next_step(1)[0], b.next_step(1)[0]
    assert torch.equal(x.latents, y.latents) and torch.equal(x.text, y.text)
    assert abs(x.latents.std().item() - 1) < 0.3
