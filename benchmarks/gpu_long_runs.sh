#!/usr/bin/env bash
# Two full-budget Omniglot 5-way 1-shot iMAML-GD runs (the paper's 20,000
# meta-steps at meta-batch 32) side by side on one GPU, each under a time
# budget, each tested on the 600 test tasks:
#   linear            the default config with the meta learning rate decaying
#                     linearly to 0 (what kept the CPU runs stable);
#   constant_eps1e-3  a constant rate with Adam's eps at 1e-3 (the authors'
#                     value), the remedy candidate the CPU run left open.
# The default config at a constant rate collapsed near step 14,000 on an H100
# (benchmarks/results/training_stability_5w1s.md). Checkpoints every 4,000
# steps are kept for benchmarks/stability_diagnostics.py.
#
#   IMAML_OMNIGLOT_DIR=... bash benchmarks/gpu_long_runs.sh OUT_DIR [BUDGET_S]
# Each run's work directory is packed into OUT_DIR/LABEL.tar.gz at the end.
set -u
out=${1:?usage: gpu_long_runs.sh OUT_DIR [BUDGET_S]}
budget=${2:-400}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  2>&1 | tee "$out/device.txt"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" \
  2>&1 | tee -a "$out/device.txt"
common="log_every=100 log_residual=true val_every=1000 checkpoint_every=4000"
common="$common keep_checkpoints=6"

run() {  # run LABEL FIELD=VALUE ...
  local label=$1; shift
  timeout --signal=INT --kill-after=20 $((budget + 130)) "$py" -m imaml_jax \
    train omniglot_5w1s_imaml_gd --workdir "$out/$label" --no-progress \
    --time-budget "$budget" --set $common "$@" > "$out/$label.log" 2>&1
  echo "$label: exit $?" >> "$out/$label.log"
  cp "$out/$label.log" "$out/$label/"
  tar -czf "$out/$label.tar.gz" -C "$out" "$label" && rm -rf "${out:?}/$label"
}

run linear lr_schedule=linear &
run constant_eps1e-3 adam_eps=1e-3 &
wait
tail -n 25 "$out"/*.log
