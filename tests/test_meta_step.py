import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import linreg_exact
from problems import linreg_loss
from problems import linreg_task
from problems import mlp_init

import imaml_jax as im


def linreg_batch(n_tasks, seed=0, dtype=np.float64):
  tasks = [linreg_task(seed + i, dtype=dtype) for i in range(n_tasks)]
  stack = lambda i: jax.tree.map(
    lambda *a: jnp.stack(a), *[t[i] for t in tasks]
  )
  return im.Task(stack(0), stack(1)), tasks


def test_step_averages_exact_task_gradients_and_applies_optimizer(x64):
  tasks, raw = linreg_batch(4)
  lam, lr = 2.0, 0.1
  alg = im.imaml(lam, im.gd(300, 0.2), im.cg(50, tol=1e-15))
  init, step = im.make_meta_step(
    linreg_loss, optax.sgd(lr), alg, per_task_metrics=True
  )
  theta = jnp.linspace(-1, 1, 5)
  state, metrics = jax.jit(step)(init(theta), tasks)
  mean_grad = np.mean([linreg_exact(theta, s, q, lam)[1] for s, q in raw], 0)
  np.testing.assert_allclose(state.params, theta - lr * mean_grad, rtol=1e-10)
  assert int(state.step) == 1 and int(state.skipped) == 0
  assert metrics["per_task"]["loss_after"].shape == (4,)
  np.testing.assert_allclose(
    metrics["loss_after"], np.mean(metrics["per_task"]["loss_after"])
  )
  expected_before = np.mean([linreg_loss(theta, q) for _, q in raw])
  np.testing.assert_allclose(
    metrics["loss_before"], expected_before, rtol=1e-12
  )
  assert float(metrics["residual"]) < 1e-10


def test_aux_metrics_are_reported_before_and_after_adaptation():
  def loss(w, batch):
    x, y = batch
    logits = x @ w
    ce = -jnp.mean(
      jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)
    )
    return ce, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (3, 10, 4))
  y = jnp.tile(jnp.arange(2), (3, 5))
  init, step = im.make_meta_step(
    loss,
    optax.adam(1e-2),
    im.imaml(1.0, im.gd(10, 0.5), im.cg(5)),
    has_aux=True,
  )
  _, metrics = jax.jit(step)(init(jnp.zeros((4, 2))), im.Task((x, y), (x, y)))
  assert {
    "accuracy_before",
    "accuracy_after",
    "loss_before",
    "loss_after",
    "residual",
    "grad_norm",
    "skipped",
  } <= set(metrics)
  assert float(metrics["accuracy_after"]) > float(metrics["accuracy_before"])


def test_step_compiles_once_for_a_fixed_shape():
  traces = []

  def loss(w, batch):
    traces.append(1)
    return linreg_loss(w, batch)

  init, step = im.make_meta_step(
    loss, optax.adam(1e-3), im.imaml(2.0, im.gd(3, 0.1), im.cg(2))
  )
  step = jax.jit(step)
  state = init(jnp.zeros(5, jnp.float32))
  for seed in range(3):
    tasks, _ = linreg_batch(2, seed=seed, dtype=np.float32)
    state, _ = step(state, tasks)
  first = len(traces)
  tasks, _ = linreg_batch(2, seed=9, dtype=np.float32)
  state, _ = step(state, tasks)
  assert len(traces) == first and step._cache_size() == 1
  assert int(state.step) == 4


def test_donated_state_works():
  init, step = im.make_meta_step(
    linreg_loss, optax.adam(1e-3), im.fomaml(im.gd(3, 0.1))
  )
  step = jax.jit(step, donate_argnums=0)
  state = init(jnp.zeros(5, jnp.float32))
  tasks, _ = linreg_batch(2, dtype=np.float32)
  for _ in range(3):
    state, _ = step(state, tasks)
  assert int(state.step) == 3


def test_nonfinite_meta_gradient_skips_the_update():
  tasks, _ = linreg_batch(2, dtype=np.float32)
  x, y = tasks.query
  bad = im.Task(tasks.support, (x, y.at[0, 0].set(jnp.nan)))
  init, step = im.make_meta_step(
    linreg_loss, optax.adam(1e-1), im.imaml(2.0, im.gd(3, 0.1), im.cg(2))
  )
  step = jax.jit(step)
  state0 = init(jnp.ones(5, jnp.float32))
  state1, m1 = step(state0, tasks)
  state2, m2 = step(state1, bad)
  assert int(m1["skipped"]) == 0 and int(m2["skipped"]) == 1
  np.testing.assert_array_equal(state2.params, state1.params)
  for a, b in zip(
    jax.tree.leaves(state2.opt_state), jax.tree.leaves(state1.opt_state)
  ):
    np.testing.assert_array_equal(a, b)
  assert int(state2.step) == 2 and int(state2.skipped) == 1
  # Opting out lets the NaN through, as documented.
  init, step = im.make_meta_step(
    linreg_loss,
    optax.adam(1e-1),
    im.imaml(2.0, im.gd(3, 0.1), im.cg(2)),
    skip_nonfinite=False,
  )
  state, metrics = jax.jit(step)(state1, bad)
  assert not bool(jnp.all(jnp.isfinite(state.params)))
  # The NaN update was applied, so nothing counts as skipped.
  assert int(metrics["skipped"]) == 0 and int(state.skipped) == 0
  assert not np.isfinite(float(metrics["grad_norm"]))


def test_pytree_params_and_every_algorithm_run_under_jit():
  params = mlp_init(jax.random.PRNGKey(0), dtype=jnp.float32)
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (4, 8, 3))
  y = jnp.sin(x[..., :1])
  from problems import mlp_loss

  tasks = im.Task((x, y), (x, y))
  for alg in (
    im.imaml(2.0, im.gd(5, 0.1), im.cg(5)),
    im.imaml(2.0, im.hessian_free(2, 3), im.neumann(5, 0.5)),
    im.maml(im.gd(5, 0.1), remat=True),
    im.fomaml(im.gd(5, 0.1)),
    im.reptile(im.nesterov(5, 0.1, 0.5)),
  ):
    init, step = im.make_meta_step(mlp_loss, optax.adam(1e-2), alg)
    state, metrics = jax.jit(step)(init(params), tasks)
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    assert np.isfinite(float(metrics["loss_after"])), alg.name


def test_eval_step_reports_per_task_metrics():
  tasks, _ = linreg_batch(3, dtype=np.float32)
  evaluate = im.make_eval_step(linreg_loss, im.imaml(2.0, im.gd(50, 0.2)))
  metrics = jax.jit(evaluate)(jnp.zeros(5, jnp.float32), tasks)
  assert metrics["loss_after"].shape == (3,)
  assert bool(jnp.all(metrics["loss_after"] < metrics["loss_before"]))


def test_mismatched_task_counts_are_rejected_before_tracing():
  tasks, _ = linreg_batch(3, dtype=np.float32)
  bad = im.Task(tasks.support, jax.tree.map(lambda a: a[:2], tasks.query))
  init, step = im.make_meta_step(
    linreg_loss, optax.adam(1e-3), im.imaml(2.0, im.gd(3, 0.1), im.cg(2))
  )
  with pytest.raises(ValueError, match="support has 3 tasks but query has 2"):
    step(init(jnp.zeros(5, jnp.float32)), bad)
  with pytest.raises(TypeError, match="im.Task"):
    step(init(jnp.zeros(5, jnp.float32)), (tasks.support, tasks.query))
  with pytest.raises(TypeError, match="floating"):
    init(jnp.zeros(5, jnp.int32))
  with pytest.raises(TypeError, match="algorithm"):
    im.make_meta_step(linreg_loss, optax.adam(1e-3), "imaml")


def test_a_missing_task_axis_or_empty_example_axis_is_named():
  tasks, _ = linreg_batch(3, dtype=np.float32)
  init, step = im.make_meta_step(
    linreg_loss, optax.adam(1e-3), im.imaml(2.0, im.gd(3, 0.1), im.cg(2))
  )
  evaluate = im.make_eval_step(linreg_loss, im.imaml(2.0, im.gd(3, 0.1)))
  state = init(jnp.zeros(5, jnp.float32))
  one_task = jax.tree.map(lambda a: a[0], tasks)  # 20 support, 30 query
  with pytest.raises(
    ValueError,
    match=r"support has 20 tasks but query has 30; .*every leaf needs a "
    r"leading task axis; .*jax.tree.map\(lambda a: a\[None\], task\)",
  ):
    jax.jit(step)(state, one_task)
  no_query = im.Task(
    tasks.support, jax.tree.map(lambda a: a[:, :0], tasks.query)
  )
  for run in (
    lambda t: jax.jit(step)(state, t),
    lambda t: evaluate(state.params, t),
  ):
    with pytest.raises(
      ValueError, match=r"query\[0\] has shape \(3, 0, 5\): its example axis"
    ):
      run(no_query)


@pytest.mark.parametrize(
  "returns_pair, has_aux, message",
  [
    (False, True, r"loss_fn returned an array of shape \(\) but has_aux=True"),
    (True, False, "loss_fn returned a tuple of 2 elements but has_aux=False"),
  ],
)
@pytest.mark.parametrize("build", ["meta_step", "eval_step", "stochastic"])
def test_has_aux_that_does_not_match_the_loss_is_named_while_tracing(
  returns_pair, has_aux, message, build
):
  tasks, _ = linreg_batch(2, dtype=np.float32)
  theta = jnp.zeros(5, jnp.float32)
  if build == "stochastic":
    loss = lambda w, b, key: (linreg_loss(w, b), {})
    if not returns_pair:
      loss = lambda w, b, key: linreg_loss(w, b)
  else:
    loss = (
      (lambda w, b: (linreg_loss(w, b), {})) if returns_pair else linreg_loss
    )
  alg = im.imaml(2.0, im.gd(3, 0.1), im.cg(2))
  if build == "eval_step":
    run = lambda: jax.jit(im.make_eval_step(loss, alg, has_aux=has_aux))(
      theta, tasks
    )
  else:
    stochastic = build == "stochastic"
    init, step = im.make_meta_step(
      loss, optax.adam(1e-3), alg, has_aux=has_aux, stochastic=stochastic
    )
    key = (jax.random.key(0),) if stochastic else ()
    run = lambda: jax.jit(step)(init(theta), tasks, *key)
  with pytest.raises(TypeError, match=message):
    run()


def test_step_builders_check_their_arguments_at_once():
  alg = im.imaml(2.0, im.gd(3, 0.1))
  for has_aux in ("no", None, 1):
    with pytest.raises(TypeError, match="has_aux must be True or False"):
      im.make_meta_step(linreg_loss, optax.adam(1e-3), alg, has_aux=has_aux)
    with pytest.raises(TypeError, match="has_aux must be True or False"):
      im.make_eval_step(linreg_loss, alg, has_aux=has_aux)
  with pytest.raises(TypeError, match="algorithm must be built by .* got str"):
    im.make_eval_step(linreg_loss, "imaml")
  with pytest.raises(TypeError, match="got function; did you forget to call"):
    im.make_eval_step(linreg_loss, im.imaml)
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    im.make_eval_step(None, alg)
  with pytest.raises(
    TypeError,
    match=r"optimizer must be an optax.GradientTransformation such as "
    r"optax.adam\(1e-3\), got function; did you forget to call it\?",
  ):
    im.make_meta_step(linreg_loss, optax.adam, alg)
  with pytest.raises(TypeError, match="optimizer must be .* got str"):
    im.make_meta_step(linreg_loss, "adam", alg)
  # Both optax classes are accepted.
  sgd = optax.sgd(0.1)
  plain = optax.GradientTransformation(sgd.init, sgd.update)
  assert type(plain) is not type(sgd)
  for optimizer in (sgd, plain, optax.chain(optax.clip(1.0), sgd)):
    im.make_meta_step(linreg_loss, optimizer, alg)


def compiled_temp_bytes(alg, steps_unused=None):
  params = mlp_init(
    jax.random.PRNGKey(0), sizes=(16, 256, 256, 1), dtype=jnp.float32
  )
  x = jnp.zeros((4, 64, 16))
  y = jnp.zeros((4, 64, 1))
  from problems import mlp_loss

  init, step = im.make_meta_step(mlp_loss, optax.adam(1e-3), alg)
  compiled = (
    jax.jit(step).lower(init(params), im.Task((x, y), (x, y))).compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


def test_imaml_memory_is_flat_in_inner_steps_and_maml_memory_grows():
  imaml_mem = [
    compiled_temp_bytes(im.imaml(2.0, im.gd(k, 0.1), im.cg(5)))
    for k in (5, 100)
  ]
  maml_mem = [compiled_temp_bytes(im.maml(im.gd(k, 0.1))) for k in (5, 100)]
  assert imaml_mem[1] <= 1.1 * imaml_mem[0], imaml_mem
  assert maml_mem[1] > 5 * maml_mem[0], maml_mem


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_task_chunking_gives_the_same_step_as_one_vmap(x64, chunk):
  tasks, _ = linreg_batch(4)
  alg = im.imaml(2.0, im.gd(20, 0.2), im.cg(5))
  results = []
  for task_chunk in (None, chunk):
    init, step = im.make_meta_step(
      linreg_loss,
      optax.adam(1e-2),
      alg,
      task_chunk=task_chunk,
      per_task_metrics=True,
    )
    results.append(jax.jit(step)(init(jnp.linspace(-1, 1, 5)), tasks))
  (s1, m1), (s2, m2) = results
  np.testing.assert_allclose(s2.params, s1.params, rtol=1e-12)
  np.testing.assert_allclose(
    m2["per_task"]["loss_after"], m1["per_task"]["loss_after"], rtol=1e-12
  )


@pytest.mark.parametrize("stochastic", [False, True])
def test_eval_step_task_chunking_maps_over_tasks_with_the_same_metrics(
  x64, stochastic
):
  """make_eval_step(task_chunk=c) runs lax.map over chunks of c tasks (a
  scan around the inner loop's) and scores every task as one vmap."""
  tasks, _ = linreg_batch(5)
  loss = linreg_loss
  if stochastic:  # A key-dependent loss: each task's key must not move.
    loss = lambda w, b, key: (
      linreg_loss(w, b) * (1.0 + 0.1 * jax.random.uniform(key))
    )
  alg = im.imaml(2.0, im.gd(20, 0.2), im.cg(5))
  params = jnp.linspace(-1, 1, 5)
  extra = (jax.random.key(4),) if stochastic else ()
  per_chunk, scans = {}, {}
  for chunk in (None, 1, 2, 5):
    evaluate = im.make_eval_step(
      loss, alg, stochastic=stochastic, task_chunk=chunk
    )
    program = str(jax.make_jaxpr(evaluate)(params, tasks, *extra))
    scans[chunk] = program.count("scan[")
    per_chunk[chunk] = jax.jit(evaluate)(params, tasks, *extra)
  # A chunk of the whole batch (5) is one vmap, as None; chunks of 2 leave
  # a remainder of one task, vmapped apart with its own inner loop.
  assert scans[1] == scans[None] + 1 == scans[5] + 1, scans
  assert scans[2] == scans[None] + 2, scans
  for chunk in (1, 2, 5):
    for name, value in per_chunk[None].items():
      assert per_chunk[chunk][name].shape == (5,)
      np.testing.assert_allclose(per_chunk[chunk][name], value, rtol=1e-12)


@pytest.mark.parametrize(
  "chunk, error", [(0, ValueError), ("2", TypeError), (2.0, TypeError)]
)
def test_eval_step_refuses_a_bad_task_chunk_when_built(chunk, error):
  with pytest.raises(error, match="task_chunk must be"):
    im.make_eval_step(linreg_loss, im.fomaml(im.gd(1, 0.1)), task_chunk=chunk)


def _convnet_problem(n_tasks=2):
  """MAML's Omniglot network, random images: (loss, params, tasks)."""
  from imaml_jax import models

  net = models.omniglot_convnet(5, variant="maml")
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (n_tasks, 5, 28, 28, 1))
  xq = jax.random.normal(keys[1], (n_tasks, 5, 28, 28, 1))
  y = jnp.tile(jnp.arange(5), (n_tasks, 1))
  params = models.init_params(net, keys[2], x[0])
  classify = models.classification_loss(net)

  def loss(p, batch):
    # The aux entries fingerprint the parameters the loss was called with, so
    # the metrics show which of them the inner loop moved.
    value, aux = classify(p, batch)
    norms = sum(
      jnp.sum(v)
      for k in p
      if k.startswith("norm")
      for v in jax.tree.leaves(p[k])
    )
    head = jnp.sum(p["head"]["kernel"])
    return value, dict(aux, norm_sum=norms, head_sum=head)

  return loss, params, im.Task((x, y), (xq, y))


@pytest.mark.parametrize("factory", [im.maml, im.fomaml])
def test_adapts_acts_through_the_default_flattened_meta_step(factory):
  # Regression test: with flatten=True (the default) the predicate used to see
  # one raveled vector, whose only key path () it accepted, so every
  # parameter was adapted and adapts=im.adapt_all_but_norm changed nothing.
  loss, params, tasks = _convnet_problem()
  run = {}
  for adapts in (None, im.adapt_all_but_norm):
    for flatten in (True, False):
      init, step = im.make_meta_step(
        loss,
        optax.sgd(1.0),
        factory(im.gd(2, 0.4), adapts=adapts),
        has_aux=True,
        per_task_metrics=True,
        flatten=flatten,
      )
      state, metrics = jax.jit(step)(init(params), tasks)
      run[adapts is None, flatten] = (state.params, metrics["per_task"])
  for flatten in (True, False):
    _, frozen = run[False, flatten]
    _, moving = run[True, flatten]
    # Left out: the batch norms are bitwise what they were at theta.
    np.testing.assert_array_equal(
      frozen["norm_sum_after"], frozen["norm_sum_before"]
    )
    assert np.all(moving["norm_sum_after"] != moving["norm_sum_before"])
    assert np.all(frozen["head_sum_after"] != frozen["head_sum_before"])
  # The flattened step computes the unflattened meta-gradient (sgd(1.0):
  # the new parameters are theta - g), and leaving the norms out matters.
  flat_params, flat_metrics = run[False, True]
  tree_params, _ = run[False, False]
  grad = lambda new: np.concatenate(
    [
      np.ravel(a - b)
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new))
    ]
  )
  g_flat, g_tree = grad(flat_params), grad(tree_params)
  assert np.linalg.norm(g_flat - g_tree) < 1e-5 * np.linalg.norm(g_tree)
  all_params, all_metrics = run[True, True]
  assert not np.allclose(flat_metrics["loss_after"], all_metrics["loss_after"])
  moved = lambda p: np.asarray(p["conv0"]["kernel"] - params["conv0"]["kernel"])
  assert np.abs(moved(flat_params) - moved(all_params)).max() > 1e-6


def test_adapts_acts_through_the_flattened_eval_step():
  loss, params, tasks = _convnet_problem()
  out = {}
  for adapts in (None, im.adapt_all_but_norm):
    for flatten in (True, False):
      evaluate = im.make_eval_step(
        loss,
        im.maml(im.gd(2, 0.4), adapts=adapts),
        has_aux=True,
        flatten=flatten,
      )
      out[adapts is None, flatten] = jax.jit(evaluate)(params, tasks)
  frozen = out[False, True]
  np.testing.assert_array_equal(
    frozen["norm_sum_after"], frozen["norm_sum_before"]
  )
  np.testing.assert_allclose(
    frozen["loss_after"], out[False, False]["loss_after"], rtol=1e-5
  )
  assert not np.allclose(frozen["loss_after"], out[True, True]["loss_after"])


def _dropout_problem(n_tasks=4):
  """A one-hidden-layer regression net with dropout; identical tasks."""

  def loss(p, batch, key):
    x, y = batch
    hidden = jax.nn.relu(x @ p["w1"])
    mask = jax.random.bernoulli(key, 0.5, hidden.shape)
    pred = (jnp.where(mask, hidden, 0.0) * 2.0) @ p["w2"]
    # Which units were dropped, as one number per call.
    mask_id = jnp.sum(mask * jnp.arange(mask.size).reshape(mask.shape))
    return jnp.mean((pred - y) ** 2), {"mask": mask_id}

  params = {
    "w1": jax.random.normal(jax.random.key(0), (1, 32)),
    "w2": jax.random.normal(jax.random.key(1), (32, 1)) / 4,
  }
  x = jnp.broadcast_to(jnp.linspace(-1, 1, 10)[None, :, None], (n_tasks, 10, 1))
  tasks = im.Task((x, jnp.sin(3 * x)), (x, jnp.sin(3 * x)))
  return loss, params, tasks


def test_stochastic_loss_gets_a_distinct_reproducible_key_per_task():
  loss, params, tasks = _dropout_problem()
  alg = im.imaml(2.0, im.gd(5, 0.05), im.cg(3))
  runs = {}
  for chunk in (None, 1):
    init, step = im.make_meta_step(
      loss,
      optax.adam(1e-2),
      alg,
      has_aux=True,
      per_task_metrics=True,
      stochastic=True,
      task_chunk=chunk,
    )
    step = jax.jit(step)
    for seed in (0, 0, 1):
      state, metrics = step(init(params), tasks, jax.random.key(seed))
      runs.setdefault((chunk, seed), []).append((state, metrics["per_task"]))
  (state_a, per_task), (state_b, _) = runs[None, 0]
  # Four identical tasks, four different masks, and so four different losses.
  assert len(set(np.asarray(per_task["mask_after"]).tolist())) == 4
  assert len(set(np.asarray(per_task["loss_after"]).tolist())) == 4
  # The query set is judged with one mask before and after adaptation.
  np.testing.assert_array_equal(per_task["mask_after"], per_task["mask_before"])
  # Same key: bitwise the same step. Another key: another step.
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  other, _ = runs[None, 1][0]
  assert not np.array_equal(other.params["w1"], state_a.params["w1"])
  # One task at a time (lax.map) gives each task the same key as one vmap.
  chunked, chunked_tasks = runs[1, 0][0]
  np.testing.assert_array_equal(
    chunked_tasks["mask_after"], per_task["mask_after"]
  )
  np.testing.assert_allclose(
    chunked.params["w1"], state_a.params["w1"], rtol=1e-5, atol=1e-7
  )


def test_support_and_query_sets_get_keys_of_their_own():
  from imaml_jax._src.meta_step import keyed_tasks

  _, _, tasks = _dropout_problem(3)
  keyed = keyed_tasks(tasks, jax.random.key(0), 3)
  data = jax.random.key_data
  support_keys, query_keys = keyed.support[1], keyed.query[1]
  assert support_keys.shape == query_keys.shape == (3,)
  rows = {
    tuple(np.asarray(data(k)).tolist())
    for k in list(support_keys) + list(query_keys)
  }
  assert len(rows) == 6


def test_stochastic_step_and_eval_step_refuse_a_missing_or_stray_key():
  loss, params, tasks = _dropout_problem()
  alg = im.imaml(2.0, im.gd(2, 0.05), im.cg(2))
  init, step = im.make_meta_step(
    loss, optax.sgd(0.1), alg, has_aux=True, stochastic=True
  )
  with pytest.raises(TypeError, match=r"step\(state, tasks, key\)"):
    step(init(params), tasks)
  with pytest.raises(TypeError, match="key must be one PRNG key"):
    step(init(params), tasks, jax.random.split(jax.random.key(0), 2))
  # Under jit the message describes the traced value, not its class.
  with pytest.raises(
    TypeError, match=r"got an array of shape \(\) and dtype int32"
  ):
    jax.jit(step)(init(params), tasks, jnp.int32(7))
  plain = lambda p, b: loss(p, b, jax.random.key(0))
  init, step = im.make_meta_step(plain, optax.sgd(0.1), alg, has_aux=True)
  with pytest.raises(TypeError, match="stochastic=True"):
    step(init(params), tasks, jax.random.key(0))
  evaluate = im.make_eval_step(loss, alg, has_aux=True, stochastic=True)
  metrics = jax.jit(evaluate)(params, tasks, jax.random.PRNGKey(3))
  assert len(set(np.asarray(metrics["mask_after"]).tolist())) == 4
  with pytest.raises(TypeError, match=r"step\(state, tasks, key\)"):
    evaluate(params, tasks)


def test_stochastic_step_refuses_reptile_on_minibatches():
  """A task's key has no mini-batch axis to step through."""
  loss, _, _ = _dropout_problem()
  alg = im.reptile(im.gd(2, 0.05), minibatches=True)
  with pytest.raises(ValueError, match="stochastic=True does not apply"):
    im.make_meta_step(loss, optax.sgd(0.1), alg, has_aux=True, stochastic=True)
  # Without the key, and without mini-batches with it, the step builds.
  im.make_meta_step(
    lambda p, b: loss(p, b, jax.random.key(0)),
    optax.sgd(0.1),
    alg,
    has_aux=True,
  )
  im.make_meta_step(
    loss,
    optax.sgd(0.1),
    im.reptile(im.gd(2, 0.05)),
    has_aux=True,
    stochastic=True,
  )


def test_make_meta_step_returns_a_named_pair():
  built = im.make_meta_step(
    lambda w, b: jnp.sum(w * b[0]), optax.sgd(0.1), im.fomaml(im.gd(1, 0.1))
  )
  assert isinstance(built, im.MetaStep)
  init, step = built
  assert built.init is init and built.step is step


def test_factories_require_what_has_no_universal_default():
  with pytest.raises(TypeError):
    im.imaml(inner=im.gd(1, 0.1))  # lam
  with pytest.raises(TypeError):
    im.imaml(2.0)  # inner
  for factory in (im.maml, im.fomaml, im.reptile):
    with pytest.raises(TypeError, match="inner must be an inner algorithm"):
      factory(None)
  for inner in (im.gd, im.nesterov, im.adam, im.gd_then_pull_back):
    with pytest.raises(TypeError):
      inner(16)  # lr


def test_stochastic_loss_without_aux():
  loss, params, tasks = _dropout_problem()
  scalar_loss = lambda p, b, key: loss(p, b, key)[0]
  init, step = im.make_meta_step(
    scalar_loss,
    optax.sgd(0.1),
    im.fomaml(im.gd(2, 0.05)),
    stochastic=True,
    per_task_metrics=True,
  )
  _, metrics = jax.jit(step)(init(params), tasks, jax.random.key(0))
  assert len(set(np.asarray(metrics["per_task"]["loss_after"]).tolist())) == 4


@pytest.mark.parametrize(
  "aux, message",
  [
    ([1.0], "aux a dict of scalar metrics"),
    ({"stats": {"mean": 0.0}}, r"aux\['stats'\] must be a scalar metric"),
    ({"row": jnp.zeros(3)}, r"aux\['row'\] must be a scalar metric"),
  ],
)
def test_aux_that_is_not_a_dict_of_scalars_is_named(aux, message):
  loss = lambda w, b: (jnp.sum(w * b), aux)
  init, step = im.make_meta_step(
    loss, optax.sgd(0.1), im.fomaml(im.gd(1, 0.1)), has_aux=True
  )
  x = jnp.ones((2, 3))
  with pytest.raises(TypeError, match=message):
    step(init(jnp.zeros(3)), im.Task(x, x))


@pytest.mark.parametrize("build", ["step", "evaluate"])
def test_aux_entry_named_loss_is_refused(build):
  # Reported as loss_after/loss_before, the entry would replace the
  # metrics of the loss itself (here the loss without its weight decay).
  def loss(w, batch):
    data = jnp.mean((batch[0] @ w - batch[1]) ** 2)
    return data + 0.1 * jnp.sum(w**2), {"loss": data}

  alg = im.imaml(2.0, im.gd(2, 0.1))
  x, y = jnp.ones((2, 4, 3)), jnp.zeros((2, 4))
  tasks, w = im.Task((x, y), (x, y)), jnp.ones(3)
  if build == "step":
    init, step = im.make_meta_step(loss, optax.sgd(0.1), alg, has_aux=True)
    run = lambda: step(init(w), tasks)
  else:
    run = lambda: im.make_eval_step(loss, alg, has_aux=True)(w, tasks)
  with pytest.raises(ValueError, match=r"aux\['loss'\] would be reported"):
    run()


@pytest.mark.parametrize(
  "chunk, error, message",
  [
    (0, ValueError, "task_chunk must be >= 1, got 0"),
    (-2, ValueError, "task_chunk must be >= 1, got -2"),
    ("2", TypeError, "task_chunk must be a positive integer, got '2'"),
    (8.0, TypeError, "task_chunk must be a positive integer, got 8.0"),
  ],
)
def test_bad_task_chunk_is_refused_when_the_step_is_built(
  chunk, error, message
):
  # Checked only while tracing, and only for a chunk smaller than the
  # batch, '2' would fail in a bare comparison and 8.0 on a batch of 4
  # tasks would pass unnoticed.
  alg = im.fomaml(im.gd(1, 0.1))
  with pytest.raises(error, match=message):
    im.make_meta_step(linreg_loss, optax.sgd(0.1), alg, task_chunk=chunk)


def test_residual_is_measured_only_on_the_steps_asked_for(x64):
  # The meta-gradient is the closed form's whatever the residual flag; the
  # residual is NaN exactly on the steps that did not measure it.
  tasks, raw = linreg_batch(2)
  lam = 2.0
  alg = im.imaml(lam, im.gd(300, 0.2), im.cg(20, tol=1e-15))
  theta = jnp.linspace(-1, 1, 5)
  exact = np.mean([linreg_exact(theta, s, q, lam)[1] for s, q in raw], 0)
  seen = {}
  for name, flag in (
    ("default", None),
    ("never", False),
    ("always", True),
    ("odd", lambda s: s.step % 2 == 1),
  ):
    init, step = im.make_meta_step(
      linreg_loss, optax.sgd(1.0), alg, report_residual=flag, task_chunk=1
    )
    step = jax.jit(step)
    state, first = step(init(theta), tasks)
    _, second = step(state, tasks)
    np.testing.assert_allclose(theta - state.params, exact, rtol=1e-9)
    seen[name] = (float(first["residual"]), float(second["residual"]))
  for name in ("default", "always"):
    assert all(r < 1e-10 for r in seen[name]), seen
  assert all(np.isnan(r) for r in seen["never"]), seen
  assert np.isnan(seen["odd"][0]) and seen["odd"][1] < 1e-10, seen


def test_report_residual_is_refused_where_there_is_no_linear_solve():
  loss = lambda w, b: jnp.sum(w * b)
  with pytest.raises(ValueError, match="report_residual applies to implicit"):
    im.make_meta_step(
      loss, optax.sgd(0.1), im.maml(im.gd(1, 0.1)), report_residual=False
    )


def test_the_guarded_solve_reports_its_free_residual_whatever_the_flag(x64):
  # Its recurrence carries the residual at no cost, so report_residual=False
  # does not make it NaN (as the docstring says), and it is the true one.
  tasks, raw = linreg_batch(2)
  lam = 2.0
  solver = im.cg(20, tol=1e-15, stop_at_negative_curvature=True)
  alg = im.imaml(lam, im.gd(300, 0.2), solver)
  theta = jnp.linspace(-1, 1, 5)
  exact = np.mean([linreg_exact(theta, s, q, lam)[1] for s, q in raw], 0)
  for flag in (False, True):
    init, step = im.make_meta_step(
      linreg_loss, optax.sgd(1.0), alg, report_residual=flag, task_chunk=1
    )
    state, metrics = jax.jit(step)(init(theta), tasks)
    np.testing.assert_allclose(theta - state.params, exact, rtol=1e-9)
    assert float(metrics["residual"]) < 1e-10, (flag, metrics["residual"])
