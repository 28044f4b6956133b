"""Containers shared by every part of the library."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

PyTree = Any


class Task(NamedTuple):
  """A few-shot task, or a batch of tasks.

  ``support`` is the data the inner problem adapts on and ``query`` the data the
  adapted parameters are judged on. Each is any pytree (for classification
  usually ``(x, y)``). In a batch of tasks every leaf carries the task index as
  its leading axis, e.g. ``x: float32[n_tasks, n_way * k_shot, 28, 28, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> task = im.Task(support=(jnp.zeros((5, 3)), jnp.zeros(5)),
    ...                query=(jnp.zeros((10, 3)), jnp.zeros(10)))
    >>> task.support[0].shape
    (5, 3)
  """

  support: PyTree
  query: PyTree
