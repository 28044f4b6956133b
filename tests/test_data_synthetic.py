"""Tests of the synthetic task families and the exact linear meta-gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imaml_jax import data as imdata


@pytest.fixture
def enable_x64():
  """64-bit floats for the duration of one test (restored afterwards)."""
  with jax.enable_x64(True):
    yield


def test_sinusoid_shapes_and_ranges():
  task = imdata.sinusoid_tasks(jax.random.key(0), 64, 10, 7)
  (xs, ys), (xq, yq) = task.support, task.query
  assert xs.shape == ys.shape == (64, 10, 1)
  assert xq.shape == yq.shape == (64, 7, 1)
  assert all(a.dtype == jnp.float32 for a in (xs, ys, xq, yq))
  assert float(jnp.abs(xs).max()) <= 5.0 and float(jnp.abs(xq).max()) <= 5.0
  # Each task is A sin(x - b) = a sin x + c cos x with A = |(a, c)|, shared
  # by its support and query sets: fit (a, c) on all 17 points.
  x = np.concatenate([xs, xq], axis=1)[..., 0].astype(np.float64)
  y = np.concatenate([ys, yq], axis=1)[..., 0].astype(np.float64)
  for t in range(64):
    basis = np.stack([np.sin(x[t]), np.cos(x[t])], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y[t], rcond=None)
    np.testing.assert_allclose(basis @ coef, y[t], atol=1e-4)
    amplitude = np.hypot(*coef)
    phase = np.arctan2(
      -coef[1], coef[0]
    )  # A sin(x - b): a = A cos b, c = -A sin b
    assert 0.1 - 1e-4 <= amplitude <= 5.0 + 1e-4
    assert -1e-4 <= phase <= np.pi + 1e-4


def test_sinusoid_draws_cover_the_maml_ranges():
  """Amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5], as in MAML."""
  n_tasks = 2000
  task = imdata.sinusoid_tasks(jax.random.key(4), n_tasks, 10, 10)
  (xs, ys), (xq, yq) = task.support, task.query
  x = np.concatenate([xs, xq], axis=1)[..., 0].astype(np.float64)
  y = np.concatenate([ys, yq], axis=1)[..., 0].astype(np.float64)
  # y = a sin x + c cos x with a = A cos b, c = -A sin b: solve for (a, c).
  basis = np.stack([np.sin(x), np.cos(x)], axis=-1)
  gram = np.einsum("tni,tnj->tij", basis, basis)
  a, c = np.linalg.solve(gram, np.einsum("tni,tn->ti", basis, y)[..., None])[
    ..., 0
  ].T
  amplitude, phase = np.hypot(a, c), np.arctan2(-c, a)
  # 2000 uniform draws reach within 1% of each end of their range.
  assert 0.1 - 1e-3 < amplitude.min() < 0.15
  assert 4.95 < amplitude.max() < 5.0 + 1e-3
  assert -1e-3 < phase.min() < 0.03
  assert np.pi - 0.03 < phase.max() < np.pi + 1e-3
  assert -5.0 <= x.min() < -4.99 and 4.99 < x.max() <= 5.0
  # Each task's query inputs are drawn apart from its support inputs.
  assert not (xq[:, :, None, 0] == xs[:, None, :, 0]).any()


def test_sinusoid_deterministic_and_jittable():
  a = imdata.sinusoid_tasks(jax.random.key(1), 4, 5, 5)
  b = jax.jit(lambda k: imdata.sinusoid_tasks(k, 4, 5, 5))(jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="k_shot must be a positive int"):
    imdata.sinusoid_tasks(jax.random.key(0), 4, 0, 5)


def test_linear_regression_tasks():
  task = imdata.linear_regression_tasks(
    jax.random.key(0), 3, 20, 30, 4, noise=0.0
  )
  (xs, ys), (xq, yq) = task.support, task.query
  assert xs.shape == (3, 20, 4) and ys.shape == (3, 20)
  assert xq.shape == (3, 30, 4) and yq.shape == (3, 30)
  # Noise-free: one weight vector explains both sets of a task.
  for t in range(3):
    x = np.concatenate([xs[t], xq[t]]).astype(np.float64)
    y = np.concatenate([ys[t], yq[t]]).astype(np.float64)
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    np.testing.assert_allclose(x @ w, y, atol=1e-4)
  with pytest.raises(ValueError, match="dim must be a positive int"):
    imdata.linear_regression_tasks(jax.random.key(0), 3, 20, 30, 0)


def _query_loss_at_solution(theta, task, lam):
  phi = imdata.linear_regression_inner_solution(theta, task.support, lam)
  return imdata.linear_regression_loss(phi, task.query)


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0])
def test_exact_meta_gradient_matches_finite_differences(enable_x64, lam):
  dim, n_tasks, eps = 5, 4, 1e-5
  tasks = imdata.linear_regression_tasks(
    jax.random.key(2), n_tasks, 8, 12, dim, noise=0.3
  )
  assert tasks.support[0].dtype == jnp.float64
  theta = jax.random.normal(jax.random.key(3), (dim,), jnp.float64)
  grads = jax.vmap(
    imdata.linear_regression_exact_meta_gradient, in_axes=(None, 0, None)
  )(theta, tasks, lam)
  assert grads.shape == (n_tasks, dim)

  @jax.jit
  def central_differences(theta, task):
    def along(e):
      return (
        _query_loss_at_solution(theta + eps * e, task, lam)
        - _query_loss_at_solution(theta - eps * e, task, lam)
      ) / (2 * eps)

    return jax.vmap(along)(jnp.eye(dim))

  fd = jax.vmap(central_differences, in_axes=(None, 0))(theta, tasks)
  np.testing.assert_allclose(grads, fd, rtol=1e-7, atol=1e-9)
  # Independent check: reverse-mode autodiff through the closed form.
  auto = jax.vmap(jax.grad(_query_loss_at_solution), in_axes=(None, 0, None))(
    theta, tasks, lam
  )
  np.testing.assert_allclose(grads, auto, rtol=1e-10, atol=1e-12)


def test_inner_solution_is_stationary(enable_x64):
  tasks = imdata.linear_regression_tasks(jax.random.key(5), 1, 6, 6, 9)
  task = jax.tree.map(lambda a: a[0], tasks)
  theta = jnp.linspace(-1.0, 1.0, 9)
  lam = 2.0
  phi = imdata.linear_regression_inner_solution(theta, task.support, lam)
  grad = jax.grad(
    lambda p: (
      imdata.linear_regression_loss(p, task.support)
      + 0.5 * lam * jnp.sum((p - theta) ** 2)
    )
  )(phi)
  np.testing.assert_allclose(grad, 0.0, atol=1e-12)
