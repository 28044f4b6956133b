"""The jitted training step and the running sums of its metrics.

The training step (task sampling with the key
``jax.random.fold_in(base_key, step)``, the meta-step, and a running sum of
the metrics) is one jitted function whose data arrays are arguments,
compiled ahead of time (:func:`compile_train_step`) so its compile time is
reported apart from the step time. The host reads the running sums only
every ``log_every`` steps (:func:`window_record`, then :func:`reset_window`).

Example:
  >>> sums = init_sums({"loss_after": None, "skipped": None})
  >>> sums = add_to_sums(sums, {"loss_after": jnp.float32(0.5),
  ...                           "skipped": jnp.bool_(False)})
  >>> window_record(10, sums)["loss_after"]
  0.5
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import imaml_jax as im
from imaml_jax._src import sharding as sharding_lib
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import runtime

# Metrics measured only on some steps (NaN on the others): the linear
# solve's residual, measured with ``log_residual`` on the first step of each
# logging window (:func:`measures_residual`), and never without it.
OCCASIONAL_METRICS = ("residual",)


def measures_residual(log_every: int) -> Callable:
  """``report_residual`` of the trainer's meta-step: the steps it measures.

  The residual costs one Hessian-vector product a task; the trainer spends
  it on the first step of each logging window only (``state.step`` a
  multiple of ``log_every``), and the window's ``residual`` is the mean
  over the steps that measured it. Windows start at multiples of
  ``log_every`` (a resumed run continues its window), so each window
  measures it unless that one step was skipped.

  Example:
    >>> measure = measures_residual(100)
    >>> bool(measure(im.MetaState(None, None, jnp.int32(200), None)))
    True
  """
  return lambda state: state.step % log_every == 0


def residual_schedule(exp: exp_lib.Experiment) -> Callable | bool | None:
  """``report_residual`` of the trainer's meta-step.

  :func:`measures_residual` with ``log_residual``; ``False`` for an implicit
  algorithm without it (no product is spent, and none is compiled: the
  window records then leave ``residual`` out, unless the solver tracks its
  own for free); ``None`` for an algorithm that solves no linear system.
  """
  if not exp.algorithm.reports_residual:
    return None
  if exp.config.log_residual:
    return measures_residual(exp.config.log_every)
  return False


def init_sums(metric_shapes: dict) -> dict:
  """Zeroed running sums for the scalar metrics of a meta-step.

  ``sums`` adds each metric over the steps that were not skipped, ``count``
  counts those steps, ``skipped`` counts skipped steps in the window and
  ``consecutive`` the current run of consecutive skipped steps. A metric
  measured only on some steps (``OCCASIONAL_METRICS``, NaN on the others)
  adds only where it was measured, and ``measured`` counts those steps.

  Args:
    metric_shapes: the meta-step's metrics (:func:`metric_shapes`); only
      their names are used.
  """
  return {
    "sums": {
      k: jnp.zeros((), jnp.float32) for k in metric_shapes if k != "skipped"
    },
    "count": jnp.zeros((), jnp.int32),
    "skipped": jnp.zeros((), jnp.int32),
    "consecutive": jnp.zeros((), jnp.int32),
    "measured": {
      k: jnp.zeros((), jnp.int32)
      for k in metric_shapes
      if k in OCCASIONAL_METRICS
    },
  }


def add_to_sums(sums: dict, metrics: dict) -> dict:
  """Adds one step's metrics to the running sums (jittable)."""
  skipped = metrics["skipped"].astype(jnp.int32)
  ok = skipped == 0
  counted = {k: ok & ~jnp.isnan(metrics[k]) for k in sums["measured"]}
  return {
    "sums": {
      k: v + jnp.where(counted.get(k, ok), metrics[k].astype(jnp.float32), 0.0)
      for k, v in sums["sums"].items()
    },
    "count": sums["count"] + ok.astype(jnp.int32),
    "skipped": sums["skipped"] + skipped,
    "consecutive": jnp.where(ok, 0, sums["consecutive"] + 1),
    "measured": {
      k: v + counted[k].astype(jnp.int32) for k, v in sums["measured"].items()
    },
  }


def reset_window(sums: dict) -> dict:
  """Zeroes the window sums, keeping the consecutive-skip count."""
  out = jax.tree.map(jnp.zeros_like, sums)
  out["consecutive"] = sums["consecutive"]
  return out


def window_record(step: int, sums: dict) -> dict:
  """The ``"train"`` record of a logging window: the mean of each metric
  over the window's steps that were not skipped (an occasional metric's:
  over the steps that measured it), and the skip counts. A metric without
  such steps is left out: a window whose steps were all skipped records
  only its skips (a mean of none is not 0).

  Args:
    step: the window's last step.
    sums: the window's running sums, on the host.

  Example:
    >>> sums = init_sums({"loss_after": None, "skipped": None})
    >>> sums = add_to_sums(sums, {"loss_after": jnp.float32(jnp.nan),
    ...                           "skipped": jnp.bool_(True)})
    >>> window_record(10, sums)
    {'step': 10, 'split': 'train', 'skipped': 1, 'consecutive_skips': 1}
  """
  count = int(sums["count"])
  measured = sums.get("measured", {})
  record = {"step": step, "split": "train"}
  for k, v in sums["sums"].items():
    n = int(measured[k]) if k in measured else count
    if n:
      record[k] = float(v) / n
  record["skipped"] = int(sums["skipped"])
  record["consecutive_skips"] = int(sums["consecutive"])
  return record


def metric_shapes(exp: exp_lib.Experiment, state, key) -> dict:
  """The metrics dict of one meta-step, as shapes (nothing is computed).

  Args:
    exp: the experiment (:func:`imaml_jax.train.build_experiment`).
    state: a meta-state of the experiment (its shapes are what matter).
    key: a random key of the kind the task sampler takes.

  Returns:
    ``{name: jax.ShapeDtypeStruct}`` for every metric of the meta-step.
  """
  _, meta_step = im.make_meta_step(
    exp.loss, exp.optimizer, exp.algorithm, has_aux=True
  )
  return jax.eval_shape(
    lambda s, d, k: meta_step(s, exp.sample(k, d))[1],
    state,
    exp.data.train,
    key,
  )


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
  sample = im.data.make_sharded_sampler(
    mesh, config.n_way, config.k_shot, config.q_query, config.meta_batch
  )
  if not config.reptile_train_shots and config.class_rotations == "classes":
    return sample
  return lambda key, data: im.constrain_tasks(
    exp_lib.training_tasks(
      config, exp_lib.turn_task_classes(config, key, sample(key, data))
    ),
    mesh,
  )


def make_train_step(exp: exp_lib.Experiment, mesh=None) -> Callable:
  """``train_step(state, sums, train_data, base_key) -> (state, sums)``.

  Samples the task batch on device from ``fold_in(base_key, state.step)``,
  takes one meta-step and adds its metrics to ``sums``. Pure; jit it with
  the data as an argument (not a closed-over constant).

  Args:
    exp: the experiment (:func:`imaml_jax.train.build_experiment`).
    mesh: a task mesh (:func:`imaml_jax.train.runtime.make_mesh`) to split
      the task batch over, or ``None`` for unconstrained tasks.

  Example:
    >>> import jax
    >>> import imaml_jax as im
    >>> from imaml_jax import train
    >>> config = train.apply_overrides(
    ...   train.get_config("sinusoid"), ["meta_batch=4"])
    >>> exp = train.build_experiment(config)
    >>> init, _ = im.make_meta_step(
    ...   exp.loss, exp.optimizer, exp.algorithm, has_aux=True)
    >>> state = init(exp.init_params(jax.random.key(0)))
    >>> key = jax.random.key(1)  # the run's base key
    >>> sums = train.init_sums(train.metric_shapes(exp, state, key))
    >>> step = jax.jit(train.make_train_step(exp))
    >>> for _ in range(3):
    ...   state, sums = step(state, sums, exp.data.train, key)
    >>> int(state.step), int(sums["count"]), sorted(sums["sums"])[:2]
    (3, 3, ['grad_norm', 'loss_after'])
  """
  # With task_chunk on several devices, each device maps over its own tasks
  # (a lax.map over the split task axis would not stay split under jit).
  platform = None if mesh is None else runtime.device_name(mesh).split(":")[0]
  chunk = runtime.task_chunk(exp.config, platform)
  per_device = chunk is not None and mesh is not None and mesh.size > 1
  _, meta_step = im.make_meta_step(
    exp.loss,
    exp.optimizer,
    exp.algorithm,
    has_aux=True,
    task_chunk=chunk,
    report_residual=residual_schedule(exp),
    axis_name=im.TASK_AXIS if per_device else None,
  )
  if per_device:
    meta_step = sharding_lib.per_device_step(meta_step, mesh)
  sample = task_sampler(exp, mesh)

  def train_step(state, sums, train_data, base_key):
    tasks = sample(jax.random.fold_in(base_key, state.step), train_data)
    state, metrics = meta_step(state, tasks)
    return state, add_to_sums(sums, metrics)

  return train_step


def compile_train_step(
  train_step: Callable, mesh, *args
) -> tuple[Callable, float]:
  """Compiles ``train_step`` for ``args`` replicated over ``mesh``.

  The state and sums (the first two arguments) are donated. On a CPU the
  step compiles with :func:`imaml_jax.train.runtime.compiler_options`.

  Returns:
    ``(compiled_step, compile_seconds)``.
  """
  start = time.perf_counter()
  replicated = im.replicated_sharding(mesh)
  platform = runtime.device_name(mesh).split(":")[0]
  compiled = (
    jax.jit(
      train_step,
      donate_argnums=(0, 1),
      in_shardings=replicated,
      out_shardings=replicated,
    )
    .lower(*args)
    .compile(compiler_options=runtime.compiler_options(platform))
  )
  return compiled, time.perf_counter() - start
