#!/usr/bin/env bash
# Table 2's cells at the paper's budgets on one GPU, continued slice by slice.
#
#   IMAML_OMNIGLOT_DIR=... bash benchmarks/table2_full_budget.sh OUT_DIR [SLICE_S] [CELL ...]
#
# GPU time comes in slices of minutes. Each invocation continues the first
# unfinished cell, in the order below, from the run directory committed under
# benchmarks/runs_gpu_full/ (its last checkpoint), trains it for at most
# SLICE_S seconds (default 420), and, if the cell reaches its last meta-step
# within the slice, tests it under the three measurements on 3,000 tasks and
# goes on to the next cell with the time left. Cells run one at a time, each
# with the whole device (task_chunk=0 vmaps the meta-batch).
#
# The budgets are the configs' own, i.e. the paper's: iMAML 20,000 meta-steps
# of 32 tasks; MAML 60,000 of 32 (5-way) or 16 (20-way), MAML's. Order:
CELLS=(20w1s_imaml_gd 20w1s_maml 5w1s_imaml_hf 5w5s_imaml_gd 5w5s_maml
       20w5s_imaml_gd 20w5s_maml 5w1s_imaml_gd+inner_steps=64)
#
# A cell may carry config overrides after a '+' (CELL+KEY=VALUE[+KEY=VALUE]):
# the config CELL with those fields changed, in its own run directory named
# after the whole token. The last cell above is the diagnostic that decides
# whether the published 5-way 1-shot model misses the paper's 99.16 because
# its 16-step inner loop is far from the proximal minimiser
# (benchmarks/results/meta_gradient_omniglot.md): the same config with 64
# inner steps, at the same budget.
#
# Results come back in OUT_DIR/omniglot_CELL/ (config, metrics, results,
# evaluation files, log, last checkpoint only). Bring them into the tree and
# commit them, checkpoint included while the cell is unfinished (list it
# under "Unfinished runs" in docs/models.md; a finished cell's checkpoint is
# a published model there):
#   cp -r OUT_DIR/omniglot_* benchmarks/runs_gpu_full/
# The same command then continues where the slice stopped.
#
# TABLE2_FULL_QUICK=1: a smoke test on a CPU (4 meta-steps a cell, 10 test
# tasks, run directories under OUT_DIR/root instead of the committed ones).
# TABLE2_FULL_DRY_RUN=1 prints each training command it would run and runs
# nothing.
set -u
out=${1:?usage: table2_full_budget.sh OUT_DIR [SLICE_S] [CELL ...]}
slice=${2:-420}
shift $(( $# >= 2 ? 2 : 1 ))
[ $# -gt 0 ] && CELLS=("$@")
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
quick=${TABLE2_FULL_QUICK:-0}
root=benchmarks/runs_gpu_full
common="log_every=100 val_every=1000 checkpoint_every=1000 keep_checkpoints=1"
common="$common task_chunk=0"
eval_tasks=3000
if [ "$quick" = 1 ]; then
  root="$out/root"
  common="meta_steps=4 meta_batch=2 val_every=2 val_tasks=4 test_tasks=10"
  common="$common eval_chunk=10 checkpoint_every=2 keep_checkpoints=1"
  eval_tasks=10
fi
export PYTHONUNBUFFERED=1

config_of() { echo "omniglot_${1%%+*}"; }  # config_of CELL
overrides_of() {  # overrides_of CELL: its KEY=VALUE overrides, one per word
  if [[ $1 == *+* ]]; then echo "${1#*+}" | tr '+' ' '; fi
}

# Refuse an unknown cell or override before any work.
"$py" - "${CELLS[@]}" <<'EOF' || exit 2
import sys
from imaml_jax.train import config
for cell in sys.argv[1:]:
  name, *overrides = cell.split("+")
  try:
    config.apply_overrides(config.get_config(f"omniglot_{name}"), overrides)
  except config.ConfigError as error:
    sys.exit(f"table2_full_budget.sh: cell {cell}: {error}")
EOF

finished() {  # finished DIR: its results.json records the last meta-step
  "$py" - "$1/results.json" <<'EOF'
import json, sys
try:
  budget = json.load(open(sys.argv[1]))["budget"]
except (OSError, KeyError, ValueError):
  sys.exit(1)
sys.exit(0 if budget["meta_steps"] >= budget["meta_steps_target"] else 1)
EOF
}

evaluate() {  # evaluate DIR LOG: the three measurements, 3,000 tasks each
  local protocol
  for protocol in ours paper authors; do
    "$py" -m imaml_jax eval --workdir "$1" --tasks "$eval_tasks" --no-progress \
      --protocol "$protocol" >> "$2" 2>&1
    echo "eval --protocol $protocol: exit $?" >> "$2"
  done
}

[ "${TABLE2_FULL_DRY_RUN:-0}" = 1 ] || mkdir -p "$out"
start=$(date +%s)
for cell in "${CELLS[@]}"; do
  name=omniglot_$cell
  dir="$out/$name" log="$out/$name.log"
  if finished "$root/$name" && [ -f "$root/$name/eval_protocol=paper.json" ]
  then
    echo "$name: finished and tested"
    continue
  fi
  left=$(( slice - ($(date +%s) - start) ))
  if [ "$left" -lt 60 ]; then
    echo "$name: left for the next slice"
    continue
  fi
  # iMAML's cells log CG's residual, which explains a missed target.
  extra=""
  [[ $cell == *imaml* ]] && extra="log_residual=true"
  # shellcheck disable=SC2206
  train=("$py" -m imaml_jax train "$(config_of "$cell")" --workdir "$dir"
         --no-progress --time-budget "$left"
         --set $common $extra $(overrides_of "$cell"))
  if [ "${TABLE2_FULL_DRY_RUN:-0}" = 1 ]; then
    echo "$name: would continue $root/$name for ${left} s: ${train[*]}"
    continue
  fi
  rm -rf "$dir"
  if [ -d "$root/$name" ]; then cp -r "$root/$name" "$dir"; fi
  echo "$name: training for at most ${left} s ($(date -u +%H:%M:%S))"
  timeout --signal=INT --kill-after=20 $((left + 240)) "${train[@]}" \
    >> "$log" 2>&1
  echo "train: exit $?" >> "$log"
  if finished "$dir"; then
    evaluate "$dir" "$log"
  fi
  cp "$log" "$dir/" 2>/dev/null
  # The smoke test brings its results into its own tree, as one would.
  if [ "$quick" = 1 ]; then mkdir -p "$root"; cp -r "$dir" "$root/"; fi
  grep -E "accuracy_after|exit|stopped|Resuming" "$log" | tail -n 12
done
