"""Synthetic task families: sinusoid regression and linear regression.

All functions are pure and jittable (counts are static Python ints).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from imaml_jax._src.types import Task


def _check_positive(**counts) -> None:
  for name, value in counts.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


@functools.partial(
  jax.jit,
  static_argnames=(
    "n_tasks",
    "k_shot",
    "q_query",
    "amplitude_range",
    "phase_range",
    "input_range",
  ),
)
def sinusoid_tasks(
  key,
  n_tasks: int,
  k_shot: int,
  q_query: int,
  *,
  amplitude_range: tuple[float, float] = (0.1, 5.0),
  phase_range: tuple[float, float] = (0.0, jnp.pi),
  input_range: tuple[float, float] = (-5.0, 5.0),
) -> Task:
  """Sinusoid regression tasks of MAML (Finn et al., 2017, section 5.1).

  Each task is ``y = A sin(x - b)`` with amplitude ``A ~ U[0.1, 5]`` and phase
  ``b ~ U[0, pi]``; inputs are ``x ~ U[-5, 5]``, drawn independently for the
  support and query sets. There is no observation noise.

  Args:
    key: a PRNG key.
    n_tasks: tasks in the batch.
    k_shot: support points per task.
    q_query: query points per task.
    amplitude_range: ``(low, high)`` of the uniform amplitude.
    phase_range: ``(low, high)`` of the uniform phase.
    input_range: ``(low, high)`` of the uniform inputs.

  Returns:
    ``Task(support=(x, y), query=(x, y))`` with
    ``support[0], support[1]: float32[n_tasks, k_shot, 1]`` and
    ``query[0], query[1]: float32[n_tasks, q_query, 1]``.

  Example:
    >>> import jax
    >>> task = sinusoid_tasks(jax.random.key(0), 4, 10, 10)
    >>> task.support[0].shape
    (4, 10, 1)
  """
  _check_positive(n_tasks=n_tasks, k_shot=k_shot, q_query=q_query)
  # One draw of U[0, 1) numbers for amplitude, phase and inputs.
  u = jax.random.uniform(key, (n_tasks, 2 + k_shot + q_query, 1), jnp.float32)

  def scale(v, bounds):
    low, high = bounds
    return low + (high - low) * v

  amplitude = scale(u[:, :1], amplitude_range)
  phase = scale(u[:, 1:2], phase_range)
  x = scale(u[:, 2:], input_range)
  y = amplitude * jnp.sin(x - phase)
  return Task(
    support=(x[:, :k_shot], y[:, :k_shot]), query=(x[:, k_shot:], y[:, k_shot:])
  )


@functools.partial(
  jax.jit, static_argnames=("n_tasks", "n_support", "n_query", "dim", "dtype")
)
def linear_regression_tasks(
  key,
  n_tasks: int,
  n_support: int,
  n_query: int,
  dim: int,
  *,
  noise: float = 0.1,
  dtype=None,
) -> Task:
  """Linear regression tasks, whose iMAML meta-gradient is known exactly.

  Each task draws ``w_task ~ N(0, I_dim)``, inputs ``X ~ N(0, I)`` row-wise
  and targets ``y = X w_task + noise * eps`` with ``eps ~ N(0, 1)``. Used for
  the paper's Figure 2a together with
  :func:`linear_regression_exact_meta_gradient`.

  Args:
    key: a PRNG key.
    n_tasks: tasks in the batch.
    n_support: support points per task.
    n_query: query points per task.
    dim: input dimension.
    noise: standard deviation of the target noise.
    dtype: floating dtype (default: JAX's default float, float64 when x64 is
      enabled).

  Returns:
    ``Task(support=(X, y), query=(X, y))`` with
    ``X: [n_tasks, n, dim]`` and ``y: [n_tasks, n]``.

  Example:
    >>> import jax
    >>> task = linear_regression_tasks(jax.random.key(0), 8, 20, 20, 5)
    >>> task.support[0].shape, task.support[1].shape
    ((8, 20, 5), (8, 20))
  """
  _check_positive(
    n_tasks=n_tasks, n_support=n_support, n_query=n_query, dim=dim
  )
  if dtype is None:
    dtype = jnp.zeros(()).dtype  # the default float under the current config
  n = n_support + n_query
  # One draw for weights, inputs and noise (a single PRNG call compiles fast).
  z = jax.random.normal(key, (n_tasks, dim + n * dim + n), dtype)
  w = z[:, :dim]
  x = z[:, dim : dim + n * dim].reshape(n_tasks, n, dim)
  eps = z[:, dim + n * dim :]
  y = jnp.sum(x * w[:, None, :], axis=-1) + jnp.asarray(noise, dtype) * eps
  return Task(
    support=(x[:, :n_support], y[:, :n_support]),
    query=(x[:, n_support:], y[:, n_support:]),
  )


def _spd_solve(a, b):
  """Solves ``a x = b`` for symmetric positive definite ``a`` (Cholesky)."""
  return jsl.cho_solve(jsl.cho_factor(a), b)


def linear_regression_loss(w, data):
  """Mean squared error ``L(w, (X, y)) = ||X w - y||^2 / (2 n)``.

  Args:
    w: ``[dim]`` weights.
    data: ``(X[n, dim], y[n])``.

  Returns:
    The scalar loss.
  """
  x, y = data
  r = x @ w - y
  return 0.5 * jnp.mean(r * r)


def linear_regression_inner_solution(theta, support, lam):
  """Exact solution of the proximal inner problem for one linear task.

  ``phi* = argmin_phi L(phi, (X, y)) + lam/2 ||phi - theta||^2``. Setting the
  gradient ``H phi - b + lam (phi - theta)`` to zero, with
  ``H = X^T X / n`` and ``b = X^T y / n``, gives

  ``phi* = (H + lam I)^{-1} (b + lam theta)``.

  Args:
    theta: ``[dim]`` meta-parameters.
    support: ``(X[n, dim], y[n])``.
    lam: proximal regularisation strength ``lam > 0``.

  Returns:
    ``phi*``, shape ``[dim]``.
  """
  x, y = support
  n, dim = x.shape
  h = x.T @ x / n
  b = x.T @ y / n
  return _spd_solve(h + lam * jnp.eye(dim, dtype=h.dtype), b + lam * theta)


def linear_regression_exact_meta_gradient(theta, task: Task, lam):
  """Exact iMAML meta-gradient ``d/dtheta L_query(phi*(theta))`` of one task.

  With ``H = X_s^T X_s / n_s`` the (constant) Hessian of the support loss,
  the inner solution (:func:`linear_regression_inner_solution`) is
  ``phi*(theta) = (H + lam I)^{-1} (X_s^T y_s / n_s + lam theta)``, so its
  Jacobian is ``d phi* / d theta = lam (H + lam I)^{-1} = (I + H/lam)^{-1}``
  (the paper's Lemma 1, here exact since the loss is quadratic). The Jacobian
  is symmetric, hence by the chain rule

  ``g = (I + H/lam)^{-1} grad L_query(phi*)``,
  ``grad L_query(phi) = X_q^T (X_q phi - y_q) / n_q``.

  Use ``jax.vmap(..., in_axes=(None, 0, None))`` for a batch of tasks.

  Args:
    theta: ``[dim]`` meta-parameters.
    task: one task, ``Task(support=(X_s, y_s), query=(X_q, y_q))``.
    lam: proximal regularisation strength ``lam > 0``.

  Returns:
    ``g``, shape ``[dim]``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> tasks = linear_regression_tasks(jax.random.key(0), 4, 20, 20, 3)
    >>> g = jax.vmap(linear_regression_exact_meta_gradient,
    ...              in_axes=(None, 0, None))(jnp.zeros(3), tasks, 2.0)
    >>> g.shape
    (4, 3)
  """
  phi = linear_regression_inner_solution(theta, task.support, lam)
  x_s, _ = task.support
  x_q, y_q = task.query
  n_s, dim = x_s.shape
  h = x_s.T @ x_s / n_s
  grad_query = x_q.T @ (x_q @ phi - y_q) / x_q.shape[0]
  return _spd_solve(jnp.eye(dim, dtype=h.dtype) + h / lam, grad_query)
