"""Why iMAML on sinusoids learns or not: inner loop, curvature, meta-gradient.

For the sinusoid config (1-40-40-1 ReLU MLP, MSE, 10 support and 10 query
points per task) this script measures, in float64, for each proximal strength
``lam`` and each of a few tasks, at the network initialisation and (with
``--workdir``) at the best-validation and last meta-parameters of a run:

1. inner loop: ``phi_K``, the result of the inner solver under diagnosis
   (``--inner-steps``, ``--inner-lr``, ``--backtrack``; by default the run's,
   else the old sinusoid recipe, 16 plain GD steps of 0.003), against the
   proximal minimiser ``phi*`` of ``G(phi) = L_s(phi) + lam/2 ||phi -
   theta||^2``: ``||grad G(phi_K)|| / ||grad G(theta)||`` and
   ``||phi_K - phi*|| / ||phi* - theta||``.
2. spectrum: the dense Hessian ``H`` of the support loss (``jax.hessian`` of
   the flattened parameters) at ``phi_K`` and at ``phi*``: the smallest and
   largest eigenvalue of ``I + H/lam``, its condition number (``inf`` when
   the smallest is not positive) and its fraction of negative eigenvalues.
3. CG: the relative residual ``||A x - b|| / ||b||`` of the library's
   ``im.cg(5)`` for ``A = I + H(phi_K)/lam``, ``b = grad L_q(phi_K)``, as
   the library reports it and checked against the dense matrix.
4. meta-gradient: the task gradient a user gets,
   ``im.imaml(lam, inner, im.cg(5)).task_gradient``, against the exact
   ``g*``, the derivative of ``L_q(phi*(theta))``: relative error
   ``||g - g*|| / ||g*||`` and cosine. Three more gradients split the error:
   the recipe's ``phi_K`` with an exact (dense) solve; the same
   ``task_gradient`` with the inner loop replaced by ``phi*`` (CG(5) alone,
   also compared with ``g*_smooth = (I + H(phi*)/lam)^{-1} grad L_q(phi*)``,
   the dense solution of the system it solves); and ``g*_smooth`` itself.
5. loss scale: the support loss at ``theta``, its gradient norm and the
   extreme eigenvalues of ``H(theta)``.

The proximal minimiser. Checked gradient descent from ``theta``
(``--solve-steps`` steps of initial size ``1 / (lam + eig_max H(theta))``)
ends near ``phi*``; Newton steps with dense solves finish it. The support
loss of a ReLU network is smooth except where a hidden unit's pre-activation
at a support point is 0, and ``phi*`` often lies exactly on such kinks: the
gradient of ``G`` does not vanish there (it jumps across the kink), and
``I + H/lam`` is the Hessian of one side only. So the Newton steps are taken
on the manifold of the kinks that descent ran into (the constraints
``z_i(phi) = 0``, with multipliers ``mu_i``; a step stops at any further
kink, and a kink that does not hold the minimiser is left), and ``phi*`` is
checked to be a strict local minimiser: the gradient of the Lagrangian
``G + mu . z`` below 1e-8 relative to ``||grad G(theta)||``, at each kink a
ReLU slope ``s_i`` in (0, 1) that cancels the gradient (then the kink
persists under small changes of ``theta``), and ``H_lag + lam I`` positive
definite on the manifold's tangent space. Then
``g* = lam x`` with ``[H_lag + lam I, J^T; J, 0] [x; y] = [grad L_q; 0]``
(``J`` the kinks' Jacobian), which is ``(I + H/lam)^{-1} grad L_q`` when
``phi*`` is on no kink. Where ``I + H/lam`` has negative eigenvalues (at
``theta`` or ``phi_K``) ``G`` is not convex, and ``phi*`` is the local
minimiser that descent from ``theta`` reaches; the report says on how many
tasks.

Per ``(point, lam)`` it reports medians, minima and maxima over the tasks in
``sinusoid_diagnosis[_<tag>].{csv,json,md,png}``; the JSON also holds every
task's numbers. ``--compare JSON`` adds another run of this script (another
inner recipe) to the report and the figure.

    python benchmarks/sinusoid_diagnosis.py --tag new_recipe \\
        --inner-steps 16 --inner-lr 0.005 --backtrack      # checked GD
    python benchmarks/sinusoid_diagnosis.py \\
        --compare benchmarks/results/sinusoid_diagnosis_new_recipe.json
    python benchmarks/sinusoid_diagnosis.py --workdir runs/sinusoid
    python benchmarks/sinusoid_diagnosis.py --quick         # 2 tasks, lam 2, 30

The dense Hessians, solves and eigenvalues (1761 parameters) and the
compilation dominate the run time (a rerun loads the compiled code from
``imaml-train``'s persistent XLA cache); pin the run to a core with
``taskset -c 0`` on a shared machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time

import jax
from arguments import count

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import imaml_jax as im  # noqa: E402
from imaml_jax import data  # noqa: E402
from imaml_jax import models  # noqa: E402
from imaml_jax.train import checkpoint as ckpt_lib  # noqa: E402
from imaml_jax.train import cli  # noqa: E402
from imaml_jax.train import config as config_lib  # noqa: E402
from imaml_jax.train import train as train_lib  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OLD_RECIPE = {"inner_steps": 16, "inner_lr": 0.003, "backtrack": False}
K_SHOT = Q_QUERY = 10
NEWTON_STEPS = 60
NEWTON_TOLERANCE = 1e-13
RELEASE_TOLERANCE = 1e-9
RELEASE_OFFSET = 1e-7
MAX_KINKS = 16
KINK_TOLERANCE = 1e-6
KKT_REGULARISATION = 1e-12
STAR_TOLERANCE = 1e-8


# ----------------------------------------------------------------------------
# Linear algebra on flat vectors.


def to_float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def norm(x):
  return jnp.linalg.norm(x)


def relative_error(g, exact):
  return norm(g - exact) / norm(exact)


def cosine(g, exact):
  return jnp.vdot(g, exact) / (norm(g) * norm(exact))


def symmetric_hessian(fun, x):
  h = jax.hessian(fun)(x)
  return 0.5 * (h + h.T)


def spectrum(a):
  """Extreme eigenvalues, condition number and negative fraction of ``a``.

  On the host with NumPy: LAPACK's eigenvalues-only path is several times
  faster than ``jnp.linalg.eigvalsh``, which also computes eigenvectors.
  A matrix with a non-finite entry gets NaN for every number.
  """
  a = np.asarray(a)
  if not np.all(np.isfinite(a)):
    # LAPACK's symmetric eigensolver may never return on NaN entries.
    return {
      "eig_min": math.nan,
      "eig_max": math.nan,
      "cond": math.nan,
      "neg_frac": math.nan,
    }
  eigs = np.linalg.eigvalsh(a)
  low, high = float(eigs[0]), float(eigs[-1])
  return {
    "eig_min": low,
    "eig_max": high,
    "cond": high / low if low > 0 else math.inf,
    "neg_frac": float(np.mean(eigs < 0)),
  }


# ----------------------------------------------------------------------------
# ReLU kinks (see the module docstring): the constraints z_i(phi) = 0 of the
# kinks phi* lies on, their multipliers and the Newton steps on them. On the
# manifold a kink's unit is pinned off (its activation set to 0, slope 0)
# instead of going through relu: relu(z) = 0 there as well, but the sign of
# a z of a few ulps, which differs between compiled expressions, would pick
# the side of the kink at random.


def mlp_forward(params, x, e1=0.0, e2=0.0, pinned=None):
  """The sinusoid MLP with its pre-activations ``z`` (``[2 * B * 40]``).

  ``e1``, ``e2`` are added to the hidden activations (for the loss's
  derivative with respect to them); ``pinned`` (ordered like ``z``) marks
  the units whose activation is 0. ``main`` checks this against the
  library's ``net.apply``.
  """
  if pinned is None:
    pinned = jnp.zeros(2 * x.shape[0] * params["dense0"]["bias"].size)
  p1, p2 = jnp.split(pinned > 0, 2)
  z1 = x @ params["dense0"]["kernel"] + params["dense0"]["bias"]
  h1 = jnp.where(p1.reshape(z1.shape), 0.0, jax.nn.relu(z1)) + e1
  z2 = h1 @ params["dense1"]["kernel"] + params["dense1"]["bias"]
  h2 = jnp.where(p2.reshape(z2.shape), 0.0, jax.nn.relu(z2)) + e2
  out = h2 @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return out, jnp.concatenate([z1.ravel(), z2.ravel()])


class Pieces:
  """The support loss, ``G`` and ``z`` of one task with pinned kinks.

  ``idx`` are the candidate kinks (indices into ``z``); every function
  takes ``active``, the candidates pinned on the manifold.
  """

  def __init__(self, unravel, theta, batch, lam, idx):
    self.unravel, self.theta, self.batch = unravel, theta, batch
    self.lam, self.idx = lam, idx

  def pinned(self, active):
    n_z = (
      2
      * self.batch[0].shape[0]
      * self.unravel(self.theta)["dense0"]["bias"].size
    )
    return jnp.zeros(n_z, self.theta.dtype).at[self.idx].set(active)

  def forward(self, v, active, e1=0.0, e2=0.0):
    return mlp_forward(
      self.unravel(v), self.batch[0], e1, e2, self.pinned(active)
    )

  def support(self, v, active):
    y = self.batch[1]
    return jnp.mean((self.forward(v, active)[0].reshape(y.shape) - y) ** 2)

  def prox(self, v, active):
    return self.support(v, active) + 0.5 * self.lam * jnp.sum(
      (v - self.theta) ** 2
    )

  def constraint(self, v, active):
    return self.forward(v, active)[1][self.idx]

  def sensitivity(self, v, active):
    """``d MSE / d h_i`` at each candidate kink's activation ``h_i``.

    Leaving a pinned kink to the side ``z_i < 0`` changes ``G`` at the rate
    ``mu_i`` (per unit of ``z_i``), to the side ``z_i > 0`` at the rate
    ``delta_i - mu_i``: ``phi`` is a minimiser across the kink when
    ``0 <= mu_i <= delta_i``, i.e. the relu slope ``s_i = mu_i / delta_i``
    that cancels the gradient is in ``[0, 1]``.
    """
    y = self.batch[1]
    zero = jnp.zeros(self.forward(v, active)[1].shape[0] // 2, v.dtype)
    shape = (y.shape[0], -1)

    def mse(e1, e2):
      out = self.forward(v, active, e1.reshape(shape), e2.reshape(shape))[0]
      return jnp.mean((out.reshape(y.shape) - y) ** 2)

    d1, d2 = jax.grad(mse, argnums=(0, 1))(zero, zero)
    return jnp.concatenate([d1, d2])[self.idx]


def kink_margin(mu, delta):
  """``min(mu, delta - mu) / |delta|``: ``min(s, 1 - s)`` for ``delta > 0``.

  Positive where the kink holds ``phi*`` strictly (see ``sensitivity``).
  """
  return jnp.minimum(mu, delta - mu) / jnp.maximum(jnp.abs(delta), 1e-300)


def kink_candidates(z, tau):
  """The ``MAX_KINKS`` smallest ``|z|``; active where ``< tau``."""
  idx = jnp.argsort(jnp.abs(z))[:MAX_KINKS]
  return idx, (jnp.abs(z[idx]) < tau).astype(z.dtype)


def multipliers(grad, jac, active):
  """Least-squares ``mu``: ``grad + J^T mu`` smallest; 0 where inactive."""
  jac = jac * active[:, None]
  gram = jac @ jac.T + jnp.diag(1.0 - active + KKT_REGULARISATION * active)
  return jnp.linalg.solve(gram, -jac @ grad)


def kkt_matrix(lagrangian_hessian, jac, active):
  """``[[H, J^T], [J, -eps I]]`` for the active rows of ``J``.

  Inactive rows read ``mu_i = 0``. The tiny ``eps``
  (``KKT_REGULARISATION``) keeps the system solvable when kinks'
  constraints are dependent (e.g. a unit with zero weights, at a kink at
  every point).
  """
  jac = jac * active[:, None]
  corner = jnp.diag(1.0 - active - KKT_REGULARISATION * active)
  return jnp.block([[lagrangian_hessian, jac.T], [jac, corner]])


def local_model(pieces, x, active):
  """``z``, its Jacobian and ``grad G`` on the piece of ``active``."""
  return (
    pieces.constraint(x, active),
    jax.jacrev(pieces.constraint)(x, active),
    jax.grad(pieces.prox)(x, active),
  )


def merit(pieces, v, active, rho):
  """``G + rho * sum |z_i|`` over the active kinks: the step acceptance test."""
  return pieces.prox(v, active) + rho * jnp.sum(
    active * jnp.abs(pieces.constraint(v, active))
  )


def newton_step(pieces, x, active, mu, shift, z, jac, grad):
  """One KKT step with ``H_lag + shift I``; stops where a candidate's z is 0.

  Returns ``(x, active, mu, accepted)``: the step is taken only if it does
  not increase the merit function (up to rounding).
  """
  n = x.size
  hess = symmetric_hessian(
    lambda v: pieces.prox(v, active) + mu @ pieces.constraint(v, active), x
  )
  sol = jnp.linalg.solve(
    kkt_matrix(hess + shift * jnp.eye(n, dtype=x.dtype), jac, active),
    -jnp.concatenate([grad, z * active]),
  )
  d, dz, mu_new = sol[:n], jac @ sol[:n], sol[n:] * active
  towards = (active == 0) & (z * dz < 0)
  hits = jnp.where(towards, -z / jnp.where(towards, dz, 1.0), jnp.inf)
  first = jnp.argmin(hits)
  hit = hits[first] < 1.0
  x_new = x + jnp.where(hit, hits[first], 1.0) * d
  rho = 2.0 * jnp.max(jnp.abs(mu_new)) + 1e-3
  before = merit(pieces, x, active, rho)
  after = merit(pieces, x_new, active, rho)
  accepted = after <= before + 1e-13 * jnp.abs(before)
  active_new = jnp.where(hit, active.at[first].set(1.0), active)
  return (
    jnp.where(accepted, x_new, x),
    jnp.where(accepted, active_new, active),
    jnp.where(accepted, mu_new, mu),
    accepted,
  )


def proximal_minimiser(pieces, x, active, scale):
  """Newton (SQP) steps on ``G`` on the manifold of the active kinks.

  Each step solves the KKT system of ``min G`` subject to the active
  constraints ``z_i = 0`` with the Hessian of the Lagrangian plus
  ``shift * I`` (without active kinks, Newton's method). A step that would
  carry an inactive candidate's ``z_i`` (linearised) through zero stops
  there and makes it active, so the iterates stay on one smooth piece of
  ``G``. A step that increases ``G + rho sum |z_i|`` is refused and the
  shift grows (towards short gradient steps), an accepted one shrinks it
  (towards Newton's). Once stationary on the manifold
  (``RELEASE_TOLERANCE`` relative to ``scale``), a kink that does not hold
  ``phi`` (``kink_margin < 0``) is left, to the side where ``G`` decreases.
  Started where checked gradient descent ended, this converges
  quadratically once the set of kinks is right; it stops after an accepted
  step shorter than ``NEWTON_TOLERANCE`` (relative) or after
  ``NEWTON_STEPS``.

  Returns:
    ``(phi, active, mu, steps)``.
  """

  def step(carry):
    k, x, active, mu, shift, _ = carry
    z, jac, grad = local_model(pieces, x, active)
    mu_ls = multipliers(grad, jac, active)
    margin = jnp.where(
      active > 0, kink_margin(mu_ls, pieces.sensitivity(x, active)), jnp.inf
    )
    worst = jnp.argmin(margin)
    stationary = norm(grad + (jac * active[:, None]).T @ mu_ls) < (
      RELEASE_TOLERANCE * scale
    )
    release = stationary & (margin[worst] < 0)
    side = jnp.where(mu_ls[worst] < 0, -1.0, 1.0)
    x_off = x + (side * RELEASE_OFFSET - z[worst]) * jac[worst] / jnp.sum(
      jac[worst] ** 2
    )
    off = active.at[worst].set(0.0)
    x_new, active_new, mu_new, accepted = newton_step(
      pieces, x, active, mu, shift, z, jac, grad
    )
    small = norm(x_new - x) <= NEWTON_TOLERANCE * (1.0 + norm(x))
    done = accepted & small & ~release
    shift = jnp.where(accepted, shift / 4.0, jnp.maximum(4.0 * shift, 1.0))
    shift = jnp.where(shift < 1e-6, 0.0, shift)
    return (
      k + 1,
      jnp.where(release, x_off, x_new),
      jnp.where(release, off, active_new),
      jnp.where(release, mu_ls * off, mu_new),
      shift,
      done,
    )

  def keep_going(carry):
    k, _, _, _, _, done = carry
    return (k < NEWTON_STEPS) & ~done

  _, jac, grad = local_model(pieces, x, active)
  init = (
    0,
    x,
    active,
    multipliers(grad, jac, active),
    jnp.zeros((), x.dtype),
    False,
  )
  k, x, active, _, _, _ = jax.lax.while_loop(keep_going, step, init)
  _, jac, grad = local_model(pieces, x, active)
  return x, active, multipliers(grad, jac, active), k


def reduced_hessian_is_pd(matrix, jac, active):
  """Whether ``matrix`` is positive definite on the kinks' tangent space.

  Cholesky of ``P M P + (I - P)``, ``P`` the projection onto the tangent
  space ``{d: J d = 0}``, with ``I - P = U U^T`` from the singular vectors
  ``U`` of the active rows of ``J`` (dependent rows count once).
  """
  # The SVD gets zeros for non-finite input (LAPACK's iterative SVD may never
  # return on NaN); the answer is then False.
  finite = jnp.all(jnp.isfinite(jac)) & jnp.all(jnp.isfinite(matrix))
  _, sv, vt = jnp.linalg.svd(
    jnp.where(finite, jac * active[:, None], 0.0), full_matrices=False
  )
  basis = vt.T * (sv > 1e-10 * jnp.maximum(sv[0], 1e-300))  # U, n x k
  mb = matrix @ basis
  projected = (
    matrix
    - basis @ mb.T
    - mb @ basis.T
    + basis @ (basis.T @ mb) @ basis.T
    + basis @ basis.T
  )
  chol = jnp.linalg.cholesky(0.5 * (projected + projected.T))
  return finite & jnp.all(jnp.isfinite(chol))


# ----------------------------------------------------------------------------
# One task.


def theta_statistics(loss, theta, task):
  """Loss scale at ``theta``: support loss, gradient norm; and ``H``."""
  flat, unravel = ravel_pytree(theta)
  support = lambda v: loss(unravel(v), task.support)[0]
  return (
    {
      "support_loss_theta": support(flat),
      "grad_norm_theta": norm(jax.grad(support)(flat)),
    },
    symmetric_hessian(support, flat),
  )


def converged_solution(loss, theta, task, lam, solve_lr, solve_steps):
  """``phi*``, its kink multipliers and the exact meta-gradient ``g*``.

  ``g* = lam x`` with ``[H_lag + lam I, J^T; J, 0] [x; y] = [grad L_q; 0]``,
  the derivative of ``L_q(phi*(theta))``; without active kinks it is
  ``(I + H/lam)^{-1} grad L_q(phi*)``.
  """
  flat_theta, unravel = ravel_pytree(theta)
  objective = im.proximal_objective(
    lambda p, b: loss(p, b)[0], theta, task.support, lam
  )
  phi_gd = ravel_pytree(
    im.gd(solve_steps, solve_lr, backtrack=True).run(objective, theta)
  )[0]
  z_gd = mlp_forward(unravel(phi_gd), task.support[0])[1]
  idx, active = kink_candidates(z_gd, KINK_TOLERANCE)
  pieces = Pieces(unravel, flat_theta, task.support, lam, idx)
  free = jnp.zeros_like(active)
  start = norm(jax.grad(pieces.prox)(flat_theta, free))
  phi, active, mu, newton_steps = proximal_minimiser(
    pieces, phi_gd, active, start
  )
  z, jac, grad = local_model(pieces, phi, active)
  lag_hess = symmetric_hessian(
    lambda v: pieces.support(v, active) + mu @ pieces.constraint(v, active), phi
  ) + lam * jnp.eye(phi.size, dtype=phi.dtype)
  b = jax.grad(lambda v: loss(unravel(v), task.query)[0])(phi)
  x = jnp.linalg.solve(
    kkt_matrix(lag_hess, jac, active), jnp.concatenate([b, jnp.zeros_like(mu)])
  )
  margin = jnp.where(
    active > 0, kink_margin(mu, pieces.sensitivity(phi, active)), 0.5
  )
  z_all = mlp_forward(unravel(phi), task.support[0])[1]
  others = (
    jnp.abs(z_all)
    .at[idx]
    .set(jnp.where(active > 0, jnp.inf, jnp.abs(z_all[idx])))
  )
  stats = {
    "newton_steps": newton_steps,
    "prox_grad_rel_gd": norm(jax.grad(pieces.prox)(phi_gd, free)) / start,
    "prox_grad_rel_star": norm(jax.grad(pieces.prox)(phi, free)) / start,
    "stationarity_rel_star": norm(grad + (jac * active[:, None]).T @ mu)
    / start,
    "kinks": jnp.sum(active),
    "kink_violation": jnp.max(jnp.abs(z * active)),
    "kink_margin": jnp.min(margin),
    "inactive_gap": jnp.min(others),
    "reduced_pd": reduced_hessian_is_pd(lag_hess, jac, active),
  }
  return phi, lam * x[: phi.size], b, stats


def task_diagnosis(loss, theta, task, lam, inner, solve_lr, solve_steps):
  """The numbers 1-4 of the module docstring for one task and one ``lam``.

  Returns the scalars and the matrices ``I + H/lam`` at ``phi_K`` and
  ``phi*``.
  """
  flat_theta, unravel = ravel_pytree(theta)
  support_tree = lambda p: loss(p, task.support)[0]
  query_tree = lambda p: loss(p, task.query)[0]
  support = lambda v: support_tree(unravel(v))
  query = lambda v: query_tree(unravel(v))
  prox = lambda v: support(v) + 0.5 * lam * jnp.sum((v - flat_theta) ** 2)
  eye = jnp.eye(flat_theta.size, dtype=flat_theta.dtype)

  # 1. The inner loop under diagnosis, and the converged proximal minimiser.
  algorithm = im.imaml(lam, inner, im.cg(5))
  phi_k = ravel_pytree(algorithm.adapt(loss, theta, task.support))[0]
  phi_star, g_exact, b_star, star = converged_solution(
    loss, theta, task, lam, solve_lr, solve_steps
  )
  start = norm(jax.grad(prox)(flat_theta))
  reach = norm(phi_star - flat_theta)

  # 2. A = I + H/lam at phi_K and at phi* (spectra on the host), as a pair.
  a_k, a_star = (
    eye
    + jax.vmap(lambda v: symmetric_hessian(support, v))(
      jnp.stack([phi_k, phi_star])
    )
    / lam
  )

  # 3-4. The library's meta-gradient and its CG residual, against g*; the
  # same with the inner loop replaced by phi*.
  g_lib_tree, metrics = algorithm.task_gradient(loss, theta, task)
  g_lib = ravel_pytree(g_lib_tree)[0]
  star_tree = unravel(phi_star)
  given = im.InnerSolver(
    run=lambda objective, x0, remat=False: star_tree, steps=1, name="phi*"
  )
  g_star_cg_tree, star_metrics = im.imaml(lam, given, im.cg(5)).task_gradient(
    loss, theta, task
  )
  g_star_cg = ravel_pytree(g_star_cg_tree)[0]
  b_k = jax.grad(query)(phi_k)
  g_k_exact, g_star_smooth = jnp.linalg.solve(
    jnp.stack([a_k, a_star]), jnp.stack([b_k, b_star])[..., None]
  )[..., 0]

  out = dict(star)
  out.update(
    {
      "prox_grad_rel_k": norm(jax.grad(prox)(phi_k)) / start,
      "prox_grad_norm_k": norm(jax.grad(prox)(phi_k)),
      "inner_dist_rel": norm(phi_k - phi_star) / reach,
      "inner_step_rel": norm(phi_k - flat_theta) / reach,
      "star_dist": reach,
      "support_loss_k": support(phi_k),
      "support_loss_star": support(phi_star),
      "query_loss_k": query(phi_k),
      "query_loss_star": query(phi_star),
      "cg5_residual_k": metrics["residual"],
      "cg5_residual_k_dense": relative_error(a_k @ g_lib, b_k),
      "cg5_residual_star": star_metrics["residual"],
      "err_recipe": relative_error(g_lib, g_exact),
      "cos_recipe": cosine(g_lib, g_exact),
      "err_recipe_exact_solve": relative_error(g_k_exact, g_exact),
      "cos_recipe_exact_solve": cosine(g_k_exact, g_exact),
      "err_converged_cg5": relative_error(g_star_cg, g_exact),
      "cos_converged_cg5": cosine(g_star_cg, g_exact),
      "err_converged_smooth": relative_error(g_star_smooth, g_exact),
      "err_recipe_smooth": relative_error(g_lib, g_star_smooth),
      "err_converged_cg5_smooth": relative_error(g_star_cg, g_star_smooth),
      "meta_grad_norm_exact": norm(g_exact),
    }
  )
  return out, {"k": a_k, "star": a_star}


# ----------------------------------------------------------------------------
# Points, recipes, aggregation.


def load_points(workdir, template):
  """The run's config and its last (and best-validation) parameters.

  Reads the latest checkpoint (``load_run``); returns ``(config, points)``
  with ``points`` ``{"last (step N)": params}`` and, when validation chose
  an earlier step, ``"best (step M)"``.
  """
  config, path = train_lib.load_run(workdir)
  if config.dataset != "sinusoid":
    raise SystemExit(f"{workdir} is a {config.dataset} run, not sinusoid")
  step, tree = ckpt_lib.load(path)
  last = ckpt_lib.restore_into(
    template, tree["state"]["params"], what=f"{path} params"
  )
  points = {f"last (step {step})": last}
  best_step = int(tree["best"]["step"])
  if 0 <= best_step < step:
    points[f"best (step {best_step})"] = ckpt_lib.restore_into(
      template, tree["best"]["params"], what=f"{path} best params"
    )
  return config, points


def resolve_recipe(args, run_config):
  """The inner recipe: the flags, else the run's config, else the old one."""
  recipe = dict(OLD_RECIPE)
  if run_config is not None:
    recipe = {
      "inner_steps": run_config.inner_steps,
      "inner_lr": run_config.inner_lr,
      "backtrack": run_config.inner_backtrack,
    }
    if run_config.inner != "gd":
      raise SystemExit(
        f"the run's inner solver is {run_config.inner!r}; "
        "this script diagnoses gd only"
      )
  for key in recipe:
    if getattr(args, key) is not None:
      recipe[key] = getattr(args, key)
  return recipe


def recipe_name(recipe):
  check = ", checked" if recipe["backtrack"] else ""
  return f"{recipe['inner_steps']} GD steps of {recipe['inner_lr']:g}{check}"


def make_diagnosis(loss, inner, solve_steps):
  """Jitted ``(theta, tasks) -> base`` and ``(theta, tasks, lam, lr) -> rows``.

  ``theta`` and ``lam`` are arguments, so every point and every ``lam``
  share one compilation. The per-``lam`` diagnosis runs the tasks one after
  another (``lax.map``), not vmapped: vmapped, each task's SVD and
  Cholesky become one batched LAPACK call, which jaxlib spreads over XLA's
  CPU thread pool from inside that pool, and which deadlocked there (every
  thread asleep, the SVD waiting for its batch; seen in the test suite on
  the 2-core CPU).
  """
  base = jax.jit(
    lambda theta, tasks: jax.vmap(lambda t: theta_statistics(loss, theta, t))(
      tasks
    )
  )
  per_lam = jax.jit(
    lambda theta, tasks, lam, solve_lr: jax.lax.map(
      lambda args: task_diagnosis(
        loss, theta, args[0], lam, inner, args[1], solve_steps
      ),
      (tasks, solve_lr),
    )
  )
  return base, per_lam


def diagnose_point(diagnosis, theta, tasks, lams):
  """Per-task rows for every ``lam`` at one meta-parameter point."""
  base_fn, per_lam = diagnosis
  theta = to_float64(theta)
  base, hessians = jax.device_get(base_fn(theta, tasks))
  spectra = [spectrum(h) for h in hessians]
  base.update(
    {
      f"h_{k}_theta": np.array([s[k] for s in spectra])
      for k in ("eig_min", "eig_max")
    }
  )
  rows = []
  for lam in lams:
    solve_lr = 1.0 / (lam + np.maximum(base["h_eig_max_theta"], 0.0))
    start = time.perf_counter()
    stats, systems = jax.device_get(
      per_lam(theta, tasks, jnp.float64(lam), jnp.asarray(solve_lr))
    )
    for i in range(len(solve_lr)):
      row = {"lam": lam, "task": i}
      row.update({k: float(v[i]) for k, v in base.items()})
      row.update({k: float(v[i]) for k, v in stats.items()})
      for where, matrices in systems.items():
        row.update(
          {f"a_{k}_{where}": v for k, v in spectrum(matrices[i]).items()}
        )
      rows.append(row)
    print(f"  lam {lam:g}: {time.perf_counter() - start:.1f} s", flush=True)
  return rows


def star_converged(row):
  """``phi*`` is a strict local minimiser to the tolerance (see docstring)."""
  return (
    row["stationarity_rel_star"] < STAR_TOLERANCE
    and row["kink_violation"] < 1e-10
    and row["kink_margin"] > 0
    and row["reduced_pd"] == 1
  )


def needs_star(key):
  """Whether a number is measured against ``phi*`` or ``g*``."""
  return (
    key.startswith(("err_", "cos_", "inner_", "a_")) and not key.endswith("_k")
  ) or key in (
    "star_dist",
    "support_loss_star",
    "query_loss_star",
    "cg5_residual_star",
    "meta_grad_norm_exact",
  )


def aggregate(rows, point):
  """Median, min and max over tasks of every number, per ``lam``.

  Numbers measured against ``phi*`` or ``g*`` (``needs_star``) are taken
  over the tasks where ``phi*`` converged only (NaN if there is none).
  """
  out = []
  for lam in sorted({r["lam"] for r in rows}):
    group = [r for r in rows if r["lam"] == lam]
    converged = [r for r in group if star_converged(r)]
    agg = {"point": point, "lam": lam, "tasks": len(group)}
    for key in group[0]:
      if key in ("lam", "task"):
        continue
      values = np.array(
        [r[key] for r in (converged if needs_star(key) else group)] or [np.nan]
      )
      agg[f"{key}_median"] = float(np.median(values))
      agg[f"{key}_min"] = float(values.min())
      agg[f"{key}_max"] = float(values.max())
    agg["nonconvex_tasks"] = int(
      sum(
        r["a_eig_min_k"] < 0 or 1 + r["h_eig_min_theta"] / lam < 0
        for r in group
      )
    )
    agg["star_converged_tasks"] = len(converged)
    agg["kink_tasks"] = int(sum(r["kinks"] > 0 for r in converged))
    out.append(agg)
  return out


# ----------------------------------------------------------------------------
# Output.


def fmt(x, digits=2):
  if isinstance(x, str):
    return x
  if math.isinf(x):
    return "inf"
  if x == 0 or 1e-2 <= abs(x) < 1e4:
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.0f}"
  return f"{x:.{digits - 1}e}"


def spread(row, key, digits=2):
  return (
    f"{fmt(row[key + '_median'], digits)} "
    f"[{fmt(row[key + '_min'], digits)}, "
    f"{fmt(row[key + '_max'], digits)}]"
  )


def json_safe(x):
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, list):
    return [json_safe(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def json_number(x):
  """Undoes ``json_safe``: ``"inf"`` and ``"nan"`` back to floats."""
  return float(x) if x in ("inf", "-inf", "nan") else x


def load_compare(path):
  with open(path) as f:
    result = json.load(f)
  result["summary"] = [
    {k: json_number(v) for k, v in r.items()} for r in result["summary"]
  ]
  return result


def tables(summary, recipe):
  """The markdown tables of one recipe."""
  lines = []
  for point in dict.fromkeys(r["point"] for r in summary):
    group = [r for r in summary if r["point"] == point]
    lines += [
      f"**{point}**, inner loop {recipe}: medians over {group[0]['tasks']} "
      "tasks [min, max].",
      "",
      "Meta-gradient, relative error ||g - g*|| / ||g*||:",
      "",
      "| lam | recipe (phi_K, CG(5)) | cosine | phi_K, exact solve "
      "| phi*, CG(5) | phi*, exact solve (kinks) | recipe vs g*_smooth "
      "| phi*, CG(5) vs g*_smooth | CG(5) residual at phi_K |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
      lines.append(
        f"| {r['lam']:g} | {spread(r, 'err_recipe')} | "
        f"{spread(r, 'cos_recipe', 3)} | "
        f"{spread(r, 'err_recipe_exact_solve')} | "
        f"{spread(r, 'err_converged_cg5')} | "
        f"{spread(r, 'err_converged_smooth')} | "
        f"{spread(r, 'err_recipe_smooth')} | "
        f"{spread(r, 'err_converged_cg5_smooth')} | "
        f"{spread(r, 'cg5_residual_k')} |"
      )
    lines += [
      "",
      "Curvature, inner loop and the proximal minimiser:",
      "",
      "| lam | eig(I + H/lam) at phi_K: min | max | negative fraction "
      "| at phi*: min | max | condition number | ||phi_K - phi*|| / "
      "||phi* - theta|| | ||grad G(phi_K)|| / ||grad G(theta)|| "
      "| kinks at phi* | phi* converged | G not convex |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
      lines.append(
        f"| {r['lam']:g} | {spread(r, 'a_eig_min_k')} | "
        f"{spread(r, 'a_eig_max_k')} | {spread(r, 'a_neg_frac_k', 3)} | "
        f"{spread(r, 'a_eig_min_star')} | {spread(r, 'a_eig_max_star')} | "
        f"{spread(r, 'a_cond_star')} | {spread(r, 'inner_dist_rel')} | "
        f"{spread(r, 'prox_grad_rel_k')} | {spread(r, 'kinks', 0)} | "
        f"{r['star_converged_tasks']}/{r['tasks']} | "
        f"{r['nonconvex_tasks']}/{r['tasks']} |"
      )
    lines.append("")
  return lines


def by_lam(group, key, stat="median"):
  return ", ".join(
    f"{fmt(r[f'{key}_{stat}'])} (lam {r['lam']:g})" for r in group
  )


def findings(summary, compare, recipe):
  """Sentences that restate the numbers at the first point (initialisation)."""
  point = summary[0]["point"]
  group = [r for r in summary if r["point"] == point]
  lines = [
    f"At the {point}, the median relative error of the meta-gradient is "
    f"{by_lam(group, 'err_recipe')} with the inner loop {recipe}"
  ]
  for other in compare:
    rows = [r for r in other["summary"] if r["point"] == point]
    if rows:
      lines[-1] += f"; {by_lam(rows, 'err_recipe')} with {other['recipe_name']}"
  lines[-1] += (
    f"; with the converged phi* and CG(5) it is "
    f"{by_lam(group, 'err_converged_cg5')}."
  )
  lines.append(
    "At phi_K the smallest eigenvalue of I + H/lam is (median) "
    f"{by_lam(group, 'a_eig_min_k')} and the largest "
    f"{by_lam(group, 'a_eig_max_k')}."
  )
  lines.append(
    "The inner loop ends at ||phi_K - phi*|| / ||phi* - theta|| = "
    f"{by_lam(group, 'inner_dist_rel')}."
  )
  kinks = [r for r in group if r["kinks_max"] > 0]
  if kinks:
    lines.append(
      "phi* lies on ReLU kinks (a hidden unit's pre-activation at a "
      "support point is 0) on "
      + ", ".join(
        f"{r['kink_tasks']}/{r['star_converged_tasks']} (lam {r['lam']:g})"
        for r in kinks
      )
      + " of the tasks where it converged"
      + "; there the implicit formula (I + H/lam)^{-1} grad L_q at the "
      "exact phi* misses the derivative of L_q(phi*(theta)) by (median) "
      f"{by_lam(group, 'err_converged_smooth')}."
    )
  nonconvex = [r for r in group if r["nonconvex_tasks"]]
  converged = all(r["star_converged_tasks"] == r["tasks"] for r in summary)
  worst = max(r["stationarity_rel_star_max"] for r in summary)
  text = (
    (
      "The proximal objective is not convex (I + H/lam has negative "
      "eigenvalues at theta or phi_K) on "
      + ", ".join(
        f"{r['nonconvex_tasks']}/{r['tasks']} tasks (lam {r['lam']:g})"
        for r in nonconvex
      )
      + ", where phi* is the local minimiser that descent from theta "
      "reaches; "
    )
    if nonconvex
    else "I + H/lam is positive definite at theta and phi_K on every task; "
  )
  if converged:
    text += (
      f"phi* is stationary to {fmt(worst)} (relative, largest) and a "
      "strict local minimiser on every task."
    )
  else:
    text += (
      "phi* is a strict local minimiser, stationary to "
      f"{STAR_TOLERANCE:g}, on "
      + ", ".join(
        f"{r['star_converged_tasks']}/{r['tasks']} tasks "
        f"({r['point']}, lam {r['lam']:g})"
        for r in summary
        if r["star_converged_tasks"] < r["tasks"]
      )
      + " only (every task elsewhere); the numbers that need phi* "
      "leave the other tasks out."
    )
  lines.append(text)
  return lines


def write_markdown(path, result, compare):
  summary = result["summary"]
  setting = result["setting"]
  scale = [r for r in summary if r["lam"] == summary[0]["lam"]]
  lines = [
    "# iMAML on sinusoid regression: inner loop, curvature and "
    "meta-gradient accuracy vs lam",
    "",
    f"Written by `benchmarks/sinusoid_diagnosis.py` ({setting['seconds']:.0f}"
    " s), in float64, on "
    f"{setting['tasks']} sinusoid tasks (10 support and 10 query points, "
    f"task seed {setting['seed']}):",
    "",
    "    " + setting["command"],
    "",
  ]
  run = setting["run_config"]
  if run:
    lines += [
      f"Trained points from `{setting['workdir']}`, a run with lam "
      f"{run['lam']:g} and {run['inner_steps']} GD steps of "
      f"{run['inner_lr']:g}"
      + (", checked" if run["inner_backtrack"] else "")
      + ".",
      "",
    ]
  lines += [
    "phi_K: the inner loop under diagnosis; phi*: the proximal minimiser "
    f"({setting['solve_steps']} checked GD steps from theta, then "
    f"at most {NEWTON_STEPS} Newton steps on the ReLU kinks it sits on); "
    "g*: the exact derivative of L_q(phi*(theta)) (a dense KKT solve; "
    "(I + H(phi*)/lam)^{-1} grad L_q(phi*) where phi* is on no kink); "
    "g*_smooth: (I + H(phi*)/lam)^{-1} grad L_q(phi*) by a dense solve, "
    "the formula iMAML uses, at the exact phi* (on a kink, H is that of "
    "the side autodiff takes); recipe: "
    "`im.imaml(lam, inner, im.cg(5)).task_gradient`. H is the Hessian of "
    "the support loss, G the proximal objective. Numbers measured "
    "against phi* or g* are over the tasks where phi* converged (column "
    "'phi* converged').",
    "",
  ]
  lines += [
    "Loss scale at theta (median [min, max]): "
    + "; ".join(
      f"{r['point']}: support MSE {spread(r, 'support_loss_theta')}, "
      f"||grad|| {spread(r, 'grad_norm_theta')}, eig(H) from "
      f"{spread(r, 'h_eig_min_theta')} to {spread(r, 'h_eig_max_theta')}"
      for r in scale
    )
    + ".",
    "",
  ]
  lines += [f"## Inner loop: {result['recipe_name']}", ""]
  lines += tables(summary, result["recipe_name"])
  for other in compare:
    lines += [
      f"## Inner loop: {other['recipe_name']}",
      "",
      f"From `{other['path']}` ({other['setting']['command']}).",
      "",
    ]
    lines += tables(other["summary"], other["recipe_name"])
  lines += ["## What the numbers show", ""]
  lines += [" ".join(findings(summary, compare, result["recipe_name"])), ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def plot(path, result, compare):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  recipes = [(result["recipe_name"], result["summary"])] + [
    (o["recipe_name"], o["summary"]) for o in compare
  ]
  points = list(dict.fromkeys(r["point"] for r in result["summary"]))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

  def line(ax, rows, key, label, color, style):
    lams = [r["lam"] for r in rows]
    med = np.array([r[key + "_median"] for r in rows])
    low = np.array([r[key + "_min"] for r in rows])
    high = np.array([r[key + "_max"] for r in rows])
    ax.plot(lams, med, style, color=color, label=label)
    ax.fill_between(lams, low, high, color=color, alpha=0.15)

  for p, point in enumerate(points):
    style = ["o-", "s--", "^:"][p % 3]
    suffix = f" ({point})" if len(points) > 1 else ""
    for c, (name, summary) in enumerate(recipes):
      rows = [r for r in summary if r["point"] == point]
      if not rows:
        continue
      line(
        axes[0], rows, "err_recipe", f"{name}, CG(5){suffix}", colors[c], style
      )
      line(axes[2], rows, "inner_dist_rel", f"{name}{suffix}", colors[c], style)
      if c == 0:
        line(
          axes[1],
          rows,
          "a_eig_min_k",
          f"min at phi_K ({name}){suffix}",
          colors[0],
          style,
        )
        line(
          axes[1],
          rows,
          "a_eig_max_k",
          f"max at phi_K{suffix}",
          colors[1],
          style,
        )
        line(
          axes[1],
          rows,
          "a_eig_min_star",
          f"min at phi*{suffix}",
          colors[2],
          style,
        )
        line(
          axes[1],
          rows,
          "a_eig_max_star",
          f"max at phi*{suffix}",
          colors[3],
          style,
        )
    rows = [r for r in result["summary"] if r["point"] == point]
    line(
      axes[0],
      rows,
      "err_converged_cg5",
      f"converged phi*, CG(5){suffix}",
      "black",
      style,
    )
    line(
      axes[0],
      rows,
      "err_converged_cg5_smooth",
      f"phi*, CG(5) vs g*_smooth: CG alone{suffix}",
      "gray",
      style,
    )
  axes[0].set_yscale("log")
  axes[0].set_ylabel("||g - g*|| / ||g*||")
  axes[0].set_title("meta-gradient: relative error against g*")
  axes[1].set_yscale("symlog", linthresh=1.0)
  axes[1].axhline(0.0, color="gray", lw=0.8)
  axes[1].set_title("eigenvalues of I + H/lam")
  axes[2].set_yscale("log")
  axes[2].set_ylabel("||phi_K - phi*|| / ||phi* - theta||")
  axes[2].set_title("inner loop: distance to the proximal minimiser")
  lams = sorted({r["lam"] for r in result["summary"]})
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
    ax.minorticks_off()
    ax.set_xlabel("lam")
    ax.legend(fontsize=7)
  fig.suptitle(
    f"Sinusoid iMAML, float64, {result['setting']['tasks']} tasks: "
    "medians, bands from min to max over tasks"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_csv(path, summary):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)


def print_summary(summary):
  print(
    f"{'point':20s} {'lam':>5s} {'err recipe':>10s} {'err phi*':>9s} "
    f"{'eigmin_K':>9s} {'eigmax_K':>9s} {'dist':>6s} {'kinks':>5s} "
    f"{'converged':>9s}"
  )
  for r in summary:
    print(
      f"{r['point'][:20]:20s} {r['lam']:5g} {r['err_recipe_median']:10.3g} "
      f"{r['err_converged_cg5_median']:9.3g} "
      f"{r['a_eig_min_k_median']:9.3g} {r['a_eig_max_k_median']:9.3g} "
      f"{r['inner_dist_rel_median']:6.3f} {r['kinks_median']:5g} "
      f"{r['star_converged_tasks']:>7d}/{r['tasks']}"
    )


def check_forward(net, params, x):
  """``mlp_forward`` computes the library's network."""
  ours = mlp_forward(params, x)[0]
  theirs = net.apply({"params": params}, x)
  if not np.allclose(ours, theirs, rtol=1e-12, atol=1e-12):
    raise SystemExit("mlp_forward does not match models.sinusoid_mlp()")


# ----------------------------------------------------------------------------


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--lams", type=float, nargs="+", default=[2.0, 10.0, 30.0, 100.0]
  )
  parser.add_argument("--tasks", type=count(1), default=8)
  parser.add_argument(
    "--seed", type=int, default=1, help="seed of the task sample"
  )
  parser.add_argument(
    "--inner-steps",
    type=count(1),
    default=None,
    help="default: the run's, else 16",
  )
  parser.add_argument(
    "--inner-lr",
    type=float,
    default=None,
    help="default: the run's, else 0.003",
  )
  parser.add_argument(
    "--backtrack",
    action="store_true",
    default=None,
    help="checked GD (default: the run's, else plain)",
  )
  parser.add_argument(
    "--solve-steps",
    type=count(1),
    default=5000,
    help="checked GD steps towards phi* before Newton",
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="also diagnose this run's best and last params",
  )
  parser.add_argument(
    "--compare",
    nargs="*",
    default=[],
    help="JSON results of other runs of this script",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="2 tasks, lam 2 and 30, *_quick.* files",
  )
  parser.add_argument(
    "--no-compile-cache",
    action="store_true",
    help="compile afresh instead of using imaml-train's persistent XLA cache",
  )
  parser.add_argument("--tag", default=None, help="output file suffix")
  parser.add_argument("--out", default=RESULTS, help="output folder")
  args = parser.parse_args(argv)
  if args.quick:
    args.tasks, args.lams, args.solve_steps = 2, [2.0, 30.0], 2000
  return args


def main(argv=None):
  args = parse_args(argv)
  command = "python benchmarks/sinusoid_diagnosis.py " + " ".join(
    argv if argv is not None else __import__("sys").argv[1:]
  )
  start = time.perf_counter()
  compare = []
  for path in args.compare:
    other = load_compare(path)
    other["path"] = os.path.relpath(path)
    compare.append(other)
  if not args.no_compile_cache:
    cli.enable_compile_cache(None)
  net = models.sinusoid_mlp()
  loss = models.regression_loss(net)
  template = models.init_params(net, jax.random.key(0), jnp.zeros((K_SHOT, 1)))
  points = {"initialisation": template}
  run_config = None
  if args.workdir:
    run_config, trained = load_points(args.workdir, template)
    points.update(trained)
  recipe = resolve_recipe(args, run_config)
  inner = im.gd(
    recipe["inner_steps"], recipe["inner_lr"], backtrack=recipe["backtrack"]
  )
  tasks = to_float64(
    data.sinusoid_tasks(jax.random.key(args.seed), args.tasks, K_SHOT, Q_QUERY)
  )
  for theta in points.values():
    check_forward(net, to_float64(theta), tasks.support[0][0])
  print(
    f"inner loop {recipe_name(recipe)}; lams {args.lams}; {args.tasks} tasks",
    flush=True,
  )
  diagnosis = make_diagnosis(loss, inner, args.solve_steps)
  rows, summary = [], []
  for point, theta in points.items():
    print(f"{point}:", flush=True)
    point_rows = diagnose_point(diagnosis, theta, tasks, args.lams)
    rows += [dict(r, point=point) for r in point_rows]
    summary += aggregate(point_rows, point)
  seconds = time.perf_counter() - start
  print_summary(summary)

  setting = dict(
    vars(args),
    recipe=recipe,
    seconds=seconds,
    command=command,
    run_config=(None if run_config is None else config_lib.to_dict(run_config)),
  )
  result = {
    "setting": setting,
    "recipe_name": recipe_name(recipe),
    "summary": summary,
    "tasks": rows,
  }
  os.makedirs(args.out, exist_ok=True)
  stem = (
    "sinusoid_diagnosis"
    + (f"_{args.tag}" if args.tag else "")
    + ("_quick" if args.quick else "")
  )
  stem = os.path.join(args.out, stem)
  with open(stem + ".json", "w") as f:
    json.dump(json_safe(result), f, indent=1)
  write_csv(stem + ".csv", summary)
  write_markdown(stem + ".md", result, compare)
  plot(stem + ".png", result, compare)
  print(f"{seconds:.0f} s; wrote {stem}.{{csv,json,md,png}}")
  return result


if __name__ == "__main__":
  main()
