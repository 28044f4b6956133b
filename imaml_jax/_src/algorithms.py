r"""Meta-gradient algorithms: iMAML and the paper's baselines, one interface.

A :class:`MetaAlgorithm` turns a loss, meta-parameters ``theta`` and one task
into that task's meta-gradient ``g_i`` (a pytree shaped like ``theta``) and a
dict of scalar metrics. :func:`imaml_jax.make_meta_step` vmaps it over a batch
of tasks and averages. All losses here are normalised to return
``(scalar, aux_dict)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from imaml_jax._src import adapt as adapt_lib
from imaml_jax._src import hvp as hvp_lib
from imaml_jax._src import inner as inner_lib
from imaml_jax._src import linear_solve
from imaml_jax._src import tree_util as tu
from imaml_jax._src.types import PyTree
from imaml_jax._src.types import Task

AuxLoss = Callable[[PyTree, PyTree], tuple[jax.Array, dict]]


class MetaAlgorithm(NamedTuple):
  """A meta-learning algorithm.

  Attributes:
    task_gradient: ``(loss, params, task) -> (g, metrics)`` for one task, where
      ``loss(params, batch) -> (scalar, aux_dict)``.
    adapt: ``(loss, params, support) -> phi``, the task adaptation the
      algorithm uses, for evaluation on held-out tasks.
    name: human-readable description.
    adapts: ``None`` (the inner loop moves every parameter) or the predicate
      on a parameter's key path that selects the parameters the inner loop
      moves. :func:`imaml_jax.make_meta_step` reads it to split the
      parameters before it ravels them (``flatten=True``), so that the
      predicate sees the real key paths; see :class:`AdaptedSplit`.
    reports_residual: whether ``task_gradient`` takes the keyword
      ``report_residual`` (a bool, or a boolean scalar array traced inside
      ``jit``) that says whether to measure its linear solve's residual
      (:func:`imaml`); :func:`imaml_jax.make_meta_step` passes it.
    support_minibatches: whether ``task_gradient`` reads each leaf of a
      task's support set as a stack of mini-batches
      (``reptile(minibatches=True)``); such an algorithm cannot take a
      stochastic loss's key, which has no mini-batch axis.
  """

  task_gradient: Callable[..., tuple[PyTree, dict]]
  adapt: Callable[[AuxLoss, PyTree, PyTree], PyTree]
  name: str
  adapts: Callable[[tuple], bool] | None = None
  reports_residual: bool = False
  support_minibatches: bool = False


class AdaptedSplit(NamedTuple):
  """Parameters already split into the part the inner loop moves and the rest.

  A predicate on key paths (``adapts``) cannot be applied to parameters that
  have been raveled into one vector: the vector has a single key path, ``()``.
  :func:`imaml_jax.make_meta_step` with ``flatten=True`` therefore splits the
  parameters with the predicate first, ravels each part on its own, and hands
  the algorithm an ``AdaptedSplit`` of the two vectors; the algorithm's
  adaptation moves ``adapted`` and holds ``fixed``, exactly as it would on the
  unraveled parameters.

  Attributes:
    adapted: the parameters the inner loop moves.
    fixed: the parameters it leaves at their meta-learned values.
  """

  adapted: PyTree
  fixed: PyTree


def check_aux(aux) -> None:
  """Raises unless ``aux`` is a dict of scalars (metrics) with free names.

  Raises:
    TypeError: ``aux`` is not a dict, or an entry is not a scalar.
    ValueError: an entry is named ``"loss"``: reported as ``loss_after``
      and ``loss_before``, it would replace the query loss's own metrics.
  """
  if not isinstance(aux, dict):
    raise TypeError(
      "a loss with has_aux=True returns (loss, aux) with aux a "
      f"dict of scalar metrics; got aux of type "
      f"{type(aux).__name__}."
    )
  for name, value in aux.items():
    if getattr(value, "shape", None) != () and not isinstance(
      value, (int, float)
    ):
      raise TypeError(
        f"aux[{name!r}] must be a scalar metric (it is averaged over "
        f"tasks and logged); got {type(value).__name__} of shape "
        f"{getattr(value, 'shape', None)}. Return arrays and other state "
        "from the loss some other way, or reduce them to a scalar."
      )
  if "loss" in aux:
    raise ValueError(
      "aux['loss'] would be reported as loss_after and loss_before, the "
      "metrics of the loss itself, and replace them; give the entry "
      "another name (e.g. 'data_loss')."
    )


def query_metrics(loss_value, aux: dict, suffix: str) -> dict:
  """``{"loss_<suffix>": loss, "<key>_<suffix>": aux[key], ...}``.

  Raises:
    TypeError: ``aux`` is not a dict of scalars (checked while tracing, so
      before any expensive work), naming the entry.
    ValueError: ``aux`` has an entry named ``"loss"`` (see
      :func:`check_aux`).
  """
  check_aux(aux)
  out = {f"loss_{suffix}": loss_value}
  out.update({f"{k}_{suffix}": v for k, v in aux.items()})
  return out


Adapts = Callable[[tuple], bool]


def _plain_adapt(inner: inner_lib.InnerSolver, adapts: Adapts | None = None):
  """Adaptation by running ``inner`` on the support loss alone.

  With ``adapts``, a predicate on a parameter's key path (e.g. ``("norm0",
  "bias")``), ``inner`` moves only the parameters it accepts; the others enter
  the support loss at their meta-learned values (and, differentiated through,
  still receive the gradient of everything that depends on them).
  """

  def adapt(
    loss: AuxLoss, params: PyTree, support: PyTree, *, remat: bool = False
  ):
    if adapts is None:
      return inner.run(lambda p: loss(p, support)[0], params, remat=remat)
    moving, fixed, join = split_by_adapts(params, adapts)
    moved = inner.run(
      lambda p: loss(join(p, fixed), support)[0], moving, remat=remat
    )
    return join(moved, fixed)

  return adapt


def split_by_adapts(
  params: PyTree, adapts: Adapts
) -> tuple[PyTree, PyTree, Callable[[PyTree, PyTree], PyTree]]:
  """``(moving, fixed, join)``: the parameters ``adapts`` selects, the rest.

  ``join(moving, fixed)`` rebuilds parameters of the caller's layout. An
  :class:`AdaptedSplit` (parameters that :func:`imaml_jax.make_meta_step`
  split before raveling) is already split; any other pytree is partitioned
  with the predicate on its leaves' key paths.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"conv0": jnp.ones(2), "norm0": jnp.zeros(1)}
    >>> moving, fixed, join = split_by_adapts(params, adapt_all_but_norm)
    >>> moving["norm0"], fixed["conv0"], sorted(join(moving, fixed))
    (None, None, ['conv0', 'norm0'])
  """
  if isinstance(params, AdaptedSplit):
    return params.adapted, params.fixed, AdaptedSplit
  moving, fixed = partition_by_adapts(params, adapts)
  return moving, fixed, tu.combine


def partition_by_adapts(params: PyTree, adapts: Adapts) -> tuple:
  """``(moving, fixed)``: :func:`tree_util.partition` by ``adapts``.

  Raises:
    ValueError: ``adapts`` accepts none of the parameters. The inner loop
      would then move nothing, and every task's "adapted" parameters would
      be the meta-parameters. The message shows the key paths the
      predicate was given (they differ between frameworks: an
      ``nnx.State`` ends each path with ``"value"``).
  """
  moving, fixed = tu.partition(params, adapts)
  if not jax.tree.leaves(moving):
    paths = [
      tu.key_path(path)
      for path, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    shown = ", ".join(map(repr, paths[:3])) + (", ..." if paths[3:] else "")
    raise ValueError(
      f"adapts accepts none of the {len(paths)} parameters, so the inner "
      "loop would adapt nothing; it is called with each parameter's key "
      f"path, here {shown}."
    )
  return moving, fixed


def _check_inner(inner) -> None:
  if not isinstance(inner, inner_lib.InnerSolver):
    raise TypeError(
      "inner must be an inner algorithm such as im.gd(16, 0.1), "
      f"got {type(inner).__name__}."
    )


def _check_adapts(adapts: Adapts | None) -> None:
  if adapts is not None and not callable(adapts):
    raise TypeError(
      "adapts must be None or a predicate on a parameter's key "
      f"path (a tuple of keys); got {type(adapts).__name__}."
    )


def _adapts_name(adapts: Adapts | None) -> str:
  if adapts is None:
    return ""
  return f", adapts={getattr(adapts, '__name__', 'custom')}"


def adapt_all_but_norm(path: tuple) -> bool:
  """``adapts`` predicate: every parameter but the batch norms' (MAML's code).

  MAML's reference code adapts only the weights and biases of its
  convolutions and output layer (the ``weights`` dictionary of ``maml.py``);
  the batch-norm offsets are variables of ``tf.contrib.layers.batch_norm``,
  learned by the meta-update alone. This accepts every path whose first key
  does not start with ``"norm"`` (the batch norms of
  :class:`imaml_jax.models.ConvNet` are ``norm0`` ... ``norm3``).

  Example:
    >>> adapt_all_but_norm(("conv0", "kernel")), adapt_all_but_norm(("norm0", "bias"))
    (True, False)
  """
  return not (path and str(path[0]).startswith("norm"))


def imaml(
  lam,
  inner: inner_lib.InnerSolver,
  solver: linear_solve.LinearSolver | None = None,
  *,
  linearize: bool = False,
  damping=0.0,
  lam_damping=0.0,
) -> MetaAlgorithm:
  r"""Implicit MAML (Rajeswaran et al., 2019, Algorithm 2).

  For each task: ``phi = inner`` applied to the proximal objective
  ``L_support(phi) + lam/2 ||phi - theta||^2`` from ``theta`` (not
  differentiated); ``v = grad L_query(phi)``; the meta-gradient is the solution
  of ``(I + H/lam) g = v`` with ``H = nabla^2 L_support(phi)``, found by
  ``solver`` with Hessian-vector products (forward-over-reverse). The metrics
  include ``residual``, the solve's relative residual ``||(I + H/lam) g - v||
  / ||v||`` (NaN where it was not measured: ``task_gradient(...,
  report_residual=False)`` or a flag that is false, which saves the
  product that measures it). This is the same gradient that ``jax.grad`` of
  ``L_query(im.adapt(...))`` gives, but computed directly so the residual can
  be reported. With a solver that reports them (``im.cg(...,
  stop_at_negative_curvature=True)``) the metrics add ``negative_curvature``
  (1 where the solve stopped at a direction of non-positive curvature of the
  system, so their mean over a task batch is the fraction of tasks whose
  system is provably indefinite) and ``solve_iterations`` (the CG updates
  applied).

  With ``damping`` ``r`` or ``lam_damping`` ``d`` the system is the damped
  one of the authors' public code, ``((1 + r) I + H/(lam + d)) g = v`` (their
  ``--cg_damping`` 1 and ``lam_damping`` 10 in
  ``implicit_maml/learner_model.py``), and ``residual`` is measured against
  it; see :func:`imaml_jax.adapt` for what that gradient is. Their inner loop
  is ``inner=im.gd_then_pull_back(16, 0.1)``.

  Args:
    lam: proximal strength ``lambda > 0``. Required: it sets how far ``phi``
      may move from ``theta``, and its scale depends on the loss (the paper
      uses 2.0 on Omniglot; a regression loss of another scale needs another).
    inner: inner algorithm, e.g. ``im.gd(16, 0.1)`` (the paper's 5-way
      Omniglot setting). Required, as no step size suits every loss.
    solver: linear solver (default ``cg(5)``, the paper's 5 CG steps,
      started from ``b``: 6 Hessian-vector products).
    linearize: linearise the support gradient once at ``phi`` and reuse it for
      every product of the solve.
    damping: ``r >= 0`` of the damped system; 0 (default) is the paper's.
    lam_damping: ``d >= 0`` of the damped system; 0 (default) is the paper's.

  Returns:
    A :class:`MetaAlgorithm`.
  """
  solver = linear_solve.cg(5) if solver is None else solver
  adapt_lib.check_hyperparameters(inner, solver, lam)
  hvp_lib.check_damping(damping, lam_damping)

  def adapt(loss: AuxLoss, params: PyTree, support: PyTree):
    objective = inner_lib.proximal_objective(
      lambda p, b: loss(p, b)[0], params, support, lam
    )
    return inner.run(objective, params)

  def task_gradient(
    loss: AuxLoss, params: PyTree, task: Task, *, report_residual=None
  ):
    phi = jax.lax.stop_gradient(adapt(loss, params, task.support))
    (q_loss, q_aux), q_grad = jax.value_and_grad(loss, has_aux=True)(
      phi, task.query
    )
    matvec = hvp_lib.proximal_system_operator(
      lambda p: loss(p, task.support)[0],
      phi,
      lam,
      linearize=linearize,
      damping=damping,
      lam_damping=lam_damping,
    )
    if report_residual is None:  # The solver's own default.
      g, info = solver.solve(matvec, q_grad)
    else:
      g, info = solver.solve(matvec, q_grad, report_residual=report_residual)
    metrics = query_metrics(q_loss, q_aux, "after")
    metrics["residual"] = info.residual
    if info.negative_curvature is not None:
      metrics["negative_curvature"] = info.negative_curvature.astype(
        info.residual.dtype
      )
    if info.iterations is not None:
      metrics["solve_iterations"] = info.iterations.astype(info.residual.dtype)
    return g, metrics

  damped = (
    ""
    if hvp_lib.is_undamped(damping, lam_damping)
    else (f", damping={damping}, lam_damping={lam_damping}")
  )
  return MetaAlgorithm(
    task_gradient=task_gradient,
    adapt=adapt,
    name=f"imaml(lam={lam}, {inner.name}, {solver.name}{damped})",
    reports_residual=True,
  )


def maml(
  inner: inner_lib.InnerSolver,
  *,
  remat: bool = False,
  adapts: Adapts | None = None,
) -> MetaAlgorithm:
  r"""Second-order MAML (Finn et al., 2017).

  ``phi = inner`` run on ``L_support`` alone (no proximal term) from
  ``theta``; the meta-gradient is ``d L_query(phi(theta)) / d theta`` obtained
  by reverse-mode differentiation through every inner step (``lax.scan``), so
  memory grows linearly with the number of inner steps. ``remat=True`` wraps
  each inner step in ``jax.checkpoint``: only the per-step iterates are kept
  and the rest is recomputed in the backward pass, which lowers the slope of
  that growth at roughly one extra forward pass of cost.

  ``adapts``, a predicate on a parameter's key path, restricts the inner
  loop to the parameters it accepts (:func:`adapt_all_but_norm`: MAML's
  reference code, whose inner step leaves the batch-norm offsets alone); the
  others are meta-learned only, and their meta-gradient still includes how
  they shape the inner steps of the adapted ones. A predicate that accepts
  none of the parameters is refused (``ValueError``, when the step is
  traced): the inner loop would adapt nothing.
  """
  _check_inner(inner)
  _check_adapts(adapts)
  plain = _plain_adapt(inner, adapts)

  def task_gradient(loss: AuxLoss, params: PyTree, task: Task):
    def adapted_query_loss(p):
      return loss(plain(loss, p, task.support, remat=remat), task.query)

    (q_loss, q_aux), g = jax.value_and_grad(adapted_query_loss, has_aux=True)(
      params
    )
    return g, query_metrics(q_loss, q_aux, "after")

  name = f"maml({inner.name}, remat={remat}{_adapts_name(adapts)})"
  return MetaAlgorithm(
    task_gradient=task_gradient, adapt=plain, name=name, adapts=adapts
  )


def fomaml(
  inner: inner_lib.InnerSolver, *, adapts: Adapts | None = None
) -> MetaAlgorithm:
  r"""First-order MAML (Finn et al., 2017, Section 5.2).

  ``phi = inner`` run on ``L_support`` alone from ``theta``; the
  meta-gradient is ``grad L_query(phi)``, i.e. MAML's gradient with the
  Jacobian ``d phi / d theta`` replaced by the identity. ``adapts`` as in
  :func:`maml`: a parameter the inner loop leaves alone gets the query
  gradient at the adapted parameters.
  """
  _check_inner(inner)
  _check_adapts(adapts)
  plain = _plain_adapt(inner, adapts)

  def task_gradient(loss: AuxLoss, params: PyTree, task: Task):
    phi = jax.lax.stop_gradient(plain(loss, params, task.support))
    (q_loss, q_aux), g = jax.value_and_grad(loss, has_aux=True)(phi, task.query)
    return g, query_metrics(q_loss, q_aux, "after")

  return MetaAlgorithm(
    task_gradient=task_gradient,
    adapt=plain,
    name=f"fomaml({inner.name}{_adapts_name(adapts)})",
    adapts=adapts,
  )


def reptile(
  inner: inner_lib.InnerSolver, *, minibatches: bool = False
) -> MetaAlgorithm:
  r"""Reptile (Nichol, Achiam and Schulman, 2018), batched version.

  ``phi = inner`` run on ``L_support`` alone from ``theta``; the per-task
  "meta-gradient" is ``theta - phi``. Averaged over the batch and applied with
  ``optax.sgd(epsilon)`` this is Reptile's update
  ``theta <- theta + epsilon * mean_i (phi_i - theta)``; with another optax
  optimizer the same direction is rescaled by it (e.g. Adam). The query set is
  used only for metrics.

  With ``minibatches=True`` every leaf of a training task's ``support``
  carries a leading axis of mini-batches and inner step ``t`` runs on
  mini-batch ``t`` (cycling), as Reptile trains (its ``--train-shots`` images
  per class, ``--inner-batch`` a step; build them with
  :func:`imaml_jax.data.reptile_minibatches`); ``inner`` must then be
  :func:`imaml_jax.gd` without backtracking or :func:`imaml_jax.adam`
  (see :class:`imaml_jax.MinibatchObjective`). ``adapt``, used on
  evaluation tasks, still adapts on an ordinary support set in one batch.

  Example:
    >>> import imaml_jax as im
    >>> im.reptile(im.adam(5, 1e-3, b1=0.0), minibatches=True).name
    'reptile(adam(steps=5, lr=0.001, b1=0.0, b2=0.999), minibatches)'
  """
  _check_inner(inner)
  plain = _plain_adapt(inner)

  def adapt_on_minibatches(loss: AuxLoss, params: PyTree, batches: PyTree):
    objective = inner_lib.MinibatchObjective(
      lambda p, b: loss(p, b)[0], batches
    )
    return inner.run(objective, params)

  train_adapt = adapt_on_minibatches if minibatches else plain

  def task_gradient(loss: AuxLoss, params: PyTree, task: Task):
    phi = jax.lax.stop_gradient(train_adapt(loss, params, task.support))
    q_loss, q_aux = loss(phi, task.query)
    return tu.tree_sub(params, phi), query_metrics(q_loss, q_aux, "after")

  suffix = ", minibatches" if minibatches else ""
  return MetaAlgorithm(
    task_gradient=task_gradient,
    adapt=plain,
    name=f"reptile({inner.name}{suffix})",
    support_minibatches=minibatches,
  )
