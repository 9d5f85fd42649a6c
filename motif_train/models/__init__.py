"""Training DiT, routing, REPA head, FLOP accounting and diffusers conversion."""

from .config import MotifDiTConfig, RepaConfig, RoutingConfig, load_model_config
from .convert import from_diffusers, to_diffusers
from .dit import DiTOutput, MotifDiT, apply_repa_freeze, build_model

__all__ = ["DiTOutput", "MotifDiT", "MotifDiTConfig", "RepaConfig", "RoutingConfig", "apply_repa_freeze", "build_model",
           "load_model_config", "from_diffusers", "to_diffusers"]
