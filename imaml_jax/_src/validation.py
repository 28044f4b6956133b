"""Checks of user input that run in Python, before any tracing-heavy work."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def check_positive_int(name: str, value) -> int:
  """Returns ``value`` if it is an integer >= 1, else raises a named error."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"{name} must be a positive integer, got {value!r} "
      f"of type {type(value).__name__}."
    )
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}.")
  return int(value)


def check_fraction(name: str, value, *, allow_zero: bool = False):
  """Checks a scalar in ``(0, 1)`` (or ``[0, 1)``): a line search's shrink
  factor or Armijo constant, a momentum, Adam's betas. Traced values pass
  unchecked."""
  check_positive_scalar(name, value, allow_zero=allow_zero)
  if not isinstance(value, jax.core.Tracer) and not float(value) < 1:
    raise ValueError(f"{name} must be < 1, got {value}.")
  return value


def check_positive_scalar(name: str, value, *, allow_zero: bool = False):
  """Checks a scalar hyper-parameter that must be finite and > 0 (or >= 0).

  Concrete values (Python numbers, concrete arrays) are checked; NaN and
  +/-inf are refused. Traced values (e.g. a learning rate that is itself
  being meta-learned) cannot be inspected in Python and are passed through
  unchanged.
  """
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a number, got a bool ({value}).")
  if isinstance(value, jax.core.Tracer):
    return value
  try:
    arr = np.asarray(value)  # NumPy: never staged into an enclosing trace
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number, got {value!r}.") from e
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {arr.shape}.")
  if not (
    np.issubdtype(arr.dtype, np.floating)
    or np.issubdtype(arr.dtype, np.integer)
  ):
    raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}.")
  v = float(arr)
  if not math.isfinite(v):
    raise ValueError(f"{name} must be a finite number, got {v}.")
  if v < 0 or (v == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {v}.")
  return value


def check_bool(name: str, value) -> bool:
  """Returns ``value`` if it is a bool (Python or NumPy), else raises."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(
      f"{name} must be True or False, got {value!r} "
      f"of type {type(value).__name__}."
    )
  return bool(value)


def _describe_output(out) -> str:
  """What a loss returned, in a few words for an error message."""
  if isinstance(out, (tuple, list)):
    return f"a {type(out).__name__} of {len(out)} elements"
  shape = getattr(out, "shape", None)
  if shape is not None:
    return f"an array of shape {tuple(shape)}"
  return f"a {type(out).__name__}"


def check_loss_output(out, has_aux: bool):
  """Returns ``out`` if its structure matches ``has_aux``, else raises.

  With ``has_aux=True`` a loss returns a pair ``(loss, aux)``; without, the
  loss alone, not a tuple. Only the Python structure of ``out`` is looked at,
  while tracing, so the check adds nothing to the compiled program.

  Raises:
    TypeError: naming what the loss returned and the ``has_aux`` it needs.
  """
  is_sequence = isinstance(out, (tuple, list))
  if has_aux and not (is_sequence and len(out) == 2):
    raise TypeError(
      f"loss_fn returned {_describe_output(out)} but has_aux=True; return "
      "(loss, aux) with aux a dict of scalar metrics, or pass "
      "has_aux=False for a loss that returns the scalar loss alone."
    )
  if not has_aux and is_sequence:
    raise TypeError(
      f"loss_fn returned {_describe_output(out)} but has_aux=False; pass "
      "has_aux=True for a loss that returns (loss, aux), or return the "
      "scalar loss alone."
    )
  return out


_SPLIT_HINT = (
  "The meta-parameters must be a pytree of floating arrays and nothing "
  "else; keep the rest of a model out of them and close over it in the "
  "loss. Equinox: params, static = eqx.partition(model, "
  "eqx.is_inexact_array), and eqx.combine(params, static) in the loss. "
  "Flax NNX: graphdef, params, rest = nnx.split(model, nnx.Param, ...), "
  "and nnx.merge(graphdef, params, rest, copy=True) in the loss. Flax "
  "linen: variables['params']."
)

_BATCH_STATS_HINT = (
  "Running averages are state, not meta-parameters: the meta-step neither "
  "differentiates nor updates them. Meta-learn variables['params'] only and "
  "normalise with the statistics of the batch at hand: "
  "imaml_jax.models.BatchStatNorm, or flax.linen.BatchNorm("
  "use_running_average=False) applied with mutable=['batch_stats'] and the "
  "returned updates discarded."
)

_NNX_STATE_HINT = (
  "Only Params are meta-parameters; a BatchStat, RNG state or any other "
  "NNX variable is not. Split the model with graphdef, params, rest = "
  "nnx.split(model, nnx.Param, ...), meta-learn params, and in the loss "
  "call nnx.merge(graphdef, params, rest, copy=True). A batch norm must "
  "then normalise with batch statistics: nnx.BatchNorm("
  "use_running_average=False), whose running averages the meta-step does "
  "not update."
)


def _is_nnx_variable(node) -> bool:
  """Whether ``node`` is a Flax NNX ``Variable`` (without importing Flax)."""
  return any(
    c.__name__ == "Variable" and c.__module__.startswith("flax.nnx")
    for c in type(node).__mro__
  )


def _is_nnx_param(node) -> bool:
  return any(
    c.__name__ == "Param" and c.__module__.startswith("flax.nnx")
    for c in type(node).__mro__
  )


def _describe_leaf(leaf) -> str:
  """Why a non-floating leaf cannot be a meta-parameter, in a few words."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return f"got {type(leaf).__name__}, which is not an array"
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return (
      f"got a PRNG key array (dtype {dtype}); a loss that needs "
      "randomness takes its key from make_meta_step(..., "
      "stochastic=True)"
    )
  return f"got {type(leaf).__name__} with dtype {dtype}"


def check_floating_params(params, name: str = "params") -> None:
  """Raises unless every leaf of ``params`` is a floating array.

  The errors name the offending leaf and say how to split a model so that
  only its floating arrays are meta-learned: a Flax linen ``batch_stats``
  collection, a Flax NNX variable other than a ``Param``, and non-array
  leaves (an Equinox module's activation functions) are refused.
  """
  if isinstance(params, Mapping) and "batch_stats" in params:
    raise TypeError(
      f"{name} holds a Flax 'batch_stats' collection (collections "
      f"{sorted(map(str, params))}). " + _BATCH_STATS_HINT
    )
  nodes = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_nnx_variable)
  for path, node in nodes:
    if _is_nnx_variable(node) and not _is_nnx_param(node):
      where = jax.tree_util.keystr(path) or "<root>"
      raise TypeError(
        f"{name}{where} is a Flax NNX {type(node).__name__}, "
        "not a Param. " + _NNX_STATE_HINT
      )
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if not leaves:
    raise ValueError(f"{name} is an empty pytree: there is nothing to adapt.")
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or "<root>"
      raise TypeError(
        f"{name}{where} must be a floating-point array to be differentiated, "
        f"{_describe_leaf(leaf)}. " + _SPLIT_HINT
      )


def leading_axis_sizes(tree) -> set[int]:
  """Set of the leading-axis sizes of all leaves (scalars count as 0-d)."""
  sizes = set()
  for leaf in jax.tree.leaves(tree):
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
        "every leaf of a task batch needs a leading task axis; "
        f"found a scalar leaf {leaf!r}."
      )
    sizes.add(shape[0])
  return sizes


_TASK_AXIS_HINT = (
  "every leaf needs a leading task axis; for a single task, add one with "
  "jax.tree.map(lambda a: a[None], task)"
)


def check_examples(name: str, tree) -> None:
  """Raises if a leaf of ``tree`` with >= 2 dimensions has an empty axis 1.

  Axis 1 of a task batch's leaf holds each task's examples; when it is empty
  the tasks have no data to adapt on or to judge by.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = tuple(jnp.shape(leaf))
    if len(shape) >= 2 and shape[1] == 0:
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has shape {shape}: its "
        "example axis (axis 1, after the leading task axis) is empty. "
        f"Give every task at least one {name} example."
      )


def check_task_batch(tasks) -> int:
  """Checks a batch of tasks and returns the number of tasks.

  Support and query must both carry the same leading task axis on every leaf,
  and no leaf with two or more dimensions may have an empty example axis
  (axis 1). A missing task axis cannot be detected in general (a leaf of
  shape ``[examples, features]`` reads as ``examples`` tasks); when it makes
  support and query disagree, the error says how to add one.
  """
  support = leading_axis_sizes(tasks.support)
  query = leading_axis_sizes(tasks.query)
  if not support or not query:
    raise ValueError("a task batch needs non-empty support and query pytrees.")
  if len(support) != 1:
    raise ValueError(
      "the support leaves disagree on the number of tasks "
      f"(leading axis sizes {sorted(support)})."
    )
  if len(query) != 1:
    raise ValueError(
      "the query leaves disagree on the number of tasks "
      f"(leading axis sizes {sorted(query)})."
    )
  (n_support,), (n_query,) = support, query
  if n_support != n_query:
    raise ValueError(
      f"support has {n_support} tasks but query has {n_query}; "
      "they must hold the same tasks along the leading axis "
      f"({_TASK_AXIS_HINT})."
    )
  if n_support == 0:
    raise ValueError("a task batch must hold at least one task, got 0.")
  check_examples("support", tasks.support)
  check_examples("query", tasks.query)
  return n_support
