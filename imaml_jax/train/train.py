"""Meta-training with periodic validation, checkpoints and a final test.

:func:`train_and_evaluate` runs a config in a work directory::

  DIR/config.json        the resolved config (a resumed run must match it)
  DIR/metrics.jsonl      one JSON object per line: training windows and
                         validations, keyed by "step" and "split"
  DIR/checkpoints/       the newest ``keep_checkpoints`` checkpoints
  DIR/results.json       test results, best validation, budget
  DIR/curves.png         learning curves
  DIR/fits.png           sinusoid only: held-out tasks, true curve, support
                         points, predictions before and after adaptation

The training step (task sampling with the key
``jax.random.fold_in(base_key, step)``, the meta-step, and a running sum of
the metrics) is one jitted function whose data arrays are arguments, compiled
ahead of time so its compile time is reported apart from the step time. The
host reads the running sums only every ``log_every`` steps. On a CPU the
steps are compiled with XLA's older loop emitters (:func:`compiler_options`),
which compile them 1.3-2x faster and run them as fast.

Devices: the step runs data-parallel over a 1-D device mesh
(:func:`imaml_jax.task_mesh`, all devices by default). The meta-state, the
metric sums, the training images and the base key are replicated; every
device samples and adapts its ``meta_batch / devices`` tasks
(:func:`imaml_jax.data.make_sharded_sampler`, or :func:`imaml_jax.constrain_tasks`
for sinusoid) and the meta-gradient is all-reduced. The tasks drawn do not
depend on the device count, so runs on different counts agree up to float
rounding of the reductions (amplified where the meta-gradient is sensitive,
e.g. when its CG solve is far from converged), and a run may resume on
another count. With one device the step is
the plain single-device step. Validation and testing run on the first local
device. With several processes (:func:`imaml_jax.initialize_distributed`),
every process runs the same loop on the same work directory (a shared file
system) and only process 0 writes to it.

Model selection: every ``val_every`` steps the meta-parameters are evaluated
on a fixed set of ``val_tasks`` tasks from the validation split; the
parameters with the best validation score (highest accuracy, or lowest query
loss where the loss has no accuracy, e.g. the sinusoid MSE) are kept. The test
reported first (``results["test"]``) uses these best-validation parameters;
the test of the last parameters is reported too (``results["test_last"]``).

Test statistics: mean over tasks and the 95% interval half-width
``1.96 * std / sqrt(n)`` with the population standard deviation
(``ddof=0``), as ``numpy.std`` in the authors' evaluation script. Every
task's score of the reported test is kept too (``results["test_per_task"]``,
:func:`per_task_record`) with a fingerprint of the task set, so two runs
tested on the same tasks can be compared task by task (paired).

Example:
  >>> from imaml_jax.train import config as config_lib, train
  >>> cfg = config_lib.apply_overrides(config_lib.get_config("sinusoid"),
  ...                                  ["meta_steps=20"])
  >>> results = train.train_and_evaluate(cfg, "/tmp/run")  # doctest: +SKIP
  >>> results["test"]["loss_after"]["mean"]  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import imaml_jax as im
from imaml_jax._src import sharding as sharding_lib
from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import config as config_lib
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import metrics_log

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
FITS_FILE = "fits.png"
CHECKPOINT_DIR = "checkpoints"


class WorkdirError(ValueError):
  """The work directory holds a run that does not fit the request."""


class TrainingDiverged(RuntimeError):
  """Too many consecutive meta-steps were skipped (non-finite gradients)."""


class DeviceError(ValueError):
  """The requested devices are not available."""


def make_mesh(config: config_lib.Config, devices: int | None = None):
  """The task mesh of a run: ``devices`` devices, all of them if ``None``.

  Args:
    config: the run's config (its ``meta_batch`` must split evenly).
    devices: number of devices, the first ones of ``jax.devices()`` (all
      processes); ``None`` for all.

  Returns:
    A 1-D ``jax.sharding.Mesh`` with axis ``"tasks"``.

  Raises:
    DeviceError: fewer devices than requested, or a count below 1.
    ConfigError: ``meta_batch`` is not a multiple of the device count.
  """
  try:
    mesh = im.task_mesh(devices)
  except ValueError as e:
    raise DeviceError(str(e)) from e
  try:
    im.check_divisible(config.meta_batch, mesh)
  except ValueError as e:
    raise config_lib.ConfigError(
        f"{e} Pass --devices with a divisor of {config.meta_batch}, or "
        "--set meta_batch=... with a multiple of the device count.") from e
  return mesh


# ----------------------------------------------------------------------------
# Pure pieces: the jitted step, metric sums, statistics.


def init_sums(metric_shapes: dict) -> dict:
  """Zeroed running sums for the scalar metrics of a meta-step.

  ``sums`` adds each metric over the steps that were not skipped, ``count``
  counts those steps, ``skipped`` counts skipped steps in the window and
  ``consecutive`` the current run of consecutive skipped steps.
  """
  return {"sums": {k: jnp.zeros((), jnp.float32) for k in metric_shapes
                   if k != "skipped"},
          "count": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32),
          "consecutive": jnp.zeros((), jnp.int32)}


def add_to_sums(sums: dict, metrics: dict) -> dict:
  """Adds one step's metrics to the running sums (jittable)."""
  skipped = metrics["skipped"].astype(jnp.int32)
  ok = skipped == 0
  return {
      "sums": {k: v + jnp.where(ok, metrics[k].astype(jnp.float32), 0.0)
               for k, v in sums["sums"].items()},
      "count": sums["count"] + ok.astype(jnp.int32),
      "skipped": sums["skipped"] + skipped,
      "consecutive": jnp.where(ok, 0, sums["consecutive"] + 1),
  }


def reset_window(sums: dict) -> dict:
  """Zeroes the window sums, keeping the consecutive-skip count."""
  out = jax.tree.map(jnp.zeros_like, sums)
  out["consecutive"] = sums["consecutive"]
  return out


def task_sampler(exp: exp_lib.Experiment, mesh=None) -> Callable:
  """``sample(key, train_data) -> Task``, split over ``mesh`` if given.

  The tasks equal ``exp.sample(key, train_data)`` whatever the mesh: N-way
  K-shot episodes come from :func:`imaml_jax.data.make_sharded_sampler` (each
  device draws its own tasks from its replica of the images); sinusoid tasks
  are constrained to the task sharding (:func:`imaml_jax.constrain_tasks`).
  """
  if mesh is None:
    return exp.sample
  config = exp.config
  if config.dataset == "sinusoid":
    return lambda key, data: im.constrain_tasks(exp.sample(key, data), mesh)
  sample = im.data.make_sharded_sampler(mesh, config.n_way, config.k_shot,
                                        config.q_query, config.meta_batch)
  if not config.reptile_train_shots:
    return sample
  return lambda key, data: im.constrain_tasks(
      exp_lib.training_tasks(config, sample(key, data)), mesh)


def make_train_step(exp: exp_lib.Experiment, mesh=None) -> Callable:
  """``train_step(state, sums, train_data, base_key) -> (state, sums)``.

  Samples the task batch on device from ``fold_in(base_key, state.step)``,
  takes one meta-step and adds its metrics to ``sums``. Pure; jit it with
  the data as an argument (not a closed-over constant).

  Args:
    exp: the experiment.
    mesh: a task mesh (:func:`make_mesh`) to split the task batch over, or
      ``None`` for unconstrained tasks.
  """
  # With task_chunk on several devices, each device maps over its own tasks
  # (a lax.map over the split task axis would not stay split under jit).
  per_device = bool(exp.config.task_chunk) and mesh is not None \
      and mesh.size > 1
  _, meta_step = im.make_meta_step(
      exp.loss, exp.optimizer, exp.algorithm, has_aux=True,
      task_chunk=exp.config.task_chunk or None,
      axis_name=im.TASK_AXIS if per_device else None)
  if per_device:
    meta_step = sharding_lib.per_device_step(meta_step, mesh)
  sample = task_sampler(exp, mesh)

  def train_step(state, sums, train_data, base_key):
    tasks = sample(jax.random.fold_in(base_key, state.step), train_data)
    state, metrics = meta_step(state, tasks)
    return state, add_to_sums(sums, metrics)

  return train_step


def summarize(per_task: dict[str, np.ndarray]) -> dict[str, dict]:
  """Mean, population std (ddof=0) and 95% half-width per metric.

  Example:
    >>> summarize({"accuracy_after": np.array([1.0, 0.0])})["accuracy_after"]
    {'mean': 0.5, 'std': 0.5, 'ci95': 0.6929646455628166, 'n': 2}
  """
  out = {}
  for key, values in per_task.items():
    values = np.asarray(values, np.float64)
    n = values.size
    std = float(np.std(values))
    out[key] = {"mean": float(np.mean(values)), "std": std,
                "ci95": 1.96 * std / math.sqrt(n), "n": int(n)}
  return out


def per_task_record(per_task: dict[str, np.ndarray], tasks_sha256: str
                    ) -> dict:
  """The ``"test_per_task"`` entry of a results file: the selection metric
  (:func:`score_key`) of every test task, in task order, and the task set's
  fingerprint (:meth:`Evaluator.fingerprint`).

  Two runs tested on the same tasks (equal ``tasks_sha256``) can then be
  compared task by task: the 95% interval of the mean of paired differences,
  ``1.96 * std(a - b) / sqrt(n)``, is narrower than the two runs' own
  intervals added whenever their per-task scores are correlated.

  Example:
    >>> per_task_record({"accuracy_after": np.array([1.0, 0.5])}, "ab")
    {'metric': 'accuracy_after', 'values': [1.0, 0.5], 'tasks_sha256': 'ab'}
  """
  key, _ = score_key(per_task)
  values = np.asarray(per_task[key], np.float64)
  return {"metric": key, "values": [round(float(v), 6) for v in values],
          "tasks_sha256": tasks_sha256}


def score_key(metric_names: Iterable[str]) -> tuple[str, bool]:
  """``(metric, higher_is_better)`` used for model selection."""
  names = set(metric_names)
  if "accuracy_after" in names:
    return "accuracy_after", True
  return "loss_after", False


class Evaluator:
  """Evaluates parameters on fixed task sets; compiles once per chunk shape.

  ``chunks(config, images, n_tasks, seed)`` yields the tasks
  (:func:`imaml_jax.train.experiment.evaluation_chunks` by default).
  """

  def __init__(self, exp: exp_lib.Experiment,
               chunks: Callable | None = None):
    self._exp = exp
    self._chunks = chunks or exp_lib.evaluation_chunks
    self._fn = jax.jit(im.make_eval_step(exp.loss, exp.eval_algorithm,
                                         has_aux=True))
    self._compiled = {}
    self.compile_time_s = 0.0

  def __call__(self, params, images, n_tasks: int, seed: int) -> dict:
    """Per-task metrics (numpy arrays of length ``n_tasks``)."""
    parts = []
    for chunk in self._chunks(self._exp.config, images, n_tasks, seed):
      shape = jax.tree.map(lambda x: x.shape, chunk)
      key = jax.tree_util.tree_structure(chunk), tuple(jax.tree.leaves(shape))
      if key not in self._compiled:
        start = time.perf_counter()
        self._compiled[key] = self._fn.lower(params, chunk).compile(
            compiler_options=compiler_options())
        self.compile_time_s += time.perf_counter() - start
      parts.append(self._compiled[key](params, chunk))
    parts = jax.device_get(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def fingerprint(self, images, n_tasks: int, seed: int) -> str:
    """SHA-256 of the ``n_tasks`` tasks that ``__call__`` evaluates.

    The digest is that of each array of the whole task set in turn
    (support and query inputs and labels, all tasks in order), preceded by
    its dtype and shape, so it does not depend on ``eval_chunk``; it is
    computed one chunk at a time (the chunks are drawn again for each
    array). Two results with the same fingerprint were measured on the same
    tasks, so their per-task scores can be compared task by task.
    """
    def leaves():   # Each chunk's arrays, on the host.
      for chunk in self._chunks(self._exp.config, images, n_tasks, seed):
        yield [np.ascontiguousarray(x)
               for x in jax.device_get(jax.tree.leaves(chunk))]

    first = next(leaves())
    digest = hashlib.sha256()
    for i, leaf in enumerate(first):
      digest.update(f"{leaf.dtype}{(n_tasks, *leaf.shape[1:])}".encode())
      for chunk in leaves():
        digest.update(chunk[i].tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Work directory and checkpoints.


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f"cannot read {path}: {e}") from e


def check_workdir(config: config_lib.Config, workdir: Path) -> Path | None:
  """Checks that ``workdir`` is new or holds a run of the same config.

  Returns:
    The latest checkpoint to resume from, or ``None``.

  Raises:
    WorkdirError: the stored config differs (listing the fields) or the
      directory cannot be used.
    CheckpointError: the latest checkpoint is corrupt.
  """
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {workdir} exists and is not a directory.")
  stored_path = workdir / CONFIG_FILE
  if stored_path.exists():
    try:
      stored = config_lib.from_dict(_read_json(stored_path))
    except config_lib.ConfigError as e:
      raise WorkdirError(f"{stored_path}: {e}") from e
    diff = config_lib.differences(stored, config)
    if diff:
      lines = "; ".join(f"{k}: stored {a!r}, requested {b!r}"
                        for k, (a, b) in diff.items())
      raise WorkdirError(
          f"workdir {workdir} holds a run of config {stored.name!r} with "
          f"different settings ({lines}). Use another --workdir, or repeat "
          "the stored config and overrides to resume.")
  latest = ckpt_lib.latest_checkpoint(workdir / CHECKPOINT_DIR)
  if latest is not None and not stored_path.exists():
    raise WorkdirError(f"workdir {workdir} has checkpoints but no "
                       f"{CONFIG_FILE}; refusing to guess its config.")
  return latest


def _checkpoint_tree(state, sums, best, base_key, config, elapsed_s) -> dict:
  return {"state": state, "sums": sums, "best": best,
          "base_key": jax.random.key_data(base_key),
          "config": json.dumps(config_lib.to_dict(config), sort_keys=True),
          "elapsed_s": np.float64(elapsed_s)}


def with_added_metrics(stored_sums: dict, template: dict) -> dict:
  """``stored_sums`` plus a zero sum for each metric it lacks.

  A checkpoint written before a training metric existed (e.g.
  ``param_norm``) has no running sum for it; the sum starts at zero, which
  is exact at a logging boundary, where the window has just been reset.
  Metrics the template lacks are left for :func:`checkpoint.restore_into`
  to refuse.
  """
  if not isinstance(stored_sums, dict) or "sums" not in stored_sums:
    return stored_sums
  stored = dict(stored_sums["sums"])
  for name, value in template["sums"].items():
    if name not in stored:
      stored[name] = np.zeros(np.shape(value), np.asarray(value).dtype)
  return {**stored_sums, "sums": stored}


def restore(path: Path, config: config_lib.Config, state, sums, best):
  """Loads checkpoint ``path`` into templates shaped like this run's.

  Returns:
    ``(step, state, sums, best, base_key, elapsed_s)``.

  Raises:
    CheckpointError: corrupt file, other config, or other shapes.
  """
  step, tree = ckpt_lib.load(path)
  try:
    stored = config_lib.from_dict(json.loads(tree["config"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ckpt_lib.CheckpointError(f"{path}: no readable config: {e}") from e
  diff = config_lib.differences(stored, config)
  if diff:
    raise ckpt_lib.CheckpointError(
        f"{path} was written by a run with a different config "
        f"({', '.join(diff)} differ).")
  try:
    state = ckpt_lib.restore_into(state, tree["state"], what=f"{path} state")
    sums = ckpt_lib.restore_into(sums, with_added_metrics(tree["sums"], sums),
                                 what=f"{path} sums")
    best = ckpt_lib.restore_into(best, tree["best"], what=f"{path} best")
    base_key = jax.random.wrap_key_data(np.asarray(tree["base_key"]))
    elapsed = float(tree["elapsed_s"])
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ckpt_lib.CheckpointError):
      raise
    raise ckpt_lib.CheckpointError(f"{path} is incompatible: {e}") from e
  if int(state.step) != step:
    raise ckpt_lib.CheckpointError(
        f"{path}: header step {step} != state step {int(state.step)}.")
  return step, state, sums, best, base_key, elapsed


# ----------------------------------------------------------------------------
# The run.


def _fetch(x):
  """A leaf on the host; a global array is read from a local replica."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return x


def _host(tree) -> Any:
  """``tree`` as numpy arrays (replicated arrays: this process's copy)."""
  return jax.tree.map(lambda x: x if isinstance(x, str) else np.asarray(x),
                      jax.device_get(jax.tree.map(_fetch, tree)))


def _local(tree) -> Any:
  """The first local replica of every leaf, a single-device array."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


class _NoLog:
  """Stands in for the metrics log on processes other than 0."""

  def truncate(self, step: int) -> None:
    del step

  def write(self, record: dict) -> None:
    del record

  def flush(self) -> None:
    pass


def _window_record(step: int, sums: dict) -> dict:
  count = max(int(sums["count"]), 1)
  record = {"step": step, "split": "train"}
  record.update({k: float(v) / count for k, v in sums["sums"].items()})
  record["skipped"] = int(sums["skipped"])
  record["consecutive_skips"] = int(sums["consecutive"])
  return record


def _postfix(record: dict, skipped_total: int) -> dict:
  out = {"loss": f"{record.get('loss_after', float('nan')):.4g}"}
  if "accuracy_after" in record:
    out["acc"] = f"{100 * record['accuracy_after']:.2f}%"
  out["skipped"] = skipped_total
  return out


def _metric_shapes(exp: exp_lib.Experiment, state, key) -> dict:
  """The metrics dict of one meta-step, as shapes (nothing is computed)."""
  _, meta_step = im.make_meta_step(exp.loss, exp.optimizer, exp.algorithm,
                                   has_aux=True)
  return jax.eval_shape(lambda s, d, k: meta_step(s, exp.sample(k, d))[1],
                        state, exp.data.train, key)


# XLA options of the trainer's compilations on a CPU. XLA's fusion emitters
# (its newer CPU code generator) spend far longer compiling these steps than
# its older loop emitters, whose code runs as fast: measured in one process,
# interleaved, on this project's 2-core CPU (benchmarks/compile_time.py,
# benchmarks/results/compile_time_flags_cpu.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(platform: str | None = None) -> dict:
  """XLA options for compiling the trainer's steps on ``platform``.

  ``CPU_COMPILER_OPTIONS`` on a CPU (the default backend if ``platform`` is
  None), nothing elsewhere. An option that ``XLA_FLAGS`` names is left out,
  so the user's setting wins:
  ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=true imaml-train ...`` compiles
  with the newer emitters.

  Example:
    >>> compiler_options("cpu") in ({"xla_cpu_use_fusion_emitters": False}, {})
    True
    >>> compiler_options("gpu")
    {}
  """
  platform = jax.default_backend() if platform is None else platform
  if platform != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in CPU_COMPILER_OPTIONS.items()
          if f"--{k}" not in flags}


def _device_name(mesh=None) -> str:
  device = (jax.devices() if mesh is None else mesh.devices.flat)[0]
  return f"{device.platform}:{getattr(device, 'device_kind', '')}"


def _budget_check_due(step: int, log_every: int, dispatched_s: float,
                      budget_s: float) -> bool:
  """Whether to check the time budget (with a host sync) after ``step``.

  Every ``log_every`` steps; in a single process also at the first step
  whose dispatch clock ``dispatched_s`` passes the budget, so a slow step
  (Hessian-free: 7.7 s on a CPU core) cannot overrun it by ``log_every``
  steps. Processes of a multi-host job check only on the shared schedule,
  so that all of them stop at the same step.
  """
  if step % log_every == 0:
    return True
  return jax.process_count() == 1 and dispatched_s > budget_s


def _budget_spent(sums, trained_s: float, budget_s: float) -> bool:
  """Whether the time budget is spent, as process 0 sees it.

  Waits for ``sums`` (the latest step) first, so the time counts finished
  work. Every process of a multi-host job gets process 0's answer, so all
  stop at the same step.
  """
  jax.block_until_ready(sums)
  spent = trained_s > budget_s
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    spent = bool(multihost_utils.broadcast_one_to_all(np.bool_(spent)))
  return spent


def _check_same_start(step: int) -> None:
  """With several processes, fails unless all resume from the same step."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    multihost_utils.assert_equal(
        np.int64(step), "processes resume from different checkpoints")
  except AssertionError as e:
    raise WorkdirError(
        f"{e}: every process must see the same work directory (a shared "
        "file system).") from e


def prepare(config: config_lib.Config, workdir: str | os.PathLike,
            data_dir: str | os.PathLike | None = None, mesh=None):
  """Checks the request without writing anything.

  Args:
    config: the run's config.
    workdir: the work directory.
    data_dir: the dataset directory, or ``None`` for the default.
    mesh: if given, ``config.meta_batch`` must split evenly over it.

  Returns:
    ``(workdir, data_dir, latest_checkpoint)``.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: with a message.
  """
  config_lib.validate(config)
  if mesh is not None:
    try:
      im.check_divisible(config.meta_batch, mesh)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from e
  data_dir = exp_lib.resolve_data_dir(config, data_dir)
  workdir = Path(workdir).expanduser()
  latest = check_workdir(config, workdir)
  if latest is not None:
    ckpt_lib.load(latest)   # Fails early on a corrupt file.
  return workdir, data_dir, latest


def train_and_evaluate(config: config_lib.Config,
                       workdir: str | os.PathLike,
                       data_dir: str | os.PathLike | None = None, *,
                       mesh=None, progress: bool = True,
                       log: Callable[[str], None] | None = None,
                       time_budget_s: float | None = None) -> dict:
  """Meta-trains ``config`` in ``workdir`` (resuming if possible) and tests.

  Args:
    config: the run's config.
    workdir: the work directory (created; an existing run of the same
      config resumes from its latest checkpoint, possibly written on another
      number of devices).
    data_dir: dataset directory; ``None`` uses ``IMAML_OMNIGLOT_DIR`` /
      ``IMAML_MINI_IMAGENET_DIR`` (unused for sinusoid).
    mesh: the devices to train on (:func:`make_mesh`); ``None`` for all
      devices of all processes.
    progress: show a tqdm progress bar (process 0 only).
    log: where status lines go (default: ``tqdm.write``); only process 0
      logs.
    time_budget_s: stop meta-training once this invocation has trained for
      this many seconds (compilation, validation and checkpoints not
      counted), then validate, checkpoint and test as at the last step.
      Running the same command again resumes towards ``config.meta_steps``.
      ``None``: no limit.

  Returns:
    The results dict also written to ``workdir/results.json``.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: bad request,
      raised before anything is written.
    TrainingDiverged: ``max_consecutive_skips`` consecutive meta-steps were
      skipped for a non-finite meta-gradient.
  """
  wall_start = time.perf_counter()
  if time_budget_s is not None and not time_budget_s > 0:
    raise config_lib.ConfigError(
        f"time_budget_s must be positive, got {time_budget_s!r}.")
  config_lib.check_training(config)
  if mesh is None:
    mesh = make_mesh(config)
  workdir, data_dir, latest = prepare(config, workdir, data_dir, mesh)
  lead = jax.process_index() == 0   # The process that writes and logs.
  log = (log or tqdm.tqdm.write) if lead else (lambda _: None)
  exp = exp_lib.build(config, exp_lib.load_data(config, data_dir))

  init, _ = im.make_meta_step(exp.loss, exp.optimizer, exp.algorithm,
                              has_aux=True)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  state = init(exp.init_params(init_key))
  train_step = make_train_step(exp, mesh)
  metric_shapes = _metric_shapes(exp, state, base_key)
  sums = init_sums(metric_shapes)
  select_key, higher_better = score_key(metric_shapes)
  # A host copy: the device buffers of ``state`` are donated to each step.
  best = {"params": _host(state.params), "score": np.float64(np.nan),
          "step": np.int64(-1)}
  elapsed_before = 0.0
  start_step = 0
  if latest is not None:
    start_step, state, sums, best, base_key, elapsed_before = restore(
        latest, config, state, sums, best)
    log(f"Resuming from {latest} (step {start_step}).")
  _check_same_start(start_step)

  # Everything is checked; from here on the work directory is written.
  ckpt_dir = workdir / CHECKPOINT_DIR
  metrics = _NoLog()
  if lead:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_lib.remove_stale_temporaries(ckpt_dir)
    ckpt_lib.write_atomic(workdir / CONFIG_FILE, json.dumps(
        config_lib.to_dict(config), indent=2, sort_keys=True).encode())
    metrics = metrics_log.MetricsLog(workdir / METRICS_FILE)
  metrics.truncate(start_step)

  state, sums, train_data, base_key = im.replicate(
      (state, sums, exp.data.train, base_key), mesh)
  exp = exp._replace(data=exp.data._replace(train=None))  # Frees the copy.
  best = dict(best, params=jax.device_put(best["params"]))
  compile_time = 0.0
  if start_step < config.meta_steps:
    compile_start = time.perf_counter()
    replicated = im.replicated_sharding(mesh)
    step_fn = jax.jit(train_step, donate_argnums=(0, 1),
                      in_shardings=replicated, out_shardings=replicated
                      ).lower(state, sums, train_data, base_key).compile(
                          compiler_options=compiler_options(
                              _device_name(mesh).split(":")[0]))
    compile_time = time.perf_counter() - compile_start
    log(f"{config.name}: {exp.algorithm.name} on {mesh.size} "
        f"{_device_name(mesh)} device(s); train step compiled in "
        f"{compile_time:.1f} s.")
  evaluator = Evaluator(exp)

  def validate(step: int, params) -> None:
    nonlocal best
    params = _local(params)
    summary = summarize(evaluator(params, exp.data.val, config.val_tasks,
                                  config.val_seed))
    score = summary[select_key]["mean"]
    old = float(best["score"])
    improved = math.isnan(old) or (score > old if higher_better
                                   else score < old)
    if improved and math.isfinite(score):
      best = {"params": jax.tree.map(jnp.copy, params),
              "score": np.float64(score), "step": np.int64(step)}
    record = {"step": step, "split": "val"}
    record.update({k: v["mean"] for k, v in summary.items()})
    record["best"] = bool(improved)
    metrics.write(record)
    log(f"step {step}: validation {select_key} = {score:.4f}"
        f"{' (best)' if improved else ''}")

  def save(step: int, elapsed: float) -> None:
    if not lead:
      return
    metrics.flush()
    ckpt_lib.save(ckpt_dir, step, _host(_checkpoint_tree(
        state, sums, best, base_key, config, elapsed)),
                  keep=config.keep_checkpoints)

  segment_start = time.perf_counter()
  aside = 0.0   # Time spent validating and checkpointing.
  # Skipped steps already logged (the restored window's are logged later).
  skipped_total = int(_host(state.skipped)) - int(_host(sums["skipped"]))
  bar = tqdm.tqdm(total=config.meta_steps, initial=start_step, unit="step",
                  disable=not (progress and lead), dynamic_ncols=True,
                  smoothing=0.1)
  step = start_step
  last_logged = start_step
  stopped_early = False
  try:
    while step < config.meta_steps:
      state, sums = step_fn(state, sums, train_data, base_key)
      step += 1
      if time_budget_s is not None and _budget_check_due(
          step, config.log_every,
          time.perf_counter() - segment_start - aside, time_budget_s):
        stopped_early = step < config.meta_steps and _budget_spent(
            sums, time.perf_counter() - segment_start - aside, time_budget_s)
      last = step == config.meta_steps or stopped_early
      if step % config.log_every == 0 or last:
        host_sums = _host(sums)
        record = _window_record(step, host_sums)
        skipped_total += record["skipped"]
        record["skipped_total"] = skipped_total
        metrics.write(record)
        bar.update(step - last_logged)
        last_logged = step
        bar.set_postfix(_postfix(record, skipped_total), refresh=False)
        sums = im.replicate(reset_window(host_sums), mesh)
        if record["consecutive_skips"] >= config.max_consecutive_skips:
          metrics.flush()
          raise TrainingDiverged(
              f"stopped at step {step}: the last "
              f"{record['consecutive_skips']} meta-steps were skipped for "
              "non-finite meta-gradients (max_consecutive_skips="
              f"{config.max_consecutive_skips}). Lower inner_lr or meta_lr.")
      aside_start = time.perf_counter()
      if config.val_every and (step % config.val_every == 0 or last):
        validate(step, state.params)
      if ((config.checkpoint_every and step % config.checkpoint_every == 0)
          or last):
        save(step, elapsed_before + time.perf_counter() - wall_start)
      aside += time.perf_counter() - aside_start
      if stopped_early:
        log(f"step {step}: time budget of {time_budget_s:g} s spent; "
            f"stopping before meta_steps={config.meta_steps} (run the same "
            "command again to resume).")
        break
  finally:
    bar.close()
    metrics.flush()
  jax.block_until_ready(state)
  train_time = time.perf_counter() - segment_start - aside
  steps_done = step - start_step

  final_params = _local(state.params)
  final_counts = _host({"step": state.step, "skipped": state.skipped})
  has_best = 0 <= int(best["step"]) < step
  test_last = evaluator(final_params, exp.data.test, config.test_tasks,
                        config.test_seed)
  test = test_last
  if has_best:   # The best validation came before the last step.
    test = evaluator(best["params"], exp.data.test, config.test_tasks,
                     config.test_seed)
  test_per_task = per_task_record(test, evaluator.fingerprint(
      exp.data.test, config.test_tasks, config.test_seed))
  test, test_last = summarize(test), summarize(test_last)
  wall = elapsed_before + time.perf_counter() - wall_start
  results = {
      "config": config_lib.to_dict(config),
      "algorithm": exp.algorithm.name,
      "test": test,
      "test_last": test_last,
      "test_per_task": test_per_task,
      "test_params": ("best_validation" if int(best["step"]) >= 0
                      else "last"),
      "protocol": protocol_record(
          "ours", config, "test", exp.eval_algorithm.name,
          "best_validation" if int(best["step"]) >= 0 else "last"),
      "test_note": ("the best validation was at the last step: test and "
                    "test_last are the same parameters"
                    if int(best["step"]) == step else None),
      "best_validation": {"step": int(best["step"]),
                          "metric": select_key,
                          "score": float(best["score"])},
      "statistics": "mean over tasks; ci95 = 1.96 * std / sqrt(n), "
                    "population std (ddof=0)",
      "budget": {
          "meta_steps": int(final_counts["step"]),
          "meta_steps_this_run": steps_done,
          "meta_steps_target": config.meta_steps,
          "stopped_by_time_budget": stopped_early,
          "skipped_steps": int(final_counts["skipped"]),
          "wall_time_s": wall,
          "train_time_s_this_run": train_time,
          "compile_time_s": compile_time,
          "eval_compile_time_s": evaluator.compile_time_s,
          "steps_per_s": steps_done / train_time if train_time > 0 else None,
          "device": _device_name(mesh),
          "devices": mesh.size,
          "processes": jax.process_count(),
          "resumed_from_step": start_step if latest is not None else None,
      },
  }
  if lead:
    ckpt_lib.write_atomic(workdir / RESULTS_FILE,
                          json.dumps(results, indent=2).encode())
    from imaml_jax.train import plots  # pylint: disable=import-outside-toplevel
    plots.plot_curves(workdir / METRICS_FILE, workdir / CURVES_FILE,
                      title=config.name, loss_name=(
                          "MSE" if config.dataset == "sinusoid" else "loss"))
    if config.dataset == "sinusoid":
      from imaml_jax.train import fits  # pylint: disable=import-outside-toplevel
      test_params = best["params"] if has_best else final_params
      plots.plot_sinusoid_fits(
          fits.fit_curves(exp, test_params, seed=config.test_seed),
          workdir / FITS_FILE,
          title=f"{config.name}: held-out tasks, {config.k_shot} support "
                "points")
  log(format_test(results))
  return results


def format_test(results: dict) -> str:
  """One line per test metric: mean +- 95% half-width.

  The heading names the split, the parameters and the evaluation protocol
  (``"ours"`` for results written before protocols were recorded).

  Example:
    >>> stats = {"mean": 0.5, "std": 0.5, "ci95": 0.04, "n": 600}
    >>> print(format_test({"test_params": "last",
    ...                    "protocol": {"name": "authors"},
    ...                    "test": {"accuracy_after": stats}}))
    test on last parameters, protocol authors:
      accuracy_after: 50.000% +- 4.000% (n=600)
  """
  split = results.get("split", "test")
  protocol = results.get("protocol", {}).get("name", "ours")
  where = ("test" if split in ("test", PROTOCOL_SPLITS.get(protocol))
           else f"{split}-split tasks")
  lines = [f"{where} on {results['test_params']} parameters, protocol "
           f"{protocol}:"]
  for name, stats in results["test"].items():
    scale = 100 if name.startswith("accuracy") else 1
    unit = "%" if scale == 100 else ""
    lines.append(f"  {name}: {scale * stats['mean']:.3f}{unit} +- "
                 f"{scale * stats['ci95']:.3f}{unit} (n={stats['n']})")
  return "\n".join(lines)


def load_run(workdir: str | os.PathLike):
  """Config and latest checkpoint of a finished or interrupted run.

  Returns:
    ``(config, checkpoint_path)``.

  Raises:
    WorkdirError: no run in ``workdir``.
  """
  workdir = Path(workdir).expanduser()
  path = workdir / CONFIG_FILE
  if not path.is_file():
    raise WorkdirError(f"{workdir} holds no run ({CONFIG_FILE} not found).")
  try:
    config = config_lib.from_dict(_read_json(path))
  except config_lib.ConfigError as e:
    raise WorkdirError(f"{path}: {e}") from e
  latest = ckpt_lib.latest_checkpoint(workdir / CHECKPOINT_DIR)
  if latest is None:
    raise WorkdirError(f"{workdir} has no checkpoint yet.")
  return config, latest


EVAL_SPLITS = ("test", "val", "train", "authors_test")
# Evaluation protocols and the split each draws its test tasks from.
PROTOCOL_SPLITS = {"ours": "test", "authors": "authors_test"}
EVAL_PROTOCOLS = tuple(PROTOCOL_SPLITS)
AUTHORS_SOURCE = ("github.com/aravindr93/imaml_dev at commit 6a2a669: "
                  "examples/measure_accuracy.py with the command of "
                  "examples/README.md, implicit_maml/dataset.py")


def protocol_record(name: str, config: config_lib.Config, split: str,
                    adaptation: str, parameters: str,
                    overlap: dict | None = None) -> dict:
  """The ``"protocol"`` entry of a results file: how its tasks were tested.

  Args:
    name: ``"ours"`` or ``"authors"``.
    config: the config the test tasks were drawn and adapted with.
    split: the split the tasks come from (``EVAL_SPLITS``).
    adaptation: how each task was adapted (the algorithm's name).
    parameters: ``"best_validation"`` or ``"last"``.
    overlap: for the authors' characters, the fraction of them in each part
      of this run's split (``characters_overlap``).

  Example:
    >>> cfg = config_lib.get_config("sinusoid")
    >>> protocol_record("ours", cfg, "test", "imaml(...)", "last")["q_query"]
    10
  """
  record = {"name": name, "q_query": config.q_query,
            "tasks": exp_lib.tasks_description(config, split),
            "adaptation": adaptation, "parameters": parameters}
  if overlap is not None:
    record["characters_overlap"] = overlap
  if name == "authors":
    record["source"] = AUTHORS_SOURCE
  return record


def eval_file_name(overrides: Sequence[str] = (), split: str | None = None,
                   protocol: str = "ours") -> str:
  """``eval.json``, or ``eval_`` + protocol, split and overrides + ``.json``.

  The protocol appears as ``protocol=<name>`` unless it is ``ours``; the
  split unless it is the protocol's own (``test`` for ours,
  ``authors_test`` for authors); the test-time overrides, if any, follow.

  Example:
    >>> eval_file_name(["eval_inner_steps=32"])
    'eval_eval_inner_steps=32.json'
    >>> eval_file_name(split="train")
    'eval_train.json'
    >>> eval_file_name(protocol="authors"), eval_file_name(["q_query=1"])
    ('eval_protocol=authors.json', 'eval_q_query=1.json')
  """
  parts = [] if protocol == "ours" else [f"protocol={protocol}"]
  if split not in (None, PROTOCOL_SPLITS.get(protocol)):
    parts.append(split)
  parts += [re.sub(r"[^A-Za-z0-9_.=-]", "_", o.replace(" ", ""))
            for o in overrides]
  return "_".join(["eval", *parts]) + ".json"


def _check_protocol(protocol: str, split: str | None,
                    overrides: Sequence[str]) -> str:
  """Validates the protocol and split names; returns the split to use."""
  if protocol not in EVAL_PROTOCOLS:
    raise config_lib.ConfigError(
        f"protocol must be one of {', '.join(EVAL_PROTOCOLS)}; got "
        f"{protocol!r}.")
  if split is not None and split not in EVAL_SPLITS:
    raise config_lib.ConfigError(
        f"split must be one of {', '.join(EVAL_SPLITS)}; got {split!r}.")
  own = PROTOCOL_SPLITS[protocol]
  if protocol == "authors":
    if split not in (None, own):
      raise config_lib.ConfigError(
          f"protocol 'authors' draws its tasks from the authors' test "
          f"characters (split {own}); split {split!r} does not apply.")
    fixed = [o for o in overrides
             if o.partition("=")[0].strip() in exp_lib.AUTHORS_FIXED_FIELDS]
    if fixed:
      raise config_lib.ConfigError(
          f"protocol 'authors' adapts on the support loss alone, without a "
          f"proximal term or a step check; {', '.join(fixed)} does not "
          "apply.")
  return own if split is None else split


def evaluate_workdir(workdir: str | os.PathLike,
                     data_dir: str | os.PathLike | None = None, *,
                     n_tasks: int | None = None,
                     overrides: Sequence[str] = (),
                     split: str | None = None,
                     protocol: str = "ours",
                     log: Callable[[str], None] = print) -> dict:
  """Tests a run's checkpoint under an evaluation protocol.

  ``protocol="ours"`` (default): tasks from the held-out test characters
  (never meta-trained on), ``q_query`` query images per class (15 in the
  Omniglot configs), adaptation by the run's own inner loop (proximal for
  iMAML), the best-validation parameters (``test``; the last ones in
  ``test_last``).

  ``protocol="authors"`` (Omniglot only): the evaluation script of the
  iMAML authors' code (``AUTHORS_SOURCE``). Tasks from their test
  characters (:func:`imaml_jax.data.omniglot_authors_split_indices`, seed
  12345, most of them meta-training characters of this run's split, see
  ``characters_overlap``), each class turned by its own random multiple of
  90 degrees; ``q_query = k_shot`` (one query image per class at 1-shot);
  adaptation with lam 0 on the support loss alone
  (:func:`imaml_jax.train.experiment.authors_eval_algorithm`: 16 plain
  gradient steps of 0.1 for iMAML); the last parameters (``test`` and
  ``test_last`` alike).

  ``overrides`` (``"key=value"`` strings) change test-time fields only
  (``config.TEST_TIME_FIELDS``: how the test tasks are drawn and adapted),
  e.g. more inner steps or ``q_query=1``; under the authors' protocol they
  apply on top of its settings, and ``lam`` and ``inner_backtrack`` are
  refused. ``split`` picks the characters (classes) the tasks are drawn
  from: ``"test"`` (held out), ``"val"``, ``"train"`` (those meta-trained
  on, which measures how much of the test error is a gap between seen and
  unseen classes) or ``"authors_test"`` (the authors' characters alone,
  under this protocol's other settings); ``None`` is the protocol's own.
  Every split uses ``test_seed`` and ``n_tasks`` tasks. Writes
  ``workdir/eval.json`` (or the :func:`eval_file_name` of the protocol,
  split and overrides) and returns the same dict; its ``protocol`` entry
  names the protocol and its settings.

  Raises:
    ConfigError: an unknown protocol or split, a split the protocol does
      not draw from, an override of a field that is not a test-time field
      (or that the protocol fixes), or the authors' characters for a run
      that is not on Omniglot; all before anything is loaded.
    WorkdirError, DataError, CheckpointError: as for training.
  """
  split = _check_protocol(protocol, split, overrides)
  config, latest = load_run(workdir)
  if ((protocol == "authors" or split == "authors_test")
      and config.dataset != "omniglot"):
    raise config_lib.ConfigError(
        f"the authors' evaluation and characters are Omniglot's; this run's "
        f"dataset is {config.dataset!r}.")
  base = exp_lib.authors_overrides(config) if protocol == "authors" else []
  test_config = config_lib.apply_test_time_overrides(config,
                                                     [*base, *overrides])
  data_dir = exp_lib.resolve_data_dir(config, data_dir)
  # Test-time fields change only the adaptation, not the parameters.
  exp = exp_lib.build(test_config, exp_lib.load_data(config, data_dir))
  chunks, overlap = None, None
  if split == "authors_test":
    authors = exp_lib.load_authors_characters(config, data_dir)
    images, overlap = jax.device_put(authors.images), authors.overlap
    chunks = exp_lib.authors_evaluation_chunks
  else:
    images = getattr(exp.data, split)
  adaptation = exp.eval_algorithm.name
  if protocol == "authors":
    exp = exp._replace(
        eval_algorithm=exp_lib.authors_eval_algorithm(test_config))
    adaptation = (f"{exp.eval_algorithm.name}: its inner solver on the "
                  "support loss alone (lam 0: no proximal term, no "
                  "pull-back)")
  init, _ = im.make_meta_step(exp.loss, exp.optimizer, exp.algorithm,
                              has_aux=True)
  state = init(exp.init_params(jax.random.key(0)))
  best = {"params": state.params, "score": np.float64(np.nan),
          "step": np.int64(-1)}
  # The training metrics' sums play no part in a test: they are restored
  # with the metric names the checkpoint holds, so a run saved before a
  # metric was added can still be tested.
  stored_metrics = ckpt_lib.load(latest)[1].get("sums", {}).get("sums", {})
  step, state, _, best, _, _ = restore(latest, config, state,
                                       init_sums(stored_metrics), best)
  n_tasks = n_tasks or config.test_tasks
  evaluator = Evaluator(exp, chunks)
  test_last = evaluator(state.params, images, n_tasks, test_config.test_seed)
  test = test_last
  use_best = protocol == "ours" and int(best["step"]) >= 0
  if use_best and int(best["step"]) < step:
    test = evaluator(best["params"], images, n_tasks, test_config.test_seed)
  test_per_task = per_task_record(test, evaluator.fingerprint(
      images, n_tasks, test_config.test_seed))
  test, test_last = summarize(test), summarize(test_last)
  test_params = "best_validation" if use_best else "last"
  results = {
      "checkpoint": str(latest), "step": step,
      "split": split,
      "protocol": protocol_record(protocol, test_config, split, adaptation,
                                  test_params, overlap),
      "test_time_overrides": list(overrides),
      "test_params": test_params,
      "best_validation": {"step": int(best["step"]),
                          "score": float(best["score"])},
      "test": test,
      "test_last": test_last,
      "test_per_task": test_per_task,
  }
  ckpt_lib.write_atomic(Path(workdir).expanduser() /
                        eval_file_name(overrides, split, protocol),
                        json.dumps(results, indent=2).encode())
  log(format_test(results))
  return results
