"""On-device sampling of N-way K-shot classification episodes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from imaml_jax._src import sharding
from imaml_jax._src.types import Task


def _check_sizes(n_way, k_shot, q_query, n_tasks) -> None:
  """Validates that the static episode sizes are positive Python ints."""
  counts = {
    "n_way": n_way,
    "k_shot": k_shot,
    "q_query": q_query,
    "n_tasks": n_tasks,
  }
  for name, value in counts.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{name} must be a Python int, got {value!r}")
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {name}={value}")


def _check_pixels(dtype) -> None:
  """Refuses images that are not integer pixel values (0..255)."""
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(
      "images must hold integer pixel values in 0..255 (uint8), which the "
      f"sampler divides by 255; got dtype {dtype}. Convert floats in "
      "[0, 1] with (images * 255).round().astype(np.uint8), floats in "
      "0..255 with images.round().astype(np.uint8)."
    )


def _check_pixel_values(images) -> None:
  """Checks on the host that integer pixels wider than uint8 lie in 0..255.

  The samplers divide the pixels by 255 inside a jitted function, where the
  values cannot be read: ``uint16`` drawings (0..65535) would become inputs
  of up to 257 without any error. ``uint8`` needs no check. Other integer
  dtypes are read here, once per call, before the jitted function runs; under
  an enclosing trace they are refused, since nothing can read them there.
  """
  if not hasattr(images, "dtype"):
    images = np.asarray(images)
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8 or not jnp.issubdtype(dtype, jnp.integer):
    return  # uint8 fits; a float dtype is refused by _check_pixels
  if isinstance(images, jax.core.Tracer):
    raise TypeError(
      f"images of dtype {dtype} cannot be checked to hold pixel values in "
      "0..255 inside a jitted or vmapped function; pass uint8 images there "
      "(convert outside the trace, e.g. images.astype(np.uint8) once their "
      "range is known), or call the sampler outside the trace."
    )
  if not images.size:
    return  # no pixels; the counts are refused by _check_counts
  xp = np if isinstance(images, np.ndarray) else jnp
  low, high = int(xp.min(images)), int(xp.max(images))
  if low < 0 or high > 255:
    raise ValueError(
      f"images of dtype {dtype} hold values from {low} to {high}; the "
      "sampler takes pixel values in 0..255 and divides them by 255. "
      "Rescale them to 0..255 first, e.g. 16-bit drawings with "
      "(images // 257).astype(np.uint8)."
    )


def _ahead_of_time(checked: Callable, jitted) -> Callable:
  """Gives ``checked``, which calls ``jitted``, its ahead-of-time methods.

  ``lower``, ``trace`` and ``eval_shape`` work on abstract values, so they
  skip the host check of the pixels.
  """
  for name in ("lower", "trace", "eval_shape"):
    setattr(checked, name, getattr(jitted, name))
  return checked


def _check_counts(images, n_way, k_shot, q_query, n_tasks=1) -> None:
  """Validates the static episode sizes and the pixels' dtype of ``images``."""
  _check_sizes(n_way, k_shot, q_query, n_tasks)
  _check_pixels(images.dtype)
  images_shape = images.shape
  if len(images_shape) < 3:
    raise ValueError(
      "images must be [n_classes, n_per_class, ...], got shape "
      f"{tuple(images_shape)}"
    )
  n_classes, n_per_class = images_shape[:2]
  if n_way > n_classes:
    raise ValueError(
      f"n_way={n_way} is larger than the number of classes "
      f"n_classes={n_classes}"
    )
  if k_shot + q_query > n_per_class:
    raise ValueError(
      f"k_shot + q_query = {k_shot} + {q_query} = {k_shot + q_query} is "
      f"larger than the number of images per class n_per_class="
      f"{n_per_class}"
    )


def _sample_one(key, images, n_way, k_shot, q_query):
  """One episode: ``((xs, ys), (xq, yq))`` for a single key.

  All random choices come from one draw of random keys (one threefry call,
  which keeps compilation fast): the ``n_way`` classes with the largest keys,
  the ``k_shot + q_query`` images with the smallest keys per class, and the
  label order from sorting ``n_way`` keys. The keys are the top 24 random
  bits as exact ``float32`` integers (``lax.top_k`` on floats is far faster
  on CPU than on integers). Apart from ties between keys (a tie at a
  selection boundary has probability about ``n / 2^24`` per draw; it then
  favours the lower index) these are uniform draws without replacement.
  """
  n_classes, n_per_class = images.shape[:2]
  image_shape = images.shape[2:]
  n_draw = k_shot + q_query
  n_image_bits = n_way * n_per_class
  bits = jax.random.bits(key, (n_classes + n_image_bits + n_way,), jnp.uint32)
  rand = (bits >> 8).astype(jnp.float32)  # exact integers in [0, 2^24)
  classes = jax.lax.top_k(rand[:n_classes], n_way)[1]
  image_rand = rand[n_classes : n_classes + n_image_bits]
  draws = jnp.argsort(image_rand.reshape(n_way, n_per_class), axis=-1)[
    :, :n_draw
  ]  # [n_way, k + q]
  labels = jnp.argsort(rand[n_classes + n_image_bits :]).astype(jnp.int32)
  x = images[classes[:, None], draws].astype(jnp.float32) / 255.0
  y = jnp.broadcast_to(labels[:, None], (n_way, n_draw))
  support = (
    x[:, :k_shot].reshape((n_way * k_shot,) + image_shape),
    y[:, :k_shot].reshape(n_way * k_shot),
  )
  query = (
    x[:, k_shot:].reshape((n_way * q_query,) + image_shape),
    y[:, k_shot:].reshape(n_way * q_query),
  )
  return support, query


@functools.partial(jax.jit, static_argnames=("n_way", "k_shot", "q_query"))
def _tasks_from_keys(keys, images, n_way, k_shot, q_query) -> Task:
  """:func:`sample_tasks_from_keys` after the host check of the pixels."""
  n_tasks = keys.shape[0]
  _check_counts(images, n_way, k_shot, q_query, n_tasks)
  support, query = jax.vmap(
    lambda k: _sample_one(k, images, n_way, k_shot, q_query)
  )(keys)
  return Task(support=support, query=query)


def sample_tasks_from_keys(
  keys, images, n_way: int, k_shot: int, q_query: int
) -> Task:
  """Like :func:`sample_tasks`, with one PRNG key per task given explicitly.

  Args:
    keys: ``[n_tasks]`` PRNG keys (typed or raw ``uint32[n_tasks, 2]``).
    images: ``[n_classes, n_per_class, H, W, C]`` integer pixel values in
      0..255 (``uint8``; wider integers are checked as in
      :func:`sample_tasks`).
    n_way: classes per task.
    k_shot: support images per class.
    q_query: query images per class.

  Returns:
    A batched :class:`~imaml_jax.Task`, one task per key.

  Raises:
    ValueError: as :func:`sample_tasks`.
    TypeError: as :func:`sample_tasks`.
  """
  _check_pixel_values(images)
  return _tasks_from_keys(keys, images, n_way, k_shot, q_query)


_ahead_of_time(sample_tasks_from_keys, _tasks_from_keys)


@functools.partial(
  jax.jit, static_argnames=("n_way", "k_shot", "q_query", "n_tasks")
)
def _sample_tasks(key, images, n_way, k_shot, q_query, n_tasks) -> Task:
  """:func:`sample_tasks` after the host check of the pixels."""
  _check_counts(images, n_way, k_shot, q_query, n_tasks)
  keys = jax.random.split(key, n_tasks)
  return _tasks_from_keys(keys, images, n_way, k_shot, q_query)


def sample_tasks(
  key, images, n_way: int, k_shot: int, q_query: int, n_tasks: int
) -> Task:
  """Samples a batch of N-way K-shot classification tasks on device.

  For each task (its own key from ``jax.random.split(key, n_tasks)``):

  1. ``n_way`` distinct classes are drawn without replacement;
  2. for each class, ``k_shot + q_query`` distinct images are drawn without
     replacement; the first ``k_shot`` go to the support set and the rest to
     the query set, so support and query never share an image;
  3. the classes get the labels ``0 .. n_way - 1`` in a random order;
  4. pixels become ``float32`` in ``[0, 1]`` (divided by 255).

  Within a set the examples are grouped by class (``k_shot`` consecutive
  examples share a label); the label order itself is random per task.

  The sampler applies no augmentation. For Omniglot the four rotations are
  already separate classes in ``images`` (see :func:`rotate_classes`), as in
  the paper.

  The sampling is pure and jitted (the counts are static); it also works
  inside an enclosing ``jax.jit`` or ``jax.vmap``.

  Args:
    key: a PRNG key.
    images: ``[n_classes, n_per_class, H, W, C]`` integer pixel values in
      0..255, typically ``uint8`` already on device. Floating images are
      refused (TypeError): they would be divided by 255 a second time.
      Integer dtypes wider than ``uint8`` (e.g. ``uint16``, ``int32``) have
      their range checked on the host before the jitted sampling (ValueError
      outside 0..255); inside an enclosing trace, where their values cannot
      be read, only ``uint8`` is accepted (TypeError).
    n_way: classes per task.
    k_shot: support images per class.
    q_query: query images per class.
    n_tasks: tasks in the batch.

  Returns:
    ``Task(support=(x, y), query=(x, y))`` with
    ``support[0]: float32[n_tasks, n_way * k_shot, H, W, C]``,
    ``support[1]: int32[n_tasks, n_way * k_shot]`` and likewise for the query
    set with ``q_query``.

  Raises:
    ValueError: a count is not positive, ``n_way > n_classes``,
      ``k_shot + q_query > n_per_class``, or integer pixels wider than
      ``uint8`` lie outside 0..255.
    TypeError: ``images`` are not of an integer dtype, or are traced and of
      an integer dtype other than ``uint8``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> images = jnp.zeros((10, 20, 28, 28, 1), jnp.uint8)
    >>> task = sample_tasks(jax.random.key(0), images, 5, 1, 15, 32)
    >>> task.support[0].shape, task.query[1].shape
    ((32, 5, 28, 28, 1), (32, 75))
  """
  _check_pixel_values(images)
  return _sample_tasks(key, images, n_way, k_shot, q_query, n_tasks)


_ahead_of_time(sample_tasks, _sample_tasks)


def make_sharded_sampler(
  mesh: Mesh,
  n_way: int,
  k_shot: int,
  q_query: int,
  n_tasks: int,
  *,
  axis: str = sharding.TASK_AXIS,
) -> Callable:
  """An N-way K-shot episode sampler whose tasks are drawn on their devices.

  ``sample(key, images)`` returns exactly the tasks of
  ``sample_tasks(key, images, n_way, k_shot, q_query, n_tasks)``: the
  per-task keys ``jax.random.split(key, n_tasks)`` are split over ``axis``
  of ``mesh`` (:func:`imaml_jax.task_sharding`) and, under
  ``jax.shard_map``, each of the ``D`` devices runs
  :func:`sample_tasks_from_keys` on its own ``n_tasks / D`` keys, gathering
  its episodes from its replica of ``images`` (place it with
  :func:`imaml_jax.replicate`). The sampling program has no cross-device
  communication: nothing is gathered to one device or to the host.

  The sampling is jitted and may also be called inside a jitted step (e.g.
  a training step jitted with :func:`imaml_jax.replicated_sharding` inputs).
  Integer pixels wider than ``uint8`` are checked as in
  :func:`sample_tasks`.

  Args:
    mesh: the device mesh, e.g. :func:`imaml_jax.task_mesh`.
    n_way: classes per task.
    k_shot: support images per class.
    q_query: query images per class.
    n_tasks: tasks per batch; a multiple of the devices on ``axis``.
    axis: the mesh axis to split the tasks over.

  Returns:
    ``sample(key, images) -> Task``, sharded on the leading task axis.

  Raises:
    ValueError: a count is not a positive int, or ``n_tasks`` is not a
      multiple of the device count (at once); ``n_way`` or
      ``k_shot + q_query`` does not fit ``images``, or integer pixels
      wider than ``uint8`` lie outside 0..255 (when called).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import imaml_jax as im
    >>> mesh = im.task_mesh()
    >>> sample = make_sharded_sampler(mesh, 5, 1, 15, n_tasks=4 * mesh.size)
    >>> images = im.replicate(jnp.zeros((10, 20, 28, 28, 1), jnp.uint8), mesh)
    >>> x = sample(jax.random.key(0), images).query[0]
    >>> x.shape[1:], x.sharding.is_equivalent_to(im.task_sharding(mesh), x.ndim)
    ((75, 28, 28, 1), True)
  """
  _check_sizes(n_way, k_shot, q_query, n_tasks)
  sharding.check_divisible(n_tasks, mesh, axis)
  keys_sharding = sharding.task_sharding(mesh, axis)
  local_sample = jax.shard_map(
    lambda keys, images: _tasks_from_keys(keys, images, n_way, k_shot, q_query),
    mesh=mesh,
    in_specs=(PartitionSpec(axis), PartitionSpec()),
    out_specs=PartitionSpec(axis),
  )

  @jax.jit
  def jitted_sample(key, images) -> Task:
    keys = jax.random.split(key, n_tasks)
    keys = jax.lax.with_sharding_constraint(keys, keys_sharding)
    return local_sample(keys, images)

  def sample(key, images) -> Task:
    _check_pixel_values(images)
    return jitted_sample(key, images)

  return _ahead_of_time(sample, jitted_sample)


def _evaluation_keys(n_tasks: int, seed: int):
  # A fixed key implementation, so the tasks do not depend on the
  # ``jax_default_prng_impl`` setting.
  return jax.random.split(jax.random.key(seed, impl="threefry2x32"), n_tasks)


def evaluation_tasks(
  images,
  n_way: int,
  k_shot: int,
  q_query: int,
  n_tasks: int = 600,
  seed: int = 0,
) -> Task:
  """A fixed set of evaluation tasks, identical across runs and machines.

  The tasks are :func:`sample_tasks_from_keys` with the keys
  ``jax.random.split(jax.random.key(seed, impl="threefry2x32"), n_tasks)``.
  The paper reports accuracy over 600 test tasks with a 95% interval of
  ``1.96 * std / sqrt(600)``. For many or large tasks use
  :func:`evaluation_task_chunks`, which yields the same tasks in pieces.

  Args:
    images: ``[n_classes, n_per_class, H, W, C]`` integer pixel values in
      0..255 (``uint8``; wider integers are checked as in
      :func:`sample_tasks`).
    n_way: classes per task.
    k_shot: support images per class.
    q_query: query images per class.
    n_tasks: number of tasks.
    seed: seed of the fixed key.

  Returns:
    A batched :class:`~imaml_jax.Task` of ``n_tasks`` tasks.

  Example:
    >>> import jax.numpy as jnp
    >>> images = jnp.zeros((10, 20, 28, 28, 1), jnp.uint8)
    >>> evaluation_tasks(images, 5, 1, 15, n_tasks=8).support[0].shape
    (8, 5, 28, 28, 1)
  """
  images = jnp.asarray(images)
  _check_counts(images, n_way, k_shot, q_query, n_tasks)
  _check_pixel_values(images)
  return _tasks_from_keys(
    _evaluation_keys(n_tasks, seed), images, n_way, k_shot, q_query
  )


def evaluation_task_chunks(
  images,
  n_way: int,
  k_shot: int,
  q_query: int,
  n_tasks: int = 600,
  seed: int = 0,
  chunk_size: int = 100,
) -> Iterator[Task]:
  """Yields :func:`evaluation_tasks` in chunks of at most ``chunk_size``.

  Concatenating the chunks along the task axis gives exactly
  ``evaluation_tasks(images, n_way, k_shot, q_query, n_tasks, seed)``, while
  only one chunk is in memory at a time.

  Args:
    images: ``[n_classes, n_per_class, H, W, C]`` integer pixel values in
      0..255 (``uint8``; wider integers are checked as in
      :func:`sample_tasks`).
    n_way: classes per task.
    k_shot: support images per class.
    q_query: query images per class.
    n_tasks: total number of tasks.
    seed: seed of the fixed key.
    chunk_size: tasks per chunk (the last chunk may be smaller).

  Returns:
    An iterator of batched :class:`~imaml_jax.Task` chunks. The arguments
    are checked when this function is called, before any task is drawn.
  """
  images = jnp.asarray(images)
  _check_counts(images, n_way, k_shot, q_query, n_tasks)
  _check_pixel_values(images)
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  keys = _evaluation_keys(n_tasks, seed)
  return (
    _tasks_from_keys(
      keys[start : start + chunk_size], images, n_way, k_shot, q_query
    )
    for start in range(0, n_tasks, chunk_size)
  )


def reptile_minibatch_rows(
  n_way: int, k_shot: int, q_query: int, shots: int, batch_size: int, steps: int
) -> np.ndarray:
  """``int[steps, batch_size]``: rows of ``concat(support, query)`` a step.

  The pool holds the first ``shots`` images of each class (the support
  images, then the query's), in the class-major order of
  :func:`sample_tasks`. It is read shot by shot across the classes (shot 0
  of every class, then shot 1, ...) and cut into consecutive mini-batches of
  ``batch_size``, wrapping around, so that every mini-batch covers the
  classes evenly and ``steps * batch_size`` rows are read in all.

  Example:
    >>> reptile_minibatch_rows(2, 1, 2, shots=3, batch_size=4, steps=2)
    array([[0, 1, 2, 4],
           [3, 5, 0, 1]])
  """
  if shots > k_shot + q_query:
    raise ValueError(
      f"Reptile's {shots} training images per class are more than a "
      f"task's k_shot + q_query = {k_shot} + {q_query}."
    )
  for name, value in (
    ("shots", shots),
    ("batch_size", batch_size),
    ("steps", steps),
    ("n_way", n_way),
  ):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  shot, cls = np.divmod(np.arange(n_way * shots), n_way)
  pool = np.where(
    shot < k_shot,
    cls * k_shot + shot,
    n_way * k_shot + cls * q_query + shot - k_shot,
  )
  return pool[np.arange(steps * batch_size) % pool.size].reshape(
    steps, batch_size
  )


def reptile_minibatches(
  tasks: Task, n_way: int, shots: int, batch_size: int, steps: int
) -> Task:
  """Reptile's training mini-batches from a batch of N-way tasks.

  Replaces each task's support set by ``steps`` mini-batches of
  ``batch_size`` images, drawn from the first ``shots`` images per class of
  the task's support and query sets (:func:`reptile_minibatch_rows`): leaves
  ``[n_tasks, steps, batch_size, ...]``, for
  ``imaml_jax.reptile(..., minibatches=True)``. The query set is kept for
  metrics; the first ``shots - k_shot`` query images per class are then
  also training images, so the training metrics measure fit, and only
  validation and test tasks measure adaptation. Reptile's commands train on
  10 images per class in mini-batches of 10 (5-way) or 20 (20-way)
  (``openai/supervised-reptile``, README); it shuffles the images, where
  this reads them in a fixed order across the classes, which the random
  draw of a task's images already makes random.

  Args:
    tasks: a batch of tasks from :func:`sample_tasks` (class-major support
      and query sets, the task index as the leading axis).
    n_way: classes per task.
    shots: training images per class, at most ``k_shot + q_query``.
    batch_size: images per mini-batch.
    steps: mini-batches (one per inner step).

  Example:
    >>> import jax, numpy as np
    >>> from imaml_jax import data
    >>> images = np.zeros((10, 20, 28, 28, 1), np.uint8)
    >>> tasks = data.sample_tasks(jax.random.key(0), images, 5, 1, 15, 2)
    >>> batches = data.reptile_minibatches(tasks, 5, shots=10, batch_size=10,
    ...                                    steps=5)
    >>> batches.support[0].shape, batches.support[1].shape
    ((2, 5, 10, 28, 28, 1), (2, 5, 10))
  """
  x_support = jax.tree_util.tree_leaves(tasks.support)[0]
  x_query = jax.tree_util.tree_leaves(tasks.query)[0]
  k_shot, rem_k = divmod(x_support.shape[1], n_way)
  q_query, rem_q = divmod(x_query.shape[1], n_way)
  if rem_k or rem_q:
    raise ValueError(
      f"a task's {x_support.shape[1]} support and "
      f"{x_query.shape[1]} query examples are not a multiple "
      f"of n_way = {n_way}."
    )
  rows = jnp.asarray(
    reptile_minibatch_rows(n_way, k_shot, q_query, shots, batch_size, steps)
  )
  support = jax.tree_util.tree_map(
    lambda s, q: jnp.concatenate([s, q], axis=1)[:, rows],
    tasks.support,
    tasks.query,
  )
  return Task(support=support, query=tasks.query)
