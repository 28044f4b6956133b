r"""Proximal task adaptation with implicit differentiation (the paper's Lemma 1).

:func:`adapt` returns ``phi = Alg(theta)``, an approximate minimiser of

.. math:: G(\phi; \theta) = L(\phi, \mathcal{D}) + \frac{\lambda}{2}\|\phi-\theta\|^2 .

Its reverse-mode derivative is not obtained by differentiating through the
inner steps. At a minimiser the optimality condition
``F = grad L(phi) + lam (phi - theta) = 0`` holds; the implicit function
theorem gives ``d phi / d theta = (I + H/lam)^{-1}``, with ``H`` the Hessian of
``L`` at ``phi``. The backward pass therefore solves one symmetric linear
system ``(I + H/lam) x = phi_bar`` with Hessian-vector products, and memory
does not depend on the number of inner steps. Optionally that system is
damped as in the authors' public code (``damping``, ``lam_damping``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from imaml_jax._src import hvp as hvp_lib
from imaml_jax._src import inner as inner_lib
from imaml_jax._src import linear_solve
from imaml_jax._src import tree_util as tu
from imaml_jax._src import validation
from imaml_jax._src.types import PyTree


def with_aux(loss_fn: Callable, has_aux: bool) -> Callable:
  """Normalises a loss to return ``(scalar, aux_dict)``.

  Each call checks, while tracing, that ``loss_fn`` returns a pair with
  ``has_aux=True`` and not a tuple without
  (:func:`~imaml_jax._src.validation.check_loss_output`); the check is pure
  Python and adds nothing to the compiled program. Extra arguments (a
  stochastic loss's key) pass through.

  Raises:
    TypeError: ``has_aux`` is not a bool (at once), or a call's result does
      not match it (while tracing).
  """
  has_aux = validation.check_bool("has_aux", has_aux)

  def loss(params, *batch):
    out = validation.check_loss_output(loss_fn(params, *batch), has_aux)
    return out if has_aux else (out, {})

  return loss


def scalar_loss(loss_fn: Callable, has_aux: bool) -> Callable:
  """``(params, batch) -> scalar``: the loss of :func:`with_aux`, checked
  the same way."""
  normalised = with_aux(loss_fn, has_aux)
  return lambda params, batch: normalised(params, batch)[0]


def check_hyperparameters(inner, solver, lam) -> None:
  """Type checks shared by :func:`adapt` and the iMAML algorithm."""
  if not isinstance(inner, inner_lib.InnerSolver):
    raise TypeError(
      "inner must be an inner algorithm such as im.gd(16, 0.1), "
      f"got {type(inner).__name__}."
    )
  if not isinstance(solver, linear_solve.LinearSolver):
    raise TypeError(
      "solver must be a linear solver such as im.cg(5), "
      f"got {type(solver).__name__}."
    )
  validation.check_positive_scalar("lam", lam)


def adapt(
  loss_fn: Callable,
  params: PyTree,
  support: PyTree,
  *,
  lam,
  inner: inner_lib.InnerSolver,
  solver: linear_solve.LinearSolver | None = None,
  has_aux: bool = False,
  linearize: bool = False,
  damping=0.0,
  lam_damping=0.0,
) -> PyTree:
  r"""Adapts ``params`` to a task by proximal regularisation, implicitly differentiable.

  Runs ``inner`` from ``params`` on the proximal objective
  ``loss_fn(phi, support) + lam/2 ||phi - params||^2``. Under ``jax.grad``,
  ``jax.vjp`` and friends the cotangent ``phi_bar`` is pulled back by solving

  .. math:: (I + H/\lambda)\, x = \bar\phi , \qquad H = \nabla^2_\phi L(\phi, \mathcal{D}),

  with ``solver`` (Hessian-vector products as ``jax.jvp`` over ``jax.grad``),
  giving ``params_bar = x``. The cotangents of ``support`` (its floating
  leaves) and ``lam`` follow from the same solve:
  ``support_bar = -(1/lam) (d_s grad_phi L)^T x`` and
  ``lam_bar = -(1/lam) <x, phi - params>``. These formulas are exact at the
  proximal minimiser; run ``inner`` long enough for the gradient you need.

  With ``damping`` ``r`` or ``lam_damping`` ``d`` the backward pass solves
  the damped system of the authors' public code instead (their CG operator,
  ``matrix_evaluator`` in ``implicit_maml/learner_model.py``, with ``r = 1``
  and ``d = 10``; see :func:`imaml_jax.proximal_system_operator`):

  .. math:: \Big((1 + r) I + \frac{H}{\lambda + d}\Big)\, x = \bar\phi ,

  and ``params_bar``, ``support_bar`` and ``lam_bar`` are the formulas above
  applied to this ``x``. The result is then no longer the implicit gradient
  of the proximal minimiser but the authors' variant of it: ``params_bar`` is
  ``1/(1 + r)`` times the exact pull-back for the stronger proximal strength
  ``lam' = (1 + r)(lam + d)`` (24 at ``lam = 2``), taken at the ``phi`` found
  with ``lam``; ``support_bar`` and ``lam_bar`` are the same expressions in
  the damped ``x`` (still divided by ``lam``), not derivatives of any
  objective. The forward pass is unchanged. With ``r = d = 0`` (the
  defaults) the computation is exactly the undamped one, bit for bit.

  Composes with ``jax.jit``, ``jax.vmap`` and ``jax.grad``. Forward-mode
  differentiation (``jax.jvp``) of ``adapt`` is not supported.

  ``loss_fn`` may close over values that an outer transformation traces: data
  mapped by an outer ``jax.vmap``, a hyperparameter that an outer
  ``jax.grad`` differentiates (a weight-decay coefficient ``c``), anything
  under ``jax.jit``. ``adapt`` traces ``loss_fn`` once more to find them
  (much as :func:`jax.closure_convert` does) and passes them in beside
  ``support``, so they are differentiated like support's floating leaves:
  ``c_bar = -(1/lam) (d_c grad_phi L)^T x``, exact at the proximal minimiser.
  The extra trace costs tracing time only. Where such values are found, the
  backward pass computes their cotangents in the same vector-Jacobian
  product as ``support_bar``, just as if they had been passed in
  ``support`` (also where nothing differentiates them; under ``jax.jit``
  unused cotangents are dead code). Where ``loss_fn`` closes over no traced
  value, nothing is hoisted and the computation is unchanged.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux=True``), twice differentiable in ``params``. It may close
      over traced values, which are differentiated like ``support``.
    params: meta-parameters ``theta``, any pytree of floating arrays.
    support: the task's support data, any pytree.
    lam: proximal strength ``lambda > 0`` (the paper uses 2.0 on Omniglot).
    inner: inner algorithm, e.g. ``im.gd(steps=16, lr=0.1)``, or the
      authors' loop ``im.gd_then_pull_back(16, 0.1)`` (which does not
      minimise the proximal objective; see there).
    solver: linear solver for the backward pass, default ``im.cg(5)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    linearize: linearise the gradient once at ``phi`` and reuse it for every
      Hessian-vector product of the backward solve.
    damping: ``r >= 0`` of the damped backward system (the authors'
      ``--cg_damping``, 1.0); 0, the default, is the paper's system.
    lam_damping: ``d >= 0`` of the damped backward system (10.0 in the
      authors' code); 0, the default, is the paper's system.

  Returns:
    The adapted parameters ``phi``, shaped like ``params``.

  Raises:
    ValueError: ``lam <= 0`` or not finite, or a negative ``damping`` or
      ``lam_damping``.
    TypeError: ``has_aux`` is not a bool, or the loss's output does not
      match it (``(loss, aux)`` with ``has_aux=True``, a scalar without).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import imaml_jax as im
    >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2) / 2
    >>> x, y = jnp.ones((4, 2)), jnp.ones(4)
    >>> meta_loss = lambda w: loss(im.adapt(loss, w, (x, y), lam=2.0,
    ...                                     inner=im.gd(50, 0.3)), (x, y))
    >>> jax.grad(meta_loss)(jnp.zeros(2)).shape
    (2,)
    >>> # The authors' recipe: their inner loop and damped system.
    >>> authors = lambda w: loss(im.adapt(
    ...     loss, w, (x, y), lam=2.0, inner=im.gd_then_pull_back(16, 0.1),
    ...     damping=1.0, lam_damping=10.0), (x, y))
    >>> jax.grad(authors)(jnp.zeros(2)).shape
    (2,)
    >>> # A closed-over hyperparameter is differentiated like the support.
    >>> def tuned(c):
    ...   decayed = lambda w, b: loss(w, b) + c * jnp.sum(w**2)
    ...   return loss(im.adapt(decayed, jnp.zeros(2), (x, y), lam=2.0,
    ...                        inner=im.gd(50, 0.3)), (x, y))
    >>> jax.grad(tuned)(0.1).shape
    ()
  """
  solver = linear_solve.cg(5) if solver is None else solver
  check_hyperparameters(inner, solver, lam)
  hvp_lib.check_damping(damping, lam_damping)
  validation.check_floating_params(params)
  loss = scalar_loss(loss_fn, has_aux)
  dtype = tu._result_dtype(params)
  lam = jnp.asarray(lam, dtype)
  backward = dict(
    solver=solver,
    linearize=linearize,
    damping=damping,
    lam_damping=lam_damping,
  )

  converted, traced = _hoist_traced_constants(loss, params, support)
  if not traced:  # Nothing to hoist: the computation is the plain one.
    return _implicit_adapt(loss, inner, params, support, lam, **backward)
  # The traced values ride along with the support, and are differentiated
  # like its floating leaves.
  return _implicit_adapt(
    lambda p, sc: converted(p, sc[0], sc[1]),
    inner,
    params,
    (support, traced),
    lam,
    **backward,
  )


def _hoist_traced_constants(loss, params, support):
  """Closure-converts ``loss``, hoisting every traced value it closes over.

  ``loss`` is traced once (to a jaxpr, with ``params`` and ``support`` as
  its arguments). The tracers of outer transformations that it reads
  (``jax.grad``, ``jax.vmap``, ``jax.jit`` and so on) are returned apart, and
  ``converted(params, support, traced)`` evaluates the jaxpr with them. This
  is :func:`jax.closure_convert`, except that the latter hoists only values
  that may carry a tangent, and keeps in the closure the tracers of
  ``jax.vmap`` over concrete data, which a ``jax.custom_vjp`` may not close
  over either (its backward pass runs after the ``vmap`` has returned).

  Returns:
    ``(converted, traced)``, with ``traced`` the list of hoisted tracers;
    ``(None, [])`` where ``loss`` closes over none (then ``loss`` is to be
    used as it is).
  """
  closed, out_shape = jax.make_jaxpr(loss, return_shape=True)(params, support)
  is_traced = [isinstance(c, jax.core.Tracer) for c in closed.consts]
  if not any(is_traced):
    return None, []
  traced = [c for c, t in zip(closed.consts, is_traced) if t]
  # Only the concrete constants stay in the closure.
  kept = [None if t else c for c, t in zip(closed.consts, is_traced)]
  jaxpr, out_tree = closed.jaxpr, jax.tree.structure(out_shape)

  def converted(params, support, traced):
    values = iter(traced)
    consts = [next(values) if t else c for c, t in zip(kept, is_traced)]
    args = jax.tree.leaves((params, support))
    out = jax.core.eval_jaxpr(jaxpr, consts, *args)
    return jax.tree.unflatten(out_tree, out)

  return converted, traced


def _implicit_adapt(
  loss, inner, params, support, lam, *, solver, linearize, damping, lam_damping
):
  """The ``jax.custom_vjp`` behind :func:`adapt`; ``loss`` closes over no
  tracer."""

  def solve_inner(params, support, lam):
    objective = inner_lib.proximal_objective(loss, params, support, lam)
    phi = inner.run(objective, params)
    return _batched_like(phi, (params, support, lam))

  @jax.custom_vjp
  def _adapt(params, support, lam):
    return solve_inner(params, support, lam)

  def fwd(params, support, lam):
    phi = solve_inner(params, support, lam)
    return phi, (phi, params, support, lam)

  def bwd(residuals, phi_bar):
    phi, params, support, lam = residuals
    matvec = hvp_lib.proximal_system_operator(
      lambda p: loss(p, support),
      phi,
      lam,
      linearize=linearize,
      damping=damping,
      lam_damping=lam_damping,
    )
    x, _ = solver.solve(matvec, phi_bar)
    support_bar = _support_cotangent(loss, phi, support, x, lam)
    lam_bar = -tu.tree_vdot(x, tu.tree_sub(phi, params)) / lam
    return x, support_bar, lam_bar.astype(lam.dtype)

  _adapt.defvjp(fwd, bwd)
  return _adapt(params, support, lam)


def _batched_like(phi: PyTree, inputs: PyTree) -> PyTree:
  """``phi`` unchanged, but mapped by an outer ``jax.vmap`` wherever any of
  ``inputs`` is.

  A leaf of ``phi`` that depends on no mapped input (a parameter the support
  loss does not read, or reads apart from the data) leaves the forward pass
  unmapped, while the backward pass is mapped through its residuals. Under
  ``jax.grad`` of a ``jax.vmap`` JAX then hands that pass the cotangent of
  such a leaf already summed over the mapped axis, and sums the pass's
  results over that axis once more: the leaf's gradient came out multiplied
  by the batch size. Each leaf goes through ``jnp.where(p, leaf, leaf)``
  with ``p`` a flag read from one element of every input, which is mapped
  wherever an input is and which XLA folds away.
  """
  flags = []
  for leaf in jax.tree.leaves(inputs):
    if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if jnp.size(leaf):
      first = jnp.ravel(leaf)[0]
      flags.append(first != first)
  if not flags:
    return phi
  pred = functools.reduce(jnp.logical_or, flags)
  return jax.tree.map(lambda leaf: jnp.where(pred, leaf, leaf), phi)


def _is_float(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _support_cotangent(loss, phi, support, x, lam):
  """``-(1/lam) (d_s grad_phi L(phi, s))^T x`` for the floating leaves of ``s``.

  Integer leaves (labels) get ``float0`` zeros, as JAX requires; each
  floating leaf's cotangent has that leaf's dtype.
  """
  leaves, treedef = jax.tree.flatten(support)
  float_idx = [i for i, leaf in enumerate(leaves) if _is_float(leaf)]

  def grad_wrt_floats(float_leaves):
    full = list(leaves)
    for i, leaf in zip(float_idx, float_leaves):
      full[i] = leaf
    return jax.grad(loss)(phi, jax.tree.unflatten(treedef, full))

  cotangents = [np.zeros(jnp.shape(leaf), jax.dtypes.float0) for leaf in leaves]
  if float_idx:
    _, pullback = jax.vjp(grad_wrt_floats, [leaves[i] for i in float_idx])
    (float_bars,) = pullback(x)
    for i, bar in zip(float_idx, float_bars):
      # In the leaf's own dtype: lam has the parameters' dtype, which may
      # be wider (float32 parameters, bfloat16 data).
      cotangents[i] = (-bar / lam).astype(jnp.result_type(leaves[i]))
  return jax.tree.unflatten(treedef, cotangents)
