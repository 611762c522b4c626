#!/usr/bin/env bash
# Reproduce the MCMI knowledge-distillation table: BERT-base teachers fine-tuned with plain CE and with the
# maximum-CMI objective (mcmi), and DistilBERT students distilled (objective=kd, T=4, alpha=0.9) from each,
# on the 8 GLUE classification tasks, then print the table (cmiexp-report over students and teachers; also
# written as Markdown, CSV and LaTeX under OUT/reports/mcmi_kd).
#
#   scripts/reproduce_mcmi_kd.sh                  # full: 8 tasks x 2 teachers (trained once each) x 3 student seeds
#   scripts/reproduce_mcmi_kd.sh --smoke          # offline, minutes: tiny-bert teachers, tiny-distilbert students
#   scripts/reproduce_mcmi_kd.sh --mini           # offline mini reproduction (README): SST-2, 3000 rows, CE and MCMI
#                                                 # tiny-bert teachers -> 3 tiny-distilbert student seeds each; + dev CMI
#
# Every teacher is trained on demand by the first student that needs it, into OUT/teachers/<task>/<model>/
# <objective>/<hash of its config>, and reused by the other seeds and by later invocations. The chain is
# the reference's: CE teacher -> MCMI teacher (one epoch of CE - lam*KL fine-tuning *of that CE teacher*,
# objective.start=ce, Q_y from the trained CE model) -> KD students of each.
# Options:
#   --smoke           tiny models, ../shared/data/glue, small subsets, one short epoch (same configs end to end)
#   --mini            tiny models, larger subsets (2 epochs; teachers 2 CE epochs + 1 MCMI epoch; out: outputs/mini)
#   --out DIR         output folder (default: $CMIEXP_OUTPUT_DIR, else outputs/; outputs/smoke with --smoke)
#   --tasks LIST      comma-separated GLUE tasks (default: cola,sst2,mrpc,qqp,mnli,qnli,rte,wnli; smoke: mrpc,rte)
#   --seeds LIST      comma-separated student seeds (default: 1,2,3; smoke: 1,2)
#   --dry-run         print the commands instead of running them
#   -- OVERRIDES...   extra Hydra overrides for every student run
# Environment: GLUE_DIR=/path/to/glue_data (standard GLUE layout) reads local data instead of the hub;
# CMIEXP / CMIEXP_REPORT override the commands (default: cmiexp / cmiexp-report).
# Re-running the same command resumes unfinished runs and skips finished ones (teachers included).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
smoke=0 mini=0 dry=0 out="" tasks="" seeds=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --mini) mini=1 ;;
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    --tasks) tasks="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "reproduce_mcmi_kd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

read -r -a CMIEXP_CMD <<< "${CMIEXP:-cmiexp}"
read -r -a REPORT_CMD <<< "${CMIEXP_REPORT:-cmiexp-report}"
overrides=()
report_extra=()
if [[ $mini == 1 ]]; then
  out="${out:-${CMIEXP_OUTPUT_DIR:-outputs}/mini}"
  tasks="${tasks:-sst2}"
  seeds="${seeds:-1,2,3}"
  glue_dir="${GLUE_DIR:-$repo/../shared/data/glue}"
  overrides+=(model=tiny-distilbert objective.teacher_config.model=tiny-bert objective.teacher_config.trainer.epochs=2
              "task.data_dir=$glue_dir" task.max_train_samples=3000 task.max_eval_samples=400 task.max_length=64
              trainer.epochs=2 trainer.progress_bar=false)
  report_extra=(--extra-metric cmi)
elif [[ $smoke == 1 ]]; then
  out="${out:-${CMIEXP_OUTPUT_DIR:-outputs}/smoke}"
  tasks="${tasks:-mrpc,rte}"
  seeds="${seeds:-1,2}"
  glue_dir="${GLUE_DIR:-$repo/../shared/data/glue}"
  # Teachers take the student's task settings (data, subsets, max_length); their model and epochs are set here.
  overrides+=(model=tiny-distilbert objective.teacher_config.model=tiny-bert objective.teacher_config.trainer.epochs=1
              "task.data_dir=$glue_dir" task.max_train_samples=64 task.max_eval_samples=32 task.max_length=64
              trainer.epochs=1 trainer.progress_bar=false)
else
  out="${out:-${CMIEXP_OUTPUT_DIR:-outputs}}"
  tasks="${tasks:-cola,sst2,mrpc,qqp,mnli,qnli,rte,wnli}"
  seeds="${seeds:-1,2,3}"
  if [[ -n "${GLUE_DIR:-}" ]]; then overrides+=("task.data_dir=$GLUE_DIR"); fi
fi
out="$(realpath -m "$out")"
task_list="$(echo "$tasks" | sed -E 's#(^|,)#\1glue/#g')"

sweep=("${CMIEXP_CMD[@]}" -m experiment=mcmi_kd "task=$task_list" objective.teacher_config.objective=ce,mcmi
       "seed=$seeds" "paths.output_dir=$out" "${overrides[@]}" "${extra[@]}")
# Students (runs/mcmi_kd) and their teachers (teachers/, experiment mcmi_kd) in one table.
report=("${REPORT_CMD[@]}" "$out/runs/mcmi_kd" "$out/teachers" --experiment mcmi_kd --out "$out/reports/mcmi_kd"
        "${report_extra[@]}")

if [[ $dry == 1 ]]; then
  printf '%q ' "${sweep[@]}"; echo
  printf '%q ' "${report[@]}"; echo
  exit 0
fi
mkdir -p "$out/runs/mcmi_kd" "$out/teachers"
echo "== mcmi_kd: ${sweep[*]}"
status=0
"${sweep[@]}" || status=$?
# The report marks failed or missing runs, so it is written even when some runs failed.
echo "== report: ${report[*]}"
"${report[@]}"
exit "$status"
