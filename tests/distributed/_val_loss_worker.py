"""torchrun worker: the validation loss on 2 gloo ranks; rank 0 writes sums / counts, every rank its forwards."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from motif_train.data.heldout import HeldOutReader
from motif_train.evaluation.val_loss import validation_loss
from tests.unit._val_loss_env import STAGE, model_and_objective


def main(data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reader = HeldOutReader(data)
    model, obj = model_and_objective()
    res = validation_loss(model, obj, reader, STAGE, rank=rank, world_size=world, sigmas=4)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"sums": res.sums.tolist(), "counts": res.counts.tolist(),
                                                         "forwards": res.forwards, "stage": res.stage_loss}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
