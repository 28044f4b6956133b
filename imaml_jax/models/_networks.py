"""The networks of the few-shot benchmarks (Finn et al. 2017; Rajeswaran et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax

from imaml_jax.models import _layers

Array = jax.Array


class ConvNet(nn.Module):
  """`n_blocks` x [3x3 conv, batch norm, ReLU, optional 2x2 max-pool], linear head.

  The four-block network of MAML and iMAML. Batch norm uses the statistics of
  the batch it is given, in training and in evaluation alike, with learnable
  scale and bias and no running averages (see `BatchStatNorm`). This follows
  MAML and the iMAML authors' code: each task is normalised with its own
  statistics, and evaluation is transductive (the query set is normalised as
  one batch), as is standard in the few-shot literature. Hence the model has
  only a ``params`` collection and its output for one example depends on the
  rest of the batch.

  The convolutions have no bias (a batch norm follows each, cancelling it).
  Initialisation by default: He normal convolution kernels (fan-in
  `9 * Cin`), batch norm scale 1 and bias 0, head weights LeCun normal (the
  `flax.linen.Dense` default) and head bias 0. The fields below also give
  MAML's reference network (`omniglot_convnet(variant="maml")`).

  Attributes:
    n_way: number of output logits.
    features: channels of every convolution.
    n_blocks: number of convolution blocks.
    stride: stride of every convolution.
    pool: whether each block ends with 2x2 max-pooling.
    conv: convolution formulation, one of `CONV_FORMULATIONS`; all give the
      same parameter pytree and the same function.
    precision: matrix-product precision, see `conv3x3`.
    norm_scale: the batch norms learn a scale (else only an offset).
    norm_epsilon: the batch norms' variance epsilon.
    global_pool: the head sees the last feature map averaged over space
      (`Cout` features) instead of flattened.
    kernel_init: initialiser of the convolution kernels.
    head_init: initialiser of the head's weights.
  """

  n_way: int
  features: int = 64
  n_blocks: int = 4
  stride: int = 2
  pool: bool = False
  conv: str = _layers.DEFAULT_CONV
  precision: _layers.Precision = None
  norm_scale: bool = True
  norm_epsilon: float = 1e-5
  global_pool: bool = False
  kernel_init: Callable[..., Array] = nn.initializers.he_normal()
  head_init: Callable[..., Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.n_blocks):
      x = _layers.Conv3x3(
        self.features,
        stride=self.stride,
        conv=self.conv,
        precision=self.precision,
        kernel_init=self.kernel_init,
        name=f"conv{i}",
      )(x)
      x = _layers.BatchStatNorm(
        epsilon=self.norm_epsilon, use_scale=self.norm_scale, name=f"norm{i}"
      )(x)
      x = nn.relu(x)
      if self.pool:
        x = _layers.max_pool_2x2(x)
    if self.global_pool:
      x = x.mean(axis=(1, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(
      self.n_way,
      precision=self.precision,
      kernel_init=self.head_init,
      name="head",
    )(x)


NETWORK_VARIANTS = ("standard", "maml")


def _variant_fields(variant: str, *, global_pool: bool) -> dict:
  """`ConvNet` fields of a network variant (see `omniglot_convnet`)."""
  if variant not in NETWORK_VARIANTS:
    raise ValueError(
      f"variant must be one of {', '.join(NETWORK_VARIANTS)}; got {variant!r}."
    )
  if variant == "standard":
    return {}
  # MAML's reference code (github.com/cbfinn/maml): maml.py
  # construct_conv_weights and forward_conv; utils.py conv_block, normalize.
  glorot = nn.initializers.glorot_uniform()
  return dict(
    norm_scale=False,
    norm_epsilon=1e-3,
    global_pool=global_pool,
    kernel_init=glorot,
    head_init=(nn.initializers.normal(1.0) if global_pool else glorot),
  )


class MLP(nn.Module):
  """Fully connected ReLU network: Dense, ReLU, ..., Dense.

  Flax default initialisation (LeCun normal weights, zero biases).

  Attributes:
    hidden: widths of the hidden layers.
    out: width of the output layer.
  """

  hidden: Sequence[int] = (40, 40)
  out: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
    return nn.Dense(self.out, name=f"dense{len(self.hidden)}")(x)


def omniglot_convnet(
  n_way: int,
  *,
  conv: str = _layers.DEFAULT_CONV,
  precision: _layers.Precision = None,
  variant: str = "standard",
) -> ConvNet:
  """The Omniglot network of MAML and iMAML.

  4 x [3x3 conv with 64 filters, stride 2, padding 1; batch norm (batch
  statistics); ReLU], flatten, linear head to `n_way` logits. Input
  `float32[B, 28, 28, 1]`; spatial sizes 28 -> 14 -> 7 -> 4 -> 2, so the head
  sees 2 * 2 * 64 = 256 features.

  ``variant="maml"`` is the network of MAML's reference code
  (github.com/cbfinn/maml, ``maml.py`` and ``utils.py``): Glorot (Xavier)
  uniform convolution kernels; batch norms with an offset and no scale, epsilon
  1e-3 (``tf.contrib.layers.batch_norm``'s defaults); the last 2 x 2 x 64 map
  averaged over space (``reduce_mean`` over height and width), so the head
  sees 64 features; head weights standard normal (``tf.random_normal``).

  Args:
    n_way: number of classes per task.
    conv: convolution formulation, one of `CONV_FORMULATIONS`.
    precision: matrix-product precision, see `conv3x3`.
    variant: ``"standard"`` (this library's, above) or ``"maml"``.

  Returns:
    A `ConvNet` module mapping `[B, 28, 28, 1]` to logits `[B, n_way]`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> net = omniglot_convnet(5)
    >>> x = jnp.zeros((5, 28, 28, 1))
    >>> params = init_params(net, jax.random.key(0), x)
    >>> net.apply({"params": params}, x).shape
    (5, 5)
    >>> maml_net = omniglot_convnet(5, variant="maml")
    >>> params = init_params(maml_net, jax.random.key(0), x)
    >>> params["head"]["kernel"].shape, sorted(params["norm0"])
    ((64, 5), ['bias'])
  """
  _layers._check_formulation(conv)
  return ConvNet(
    n_way=n_way,
    features=64,
    n_blocks=4,
    stride=2,
    pool=False,
    conv=conv,
    precision=precision,
    **_variant_fields(variant, global_pool=True),
  )


def miniimagenet_convnet(
  n_way: int,
  *,
  conv: str = _layers.DEFAULT_CONV,
  precision: _layers.Precision = None,
  variant: str = "standard",
) -> ConvNet:
  """The mini-ImageNet network of MAML and iMAML.

  4 x [3x3 conv with 32 filters, stride 1, padding 1; batch norm (batch
  statistics); ReLU; 2x2 max-pool], flatten, linear head. Input
  `float32[B, 84, 84, 3]`; spatial sizes 84 -> 42 -> 21 -> 10 -> 5, so the head
  sees 5 * 5 * 32 = 800 features.

  ``variant="maml"``: as for `omniglot_convnet`, except that the feature map
  is flattened and the head's weights are Glorot uniform, as in MAML's code
  for mini-ImageNet.

  Args:
    n_way: number of classes per task.
    conv: convolution formulation, one of `CONV_FORMULATIONS`.
    precision: matrix-product precision, see `conv3x3`.
    variant: ``"standard"`` or ``"maml"``.

  Returns:
    A `ConvNet` module mapping `[B, 84, 84, 3]` to logits `[B, n_way]`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> net = miniimagenet_convnet(5)
    >>> x = jnp.zeros((2, 84, 84, 3))
    >>> params = init_params(net, jax.random.key(0), x)
    >>> params["head"]["kernel"].shape
    (800, 5)
  """
  _layers._check_formulation(conv)
  return ConvNet(
    n_way=n_way,
    features=32,
    n_blocks=4,
    stride=1,
    pool=True,
    conv=conv,
    precision=precision,
    **_variant_fields(variant, global_pool=False),
  )


def sinusoid_mlp() -> MLP:
  """The sinusoid-regression network of MAML: 1 -> 40 -> 40 -> 1, ReLU.

  Returns:
    An `MLP` module mapping `[B, 1]` to `[B, 1]`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> net = sinusoid_mlp()
    >>> x = jnp.zeros((10, 1))
    >>> params = init_params(net, jax.random.key(0), x)
    >>> net.apply({"params": params}, x).shape
    (10, 1)
  """
  return MLP(hidden=(40, 40), out=1)


def init_params(net: nn.Module, key: Array, example_x: Array) -> dict:
  """Initialises `net` and returns its ``params`` pytree.

  Args:
    net: a module from this package.
    key: a PRNG key.
    example_x: an input batch of the right shape (its values are unused,
      except through batch statistics, which do not affect initialisation).

  Returns:
    The ``params`` collection, a nested dict of arrays.

  Raises:
    ValueError: if the module creates collections other than ``params``
      (which the meta-learning core could not carry).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(sinusoid_mlp(), jax.random.key(0), jnp.zeros((1, 1)))
    >>> sorted(params)
    ['dense0', 'dense1', 'dense2']
  """
  variables = net.init(key, example_x)
  extra = set(variables) - {"params"}
  if extra:
    raise ValueError(
      f"{type(net).__name__} has non-parameter collections {sorted(extra)}; "
      "only 'params' is supported."
    )
  return dict(variables["params"])
