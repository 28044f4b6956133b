"""XLA's code generation without LLVM optimisation, for the tests' child
processes (benchmark scripts, the notebook's kernel, multi-device runs).

Their time is mostly XLA compiling steps that then run a few times. LLVM at
``-O0`` (``--xla_backend_optimization_level=0``) compiles the sinusoid
meta-step 2.5x and the Omniglot one 1.7x faster on a 2-core CPU
(``benchmarks/compile_time.py``: 12.5 s to 5.0 s, 53 s to 31 s); its code
runs slower, which those short runs do not notice. The tests that run in the
pytest process keep XLA's default, the code users run: at ``-O0`` one of them
(the miniImageNet network's Hessian-vector product) comes out NaN.
"""
import os

FLAG = "--xla_backend_optimization_level=0"


def flags(*more: str) -> str:
  """``XLA_FLAGS`` for a child process: ``more`` and ``FLAG``."""
  return " ".join((*more, FLAG))


def environ(**extra: str) -> dict:
  """This process's environment with ``FLAG`` added to ``XLA_FLAGS``."""
  env = dict(os.environ, **extra)
  if "xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAG).strip()
  return env
