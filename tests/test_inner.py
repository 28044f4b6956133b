import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imaml_jax as im
from problems import linreg_exact, linreg_loss, linreg_task, rel_err


def proximal_linreg(seed, lam=2.0):
  support, query = linreg_task(seed)
  theta = np.random.default_rng(seed + 100).normal(size=5)
  phi, _ = linreg_exact(theta, support, query, lam)
  objective = im.proximal_objective(linreg_loss, jnp.asarray(theta),
                                    support, lam)
  return objective, jnp.asarray(theta), phi


@pytest.mark.parametrize("inner, tol", [
    (im.gd(steps=200, lr=0.2), 1e-12),
    (im.nesterov(steps=100, lr=0.2, momentum=0.5), 1e-12),
    (im.hessian_free(steps=3, cg_steps=5), 1e-12),
])
def test_inner_solvers_reach_the_closed_form_proximal_point(x64, inner, tol):
  objective, theta, phi = proximal_linreg(0)
  assert rel_err(jax.jit(lambda t: inner.run(objective, t))(theta), phi) < tol


def test_nesterov_beats_gd_at_equal_steps_on_ill_conditioned_quadratic(x64):
  a = jnp.diag(jnp.geomspace(0.01, 1.0, 20))
  f = lambda x: 0.5 * x @ a @ x
  x0 = jnp.ones(20)
  x_gd = im.gd(steps=100, lr=1.0).run(f, x0)
  x_nag = im.nesterov(steps=100, lr=1.0, momentum=0.8).run(f, x0)
  assert float(f(x_nag)) < 0.1 * float(f(x_gd))


def test_hessian_free_line_search_handles_nonconvex_objective(x64):
  # Rosenbrock: indefinite Hessian away from the minimum; must still descend.
  f = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
  x0 = jnp.array([-1.2, 1.0])
  values = [float(f(im.hessian_free(steps=k, cg_steps=2).run(f, x0)))
            for k in (1, 5, 40)]
  assert values[0] < float(f(x0))
  assert values[0] >= values[1] >= values[2]
  assert values[2] < 1e-10


@pytest.mark.parametrize("inner", [im.gd(5, 0.1), im.nesterov(5, 0.1, 0.9),
                                   im.hessian_free(2, 3)])
def test_remat_changes_nothing_but_memory(x64, inner):
  objective, theta, _ = proximal_linreg(1)
  np.testing.assert_allclose(inner.run(objective, theta, remat=True),
                             inner.run(objective, theta), rtol=1e-14)


@pytest.mark.parametrize("factory, kwargs, message", [
    (im.gd, {"steps": 0, "lr": 0.1}, "steps"),
    (im.gd, {"steps": 3, "lr": -0.1}, "lr"),
    (im.gd, {"steps": 3.0, "lr": 0.1}, "steps"),
    (im.nesterov, {"steps": 3, "lr": 0.1, "momentum": 1.0}, "momentum"),
    (im.hessian_free, {"steps": 0}, "steps"),
    (im.hessian_free, {"steps": 1, "cg_steps": 0}, "cg_steps"),
    (im.hessian_free, {"steps": 1, "shrink": 1.5}, "shrink"),
])
def test_bad_inner_settings_are_named(factory, kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    factory(**kwargs)
