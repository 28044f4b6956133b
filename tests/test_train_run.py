"""Training runs on the sinusoid config: determinism, SIGKILL and resume,
NaN safety, corrupt checkpoints, evaluation, time budgets, task chunks. (The
end-to-end Omniglot run is in test_benchmarks.py, through tables.py.)

The runs share one small variant of the sinusoid config and a persistent
compilation cache, so the step is compiled once for the whole module.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fast_compile
import jax
import numpy as np
import pytest

from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import cli
from imaml_jax.train import config as config_lib
from imaml_jax.train import evaluation
from imaml_jax.train import metrics_log
from imaml_jax.train import periodic
from imaml_jax.train import protocols
from imaml_jax.train import runtime
from imaml_jax.train import workdir as workdir_lib

SMALL = [
  "meta_steps=300",
  "meta_batch=4",
  "inner_steps=4",
  "log_every=10",
  "val_every=100",
  "val_tasks=20",
  "test_tasks=20",
  "eval_chunk=20",
  "checkpoint_every=10",
  "keep_checkpoints=3",
]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module (and its subprocesses)."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = (
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


def _train(workdir, *overrides, config="sinusoid"):
  return cli.train_main(
    [
      config,
      "--workdir",
      str(workdir),
      "--no-progress",
      "--set",
      *SMALL,
      *overrides,
    ]
  )


def _final_params(workdir):
  _, tree = ckpt_lib.load(
    ckpt_lib.latest_checkpoint(Path(workdir) / "checkpoints")
  )
  return tree["state"]["params"]


def _assert_same_params(a, b):
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference_run(compile_cache, tmp_path_factory):
  """An uninterrupted run of the small sinusoid config."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  assert _train(workdir) == 0
  return workdir


def test_run_outputs(reference_run):
  results = json.loads((reference_run / "results.json").read_text())
  assert results["budget"]["meta_steps"] == 300
  assert results["budget"]["compile_time_s"] > 0
  assert results["budget"]["steps_per_s"] > 0
  assert results["test_params"] == "best_validation"
  assert results["protocol"]["name"] == "ours"
  assert results["protocol"]["parameters"] == "best_validation"
  assert results["protocol"]["q_query"] == 10
  assert results["best_validation"]["step"] in (100, 200, 300)
  for key in ("test", "test_last"):
    stats = results[key]["loss_after"]
    assert stats["n"] == 20 and np.isfinite(stats["mean"])
    assert stats["ci95"] == pytest.approx(1.96 * stats["std"] / np.sqrt(20))
  # Every task's score of the reported test, and which tasks they were.
  per_task = results["test_per_task"]
  assert per_task["metric"] == "loss_after" and len(per_task["values"]) == 20
  assert np.mean(per_task["values"]) == pytest.approx(
    results["test"]["loss_after"]["mean"], abs=1e-6
  )
  assert np.std(per_task["values"]) == pytest.approx(
    results["test"]["loss_after"]["std"], abs=1e-6
  )
  assert len(per_task["tasks_sha256"]) == 64
  assert (reference_run / "curves.png").stat().st_size > 0
  records = metrics_log.read_records(reference_run / "metrics.jsonl")
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == list(range(10, 301, 10))
  assert [r["step"] for r in records if r["split"] == "val"] == [100, 200, 300]
  assert len(ckpt_lib.list_checkpoints(reference_run / "checkpoints")) == 3


def test_same_seed_same_params(reference_run, tmp_path):
  assert _train(tmp_path / "again") == 0
  _assert_same_params(
    _final_params(reference_run), _final_params(tmp_path / "again")
  )
  strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]
  assert strip(metrics_log.read_records(tmp_path / "again/metrics.jsonl")) == (
    strip(metrics_log.read_records(reference_run / "metrics.jsonl"))
  )


def _cli_command(workdir):
  """The small sinusoid run as a user starts it, on one device (the command
  would otherwise split the CPU into one device per core)."""
  return [
    sys.executable,
    "-m",
    "imaml_jax",
    "train",
    "sinusoid",
    "--workdir",
    str(workdir),
    "--no-progress",
    "--devices",
    "1",
    "--set",
    *SMALL,
  ]


@contextlib.contextmanager
def _running(command, env, workdir, step=30, timeout=120):
  """The started ``command``, once it has checkpointed ``step`` in
  ``workdir``; killed, if still running, on leaving."""
  proc = subprocess.Popen(
    command,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
      found = ckpt_lib.list_checkpoints(workdir / "checkpoints")
      if found and found[-1][0] >= step:
        break
      time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the test could act"
    yield proc
  finally:
    proc.kill()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cli_reference(compile_cache, tmp_path_factory):
  """The small run, uninterrupted, as ``_cli_command`` starts it."""
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=compile_cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  workdir = tmp_path_factory.mktemp("cli_reference") / "run"
  subprocess.run(
    _cli_command(workdir), env=env, check=True, capture_output=True
  )
  return workdir, env


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, cli_reference):
  reference, env = cli_reference
  workdir = tmp_path / "killed"
  with _running(_cli_command(workdir), env, workdir) as proc:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = ckpt_lib.list_checkpoints(workdir / "checkpoints")[-1][0]
  assert killed_at < 300 and not (workdir / "results.json").exists()

  # The same command resumes it, to bitwise the same parameters and records.
  subprocess.run(
    _cli_command(workdir), env=env, check=True, capture_output=True
  )
  _assert_same_params(_final_params(reference), _final_params(workdir))
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  keys = [(r["split"], r["step"]) for r in records]
  assert len(keys) == len(set(keys)), "a step was logged twice"
  assert records == metrics_log.read_records(reference / "metrics.jsonl")
  results = json.loads((workdir / "results.json").read_text())
  assert results["budget"]["resumed_from_step"] == killed_at


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_says_how_to_resume(tmp_path, cli_reference, signum):
  """Stopped by Ctrl-C or SIGTERM, the command names the checkpoint the
  same command resumes from, exits with 128 + the signal's number, and the
  resumed run ends as an uninterrupted one."""
  reference, env = cli_reference
  workdir = tmp_path / "stopped"
  # Ctrl-C reaches the command even where this test runs in a background
  # job, which ignores SIGINT: a small launcher sets it back to the default
  # and execs the command (a preexec_fn would fork this multithreaded
  # process).
  launcher = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
  ]
  with _running([*launcher, *_cli_command(workdir)], env, workdir) as proc:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signum, err[-2000:]
  step, latest = ckpt_lib.list_checkpoints(workdir / "checkpoints")[-1]
  assert step < 300 and not (workdir / "results.json").exists()
  assert "Traceback" not in err
  name = signal.Signals(signum).name
  assert (
    f"stopped by {name}; the newest checkpoint is {latest} (meta-step " in (err)
  )
  assert f"(meta-step {step}): the same command resumes from it" in err
  subprocess.run(
    _cli_command(workdir), env=env, check=True, capture_output=True
  )
  _assert_same_params(_final_params(reference), _final_params(workdir))
  assert metrics_log.read_records(workdir / "metrics.jsonl") == (
    metrics_log.read_records(reference / "metrics.jsonl")
  )


def test_a_run_in_training_is_not_trained_twice(
  tmp_path, cli_reference, capsys
):
  """The same command started again while the run trains is refused, and
  the run ends with the records of an uninterrupted one, each step once."""
  reference, env = cli_reference
  workdir = tmp_path / "busy"
  with _running(_cli_command(workdir), env, workdir) as proc:
    with pytest.raises(SystemExit) as info:
      _train(workdir)
    _, err = proc.communicate(timeout=120)
  assert info.value.code == 2
  assert "is in use: another process is training this run" in (
    capsys.readouterr().err
  )
  assert proc.returncode == 0, err[-2000:]
  assert metrics_log.read_records(workdir / "metrics.jsonl") == (
    metrics_log.read_records(reference / "metrics.jsonl")
  )
  _assert_same_params(_final_params(reference), _final_params(workdir))
  # Once it has ended, the same command runs again (to test it again).
  assert _train(workdir) == 0


class _Killed(BaseException):
  """Stands in for SIGKILL in the middle of a step's periodic actions."""


def test_a_run_killed_at_its_first_checkpoint_starts_again(
  reference_run, tmp_path, monkeypatch
):
  """Killed while writing its first checkpoint, a run has logged that step
  (its records come first) but has no checkpoint: the same command starts
  it again and it ends as the uninterrupted run does."""
  workdir = tmp_path / "killed"

  def killed(*args, **kwargs):
    raise _Killed

  with monkeypatch.context() as patch:
    patch.setattr(ckpt_lib, "save", killed)
    with pytest.raises(_Killed):
      _train(workdir)
  assert not ckpt_lib.list_checkpoints(workdir / "checkpoints")
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  assert [r["step"] for r in records] == [10]  # checkpoint_every=10
  assert _train(workdir) == 0
  _assert_same_params(_final_params(reference_run), _final_params(workdir))
  assert metrics_log.read_records(workdir / "metrics.jsonl") == (
    metrics_log.read_records(reference_run / "metrics.jsonl")
  )


class _EveryDraw(periodic.tqdm.tqdm):
  """A tqdm bar that draws every update (tqdm's own redraws at most every
  0.1 s)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})


def test_progress_bar_counts_every_step_with_its_windows_loss(
  compile_cache, tmp_path, monkeypatch, capsys
):
  """The bar moves between windows (a slow run shows its pace before its
  first window), and each frame pairs a step with the loss of the latest
  window written by then, that step's own where it ends one."""
  workdir = tmp_path / "run"
  monkeypatch.setattr(periodic.tqdm, "tqdm", _EveryDraw)
  argv = ["sinusoid", "--workdir", str(workdir), "--set", *SMALL]
  assert cli.train_main(argv) == 0
  err = capsys.readouterr().err
  shown = [int(step) for step in re.findall(r"(\d+)/300 \[", err)]
  assert shown[:3] == [0, 1, 2] and shown[-1] == 300
  frames = re.findall(r"(\d+)/300 \[[^]]*loss=([^,\]]+)", err)
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  windows = {
    r["step"]: f"{r['loss_after']:.4g}"
    for r in records
    if r["split"] == "train"
  }
  assert int(frames[0][0]) == min(windows)  # No loss before the first one.
  for step, loss in frames:
    latest = max(s for s in windows if s <= int(step))
    assert loss == windows[latest], (step, loss, latest)


def test_corrupt_checkpoint_is_reported_not_overwritten(
  reference_run, tmp_path, capsys
):
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference_run, workdir)
  latest = ckpt_lib.latest_checkpoint(workdir / "checkpoints")
  data = latest.read_bytes()
  latest.write_bytes(data[: len(data) // 2])
  with pytest.raises(SystemExit) as info:
    _train(workdir)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "truncated" in err
  # The way back: the newest older checkpoint that verifies.
  older = ckpt_lib.list_checkpoints(workdir / "checkpoints")[-2][1]
  assert f"The newest intact one is {older.name}: move {latest.name}" in err
  assert latest.read_bytes() == data[: len(data) // 2]
  # imaml-eval says the same, before loading any data.
  with pytest.raises(SystemExit) as info:
    cli.eval_main(["--workdir", str(workdir), "--no-progress"])
  assert info.value.code == 2
  assert f"The newest intact one is {older.name}" in capsys.readouterr().err
  # With every checkpoint corrupt, it says there is none.
  for _, path in ckpt_lib.list_checkpoints(workdir / "checkpoints"):
    path.write_bytes(b"garbage")
  with pytest.raises(SystemExit) as info:
    _train(workdir)
  assert "No older checkpoint in its directory verifies" in (
    capsys.readouterr().err
  )


def test_finished_run_is_not_retrained_and_eval_matches(
  reference_run, tmp_path, capsys
):
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  evaluated = json.loads((workdir / "eval.json").read_text())
  results = json.loads((workdir / "results.json").read_text())
  assert evaluated["test"] == results["test"]
  assert evaluated["test_last"] == results["test_last"]
  assert evaluated["test_per_task"] == results["test_per_task"]
  assert "loss_after" in capsys.readouterr().out
  assert _train(workdir) == 0  # Nothing left to train: only the test.
  again = json.loads((workdir / "results.json").read_text())
  assert again["budget"]["meta_steps_this_run"] == 0
  assert again["budget"]["compile_time_s"] == 0.0
  assert again["test"] == results["test"]


# A meta learning rate so small that Adam's steps vanish in float32: a run
# with it keeps the parameters it starts from, bit for bit.
FROZEN = [
  "meta_steps=10",
  "val_every=10",
  "checkpoint_every=10",
  "meta_lr=1e-30",
]


@pytest.mark.parametrize("which", ["best", "last"])
def test_init_from_starts_from_the_source_runs_parameters(
  reference_run, tmp_path, capsys, which
):
  workdir = tmp_path / "fine_tuned"
  init = [f"init_from={reference_run}", f"init_params={which}"]
  assert _train(workdir, *FROZEN, *init) == 0
  _, tree = ckpt_lib.load(
    ckpt_lib.latest_checkpoint(reference_run / "checkpoints")
  )
  source = (
    tree["best"]["params"] if which == "best" else tree["state"]["params"]
  )
  _assert_same_params(_final_params(workdir), source)
  origin = json.loads((workdir / "results.json").read_text())[
    "initialised_from"
  ]
  reference = json.loads((reference_run / "results.json").read_text())
  step = reference["best_validation"]["step"] if which == "best" else 300
  assert origin == {
    "workdir": str(reference_run),
    "checkpoint": "checkpoint_000000300.ckpt",
    "params": which,
    "step": step,
    "source_config": "sinusoid",
    "source_meta_steps": 300,
  }
  assert f"Starting from {reference_run}" in capsys.readouterr().out
  if which == "best":
    # The same parameters on the same test tasks: the source's test.
    results = json.loads((workdir / "results.json").read_text())
    assert results["test"] == reference["test"]
  # The same command resumes the run from its own checkpoint, keeping the
  # record of where it started.
  assert _train(workdir, *FROZEN, *init) == 0
  again = json.loads((workdir / "results.json").read_text())
  assert again["initialised_from"] == origin
  assert again["budget"]["meta_steps_this_run"] == 0


def test_init_from_refuses_what_it_cannot_start_from(
  reference_run, tmp_path, capsys
):
  def refusal(*overrides):
    workdir = tmp_path / "refused"
    with pytest.raises(SystemExit) as info:
      _train(workdir, *FROZEN, *overrides)
    assert info.value.code == 2
    assert not workdir.exists(), "a refused request wrote its work directory"
    return capsys.readouterr().err

  assert "holds no run" in refusal(f"init_from={tmp_path / 'nowhere'}")
  assert "this run's own work directory" in refusal(
    f"init_from={tmp_path / 'refused'}"
  )
  assert "needs init_from" in refusal("init_params=last")
  assert "init_params must be one of best, last" in refusal(
    f"init_from={reference_run}", "init_params=first"
  )
  # A source whose parameters have other shapes is named, entry and shape.
  other = tmp_path / "other_network"
  shutil.copytree(reference_run, other)
  latest = ckpt_lib.latest_checkpoint(other / "checkpoints")
  step, tree = ckpt_lib.load(latest)
  first = sorted(tree["best"]["params"])[0]
  layer = tree["best"]["params"][first]
  layer["kernel"] = np.zeros((*layer["kernel"].shape[:-1], 7), np.float32)
  ckpt_lib.save(other / "checkpoints", step, tree)
  message = refusal(f"init_from={other}")
  assert f"'{first}']['kernel']" in message
  assert "(1, 7)" in message and "(1, 40)" in message  # Both shapes.
  # A source that never validated has no best parameters to give.
  unvalidated = tmp_path / "unvalidated"
  assert _train(unvalidated, "meta_steps=10", "val_every=0") == 0
  capsys.readouterr()
  assert "use init_params=last" in refusal(f"init_from={unvalidated}")
  # A corrupt source is reported, not read.
  data = latest.read_bytes()
  latest.write_bytes(data[: len(data) // 2])
  assert "truncated" in refusal(f"init_from={other}")


def test_init_params_state_continues_the_source_run_exactly(
  reference_run, tmp_path, capsys
):
  """A run stopped at meta-step 200 and branched from there with nothing
  changed but ``meta_steps`` ends where the uninterrupted 300-step run
  does, bit for bit, with the same records and test."""
  source = tmp_path / "trunk"
  assert _train(source, "meta_steps=200") == 0
  workdir = tmp_path / "branch"
  init = [f"init_from={source}", "init_params=state"]
  assert _train(workdir, *init) == 0
  assert "changed: meta_steps." in capsys.readouterr().out
  _assert_same_params(_final_params(workdir), _final_params(reference_run))
  assert metrics_log.read_records(workdir / "metrics.jsonl") == (
    metrics_log.read_records(reference_run / "metrics.jsonl")
  )
  results = json.loads((workdir / "results.json").read_text())
  reference = json.loads((reference_run / "results.json").read_text())
  assert results["test"] == reference["test"]
  assert results["best_validation"] == reference["best_validation"]
  assert results["budget"]["meta_steps"] == 300
  assert results["budget"]["meta_steps_this_run"] == 100
  assert results["initialised_from"] == {
    "workdir": str(source),
    "checkpoint": "checkpoint_000000200.ckpt",
    "params": "state",
    "step": 200,
    "source_config": "sinusoid",
    "source_meta_steps": 200,
    "changed": ["meta_steps"],
  }
  # The same command resumes the branch from its own checkpoint.
  assert _train(workdir, *init) == 0
  again = json.loads((workdir / "results.json").read_text())
  assert again["initialised_from"] == results["initialised_from"]
  assert again["budget"]["meta_steps_this_run"] == 0
  assert metrics_log.read_records(workdir / "metrics.jsonl") == (
    metrics_log.read_records(reference_run / "metrics.jsonl")
  )


def test_init_params_state_branch_with_a_change_shares_only_the_trunk(
  reference_run, tmp_path
):
  """Branching at step 200 with another lam: the first 200 steps' records
  are the source's, the rest and the parameters are the change's own; a
  killed first start leaves no record twice when restarted."""
  source = tmp_path / "trunk"
  assert _train(source, "meta_steps=200") == 0
  workdir = tmp_path / "branch"
  init = [f"init_from={source}", "init_params=state", "lam=3.0"]
  # What a first start killed before its first checkpoint had written: the
  # config, then the source's records.
  workdir.mkdir()
  branch = config_lib.apply_overrides(
    config_lib.get_config("sinusoid"), [*SMALL, *init]
  )
  (workdir / "config.json").write_text(
    json.dumps(config_lib.to_dict(branch), sort_keys=True)
  )
  shutil.copy(source / "metrics.jsonl", workdir / "metrics.jsonl")
  assert _train(workdir, *init) == 0
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  reference = metrics_log.read_records(reference_run / "metrics.jsonl")
  trunk = [r for r in records if r["step"] <= 200]
  assert trunk == [r for r in reference if r["step"] <= 200]
  after = [r for r in records if r["step"] > 200]
  assert [r["step"] for r in after] == [
    r["step"] for r in reference if r["step"] > 200
  ]
  assert after != [r for r in reference if r["step"] > 200]
  params = jax.tree.leaves(_final_params(workdir))
  other = jax.tree.leaves(_final_params(reference_run))
  assert any(not np.array_equal(a, b) for a, b in zip(params, other))
  results = json.loads((workdir / "results.json").read_text())
  assert results["initialised_from"]["changed"] == ["lam", "meta_steps"]


def test_init_params_state_refuses_what_it_cannot_continue(
  reference_run, tmp_path, capsys
):
  def refusal(*overrides):
    workdir = tmp_path / "refused"
    with pytest.raises(SystemExit) as info:
      _train(workdir, "init_params=state", *overrides)
    assert info.value.code == 2
    assert not workdir.exists(), "a refused request wrote its work directory"
    printed = capsys.readouterr()
    assert "Branching" not in printed.out
    return printed.err

  # The source already trained every step asked for.
  message = refusal(f"init_from={reference_run}")
  assert "at meta-step 300" in message and "meta_steps=300" in message
  # A branch continues the source's task stream: another seed would do
  # nothing, so it is refused rather than ignored.
  message = refusal(f"init_from={reference_run}", "meta_steps=400", "seed=7")
  assert "seed=7 would change nothing" in message and "seed=0" in message
  # Another outer optimizer has a state of other entries.
  message = refusal(
    f"init_from={reference_run}", "meta_steps=400", "optimizer=sgd"
  )
  assert "init_params=state cannot continue from it" in message
  assert "unexpected entries" in message and "['opt_state']" in message


class _CountingEvaluator:
  """Scores parameters ``p`` as ``p`` on every task; counts the tests."""

  def __init__(self):
    self.tested = []

  def __call__(self, params, images, n_tasks, seed, start=0):
    self.tested.append(params)
    return {"accuracy_after": np.full(n_tasks - start, float(params))}

  def fingerprints(self, images, n_tasks, seed, counts):
    return {m: f"tasks{m}" for m in (*counts, n_tasks)}


@pytest.mark.parametrize(
  ("best_step", "test_last", "tested", "last_mean"),
  [
    (2, True, [0.9, 0.5], 0.5),  # An earlier best: both tested.
    (2, False, [0.9], None),  # --skip-last: the best alone.
    (4, False, [0.5], 0.5),  # Best at the last step: one test, both.
    (-1, False, [0.5], 0.5),  # No validation: the last parameters.
  ],
)
def test_final_test_skips_the_last_parameters_only_when_asked(
  best_step, test_last, tested, last_mean
):
  evaluator = _CountingEvaluator()
  best = {"params": 0.9 if best_step < 4 else 0.5, "step": best_step}
  outcome = evaluation.final_test(
    evaluator,
    None,
    5,
    0,
    last_params=0.5,
    step=4,
    best=best,
    test_last=test_last,
  )
  assert evaluator.tested == tested
  assert outcome.test["accuracy_after"]["mean"] == tested[0]
  assert outcome.params == tested[0]
  if last_mean is None:
    assert outcome.test_last is None
  else:
    assert outcome.test_last["accuracy_after"]["mean"] == last_mean
  assert outcome.test_params == ("last" if best_step < 0 else "best_validation")
  assert outcome.test_per_task["values"] == [tested[0]] * 5


@pytest.fixture(scope="module")
def earlier_best_run(compile_cache, tmp_path_factory):
  """A run whose best validation (step 1) comes before its last step (2):
  a meta learning rate of 1e-30 leaves the parameters, and so every
  validation score, unchanged, and only a better score replaces the best."""
  workdir = tmp_path_factory.mktemp("earlier_best") / "run"
  assert _train(workdir, "meta_steps=2", "val_every=1", "meta_lr=1e-30") == 0
  return workdir


def test_eval_skip_last_tests_the_reported_parameters_alone(
  earlier_best_run, tmp_path
):
  """imaml-eval --skip-last reports the same test and leaves out the last
  parameters'; without it both are tested."""
  workdir = tmp_path / "run"
  shutil.copytree(earlier_best_run, workdir)
  results = json.loads((workdir / "results.json").read_text())
  assert results["best_validation"]["step"] == 1
  assert results["test_last"] is not None
  assert cli.eval_main(["--workdir", str(workdir), "--skip-last"]) == 0
  skipped = json.loads((workdir / "eval.json").read_text())
  assert skipped["test_params"] == "best_validation"
  assert skipped["test"] == results["test"]
  assert skipped["test_per_task"] == results["test_per_task"]
  assert skipped["test_last"] is None
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  both = json.loads((workdir / "eval.json").read_text())
  assert both["test"] == results["test"]
  assert both["test_last"] == results["test_last"]


def test_pooled_summaries_are_those_of_the_joined_tasks():
  """pool_summaries of two parts equals summarize of their concatenation."""
  rng = np.random.default_rng(0)
  a = {"accuracy_after": rng.random(7), "loss_after": rng.normal(3, 2, 7)}
  b = {"accuracy_after": rng.random(12), "loss_after": rng.normal(0, 1, 12)}
  joined = {k: np.concatenate([a[k], b[k]]) for k in a}
  pooled = evaluation.pool_summaries(
    evaluation.summarize(a), evaluation.summarize(b)
  )
  expected = evaluation.summarize(joined)
  for key, stats in expected.items():
    assert pooled[key]["n"] == stats["n"] == 19
    for name in ("mean", "std", "ci95"):
      assert pooled[key][name] == pytest.approx(stats[name], rel=1e-12)
  with pytest.raises(ValueError, match="metrics"):
    evaluation.pool_summaries(
      evaluation.summarize(a),
      evaluation.summarize({"loss_after": b["loss_after"]}),
    )


def test_final_test_extends_a_recorded_test_of_the_reported_parameters():
  """With --skip-last the recorded best-validation test is extended alone;
  the pooled mean is that of the recorded and the new tasks together."""
  evaluator = _CountingEvaluator()
  recorded = {
    "test": evaluation.summarize({"accuracy_after": np.full(2, 0.6)}),
    "test_last": None,
    "test_per_task": {"values": [0.6, 0.6], "tasks_sha256": "tasks2"},
  }
  outcome = evaluation.final_test(
    evaluator,
    None,
    5,
    0,
    last_params=0.5,
    step=4,
    best={"params": 0.9, "step": 2},
    test_last=False,
    recorded=recorded,
  )
  assert evaluator.tested == [0.9]
  assert outcome.test_last is None
  assert outcome.test["accuracy_after"]["mean"] == pytest.approx(
    (2 * 0.6 + 3 * 0.9) / 5
  )
  assert outcome.test_per_task["values"] == [0.6, 0.6, 0.9, 0.9, 0.9]
  assert outcome.test_per_task["prefix_sha256"]["2"] == "tasks2"


def _eval(workdir, *args):
  return cli.eval_main(["--workdir", str(workdir), "--no-progress", *args])


def test_eval_extend_tests_only_the_new_tasks(earlier_best_run, tmp_path):
  """imaml-eval --extend grows a 10-task test to 50 by testing the 40 new
  tasks alone (from the middle of the first chunk of 20): the result is
  that of testing all 50 from scratch (the same per-task scores and
  fingerprint, summaries equal up to rounding)."""
  fresh, grown = tmp_path / "fresh", tmp_path / "grown"
  shutil.copytree(earlier_best_run, fresh)
  shutil.copytree(earlier_best_run, grown)
  assert _eval(fresh, "--tasks", "50") == 0
  expected = json.loads((fresh / "eval.json").read_text())
  assert _eval(grown, "--tasks", "10") == 0
  tested = []
  original = evaluation.Evaluator.__call__

  def counting(self, params, images, n_tasks, seed, start=0):
    tested.append((n_tasks, start))
    return original(self, params, images, n_tasks, seed, start=start)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation.Evaluator, "__call__", counting)
    assert _eval(grown, "--tasks", "50", "--extend") == 0
  # The best and the last parameters, each on the 40 new tasks alone.
  assert tested == [(50, 10), (50, 10)]
  result = json.loads((grown / "eval.json").read_text())
  assert result["extended_from"] == 10
  assert result["test_per_task"]["values"] == pytest.approx(
    expected["test_per_task"]["values"], abs=2e-6
  )
  assert (
    result["test_per_task"]["tasks_sha256"]
    == (expected["test_per_task"]["tasks_sha256"])
  )
  assert result["test_per_task"]["prefix_sha256"]["10"]
  for key in ("test", "test_last"):
    for metric, stats in expected[key].items():
      assert result[key][metric]["n"] == 50
      for name in ("mean", "std", "ci95"):
        assert result[key][metric][name] == pytest.approx(
          stats[name], rel=1e-5, abs=1e-6
        ), (key, metric, name)
  # Asking again for as many tasks tests none and changes no number.
  tested.clear()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation.Evaluator, "__call__", counting)
    assert _eval(grown, "--tasks", "50", "--extend") == 0
  assert tested == []
  again = json.loads((grown / "eval.json").read_text())
  assert again["test"] == result["test"]
  assert again["test_per_task"]["values"] == result["test_per_task"]["values"]
  # It still records the extension from 10, not one from 50 to 50.
  assert again["extended_from"] == 10


def test_eval_refuses_to_replace_a_larger_test(
  earlier_best_run, tmp_path, capsys
):
  """A recorded test of more tasks is not replaced by a smaller one unless
  --overwrite says so; the refusal comes before anything is tested, and the
  file is left as it was."""
  workdir = tmp_path / "run"
  shutil.copytree(earlier_best_run, workdir)
  assert _eval(workdir, "--tasks", "12", "--skip-last") == 0
  recorded = (workdir / "eval.json").read_text()
  capsys.readouterr()
  tested = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      evaluation.Evaluator, "__call__", lambda *a, **k: tested.append(a)
    )
    with pytest.raises(SystemExit) as exit_info:
      _eval(workdir, "--tasks", "5", "--skip-last")
  assert exit_info.value.code == 2 and tested == []
  message = capsys.readouterr().err
  assert "records a test of 12 tasks; this test of 5" in message
  assert "--overwrite" in message and "--tasks 12" in message
  assert (workdir / "eval.json").read_text() == recorded
  # As many tasks, more tasks, or --overwrite: the file is replaced.
  assert _eval(workdir, "--tasks", "12", "--skip-last") == 0
  assert _eval(workdir, "--tasks", "5", "--skip-last", "--overwrite") == 0
  replaced = json.loads((workdir / "eval.json").read_text())
  assert replaced["test"]["loss_after"]["n"] == 5
  # An unreadable file is replaced.
  (workdir / "eval.json").write_text("{not json")
  assert _eval(workdir, "--tasks", "3", "--skip-last") == 0


def test_eval_extend_without_a_recorded_test_tests_every_task(
  reference_run, tmp_path, capsys
):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  assert _eval(workdir, "--set", "q_query=3", "--extend") == 0
  assert "no recorded eval_q_query=3.json to extend" in capsys.readouterr().out
  result = json.loads((workdir / "eval_q_query=3.json").read_text())
  assert result["test"]["loss_after"]["n"] == 20
  assert "extended_from" not in result


@pytest.mark.parametrize(
  ("change", "args", "message"),
  [
    (lambda r: r.update(step=7), (), "its step is 7, this test's is 2"),
    (
      lambda r: r["protocol"].update(q_query=5),
      (),
      "its protocol is",
    ),
    (
      lambda r: r["test_per_task"].update(tasks_sha256="0" * 64),
      (),
      "the recorded test's 20 tasks are not the first 20",
    ),
    (lambda r: None, ("--tasks", "10"), "has 20 tasks, more than the 10"),
    (
      lambda r: r.update(test_last=None),
      (),
      "left out the last parameters (--skip-last)",
    ),
    (lambda r: r.pop("test_per_task"), (), "records no per-task scores"),
  ],
)
def test_eval_extend_refuses_a_recorded_test_of_something_else(
  earlier_best_run, tmp_path, capsys, change, args, message
):
  """Each mismatch is named, with exit code 2, and the recorded file is
  left as it was."""
  workdir = tmp_path / "run"
  shutil.copytree(earlier_best_run, workdir)
  assert _eval(workdir) == 0
  recorded = json.loads((workdir / "eval.json").read_text())
  change(recorded)
  text = json.dumps(recorded)
  (workdir / "eval.json").write_text(text)
  with pytest.raises(SystemExit) as info:
    _eval(workdir, "--tasks", "30", "--extend", *args)
  assert info.value.code == 2
  assert message in capsys.readouterr().err
  assert (workdir / "eval.json").read_text() == text


def test_eval_shows_its_progress_unless_asked_not_to(
  reference_run, tmp_path, capsys
):
  """imaml-eval counts the tested tasks on standard error (20 here, in
  one chunk); --no-progress keeps it quiet, with the same result."""
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  assert cli.eval_main(["--workdir", str(workdir)]) == 0
  shown = capsys.readouterr()
  assert "20/20" in shown.err and "task" in shown.err, shown.err
  first = json.loads((workdir / "eval.json").read_text())
  assert cli.eval_main(["--workdir", str(workdir), "--no-progress"]) == 0
  quiet = capsys.readouterr()
  assert "task" not in quiet.err and "loss_after" in quiet.out
  assert json.loads((workdir / "eval.json").read_text()) == first


def test_eval_keeps_its_compiled_steps_in_the_cache_it_is_given(
  reference_run, tmp_path
):
  """``imaml-eval --compile-cache DIR`` stores the compiled test step in
  DIR, and a second test of the run loads it instead of compiling: it adds
  no entry. ``--no-compile-cache`` writes nothing there."""
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  cache = tmp_path / "xla"

  def evaluate(*flags):
    done = subprocess.run(
      [sys.executable, "-m", "imaml_jax", "eval", "--workdir", str(workdir)]
      + ["--no-progress", "--skip-last", *flags],
      capture_output=True,
      text=True,
      timeout=300,
      env=fast_compile.environ(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"),
    )
    assert done.returncode == 0, done.stderr
    return (
      sorted(p.name for p in cache.glob("*-cache")) if cache.exists() else []
    )

  assert evaluate("--no-compile-cache", "--compile-cache", str(cache)) == []
  first = evaluate("--compile-cache", str(cache))
  assert any(name.startswith("jit_evaluate") for name in first), first
  assert evaluate("--compile-cache", str(cache)) == first


def test_eval_with_test_time_overrides(reference_run, tmp_path, capsys):
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  config = json.loads((workdir / "config.json").read_text())
  steps = config["eval_inner_steps"] or config["inner_steps"]
  # The same value as stored reproduces results.json, in its own file.
  assert (
    cli.eval_main(
      ["--workdir", str(workdir), "--set", f"eval_inner_steps={steps}"]
    )
    == 0
  )
  same = json.loads(
    (workdir / f"eval_eval_inner_steps={steps}.json").read_text()
  )
  results = json.loads((workdir / "results.json").read_text())
  assert same["test"] == results["test"]
  assert same["test_time_overrides"] == [f"eval_inner_steps={steps}"]
  # Another value changes the adaptation, hence the test loss.
  assert (
    cli.eval_main(
      ["--workdir", str(workdir), "--set", f"eval_inner_steps={steps + 5}"]
    )
    == 0
  )
  more = json.loads(
    (workdir / f"eval_eval_inner_steps={steps + 5}.json").read_text()
  )
  assert (
    more["test"]["loss_after"]["mean"] != results["test"]["loss_after"]["mean"]
  )
  # Adapted differently, on the same tasks: the scores pair task by task.
  assert (
    more["test_per_task"]["tasks_sha256"]
    == results["test_per_task"]["tasks_sha256"]
  )
  assert more["test_per_task"]["values"] != results["test_per_task"]["values"]
  # Another test seed draws other tasks, and says so.
  assert (
    cli.eval_main(
      [
        "--workdir",
        str(workdir),
        "--set",
        f"test_seed={config['test_seed'] + 1}",
      ]
    )
    == 0
  )
  other = json.loads(
    (workdir / f"eval_test_seed={config['test_seed'] + 1}.json").read_text()
  )
  assert (
    other["test_per_task"]["tasks_sha256"]
    != results["test_per_task"]["tasks_sha256"]
  )
  assert not (workdir / "eval.json").exists()
  # A training field cannot change at test time.
  capsys.readouterr()
  with pytest.raises(SystemExit) as info:
    cli.eval_main(["--workdir", str(workdir), "--set", "meta_lr=0.1"])
  assert info.value.code == 2
  assert "meta_lr cannot change at test time" in capsys.readouterr().err


def test_nonfinite_meta_gradients_stop_the_run(compile_cache, tmp_path, capsys):
  workdir = tmp_path / "nan"
  with pytest.raises(SystemExit) as info:
    # Plain GD: the sinusoid config's step check would reject the huge step.
    _train(
      workdir,
      "algorithm=fomaml",
      "inner_steps=1",
      "inner_lr=1e30",
      "inner_backtrack=false",
      "log_every=5",
      "max_consecutive_skips=5",
    )
  assert info.value.code == 3
  assert "non-finite" in capsys.readouterr().err
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  assert records[-1]["skipped_total"] == 5
  assert records[-1]["consecutive_skips"] == 5
  # Every step of that window was skipped: it has no means to record (they
  # were written as 0.0, a perfect loss in the log and its curves).
  metrics = {"loss_before", "loss_after", "grad_norm", "param_norm"}
  assert not metrics & set(records[-1]), records[-1]


def test_a_nonfinite_validation_is_not_recorded_as_the_best(
  compile_cache, tmp_path, capsys
):
  # One inner step of 0.05 trains; 300 of them, at validation only, diverge
  # (the step is far above 2 / eig_max of the proximal objective).
  workdir = tmp_path / "nan_val"
  assert (
    _train(
      workdir,
      "meta_steps=20",
      "inner_steps=1",
      "inner_lr=0.05",
      "inner_backtrack=false",
      "eval_inner_steps=300",
      "val_every=10",
    )
    == 0
  )
  out = capsys.readouterr().out
  vals = [
    r
    for r in metrics_log.read_records(workdir / "metrics.jsonl")
    if r["split"] == "val"
  ]
  assert [r["step"] for r in vals] == [10, 20]
  assert all(np.isnan(r["loss_after"]) for r in vals)
  assert not any(r["best"] for r in vals)
  assert "(best)" not in out
  assert "test on last parameters" in out


def test_time_budget_stops_early_then_resumes_to_same_params(
  reference_run, tmp_path
):
  workdir = tmp_path / "budget"
  assert (
    cli.train_main(
      [
        "sinusoid",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--time-budget",
        "1e-9",
        "--set",
        *SMALL,
      ]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  budget = results["budget"]
  assert budget["stopped_by_time_budget"] is True
  # The budget is checked at the first step past it, not at the next log
  # step (log_every=10): a spent budget stops after step 1.
  assert budget["meta_steps"] == 1 and budget["meta_steps_target"] == 300
  assert ckpt_lib.list_checkpoints(workdir / "checkpoints")[-1][0] == 1
  records = metrics_log.read_records(workdir / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "val"] == [1]
  assert np.isfinite(results["test"]["loss_after"]["mean"])
  assert _train(workdir) == 0  # Same command, no budget: resumes.
  results = json.loads((workdir / "results.json").read_text())
  assert results["budget"]["stopped_by_time_budget"] is False
  assert results["budget"]["resumed_from_step"] == 1
  _assert_same_params(_final_params(reference_run), _final_params(workdir))


def test_time_budget_must_be_positive(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    cli.train_main(
      ["sinusoid", "--workdir", str(tmp_path / "w"), "--time-budget", "0"]
    )
  assert info.value.code == 2
  assert "--time-budget" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_task_chunk_gives_the_same_training(compile_cache, tmp_path):
  # Two CG steps: in float32, later CG steps on this problem amplify the
  # rounding differences of a vmapped and a looped product (the same in
  # float64, see test_meta_step), which would hide a real discrepancy.
  short = ["meta_steps=20", "val_every=0", "checkpoint_every=0", "cg_steps=2"]
  assert _train(tmp_path / "whole", *short) == 0
  assert _train(tmp_path / "chunked", *short, "task_chunk=1") == 0
  whole = jax.tree_util.tree_leaves(_final_params(tmp_path / "whole"))
  chunked = jax.tree_util.tree_leaves(_final_params(tmp_path / "chunked"))
  for x, y in zip(whole, chunked):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_evaluate_workdir_refuses_an_unknown_split(reference_run, tmp_path):
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  before = sorted(p.name for p in workdir.iterdir())
  with pytest.raises(
    ValueError,
    match="split must be one of test, val, train, authors_test; got 'training'",
  ):
    protocols.evaluate_workdir(workdir, split="training")
  with pytest.raises(
    ValueError,
    match="protocol must be one of ours, authors, paper; got 'theirs'",
  ):
    protocols.evaluate_workdir(workdir, protocol="theirs")
  assert sorted(p.name for p in workdir.iterdir()) == before  # Nothing written.


def test_eval_of_a_run_without_checkpoints_says_which_kind(
  reference_run, tmp_path, capsys
):
  """A finished run whose checkpoints were removed (as committed run
  directories are kept) is told apart from one that has none yet."""
  finished = tmp_path / "finished"
  shutil.copytree(reference_run, finished)
  shutil.rmtree(finished / "checkpoints")
  started = tmp_path / "started"
  started.mkdir()
  shutil.copy(finished / "config.json", started / "config.json")
  for workdir, message in (
    (finished, "holds a finished run (results.json) whose checkpoints"),
    (started, "has no checkpoint yet"),
  ):
    with pytest.raises(SystemExit) as info:
      cli.eval_main(["--workdir", str(workdir), "--no-progress"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_protocols_and_query_images(reference_run, tmp_path, capsys):
  workdir = tmp_path / "done"
  shutil.copytree(reference_run, workdir)
  before = sorted(p.name for p in workdir.iterdir())
  # The authors' evaluation is Omniglot's, and has no proximal term: refused
  # before anything is loaded or written, with exit code 2.
  for args, message in (
    (["--protocol", "authors"], "Omniglot's"),
    (["--split", "authors_test"], "Omniglot's"),
    (["--protocol", "paper"], "Omniglot's"),
    (["--protocol", "paper", "--split", "val"], "split 'val' does not apply"),
    (["--protocol", "authors", "--set", "lam=0.5"], "lam=0.5 does not apply"),
    (["--protocol", "authors", "--split", "val"], "split 'val' does not apply"),
    (["--protocol", "theirs"], "invalid choice"),
    # Sinusoid tasks have no splits: every split would be the test tasks.
    (["--split", "val"], "sinusoid tasks have no splits"),
    (["--split", "train"], "sinusoid tasks have no splits"),
  ):
    with pytest.raises(SystemExit) as info:
      cli.eval_main(["--workdir", str(workdir), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == before
  # Query points per task as a test-time setting, in a file of its own.
  assert cli.eval_main(["--workdir", str(workdir), "--set", "q_query=3"]) == 0
  out = capsys.readouterr().out
  assert "test on best_validation parameters, protocol ours:" in out
  result = json.loads((workdir / "eval_q_query=3.json").read_text())
  assert result["protocol"]["name"] == "ours"
  assert result["protocol"]["q_query"] == 3
  assert result["protocol"]["parameters"] == result["test_params"]
  assert result["test_time_overrides"] == ["q_query=3"]
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["q_query"] == 10  # Training's setting is unchanged.


def test_eval_of_a_running_run_tests_the_checkpoint_it_found(
  reference_run, tmp_path, monkeypatch, capsys
):
  """``imaml-eval`` on a run still training: the trainer may replace the
  newest checkpoint (keeping ``keep_checkpoints`` of them) while the test
  loads its data; the test reads the checkpoint once, when it starts, and
  tests it instead of failing on a file that is gone."""
  workdir = tmp_path / "running"
  shutil.copytree(reference_run, workdir)
  (workdir / "results.json").unlink()
  newest = ckpt_lib.latest_checkpoint(workdir / "checkpoints")
  load_data = protocols.exp_lib.load_data

  def rotated_while_loading(*args, **kwargs):
    newest.unlink()  # As the trainer's rotation does, between the two.
    return load_data(*args, **kwargs)

  monkeypatch.setattr(protocols.exp_lib, "load_data", rotated_while_loading)
  assert cli.eval_main(["--workdir", str(workdir), "--no-progress"]) == 0
  result = json.loads((workdir / "eval.json").read_text())
  assert result["checkpoint"] == str(newest)
  assert result["step"] == int(re.search(r"(\d+)\.ckpt$", newest.name)[1])
  assert "test on best_validation parameters" in capsys.readouterr().out


def test_eval_refuses_a_setting_the_runs_adaptation_does_not_use(
  compile_cache, tmp_path, capsys
):
  """``imaml-eval --set lam=...`` on a MAML run, or ``inner_lr`` on a
  Hessian-free one, would write a result file named after a setting the
  run's adaptation never reads, holding the test without it: refused with
  exit code 2, before anything is written. What the run does use is
  still accepted."""
  few = ["meta_steps=2", "val_every=2", "checkpoint_every=2", "test_tasks=4"]
  maml = tmp_path / "maml"
  assert _train(maml, *few, config="sinusoid_maml") == 0
  hessian_free = tmp_path / "hessian_free"
  assert (
    _train(
      hessian_free,
      *few,
      "inner=hessian_free",
      "inner_backtrack=false",
      "inner_steps=2",
      "hf_cg_steps=2",
    )
    == 0
  )
  capsys.readouterr()
  for workdir, override, message in (
    (maml, "lam=8", "this run's algorithm is 'maml'"),
    (hessian_free, "inner_lr=0.5", "'hessian_free' takes Newton steps"),
  ):
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(SystemExit) as info:
      cli.eval_main(["--workdir", str(workdir), "--set", override])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{override} does not apply" in err and message in err
    assert sorted(p.name for p in workdir.iterdir()) == before
  # MAML's own step size changes its test.
  assert cli.eval_main(["--workdir", str(maml), "--set", "inner_lr=0.02"]) == 0
  changed = json.loads((maml / "eval_inner_lr=0.02.json").read_text())
  results = json.loads((maml / "results.json").read_text())
  assert changed["test"]["loss_after"] != results["test"]["loss_after"]


def test_format_test_reads_results_written_before_protocols():
  stats = {"mean": 0.25, "std": 0.1, "ci95": 0.01, "n": 20}
  old = {"test_params": "last", "test": {"loss_after": stats}}
  assert protocols.format_test(old).splitlines() == [
    "test on last parameters, protocol ours:",
    "  loss_after: 0.250 +- 0.010 (n=20)",
  ]
  assert protocols.format_test({**old, "split": "train"}).startswith(
    "train-split tasks on last parameters, protocol ours:"
  )


def test_sinusoid_config_learns(compile_cache, tmp_path):
  """The main job's recipe, shortened: adaptation must help by a clear margin
  (at step 1000 of the full run the query MSE is 0.65 after adaptation
  against 4.0 before; a recipe that does not learn stays near 4)."""
  workdir = tmp_path / "learns"
  assert (
    cli.train_main(
      [
        "sinusoid",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--set",
        "meta_steps=1000",
        "val_every=500",
        "val_tasks=50",
        "test_tasks=100",
        "checkpoint_every=0",
        "keep_checkpoints=1",
      ]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  before = results["test"]["loss_before"]["mean"]
  after = results["test"]["loss_after"]["mean"]
  assert after < 1.5 and after < 0.35 * before, (before, after)
  assert (workdir / "fits.png").stat().st_size > 0


def test_checkpoint_from_before_a_metric_existed_restores(
  reference_run, tmp_path
):
  """A checkpoint whose metric sums lack a metric added later (param_norm)
  restores with a zero sum for it; training can resume from it."""
  step, tree = ckpt_lib.load(
    ckpt_lib.latest_checkpoint(reference_run / "checkpoints")
  )
  assert "param_norm" in tree["sums"]["sums"]
  del tree["sums"]["sums"]["param_norm"]
  stored_config = json.loads(tree["config"])
  stored_config["meta_steps"] = 310
  tree["config"] = json.dumps(stored_config, sort_keys=True)
  old = ckpt_lib.save(tmp_path / "old", step, tree)
  template = {
    "sums": {
      "param_norm": np.zeros((), np.float32),
      "loss_after": np.zeros((), np.float32),
    }
  }
  filled = workdir_lib.with_added_metrics(tree["sums"], template)
  assert float(filled["sums"]["param_norm"]) == 0.0
  np.testing.assert_array_equal(
    filled["sums"]["loss_after"], tree["sums"]["sums"]["loss_after"]
  )
  # Resuming a run from that checkpoint works (one more window of steps).
  workdir = tmp_path / "resumed"
  shutil.copytree(reference_run, workdir)
  for _, path in ckpt_lib.list_checkpoints(workdir / "checkpoints"):
    path.unlink()
  shutil.copy(old, workdir / "checkpoints" / Path(old).name)
  (workdir / "config.json").write_text(json.dumps(stored_config))
  assert _train(workdir, "meta_steps=310") == 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["budget"]["meta_steps"] == 310


def test_compiler_options_on_a_cpu_and_the_users_flags_win(monkeypatch):
  import jax.numpy as jnp

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  options = runtime.compiler_options("cpu")
  assert options == {"xla_cpu_use_fusion_emitters": False}
  assert runtime.compiler_options("gpu") == {}
  assert runtime.compiler_options("tpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
  assert runtime.compiler_options("cpu") == {}
  # This jaxlib knows the option (an unknown one is an error) and the code
  # it compiles computes the same.
  f = lambda x: jnp.tanh(x @ x.T).sum(axis=0) * jnp.cos(x[:, 0])
  x = jnp.linspace(-1.0, 1.0, 48).reshape(8, 6)
  plain = jax.jit(f).lower(x).compile()
  older = jax.jit(f).lower(x).compile(compiler_options=options)
  np.testing.assert_allclose(older(x), plain(x), rtol=1e-6)


@pytest.mark.parametrize("config", ["sinusoid", "omniglot_5w1s_imaml_gd"])
def test_task_fingerprint_names_the_tasks_alone(config):
  """Runs of different algorithms tested on the same tasks share the
  fingerprint, whatever their eval_chunk; other tasks do not."""
  from imaml_jax.train import config as config_lib
  from imaml_jax.train import experiment as exp_lib

  images = None
  if config != "sinusoid":  # 12 classes of 20 random 28x28 images.
    images = np.random.default_rng(0).integers(
      0, 256, (12, 20, 28, 28, 1), dtype=np.uint8
    )
  other = "sinusoid_maml" if config == "sinusoid" else "omniglot_5w1s_maml"

  def fingerprint(name, chunk, seed, n_tasks=10):
    cfg = config_lib.apply_overrides(
      config_lib.get_config(name), [f"eval_chunk={chunk}"]
    )
    exp = exp_lib.build(cfg, None)
    return evaluation.Evaluator(exp).fingerprint(images, n_tasks, seed)

  reference = fingerprint(config, 10, 0)
  assert fingerprint(other, 3, 0) == reference
  assert fingerprint(config, 10, 1) != reference
  assert fingerprint(config, 10, 0, n_tasks=9) != reference


@pytest.mark.parametrize("config", ["sinusoid", "omniglot_5w1s_imaml_gd"])
def test_prefix_fingerprints_are_those_of_the_shorter_task_sets(config):
  """The fingerprint of the first m of n tasks, as the n-task set draws
  them, is the fingerprint of the m-task set: the test tasks do not depend
  on how many are drawn, so shorter and longer tests can be paired."""
  from imaml_jax.train import config as config_lib
  from imaml_jax.train import experiment as exp_lib

  images = None
  if config != "sinusoid":
    images = np.random.default_rng(0).integers(
      0, 256, (12, 20, 28, 28, 1), dtype=np.uint8
    )
  cfg = config_lib.apply_overrides(
    config_lib.get_config(config), ["eval_chunk=4"]
  )
  evaluator = evaluation.Evaluator(exp_lib.build(cfg, None))
  digests = evaluator.fingerprints(images, 10, 0, prefixes=(3, 8, 10, 20))
  assert sorted(digests) == [3, 8, 10]
  for m in (3, 8, 10):
    assert digests[m] == evaluator.fingerprint(images, m, 0)
  assert digests[3] != evaluation.Evaluator(
    exp_lib.build(cfg, None)
  ).fingerprint(images, 3, 1)
  # The authors' tasks (classes turned, drawn for the whole set at once).
  authors = evaluation.Evaluator(
    exp_lib.build(cfg, None), exp_lib.authors_evaluation_chunks
  )
  if config != "sinusoid":
    digests = authors.fingerprints(images, 10, 0, prefixes=(3,))
    assert digests[3] == authors.fingerprint(images, 3, 0)


def _marked_characters(n_chars=12):
  """Character i's 20 drawings: blank but for the value i + 1 in the top
  left corner, so an image names its character and, by the corner the mark
  is turned to, its rotation."""
  images = np.zeros((n_chars, 20, 28, 28, 1), np.uint8)
  images[:, :, 0, 0, 0] = np.arange(1, n_chars + 1)[:, None]
  return images


def _characters_and_turns(tasks):
  """``[(characters, turns)]`` per task: the character and corner of each
  class (support and query), checking that a class keeps one of each."""
  corners = {(0, 0): 0, (27, 0): 1, (27, 27): 2, (0, 27): 3}
  out = []
  for t in range(tasks.support[1].shape[0]):
    seen = {}
    for x, y in (tasks.support, tasks.query):
      x, y = np.rint(np.asarray(x[t, ..., 0]) * 255), np.asarray(y[t])
      for image, label in zip(x, y):
        (i,), (j,) = np.nonzero(image)
        mark = (int(image[i, j]), corners[(int(i), int(j))])
        assert seen.setdefault(int(label), mark) == mark
    out.append(
      ([seen[c][0] for c in sorted(seen)], [seen[c][1] for c in sorted(seen)])
    )
  return out


def test_per_task_class_rotations_turn_distinct_characters():
  """``class_rotations=per_task``: a training or evaluation task holds
  distinct characters, each class turned by one multiple of 90 degrees in
  support and query alike, the turns spread over all four; the sharded
  sampler draws the same tasks; evaluation tasks are the authors' (the
  ``paper`` protocol's construction) on the split's characters."""
  from imaml_jax.train import experiment as exp_lib
  from imaml_jax.train import steps

  images = jax.numpy.asarray(_marked_characters())
  cfg = config_lib.apply_overrides(
    config_lib.get_config("omniglot_5w1s_imaml_gd"),
    ["class_rotations=per_task", "meta_batch=40", "eval_chunk=8"],
  )
  exp = exp_lib.build(cfg, None)
  key = jax.random.key(3)
  tasks = exp.sample(key, images)
  drawn = _characters_and_turns(tasks)
  assert all(len(set(chars)) == cfg.n_way for chars, _ in drawn)
  turns = np.concatenate([t for _, t in drawn])
  assert np.bincount(turns, minlength=4).min() >= 20  # 200 classes.
  sharded = steps.task_sampler(exp, runtime.make_mesh(cfg, 1))(key, images)
  for a, b in zip(jax.tree.leaves(tasks), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(a, b)
  chunks = list(exp_lib.evaluation_chunks(cfg, images, 20, 0))
  authors = list(exp_lib.authors_evaluation_chunks(cfg, images, 20, 0))
  for a, b in zip(jax.tree.leaves(chunks), jax.tree.leaves(authors)):
    np.testing.assert_array_equal(a, b)
  drawn = [d for chunk in chunks for d in _characters_and_turns(chunk)]
  assert len(drawn) == 20
  assert all(len(set(chars)) == cfg.n_way for chars, _ in drawn)
  assert len({t for _, turns in drawn for t in turns}) == 4
  # The default keeps every image as drawn (the rotations are classes).
  plain = config_lib.apply_overrides(cfg, ["class_rotations=classes"])
  plain_exp = exp_lib.build(plain, None)
  for task_set in (
    plain_exp.sample(key, images),
    *exp_lib.evaluation_chunks(plain, images, 20, 0),
  ):
    assert {
      t for _, turns in _characters_and_turns(task_set) for t in turns
    } == {0}


def test_tables_quick_run_tested_with_class_rotations_per_task(
  quick_run, tmp_path, capsys
):
  """``imaml-eval --set class_rotations=per_task`` tests a run trained with
  every rotation a class on held-out tasks drawn as MAML's and the authors'
  code draw them, in a file of its own; the authors' characters refuse it."""
  if not os.environ.get("IMAML_OMNIGLOT_DIR"):
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  _, out = quick_run("tables")
  workdir = tmp_path / "run"
  shutil.copytree(out / "runs" / "omniglot_5w1s_imaml_gd", workdir)
  args = ["--workdir", str(workdir), "--no-progress", "--skip-last"]
  assert cli.eval_main([*args, "--set", "class_rotations=per_task"]) == 0
  turned = json.loads(
    (workdir / "eval_class_rotations=per_task.json").read_text()
  )
  ours = json.loads((workdir / "results.json").read_text())
  assert turned["split"] == "test"
  assert (
    "each class of a task turned by its own" in (turned["protocol"]["tasks"])
  )
  assert "a class of its own" in ours["protocol"]["tasks"]
  assert (
    turned["test_per_task"]["tasks_sha256"]
    != (ours["test_per_task"]["tasks_sha256"])
  )
  assert turned["test"]["accuracy_after"]["n"] == 10
  capsys.readouterr()
  for protocol in ("paper", "authors"):
    with pytest.raises(SystemExit) as info:
      cli.eval_main(
        [*args, "--protocol", protocol, "--set", "class_rotations=per_task"]
      )
    assert info.value.code == 2
    assert "class_rotations=per_task does not apply" in capsys.readouterr().err


def test_residual_is_logged_only_with_log_residual(reference_run, tmp_path):
  """The default run spends no product on CG's residual and logs none;
  ``log_residual=true`` logs it in every window, a small relative residual
  (the sinusoid system at lam 30 is well conditioned)."""
  train = [
    r
    for r in metrics_log.read_records(reference_run / "metrics.jsonl")
    if r["split"] == "train"
  ]
  assert train and not any("residual" in r for r in train)
  assert _train(tmp_path / "logged", "meta_steps=30", "log_residual=true") == 0
  logged = [
    r
    for r in metrics_log.read_records(tmp_path / "logged/metrics.jsonl")
    if r["split"] == "train"
  ]
  assert [r["step"] for r in logged] == [10, 20, 30]
  assert all(0 < r["residual"] < 0.05 for r in logged), logged
  # CG with the curvature stop tracks its recurrence residual for free and
  # logs it without being asked.
  assert (
    _train(
      tmp_path / "guarded",
      "meta_steps=20",
      "cg_stop_at_negative_curvature=true",
    )
    == 0
  )
  guarded = [
    r
    for r in metrics_log.read_records(tmp_path / "guarded/metrics.jsonl")
    if r["split"] == "train"
  ]
  assert len(guarded) == 2 and all(0 < r["residual"] < 0.05 for r in guarded)


def test_window_means_count_only_the_steps_that_measured_the_residual():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from imaml_jax.train import steps  # pylint: disable=import-outside-toplevel

  sums = steps.init_sums(
    {"loss_after": None, "residual": None, "skipped": None}
  )
  for loss, residual, skipped in (
    (1.0, 0.5, 0),
    (2.0, np.nan, 0),
    (9.0, 7.0, 1),
    (3.0, np.nan, 0),
  ):
    sums = steps.add_to_sums(
      sums,
      {
        "loss_after": jnp.float32(loss),
        "residual": jnp.float32(residual),
        "skipped": jnp.bool_(skipped),
      },
    )
  record = steps.window_record(4, runtime.to_host(sums))
  assert record["loss_after"] == 2.0 and record["residual"] == 0.5
  assert record["skipped"] == 1
  empty = steps.window_record(4, runtime.to_host(steps.reset_window(sums)))
  assert "residual" not in empty
  # A checkpoint written when every counted step measured it.
  old = {k: v for k, v in runtime.to_host(sums).items() if k != "measured"}
  filled = workdir_lib.with_added_metrics(old, runtime.to_host(sums))
  assert int(filled["measured"]["residual"]) == int(old["count"]) == 3
  assert [
    steps.measures_residual(10)(type("S", (), {"step": s})())
    for s in (0, 5, 10)
  ] == [True, False, True]


def test_an_interrupted_eval_writes_nothing_and_says_so(
  reference_run, tmp_path, monkeypatch, capsys
):
  """SIGTERM (as Ctrl-C) in the middle of ``imaml-eval``'s test: exit
  128 + 15, one line saying nothing was written, no traceback, and the
  result file of the earlier test unchanged."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  assert _eval(workdir, "--tasks", "5") == 0
  earlier = (workdir / "eval.json").read_bytes()
  capsys.readouterr()

  def signalled(*args, **kwargs):
    del args, kwargs
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # The handler raises before this ends.
    raise AssertionError("SIGTERM did not stop the test")

  def unhandled(signum, frame):
    del frame
    raise _Killed(f"imaml-eval left signal {signum} unhandled")

  monkeypatch.setattr(evaluation, "final_test", signalled)
  previous = signal.signal(signal.SIGTERM, unhandled)
  try:
    with pytest.raises(SystemExit) as info:
      _eval(workdir, "--tasks", "20")
    # The command's handler is gone once it has returned.
    assert signal.getsignal(signal.SIGTERM) is unhandled
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert info.value.code == 128 + signal.SIGTERM
  err = capsys.readouterr().err
  assert err == (
    "imaml-eval: stopped by SIGTERM before the test ended; nothing was "
    "written (a result file of an earlier test is as it was); the same "
    "command starts the test again.\n"
  )
  assert (workdir / "eval.json").read_bytes() == earlier


def test_a_resumed_run_drops_what_a_killed_trainer_left(
  reference_run, tmp_path
):
  """Temporary files of a trainer killed while writing (kill -9 leaves no
  chance to remove them) are deleted when the run resumes; a temporary
  file of another command's result file is not."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  (workdir / "results.json").unlink()
  for step, path in ckpt_lib.list_checkpoints(workdir / "checkpoints"):
    if step > 280:
      path.unlink()
  left = [
    workdir / ".tmp-metrics.jsonl.k2j4",
    workdir / ".tmp-results.json.x81q",
    workdir / ".tmp-config.json.0a9z",
    workdir / "checkpoints" / ".tmp-checkpoint_000000300.ckpt.p0s1",
  ]
  others = workdir / ".tmp-eval.json.m3n3"
  for path in [*left, others]:
    path.write_bytes(b"partial")
  assert _train(workdir) == 0
  assert [p for p in left if p.exists()] == []
  assert others.read_bytes() == b"partial"
  leftovers = sorted(p.name for p in workdir.rglob(".tmp-*"))
  assert leftovers == [others.name]


def test_the_log_is_on_disk_before_each_checkpoint(tmp_path, monkeypatch):
  """Each checkpoint is written after an fsync of metrics.jsonl holding
  every record up to its step: a checkpoint that survives a power loss
  resumes with its whole history."""
  workdir = tmp_path / "run"
  synced = {}  # path -> size at its latest fsync
  checked = []
  real_fsync = os.fsync

  def fsync(fd):
    path = Path(os.readlink(f"/proc/self/fd/{fd}"))
    if path.name.startswith(".tmp-checkpoint_"):
      metrics = workdir / "metrics.jsonl"
      assert synced.get(metrics) == metrics.stat().st_size, path.name
      checked.append(path.name)
    synced[path] = os.fstat(fd).st_size
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  assert _train(workdir) == 0
  assert len(checked) == 30  # A checkpoint every 10 of the 300 steps.


def test_evaluation_maps_over_the_tasks_as_the_training_step_does():
  """On a CPU the conv nets' test tasks run one at a time inside each
  evaluation chunk (runtime.task_chunk: 1), as a training step's do: the
  same per-task scores as the chunk vmapped (task_chunk=8), in a program
  that holds one task's activations instead of eight's."""
  from imaml_jax.train import experiment as exp_lib

  images = np.random.default_rng(0).integers(
    0, 256, (12, 20, 28, 28, 1), dtype=np.uint8
  )
  scores, temp_bytes = {}, {}
  for chunk in (0, 8):
    cfg = config_lib.apply_overrides(
      config_lib.get_config("omniglot_5w1s_maml"),
      ["eval_chunk=8", f"task_chunk={chunk}"],
    )
    exp = exp_lib.build(cfg, None)
    evaluator = evaluation.Evaluator(exp)
    params = exp.init_params(jax.random.key(0))
    scores[chunk] = evaluator(params, jax.device_put(images), 8, 0)
    (compiled,) = evaluator._compiled.values()
    temp_bytes[chunk] = compiled.memory_analysis().temp_size_in_bytes
  assert (
    runtime.task_chunk(config_lib.get_config("omniglot_5w1s_maml"), "cpu") == 1
  )
  for name, value in scores[8].items():
    np.testing.assert_allclose(scores[0][name], value, rtol=1e-5, atol=1e-6)
  assert temp_bytes[0] * 4 < temp_bytes[8], temp_bytes
