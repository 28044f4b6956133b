"""Small arithmetic on pytrees of arrays (parameters, gradients, solver vectors)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from imaml_jax._src.types import PyTree


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  """``a + b`` leaf by leaf."""
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  """``a - b`` leaf by leaf."""
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(scalar, a: PyTree) -> PyTree:
  """``scalar * a`` leaf by leaf (the scalar is cast to each leaf's dtype)."""
  return jax.tree.map(lambda x: jnp.asarray(scalar, x.dtype) * x, a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
  """``alpha * x + y`` leaf by leaf."""
  return jax.tree.map(lambda u, v: jnp.asarray(alpha, u.dtype) * u + v, x, y)


def tree_vdot(a: PyTree, b: PyTree):
  """Euclidean inner product ``<a, b>`` summed over all leaves."""
  parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return functools.reduce(jnp.add, parts, jnp.zeros((), _result_dtype(a)))


def tree_sq_norm(a: PyTree):
  """Squared Euclidean norm ``||a||^2`` over all leaves."""
  return tree_vdot(a, a)


def tree_norm(a: PyTree):
  """Euclidean norm ``||a||`` over all leaves."""
  return jnp.sqrt(tree_sq_norm(a))


def tree_zeros_like(a: PyTree) -> PyTree:
  """Zeros with the structure, shapes and dtypes of ``a``."""
  return jax.tree.map(jnp.zeros_like, a)


def tree_all_finite(a: PyTree):
  """Boolean scalar: every entry of every leaf is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]
  return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def tree_where(pred, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Selects whole pytrees by a boolean scalar (no Python branching)."""
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def _result_dtype(a: PyTree):
  leaves = jax.tree.leaves(a)
  if not leaves:
    return jnp.float32
  return jnp.result_type(*[x.dtype for x in leaves])


def key_path(path) -> tuple:
  """A ``jax.tree_util`` key path as plain keys: ``("conv0", "kernel")``."""
  return tuple(
    getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path
  )


def partition(
  tree: PyTree, keep: Callable[[tuple], bool]
) -> tuple[PyTree, PyTree]:
  """Splits ``tree`` by a predicate on each leaf's key path.

  Returns ``(kept, rest)``, both shaped like ``tree``: ``kept`` holds the
  leaves whose path ``keep`` accepts and ``None`` elsewhere, ``rest`` the
  others. ``None`` is an empty subtree to ``jax.tree`` functions, so either
  part goes through tree arithmetic, ``jax.grad`` and ``lax.scan`` as a pytree
  of its own. :func:`combine` is the inverse.

  Example:
    >>> kept, rest = partition({"a": 1.0, "b": 2.0}, lambda path: path == ("a",))
    >>> kept, rest
    ({'a': 1.0, 'b': None}, {'a': None, 'b': 2.0})
    >>> combine(kept, rest)
    {'a': 1.0, 'b': 2.0}
  """
  flags = jax.tree_util.tree_map_with_path(
    lambda path, _: bool(keep(key_path(path))), tree
  )
  kept = jax.tree.map(lambda x, k: x if k else None, tree, flags)
  rest = jax.tree.map(lambda x, k: None if k else x, tree, flags)
  return kept, rest


def combine(a: PyTree, b: PyTree) -> PyTree:
  """Merges the two parts of :func:`partition`: each leaf from whichever has it."""
  return jax.tree.map(
    lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None
  )
