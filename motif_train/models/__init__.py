"""Training DiT, routing, REPA head, FLOP accounting and diffusers conversion."""

from .config import MotifDiTConfig, RepaConfig, RoutingConfig
from .convert import from_diffusers, to_diffusers
from .dit import DiTOutput, MotifDiT, build_model

__all__ = ["DiTOutput", "MotifDiT", "MotifDiTConfig", "RepaConfig", "RoutingConfig", "build_model",
           "from_diffusers", "to_diffusers"]
