"""The GPU paths' contract, run on a CPU: one training micro-step (objective -> model -> loss -> backward)
of the tiny preset for a pairwise-covering matrix of

    backend {sdpa, flex, varlen} x text {padded, unpadded} x TREAD {on, off} x task {t2v, i2v}
    x parallel.cp {1, 2} x parallel.ac {none, selective, full} x compile {off, aot_eager} x REPA {off, on}

with FSDP2 (bf16 params, fp32 reduce), Ulysses CP on torch's fake process group and every tensor a
FakeTensor, so the CUDA-only kernels run their fake kernels: varlen's real `varlen_attn` op (whose
fake kernel refuses what the CUDA kernel refuses, e.g. `seqused_k` in training) and flex's
higher-order op forward and backward. `aot_eager` traces the forward and backward graphs inductor
would be handed. Checked per case: every parameter the step used has a gradient of its own shape and
dtype (and exactly the ones it did not use have none), the timestep features and RoPE tables stay
fp32 while the blocks compute in bf16, the compiled blocks have no graph break. Combinations that
cannot work are refused by config validation, naming the keys (bottom of the file).

Numerics (the same backends against sdpa in fp64, forward and backward) live in
test_attention_backends.py; the GPU's own check is `scripts/bench_train.py --gpu`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from motif_train.batch import Batch
from motif_train.distributed import parallelize
from motif_train.distributed.context_parallel import apply_cp
from motif_train.distributed.mesh import DistInfo, ParallelConfig, build_cp_group, build_mesh
from motif_train.models import MotifDiT, RoutingConfig
from motif_train.models.blocks import DualStreamBlock, SingleStreamBlock
from motif_train.models.kernel_reference import cpu_reference_kernels
from motif_train.objectives.encoders import VJEPA2Teacher
from motif_train.objectives.objective import DiffusionObjective, ObjectiveConfig
from motif_train.objectives.repa import teacher_pixels
from motif_train.objectives.tiny_encoders import TINY_DIMS, _tiny_teacher

from ._model_utils import tiny

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile",
                                        "ignore:.*FakeTensor.*", "ignore::UserWarning")

DIMS = {
    "backend": ("sdpa", "flex", "varlen"),
    "text": ("padded", "unpadded"),
    "tread": (True, False),
    "task": ("t2v", "i2v"),
    "cp": (1, 2),
    "ac": ("none", "selective", "full"),
    "compile": (False, True),
    "repa": (False, True),
}
# A 9-row covering array (9 = 3 backends x 3 AC modes, the least any pairwise set can have): every
# pair of values of any two dimensions appears in some row (test_matrix_covers_every_pair).
ROWS = [
    (0, 1, 0, 0, 1, 0, 1, 1), (0, 0, 1, 1, 1, 1, 0, 1), (0, 0, 1, 0, 0, 2, 1, 0),
    (1, 0, 1, 0, 0, 0, 1, 1), (1, 1, 0, 1, 0, 1, 1, 0), (1, 1, 0, 0, 1, 2, 0, 1),
    (2, 1, 0, 1, 0, 0, 0, 0), (2, 1, 1, 0, 0, 1, 0, 1), (2, 0, 0, 1, 1, 2, 1, 0),
]
CASES = [dict(zip(DIMS, (vals[i] for vals, i in zip(DIMS.values(), row, strict=True)), strict=True))
         for row in ROWS]


def _odd(c: dict) -> bool:
    """The routed cp=2 cases run a bucket whose video tokens (3 x 3 x 5 = 45) and TREAD kept tokens (27 at
    r=0.4) do not split over cp: the model pads both to a multiple of cp and masks the pad (flex: the pad
    is its only mask when the text is unpadded)."""
    return c["cp"] == 2 and c["tread"]


def _case_id(c: dict) -> str:
    return (f"{c['backend']}-{c['text']}-{'tread' if c['tread'] else 'notread'}-{c['task']}-cp{c['cp']}-"
            f"ac_{c['ac']}-{'aot' if c['compile'] else 'eager'}-{'repa' if c['repa'] else 'norepa'}"
            f"{'-odd' if _odd(c) else ''}")


def test_matrix_covers_every_pair():
    seen = {(a, va, b, vb) for c in CASES for (a, va), (b, vb) in itertools.combinations(c.items(), 2)}
    want = {(a, va, b, vb) for a, b in itertools.combinations(DIMS, 2) for va in DIMS[a] for vb in DIMS[b]}
    assert want <= seen, sorted(want - seen)[:5]


class DtypeProbe:
    """Records what dtypes the timestep path, RoPE and the blocks saw (forward hooks, also around
    compiled and checkpoint-wrapped blocks)."""

    def __init__(self, model: MotifDiT) -> None:
        self.seen: dict[str, set] = {"time_proj": set(), "rope": set(), "block_rope": set(), "block_x": set()}
        model.time_text_embed.time_proj.register_forward_hook(lambda m, a, out: self.seen["time_proj"].add(out.dtype))
        model.rope.register_forward_hook(lambda m, a, out: self.seen["rope"].update(t.dtype for t in out))
        for blk in model.blocks():
            blk.register_forward_pre_hook(self._block)

    def _block(self, module, args):
        x, rope = args[0], args[4]
        self.seen["block_x"].add(x.dtype)
        if rope is not None:
            self.seen["block_rope"].update(t.dtype for t in rope)


def _batch(case: dict, crop: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    lengths = (5, 8) if case["text"] == "padded" else (8, 8)
    mask = torch.arange(8)[None] < torch.tensor(lengths)[:, None]  # (B, T)
    clip = torch.rand(2, 3, 9, 64, 96, generator=g) * 2 - 1  # 9 frames -> 3 latent frames
    text = torch.randn(2, 8, 32, generator=g) * mask[..., None]
    image = torch.randn(2, 5, 24, generator=g) if case["task"] == "i2v" else None
    h, w = (6, 10) if _odd(case) else (8, 12)  # 45 or 72 video tokens
    return Batch(latents=torch.randn(2, 16, 3, h, w, generator=g), text=text, text_mask=mask, image_embeds=image,
                 teacher_pixels=teacher_pixels(clip, crop) if case["repa"] else None, keys=("a", "b"))


@pytest.fixture
def fake_world():
    """Torch's fake process group as rank 0 of `world` (collectives return at once, no data)."""
    def start(world: int) -> DistInfo:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        return DistInfo(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"))

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_micro_step_contract(tiny_cfg, fake_world, case):
    torch._dynamo.reset()
    parallelize._COMPILED.clear()
    torch._dynamo.utils.counters.clear()
    info = fake_world(case["cp"])
    pcfg = ParallelConfig(cp=case["cp"], ac=case["ac"], compile=case["compile"], compile_backend="aot_eager",
                          param_dtype="bfloat16", reduce_dtype="float32")
    cfg = tiny(tiny_cfg, attention_backend=case["backend"],
               routing=RoutingConfig(1, 3, 0.4 if _odd(case) else 0.5) if case["tread"] else RoutingConfig(ratio=0.0))
    with torch.device("meta"):
        model = MotifDiT(cfg)
    summary = parallelize.parallelize_model(model, pcfg, build_mesh(pcfg, info), torch.device("cpu"))
    assert summary["param_dtype"] == "torch.bfloat16" and summary["compile"] == case["compile"]
    assert (apply_cp(model, build_cp_group(pcfg, info)) is not None) == (case["cp"] > 1)
    probe = DtypeProbe(model)
    teacher = VJEPA2Teacher(_tiny_teacher(0)) if case["repa"] else None
    obj = DiffusionObjective(
        ObjectiveConfig(conditioning={"text_dropout": 0.0, "i2v_prob": 1.0 if case["task"] == "i2v" else 0.0},
                        repa={"weight": 0.5 if case["repa"] else 0.0}),
        teacher=teacher, drop_unpadded_mask=not (case["compile"] and case["backend"] == "sdpa"))
    batch = _batch(case, TINY_DIMS["teacher_crop_size"])

    # varlen=False: the real varlen_attn op and its fake kernel; flex's CPU front-end guard lifted
    # (on CUDA it does not exist), so its higher-order op's fake forward and backward run.
    with cpu_reference_kernels(varlen=False), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.train()
        out = obj(model, batch, step=0)
        loss = sum(w * out.losses[k] for k, w in obj.config.weights.items() if k in out.losses)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        shapes = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.requires_grad}

    assert out.task == case["task"] and out.repa == case["repa"]
    assert set(out.losses) == ({"denoise", "repa"} if case["repa"] else {"denoise"})
    unused = {n for n, g in grads.items() if g is None}
    expected_unused = {n for n in grads if (n.startswith("image_embedder.") and case["task"] == "t2v")
                       or (n.startswith("repa_projector.") and not case["repa"])}
    assert unused == expected_unused
    for name, g in grads.items():
        if g is not None:
            assert (tuple(g.shape), g.dtype) == shapes[name], name
    assert all(dt == torch.float32 for _, dt in shapes.values())  # sharded fp32 masters, fp32 grads
    assert probe.seen["time_proj"] == {torch.float32} and probe.seen["rope"] == {torch.float32}
    assert probe.seen["block_rope"] == {torch.float32} and probe.seen["block_x"] == {torch.bfloat16}
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for cls in (DualStreamBlock, SingleStreamBlock):  # each block class ran as one compiled graph (fullgraph)
        entries = _debug_get_cache_entry_list(cls.forward.__code__)
        assert (len(entries) >= 1) == case["compile"], (cls.__name__, len(entries))


# ----------------------------------------------------------------------------- refused combinations


@pytest.mark.parametrize("overrides, match", [
    (["model.attention_backend=varlen"], r"model.attention_backend=varlen runs flash kernels, CUDA only"),
    (["model.attention_backend=flex"], r"model.attention_backend=flex: FlexAttention has no backward on CPU"),
    (["model.flash_impl=fa3"], r"model.flash_impl=fa3 is a CUDA kernel"),
    (["model.attention_backend=flex", "model.flash_impl=fa4", "train.device=cuda"],
     r"model.flash_impl=fa4 with model.attention_backend=flex"),
    (["parallel.cp=3"], r"parallel.cp=3: Ulysses splits the 2 attention heads"),
    (["parallel.compile_backend=tvm"], r"parallel.compile_backend='tvm'"),
])
def test_unworkable_combinations_are_refused_by_validation(overrides, match):
    """What the matrix cannot run is refused before any work, by `validate` (the trainer's first
    call), naming the keys; a GPU-only backend on a CPU run is one of them."""
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config
    from motif_train.config import validate

    with pytest.raises(ValueError, match=match):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = to_train_config(compose("train", overrides=["experiment=tiny_cpu", "train.device=cpu", *overrides]))
        validate(cfg, world_size=6 if "parallel.cp=3" in overrides else 1, local_world_size=6)
