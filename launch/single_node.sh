#!/usr/bin/env bash
# One node: torchrun on all local GPUs (or 2 CPU processes without GPUs).
#   launch/single_node.sh [launch/configs/charlm.yaml] [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-launch/configs/charlm.yaml}"; shift || true
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 2)")
fi
exec torchrun --standalone --nproc-per-node="$NPROC" launch/train.py --config "$config" "$@"
