"""Data: the Batch dataclass now; shards, planner, loader and curriculum with the data issue."""

from .batch import Batch

__all__ = ["Batch"]
