"""FSDP2 on the real DiT with 2 gloo ranks: sharded DTensors, tied K/V kept in their block,
outputs and gradients equal to the unsharded model, AC and compile do not change results."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from motif_train.distributed import ParallelConfig, parallelize_model
    from motif_train.distributed.mesh import DistInfo, build_mesh
    from motif_train.models import RoutingConfig, build_model, load_model_config

    info = DistInfo(rank, world, rank, world, torch.device("cpu"))
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    ref = build_model(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 33, 3, 8, 12, generator=g)
    kw = dict(timestep=torch.tensor([100.0, 700.0]), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
              encoder_attention_mask=torch.ones(2, 7, dtype=torch.long))
    results = {}
    for name, pcfg in [("fsdp", ParallelConfig()), ("fsdp_ac", ParallelConfig(ac="full")),
                       ("fsdp_ac_every2", ParallelConfig(ac="every_k", ac_every=2)),
                       ("hsdp_2x1", ParallelConfig(dp_replicate=2, dp_shard=1))]:
        model = build_model(cfg, device="meta")
        parallelize_model(model, pcfg, build_mesh(pcfg, info), info.device)
        model.to_empty(device="cpu")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from motif_train.models.convert import drop_tied_duplicates

        set_model_state_dict(model, drop_tied_duplicates(ref.state_dict(), cfg),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        params = list(model.parameters())
        expect = (Replicate(), Shard(0)) if pcfg.dp_replicate > 1 else (Shard(0),)  # HSDP: 2-D mesh
        assert all(isinstance(p, DTensor) and p.placements == expect for p in params), name
        blk = model.single_transformer_blocks[0]
        assert blk.cross_attn.to_k is blk.attn.to_k  # the tie survives wrapping and sharding
        out = model(x, **kw, route=False).sample
        out.square().mean().backward()
        ref.zero_grad()
        ref_out = ref(x, **kw, route=False).sample
        ref_out.square().mean().backward()
        results[name] = (out - ref_out).abs().max().item()
        ref_grads = dict(ref.named_parameters())
        worst = 0.0
        for n, p in model.named_parameters():
            clean = n.replace("_checkpoint_wrapped_module.", "")
            if ref_grads[clean].grad is None:  # unused here (REPA head, image embedder): none on either side
                assert p.grad is None, n
                continue
            worst = max(worst, (p.grad.full_tensor() - ref_grads[clean].grad).abs().max().item())
        results[name + "_grad"] = worst
        # Routing under FSDP: same ids, same result as the unsharded model.
        model.set_routing(RoutingConfig(1, 3, 0.5))
        ref.set_routing(RoutingConfig(1, 3, 0.5))
        ids = torch.stack([torch.randperm(72, generator=g)[:36].sort().values for _ in range(2)])
        results[name + "_routed"] = (model.train()(x, **kw, keep_ids=ids).sample
                                     - ref.train()(x, **kw, keep_ids=ids).sample).abs().max().item()
        model.set_routing(None)
        ref.set_routing(None)
    # Sharded init: each rank keeps its shard of the same full draw -> equals the unsharded init.
    sharded = build_model(cfg, device="meta")
    parallelize_model(sharded, ParallelConfig(), build_mesh(ParallelConfig(), info), info.device)
    sharded.to_empty(device="cpu")
    sharded.init_weights(seed=5)
    plain = build_model(cfg, seed=5)
    full = dict(plain.named_parameters())
    results["init"] = max((p.full_tensor() - full[n]).abs().max().item() for n, p in sharded.named_parameters())
    nonzero = [n for n, p in plain.named_parameters() if p.abs().sum() > 0]
    assert len(nonzero) > 20
    if rank == 0:
        torch.save(results, os.path.join(result_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_matches_unsharded_model(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    res = torch.load(tmp_path / "results.pt", weights_only=True)
    for name, diff in res.items():
        assert diff <= 1e-5, (name, diff)
