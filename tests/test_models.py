"""Tests of `imaml_jax.models`.

Shapes and parameters, the batch-statistics norm, the losses, and that every
convolution formulation computes the same loss, gradient and Hessian-vector
product as `jax.lax.conv_general_dilated`, alone and under `vmap` over tasks
with per-task parameters. Test data come from NumPy and every JAX computation
is jitted, because on a small CPU compiling op by op costs more than the maths.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imaml_jax import models

FORMULATIONS = models.CONV_FORMULATIONS
OTHER_FORMULATIONS = [f for f in FORMULATIONS if f != "lax"]


def _make_net(kind, conv, n_way=5):
  if kind == "omniglot":
    return models.omniglot_convnet(n_way, conv=conv, precision="highest")
  return models.miniimagenet_convnet(n_way, conv=conv, precision="highest")


def _normal(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _make_batch(kind, seed, n=5, n_way=5):
  shape = (n, 28, 28, 1) if kind == "omniglot" else (n, 84, 84, 3)
  return _normal(seed, shape), np.arange(n) % n_way


def _random_like(seed, tree):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
    treedef, [_normal(seed + i, a.shape, a.dtype) for i, a in enumerate(leaves)]
  )


def _init(net, seed, x):
  """`models.init_params`, compiled as one program rather than op by op."""
  return jax.jit(functools.partial(models.init_params, net))(
    jax.random.key(seed), x
  )


def _tree_norm(tree):
  return np.sqrt(sum(np.vdot(a, a) for a in jax.tree.leaves(tree)))


def _tree_rel_err(a, b):
  diff = jax.tree.map(lambda u, v: np.asarray(u) - np.asarray(v), a, b)
  return float(_tree_norm(diff) / _tree_norm(b))


def _task(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


@functools.cache
def _loss_grad_hvp(kind, conv, vmapped=False):
  """Jitted `(params, v, batch) -> (loss, aux, grad, hvp)` for one network.

  One forward-over-reverse pass: the primal output of `jax.jvp` of the
  gradient is the gradient itself, its tangent the Hessian-vector product.
  """
  loss_fn = models.classification_loss(_make_net(kind, conv))

  def f(params, v, batch):
    value_and_grad = lambda p: jax.value_and_grad(loss_fn, has_aux=True)(
      p, batch
    )
    ((loss, aux), grad), (_, hvp) = jax.jvp(value_and_grad, (params,), (v,))
    return loss, aux, grad, hvp

  return jax.jit(jax.vmap(f) if vmapped else f)


# ----------------------------------------------------------------------------
# Layers.


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("formulation", OTHER_FORMULATIONS)
def test_conv3x3_matches_lax(formulation, stride):
  x = _normal(0, (2, 7, 8, 3))
  k = _normal(1, (3, 3, 3, 4))
  conv = jax.jit(models.conv3x3, static_argnames=("stride", "formulation"))
  got = conv(x, k, stride=stride, formulation=formulation)
  want = conv(x, k, stride=stride, formulation="lax")
  assert (
    got.shape
    == want.shape
    == (
      2,
      models.conv_output_size(7, stride),
      models.conv_output_size(8, stride),
      4,
    )
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_same_maths_float64(stride):
  """Value, gradient and Hessian-vector product of a scalar function of the
  convolution, with respect to input and kernel, agree to 1e-10 in float64."""
  with jax.enable_x64(True):
    x = _normal(0, (2, 7, 8, 3), np.float64)
    k = _normal(1, (3, 3, 3, 4), np.float64)
    v = _random_like(2, (x, k))

    @functools.partial(jax.jit, static_argnums=0)
    def results(formulation, xk, v):
      def f(xk):
        out = models.conv3x3(*xk, stride=stride, formulation=formulation)
        return jnp.sum(jnp.tanh(out) ** 2)

      value, grad = jax.value_and_grad(f)(xk)
      hvp = jax.jvp(jax.grad(f), (xk,), (v,))[1]
      return value, grad, hvp

    ref = results("lax", (x, k), v)
    assert ref[0].dtype == jnp.float64
    for conv in OTHER_FORMULATIONS:
      value, grad, hvp = results(conv, (x, k), v)
      np.testing.assert_allclose(value, ref[0], rtol=1e-12)
      assert _tree_rel_err(grad, ref[1]) < 1e-10, conv
      assert _tree_rel_err(hvp, ref[2]) < 1e-10, conv


def test_conv_output_sizes():
  sizes = [28]
  for _ in range(4):
    sizes.append(models.conv_output_size(sizes[-1], 2))
  assert sizes == [28, 14, 7, 4, 2]


def test_unknown_formulation_raises():
  with pytest.raises(ValueError, match="formulation"):
    models.omniglot_convnet(5, conv="winograd")
  with pytest.raises(ValueError, match="formulation"):
    models.conv3x3(
      jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), formulation="fft"
    )


def test_max_pool_matches_flax():
  x = _normal(0, (2, 21, 21, 3))
  pool = jax.jit(
    lambda x: (models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  )
  got, want = pool(x)
  assert got.shape == (2, 10, 10, 3)
  np.testing.assert_array_equal(got, want)


def test_batch_norm_uses_batch_statistics():
  x = _normal(0, (4, 5, 5, 3)) * 3.0 + 2.0
  scale, bias = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])
  shift = np.array([10.0, -4.0, 0.25])
  norm = jax.jit(models.batch_norm)
  y = norm(x, scale, bias)
  # A per-channel constant shift of the input does not change the output.
  np.testing.assert_allclose(
    norm(x + shift, scale, bias), y, rtol=1e-4, atol=1e-4
  )
  # With unit scale and zero bias: zero mean, unit variance per channel.
  z = np.asarray(norm(x, np.ones(3), np.zeros(3)))
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)
  # The module has exactly the parameters scale and bias.
  variables = jax.eval_shape(models.BatchStatNorm().init, jax.random.key(0), x)
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {"scale", "bias"}


def test_network_output_depends_on_batch():
  """No running averages: an example's logits depend on its batch-mates."""
  # A small network of the same kind, so that this test compiles quickly.
  net = models.ConvNet(n_way=3, features=4, n_blocks=2, stride=2)
  x = _normal(0, (4, 8, 8, 1))
  params = _init(net, 1, x)
  apply = jax.jit(net.apply)
  out = apply({"params": params}, x)
  x2 = x.copy()
  x2[1:] *= 3.0
  out2 = apply({"params": params}, x2)
  assert not np.allclose(out[0], out2[0], atol=1e-3)
  # Training and evaluation are the same function: no mutable state.
  _, state = jax.eval_shape(
    functools.partial(net.apply, mutable=True), {"params": params}, x
  )
  assert set(state) == {"params"}


# ----------------------------------------------------------------------------
# Networks: shapes and parameters.


@pytest.mark.parametrize(
  "make,x_shape,out_shape,n_params",
  [
    (
      lambda: models.omniglot_convnet(5),
      (5, 28, 28, 1),
      (5, 5),
      3 * 3 * 64 * (1 + 3 * 64) + 4 * 2 * 64 + 256 * 5 + 5,
    ),
    (
      lambda: models.omniglot_convnet(20),
      (3, 28, 28, 1),
      (3, 20),
      3 * 3 * 64 * (1 + 3 * 64) + 4 * 2 * 64 + 256 * 20 + 20,
    ),
    (
      lambda: models.miniimagenet_convnet(5),
      (2, 84, 84, 3),
      (2, 5),
      3 * 3 * 32 * (3 + 3 * 32) + 4 * 2 * 32 + 800 * 5 + 5,
    ),
    (models.sinusoid_mlp, (10, 1), (10, 1), 40 + 40 + 40 * 40 + 40 + 40 + 1),
  ],
)
def test_shapes_and_collections(make, x_shape, out_shape, n_params):
  net = make()
  x = jnp.ones(x_shape)
  variables = jax.eval_shape(net.init, jax.random.key(0), x)
  assert set(variables) == {"params"}
  params = jax.eval_shape(
    functools.partial(models.init_params, net), jax.random.key(0), x
  )
  assert isinstance(params, dict)
  assert sum(a.size for a in jax.tree.leaves(params)) == n_params
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  out = jax.eval_shape(net.apply, {"params": params}, x)
  assert out.shape == out_shape
  assert out.dtype == jnp.float32


def test_same_parameters_for_every_formulation():
  # Same structure and shapes; the values come from the same initialisers
  # called in the same order, so the same key gives the same parameters.
  x = jnp.ones((2, 28, 28, 1))
  trees = [
    jax.eval_shape(
      functools.partial(models.init_params, models.omniglot_convnet(5, conv=c)),
      jax.random.key(3),
      x,
    )
    for c in FORMULATIONS
  ]
  for tree in trees[1:]:
    assert tree == trees[0]
  assert trees[0]["conv1"]["kernel"].shape == (3, 3, 64, 64)


def test_init_params_rejects_other_collections():

  class WithRunningAverages(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(x)

  with pytest.raises(ValueError, match="batch_stats"):
    models.init_params(
      WithRunningAverages(), jax.random.key(0), jnp.ones((2, 3))
    )


# ----------------------------------------------------------------------------
# Losses.


class _Identity(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x


def test_classification_loss_and_accuracy_by_hand():
  logits = np.array(
    [
      [2.0, 1.0, 0.0],
      [0.0, 3.0, 1.0],
      [1.0, 0.0, 0.5],  # predicts 0, label 2: wrong
      [0.0, 0.0, 1.0],
    ],
    np.float32,
  )
  y = np.array([0, 1, 2, 2])
  loss, aux = jax.jit(models.classification_loss(_Identity()))({}, (logits, y))
  lse = np.log(np.exp(logits).sum(-1))
  want = np.mean(lse - logits[np.arange(4), y])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert set(aux) == {"accuracy"}
  np.testing.assert_allclose(aux["accuracy"], 0.75)


def test_classification_loss_is_unchanged_for_labels_in_range():
  # Bit for bit the formula used before out-of-range labels were handled.
  def reference(logits, y):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    one_hot = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
    loss = -jnp.mean(jnp.sum(one_hot * log_probs, axis=-1))
    correct = jnp.argmax(logits, axis=-1) == y
    return loss, {"accuracy": jnp.mean(correct.astype(logits.dtype))}

  loss_fn = models.classification_loss(_Identity())
  logits = 3.0 * _normal(0, (64, 5))
  y = np.random.default_rng(1).integers(0, 5, 64)
  for run in (jax.jit, lambda f: f):
    got = run(lambda z: loss_fn({}, (z, y)))(logits)
    want = run(lambda z: reference(z, y))(logits)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    np.testing.assert_array_equal(
      run(jax.grad(lambda z: loss_fn({}, (z, y))[0]))(logits),
      run(jax.grad(lambda z: reference(z, y)[0]))(logits),
    )


def test_out_of_range_labels_make_the_loss_nan_and_the_meta_step_skip():
  import optax

  import imaml_jax as im

  loss_fn = models.classification_loss(_Identity())
  logits = _normal(0, (4, 5))
  for bad in (5, 19, -1):
    y = np.array([0, 1, bad, 2])
    loss_and_grad = jax.value_and_grad(lambda z: loss_fn({}, (z, y))[0])
    for run in (jax.jit, lambda f: f):  # XLA simplifies under jit
      loss, grad = run(loss_and_grad)(logits)
      assert np.isnan(loss) and np.isnan(grad).any(), bad
  # A 5-way net trained on 20-way tasks: the step is skipped, not silently
  # taken with the out-of-range examples contributing nothing.
  net = nn.Dense(5)
  x = _normal(1, (2, 20, 3))
  y = np.tile(np.arange(20), (2, 1))
  params = _init(net, 0, x[0])
  init, step = im.make_meta_step(
    models.classification_loss(net),
    optax.sgd(0.1),
    im.imaml(2.0, im.gd(2, 0.1), im.cg(2)),
    has_aux=True,
  )
  state, metrics = jax.jit(step)(init(params), im.Task((x, y), (x, y)))
  assert int(metrics["skipped"]) == 1
  jax.tree.map(np.testing.assert_array_equal, state.params, params)


def test_regression_loss():
  net = models.sinusoid_mlp()
  x = np.linspace(-5.0, 5.0, 10, dtype=np.float32)[:, None]
  y = np.sin(x)
  params = _init(net, 0, x)
  pred = np.asarray(jax.jit(net.apply)({"params": params}, x))
  loss_fn = jax.jit(models.regression_loss(net))
  loss, aux = loss_fn(params, (x, y))
  assert aux == {}
  np.testing.assert_allclose(loss, np.mean((pred - y) ** 2), rtol=1e-6)
  # A flat target gives the same loss, not a broadcast [B, B] one.
  loss_flat, _ = loss_fn(params, (x, y[:, 0]))
  np.testing.assert_allclose(loss_flat, loss, rtol=1e-6)
  with pytest.raises(ValueError, match="shape"):
    loss_fn(params, (x, y[:5]))


def test_regression_loss_vmap_and_hvp():
  net = models.sinusoid_mlp()
  loss_fn = models.regression_loss(net)
  x = np.random.default_rng(0).uniform(-5, 5, (3, 10, 1)).astype(np.float32)
  y = np.sin(x)
  keys = jax.random.split(jax.random.key(0), 3)
  params = jax.jit(jax.vmap(lambda k: models.init_params(net, k, x[0])))(keys)

  def hvp(p, batch):
    g = lambda q: jax.grad(loss_fn, has_aux=True)(q, batch)[0]
    return jax.jvp(g, (p,), (p,))[1]

  got = jax.jit(jax.vmap(hvp))(params, (x, y))
  hvp_one = jax.jit(hvp)
  for i in range(3):
    want = hvp_one(_task(params, i), (x[i], y[i]))
    assert _tree_rel_err(_task(got, i), want) < 1e-5


# ----------------------------------------------------------------------------
# Same maths: every formulation against `lax`, in the whole network.


@pytest.mark.slow  # About 25 s of compilation on a 2-core CPU.
def test_formulations_same_loss_grad_hvp_miniimagenet():
  batch = _make_batch("miniimagenet", 0, n=2)
  params = _init(_make_net("miniimagenet", "lax"), 1, batch[0])
  v = _random_like(2, params)
  ref_loss, ref_aux, ref_grad, ref_hvp = _loss_grad_hvp("miniimagenet", "lax")(
    params, v, batch
  )
  assert np.isfinite(ref_loss) and np.isfinite(_tree_norm(ref_hvp))
  for conv in OTHER_FORMULATIONS:
    loss, aux, grad, hvp = _loss_grad_hvp("miniimagenet", conv)(
      params, v, batch
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], ref_aux["accuracy"])
    assert _tree_rel_err(grad, ref_grad) < 1e-4, conv
    assert _tree_rel_err(hvp, ref_hvp) < 1e-4, conv


def test_formulations_under_vmap_over_tasks_omniglot():
  """3 tasks, each with its own parameters, batch and tangent, in float32."""
  n_tasks, n = 3, 3
  xs, ys = _make_batch("omniglot", 0, n=n * n_tasks)
  batch = (xs.reshape(n_tasks, n, 28, 28, 1), ys.reshape(n_tasks, n))
  net = _make_net("omniglot", "lax")
  keys = jax.random.split(jax.random.key(1), n_tasks)
  params = jax.jit(jax.vmap(lambda k: models.init_params(net, k, xs[:n])))(keys)
  v = _random_like(2, params)
  results = {
    conv: _loss_grad_hvp("omniglot", conv, vmapped=True)(params, v, batch)
    for conv in FORMULATIONS
  }
  ref = results["lax"]
  assert np.isfinite(_tree_norm(ref[3]))
  assert not np.allclose(ref[0][0], ref[0][1])  # The tasks really differ.
  for conv in OTHER_FORMULATIONS:
    loss, aux, grad, hvp = results[conv]
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], ref[1]["accuracy"])
    for i in range(n_tasks):
      assert _tree_rel_err(_task(grad, i), _task(ref[2], i)) < 1e-4, conv
      assert _tree_rel_err(_task(hvp, i), _task(ref[3], i)) < 1e-4, conv
  # Each task is normalised with its own batch statistics: changing the data
  # of tasks 1 and 2 leaves every result of task 0 as it was.
  xs2 = batch[0].copy()
  xs2[1:] = 3.0 * xs2[1:] + 1.0
  again = _loss_grad_hvp("omniglot", FORMULATIONS[0], vmapped=True)(
    params, v, (xs2, batch[1])
  )
  first = results[FORMULATIONS[0]]
  np.testing.assert_allclose(again[0][0], first[0][0], rtol=1e-6)
  assert _tree_rel_err(_task(again[3], 0), _task(first[3], 0)) < 1e-6
  assert not np.allclose(again[0][1], first[0][1])


# ----------------------------------------------------------------------------
# MAML's reference network (variant="maml").


def test_maml_variant_has_the_reference_network_parameters():
  x = jnp.ones((5, 28, 28, 1))
  params = models.init_params(
    models.omniglot_convnet(5, variant="maml"), jax.random.key(0), x
  )
  # No batch-norm scale; the head sees the 64 channels averaged over space.
  assert {k: sorted(v) for k, v in params.items() if k.startswith("norm")} == {
    f"norm{i}": ["bias"] for i in range(4)
  }
  assert params["head"]["kernel"].shape == (64, 5)
  assert sum(a.size for a in jax.tree.leaves(params)) == (
    3 * 3 * 64 * (1 + 3 * 64) + 4 * 64 + 64 * 5 + 5
  )
  # Glorot uniform kernels: bound sqrt(6 / (9 Cin + 9 Cout)), variance
  # bound^2 / 3; standard normal head weights.
  kernel = np.asarray(params["conv1"]["kernel"])
  bound = np.sqrt(6 / (9 * 64 + 9 * 64))
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(kernel.var(), bound**2 / 3, rtol=0.05)
  np.testing.assert_allclose(
    np.asarray(params["head"]["kernel"]).std(), 1.0, rtol=0.2
  )
  mini = models.init_params(
    models.miniimagenet_convnet(5, variant="maml"),
    jax.random.key(0),
    jnp.ones((2, 84, 84, 3)),
  )
  assert mini["head"]["kernel"].shape == (800, 5)
  assert np.abs(np.asarray(mini["head"]["kernel"])).max() <= np.sqrt(6 / 805)


def test_maml_variant_computes_the_reference_forward_pass():
  # Written out with the maths of MAML's forward_conv: conv, batch norm with
  # an offset only (epsilon 1e-3), ReLU, four times, spatial mean, head.
  net = models.omniglot_convnet(5, variant="maml")
  x = jax.random.normal(jax.random.key(2), (5, 28, 28, 1))
  params = models.init_params(net, jax.random.key(3), x)
  params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero offsets
  h = x
  for i in range(4):
    h = jax.lax.conv_general_dilated(
      h,
      params[f"conv{i}"]["kernel"],
      (2, 2),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
    )
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    h = jax.nn.relu(
      (h - mean) / jnp.sqrt(var + 1e-3) + params[f"norm{i}"]["bias"]
    )
  expected = (
    h.mean(axis=(1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]
  )
  np.testing.assert_allclose(
    net.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-4
  )


def test_unknown_network_variant_raises():
  with pytest.raises(ValueError, match="variant must be one of standard, maml"):
    models.omniglot_convnet(5, variant="resnet")


@pytest.mark.parametrize(
  "name",
  [
    "imaml_jax.models",
    "imaml_jax.models._layers",
    "imaml_jax.models._losses",
    "imaml_jax.models._networks",
  ],
)
def test_docstring_examples(name):
  """The models' examples (left out of test_docstrings: they build and run
  the conv nets, most of a minute on two cores) run and print what they
  show."""
  import doctest
  import importlib

  module = importlib.import_module(name)
  examples = sum(len(t.examples) for t in doctest.DocTestFinder().find(module))
  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  assert result.failed == 0, f"{result.failed} failing example(s) in {name}"
  if name != "imaml_jax.models":
    assert examples > 0, f"{name} has no docstring examples"
