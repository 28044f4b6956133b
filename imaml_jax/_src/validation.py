"""Checks of user input that run in Python, before any tracing-heavy work."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def check_positive_int(name: str, value) -> int:
  """Returns ``value`` if it is an integer >= 1, else raises a named error."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be a positive integer, got {value!r} "
                    f"of type {type(value).__name__}.")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}.")
  return int(value)


def check_positive_scalar(name: str, value, *, allow_zero: bool = False):
  """Checks a scalar hyper-parameter that must be > 0 (or >= 0).

  Concrete values (Python numbers, concrete arrays) are checked; traced values
  (e.g. a learning rate that is itself being meta-learned) cannot be inspected
  in Python and are passed through unchanged.
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
  if not (np.issubdtype(arr.dtype, np.floating)
          or np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}.")
  v = float(arr)
  if not v == v:  # NaN
    raise ValueError(f"{name} must be a finite number, got nan.")
  if v < 0 or (v == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {v}.")
  return value


def check_floating_params(params, name: str = "params") -> None:
  """Raises TypeError unless every leaf of ``params`` is a floating array."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if not leaves:
    raise ValueError(f"{name} is an empty pytree: there is nothing to adapt.")
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or "<root>"
      raise TypeError(
          f"{name}{where} must be a floating-point array to be differentiated, "
          f"got {type(leaf).__name__} with dtype {dtype}.")


def leading_axis_sizes(tree) -> set[int]:
  """Set of the leading-axis sizes of all leaves (scalars count as 0-d)."""
  sizes = set()
  for leaf in jax.tree.leaves(tree):
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError("every leaf of a task batch needs a leading task axis; "
                       f"found a scalar leaf {leaf!r}.")
    sizes.add(shape[0])
  return sizes


def check_task_batch(tasks) -> int:
  """Checks a batch of tasks and returns the number of tasks.

  Support and query must both carry the same leading task axis on every leaf.
  """
  support = leading_axis_sizes(tasks.support)
  query = leading_axis_sizes(tasks.query)
  if not support or not query:
    raise ValueError("a task batch needs non-empty support and query pytrees.")
  if len(support) != 1:
    raise ValueError("the support leaves disagree on the number of tasks "
                     f"(leading axis sizes {sorted(support)}).")
  if len(query) != 1:
    raise ValueError("the query leaves disagree on the number of tasks "
                     f"(leading axis sizes {sorted(query)}).")
  (n_support,), (n_query,) = support, query
  if n_support != n_query:
    raise ValueError(f"support has {n_support} tasks but query has {n_query}; "
                     "they must hold the same tasks along the leading axis.")
  if n_support == 0:
    raise ValueError("a task batch must hold at least one task, got 0.")
  return n_support
