"""Every benchmark script runs end to end in its ``--quick`` form.

Each runs in a subprocess (as a user would run it), writes into a temporary
folder, and the test reads back what it wrote. The numbers themselves are
checked where the script makes a claim that a quick run can already show.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow


def run_script(name, *args, timeout=600):
  done = subprocess.run(
      [sys.executable, str(BENCHMARKS / name), *args], capture_output=True,
      text=True, timeout=timeout, check=False,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done.stdout


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_meta_gradient_accuracy_quick(tmp_path):
  run_script("meta_gradient_accuracy.py", "--quick", "--out", str(tmp_path))
  rows = read_csv(tmp_path / "meta_gradient_accuracy_quick.csv")
  assert (tmp_path / "meta_gradient_accuracy_quick.png").stat().st_size > 0
  imaml = [float(r["rel_error"]) for r in rows if r["method"] == "imaml"]
  assert min(imaml) < 1e-8         # The paper's claim, already in float64.


def test_throughput_quick(tmp_path):
  out = run_script("throughput.py", "--quick", "--out", str(tmp_path))
  assert "tasks/s" in out
  result = json.loads((tmp_path / "throughput_cpu_quick.json").read_text())
  row, = result["rows"]
  assert row["tasks_per_s"] > 0 and row["gflop_per_step"] > 0
  assert result["matmul_gflop_per_s"] > 0


def test_memory_vs_steps_quick(tmp_path):
  run_script("memory_vs_steps.py", "--quick", "--algorithms", "imaml",
             "maml", "--out", str(tmp_path))
  rows = read_csv(tmp_path / "memory_vs_steps_cpu_quick.csv")
  temp = {(r["algorithm"], int(r["inner_steps"])): float(r["temp_mb"])
          for r in rows}
  assert temp[("maml", 4)] > temp[("maml", 1)]        # MAML grows ...
  assert temp[("imaml", 4)] <= temp[("imaml", 1)]     # ... iMAML does not.
  assert (tmp_path / "memory_vs_steps_cpu_quick.png").stat().st_size > 0


def test_conv_formulations_quick(tmp_path):
  run_script("conv_formulations.py", "--quick", "--out",
             str(tmp_path / "conv"))
  rows = read_csv(tmp_path / "conv.csv")
  assert {r["conv"] for r in rows} >= {"patches", "lax"}


def test_scaling_quick(tmp_path):
  run_script("scaling.py", "--quick", "--devices", "1,2", "--host-devices",
             "2", "--out", str(tmp_path))
  rows = read_csv(tmp_path / "scaling_cpu.csv")
  assert [int(r["devices"]) for r in rows] == [1, 2]


def test_curvature_quick(tmp_path):
  run_script("curvature.py", "--quick", "--inner-lr", "0.1", "--out",
             str(tmp_path))
  result = json.loads((tmp_path / "curvature_5w1s_quick.json").read_text())
  row, = result["rows"]
  assert row["eig_max_max"] >= row["eig_min_min"]
  assert 0.0 <= row["indefinite_fraction"] <= 1.0
