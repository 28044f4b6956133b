import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imaml_jax as im
from problems import rel_err


def spd_system(seed, n=12, cond=30.0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eig = np.geomspace(1.0, cond, n)
  a = (q * eig) @ q.T
  return a, rng.normal(size=n)


def test_three_solvers_agree_with_numpy_on_spd_system(x64):
  a, b = spd_system(0, cond=1.8)  # eigenvalues in [1, 1.8]: Neumann converges
  a, b = jnp.asarray(a), jnp.asarray(b)
  exact = np.linalg.solve(np.asarray(a), np.asarray(b))
  matvec = lambda v: a @ v
  for solver in (im.dense(), im.cg(maxiter=50, tol=1e-14),
                 im.neumann(terms=200, step=0.9)):
    x, info = jax.jit(solver.solve, static_argnums=0)(matvec, b)
    assert rel_err(x, exact) < 1e-10, solver.name
    assert float(info.residual) < 1e-10, solver.name


def test_cg_error_shrinks_with_iterations(x64):
  a, b = spd_system(1, cond=100.0)
  exact = np.linalg.solve(a, b)
  a, b = jnp.asarray(a), jnp.asarray(b)
  errors = [rel_err(im.cg(maxiter=k, tol=0.0).solve(lambda v: a @ v, b)[0],
                    exact) for k in (1, 3, 6, 12, 30)]
  assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-10


def test_residual_reveals_unconverged_solve(x64):
  a, b = spd_system(2, cond=1000.0)
  a, b = jnp.asarray(a), jnp.asarray(b)
  _, info = im.cg(maxiter=2).solve(lambda v: a @ v, b)
  assert float(info.residual) > 1e-2
  # Neumann diverges when ||I - A|| > 1: the residual says so.
  _, info = im.neumann(terms=30).solve(lambda v: a @ v, b)
  assert float(info.residual) > 1.0


def test_residual_matches_its_definition(x64):
  a, b = spd_system(3)
  a, b = jnp.asarray(a), jnp.asarray(b)
  x, info = im.cg(maxiter=3).solve(lambda v: a @ v, b)
  expected = np.linalg.norm(a @ x - b) / np.linalg.norm(b)
  np.testing.assert_allclose(float(info.residual), expected, rtol=1e-12)
  _, info = im.cg(maxiter=3, report_residual=False).solve(lambda v: a @ v, b)
  assert np.isnan(info.residual)


def test_solvers_accept_pytrees(x64):
  a, b = spd_system(4, n=6, cond=1.5)
  a = jnp.asarray(a)
  def matvec(tree):
    flat = jnp.concatenate([tree["u"], tree["v"].ravel()])
    out = a @ flat
    return {"u": out[:2], "v": out[2:].reshape(2, 2)}
  rhs = {"u": jnp.asarray(b[:2]), "v": jnp.asarray(b[2:].reshape(2, 2))}
  exact = np.linalg.solve(np.asarray(a), b)
  for solver in (im.dense(), im.cg(50, tol=1e-14), im.neumann(100, 0.9)):
    x, _ = solver.solve(matvec, rhs)
    flat = np.concatenate([x["u"], np.ravel(x["v"])])
    np.testing.assert_allclose(flat, exact, rtol=1e-9, atol=1e-12)


def test_zero_right_hand_side_gives_zero_and_zero_residual():
  x, info = im.cg(5).solve(lambda v: 2.0 * v, jnp.zeros(3))
  np.testing.assert_array_equal(x, 0.0)
  assert float(info.residual) == 0.0


@pytest.mark.parametrize("factory, kwargs, message", [
    (im.cg, {"maxiter": 0}, "maxiter"),
    (im.cg, {"maxiter": 2.5}, "maxiter"),
    (im.cg, {"maxiter": 5, "tol": -1.0}, "tol"),
    (im.neumann, {"terms": 0}, "terms"),
    (im.neumann, {"terms": 3, "step": 0.0}, "step"),
])
def test_bad_solver_settings_are_named(factory, kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    factory(**kwargs)


@pytest.mark.parametrize("solver", [im.cg(5), im.cg(5, report_residual=False),
                                    im.neumann(5), im.dense()])
def test_nonfinite_right_hand_side_is_not_turned_into_a_finite_answer(solver):
  x, _ = solver.solve(lambda v: 2.0 * v, jnp.array([1.0, jnp.nan, 2.0]))
  assert bool(jnp.all(jnp.isnan(x)))
