"""Cost of one in-loop validation-loss pass as a share of training time at the default `eval.loss_every`.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_eval.py [--steps 20] [--out docs/bench/eval_cpu.json]

The tiny CPU setting: the tiny DiT (configs/model/tiny.yaml), a real tiny dataset preprocessed with a held-out
split (tests/unit/_val_loss_env.py: 20 clips in 9x64x96 and 1x64x64), the shard loader's steps of the stage
(token_budget 400). Training step = the objective's forward + backward + AdamW step on the loader's batch, timed
over `--steps` steps; the pass = `validation_loss` over the stage's held-out samples at eval.loss_sigmas σ.
share = pass / (loss_every x step time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motif_train.data.heldout import HeldOutReader  # noqa: E402
from motif_train.data.loader import ShardSource  # noqa: E402
from motif_train.evaluation.val_loss import validation_loss  # noqa: E402
from motif_train.sampling import EvalConfig  # noqa: E402
from tests.unit._val_loss_env import STAGE, build_dataset, model_and_objective  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ev = EvalConfig()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_dataset(Path(tmp))
        model, obj = model_and_objective()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        src = ShardSource(root=str(data), num_workers=0, text_dim=32, image_dim=24, seed=0, dp_rank=0, dp_size=1,
                          grad_accum=1)
        src.set_stage(STAGE, teacher=False)
        reader = HeldOutReader(data)
        times = []
        for step in range(1, args.steps + 3):
            t0 = time.perf_counter()
            for b in src.next_step(step):
                out = obj(model, b, step=step, repa=False)
                out.losses["denoise"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step > 2:  # warm-up
                times.append(time.perf_counter() - t0)
        validation_loss(model, obj, reader, STAGE, sigmas=ev.loss_sigmas)  # warm-up
        t0 = time.perf_counter()
        res = validation_loss(model, obj, reader, STAGE, sigmas=ev.loss_sigmas)
        pass_s = time.perf_counter() - t0
        src.close()
        reader.close()
    step_s = sum(times) / len(times)
    report = {"step_s": step_s, "val_pass_s": pass_s, "loss_every": ev.loss_every, "loss_sigmas": ev.loss_sigmas,
              "heldout_samples": sum(res.samples.values()), "forwards": res.forwards,
              "share": pass_s / (ev.loss_every * step_s + pass_s), "pass_in_steps": pass_s / step_s,
              "torch": torch.__version__, "device": "cpu, 1 thread"}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
