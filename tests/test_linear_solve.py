import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import rel_err

import imaml_jax as im


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
  for solver in (
    im.dense(),
    im.cg(maxiter=50, tol=1e-14),
    im.neumann(terms=200, step=0.9),
  ):
    x, info = jax.jit(solver.solve, static_argnums=0)(matvec, b)
    assert rel_err(x, exact) < 1e-10, solver.name
    assert float(info.residual) < 1e-10, solver.name


def test_cg_error_shrinks_with_iterations(x64):
  a, b = spd_system(1, cond=100.0)
  exact = np.linalg.solve(a, b)
  a, b = jnp.asarray(a), jnp.asarray(b)
  errors = [
    rel_err(im.cg(maxiter=k, tol=0.0).solve(lambda v: a @ v, b)[0], exact)
    for k in (1, 3, 6, 12, 30)
  ]
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


@pytest.mark.parametrize("step", [1.0, 0.5])
def test_neumann_is_its_truncated_series(x64, step):
  """``x_K = alpha sum_{k<K} (I - alpha A)^k b``, term for term."""
  a, b = spd_system(4, n=6, cond=1.8)
  terms = 4
  expected = step * sum(
    np.linalg.matrix_power(np.eye(6) - step * a, k) @ b for k in range(terms)
  )
  x, _ = im.neumann(terms=terms, step=step).solve(
    lambda v: jnp.asarray(a) @ v, jnp.asarray(b)
  )
  np.testing.assert_allclose(x, expected, rtol=1e-12)
  # Four terms are far from the solution, so the series itself is checked.
  assert np.linalg.norm(expected - np.linalg.solve(a, b)) > 1e-3


def test_residual_matches_its_definition(x64):
  a, b = spd_system(3)
  a, b = jnp.asarray(a), jnp.asarray(b)
  for solver in (
    im.cg(maxiter=3),
    im.cg(maxiter=3, exact_residual=True),
    im.cg(maxiter=3, stop_at_negative_curvature=True, exact_residual=True),
  ):
    x, info = solver.solve(lambda v: a @ v, b)
    expected = np.linalg.norm(a @ x - b) / np.linalg.norm(b)
    np.testing.assert_allclose(float(info.residual), expected, rtol=1e-12)
  # The guarded loop reports its recurrence residual by default: equal in
  # exact arithmetic.
  x, info = im.cg(maxiter=3, stop_at_negative_curvature=True).solve(
    lambda v: a @ v, b
  )
  expected = np.linalg.norm(a @ x - b) / np.linalg.norm(b)
  assert expected > 1e-3  # unconverged, so the comparison means something
  np.testing.assert_allclose(float(info.residual), expected, rtol=1e-9)
  _, info = im.cg(maxiter=3, report_residual=False).solve(lambda v: a @ v, b)
  assert np.isnan(info.residual)


def test_default_cg_is_jax_scipy_cg(x64):
  a, b = spd_system(8, cond=200.0)
  a, b = jnp.asarray(a), jnp.asarray(b)
  matvec = lambda v: a @ v
  for k, tol, atol in [
    (1, 0.0, 0.0),
    (2, 0.0, 0.0),
    (5, 0.0, 0.0),
    (12, 0.0, 0.0),
    (50, 1e-3, 0.0),
    (50, 0.0, 1e-2),
  ]:
    ours, _ = im.cg(k, tol=tol, atol=atol).solve(matvec, b)
    theirs, _ = jax.scipy.sparse.linalg.cg(
      matvec, b, x0=b, tol=tol, atol=atol, maxiter=k
    )
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{k} {tol} {atol}")
    cold, _ = im.cg(k, tol=tol, atol=atol, warm_start=False).solve(matvec, b)
    theirs, _ = jax.scipy.sparse.linalg.cg(
      matvec, b, tol=tol, atol=atol, maxiter=k
    )
    np.testing.assert_array_equal(cold, theirs, err_msg=f"{k} {tol} {atol}")
  # Early stopping kicked in: fewer than 50 iterations are less accurate.
  converged, _ = im.cg(50, tol=0.0).solve(matvec, b)
  early, _ = im.cg(50, tol=1e-3).solve(matvec, b)
  assert rel_err(early, converged) > 1e-9

  # Inside jit, and on a pytree.
  def tree_matvec(tree):
    out = a @ jnp.concatenate([tree["u"], tree["v"].ravel()])
    return {"u": out[:4], "v": out[4:].reshape(2, 4)}

  tree = {"u": b[:4], "v": b[4:].reshape(2, 4)}
  ours, _ = jax.jit(im.cg(5, tol=0.0).solve, static_argnums=0)(
    tree_matvec, tree
  )
  theirs, _ = jax.jit(
    lambda t: jax.scipy.sparse.linalg.cg(
      tree_matvec, t, x0=t, tol=0.0, maxiter=5
    )
  )(tree)
  for u, v in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)
  jaxpr = str(jax.make_jaxpr(lambda b: im.cg(5).solve(matvec, b))(b))
  assert "custom_linear_solve" in jaxpr


def count_products(solver, a, b, maxiter):
  """Products with ``a`` executed in one jitted solve."""
  calls = []

  def matvec(v):
    jax.debug.callback(lambda: calls.append(1))
    return a @ v

  jax.block_until_ready(jax.jit(lambda b: solver(maxiter).solve(matvec, b))(b))
  return len(calls)


def test_products_per_solve(x64):
  a, b = spd_system(9, n=8, cond=50.0)
  a, b = jnp.asarray(a), jnp.asarray(b)
  plain = lambda **kw: lambda k: im.cg(k, tol=0.0, **kw)
  guarded = lambda **kw: (
    lambda k: im.cg(k, tol=0.0, stop_at_negative_curvature=True, **kw)
  )
  for k in (1, 5):
    # jax.scipy's cg spends one product on A x0, one per iteration, and the
    # residual is measured with one more.
    assert count_products(plain(), a, b, k) == k + 2
    assert count_products(plain(exact_residual=True), a, b, k) == k + 2
    assert count_products(plain(report_residual=False), a, b, k) == k + 1
    assert count_products(plain(warm_start=False), a, b, k) == k + 2
    # A residual flag per call: the product is spent only where it is true.
    for flag, extra in (
      (True, 1),
      (False, 0),
      (jnp.bool_(True), 1),
      (jnp.bool_(False), 0),
    ):
      calls = []

      def matvec(v, calls=calls):
        jax.debug.callback(lambda: calls.append(1))
        return a @ v

      solve = jax.jit(
        lambda b, r, k=k: im.cg(k, tol=0.0).solve(matvec, b, report_residual=r),
        static_argnums=((1,) if isinstance(flag, bool) else ()),
      )
      _, info = jax.block_until_ready(solve(b, flag))
      assert len(calls) == k + 1 + extra, (flag, calls)
      assert bool(np.isnan(info.residual)) == (not extra)
    # The guarded loop spends none on x0 = 0 and reports its own residual.
    assert count_products(guarded(), a, b, k) == k
    assert count_products(guarded(report_residual=False), a, b, k) == k
    assert count_products(guarded(exact_residual=True), a, b, k) == k + 1


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


@pytest.mark.parametrize(
  "factory, kwargs, message",
  [
    (im.cg, {"maxiter": 0}, "maxiter"),
    (im.cg, {"maxiter": 2.5}, "maxiter"),
    (im.cg, {"maxiter": 5, "tol": -1.0}, "tol"),
    (im.neumann, {"terms": 0}, "terms"),
    (im.neumann, {"terms": 3, "step": 0.0}, "step"),
  ],
)
def test_bad_solver_settings_are_named(factory, kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    factory(**kwargs)


@pytest.mark.parametrize(
  "solver",
  [im.cg(5), im.cg(5, report_residual=False), im.neumann(5), im.dense()],
)
def test_nonfinite_right_hand_side_is_not_turned_into_a_finite_answer(solver):
  x, _ = solver.solve(lambda v: 2.0 * v, jnp.array([1.0, jnp.nan, 2.0]))
  assert bool(jnp.all(jnp.isnan(x)))


def numpy_cg_with_counts(a, b, maxiter, tol=0.0):
  """Textbook CG in NumPy that stops before a step with p^T A p <= 0.

  Returns ``(x, stopped_at_negative_curvature, updates_applied)``.
  """
  x, r, p = np.zeros_like(b), b.copy(), b.copy()
  for k in range(maxiter):
    if np.linalg.norm(r) <= tol * np.linalg.norm(b):
      return x, False, k
    ap = a @ p
    curvature = p @ ap
    if curvature <= 0:
      return (b.copy() if k == 0 else x), True, k
    alpha = (r @ r) / curvature
    x = x + alpha * p
    r_next = r - alpha * ap
    p = r_next + (r_next @ r_next) / (r @ r) * p
    r = r_next
  return x, False, maxiter


def test_negative_curvature_guard_is_plain_cg_on_spd_systems(x64):
  a, b = spd_system(5, cond=50.0)
  a, b = jnp.asarray(a), jnp.asarray(b)
  for k in (1, 2, 5, 12):
    plain, _ = im.cg(k, tol=0.0, warm_start=False).solve(lambda v: a @ v, b)
    guarded, _ = im.cg(k, tol=0.0, stop_at_negative_curvature=True).solve(
      lambda v: a @ v, b
    )
    assert rel_err(guarded, plain) < 1e-12, k


def indefinite_system(seed, n=10):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eig = np.concatenate([np.geomspace(1.0, 20.0, n - 2), [-0.5, -3.0]])
  return (q * eig) @ q.T, q, eig


def test_negative_curvature_guard_stops_before_the_bad_step(x64):
  a, q, eig = indefinite_system(6)
  rng = np.random.default_rng(7)
  stopped_late = 0
  for _ in range(20):
    b = rng.normal(size=a.shape[0])
    expected, _, _ = numpy_cg_with_counts(a, b, maxiter=8)
    x, _ = jax.jit(
      im.cg(8, tol=0.0, stop_at_negative_curvature=True).solve, static_argnums=0
    )(lambda v: a @ v, jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-10, atol=1e-12)
    stopped_late += not np.allclose(expected, b)
  assert stopped_late > 0  # Some solves took steps before stopping.
  # The first direction b has negative curvature: the answer is b itself.
  b = q[:, -1] + 0.1 * q[:, 0]  # b^T A b = -3 + 0.01 < 0
  x, _ = im.cg(8, stop_at_negative_curvature=True).solve(
    lambda v: a @ v, jnp.asarray(b)
  )
  np.testing.assert_allclose(np.asarray(x), b, rtol=1e-12)
  # Plain CG steps along it and ends at the saddle A^{-1} b, which points
  # against b (b^T A^{-1} b = -1/3 + 0.01 < 0).
  plain, _ = im.cg(8).solve(lambda v: a @ v, jnp.asarray(b))
  assert float(jnp.asarray(b) @ plain) < 0


def test_negative_curvature_guard_under_vmap_and_on_pytrees(x64):
  a, _, _ = indefinite_system(8, n=6)
  rng = np.random.default_rng(9)
  bs = rng.normal(size=(5, 6))

  def matvec(tree):
    out = a @ jnp.concatenate([tree["u"], tree["v"].ravel()])
    return {"u": out[:2], "v": out[2:].reshape(2, 2)}

  solver = im.cg(6, tol=0.0, stop_at_negative_curvature=True)
  trees = {
    "u": jnp.asarray(bs[:, :2]),
    "v": jnp.asarray(bs[:, 2:].reshape(5, 2, 2)),
  }
  xs, _ = jax.vmap(lambda t: solver.solve(matvec, t))(trees)
  for i in range(5):
    expected, _, _ = numpy_cg_with_counts(a, bs[i], 6)
    got = np.concatenate(
      [np.asarray(xs["u"][i]), np.asarray(xs["v"][i]).ravel()]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_negative_curvature_path_is_its_own_loop(x64):
  # An indefinite system on which plain CG takes a step along a direction of
  # negative curvature: jax.scipy's cg (the default path) takes it, the
  # guarded loop stops before it.
  a, q, _ = indefinite_system(6)
  b = q[:, -1] + 0.1 * q[:, 0]  # b^T A b < 0: the very first step
  a, b = jnp.asarray(a), jnp.asarray(b)
  matvec = lambda v: a @ v
  plain, _ = im.cg(8, tol=0.0, warm_start=False).solve(matvec, b)
  scipy, _ = jax.scipy.sparse.linalg.cg(matvec, b, tol=0.0, maxiter=8)
  np.testing.assert_array_equal(plain, scipy)
  guarded, _ = im.cg(8, tol=0.0, stop_at_negative_curvature=True).solve(
    matvec, b
  )
  np.testing.assert_array_equal(guarded, b)
  assert rel_err(plain, b) > 1.0
  solver = im.cg(8, stop_at_negative_curvature=True)
  assert solver.name == "cg(8, stop_at_negative_curvature=True)"
  assert im.cg(8).name == "cg(8)"
  jaxpr = str(jax.make_jaxpr(lambda b: solver.solve(matvec, b))(b))
  assert "custom_linear_solve" not in jaxpr and "while" in jaxpr


def test_guarded_cg_reports_negative_curvature_and_updates_as_numpy(x64):
  a, q, _ = indefinite_system(6)
  rng = np.random.default_rng(10)
  solve = jax.jit(
    im.cg(4, tol=0.0, stop_at_negative_curvature=True).solve, static_argnums=0
  )
  seen = set()
  for trial in range(20):
    b = rng.normal(size=a.shape[0])
    _, flagged, updates = numpy_cg_with_counts(a, b, 4)
    _, info = solve(lambda v: a @ v, jnp.asarray(b))
    assert bool(info.negative_curvature) == flagged, trial
    assert int(info.iterations) == updates, trial
    assert info.iterations.dtype == jnp.int32
    seen.add((flagged, updates > 0))
  # Both a stop after some updates and a full run without a stop occurred,
  # so each branch of the comparison was exercised.
  assert {(True, True), (False, True)} <= seen, seen
  # The first direction has negative curvature: flagged, no update.
  b = q[:, -1] + 0.1 * q[:, 0]
  _, info = solve(lambda v: a @ v, jnp.asarray(b))
  assert bool(info.negative_curvature) and int(info.iterations) == 0


def test_guarded_cg_free_residual_is_the_returned_iterates_at_a_stop(x64):
  """The recurrence residual is that of the iterate returned, stop or not."""
  a, q, _ = indefinite_system(6)
  rng = np.random.default_rng(3)
  free = im.cg(4, tol=0.0, stop_at_negative_curvature=True)
  measured = im.cg(
    4, tol=0.0, stop_at_negative_curvature=True, exact_residual=True
  )
  right_hand_sides = [
    q[:, -1] + 0.1 * q[:, 0],
    *rng.normal(size=(8, a.shape[0])),
  ]
  outcomes = set()
  for b in right_hand_sides:
    b = jnp.asarray(b)
    x, info = free.solve(lambda v: a @ v, b)
    _, exact = measured.solve(lambda v: a @ v, b)
    expected = np.linalg.norm(a @ np.asarray(x) - b) / np.linalg.norm(b)
    np.testing.assert_allclose(float(info.residual), expected, rtol=1e-9)
    np.testing.assert_allclose(float(exact.residual), expected, rtol=1e-12)
    outcomes.add((bool(info.negative_curvature), int(info.iterations) > 0))
  # A stop at the first direction (x = b, residual b - A b, not b), a stop
  # after some updates, and at least one of them happened.
  assert (True, False) in outcomes and (True, True) in outcomes, outcomes
  # The example of a negative definite system: x = b, residual ||2b||/||b||.
  x, info = free.solve(lambda v: -v, jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(x, [1.0, 2.0])
  np.testing.assert_allclose(float(info.residual), 2.0, rtol=1e-12)


def test_guarded_cg_stops_at_exactly_zero_curvature(x64):
  """``p^T A p = 0`` is non-positive: CG stops rather than divide by it."""
  a = jnp.diag(jnp.array([1.0, -1.0, 2.0]))
  b = jnp.array([1.0, 1.0, 0.0])  # b^T A b = 1 - 1 + 0 = 0
  x, info = im.cg(3, tol=0.0, stop_at_negative_curvature=True).solve(
    lambda v: a @ v, b
  )
  assert bool(info.negative_curvature) and int(info.iterations) == 0
  np.testing.assert_array_equal(x, b)
  assert np.isfinite(float(info.residual))


def test_guarded_cg_on_spd_systems_never_flags_and_counts_early_stops(x64):
  a, b = spd_system(11, cond=40.0)
  a, b = jnp.asarray(a), jnp.asarray(b)
  for k, tol in [(1, 0.0), (4, 0.0), (12, 0.0), (50, 1e-3), (50, 1e-8)]:
    _, flagged, updates = numpy_cg_with_counts(
      np.asarray(a), np.asarray(b), k, tol
    )
    _, info = im.cg(k, tol=tol, stop_at_negative_curvature=True).solve(
      lambda v: a @ v, b
    )
    assert not flagged and not bool(info.negative_curvature), (k, tol)
    assert int(info.iterations) == updates, (k, tol, updates)
  # Early stopping made the tolerance runs shorter than maxiter.
  assert numpy_cg_with_counts(np.asarray(a), np.asarray(b), 50, 1e-3)[2] < 12
  # A zero right-hand side needs no update.
  _, info = im.cg(5, stop_at_negative_curvature=True).solve(
    lambda v: a @ v, jnp.zeros(12)
  )
  assert not bool(info.negative_curvature) and int(info.iterations) == 0


def test_guarded_cg_counts_under_vmap(x64):
  a, _, _ = indefinite_system(8, n=6)
  bs = np.random.default_rng(12).normal(size=(16, 6))
  # Three iterations: 14 of these 16 solves stop at negative curvature,
  # after one or two updates, and two run all three.
  solver = im.cg(3, tol=0.0, stop_at_negative_curvature=True)
  _, info = jax.vmap(lambda b: solver.solve(lambda v: a @ v, b))(
    jnp.asarray(bs)
  )
  expected = [numpy_cg_with_counts(a, b, 3)[1:] for b in bs]
  np.testing.assert_array_equal(
    info.negative_curvature, [e[0] for e in expected]
  )
  np.testing.assert_array_equal(info.iterations, [e[1] for e in expected])
  assert 0 < sum(e[0] for e in expected) < 16  # a mix of both outcomes


@pytest.mark.parametrize("solver", [im.cg(5), im.neumann(5), im.dense()])
def test_solvers_that_do_not_look_report_no_counts(solver):
  _, info = solver.solve(lambda v: 2.0 * v, jnp.ones(3))
  assert info.negative_curvature is None and info.iterations is None


def test_warm_start_beats_zero_start_at_equal_products(x64):
  # I + H/lam of a rank-deficient least-squares Hessian, as in iMAML; the
  # answer from numpy's dense solve. From x0 = b, k iterations search
  # b + K_k(A, b - A b), a subspace of K_{k+1}(A, b): as good as k + 1
  # iterations from zero up to the A-norm optimality of the latter, and
  # better than k iterations from zero, for the same k + 1 products.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(15, 40))
  a = np.eye(40) + x.T @ x / 15 / 2.0
  b = rng.normal(size=40)
  exact = np.linalg.solve(a, b)
  matvec = lambda v: jnp.asarray(a) @ v
  a_norm = lambda e: float(np.sqrt(e @ a @ e))
  for k in (1, 3, 5):
    warm, _ = im.cg(k, tol=0.0).solve(matvec, jnp.asarray(b))
    cold, _ = im.cg(k, tol=0.0, warm_start=False).solve(matvec, jnp.asarray(b))
    best, _ = im.cg(k + 1, tol=0.0, stop_at_negative_curvature=True).solve(
      matvec, jnp.asarray(b)
    )
    err = {
      n: a_norm(np.asarray(v) - exact)
      for n, v in (("warm", warm), ("cold", cold), ("best", best))
    }
    assert err["warm"] < 0.7 * err["cold"], (k, err)
    assert err["best"] <= err["warm"] * (1 + 1e-9), (k, err)


def test_solvers_keep_each_leafs_dtype_when_dtypes_are_mixed():
  """A float32 leaf beside a bfloat16 one: every solver returns each leaf in
  its own dtype, near the exact solution of the diagonal system."""
  scale = {
    "w": jnp.array([2.0, 3.0, 4.0]),
    "b": jnp.array([1.5, 2.5], jnp.bfloat16),
  }
  b = {"w": jnp.ones(3), "b": jnp.ones(2, jnp.bfloat16)}
  matvec = lambda v: jax.tree.map(lambda s, x: s * x, scale, v)
  for solver in (
    im.cg(5),
    im.cg(5, warm_start=False),
    im.cg(5, stop_at_negative_curvature=True),
    im.neumann(60, 0.2),
    im.dense(),
  ):
    x, info = solver.solve(matvec, b)
    assert x["w"].dtype == jnp.float32 and x["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(x["w"], [1 / 2, 1 / 3, 1 / 4], rtol=1e-2)
    np.testing.assert_allclose(
      x["b"].astype(np.float32), [1 / 1.5, 1 / 2.5], rtol=2e-2
    )
    assert float(info.residual) < 3e-2, solver.name


def test_dense_solves_a_bfloat16_system():
  a = jnp.array([[2.0, 1.0], [1.0, 3.0]], jnp.bfloat16)
  b = jnp.array([1.0, 2.0], jnp.bfloat16)
  x, _ = im.dense().solve(lambda v: a @ v, b)
  assert x.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    x.astype(np.float32), np.linalg.solve([[2, 1], [1, 3]], [1, 2]), rtol=2e-2
  )


def test_implicit_gradient_of_mixed_dtype_parameters():
  """im.adapt's backward pass (default CG) on float32 and bfloat16 leaves:
  the gradient keeps the dtypes and matches the all-float32 one."""
  x = jnp.array([1.0, 2.0, 3.0])

  def loss(p, x):
    return jnp.sum(p["w"] * x) ** 2 + jnp.sum(p["b"].astype(jnp.float32) ** 2)

  def meta(p):
    phi = im.adapt(loss, p, x, lam=2.0, inner=im.gd(20, 0.01))
    return loss(phi, x)

  mixed = {"w": jnp.ones(3) * 0.1, "b": jnp.full(2, 0.5, jnp.bfloat16)}
  grad = jax.grad(meta)(mixed)
  assert grad["w"].dtype == jnp.float32 and grad["b"].dtype == jnp.bfloat16
  reference = jax.grad(meta)(
    jax.tree.map(lambda a: a.astype(jnp.float32), mixed)
  )
  np.testing.assert_allclose(grad["w"], reference["w"], rtol=2e-2)
  np.testing.assert_allclose(
    grad["b"].astype(np.float32), reference["b"], rtol=2e-2
  )
