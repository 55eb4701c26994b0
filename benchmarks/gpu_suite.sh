#!/usr/bin/env bash
# GPU suite: the CUDA-only tests, then the benchmarks: update latency (roofline, peers, K
# factors, bf16), swap, checkpoint (device -> pinned host staging, CRC-32C at disk speed,
# asynchronous save stall against a blocking one) on one CUDA device, in under 7 minutes. Results go to
# benchmarks/results/cuda/ and the CUDA results section of docs/benchmarks.md.
#
#   bash benchmarks/gpu_suite.sh            # full GPU suite
#   bash benchmarks/gpu_suite.sh --quick    # smoke run on the GPU (< 1 minute)
#
# The sharded benchmark is not part of it: its ranks are CPU/gloo processes (several
# NCCL ranks cannot share one GPU), measured by the CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_suite.sh needs a CUDA device (torch.cuda.is_available() is False)"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
# The CUDA-only tests first (pinned swap backups, device update plans, pinned async-save
# staging, the save's agreement over NCCL; skipped on CPU machines), then the benchmarks.
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda \
  tests/unit/test_kernels.py tests/unit/test_swap_unit.py tests/unit/test_async_save.py \
  tests/distributed/test_checkpoint_reshard.py
# Each benchmark has its own limit inside run_all; the whole suite must end within 7 minutes.
exec timeout 295 "$PYTHON" benchmarks/run_all.py --device cuda --no-progress --timeout 170 "$@"
