"""The benchmark scripts' ``--quick`` runs that ``test_benchmarks`` checks.

Each runs in a subprocess (as a user would run it) and writes into a
temporary folder. The runs are mostly compilation, which XLA does on one
core, so they start in the background when the test session starts (two at
a time, ``conftest.quick_run``), beside the tests that run in the pytest
process, and their tests come last (``conftest.pytest_collection_modifyitems``).
They compile without LLVM optimisation (``fast_compile``).
"""
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import fast_compile

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# name: the script and its arguments (each gets ``--out DIR/name``); the
# longest first.
QUICK_RUNS = {
    "tables": ["tables.py", "--quick"],
    "throughput": ["throughput.py", "--quick"],
    "sinusoid_diagnosis": ["sinusoid_diagnosis.py", "--quick"],
    "stability_diagnostics": ["stability_diagnostics.py", "--quick"],
    "compile_time": ["compile_time.py", "--quick"],
    "step_variants": ["step_variants.py", "--quick"],
    "memory_vs_steps": ["memory_vs_steps.py", "--quick", "--algorithms",
                        "maml"],
    "curvature": ["curvature.py", "--quick", "--inner-lr", "0.1"],
    "scaling": ["scaling.py", "--quick", "--devices", "2", "--host-devices",
                "2", "--meta-batch", "4"],
    "conv_formulations": ["conv_formulations.py", "--quick", "--repeats", "1",
                          "--conv", "patches"],
    "meta_gradient_accuracy": ["meta_gradient_accuracy.py", "--quick"],
}


def run_script(name, *args, timeout=600):
  """Runs ``benchmarks/name`` with ``args``; returns its stdout."""
  done = subprocess.run(
      [sys.executable, str(BENCHMARKS / name), *args], capture_output=True,
      text=True, timeout=timeout, check=False,
      env=fast_compile.environ(PYTHONUNBUFFERED="1"))
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done.stdout


def selected(test_names) -> list:
  """The runs that the selected tests (``test_<name>_quick...``) read."""
  return [n for n in QUICK_RUNS
          if any(t.startswith(f"test_{n}_quick") for t in test_names)
          and (n != "tables" or os.environ.get("IMAML_OMNIGLOT_DIR"))]


def start(names, root: Path, workers: int = 2):
  """Starts the runs ``names`` into ``root/name``: ``(pool, futures)``."""
  pool = ThreadPoolExecutor(max_workers=workers)
  futures: dict[str, Future] = {}
  for name in names:
    script, *args = QUICK_RUNS[name]
    extra = ["--runs", str(root / name / "runs")] if name == "tables" else []
    futures[name] = pool.submit(run_script, script, *args, *extra, "--out",
                                str(root / name))
  return pool, futures
