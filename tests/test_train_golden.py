"""What training computes and writes stays exactly what it was.

Two short runs, a sinusoid one and an Omniglot 5-way 1-shot one, each in a
child process on one device and one thread (``GOLDEN_XLA_FLAGS``), with an
explicit ``task_chunk``. Their outputs are reduced to a small record
(:func:`fingerprint`): every ``metrics.jsonl`` record, ``results.json``
without its timings, and a SHA-256 of every checkpoint's contents, and
compared for exact equality with the records in ``tests/golden/``. The runs
use the command's persistent compilation cache (``$IMAML_CACHE_DIR/xla``),
so a rerun mostly loads its compiled steps (the same executables). The two
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
  ]
  proc = subprocess.run(
    command, env=env, capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def tree_sha256(tree) -> str:
  """SHA-256 of a nested dict's leaves: key path, dtype, shape and bytes."""
  digest = hashlib.sha256()

  def visit(path: str, node) -> None:
    if isinstance(node, dict):
      for key in sorted(node):
        visit(f"{path}/{key}", node[key])
      return
    array = np.ascontiguousarray(node)
    digest.update(f"{path}:{array.dtype}:{array.shape}:".encode())
    digest.update(array.tobytes())

  visit("", tree)
  return digest.hexdigest()


def checkpoint_record(path: Path) -> dict:
  """A checkpoint's step and a digest of each entry (but its clock)."""
  step, tree = ckpt_lib.load(path)
  return {
    "step": step,
    **{
      key: tree_sha256(value)
      for key, value in sorted(tree.items())
      if key != "elapsed_s"
    },
  }


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
  assert actual["metrics"] == expected["metrics"]
  assert actual["results"] == expected["results"]
  assert actual["checkpoints"] == expected["checkpoints"]


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
