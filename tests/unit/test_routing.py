"""TREAD routing and the REPA head."""

import pytest
import torch

from motif_train.models import RoutingConfig
from motif_train.models.routing import gather_tokens, num_kept, sample_keep_ids, scatter_tokens

from ._model_utils import inputs, randomized, route, tiny

# tiny preset: dual 0-1, single encoder 2-3, decoder 4-5 (encoder/decoder boundary at 4).


def test_keep_ids_sorted_unique_per_sample():
    g = torch.Generator().manual_seed(0)
    ids = sample_keep_ids(4, 96, 0.5, generator=g)
    assert ids.shape == (4, num_kept(96, 0.5)) == (4, 48)
    assert torch.all(ids[:, 1:] > ids[:, :-1])  # sorted, unique
    assert len({tuple(r.tolist()) for r in ids}) == 4  # a fresh subset per sample
    x = torch.randn(4, 96, 3)
    kept = gather_tokens(x, ids)
    assert torch.equal(scatter_tokens(x, kept, ids), x)


def test_ratio_zero_equals_no_routing(tiny_cfg):
    """ratio 0 == no route at all (bit for bit); ratio > 0 really shrinks the routed blocks."""
    kw = inputs(tiny_cfg, mask=True, image=True)
    n = 3 * 4 * 6  # video tokens of the (3, 8, 12) latent with patch 2

    def tokens_per_block(m):
        seen = []
        hooks = [blk.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1])) for blk in m.blocks()]
        out = m(**kw, generator=torch.Generator().manual_seed(5))
        for hk in hooks:
            hk.remove()
        return out, seen

    zero = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.0))).train()
    none = randomized(tiny_cfg).train()
    none.set_routing(None)  # no routing config at all
    half = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.5))).train()
    for a, b in ((zero, none), (zero, half)):  # same seed: identical weights, only the route differs
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    out0, seen0 = tokens_per_block(zero)
    out_none, seen_none = tokens_per_block(none)
    assert out0.keep_ids is None and out_none.keep_ids is None
    assert seen0 == seen_none == [n] * 6
    assert torch.equal(out0.sample, out_none.sample)

    out_half, seen_half = tokens_per_block(half)
    k = num_kept(n, 0.5)
    assert k == 36 and out_half.keep_ids.shape == (2, k)
    assert seen_half == [n, k, k, k, n, n]  # blocks 1..3 see only the kept tokens
    assert (out_half.sample - out0.sample).abs().max() > 1e-2  # the route changes the output
    # Switching the same model's route off with set_routing restores the unrouted output.
    half.set_routing(route(1, 3, 0.0))
    out_off, seen_off = tokens_per_block(half)
    assert out_off.keep_ids is None and seen_off == [n] * 6
    assert torch.equal(out_off.sample, out0.sample)


def test_keeping_every_token_equals_full_forward(tiny_cfg):
    # ids = arange: every gather/scatter, the per-sample RoPE and the shrunk mask must be no-ops.
    m = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.5))).train()
    kw = inputs(tiny_cfg, mask=True, image=True)
    n = 3 * 4 * 6
    ids = torch.arange(n).expand(2, n)
    routed = m(**kw, keep_ids=ids).sample
    full = m(**kw, route=False).sample
    torch.testing.assert_close(routed, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("span", [(1, 3), (4, 5), (0, 1)], ids=["dual-to-single", "decoder", "dual"])
def test_routed_batch_equals_per_sample_forward(tiny_cfg, span):
    """Per-sample RoPE / mask gathering: sample b in a routed batch == sample b routed alone."""
    m = randomized(tiny(tiny_cfg, routing=route(*span, 0.5))).train()
    kw = inputs(tiny_cfg, mask=True, image=True)
    g = torch.Generator().manual_seed(3)
    out = m(**kw, generator=g)
    assert not torch.equal(out.keep_ids[0], out.keep_ids[1])
    for b in range(2):
        one = {k: v[b:b + 1] for k, v in kw.items()}
        alone = m(**one, keep_ids=out.keep_ids[b:b + 1]).sample
        torch.testing.assert_close(out.sample[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_untouched_tokens_bit_identical_across_route(tiny_cfg):
    m = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.5))).train()
    seen = {}
    m.transformer_blocks[0].register_forward_hook(lambda mod, a, o: seen.__setitem__("before", o[0].clone()))
    # Block 4 is the first decoder block: its second argument is the encoder's video output.
    m.single_transformer_blocks[2].register_forward_pre_hook(lambda mod, a: seen.__setitem__("after", a[1].clone()))
    out = m(**inputs(tiny_cfg, mask=True, image=True))
    n = seen["before"].shape[1]
    for b in range(2):
        skipped = torch.ones(n, dtype=torch.bool)
        skipped[out.keep_ids[b]] = False
        assert skipped.sum() == n - out.keep_ids.shape[1] > 0
        assert torch.equal(seen["after"][b, skipped], seen["before"][b, skipped])
        assert not torch.equal(seen["after"][b, ~skipped], seen["before"][b, ~skipped])


def test_routed_backward_reaches_every_parameter(tiny_cfg):
    m = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.5))).train()
    out = m(**inputs(tiny_cfg, mask=True, image=True), return_repa=True)
    (out.sample.square().mean() + out.repa_tokens.square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_eval_uses_all_tokens(tiny_cfg):
    m = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.5))).eval()
    out = m(**inputs(tiny_cfg), return_repa=True)
    assert out.keep_ids is None and out.repa_ids is None
    assert out.repa_tokens.shape == (2, 72, tiny_cfg.repa.teacher_dim)


def test_route_across_decoder_boundary_refused(tiny_cfg):
    with pytest.raises(ValueError, match=r"routing.*crosses the encoder->decoder boundary"):
        tiny(tiny_cfg, routing=route(2, 4, 0.5))
    m = randomized(tiny_cfg)
    with pytest.raises(ValueError, match="crosses"):
        m.set_routing(RoutingConfig(3, 5, 0.5))
    assert m.config.routing == tiny_cfg.routing  # a refused change leaves the model as it was


def test_repa_in_decoder_refused(tiny_cfg):
    with pytest.raises(ValueError, match="repa.block"):
        tiny(tiny_cfg, repa=type(tiny_cfg.repa)(block=4, hidden_dim=8, teacher_dim=8))


def test_repa_tokens_inside_and_outside_route(tiny_cfg):
    kw = inputs(tiny_cfg, mask=True)
    inside = randomized(tiny(tiny_cfg, routing=route(1, 3, 0.5))).train()  # repa.block = 2
    out = inside(**kw)
    assert out.repa_tokens is None  # only when asked
    out = inside(**kw, return_repa=True)
    k = num_kept(72, 0.5)
    assert out.repa_tokens.shape == (2, k, tiny_cfg.repa.teacher_dim)
    assert torch.equal(out.repa_ids, out.keep_ids)
    outside = randomized(tiny(tiny_cfg, routing=route(3, 3, 0.5))).train()
    out = outside(**kw, return_repa=True)
    assert out.repa_ids is None and out.repa_tokens.shape == (2, 72, tiny_cfg.repa.teacher_dim)
    # The head sees the block-2 video tokens: same projector on a hooked copy.
    seen = {}
    outside.single_transformer_blocks[0].register_forward_hook(lambda mod, a, o: seen.__setitem__("x", o[0]))
    out = outside(**kw, return_repa=True, route=False)
    torch.testing.assert_close(out.repa_tokens, outside.repa_projector(seen["x"]))
