"""LoRA through peft on MotifDiT (models/lora.py): injection names, tied Shared Cross-Attention K/V,
what trains, compile + AC, and the adapter / merged exports against diffusers' `load_lora_adapter`."""

import copy

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel
from safetensors import safe_open

from motif_train.config import ModelSpec, TrainConfig, check_lora
from motif_train.models import MotifDiT, RoutingConfig, to_diffusers
from motif_train.models.lora import (
    WEIGHT_NAME,
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    base_state_keys,
    init_lora_weights,
    lora_modules,
    merged_model,
    save_adapter,
    trainable_names,
)

from ._model_utils import inputs, randomized, tiny


@pytest.fixture
def cfg(tiny_cfg):
    return tiny(tiny_cfg, routing=RoutingConfig(ratio=0.0))


def _lora_model(cfg, rank=4, alpha=8.0, **kw):
    """A randomized tiny model with adapters; B random too, so every adapter changes the output."""
    m = randomized(cfg, std=0.1)
    base = copy.deepcopy(m)
    apply_lora(m, LoraConfig(rank=rank, alpha=alpha, **kw))
    init_lora_weights(m, seed=0)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B["default"].weight.normal_(0, 0.05)
    return m, base


def test_injection_names_and_what_trains(cfg):
    with torch.device("meta"):
        m = MotifDiT(cfg)
    names = apply_lora(m, LoraConfig(rank=4))
    # every block's attention q/k/v/out and feed-forward linears; nothing outside the blocks
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.1.ff_context.net.2" in names
    assert "single_transformer_blocks.0.proj_mlp" in names and "single_transformer_blocks.3.proj_out" in names
    assert "single_transformer_blocks.0.cross_attn.to_q" in names
    assert not any(n.startswith(("proj_out", "x_embedder", "norm_out")) or ".norm" in n for n in names)
    params = dict(m.named_parameters())
    assert "transformer_blocks.0.attn.to_q.base_layer.weight" in params  # diffusers' names after load_lora_adapter
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in params
    train = trainable_names(m)
    assert train and all(".lora_" in n or n.startswith("repa_projector.") for n in train)
    assert any(n.startswith("repa_projector.") for n in train)  # the fresh REPA head trains
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_bf16_base_fp32_adapters(cfg):
    with torch.device("meta"):
        m = MotifDiT(cfg)
    apply_lora(m, LoraConfig(rank=4, base_dtype="bfloat16"))
    for n, p in m.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n


def test_unknown_target_lists_the_available_modules(cfg):
    with torch.device("meta"):
        m = MotifDiT(cfg)
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no linear.*'attn.to_q'.*'proj_mlp'"):
        apply_lora(m, LoraConfig(rank=4, targets=["to_q", "to_qq"]))


def test_config_rules():
    with pytest.raises(ValueError, match="model.lora.rank"):
        LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="base_dtype"):
        LoraConfig(rank=4, base_dtype="float16")
    assert ModelSpec(lora={"rank": 8}).lora == LoraConfig(rank=8)  # plain dicts (export reads the run's yaml)
    cfg = TrainConfig(model=ModelSpec(lora=LoraConfig(rank=4)))
    with pytest.raises(ValueError, match="model.init_from is null"):
        check_lora(cfg)
    cfg.model.init_from = "/x"
    cfg.model.lora.dropout = 0.1
    cfg.parallel.ac = "full"
    with pytest.raises(ValueError, match="parallel.ac=none"):
        check_lora(cfg)
    cfg.parallel.ac = "none"
    check_lora(cfg)


def test_fresh_adapters_leave_the_base_unchanged(cfg):
    m = randomized(cfg, std=0.1).eval()
    kw = inputs(cfg, image=True, mask=True)
    with torch.no_grad():
        ref = m(**kw).sample
        apply_lora(m, LoraConfig(rank=4))
        init_lora_weights(m, seed=0)
        assert torch.equal(m(**kw).sample, ref)
    a = next(iter(lora_modules(m).values())).lora_A["default"].weight
    assert a.abs().max() > 0


def test_tied_kv_stay_tied_and_learn_from_both_paths(cfg):
    """Our tied to_k / to_v is ONE wrapped module; its adapter gradient equals the sum of diffusers'
    (untied) self- and cross-attention copies' gradients, and the cross-attention part is not zero."""
    m, base = _lora_model(cfg)
    for blk in m.single_transformer_blocks:
        if blk.cross_attn is not None:
            assert blk.cross_attn.to_k is blk.attn.to_k and blk.cross_attn.to_v is blk.attn.to_v
            assert blk.cross_attn.norm_k is blk.attn.norm_k
    ref = to_diffusers(base)
    state = {f"transformer.{k}": v for k, v in adapter_state_dict(m).items()}
    ref.load_lora_adapter(state, metadata={"transformer.r": 4, "transformer.lora_alpha": 8.0,
                                           "transformer.target_modules": sorted({k.rsplit(".", 2)[0]
                                                                                 for k in adapter_state_dict(m)})})
    kw = inputs(cfg, image=True, mask=True)
    m.train()
    ref.train()
    m(**kw).sample.square().mean().backward()
    ref(**kw).sample.square().mean().backward()
    pre = "single_transformer_blocks.0"
    for leaf in ("to_k", "to_v"):
        ours = getattr(m.single_transformer_blocks[0].attn, leaf).lora_B["default"].weight.grad
        dblk = ref.single_transformer_blocks[0]
        d_self = getattr(dblk.attn, leaf).lora_B["default_0"].weight.grad
        d_cross = getattr(dblk.cross_attn, leaf).lora_B["default_0"].weight.grad
        assert d_cross.abs().max() > 0, f"{pre}.cross_attn.{leaf}: no gradient through the cross-attention"
        torch.testing.assert_close(ours, d_self + d_cross, rtol=1e-4, atol=1e-7)


def test_compiled_and_checkpointed_lora_blocks_match_eager(cfg):
    from motif_train.distributed.parallelize import apply_ac, apply_compile

    torch._dynamo.reset()
    ref, _ = _lora_model(cfg)
    m = copy.deepcopy(ref)
    apply_compile(m, backend="eager")  # fullgraph=True: no graph break in a LoRA'd block
    apply_ac(m, "selective")
    kw = inputs(cfg, image=True, mask=True)
    a, b = ref(**kw).sample, m(**kw).sample
    torch.testing.assert_close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    for (n, p), q in zip(ref.named_parameters(), m.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)
        else:
            assert q.grad is None, n
    torch._dynamo.reset()


def test_trained_adapter_loads_in_diffusers_and_merges(cfg, tmp_path):
    """A few AdamW steps on the adapters only, then: the adapter file in diffusers' load_lora_adapter and
    the merged weights both give our output (fp32, <= 1e-5)."""
    m = randomized(cfg, std=0.1)
    base = to_diffusers(copy.deepcopy(m))
    apply_lora(m, LoraConfig(rank=4, alpha=8.0))
    init_lora_weights(m, seed=0)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for step in range(3):
        kw = inputs(cfg, image=True, mask=True, seed=10 + step)
        m(**kw).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert max(mod.lora_B["default"].weight.abs().max() for mod in lora_modules(m).values()) > 0

    save_adapter(tmp_path / "lora", m)
    with safe_open(str(tmp_path / "lora" / WEIGHT_NAME), "pt") as f:
        keys = set(f.keys())
    assert "transformer.single_transformer_blocks.0.cross_attn.to_k.lora_A.weight" in keys  # tied copy, too
    base.load_lora_adapter(tmp_path / "lora", weight_name=WEIGHT_NAME)
    merged = merged_model(m)
    m.eval()
    base.eval()
    kw = inputs(cfg, image=True, mask=True, seed=99)
    with torch.no_grad():
        ours = m(**kw).sample
        assert (base(**kw).sample - ours).abs().max() <= 1e-5
        assert (merged(**kw).sample - ours).abs().max() <= 1e-5
    merged_d = to_diffusers(merged)
    with torch.no_grad():
        assert (merged_d(**kw).sample - ours).abs().max() <= 1e-5
    assert isinstance(merged_d, MotifVideoTransformer3DModel)


def test_base_keys_rename_released_weights(cfg):
    plain = randomized(cfg)
    with torch.device("meta"):
        m = MotifDiT(cfg)
    apply_lora(m, LoraConfig(rank=2))
    state = base_state_keys(m, plain.state_dict())
    m.to_empty(device="cpu")
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all(".lora_" in k or k.startswith("repa_projector.") for k in missing)
