"""No device->host sync inside a micro-step (objective forward + backward).

On CPU there is no CUDA sync to count, so `SyncCounter` counts what would force one on a GPU:
the Python calls that read a tensor's value on the host (`item`, `tolist`, `__bool__`,
`__float__`, `__int__`, `__index__`, `cpu`, formatting) and the ops whose output size depends on
the data (`nonzero`, `bincount`, `unique`, `masked_select`, boolean-mask indexing: CUDA reads the
size back), plus `torch.cuda.synchronize` and the blocking c10d collectives (wrapped functions).
`Tensor.numpy` is not counted: it refuses device tensors, so it can only ever read host data.
The whole-step budget of the real Trainer is checked in tests/distributed/test_step_syncs.py; on a
GPU `test_micro_step_cuda_sync_debug` lets CUDA itself refuse any synchronizing call.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from contextlib import ExitStack

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from motif_train.batch import Batch
from motif_train.models import RoutingConfig
from motif_train.objectives import DiffusionObjective, ObjectiveConfig, total_loss
from motif_train.objectives.encoders import build_tiny_encoders, load_encoders

from ._model_utils import encoded_batch, randomized, tiny

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu", "__format__"}
DATA_DEPENDENT = {"nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select"}
COLLECTIVES = ("all_reduce", "all_gather_object", "gather_object", "broadcast_object_list", "barrier",
               "all_gather", "broadcast", "reduce", "gather", "scatter_object_list")


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """Records (phase, kind, name) for every host read, data-dependent-size op, CUDA synchronize
    and blocking collective while active. `phase()` labels each event (e.g. the trainer's step);
    while `paused` nothing is recorded (e.g. inside the data loader, which works on host data)."""

    def __init__(self, phase=lambda: None) -> None:
        super().__init__()
        self.phase, self.paused, self.events = phase, False, []
        self._stack = ExitStack()

    def _add(self, kind: str, name: str) -> None:
        if not self.paused:
            self.events.append((self.phase(), kind, name))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self._add("read", name)
        elif name in DATA_DEPENDENT or (name == "repeat_interleave" and len(args) > 1
                                         and isinstance(args[1], torch.Tensor)):
            self._add("data_dependent", name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _bool_index(args):
            self._add("data_dependent", f"{name}[bool]")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._stack.__enter__()
        for mod, names in ((dist, COLLECTIVES), (torch.cuda, ("synchronize",))):
            for n in names:
                self._stack.enter_context(_wrapped(self, mod, n))
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._stack.__exit__(*exc)
        return out

    def count(self, phase=None, kind=None) -> Counter:
        return Counter(n for p, k, n in self.events if (phase is None or p == phase) and (kind is None or k == kind))


class _wrapped:
    """Replace `mod.name` by a recording wrapper for the duration (code looks it up at call time)."""

    def __init__(self, counter: SyncCounter, mod, name: str) -> None:
        self.counter, self.mod, self.name = counter, mod, name

    def __enter__(self):
        self.orig = getattr(self.mod, self.name)
        kind = "sync" if self.mod is torch.cuda else "collective"

        def wrapper(*a, **k):
            self.counter._add(kind, self.name)
            return self.orig(*a, **k)

        setattr(self.mod, self.name, wrapper)

    def __exit__(self, *exc):
        setattr(self.mod, self.name, self.orig)


# ----------------------------------------------------------------------------------------------


def test_counter_sees_every_kind_of_read():
    t = torch.arange(4.0)
    with SyncCounter() as c:
        bool(t[0] > 0), float(t[1]), int(t[2]), t[3].item(), t.tolist(), t.nonzero(), t[t > 1], f"{t[0]}"
        t.numpy()  # host only by construction: not counted
    assert c.count(kind="read") == Counter(__bool__=1, __float__=1, __int__=1, item=1, tolist=1, __format__=1)
    assert c.count(kind="data_dependent") == Counter({"nonzero": 1, "__getitem__[bool]": 1})


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    build_tiny_encoders(root)
    return load_encoders(root)


def _batch(encoders, *, pad: bool) -> Batch:
    batch = encoded_batch(encoders, seed=0, width=64, prompts=("a red ball rolls down", "two"))
    if not pad:  # every position a real token (as for prompts of one length, trimmed by the loader)
        batch = dataclasses.replace(batch, text_mask=torch.ones_like(batch.text_mask))
    return batch


@pytest.mark.parametrize("i2v, pad, dropout", [(1.0, True, 0.5), (0.0, True, 0.0), (0.0, False, 1.0),
                                               (1.0, False, 0.0)])
def test_micro_step_reads_nothing_back(tiny_cfg, encoders, i2v, pad, dropout):
    """I2V with the timestep blur or T2V, padded text or not, CFG dropout, REPA with its teacher,
    TREAD: the objective's forward and the backward make no host read at all."""
    model = randomized(tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))).train()
    empty = encoders.text.encode([""], max_length=16)
    obj = DiffusionObjective(
        ObjectiveConfig(conditioning={"i2v_prob": i2v, "text_dropout": dropout, "blur_sigma_max": 2.0},
                        repa={"weight": 0.5}),
        empty_text=(empty[0][0], empty[1][0]), teacher=encoders.teacher)
    batch = _batch(encoders, pad=pad)
    assert bool(batch.text_mask.all()) is not pad  # the case is what it says
    with SyncCounter() as c:
        out = obj(model, copy.copy(batch), step=1, generator=torch.Generator().manual_seed(3))
        total_loss(out.losses, obj.config.weights).backward()
    assert out.task == ("i2v" if i2v else "t2v") and out.repa and set(out.losses) == {"denoise", "repa"}
    assert c.events == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sync debug mode")
def test_micro_step_cuda_sync_debug(tiny_cfg, encoders):
    """On a GPU, CUDA's own check: any synchronizing call (a read, a blocking copy) raises."""
    dev = torch.device("cuda")
    model = randomized(tiny(tiny_cfg, routing=RoutingConfig(1, 3, 0.5))).train().to(dev)
    teacher = copy.deepcopy(encoders.teacher).to(dev)
    empty = encoders.text.encode([""], max_length=16)
    obj = DiffusionObjective(
        ObjectiveConfig(conditioning={"i2v_prob": 1.0, "text_dropout": 0.5, "blur_sigma_max": 2.0},
                        repa={"weight": 0.5}),
        empty_text=(empty[0][0].to(dev), empty[1][0].to(dev)), teacher=teacher)
    host = _batch(encoders, pad=True)
    batch = host.pin_memory().to(dev, non_blocking=True)
    gen = torch.Generator(dev).manual_seed(3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = obj(model, batch, step=1, generator=gen)  # text_lengths: host ints, kept by .to()
        total_loss(out.losses, obj.config.weights).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.task == "i2v"
