"""Activation checkpointing and compile wrappers (single process; FSDP lives in tests/distributed)."""

import copy

import torch
from torch._dynamo.testing import CompileCounter

from motif_train.distributed.parallelize import apply_ac, apply_compile
from motif_train.models import RoutingConfig

from ._model_utils import inputs, randomized, tiny


def test_ac_modes_wrap_the_right_blocks_and_keep_results(tiny_cfg):
    ref = randomized(tiny_cfg)
    kw = inputs(tiny_cfg, mask=True, image=True)
    ref_out = ref(**kw, route=False).sample
    ref_out.square().mean().backward()
    for mode, every, expect in (("full", 1, 6), ("every_k", 2, 3), ("none", 1, 0)):
        m = copy.deepcopy(ref)
        m.zero_grad()
        assert apply_ac(m, mode, every) == expect
        out = m(**kw, route=False).sample
        out.square().mean().backward()
        assert torch.equal(out, ref_out)
        grads = dict(ref.named_parameters())
        for n, p in m.named_parameters():
            g = grads[n.replace("_checkpoint_wrapped_module.", "")].grad
            assert (p.grad is None) == (g is None) and (g is None or torch.allclose(p.grad, g, atol=1e-7)), n


def test_routing_does_not_recompile_every_step(tiny_cfg):
    torch._dynamo.reset()
    m = randomized(tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))).train()
    counter = CompileCounter()
    apply_compile(m, backend=counter)
    kw = inputs(tiny_cfg, mask=True)
    m(**kw).sample.sum().backward()  # first step: every distinct block graph compiles once
    compiled = counter.frame_count
    assert compiled > 0
    for _ in range(4):  # fresh random token subsets each step, same shapes
        m(**kw).sample.sum().backward()
    assert counter.frame_count == compiled
    torch._dynamo.reset()
