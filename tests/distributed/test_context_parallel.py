"""Ulysses context parallelism (`parallel.cp`) on two gloo ranks, fp32.

The tiny model (dual blocks, single blocks with the tied Shared Cross-Attention, DDT decoder)
with image tokens, padded text, TREAD and the REPA head: under cp=2 every rank returns the
unsharded model's output and REPA tokens, and the gradients summed over the CP ranks equal cp x
the unsharded ones (the all-gathered loss is counted once per rank; FSDP's average over
dp_shard x cp divides it back, which the trainer-level test checks).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

ROUTES = {"encoder": (1, 3), "decoder": (4, 5)}  # dual -> single (tied K/V) / inside the DDT decoder


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from motif_train.distributed.context_parallel import CPGroup, apply_cp
    from motif_train.models import MotifDiTConfig, RoutingConfig, build_model
    from motif_train.models.config import load_model_config
    from tests.unit._model_utils import inputs

    results = {}
    cfg0 = load_model_config("tiny")
    for name, (start, end) in ROUTES.items():
        cfg = MotifDiTConfig(**{**cfg0.to_dict(), "routing": RoutingConfig(start, end, 0.5).__dict__})
        torch.manual_seed(0)
        ref = build_model(cfg)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.2)
        sharded = build_model(cfg)
        sharded.load_state_dict(ref.state_dict())
        apply_cp(sharded, dist.group.WORLD)
        kw = inputs(cfg, mask=True, image=True)  # 72 video tokens, sample 0 with 3 of 7 text tokens
        g = torch.Generator().manual_seed(7)
        kw["keep_ids"] = torch.stack([torch.randperm(72, generator=g)[:36].sort().values for _ in range(2)])
        outs, seen = {}, {}
        for tag, model in (("ref", ref), ("cp", sharded)):
            model.train()
            hook = model.transformer_blocks[0].register_forward_pre_hook(
                lambda m, a, tag=tag, seen=seen: seen.update({tag: a[0].shape[1]}))
            out = model(**kw, return_repa=True)
            hook.remove()
            (out.sample.square().mean() + out.repa_tokens.square().mean()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            outs[tag] = (out.sample.detach(), out.repa_tokens.detach(), grads)
        ref_out, ref_repa, ref_g = outs["ref"]
        cp_out, cp_repa, cp_g = outs["cp"]
        summed = {}
        for n, gr in cp_g.items():
            dist.all_reduce(gr)
            summed[n] = gr
        results[name] = {
            "out": (cp_out - ref_out).abs().max().item(), "repa": (cp_repa - ref_repa).abs().max().item(),
            "grad": max(((summed[n] / 2 - ref_g[n]).abs().max() / ref_g[n].abs().max().clamp_min(1e-12)).item()
                        for n in ref_g),
            "grad_names": (set(summed) == set(ref_g), len(ref_g)),
            "tokens": (seen["ref"], seen["cp"]),  # a block's video tokens: N, and N/cp on this rank
        }
    # the sequence split itself: chunk / gather round trip and the all-to-all pair are inverses
    cp = CPGroup(dist.group.WORLD)
    t = torch.arange(2 * 8 * 4 * 3, dtype=torch.float32).view(2, 8, 4, 3)
    local = cp.chunk(t)
    results["roundtrip"] = (torch.equal(cp.gather(local), t), torch.equal(cp.heads_to_seq(cp.seq_to_heads(local)),
                                                                          local))
    results["heads"] = torch.equal(cp.seq_to_heads(local), t[:, :, rank * 2:(rank + 1) * 2])
    torch.save(results, os.path.join(out_dir, f"cp_{rank}.pt"))
    dist.destroy_process_group()


def test_cp2_equals_the_unsharded_model(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"cp_{rank}.pt", weights_only=True)
        assert res["roundtrip"] == (True, True) and res["heads"]
        for name in ROUTES:
            r = res[name]
            print(f"\nrank {rank} route {name}: max |out - ref| {r['out']:.2e}, |repa - ref| {r['repa']:.2e}, "
                  f"max relative grad error {r['grad']:.2e} over {r['grad_names'][1]} tensors")
            assert r["grad_names"][0] and r["tokens"] == (72, 36)
            assert r["out"] <= 1e-5 and r["repa"] <= 1e-5
            assert r["grad"] <= 1e-5


def test_bad_degree_fails_naming_the_key():
    from motif_train.distributed.context_parallel import check_cp_degree

    with pytest.raises(ValueError, match=r"parallel.cp=5: .*12 attention heads.*\[2, 3, 4, 6, 12\]"):
        check_cp_degree(5, 12)
    with pytest.raises(ValueError, match=r"parallel.cp=0"):
        check_cp_degree(0, 12)
