"""The benchmark scripts' ``--quick`` runs that ``test_benchmarks`` checks.

Each runs in a subprocess (as a user would run it) and writes into a
temporary folder. The runs are mostly compilation, which XLA does on one
core, so they start in the background when the test session starts
(``conftest._background``), beside the tests that run in the pytest process,
and their tests come last. They compile with the child settings of
``fast_compile``. ``import_benchmark`` imports a script as a module, for the
tests that call its functions directly.
"""

import importlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import fast_compile

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def import_benchmark(name):
  """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
  sys.path.insert(0, str(BENCHMARKS))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(str(BENCHMARKS))


# name: the script and its arguments (each gets ``--out DIR/name``); the
# longest first.
QUICK_RUNS = {
  "tables": ["tables.py", "--quick"],
  "throughput": ["throughput.py", "--quick"],
  "sinusoid_diagnosis": ["sinusoid_diagnosis.py", "--quick"],
  "stability_diagnostics": ["stability_diagnostics.py", "--quick"],
  "meta_gradient_omniglot": [
    "meta_gradient_omniglot.py",
    "--quick",
    "--variant",
    "inner_steps=20",
  ],
  "inner_loop_stall": ["inner_loop_stall.py", "--quick"],
  "compile_time": ["compile_time.py", "--quick"],
  "step_variants": ["step_variants.py", "--quick"],
  "memory_vs_steps": ["memory_vs_steps.py", "--quick", "--algorithms", "maml"],
  "curvature": [
    "curvature.py",
    "--quick",
    "--inner-lr",
    "0.1",
    "--inner",
    "gd",
    "hessian_free",
    "--cg-steps",
    "5",
    "20",
  ],
  "scaling": [
    "scaling.py",
    "--quick",
    "--devices",
    "2",
    "--host-devices",
    "2",
    "--meta-batch",
    "4",
  ],
  "conv_formulations": [
    "conv_formulations.py",
    "--quick",
    "--repeats",
    "1",
    "--conv",
    "patches",
  ],
  "meta_gradient_accuracy": ["meta_gradient_accuracy.py", "--quick"],
  "evaluation_chunk": ["evaluation_chunk.py", "--quick"],
}


def run_script(name, *args, timeout=420, attempts=2):
  """Runs ``benchmarks/name`` with ``args``; returns its stdout.

  A run still going after ``timeout`` seconds (each takes 10-110 s on one
  core of a loaded 2-core machine) is taken to hang: it gets SIGABRT, so
  that Python's fault handler prints where each thread is, and is run again,
  up to ``attempts`` times in all. A run that hung once and then passed is
  reported as a warning with those tracebacks.
  """
  hangs = []
  for attempt in range(1, attempts + 1):
    proc = subprocess.Popen(
      [sys.executable, str(BENCHMARKS / name), *args],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=fast_compile.environ(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"),
    )
    try:
      stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGABRT)
      try:
        stdout, stderr = proc.communicate(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
      hangs.append(
        f"{name} {' '.join(args)}: attempt {attempt} still "
        f"running after {timeout} s; its output:\n"
        f"{stdout[-2000:]}\n{stderr[-6000:]}"
      )
      continue
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    if hangs:
      warnings.warn("\n".join(hangs), stacklevel=2)
    return stdout
  raise AssertionError("\n".join(hangs))


def selected(test_names) -> list:
  """The runs that the selected tests (``test_<name>_quick...``) read."""
  return [
    n
    for n in QUICK_RUNS
    if any(t.startswith(f"test_{n}_quick") for t in test_names)
    and (n != "tables" or os.environ.get("IMAML_OMNIGLOT_DIR"))
  ]


def job(name):
  """The quick run ``name`` as a background job: ``job(out) -> stdout``,
  writing into the folder ``out``."""
  script, *args = QUICK_RUNS[name]

  def run(out: Path) -> str:
    extra = ["--runs", str(out / "runs")] if name == "tables" else []
    return run_script(script, *args, *extra, "--out", str(out))

  return run
