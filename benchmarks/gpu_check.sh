#!/usr/bin/env bash
# One-command GPU check (issue #16): prints one table (and writes it to $OUT/gpu_check.md when
# $OUT is set). At most 8 minutes on one GPU: the Python driver keeps to its own 460 s budget and
# this wrapper kills it at 480 s. Exits non-zero on any failure.
#   bash benchmarks/gpu_check.sh               # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps shrunk, on CPU (tests/test_benchmarks.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec timeout --signal=TERM --kill-after=10 480 python benchmarks/gpu_check.py "$@"
