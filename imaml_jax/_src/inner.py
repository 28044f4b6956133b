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
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imaml_jax._src import hvp as hvp_lib
from imaml_jax._src import linear_solve
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
      tu.tree_sub(phi, self.center)
    )


def proximal_objective(
  loss: Callable[[PyTree, PyTree], jax.Array],
  params: PyTree,
  batch: PyTree,
  lam,
) -> ProximalObjective:
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
  return ProximalObjective(
    task_loss=lambda phi: loss(phi, batch), center=params, lam=lam
  )


@dataclasses.dataclass(frozen=True, eq=False)
class MinibatchObjective:
  r"""A task loss seen one mini-batch per step: ``f_t(phi) = loss(phi, B_t)``.

  ``batches`` is a pytree whose leaves carry a leading axis of ``M``
  mini-batches; step ``t`` (from 0) of a solver uses mini-batch ``t mod M``.
  This is Reptile's inner loop (Nichol et al. 2018; ``--train-shots``
  images per class, ``--inner-batch`` of them a step, in the
  ``openai/supervised-reptile`` code). Only
  :func:`gd` (without ``backtrack``) and :func:`adam` accept it: the other
  solvers compare values of one fixed objective, and calling this one raises.

  Attributes:
    loss: ``(phi, batch) -> scalar``.
    batches: the mini-batches, stacked on a leading axis.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> f = im.MinibatchObjective(lambda x, b: ((x - b) ** 2).sum(),
    ...                           jnp.array([[1.0], [3.0]]))
    >>> f.at(0)(jnp.zeros(1)), f.at(3)(jnp.zeros(1))
    (Array(1., dtype=float32), Array(9., dtype=float32))
  """

  loss: Callable[[PyTree, PyTree], jax.Array]
  batches: PyTree

  @property
  def num_batches(self) -> int:
    return jax.tree_util.tree_leaves(self.batches)[0].shape[0]

  def at(self, t) -> Objective:
    """``phi -> loss(phi, B_{t mod M})``; ``t`` may be traced."""
    index = t % self.num_batches
    batch = jax.tree_util.tree_map(
      lambda b: jax.lax.dynamic_index_in_dim(b, index, keepdims=False),
      self.batches,
    )
    return lambda phi: self.loss(phi, batch)

  def __call__(self, phi: PyTree) -> jax.Array:
    raise TypeError(
      "a MinibatchObjective changes from step to step; only im.gd (without "
      "backtrack) and im.adam step on it, use one of them."
    )


def _gradient_at(objective) -> Callable[[PyTree, jax.Array], PyTree]:
  """``(x, t) -> grad f_t(x)``: mini-batch ``t`` of a MinibatchObjective."""
  if isinstance(objective, MinibatchObjective):
    return lambda x, t: jax.grad(objective.at(t))(x)
  grad = jax.grad(objective)
  return lambda x, t: grad(x)


def _scan_steps(step, x0, steps: int, remat: bool):
  body = jax.checkpoint(step) if remat else step
  final, _ = jax.lax.scan(lambda c, _: (body(c), None), x0, None, length=steps)
  return final


def _slack_epsilon(dtype) -> float:
  """The machine epsilon of ``dtype``, at most float32's."""
  return min(float(jnp.finfo(dtype).eps), float(jnp.finfo(jnp.float32).eps))


def gd(
  steps: int,
  lr: float,
  *,
  backtrack: bool = False,
  shrink: float = 0.5,
  armijo: float = 1e-4,
) -> InnerSolver:
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
  epsilon of ``f``'s dtype, at most float32's, so that a ``bfloat16`` or
  ``float16`` objective gets no slack worth a step up): a step that does
  not decrease ``f`` enough (or gives a non-finite value) is rejected and
  the step size shrinks for the rest of the loop. The objective never
  increases (beyond rounding), and while every step is accepted the
  iterates are those of plain gradient descent. Each
  step costs one ``value_and_grad``, as a plain step costs one ``grad``,
  plus one at ``x_0``, evaluated in the loop's first pass so that the
  gradient has one call site to compile. Without ``backtrack`` it accepts a
  :class:`MinibatchObjective` (step ``t`` on mini-batch ``t``).

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
  validation.check_fraction("gd shrink", shrink)
  validation.check_fraction("gd armijo", armijo, allow_zero=True)

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    if not backtrack:
      grad = _gradient_at(objective)

      def step(carry):
        x, t = carry
        return tu.tree_axpy(-lr, grad(x, t), x), t + 1

      return _scan_steps(step, (x0, jnp.zeros((), jnp.int32)), steps, remat)[0]

    value_and_grad = jax.value_and_grad(objective)

    def trial(carry, evaluate):
      """Tries ``x - eta g`` (``x`` itself while ``first``); returns whether
      it is accepted and the trial."""
      x, f, g, eta, first = carry
      x_new = tu.tree_where(first, x, tu.tree_axpy(-eta, g, x))
      f_new, g_new = evaluate(x_new)
      # A few ulps of slack: near the minimiser rounding alone can make
      # f(x') exceed f(x); rejecting then would stall the loop. At most
      # float32's: 16 ulps of bfloat16 are 12% of f, enough to accept
      # steps that diverge.
      slack = 16 * _slack_epsilon(f.dtype) * jnp.abs(f)
      bound = f - armijo * eta * tu.tree_sq_norm(g) + slack
      return (
        jax.lax.stop_gradient(first | (f_new <= bound)),
        x_new,
        f_new,
        g_new,
      )

    def checked_step(carry):
      """The first call evaluates ``x_0`` itself and keeps it, so that the
      loop holds the only ``value_and_grad`` of the objective: XLA compiles
      each call site apart, and one before the loop was a second copy of
      the objective's gradient to compile."""
      x, f, g, eta, _ = carry
      accept, x_new, f_new, g_new = trial(carry, value_and_grad)
      return (
        tu.tree_where(accept, x_new, x),
        jnp.where(accept, f_new, f),
        tu.tree_where(accept, g_new, g),
        jnp.where(accept, eta, eta * shrink),
        jnp.zeros((), bool),
      )

    f_shape = jax.eval_shape(objective, x0)
    init = (
      x0,
      jnp.zeros(f_shape.shape, f_shape.dtype),
      tu.tree_zeros_like(x0),
      jnp.asarray(lr, f_shape.dtype),
      jnp.ones((), bool),
    )
    carry = _scan_steps(checked_step, init, steps, remat)
    # The last step needs only the value at its trial point: no gradient.
    accept, x_new, _, _ = trial(carry, lambda x: (objective(x), None))
    return tu.tree_where(accept, x_new, carry[0])

  name = f"gd(steps={steps}, lr={lr}" + (", backtrack" if backtrack else "")
  return InnerSolver(run=run, steps=steps, name=name + ")")


def nesterov(steps: int, lr: float, momentum: float = 0.9) -> InnerSolver:
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
  validation.check_fraction("nesterov momentum", momentum, allow_zero=True)

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    grad = jax.grad(objective)

    def step(carry):
      x, x_prev = carry
      y = tu.tree_axpy(momentum, tu.tree_sub(x, x_prev), x)
      return tu.tree_axpy(-lr, grad(y), y), x

    x, _ = _scan_steps(step, (x0, x0), steps, remat)
    return x

  return InnerSolver(
    run=run,
    steps=steps,
    name=f"nesterov(steps={steps}, lr={lr}, momentum={momentum})",
  )


def adam(
  steps: int,
  lr: float,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> InnerSolver:
  r"""Adam (Kingma and Ba, 2015) from a fresh state for each run.

  .. math::
     m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
     v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
     x_t = x_{t-1} - \eta \, \frac{m_t / (1 - \beta_1^t)}
                                {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon},

  elementwise, with ``g_t = grad f(x_{t-1})`` and ``m_0 = v_0 = 0``. Every
  step moves each coordinate by about ``lr`` whatever the gradient's scale;
  with ``b1 = 0`` the first step is ``lr * g / (|g| + eps)``, a signed step.

  Accepts a :class:`MinibatchObjective` (step ``t`` on mini-batch ``t``).
  Reptile's inner loop (Nichol, Achiam and Schulman, 2018) is Adam with
  ``b1 = 0`` and ``lr = 1e-3`` (``DEFAULT_OPTIMIZER`` in
  ``supervised_reptile/models.py``). There the optimizer's moments live on
  across tasks and meta-steps (they are not among the variables Reptile
  resets); here each run starts from zero moments, so a task's adaptation
  depends on that task alone.

  Args:
    steps: number of steps.
    lr: the step size ``eta``.
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the root of the second moment, ``> 0``.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> # A constant gradient, of whatever scale: three steps of lr each.
    >>> x = im.adam(steps=3, lr=0.1).run(
    ...     lambda x: (jnp.array([-3.0, 300.0]) * x).sum(), jnp.zeros(2))
    >>> [round(float(v), 4) for v in x]
    [0.3, -0.3]
  """
  validation.check_positive_int("adam steps", steps)
  validation.check_positive_scalar("adam lr", lr)
  validation.check_positive_scalar("adam eps", eps)
  validation.check_fraction("adam b1", b1, allow_zero=True)
  validation.check_fraction("adam b2", b2, allow_zero=True)

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    grad = _gradient_at(objective)

    def step(carry):
      x, m, v, t = carry
      g = grad(x, t)
      t = t + 1
      m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
      v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
      m_scale = 1 / (1 - b1**t)
      v_scale = 1 / (1 - b2**t)
      # Under x64 the scales are float64; a float32 leaf stays float32.
      at_least_f32 = lambda scale, a: scale.astype(
        jnp.promote_types(a.dtype, jnp.float32)
      )
      x = jax.tree_util.tree_map(
        lambda x, m, v: (
          x
          - (
            lr
            * m
            * at_least_f32(m_scale, m)
            / (jnp.sqrt(v * at_least_f32(v_scale, v)) + eps)
          ).astype(x.dtype)
        ),
        x,
        m,
        v,
      )
      return x, m, v, t

    zeros = tu.tree_zeros_like(x0)
    x, _, _, _ = _scan_steps(
      step, (x0, zeros, zeros, jnp.zeros((), jnp.int32)), steps, remat
    )
    return x

  return InnerSolver(
    run=run, steps=steps, name=f"adam(steps={steps}, lr={lr}, b1={b1}, b2={b2})"
  )


def _pull_back(phi: PyTree, center: PyTree, lam, lr) -> PyTree:
  """A gradient step on ``lam/2 ||phi - center||^2``.

  That is ``phi - lr * lam * (phi - center)``.
  """
  return tu.tree_axpy(-lr, tu.tree_scale(lam, tu.tree_sub(phi, center)), phi)


def gd_then_pull_back(steps: int, lr: float) -> InnerSolver:
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
        "applies to iMAML, not to MAML, first-order MAML or Reptile."
      )
    grad = jax.grad(objective.task_loss)

    def step(x):
      return tu.tree_axpy(-lr, grad(x), x)

    phi = _scan_steps(step, x0, steps, remat)
    return _pull_back(phi, objective.center, objective.lam, lr)

  return InnerSolver(
    run=run, steps=steps, name=f"gd_then_pull_back(steps={steps}, lr={lr})"
  )


def hessian_free(
  steps: int = 20,
  cg_steps: int = 5,
  *,
  stop_at_negative_curvature: bool = False,
  max_backtracks: int = 10,
  shrink: float = 0.5,
  armijo: float = 1e-4,
) -> InnerSolver:
  r"""Hessian-free (truncated Newton-CG) inner solver, "iMAML, Hessian-Free".

  Each of ``steps`` iterations:

  1. solves ``(nabla^2 f(x)) d = -nabla f(x)`` approximately with ``cg_steps``
     iterations of conjugate gradient, using Hessian-vector products only
     (for the proximal objective ``nabla^2 f = H + lam I``), taking every
     step as ``jax.scipy.sparse.linalg.cg`` does. With
     ``stop_at_negative_curvature=True`` CG stops before its first
     direction ``p`` of non-positive curvature, ``p^T nabla^2 f p <= 0``,
     and keeps its iterate (``-nabla f`` if that happens at once): the
     line-search Newton-CG method of Nocedal and Wright (*Numerical
     Optimization*, Algorithm 7.1);
  2. falls back to ``d = -nabla f(x)`` if ``d`` is not a descent direction
     (possible when ``H + lam I`` is indefinite for a non-convex loss);
  3. chooses the step size by backtracking line search: the first
     ``alpha = shrink^j``, ``j = 0..max_backtracks``, with the Armijo decrease
     ``f(x + alpha d) <= f(x) + armijo * alpha * <nabla f(x), d>``; if none
     qualifies the iterate is left unchanged (``armijo`` in ``(0, 1)``: from
     1 on, no step along a descent direction of a strictly convex function
     qualifies).

  The line search sees the iterate through ``lax.stop_gradient``: the chosen
  step size is piecewise constant in ``x``, so differentiating through the
  loop (MAML) treats it as a constant. The direction is differentiated as
  the solution of the Newton system (``lax.custom_linear_solve``, whose
  cotangent is found by the same CG), with or without the stop at negative
  curvature.

  The paper states 5 CG iterations per direction, not the number of Newton
  steps; the default 20 is this library's choice. On Omniglot 5 are too few:
  at the conv net's initialisation (8 tasks, 5-way 1-shot, lam 2) the median
  norm of the proximal gradient is 1.19 after 5 Newton steps (plain CG; 1.55
  stopping at negative curvature), 0.42 after 20, and 0.36 after 16 GD steps
  of 0.05; 5 CG steps on iMAML's system ``I + H/lam`` there leave relative
  residuals of 1.1-1.2, 0.29 and 0.13 (``benchmarks/results/
  curvature_hf_init*.json``, ``curvature_5w1s.json``). More CG iterations do
  not help (5 Newton steps of 20: 1.35 and 1.15). Stopping at negative
  curvature is worse after 20 steps too (0.52 and 0.89, at points where the
  largest eigenvalue of ``I + H/lam`` reaches 5,600). In meta-training, 5
  Newton steps learn far slower than GD, 20 nearly at its pace
  (``benchmarks/results/hf_newton_steps_5w1s.md``).

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> x = im.hessian_free(steps=2).run(lambda x: ((x - 3.0) ** 2).sum(),
    ...                                  jnp.zeros(2))
    >>> x.round(4)
    Array([3., 3.], dtype=float32)
  """
  validation.check_positive_int("hessian_free steps", steps)
  validation.check_positive_int("hessian_free cg_steps", cg_steps)
  validation.check_positive_int("hessian_free max_backtracks", max_backtracks)
  validation.check_fraction("hessian_free shrink", shrink)
  validation.check_fraction("hessian_free armijo", armijo)
  newton_cg = linear_solve.cg(
    cg_steps,
    tol=0.0,
    stop_at_negative_curvature=stop_at_negative_curvature,
    report_residual=False,
  )

  def newton_direction(matvec, b):
    """CG's solution of ``matvec(d) = b``. The guarded CG's
    ``lax.while_loop`` cannot be differentiated in reverse mode, so it is
    wrapped in ``lax.custom_linear_solve``, as ``jax.scipy``'s CG is:
    differentiated through (MAML), the direction is a linear solve with the
    Hessian, its cotangent found by the same CG."""
    solve = lambda matvec, b: newton_cg.solve(matvec, b)[0]
    if not stop_at_negative_curvature:
      return solve(matvec, b)
    return jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True)

  def run(objective: Objective, x0: PyTree, *, remat: bool = False):
    grad = jax.grad(objective)

    def step(x):
      g = grad(x)
      d = newton_direction(
        lambda v: hvp_lib.hvp(objective, x, v), tu.tree_scale(-1.0, g)
      )
      slope = tu.tree_vdot(g, d)
      descent = slope < 0
      d = tu.tree_where(descent, d, tu.tree_scale(-1.0, g))
      slope = jnp.where(descent, slope, -tu.tree_sq_norm(g))
      alpha = _backtracking(
        objective,
        jax.lax.stop_gradient(x),
        jax.lax.stop_gradient(d),
        jax.lax.stop_gradient(slope),
      )
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
      cond,
      body,
      (jnp.zeros((), jnp.int32), jnp.ones((), dtype), jnp.zeros((), bool)),
    )
    return jnp.where(accepted, alpha, jnp.zeros((), dtype))

  guarded = ", stop_at_negative_curvature" if stop_at_negative_curvature else ""
  return InnerSolver(
    run=run,
    steps=steps,
    name=f"hessian_free(steps={steps}, cg_steps={cg_steps}{guarded})",
  )
