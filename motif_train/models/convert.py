"""Weights in and out of diffusers' `MotifVideoTransformer3DModel` layout.

Released checkpoints store the tied Shared Cross-Attention tensors twice
(`...attn.to_k.weight` and `...cross_attn.to_k.weight`, identical copies): safetensors
cannot store aliased storage. `from_diffusers` verifies the copies and ties them;
`to_diffusers` clones them back so the export is a plain strict-loadable model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .config import DIFFUSERS_KEYS, MotifDiTConfig, complete_diffusers_config
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


@dataclass
class Release:
    """A diffusers `save_pretrained` folder, resolved but not read: its config (diffusers' defaults
    filled in) and the safetensors files of the chosen variant."""

    folder: Path
    config: dict
    files: list[Path]
    variant: str | None = None


def _variants(folder: Path) -> dict[str, str]:
    """variant -> weights file name (the index for a sharded variant), as diffusers names them:
    `diffusion_pytorch_model.<v>.safetensors`, `diffusion_pytorch_model.safetensors.index.<v>.json`."""
    out = {}
    for p in folder.glob("diffusion_pytorch_model.*.safetensors"):
        out[p.name[len("diffusion_pytorch_model."):-len(".safetensors")]] = p.name
    for p in folder.glob("diffusion_pytorch_model.safetensors.index.*.json"):
        out[p.name[len("diffusion_pytorch_model.safetensors.index."):-len(".json")]] = p.name
    return {v: n for v, n in out.items() if "-of-" not in v}  # legacy shard files are not variants


def open_release(path: str | Path, variant: str | None = None, *, expect: MotifDiTConfig | None = None) -> Release:
    """Resolve a release folder (or one weights / index file in it, which picks that variant).

    Refused, each with the fix: no `config.json`, pickled `.bin` weights only, an unknown variant,
    a folder that holds only variant files when none was asked for, and, given `expect` (the
    model to load it into), any architecture key that differs (`check_release_config`)."""
    path = Path(path)
    if path.is_file():  # model.init_from=<folder>/diffusion_pytorch_model.fp16.safetensors
        found = {n: v for v, n in _variants(path.parent).items()}
        if path.name not in (WEIGHTS_NAME, INDEX_NAME) and path.name not in found:
            raise FileNotFoundError(f"{path}: not a diffusers weights file; point at the folder or at one of "
                                    f"{sorted([WEIGHTS_NAME, *found])}")
        variant, path = found.get(path.name), path.parent
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: point at a diffusers MotifVideoTransformer3DModel folder "
                                "(the 'transformer' subfolder of a pipeline)")
    config = complete_diffusers_config(json.loads(cfg_file.read_text()))
    variants = _variants(path)
    if variant is None:
        index, single = INDEX_NAME, WEIGHTS_NAME
    elif variant in variants:
        index = single = variants[variant]
    else:
        raise FileNotFoundError(f"{path} has no {variant!r} variant; variants found: {sorted(variants) or 'none'}"
                                + (f" (and the default {WEIGHTS_NAME})" if (path / WEIGHTS_NAME).is_file() else ""))
    if index.endswith(".json") and (path / index).is_file():
        files = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
    elif (path / single).is_file():
        files = [single]
    elif variants:
        picks = ", ".join(f"model.init_from={path / n} (Python: variant={v!r})" for v, n in sorted(variants.items()))
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}, only variant weights {sorted(variants)}: pick one "
                                f"explicitly: {picks}")
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or sharded index) in {path}; only safetensors weights are "
                                "loaded (pickled .bin checkpoints are refused for safety)")
    release = Release(path, config, [path / n for n in files], variant)
    if expect is not None:
        check_release_config(release, expect)
    return release


def release_mismatch(release: Release, config: MotifDiTConfig) -> dict[str, tuple]:
    """key -> (ours, the release's) for every diffusers key where `config` differs from the folder."""
    ours = config.diffusers_config()
    return {k: (ours[k], release.config[k]) for k in DIFFUSERS_KEYS if ours[k] != release.config[k]}


def _override(key: str, value) -> str:
    if value is None:
        return f"model.{key}=null"
    if isinstance(value, (tuple, list)):
        return f"model.{key}=[{','.join(map(str, value))}]"
    return f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"


def check_release_config(release: Release, config: MotifDiTConfig, *, source: str = "model.init_from") -> None:
    """Refuse to load a release into a model whose architecture keys differ from its `config.json`.

    Keys such as `rope_theta` change the model without changing any weight's shape, so a mismatch
    would load cleanly and train a different model than the release. The error names every key
    and the overrides that make `model.*` the release's."""
    diff = release_mismatch(release, config)
    if diff:
        lines = "; ".join(f"model.{k}={a!r} but config.json has {b!r}" for k, (a, b) in diff.items())
        fix = " ".join(_override(k, b) for k, (_, b) in diff.items())
        raise ValueError(f"{source}={release.folder}: the model config differs from the release's "
                         f"{release.folder / 'config.json'}: {lines}. Train the release's model with: {fix}")


def load_release_weights(release: Release) -> dict[str, torch.Tensor]:
    """The release's tensors (safetensors, memory-mapped)."""
    state = {}
    for f in release.files:
        state.update(load_file(str(f)))
    return state


def load_diffusers_folder(path: str | Path, variant: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """`config.json` (diffusers' defaults filled in) and the safetensors weights (single file or
    sharded index, optionally a `variant`) of a diffusers `save_pretrained` folder."""
    release = open_release(path, variant)
    return release.config, load_release_weights(release)


def from_diffusers(model_or_path, *, shared_kv: bool | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, variant: str | None = None, **overrides) -> MotifDiT:
    """Our training model from a diffusers `MotifVideoTransformer3DModel` or its local folder.

    `shared_kv` defaults to the diffusers config's cross-attention setting (tied). Extra
    keyword arguments override `MotifDiTConfig` fields (`routing=`, `repa=`). The REPA head,
    absent from diffusers weights, is freshly initialised. `variant` picks e.g. the
    `diffusion_pytorch_model.fp16.safetensors` weights of a folder.
    """
    if isinstance(model_or_path, (str, Path)):
        dcfg, state = load_diffusers_folder(model_or_path, variant)
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

    `state_dict` lets a caller pass full (e.g. gathered or EMA) weights for a sharded model. The
    result is in `model`'s train / eval mode.
    """
    from diffusers import MotifVideoTransformer3DModel

    state = diffusers_state_dict(model) if state_dict is None else {
        k: v.detach().clone() for k, v in state_dict.items() if not k.startswith("repa_projector.")}
    with torch.device("meta"):
        out = MotifVideoTransformer3DModel(**model.config.diffusers_config())
    out.load_state_dict(state, strict=True, assign=True)
    return out.train(model.training)  # the caller's mode: diffusers' training tests reject an eval model
