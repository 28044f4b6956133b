"""``imaml-train --devices N``: data-parallel runs on forced host devices.

One subprocess with 4 forced CPU devices (``XLA_FLAGS`` must be set before
jax is imported, and this process already imported it) trains a tiny
sinusoid config on 4 devices, resumes a copy of that run from an earlier
checkpoint on 2 devices (as after an interruption) and tries bad device
requests; the tests compare its work directories with a single-device run
of the same config in this process. A slow test runs the command as two
processes of two devices each, joined by ``--coordinator``. Both start in the
background with the test session (``BACKGROUND_JOBS``,
``conftest._background``) and compile with the child settings of
``fast_compile`` (LLVM at -O0): the runs stay within the tolerance of the
reference run in this process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fast_compile
import jax
import numpy as np
import pytest
import two_hosts

from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import cli
from imaml_jax.train import metrics_log

# lam=50: the sinusoid config's own lam=2 leaves the CG solve of the
# meta-gradient far from converged at initialisation (relative residual
# 0.1 to 2), where a relative change of 1e-7 in the parameters, as from
# another summation order, changes the meta-gradient by up to 20%; with
# lam=50 the solve converges (residual about 1e-4) and runs on different
# device counts stay within about 1e-6 of each other.
TINY = [
  "meta_steps=12",
  "meta_batch=8",
  "inner_steps=4",
  "lam=50",
  "log_every=3",
  "val_every=6",
  "val_tasks=8",
  "test_tasks=8",
  "eval_chunk=8",
  "checkpoint_every=3",
  "keep_checkpoints=10",
]
RESUME_AT = 6

_SCRIPT = textwrap.dedent("""
  import json, os, shutil, sys
  os.environ["JAX_PLATFORMS"] = "cpu"   # XLA_FLAGS: 4 devices, from the parent
  import contextlib, io
  from pathlib import Path
  import jax
  from imaml_jax.train import checkpoint as ckpt_lib, cli

  out, resume_at, tiny = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
  assert jax.device_count() == 4, jax.devices()

  def train(workdir, *flags, overrides=()):
    return cli.train_main(["sinusoid", "--workdir", str(out / workdir),
                           "--no-progress", *flags, "--set", *tiny,
                           *overrides])

  errors = {}
  for name, flags, overrides in [
      ("uneven", ["--devices", "4"], ["meta_batch=6"]),
      ("too_many", ["--devices", "5"], []),
      ("uneven_all", [], ["meta_batch=6"])]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      try:
        train(name, *flags, overrides=overrides)
        code = 0
      except SystemExit as e:
        code = e.code
    errors[name] = {"code": code, "stderr": err.getvalue(),
                    "exists": (out / name).exists()}
  (out / "errors.json").write_text(json.dumps(errors))

  assert train("devices_4", "--devices", "4") == 0
  # One task at a time on each of 2 devices (shard_map per device).
  assert train("chunked_on_2", "--devices", "2",
               overrides=["task_chunk=1"]) == 0
  # An interrupted run: the 4-device run as it was at step resume_at.
  shutil.copytree(out / "devices_4", out / "resumed_on_2")
  for step, path in ckpt_lib.list_checkpoints(out / "resumed_on_2/checkpoints"):
    if step > resume_at:
      path.unlink()
  for name in ("results.json", "curves.png"):
    (out / "resumed_on_2" / name).unlink()
  assert train("resumed_on_2", "--devices", "2") == 0
""")


def _final_state(workdir):
  _, tree = ckpt_lib.load(
    ckpt_lib.latest_checkpoint(Path(workdir) / "checkpoints")
  )
  return tree["state"]


def _assert_close(got, want):
  """Same step; parameters equal up to float rounding of the reductions.

  The rounding is amplified by the meta-gradient's sensitivity and by
  Adam, which turns the rounding noise of a near-zero gradient coordinate
  into a step of up to the learning rate: with CG started from zero about
  1e-6 absolute on parameters of size 0.01 to 2 after 12 steps, with the
  warm start (the default since) up to 1.2e-4 on one weight in 40 of the
  output layer; a wrong task batch or mean would move them all by about the
  learning rate, 1e-3.
  """
  assert int(got["step"]) == int(want["step"])
  assert int(got["skipped"]) == int(want["skipped"]) == 0
  leaves_got = jax.tree_util.tree_flatten_with_path(got["params"])[0]
  leaves_want = jax.tree_util.tree_flatten_with_path(want["params"])[0]
  assert [p for p, _ in leaves_got] == [p for p, _ in leaves_want]
  for (path, x), (_, y) in zip(leaves_got, leaves_want):
    np.testing.assert_allclose(
      x, y, rtol=1e-5, atol=3e-4, err_msg=jax.tree_util.keystr(path)
    )
    assert np.mean(np.abs(np.asarray(x) - np.asarray(y))) < 2e-5, (
      jax.tree_util.keystr(path)
    )


def _first_checkpoint_params(workdir):
  first = ckpt_lib.list_checkpoints(Path(workdir) / "checkpoints")[0][1]
  return ckpt_lib.load(first)[1]["state"]["params"]


def _results(workdir):
  return json.loads((Path(workdir) / "results.json").read_text())


def _run_four_devices(out: Path) -> Path:
  """Background job: the 4-device script; returns its output folder."""
  env = dict(
    os.environ,
    XLA_FLAGS=fast_compile.flags("--xla_force_host_platform_device_count=4"),
  )
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT, str(out), str(RESUME_AT), *TINY],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout
  return out


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """A single-device run's work directory (default flags, this process)."""
  workdir = tmp_path_factory.mktemp("one_device") / "run"
  assert jax.device_count() == 1
  assert (
    cli.train_main(
      ["sinusoid", "--workdir", str(workdir), "--no-progress", "--set", *TINY]
    )
    == 0
  )
  return workdir


@pytest.fixture(scope="module")
def four_devices(background):
  """The 4-device subprocess's output folder (run in the background)."""
  return background("four_devices")


def test_four_devices_match_one(one_device, four_devices):
  got, want = _final_state(four_devices / "devices_4"), _final_state(one_device)
  assert int(got["step"]) == 12
  assert not np.allclose(  # Training moved the parameters.
    got["params"]["dense0"]["kernel"],
    _first_checkpoint_params(one_device)["dense0"]["kernel"],
  )
  _assert_close(got, want)
  budget = _results(four_devices / "devices_4")["budget"]
  assert budget["devices"] == 4 and budget["processes"] == 1
  assert _results(one_device)["budget"]["devices"] == 1


def test_chunked_per_device_run_matches_one_device(one_device, four_devices):
  workdir = four_devices / "chunked_on_2"
  _assert_close(_final_state(workdir), _final_state(one_device))
  budget = _results(workdir)["budget"]
  assert budget["devices"] == 2


def test_resume_from_four_devices_on_two(one_device, four_devices):
  workdir = four_devices / "resumed_on_2"
  _assert_close(_final_state(workdir), _final_state(one_device))
  results = _results(workdir)
  assert results["budget"]["resumed_from_step"] == RESUME_AT
  assert results["budget"]["devices"] == 2
  assert results["budget"]["meta_steps_this_run"] == 12 - RESUME_AT
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  keys = [(r["split"], r["step"]) for r in records]
  assert len(keys) == len(set(keys)), "a step was logged twice"
  reference = metrics_log.read_records(one_device / "metrics.jsonl")
  assert keys == [(r["split"], r["step"]) for r in reference]
  for got, want in zip(records, reference):
    assert got.keys() == want.keys()
    for key in ("loss_after", "loss_before"):
      if key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4), (key, got)


@pytest.mark.parametrize(
  "name,message",
  [
    ("uneven", "6 tasks does not divide evenly over 4 devices"),
    ("too_many", "asked for 5 devices but 4 are available"),
  ],
)
def test_bad_device_requests_exit_2_writing_nothing(
  four_devices, name, message
):
  error = json.loads((four_devices / "errors.json").read_text())[name]
  assert error["code"] == 2
  assert message in error["stderr"]
  assert not error["exists"]


def test_default_cpu_devices_divide_the_meta_batch(four_devices):
  """Without --devices, a CPU run takes as many of its devices as divide
  meta_batch: 3 of 4 for 6 tasks, rather than refusing."""
  error = json.loads((four_devices / "errors.json").read_text())["uneven_all"]
  assert error["code"] == 0, error["stderr"]
  assert _results(four_devices / "uneven_all")["budget"]["devices"] == 3


# Two processes of two CPU devices each, one training run over 4 devices.
_WORKER = textwrap.dedent("""
  import os, sys
  os.environ["JAX_PLATFORMS"] = "cpu"   # XLA_FLAGS: 2 devices, from the parent
  from imaml_jax.train import cli
  pid, port, workdir, devices = sys.argv[1:5]
  sys.exit(cli.train_main([
      "sinusoid", "--workdir", workdir, "--no-progress",
      "--coordinator", f"localhost:{port}", "--num-processes", "2",
      "--process-id", pid, "--devices", devices, "--set", *sys.argv[5:]]))
""")


def _two_processes(devices: int):
  """Background job: ``--devices devices`` over two processes; returns
  process 0 and process 1's work directories."""

  def job(out: Path) -> list[Path]:
    workdirs = [out / "process_0", out / "process_1"]
    two_hosts.run(
      _WORKER, lambda pid: [workdirs[pid], devices, *TINY], timeout=600
    )
    return workdirs

  return job


# Started with the test session (conftest._background).
BACKGROUND_JOBS = {
  "four_devices": _run_four_devices,
  "two_processes": _two_processes(4),
  "two_processes_two_devices": _two_processes(2),
}


@pytest.mark.slow
def test_two_processes_match_one_device(one_device, background):
  """Process 0 writes the run; process 1 (another directory) writes nothing.

  Each process would normally get the same shared directory; process 1 gets
  its own, empty one here to show that it writes nothing.
  """
  workdirs = background("two_processes")
  assert not workdirs[1].exists()
  _assert_close(_final_state(workdirs[0]), _final_state(one_device))
  budget = _results(workdirs[0])["budget"]
  assert budget["devices"] == 4 and budget["processes"] == 2


@pytest.mark.slow
def test_two_processes_share_fewer_devices(one_device, background):
  """--devices 2 over two processes of two devices: one device on each (the
  first two of all would both be process 0's, and process 1, holding none
  of the mesh, could not take part)."""
  workdirs = background("two_processes_two_devices")
  assert not workdirs[1].exists()
  _assert_close(_final_state(workdirs[0]), _final_state(one_device))
  budget = _results(workdirs[0])["budget"]
  assert budget["devices"] == 2 and budget["processes"] == 2
