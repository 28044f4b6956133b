"""Loss functions in the meta-learning core's convention.

A loss function takes `(params, batch)` and returns `(scalar_loss, aux)`, with
`aux` a dict of scalar metrics. Both factories below close over a Flax module;
the returned functions are pure, can be differentiated twice (e.g.
forward-over-reverse Hessian-vector products) and `jax.vmap`-ed over a leading
task axis of `params` and `batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[[Any, Any], tuple[Array, dict[str, Array]]]


def classification_loss(net: nn.Module) -> LossFn:
  """Mean softmax cross-entropy of `net`'s logits, with accuracy as a metric.

  For logits `z = net(x)` of shape `[B, K]` and integer labels `y` in
  `[0, K)`,

    `loss = mean_b ( logsumexp_k z[b, k] - z[b, y_b] )`,
    `accuracy = mean_b [argmax_k z[b, k] == y_b]`.

  A label outside `[0, K)` (e.g. 20-way tasks for a 5-way net) makes the
  loss NaN, and its gradient too, rather than silently contributing nothing:
  the meta-step then skips the update (`metrics["skipped"]` is 1) and
  training's divergence check reports it. Labels are traced under `jit`, so
  they cannot be checked in Python. Such an example counts as wrong in the
  accuracy.

  Args:
    net: a module mapping inputs to logits `[B, K]`.

  Returns:
    `loss_fn(params, (x, y)) -> (loss, {"accuracy": accuracy})`, both float32
    scalars (or the dtype of the logits).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from imaml_jax.models import init_params, omniglot_convnet, sinusoid_mlp
    >>> net = omniglot_convnet(5)
    >>> x, y = jnp.zeros((5, 28, 28, 1)), jnp.arange(5)
    >>> params = init_params(net, jax.random.key(0), x)
    >>> loss, aux = classification_loss(net)(params, (x, y))
    >>> sorted(aux)
    ['accuracy']
  """

  def loss_fn(params, batch):
    x, y = batch
    logits = net.apply({"params": params}, x)
    n_classes = logits.shape[-1]
    # 1 for a label in [0, K), NaN outside. It scales both the logits (for a
    # NaN gradient) and the picked log-probability (for a NaN loss): XLA
    # turns `one_hot * v` into a select, which would drop either NaN alone.
    in_range = (y >= 0) & (y < n_classes)
    scale = jnp.where(in_range, 1.0, jnp.nan).astype(logits.dtype)
    log_probs = jax.nn.log_softmax(logits * scale[..., None], axis=-1)
    one_hot = jax.nn.one_hot(y, n_classes, dtype=logits.dtype)
    loss = -jnp.mean(jnp.sum(one_hot * log_probs, axis=-1) * scale)
    correct = jnp.argmax(logits, axis=-1) == y
    return loss, {"accuracy": jnp.mean(correct.astype(logits.dtype))}

  return loss_fn


def regression_loss(net: nn.Module) -> LossFn:
  """Mean squared error of `net`'s predictions.

  `loss = mean_b ||net(x)_b - y_b||^2 / D`, the mean over every element. The
  prediction is reshaped to `y.shape` first (so `y` may be `[B, 1]` or `[B]`),
  which rules out silent broadcasting of `[B, 1]` against `[B]`.

  Args:
    net: a module mapping inputs to predictions with as many elements as `y`.

  Returns:
    `loss_fn(params, (x, y)) -> (loss, {})`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from imaml_jax.models import init_params, omniglot_convnet, sinusoid_mlp
    >>> net = sinusoid_mlp()
    >>> x, y = jnp.zeros((10, 1)), jnp.zeros((10, 1))
    >>> params = init_params(net, jax.random.key(0), x)
    >>> loss, aux = regression_loss(net)(params, (x, y))
    >>> float(loss), aux
    (0.0, {})
  """

  def loss_fn(params, batch):
    x, y = batch
    pred = net.apply({"params": params}, x)
    if pred.size != y.size:
      raise ValueError(
        f"prediction shape {pred.shape} does not match target shape {y.shape}"
      )
    pred = pred.reshape(y.shape)
    return jnp.mean(jnp.square(pred - y)), {}

  return loss_fn
