#!/usr/bin/env bash
# Table 2's CPU cells at one equal budget per column, trained one after the
# other on one core, each resumable: a finished cell is skipped, a stopped one
# resumes from its last checkpoint. The whole invocation stops within DEADLINE
# seconds (each cell gets what is left as its --time-budget).
#
#   bash benchmarks/table2_cpu.sh CORE DEADLINE CONFIG [CONFIG ...]
#   bash benchmarks/table2_cpu.sh 1 7200 omniglot_5w1s_imaml_gd_authors omniglot_5w1s_fomaml
#   python benchmarks/tables.py --runs benchmarks/runs --out benchmarks/results --tag _cpu
#
# Budget of a column (the same for every row; meta lr decays linearly to 0):
#   5-way 1-shot: 6,000 meta-steps at meta-batch 8 (about 1-1.5 h on one core)
#   5-way 5-shot: 1,800 meta-steps at meta-batch 8 (about 1.6 h on one core)
# Work directories are benchmarks/runs/CONFIG, the names tables.py reads.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 3 ]]; then
  sed -n '2,9p' "$0" >&2; exit 2
fi
CORE="$1"; DEADLINE="$2"; shift 2
ROOT=benchmarks/runs
START=$(date +%s)
COMMON="meta_batch=8 task_chunk=1 lr_schedule=linear keep_checkpoints=1"

budget_of() {  # the column's overrides of a config name
  case "$1" in
    omniglot_5w1s_*) echo "meta_steps=6000 val_every=500 checkpoint_every=500" ;;
    omniglot_5w5s_*) echo "meta_steps=1800 val_every=300 checkpoint_every=300" ;;
    *) echo "table2_cpu.sh: no CPU budget for $1 (5-way columns only)" >&2
       exit 2 ;;
  esac
  # The paper-form iMAML cells of these columns were trained with Adam's eps
  # at optax's 1e-8, before the configs took the authors' 1e-3; every cell
  # of those rows keeps it, so the rows stay comparable and resumable.
  case "$1" in
    *_imaml_gd|*_imaml_hf) echo "adam_eps=1e-8" ;;
  esac
}

finished() {  # finished CONFIG: its results.json reached the target steps
  python - "$ROOT/$1/results.json" <<'EOF'
import json, sys
try:
  budget = json.load(open(sys.argv[1]))["budget"]
except (OSError, ValueError, KeyError):
  sys.exit(1)
sys.exit(0 if budget["meta_steps"] >= budget["meta_steps_target"] else 1)
EOF
}

for config in "$@"; do
  overrides="$(budget_of "$config")"
  if finished "$config"; then
    echo "$config: done"; continue
  fi
  left=$(( DEADLINE - ($(date +%s) - START) ))
  if (( left < 600 )); then
    echo "$config: not started, ${left}s of the deadline left"; continue
  fi
  # Testing 600 tasks and compiling take a few minutes beyond the budget.
  budget=$(( left - 300 ))
  echo "$config: $overrides, budget ${budget}s ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086
  taskset -c "$CORE" imaml-train "$config" --workdir "$ROOT/$config" \
    --no-progress --time-budget "$budget" --set $COMMON $overrides \
    >> "$ROOT/$config.log" 2>&1 || { echo "$config: failed, see $ROOT/$config.log"; exit 1; }
  tail -n 3 "$ROOT/$config.log"
done
