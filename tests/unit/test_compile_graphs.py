"""A bounded set of compiled block graphs (CPU, eager backend): one dynamo cache per block class,
no graph break inside a block, no recompile for a new bucket, caption length or TREAD ids."""

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from motif_train.batch import pad_text
from motif_train.distributed.parallelize import apply_ac, apply_compile
from motif_train.models import RoutingConfig
from motif_train.models.blocks import DualStreamBlock, SingleStreamBlock

from ._model_utils import inputs, randomized, tiny

PAD_TO = (8, 16)
# (f, h, w, caption lengths): 2 buckets; lengths 3..7 pad to 8, 11 and 13 pad to 16
STEPS = [(3, 8, 12, (7, 3)), (3, 8, 12, (5, 6)), (5, 8, 8, (7, 4)), (5, 8, 8, (11, 2)), (3, 8, 12, (13, 9)),
         (5, 8, 8, (6, 6))]


def _entries() -> dict[str, int]:
    return {c.__name__: len(_debug_get_cache_entry_list(c.forward.__code__))
            for c in (DualStreamBlock, SingleStreamBlock)}


def _run(tiny_cfg, ac: str, dynamic):
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))
    m = randomized(cfg).train()
    apply_compile(m, dynamic=dynamic, backend="eager")
    apply_ac(m, ac)
    seen = []
    for step, (f, h, w, lens) in enumerate(STEPS):
        kw = inputs(cfg, f=f, h=h, w=w, mask=True, image=True, seed=step)
        g = torch.Generator().manual_seed(step)
        text, mask = pad_text([torch.randn(n, cfg.text_embed_dim, generator=g) for n in lens], PAD_TO)
        kw["encoder_hidden_states"], kw["encoder_attention_mask"] = text, mask
        m(**kw).sample.square().mean().backward()  # fresh TREAD ids every step
        seen.append((sum(_entries().values()), int(counters["stats"]["unique_graphs"])))
    return m, seen


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_one_graph_per_block_variant_whatever_the_bucket(tiny_cfg, ac):
    m, seen = _run(tiny_cfg, ac, None)
    # Variants in the tiny model: dual (full / TREAD-gathered RoPE), single (encoder with
    # cross-attention + mask / DDT decoder without mask). Compiled on the first step only.
    assert _entries() == {"DualStreamBlock": 2, "SingleStreamBlock": 2}
    assert all(s == seen[0] for s in seen), seen  # new bucket, text pad length, caption lengths, TREAD ids
    assert seen[0][1] == 4
    assert sum(counters["graph_break"].values()) == 0  # fullgraph=True would raise anyway
    torch._dynamo.reset()


def test_static_shapes_recompile_only_per_shape(tiny_cfg):
    """compile_dynamic=False: one graph per variant x (bucket, text pad length); a caption length within
    one pad length or new TREAD ids reuse it. Bound: 2 classes x 2 variants x 4 distinct shapes."""
    _, seen = _run(tiny_cfg, "full", False)
    # step 1 = step 0's shapes (caption lengths within pad 8), step 5 = step 2's: nothing new
    assert seen[1] == seen[0] and seen[5] == seen[4]
    shapes = {(f, h, w, max(lens) > 8) for f, h, w, lens in STEPS}
    assert seen[-1][0] <= 2 * 2 * len(shapes)
    torch._dynamo.reset()


def test_compiled_blocks_match_eager_and_survive_deepcopy(tiny_cfg):
    import copy

    torch._dynamo.reset()
    cfg = tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))
    ref = randomized(cfg).train()
    m = copy.deepcopy(ref)
    apply_compile(m, backend="eager")
    apply_ac(m, "full")
    kw = inputs(cfg, mask=True, image=True)
    ids = torch.stack([torch.randperm(24)[:12].sort().values for _ in range(2)])
    a, b = ref(**kw, keep_ids=ids).sample, m(**kw, keep_ids=ids).sample
    torch.testing.assert_close(a, b)
    c = copy.deepcopy(m)  # the bound compiled forward is rebound to the copy's blocks
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(0.5)
    assert not torch.allclose(c(**kw, keep_ids=ids).sample, b)
    torch._dynamo.reset()


def test_pad_text_picks_the_smallest_length_and_names_the_key():
    text, mask = pad_text([torch.ones(3, 2), torch.ones(9, 2)], [8, 16, 32])
    assert text.shape == (2, 16, 2) and mask.sum(1).tolist() == [3, 9] and not text[0, 3:].any()
    with pytest.raises(ValueError, match="data.text_pad_to"):
        pad_text([torch.ones(40, 2)], [8, 16, 32])


def test_pad_to_accepts_the_list_hydra_passes():
    from omegaconf import OmegaConf

    from motif_train.batch import check_pad_to

    assert check_pad_to(OmegaConf.create([128, 64, 64])) == [64, 128]  # a ListConfig, as from configs/data/*.yaml
    for bad in ("64", [], [0, 64], [True]):
        with pytest.raises(ValueError, match="data.text_pad_to"):
            check_pad_to(bad)


@pytest.mark.parametrize("drop_unpadded_mask, graphs", [(False, 4), (True, 7)])
def test_compiled_sdpa_keeps_one_mask_variant(tiny_cfg, drop_unpadded_mask, graphs):
    """Through the objective, micro-batches with and without padding: with the mask always passed
    (what the trainer sets for compiled sdpa blocks) the graph set stays at the 4 variants; dropping
    the mask of unpadded micro-batches adds a mask-free graph to each of the 3 text-attending variants, compiled
    at whichever step first has no padding — a different step on each rank."""
    from motif_train.batch import Batch
    from motif_train.objectives.objective import DiffusionObjective, ObjectiveConfig

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))
    m = randomized(cfg).train()
    apply_compile(m, backend="eager")
    apply_ac(m, "selective")
    obj = DiffusionObjective(ObjectiveConfig(conditioning={"text_dropout": 0.0, "i2v_prob": 0.0}, repa={"weight": 0.0}),
                             text_pad_to=list(PAD_TO), drop_unpadded_mask=drop_unpadded_mask)
    for step, lens in enumerate([(7, 3), (8, 8), (5, 6), (8, 8)]):  # (8, 8): nothing padded at length 8
        g = torch.Generator().manual_seed(step)
        text, mask = pad_text([torch.randn(n, cfg.text_embed_dim, generator=g) for n in lens], PAD_TO)
        batch = Batch(latents=torch.randn(2, 16, 3, 8, 12, generator=g), text=text, text_mask=mask)
        obj(m, batch, step=step, generator=g).losses["denoise"].backward()
    assert sum(_entries().values()) == graphs
    torch._dynamo.reset()
