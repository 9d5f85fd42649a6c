"""Benchmark the activation-checkpointing modes on the full 2B model with fake tensors (CPU).

Per `parallel.ac` mode (none, full, selective) and clip shape, one training forward + backward
of the real `MotifDiT` (bf16, batch 1, text 512, the preset's TREAD route) runs under
`FakeTensorMode`: nothing is allocated, so the 2B model at 720p x 121 runs on a laptop.

- FLOPs: `FlopCounterMode` over forward + backward. "executed / counted" divides the FLOPs a
  mode actually runs (recompute included) by the no-AC forward + backward.
- Memory held for backward, per video token: after the forward, the unique storages created
  during it that are still alive (autograd's saved tensors, checkpoint inputs, the selective
  cache). The `torch.autograd.graph.saved_tensors_hooks` figure, also reported, is the unique
  storages autograd saved: everything for `none`, the checkpoint inputs (a non-reentrant
  checkpoint saves them through a no-op autograd node) and the un-checkpointed root for AC;
  it cannot see selective AC's cache of SDPA outputs, which a dispatch mode holds.
- "counted" uses FlopCounterMode's attention backward (5 matmuls, 2.5x the forward: flash
  recomputes the scores), so it lies 14-16 % above `model_flops` (which counts 2x).
- RMSNorm (the q/k norms) saves what CUDA's fused kernel saves (see `_FusedRMSNorm`), so the
  figures are an H200's, not CPU's decomposition's: with it the no-AC 480p row matches the
  H200's measured routed peak minus weights (bench_model.py) within 2 %.

    python scripts/bench_ac.py --out docs/bench/ac_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from motif_train.distributed.parallelize import apply_ac
from motif_train.models import MotifDiT, RoutingConfig, load_model_config
from motif_train.models.flops import latent_shape, model_flops, num_video_tokens

aten = torch.ops.aten


# FlopCounterMode has formulas for the CUDA fused kernels only; on CPU SDPA dispatches to the
# flash-for-CPU kernel (with the same inputs), and the math backend would hide it from the
# selective policy by decomposing it. Same formulas, wrapped the same way (shapes in).
def _cpu_sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


CPU_SDPA_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_fwd,
                  aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_bwd}


class _FusedRMSNorm(torch.autograd.Function):
    """What CUDA's fused RMSNorm kernel keeps for backward: the input and the fp32 rstd.

    On CPU `F.rms_norm` decomposes (upcast, pow, mean, rsqrt, mul) and autograd keeps two fp32
    copies of every q/k, ~30 % of the no-AC activations at 480p that an H200 never holds.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = gy.float() * weight.float()
        gx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        gw = (gy.float() * xhat).flatten(0, -2).sum(0)
        return gx.to(x.dtype), gw.to(weight.dtype), None


def _rms_norm_like_cuda(self: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return _FusedRMSNorm.apply(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


class StorageTracker(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[StorageWeakRef, int] = {}
        self.before: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                if ref not in self.before:  # views of weights / inputs are not activations
                    self.storages.setdefault(ref, st.nbytes())
        return out

    def exclude(self, tensors) -> None:
        """Storages that existed before the forward (parameters, inputs)."""
        self.before = {StorageWeakRef(t.untyped_storage()) for t in tensors}

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.storages.items() if not ref.expired())


def _build(cfg, mode: str, dtype: torch.dtype) -> MotifDiT:
    # Built in `dtype` directly: `.to()` cannot swap fake parameters in place.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MotifDiT(cfg).train()
    finally:
        torch.set_default_dtype(old)
    apply_ac(model, mode)
    return model


def _inputs(cfg, latent, text_len: int) -> dict:
    f, h, w = latent
    # fp32, as the objective hands them over; the model casts the activations to bf16 itself.
    return dict(hidden_states=torch.randn(1, cfg.in_channels, f, h, w), timestep=torch.rand(1) * 1000,
                encoder_hidden_states=torch.randn(1, text_len, cfg.text_embed_dim))


def measure(cfg, latent, mode: str, *, text_len: int, dtype: torch.dtype, cuda_rms_norm: bool = True) -> dict:
    """FLOPs of forward + backward and bytes held for backward, for one AC mode (fake tensors)."""
    rms_forward = torch.nn.RMSNorm.forward
    if cuda_rms_norm:
        torch.nn.RMSNorm.forward = _rms_norm_like_cuda
    try:
        return _measure(cfg, latent, mode, text_len=text_len, dtype=dtype)
    finally:
        torch.nn.RMSNorm.forward = rms_forward


def _measure(cfg, latent, mode: str, *, text_len: int, dtype: torch.dtype) -> dict:
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _build(cfg, mode, dtype)
        kw = _inputs(cfg, latent, text_len)
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            out = model(**kw).sample
            out.backward(torch.ones_like(out))
        flops = counter.get_total_flops()
        del out

        model = _build(cfg, mode, dtype)
        saved: dict[StorageWeakRef, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            saved.setdefault(StorageWeakRef(st), st.nbytes())
            return t

        tracker = StorageTracker()
        tracker.exclude([*model.parameters(), *model.buffers(), *kw.values()])
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**kw).sample
        held = tracker.live_bytes() - out.untyped_storage().nbytes()  # the output is not an activation
        # Saved weights and inputs existed before the forward: only activations count.
        hook_saved = sum(n for ref, n in saved.items() if ref in tracker.storages)
    return dict(flops=flops, held_bytes=held, hook_saved_bytes=hook_saved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="motif_video_2b")
    ap.add_argument("--shapes", default="81x480x832,121x736x1280", help="pixel clips FxHxW, comma separated")
    ap.add_argument("--modes", default="none,full,selective")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--no-route", action="store_true", help="train without the preset's TREAD route")
    ap.add_argument("--cpu-rms-norm", action="store_true",
                    help="keep CPU's decomposed RMSNorm (default: emulate CUDA's fused kernel's saved tensors)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    cfg = load_model_config(args.preset)
    if args.no_route:
        cfg.routing = RoutingConfig(ratio=0.0)
    route = cfg.routing
    modes = args.modes.split(",")
    if "none" not in modes:
        modes.insert(0, "none")  # the denominator
    rows = []
    for shape in args.shapes.split(","):
        pix = tuple(int(v) for v in shape.split("x"))
        latent = latent_shape(*pix)
        n = num_video_tokens(cfg, latent)
        analytic = model_flops(cfg, latent, text_len=args.text_len, routing=route)
        base = None
        for mode in modes:
            t0 = time.perf_counter()
            r = measure(cfg, latent, mode, text_len=args.text_len, dtype=torch.bfloat16,
                        cuda_rms_norm=not args.cpu_rms_norm)
            base = r["flops"] if mode == "none" else base
            rows.append(dict(shape=shape, tokens=n, mode=mode, flops=r["flops"], ratio=r["flops"] / base,
                             analytic_flops=analytic.total, held_bytes=r["held_bytes"],
                             held_per_video_token=r["held_bytes"] / n,
                             held_per_token=r["held_bytes"] / (n + args.text_len),
                             hook_saved_bytes=r["hook_saved_bytes"], seconds=time.perf_counter() - t0))
            x = rows[-1]
            print(f"{shape:>14} N={n:>7,} {mode:>9}: {x['flops'] / 1e15:8.3f} PFLOP executed, x{x['ratio']:.3f}; "
                  f"held {x['held_bytes'] / 2**30:7.2f} GiB = {x['held_per_video_token'] / 1024:6.1f} KiB / video "
                  f"token (hooks outside checkpoints: {x['hook_saved_bytes'] / 2**30:.2f} GiB) [{x['seconds']:.0f} s]",
                  flush=True)

    print("\n| clip F×H×W | video tokens N | ac | executed ÷ counted FLOPs | held for backward GiB "
          "| KiB / video token |\n|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['shape']} | {x['tokens']:,} | {x['mode']} | {x['ratio']:.3f} | {x['held_bytes'] / 2**30:.2f} "
              f"| {x['held_per_video_token'] / 1024:.1f} |")
    if args.out:
        meta = dict(preset=args.preset, text_len=args.text_len, dtype="bfloat16", batch=1,
                    route=f"{route.start}..{route.end} r={route.ratio}" if route.enabled else "none",
                    torch=torch.__version__, machine=platform.machine(), fake_tensors=True,
                    rms_norm="cpu decomposition" if args.cpu_rms_norm else "CUDA fused kernel emulated",
                    note="executed/counted: FlopCounterMode fwd+bwd with AC over the same without AC; held_bytes: "
                         "storages created in forward still alive after it, minus the output")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
