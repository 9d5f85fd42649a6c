"""LoRA on `MotifDiT` through peft, with diffusers-compatible names in and out.

`apply_lora(model, cfg)` injects peft `lora.Linear` layers into the target linears of every block,
in place, on the meta-built model BEFORE compile / AC / FSDP2 (so `fully_shard` shards base and
adapters together; FSDP2 allows frozen and trainable parameters in one unit, and frozen ones of
another dtype: only the trainable ones must share a dtype). Everything else is frozen (the REPA
head, when the model has one, keeps training: it is fresh and never exported; the trainer then freezes
it too when no stage uses REPA, `dit.apply_repa_freeze`).

Names. peft wraps `attn.to_q` as `attn.to_q.base_layer` + `attn.to_q.lora_A.default` /
`lora_B.default`. A diffusers `MotifVideoTransformer3DModel` after `load_lora_adapter` has exactly
these names, so `base_state_keys` (released weights -> this model) and `adapter_state_dict`
(this model -> `pytorch_lora_weights.safetensors`) are renames, never reshapes.

Tied Shared Cross-Attention K/V: `named_modules()` lists the shared `to_k` / `to_v` once (under
`attn.`), so peft wraps it once; `apply_lora` then re-ties `cross_attn.to_k` / `to_v` to the
wrapped module, which gets gradients from both paths. diffusers keeps the two copies apart, so the
export writes the adapter under both names (equal tensors), as the base weights are written twice.

    adapter file:  transformer.<module>.lora_A.weight (r, in), transformer.<module>.lora_B.weight (out, r)
                   + safetensors metadata `lora_adapter_metadata` = {"transformer.r": ..., ...}

which `MotifVideoTransformer3DModel.load_lora_adapter(folder)` (prefix "transformer") reads.
peft is imported lazily: it takes seconds, and the CLI's config composition never needs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

ADAPTER = "default"  # peft's adapter name inside our model
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # the pipeline component name diffusers filters adapter keys by

# Block-relative module paths: attention q/k/v/out (both streams, the cross-attention's own q / out)
# and the feed-forward linears (dual: ff / ff_context; single: proj_mlp and the fused proj_out).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass
class LoraConfig:
    """`model.lora`: rank 0 = off (full fine-tuning)."""

    rank: int = 0  # adapter rank r; 0: LoRA off (full fine-tuning)
    alpha: float | None = None  # None: = rank (scale 1); the adapter's delta is (alpha / rank) B A
    dropout: float = 0.0  # on the adapter input; > 0 needs parallel.ac=none (AC does not replay RNG)
    # Block-relative module paths (a path matches itself and any path ending in "." + it), in every block
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_dtype: str = "float32"  # float32 | bfloat16: storage dtype of the frozen base (adapters stay fp32)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"model.lora.rank={self.rank!r} must be an int >= 0 (0 turns LoRA off)")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r} must be > 0 (or null for alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout!r} must lie in [0, 1)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"model.lora.base_dtype={self.base_dtype!r}: use one of {', '.join(BASE_DTYPES)}")
        self.targets = list(self.targets)
        if self.rank and not self.targets:
            raise ValueError("model.lora.targets is empty: name at least one module (e.g. to_q)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def block_linears(model: nn.Module) -> dict[str, list[str]]:
    """Block-relative path -> full names of the plain `nn.Linear`s at that path (tied aliases once)."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():  # remove_duplicate: a tied to_k appears under attn. only
        parts = name.split(".")
        if parts[0] in _BLOCK_LISTS and len(parts) > 2 and type(mod) is nn.Linear:
            out.setdefault(".".join(parts[2:]), []).append(name)
    return out


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module names matched by `targets`; an unmatched target raises, listing the available paths."""
    available = block_linears(model)
    names, unknown = [], []
    for t in targets:
        hit = [p for p in available if p == t or p.endswith("." + t)]
        if not hit:
            unknown.append(t)
        names += [n for p in hit for n in available[p]]
    if unknown:
        raise ValueError(f"model.lora.targets: {unknown} match no linear layer of any block; available "
                         f"(block-relative): {sorted(available)}")
    return sorted(set(names))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject the adapters in place (call on the meta- or CPU-built model, before parallelize); freeze
    the rest but the REPA head (`apply_repa_freeze` decides on it, after this); cast the frozen base to
    `cfg.base_dtype`. Returns the wrapped modules' names."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if not cfg.enabled:
        raise ValueError("apply_lora: model.lora.rank is 0 (LoRA off)")
    names = resolve_targets(model, cfg.targets)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                              target_modules=names, bias="none")
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    retie(model)
    base = BASE_DTYPES[cfg.base_dtype]
    for n, p in model.named_parameters():
        trainable = ".lora_" in n or n.startswith("repa_projector.")
        p.requires_grad_(trainable)
        if not trainable and p.dtype != base:
            p.data = p.data.to(base)
        elif trainable and p.dtype != torch.float32:
            p.data = p.data.float()
    model.lora_config = cfg  # read back by export / checkpoint helpers
    return names


def retie(model: nn.Module) -> None:
    """Point every tied cross-attention's to_k / to_v / norm_k at the self-attention's (wrapped) modules."""
    for lst in _BLOCK_LISTS:
        for blk in getattr(model, lst, []):
            blk = getattr(blk, "_checkpoint_wrapped_module", blk)
            ca = getattr(blk, "cross_attn", None)
            if ca is not None and ca.tied:
                ca.tie(blk.attn)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Clean name -> peft LoRA layer (tied aliases once)."""
    from peft.tuners.lora import LoraLayer

    from .dit import clean_module_name

    return {clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


def _assign(p: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(p, DTensor):
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(full.to(p.dtype))


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int = 0) -> None:
    """peft's default init on materialised (possibly sharded) adapters: A kaiming-uniform(a=sqrt 5),
    B zero, so the model starts equal to its base. Each A is drawn in full from a generator seeded by
    (seed, its name): the same for any world size, like `MotifDiT.init_weights`."""
    from motif_train.utils import stable_seed

    for name, mod in lora_modules(model).items():
        a, b = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
        full = torch.empty(a.shape, dtype=torch.float32, device=(a.to_local() if isinstance(a, DTensor) else a).device)
        g = torch.Generator(full.device).manual_seed(stable_seed(seed, f"{name}.lora_A"))
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        full.uniform_(-bound, bound, generator=g)
        _assign(a, full)
        _assign(b, torch.zeros(b.shape))


def base_state_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-keyed base state dict renamed onto the LoRA model (`X.weight` -> `X.base_layer.weight`
    for every wrapped X); other keys unchanged."""
    wrapped = set(lora_modules(model))
    wrapped |= {alias for name, alias in _tied_aliases(model).items() if name in wrapped}  # their second name
    out = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        out[f"{mod}.base_layer.{leaf}" if mod in wrapped else k] = v
    return out


def trainable_names(model: nn.Module) -> list[str]:
    from motif_train.ema import clean_name

    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Wrapped self-attention module name -> the cross-attention name that shares it."""
    out = {}
    for lst in _BLOCK_LISTS:
        for i, blk in enumerate(getattr(model, lst, [])):
            blk = getattr(blk, "_checkpoint_wrapped_module", blk)
            ca = getattr(blk, "cross_attn", None)
            if ca is not None and ca.tied:
                for leaf in ("to_k", "to_v"):
                    out[f"{lst}.{i}.attn.{leaf}"] = f"{lst}.{i}.cross_attn.{leaf}"
    return out


def adapter_state_dict(model: nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter in peft / diffusers keys (`<module>.lora_A.weight`, no adapter name), fp32, with the
    tied cross-attention copies. `params` (clean parameter name -> tensor, e.g. the EMA shadow)
    replaces the model's own adapter weights."""
    mods = lora_modules(model)
    aliases = _tied_aliases(model)
    out = {}
    for name, mod in mods.items():
        for ab in ("lora_A", "lora_B"):
            key = f"{name}.{ab}.{ADAPTER}.weight"
            t = params[key] if params is not None else getattr(mod, ab)[ADAPTER].weight
            t = t.full_tensor() if isinstance(t, DTensor) else t
            t = t.detach().float().cpu().contiguous()
            out[f"{name}.{ab}.weight"] = t
            if name in aliases:
                out[f"{aliases[name]}.{ab}.weight"] = t.clone()
    return out


def adapter_metadata(cfg: LoraConfig, state: dict[str, torch.Tensor]) -> dict:
    """The peft `LoraConfig` kwargs diffusers builds the adapter from (target modules = the file's)."""
    modules = sorted({k.rsplit(".", 2)[0] for k in state})
    return {"r": cfg.rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.dropout, "bias": "none",
            "target_modules": modules}


def save_adapter(folder: str | Path, model: nn.Module, params: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (keys `transformer.<module>.lora_{A,B}.weight`, the peft
    config in its metadata, as diffusers' pipelines save adapters) and `adapter_config.json`."""
    from safetensors.torch import save_file

    cfg = model.lora_config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, params)
    meta = adapter_metadata(cfg, state)
    packed = {f"{PREFIX}.{k}": v for k, v in meta.items()}
    save_file({f"{PREFIX}.{k}": v for k, v in state.items()}, str(folder / WEIGHT_NAME),
              metadata={"format": "pt", METADATA_KEY: json.dumps(packed, sort_keys=True)})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **meta}, indent=1) + "\n")
    return folder / WEIGHT_NAME


@torch.no_grad()
def merged_state_dict(model: nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights in diffusers keys with every adapter merged (W + alpha/r B A, in fp32, then
    the base's dtype); REPA head dropped; every tensor its own storage. Unsharded models only."""
    from .dit import clean_module_name

    cfg = model.lora_config
    scale = cfg.lora_alpha / cfg.rank
    adapter = adapter_state_dict(model, params)
    out = {}
    for k, v in model.state_dict().items():
        k = clean_module_name(k)
        if ".lora_" in k or k.startswith("repa_projector."):
            continue
        mod, _, leaf = k.rpartition(".")
        if mod.endswith(".base_layer"):
            mod = mod[: -len(".base_layer")]
            k = f"{mod}.{leaf}"
            if leaf == "weight" and f"{mod}.lora_A.weight" in adapter:  # tied cross-attention copies too
                a, b = adapter[f"{mod}.lora_A.weight"], adapter[f"{mod}.lora_B.weight"]
                v = (v.float() + scale * (b @ a)).to(v.dtype)
        out[k] = v.detach().clone()
    return out


def merged_model(model: nn.Module, params: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain `MotifDiT` (no adapters, fp32, eval) holding the merged weights."""
    from .dit import MotifDiT

    state = merged_state_dict(model, params)
    with torch.device("meta"):
        out = MotifDiT(model.config)
    out.to_empty(device="cpu")
    out.init_weights()  # the REPA head only; every other tensor is loaded below
    missing, unexpected = out.load_state_dict(state, strict=False)  # tied copies: equal, loaded twice
    missing = [k for k in missing if not k.startswith("repa_projector.")]
    if missing or unexpected:
        raise ValueError(f"merged weights do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return out.float().eval()


def checkpoint_state(model: nn.Module):
    """The DCP `ModelState` of a LoRA run: the trainable tensors only (adapters, the REPA head when REPA is used), not
    the frozen base, which `model.init_from` provides again on resume (tied aliases of frozen tensors are dropped
    too: DSD's `ignore_frozen_params` misses the second name of a shared module)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from motif_train.checkpoint import ModelState

    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    return ModelState(model, options, keys=set(trainable_names(model)))


def summary(model: nn.Module) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    cfg = model.lora_config
    return (f"rank {cfg.rank} alpha {cfg.lora_alpha:g}, {len(lora_modules(model))} modules, "
            f"{n_train / 1e6:.2f} M of {n_all / 1e6:.1f} M params trainable, base {cfg.base_dtype}")
