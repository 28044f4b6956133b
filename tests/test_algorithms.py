import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import linreg_exact
from problems import linreg_loss
from problems import linreg_task
from problems import mlp_init
from problems import mlp_loss
from problems import mlp_task
from problems import rel_err

import imaml_jax as im


def aux(loss):
  return lambda p, b: (loss(p, b), {})


def quadratic_task(dim=4, seed=0):
  """L_s(w) = 1/2 (w-a)^T A (w-a) with batch (A, a); L_q(w) = 1/2 ||w-b||^2."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(dim, dim))
  a_mat = jnp.asarray(m @ m.T / dim + 0.5 * np.eye(dim))
  a, b = jnp.asarray(rng.normal(size=dim)), jnp.asarray(rng.normal(size=dim))
  theta = jnp.asarray(rng.normal(size=dim))
  loss = lambda w, batch: 0.5 * (w - batch[1]) @ batch[0] @ (w - batch[1])
  return loss, im.Task((a_mat, a), (jnp.eye(dim), b)), theta, a_mat, a, b


def test_maml_matches_grad_through_explicit_python_unroll(x64):
  params = mlp_init(jax.random.PRNGKey(0))
  support, query = mlp_task(jax.random.PRNGKey(1))
  steps, lr = 5, 0.3

  def unrolled(p):
    for _ in range(steps):
      p = jax.tree.map(
        lambda w, g: w - lr * g, p, jax.grad(mlp_loss)(p, support)
      )
    return mlp_loss(p, query)

  expected = jax.grad(unrolled)(params)
  for remat in (False, True):
    alg = im.maml(im.gd(steps, lr), remat=remat)
    g, metrics = jax.jit(
      lambda p: alg.task_gradient(aux(mlp_loss), p, im.Task(support, query))
    )(params)
    assert rel_err(g, expected) < 1e-12
    np.testing.assert_allclose(
      metrics["loss_after"], unrolled(params), rtol=1e-12
    )


def test_fomaml_maml_and_reptile_match_hand_derived_updates_on_quadratic(x64):
  loss, task, theta, a_mat, a, b = quadratic_task()
  steps, lr = 7, 0.2
  contraction = np.linalg.matrix_power(
    np.eye(4) - lr * np.asarray(a_mat), steps
  )
  phi = a + contraction @ (theta - a)  # closed form of 7 GD steps
  run = lambda alg: alg.task_gradient(aux(loss), theta, task)[0]
  np.testing.assert_allclose(
    run(im.fomaml(im.gd(steps, lr))), phi - b, rtol=1e-12
  )
  np.testing.assert_allclose(
    run(im.maml(im.gd(steps, lr))), contraction.T @ (phi - b), rtol=1e-12
  )
  np.testing.assert_allclose(
    run(im.reptile(im.gd(steps, lr))), theta - phi, rtol=1e-12
  )


def test_reptile_on_minibatches_steps_on_one_batch_a_step(x64):
  # Support leaves carry a leading axis of mini-batches; GD step t uses
  # mini-batch t: phi_{t+1} = phi_t - lr A_t (phi_t - a_t), in closed form.
  loss, task, theta, a_mat, a, b = quadratic_task()
  _, task2, _, a_mat2, a2, _ = quadratic_task(seed=5)
  batches = (jnp.stack([a_mat, a_mat2]), jnp.stack([a, a2]))
  steps, lr = 5, 0.2
  phi = np.asarray(theta)
  for t in range(steps):
    mat, centre = (a_mat, a) if t % 2 == 0 else (a_mat2, a2)
    phi = phi - lr * np.asarray(mat) @ (phi - np.asarray(centre))
  alg = im.reptile(im.gd(steps, lr), minibatches=True)
  g, metrics = alg.task_gradient(aux(loss), theta, im.Task(batches, task.query))
  np.testing.assert_allclose(g, theta - phi, rtol=1e-12)
  np.testing.assert_allclose(
    metrics["loss_after"], loss(jnp.asarray(phi), task.query), rtol=1e-12
  )
  # Evaluation adapts on an ordinary support set: 5 GD steps in closed form.
  contraction = np.linalg.matrix_power(
    np.eye(4) - lr * np.asarray(a_mat), steps
  )
  np.testing.assert_allclose(
    alg.adapt(aux(loss), theta, task.support),
    a + contraction @ (theta - a),
    rtol=1e-12,
  )


def test_imaml_on_quadratic_matches_closed_form(x64):
  loss, task, theta, a_mat, a, b = quadratic_task(seed=1)
  lam = 2.0
  # phi* solves A (phi - a) + lam (phi - theta) = 0.
  phi = np.linalg.solve(a_mat + lam * np.eye(4), a_mat @ a + lam * theta)
  expected = np.linalg.solve(np.eye(4) + a_mat / lam, phi - b)
  alg = im.imaml(lam, im.gd(400, 0.2), im.cg(20, tol=1e-15))
  g, metrics = alg.task_gradient(aux(loss), theta, task)
  np.testing.assert_allclose(g, expected, rtol=1e-10)
  assert float(metrics["residual"]) < 1e-12


def test_imaml_task_gradient_equals_grad_through_adapt(x64):
  params = mlp_init(jax.random.PRNGKey(2))
  support, query = mlp_task(jax.random.PRNGKey(3))
  inner, solver = im.gd(20, 0.1), im.cg(5)
  alg = im.imaml(2.0, inner, solver)
  g, _ = alg.task_gradient(aux(mlp_loss), params, im.Task(support, query))
  via_adapt = jax.grad(
    lambda p: mlp_loss(
      im.adapt(mlp_loss, p, support, lam=2.0, inner=inner, solver=solver), query
    )
  )(params)
  assert rel_err(g, via_adapt) < 1e-12


def test_imaml_linearized_products_give_the_same_gradient(x64):
  support, query = linreg_task(5)
  theta = jnp.ones(5)
  task = im.Task(support, query)
  g1, _ = im.imaml(2.0, im.gd(200, 0.2), im.cg(30)).task_gradient(
    aux(linreg_loss), theta, task
  )
  g2, _ = im.imaml(
    2.0, im.gd(200, 0.2), im.cg(30), linearize=True
  ).task_gradient(aux(linreg_loss), theta, task)
  _, exact = linreg_exact(theta, support, query, 2.0)
  assert rel_err(g1, exact) < 1e-10 and rel_err(g2, exact) < 1e-10


@pytest.mark.parametrize(
  "make",
  [
    lambda: im.imaml(2.0, im.hessian_free(3, 5), im.cg(20)),
    lambda: im.imaml(2.0, im.nesterov(60, 0.2, 0.5), im.neumann(60, 0.5)),
  ],
)
def test_other_inner_and_linear_solvers_reach_the_exact_meta_gradient(
  x64, make
):
  support, query = linreg_task(6)
  theta = jnp.zeros(5)
  g, metrics = make().task_gradient(
    aux(linreg_loss), theta, im.Task(support, query)
  )
  _, exact = linreg_exact(theta, support, query, 2.0)
  assert rel_err(g, exact) < 1e-8
  assert float(metrics["residual"]) < 1e-8


def test_maml_differentiates_through_hessian_free_inner_loop(x64):
  loss, task, theta, *_ = quadratic_task(seed=2)
  g, _ = im.maml(im.hessian_free(2, 4)).task_gradient(aux(loss), theta, task)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_maml_differentiates_through_guarded_hessian_free(x64):
  # A strictly convex, non-quadratic support loss and as many CG steps as
  # dimensions: each Newton direction is exact, so MAML's meta-gradient is
  # the derivative of the Newton steps, which finite differences give, with
  # or without the stop at negative curvature.
  _, task, theta, *_ = quadratic_task(seed=2)
  loss = lambda w, b: (
    0.5 * (w - b[1]) @ b[0] @ (w - b[1]) + 0.1 * jnp.sum((w - b[1]) ** 4)
  )
  tasks = jax.tree.map(lambda a: a[None], task)

  def meta_gradient(**kwargs):
    newton = im.hessian_free(2, 4, **kwargs)
    init, step = im.make_meta_step(loss, optax.sgd(1.0), im.maml(newton))
    return theta - jax.jit(step)(init(theta), tasks)[0].params

  newton = im.hessian_free(2, 4, stop_at_negative_curvature=True)
  query_loss = lambda t: loss(
    newton.run(lambda w: loss(w, task.support), t), task.query
  )
  h, eye = 1e-6, np.eye(theta.size)
  fd = [
    (query_loss(theta + h * e) - query_loss(theta - h * e)) / (2 * h)
    for e in eye
  ]
  guarded = meta_gradient(stop_at_negative_curvature=True)
  np.testing.assert_allclose(guarded, fd, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(guarded, meta_gradient(), rtol=1e-8)


def test_imaml_rejects_bad_hyperparameters():
  with pytest.raises(ValueError, match="lam"):
    im.imaml(lam=0.0, inner=im.gd(1, 0.1))
  with pytest.raises(TypeError, match="solver"):
    im.imaml(2.0, im.gd(5, 0.1), solver=5)


def test_imaml_authors_recipe_equals_grad_through_adapt(x64):
  # The damped system and the authors' inner loop, in both entry points.
  params = mlp_init(jax.random.PRNGKey(4))
  support, query = mlp_task(jax.random.PRNGKey(5))
  inner, solver = im.gd_then_pull_back(16, 0.1), im.cg(40, tol=1e-15)
  damping = dict(damping=1.0, lam_damping=10.0)
  alg = im.imaml(2.0, inner, solver, **damping)
  g, metrics = jax.jit(
    lambda p: alg.task_gradient(aux(mlp_loss), p, im.Task(support, query))
  )(params)
  via_adapt = jax.grad(
    lambda p: mlp_loss(
      im.adapt(
        mlp_loss, p, support, lam=2.0, inner=inner, solver=solver, **damping
      ),
      query,
    )
  )(params)
  assert rel_err(g, via_adapt) < 1e-12
  assert float(metrics["residual"]) < 1e-12  # measured on the damped system
  assert "damping=1.0, lam_damping=10.0" in alg.name
  assert "damping" not in im.imaml(2.0, im.gd(1, 0.1)).name


def test_imaml_with_zero_damping_is_unchanged_bit_for_bit():
  params = mlp_init(jax.random.PRNGKey(6), dtype=jnp.float32)
  support, query = mlp_task(jax.random.PRNGKey(7), dtype=jnp.float32)
  task = im.Task(support, query)
  run = lambda alg: jax.jit(
    lambda p: alg.task_gradient(aux(mlp_loss), p, task)
  )(params)
  plain = run(im.imaml(2.0, im.gd(10, 0.1)))
  zero = run(im.imaml(2.0, im.gd(10, 0.1), damping=0.0, lam_damping=0.0))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(zero)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"damping": -1.0}, r"^damping must be >= 0"),
    ({"lam_damping": -10.0}, r"^lam_damping must be >= 0"),
  ],
)
def test_imaml_refuses_negative_damping_by_name(kwargs, message):
  with pytest.raises(ValueError, match=message):
    im.imaml(2.0, im.gd(1, 0.1), **kwargs)


# ----------------------------------------------------------------------------
# Adapting only some parameters (MAML's reference code leaves batch norms out).


def _split_mlp(params):
  """The first layer's weights are held fixed by the inner loop."""
  assert "w0" in params
  return "w0", (lambda path: path[0] != "w0")


def test_maml_adapting_some_parameters_matches_hand_unroll(x64):
  params = mlp_init(jax.random.PRNGKey(0))
  support, query = mlp_task(jax.random.PRNGKey(1))
  first, adapts = _split_mlp(params)
  steps, lr = 3, 0.3

  def unrolled(p):  # written out: only the layers after the first move
    fixed = p[first]
    q = {k: v for k, v in p.items() if k != first}
    for _ in range(steps):
      grads = jax.grad(lambda r: mlp_loss({**r, first: fixed}, support))(q)
      q = jax.tree.map(lambda w, g: w - lr * g, q, grads)
    return mlp_loss({**q, first: fixed}, query)

  expected = jax.grad(unrolled)(params)
  alg = im.maml(im.gd(steps, lr), adapts=adapts)
  g, metrics = jax.jit(
    lambda p: alg.task_gradient(aux(mlp_loss), p, im.Task(support, query))
  )(params)
  assert rel_err(g, expected) < 1e-12
  np.testing.assert_allclose(
    metrics["loss_after"], unrolled(params), rtol=1e-12
  )
  # The fixed layer's meta-gradient includes how it shapes the inner steps:
  # it differs from the query gradient at the adapted parameters.
  phi = alg.adapt(aux(mlp_loss), params, support)
  np.testing.assert_array_equal(phi[first], params[first])
  first_order = jax.grad(mlp_loss)(phi, query)[first]
  assert rel_err(g[first], first_order) > 1e-3
  assert "adapts=<lambda>" in alg.name


def test_fomaml_adapting_some_parameters_takes_the_query_gradient(x64):
  params = mlp_init(jax.random.PRNGKey(2))
  support, query = mlp_task(jax.random.PRNGKey(3))
  first, adapts = _split_mlp(params)
  alg = im.fomaml(im.gd(4, 0.2), adapts=adapts)
  phi = alg.adapt(aux(mlp_loss), params, support)
  everything = im.fomaml(im.gd(4, 0.2)).adapt(aux(mlp_loss), params, support)
  np.testing.assert_array_equal(phi[first], params[first])
  assert rel_err(everything[first], params[first]) > 1e-3
  g, _ = alg.task_gradient(aux(mlp_loss), params, im.Task(support, query))
  assert rel_err(g, jax.grad(mlp_loss)(phi, query)) < 1e-12


def test_adapt_all_but_norm_leaves_batch_norms_alone():
  from imaml_jax import models

  net = models.omniglot_convnet(5, variant="maml")
  x = jax.random.normal(jax.random.key(0), (5, 28, 28, 1))
  params = models.init_params(net, jax.random.key(1), x)
  loss = models.classification_loss(net)
  alg = im.maml(im.gd(1, 0.4), adapts=im.adapt_all_but_norm)
  phi = alg.adapt(loss, params, (x, jnp.arange(5)))
  for name in params:
    moved = any(
      np.any(a != b)
      for a, b in zip(jax.tree.leaves(phi[name]), jax.tree.leaves(params[name]))
    )
    assert moved == (not name.startswith("norm")), name


def test_adapts_must_be_a_predicate():
  with pytest.raises(TypeError, match="adapts must be None or a predicate"):
    im.maml(im.gd(1, 0.1), adapts={"head": True})


def test_imaml_logs_negative_curvature_of_its_system(x64):
  # L_s(w) = 1/2 (w-a)^T S (w-a): H = S, and with lam = 1 the system
  # I + S is -2 I for S = -3 I (every direction has negative curvature) and
  # 2 I for S = I (one CG update solves it).
  _, task, theta, _, a, b = quadratic_task(seed=2)
  loss = lambda w, batch: 0.5 * (w - batch[1]) @ batch[0] @ (w - batch[1])
  guarded = im.imaml(
    1.0, im.gd(1, 0.01), im.cg(5, stop_at_negative_curvature=True)
  )
  for scale, flagged, updates in [(-3.0, 1.0, 0.0), (1.0, 0.0, 1.0)]:
    task = im.Task((scale * jnp.eye(4), a), task.query)
    g, metrics = guarded.task_gradient(aux(loss), theta, task)
    assert float(metrics["negative_curvature"]) == flagged, scale
    assert float(metrics["solve_iterations"]) == updates, scale
    phi = theta - 0.01 * scale * (theta - a)  # one step; prox term is 0
    if flagged:
      np.testing.assert_allclose(g, phi - b, rtol=1e-12)  # kept b itself
    else:
      np.testing.assert_allclose(g, (phi - b) / 2.0, rtol=1e-12)
  # Solvers that do not look add no such metrics.
  _, metrics = im.imaml(1.0, im.gd(1, 0.01), im.cg(5)).task_gradient(
    aux(loss), theta, task
  )
  assert "negative_curvature" not in metrics
  assert "solve_iterations" not in metrics


def test_meta_step_averages_the_negative_curvature_metrics_over_tasks(x64):
  # The two tasks of the test above in one batch: one indefinite system
  # (flagged, 0 updates), one solved by a single update.
  _, task, theta, _, a, b = quadratic_task(seed=2)
  loss = lambda w, batch: 0.5 * (w - batch[1]) @ batch[0] @ (w - batch[1])
  stack = lambda *xs: jnp.stack(xs)
  tasks = im.Task(
    (stack(-3.0 * jnp.eye(4), jnp.eye(4)), stack(a, a)),
    (stack(jnp.eye(4), jnp.eye(4)), stack(b, b)),
  )
  guarded = im.imaml(
    1.0, im.gd(1, 0.01), im.cg(5, stop_at_negative_curvature=True)
  )
  init, step = im.make_meta_step(loss, optax.sgd(0.1), guarded)
  _, metrics = jax.jit(step)(init(theta), tasks)
  assert float(metrics["negative_curvature"]) == 0.5
  assert float(metrics["solve_iterations"]) == 0.5
