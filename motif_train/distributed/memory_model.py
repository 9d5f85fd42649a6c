"""Per-rank memory of a training step, measured on fake tensors: the run's DiT built through the
trainer's parallelize path (LoRA, REPA freeze, Ulysses CP, AC, FSDP2 on the mesh) with parameters
that have shapes but no storage, and `FSDPMemTracker` counting every tensor alive.

Two traces make a step's peak: the forward + backward of one bucket (`FakeModel.track`, per stage),
and the gradient clip + AdamW step (`FakeModel.optimizer_peak`, once per model: its tensors do not
depend on the bucket). After backward the activations are gone, so the step's peak is the larger of
the two. EMA and the frozen REPA teacher are constant resident tensors the tracker does not see:
the caller adds their bytes.
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy
from pathlib import Path

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30
VJEPA2_VITL_PARAMS = 0.33e9  # the REPA teacher when <encoders.root>/teacher is absent (V-JEPA 2 ViT-L)
# The collectives Ulysses CP issues (distributed/context_parallel.py); FSDP2's own all-gathers and
# reduce-scatters are c10d ops, not functional ones, so they are not counted here.
_CP_COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor")


class PeakMemTracker(FSDPMemTracker):
    """`FSDPMemTracker` that keeps only the whole-step peak.

    The stock tracker also updates a per-module peak after every op by walking every module it has
    seen: O(modules) per op, half the dry run's time on the 2B model. Nothing here reads the
    per-module figures; the global peak is the same (tests/unit/test_dryrun.py compares them)."""

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 - the per-module state is not kept
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = deepcopy(snap)


class CollectiveBytes(TorchDispatchMode):
    """Bytes received by the functional collectives of a traced step (CP's all-to-alls and gathers),
    forward, backward and AC recompute included."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = {name: 0 for name in _CP_COLLECTIVES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if func.namespace == "_c10d_functional" and name in self.bytes:
            self.bytes[name] += out.numel() * out.element_size()
        return out


def _category_gib(snap: dict) -> dict:
    by = {getattr(k, "value", k): v / GIB for k, v in snap.items()}
    return {"params": by.get("Sharded Param", 0) + by.get("Unsharded Param", 0) + by.get("Buffer", 0),
            "grads": by.get("Sharded Grad", 0) + by.get("Unsharded Grad", 0),
            "optimizer": by.get("OptState", 0),
            "comm_buffers": by.get("All Gather", 0) + by.get("Reduce Scatter", 0),
            "activations": by.get("Activation", 0) + by.get("Temp", 0) + by.get("Inputs", 0),
            "tracker_peak": by.get("Total", 0)}


class FakeModel:
    """The run's DiT, CP-split, AC-wrapped and fully_shard-ed on `mesh`, with fake-tensor parameters.

    `cfg` is a `TrainConfig`; `cp_group` the rank's CP group (None: cp = 1), built as the trainer builds
    it (`mesh.build_cp_group`); `repa_used`: whether any stage trains the REPA head (else frozen)."""

    def __init__(self, cfg, mesh, *, cp_group=None, repa_used: bool = True) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from motif_train.distributed.context_parallel import apply_cp
        from motif_train.distributed.parallelize import mixed_precision, parallelize_model
        from motif_train.models import MotifDiT, apply_repa_freeze
        from motif_train.models.config import RoutingConfig
        from motif_train.optim import build_optimizer

        config = cfg.model.dit_config()
        config.routing = RoutingConfig(ratio=0.0)
        # FSDPMemTracker has no rule for flex's higher-order op: flex is traced as sdpa, which saves the same
        # (out, logsumexp) per attention. varlen runs its own fake kernel (+ its packed K / V copies).
        self.traced_backend = "sdpa" if config.attention_backend == "flex" else config.attention_backend
        config.attention_backend, config.flash_impl = self.traced_backend, None
        pcfg = dataclasses.replace(cfg.parallel, compile=False)
        # The dtype of the run's device: a dry run stands in for a GPU run unless the run is a CPU one.
        device = torch.device("cpu" if cfg.train.device == "cpu" else "cuda")
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)  # meta storage -> fake in to_empty
        with torch.device("meta"):
            self.model = MotifDiT(config)
        if cfg.model.lora.enabled:  # as the trainer: adapters injected before AC / FSDP2, the base frozen
            from motif_train.models.lora import apply_lora

            apply_lora(self.model, cfg.model.lora)
        apply_repa_freeze(self.model, used=repa_used)  # as the trainer: an unused head is not trained
        self.cp = apply_cp(self.model, cp_group)  # as the trainer: before AC / FSDP2
        parallelize_model(self.model, pcfg, mesh, torch.device("cpu"), mp=mixed_precision(pcfg, device))
        self.param_dtype = str(mixed_precision(pcfg, device).param_dtype)
        with self.mode:
            self.model.to_empty(device="cpu")
            self.optimizer = build_optimizer(self.model, cfg.optim, torch.device("cpu"))
            for p in self.model.parameters():  # AdamW's moments exist from the first step on: create them now
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.config, self.mesh = config, mesh
        self.grad_clip = cfg.optim.grad_clip
        self._optimizer_peak: dict | None = None

    def shards(self) -> list[dict]:
        """Every parameter's global and local (this rank's) shape."""
        return [{"name": n, "global": list(p.shape), "local": list(p.to_local().shape)}
                for n, p in self.model.named_parameters()]

    def local_bytes(self, dtype_bytes: int = 4, *, trainable: bool = False) -> int:
        """This rank's shard of the parameters (`trainable`: only those the optimizer and EMA hold)."""
        return sum(p.to_local().numel() for p in self.model.parameters()
                   if p.requires_grad or not trainable) * dtype_bytes

    def global_numel(self, *, trainable: bool = False) -> int:
        """Parameters of the whole model (`trainable`: only those the optimizer and EMA hold)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable)

    def track(self, *, latent, batch: int, text_len: int, image_len: int, routing, repa: bool) -> dict:
        """Forward + loss + backward of one micro-batch on fake tensors under the tracker.

        `latent` (C, F, H, W)'s (F, H, W); `batch` samples of it, `text_len` text and `image_len` SigLIP
        tokens each. Returns the peak in GiB by category plus `cp_bytes` (bytes CP's collectives received)."""
        from motif_train.models.kernel_reference import cpu_reference_kernels

        c = self.config
        self.model.set_routing(routing)
        self.model.train()
        counter = CollectiveBytes()
        # varlen=False: varlen's own fake kernel; flex's CPU-only front-end guard lifted (fake tensors here
        # stand in for a GPU step, where flex has its backward).
        with self.mode, cpu_reference_kernels(varlen=False):
            x = torch.randn(batch, c.in_channels, *latent)  # cat(x_t, cond, mask), fp32 as the objective builds it
            target = torch.randn(batch, c.out_channels, *latent)
            t = torch.rand(batch) * 1000
            txt = torch.randn(batch, text_len, c.text_embed_dim)
            img = torch.randn(batch, image_len, c.image_embed_dim) if image_len else None
            tracker = PeakMemTracker(self.model, self.optimizer)
            tracker.track_inputs((x, target, t, txt, img))
            with tracker, counter:
                out = self.model(x, t, txt, image_embeds=img, return_repa=repa)
                loss = (out.sample.float() - target).pow(2).mean()
                if repa:
                    tok = out.repa_tokens.float()
                    loss = loss - torch.nn.functional.cosine_similarity(tok, torch.randn_like(tok), dim=-1).mean()
                loss.backward()
            snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
            self.optimizer.zero_grad(set_to_none=True)
        out = _category_gib(snap)
        out["cp_bytes"] = sum(counter.bytes.values())
        return out

    def optimizer_peak(self) -> dict:
        """Gradient clip + AdamW step with every trainable gradient present, traced once (GiB by category)."""
        if self._optimizer_peak is None:
            with self.mode:
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                tracker = PeakMemTracker(self.model, self.optimizer)
                with tracker:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
                    self.optimizer.step()
                snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
                self.optimizer.zero_grad(set_to_none=True)
            self._optimizer_peak = _category_gib(snap)
        return self._optimizer_peak

    def step_peak(self, **track_kwargs) -> dict:
        """A whole training step's peak: `track(...)` or the optimizer phase, whichever is higher."""
        fb = self.track(**track_kwargs)
        opt = self.optimizer_peak()
        top = opt if opt["tracker_peak"] > fb["tracker_peak"] else fb
        return {**top, "cp_bytes": fb["cp_bytes"], "phase": "optimizer" if top is opt else "backward",
                "forward_backward_peak": fb["tracker_peak"], "optimizer_peak": opt["tracker_peak"]}


def teacher_gib(encoders_root: str | None, used: bool) -> tuple[float, str]:
    """Resident fp32 bytes of the frozen REPA teacher on every rank (0 when no stage runs REPA)."""
    if not used:
        return 0.0, "no stage runs REPA"
    folder = Path(encoders_root) / "teacher" if encoders_root else None
    if folder is not None and (folder / "config.json").is_file():
        from transformers import VJEPA2Config, VJEPA2Model

        with torch.device("meta"):
            n = sum(p.numel() for p in VJEPA2Model(VJEPA2Config.from_pretrained(folder)).parameters())
        return 4 * n / GIB, f"{folder} ({n / 1e6:.1f} M params, fp32)"
    return 4 * VJEPA2_VITL_PARAMS / GIB, f"assumed V-JEPA 2 ViT-L ({VJEPA2_VITL_PARAMS / 1e9:.2f} B params, fp32)"


def analytic_state_gib(fake: FakeModel, ema: bool) -> float:
    """fp32 params, + grads, AdamW m, v (+ EMA) of the trainable ones, this rank's shards: the analytic
    state term (with LoRA the frozen base has no grads, moments or EMA)."""
    trainable = fake.local_bytes(4, trainable=True) * (3 + (1 if ema else 0))
    return (fake.local_bytes(4) + trainable) / GIB
