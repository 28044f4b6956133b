"""From a :class:`~imaml_jax.train.config.Config` to the pieces of a run.

Pure builders: the network and its loss, the meta-algorithm (for training and,
with ``eval_inner_steps``, for evaluation), the outer optimizer, the data
(checked and loaded from a directory given by the caller or an environment
variable; nothing is hard-coded), the jittable training-task sampler and the
fixed evaluation task sets.

Example:
  >>> import jax
  >>> from imaml_jax.train import config as config_lib, experiment
  >>> cfg = config_lib.get_config("sinusoid")
  >>> exp = experiment.build(cfg, data=None)
  >>> tasks = exp.sample(jax.random.key(0), exp.data.train)
  >>> tasks.support[0].shape
  (25, 10, 1)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import imaml_jax as im
from imaml_jax import data as data_lib
from imaml_jax import models
from imaml_jax.train import config as config_lib

OMNIGLOT_ENV = "IMAML_OMNIGLOT_DIR"
MINI_IMAGENET_ENV = "IMAML_MINI_IMAGENET_DIR"
_ENV = {"omniglot": OMNIGLOT_ENV, "miniimagenet": MINI_IMAGENET_ENV}
_MINI_PICKLES = tuple(
  f"mini-imagenet-cache-{s}.pkl" for s in ("train", "val", "test")
)
_MINI_CSVS = ("train.csv", "val.csv", "test.csv")


class DataError(ValueError):
  """The data directory is missing, incomplete or unreadable."""


class Data(NamedTuple):
  """Class arrays of the three splits (``None`` leaves for sinusoid)."""

  train: Any
  val: Any
  test: Any


class Experiment(NamedTuple):
  """The pieces of a run.

  Attributes:
    config: the config.
    loss: ``loss(params, batch) -> (loss, aux)``.
    init_params: ``key -> params``.
    optimizer: the outer optax optimizer.
    algorithm: the meta-algorithm used for training.
    eval_algorithm: the same algorithm with ``eval_inner_steps`` inner steps.
    data: the splits (device arrays), or ``Data(None, None, None)``.
    sample: ``(key, train_data) -> Task`` batch of ``meta_batch`` training
      tasks; jittable, the data is an argument.
  """

  config: config_lib.Config
  loss: Callable
  init_params: Callable
  optimizer: optax.GradientTransformation
  algorithm: im.MetaAlgorithm
  eval_algorithm: im.MetaAlgorithm
  data: Data
  sample: Callable


def network(config: config_lib.Config):
  """``(module, example_input)`` for the config's dataset."""
  if config.dataset == "omniglot":
    return (
      models.omniglot_convnet(
        config.n_way, conv=config.conv, variant=config.network
      ),
      jnp.zeros((config.n_way * config.k_shot, 28, 28, 1)),
    )
  if config.dataset == "miniimagenet":
    return (
      models.miniimagenet_convnet(
        config.n_way, conv=config.conv, variant=config.network
      ),
      jnp.zeros((config.n_way * config.k_shot, 84, 84, 3)),
    )
  return models.sinusoid_mlp(), jnp.zeros((config.k_shot, 1))


def inner_solver(config: config_lib.Config, steps: int) -> im.InnerSolver:
  """The inner solver named by ``config.inner`` with ``steps`` steps."""
  if config.inner == "gd":
    return im.gd(steps, config.inner_lr, backtrack=config.inner_backtrack)
  if config.inner == "nesterov":
    return im.nesterov(steps, config.inner_lr, config.inner_momentum)
  if config.inner == "gd_then_pull_back":
    return im.gd_then_pull_back(steps, config.inner_lr)
  if config.inner == "adam":
    return im.adam(steps, config.inner_lr, b1=0.0)
  return im.hessian_free(steps, config.hf_cg_steps)


def linear_solver(config: config_lib.Config) -> im.LinearSolver:
  """iMAML's solver of the implicit system: CG with ``cg_steps`` steps,
  stopping at negative curvature if ``cg_stop_at_negative_curvature``."""
  return im.cg(
    config.cg_steps,
    stop_at_negative_curvature=config.cg_stop_at_negative_curvature,
  )


def algorithm(
  config: config_lib.Config, *, evaluation: bool = False
) -> im.MetaAlgorithm:
  """The meta-algorithm; ``evaluation`` uses ``eval_inner_steps`` if set."""
  steps = config.inner_steps
  if evaluation and config.eval_inner_steps:
    steps = config.eval_inner_steps
  inner = inner_solver(config, steps)
  if config.algorithm == "imaml":
    return im.imaml(
      config.lam,
      inner,
      linear_solver(config),
      damping=config.cg_damping,
      lam_damping=config.lam_damping,
    )
  adapts = None if config.adapt_norm else im.adapt_all_but_norm
  if config.algorithm == "maml":
    return im.maml(inner, remat=config.maml_remat, adapts=adapts)
  if config.algorithm == "fomaml":
    return im.fomaml(inner, adapts=adapts)
  return im.reptile(
    inner, minibatches=bool(config.reptile_train_shots and not evaluation)
  )


def optimizer(config: config_lib.Config) -> optax.GradientTransformation:
  """The outer optimizer, with a constant or linearly decaying rate.

  With ``weight_decay`` ``w > 0`` the update is
  ``theta <- theta - lr_t (u_t + w theta)``: AdamW for Adam, where ``u_t`` is
  Adam's normalised step, and an L2 term for SGD, where ``u_t`` is the
  meta-gradient. ``w = 0`` builds plain ``optax.adam``/``optax.sgd``, the
  optimizer (and state) of every run stored before the option existed.
  """
  lr = config.meta_lr
  if config.lr_schedule == "linear":
    lr = optax.linear_schedule(config.meta_lr, 0.0, config.meta_steps)
  decay = config.weight_decay
  if config.optimizer == "adam":
    if decay:
      return optax.adamw(lr, eps=config.adam_eps, weight_decay=decay)
    return optax.adam(lr, eps=config.adam_eps)
  if decay:
    return optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr))
  return optax.sgd(lr)


# ----------------------------------------------------------------------------
# Data.


def resolve_data_dir(
  config: config_lib.Config, data_dir: str | os.PathLike | None
) -> Path | None:
  """Finds and checks the data directory, reading nothing but file names.

  Args:
    config: the config (its ``dataset`` decides what is needed).
    data_dir: an explicit directory, or ``None`` to use the environment
      variable ``IMAML_OMNIGLOT_DIR`` (Omniglot) or
      ``IMAML_MINI_IMAGENET_DIR`` (mini-ImageNet).

  Returns:
    The directory, or ``None`` for sinusoid (no data needed).

  Raises:
    DataError: no directory given, it does not exist, or it lacks the files.
  """
  if config.dataset == "sinusoid":
    return None
  env = _ENV[config.dataset]
  if data_dir is None or str(data_dir) == "":
    data_dir = os.environ.get(env)
    if not data_dir:
      raise DataError(
        f"no {config.dataset} data directory: pass --data-dir "
        f"or set the environment variable {env}."
      )
  path = Path(data_dir).expanduser()
  if not path.is_dir():
    raise DataError(f"data directory {path} does not exist.")
  if config.dataset == "omniglot":
    wanted = [f"{name}.zip" for name in data_lib.OMNIGLOT_ARCHIVES]
    missing = [w for w in wanted if not (path / w).is_file()]
    if missing:
      raise DataError(
        f"{path} lacks the Omniglot archive(s) {', '.join(missing)}; "
        "imaml_jax.data.download_omniglot(dir) fetches them."
      )
    return path
  if all((path / f).is_file() for f in _MINI_PICKLES):
    return path
  if (
    all((path / f).is_file() for f in _MINI_CSVS) and (path / "images").is_dir()
  ):
    return path
  raise DataError(
    f"{path} holds neither the mini-ImageNet pickles ({', '.join(_MINI_PICKLES)}) "
    f"nor the CSV splits ({', '.join(_MINI_CSVS)}) with an images/ folder."
  )


def load_data(config: config_lib.Config, data_dir: Path | None) -> Data:
  """Loads the three splits as host ``uint8`` arrays (``None`` for sinusoid).

  Omniglot: :func:`imaml_jax.data.omniglot_splits` (1100 / 100 / 423
  characters for meta-train / validation / test, test characters unseen;
  each rotation a class with ``class_rotations="classes"``, unrotated with
  ``"per_task"``, whose tasks turn their classes as they are drawn).
  Mini-ImageNet: the Ravi & Larochelle splits, from the
  pickles if present, else from the CSV files.

  Raises:
    DataError: the files cannot be read.
  """
  if config.dataset == "sinusoid":
    return Data(None, None, None)
  try:
    if config.dataset == "omniglot":
      splits = data_lib.omniglot_splits(
        data_dir,
        seed=config.split_seed,
        rotations=config.class_rotations == "classes",
      )
    elif all((data_dir / f).is_file() for f in _MINI_PICKLES):
      splits = data_lib.load_mini_imagenet_pickle(data_dir)
    else:
      splits = data_lib.load_mini_imagenet_csv(data_dir)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot load {config.dataset} from {data_dir}: {e}") from e
  return Data(splits.train, splits.val, splits.test)


def sampler(config: config_lib.Config) -> Callable:
  """``sample(key, train_data) -> Task``: a jittable batch of training tasks."""
  if config.dataset == "sinusoid":
    return lambda key, _: data_lib.sinusoid_tasks(
      key, config.meta_batch, config.k_shot, config.q_query
    )
  return lambda key, images: training_tasks(
    config,
    turn_task_classes(
      config,
      key,
      data_lib.sample_tasks(
        key,
        images,
        config.n_way,
        config.k_shot,
        config.q_query,
        config.meta_batch,
      ),
    ),
  )


def turn_task_classes(
  config: config_lib.Config, key: jax.Array, tasks: im.Task
) -> im.Task:
  """Training tasks with ``class_rotations="per_task"``'s rotations.

  With ``"per_task"`` every class of each task is turned by ``90 * r``
  degrees, ``r`` uniform in ``{0, 1, 2, 3}`` for each task and class, drawn
  from ``jax.random.fold_in(key, 1)`` (``key`` drew the tasks)
  (:func:`imaml_jax.data.rotate_task_classes`); otherwise the tasks are
  returned as they are.
  """
  if config.class_rotations != "per_task":
    return tasks
  turns = jax.random.randint(
    jax.random.fold_in(key, 1),
    (tasks.support[1].shape[0], config.n_way),
    0,
    4,
  )
  return data_lib.rotate_task_classes(tasks, turns)


def training_tasks(config: config_lib.Config, tasks: im.Task) -> im.Task:
  """Sampled N-way tasks as the training algorithm takes them.

  Reptile with ``reptile_train_shots`` adapts on mini-batches of each task's
  support and query images (:func:`imaml_jax.data.reptile_minibatches`);
  every other run takes the tasks as they are.
  """
  if not config.reptile_train_shots:
    return tasks
  return data_lib.reptile_minibatches(
    tasks,
    config.n_way,
    config.reptile_train_shots,
    config.reptile_inner_batch,
    config.inner_steps,
  )


def evaluation_chunks(
  config: config_lib.Config, images, n_tasks: int, seed: int
) -> Iterator[im.Task]:
  """A fixed set of ``n_tasks`` evaluation tasks, in ``eval_chunk`` pieces.

  The same ``(n_tasks, seed)`` gives the same tasks on every run: for images,
  :func:`imaml_jax.data.evaluation_task_chunks` on the given split, each
  class turned as in :func:`authors_evaluation_chunks` where
  ``class_rotations="per_task"``; for sinusoid,
  :func:`imaml_jax.data.sinusoid_tasks` from the fixed key
  ``jax.random.key(seed, impl="threefry2x32")``.
  """
  chunks = _drawn_chunks(config, images, n_tasks, seed)
  if config.class_rotations == "per_task":
    chunks = _turned_chunks(config, chunks, n_tasks, seed)
  yield from chunks


def _drawn_chunks(
  config: config_lib.Config, images, n_tasks: int, seed: int
) -> Iterator[im.Task]:
  """:func:`evaluation_chunks` before any per-task rotation."""
  if config.dataset != "sinusoid":
    yield from data_lib.evaluation_task_chunks(
      images,
      config.n_way,
      config.k_shot,
      config.q_query,
      n_tasks=n_tasks,
      seed=seed,
      chunk_size=config.eval_chunk,
    )
    return
  tasks = data_lib.sinusoid_tasks(
    jax.random.key(seed, impl="threefry2x32"),
    n_tasks,
    config.k_shot,
    config.q_query,
  )
  for start in range(0, n_tasks, config.eval_chunk):
    yield jax.tree.map(lambda x, s=start: x[s : s + config.eval_chunk], tasks)


def check_class_counts(config: config_lib.Config, data: Data) -> None:
  """Refuses an ``n_way`` larger than a split's class count.

  Checked once the splits are loaded, before anything is compiled or
  written: the sampler would otherwise refuse only when it first draws from
  the split (the validation split after ``val_every`` meta-steps, the test
  split after training). The validation split counts only where the run
  validates (``val_every > 0``).

  Raises:
    ConfigError: naming the split and its number of classes.

  Example:
    >>> import numpy as np
    >>> from imaml_jax.train import config as config_lib
    >>> config = config_lib.get_config("omniglot_20w1s_imaml_gd")
    >>> small = np.zeros((10, 20, 28, 28, 1), np.uint8)
    >>> try:
    ...   check_class_counts(config, Data(small, small, small))
    ... except config_lib.ConfigError as e:
    ...   print(e)
    n_way=20 is more than the 10 classes of the train split of omniglot; ask
    for n_way <= 10.
  """
  splits = {"train": data.train, "test": data.test}
  if config.val_every > 0:
    splits["val"] = data.val
  for name, images in splits.items():
    check_split_classes(config, name, images)


def check_split_classes(config: config_lib.Config, name: str, images) -> None:
  """Refuses an ``n_way`` larger than the classes of one split's images.

  Args:
    config: the run's config.
    name: the split's name, for the message.
    images: its class array (``None`` for sinusoid: nothing to check).

  Raises:
    ConfigError: naming the split and its number of classes.
  """
  if images is not None and config.n_way > len(images):
    raise config_lib.ConfigError(
      f"n_way={config.n_way} is more than the {len(images)} classes of the "
      f"{name} split of {config.dataset}; ask for n_way <= {len(images)}."
    )


def build(config: config_lib.Config, data: Data | None) -> Experiment:
  """Builds every piece of a run; ``data`` goes to the default device."""
  net, example_x = network(config)
  if data is None:
    data = Data(None, None, None)
  data = Data(
    *(None if d is None else jax.device_put(np.asarray(d)) for d in data)
  )
  return Experiment(
    config=config,
    loss=(
      models.regression_loss(net)
      if config.dataset == "sinusoid"
      else models.classification_loss(net)
    ),
    init_params=lambda key: models.init_params(net, key, example_x),
    optimizer=optimizer(config),
    algorithm=algorithm(config),
    eval_algorithm=algorithm(config, evaluation=True),
    data=data,
    sample=sampler(config),
  )


def build_experiment(
  config: config_lib.Config, data_dir: str | os.PathLike | None = None
) -> Experiment:
  """Every piece of a run of ``config``, as ``imaml-train`` builds it.

  Finds the data (``data_dir``, or the dataset's environment variable,
  :func:`resolve_data_dir`), loads the splits, checks ``n_way`` against them
  (:func:`check_class_counts`) and builds the network's loss, the
  algorithm, the optimizer and the task sampler (:func:`build`). The pieces
  feed the training package's building blocks
  (:func:`imaml_jax.train.make_train_step`,
  :func:`imaml_jax.train.metric_shapes`) or a loop of your own.

  Args:
    config: a config (:func:`imaml_jax.train.get_config`, with overrides).
    data_dir: the dataset directory; ``None`` for the environment variable
      (nothing is needed for sinusoid).

  Returns:
    An :class:`Experiment`.

  Raises:
    ConfigError: an invalid config, or an ``n_way`` no split can serve.
    DataError: the data cannot be found or read.

  Example:
    >>> from imaml_jax import train
    >>> exp = train.build_experiment(train.get_config("sinusoid"))
    >>> exp.algorithm.name
    'imaml(lam=30.0, gd(steps=16, lr=0.005, backtrack), cg(5))'
  """
  config_lib.validate(config)
  data = load_data(config, resolve_data_dir(config, data_dir))
  check_class_counts(config, data)
  return build(config, data)


# ----------------------------------------------------------------------------
# Where test tasks come from, and the authors' evaluation.


def tasks_description(config: config_lib.Config, split: str) -> str:
  """A sentence naming the tasks ``imaml-eval --split split`` draws.

  Example:
    >>> cfg = config_lib.get_config("omniglot_5w1s_imaml_gd")
    >>> tasks_description(cfg, "test")[:46]
    'the 423 test characters of split_seed 0, never'
  """
  if config.dataset == "sinusoid":
    return (
      f"fresh sinusoid tasks from seed test_seed={config.test_seed} "
      "(the split names no classes)"
    )
  if config.dataset == "miniimagenet":
    return (
      f"the {split} classes of the Ravi & Larochelle split of mini-ImageNet"
    )
  if split == "authors_test":
    return (
      f"the {1623 - data_lib.AUTHORS_N_TRAIN} test characters of the "
      "authors' evaluation script: those after the first "
      f"{data_lib.AUTHORS_N_TRAIN} of Python's random.shuffle with "
      f"seed {data_lib.AUTHORS_TEST_SEED} of the 1623 characters "
      "sorted by (archive, alphabet, character); each class of a task "
      "turned by its own random multiple of 90 degrees"
    )
  counts = {"train": 1100, "val": 100, "test": 423}
  roles = {
    "train": "meta-trained on",
    "val": "used for model selection, never meta-trained on",
    "test": "never meta-trained on or used for model selection",
  }
  classes = (
    "each class of a task turned by its own random multiple of 90 degrees"
    if config.class_rotations == "per_task"
    else "each of the four rotations of a character a class of its own"
  )
  return (
    f"the {counts[split]} {split} characters of split_seed "
    f"{config.split_seed}, {roles[split]}; {classes}"
  )


class AuthorsCharacters(NamedTuple):
  """The authors' test characters and where they fall in this run's split.

  Attributes:
    images: ``uint8[423, 20, 28, 28, 1]``, unrotated.
    overlap: fraction of them in this run's ``meta_training``,
      ``validation`` and ``test`` characters, and in the 1200 characters
      the authors' training script meta-trains on
      (``authors_meta_training``).
  """

  images: np.ndarray
  overlap: dict


def load_authors_characters(
  config: config_lib.Config, data_dir: Path
) -> AuthorsCharacters:
  """The test characters of the authors' evaluation script (Omniglot).

  :func:`imaml_jax.data.omniglot_authors_split_indices` with the
  evaluation script's seed, from the same archives and cache as the run's
  own split (:func:`imaml_jax.data.omniglot_split_indices` with the run's
  ``split_seed``), against which the overlap is measured.

  Raises:
    DataError: the files cannot be read.
  """
  try:
    data = data_lib.load_omniglot(data_dir)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot load omniglot from {data_dir}: {e}") from e
  test = data_lib.omniglot_authors_split_indices(data)[1]
  ours = data_lib.omniglot_split_indices(data, seed=config.split_seed)
  theirs = data_lib.omniglot_authors_split_indices(
    data, seed=data_lib.AUTHORS_TRAIN_SEED
  )[0]
  names = ("meta_training", "validation", "test", "authors_meta_training")
  overlap = {
    name: float(np.isin(test, idx).mean())
    for name, idx in zip(names, (*ours, theirs))
  }
  return AuthorsCharacters(data.images[test], overlap)


def authors_evaluation_chunks(
  config: config_lib.Config, images, n_tasks: int, seed: int
) -> Iterator[im.Task]:
  """:func:`evaluation_chunks` with each class turned as the authors do.

  The tasks are drawn from unrotated characters as :func:`evaluation_chunks`
  draws them; then every class of a task is turned by ``90 * r`` degrees
  (:func:`imaml_jax.data.rotate_task_classes`), ``r`` uniform in
  ``{0, 1, 2, 3}``, drawn for all ``n_tasks`` tasks at once from
  ``jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), 1)``, so
  the tasks do not depend on ``eval_chunk``.
  """
  yield from _turned_chunks(
    config, _drawn_chunks(config, images, n_tasks, seed), n_tasks, seed
  )


def _turned_chunks(
  config: config_lib.Config, chunks: Iterator[im.Task], n_tasks: int, seed: int
) -> Iterator[im.Task]:
  """``chunks`` with each class of a task turned by its own multiple of 90
  degrees (:func:`authors_evaluation_chunks`)."""
  key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), 1)
  turns = jax.random.randint(key, (n_tasks, config.n_way), 0, 4)
  start = 0
  for chunk in chunks:
    size = chunk.support[1].shape[0]
    yield data_lib.rotate_task_classes(chunk, turns[start : start + size])
    start += size


# The adaptation in the command of the authors' examples/README.md for
# measure_accuracy.py: --n_steps 16 --lam 0.0 --inner_lr 1e-1.
AUTHORS_EVAL_STEPS = 16
AUTHORS_EVAL_LR = 0.1
# Test-time fields the authors' adaptation has no use for.
AUTHORS_FIXED_FIELDS = ("lam", "inner_backtrack")


def authors_overrides(config: config_lib.Config) -> list[str]:
  """Test-time overrides that set up the authors' evaluation of a run.

  ``q_query = k_shot``: their tasks hold K query images per class
  (``implicit_maml/dataset.py``, ``val_ids``), one at 1-shot. For iMAML,
  also their adaptation's 16 steps of 0.1 (see
  :func:`authors_eval_algorithm`). Overrides given after these win, so
  ``--set eval_inner_steps=25`` plays their ``--n_steps 25``.

  Example:
    >>> authors_overrides(config_lib.get_config("omniglot_5w1s_imaml_gd"))
    ['q_query=1', 'eval_inner_steps=16', 'inner_lr=0.1']
  """
  out = [f"q_query={config.k_shot}"]
  if config.algorithm == "imaml":
    out += [
      f"eval_inner_steps={AUTHORS_EVAL_STEPS}",
      f"inner_lr={AUTHORS_EVAL_LR}",
    ]
  return out


def authors_eval_algorithm(config: config_lib.Config) -> im.MetaAlgorithm:
  """The adaptation of the authors' evaluation script for a run.

  Their ``measure_accuracy.py`` adapts with ``lam = 0``: ``n_steps`` SGD
  steps of ``inner_lr`` on the support cross-entropy alone, and a pull-back
  step whose gradient is zero (``regularization_loss`` with lam 0), i.e.
  no proximal term and no pull-back. For iMAML that is
  ``im.fomaml(im.gd(steps, lr))``'s plain adaptation with
  ``steps = eval_inner_steps`` and ``lr = inner_lr`` (16 and 0.1 after
  :func:`authors_overrides`), whatever the run's inner solver. MAML,
  first-order MAML and Reptile already adapt on the support loss alone;
  they keep their own adaptation (steps, step size), the one they were
  meta-trained for: the script takes whatever ``--n_steps`` and
  ``--inner_lr`` it is given, and the authors' 16 steps of 0.1 are the
  SGD part of their own iMAML inner loop, not a setting of these
  algorithms.
  """
  if config.algorithm != "imaml":
    return algorithm(config, evaluation=True)
  steps = config.eval_inner_steps or config.inner_steps
  return im.fomaml(im.gd(steps, config.inner_lr))
