"""Objectives: rectified flow, I2V conditioning, REPA, frozen encoders; named loss terms."""

from .conditioning import ConditioningConfig
from .flow import FlowConfig
from .objective import DiffusionObjective, ObjectiveConfig, ObjectiveOutput, total_loss
from .repa import RepaLossConfig

__all__ = ["ConditioningConfig", "DiffusionObjective", "FlowConfig", "ObjectiveConfig", "ObjectiveOutput",
           "RepaLossConfig", "total_loss"]
