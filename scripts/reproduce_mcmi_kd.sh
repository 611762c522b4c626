#!/usr/bin/env bash
# Reproduce the MCMI knowledge-distillation table: BERT-base teachers fine-tuned with plain CE and with the
# maximum-CMI objective (mcmi), and DistilBERT students distilled (objective=kd, T=4, alpha=0.9) from each,
# on the 8 GLUE classification tasks, then print the table (cmiexp-report over students and teachers; also
# written as Markdown, CSV and LaTeX under OUT/reports/mcmi_kd).
# Options: see --help (scripts/lib/args.sh, shared by every reproduction script).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
SCRIPT_NAME=reproduce_mcmi_kd.sh
SCRIPT_HELP='Reproduce the MCMI knowledge-distillation table (experiment=mcmi_kd: CE and MCMI teachers -> KD students).

  scripts/reproduce_mcmi_kd.sh                  # full: 8 tasks x 2 teachers (trained once each) x 3 student seeds
  scripts/reproduce_mcmi_kd.sh --smoke          # offline, minutes: tiny-bert teachers, tiny-distilbert students
  scripts/reproduce_mcmi_kd.sh --mini           # offline mini reproduction (README): SST-2, 3000 rows, CE and MCMI
                                                # tiny-bert teachers -> 3 tiny-distilbert student seeds each; + dev CMI
Every teacher is trained on demand by the first student that needs it (in its own process, under a lock),
into OUT/teachers/<task>/<model>/<objective>/<hash of its config>, and reused by the other seeds and by later
invocations; each student folder ends in -from-<teacher objective>-<teacher hash> (docs/distillation.md).
The chain is the reference'"'"'s: CE teacher -> MCMI teacher (one epoch of CE - lam*KL fine-tuning *of that CE
teacher*, objective.start=ce) -> KD students of each.
Defaults: tasks cola,sst2,mrpc,qqp,mnli,qnli,rte,wnli (smoke: mrpc,rte; mini: sst2; family glue), student seeds
1,2,3 (smoke: 1,2). GLUE_DIR=/path/to/glue_data (standard GLUE layout) reads local data instead of the hub.
Re-running the same command resumes unfinished runs and skips finished ones (teachers included).'
SCRIPT_FLAGS=(--mini)
SCRIPT_VALUES=()
SCRIPT_OPTIONS_HELP='  --mini            tiny models, larger subsets (2 epochs; teachers 2 CE epochs + 1 MCMI epoch, and a 3-epoch
                    CE teacher as the matched-budget control; out: <out>/mini)'
opt_mini=0
source "$here/lib/args.sh"
repro_parse_args "$@"
mini=$opt_mini

overrides=()
teacher_epochs=()
control=()
report_extra=()
if [[ $mini == 1 ]]; then
  repro_out mini
  tasks="${tasks:-sst2}"
  seeds="${seeds:-1,2,3}"
  glue_dir="${GLUE_DIR:-$repo/../shared/data/glue}"
  overrides+=(model=tiny-distilbert objective.teacher_config.model=tiny-bert
              "task.data_dir=$glue_dir" task.max_train_samples=3000 task.max_eval_samples=400 task.max_length=64
              trainer.epochs=2 trainer.progress_bar=false)
  # The CE teacher trains 2 epochs, the MCMI teacher 2 CE epochs + 1 MCMI epoch. A tiny model is not
  # converged after 2 epochs, so a third teacher, CE for 3 epochs (the MCMI teacher's budget), is the
  # matched-budget control: it separates the effect of the MCMI objective from that of one more epoch.
  teacher_epochs=(objective.teacher_config.trainer.epochs=2)
  control=(objective.teacher_config.objective=ce objective.teacher_config.trainer.epochs=3)
  report_extra=(--extra-metric cmi)
elif [[ $smoke == 1 ]]; then
  repro_out smoke
  tasks="${tasks:-mrpc,rte}"
  seeds="${seeds:-1,2}"
  glue_dir="${GLUE_DIR:-$repo/../shared/data/glue}"
  # Teachers take the student's task settings (data, subsets, max_length); their model and epochs are set here.
  overrides+=(model=tiny-distilbert objective.teacher_config.model=tiny-bert objective.teacher_config.trainer.epochs=1
              "task.data_dir=$glue_dir" task.max_train_samples=64 task.max_eval_samples=32 task.max_length=64
              trainer.epochs=1 trainer.progress_bar=false)
else
  repro_out
  tasks="${tasks:-cola,sst2,mrpc,qqp,mnli,qnli,rte,wnli}"
  seeds="${seeds:-1,2,3}"
  if [[ -n "${GLUE_DIR:-}" ]]; then overrides+=("task.data_dir=$GLUE_DIR"); fi
fi
task_list="$(repro_tasks glue "$tasks")"

sweep=("${CMIEXP_CMD[@]}" -m experiment=mcmi_kd "task=$task_list" objective.teacher_config.objective=ce,mcmi
       "seed=$seeds" "paths.output_dir=$out" "${overrides[@]}" "${teacher_epochs[@]}" "${extra[@]}")
# Students (runs/mcmi_kd) and their teachers (teachers/, experiment mcmi_kd) in one table.
report=("${REPORT_CMD[@]}" "$out/runs/mcmi_kd" "$out/teachers" --experiment mcmi_kd --out "$out/reports/mcmi_kd"
        "${report_extra[@]}")

[[ $dry == 1 ]] || mkdir -p "$out/runs/mcmi_kd" "$out/teachers"
repro_run mcmi_kd "${sweep[@]}"
if [[ ${#control[@]} -gt 0 ]]; then
  repro_run mcmi_kd_control "${CMIEXP_CMD[@]}" -m experiment=mcmi_kd "task=$task_list" "seed=$seeds" \
    "paths.output_dir=$out" "${overrides[@]}" "${control[@]}" "${extra[@]}"
fi
# The report marks failed or missing runs, so it is written even when some runs failed.
repro_run report "${report[@]}"
exit "$repro_status"
