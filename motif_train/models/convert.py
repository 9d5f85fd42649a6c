"""Weights in and out of diffusers' `MotifVideoTransformer3DModel` layout.

Released checkpoints store the tied Shared Cross-Attention tensors twice
(`...attn.to_k.weight` and `...cross_attn.to_k.weight`, identical copies): safetensors
cannot store aliased storage. `from_diffusers` verifies the copies and ties them;
`to_diffusers` clones them back so the export is a plain strict-loadable model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .config import MotifDiTConfig
from .dit import MotifDiT

TIED = ("to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "norm_k.weight", "norm_k.bias")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _tied_pairs(config: MotifDiTConfig) -> list[tuple[str, str]]:
    """(self-attention key, cross-attention key) pairs that Shared Cross-Attention ties."""
    pairs = []
    prefixes = []
    if config.enable_text_cross_attention_dual:
        prefixes += [f"transformer_blocks.{i}." for i in range(config.num_layers)]
    if config.enable_text_cross_attention_single:
        prefixes += [f"single_transformer_blocks.{i}." for i in range(config.num_encoder_single)]
    for pre in prefixes:
        pairs += [(f"{pre}attn.{t}", f"{pre}cross_attn.{t}") for t in TIED]
    return pairs


def check_tied_copies(state_dict: dict[str, torch.Tensor], config: MotifDiTConfig) -> None:
    """Refuse a state dict whose cross-attention K/V copies differ from the self-attention's."""
    for a, x in _tied_pairs(config):
        if a not in state_dict and x not in state_dict:
            continue  # e.g. qk_norm without bias
        if a not in state_dict or x not in state_dict:
            raise KeyError(f"tied tensor pair incomplete: {a!r} / {x!r}")
        ta, tx = state_dict[a], state_dict[x]
        if ta.shape != tx.shape or not torch.equal(ta, tx):
            diff = (ta.float() - tx.float()).abs().max().item() if ta.shape == tx.shape else "shape"
            raise ValueError(
                f"{x} differs from {a} (max abs diff {diff}): these weights were trained with untied "
                "cross-attention K/V. Load them with `model.shared_kv=false` to keep separate copies."
            )


def drop_tied_duplicates(state_dict: dict[str, torch.Tensor], config: MotifDiTConfig) -> dict[str, torch.Tensor]:
    """The state dict without the cross-attention copies of tied tensors (for loaders such as
    `set_model_state_dict` that expect one key per parameter). Call `check_tied_copies` first."""
    if not config.shared_kv:
        return dict(state_dict)
    dup = {x for _, x in _tied_pairs(config)}
    return {k: v for k, v in state_dict.items() if k not in dup}


def load_diffusers_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read `config.json` and the safetensors weights (single file or sharded index) of a
    diffusers `save_pretrained` folder. Pickled `.bin` weights are refused."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: point at a diffusers MotifVideoTransformer3DModel folder "
                                "(the 'transformer' subfolder of a pipeline)")
    config = json.loads(cfg_file.read_text())
    if (path / INDEX_NAME).is_file():
        files = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or sharded index) in {path}; only safetensors weights are "
                                "loaded (pickled .bin checkpoints are refused for safety)")
    state = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return config, state


def from_diffusers(model_or_path, *, shared_kv: bool | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, **overrides) -> MotifDiT:
    """Our training model from a diffusers `MotifVideoTransformer3DModel` or its local folder.

    `shared_kv` defaults to the diffusers config's cross-attention setting (tied). Extra
    keyword arguments override `MotifDiTConfig` fields (`routing=`, `repa=`). The REPA head,
    absent from diffusers weights, is freshly initialised.
    """
    if isinstance(model_or_path, (str, Path)):
        dcfg, state = load_diffusers_folder(model_or_path)
    else:
        dcfg, state = dict(model_or_path.config), model_or_path.state_dict()
    if shared_kv is not None:
        overrides["shared_kv"] = shared_kv
    config = MotifDiTConfig.from_diffusers_config(dcfg, **overrides)
    if config.shared_kv:
        check_tied_copies(state, config)
    with torch.device("meta"):
        model = MotifDiT(config)
    model.to_empty(device=device or "cpu")
    model.init_weights()  # only the REPA head keeps this init; everything else is overwritten
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("repa_projector.")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if dtype is not None:
        model.to(dtype)
    return model


def diffusers_state_dict(model: MotifDiT) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers keys: no REPA head, every tensor its own storage."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("repa_projector.")}


def to_diffusers(model: MotifDiT, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A `MotifVideoTransformer3DModel` holding our weights (strict load, tied tensors cloned).

    `state_dict` lets a caller pass full (e.g. gathered or EMA) weights for a sharded model.
    """
    from diffusers import MotifVideoTransformer3DModel

    state = diffusers_state_dict(model) if state_dict is None else {
        k: v.detach().clone() for k, v in state_dict.items() if not k.startswith("repa_projector.")}
    with torch.device("meta"):
        out = MotifVideoTransformer3DModel(**model.config.diffusers_config())
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()
