"""Hydra entry point: `motif-train` / `python -m motif_train.train` / `torchrun ... -m motif_train.train`.

    torchrun --nproc_per_node=8 -m motif_train.train experiment=motif_video_2b_64xh200
    python -m motif_train.train experiment=tiny_cpu train.steps=20
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from motif_train.config import TrainConfig, register_configs

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

register_configs()


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed DictConfig -> typed dataclasses (runs every __post_init__ check)."""
    return OmegaConf.to_object(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from motif_train.distributed import destroy_distributed
    from motif_train.trainer import Trainer

    trainer = Trainer(to_train_config(cfg))
    try:
        trainer.train()
    finally:
        trainer.close()
    destroy_distributed()


if __name__ == "__main__":
    main()
