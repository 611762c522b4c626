#!/usr/bin/env bash
# Reproduce the FlowNIB paper's fine-tuning tables (Kowsher et al., "FlowNIB: An Information Bottleneck Analysis of
# Bidirectional vs. Unidirectional Language Models"):
#   Table 2  classification: 9 tasks x encoders/decoders, head=pooling vs head=masking (encoders) / head=generation
#            (decoders), RoCoFT column rank 3 (experiment=flownib_cls)
#   Table 3  regression: STS-B, SICK, WASSA-2017, LCP, CRP, Humicroedit, same grid (experiment=flownib_reg)
#   probes   average OIC per model and head: every completed run is probed (objective=flownib)
# then cmiexp-report (Markdown, CSV and LaTeX under OUT/reports/flownib_{cls,reg,probe}; rows split by head).
#
#   scripts/reproduce_flownib_tables.sh              # the full grid (needs the hub or local data, and GPUs)
#   scripts/reproduce_flownib_tables.sh --smoke      # offline, minutes: tiny-bert + tiny-gpt2 on ../shared RTE and STS-B
#
# Options:
#   --smoke            tiny models, ../shared/data/glue RTE (Table 2) and STS-B (Table 3), a few steps, 1 seed
#   --out DIR          output folder (default: $CMIEXP_OUTPUT_DIR, else outputs/; outputs/smoke with --smoke)
#   --tables LIST      cls,reg (default: both)
#   --cls-tasks LIST   default: glue/cola,glue/sst2,glue/mrpc,glue/qnli,glue/rte,glue/mnli,cls/boolq,cls/hellaswag,cls/siqa
#   --reg-tasks LIST   default: glue/stsb,reg/sick,reg/wassa,reg/lcp,reg/crp,reg/humicroedit
#   --encoders LIST    default: roberta-base,roberta-large,deberta-v3-base,deberta-v3-large,modernbert-base,modernbert-large
#   --decoders LIST    default: gpt2-medium,gpt2-large,smollm2-135m,smollm2-360m,mobilellm-125m,mobilellm-350m,mobilellm-600m
#   --seeds LIST       default: 1,2,3 (smoke: 1)
#   --dry-run          print the commands instead of running them
#   -- OVERRIDES...    extra Hydra overrides for every run (e.g. -- trainer.mixed_precision=bf16)
# Environment: GLUE_DIR=/path/to/glue_data (standard GLUE layout) reads local GLUE data instead of the hub;
# DATA_DIR=/path/with/<dataset>/ folders (sick, wassa, lcp, crp, humicroedit, boolq, hellaswag, siqa) reads local copies
# of the other tasks (WASSA-2017 and CRP have no standard hub copy and need them);
# CMIEXP / CMIEXP_REPORT override the commands (default: cmiexp / cmiexp-report).
# Re-running the same command resumes unfinished runs and skips finished ones.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
smoke=0 dry=0 out="" tables="cls,reg" seeds="" cls_tasks="" reg_tasks="" encoders="" decoders=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    --tables) tables="$2"; shift ;;
    --cls-tasks) cls_tasks="$2"; shift ;;
    --reg-tasks) reg_tasks="$2"; shift ;;
    --encoders) encoders="$2"; shift ;;
    --decoders) decoders="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "reproduce_flownib_tables.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

read -r -a CMIEXP_CMD <<< "${CMIEXP:-cmiexp}"
read -r -a REPORT_CMD <<< "${CMIEXP_REPORT:-cmiexp-report}"
common=()
glue_dir="${GLUE_DIR:-}"
if [[ $smoke == 1 ]]; then
  out="${out:-${CMIEXP_OUTPUT_DIR:-outputs}/smoke}"
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
  out="${out:-${CMIEXP_OUTPUT_DIR:-outputs}}"
  cls_tasks="${cls_tasks:-glue/cola,glue/sst2,glue/mrpc,glue/qnli,glue/rte,glue/mnli,cls/boolq,cls/hellaswag,cls/siqa}"
  reg_tasks="${reg_tasks:-glue/stsb,reg/sick,reg/wassa,reg/lcp,reg/crp,reg/humicroedit}"
  encoders="${encoders:-roberta-base,roberta-large,deberta-v3-base,deberta-v3-large,modernbert-base,modernbert-large}"
  decoders="${decoders:-gpt2-medium,gpt2-large,smollm2-135m,smollm2-360m,mobilellm-125m,mobilellm-350m,mobilellm-600m}"
  seeds="${seeds:-1,2,3}"
fi
out="$(realpath -m "$out")"

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
