"""What training computes and writes stays exactly what it was.

Two short runs, a sinusoid one and an Omniglot 5-way 1-shot one, each in a
child process on one device and one thread (``GOLDEN_XLA_FLAGS``), with an
explicit ``task_chunk``. Their outputs are reduced to a small record
(:func:`fingerprint`): every ``metrics.jsonl`` record, ``results.json``
without its timings, and per-array statistics of every checkpoint entry
(sum, absolute sum, squared sum and a position-weighted sum, so that a
permutation or a sign change shows), and compared with the records in
``tests/golden/``: structure, integers and strings exactly, floats to a
relative ``5e-3`` (:func:`assert_close`). Exact equality would be
machine-dependent: the same program rounds differently in the last bit on an
AVX2 and an AVX-512 CPU, or after XLA fuses a changed program otherwise, and
a few meta-steps carry that along (up to 3e-3 relative in Adam's first
moment of the sinusoid run, whose backtracking inner loop amplifies it).
The CG residual, a difference of nearly equal vectors, is compared to
``1e-4`` absolute. A 1% change of the parameters fails the test
(``test_assert_close_catches_what_matters``). The runs
keep a persistent compilation cache of their own
(``$IMAML_CACHE_DIR/xla-golden``, :func:`golden_compile_cache`), so a rerun
mostly loads its compiled steps (the same executables) and never one that
another command compiled under other flags. The two
runs start in the background when the session starts (``BACKGROUND_JOBS``,
see ``conftest``), side by side.

When a change is meant to alter what training computes, rewrite the records
with ``python tests/test_train_golden.py --write`` (with
``IMAML_OMNIGLOT_DIR`` set) and say why in the commit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fast_compile
import numpy as np
import pytest

from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import metrics_log

GOLDEN_DIR = Path(__file__).parent / "golden"
# One thread, so that no reduction depends on how work is split over cores.
GOLDEN_XLA_FLAGS = fast_compile.flags(
  "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
# Both runs set log_residual=true, so that the records also check the
# residual's path (the default step is the same program without its
# branch, and tests/test_train_run.py checks what it logs).
RUNS = {
  "sinusoid": [
    "sinusoid",
    "--set",
    "meta_steps=6",
    "meta_batch=4",
    "task_chunk=2",
    "inner_steps=4",
    "log_every=2",
    "val_every=3",
    "val_tasks=10",
    "test_tasks=10",
    "eval_chunk=5",
    "checkpoint_every=2",
    "keep_checkpoints=2",
    "log_residual=true",
  ],
  "omniglot_5w1s": [
    "omniglot_5w1s_imaml_gd",
    "--set",
    "meta_steps=4",
    "meta_batch=2",
    "task_chunk=1",
    "log_every=2",
    "val_every=2",
    "val_tasks=4",
    "test_tasks=4",
    "eval_chunk=4",
    "checkpoint_every=2",
    "keep_checkpoints=2",
    "log_residual=true",
  ],
}
# Fields that measure time or name this machine's paths, not results.
TIMING_FIELDS = (
  "wall_time_s",
  "train_time_s_this_run",
  "compile_time_s",
  "eval_compile_time_s",
  "steps_per_s",
)


def golden_compile_cache() -> Path:
  """A compilation cache for the golden runs alone.

  JAX's persistent cache can hand a step compiled by another command
  (several threads, other flags) to a one-thread golden run: reductions
  then split differently and a near-tie in a test task's logits flips one
  answer (seen: the 4-task test accuracy's interval moved by 3%). A cache
  of their own keeps reruns fast and their executables their own.
  """
  base = os.environ.get("IMAML_CACHE_DIR") or tempfile.gettempdir()
  return Path(base) / "xla-golden"


def run(name: str, workdir: Path) -> None:
  """Trains run ``name`` in ``workdir`` in a child process."""
  env = dict(os.environ, XLA_FLAGS=GOLDEN_XLA_FLAGS, JAX_PLATFORMS="cpu")
  command = [
    sys.executable,
    "-m",
    "imaml_jax",
    "train",
    *RUNS[name],
    "--workdir",
    str(workdir),
    "--devices",
    "1",
    "--no-progress",
    "--compile-cache",
    str(golden_compile_cache()),
  ]
  proc = subprocess.run(
    command, env=env, capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


# Relative tolerance of a float in a record, and the floor of its scale.
RTOL = 5e-3
ATOL = 1e-6
# The relative CG residual ||A x - b|| / ||b|| cancels: an absolute bound.
RESIDUAL_ATOL = 1e-4


def array_record(array) -> dict:
  """dtype, shape and statistics of ``array``: its bytes' SHA-256 where it
  is not a float array (integers and keys must match exactly), else its
  sum, absolute sum, squared sum and sum weighted by ``sin(index)``."""
  array = np.ascontiguousarray(array)
  record = {"dtype": str(array.dtype), "shape": list(array.shape)}
  if not np.issubdtype(array.dtype, np.floating):
    record["sha256"] = hashlib.sha256(array.tobytes()).hexdigest()
    return record
  flat = array.astype(np.float64).ravel()
  weights = np.sin(np.arange(flat.size, dtype=np.float64) + 1.0)
  record.update(
    sum=float(flat.sum()),
    abs_sum=float(np.abs(flat).sum()),
    sq_sum=float(np.square(flat).sum()),
    weighted_sum=float(weights @ flat),
  )
  return record


def tree_record(tree) -> dict:
  """:func:`array_record` of every leaf of a nested dict, by key path."""
  records = {}

  def visit(path: str, node) -> None:
    if isinstance(node, dict):
      for key in sorted(node):
        visit(f"{path}/{key}", node[key])
      return
    records[path] = array_record(node)

  visit("", tree)
  return records


def checkpoint_record(path: Path) -> dict:
  """A checkpoint's step and the records of each entry (but its clock)."""
  step, tree = ckpt_lib.load(path)
  return {
    "step": step,
    **{
      key: tree_record(value)
      for key, value in sorted(tree.items())
      if key != "elapsed_s"
    },
  }


def assert_close(actual, expected, where: str = "record") -> None:
  """Same structure, equal non-floats, floats within ``RTOL``.

  A float's scale is its own magnitude, or for a checkpoint's sums its
  array's absolute sum (a sum of numbers of both signs can cancel to near
  zero, where a relative test on it alone would be meaningless).
  """
  if isinstance(expected, dict):
    assert isinstance(actual, dict), f"{where}: {actual!r} is not a dict"
    assert sorted(actual) == sorted(expected), (
      f"{where}: keys {sorted(actual)} != {sorted(expected)}"
    )
    scale = expected.get("abs_sum")
    for key in expected:
      if scale is not None and key in ("sum", "weighted_sum"):
        tolerance = RTOL * abs(scale) + ATOL
      elif key == "residual" and isinstance(expected[key], float):
        tolerance = RESIDUAL_ATOL + RTOL * abs(expected[key])
      else:
        tolerance = None
      if tolerance is not None and not np.isnan(expected[key]):
        assert abs(actual[key] - expected[key]) <= tolerance, (
          f"{where}/{key}: {actual[key]!r} != {expected[key]!r}"
        )
      else:
        assert_close(actual[key], expected[key], f"{where}/{key}")
    return
  if isinstance(expected, list):
    assert isinstance(actual, list) and len(actual) == len(expected), (
      f"{where}: {actual!r} != {expected!r}"
    )
    for i, (a, e) in enumerate(zip(actual, expected)):
      assert_close(a, e, f"{where}[{i}]")
    return
  if isinstance(expected, float) and not isinstance(actual, bool):
    assert isinstance(actual, (int, float)), f"{where}: {actual!r}"
    if np.isnan(expected):
      assert np.isnan(actual), f"{where}: {actual!r} != nan"
      return
    assert abs(actual - expected) <= RTOL * abs(expected) + ATOL, (
      f"{where}: {actual!r} != {expected!r}"
    )
    return
  assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def fingerprint(workdir: Path) -> dict:
  """The golden record of a finished run in ``workdir``."""
  results = json.loads((workdir / "results.json").read_text())
  budget = {
    k: v for k, v in results.pop("budget").items() if k not in TIMING_FIELDS
  }
  return {
    "metrics": metrics_log.read_records(workdir / "metrics.jsonl"),
    "results": {**results, "budget": budget},
    "checkpoints": [
      checkpoint_record(path)
      for _, path in ckpt_lib.list_checkpoints(workdir / "checkpoints")
    ],
  }


def golden_path(name: str) -> Path:
  return GOLDEN_DIR / f"{name}.json"


def _has_data(name: str) -> bool:
  return not name.startswith("omniglot") or bool(
    os.environ.get("IMAML_OMNIGLOT_DIR")
  )


def _job(name: str, out: Path) -> dict | None:
  """Trains run ``name`` in ``out``; its record (JSON round-tripped), or
  ``None`` without the data it needs."""
  if not _has_data(name):
    return None
  run(name, out / name)
  return json.loads(json.dumps(fingerprint(out / name)))


BACKGROUND_JOBS = {name: functools.partial(_job, name) for name in RUNS}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_outputs_match_the_golden_records(name, background):
  actual = background(name)
  if actual is None:
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  expected = json.loads(golden_path(name).read_text())
  for part in ("metrics", "results", "checkpoints"):
    assert_close(actual[part], expected[part], f"{name}/{part}")


def test_assert_close_catches_what_matters():
  """The comparison passes last-bit noise and fails on real changes."""
  record = checkpoint_record_of({"w": np.linspace(-1.0, 1.0, 50)})
  noisy = checkpoint_record_of({"w": np.linspace(-1.0, 1.0, 50) * (1 + 1e-7)})
  assert_close(noisy, record)
  changed = {"w": np.linspace(-1.0, 1.0, 50) * 1.01}
  flipped = {"w": np.linspace(-1.0, 1.0, 50)[::-1].copy()}
  for other in (changed, flipped, {"w": np.linspace(-1.0, 1.0, 50)[:-1]}):
    with pytest.raises(AssertionError):
      assert_close(checkpoint_record_of(other), record)
  assert_close({"loss": 1.0 + 1e-7, "step": 2}, {"loss": 1.0, "step": 2})
  with pytest.raises(AssertionError):
    assert_close({"loss": 1.01, "step": 2}, {"loss": 1.0, "step": 2})
  with pytest.raises(AssertionError):
    assert_close({"loss": 1.0, "step": 3}, {"loss": 1.0, "step": 2})
  with pytest.raises(AssertionError):
    assert_close(
      checkpoint_record_of({"key": np.array([1, 2])}),
      checkpoint_record_of({"key": np.array([1, 3])}),
    )


def checkpoint_record_of(tree: dict) -> dict:
  """:func:`tree_record` round-tripped through JSON, as a golden file is."""
  return json.loads(json.dumps(tree_record(tree)))


def write_golden_records() -> None:
  """Runs every golden run and writes its record to ``tests/golden/``."""
  GOLDEN_DIR.mkdir(exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    for name in sorted(RUNS):
      run(name, Path(tmp) / name)
      text = json.dumps(fingerprint(Path(tmp) / name), indent=1, sort_keys=True)
      golden_path(name).write_text(text + "\n")
      print(f"wrote {golden_path(name)} ({len(text)} bytes)")


if __name__ == "__main__":
  if sys.argv[1:] != ["--write"]:
    sys.exit("usage: python tests/test_train_golden.py --write")
  write_golden_records()
