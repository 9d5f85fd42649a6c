"""The attention path (`model.attention_backend`): every backend runs here gives the numbers of
attention over each sample's real keys only, and a mask reaches attention only where a
micro-batch really has padding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from motif_train.batch import Batch
from motif_train.models import RoutingConfig
from motif_train.models.attention_backends import (
    activate_flash_impl,
    attend,
    build_key_masks,
    check_backend,
    decoder_key_masks,
    prefix_block_mask,
)
from motif_train.models.kernel_reference import cpu_reference_kernels, varlen_reference
from motif_train.objectives.objective import DiffusionObjective, ObjectiveConfig

from ._model_utils import inputs, randomized, tiny

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# flex and varlen train only on CUDA (refused on CPU, tested below); their math runs here through the
# CPU references with the kernels' contracts (models/kernel_reference.py): flex's higher-order op in
# its dense form, varlen per packed segment with NaN where the kernel leaves gradient rows unwritten.
BACKENDS = ("sdpa", "flex", "varlen")


@pytest.fixture(autouse=True)
def _reference_kernels():
    with cpu_reference_kernels():
        yield


def _grads(out, params):
    """d(out . w)/d params for a fixed pseudo-random cotangent w (every output element matters)."""
    w = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    return torch.autograd.grad((out * w).sum(), params, retain_graph=True, allow_unused=True)


def _per_sample(q, k, v, used):
    """Reference: each sample attends to its first `used[b]` keys, no mask anywhere."""
    outs = []
    for b, n in enumerate(used):
        o = F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k[b:b + 1, :n].transpose(1, 2),
                                           v[b:b + 1, :n].transpose(1, 2))
        outs.append(o.transpose(1, 2).flatten(2))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_masks_equal_attention_over_real_keys(backend):
    """Forward and backward equal attention over each sample's real keys (fp64), for the joint keys
    [video | image | text] and the cross-attention's text-only keys; padded keys get zero gradient
    (varlen: the packed buffer's unused tail never leaks the kernel's unwritten rows)."""
    # 300 video + 5 image keys, text of width 70 with 70 / 3 / 40 real tokens: joint keys span
    # three 128-blocks, so the flex mask has full, partial and skipped blocks.
    torch.manual_seed(0)
    n, i, t, lens = 300, 5, 70, (70, 3, 40)
    text_mask = torch.arange(t)[None] < torch.tensor(lens)[:, None]  # (B, T)
    q, k, v = (torch.randn(3, n + i + t, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    masks = build_key_masks(backend, text_mask, n, i, torch.float64)
    joint = attend(q, k, v, masks.joint, backend)  # (B, N+I+T, H*Dh)
    ref = _per_sample(q, k, v, [n + i + m for m in lens])
    torch.testing.assert_close(joint, ref, rtol=0, atol=1e-12)
    for got, want in zip(_grads(joint, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dk = _grads(joint, (k,))[0]
    assert (dk[1, n + i + 3:] == 0).all() and dk[1, :n + i + 3].abs().sum() > 0
    qc, kc, vc = q[:, :n], k[:, n + i:], v[:, n + i:]
    cross = attend(qc, kc, vc, masks.cross, backend)  # (B, N, H*Dh)
    ref = _per_sample(qc, kc, vc, lens)
    torch.testing.assert_close(cross, ref, rtol=0, atol=1e-12)
    for got, want in zip(_grads(cross, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _over_visible(q, k, v, visible):
    """Reference: each sample attends to the keys `visible[b]` (a bool row) selects, no mask anywhere."""
    outs = []
    for b in range(q.shape[0]):
        kk, vv = k[b:b + 1, visible[b]], v[b:b + 1, visible[b]]
        o = F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
        outs.append(o.transpose(1, 2).flatten(2))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["text", "no-text-mask", "decoder"])
def test_cp_pad_keys_are_masked_wherever_they_sit(backend, layout):
    """Context parallelism's pad keys sit in the middle of the joint keys, [video | pad | image | text]
    (DDT decoder: [video | pad | encoder video | pad]): every backend equals attention over the real
    keys only (fp64, forward and backward), with or without padded text, and the pad keys get exactly
    zero gradient (varlen packs the visible keys around the hole, in order)."""
    torch.manual_seed(0)
    b, n, pad, i, t = 3, 250, 6, 5, 70  # 250 + 6 crosses the 128-key flex block boundary at 256
    lens = (70, 3, 40)
    text_mask = torch.arange(t)[None] < torch.tensor(lens)[:, None]  # (B, T)
    video = torch.arange(n + pad) < n  # (N + pad,)
    if layout == "decoder":
        masks = decoder_key_masks(backend, n, pad, b, torch.float64)
        visible = torch.cat([video, video])[None].expand(b, -1)
    else:
        tm = text_mask if layout == "text" else None
        masks = build_key_masks(backend, tm, n, i, torch.float64, video_pad=pad, n_text=t, batch=b)
        visible = torch.cat([video[None].expand(b, -1), torch.ones(b, i, dtype=torch.bool),
                             text_mask if layout == "text" else torch.ones(b, t, dtype=torch.bool)], 1)
        assert (masks.cross is None) == (layout != "text")
    s_k = visible.shape[1]
    q, k, v = (torch.randn(b, s_k, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with torch.no_grad():  # large pad keys / values: any leak would show
        for x in (k, v):
            x[~visible] = 1e3
    joint = attend(q, k, v, masks.joint, backend)
    ref = _over_visible(q, k, v, visible)
    torch.testing.assert_close(joint, ref, rtol=0, atol=1e-12)
    for got, want in zip(_grads(joint, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dk, dv = _grads(joint, (k, v))
    assert (dk[~visible] == 0).all() and (dv[~visible] == 0).all() and dk[visible].abs().sum() > 0
    assert build_key_masks(backend, None, n, i, torch.float64, video_pad=0) is None  # nothing to mask
    assert decoder_key_masks(backend, n, 0, b, torch.float64) is None


def test_varlen_packs_visible_keys_with_real_offsets():
    """Keys of 3 samples x 6 with 6 / 2 / 4 visible: packed rows are each sample's visible keys in
    order, cu_seq_k = [0, 6, 8, 12], the 6 tail rows are marked unused; and the reference kernel
    does leave NaN in their gradient, which is what the packing's zeroing guards against."""
    key_mask = torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]
    keys = build_key_masks("varlen", key_mask, 0, 0, torch.float32).cross
    assert keys.cu_k.tolist() == [0, 6, 8, 12] and keys.cu_k.dtype == torch.int32
    assert keys.index[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    assert keys.valid.tolist() == [True] * 12 + [False] * 6
    q, k, v = (torch.randn(18, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 6, 12, 18], dtype=torch.int32)
    out = varlen_reference(q, k, v, cu, keys.cu_k, 6, 6)
    dk = torch.autograd.grad(out.sum(), k)[0]
    assert torch.isnan(dk[12:]).all() and not torch.isnan(dk[:12]).any()
    with pytest.raises(ValueError, match="above max_q=6 / max_k=3"):
        varlen_reference(q, k, v, cu, keys.cu_k, 6, 3)


def test_varlen_trains_where_seqused_k_cannot():
    """The real `varlen_attn` op (its fake kernel, under FakeTensorMode) refuses `seqused_k` in
    training; the packed layout this backend passes instead traces forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention.varlen import varlen_attn

    from motif_train.models import attention_backends

    with cpu_reference_kernels(varlen=False), FakeTensorMode():
        assert attention_backends.varlen_kernel is not varlen_reference
        q, k, v = (torch.randn(2, 40, 2, 16, requires_grad=True) for _ in range(3))
        text_mask = torch.ones(2, 8, dtype=torch.bool)
        with pytest.raises(RuntimeError, match="seqused_k is an inference-only parameter"):
            cu = torch.tensor([0, 40, 80], dtype=torch.int32)
            varlen_attn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 40, 40,
                        seqused_k=torch.tensor([35, 40], dtype=torch.int32))
        masks = build_key_masks("varlen", text_mask, 30, 2, torch.float32)
        out = attend(q, k, v, masks.joint, "varlen")  # (B, S, H*Dh)
        out.sum().backward()
        assert out.shape == (2, 40, 32) and k.grad.shape == k.shape


def test_block_mask_lists_full_and_partial_blocks():
    """Keys 375 = blocks of 128, 128, 119: a row with 308 visible keys has 2 full blocks and 1 partial;
    one with every key visible has 3 full; one with 100 has none full, 1 partial, 2 skipped."""
    key_mask = torch.arange(375)[None] < torch.tensor([308, 375, 100])[:, None]
    bm = prefix_block_mask(key_mask, q_len=375)
    assert bm.full_kv_num_blocks[:, 0, 0].tolist() == [2, 3, 0]
    assert bm.kv_num_blocks[:, 0, 0].tolist() == [1, 0, 1]
    assert bm.kv_indices[0, 0, 0, 0].item() == 2 and bm.kv_indices[2, 0, 0, 0].item() == 0
    assert bm.full_kv_indices[0, 0, 0, :2].tolist() == [0, 1]
    assert tuple(bm.shape) == (3, 1, 375, 375)


def test_sdpa_mask_is_additive_and_16_aligned():
    """One fp mask per layout in the compute dtype, stored 16-wide so SDPA never re-pads it per call."""
    text_mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    masks = build_key_masks("sdpa", text_mask, 30, 5, torch.bfloat16)
    assert masks.joint.dtype == torch.bfloat16 and masks.joint.shape == (2, 1, 1, 42)
    assert masks.joint.stride(0) % 16 == 0 and masks.cross.stride(0) % 16 == 0
    assert torch.isinf(masks.joint[0, 0, 0, 40:]).all() and (masks.joint[1] == 0).all()


@pytest.mark.parametrize("routing", [None, RoutingConfig(1, 3, 0.5)])
def test_model_backends_equal_and_padding_never_leaks(tiny_cfg, routing):
    """The full tiny model (dual, single + Shared Cross-Attention, DDT decoder, TREAD, I2V image
    tokens, padded text) in fp64: flex and varlen give sdpa's output and every parameter's gradient,
    and each padded sample equals that sample run alone on its real caption without any mask."""
    cfg = tiny(tiny_cfg, routing=routing) if routing else tiny_cfg
    kw = inputs(cfg, mask=True, image=True)  # sample 0 has 3 of 7 text tokens, sample 1 all 7
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    ids = torch.stack([torch.randperm(72, generator=torch.Generator().manual_seed(b))[:36].sort().values
                       for b in range(2)]) if routing else None
    outs, grads = {}, {}
    for backend in BACKENDS:
        m = randomized(tiny(cfg, attention_backend=backend)).double().train()
        outs[backend] = m(**kw, keep_ids=ids).sample
        names, params = zip(*m.named_parameters(), strict=True)
        grads[backend] = dict(zip(names, _grads(outs[backend], params), strict=True))
    with torch.no_grad():
        real = int(kw["encoder_attention_mask"][0].sum())
        alone = {k: v[:1] for k, v in kw.items() if k != "encoder_attention_mask"}
        alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :real]
        solo = randomized(cfg).double().train()(**alone, keep_ids=None if ids is None else ids[:1]).sample
    for backend in ("flex", "varlen"):
        torch.testing.assert_close(outs[backend], outs["sdpa"], rtol=0, atol=1e-10)
        for name, g in grads["sdpa"].items():  # None: a parameter the output does not use (REPA head)
            assert (g is None) == (grads[backend][name] is None), name
            if g is not None:
                torch.testing.assert_close(grads[backend][name], g, rtol=1e-9, atol=1e-9,
                                           msg=f"{backend}: {name}")
    assert grads["sdpa"]["image_embedder.linear_1.weight"].abs().sum() > 0  # the I2V tokens were trained
    torch.testing.assert_close(outs["sdpa"][:1], solo, rtol=0, atol=1e-10)
    assert not torch.allclose(outs["sdpa"][1:], solo)  # sample 1's caption is longer: a real difference


class MaskedCalls(TorchFunctionMode):
    """Counts F.scaled_dot_product_attention calls with and without an attn_mask."""

    def __init__(self) -> None:
        super().__init__()
        self.masked = self.unmasked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if kwargs.get("attn_mask") is not None:
                self.masked += 1
            else:
                self.unmasked += 1
        return func(*args, **kwargs)


def _batch(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    text = torch.randn(b, width, 32, generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return Batch(latents=torch.randn(b, 16, 3, 8, 12, generator=g), text=text * mask[..., None], text_mask=mask)


# Tiny preset: 2 dual blocks (1 attention each) + 2 encoder single blocks (self + cross) see text;
# the 2 DDT decoder blocks attend video to video and never get a mask.
TEXT_CALLS, DECODER_CALLS = 6, 2
EMPTY = (torch.randn(2, 32), torch.ones(2, dtype=torch.bool))  # "" -> 2 real tokens


@pytest.mark.parametrize("lengths, width, dropout, pad_to, keep, masked, text_tokens", [
    ((5, 3), 8, 0.0, None, False, True, 5),      # real padding (narrowed to the longest, 5): masked
    ((8, 8), 8, 0.0, None, False, False, 8),     # nothing padded: no mask at all
    ((8, 8), 8, 0.0, None, True, True, 8),       # compiled sdpa keeps the mask (one graph)
    ((8,), 8, 1.0, None, False, False, 2),       # batch 1, caption dropped: the empty prompt's 2 tokens
    ((8, 8), 8, 1.0, [4, 8], False, True, 4),    # both dropped, pad lengths [4, 8]: 2 real of 4
    ((6, 3), 16, 0.0, [8, 16], False, True, 8),  # wider than the pad length needs: narrowed to 8
])
def test_mask_only_where_real_padding(tiny_cfg, lengths, width, dropout, pad_to, keep, masked, text_tokens):
    model = randomized(tiny_cfg).train()
    obj = DiffusionObjective(ObjectiveConfig(conditioning={"text_dropout": dropout, "i2v_prob": 0.0},
                                             repa={"weight": 0.0}),
                             empty_text=EMPTY, text_pad_to=pad_to, drop_unpadded_mask=not keep)
    batch = _batch(lengths, width)
    with MaskedCalls() as calls:
        out = obj(model, batch, step=0, generator=torch.Generator().manual_seed(1))
    assert out.text_tokens == text_tokens  # what the FLOP count (MFU) sees
    assert (calls.masked, calls.unmasked) == ((TEXT_CALLS, DECODER_CALLS) if masked
                                              else (0, TEXT_CALLS + DECODER_CALLS))


def test_narrowed_text_gives_the_same_loss(tiny_cfg):
    """Narrowing a padded micro-batch to its pad length (and dropping the mask when nothing is left
    padded) changes the kernel, not the numbers."""
    model = randomized(tiny_cfg).train()
    cfg = ObjectiveConfig(conditioning={"text_dropout": 0.0, "i2v_prob": 0.0}, repa={"weight": 0.0})
    wide = _batch((6, 6), 16)
    losses = []
    for pad_to, drop in ((None, False), ([16], False), ([8, 16], True)):
        obj = DiffusionObjective(cfg, text_pad_to=pad_to, drop_unpadded_mask=drop)
        out = obj(model, copy.copy(wide), step=0, generator=torch.Generator().manual_seed(1))
        losses.append(out.losses["denoise"].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)


def test_unknown_lengths_keep_the_mask(tiny_cfg):
    """A batch built on a device has no host lengths: the mask is always passed (right, maybe slower)."""
    import dataclasses

    batch = _batch((8, 8), 8)
    object.__setattr__(batch, "text_lengths", ())  # as a Batch constructed from device tensors
    obj = DiffusionObjective(ObjectiveConfig(conditioning={"text_dropout": 0.0}, repa={"weight": 0.0}))
    text, mask = obj.text_for_model(batch, [False, False])
    assert mask is not None and text.shape[1] == 8
    assert dataclasses.replace(batch).text_lengths == (8, 8)  # a host mask is re-read on rebuild


def test_bad_backends_fail_clearly(tiny_cfg):
    with pytest.raises(ValueError, match=r"model.attention_backend='fast'.*sdpa, flex, varlen"):
        tiny(tiny_cfg, attention_backend="fast")
    with pytest.raises(ValueError, match=r"model.flash_impl='fa5'"):
        tiny(tiny_cfg, flash_impl="fa5")
    with pytest.raises(ValueError, match=r"attention_backend=varlen .*CUDA only.*backend=sdpa"):
        check_backend("varlen", None, "cpu")
    with pytest.raises(ValueError, match=r"attention_backend=flex: .*no backward on CPU"):
        check_backend("flex", None, "cpu")
    with pytest.raises(ValueError, match=r"flash_impl=fa4 is a CUDA kernel"):
        check_backend("sdpa", "fa4", "cpu")
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"model.flash_impl=fa4 needs flash-attn-4"):
            activate_flash_impl("fa4")
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"model.flash_impl=fa3 needs flash_attn_3"):
            activate_flash_impl("fa3")
    with pytest.raises(ValueError, match=r"flash_impl=fa3 with model.attention_backend=flex"):
        check_backend("flex", "fa3", "cuda")
    check_backend("varlen", "fa4", "cuda")  # a GPU run may pick any kernel for sdpa / varlen
    check_backend("sdpa", "fa3", "cuda")
