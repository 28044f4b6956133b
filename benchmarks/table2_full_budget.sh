#!/usr/bin/env bash
# Table 2's cells at the paper's budgets on one GPU, continued slice by slice.
#
#   IMAML_OMNIGLOT_DIR=... bash benchmarks/table2_full_budget.sh OUT_DIR [SLICE_S] [CELL ...]
#   bash benchmarks/table2_full_budget.sh --unpack OUT_DIR   # a slice's results into the tree
#
# GPU time comes in slices of minutes. Each invocation ends within SLICE_S
# seconds of wall-clock time (default 480: with a machine's start, inside a
# 10-minute command and a 15-minute allowance of device time). It continues
# the first unfinished cell, in the order below, from the run directory
# committed under benchmarks/runs_gpu_full/ (its last checkpoint) and trains
# it for the slice's time less TABLE2_FULL_RESERVE_S (default 180: compiling,
# validation, checkpoints and the run's own final test, which the training
# budget does not count). A cell that reaches its last meta-step is tested
# under the three measurements on 3,000 tasks if TABLE2_FULL_EVAL_S (default
# 150) are left, else in the next slice; then the next cell gets the time
# left. Cells run one at a time, each with the whole device (task_chunk=0
# vmaps the meta-batch).
#
# The budgets are the configs' own, i.e. the paper's: iMAML 20,000 meta-steps
# of 32 tasks; MAML 60,000 of 32 (5-way) or 16 (20-way), MAML's. Order:
CELLS=(20w1s_imaml_gd 20w1s_maml 5w1s_imaml_hf 5w5s_imaml_gd 5w5s_maml
       20w5s_imaml_gd 20w5s_maml 5w1s_imaml_gd+inner_steps=64
       20w1s_imaml_gd+lam=0.5 20w5s_imaml_gd+lam=0.5
       20w5s_imaml_gd+lam=0.5+cg_stop_at_negative_curvature=true)
#
# A cell may carry config overrides after a '+' (CELL+KEY=VALUE[+KEY=VALUE]):
# the config CELL with those fields changed, in its own run directory named
# after the whole token. The last four cells above are diagnostics at the
# paper's budget. 5w1s_imaml_gd+inner_steps=64 decides whether the published
# 5-way 1-shot model misses the paper's 99.16 because its 16-step inner loop
# is far from the proximal minimiser
# (benchmarks/results/meta_gradient_omniglot.md). 20w1s_imaml_gd+lam=0.5
# tests whether the paper's lam 2 holds 20-way adaptation back: on a mean
# support loss it pulls each class's one example 4 times harder than at
# 5-way, and at the CPU column's 2,000 meta-steps of 16 lam 0.5 tested 25.6
# points above lam 2 and 5.1 above MAML (benchmarks/results/lam_20w1s.md).
# 20w5s_imaml_gd+lam=0.5 asks the same at 20-way 5-shot, where 500 CPU
# meta-steps at lam 0.5 tested 18.1 points above lam 2's 796 but 6.5 under
# MAML's 1,000 (same page). There `I + H/lam` turns indefinite as the run
# trains; the last cell keeps lam 0.5 and stops CG at negative curvature,
# which, branched from the CPU run's step 500 with the same tasks, tested
# 2.1 points above it after 1,000 meta-steps, still 4.2 under MAML (same
# page, last section).
#
# Results come back in as few files as a GPU machine lets through: one
# archive per cell that the slice ran, OUT_DIR/omniglot_CELL.tar.gz (its run
# directory: config, metrics, results, evaluation files, log, last
# checkpoint only; a '+' of the cell's name becomes '__' in the file name and
# a '=' becomes '-'), the compiled steps of those cells, OUT_DIR/xla.tar.gz,
# and the slice's summary, OUT_DIR/slice.log. Bring them into the tree,
# each archive replacing its cell's run directory:
#   bash benchmarks/table2_full_budget.sh --unpack OUT_DIR
# and commit the run directories, checkpoint included while the cell is
# unfinished (list it under "Unfinished runs" in docs/models.md; a finished
# cell's checkpoint is a published model there). The same command then
# continues where the slice stopped.
#
# Compiling a cell's steps took 25-110 s of a slice on an H200
# (benchmarks/results/table2_gpu_h200.md). Each cell keeps its compiled
# steps in JAX's persistent cache under benchmarks/runs_gpu_full/xla/CELL
# (ignored by git), which the next slice loads instead of compiling when
# that folder travels with it to the GPU machine. A cell's cache is dropped
# once the cell is finished and tested.
#
# TABLE2_FULL_QUICK=1: a smoke test on a CPU (4 meta-steps a cell, 10 test
# tasks, run directories under OUT_DIR/root instead of the committed ones,
# unpacked there at the end).
# TABLE2_FULL_DRY_RUN=1 prints each training command it would run and runs
# nothing.
set -u
usage="usage: table2_full_budget.sh OUT_DIR [SLICE_S] [CELL ...] | --unpack DIR"
out=${1:?$usage}
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
quick=${TABLE2_FULL_QUICK:-0}
dry=${TABLE2_FULL_DRY_RUN:-0}
root=benchmarks/runs_gpu_full

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

result_of() {  # result_of PROTOCOL: the file imaml-eval writes for it
  if [ "$1" = ours ]; then echo eval.json; else echo "eval_protocol=$1.json"; fi
}

tested() {  # tested DIR: finished, and tested under the three measurements
  local protocol
  finished "$1" || return 1
  for protocol in ours paper authors; do
    [ -f "$1/$(result_of "$protocol")" ] || return 1
  done
}

file_name_of() {  # file_name_of NAME: NAME with '+' -> '__' and '=' -> '-'
  local name=${1//+/__}
  echo "${name//=/-}"
}

cell_folder() {  # cell_folder ARCHIVE: the one folder it holds, a cell's
  local top
  top=$(tar -tzf "$1" | cut -d/ -f1 | sort -u)
  if [[ $top != omniglot_* || $top == *[[:space:]/]* || $top == *..* ]]; then
    echo "table2_full_budget.sh: $1 does not hold one cell's run" \
      "directory (it holds: $top)" >&2
    return 2
  fi
  echo "$top"
}

unpack() {  # unpack FROM ROOT: each archive of FROM replaces its cell in ROOT
  local from=$1 into=$2 archive top
  if ! compgen -G "$from/omniglot_*.tar.gz" > /dev/null; then
    echo "table2_full_budget.sh: no omniglot_*.tar.gz in $from" >&2
    return 2
  fi
  for archive in "$from"/omniglot_*.tar.gz; do
    top=$(cell_folder "$archive") || return 2
    mkdir -p "$into" && rm -rf "${into:?}/$top" &&
      tar -xzf "$archive" -C "$into" || return 2
    echo "$top: unpacked into $into"
  done
  if [ -f "$from/xla.tar.gz" ]; then
    mkdir -p "$into/xla" || return 2
    for top in $(tar -tzf "$from/xla.tar.gz" | cut -d/ -f2 | sort -u); do
      [[ $top == omniglot_* ]] && rm -rf "${into:?}/xla/$top"
    done
    tar -xzf "$from/xla.tar.gz" -C "$into/xla" || return 2
  fi
  # A cell finished and tested needs its compiled steps no more.
  for top in "$into"/xla/omniglot_*; do
    if [ -d "$top" ] && tested "$into/${top##*/}"; then rm -rf "$top"; fi
  done
}

if [ "$out" = --unpack ]; then
  unpack "${2:?$usage}" "$root"
  exit $?
fi
slice=${2:-480}
reserve=${TABLE2_FULL_RESERVE_S:-180}
eval_s=${TABLE2_FULL_EVAL_S:-150}
shift $(( $# >= 2 ? 2 : 1 ))
[ $# -gt 0 ] && CELLS=("$@")
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

evaluate() {  # evaluate DIR LOG CACHE: the measurements it lacks, 3,000 tasks
  local protocol left
  for protocol in ours paper authors; do
    [ -f "$1/$(result_of "$protocol")" ] && continue
    left=$(( slice - ($(date +%s) - start) - 15 ))
    if [ "$left" -lt 30 ]; then
      echo "eval --protocol $protocol: left for the next slice" >> "$2"
      continue
    fi
    timeout --signal=INT --kill-after=5 "$left" \
      "$py" -m imaml_jax eval --workdir "$1" --tasks "$eval_tasks" \
      --no-progress --protocol "$protocol" --compile-cache "$3" >> "$2" 2>&1
    echo "eval --protocol $protocol: exit $?" >> "$2"
  done
}

say() {  # say LINE: to stdout and to the slice's summary
  echo "$1"
  [ "$dry" = 1 ] || echo "$1" >> "$out/slice.log"
}

[ "$dry" = 1 ] || mkdir -p "$out/xla"
ran=0
start=$(date +%s)
for cell in "${CELLS[@]}"; do
  name=omniglot_$cell
  dir="$out/$name" cache="$out/xla/$name"
  log="$out/$(file_name_of "$name").log"
  if tested "$root/$name"; then
    say "$name: finished and tested"
    continue
  fi
  left=$(( slice - ($(date +%s) - start) ))
  if [ "$left" -lt $(( reserve + 60 )) ]; then
    say "$name: left for the next slice"
    continue
  fi
  # iMAML's cells log CG's residual, which explains a missed target.
  extra=""
  [[ $cell == *imaml* ]] && extra="log_residual=true"
  # shellcheck disable=SC2206
  train=("$py" -m imaml_jax train "$(config_of "$cell")" --workdir "$dir"
         --no-progress --time-budget $(( left - reserve ))
         --compile-cache "$cache"
         --set $common $extra $(overrides_of "$cell"))
  if [ "$dry" = 1 ]; then
    echo "$name: would continue $root/$name: ${train[*]}"
    continue
  fi
  ran=1
  rm -rf "$dir" "$cache"
  if [ -d "$root/$name" ]; then cp -r "$root/$name" "$dir"; fi
  if [ -d "$root/xla/$name" ]; then cp -r "$root/xla/$name" "$cache"; fi
  say "$name: training for $(( left - reserve )) s ($(date -u +%H:%M:%S))"
  # The training budget counts training alone; the slice's end is a hard stop.
  timeout --signal=INT --kill-after=10 $(( left - 30 )) "${train[@]}" \
    >> "$log" 2>&1
  echo "train: exit $?" >> "$log"
  if finished "$dir"; then
    if [ $(( slice - ($(date +%s) - start) )) -ge "$eval_s" ]; then
      evaluate "$dir" "$log" "$cache"
    else
      say "$name: finished; tested in the next slice"
    fi
  fi
  grep -E "compiled|accuracy_after|exit|stopped|Resuming" "$log" |
    tail -n 14 | tee -a "$out/slice.log"
  if [ -d "$dir" ]; then
    cat "$log" >> "$dir/$name.log"  # after the earlier slices' logs
    tar -czf "$out/$(file_name_of "$name").tar.gz" -C "$out" "$name" &&
      rm -rf "${dir:?}" "$log"
  fi
done
[ "$dry" = 1 ] && exit 0
# The compiled steps of the cells this slice ran, in one file.
if [ -n "$(ls -A "$out/xla")" ]; then
  tar -czf "$out/xla.tar.gz" -C "$out/xla" . && rm -rf "${out:?}/xla"
  say "compiled steps: $(du -h "$out/xla.tar.gz" | cut -f1) in xla.tar.gz"
else
  rmdir "$out/xla"
fi
# The smoke test brings its results into its own tree, as one would.
if [ "$quick" = 1 ] && [ "$ran" = 1 ]; then unpack "$out" "$root"; fi
