"""Shared by the validation-loss tests: a real tiny dataset with a held-out split, a tiny DiT and the objective."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from motif_train.data.clips import default_specs, write_clip_folder
from motif_train.data.curriculum import StageConfig
from motif_train.data.preprocess import preprocess
from motif_train.models import MotifDiT, load_model_config
from motif_train.objectives import DiffusionObjective, ObjectiveConfig
from motif_train.objectives.encoders import build_tiny_encoders

VID, IMG = [9, 64, 96], [1, 64, 64]
STAGE = StageConfig(name="val", steps=4, buckets=[VID, IMG], token_budget=400, lr=1e-3, shift=3.0)


def build_dataset(root: Path) -> Path:
    build_tiny_encoders(root / "enc")
    specs = [dataclasses.replace(s, key=f"c{i:03d}", frames=(9, 1)[i % 2], height=64, width=(96, 64)[i % 2], fps=8.0)
             for i, s in enumerate(default_specs(20, seed=11))]
    write_clip_folder(root / "clips", specs, broken=False)
    preprocess([str(root / "clips")], root / "data", root / "enc", buckets=[VID, IMG], shard_samples=4,
               progress=False, teacher=False, val_fraction=0.2, val_min_per_bucket=3, val_max_share=0.35)
    return root / "data"


def model_and_objective():
    torch.manual_seed(0)  # the init draws from the global generator
    m = MotifDiT(load_model_config("tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero-initialised output head: the prediction must matter
        for _, p in sorted(m.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    obj = DiffusionObjective(ObjectiveConfig(conditioning={"text_dropout": 0.0}))
    return m, obj
