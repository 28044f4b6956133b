r"""Inner-loop algorithms: approximate minimisers of a task objective.

An inner algorithm is an :class:`InnerSolver` whose ``run(objective, x0)``
starts at ``x0`` and returns an approximate minimiser of the scalar function
``objective``. Loops are ``lax.scan`` (or ``lax.while_loop`` for the line
search), never Python loops over steps, so a jitted caller traces one step.

For iMAML the objective is the proximal task objective of the paper's Eq. 4,

.. math:: G(\phi) = L_{support}(\phi) + \frac{\lambda}{2}\|\phi - \theta\|^2,

built by :func:`proximal_objective`; MAML, first-order MAML and Reptile run
the same algorithms on ``L_support`` alone. That objective is a
:class:`ProximalObjective`, a callable that also carries its parts (the task
loss, the centre ``theta`` and ``lam``), so a solver may treat them apart:
:func:`gd_then_pull_back`, the inner loop of the authors' public code, steps
on the task loss alone and then on the proximal term alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from imaml_jax._src import hvp as hvp_lib
from imaml_jax._src import tree_util as tu
from imaml_jax._src import validation
from imaml_jax._src.types import PyTree

Objective = Callable[[PyTree], jax.Array]


class InnerSolver(NamedTuple):
  """An inner-loop algorithm.

  Attributes:
    run: ``run(objective, x0, *, remat=False) -> x``. With ``remat=True`` each
      step is wrapped in ``jax.checkpoint`` so that differentiating through the
      loop (MAML) stores only the per-step iterates, recomputing the rest.
    steps: number of outer iterations of the algorithm.
    name: human-readable description.
  """

  run: Callable[..., PyTree]
  steps: int
  name: str


@dataclasses.dataclass(frozen=True, eq=False)
class ProximalObjective:
  r"""``phi -> task_loss(phi) + lam/2 ||phi - center||^2``, with its parts.

  Called like any objective; the parts let an inner solver step on the task
  loss and on the proximal term separately (:func:`gd_then_pull_back`).

  Attributes:
    task_loss: ``phi -> scalar``, the task (support) loss ``L``.
    center: the point ``theta`` the proximal term pulls towards.
    lam: the proximal strength ``lambda``.
  """

  task_loss: Objective
  center: PyTree
  lam: Any

  def __call__(self, phi: PyTree) -> jax.Array:
    return self.task_loss(phi) + 0.5 * self.lam * tu.tree_sq_norm(
        tu.tree_sub(phi, self.center))


def proximal_objective(loss: Callable[[PyTree, PyTree], jax.Array],
                       params: PyTree, batch: PyTree,
                       lam) -> ProximalObjective:
  r"""``phi -> loss(phi, batch) + lam/2 ||phi - params||^2`` (paper, Eq. 4).

  Returns a :class:`ProximalObjective`: a callable that also carries
  ``task_loss = phi -> loss(phi, batch)``, ``center = params`` and ``lam``.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> f = im.proximal_objective(lambda x, b: (x * b).sum(), jnp.zeros(2),
    ...                           jnp.ones(2), 2.0)
    >>> f(jnp.ones(2)), f.task_loss(jnp.ones(2)), f.lam
    (Array(4., dtype=float32), Array(2., dtype=float32), 2.0)
  """
  return ProximalObjective(task_loss=lambda phi: loss(phi, batch),
                           center=params, lam=lam)


def _scan_steps(step, x0, steps: int, remat: bool):
  body = jax.checkpoint(step) if remat else step
  final, _ = jax.lax.scan(lambda c, _: (body(c), None), x0, None, length=steps)
  return final


def gd(steps: int = 16, lr: float = 0.1, *, backtrack: bool = False,
       shrink: float = 0.5, armijo: float = 1e-4) -> InnerSolver:
  r"""Gradient descent: ``x_{t+1} = x_t - lr * grad f(x_t)`` for ``steps`` steps.

  The inner solver of "iMAML, GD" in the paper (16 steps at 5-way, 25 at
  20-way Omniglot) and of MAML.

  Plain gradient descent with a fixed ``lr`` is stable only while
  ``lr < 2 / L``, ``L`` the largest curvature of ``f``; for the proximal
  objective ``L = lam + eig_max(H)``, and meta-training can sharpen the task
  loss until a fixed ``lr`` crosses that bound, after which the inner loop
  diverges and the implicit meta-gradient (which assumes a minimiser) is
  meaningless. With ``backtrack=True`` every step is checked instead:

  .. math::
     x' = x_t - \eta_t \nabla f(x_t), \qquad
     (x_{t+1}, \eta_{t+1}) =
     \begin{cases} (x', \eta_t) & f(x') \le f(x_t)
                      - c \, \eta_t \|\nabla f(x_t)\|^2 + 16 \epsilon |f(x_t)|
                      \\
                    (x_t, \eta_t \cdot \text{shrink}) & \text{otherwise,}
     \end{cases}

  from ``eta_0 = lr``, with Armijo's constant ``c`` (``armijo``) and a few
  ulps of slack for rounding near the minimiser (``epsilon`` the machine
  epsilon): a step that does not decrease ``f`` enough (or gives a
  non-finite value) is rejected and the step size shrinks for the rest of the
  loop. The objective never increases (beyond rounding), and while every step is accepted the
  iterates are those of plain gradient descent. Each step costs one
  ``value_and_grad``, as a plain step costs one ``grad``, plus one at ``x_0``.

  Args:
    steps: number of steps (rejected ones included).
    lr: the (initial) step size.
    backtrack: reject steps that do not decrease ``f`` and shrink ``lr``.
    shrink: factor in ``(0, 1)`` applied to the step size on a rejection.
    armijo: the sufficient-decrease constant ``c`` in ``[0, 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> x = im.gd(steps=100, lr=0.5).run(lambda x: ((x - 3.0) ** 2).sum(),
    ...                                  jnp.zeros(2))
    >>> x.round(4)
    Array([3., 3.], dtype=float32)
    >>> # lr = 1.5 > 2/L = 1 diverges without the check, converges with it:
    >>> x = im.gd(steps=100, lr=1.5, backtrack=True).run(
    ...     lambda x: ((x - 3.0) ** 2).sum(), jnp.zeros(2))
    >>> x.round(4)
    Array([3., 3.], dtype=float32)
  """
  validation.check_positive_int("gd steps", steps)
  validation.check_positive_scalar("gd lr", lr)
  validation.check_positive_scalar("gd shrink", shrink)
  if not float(shrink) < 1:
    raise ValueError(f"gd shrink must be < 1, got {shrink}.")
  validation.check_positive_scalar("gd armijo", armijo, allow_zero=True)
  if not float(armijo) < 1:
    raise ValueError(f"gd armijo must be < 1, got {armijo}.")

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    if not backtrack:
      grad = jax.grad(objective)

      def step(x):
        return tu.tree_axpy(-lr, grad(x), x)

      return _scan_steps(step, x0, steps, remat)

    value_and_grad = jax.value_and_grad(objective)

    def trial(carry, evaluate):
      """Tries ``x - eta g``; returns where it is accepted and the trial."""
      x, f, g, eta = carry
      x_new = tu.tree_axpy(-eta, g, x)
      f_new, g_new = evaluate(x_new)
      # A few ulps of slack: near the minimiser rounding alone can make
      # f(x') exceed f(x); rejecting then would stall the loop.
      slack = 16 * jnp.finfo(f.dtype).eps * jnp.abs(f)
      bound = f - armijo * eta * tu.tree_sq_norm(g) + slack
      return jax.lax.stop_gradient(f_new <= bound), x_new, f_new, g_new

    def checked_step(carry):
      x, f, g, eta = carry
      accept, x_new, f_new, g_new = trial(carry, value_and_grad)
      return (tu.tree_where(accept, x_new, x), jnp.where(accept, f_new, f),
              tu.tree_where(accept, g_new, g),
              jnp.where(accept, eta, eta * shrink))

    f0, g0 = value_and_grad(x0)
    eta0 = jnp.asarray(lr, jnp.result_type(f0))
    carry = _scan_steps(checked_step, (x0, f0, g0, eta0), steps - 1, remat)
    # The last step needs only the value at its trial point: no gradient.
    accept, x_new, _, _ = trial(carry, lambda x: (objective(x), None))
    return tu.tree_where(accept, x_new, carry[0])

  name = f"gd(steps={steps}, lr={lr}" + (", backtrack" if backtrack else "")
  return InnerSolver(run=run, steps=steps, name=name + ")")


def nesterov(steps: int = 16, lr: float = 0.1,
             momentum: float = 0.9) -> InnerSolver:
  r"""Nesterov's accelerated gradient with constant momentum.

  .. math::
     y_t = x_t + \mu (x_t - x_{t-1}), \qquad
     x_{t+1} = y_t - \eta \nabla f(y_t),

  from ``x_{-1} = x_0``. The paper's Theorem 2 analyses this accelerated
  variant: on the strongly convex proximal objective it needs fewer inner steps
  than gradient descent for the same accuracy.
  """
  validation.check_positive_int("nesterov steps", steps)
  validation.check_positive_scalar("nesterov lr", lr)
  validation.check_positive_scalar("nesterov momentum", momentum,
                                   allow_zero=True)
  if float(momentum) >= 1:
    raise ValueError(f"nesterov momentum must be < 1, got {momentum}.")

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    grad = jax.grad(objective)

    def step(carry):
      x, x_prev = carry
      y = tu.tree_axpy(momentum, tu.tree_sub(x, x_prev), x)
      return tu.tree_axpy(-lr, grad(y), y), x

    x, _ = _scan_steps(step, (x0, x0), steps, remat)
    return x

  return InnerSolver(run=run, steps=steps,
                     name=f"nesterov(steps={steps}, lr={lr}, momentum={momentum})")


def _pull_back(phi: PyTree, center: PyTree, lam, lr) -> PyTree:
  """A gradient step on ``lam/2 ||phi - center||^2``.

  That is ``phi - lr * lam * (phi - center)``.
  """
  return tu.tree_axpy(-lr, tu.tree_scale(lam, tu.tree_sub(phi, center)), phi)


def gd_then_pull_back(steps: int = 16, lr: float = 0.1) -> InnerSolver:
  r"""The authors' inner loop: steps on the task loss, then a pull-back.

  Needs a :class:`ProximalObjective` ``L(phi) + lam/2 ||phi - theta||^2``
  (what :func:`imaml_jax.adapt` and :func:`imaml_jax.imaml` pass) and uses
  its parts, not its sum: ``steps`` (``K``) plain gradient steps on the task
  loss ``L`` alone, then one gradient step of the same size on the proximal
  term alone,

  .. math::
     \phi_{t+1} = \phi_t - \eta \nabla L(\phi_t) \quad (t < K), \qquad
     \phi = \phi_K - \eta \lambda (\phi_K - \theta)
           = (1 - \eta\lambda)\, \phi_K + \eta\lambda\, \theta,

  from ``phi_0 = x0``, i.e. ``0.8 phi_K + 0.2 theta`` at ``eta = 0.1``,
  ``lam = 2``. This is the inner loop of the authors' public code
  (``examples/omniglot_implicit_maml.py``: ``learn_task`` runs SGD on the
  cross-entropy alone, then one ``inner_opt.step()`` on
  ``regularization_loss(w_k, lam)``, whose gradient is
  ``lam (phi - w_k)``; ``implicit_maml/learner_model.py``), not the paper's
  minimisation of the proximal objective: its result is not that
  objective's minimiser, so the implicit gradient of ``adapt`` and ``imaml``
  is then an approximation (the one the authors use).

  Args:
    steps: gradient steps on the task loss (the pull-back is one more).
    lr: the step size ``eta`` of every step.

  Raises:
    TypeError: from ``run``, when the objective is not a
      :class:`ProximalObjective` (a plain loss has no ``lam`` or ``theta``
      to pull back to).

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> loss = lambda x, b: 0.5 * ((x - b) ** 2).sum()  # minimiser: b
    >>> theta = jnp.zeros(2)
    >>> objective = im.proximal_objective(loss, theta, jnp.ones(2), lam=2.0)
    >>> # 100 steps reach b = 1, then 1 - 0.25 * 2 * (1 - 0) = 0.5:
    >>> im.gd_then_pull_back(steps=100, lr=0.25).run(objective, theta).round(4)
    Array([0.5, 0.5], dtype=float32)
    >>> # The proximal minimiser, b / (1 + lam), for comparison:
    >>> im.gd(steps=100, lr=0.25).run(objective, theta).round(4)
    Array([0.3333, 0.3333], dtype=float32)
  """
  validation.check_positive_int("gd_then_pull_back steps", steps)
  validation.check_positive_scalar("gd_then_pull_back lr", lr)

  def run(objective: ProximalObjective, x0: PyTree, *, remat: bool = False):
    if not isinstance(objective, ProximalObjective):
      raise TypeError(
          "gd_then_pull_back needs a proximal objective built by "
          "im.proximal_objective (it steps on the task loss and on the "
          f"proximal term separately), got {type(objective).__name__}; it "
          "applies to iMAML, not to MAML, first-order MAML or Reptile.")
    grad = jax.grad(objective.task_loss)

    def step(x):
      return tu.tree_axpy(-lr, grad(x), x)

    phi = _scan_steps(step, x0, steps, remat)
    return _pull_back(phi, objective.center, objective.lam, lr)

  return InnerSolver(run=run, steps=steps,
                     name=f"gd_then_pull_back(steps={steps}, lr={lr})")


def hessian_free(steps: int = 5, cg_steps: int = 5, *,
                 max_backtracks: int = 10, shrink: float = 0.5,
                 armijo: float = 1e-4) -> InnerSolver:
  r"""Hessian-free (truncated Newton-CG) inner solver, "iMAML, Hessian-Free".

  Each of ``steps`` iterations:

  1. solves ``(nabla^2 f(x)) d = -nabla f(x)`` approximately with ``cg_steps``
     iterations of conjugate gradient, using Hessian-vector products only
     (for the proximal objective ``nabla^2 f = H + lam I``);
  2. falls back to ``d = -nabla f(x)`` if ``d`` is not a descent direction
     (possible when ``H + lam I`` is indefinite for a non-convex loss);
  3. chooses the step size by backtracking line search: the first
     ``alpha = shrink^j``, ``j = 0..max_backtracks``, with the Armijo decrease
     ``f(x + alpha d) <= f(x) + armijo * alpha * <nabla f(x), d>``; if none
     qualifies the iterate is left unchanged.

  The line search sees the iterate through ``lax.stop_gradient``: the chosen
  step size is piecewise constant in ``x``, so differentiating through the
  loop (MAML) treats it as a constant.
  """
  validation.check_positive_int("hessian_free steps", steps)
  validation.check_positive_int("hessian_free cg_steps", cg_steps)
  validation.check_positive_int("hessian_free max_backtracks", max_backtracks)
  validation.check_positive_scalar("hessian_free shrink", shrink)
  validation.check_positive_scalar("hessian_free armijo", armijo)
  if not float(shrink) < 1:
    raise ValueError(f"hessian_free shrink must be < 1, got {shrink}.")

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    grad = jax.grad(objective)

    def step(x):
      g = grad(x)
      d, _ = jax.scipy.sparse.linalg.cg(
          lambda v: hvp_lib.hvp(objective, x, v), tu.tree_scale(-1.0, g),
          maxiter=cg_steps, tol=0.0)
      slope = tu.tree_vdot(g, d)
      descent = slope < 0
      d = tu.tree_where(descent, d, tu.tree_scale(-1.0, g))
      slope = jnp.where(descent, slope, -tu.tree_sq_norm(g))
      alpha = _backtracking(objective, jax.lax.stop_gradient(x),
                            jax.lax.stop_gradient(d),
                            jax.lax.stop_gradient(slope))
      return tu.tree_axpy(alpha, d, x)

    return _scan_steps(step, x0, steps, remat)

  def _backtracking(objective, x, d, slope):
    f0 = objective(x)
    dtype = jnp.result_type(f0)

    def trial(alpha):
      return objective(tu.tree_axpy(alpha, d, x))

    def cond(state):
      j, alpha, accepted = state
      return jnp.logical_and(~accepted, j <= max_backtracks)

    def body(state):
      j, alpha, _ = state
      ok = trial(alpha) <= f0 + armijo * alpha * slope
      return (j + 1, jnp.where(ok, alpha, alpha * shrink), ok)

    _, alpha, accepted = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), jnp.ones((), dtype),
                     jnp.zeros((), bool)))
    return jnp.where(accepted, alpha, jnp.zeros((), dtype))

  return InnerSolver(run=run, steps=steps,
                     name=f"hessian_free(steps={steps}, cg_steps={cg_steps})")
