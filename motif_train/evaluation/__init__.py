"""Evaluation off the training loss: held-out validation loss, video metrics, and the `motif-eval` sidecar
(its ledger of scored checkpoints). Nothing here imports the trainer."""
