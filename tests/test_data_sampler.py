"""Tests of the on-device episode sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imaml_jax import Task
from imaml_jax import data as imdata

N_CLASSES, N_PER_CLASS = 12, 20


def id_images(n_classes=N_CLASSES, n_per_class=N_PER_CLASS):
  """``uint8[n_classes, n_per_class, 2, 2, 1]``; pixels encode class and id.

  Pixel (0, 0) holds the class, pixel (0, 1) the image number within the
  class, so ``class * n_per_class + number`` is a unique image id.
  """
  images = np.zeros((n_classes, n_per_class, 2, 2, 1), np.uint8)
  images[:, :, 0, 0, 0] = np.arange(n_classes)[:, None]
  images[:, :, 0, 1, 0] = np.arange(n_per_class)[None, :]
  images[:, :, 1, 1, 0] = 255
  return jnp.asarray(images)


def decode(x):
  pixels = np.rint(np.asarray(x) * 255).astype(np.int64)
  cls = pixels[..., 0, 0, 0]
  return cls, cls * N_PER_CLASS + pixels[..., 0, 1, 0]


@pytest.mark.parametrize("n_way,k_shot,q_query", [(5, 1, 15), (12, 2, 18)])
def test_episodes(n_way, k_shot, q_query):
  n_tasks = 16
  task = imdata.sample_tasks(
    jax.random.key(0), id_images(), n_way, k_shot, q_query, n_tasks
  )
  assert isinstance(task, Task)
  (xs, ys), (xq, yq) = task.support, task.query
  assert xs.shape == (n_tasks, n_way * k_shot, 2, 2, 1)
  assert xq.shape == (n_tasks, n_way * q_query, 2, 2, 1)
  assert ys.shape == (n_tasks, n_way * k_shot)
  assert yq.shape == (n_tasks, n_way * q_query)
  assert xs.dtype == xq.dtype == jnp.float32
  assert ys.dtype == yq.dtype == jnp.int32
  assert float(xs.min()) >= 0.0 and float(xs.max()) == 1.0
  cs, ids_s = decode(xs)
  cq, ids_q = decode(xq)
  ys, yq = np.asarray(ys), np.asarray(yq)
  for t in range(n_tasks):
    # Labels: each of 0..n_way-1 exactly k_shot (q_query) times.
    np.testing.assert_array_equal(
      np.bincount(ys[t], minlength=n_way), [k_shot] * n_way
    )
    np.testing.assert_array_equal(
      np.bincount(yq[t], minlength=n_way), [q_query] * n_way
    )
    # One class per label, the same in support and query, all distinct.
    label_to_class = {}
    for c, y in list(zip(cs[t], ys[t])) + list(zip(cq[t], yq[t])):
      assert label_to_class.setdefault(int(y), int(c)) == int(c)
    assert len(set(label_to_class.values())) == n_way
    # No image repeated, within or across the support and query sets.
    all_ids = np.concatenate([ids_s[t], ids_q[t]])
    assert len(set(all_ids.tolist())) == len(all_ids)


def test_label_order_and_classes_vary():
  task = imdata.sample_tasks(jax.random.key(1), id_images(), 5, 1, 1, 200)
  cs, _ = decode(task.support[0])
  ys = np.asarray(task.support[1])
  assert set(cs.ravel().tolist()) == set(range(N_CLASSES))
  # The smallest class of a task does not always get label 0.
  first = ys[np.arange(200), cs.argmin(axis=1)]
  assert len(set(first.tolist())) == 5


def test_images_within_a_class_are_drawn_at_random():
  """Every drawing of a class is used, and each class draws its own ones."""
  n_tasks = 400
  task = imdata.sample_tasks(jax.random.key(2), id_images(), 5, 1, 2, n_tasks)
  _, ids_s = decode(task.support[0])
  _, ids_q = decode(task.query[0])
  numbers_s, numbers_q = ids_s % N_PER_CLASS, ids_q % N_PER_CLASS
  # 2000 support and 4000 query images over 20 drawings: each drawing of a
  # class comes up in both sets (expected 100 and 200 times).
  assert np.bincount(numbers_s.ravel(), minlength=N_PER_CLASS).min() > 50
  assert np.bincount(numbers_q.ravel(), minlength=N_PER_CLASS).min() > 100
  # Two classes of a task share their support drawing about 1 time in 20,
  # not always.
  assert 0.01 < np.mean(numbers_s[:, 0] == numbers_s[:, 1]) < 0.1


def test_deterministic_and_key_dependent():
  images = id_images()
  a = imdata.sample_tasks(jax.random.key(3), images, 5, 1, 5, 8)
  b = imdata.sample_tasks(jax.random.key(3), images, 5, 1, 5, 8)
  c = imdata.sample_tasks(jax.random.key(4), images, 5, 1, 5, 8)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.query[0], c.query[0])
  # Tasks within a batch differ.
  assert not np.array_equal(a.support[0][0], a.support[0][1])


def test_runs_inside_jit_and_vmap():
  images = id_images()

  @jax.jit
  def step(key, images):
    task = imdata.sample_tasks(key, images, 4, 2, 3, 6)
    return jnp.sum(task.support[0]) + jnp.sum(task.query[1])

  eager = imdata.sample_tasks(jax.random.key(0), images, 4, 2, 3, 6)
  assert np.isclose(
    step(jax.random.key(0), images),
    jnp.sum(eager.support[0]) + jnp.sum(eager.query[1]),
  )
  keys = jax.random.split(jax.random.key(0), 3)
  batched = jax.vmap(lambda k: imdata.sample_tasks(k, images, 4, 2, 3, 6))(keys)
  assert batched.support[0].shape == (3, 6, 8, 2, 2, 1)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.map(lambda a: a[1], batched),
    imdata.sample_tasks(keys[1], images, 4, 2, 3, 6),
  )


def test_sample_from_keys_matches_sample_tasks():
  images = id_images()
  key = jax.random.key(9)
  a = imdata.sample_tasks(key, images, 5, 1, 5, 8)
  b = imdata.sample_tasks_from_keys(jax.random.split(key, 8), images, 5, 1, 5)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_evaluation_tasks_are_fixed():
  images = id_images()
  a = imdata.evaluation_tasks(images, 5, 1, 3, n_tasks=30, seed=0)
  b = imdata.evaluation_tasks(np.asarray(images), 5, 1, 3, n_tasks=30, seed=0)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = imdata.evaluation_tasks(images, 5, 1, 3, n_tasks=30, seed=1)
  assert not np.array_equal(a.support[0], c.support[0])
  chunks = list(
    imdata.evaluation_task_chunks(
      images, 5, 1, 3, n_tasks=30, seed=0, chunk_size=8
    )
  )
  assert [ch.support[0].shape[0] for ch in chunks] == [8, 8, 8, 6]
  joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *chunks)
  jax.tree.map(np.testing.assert_array_equal, a, joined)


def test_evaluation_tasks_ignore_default_prng_impl():
  images = id_images()
  a = imdata.evaluation_tasks(images, 5, 1, 3, n_tasks=30)
  with jax.default_prng_impl("rbg"):
    b = imdata.evaluation_tasks(images, 5, 1, 3, n_tasks=30)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_edge_sizes_use_everything():
  images = id_images(n_classes=3, n_per_class=4)
  task = imdata.sample_tasks(jax.random.key(0), images, 3, 1, 3, 2)
  assert task.query[0].shape == (2, 9, 2, 2, 1)


@pytest.mark.parametrize(
  "args,match",
  [
    ((13, 1, 1, 2), "n_way=13 .* n_classes=12"),
    ((5, 10, 11, 2), r"k_shot \+ q_query = 10 \+ 11 = 21 .* n_per_class=20"),
    ((0, 1, 1, 2), "n_way must be positive"),
    ((5, -1, 1, 2), "k_shot must be positive"),
    ((5, 1, 0, 2), "q_query must be positive"),
    ((5, 1, 1, 0), "n_tasks must be positive"),
  ],
)
def test_bad_counts(args, match):
  with pytest.raises(ValueError, match=match):
    imdata.sample_tasks(jax.random.key(0), id_images(), *args)


def test_bad_counts_in_evaluation_helpers():
  with pytest.raises(ValueError, match="n_way=20 .* n_classes=12"):
    imdata.evaluation_tasks(id_images(), 20, 1, 1)
  with pytest.raises(ValueError, match="n_way=20"):
    imdata.evaluation_task_chunks(id_images(), 20, 1, 1)
  with pytest.raises(ValueError, match="chunk_size"):
    imdata.evaluation_task_chunks(id_images(), 5, 1, 1, chunk_size=0)


def test_floating_images_are_refused_not_divided_by_255_again():
  scaled = id_images().astype(jnp.float32) / 255.0  # already in [0, 1]
  key = jax.random.key(0)
  for sample in (
    lambda images: imdata.sample_tasks(key, images, 5, 1, 1, 2),
    lambda images: imdata.sample_tasks_from_keys(
      jax.random.split(key, 2), images, 5, 1, 1
    ),
    lambda images: imdata.evaluation_tasks(images, 5, 1, 1, n_tasks=2),
    lambda images: imdata.evaluation_task_chunks(images, 5, 1, 1, n_tasks=2),
  ):
    for images in (scaled, np.asarray(scaled, np.float64)):
      with pytest.raises(TypeError, match="got dtype float"):
        sample(images)
  # Integer pixels of any width are still scaled to [0, 1].
  task = imdata.sample_tasks(key, id_images().astype(jnp.int32), 5, 1, 1, 2)
  assert float(task.support[0].max()) == 1.0


def _public_samplers(key):
  """Every public way to draw tasks, as ``images -> Task``."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tasks",))
  sharded = imdata.make_sharded_sampler(mesh, 5, 1, 1, 2, axis="tasks")
  return {
    "sample_tasks": lambda images: imdata.sample_tasks(key, images, 5, 1, 1, 2),
    "sample_tasks_from_keys": lambda images: imdata.sample_tasks_from_keys(
      jax.random.split(key, 2), images, 5, 1, 1
    ),
    "evaluation_tasks": lambda images: imdata.evaluation_tasks(
      images, 5, 1, 1, n_tasks=2
    ),
    "evaluation_task_chunks": lambda images: next(
      imdata.evaluation_task_chunks(images, 5, 1, 1, n_tasks=2)
    ),
    "make_sharded_sampler": lambda images: sharded(key, images),
  }


@pytest.mark.parametrize(
  "dtype, scale, offset, match",
  [
    (np.uint16, 257, 0, "uint16 hold values from 0 to 65535"),
    (np.int32, 1, -128, "int32 hold values from -128 to 127"),
    (np.int32, 4, 0, "int32 hold values from 0 to 1020"),
  ],
)
def test_wide_integer_pixels_outside_0_255_are_refused(
  dtype, scale, offset, match
):
  # 16-bit drawings would otherwise be divided by 255 into values up to 257.
  images = np.asarray(id_images()).astype(np.int64) * scale + offset
  images = images.astype(dtype)
  for sample in _public_samplers(jax.random.key(0)).values():
    for given in (images, jnp.asarray(images)):
      with pytest.raises(ValueError, match=match):
        sample(given)


def test_wide_integer_pixels_in_0_255_give_the_uint8_tasks():
  images = np.asarray(id_images())
  for sample in _public_samplers(jax.random.key(0)).values():
    want = sample(images)
    for dtype in (np.uint16, np.int32):
      got = sample(images.astype(dtype))
      jax.tree.map(np.testing.assert_array_equal, got, want)
    half = sample((images // 2).astype(np.int8))  # int8 up to 127
    jax.tree.map(np.testing.assert_array_equal, half, sample(images // 2))


def test_traced_wide_integer_pixels_are_refused():
  for sample in _public_samplers(jax.random.key(0)).values():
    with pytest.raises(TypeError, match="int32 cannot be checked"):
      jax.jit(sample)(id_images().astype(jnp.int32))
    # uint8 needs no check, so it is drawn under a trace as before.
    traced = jax.jit(sample)(id_images())
    jax.tree.map(np.testing.assert_array_equal, traced, sample(id_images()))
  # The checked samplers keep the ahead-of-time methods of a jitted one.
  key, images = jax.random.key(0), id_images()
  lowered = imdata.sample_tasks.lower(key, images, 5, 1, 1, 2)
  jax.tree.map(
    np.testing.assert_array_equal,
    lowered.compile()(key, images),
    imdata.sample_tasks(key, images, 5, 1, 1, 2),
  )


@pytest.mark.parametrize(
  "n_way, k_shot, q_query, shots, batch, steps",
  [
    (5, 1, 15, 10, 10, 5),  # Reptile's 5-way commands
    (4, 2, 6, 5, 4, 7),  # wraps around the pool
  ],
)
def test_reptile_minibatches_cover_each_tasks_first_images_evenly(
  n_way, k_shot, q_query, shots, batch, steps
):
  tasks = imdata.sample_tasks(
    jax.random.key(3), id_images(), n_way, k_shot, q_query, 3
  )
  got = imdata.reptile_minibatches(tasks, n_way, shots, batch, steps)
  assert got.support[0].shape[:3] == (3, steps, batch)
  assert got.query[0].shape == tasks.query[0].shape
  _, support_ids = decode(tasks.support[0])
  _, query_ids = decode(tasks.query[0])
  _, batch_ids = decode(got.support[0])
  for i in range(3):
    # The pool: per class, its support images then its query images.
    per_class = np.concatenate(
      [
        support_ids[i].reshape(n_way, k_shot),
        query_ids[i].reshape(n_way, q_query),
      ],
      axis=1,
    )[:, :shots]
    order = per_class.T.reshape(-1)  # shot by shot across classes
    expected = order[np.arange(steps * batch) % order.size]
    np.testing.assert_array_equal(batch_ids[i].reshape(-1), expected)
    # Labels travel with their images.
    labels = np.concatenate(
      [np.asarray(tasks.support[1][i]), np.asarray(tasks.query[1][i])]
    )
    ids = np.concatenate([support_ids[i], query_ids[i]])
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    np.testing.assert_array_equal(
      np.asarray(got.support[1][i]).reshape(-1),
      [label_of[j] for j in batch_ids[i].reshape(-1)],
    )
  if batch % n_way == 0:  # then every mini-batch holds each class equally
    labels = np.asarray(got.support[1])
    for c in range(n_way):
      np.testing.assert_array_equal((labels == c).sum(-1), batch // n_way)


def test_reptile_minibatches_refuse_more_shots_than_a_task_holds():
  tasks = imdata.sample_tasks(jax.random.key(0), id_images(), 5, 1, 4, 2)
  with pytest.raises(
    ValueError,
    match="10 training images per class are "
    "more than a task's k_shot \\+ q_query = 1 \\+ 4",
  ):
    imdata.reptile_minibatches(tasks, 5, shots=10, batch_size=10, steps=5)
  with pytest.raises(ValueError, match="not a multiple of n_way = 3"):
    imdata.reptile_minibatches(tasks, 3, shots=2, batch_size=2, steps=1)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    imdata.reptile_minibatches(tasks, 5, shots=2, batch_size=0, steps=1)
