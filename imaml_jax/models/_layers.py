"""Layers of the few-shot networks: 3x3 convolution, batch-statistics norm, pooling.

Every layer is a small pure function on arrays plus, where it owns parameters, a
thin `flax.linen` module that creates them. The pure functions are what the
modules call, so the maths can be tested without Flax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Precision = Any  # None, a string such as "highest", or a `jax.lax.Precision`.

# Names accepted by `conv3x3(..., formulation=...)`, the default first.
CONV_FORMULATIONS = ("patches", "lax")
DEFAULT_CONV = "patches"

_PAD = 1  # Every convolution here is 3x3 with one pixel of zero padding.


def _check_formulation(formulation: str) -> None:
  if formulation not in CONV_FORMULATIONS:
    raise ValueError(
      f"Unknown convolution formulation {formulation!r}; expected one of "
      f"{CONV_FORMULATIONS}."
    )


def conv_output_size(size: int, stride: int) -> int:
  """Spatial size after a 3x3 convolution with padding 1 and the given stride.

  `out = floor((size + 2 - 3) / stride) + 1`; e.g. with stride 2,
  28 -> 14 -> 7 -> 4 -> 2.

  Example:
    >>> conv_output_size(7, 2)
    4
  """
  return (size + 2 * _PAD - 3) // stride + 1


def _shifted_views(x: Array, stride: int) -> list[Array]:
  """The nine strided views of the zero-padded input, one per kernel tap.

  View `(dy, dx)` (row-major, `dy` slowest) holds
  `xp[:, dy + stride * i, dx + stride * j, :]` for every output pixel `(i, j)`,
  where `xp` is `x` padded by one pixel of zeros on each spatial side.
  """
  b, h, w, c = x.shape
  ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
  xp = jnp.pad(x, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))
  views = []
  for dy in range(3):
    for dx in range(3):
      start = (0, dy, dx, 0)
      limit = (b, dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1, c)
      views.append(lax.slice(xp, start, limit, (1, stride, stride, 1)))
  return views


def conv3x3(
  x: Array,
  kernel: Array,
  *,
  stride: int = 1,
  formulation: str = DEFAULT_CONV,
  precision: Precision = None,
) -> Array:
  """3x3 convolution with zero padding 1, in one of several formulations.

  All formulations compute the same cross-correlation

    `out[b, i, j, o] = sum_{dy, dx, c} xp[b, s*i + dy, s*j + dx, c] * k[dy, dx, c, o]`

  with `xp` the input zero-padded by one pixel and `s` the stride, and take the
  same kernel, `float32[3, 3, Cin, Cout]` (HWIO), so parameters are
  interchangeable between them. They differ only in how XLA is asked to do it:

  * ``"patches"`` (im2col): the nine strided views of `xp` are concatenated on
    the channel axis into `[B, Ho, Wo, 9 * Cin]` and multiplied by the kernel
    reshaped to `[9 * Cin, Cout]` in a single matrix product. Under `jax.vmap`
    with per-task kernels this stays one batched matrix product, which the
    CPU backend runs far faster than a grouped convolution: 4-5x for a
    gradient and 9-22x for gradient steps in `lax.scan` and for
    Hessian-vector products on the Omniglot network over 8 tasks
    (`benchmarks/conv_formulations.py`). The default.
  * ``"lax"``: `jax.lax.conv_general_dilated`, what `flax.linen.Conv` uses.
    Under `vmap` over per-task kernels it becomes a grouped convolution.

  Args:
    x: input, `float[B, H, W, Cin]` (NHWC).
    kernel: `float[3, 3, Cin, Cout]`.
    stride: the same stride on both spatial axes.
    formulation: one of `CONV_FORMULATIONS`.
    precision: passed to the matrix product or convolution. `None` follows
      `jax.default_matmul_precision` (on CPU every setting is full float32;
      on GPU pass ``"highest"`` to rule out TensorFloat-32).

  Returns:
    `float[B, Ho, Wo, Cout]` with `Ho = floor((H - 1) / stride) + 1`, the same
    for `Wo`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((2, 28, 28, 1))
    >>> k = jnp.ones((3, 3, 1, 4))
    >>> conv3x3(x, k, stride=2).shape
    (2, 14, 14, 4)
  """
  _check_formulation(formulation)
  if kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(
      f"kernel shape {kernel.shape} does not fit input shape {x.shape}; "
      "expected (3, 3, Cin, Cout)."
    )
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)

  if formulation == "lax":
    return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=((_PAD, _PAD), (_PAD, _PAD)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
    )

  # formulation == "patches"
  patches = jnp.concatenate(_shifted_views(x, stride), axis=-1)
  patches = patches.reshape(b * ho * wo, 9 * cin)
  out = jnp.dot(patches, kernel.reshape(9 * cin, cout), precision=precision)
  return out.reshape(b, ho, wo, cout)


def batch_norm(
  x: Array,
  scale: Array,
  bias: Array,
  *,
  epsilon: float = 1e-5,
) -> Array:
  """Normalises each channel with the statistics of the batch it is given.

  For `x: float[B, ..., C]`, with mean and (biased) variance over every axis
  but the last,

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias`.

  There are no running averages: training and evaluation both use the
  statistics of the batch at hand.

  Args:
    x: activations, channels last.
    scale: `float[C]`.
    bias: `float[C]`.
    epsilon: added to the variance.

  Returns:
    An array shaped like `x`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0], [3.0]])
    >>> batch_norm(x, jnp.ones(1), jnp.zeros(1), epsilon=0.0)
    Array([[-1.],
           [ 1.]], dtype=float32)
  """
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  return (x - mean) * (scale * lax.rsqrt(var + epsilon)) + bias


def max_pool_2x2(x: Array) -> Array:
  """2x2 max-pooling with stride 2 and no padding (odd trailing rows dropped).

  Written as a reshape and a max over the two window axes, which batches,
  differentiates and runs well on every backend; equal to
  `flax.linen.max_pool(x, (2, 2), strides=(2, 2))`, i.e. 84 -> 42 -> 21 -> 10
  -> 5.

  Args:
    x: `float[B, H, W, C]`.

  Returns:
    `float[B, H // 2, W // 2, C]`.

  Example:
    >>> import jax.numpy as jnp
    >>> max_pool_2x2(jnp.ones((1, 21, 21, 3))).shape
    (1, 10, 10, 3)
  """
  b, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  x = x[:, : 2 * ho, : 2 * wo, :].reshape(b, ho, 2, wo, 2, c)
  return jnp.max(x, axis=(2, 4))


class Conv3x3(nn.Module):
  """A bias-free 3x3 convolution with padding 1, see `conv3x3`.

  The only parameter is ``kernel: float32[3, 3, Cin, Cout]``, the same for every
  formulation. There is no bias: every convolution here feeds a batch norm,
  whose mean subtraction cancels a per-channel bias exactly.

  Attributes:
    features: number of output channels `Cout`.
    stride: spatial stride.
    conv: formulation, one of `CONV_FORMULATIONS`.
    precision: see `conv3x3`.
    kernel_init: initialiser of the kernel; He (Kaiming) normal with fan-in
      `9 * Cin` by default, suited to the ReLU that follows.
  """

  features: int
  stride: int = 1
  conv: str = DEFAULT_CONV
  precision: Precision = None
  kernel_init: Callable[..., Array] = nn.initializers.he_normal()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
      "kernel",
      self.kernel_init,
      (3, 3, x.shape[-1], self.features),
      jnp.float32,
    )
    return conv3x3(
      x,
      kernel.astype(x.dtype),
      stride=self.stride,
      formulation=self.conv,
      precision=self.precision,
    )


class BatchStatNorm(nn.Module):
  """Batch norm that always uses the current batch's statistics, see `batch_norm`.

  Parameters ``scale`` (ones) and ``bias`` (zeros), one per channel; with
  ``use_scale=False`` only ``bias`` (the scale is fixed at 1, as in
  ``tf.contrib.layers.batch_norm``'s default, which MAML's code uses). Unlike
  `flax.linen.BatchNorm` it keeps no running averages, so it has no
  ``batch_stats`` collection and needs no `mutable=` argument.

  Attributes:
    epsilon: added to the variance.
    use_scale: learn a per-channel scale.
  """

  epsilon: float = 1e-5
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = (
      self.param("scale", nn.initializers.ones, (c,), jnp.float32)
      if self.use_scale
      else jnp.ones((c,), jnp.float32)
    )
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return batch_norm(
      x, scale.astype(x.dtype), bias.astype(x.dtype), epsilon=self.epsilon
    )
