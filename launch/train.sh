#!/usr/bin/env bash
# torchrun wrapper for motif_train. Hydra overrides pass straight through:
#
#   launch/train.sh experiment=tiny_cpu                                   # one node, all its GPUs (or 1 CPU rank)
#   NPROC_PER_NODE=2 launch/train.sh experiment=tiny_cpu                  # 2 CPU ranks (gloo)
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=$head launch/train.sh experiment=motif_video_2b_64xh200
#
# Multi-node uses c10d rendezvous at MASTER_ADDR:MASTER_PORT. No Python logic lives here.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-motif-train}"
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "${NPROC_PER_NODE}" -gt 0 ]] || NPROC_PER_NODE=1
fi

# One thread per rank on CPU; NCCL fails fast instead of hanging on a dead peer.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

if [[ "${NNODES}" -eq 1 ]]; then
  exec "${PYTHON}" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="${NPROC_PER_NODE}" \
    -m motif_train.cli.train "$@"
fi
exec "${PYTHON}" -m torch.distributed.run --nnodes="${NNODES}" --nproc_per_node="${NPROC_PER_NODE}" \
  --node_rank="${NODE_RANK}" --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
  --rdzv_id="${RDZV_ID}" -m motif_train.cli.train "$@"
