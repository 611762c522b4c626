#!/usr/bin/env bash
# Reproduce the chain-of-thought distillation comparison of MI-CoT (Chen et al. 2024) against
# Distilling Step-by-Step (Hsieh et al. 2023) and the DSS paper's two baselines, then summarise every
# run with cmiexp-report on the test split.
# Options: see --help (scripts/lib/args.sh, shared by every reproduction script).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
SCRIPT_NAME=reproduce_cot_mi.sh
SCRIPT_HELP='Reproduce the CoT distillation comparison (experiment=cot_mi): DSS vs MI-CoT and the DSS baselines.

  objectives: dss (alpha=0.5), cot_mi (alpha=0.5, beta=0.1, mi_variant=reference),
              cot_finetune (no prefix, gold labels), cot_distill (no prefix, teacher labels)
  tasks:      cot/svamp, cot/cqa, cot/anli1, cot/esnli   (teacher rationales/labels from PaLM)
  students:   t5-v1_1-base, t5-v1_1-small

with the recipe of experiment=cot_mi (AdamW lr 5e-5 linear to 0, no warmup, batch 64, 10k steps, inputs 1024 /
targets 256 tokens, greedy generation <= 64 tokens; valid accuracy selects the checkpoint, whose test
accuracy/ECE go to results.json "test" and predictions.jsonl); the report shows test accuracy (--split test).

  COT_DATA_DIR=/path/to/dss/datasets scripts/reproduce_cot_mi.sh      # the full grid (GPU, hours per run)
  scripts/reproduce_cot_mi.sh --smoke                                 # offline smoke test (CPU, ~1-2 min)
  scripts/reproduce_cot_mi.sh --mini                                  # offline mini reproduction (~10 min on
                                                                      # 2 cores): tiny-t5, DSS vs MI-CoT, SVAMP
                                                                      # and CQA x 3 seeds (experiment=cot_mi_mini)

Defaults: tasks svamp,cqa,anli1,esnli (smoke: svamp,cqa: the offline fixtures have no ANLI train file;
family cot), seeds 0,1,2 (smoke: 0). COT_DATA_DIR is the unzipped datasets/ folder of DSS'"'"'s datasets.zip
(https://github.com/google-research/distilling-step-by-step); smoke mode reads ../shared/data/cot unless it is set.
Smoke mode: tiny-t5 (offline, random weights), a few steps on small subsets, one thread; it checks the whole
pipeline end to end and ends with the report table. Its numbers mean nothing.
Re-running the same command resumes unfinished runs and skips finished ones.'
SCRIPT_FLAGS=(--mini)
SCRIPT_VALUES=()
SCRIPT_OPTIONS_HELP='  --mini            DSS vs MI-CoT with tiny-t5 on SVAMP and CQA x 3 seeds, 400 steps (out: <out>/mini)'
opt_mini=0
source "$here/lib/args.sh"
repro_parse_args "$@"
mini=$opt_mini

OBJECTIVES="dss,cot_mi,cot_finetune,cot_distill"
OVERLAY=cot_mi
sweeps=()
if [[ $mini == 1 || $smoke == 1 ]]; then
  # Both offline modes: ../shared data unless COT_DATA_DIR is set, no hub, and one thread per process (tiny models
  # on a shared CPU run faster on one thread than on several competing ones).
  DATA="${COT_DATA_DIR:-$repo/../shared/data/cot}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  models=(tiny-t5)
fi
if [[ $mini == 1 ]]; then
  # docs/reproductions.md (d): the recipe is conf/experiment/cot_mi_mini.yaml; the two methods compared, at one
  # step budget, read once after the last step. Two sweeps side by side (one per task, one thread each).
  repro_out mini
  EXPERIMENT=cot_mi_mini
  OVERLAY=cot_mi_mini
  OBJECTIVES="dss,cot_mi"
  tasks="${tasks:-svamp,cqa}"
  seeds="${seeds:-0,1,2}"
  recipe=()
elif [[ $smoke == 1 ]]; then
  repro_out smoke
  EXPERIMENT=cot_mi_smoke
  tasks="${tasks:-svamp,cqa}"
  seeds="${seeds:-0}"
  # eval_every=3 with 8 steps: model selection over three evaluations (steps 3, 6, 8).
  recipe=(task.max_train_samples=32 task.max_eval_samples=12
          task.max_input_length=96 task.max_target_length=48 task.generation_max_length=12
          trainer.max_steps=8 trainer.batch_size=4 trainer.eval_batch_size=12 trainer.eval_every=3
          trainer.save_every=100 trainer.progress_bar=false)
else
  repro_out
  if [[ -z "${COT_DATA_DIR:-}" && $dry == 0 ]]; then
    repro_die "set COT_DATA_DIR to the DSS datasets/ folder (unzipped datasets.zip), or use --smoke"
  fi
  DATA="${COT_DATA_DIR:-\$COT_DATA_DIR}"  # a dry run without it shows where it goes
  EXPERIMENT=cot_mi
  tasks="${tasks:-svamp,cqa,anli1,esnli}"
  seeds="${seeds:-0,1,2}"
  models=(t5-v1_1-base t5-v1_1-small)
  recipe=()
fi
task_list="$(repro_tasks cot "$tasks")"

[[ $dry == 1 ]] || mkdir -p "$out"
sweep() {  # sweep MODEL TASKS: one cmiexp sweep (a failed run is recorded in its run directory; the sweep goes on)
  repro_run cot_mi "${CMIEXP_CMD[@]}" -m experiment="$OVERLAY" experiment_name="$EXPERIMENT" model="$1" \
    "task=$2" objective="$OBJECTIVES" "seed=$seeds" "task.data_dir=$DATA" "paths.output_dir=$out" \
    ${recipe[@]+"${recipe[@]}"} ${extra[@]+"${extra[@]}"}
}
if [[ $mini == 1 && $dry == 0 ]]; then
  # One sweep per task, side by side on the machine's cores (one thread each), then wait for all of them.
  pids=()
  for TASK in ${task_list//,/ }; do
    ( sweep "${models[0]}" "$TASK"; exit "$repro_status" ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || repro_status=$?; done
else
  for MODEL in "${models[@]}"; do
    if [[ $mini == 1 ]]; then
      for TASK in ${task_list//,/ }; do sweep "$MODEL" "$TASK"; done
    else
      sweep "$MODEL" "$task_list"
    fi
  done
fi
# The paper reports test accuracy: the report reads each run's results.json "test" block.
repro_run report "${REPORT_CMD[@]}" "$out/runs/$EXPERIMENT" --split test
exit "$repro_status"
