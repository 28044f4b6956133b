r"""Solvers for the symmetric linear system of the implicit meta-gradient.

Every solver has one call shape::

    x, info = solver.solve(matvec, b)

where ``matvec`` applies a symmetric positive-definite operator ``A`` (here
``I + H/lam``) to a pytree and ``b`` is a pytree. ``info`` is a
:class:`SolveInfo` with the relative residual ``||A x - b|| / ||b||``
(measured with one extra product, or CG's own recurrence residual where a
solver tracks it), so an unconverged solve is visible instead of silent.

:func:`cg` composes ``jax.scipy.sparse.linalg.cg``; only its
``stop_at_negative_curvature=True`` variant runs a CG loop of its own,
because ``jax.scipy`` has no way to stop at a direction of non-positive
curvature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from imaml_jax._src import tree_util as tu
from imaml_jax._src import validation
from imaml_jax._src.types import PyTree

MatVec = Callable[[PyTree], PyTree]


class SolveInfo(NamedTuple):
  """Statistics of one linear solve.

  Attributes:
    residual: relative residual ``||A x - b|| / ||b||`` (0 when ``b = 0``),
      or NaN when the solver was built with ``report_residual=False``.
    negative_curvature: for solvers that look for it (``cg(...,
      stop_at_negative_curvature=True)``), a boolean scalar: ``True`` when the
      solve stopped at a direction ``p`` with ``p^T A p <= 0``, which proves
      ``A`` not positive definite (up to the rounding of the products: a
      positive curvature below their rounding error, e.g. once CG has
      converged in float32 on a nearly singular ``A``, can read as
      non-positive). ``None`` for solvers that do not look.
    iterations: for solvers that count them (the same guarded CG), the
      number of updates applied to ``x`` (an int32 scalar, at most
      ``maxiter``; 0 when the first direction already had non-positive
      curvature). ``None`` otherwise.
  """

  residual: jax.Array
  negative_curvature: jax.Array | None = None
  iterations: jax.Array | None = None


class LinearSolver(NamedTuple):
  """A linear solver: ``solve(matvec, b) -> (x, SolveInfo)``.

  The library's solvers also take ``solve(matvec, b, report_residual=r)``,
  which overrides, for one call, whether the residual is measured: ``r``
  a Python bool, or a boolean scalar array (traced inside ``jit``), with
  which the measuring product runs under ``lax.cond`` only where ``r`` is
  true (``SolveInfo.residual`` is NaN elsewhere).
  """

  solve: Callable[[MatVec, PyTree], tuple[PyTree, SolveInfo]]
  name: str


def _relative(norm_sq: jax.Array, b: PyTree) -> jax.Array:
  """``sqrt(norm_sq) / ||b||``, or ``sqrt(norm_sq)`` when ``b = 0``."""
  b_norm = tu.tree_norm(b).astype(norm_sq.dtype)
  norm = jnp.sqrt(norm_sq)
  return jnp.where(b_norm > 0, norm / jnp.where(b_norm > 0, b_norm, 1.0), norm)


def relative_residual(matvec: MatVec, x: PyTree, b: PyTree) -> jax.Array:
  """``||A x - b|| / ||b||``, defined as ``||A x||`` when ``b = 0``."""
  return _relative(tu.tree_sq_norm(tu.tree_sub(matvec(x), b)), b)


def _measured_residual(matvec, x, b, report) -> jax.Array:
  """``||A x - b|| / ||b||`` if ``report`` (a bool or a traced flag), else NaN.

  A Python bool decides when tracing; a traced flag runs the product under
  ``lax.cond``, so it is spent only where the flag is true (an unbatched
  flag stays a branch under ``vmap`` and ``lax.map``).
  """
  nan = jnp.full((), jnp.nan, tu._result_dtype(b))
  if isinstance(report, (bool, np.bool_)):
    return relative_residual(matvec, x, b).astype(nan.dtype) if report else nan
  return jax.lax.cond(
    report,
    lambda: relative_residual(matvec, x, b).astype(nan.dtype),
    lambda: nan,
  )


def _finish(matvec, x, b, report_residual, residual=None, **counts):
  """Returns ``(x, SolveInfo)``, poisoning ``x`` with NaN on non-finite input.

  The residual is measured with one more product where ``report_residual``
  is true (see :func:`_measured_residual`) unless the solver passes its own
  (``residual``). A solver that stops on a NaN residual returns its
  initial guess: without this check a NaN right-hand side would become a
  silently finite, wrong solution. ``counts`` fills the other fields of
  :class:`SolveInfo` (``negative_curvature``, ``iterations``).
  """
  if residual is None:
    residual = _measured_residual(matvec, x, b, report_residual)
  ok = tu.tree_all_finite(b) & tu.tree_all_finite(x)
  if isinstance(report_residual, (bool, np.bool_)):
    if report_residual:
      ok &= jnp.isfinite(residual)
  else:
    ok &= ~jnp.asarray(report_residual, bool) | jnp.isfinite(residual)
  x = jax.tree.map(lambda v: jnp.where(ok, v, jnp.nan), x)
  return x, SolveInfo(residual=residual, **counts)


def _in_common_dtype(solve, matvec: MatVec, b: PyTree) -> PyTree:
  """``solve(matvec, b)`` for a ``b`` whose leaves may differ in dtype.

  ``jax.scipy.sparse.linalg.cg`` scales every leaf by scalars of the
  promoted dtype, so a ``bfloat16`` leaf beside ``float32`` ones comes back
  as ``float32`` and its loop fails. Where the dtypes differ, the solve runs
  in the promoted dtype on every leaf (each product sees its leaves in their
  own dtypes) and the solution is cast back leaf by leaf. One dtype: the
  call is ``solve(matvec, b)`` itself.
  """
  dtypes = {jnp.result_type(leaf) for leaf in jax.tree.leaves(b)}
  if len(dtypes) <= 1:
    return solve(matvec, b)
  common = jnp.result_type(*dtypes)
  up = lambda tree: jax.tree.map(lambda a: a.astype(common), tree)
  down = lambda tree: jax.tree.map(lambda a, ref: a.astype(ref.dtype), tree, b)
  return down(solve(lambda v: up(matvec(down(v))), up(b)))


def _cg_stopping_at_negative_curvature(
  matvec: MatVec, b: PyTree, maxiter: int, tol: float, atol: float
) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
  """CG from ``x0 = 0`` that stops at non-positive curvature.

  Returns ``(x, ||r||^2, negative, updates)`` with ``r`` CG's recurrence
  residual ``r <- r - alpha A p``, equal to ``b - A x`` in exact arithmetic,
  ``negative`` whether it stopped at non-positive curvature and ``updates``
  the number of steps it applied to ``x``. Starting from zero, the first
  residual is ``b`` itself, so ``k`` iterations cost ``k`` products.

  CG stops before a step along ``p`` with ``p^T A p <= 0`` (where the
  quadratic is unbounded and CG's step is meaningless), keeping the iterate
  it has. If the very first direction, ``b``, has non-positive curvature it
  returns ``b``: the answer for ``A = I``, i.e. as if the Hessian term were
  absent, with the residual ``b - A b`` of that answer (the product
  ``A b`` is already computed). On a positive-definite system the iterates
  are plain CG's.
  """
  dtype = tu._result_dtype(b)
  stop_sq = jnp.maximum(tol * tu.tree_norm(b), atol).astype(dtype) ** 2
  rr0 = tu.tree_sq_norm(b).astype(dtype)

  def keep_going(carry):
    k, _, _, _, rr, done = carry
    return (k < maxiter) & ~done & (rr > stop_sq)

  def step(carry):
    k, x, r, p, rr, _ = carry
    ap = matvec(p)
    curvature = tu.tree_vdot(p, ap).astype(dtype)
    negative = ~(curvature > 0)
    alpha = rr / jnp.where(negative, 1, curvature)
    x_next = tu.tree_axpy(alpha, p, x)
    r_next = tu.tree_axpy(-alpha, ap, r)
    rr_next = tu.tree_sq_norm(r_next).astype(dtype)
    p_next = tu.tree_axpy(rr_next / jnp.where(rr > 0, rr, 1), p, r_next)
    # Stopping at the first direction (p = b) returns x = b, whose residual
    # b - A b is r - A p: known without another product.
    first = k == 0
    x_stop = tu.tree_where(first, b, x)
    r_stop = tu.tree_where(first, tu.tree_sub(r, ap), r)
    rr_stop = jnp.where(first, tu.tree_sq_norm(r_stop).astype(dtype), rr)
    return (
      k + 1,
      tu.tree_where(negative, x_stop, x_next),
      tu.tree_where(negative, r_stop, r_next),
      tu.tree_where(negative, p, p_next),
      jnp.where(negative, rr_stop, rr_next),
      negative,
    )

  init = (
    jnp.zeros((), jnp.int32),
    tu.tree_zeros_like(b),
    b,
    b,
    rr0,
    jnp.zeros((), bool),
  )
  k, x, _, _, rr, negative = jax.lax.while_loop(keep_going, step, init)
  return x, rr, negative, k - negative.astype(k.dtype)


def cg(
  maxiter: int = 5,
  tol: float = 1e-10,
  *,
  atol: float = 0.0,
  stop_at_negative_curvature: bool = False,
  report_residual: bool = True,
  exact_residual: bool = False,
  warm_start: bool = True,
) -> LinearSolver:
  r"""Conjugate gradient, for the symmetric system ``(I + H/lam) x = b``.

  Runs CG from ``x_0`` (``b`` by default, see below) for at most ``maxiter``
  iterations, stopping early once ``||r|| <= max(tol ||b||, atol)``:
  ``x_{k+1} = x_k + alpha_k p_k``, ``r_{k+1} = r_k - alpha_k A p_k``,
  ``p_{k+1} = r_{k+1} + beta_k p_k`` with
  ``alpha_k = ||r_k||^2 / p_k^T A p_k``,
  ``beta_k = ||r_{k+1}||^2 / ||r_k||^2`` and ``r_0 = p_0 = b - A x_0``. The
  paper uses 5 iterations from zero. Because ``I + H/lam`` is symmetric,
  plain CG applies; solving the normal equations instead would square the
  condition number and double the work.

  The solve is ``jax.scipy.sparse.linalg.cg(matvec, b, x0=b, tol=tol,
  atol=atol, maxiter=maxiter)``, pytrees included, which reuses JAX's own
  CG (differentiable, through ``lax.custom_linear_solve``). It computes
  ``r_0 = b - A x0`` with one product, so ``k`` iterations cost ``k + 1``.
  Started from zero that first product, ``A 0``, would be wasted; started
  from ``x0 = b`` (``warm_start=True``, the default) it is not: ``b`` is the
  first-order approximation ``(I + H/lam)^{-1} b ~ b`` for small
  ``||H||/lam`` (first-order MAML's gradient), and its product starts the
  Krylov space, so the ``k`` iterations search

  .. math:: x \in b + \mathcal{K}_k(A, b - A b)
     \subset \mathcal{K}_{k+1}(A, b),

  one dimension more than ``k`` iterations from zero at the same cost
  (``k + 1`` products either way on this path). On
  the problems of ``benchmarks/cg_warm_start.py`` the residual after 5
  iterations is smaller than from zero (``benchmarks/results/
  cg_warm_start_cpu.md``). ``warm_start=False`` starts from zero (the
  paper's iterates). The reported residual ``||A x - b|| / ||b||`` costs one more
  product; ``report_residual=False``, or ``solve(..., report_residual=r)``
  with a flag ``r`` per call (:class:`LinearSolver`), measures it only when
  asked: :func:`imaml_jax.make_meta_step` passes such a flag
  (``report_residual``) and ``imaml-train`` measures it on the first step
  of each logging window only. So the paper's 5 iterations cost 6
  Hessian-vector products, all of which improve the solution, plus one on
  the steps that report the residual.

  The system is positive definite when ``phi`` minimises the proximal
  objective exactly. After a few inner steps on a non-convex loss it often is
  not (``lambda_min(H) < -lam``), and plain CG can then take huge steps along
  directions of negative curvature. ``stop_at_negative_curvature=True``
  guards against that as truncated-Newton methods do: CG stops before any
  step along a direction ``p`` with ``p^T A p <= 0`` and keeps its iterate
  (``b`` itself if that happens at the first step). ``jax.scipy``'s CG always
  takes the step, so this variant runs CG in a ``lax.while_loop`` of its own
  (``maxiter`` products, none on ``x0 = 0``). On a positive-definite system
  it gives the same iterates. Its :class:`SolveInfo` also says whether it
  stopped at non-positive curvature (``negative_curvature``, a proof that
  ``A`` is indefinite at ``phi``) and after how many updates
  (``iterations``); :func:`imaml_jax.imaml` logs both per meta-step.

  Args:
    maxiter: maximum number of CG iterations.
    tol: relative tolerance for early stopping.
    atol: absolute tolerance for early stopping.
    stop_at_negative_curvature: stop CG at the first direction of
      non-positive curvature (see above).
    report_residual: report the final relative residual in
      ``SolveInfo.residual`` (NaN otherwise, and no product is spent on it);
      a call's ``report_residual`` overrides it.
    exact_residual: with ``stop_at_negative_curvature=True``, measure the
      residual as ``||A x - b|| / ||b||`` with one more product instead of
      reporting the loop's own ``||r_k|| / ||b||`` (free and equal in exact
      arithmetic). On the default ``jax.scipy`` path the residual is always
      measured, so there the flag changes nothing.
    warm_start: on the ``jax.scipy`` path, start from ``x0 = b`` instead of
      zero (see above). The guarded loop always starts from zero, where its
      first product is not wasted either.

  Returns:
    A :class:`LinearSolver`.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> A = jnp.array([[2., 1.], [1., 3.]])
    >>> x, info = im.cg(maxiter=10).solve(lambda v: A @ v, jnp.array([1., 2.]))
    >>> bool(info.residual < 1e-5)
    True
    >>> guarded = im.cg(maxiter=3, stop_at_negative_curvature=True)
    >>> x, info = guarded.solve(lambda v: -v, jnp.array([1., 2.]))
    >>> bool(info.negative_curvature), int(info.iterations)
    (True, 0)
  """
  validation.check_positive_int("cg maxiter", maxiter)
  validation.check_positive_scalar("cg tol", tol, allow_zero=True)
  validation.check_positive_scalar("cg atol", atol, allow_zero=True)

  def solve(matvec: MatVec, b: PyTree, report_residual=report_residual):
    def scipy_cg(matvec, b):
      return jax.scipy.sparse.linalg.cg(
        matvec,
        b,
        x0=b if warm_start else None,
        tol=tol,
        atol=atol,
        maxiter=maxiter,
      )[0]

    x = _in_common_dtype(scipy_cg, matvec, b)
    return _finish(matvec, x, b, report_residual)

  def solve_guarded(matvec: MatVec, b: PyTree, report_residual=report_residual):
    x, rr, negative, updates = _cg_stopping_at_negative_curvature(
      matvec, b, maxiter, tol, atol
    )
    own = None
    if not exact_residual:  # Free: CG's own recurrence residual.
      own, report_residual = _relative(rr, b), True
    return _finish(
      matvec,
      x,
      b,
      report_residual,
      own,
      negative_curvature=negative,
      iterations=updates,
    )

  if stop_at_negative_curvature:
    return LinearSolver(
      solve=solve_guarded,
      name=f"cg({maxiter}, stop_at_negative_curvature=True)",
    )
  cold = "" if warm_start else ", warm_start=False"
  return LinearSolver(solve=solve, name=f"cg({maxiter}{cold})")


def neumann(
  terms: int = 10, step: float = 1.0, *, report_residual: bool = True
) -> LinearSolver:
  r"""Truncated Neumann series (Richardson iteration).

  .. math:: x_K = \alpha \sum_{k=0}^{K-1} (I - \alpha A)^k b,

  computed as ``x_{k+1} = x_k + alpha (b - A x_k)`` from ``x_0 = 0``. For
  ``A = I + H/lam`` and ``alpha = 1`` this is ``sum_k (-H/lam)^k b``, which
  converges when the spectral radius of ``I - alpha A`` is below one (e.g.
  ``||H|| < lam`` at ``alpha = 1``); otherwise it diverges and the reported
  residual grows.

  Args:
    terms: number of terms ``K`` (products with ``A``).
    step: the scale ``alpha``.
    report_residual: measure the final relative residual (one more product).

  Returns:
    A :class:`LinearSolver`.
  """
  validation.check_positive_int("neumann terms", terms)
  validation.check_positive_scalar("neumann step", step)

  def solve(matvec: MatVec, b: PyTree, report_residual=report_residual):
    def body(x, _):
      return tu.tree_axpy(step, tu.tree_sub(b, matvec(x)), x), None

    x, _ = jax.lax.scan(body, tu.tree_zeros_like(b), None, length=terms)
    return _finish(matvec, x, b, report_residual)

  return LinearSolver(solve=solve, name=f"neumann({terms})")


def dense(*, report_residual: bool = True) -> LinearSolver:
  """Exact solve through the dense matrix, for small problems and tests.

  Forms ``A`` column by column (one product per parameter, vmapped) and calls
  ``jnp.linalg.solve`` (in float32 for ``bfloat16`` and ``float16``, which
  LAPACK does not solve in). Memory is quadratic in the number of
  parameters.

  Returns:
    A :class:`LinearSolver`.
  """

  def solve(matvec: MatVec, b: PyTree, report_residual=report_residual):
    b_flat, unravel = ravel_pytree(b)
    flat_matvec = lambda v: ravel_pytree(matvec(unravel(v)))[0]
    basis = jnp.eye(b_flat.size, dtype=b_flat.dtype)
    matrix = jax.vmap(flat_matvec)(basis).T  # column j is A e_j
    # LAPACK has no half-precision solve: bfloat16/float16 solve in float32.
    compute = jnp.promote_types(b_flat.dtype, jnp.float32)
    x_flat = jnp.linalg.solve(matrix.astype(compute), b_flat.astype(compute))
    x = unravel(x_flat.astype(b_flat.dtype))
    return _finish(matvec, x, b, report_residual)

  return LinearSolver(solve=solve, name="dense")
