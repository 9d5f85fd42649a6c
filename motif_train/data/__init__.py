"""Data: clips -> shards (preprocess, shards), the plan (plan, curriculum), the loader, and the
synthetic source. The micro-batch type they produce is `motif_train.batch.Batch` (re-exported)."""

from motif_train.batch import Batch

__all__ = ["Batch"]
