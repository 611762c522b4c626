#!/usr/bin/env bash
# Reproduce the FlowNIB paper's fine-tuning tables (Kowsher et al., "FlowNIB: An Information Bottleneck Analysis of
# Bidirectional vs. Unidirectional Language Models"): Table 2 (classification), Table 3 (regression) and the
# average-OIC probes, then cmiexp-report (Markdown, CSV and LaTeX under OUT/reports/flownib_{cls,reg,probe}).
# Options: see --help (scripts/lib/args.sh, shared by every reproduction script).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
SCRIPT_NAME=reproduce_flownib_tables.sh
SCRIPT_HELP='Reproduce the FlowNIB fine-tuning tables and probes (experiments flownib_cls, flownib_reg, flownib_probe).

  Table 2  classification: 9 tasks x encoders/decoders, head=pooling vs head=masking (encoders) / head=generation
           (decoders), RoCoFT column rank 3 (experiment=flownib_cls)
  Table 3  regression: STS-B, SICK, WASSA-2017, LCP, CRP, Humicroedit, same grid (experiment=flownib_reg)
  probes   average OIC per model and head: every completed run is probed (objective=flownib)

  scripts/reproduce_flownib_tables.sh              # the full grid (needs the hub or local data, and GPUs)
  scripts/reproduce_flownib_tables.sh --smoke      # offline, minutes: tiny-bert + tiny-gpt2 on ../shared RTE and STS-B
Defaults: seeds 1,2,3 (smoke: 1); tasks: those of --cls-tasks and --reg-tasks below. --tasks replaces both:
glue/stsb and reg/* go to Table 3, every other task to Table 2 (a name without "/" is a GLUE task).
The probe step gets the overrides after -- too; --dry-run prints the training and report commands (the probe
commands depend on which runs completed).
GLUE_DIR=/path/to/glue_data (standard GLUE layout) reads local GLUE data instead of the hub;
DATA_DIR=/path/with/<dataset>/ folders (sick, wassa, lcp, crp, humicroedit, boolq, hellaswag, siqa) reads local
copies of the other tasks (WASSA-2017 and CRP have no standard hub copy and need them).
Re-running the same command resumes unfinished runs and skips finished ones.'
SCRIPT_FLAGS=()
SCRIPT_VALUES=(--tables --cls-tasks --reg-tasks --encoders --decoders)
SCRIPT_OPTIONS_HELP='  --tables LIST      cls,reg (default: both)
  --cls-tasks LIST   default: glue/cola,glue/sst2,glue/mrpc,glue/qnli,glue/rte,glue/mnli,cls/boolq,cls/hellaswag,cls/siqa
                     (smoke: glue/rte)
  --reg-tasks LIST   default: glue/stsb,reg/sick,reg/wassa,reg/lcp,reg/crp,reg/humicroedit (smoke: glue/stsb)
  --encoders LIST    default: roberta-base,roberta-large,deberta-v3-base,deberta-v3-large,modernbert-base,modernbert-large
  --decoders LIST    default: gpt2-medium,gpt2-large,smollm2-135m,smollm2-360m,mobilellm-125m,mobilellm-350m,mobilellm-600m'
opt_tables="cls,reg" opt_cls_tasks="" opt_reg_tasks="" opt_encoders="" opt_decoders=""
source "$here/lib/args.sh"
repro_parse_args "$@"
tables=$opt_tables cls_tasks=$opt_cls_tasks reg_tasks=$opt_reg_tasks encoders=$opt_encoders decoders=$opt_decoders
if [[ -n "$tasks" ]]; then
  # --tasks: regression tasks (glue/stsb, reg/*) to Table 3, the others to Table 2; a table left empty is skipped.
  cls_tasks="" reg_tasks=""
  IFS=',' read -r -a _given <<< "$(repro_tasks glue "$tasks")"
  for t in "${_given[@]}"; do
    if [[ "$t" == glue/stsb || "$t" == reg/* ]]; then reg_tasks+="${reg_tasks:+,}$t"; else cls_tasks+="${cls_tasks:+,}$t"; fi
  done
  _kept=()
  IFS=',' read -r -a _tables <<< "$tables"
  for t in "${_tables[@]}"; do
    if [[ ($t == cls && -n "$cls_tasks") || ($t == reg && -n "$reg_tasks") || ($t != cls && $t != reg) ]]; then _kept+=("$t"); fi
  done
  tables="$(IFS=','; echo "${_kept[*]}")"
fi

common=()
glue_dir="${GLUE_DIR:-}"
if [[ $smoke == 1 ]]; then
  repro_out smoke
  cls_tasks="${cls_tasks:-glue/rte}"
  reg_tasks="${reg_tasks:-glue/stsb}"
  encoders="${encoders:-tiny-bert}"
  decoders="${decoders:-tiny-gpt2}"
  seeds="${seeds:-1}"
  glue_dir="${GLUE_DIR:-$repo/../shared/data/glue}"
  # The same experiment configs end to end, shrunk: small subsets, 3 optimizer steps, tiny-model learning rate.
  common+=(task.max_train_samples=48 task.max_eval_samples=24 task.max_length=64 trainer.max_steps=3
           trainer.batch_size=16 trainer.warmup_steps=0 trainer.lr=1.0e-3 trainer.progress_bar=false)
else
  repro_out
  cls_tasks="${cls_tasks:-glue/cola,glue/sst2,glue/mrpc,glue/qnli,glue/rte,glue/mnli,cls/boolq,cls/hellaswag,cls/siqa}"
  reg_tasks="${reg_tasks:-glue/stsb,reg/sick,reg/wassa,reg/lcp,reg/crp,reg/humicroedit}"
  encoders="${encoders:-roberta-base,roberta-large,deberta-v3-base,deberta-v3-large,modernbert-base,modernbert-large}"
  decoders="${decoders:-gpt2-medium,gpt2-large,smollm2-135m,smollm2-360m,mobilellm-125m,mobilellm-350m,mobilellm-600m}"
  seeds="${seeds:-1,2,3}"
fi

# task.data_dir for one task: GLUE_DIR for glue/*, DATA_DIR/<dataset> for the others when that folder exists.
data_dir_override() {
  local task="$1" ds
  ds="${task#*/}"
  if [[ "$task" == glue/* ]]; then
    [[ -n "$glue_dir" ]] && echo "task.data_dir=$glue_dir"
  elif [[ -n "${DATA_DIR:-}" && -d "${DATA_DIR}/$ds" ]]; then
    echo "task.data_dir=${DATA_DIR}/$ds"
  fi
  return 0
}

commands=()
add_sweeps() {  # experiment, comma-separated tasks
  local experiment="$1" task dd
  IFS=',' read -r -a task_array <<< "$2"
  for task in "${task_array[@]}"; do
    dd="$(data_dir_override "$task")"
    # One sweep per task (each may need its own data folder) and per model family (their prompt heads differ).
    for family in encoders decoders; do
      local models heads
      if [[ $family == encoders ]]; then models="$encoders" heads="pooling,masking"; else models="$decoders" heads="pooling,generation"; fi
      [[ -z "$models" ]] && continue
      local cmd=("${CMIEXP_CMD[@]}" -m "experiment=$experiment" "task=$task" "model=$models" "head=$heads" "seed=$seeds"
                 "paths.output_dir=$out")
      [[ -n "$dd" ]] && cmd+=("$dd")
      cmd+=("${common[@]}" "${extra[@]}")
      commands+=("$(printf '%q ' "${cmd[@]}")")
    done
  done
}
reports=()
IFS=',' read -r -a table_array <<< "$tables"
for table in "${table_array[@]}"; do
  case "$table" in
    cls) add_sweeps flownib_cls "$cls_tasks"
         reports+=("$(printf '%q ' "${REPORT_CMD[@]}" "$out/runs/flownib_cls" --experiment flownib_cls --group-by head \
                      --no-reference --out "$out/reports/flownib_cls")") ;;
    reg) add_sweeps flownib_reg "$reg_tasks"
         # Table 3 reports MSE (each task's primary metric) and MAE; Pearson/Spearman are in results.json too.
         reports+=("$(printf '%q ' "${REPORT_CMD[@]}" "$out/runs/flownib_reg" --experiment flownib_reg --group-by head \
                      --primary --extra-metric mae --no-reference --out "$out/reports/flownib_reg")") ;;
    *) echo "reproduce_flownib_tables.sh: unknown table $table (valid: cls, reg)" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- PROBE STEP (average OIC per model)
# After training, every completed run is probed with the FlowNIB probe (objective=flownib, experiment=flownib_probe),
# with the run's own task, model, head and data folder; the probe report averages the OIC per model and head.
probe_overrides=()
[[ $smoke == 1 ]] && probe_overrides=(objective.steps=20 objective.max_samples=64 objective.batch_size=32)
probe_commands() {  # $1 = a runs folder; prints one probe command per completed run in it
  python - "$1" <<'PY'
import json, pathlib, shlex, sys
import yaml
root = pathlib.Path(sys.argv[1])
for res in sorted(root.rglob("results.json")) if root.exists() else []:
    r = json.loads(res.read_text())
    if r.get("status") != "completed" or r.get("objective") == "flownib":
        continue
    cfg = yaml.safe_load((res.parent / "config.yaml").read_text())
    args = ["experiment=flownib_probe", f"objective.source={res.parent}", f"task={r['task']}", f"model={r['model']}",
            f"head={r.get('head') or 'pooling'}", f"seed={r['seed']}"]
    if (cfg.get("task") or {}).get("data_dir"):
        args.append(f"task.data_dir={cfg['task']['data_dir']}")
    print(shlex.join(args))
PY
}
probe_report="$(printf '%q ' "${REPORT_CMD[@]}" "$out/runs/flownib_probe" --experiment flownib_probe --primary \
                --group-by head --no-reference --out "$out/reports/flownib_probe")"

if [[ $dry == 1 ]]; then
  printf '%s\n' "${commands[@]}" "# then one probe per completed run: cmiexp experiment=flownib_probe objective.source=RUN ..." \
    "${reports[@]}" "$probe_report"
  exit 0
fi
mkdir -p "$out"
status=0
for c in "${commands[@]}"; do
  echo "== run: $c"
  eval "$c" || status=$?
done
for table in "${table_array[@]}"; do
  while IFS= read -r args; do
    [[ -z "$args" ]] && continue
    c="$(printf '%q ' "${CMIEXP_CMD[@]}") $args paths.output_dir=$(printf '%q' "$out") $(printf '%q ' "${probe_overrides[@]}" "${extra[@]}")"
    echo "== probe: $c"
    eval "$c" || status=$?
  done < <(probe_commands "$out/runs/flownib_$table")
done
# The reports mark failed or missing runs, so they are written even when some runs failed.
for c in "${reports[@]}" "$probe_report"; do
  echo "== report: $c"
  eval "$c" || status=$?
done
exit "$status"
