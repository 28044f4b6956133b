"""Users' own models in the meta-step: plain JAX, Flax linen, Flax NNX, Equinox.

The examples of ``docs/guides/own_model.md``, with assertions: each model
family meta-trains a few sinusoid steps and adaptation lowers the query loss;
linen and NNX give the same meta-gradient; an Equinox module meta-trains
through ``eqx.partition``; dropout gets distinct per-task masks and reruns
are bitwise equal, and an NNX model's dropout layers draw a mask each;
``adapts`` works under the default flattened step; models with running
averages or non-array leaves are refused with errors that say what to do.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import imaml_jax as im
from imaml_jax import models
from imaml_jax.data.synthetic import sinusoid_tasks

# Sinusoid regression, 20-shot: the MSE's Hessian has eigenvalues in the
# hundreds at initialisation, so lam and the inner step are on that scale.
LAM = 30.0
INNER = im.gd(16, 0.005, backtrack=True)
STEPS = 100
N_TASKS = 8


def sample(i, n_tasks=N_TASKS):
  return sinusoid_tasks(
    jax.random.fold_in(jax.random.key(1), i), n_tasks, 20, 10
  )


def imaml():
  return im.imaml(LAM, INNER, im.cg(5))


def meta_train(loss_fn, params, algorithm, *, steps=STEPS, key=None, **kwargs):
  """``(state, before, after)``: the mean query losses of the last 20 steps."""
  init, step = im.make_meta_step(
    loss_fn, optax.adam(3e-3), algorithm, stochastic=key is not None, **kwargs
  )
  step = jax.jit(step)
  state = init(params)
  before, after = [], []
  for i in range(steps):
    extra = () if key is None else (jax.random.fold_in(key, i),)
    state, metrics = step(state, sample(i), *extra)
    before.append(metrics["loss_before"])
    after.append(metrics["loss_after"])
  assert int(state.skipped) == 0
  return state, float(np.mean(before[-20:])), float(np.mean(after[-20:]))


def max_abs_diff(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


# The contract, on a model written by hand.


def init_mlp(key, sizes=(1, 32, 32, 1)):
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (m, n)) / jnp.sqrt(m),
      "bias": jnp.zeros(n),
    }
  return params


def mlp(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def mse(params, batch):
  x, y = batch
  return jnp.mean((mlp(params, x) - y) ** 2)


def mse_with_aux(params, batch):
  x, y = batch
  err = mlp(params, x) - y
  return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def test_plain_jax_model_meta_trains():
  params = init_mlp(jax.random.key(0))
  state, before, after = meta_train(mse_with_aux, params, imaml(), has_aux=True)
  assert after < before
  assert jax.tree.structure(state.params) == jax.tree.structure(params)


def test_curvature_estimate_sets_the_scale_of_lam():
  """Power iteration on the support loss: the largest eigenvalue is in the
  hundreds; a loss scaled by ``c`` needs ``lam * c`` and ``lr / c``."""
  params = init_mlp(jax.random.key(0))
  task = jax.tree.map(lambda a: a[0], sample(0))
  f = lambda p: mse(p, task.support)
  v = jax.tree.map(jnp.ones_like, params)
  for _ in range(30):
    hv = im.hvp(f, params, v)
    top = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(hv)))
    v = jax.tree.map(lambda a, top=top: a / top, hv)
  assert 50.0 < float(top) < 5000.0

  # Scaling the loss by c and lam by c gives the same proximal minimiser
  # when the inner step is divided by c.
  c = 10.0
  phi = im.adapt(mse, params, task.support, lam=LAM, inner=im.gd(16, 0.002))
  phi_c = im.adapt(
    lambda p, b: c * mse(p, b),
    params,
    task.support,
    lam=c * LAM,
    inner=im.gd(16, 0.002 / c),
  )
  assert max_abs_diff(phi, phi_c) < 1e-4


# Flax linen.


class NormMLP(nn.Module):
  """An MLP with batch-statistics normalisation after its hidden layers."""

  hidden: tuple = (32, 32)
  flax_norm: bool = False

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f"dense{i}")(x)
      if self.flax_norm:
        x = nn.BatchNorm(use_running_average=False, name=f"norm{i}")(x)
      else:
        x = models.BatchStatNorm(name=f"norm{i}")(x)
      x = nn.relu(x)
    return nn.Dense(1, name=f"dense{len(self.hidden)}")(x)


def test_linen_batch_statistics_norm_meta_trains():
  net = NormMLP()
  x = jnp.zeros((10, 1))
  params = models.init_params(net, jax.random.key(0), x)
  assert sorted(params) == ["dense0", "dense1", "dense2", "norm0", "norm1"]
  _, before, after = meta_train(
    models.regression_loss(net), params, imaml(), has_aux=True
  )
  assert after < before


def test_flax_batch_norm_with_discarded_updates_equals_batch_stat_norm():
  """nn.BatchNorm(use_running_average=False) applied with
  mutable=["batch_stats"], its updates thrown away, is the same function of
  the same parameters as models.BatchStatNorm."""
  ours, flax_bn = NormMLP(), NormMLP(flax_norm=True)
  x = jax.random.normal(jax.random.key(2), (10, 1))
  params = models.init_params(ours, jax.random.key(0), x)
  variables = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)

  def flax_loss(params, batch):
    x, y = batch
    pred, _ = flax_bn.apply({"params": params}, x, mutable=["batch_stats"])
    return jnp.mean((pred - y) ** 2)

  batch = (x, jnp.sin(x))
  ours_loss = models.regression_loss(ours)
  assert (
    abs(float(flax_loss(params, batch)) - float(ours_loss(params, batch)[0]))
    < 1e-5
  )
  g_flax = jax.grad(flax_loss)(params, batch)
  g_ours = jax.grad(lambda p, b: ours_loss(p, b)[0])(params, batch)
  assert max_abs_diff(g_flax, g_ours) < 1e-4


def test_running_averages_are_refused_with_a_clear_error():
  net = NormMLP(flax_norm=True)
  variables = net.init(jax.random.key(0), jnp.zeros((10, 1)))
  assert sorted(variables) == ["batch_stats", "params"]
  init, _ = im.make_meta_step(lambda p, b: 0.0, optax.adam(1e-3), imaml())
  with pytest.raises(
    TypeError,
    match=r"'batch_stats'.*variables\['params'\]"
    r".*BatchStatNorm.*use_running_average=False",
  ):
    init(variables)
  with pytest.raises(TypeError, match="batch_stats"):
    im.adapt(lambda p, b: 0.0, variables, None, lam=1.0, inner=INNER)
  with pytest.raises(ValueError, match="batch_stats"):
    models.init_params(net, jax.random.key(0), jnp.zeros((10, 1)))
  init(variables["params"])  # The parameters alone are accepted.


# Flax NNX.


class NnxMLP(nnx.Module):
  """The same function as models.MLP(hidden=(32, 32)), layer names included."""

  def __init__(self, rngs, hidden=(32, 32), norm=False):
    sizes = (1, *hidden, 1)
    self.n = len(hidden) + 1
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
      setattr(self, f"dense{i}", nnx.Linear(m, n, rngs=rngs))
    self.norms = nnx.List(
      [nnx.BatchNorm(w, use_running_average=False, rngs=rngs) for w in hidden]
      if norm
      else []
    )

  def __call__(self, x):
    for i in range(self.n):
      x = getattr(self, f"dense{i}")(x)
      if i < self.n - 1:
        if len(self.norms):
          x = self.norms[i](x)
        x = nnx.relu(x)
    return x


def nnx_loss(graphdef, rest):
  def loss_fn(params, batch):
    x, y = batch
    model = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.mean((model(x) - y) ** 2)

  return loss_fn


def test_nnx_model_with_batch_norm_meta_trains():
  model = NnxMLP(nnx.Rngs(0), norm=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The running averages stay out of the meta-parameters.
  assert sorted(nnx.to_pure_dict(params)["norms"][0]) == ["bias", "scale"]
  assert sorted(nnx.to_pure_dict(rest)["norms"][0]) == ["mean", "var"]
  state, before, after = meta_train(nnx_loss(graphdef, rest), params, imaml())
  assert after < before
  nnx.update(model, state.params)
  assert jnp.array_equal(
    model.dense0.kernel[...], state.params["dense0"]["kernel"][...]
  )


def test_nnx_model_state_with_batch_stats_is_refused():
  model = NnxMLP(nnx.Rngs(0), norm=True)
  init, _ = im.make_meta_step(lambda p, b: 0.0, optax.adam(1e-3), imaml())
  for wrong in (nnx.state(model), model):
    with pytest.raises(TypeError, match=r"BatchStat, not a Param.*nnx.split"):
      init(wrong)


def test_linen_and_nnx_give_the_same_meta_gradient():
  net = models.MLP(hidden=(32, 32), out=1)
  theta = models.init_params(net, jax.random.key(0), jnp.zeros((1, 1)))
  model = NnxMLP(nnx.Rngs(5))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, theta)  # The linen weights, copied across.
  tasks = sample(0)

  def meta_gradient(loss_fn, params, **kwargs):
    init, step = im.make_meta_step(loss_fn, optax.sgd(1.0), imaml(), **kwargs)
    state, _ = jax.jit(step)(init(params), tasks)
    return jax.tree.map(lambda a, b: a - b, params, state.params)

  g_linen = meta_gradient(models.regression_loss(net), theta, has_aux=True)
  g_nnx = nnx.to_pure_dict(meta_gradient(nnx_loss(graphdef, rest), params))
  assert jax.tree.structure(g_nnx) == jax.tree.structure(g_linen)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_linen))
  assert scale > 1e-3
  assert max_abs_diff(g_nnx, g_linen) <= 1e-5 * scale


# Equinox.


def test_equinox_partition_meta_trains():
  model = eqx.nn.MLP(1, 1, 32, 2, activation=jax.nn.relu, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss_fn(params, batch):
    x, y = batch
    model = eqx.combine(params, static)
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  state, before, after = meta_train(loss_fn, params, imaml())
  assert after < before
  trained = eqx.combine(state.params, static)
  assert trained(jnp.zeros(1)).shape == (1,)


def test_whole_equinox_module_error_says_to_partition():
  model = eqx.nn.MLP(1, 1, 8, 2, key=jax.random.key(0))
  init, _ = im.make_meta_step(lambda p, b: 0.0, optax.adam(1e-3), imaml())
  with pytest.raises(
    TypeError,
    match=r"params\.activation .*not an array.*"
    r"eqx\.partition\(model, eqx\.is_inexact_array\)",
  ):
    init(model)


# Dropout: a stochastic loss.


class DropoutMLP(nn.Module):
  hidden: tuple = (32, 32)
  rate: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool):
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
      x = nn.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(1, name=f"dense{len(self.hidden)}")(x)


DROPOUT_NET = DropoutMLP()


def dropout_loss(params, batch, key):
  x, y = batch
  pred = DROPOUT_NET.apply(
    {"params": params}, x, train=True, rngs={"dropout": key}
  )
  err = pred - y
  return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def deterministic_loss(params, batch):
  x, y = batch
  pred = DROPOUT_NET.apply({"params": params}, x, train=False)
  err = pred - y
  return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def dropout_params():
  return DROPOUT_NET.init(jax.random.key(0), jnp.zeros((1, 1)), train=False)[
    "params"
  ]


def test_dropout_meta_trains_and_evaluates():
  key = jax.random.key(42)
  state, before, after = meta_train(
    dropout_loss, dropout_params(), imaml(), key=key, has_aux=True
  )
  assert after < before
  held_out = sample(10_000, n_tasks=16)
  evaluate = jax.jit(
    im.make_eval_step(dropout_loss, imaml(), has_aux=True, stochastic=True)
  )
  metrics = evaluate(state.params, held_out, jax.random.key(7))
  assert metrics["loss_after"].shape == (16,)
  assert float(metrics["loss_after"].mean()) < float(
    metrics["loss_before"].mean()
  )
  again = evaluate(state.params, held_out, jax.random.key(7))
  assert np.array_equal(metrics["loss_after"], again["loss_after"])
  # Dropout off at evaluation: the deterministic loss, no key.
  plain = jax.jit(im.make_eval_step(deterministic_loss, imaml(), has_aux=True))(
    state.params, held_out
  )
  assert float(plain["loss_after"].mean()) < float(plain["loss_before"].mean())


def test_dropout_masks_differ_per_task_and_reruns_are_bitwise_equal():
  one = jax.tree.map(lambda a: a[:1], sample(0))
  same = jax.tree.map(lambda a: jnp.repeat(a, 4, axis=0), one)  # 4 equal tasks
  init, step = im.make_meta_step(
    dropout_loss,
    optax.adam(3e-3),
    imaml(),
    has_aux=True,
    stochastic=True,
    per_task_metrics=True,
  )
  step = jax.jit(step)

  def run(seed, n=3):
    state, out = init(dropout_params()), []
    for i in range(n):
      state, metrics = step(
        state, same, jax.random.fold_in(jax.random.key(seed), i)
      )
      out.append(metrics["per_task"]["loss_before"])
    return state, out

  state, per_task = run(0)
  # Equal data and parameters: the losses differ only through the masks.
  assert len(set(np.asarray(per_task[0]).tolist())) == 4
  # A new key each step: the masks of step 0 and step 1 differ.
  assert not np.array_equal(per_task[0], per_task[1])
  rerun, per_task_again = run(0)
  for a, b in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(rerun.params), strict=True
  ):
    assert np.array_equal(a, b)
  for a, b in zip(per_task, per_task_again, strict=True):
    assert np.array_equal(a, b)
  other, _ = run(1)
  assert max_abs_diff(state.params, other.params) > 0


def test_stochastic_step_requires_a_key():
  init, step = im.make_meta_step(
    dropout_loss, optax.adam(3e-3), imaml(), has_aux=True, stochastic=True
  )
  with pytest.raises(TypeError, match=r"step\(state, tasks, key\)"):
    step(init(dropout_params()), sample(0))


class NnxDropoutMLP(nnx.Module):
  """The guide's NNX model with dropout: off when called without rngs."""

  def __init__(self, rngs, rate=0.1):
    self.dense0 = nnx.Linear(1, 32, rngs=rngs)
    self.dense1 = nnx.Linear(32, 32, rngs=rngs)
    self.dense2 = nnx.Linear(32, 1, rngs=rngs)
    self.dropout0 = nnx.Dropout(rate)
    self.dropout1 = nnx.Dropout(rate)

  def __call__(self, x, rngs=None):
    off = rngs is None
    x = self.dropout0(nnx.relu(self.dense0(x)), deterministic=off, rngs=rngs)
    x = self.dropout1(nnx.relu(self.dense1(x)), deterministic=off, rngs=rngs)
    return self.dense2(x)


def nnx_dropout_loss(graphdef, rest):
  def loss_fn(params, batch, key):
    x, y = batch
    model = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.mean((model(x, nnx.Rngs(dropout=key)) - y) ** 2)

  return loss_fn


def test_nnx_dropout_layers_draw_masks_of_their_own(monkeypatch):
  graphdef, params, rest = nnx.split(NnxDropoutMLP(nnx.Rngs(0)), nnx.Param, ...)
  loss_fn = nnx_dropout_loss(graphdef, rest)
  # Zero kernels and unit biases: every unit is 1 before each dropout, so
  # the zeros after it are its mask.
  probe = jax.tree.map(lambda a: a, params)
  weights = nnx.to_pure_dict(probe)
  for layer in ("dense0", "dense1"):
    weights[layer]["kernel"] = jnp.zeros_like(weights[layer]["kernel"])
    weights[layer]["bias"] = jnp.ones_like(weights[layer]["bias"])
  nnx.replace_by_pure_dict(probe, weights)
  masks, dropout = [], nnx.Dropout.__call__

  def recorded(self, x, **kwargs):
    out = dropout(self, x, **kwargs)
    masks.append(np.asarray(out) == 0)
    return out

  monkeypatch.setattr(nnx.Dropout, "__call__", recorded)
  support = jax.tree.map(lambda a: a[0], sample(0).support)
  for _ in range(2):
    loss_fn(probe, support, jax.random.key(3))
  monkeypatch.undo()
  first, second, first_again, second_again = masks
  # The same key to both layers would drop the same units in both.
  assert first.any() and not np.array_equal(first, second)
  assert np.array_equal(first, first_again)
  assert np.array_equal(second, second_again)
  state, before, after = meta_train(
    loss_fn, params, imaml(), key=jax.random.key(42)
  )
  assert after < before
  # Without rngs, dropout is off: the deterministic loss evaluates.
  metrics = jax.jit(im.make_eval_step(nnx_loss(graphdef, rest), imaml()))(
    state.params, sample(10_000, n_tasks=16)
  )
  assert float(metrics["loss_after"].mean()) < float(
    metrics["loss_before"].mean()
  )


# Which parameters adapt.


def head_only(path):
  return path[0] == "dense2"


def test_adapts_predicate_under_the_flattened_step():
  net = models.MLP(hidden=(32, 32), out=1)
  params = models.init_params(net, jax.random.key(0), jnp.zeros((1, 1)))
  loss_fn = models.regression_loss(net)
  algorithm = im.maml(im.gd(5, 0.01), adapts=head_only)
  tasks = sample(0)

  def meta_gradient(flatten):
    init, step = im.make_meta_step(
      loss_fn, optax.sgd(1.0), algorithm, has_aux=True, flatten=flatten
    )
    state, _ = jax.jit(step)(init(params), tasks)
    return jax.tree.map(lambda a, b: a - b, params, state.params)

  flat, tree = meta_gradient(True), meta_gradient(False)
  assert max_abs_diff(flat, tree) < 1e-5
  everything = im.maml(im.gd(5, 0.01))
  init, step = im.make_meta_step(
    loss_fn, optax.sgd(1.0), everything, has_aux=True
  )
  state, _ = jax.jit(step)(init(params), tasks)
  g_all = jax.tree.map(lambda a, b: a - b, params, state.params)
  assert max_abs_diff(flat, g_all) > 1e-4


def test_adapt_all_but_norm_meta_trains():
  net = NormMLP()
  params = models.init_params(net, jax.random.key(0), jnp.zeros((10, 1)))
  algorithm = im.maml(im.gd(5, 0.005), adapts=im.adapt_all_but_norm)
  _, before, after = meta_train(
    models.regression_loss(net), params, algorithm, has_aux=True
  )
  assert after < before


@pytest.mark.parametrize("build", ["flatten", "tree", "evaluate"])
def test_adapts_that_accepts_no_parameter_is_refused(build):
  # An nnx.State's key paths end with "value": this predicate matches none
  # of them. Accepted, the inner loop would move nothing, and loss_after
  # would equal loss_before on every step.
  graphdef, params, rest = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param, ...)
  kernels = im.fomaml(im.gd(3, 0.01), adapts=lambda p: p[-1] == "kernel")
  loss_fn = nnx_loss(graphdef, rest)
  if build == "evaluate":
    run = lambda: im.make_eval_step(loss_fn, kernels)(params, sample(0))
  else:
    init, step = im.make_meta_step(
      loss_fn, optax.sgd(1.0), kernels, flatten=build == "flatten"
    )
    run = lambda: step(init(params), sample(0))
  with pytest.raises(
    ValueError, match=r"accepts none of the 6 parameters.*'kernel', 'value'"
  ):
    run()


def test_evaluation_checks_params_and_tasks_as_the_step_does():
  # Unchecked, a whole Equinox module fails inside jax.grad ("Cannot
  # determine dtype of <custom_jvp ...>"), an NNX state's running averages
  # enter the inner loop as weights, a (support, query) tuple raises an
  # AttributeError.
  tasks = sample(0)
  module = eqx.nn.MLP(1, 1, 8, 1, key=jax.random.key(0))
  evaluate = im.make_eval_step(lambda p, b: 0.0, imaml())
  with pytest.raises(TypeError, match=r"params\.activation .*eqx\.partition"):
    evaluate(module, tasks)
  model = NnxMLP(nnx.Rngs(0), norm=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  evaluate = im.make_eval_step(nnx_loss(graphdef, rest), imaml())
  with pytest.raises(TypeError, match=r"BatchStat, not a Param.*nnx.split"):
    evaluate(nnx.state(model), tasks)
  with pytest.raises(TypeError, match="tasks must be an im.Task, got tuple"):
    evaluate(params, tuple(tasks))
