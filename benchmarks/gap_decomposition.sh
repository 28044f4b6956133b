#!/usr/bin/env bash
# The 5-way 1-shot gap decomposed with short runs: the paper-form config, each
# of the authors' differences switched on alone, all of them together, and MAML
# on both loss scales. One run at a time on one core (CORE, default 1); a run
# already finished is skipped, so the same command resumes the study.
#
#   bash benchmarks/gap_decomposition.sh [CORE]
#   python benchmarks/compare_runs.py --out benchmarks/results/gap_decomposition_5w1s \
#     paper=benchmarks/runs/gap_5w1s/paper ...
#
# The protocol of recipe_study_5w1s.md: meta-batch 8, constant meta lr 1e-3,
# 600 meta-steps, validation on 100 tasks every 200 steps, test on 100 tasks.
# Adam's eps is the paper's 1e-8 unless a run names the authors' 1e-3 (one of
# the differences under study), whatever the configs' defaults now are; the
# MAML runs name their inner step.
set -euo pipefail
cd "$(dirname "$0")/.."
CORE="${1:-1}"
ROOT=benchmarks/runs/gap_5w1s
COMMON="meta_batch=8 task_chunk=1 meta_steps=600 lr_schedule=constant meta_lr=0.001 \
log_every=50 val_every=200 val_tasks=100 test_tasks=100 checkpoint_every=0 keep_checkpoints=1 \
adam_eps=1e-8"

run() {  # run LABEL CONFIG [FIELD=VALUE ...]
  local label="$1" config="$2"; shift 2
  if [[ -f "$ROOT/$label/results.json" ]]; then
    echo "$label: done"; return
  fi
  echo "$label: $config $*  ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086
  taskset -c "$CORE" imaml-train "$config" --workdir "$ROOT/$label" --no-progress \
    --set $COMMON "$@" > "$ROOT/$label.log" 2>&1
  tail -n 3 "$ROOT/$label.log"
}

run paper omniglot_5w1s_imaml_gd
run damped omniglot_5w1s_imaml_gd cg_damping=1.0 lam_damping=10.0
run inner_loop omniglot_5w1s_imaml_gd inner=gd_then_pull_back inner_lr=0.1 inner_backtrack=false
run adam_eps omniglot_5w1s_imaml_gd adam_eps=0.001
run one_query omniglot_5w1s_imaml_gd q_query=1
run authors omniglot_5w1s_imaml_gd_authors q_query=1 adam_eps=0.001
run maml_reference omniglot_5w1s_maml inner_lr=2.0
run maml_mean_0.4 omniglot_5w1s_maml inner_lr=0.4
# MAML on its reference network (no batch-norm scale, batch norms left out of
# the inner step, Glorot initialisation, spatial mean before the head).
run maml_refnet_2.0 omniglot_5w1s_maml network=maml adapt_norm=false inner_lr=2.0
run maml_refnet_0.4 omniglot_5w1s_maml network=maml adapt_norm=false inner_lr=0.4
run maml_frozen_norm_2.0 omniglot_5w1s_maml adapt_norm=false inner_lr=2.0
