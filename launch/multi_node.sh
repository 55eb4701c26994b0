#!/usr/bin/env bash
# Several nodes, c10d rendezvous. Run the same command on every node:
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=<0..NNODES-1> launch/multi_node.sh [config] [flags]
# NPROC (processes per node) defaults to the GPU count, or 2 on CPU-only nodes. Python: the
# repository's .venv when there is one (no need to activate it), else PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_python.sh
: "${MASTER_ADDR:?set MASTER_ADDR to the host name or address of node 0}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's index, 0..NNODES-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
config="${1:-launch/configs/charlm.yaml}"; shift || true
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 2)")
fi
exec "$PYTHON" -m shardema.cli launch \
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-shardema}" \
  launch/train.py --config "$config" "$@"
