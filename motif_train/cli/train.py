"""Hydra entry point: `motif-train` / `python -m motif_train.cli.train` / `torchrun ... -m motif_train.cli.train`.

    torchrun --nproc_per_node=8 -m motif_train.cli.train experiment=motif_video_2b_64xh200
    python -m motif_train.cli.train experiment=tiny_cpu train.steps=20
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from motif_train.config import TrainConfig, register_configs
from motif_train.paths import config_dir

# The checkout's configs/ or the installed wheel's copy (motif_train/paths.py), never a path from
# this file's location: installed, that points into site-packages where no configs/ exists.
CONFIG_DIR = str(config_dir())

register_configs()


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed DictConfig -> typed dataclasses (runs every __post_init__ check).

    Re-merging onto the strict schema catches keys force-added with `+key=value`, which Hydra
    lets through; `data` stays open (its `_target_` class defines its own keys).
    """
    reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)


def reject_unknown_keys(node, path: str = "") -> None:
    """Every key of a typed node must be a field of its dataclass (catches `+typo=...`)."""
    if isinstance(node, DictConfig):
        if node._is_none() or node._is_missing():
            return
        cls = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(cls):
            extra = set(node.keys()) - {f.name for f in dataclasses.fields(cls)}
            if extra:
                raise ConfigKeyError(f"unknown key(s) {sorted(extra)} under '{path or '<root>'}' "
                                     f"({cls.__name__}); check the spelling")
        items = node.items_ex(resolve=False)
    elif isinstance(node, ListConfig) and not node._is_none():
        items = enumerate(node)
    else:
        return
    for k, v in items:
        if isinstance(v, (DictConfig, ListConfig)):
            reject_unknown_keys(v, f"{path}.{k}" if path else str(k))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from motif_train.distributed import destroy_distributed
    from motif_train.trainer import Trainer

    trainer = Trainer(to_train_config(cfg))
    try:
        trainer.train()
    except BaseException as e:  # noqa: BLE001 - every failure takes the same prompt exit
        fail(trainer, e)
    trainer.close()
    destroy_distributed()


def fail(trainer, error: BaseException) -> None:
    """A rank failed: print the error, close without collectives, exit non-zero NOW.

    A normal interpreter exit could hang: it joins the async-save thread (blocked in a collective
    with ranks that are still stepping) and tears process groups down collectively. `os._exit`
    ends this rank at once; torchrun sees the non-zero exit and stops the other ranks, whose own
    collectives fail against the dead peer (gloo) or are stopped by torchrun (NCCL)."""
    rank = os.environ.get("RANK", "0")
    code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code else 1
    sys.stderr.write(f"[rank {rank}] training failed at step {trainer.step}:\n"
                     + "".join(traceback.format_exception(error)))
    sys.stderr.flush()
    try:
        trainer.close(error=error)
    except BaseException as e:  # noqa: BLE001 - the original error is what matters
        sys.stderr.write(f"[rank {rank}] closing after the error failed too: {type(e).__name__}: {e}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
