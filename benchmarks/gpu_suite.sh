#!/usr/bin/env bash
# The accelerator checks in one script, each part under its own time limit so
# that one slow part cannot starve the others:
#   1. throughput of the iMAML-GD meta-step for the four Omniglot settings at
#      meta-batch 32 and one task at a time (benchmarks/throughput.py);
#   2. memory and time per meta-step against inner steps at 20-way 5-shot,
#      each point in a fresh process so the device's peak bytes are its own
#      (benchmarks/memory_vs_steps.py --isolate);
#   3. a short Omniglot 5-way 1-shot iMAML-GD training run under a time
#      budget, tested on the 600 test tasks (python -m imaml_jax train);
#   4. with several devices, the sharded meta-step on 1, 2, 4 and 8 of them
#      (benchmarks/scaling.py);
#   5. Table 2 rows trained on the GPU (benchmarks/tables.py --train): the
#      Omniglot 5-way 1-shot iMAML-GD row at its full 20,000 meta-steps and the
#      5-way 5-shot row under a time budget; their work directories land in
#      RESULTS_DIR/runs.
#
# Usage (from the repository root, with the package importable):
#   IMAML_OMNIGLOT_DIR=... bash benchmarks/gpu_suite.sh RESULTS_DIR
# Results land in RESULTS_DIR; RESULTS_DIR/suite.log holds what was printed.
# The whole suite takes about nine minutes on one H100. GPU_SUITE_QUICK=1
# shrinks every part to a smoke test (for a dry run on a CPU);
# GPU_SUITE_AFTER_PART is a shell command run after each part (to copy the
# results somewhere as they come, say). GPU_SUITE_PARTS picks the parts, by
# name, default "throughput memory train scaling" (parts 1 to 4, about nine
# minutes); "tables" (part 5) takes about nine minutes on its own.
set -u
results=${1:?usage: gpu_suite.sh RESULTS_DIR}
mkdir -p "$results"
log="$results/suite.log"
quick=${GPU_SUITE_QUICK:-0}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
parts=" ${GPU_SUITE_PARTS:-throughput memory train scaling} "
wanted() { [[ "$parts" == *" $1 "* ]]; }

part() {  # part NAME SECONDS COMMAND...: runs COMMAND, logging, time-limited.
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" \
    | tee -a "$log"
  if [ -n "${GPU_SUITE_AFTER_PART:-}" ]; then eval "$GPU_SUITE_AFTER_PART"; fi
}

{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    2>/dev/null || echo "nvidia-smi: not available"
  "$py" - <<'EOF'
import jax
print("jax", jax.__version__, "devices", jax.devices())
EOF
} 2>&1 | tee -a "$log"

if [ "$quick" = 1 ]; then
  wanted throughput && part throughput 300 "$py" "$here/throughput.py" \
    --quick --out "$results"
  wanted memory && part memory 300 "$py" "$here/memory_vs_steps.py" --quick \
    --isolate --out "$results"
  wanted train && part train 300 "$py" -m imaml_jax train \
    omniglot_5w1s_imaml_gd --workdir "$results/train_5w1s" --no-progress \
    --time-budget 5 --set meta_batch=2 log_every=2 val_every=0 \
    test_tasks=10 eval_chunk=10
  wanted scaling && part scaling 200 "$py" "$here/scaling.py" --quick \
    --devices 1 --host-devices 0 --out "$results"
  wanted tables && part tables 300 "$py" "$here/tables.py" --quick \
    --runs "$results/runs" --out "$results" --tag _gpu
else
  wanted throughput && part throughput 230 "$py" "$here/throughput.py" \
    --single-task 5w1s --out "$results"
  wanted memory && part memory 180 "$py" "$here/memory_vs_steps.py" \
    --isolate --jobs 4 --steps 1 25 100 --repeats 3 --point-timeout 150 \
    --out "$results"
  wanted train && part train 130 "$py" -m imaml_jax train \
    omniglot_5w1s_imaml_gd --workdir "$results/train_5w1s" --no-progress \
    --time-budget 45 --set log_every=50 val_every=500 checkpoint_every=0
  if wanted scaling; then
    devices=$("$py" -c "import jax; print(jax.device_count())" 2>/dev/null)
    if [ "${devices:-1}" -gt 1 ]; then
      part scaling 120 "$py" "$here/scaling.py" --devices 1,2,4,8 \
        --host-devices 0 --out "$results"
    else
      echo "=== scaling: skipped (one device)" | tee -a "$log"
    fi
  fi
  if wanted tables; then
    part tables_5w1s 390 "$py" "$here/tables.py" --runs "$results/runs" \
      --train omniglot_5w1s_imaml_gd --time-budget 300 --out "$results" \
      --tag _gpu --set checkpoint_every=0 keep_checkpoints=1
    part tables_5w5s 150 "$py" "$here/tables.py" --runs "$results/runs" \
      --train omniglot_5w5s_imaml_gd --time-budget 75 --out "$results" \
      --tag _gpu --set checkpoint_every=0 keep_checkpoints=1
  fi
fi
echo "=== done $(date -u +%H:%M:%S)" | tee -a "$log"
