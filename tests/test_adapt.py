import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jaxopt.implicit_diff import custom_root
from jaxopt.linear_solve import solve_cg
from problems import linreg_exact
from problems import linreg_loss
from problems import linreg_task
from problems import mlp_init
from problems import mlp_loss
from problems import mlp_task
from problems import rel_err

import imaml_jax as im

CONVERGED_GD = im.gd(steps=300, lr=0.2)


def imaml_grad_via_adapt(
  theta, support, query, lam, solver, inner=CONVERGED_GD, loss=linreg_loss
):
  def meta_loss(t):
    return loss(
      im.adapt(loss, t, support, lam=lam, inner=inner, solver=solver), query
    )

  return jax.jit(jax.grad(meta_loss))(theta)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
  "solver", [im.dense(), im.cg(maxiter=100, tol=1e-15)], ids=["dense", "cg"]
)
def test_linear_regression_meta_gradient_matches_closed_form(x64, seed, solver):
  support, query = linreg_task(seed)
  lam = 2.0
  theta = np.random.default_rng(seed + 7).normal(size=5)
  _, exact = linreg_exact(theta, support, query, lam)
  g = imaml_grad_via_adapt(jnp.asarray(theta), support, query, lam, solver)
  assert rel_err(g, exact) < 1e-10


def test_meta_gradient_error_shrinks_with_cg_steps(x64):
  support, query = linreg_task(3, dim=12, n_support=15)
  lam = 0.5  # small lam: I + H/lam is ill-conditioned, so CG needs steps
  theta = jnp.zeros(12)
  _, exact = linreg_exact(theta, support, query, lam)
  inner = im.gd(steps=2000, lr=0.1)
  errors = [
    rel_err(
      imaml_grad_via_adapt(
        theta, support, query, lam, im.cg(k, tol=0.0), inner
      ),
      exact,
    )
    for k in (1, 2, 4, 8, 16)
  ]
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[0] > 1e-2 and errors[-1] < 1e-10, errors


def test_mlp_implicit_gradient_matches_jaxopt_custom_root(x64):
  lam = 1.5
  params = mlp_init(jax.random.PRNGKey(0))
  support, query = mlp_task(jax.random.PRNGKey(1))
  inner = im.gd(steps=3000, lr=0.1)

  def optimality(phi, theta):
    g = jax.grad(mlp_loss)(phi, support)
    return jax.tree.map(lambda a, p, t: a + lam * (p - t), g, phi, theta)

  @custom_root(
    optimality, solve=lambda mv, b: solve_cg(mv, b, tol=1e-15, maxiter=500)
  )
  def jaxopt_adapt(init, theta):
    del init
    objective = im.proximal_objective(mlp_loss, theta, support, lam)
    return inner.run(objective, theta)

  ours = jax.grad(
    lambda t: mlp_loss(
      im.adapt(mlp_loss, t, support, lam=lam, inner=inner, solver=im.dense()),
      query,
    )
  )(params)
  oracle = jax.grad(lambda t: mlp_loss(jaxopt_adapt(None, t), query))(params)
  assert rel_err(ours, oracle) < 1e-10


@pytest.mark.slow
def test_mlp_implicit_gradient_matches_unrolled_differentiation(x64):
  lam = 2.0
  params = mlp_init(jax.random.PRNGKey(2))
  support, query = mlp_task(jax.random.PRNGKey(3))
  inner = im.gd(steps=1500, lr=0.2)

  def unrolled(t):
    objective = im.proximal_objective(mlp_loss, t, support, lam)
    return mlp_loss(inner.run(objective, t), query)

  def implicit(t):
    return mlp_loss(
      im.adapt(
        mlp_loss, t, support, lam=lam, inner=inner, solver=im.cg(200, tol=1e-14)
      ),
      query,
    )

  assert (
    rel_err(
      jax.jit(jax.grad(implicit))(params), jax.jit(jax.grad(unrolled))(params)
    )
    < 1e-9
  )


def test_support_and_lam_cotangents_match_unrolled_differentiation(x64):
  params = mlp_init(jax.random.PRNGKey(4))
  support, query = mlp_task(jax.random.PRNGKey(5))
  inner = im.gd(steps=800, lr=0.2)

  def unrolled(xs, lam):
    objective = im.proximal_objective(mlp_loss, params, (xs, support[1]), lam)
    return mlp_loss(inner.run(objective, params), query)

  def implicit(xs, lam):
    phi = im.adapt(
      mlp_loss,
      params,
      (xs, support[1]),
      lam=lam,
      inner=inner,
      solver=im.dense(),
    )
    return mlp_loss(phi, query)

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))(support[0], 2.0)
  (gx, glam), (ux, ulam) = grad(implicit), grad(unrolled)
  assert rel_err(gx, ux) < 1e-8
  assert abs(float(glam) - float(ulam)) < 1e-8 * abs(float(ulam))


def test_integer_labels_in_support_are_allowed():
  x = jnp.ones((4, 3))
  labels = jnp.array([0, 1, 0, 1])

  def loss(w, batch):
    x, y = batch
    logits = x @ w
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  g = jax.grad(
    lambda w: loss(
      im.adapt(loss, w, (x, labels), lam=1.0, inner=im.gd(3, 0.1)), (x, labels)
    )
  )(jnp.zeros((3, 2)))
  assert g.shape == (3, 2) and bool(jnp.all(jnp.isfinite(g)))


def test_composes_with_vmap_jit_and_grad_over_tasks(x64):
  tasks = [linreg_task(s) for s in range(4)]
  stack = lambda i: jax.tree.map(
    lambda *a: jnp.stack(a), *[t[i] for t in tasks]
  )
  support, query = stack(0), stack(1)
  theta = jnp.full(5, 0.3)
  solver = im.cg(50, tol=1e-14)
  per_task = jax.vmap(
    lambda s, q: imaml_grad_via_adapt(theta, s, q, 2.0, solver)
  )(support, query)
  for i, (s, q) in enumerate(tasks):
    _, exact = linreg_exact(theta, s, q, 2.0)
    assert rel_err(per_task[i], exact) < 1e-10


@jax.default_matmul_precision("highest")  # GPUs default to TF32 products.
def test_float32_pytree_params_give_accurate_gradient():
  params = mlp_init(jax.random.PRNGKey(6), dtype=jnp.float32)
  support, query = mlp_task(jax.random.PRNGKey(7), dtype=jnp.float32)
  grad = lambda solver, inner: jax.jit(
    jax.grad(
      lambda t: mlp_loss(
        im.adapt(mlp_loss, t, support, lam=2.0, inner=inner, solver=solver),
        query,
      )
    )
  )(params)
  g32 = grad(im.cg(30), im.gd(400, 0.2))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(g32))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    s64, q64 = jax.tree.map(lambda a: a.astype(jnp.float64), (support, query))
    g64 = jax.grad(
      lambda t: mlp_loss(
        im.adapt(
          mlp_loss, t, s64, lam=2.0, inner=im.gd(400, 0.2), solver=im.dense()
        ),
        q64,
      )
    )(p64)
    assert rel_err(g32, g64) < 1e-4


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    ({"lam": 0.0}, ValueError, "lam"),
    ({"lam": -2.0}, ValueError, "lam"),
    ({"lam": jnp.ones(2)}, ValueError, "lam"),
    ({"lam": 2.0, "inner": "gd"}, TypeError, "inner"),
    ({"lam": 2.0, "solver": "cg"}, TypeError, "solver"),
    ({"lam": 2.0, "damping": -1.0}, ValueError, r"^damping must be >= 0"),
    (
      {"lam": 2.0, "lam_damping": -10.0},
      ValueError,
      r"^lam_damping must be >= 0",
    ),
  ],
)
def test_bad_adapt_arguments_raise_named_errors(kwargs, error, message):
  kwargs = {"inner": im.gd(2, 0.1), **kwargs}
  with pytest.raises(error, match=message):
    im.adapt(linreg_loss, jnp.zeros(5), linreg_task(0)[0], **kwargs)


def test_infinite_hyperparameters_are_refused_with_their_name():
  inf = float("inf")
  for make, name in (
    (lambda v: im.imaml(v, im.gd(5, 0.1)), "lam"),
    (lambda v: im.gd(5, v), "gd lr"),
    (
      lambda v: im.adapt(
        linreg_loss, jnp.zeros(5), linreg_task(0)[0], lam=v, inner=im.gd(2, 0.1)
      ),
      "lam",
    ),
  ):
    for value in (inf, -inf, np.float32(inf)):
      with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        make(value)
  # A traced value cannot be inspected, and is still let through.
  lam_bar = jax.jit(
    jax.grad(
      lambda lam: jnp.sum(
        im.adapt(
          linreg_loss,
          jnp.zeros(5),
          linreg_task(0)[0],
          lam=lam,
          inner=im.gd(2, 0.1),
        )
      )
    )
  )(2.0)
  assert np.isfinite(float(lam_bar))


@pytest.mark.parametrize(
  "returns_pair, has_aux, message",
  [
    (False, True, r"returned an array of shape \(\) but has_aux=True"),
    (True, False, "returned a tuple of 2 elements but has_aux=False"),
  ],
)
def test_has_aux_that_does_not_match_the_loss_is_named(
  returns_pair, has_aux, message
):
  loss = (lambda w, b: (linreg_loss(w, b), {})) if returns_pair else linreg_loss
  meta_loss = lambda w: jnp.sum(
    im.adapt(
      loss,
      w,
      linreg_task(0)[0],
      lam=2.0,
      inner=im.gd(2, 0.1),
      has_aux=has_aux,
    )
  )
  with pytest.raises(TypeError, match=message):
    jax.jit(jax.grad(meta_loss))(jnp.zeros(5))


def test_has_aux_must_be_a_bool():
  with pytest.raises(TypeError, match="has_aux must be True or False"):
    im.adapt(
      linreg_loss,
      jnp.zeros(5),
      linreg_task(0)[0],
      lam=2.0,
      inner=im.gd(2, 0.1),
      has_aux="no",
    )


def test_integer_params_are_rejected():
  with pytest.raises(TypeError, match=r"params\['w'\].*floating"):
    im.adapt(
      linreg_loss,
      {"w": jnp.zeros(5, jnp.int32)},
      linreg_task(0)[0],
      lam=1.0,
      inner=im.gd(2, 0.1),
    )


def dense_damped_cotangents(
  params, support, query, lam, phi, damping, lam_damping
):
  """The damped backward pass by dense algebra in float64 (jax.hessian).

  ``x = ((1 + r) I + H/(lam + d))^{-1} grad L_q(phi)`` and, with that ``x``,
  ``support_bar = -(1/lam) (d_s grad L)^T x``,
  ``lam_bar = -(1/lam) <x, phi - theta>``.
  """
  flat_phi, unravel = ravel_pytree(phi)
  xs, ys = support
  hessian = jax.hessian(lambda p: mlp_loss(unravel(p), support))(flat_phi)
  matrix = (1 + damping) * jnp.eye(flat_phi.size) + hessian / (
    lam + lam_damping
  )
  q_grad = ravel_pytree(jax.grad(mlp_loss)(phi, query))[0]
  x = jnp.linalg.solve(matrix, q_grad)
  mixed = jax.jacobian(
    lambda s: ravel_pytree(jax.grad(mlp_loss)(phi, (s, ys)))[0]
  )(xs)  # (n_params, *xs.shape)
  support_bar = -jnp.tensordot(x, mixed, axes=1) / lam
  lam_bar = -x @ (flat_phi - ravel_pytree(params)[0]) / lam
  return x, support_bar, lam_bar


@pytest.mark.parametrize(
  "damping, lam_damping", [(1.0, 10.0), (0.5, 0.0), (0.0, 3.0)]
)
def test_damped_backward_pass_matches_dense_damped_solve(
  x64, damping, lam_damping
):
  params = mlp_init(jax.random.PRNGKey(8))
  support, query = mlp_task(jax.random.PRNGKey(9))
  lam, inner = 2.0, im.gd(40, 0.1)  # unconverged: the formulas still hold
  phi = inner.run(im.proximal_objective(mlp_loss, params, support, lam), params)

  def meta_loss(theta, xs, lam):
    return mlp_loss(
      im.adapt(
        mlp_loss,
        theta,
        (xs, support[1]),
        lam=lam,
        inner=inner,
        solver=im.dense(),
        damping=damping,
        lam_damping=lam_damping,
      ),
      query,
    )

  g, gx, glam = jax.jit(jax.grad(meta_loss, argnums=(0, 1, 2)))(
    params, support[0], lam
  )
  x, support_bar, lam_bar = dense_damped_cotangents(
    params, support, query, lam, phi, damping, lam_damping
  )
  np.testing.assert_allclose(ravel_pytree(g)[0], x, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(gx, support_bar, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(glam, lam_bar, rtol=1e-10)


def test_authors_damping_is_a_scaled_stronger_proximal_system(x64):
  # ((1 + r) I + H/(lam + d))^{-1} = (I + H/lam')^{-1} / (1 + r) with
  # lam' = (1 + r)(lam + d): 24 for the authors' r = 1, d = 10 at lam = 2.
  params = mlp_init(jax.random.PRNGKey(10))
  support, query = mlp_task(jax.random.PRNGKey(11))
  phi = im.gd(30, 0.1).run(
    im.proximal_objective(mlp_loss, params, support, 2.0), params
  )
  q_grad = jax.grad(mlp_loss)(phi, query)
  solve = lambda **kw: im.dense().solve(
    im.proximal_system_operator(lambda p: mlp_loss(p, support), phi, **kw),
    q_grad,
  )[0]
  damped = solve(lam=2.0, damping=1.0, lam_damping=10.0)
  stronger = solve(lam=24.0)
  assert rel_err(damped, jax.tree.map(lambda a: a / 2, stronger)) < 1e-12


def test_zero_damping_is_the_undamped_adapt_bit_for_bit():
  params = mlp_init(jax.random.PRNGKey(12), dtype=jnp.float32)
  support, query = mlp_task(jax.random.PRNGKey(13), dtype=jnp.float32)

  def grads(**damping):
    def meta_loss(theta, xs, lam):
      return mlp_loss(
        im.adapt(
          mlp_loss,
          theta,
          (xs, support[1]),
          lam=lam,
          inner=im.gd(10, 0.1),
          **damping,
        ),
        query,
      )

    return jax.jit(jax.grad(meta_loss, argnums=(0, 1, 2)))(
      params, support[0], 2.0
    )

  for a, b in zip(
    jax.tree.leaves(grads()),
    jax.tree.leaves(grads(damping=0.0, lam_damping=0.0)),
  ):
    np.testing.assert_array_equal(a, b)


def test_authors_inner_loop_composes_with_adapt_vmap_and_jit(x64):
  # Forward: K gradient steps on the task loss, then 0.8 phi_K + 0.2 theta.
  # Backward: the damped solve at that phi.
  tasks = [mlp_task(jax.random.PRNGKey(20 + i)) for i in range(3)]
  stack = lambda i: jax.tree.map(
    lambda *a: jnp.stack(a), *[t[i] for t in tasks]
  )
  support, query = stack(0), stack(1)
  params = mlp_init(jax.random.PRNGKey(14))
  inner = im.gd_then_pull_back(steps=6, lr=0.1)

  def per_task(s, q):
    def meta_loss(theta):
      phi = im.adapt(
        mlp_loss,
        theta,
        s,
        lam=2.0,
        inner=inner,
        solver=im.dense(),
        damping=1.0,
        lam_damping=10.0,
      )
      return mlp_loss(phi, q), phi

    return jax.grad(meta_loss, has_aux=True)(params)

  grads, phis = jax.jit(jax.vmap(per_task))(support, query)
  for i, (s, q) in enumerate(tasks):
    phi_k = im.gd(6, 0.1).run(lambda p: mlp_loss(p, s), params)
    phi = jax.tree.map(lambda a, t: 0.8 * a + 0.2 * t, phi_k, params)
    assert rel_err(jax.tree.map(lambda a: a[i], phis), phi) < 1e-14
    x, _, _ = dense_damped_cotangents(params, s, q, 2.0, phi, 1.0, 10.0)
    np.testing.assert_allclose(
      ravel_pytree(jax.tree.map(lambda a: a[i], grads))[0],
      x,
      rtol=1e-10,
      atol=1e-13,
    )


def stacked_linreg_tasks(n):
  """``(support, query)`` of ``n`` linear-regression tasks, stacked."""
  tasks = [linreg_task(seed) for seed in range(n)]
  return jax.tree.map(lambda *a: jnp.stack(a), *tasks)


def test_loss_may_close_over_data_mapped_by_an_outer_vmap(x64):
  # The support is read from the loss's closure, not passed as `support`.
  (xs, ys), query = stacked_linreg_tasks(3)
  theta = jnp.asarray(np.random.default_rng(0).normal(size=5))
  inner = im.gd(10, 0.1)

  def closed_over(theta, xs, ys, q):
    loss = lambda w, _: linreg_loss(w, (xs, ys))
    return linreg_loss(im.adapt(loss, theta, None, lam=2.0, inner=inner), q)

  def passed_in(theta, xs, ys, q):
    phi = im.adapt(linreg_loss, theta, (xs, ys), lam=2.0, inner=inner)
    return linreg_loss(phi, q)

  def grads(meta):
    batch = lambda t, xs: jax.vmap(meta, (None, 0, 0, 0))(t, xs, ys, query)
    return jax.grad(lambda t, xs: batch(t, xs).mean(), argnums=(0, 1))(
      theta, xs
    )

  (g, gx), (want_g, want_gx) = grads(closed_over), grads(passed_in)
  np.testing.assert_allclose(g, want_g, rtol=1e-12)
  np.testing.assert_allclose(gx, want_gx, rtol=1e-12, atol=1e-15)


def test_loss_may_close_over_integer_labels_mapped_by_an_outer_vmap():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 3))
  labels = jnp.array([[0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]])

  def xent(w, batch):
    x, y = batch
    return -jnp.mean(jax.nn.log_softmax(x @ w)[jnp.arange(4), y])

  def closed_over(w, x, y):
    loss = lambda v, x: xent(v, (x, y))
    return xent(im.adapt(loss, w, x, lam=1.0, inner=im.gd(3, 0.1)), (x, y))

  def passed_in(w, x, y):
    phi = im.adapt(xent, w, (x, y), lam=1.0, inner=im.gd(3, 0.1))
    return xent(phi, (x, y))

  grad = lambda meta: jax.grad(
    lambda w: jax.vmap(meta, (None, 0, 0))(w, x, labels).mean()
  )(jnp.zeros((3, 2)))
  np.testing.assert_allclose(grad(closed_over), grad(passed_in), rtol=1e-6)


def weight_decay_meta_losses(support, query, theta, **adapt_kwargs):
  """The query loss after adapting with weight decay ``c``, as a function of
  ``c``: ``c`` closed over by the loss, and ``c`` passed in the support."""

  def closed_over(c):
    loss = lambda w, b: linreg_loss(w, b) + c * jnp.sum(w**2)
    return linreg_loss(im.adapt(loss, theta, support, **adapt_kwargs), query)

  def passed_in(c):
    loss = lambda w, b: linreg_loss(w, b[0]) + b[1] * jnp.sum(w**2)
    phi = im.adapt(loss, theta, (support, c), **adapt_kwargs)
    return linreg_loss(phi, query)

  return closed_over, passed_in


def test_closed_over_hyperparameter_gradient_matches_finite_differences(x64):
  support, query = linreg_task(4)
  theta = jnp.asarray(np.random.default_rng(5).normal(size=5))
  closed_over, passed_in = weight_decay_meta_losses(
    support, query, theta, lam=2.0, inner=CONVERGED_GD, solver=im.dense()
  )
  c, h = 0.3, 1e-5
  g = float(jax.grad(closed_over)(c))
  fd = float((closed_over(c + h) - closed_over(c - h)) / (2 * h))
  assert abs(g - fd) < 1e-8 * abs(fd), (g, fd)
  np.testing.assert_allclose(g, jax.grad(passed_in)(c), rtol=1e-12)


def test_closed_over_values_compose_with_jit_and_vmap(x64):
  support, query = linreg_task(6)
  theta = jnp.full(5, 0.2)
  closed_over, passed_in = weight_decay_meta_losses(
    support, query, theta, lam=2.0, inner=im.gd(20, 0.2)
  )
  cs = jnp.array([0.1, 0.3, 0.5])
  want = np.array([jax.grad(passed_in)(c) for c in cs])
  for grad in (jax.jit(jax.grad(closed_over)), jax.grad(jax.jit(closed_over))):
    np.testing.assert_allclose([grad(c) for c in cs], want, rtol=1e-12)
  for batched in (
    jax.vmap(jax.grad(closed_over)),
    jax.jit(jax.vmap(jax.grad(closed_over))),
  ):
    np.testing.assert_allclose(batched(cs), want, rtol=1e-12)

  # A batch of tasks whose data the loss closes over, beside c, under jit.
  (xs, ys), queries = stacked_linreg_tasks(3)

  def task_loss(theta, c, xs, ys, q):
    loss = lambda w, _: linreg_loss(w, (xs, ys)) + c * jnp.sum(w**2)
    phi = im.adapt(loss, theta, None, lam=2.0, inner=im.gd(20, 0.2))
    return linreg_loss(phi, q)

  def task_loss_passed_in(theta, c, xs, ys, q):
    loss = lambda w, b: linreg_loss(w, b[:2]) + b[2] * jnp.sum(w**2)
    phi = im.adapt(loss, theta, (xs, ys, c), lam=2.0, inner=im.gd(20, 0.2))
    return linreg_loss(phi, q)

  def meta_grad(task_loss):
    batch = jax.vmap(task_loss, (None, None, 0, 0, 0))
    return jax.grad(
      lambda t, c: batch(t, c, xs, ys, queries).mean(), argnums=(0, 1)
    )

  got = jax.jit(meta_grad(task_loss))(theta, 0.3)
  want = meta_grad(task_loss_passed_in)(theta, 0.3)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("closed_over", [False, True], ids=["passed", "closed"])
def test_grad_of_vmap_over_tasks_counts_unmapped_leaves_once(x64, closed_over):
  # The support loss does not read "scale", so its adapted value depends on
  # no task's data; its gradient must still be the mean over the tasks.
  (xs, ys), queries = stacked_linreg_tasks(3)
  theta = {"w": jnp.full(5, 0.2), "scale": jnp.asarray(1.5)}
  support_loss = lambda p, b: linreg_loss(p["w"], b)

  def task_loss(theta, x, y, q):
    if closed_over:
      loss = lambda p, _: support_loss(p, (x, y))
      phi = im.adapt(loss, theta, None, lam=2.0, inner=CONVERGED_GD)
    else:
      phi = im.adapt(support_loss, theta, (x, y), lam=2.0, inner=CONVERGED_GD)
    return linreg_loss(phi["scale"] * phi["w"], q)

  batched = jax.grad(
    lambda t: jax.vmap(task_loss, (None, 0, 0, 0))(t, xs, ys, queries).mean()
  )(theta)
  per_task = [
    jax.grad(task_loss)(
      theta, xs[i], ys[i], jax.tree.map(lambda a: a[i], queries)
    )
    for i in range(3)
  ]
  want = jax.tree.map(lambda *g: sum(g) / 3, *per_task)
  for key in ("w", "scale"):
    np.testing.assert_allclose(batched[key], want[key], rtol=1e-12)


@pytest.mark.parametrize(
  "params_dtype, data_dtype, rtol",
  [("float64", "float32", 1e-6), ("float32", "bfloat16", 2e-2)],
)
def test_support_narrower_than_params_is_differentiated_in_its_dtype(
  x64, params_dtype, data_dtype, rtol
):
  # Differentiating the support (or a closed-over value) of a narrower dtype
  # than the parameters: the cotangent comes back in the support's dtype.
  (x, y), query = linreg_task(8)
  theta = jnp.full(5, 0.2, params_dtype)
  loss = lambda w, b: linreg_loss(w, (b[0].astype(w.dtype), b[1]))

  def meta(x, c):
    decayed = lambda w, b: loss(w, b) + c.astype(w.dtype) * jnp.sum(w**2)
    phi = im.adapt(decayed, theta, (x, y), lam=2.0, inner=im.gd(20, 0.2))
    return loss(phi, query) + decayed(phi, (x, y))

  narrow = lambda a: jnp.asarray(a, data_dtype)
  gx, gc = jax.grad(meta, argnums=(0, 1))(narrow(x), narrow(0.3))
  assert gx.dtype == gc.dtype == jnp.dtype(data_dtype)
  want_x, want_c = jax.grad(meta, argnums=(0, 1))(
    jnp.asarray(narrow(x), params_dtype), jnp.asarray(narrow(0.3), params_dtype)
  )
  np.testing.assert_allclose(
    np.float64(gx), want_x, rtol=rtol, atol=1e-3 * rtol
  )
  np.testing.assert_allclose(np.float64(gc), want_c, rtol=rtol)
