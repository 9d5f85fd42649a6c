"""Validation at scale (issue 10): with 3 gloo ranks and 2 requests (one T2V prompt, one I2V frame) on an
FSDP-sharded tiny DiT, every request is sampled exactly once, only rank 0 receives videos (point-to-point,
no all-gather), the text / image encoders load on rank 0 only, the prompt cache in the run dir is reused
by the second validation, and the videos equal the single-rank path for the same seed — under 1-D FSDP
(the idle rank runs padding forwards) and under HSDP 3 x 1 (the idle rank skips sampling)."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 3


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import motif_train.objectives.encoders as enc_mod
    import motif_train.sampling as sampling
    from motif_train.distributed import ParallelConfig, parallelize_model
    from motif_train.distributed.mesh import DistInfo, build_mesh
    from motif_train.models import build_model, load_model_config
    from motif_train.models.convert import drop_tied_duplicates
    from tests.unit._model_utils import randomized

    root = Path(root)
    log = {"loads": [], "sampled": [], "forwards": 0, "recv_from": [], "sent": 0}
    real_load, real_flow = enc_mod.load_encoders, sampling.flow_sample
    real_recv, real_send = dist.recv, dist.send

    def load_encoders(r, which=enc_mod._WHICH, *a, **k):
        log["loads"].append(sorted(which))
        return real_load(r, which, *a, **k)

    def flow_sample(model, item, *a, **k):
        log["forwards"] += 1
        log["sampled"].append(item.name)
        return real_flow(model, item, *a, **k)

    def recv(t, src=None, *a, **k):
        log["recv_from"].append(src)
        return real_recv(t, src, *a, **k)

    def send(t, dst, *a, **k):
        log["sent"] += 1
        return real_send(t, dst, *a, **k)

    def no_all_gather(*a, **k):
        raise AssertionError("validation must not all-gather")

    enc_mod.load_encoders, sampling.flow_sample = load_encoders, flow_sample
    dist.recv, dist.send = recv, send
    dist.all_gather = dist.all_gather_object = no_all_gather  # the DiT's FSDP uses all_gather_into_tensor

    cfg = sampling.EvalConfig(prompts=["a red square slides"], i2v_frame=str(root / "frame.png"),
                              frames=5, height=32, width=48, steps=2, seed=3)
    info = DistInfo(rank, world, rank, world, torch.device("cpu"))
    mcfg = load_model_config("tiny")
    ref = randomized(mcfg).eval()  # seed 0, N(0, 0.2)
    run_dir = root / "run"
    out = {}
    for case, pcfg in (("fsdp", ParallelConfig()), ("hsdp_3x1", ParallelConfig(dp_replicate=3, dp_shard=1))):
        mesh = build_mesh(pcfg, info)
        model = build_model(mcfg, device="meta")
        parallelize_model(model, pcfg, mesh, info.device)
        model.to_empty(device="cpu")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, drop_tied_duplicates(ref.state_dict(), mcfg),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        model.eval()
        for call in range(2):  # the second validation: a resumed run reads the cache
            log.update(loads=[], sampled=[], forwards=0, recv_from=[], sent=0)
            items, negative, vae = sampling.build_requests(cfg, root / "enc", info.device, cache_dir=run_dir,
                                                           rank=rank, world_size=world)
            videos = sampling.generate(model, items, negative, vae, cfg, device=info.device, rank=rank,
                                       world_size=world, shard_size=mesh.shape[-1])
            out[f"{case}_{call}"] = {k: (list(v) if isinstance(v, list) else v) for k, v in log.items()} | {
                "names": [n for n, _ in videos], "has_vae": vae is not None}
            if rank == 0:
                np.savez(root / f"videos_{case}_{call}.npz", **{n: v.numpy() for n, v in videos})
    if rank == 0:  # the previous single-rank path: one process, the unsharded model, every request in turn
        items, negative, vae = sampling.build_requests(cfg, root / "enc", info.device)
        lat = (16, 1 + (cfg.frames - 1) // 4, cfg.height // 8, cfg.width // 8)
        refs = {}
        for i, item in enumerate(items):
            g = torch.Generator().manual_seed(cfg.seed * 1000 + i)
            x = real_flow(ref, item, negative, latent_shape=lat, steps=cfg.steps, shift=cfg.shift,
                          guidance_scale=cfg.guidance_scale, generator=g, device=info.device)
            refs[item.name] = sampling.to_uint8_frames(vae.decode(x.to(vae.dtype))).numpy()
        np.savez(root / "videos_reference.npz", **refs)
    (root / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_validation_splits_prompts_gathers_to_rank0_and_caches(tmp_path):
    from PIL import Image

    from motif_train.objectives.encoders import build_tiny_encoders

    build_tiny_encoders(tmp_path / "enc")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "frame.png")
    init = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_worker, args=(WORLD, init, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    caches = sorted((tmp_path / "run").glob("prompts-*.safetensors"))
    assert len(caches) == 1 and not list((tmp_path / "run").glob("*.tmp*"))  # one cache, no half-written file
    ref = np.load(tmp_path / "videos_reference.npz")
    assert sorted(ref.files) == ["i2v_00", "t2v_00"]
    for case in ("fsdp", "hsdp_3x1"):
        for call in (0, 1):
            key = f"{case}_{call}"
            # each request sampled exactly once, by its owner (request i -> rank i % 3); rank 2 owns none
            assert [log[key]["sampled"] for log in logs[:2]] == [["t2v_00"], ["i2v_00"]], key
            # 1-D FSDP: rank 2 joins the all-gathers with a padding forward; HSDP 3x1: it skips sampling
            assert logs[2][key]["forwards"] == (1 if case == "fsdp" else 0), key
            assert not logs[2][key]["has_vae"] and logs[0][key]["has_vae"] and logs[1][key]["has_vae"]
            # only rank 0 receives, one video from rank 1; rank 2 sends nothing
            assert logs[0][key]["recv_from"] == [1] and [log[key]["sent"] for log in logs] == [0, 1, 0], key
            assert [log[key]["recv_from"] for log in logs[1:]] == [[], []]
            assert logs[0][key]["names"] == ["t2v_00", "i2v_00"]
            assert logs[1][key]["names"] == logs[2][key]["names"] == []
            # text / image encoders only on rank 0, and only for the first validation; the VAE where decoded
            text_loads = [[w for w in log[key]["loads"] if "text" in w or "image" in w] for log in logs]
            assert text_loads == ([[["image", "text", "vae"]], [], []] if key == "fsdp_0" else [[], [], []]), key
            assert [len(log[key]["loads"]) for log in logs] == [1, 1, 0], key
            got = np.load(tmp_path / f"videos_{key}.npz")
            assert sorted(got.files) == sorted(ref.files)
            for name in ref.files:  # equal to the single-rank, unsharded path for the same seed
                assert np.unique(ref[name]).size > 10  # real frames, not a constant
                assert got[name].dtype == np.uint8 and got[name].shape == (5, 32, 48, 3)
                diff = np.abs(got[name].astype(int) - ref[name]).max()
                assert np.array_equal(got[name], ref[name]), (key, name, diff)
