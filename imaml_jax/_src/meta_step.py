"""The jit-compilable meta-training step, vmapped over a batch of tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from imaml_jax._src import algorithms
from imaml_jax._src import tree_util as tu
from imaml_jax._src import validation
from imaml_jax._src.adapt import with_aux
from imaml_jax._src.types import PyTree
from imaml_jax._src.types import Task


class MetaState(NamedTuple):
  """State of meta-training.

  Attributes:
    params: meta-parameters ``theta``.
    opt_state: the optax optimizer's state.
    step: number of meta-steps taken (int32 scalar), skipped ones included.
    skipped: number of meta-steps skipped for a non-finite meta-gradient.
  """

  params: PyTree
  opt_state: Any
  step: jax.Array
  skipped: jax.Array


class MetaStep(NamedTuple):
  """The pure functions of meta-training that :func:`make_meta_step` builds.

  Attributes:
    init: ``init(params) -> MetaState``.
    step: ``step(state, tasks) -> (MetaState, metrics)``, or
      ``step(state, tasks, key)`` for a stochastic loss.
  """

  init: Callable[[PyTree], MetaState]
  step: Callable[..., tuple[MetaState, dict]]


def with_key_in_batch(loss: algorithms.AuxLoss) -> algorithms.AuxLoss:
  """``(params, (batch, key)) -> loss(params, batch, key)``.

  A stochastic loss gets its key through the batch: the support and query
  sets of each task carry their own key (:func:`keyed_tasks`), so every
  algorithm, unaware of keys, hands the right one to each call.
  """
  return lambda params, batch_and_key: loss(params, *batch_and_key)


def task_keys(
  key: jax.Array, n_tasks: int, axis_name: str | None = None
) -> jax.Array:
  r"""One PRNG key per task of the batch: ``k_i = fold_in(key, i)``.

  ``i`` is the task's index in the whole batch; inside a step split over the
  mesh axis ``axis_name`` (``n_tasks`` tasks on each device) it is
  ``axis_index * n_tasks + local index``, so a task gets the same key
  whatever the number of devices, chunks or hosts.

  Example:
    >>> import jax
    >>> keys = task_keys(jax.random.key(0), 3)
    >>> keys.shape, bool((jax.random.key_data(keys[0])
    ...                   != jax.random.key_data(keys[1])).any())
    ((3,), True)
  """
  first = 0
  if axis_name is not None:
    first = jax.lax.axis_index(axis_name) * n_tasks
  index = first + jnp.arange(n_tasks)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def keyed_tasks(
  tasks: Task, key: jax.Array, n_tasks: int, axis_name: str | None = None
) -> Task:
  """``Task((support, k_support), (query, k_query))`` with per-task keys.

  Task ``i``'s key :func:`task_keys` is split into one key for its support
  set and one for its query set. The support key is the same at every inner
  step, so the inner objective is one deterministic function of ``phi``, as
  the implicit gradient (and a line search) needs.
  """
  check_key(key)
  pairs = jax.vmap(jax.random.split)(task_keys(key, n_tasks, axis_name))
  return Task(
    support=(tasks.support, pairs[:, 0]), query=(tasks.query, pairs[:, 1])
  )


def check_key(key) -> None:
  """Raises a TypeError naming the problem unless ``key`` is one PRNG key."""
  if key is None:
    raise TypeError(
      "this step was built with stochastic=True: call it as "
      "step(state, tasks, key) with a PRNG key such as "
      "jax.random.key(seed)."
    )
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(
    dtype, jax.dtypes.prng_key
  )
  if typed and key.shape == ():
    return
  if not typed and dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
    return
  # A traced argument's class (DynamicJaxprTracer) says nothing to a user.
  kind = "an array" if hasattr(key, "shape") else f"a {type(key).__name__}"
  raise TypeError(
    "key must be one PRNG key (jax.random.key(seed), or "
    f"jax.random.PRNGKey(seed)); got {kind} of shape "
    f"{getattr(key, 'shape', ())} and dtype {dtype}."
  )


def _call_hint(value) -> str:
  """Ends an error message about an argument that may be an uncalled factory."""
  return "; did you forget to call it?" if callable(value) else "."


def check_step_arguments(
  loss_fn: Callable, algorithm: algorithms.MetaAlgorithm
) -> None:
  """Type checks shared by :func:`make_meta_step` and :func:`make_eval_step`."""
  if not isinstance(algorithm, algorithms.MetaAlgorithm):
    raise TypeError(
      "algorithm must be built by im.imaml, im.maml, im.fomaml "
      f"or im.reptile, got {type(algorithm).__name__}{_call_hint(algorithm)}"
    )
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")


def check_optimizer(optimizer) -> None:
  """Raises a TypeError unless ``optimizer`` is an optax transformation."""
  # GradientTransformationExtraArgs (optax.adam, optax.chain, ...) subclasses
  # GradientTransformation.
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      "optimizer must be an optax.GradientTransformation such as "
      f"optax.adam(1e-3), got {type(optimizer).__name__}"
      f"{_call_hint(optimizer)}"
    )


def make_meta_step(
  loss_fn: Callable,
  optimizer: optax.GradientTransformation,
  algorithm: algorithms.MetaAlgorithm,
  *,
  has_aux: bool = False,
  per_task_metrics: bool = False,
  skip_nonfinite: bool = True,
  pre_adaptation_metrics: bool = True,
  task_chunk: int | None = None,
  axis_name: str | None = None,
  flatten: bool = True,
  stochastic: bool = False,
  report_residual: bool | Callable[[MetaState], jax.Array] | None = None,
) -> MetaStep:
  r"""Builds pure ``init`` and ``step`` functions for meta-training.

  ``step(state, tasks)`` computes every task's meta-gradient with
  ``algorithm`` under ``jax.vmap`` over the leading task axis of ``tasks``,
  averages them, ``g = (1/n) sum_i g_i``, and applies ``optimizer``. The caller
  jits it (``jax.jit(step)``, optionally ``donate_argnums=0``); it contains no
  host synchronisation and compiles once per task-batch shape.

  If the averaged meta-gradient has a non-finite entry and ``skip_nonfinite``
  is true (the default), parameters and optimizer state are left unchanged,
  ``state.skipped`` is incremented and ``metrics["skipped"]`` is 1. With
  ``skip_nonfinite=False`` the update is applied whatever it holds, and
  neither counts it as skipped (``metrics["grad_norm"]`` shows a non-finite
  meta-gradient).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` or, with ``has_aux=True``,
      ``-> (scalar, aux)`` where ``aux`` is a dict of scalars (e.g.
      ``{"accuracy": acc}``), none named ``"loss"``.
    optimizer: an optax gradient transformation for the outer update (the
      paper uses Adam).
    algorithm: ``im.imaml(...)``, ``im.maml(...)``, ``im.fomaml(...)`` or
      ``im.reptile(...)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    per_task_metrics: also return every task's metrics under
      ``metrics["per_task"]`` (arrays with a leading task axis).
    skip_nonfinite: skip updates whose meta-gradient is not finite.
    pre_adaptation_metrics: also evaluate the query loss (and aux) at
      ``theta`` before adaptation (one extra query forward pass per task).
    task_chunk: how many tasks are vmapped together. ``None`` (default)
      vmaps the whole batch; an integer ``c`` runs ``lax.map`` over chunks of
      ``c`` vmapped tasks (``c = 1``: one task at a time). Same result; on
      backends where large batched products are slow (XLA's CPU backend)
      smaller chunks can be much faster. A remainder is vmapped apart.
      To use every core of a CPU, split it into devices first
      (:func:`imaml_jax.use_cpu_cores`) and run the step per device
      (``axis_name`` below). Anything but ``None`` or an integer ``>= 1``
      is refused at once.
    axis_name: for a step that runs inside ``jax.shard_map`` with the task
      batch split over this mesh axis (``shard_meta_step(...,
      per_device=True)``): each device maps over its own tasks (with
      ``task_chunk`` if given), then the meta-gradient and the metrics are
      averaged over the axis with ``lax.pmean`` (the shards are equal, so
      this is the mean over all tasks) and per-task metrics are gathered.
      Run it with ``check_vma=False``, as ``shard_meta_step`` does: the
      outputs are replicated by construction, and with replication checks
      ``shard_map`` would sum every gradient taken with respect to the
      replicated ``theta`` over the devices.
    flatten: run each task's algorithm on the parameters raveled into one
      vector (``jax.flatten_util.ravel_pytree``), unraveled only inside the
      loss. The mathematics is unchanged, but every vector operation of the
      inner loop and of CG (updates, inner products, norms, selections) is
      then one array operation instead of one per parameter leaf, so XLA
      emits and compiles far fewer kernels (``benchmarks/compile_time.py``).
      Results agree with ``flatten=False`` up to float rounding of sums
      over leaves when every leaf has one dtype; with mixed dtypes (e.g.
      ``bfloat16`` beside ``float32``) the raveled vector, and so the inner
      loop, is in the widest one (each result leaf keeps its dtype), where
      ``flatten=False`` steps each leaf in its own. An algorithm's
      ``adapts`` predicate is applied to the parameters' real key paths
      before raveling.
    stochastic: the loss needs randomness (dropout, augmentation):
      ``loss_fn(params, batch, key)``, and the step is called as
      ``step(state, tasks, key)``. Task ``i`` of the batch gets
      ``k_i = fold_in(key, i)``, split into a key for its support set (the
      same at every inner step, so the inner objective is one function) and
      one for its query set; the keys do not depend on ``task_chunk`` or on
      the number of devices. Pass a new key each step, e.g.
      ``jax.random.fold_in(seed_key, state.step)``.
    report_residual: when an implicit algorithm (:func:`imaml_jax.imaml`)
      measures its linear solve's residual, one Hessian-vector product a
      task. ``None`` (default): as its solver does by default (``im.cg``:
      every step). ``True``/``False``: every step / never (``residual`` is
      then NaN, except where it costs nothing: the guarded
      ``im.cg(stop_at_negative_curvature=True)`` always reports its
      recurrence's). A function of the :class:`MetaState`, e.g. ``lambda s:
      s.step % 100 == 0``: on the steps where it returns true, through
      ``lax.cond`` (the product is skipped on the others, whose
      ``residual`` is NaN). Refused (ValueError) for algorithms without a
      linear solve, where it could not act.

  Returns:
    A :class:`MetaStep` ``(init, step)``: ``init(params) -> MetaState`` and
    ``step(state, tasks) -> (MetaState, metrics)``. ``metrics`` holds the task
    means of ``loss_after`` (query loss at the adapted parameters), each aux
    entry as ``<name>_after``, ``loss_before``/``<name>_before`` when
    requested, ``residual`` for implicit algorithms (and
    ``negative_curvature`` and ``solve_iterations`` with a solver that
    reports them, see :func:`imaml_jax.imaml`), ``grad_norm`` and
    ``skipped`` of the averaged meta-gradient, and ``param_norm``, the norm of
    the updated meta-parameters (a slow drift of it is the first sign of an
    unstable run).

  Raises:
    TypeError: ``algorithm``, ``optimizer``, ``loss_fn``, ``has_aux`` or
      ``task_chunk`` is of the wrong type (at once); a loss's output does
      not match ``has_aux`` (when ``step`` is traced).
    ValueError: ``task_chunk`` is below 1 (at once); ``aux`` has an entry
      named ``"loss"``, whose metrics would replace ``loss_after`` and
      ``loss_before`` (when ``step`` is traced).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import imaml_jax as im
    >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    >>> init, step = im.make_meta_step(loss, optax.adam(1e-2),
    ...                                im.imaml(2.0, im.gd(5, 0.1), im.cg(3)))
    >>> x = jnp.ones((4, 6, 3)); y = jnp.ones((4, 6))
    >>> state, metrics = jax.jit(step)(init(jnp.zeros(3)),
    ...                                im.Task((x, y), (x, y)))
    >>> int(state.step), sorted(metrics)[:2]
    (1, ['grad_norm', 'loss_after'])
  """
  check_step_arguments(loss_fn, algorithm)
  check_optimizer(optimizer)
  if task_chunk is not None:
    validation.check_positive_int("task_chunk", task_chunk)
  if report_residual is not None and not algorithm.reports_residual:
    raise ValueError(
      f"report_residual applies to implicit algorithms (im.imaml), whose "
      f"meta-gradient is a linear solve; {algorithm.name} solves none."
    )
  if stochastic and algorithm.support_minibatches:
    raise ValueError(
      f"stochastic=True does not apply to {algorithm.name}: it steps "
      "through the support set's mini-batches, and a task's key has no "
      "mini-batch axis. Draw the randomness into the mini-batches when "
      "building them, or use reptile(inner) without minibatches."
    )
  loss = with_aux(loss_fn, has_aux)
  if stochastic:
    loss = with_key_in_batch(loss)

  def init(params: PyTree) -> MetaState:
    validation.check_floating_params(params)
    return MetaState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      skipped=jnp.zeros((), jnp.int32),
    )

  def task_gradient(params, task, measure):
    options = {} if measure is None else {"report_residual": measure}
    if flatten:
      g, metrics = flat_task_gradient(algorithm, loss, params, task, **options)
    else:
      g, metrics = algorithm.task_gradient(loss, params, task, **options)
    if pre_adaptation_metrics:
      q_loss, q_aux = loss(params, task.query)
      metrics.update(algorithms.query_metrics(q_loss, q_aux, "before"))
    return g, metrics

  def step(state: MetaState, tasks: Task, key: jax.Array | None = None):
    if not isinstance(tasks, Task):
      raise TypeError(f"tasks must be an im.Task, got {type(tasks).__name__}.")
    n_tasks = validation.check_task_batch(tasks)
    if stochastic:
      tasks = keyed_tasks(tasks, key, n_tasks, axis_name)
    elif key is not None:
      raise TypeError(
        "step got a key, but the loss is deterministic: build "
        "the step with make_meta_step(..., stochastic=True) "
        "for a loss_fn(params, batch, key)."
      )
    measure = (
      report_residual(state) if callable(report_residual) else report_residual
    )
    grads, per_task = map_over_tasks(
      lambda task: task_gradient(state.params, task, measure),
      tasks,
      task_chunk,
      n_tasks,
    )
    grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    if axis_name is not None:
      grad = jax.lax.pmean(grad, axis_name)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skipped = jnp.zeros((), jnp.int32)  # Nothing is skipped when opted out.
    if skip_nonfinite:
      finite = tu.tree_all_finite(grad)
      params = tu.tree_where(finite, params, state.params)
      opt_state = tu.tree_where(finite, opt_state, state.opt_state)
      skipped = jnp.logical_not(finite).astype(jnp.int32)
    metrics = {k: jnp.mean(v) for k, v in per_task.items()}
    if axis_name is not None:
      metrics = jax.lax.pmean(metrics, axis_name)
      per_task = jax.lax.all_gather(per_task, axis_name, tiled=True)
    metrics["grad_norm"] = tu.tree_norm(grad)
    metrics["param_norm"] = tu.tree_norm(params)
    metrics["skipped"] = skipped
    if per_task_metrics:
      metrics["per_task"] = per_task
    new_state = MetaState(
      params=params,
      opt_state=opt_state,
      step=state.step + 1,
      skipped=state.skipped + skipped,
    )
    return new_state, metrics

  step.axis_name = axis_name  # Checked by shard_meta_step(per_device=True).
  return MetaStep(init, step)


def map_over_tasks(
  fn: Callable, tasks: Task, task_chunk: int | None, n_tasks: int
):
  """``fn`` applied to every task of a batch, stacked on a leading axis.

  ``task_chunk=None`` vmaps the whole batch; otherwise ``lax.map`` runs over
  chunks of ``task_chunk`` vmapped tasks (a remainder is vmapped apart).
  """
  if task_chunk is None or task_chunk >= n_tasks:
    return jax.vmap(fn)(tasks)
  return jax.lax.map(fn, tasks, batch_size=task_chunk)


def ravel_params(params: PyTree, adapts: algorithms.Adapts | None = None):
  """``(theta_flat, unravel)``: the parameters raveled for the algorithm.

  Without ``adapts`` ``theta_flat`` is one vector. With it, the parameters
  are first split by the predicate on their real key paths and each part is
  raveled alone: ``theta_flat`` is an :class:`~imaml_jax._src.algorithms.
  AdaptedSplit` of two vectors, which the algorithm's adaptation recognises
  (a predicate applied to one raveled vector would only see the key path
  ``()``). ``unravel`` inverts either layout.
  """
  if adapts is None:
    return ravel_pytree(params)
  adapted, fixed = algorithms.partition_by_adapts(params, adapts)
  adapted_flat, unravel_adapted = ravel_pytree(adapted)
  fixed_flat, unravel_fixed = ravel_pytree(fixed)

  def unravel(split: algorithms.AdaptedSplit) -> PyTree:
    return tu.combine(
      unravel_adapted(split.adapted), unravel_fixed(split.fixed)
    )

  return algorithms.AdaptedSplit(adapted_flat, fixed_flat), unravel


def flat_loss(
  loss: algorithms.AuxLoss,
  params: PyTree,
  adapts: algorithms.Adapts | None = None,
):
  """``(theta_flat, loss_flat, unravel)``: ``loss_flat(v, batch) = loss(unravel(v), batch)``."""
  theta_flat, unravel = ravel_params(params, adapts)
  return theta_flat, (lambda v, batch: loss(unravel(v), batch)), unravel


def flat_task_gradient(
  algorithm: algorithms.MetaAlgorithm,
  loss: algorithms.AuxLoss,
  params: PyTree,
  task: Task,
  **options,
):
  """``algorithm.task_gradient`` run on the raveled parameters."""
  theta_flat, loss_flat, unravel = flat_loss(loss, params, algorithm.adapts)
  g, metrics = algorithm.task_gradient(loss_flat, theta_flat, task, **options)
  return unravel(g), metrics


def make_eval_step(
  loss_fn: Callable,
  algorithm: algorithms.MetaAlgorithm,
  *,
  has_aux: bool = False,
  flatten: bool = True,
  stochastic: bool = False,
  task_chunk: int | None = None,
):
  """Builds ``evaluate(params, tasks) -> metrics`` for held-out tasks.

  Each task is adapted on its support set with the algorithm's own adaptation
  (proximal for iMAML, plain for the baselines) and judged on its query set.
  Metrics have a leading task axis: ``loss_before``/``loss_after`` and each
  aux entry as ``<name>_before``/``<name>_after``. Pure; the caller jits it.
  ``flatten`` adapts on the raveled parameter vector and ``task_chunk``
  maps over the tasks in vmapped chunks, as in :func:`make_meta_step` (the
  same metrics; one task at a time holds one task's activations in memory
  instead of the batch's). With ``stochastic`` the loss is
  ``loss_fn(params, batch, key)`` and the call ``evaluate(params, tasks,
  key)``, with per-task keys as in :func:`make_meta_step`, whose checks of
  ``loss_fn``, ``algorithm`` and ``has_aux`` it shares. ``evaluate`` checks
  ``params`` as ``init`` does (a pytree of floating arrays: no running
  averages, PRNG keys or non-array leaves) and that ``tasks`` is an
  :class:`~imaml_jax.Task`.
  """
  check_step_arguments(loss_fn, algorithm)
  if task_chunk is not None:
    validation.check_positive_int("task_chunk", task_chunk)
  loss = with_aux(loss_fn, has_aux)
  if stochastic:
    loss = with_key_in_batch(loss)

  def one(params, task):
    if flatten:
      theta_flat, loss_flat, unravel = flat_loss(loss, params, algorithm.adapts)
      phi = unravel(algorithm.adapt(loss_flat, theta_flat, task.support))
    else:
      phi = algorithm.adapt(loss, params, task.support)
    metrics = algorithms.query_metrics(*loss(phi, task.query), "after")
    metrics.update(
      algorithms.query_metrics(*loss(params, task.query), "before")
    )
    return metrics

  def evaluate(params: PyTree, tasks: Task, key: jax.Array | None = None):
    if not isinstance(tasks, Task):
      raise TypeError(f"tasks must be an im.Task, got {type(tasks).__name__}.")
    validation.check_floating_params(params)
    n_tasks = validation.check_task_batch(tasks)
    if stochastic:
      tasks = keyed_tasks(tasks, key, n_tasks)
    elif key is not None:
      raise TypeError(
        "evaluate got a key, but the loss is deterministic: "
        "build it with make_eval_step(..., stochastic=True)."
      )
    return map_over_tasks(
      lambda task: one(params, task), tasks, task_chunk, n_tasks
    )

  return evaluate
