"""Selective activation checkpointing (`parallel.ac=selective`) on the tiny model, CPU, fp32.

Counts the fused SDPA forwards that run during backward (the recompute) with a dispatch mode:
`full` re-runs every attention, `selective` none, and gradients match the run without AC, with
TREAD routing and the tied Shared Cross-Attention K/V both on.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from motif_train.distributed import ParallelConfig
from motif_train.distributed.parallelize import SDPA_OPS, apply_ac
from motif_train.models import RoutingConfig

from ._model_utils import inputs, randomized, tiny

# Tiny preset: 2 dual blocks (1 attention each), 2 encoder single blocks (self + Shared Cross-Attention),
# 2 decoder blocks (1 each).
N_ATTENTION = 8
# every_k with k=2 wraps absolute blocks 0 (dual), 2 (encoder single) and 4 (decoder): 1 + 2 + 1.
N_ATTENTION_EVERY_2 = 4


class SdpaCounter(TorchDispatchMode):
    """Counts fused SDPA forward ops (their backward ops are other overloads, not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.ops.add(func)
        if func in SDPA_OPS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def setup(tiny_cfg):
    cfg = tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))  # route crosses dual -> single (K/V tied there)
    assert cfg.shared_kv and cfg.repa.block == 2  # the REPA head reads a routed block
    model = randomized(cfg).train()
    kw = inputs(cfg, mask=True, image=True)
    g = torch.Generator().manual_seed(3)
    kw["keep_ids"] = torch.stack([torch.randperm(72, generator=g)[:36].sort().values for _ in range(2)])
    return model, kw


def _step(model, kw) -> tuple[int, int]:
    """Forward + backward; returns (SDPA forwards in forward, SDPA forwards in backward)."""
    with SdpaCounter() as fwd:
        out = model(**kw, return_repa=True)
        loss = out.sample.square().mean() + out.repa_tokens.square().mean()
    with SdpaCounter() as bwd:
        loss.backward()
    assert fwd.ops and fwd.ops <= SDPA_OPS, fwd.ops  # what dispatches on CPU is what the policy saves
    return fwd.n, bwd.n


@pytest.mark.parametrize("mode,recomputed", [("none", 0), ("full", N_ATTENTION), ("every_k", N_ATTENTION_EVERY_2),
                                             ("selective", 0)])
def test_attention_recomputed_in_backward(setup, mode, recomputed):
    model, kw = setup
    m = copy.deepcopy(model)
    assert apply_ac(m, mode, 2) == {"none": 0, "full": 6, "every_k": 3, "selective": 6}[mode]
    n_fwd, n_bwd = _step(m, kw)
    assert n_fwd == N_ATTENTION
    assert n_bwd == recomputed


def test_gradients_equal_without_ac(setup):
    model, kw = setup
    grads = {}
    for mode in ("none", "full", "selective"):
        m = copy.deepcopy(model)
        apply_ac(m, mode)
        _step(m, kw)
        grads[mode] = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()}
        # The tie survives the wrapper: one module under both names, so one gradient.
        blk = m.single_transformer_blocks[0]
        assert blk.cross_attn.to_k is blk.attn.to_k
    ref = grads["none"]
    assert sum(g is not None for g in ref.values()) > 50
    for mode in ("full", "selective"):
        assert grads[mode].keys() == ref.keys()
        for n, g in grads[mode].items():
            assert (g is None) == (ref[n] is None), (mode, n)
            if g is not None:
                assert (g - ref[n]).abs().max().item() <= 1e-6, (mode, n)


def test_ac_mode_validated():
    assert ParallelConfig(ac="selective").ac == "selective"
    with pytest.raises(ValueError, match="none, full, every_k, selective"):
        ParallelConfig(ac="sac")
    with pytest.raises(ValueError, match="none, full, every_k, selective"):
        apply_ac(torch.nn.Module(), "op")
