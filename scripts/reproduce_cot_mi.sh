#!/usr/bin/env bash
# Reproduce the chain-of-thought distillation comparison of MI-CoT (Chen et al. 2024) against
# Distilling Step-by-Step (Hsieh et al. 2023) and the DSS paper's two baselines:
#
#   objectives: dss (alpha=0.5), cot_mi (alpha=0.5, beta=0.1, mi_variant=reference),
#               cot_finetune (no prefix, gold labels), cot_distill (no prefix, teacher labels)
#   tasks:      cot/svamp, cot/cqa, cot/anli1, cot/esnli   (teacher rationales/labels from PaLM)
#   students:   t5-v1_1-base, t5-v1_1-small
#   seeds:      0 1 2 (SEEDS="0 1 2")
#
# with the recipe of experiment=cot_mi (AdamW lr 5e-5 linear to 0, no warmup, batch 64, 10k steps,
# inputs 1024 / targets 256 tokens, greedy generation <= 64 tokens; valid accuracy selects the
# checkpoint, whose test accuracy/ECE go to results.json "test" and predictions.jsonl), then
# summarises every run with cmiexp-report (valid accuracy table; test metrics are in each run's
# results.json).
#
# Usage:
#   COT_DATA_DIR=/path/to/dss/datasets scripts/reproduce_cot_mi.sh      # the full grid (GPU, hours per run)
#   scripts/reproduce_cot_mi.sh --smoke                                 # offline smoke test (CPU, ~1-2 min)
#   SMOKE=1 scripts/reproduce_cot_mi.sh                                 # same
#
# COT_DATA_DIR is the unzipped datasets/ folder of DSS's datasets.zip
# (https://github.com/google-research/distilling-step-by-step). Runs go to
# $CMIEXP_OUTPUT_DIR/runs/<experiment>/... (default outputs/). Re-running the script resumes
# unfinished runs and skips finished ones. Extra arguments are passed to every cmiexp call,
# e.g. trainer.mixed_precision=bf16 or hydra/launcher=... for a cluster launcher.
#
# Smoke mode: tiny-t5 (offline, random weights) on ../shared/data/cot, SVAMP and CQA only (the
# offline fixtures have no ANLI train file), a few steps on small subsets, one seed, one thread;
# it checks the whole pipeline end to end and ends with the report table. Its numbers mean nothing.
set -euo pipefail

SMOKE="${SMOKE:-0}"
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
OUT="${CMIEXP_OUTPUT_DIR:-outputs}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export CMIEXP_OUTPUT_DIR="$OUT"

# The installed console scripts, or the module when cmiexp is not on PATH (e.g. a bare checkout).
if command -v cmiexp >/dev/null 2>&1 && command -v cmiexp-report >/dev/null 2>&1; then
  CMIEXP=(cmiexp)
  REPORT=(cmiexp-report)
else
  PY="${PYTHON:-python3}"
  CMIEXP=("$PY" -m cmiexp)
  REPORT=("$PY" -m cmiexp.report)
fi

OBJECTIVES="dss,cot_mi,cot_finetune,cot_distill"

if [[ "$SMOKE" == "1" ]]; then
  DATA="${COT_DATA_DIR:-$REPO/../shared/data/cot}"
  EXPERIMENT="${EXPERIMENT_NAME:-cot_mi_smoke}"
  # Tiny models on a shared CPU run faster on one thread than on several competing ones.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  SEEDS_CSV="$(echo "${SEEDS:-0}" | tr ' ' ',')"
  # eval_every=3 with 8 steps: model selection over three evaluations (steps 3, 6, 8).
  status=0
  "${CMIEXP[@]}" -m experiment=cot_mi experiment_name="$EXPERIMENT" model=tiny-t5 \
    task=cot/svamp,cot/cqa objective="$OBJECTIVES" seed="$SEEDS_CSV" \
    task.data_dir="$DATA" task.max_train_samples=32 task.max_eval_samples=12 \
    task.max_input_length=96 task.max_target_length=48 task.generation_max_length=12 \
    trainer.max_steps=8 trainer.batch_size=4 trainer.eval_batch_size=12 trainer.eval_every=3 \
    trainer.save_every=100 trainer.progress_bar=false ${ARGS[@]+"${ARGS[@]}"} || status=$?
  "${REPORT[@]}" "$OUT/runs/$EXPERIMENT"
  exit "$status"
fi

DATA="${COT_DATA_DIR:?set COT_DATA_DIR to the DSS datasets/ folder (unzipped datasets.zip), or use --smoke}"
EXPERIMENT="${EXPERIMENT_NAME:-cot_mi}"
SEEDS_CSV="$(echo "${SEEDS:-0 1 2}" | tr ' ' ',')"
status=0
for MODEL in t5-v1_1-base t5-v1_1-small; do
  # A failed run is recorded in its run directory; the sweep goes on and the report lists it.
  "${CMIEXP[@]}" -m experiment=cot_mi experiment_name="$EXPERIMENT" model="$MODEL" \
    task=cot/svamp,cot/cqa,cot/anli1,cot/esnli objective="$OBJECTIVES" seed="$SEEDS_CSV" \
    task.data_dir="$DATA" ${ARGS[@]+"${ARGS[@]}"} || status=$?
done
"${REPORT[@]}" "$OUT/runs/$EXPERIMENT"
exit "$status"
