"""Activation checkpointing and compile wrappers (single process; FSDP lives in tests/distributed)."""

import copy

import torch
from torch._dynamo.testing import CompileCounter

from motif_train.distributed import ParallelConfig
from motif_train.distributed.parallelize import apply_ac, apply_compile, mixed_precision
from motif_train.models import RoutingConfig

from ._model_utils import inputs, randomized, tiny


def test_ac_modes_wrap_the_right_blocks_and_keep_results(tiny_cfg):
    ref = randomized(tiny_cfg)
    kw = inputs(tiny_cfg, mask=True, image=True)
    ref_out = ref(**kw, route=False).sample
    ref_out.square().mean().backward()
    for mode, every, expect in (("full", 1, 6), ("every_k", 2, 3), ("selective", 1, 6), ("none", 1, 0)):
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


def test_mixed_precision_leaves_inputs_uncast():
    """FSDP2 must not cast forward inputs: the timestep and RoPE tables stay fp32 (the model casts
    activations itself; tests/distributed/test_numerics.py checks what arrives)."""
    mp = mixed_precision(ParallelConfig(param_dtype="bfloat16"), torch.device("cpu"))
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32 and not mp.cast_forward_inputs
    assert mixed_precision(ParallelConfig(), torch.device("cpu")).param_dtype == torch.float32  # auto on CPU


def test_bf16_model_keeps_timestep_and_rope_fp32(tiny_cfg):
    """Without FSDP too: a bf16 model gets the exact fp32 timestep and fp32 RoPE in every attention."""
    m = randomized(tiny_cfg).to(torch.bfloat16).eval()
    seen = {"t": [], "rope": set()}
    m.time_text_embed.time_proj.register_forward_pre_hook(lambda mod, a: seen["t"].append(a[0]))
    for blk in m.blocks():
        blk.attn.register_forward_pre_hook(lambda mod, a: seen["rope"].update(t.dtype for t in a[3]))
    kw = inputs(tiny_cfg, mask=True, image=True)  # fp32 inputs: the model casts them to bf16 itself
    kw["timestep"] = torch.tensor([998.7, 613.3])
    with torch.no_grad():
        out = m(**kw).sample
    assert out.dtype == torch.bfloat16 and torch.equal(seen["t"][0], torch.tensor([998.7, 613.3]))
    assert seen["rope"] == {torch.float32}


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
