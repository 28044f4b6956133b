"""XLA settings that make the test suite compile faster.

The suite's time is mostly XLA compiling steps that then run a few times.
Two of XLA's CPU settings trade the speed of the compiled code for the speed
of compiling it (``benchmarks/compile_time.py --xla-flags``, one core of the
2-core CPU; time to compile, then time per call):

=====================================  ============  ============  ==============
XLA_FLAGS                               sinusoid      Omniglot      Omniglot
                                        train step    5w1s step     call
=====================================  ============  ============  ==============
(XLA's default)                         11.2-12.2 s   50.8-51.0 s   1.04-1.22 s
``IN_PROCESS``                           7.5 s        34.1 s        1.09 s
``CHILD`` (also LLVM at ``-O0``)         2.4 s        14.2 s        3.71 s
=====================================  ============  ============  ==============

(trace, lower and compile; ``benchmarks/results/compile_time_flags_cpu.md``).

``IN_PROCESS`` (``--xla_cpu_use_fusion_emitters=false``: XLA's older loop
emitters instead of its new fusion emitters) compiles 1.5-1.6x faster with
code about as fast, so the pytest process uses it (``conftest`` sets it
before JAX starts its backend): the tests check the same HLO, emitted by
another of XLA's code generators. ``CHILD`` adds LLVM at ``-O0``, whose code
runs 3-4x slower, for the child processes that run a few steps each
(benchmark quick runs, the notebook's kernel, multi-device and multi-process
runs). LLVM at ``-O0`` alone is not used in this process: there, one test
(the miniImageNet network's Hessian-vector product) came out NaN.
"""

import os

IN_PROCESS = "--xla_cpu_use_fusion_emitters=false"
CHILD = "--xla_backend_optimization_level=0 " + IN_PROCESS


def _join(*flag_lists: str) -> str:
  """The flags of all lists, each once, in order."""
  return " ".join(
    dict.fromkeys(f for flags in flag_lists for f in flags.split())
  )


def flags(*more: str) -> str:
  """``XLA_FLAGS`` for a child process: ``more`` and ``CHILD``."""
  return _join(*more, CHILD)


def environ(**extra: str) -> dict:
  """This process's environment (and ``extra``) with ``CHILD`` added to
  ``XLA_FLAGS``."""
  env = dict(os.environ, **extra)
  env["XLA_FLAGS"] = flags(env.get("XLA_FLAGS", ""))
  return env


def use_in_process() -> None:
  """Adds ``IN_PROCESS`` to this process's ``XLA_FLAGS``; takes effect only
  if JAX has not started its backend yet."""
  os.environ["XLA_FLAGS"] = _join(os.environ.get("XLA_FLAGS", ""), IN_PROCESS)
