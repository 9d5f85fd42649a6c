"""Weight interchange with diffusers' MotifVideoTransformer3DModel and the Shared Cross-Attention."""

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel
from safetensors.torch import load_file, save_file

from motif_train.models import from_diffusers, to_diffusers
from motif_train.models.blocks import SingleStreamBlock

from ._model_utils import inputs, randomized, tiny


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_forward_equals_diffusers(tiny_cfg, mask, image):
    model = randomized(tiny_cfg).eval()
    ref = to_diffusers(model)
    kw = inputs(tiny_cfg, mask=mask, image=image)
    if not image:  # T2V: zero condition latent and mask channels
        kw["hidden_states"][:, 16:] = 0
    with torch.no_grad():
        ours = model(**kw).sample
        theirs = ref(**kw).sample
    assert ours.shape == (2, 16, 3, 8, 12)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shared_kv", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_dual_stream_cross_attention_equals_diffusers(tiny_cfg, image, mask, shared_kv):
    cfg = tiny(tiny_cfg, enable_text_cross_attention_dual=True, shared_kv=shared_kv)
    model = randomized(cfg).eval()
    ref = to_diffusers(model)
    assert ref.config.enable_text_cross_attention_dual
    for ours_blk, ref_blk in zip(model.transformer_blocks, ref.transformer_blocks, strict=True):
        assert ours_blk.cross_attn is not None and ref_blk.cross_attn is not None
        assert (ours_blk.cross_attn.to_k is ours_blk.attn.to_k) == shared_kv
    kw = inputs(cfg, mask=mask, image=image)
    if not image:  # T2V: zero condition latent and mask channels
        kw["hidden_states"][:, 16:] = 0
    with torch.no_grad():
        ours = model(**kw).sample
        theirs = ref(**kw).sample
        # The dual-stream cross-attention is live: without its output the result moves a lot.
        for blk in model.transformer_blocks:
            blk.cross_attn.to_out[0].weight.zero_()
            blk.cross_attn.to_out[0].bias.zero_()
        without = model(**kw).sample
    assert ours.shape == (2, 16, 3, 8, 12)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - without).abs().max().item() > 1e-2
    if shared_kv:  # and the tied pairs survive a round trip through diffusers' layout
        back = from_diffusers(ref).eval()
        assert back.transformer_blocks[0].cross_attn.to_v is back.transformer_blocks[0].attn.to_v
        with torch.no_grad():
            assert torch.equal(back(**kw).sample, ours)  # same weights, same code: bit for bit


def test_folder_round_trip_and_strict_export(tiny_cfg, tmp_path):
    model = randomized(tiny_cfg).eval()
    to_diffusers(model).save_pretrained(tmp_path / "transformer")
    # diffusers itself loads the export strictly and the tied tensors are stored under both keys.
    loaded = MotifVideoTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    sd = load_file(str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    for i in range(tiny_cfg.num_encoder_single):
        for t in ("to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "norm_k.weight"):
            a, x = sd[f"single_transformer_blocks.{i}.attn.{t}"], sd[f"single_transformer_blocks.{i}.cross_attn.{t}"]
            assert torch.equal(a, x)
    back = from_diffusers(tmp_path / "transformer").eval()
    kw = inputs(tiny_cfg, mask=True, image=True)
    with torch.no_grad():
        assert torch.equal(back(**kw).sample, model(**kw).sample)
        assert (loaded(**kw).sample - model(**kw).sample).abs().max() <= 1e-5
    blk = back.single_transformer_blocks[0]
    assert blk.cross_attn.to_k is blk.attn.to_k and blk.cross_attn.norm_k is blk.attn.norm_k


def test_untied_weights_refused_unless_shared_kv_false(tiny_cfg, tmp_path):
    model = randomized(tiny_cfg).eval()
    folder = tmp_path / "transformer"
    to_diffusers(model).save_pretrained(folder)
    f = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["single_transformer_blocks.1.cross_attn.to_v.weight"] += 0.01
    save_file(sd, str(f))
    with pytest.raises(ValueError, match=r"cross_attn\.to_v\.weight differs.*shared_kv=false"):
        from_diffusers(folder)
    untied = from_diffusers(folder, shared_kv=False).eval()
    blk = untied.single_transformer_blocks[1]
    assert blk.cross_attn.to_v is not blk.attn.to_v
    ref = MotifVideoTransformer3DModel.from_pretrained(folder).eval()
    kw = inputs(tiny_cfg, mask=True)
    with torch.no_grad():
        assert (untied(**kw).sample - ref(**kw).sample).abs().max() <= 1e-5
    # Re-export keeps the distinct copies.
    sd2 = to_diffusers(untied).state_dict()
    assert torch.equal(sd2["single_transformer_blocks.1.cross_attn.to_v.weight"],
                       sd["single_transformer_blocks.1.cross_attn.to_v.weight"])


def test_bin_weights_refused(tiny_cfg, tmp_path):
    to_diffusers(randomized(tiny_cfg)).save_pretrained(tmp_path / "t", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_diffusers(tmp_path / "t")


def test_tied_parameters_share_storage_and_gradient(tiny_cfg):
    tied = randomized(tiny_cfg).train()
    untied = from_diffusers(to_diffusers(tied), shared_kv=False).train()
    for i in range(tiny_cfg.num_encoder_single):
        blk = tied.single_transformer_blocks[i]
        assert blk.cross_attn.to_k.weight.data_ptr() == blk.attn.to_k.weight.data_ptr()
        assert blk.cross_attn.to_v.weight.data_ptr() == blk.attn.to_v.weight.data_ptr()
        assert blk.cross_attn.norm_k.weight.data_ptr() == blk.attn.norm_k.weight.data_ptr()
    # named_parameters dedupes tied tensors: one parameter, one gradient, one optimizer slot.
    names = lambda m: {n for n, _ in m.named_parameters() if not n.startswith("repa_projector.")}  # noqa: E731
    extra = names(untied) - names(tied)
    assert names(tied) < names(untied) and len(extra) == 5 * tiny_cfg.num_encoder_single
    assert all(".cross_attn." in n for n in extra)
    kw = inputs(tiny_cfg, mask=True, image=True)
    for m in (tied, untied):
        m(**kw, route=False).sample.square().mean().backward()
    for i in range(tiny_cfg.num_encoder_single):
        t, u = tied.single_transformer_blocks[i], untied.single_transformer_blocks[i]
        for name in ("to_k", "to_v", "norm_k"):
            expect = getattr(u.attn, name).weight.grad + getattr(u.cross_attn, name).weight.grad
            torch.testing.assert_close(getattr(t.attn, name).weight.grad, expect, rtol=1e-4, atol=1e-6)


def test_fresh_cross_attention_is_identity(tiny_cfg):
    c = tiny_cfg
    torch.manual_seed(0)
    kw = dict(qk_norm=c.qk_norm, norm_type=c.norm_type, shared_kv=True)
    with_x = SingleStreamBlock(c.num_attention_heads, c.attention_head_dim, c.mlp_ratio, cross_attention=True, **kw)
    without = SingleStreamBlock(c.num_attention_heads, c.attention_head_dim, c.mlp_ratio, cross_attention=False,
                                **kw)
    with torch.no_grad():
        for p in with_x.parameters():
            p.normal_(0, 0.3)
    from motif_train.models.dit import MotifDiT  # init_weights zeroes the cross-attention output

    torch.nn.init.zeros_(with_x.cross_attn.to_out[0].weight)
    torch.nn.init.zeros_(with_x.cross_attn.to_out[0].bias)
    without.load_state_dict({k: v for k, v in with_x.state_dict().items() if "cross_attn" not in k})
    x, ctx, temb = torch.randn(2, 10, c.inner_dim), torch.randn(2, 6, c.inner_dim), torch.randn(2, c.inner_dim)
    text_mask = torch.ones(2, 4, dtype=torch.bool)  # ctx = 2 image + 4 text tokens
    text_mask[0, -2:] = False
    from motif_train.models.attention_backends import build_key_masks

    mask = build_key_masks("sdpa", text_mask, 10, 2, torch.float32)
    rope = randomized(c).rope(torch.zeros(1, 1, 1, 2, 20))  # 1 x 1 x 10 token grid
    a = with_x(x, ctx, temb, mask, rope, 2)
    b = without(x, ctx, temb, mask, rope, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # ...and the full model's init_weights zeroes every cross-attention output projection.
    m = MotifDiT(c)
    m.init_weights()
    assert all(blk.cross_attn.to_out[0].weight.abs().sum() == 0 for blk in m.single_transformer_blocks[:2])


def test_untied_config_exports_distinct(tiny_cfg):
    c = tiny(tiny_cfg, shared_kv=False)
    m = randomized(c)
    blk = m.single_transformer_blocks[0]
    assert blk.cross_attn.to_k is not blk.attn.to_k
    out = to_diffusers(m)
    assert torch.equal(out.single_transformer_blocks[0].cross_attn.to_k.weight, blk.cross_attn.to_k.weight)
