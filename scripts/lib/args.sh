# The one argument interface of the reproduction scripts (scripts/reproduce_*.sh): sourced, not run.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/args.sh"
#   repro_parse_args "$@"
#
# Before calling repro_parse_args a script sets
#   SCRIPT_NAME            its file name, for messages
#   SCRIPT_HELP            what it reproduces, its modes and its defaults (printed first by --help)
#   SCRIPT_FLAGS=()        its own flags (e.g. --mini); each sets opt_<name>=1 (dashes become underscores)
#   SCRIPT_VALUES=()       its own options taking a value (e.g. --tables); each sets opt_<name>=VALUE
#   SCRIPT_OPTIONS_HELP    help lines for those (printed after the shared list; may be empty)
# and afterwards has
#   smoke dry out tasks seeds   (0/1, 0/1, strings; empty when not given)
#   extra=(...)                 the Hydra overrides after "--", for every cmiexp call
#   CMIEXP_CMD=(...) REPORT_CMD=(...)   the commands to run ($CMIEXP / $CMIEXP_REPORT override them)
# Bad input (an unknown option, a missing value, a malformed list) is one line on stderr and exit 2.

REPRO_SHARED_HELP='Options (the same for every reproduction script):
  --smoke           offline smoke mode: tiny models on ../shared/data, small subsets, a few steps
  --seeds LIST      comma-separated seeds, e.g. 0,1 (default: the script'"'"'s, below)
  --tasks LIST      comma-separated tasks, e.g. rte,sst2 (a name without "/" gets the script'"'"'s task family)
  --out DIR         output folder (default: $CMIEXP_OUTPUT_DIR, else outputs/; with --smoke: <that>/smoke)
  --dry-run         print every cmiexp command the script would run, and run nothing
  -h, --help        print this help
  -- OVERRIDES...   Hydra overrides passed to every cmiexp call, e.g. -- trainer.max_steps=1
Environment: CMIEXP / CMIEXP_REPORT replace the commands (default: cmiexp / cmiexp-report, or
python3 -m cmiexp / python3 -m cmiexp.report when those are not on PATH).'

repro_die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  exit 2
}

repro_help() {
  printf '%s\n\n%s\n' "$SCRIPT_HELP" "$REPRO_SHARED_HELP"
  if [[ -n "${SCRIPT_OPTIONS_HELP:-}" ]]; then
    printf '\nOptions of %s:\n%s\n' "$SCRIPT_NAME" "$SCRIPT_OPTIONS_HELP"
  fi
}

repro_in() {  # repro_in WORD LIST...: whether WORD is one of LIST
  local w="$1" x
  shift
  for x in "$@"; do [[ "$x" == "$w" ]] && return 0; done
  return 1
}

repro_parse_args() {
  smoke=0 dry=0 out="" tasks="" seeds=""
  extra=()
  local name
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --smoke) smoke=1 ;;
      --dry-run) dry=1 ;;
      -h|--help) repro_help; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      --out|--tasks|--seeds)
        [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || repro_die "$1 needs a value (see --help)"
        case "$1" in --out) out="$2" ;; --tasks) tasks="$2" ;; --seeds) seeds="$2" ;; esac
        shift ;;
      --*=*) repro_die "write options as '${1%%=*} VALUE', not '$1' (see --help)" ;;
      --*)
        name="opt_$(echo "${1#--}" | tr '-' '_')"
        if repro_in "$1" ${SCRIPT_FLAGS[@]+"${SCRIPT_FLAGS[@]}"}; then
          printf -v "$name" '%s' 1
        elif repro_in "$1" ${SCRIPT_VALUES[@]+"${SCRIPT_VALUES[@]}"}; then
          [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || repro_die "$1 needs a value (see --help)"
          printf -v "$name" '%s' "$2"
          shift
        else
          repro_die "unknown option $1 (see --help)"
        fi ;;
      *) repro_die "unexpected argument '$1': Hydra overrides go after '--', e.g. -- $1" ;;
    esac
    shift
  done
  [[ -z "$seeds" || "$seeds" =~ ^[0-9]+(,[0-9]+)*$ ]] || repro_die "--seeds $seeds: expected comma-separated integers, e.g. 0,1"
  [[ -z "$tasks" || "$tasks" =~ ^[A-Za-z0-9_./-]+(,[A-Za-z0-9_./-]+)*$ ]] || \
    repro_die "--tasks $tasks: expected comma-separated task names, e.g. rte,sst2"
  repro_commands
}

repro_commands() {
  local py="${PYTHON:-python3}"
  if [[ -n "${CMIEXP:-}" ]]; then
    read -r -a CMIEXP_CMD <<< "$CMIEXP"
  elif command -v cmiexp >/dev/null 2>&1; then
    CMIEXP_CMD=(cmiexp)
  else
    CMIEXP_CMD=("$py" -m cmiexp)
  fi
  if [[ -n "${CMIEXP_REPORT:-}" ]]; then
    read -r -a REPORT_CMD <<< "$CMIEXP_REPORT"
  elif command -v cmiexp-report >/dev/null 2>&1; then
    REPORT_CMD=(cmiexp-report)
  else
    REPORT_CMD=("$py" -m cmiexp.report)
  fi
}

repro_out() {  # the absolute output folder: --out, else $CMIEXP_OUTPUT_DIR or outputs/ (+ /SUFFIX, e.g. smoke)
  local suffix="${1:-}"
  if [[ -z "$out" ]]; then
    out="${CMIEXP_OUTPUT_DIR:-outputs}${suffix:+/$suffix}"
  fi
  out="$(realpath -m "$out")"
}

repro_tasks() {  # repro_tasks FAMILY LIST: "rte,glue/sst2" -> "glue/rte,glue/sst2"
  local family="$1" t res=()
  IFS=',' read -r -a _repro_list <<< "$2"
  for t in "${_repro_list[@]}"; do
    if [[ "$t" == */* ]]; then res+=("$t"); else res+=("$family/$t"); fi
  done
  (IFS=','; echo "${res[*]}")
}

repro_status=0
repro_run() {  # repro_run LABEL CMD...: print the command (--dry-run) or run it, remembering a failure
  local label="$1"
  shift
  if [[ $dry == 1 ]]; then
    printf '%q ' "$@"
    echo
    return 0
  fi
  echo "== $label: $*"
  "$@" || repro_status=$?
}
