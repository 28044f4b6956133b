r"""Solvers for the symmetric linear system of the implicit meta-gradient.

Every solver has one call shape::

    x, info = solver.solve(matvec, b)

where ``matvec`` applies a symmetric positive-definite operator ``A`` (here
``I + H/lam``) to a pytree and ``b`` is a pytree. ``info`` is a
:class:`SolveInfo` with the relative residual ``||A x - b|| / ||b||`` (CG's own
recurrence residual by default, otherwise measured with one extra product), so
an unconverged solve is visible instead of silent.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
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
  """

  residual: jax.Array


class LinearSolver(NamedTuple):
  """A linear solver: ``solve(matvec, b) -> (x, SolveInfo)``."""

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


def _finish(matvec, x, b, report_residual: bool, residual=None):
  """Returns ``(x, SolveInfo)``, poisoning ``x`` with NaN on non-finite input.

  The residual is measured with one more product unless the solver passes
  its own (``residual``). A solver that stops on a NaN residual returns its
  initial guess, zero: without this check a NaN right-hand side would
  become a silently finite, wrong solution.
  """
  if report_residual:
    if residual is None:
      residual = relative_residual(matvec, x, b)
    ok = jnp.isfinite(residual) & tu.tree_all_finite(x)
  else:
    residual = jnp.full((), jnp.nan, tu._result_dtype(b))
    ok = tu.tree_all_finite(b)
  x = jax.tree.map(lambda v: jnp.where(ok, v, jnp.nan), x)
  return x, SolveInfo(residual=residual)


def _conjugate_gradient(matvec: MatVec, b: PyTree, maxiter: int, tol: float,
                        atol: float, stop_at_negative_curvature: bool
                        ) -> tuple[PyTree, jax.Array]:
  """CG from ``x0 = 0``: returns ``(x, ||r||^2)`` with ``r`` CG's residual.

  Starting from zero, the first residual is ``b`` itself, so no product is
  spent on the starting point and ``k`` iterations cost exactly ``k``
  products. The residual ``r`` is CG's recurrence ``r <- r - alpha A p``,
  equal to ``b - A x`` in exact arithmetic.

  With ``stop_at_negative_curvature`` CG stops before a step along ``p`` with
  ``p^T A p <= 0`` (where the quadratic is unbounded and CG's step is
  meaningless), keeping the iterate it has. If the very first direction,
  ``b``, has non-positive curvature it returns ``b``: the answer for
  ``A = I``, i.e. as if the Hessian term were absent.
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
    if stop_at_negative_curvature:
      alpha = rr / jnp.where(curvature > 0, curvature, 1)
    else:  # As in textbook CG; a zero curvature gives inf, then NaN.
      alpha = rr / curvature
    x_next = tu.tree_axpy(alpha, p, x)
    r_next = tu.tree_axpy(-alpha, ap, r)
    rr_next = tu.tree_sq_norm(r_next).astype(dtype)
    p_next = tu.tree_axpy(rr_next / jnp.where(rr > 0, rr, 1), p, r_next)
    if not stop_at_negative_curvature:
      return k + 1, x_next, r_next, p_next, rr_next, jnp.zeros((), bool)
    negative = ~(curvature > 0)
    x_stop = tu.tree_where(k == 0, b, x)
    return (k + 1, tu.tree_where(negative, x_stop, x_next),
            tu.tree_where(negative, r, r_next),
            tu.tree_where(negative, p, p_next),
            jnp.where(negative, rr, rr_next), negative)

  init = (jnp.zeros((), jnp.int32), tu.tree_zeros_like(b), b, b, rr0,
          jnp.zeros((), bool))
  _, x, _, _, rr, _ = jax.lax.while_loop(keep_going, step, init)
  return x, rr


def cg(maxiter: int = 5, tol: float = 1e-10, *, atol: float = 0.0,
       stop_at_negative_curvature: bool = False,
       report_residual: bool = True,
       exact_residual: bool = False) -> LinearSolver:
  r"""Conjugate gradient, for the symmetric system ``(I + H/lam) x = b``.

  Runs CG from ``x0 = 0`` for at most ``maxiter`` iterations, stopping early
  once ``||r|| <= max(tol ||b||, atol)``: ``x_{k+1} = x_k + alpha_k p_k``,
  ``r_{k+1} = r_k - alpha_k A p_k``, ``p_{k+1} = r_{k+1} + beta_k p_k`` with
  ``alpha_k = ||r_k||^2 / p_k^T A p_k`` and
  ``beta_k = ||r_{k+1}||^2 / ||r_k||^2``, ``r_0 = p_0 = b``. The paper uses 5
  iterations. Each iteration costs one product with ``A``, and only those:
  ``jax.scipy.sparse.linalg.cg`` computes the same iterates (the tests check
  it to float64 rounding) but also spends a product on ``A x0`` with
  ``x0 = 0``, a sixth Hessian-vector product for five iterations. Because
  ``I + H/lam`` is symmetric, plain CG applies; solving the normal equations
  instead would square the condition number and double the work.

  The system is positive definite when ``phi`` minimises the proximal
  objective exactly. After a few inner steps on a non-convex loss it often is
  not (``lambda_min(H) < -lam``), and plain CG can then take huge steps along
  directions of negative curvature. ``stop_at_negative_curvature=True``
  guards against that as truncated-Newton methods do: CG stops before any
  step along a direction ``p`` with ``p^T A p <= 0`` and keeps its iterate
  (``b`` itself if that happens at the first step). On a positive-definite
  system it is the same CG.

  Args:
    maxiter: maximum number of CG iterations (each is one product).
    tol: relative tolerance for early stopping.
    atol: absolute tolerance for early stopping.
    stop_at_negative_curvature: stop CG at the first direction of
      non-positive curvature (see above).
    report_residual: report the final relative residual in
      ``SolveInfo.residual`` (NaN otherwise).
    exact_residual: measure that residual as ``||A x - b|| / ||b||`` with one
      more product. By default it is CG's own ``||r_k|| / ||b||``, which is
      free and equal in exact arithmetic (the tests compare the two in
      float64).

  Returns:
    A :class:`LinearSolver`.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> A = jnp.array([[2., 1.], [1., 3.]])
    >>> x, info = im.cg(maxiter=10).solve(lambda v: A @ v, jnp.array([1., 2.]))
    >>> bool(info.residual < 1e-5)
    True
  """
  validation.check_positive_int("cg maxiter", maxiter)
  validation.check_positive_scalar("cg tol", tol, allow_zero=True)
  validation.check_positive_scalar("cg atol", atol, allow_zero=True)

  def solve(matvec: MatVec, b: PyTree):
    x, rr = _conjugate_gradient(matvec, b, maxiter, tol, atol,
                                stop_at_negative_curvature)
    own = None if exact_residual else _relative(rr, b)
    return _finish(matvec, x, b, report_residual, own)

  name = (f"cg({maxiter}, stop_at_negative_curvature=True)"
          if stop_at_negative_curvature else f"cg({maxiter})")
  return LinearSolver(solve=solve, name=name)


def neumann(terms: int = 10, step: float = 1.0, *,
            report_residual: bool = True) -> LinearSolver:
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

  def solve(matvec: MatVec, b: PyTree):
    def body(x, _):
      return tu.tree_axpy(step, tu.tree_sub(b, matvec(x)), x), None

    x, _ = jax.lax.scan(body, tu.tree_zeros_like(b), None, length=terms)
    return _finish(matvec, x, b, report_residual)

  return LinearSolver(solve=solve, name=f"neumann({terms})")


def dense(*, report_residual: bool = True) -> LinearSolver:
  """Exact solve through the dense matrix, for small problems and tests.

  Forms ``A`` column by column (one product per parameter, vmapped) and calls
  ``jnp.linalg.solve``. Memory is quadratic in the number of parameters.

  Returns:
    A :class:`LinearSolver`.
  """

  def solve(matvec: MatVec, b: PyTree):
    b_flat, unravel = ravel_pytree(b)
    flat_matvec = lambda v: ravel_pytree(matvec(unravel(v)))[0]
    basis = jnp.eye(b_flat.size, dtype=b_flat.dtype)
    matrix = jax.vmap(flat_matvec)(basis).T  # column j is A e_j
    x = unravel(jnp.linalg.solve(matrix, b_flat))
    return _finish(matvec, x, b, report_residual)

  return LinearSolver(solve=solve, name="dense")
