import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from problems import linreg_exact
from problems import linreg_loss
from problems import linreg_task
from problems import mlp_init
from problems import mlp_loss
from problems import mlp_task
from problems import rel_err

import imaml_jax as im


def proximal_linreg(seed, lam=2.0):
  support, query = linreg_task(seed)
  theta = np.random.default_rng(seed + 100).normal(size=5)
  phi, _ = linreg_exact(theta, support, query, lam)
  objective = im.proximal_objective(
    linreg_loss, jnp.asarray(theta), support, lam
  )
  return objective, jnp.asarray(theta), phi


@pytest.mark.parametrize(
  "inner, tol",
  [
    (im.gd(steps=200, lr=0.2), 1e-12),
    (im.gd(steps=200, lr=0.2, backtrack=True), 1e-12),
    (im.nesterov(steps=100, lr=0.2, momentum=0.5), 1e-12),
    (im.hessian_free(steps=3, cg_steps=5), 1e-12),
    (
      im.hessian_free(steps=3, cg_steps=5, stop_at_negative_curvature=True),
      1e-12,
    ),
  ],
)
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
  values = [
    float(f(im.hessian_free(steps=k, cg_steps=2).run(f, x0)))
    for k in (1, 5, 40)
  ]
  assert values[0] < float(f(x0))
  assert values[0] >= values[1] >= values[2]
  assert values[2] < 1e-10


@pytest.mark.parametrize(
  "inner",
  [
    im.gd(5, 0.1),
    im.nesterov(5, 0.1, 0.9),
    im.hessian_free(2, 3),
    im.gd(5, 2.0, backtrack=True),
  ],
)
def test_remat_changes_nothing_but_memory(x64, inner):
  objective, theta, _ = proximal_linreg(1)
  np.testing.assert_allclose(
    inner.run(objective, theta, remat=True),
    inner.run(objective, theta),
    rtol=1e-14,
  )


def stiff_quadratic(curvatures=(0.5, 4.0, 40.0)):
  """``f(x) = 1/2 sum_i c_i (x_i - 1)^2``: ``L = 40``, minimiser all ones."""
  c = jnp.asarray(curvatures)
  return lambda x: 0.5 * jnp.sum(c * (x - 1.0) ** 2)


def test_backtracking_gd_is_plain_gd_while_steps_decrease(x64):
  objective, theta, _ = proximal_linreg(2)
  for steps in (1, 7, 30):
    np.testing.assert_allclose(
      im.gd(steps, 0.2, backtrack=True).run(objective, theta),
      im.gd(steps, 0.2).run(objective, theta),
      rtol=1e-14,
    )


def test_backtracking_gd_converges_where_plain_gd_diverges(x64):
  # lr = 0.1 > 2/L = 0.05: plain GD multiplies the stiff coordinate's error
  # by |1 - 0.1 * 40| = 3 a step. The checked one halves lr to 0.05 = 2/L,
  # where that error keeps its size (a non-decreasing oscillation that only
  # the Armijo condition rejects), then to 0.025.
  f, x0 = stiff_quadratic(), jnp.zeros(3)
  plain = im.gd(100, 0.1).run(f, x0)
  assert float(f(plain)) > 1e40
  values = [
    float(f(im.gd(k, 0.1, backtrack=True).run(f, x0)))
    for k in range(10, 200, 10)
  ]
  assert all(b <= a for a, b in zip(values, values[1:]))
  np.testing.assert_allclose(
    im.gd(2000, 0.1, backtrack=True).run(f, x0), jnp.ones(3), atol=1e-10
  )


def test_backtracking_gd_rejects_nonfinite_steps(x64):
  # exp(x) overflows to inf at the first trial point; the step is rejected.
  f = lambda x: jnp.sum(jnp.exp(x) - 20.0 * x)  # minimum at log 20
  x = im.gd(200, 1000.0, backtrack=True).run(f, jnp.zeros(2))
  assert bool(jnp.all(jnp.isfinite(x)))
  np.testing.assert_allclose(x, jnp.log(20.0) * jnp.ones(2), rtol=1e-8)


def test_backtracking_gd_is_per_task_under_vmap(x64):
  # One stiff task needs to shrink its step, a mild one does not; vmapped
  # together each must get the answer it gets alone.
  def run(c):
    f = lambda x: 0.5 * jnp.sum(c * (x - 1.0) ** 2)
    return im.gd(12, 0.1, backtrack=True).run(f, jnp.zeros(3))

  cs = jnp.array([[0.5, 4.0, 40.0], [0.5, 4.0, 8.0]])
  batched = jax.vmap(run)(cs)
  for i in range(2):
    np.testing.assert_allclose(batched[i], run(cs[i]), rtol=1e-14)
  assert not np.allclose(
    batched[1],
    im.gd(12, 0.1 * 0.5).run(
      lambda x: 0.5 * jnp.sum(cs[1] * (x - 1.0) ** 2), jnp.zeros(3)
    ),
  )


def test_backtracking_gd_differentiates_like_the_accepted_steps(x64):
  # MAML differentiates through the loop; the accept/reject choices are
  # piecewise constant, so the derivative is that of plain GD with the step
  # sizes actually taken. Here every step after the first rejection is
  # accepted: 1 rejected step at lr, then steps-1 at lr/2.
  f_of = lambda a: (
    lambda x: 0.5 * jnp.sum(jnp.array([1.0, 30.0]) * (x - a) ** 2)
  )
  x0 = jnp.zeros(2)
  checked = lambda a: jnp.sum(im.gd(8, 0.1, backtrack=True).run(f_of(a), x0))
  plain = lambda a: jnp.sum(im.gd(7, 0.05).run(f_of(a), x0))
  a = jnp.array([1.0, -2.0])
  np.testing.assert_allclose(checked(a), plain(a), rtol=1e-14)
  np.testing.assert_allclose(
    jax.grad(checked)(a), jax.grad(plain)(a), rtol=1e-14
  )


@pytest.mark.parametrize(
  "factory, kwargs, message",
  [
    (im.gd, {"steps": 0, "lr": 0.1}, "steps"),
    (im.gd, {"steps": 3, "lr": -0.1}, "lr"),
    (im.gd, {"steps": 3.0, "lr": 0.1}, "steps"),
    (im.gd, {"steps": 3, "lr": 0.1, "shrink": 1.0}, "shrink"),
    (im.gd, {"steps": 3, "lr": 0.1, "armijo": 1.0}, "armijo"),
    (im.nesterov, {"steps": 3, "lr": 0.1, "momentum": 1.0}, "momentum"),
    (im.hessian_free, {"steps": 0}, "steps"),
    (im.hessian_free, {"steps": 1, "cg_steps": 0}, "cg_steps"),
    (im.hessian_free, {"steps": 1, "shrink": 1.5}, "shrink"),
    # From 1 on, the line search accepts no step and the solver never moves.
    (im.hessian_free, {"steps": 1, "armijo": 1.0}, "armijo must be < 1"),
    (im.gd_then_pull_back, {"steps": 0, "lr": 0.1}, "steps"),
    (im.gd_then_pull_back, {"steps": 3, "lr": -0.1}, "lr"),
    (im.adam, {"steps": 0, "lr": 1e-3}, "steps"),
    (im.adam, {"steps": 3, "lr": 0.0}, "lr"),
    (im.adam, {"steps": 3, "lr": 1e-3, "b1": 1.0}, "b1"),
    (im.adam, {"steps": 3, "lr": 1e-3, "b2": -0.1}, "b2"),
    (im.adam, {"steps": 3, "lr": 1e-3, "eps": 0.0}, "eps"),
  ],
)
def test_bad_inner_settings_are_named(factory, kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    factory(**kwargs)


def authors_loop_by_hand(loss, theta, batch, lam, steps, lr):
  """K explicit steps of jax.grad on the task loss, then the pull-back."""
  phi = theta
  for _ in range(steps):
    g = jax.grad(loss)(phi, batch)
    phi = jax.tree.map(lambda p, gi: p - lr * gi, phi, g)
  return jax.tree.map(lambda p, t: p - lr * lam * (p - t), phi, theta)


def test_gd_then_pull_back_matches_hand_computation(x64):
  params = mlp_init(jax.random.PRNGKey(0))
  support, _ = mlp_task(jax.random.PRNGKey(1))
  objective = im.proximal_objective(mlp_loss, params, support, 2.0)
  expected = authors_loop_by_hand(mlp_loss, params, support, 2.0, 4, 0.1)
  for remat in (False, True):
    got = im.gd_then_pull_back(4, 0.1).run(objective, params, remat=remat)
    assert rel_err(got, expected) < 1e-14
  # At lr 0.1 and lam 2 the pull-back is 0.8 phi_K + 0.2 theta.
  phi_k = im.gd(4, 0.1).run(lambda p: mlp_loss(p, support), params)
  assert (
    rel_err(
      expected, jax.tree.map(lambda a, t: 0.8 * a + 0.2 * t, phi_k, params)
    )
    < 1e-14
  )


def test_gd_then_pull_back_under_vmap_and_jit(x64):
  tasks = [mlp_task(jax.random.PRNGKey(10 + i))[0] for i in range(3)]
  support = jax.tree.map(lambda *a: jnp.stack(a), *tasks)
  thetas = jax.vmap(mlp_init)(jax.random.split(jax.random.PRNGKey(2), 3))
  lams = jnp.array([0.5, 2.0, 4.0])
  solver = im.gd_then_pull_back(5, 0.1)
  run = jax.jit(
    jax.vmap(
      lambda t, s, lam: solver.run(
        im.proximal_objective(mlp_loss, t, s, lam), t
      )
    )
  )
  batched = run(thetas, support, lams)
  for i, s in enumerate(tasks):
    theta = jax.tree.map(lambda a: a[i], thetas)
    expected = authors_loop_by_hand(mlp_loss, theta, s, float(lams[i]), 5, 0.1)
    assert rel_err(jax.tree.map(lambda a: a[i], batched), expected) < 1e-14


def test_gd_then_pull_back_needs_a_proximal_objective():
  with pytest.raises(TypeError, match="proximal objective"):
    im.gd_then_pull_back(3, 0.1).run(lambda x: (x**2).sum(), jnp.ones(2))
  with pytest.raises(TypeError, match="proximal objective"):
    im.maml(im.gd_then_pull_back(3, 0.1)).task_gradient(
      lambda p, b: (linreg_loss(p, b), {}),
      jnp.zeros(5),
      im.Task(*linreg_task(0)),
    )


def test_proximal_objective_carries_its_parts(x64):
  support, _ = linreg_task(3)
  theta = jnp.arange(5.0)
  objective = im.proximal_objective(linreg_loss, theta, support, 1.5)
  phi = theta + 1.0
  assert isinstance(objective, im.ProximalObjective)
  assert objective.lam == 1.5 and objective.center is theta
  np.testing.assert_allclose(
    objective.task_loss(phi), linreg_loss(phi, support), rtol=1e-15
  )
  np.testing.assert_allclose(
    objective(phi), linreg_loss(phi, support) + 0.75 * 5, rtol=1e-15
  )


def adam_by_hand(grad, x0, steps, lr, b1, b2, eps):
  """Kingma and Ba's Algorithm 1 in NumPy, one flat vector."""
  x = np.array(x0, dtype=np.float64)
  m = np.zeros_like(x)
  v = np.zeros_like(x)
  for t in range(1, steps + 1):
    g = np.asarray(grad(x))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return x


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_adam_matches_numpy_algorithm_and_optax(x64, b1):
  params = mlp_init(jax.random.PRNGKey(0))
  support, _ = mlp_task(jax.random.PRNGKey(1))
  flat, unravel = ravel_pytree(params)
  loss = lambda p: mlp_loss(p, support)
  grad_flat = jax.jit(lambda x: jax.grad(lambda y: loss(unravel(y)))(x))
  expected = adam_by_hand(grad_flat, flat, 7, 0.01, b1, 0.99, 1e-8)
  for remat in (False, True):
    got = im.adam(7, 0.01, b1=b1, b2=0.99).run(loss, params, remat=remat)
    np.testing.assert_allclose(
      ravel_pytree(got)[0], expected, rtol=1e-12, atol=1e-14
    )
  opt = optax.adam(0.01, b1=b1, b2=0.99, eps=1e-8)
  x, state = params, opt.init(params)
  for _ in range(7):
    updates, state = opt.update(jax.grad(loss)(x), state)
    x = optax.apply_updates(x, updates)
  np.testing.assert_allclose(
    ravel_pytree(x)[0], expected, rtol=1e-12, atol=1e-14
  )


def test_adam_first_step_with_b1_zero_is_a_signed_step(x64):
  # m_1 / sqrt(v_1) = g / |g|: each coordinate moves by lr, whatever its
  # gradient's scale (here 1e-3 to 1e3).
  scales = jnp.array([1e-3, -1.0, 1e3])
  x = im.adam(1, 0.05, b1=0.0, eps=1e-12).run(
    lambda x: jnp.sum(scales * x), jnp.zeros(3)
  )
  np.testing.assert_allclose(x, -0.05 * jnp.sign(scales), rtol=1e-8)


def test_adam_minimises_a_stiff_quadratic(x64):
  f = stiff_quadratic()
  x0 = jnp.zeros(3)
  x = im.adam(400, 0.05).run(f, x0)
  assert float(f(x)) < 1e-3 * float(f(x0))


def minibatch_linreg(num_batches=3, seed=0):
  """Linear least squares, one mini-batch of 4 rows per step."""
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(num_batches, 4, 5)))
  ys = jnp.asarray(rng.normal(size=(num_batches, 4)))
  loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
  return im.MinibatchObjective(loss, (xs, ys)), loss, (xs, ys)


@pytest.mark.parametrize("solver", ["gd", "adam"])
def test_solvers_step_on_minibatch_t_at_step_t(x64, solver):
  objective, loss, (xs, ys) = minibatch_linreg()
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=5))
  steps, lr = 7, 0.05  # wraps around the 3 mini-batches
  grad_at = lambda w, t: np.asarray(jax.grad(loss)(w, (xs[t % 3], ys[t % 3])))
  if solver == "gd":
    expected = np.asarray(x0)
    for t in range(steps):
      expected = expected - lr * grad_at(expected, t)
    inner = im.gd(steps, lr)
  else:
    calls = iter(range(steps))
    expected = adam_by_hand(
      lambda w: grad_at(w, next(calls)), x0, steps, lr, 0.0, 0.999, 1e-8
    )
    inner = im.adam(steps, lr, b1=0.0)
  for remat in (False, True):
    got = jax.jit(lambda w: inner.run(objective, w, remat=remat))(x0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
  # Not the same as stepping on one batch all along.
  fixed = inner.run(lambda w: loss(w, (xs[0], ys[0])), x0)
  assert rel_err(fixed, expected) > 1e-3


@pytest.mark.parametrize(
  "inner",
  [im.gd(3, 0.1, backtrack=True), im.nesterov(3, 0.1), im.hessian_free(2, 2)],
)
def test_fixed_objective_solvers_refuse_minibatches(inner):
  objective, _, _ = minibatch_linreg()
  with pytest.raises(TypeError, match="only im.gd .* and im.adam"):
    inner.run(objective, jnp.zeros(5))


def test_hessian_free_cg_stopping_at_negative_curvature(x64):
  # f = x^2/2 - y^2/20 + y^4/4 at (1, 0.1): H = diag(1, -0.07) is
  # indefinite. CG's second direction runs along y, a direction of negative
  # curvature: plain CG takes it and returns Newton's -H^{-1} g (a descent
  # direction here, towards the saddle at y = 0); stopping there keeps CG's
  # first iterate, the Cauchy step along -g.
  f = lambda x: 0.5 * x[0] ** 2 - 0.05 * x[1] ** 2 + 0.25 * x[1] ** 4
  x0 = jnp.array([1.0, 0.1])
  g = np.array([1.0, -0.1 * 0.1 + 0.1**3])
  h = np.diag([1.0, -0.1 + 3 * 0.1**2])
  newton = np.asarray(x0) - np.linalg.solve(h, g)
  cauchy = np.asarray(x0) - (g @ g) / (g @ h @ g) * g
  plain = im.hessian_free(1, 2).run(f, x0)
  guarded = im.hessian_free(1, 2, stop_at_negative_curvature=True).run(f, x0)
  np.testing.assert_allclose(plain, newton, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(guarded, cauchy, rtol=1e-12, atol=1e-14)
  assert rel_err(plain, guarded) > 0.1
  assert im.hessian_free(1, 2, stop_at_negative_curvature=True).name == (
    "hessian_free(steps=1, cg_steps=2, stop_at_negative_curvature)"
  )


def test_hessian_free_defaults_to_the_configs_newton_steps():
  # 20 Newton steps of 5 CG, as the *_imaml_hf configs (5 left Omniglot's
  # proximal problem unsolved: benchmarks/results/hf_newton_steps_5w1s.md).
  from imaml_jax.train import config as config_lib

  hf = config_lib.get_config("omniglot_5w1s_imaml_hf")
  assert im.hessian_free().name == (
    f"hessian_free(steps={hf.inner_steps}, cg_steps={hf.hf_cg_steps})"
  )
  assert im.hessian_free().steps == 20


def test_backtracking_never_steps_up_in_bfloat16():
  """The rounding slack is at most float32's: in bfloat16, 16 of its own
  ulps (12% of f) would accept every step of a diverging step size."""
  f = lambda x: ((x - 3.0) ** 2).sum()
  x0 = jnp.zeros(2, jnp.bfloat16)
  values = [float(f(x0))]
  for steps in range(1, 31):
    x = im.gd(steps, 1.025, backtrack=True).run(f, x0)
    assert x.dtype == jnp.bfloat16
    values.append(float(f(x)))
  assert all(b <= a for a, b in zip(values, values[1:])), values
  np.testing.assert_allclose(np.asarray(x, np.float32), [3.0, 3.0], atol=0.05)


def test_adam_keeps_float32_parameters_in_float32_under_x64(x64):
  f = lambda x: ((x - 3.0) ** 2).sum()
  x0 = jnp.zeros(3, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda x: im.adam(4, 0.1).run(f, x))(x0))
  assert "f64[3]" not in jaxpr  # Scalars of the bias correction may be f64.
  x = im.adam(4, 0.1).run(f, x0)
  assert x.dtype == jnp.float32
  # The same iterates as without x64, up to float32 rounding of the scales.
  with jax.enable_x64(False):
    expected = im.adam(4, 0.1).run(f, jnp.zeros(3, jnp.float32))
  np.testing.assert_allclose(x, expected, rtol=1e-4)
