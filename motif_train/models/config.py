"""Typed configuration of the training DiT.

`MotifDiTConfig` carries the diffusers `MotifVideoTransformer3DModel` config keys verbatim
(so a released `config.json` maps onto it one to one) plus the training-only knobs:
tied cross-attention K/V, TREAD routing and the REPA head.

Absolute block indices run over all blocks in execution order::

    dual-stream      0 .. num_layers-1                               (0..11 for 2B)
    single encoder   num_layers .. num_layers+num_encoder_single-1   (12..27)
    decoder (DDT)    ... .. total-1                                  (28..35)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from motif_train.paths import config_dir

# Keys of diffusers' MotifVideoTransformer3DModel.__init__ (0.42.1).
DIFFUSERS_KEYS = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_single_layers", "num_decoder_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm",
    "norm_type", "text_embed_dim", "image_embed_dim", "rope_theta", "rope_axes_dim",
    "enable_text_cross_attention_dual", "enable_text_cross_attention_single",
)


def diffusers_defaults() -> dict:
    """The defaults of the installed diffusers' `MotifVideoTransformer3DModel.__init__`, read from
    its signature: they are what `from_pretrained` fills a `config.json`'s missing keys with, and
    they differ from `MotifDiTConfig`'s (ours are the 2B release's, theirs are not)."""
    import inspect

    from diffusers import MotifVideoTransformer3DModel

    params = inspect.signature(MotifVideoTransformer3DModel.__init__).parameters
    missing = [k for k in DIFFUSERS_KEYS if k not in params]
    if missing:
        raise RuntimeError(f"the installed diffusers' MotifVideoTransformer3DModel has no {missing}: it is not the "
                           "version this trainer mirrors (diffusers>=0.42.1, see locks/)")
    return {k: params[k].default for k in DIFFUSERS_KEYS if params[k].default is not inspect.Parameter.empty}


def complete_diffusers_config(cfg: dict) -> dict:
    """Every `DIFFUSERS_KEYS` entry of a diffusers config, diffusers' defaults for the omitted ones.

    A key of the model that this trainer does not mirror (a newer diffusers) is refused: the model
    built without it would silently differ from the release. `_`-keys are diffusers' metadata."""
    cfg = dict(cfg)
    extra = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_KEYS)
    if extra:
        raise ValueError(f"config keys {extra} are not MotifVideoTransformer3DModel keys this trainer knows "
                         f"({', '.join(DIFFUSERS_KEYS)}); the folder is from another model or diffusers version")
    out = {**diffusers_defaults(), **{k: v for k, v in cfg.items() if k in DIFFUSERS_KEYS}}
    out["rope_axes_dim"] = tuple(int(a) for a in out["rope_axes_dim"])
    return out


@dataclass
class RoutingConfig:
    """TREAD route: video tokens kept with probability 1-ratio run blocks start..end (inclusive).

    ratio 0 disables routing. Indices are absolute (see module docstring).
    """

    start: int = 2
    end: int = 23
    ratio: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.ratio > 0.0


@dataclass
class RepaConfig:
    """REPA projector on the video tokens after absolute block `block` (None: no head)."""

    block: int | None = None
    hidden_dim: int = 2048
    teacher_dim: int = 1024


@dataclass
class MotifDiTConfig:
    in_channels: int = 33
    out_channels: int = 16
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    num_layers: int = 12
    num_single_layers: int = 24
    num_decoder_layers: int = 8
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str | None = "rms_norm"
    norm_type: str = "layer_norm"
    text_embed_dim: int = 2560
    image_embed_dim: int | None = 1152
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    enable_text_cross_attention_dual: bool = False
    enable_text_cross_attention_single: bool = True
    # Training-only.
    shared_kv: bool = True
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    # Attention kernel (models/attention_backends.py): sdpa | flex | varlen (CUDA); flash_impl
    # null | fa3 | fa4 swaps the flash kernel of sdpa / varlen (optional GPU package).
    attention_backend: str = "sdpa"
    flash_impl: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.routing, dict):
            self.routing = RoutingConfig(**self.routing)
        if isinstance(self.repa, dict):
            self.repa = RepaConfig(**self.repa)
        self.rope_axes_dim = tuple(int(a) for a in self.rope_axes_dim)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_encoder_single(self) -> int:
        return self.num_single_layers - self.num_decoder_layers

    @property
    def num_encoder_blocks(self) -> int:
        return self.num_layers + self.num_encoder_single

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    def block_kind(self, idx: int) -> str:
        """'dual', 'single' or 'decoder' for an absolute block index."""
        if idx < self.num_layers:
            return "dual"
        return "single" if idx < self.num_encoder_blocks else "decoder"

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"model.{key}: {msg}")

        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise bad("rope_axes_dim", f"sum {sum(self.rope_axes_dim)} must equal attention_head_dim "
                      f"{self.attention_head_dim}; adjust the three axes")
        if any(a % 2 for a in self.rope_axes_dim):
            raise bad("rope_axes_dim", f"{self.rope_axes_dim}: every axis must be even")
        if not 0 <= self.num_decoder_layers <= self.num_single_layers:
            raise bad("num_decoder_layers", f"{self.num_decoder_layers} must lie in [0, num_single_layers="
                      f"{self.num_single_layers}]")
        from .attention_backends import check_backend

        check_backend(self.attention_backend, self.flash_impl)
        if self.qk_norm not in ("rms_norm", "layer_norm", None):
            raise bad("qk_norm", f"{self.qk_norm!r}: use rms_norm, layer_norm or null")
        r = self.routing
        if not 0.0 <= r.ratio < 1.0:
            raise bad("routing.ratio", f"{r.ratio} must lie in [0, 1)")
        if r.enabled:
            if not 0 <= r.start <= r.end < self.num_blocks:
                raise bad("routing", f"start={r.start}, end={r.end} must satisfy 0 <= start <= end < "
                          f"{self.num_blocks}")
            enc = self.num_encoder_blocks
            if r.start < enc <= r.end:
                raise bad("routing", f"route {r.start}..{r.end} crosses the encoder->decoder boundary "
                          f"(decoder starts at block {enc}); end the route at <= {enc - 1} or start it at "
                          f">= {enc}")
        b = self.repa.block
        if b is not None and not 0 <= b < self.num_encoder_blocks:
            raise bad("repa.block", f"{b} must be an encoder block in [0, {self.num_encoder_blocks - 1}]; "
                      "the DDT decoder sees the noisy input again, REPA must align encoder features")

    # ---- conversion ----------------------------------------------------------------------
    def diffusers_config(self) -> dict:
        d = {k: getattr(self, k) for k in DIFFUSERS_KEYS}
        d["rope_axes_dim"] = tuple(d["rope_axes_dim"])
        return d

    @classmethod
    def from_diffusers_config(cls, cfg: dict, **overrides) -> MotifDiTConfig:
        """From a diffusers config (a `config.json`): keys it omits take diffusers' defaults, as
        `from_pretrained` does, not ours, so both build the same model from the same file."""
        kw = complete_diffusers_config(cfg)
        kw.update(overrides)
        unknown = set(kw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG_DIR = config_dir()  # the checkout's configs/ or the installed wheel's copy


def load_model_config(name_or_path: str, **overrides) -> MotifDiTConfig:
    """A preset from `configs/model/<name>.yaml` or any YAML file of MotifDiTConfig fields."""
    from pathlib import Path

    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise FileNotFoundError(f"model config {name_or_path!r} not found; presets: {presets}")
    data = yaml.safe_load(path.read_text()) or {}
    data.update(overrides)
    unknown = set(data) - {f.name for f in fields(MotifDiTConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown model keys {sorted(unknown)}")
    return MotifDiTConfig(**data)
