"""CPU stand-ins for the GPU attention kernels, with the kernels' contracts, for tests and GPU-check prep.

`model.attention_backend=flex` and `varlen` train only on CUDA: varlen's flash kernel has no CPU build
and FlexAttention's front end refuses a CPU backward. Their *math* is still checkable here:

    varlen_reference  `varlen_attn`'s contract over packed (total, H, Dh) rows and cu_seq offsets,
                      computed segment by segment with SDPA. Its backward writes NaN into every
                      key / value row outside all segments: the worst a flash kernel may leave in
                      memory it never visits (the real op allocates its grads with empty_like), so
                      a caller that lets such rows reach a parameter's gradient fails loudly.
    cpu_reference_kernels()
                      routes `attention_backends`' varlen calls to `varlen_reference` and lets flex
                      run backward on CPU through its higher-order op's dense reference (the same
                      op a compiled call traces; only the eager front end's device check refuses).

Never used by training: `check_backend` still refuses flex / varlen off CUDA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    q, k = cu_q.tolist(), cu_k.tolist()  # host reads: a reference, not a kernel
    if len(q) != len(k):
        raise ValueError(f"cu_seq_q has {len(q)} offsets, cu_seq_k {len(k)}: one segment each")
    return [(q[i], q[i + 1], k[i], k[i + 1]) for i in range(len(q) - 1)]


def _attend_segments(q, k, v, segs, scale):
    out = torch.zeros_like(q)
    for q0, q1, k0, k1 in segs:
        if q1 > q0 and k1 > k0:
            o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                               v[k0:k1].transpose(0, 1), scale=scale)  # (H, Sq_i, Dh)
            out[q0:q1] = o.transpose(0, 1)
    return out


class _VarlenReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale):
        segs = _segments(cu_q, cu_k)
        ctx.save_for_backward(q, k, v)
        ctx.segs, ctx.scale = segs, scale
        return _attend_segments(q, k, v, segs, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = _attend_segments(qq, kk, vv, ctx.segs, ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), grad)
        # Rows no segment covers: unwritten by a real kernel. NaN makes any use of them visible.
        seen_q = torch.zeros(q.shape[0], dtype=torch.bool)
        seen_k = torch.zeros(k.shape[0], dtype=torch.bool)
        for q0, q1, k0, k1 in ctx.segs:
            seen_q[q0:q1], seen_k[k0:k1] = True, True
        dq = dq.masked_fill(~seen_q[:, None, None], float("nan"))
        dk = dk.masked_fill(~seen_k[:, None, None], float("nan"))
        dv = dv.masked_fill(~seen_k[:, None, None], float("nan"))
        return dq, dk, dv, None, None, None


def varlen_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                     cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: float | None = None,
                     **unsupported) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn` on CPU: query (Tq, H, Dh), key / value (Tk, H, Dh),
    cu_seq_q / cu_seq_k (S+1,) int32 offsets -> (Tq, H, Dh). Segment i's queries attend to segment i's
    keys only; `max_q` / `max_k` must bound every segment, as the kernel requires."""
    if unsupported:
        raise TypeError(f"varlen_reference: {sorted(unsupported)} not modelled (the training path passes none)")
    for i, (q0, q1, k0, k1) in enumerate(_segments(cu_seq_q, cu_seq_k)):
        if q1 - q0 > max_q or k1 - k0 > max_k:
            raise ValueError(f"segment {i} has {q1 - q0} queries / {k1 - k0} keys, above max_q={max_q} / "
                             f"max_k={max_k}: the kernel would read out of range")
    return _VarlenReference.apply(query, key, value, cu_seq_q, cu_seq_k, scale)


@contextlib.contextmanager
def cpu_reference_kernels(*, varlen: bool = True, flex: bool = True):
    """Within: varlen attention runs `varlen_reference`, flex may run backward on CPU (dense reference).

    `varlen=False` keeps the real `varlen_attn` op: under FakeTensorMode that is its fake kernel, the
    op's own shape / argument contract (what the contract suite traces)."""
    import torch.nn.attention.flex_attention as flex_mod

    from . import attention_backends

    saved = attention_backends.varlen_kernel, flex_mod._validate_device
    try:
        attention_backends.varlen_kernel = varlen_reference if varlen else attention_backends._varlen_attn
        if flex:
            flex_mod._validate_device = lambda query, key, value: None
        yield
    finally:
        attention_backends.varlen_kernel, flex_mod._validate_device = saved
