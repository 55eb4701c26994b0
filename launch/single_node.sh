#!/usr/bin/env bash
# One node: all local GPUs (or 2 CPU processes without GPUs), with the repository's .venv when
# there is one (no need to activate it; PYTHON=/path/to/python picks another).
#   launch/single_node.sh [launch/configs/charlm.yaml] [extra train.py flags]
# NPROC sets the number of processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_python.sh
config="${1:-launch/configs/charlm.yaml}"; shift || true
exec "$PYTHON" -m shardema.cli launch ${NPROC:+--nproc-per-node="$NPROC"} launch/train.py --config "$config" "$@"
