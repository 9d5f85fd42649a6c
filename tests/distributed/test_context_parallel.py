"""Ulysses context parallelism (`parallel.cp`) on two gloo ranks, fp32.

The tiny model (dual blocks, single blocks with the tied Shared Cross-Attention, DDT decoder)
with image tokens, padded text, TREAD and the REPA head: under cp=2 every rank returns the
unsharded model's output and REPA tokens, and the gradients summed over the CP ranks equal cp x
the unsharded ones (the all-gathered loss is counted once per rank; FSDP's average over
dp_shard x cp divides it back, which the trainer-level test checks). Also for a bucket whose video
tokens (45) and TREAD kept tokens (23) are odd: the model pads both to a multiple of cp and masks
the pad as keys (sdpa, and flex / varlen through their CPU reference kernels), so the pad changes
nothing, whatever its values.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

ROUTES = {"encoder": (1, 3), "decoder": (4, 5)}  # dual -> single (tied K/V) / inside the DDT decoder
# name -> (route, backend, latent (F, H, W), kept K, padded text): 72 tokens split evenly; 3 x 3 x 5 = 45
# video tokens and 23 kept do not (both padded by one token at cp=2).
CASES = {
    "encoder": ("encoder", "sdpa", (3, 8, 12), 36, True),
    "decoder": ("decoder", "sdpa", (3, 8, 12), 36, True),
    "odd-encoder": ("encoder", "sdpa", (3, 6, 10), 23, True),
    "odd-decoder": ("decoder", "sdpa", (3, 6, 10), 23, True),
    "odd-unrouted-unpadded": (None, "sdpa", (3, 6, 10), None, False),  # only the CP pad is masked
    "odd-flex-encoder": ("encoder", "flex", (3, 6, 10), 23, True),
    "odd-varlen-decoder": ("decoder", "varlen", (3, 6, 10), 23, True),
    "odd-varlen-unpadded": ("encoder", "varlen", (3, 6, 10), 23, False),
}
# tokens a block sees: (unsharded, this CP rank's)
TOKENS = {(3, 8, 12): (72, 36), (3, 6, 10): (45, 23)}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from motif_train.distributed.context_parallel import CPGroup, apply_cp, padded_len
    from motif_train.models import MotifDiTConfig, RoutingConfig, build_model
    from motif_train.models.config import load_model_config
    from motif_train.models.kernel_reference import cpu_reference_kernels
    from tests.unit._model_utils import inputs, randomized

    results = {}
    cfg0 = load_model_config("tiny")
    for name, (route, backend, (f, h, w), k, padded) in CASES.items():
        start, end = ROUTES[route] if route else (1, 3)
        cfg = MotifDiTConfig(**{**cfg0.to_dict(), "attention_backend": backend,
                                "routing": RoutingConfig(start, end, 0.5 if route else 0.0).__dict__})
        ref = randomized(cfg)  # seed 0, N(0, 0.2)
        sharded = build_model(cfg)
        sharded.load_state_dict(ref.state_dict())
        cp = apply_cp(sharded, dist.group.WORLD)
        if name.startswith("odd"):  # pad with 5.0, not zeros: whatever its values, the pad changes nothing
            def loud_pad(t, dim=1, size=cp.size):
                extra = padded_len(t.shape[dim], size) - t.shape[dim]
                return torch.cat([t, t.new_full((*t.shape[:dim], extra, *t.shape[dim + 1:]), 5.0)], dim)
            cp.pad = loud_pad
        kw = inputs(cfg, f=f, h=h, w=w, mask=padded, image=True)  # sample 0 with 3 of 7 text tokens if padded
        if k is not None:
            g = torch.Generator().manual_seed(7)
            n_tok = TOKENS[(f, h, w)][0]
            kw["keep_ids"] = torch.stack([torch.randperm(n_tok, generator=g)[:k].sort().values for _ in range(2)])
        outs, seen = {}, {}
        with cpu_reference_kernels():
            for tag, model in (("ref", ref), ("cp", sharded)):
                model.train()
                hook = model.transformer_blocks[0].register_forward_pre_hook(
                    lambda m, a, tag=tag, seen=seen: seen.update({tag: a[0].shape[1]}))
                out = model(**kw, return_repa=True)
                hook.remove()
                (out.sample.square().mean() + out.repa_tokens.square().mean()).backward()
                grads = {pn: p.grad.clone() for pn, p in model.named_parameters() if p.grad is not None}
                outs[tag] = (out.sample.detach(), out.repa_tokens.detach(), grads)
        ref_out, ref_repa, ref_g = outs["ref"]
        cp_out, cp_repa, cp_g = outs["cp"]
        for gr in cp_g.values():
            dist.all_reduce(gr)
        summed = cp_g
        results[name] = {
            "shapes": (cp_out.shape == ref_out.shape, cp_repa.shape == ref_repa.shape, tuple(ref_repa.shape)),
            # relative to the largest value (|out| ~ 7, |repa| ~ 30-65 with these N(0, 0.2) weights): a pad
            # changes the kernels' key count, so fp32 sums round differently (fp64: ~1e-15)
            "out": ((cp_out - ref_out).abs().max() / ref_out.abs().max()).item(),
            "repa": ((cp_repa - ref_repa).abs().max() / ref_repa.abs().max()).item(),
            "grad": max(((summed[n] / 2 - ref_g[n]).abs().max() / ref_g[n].abs().max().clamp_min(1e-12)).item()
                        for n in ref_g),
            "grad_names": (set(summed) == set(ref_g), len(ref_g)),
            "tokens": (seen["ref"], seen["cp"]),  # a block's video tokens: N, and N'/cp on this rank
        }
    kw = inputs(cfg0, mask=True, image=True)  # 72 video tokens, sample 0 with 3 of 7 text tokens
    g = torch.Generator().manual_seed(7)
    kw["keep_ids"] = torch.stack([torch.randperm(72, generator=g)[:36].sort().values for _ in range(2)])
    # Under AC: gradients unchanged; selective AC with parallel.ac_save_collectives (attention and CP
    # collectives saved) re-sends nothing in backward: one all-to-all per forward one (its gradient);
    # full AC and selective without it two (the recompute sends them again).
    from torch.utils._python_dispatch import TorchDispatchMode

    from motif_train.distributed.parallelize import apply_ac

    class A2A(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops._c10d_functional.all_to_all_single.default:
                A2A.n += 1
            return func(*args, **(kwargs or {}))

    cfg = MotifDiTConfig(**{**cfg0.to_dict(), "routing": RoutingConfig(1, 3, 0.5).__dict__})
    for ac, keep in (("full", False), ("selective", True), ("selective", False)):
        m = randomized(cfg)
        ref_g = None
        if ac == "full":
            ref = build_model(cfg)
            ref.load_state_dict(m.state_dict())
            ref.train()(**kw, return_repa=True).sample.square().mean().backward()
            ref_g = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        apply_ac(m, ac, save_collectives=keep)
        apply_cp(m, dist.group.WORLD)
        m.train()
        A2A.n = 0
        with A2A():
            out = m(**kw, return_repa=True).sample.square().mean()
        fwd = A2A.n
        A2A.n = 0
        with A2A():
            out.backward()
        results[f"a2a_{ac}{'_keep' if keep else ''}"] = (fwd, A2A.n)
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()
                 if p.grad is not None}
        for g in grads.values():
            dist.all_reduce(g)
        if ref_g is not None:
            results["ac_grad"] = max(((grads[n] / 2 - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                                     for n, g in ref_g.items())
    # the sequence split itself: chunk / gather round trip and the all-to-all pair are inverses
    cp = CPGroup(dist.group.WORLD)
    t = torch.arange(2 * 8 * 4 * 3, dtype=torch.float32).view(2, 8, 4, 3)
    local = cp.chunk(t)
    results["roundtrip"] = (torch.equal(cp.gather(local), t), torch.equal(cp.heads_to_seq(cp.seq_to_heads(local)),
                                                                          local))
    results["heads"] = torch.equal(cp.seq_to_heads(local), t[:, :, rank * 2:(rank + 1) * 2])
    odd = t[:, :7]
    padded = cp.pad(odd)  # 7 tokens -> 8: zeros appended, then split 4 / 4
    results["pad"] = (cp.pad(t) is t, tuple(padded.shape), torch.equal(padded[:, :7], odd),
                      bool((padded[:, 7:] == 0).all()), torch.equal(cp.gather(cp.chunk(padded))[:, :7], odd))
    try:
        cp.chunk(odd)
        results["chunk_error"] = ""
    except ValueError as e:
        results["chunk_error"] = str(e)
    torch.save(results, os.path.join(out_dir, f"cp_{rank}.pt"))
    dist.destroy_process_group()


def test_cp2_model_equals_the_unsharded_model(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"cp_{rank}.pt", weights_only=True)
        assert res["roundtrip"] == (True, True) and res["heads"]
        fwd, bwd = res["a2a_selective_keep"]
        print(f"\nall-to-alls forward / backward: full AC {res['a2a_full']}, selective {res['a2a_selective']}, "
              f"selective + ac_save_collectives {res['a2a_selective_keep']}")
        assert fwd > 0 and bwd == fwd and res["a2a_full"] == res["a2a_selective"] == (fwd, 2 * fwd)
        assert res["ac_grad"] <= 1e-5
        assert res["pad"] == (True, (2, 8, 4, 3), True, True, True)
        assert "parallel.cp=2: chunk got a sequence of 7 tokens, not a multiple of 2; pad" in res["chunk_error"]
        for name, (route, _, latent, k, _) in CASES.items():
            r = res[name]
            print(f"\nrank {rank} case {name}: relative max |out - ref| {r['out']:.2e}, |repa - ref| {r['repa']:.2e}, "
                  f"grad {r['grad']:.2e} over {r['grad_names'][1]} tensors")
            n, per_rank = TOKENS[latent]
            repa = k if route == "encoder" else n  # REPA block 2 lies in the encoder route: its kept tokens only
            assert r["shapes"] == (True, True, (2, repa, 32)), (name, r["shapes"])  # the pad cut off
            assert r["grad_names"][0] and r["tokens"] == (n, per_rank), (name, r["tokens"])
            assert r["out"] <= 1e-5 and r["repa"] <= 1e-5, name
            assert r["grad"] <= 1e-5, name


def test_bad_degree_fails_naming_the_key():
    from motif_train.distributed.context_parallel import check_cp_degree

    with pytest.raises(ValueError, match=r"parallel.cp=5: .*12 attention heads.*\[2, 3, 4, 6, 12\]"):
        check_cp_degree(5, 12)
    with pytest.raises(ValueError, match=r"parallel.cp=0"):
        check_cp_degree(0, 12)


# ---------------------------------------------------------------------------- the real trainer


def _close(a: dict, b: dict, steps, tol: float = 1e-5) -> None:
    for s in steps:
        for k in ("loss/denoise", "loss/repa", "loss/total", "grad_norm"):
            if k in a[s] or k in b[s]:
                assert abs(a[s][k] - b[s][k]) <= tol * max(1.0, abs(b[s][k])), (s, k, a[s][k], b[s][k])
        assert a[s]["samples"] == b[s]["samples"] and a[s]["stage"] == b[s]["stage"], s


def _from_checkpoint(src, dst, step: int):
    """A copy of run `src` as it was when checkpoint `step` was its newest (later ones removed)."""
    import shutil

    from ._runs import ckpt_dir

    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").iterdir():
        if ck.name > ckpt_dir(dst, step).name:
            shutil.rmtree(ck)
    return dst


# Buckets whose token counts do not split over cp=2: stage 0 (REPA, dual->single route, r=0.5) draws
# 9x48x80 = 3x3x5 = 45 video tokens (22 kept) and 5x112x80 = 2x7x5 = 70 (35 kept), stage 1 (decoder
# route, r=0.25) 9x80x112 = 3x5x7 = 105 (79 kept): the model pads each to a multiple of cp.
ODD = ["curriculum.stages.0.buckets=[[9,48,80],[5,112,80]]", "curriculum.stages.1.buckets=[[9,80,112]]"]
ODD_TOKENS = {180, 280, 210}  # per step: 4 x 45, 4 x 70, 2 x 105 real tokens, never the padded counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ._runs import train

    one = tmp_path_factory.mktemp("cp1")
    train(one, 1, *ODD)  # 12 steps, 2 stages, TREAD (dual->single, then decoder) and REPA in stage 0
    two = tmp_path_factory.mktemp("cp2")
    p = train(two, 2, "parallel.cp=2", *ODD)
    return one, two, p


def test_cp2_run_follows_the_one_rank_run(runs):
    """Same data (one data-parallel rank either way), same draws, every step's losses and grad norm
    within 1e-5, on buckets whose video and TREAD-kept token counts are odd (padded to cp inside the
    model); samples and tokens counted once per CP group, not per rank, and without the pad."""
    from ._runs import records

    one, two, p = runs
    a, b = records(one), records(two)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert "loss/repa" in b[6] and "loss/repa" not in b[7]
    _close(b, a, range(1, 13))
    assert [b[s]["tokens"] for s in b] == [a[s]["tokens"] for s in a] and {b[s]["tokens"] for s in b} == ODD_TOKENS
    from ._runs import events

    start = [e for e in events(two) if e["event"] == "start"][0]
    assert start["cp"] == 2 and start["world_size"] == 2  # the sequence really was split over 2 ranks


@pytest.mark.parametrize("first, then", [("cp2", "cp1"), ("cp1", "cp2")])
def test_checkpoint_resumes_across_cp_degrees(runs, tmp_path, first, then):
    """A checkpoint written at one CP degree resumes at the other (DCP reshards over dp_shard x cp)
    and the remaining steps equal the uninterrupted run's."""
    from ._runs import ckpt_dir, records, train

    one, two, _ = runs
    src = two if first == "cp2" else one
    run = _from_checkpoint(src, tmp_path / "run", 6)
    p = train(run, *((1,) if then == "cp1" else (2, "parallel.cp=2")), *ODD)
    assert "resumed_from=" + str(ckpt_dir(run, 6)) in p.stdout
    _close(records(run), records(one), range(7, 13))


def test_volume_formula():
    from motif_train.distributed.context_parallel import ulysses_bytes

    # 8 video tokens, 4 context tokens, dim 4, bf16, cp 2: 4 all-to-alls of (4 x 4 x 2 B) half sent = 64,
    # the context's heads (4 x 2 x 2 B) to one peer = 16.
    assert ulysses_bytes(8, 4, 4, 2) == 80 and ulysses_bytes(8, 4, 4, 1) == 0
    assert ulysses_bytes(8, 8, 4, 2, ctx_sharded=True) == 128
    # 7 video tokens are sent as the 8 of the padded sequence (the decoder's sharded context too)
    assert ulysses_bytes(7, 4, 4, 2) == 80 and ulysses_bytes(7, 7, 4, 2, ctx_sharded=True) == 128
