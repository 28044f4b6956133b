"""Evaluation protocols, and testing a finished run under one of them.

A protocol says where the test tasks come from and how each is adapted:
``"ours"`` (the held-out test characters, the run's own adaptation, the
best-validation parameters), ``"authors"`` (the evaluation script of the
iMAML authors' code, ``AUTHORS_SOURCE``) or ``"paper"`` (the tasks that
measured the paper's Table 2, adapted as the run adapts). The three differ:

============  =====================  ================  ==================
protocol      characters             queries a class   adaptation, params
============  =====================  ================  ==================
``ours``      held out (never seen)  the config's      the run's, best
``paper``     the authors' test set  K (1 at 1-shot)   the run's, best
``authors``   the authors' test set  K (1 at 1-shot)   theirs, last
============  =====================  ================  ==================

The authors' test characters are mostly characters of this library's
meta-training split (``characters_overlap`` in the result says how many), so
``paper`` measures, as the paper did, partly on classes seen in training;
``ours`` measures generalisation to unseen classes; ``authors`` also swaps
in their script's adaptation (16 plain gradient steps on the support loss,
lam 0), which suits parameters trained with their inner loop only.
:func:`evaluate_workdir` tests a run's checkpoint under a protocol
(``imaml-eval``) with the same final test as the end of training
(:func:`imaml_jax.train.evaluation.final_test`).

Example:
  >>> eval_file_name(protocol="authors")
  'eval_protocol=authors.json'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import imaml_jax as im
from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import config as config_lib
from imaml_jax.train import evaluation
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import steps as steps_lib
from imaml_jax.train import workdir as workdir_lib

EVAL_SPLITS = ("test", "val", "train", "authors_test")
# Evaluation protocols and the split each draws its test tasks from.
PROTOCOL_SPLITS = {
  "ours": "test",
  "authors": "authors_test",
  "paper": "authors_test",
}
EVAL_PROTOCOLS = tuple(PROTOCOL_SPLITS)
AUTHORS_SOURCE = (
  "github.com/aravindr93/imaml_dev at commit 6a2a669: "
  "examples/measure_accuracy.py with the command of "
  "examples/README.md, implicit_maml/dataset.py"
)


def protocol_record(
  name: str,
  config: config_lib.Config,
  split: str,
  adaptation: str,
  parameters: str,
  overlap: dict | None = None,
) -> dict:
  """The ``"protocol"`` entry of a results file: how its tasks were tested.

  Args:
    name: ``"ours"`` or ``"authors"``.
    config: the config the test tasks were drawn and adapted with.
    split: the split the tasks come from (``EVAL_SPLITS``).
    adaptation: how each task was adapted (the algorithm's name).
    parameters: ``"best_validation"`` or ``"last"``.
    overlap: for the authors' characters, the fraction of them in each part
      of this run's split (``characters_overlap``).

  Example:
    >>> cfg = config_lib.get_config("sinusoid")
    >>> protocol_record("ours", cfg, "test", "imaml(...)", "last")["q_query"]
    10
  """
  record = {
    "name": name,
    "q_query": config.q_query,
    "tasks": exp_lib.tasks_description(config, split),
    "adaptation": adaptation,
    "parameters": parameters,
  }
  if overlap is not None:
    record["characters_overlap"] = overlap
  if name in ("authors", "paper"):
    record["source"] = AUTHORS_SOURCE
  return record


def format_test(results: dict) -> str:
  """One line per test metric: mean +- 95% half-width.

  The heading names the split, the parameters and the evaluation protocol
  (``"ours"`` for results written before protocols were recorded).

  Example:
    >>> stats = {"mean": 0.5, "std": 0.5, "ci95": 0.04, "n": 600}
    >>> print(format_test({"test_params": "last",
    ...                    "protocol": {"name": "authors"},
    ...                    "test": {"accuracy_after": stats}}))
    test on last parameters, protocol authors:
      accuracy_after: 50.000% +- 4.000% (n=600)
  """
  split = results.get("split", "test")
  protocol = results.get("protocol", {}).get("name", "ours")
  where = (
    "test"
    if split in ("test", PROTOCOL_SPLITS.get(protocol))
    else f"{split}-split tasks"
  )
  lines = [
    f"{where} on {results['test_params']} parameters, protocol {protocol}:"
  ]
  for name, stats in results["test"].items():
    scale = 100 if name.startswith("accuracy") else 1
    unit = "%" if scale == 100 else ""
    lines.append(
      f"  {name}: {scale * stats['mean']:.3f}{unit} +- "
      f"{scale * stats['ci95']:.3f}{unit} (n={stats['n']})"
    )
  return "\n".join(lines)


def _extension_record(recorded: dict, per_task: dict) -> dict:
  """``{"extended_from": m}`` for a recorded test of ``m`` tasks that grew
  to those of ``per_task``; a test that did not grow keeps the record it
  had (none, or the size it was extended from before).

  Example:
    >>> _extension_record({"test_per_task": {"values": [1, 2]}},
    ...                   {"values": [1, 2, 3]})
    {'extended_from': 2}
    >>> _extension_record(
    ...   {"test_per_task": {"values": [1, 2, 3]}, "extended_from": 2},
    ...   {"values": [1, 2, 3]})
    {'extended_from': 2}
    >>> _extension_record({"test_per_task": {"values": [1]}}, {"values": [1]})
    {}
  """
  m = len(recorded["test_per_task"]["values"])
  if m < len(per_task["values"]):
    return {"extended_from": m}
  if "extended_from" in recorded:
    return {"extended_from": recorded["extended_from"]}
  return {}


def eval_file_name(
  overrides: Sequence[str] = (),
  split: str | None = None,
  protocol: str = "ours",
) -> str:
  """``eval.json``, or ``eval_`` + protocol, split and overrides + ``.json``.

  The protocol appears as ``protocol=<name>`` unless it is ``ours``; the
  split unless it is the protocol's own (``test`` for ours,
  ``authors_test`` for authors); the test-time overrides, if any, follow.

  Example:
    >>> eval_file_name(["eval_inner_steps=32"])
    'eval_eval_inner_steps=32.json'
    >>> eval_file_name(split="train")
    'eval_train.json'
    >>> eval_file_name(protocol="authors"), eval_file_name(["q_query=1"])
    ('eval_protocol=authors.json', 'eval_q_query=1.json')
  """
  parts = [] if protocol == "ours" else [f"protocol={protocol}"]
  if split not in (None, PROTOCOL_SPLITS.get(protocol)):
    parts.append(split)
  parts += [
    re.sub(r"[^A-Za-z0-9_.=-]", "_", o.replace(" ", "")) for o in overrides
  ]
  return "_".join(["eval", *parts]) + ".json"


def check_protocol(
  protocol: str, split: str | None, overrides: Sequence[str]
) -> str:
  """Validates the protocol and split names; returns the split to use.

  Raises:
    ConfigError: an unknown protocol or split, a split the protocol does
      not draw from, or an override of a field the protocol fixes.
  """
  if protocol not in EVAL_PROTOCOLS:
    raise config_lib.ConfigError(
      f"protocol must be one of {', '.join(EVAL_PROTOCOLS)}; got {protocol!r}."
    )
  if split is not None and split not in EVAL_SPLITS:
    raise config_lib.ConfigError(
      f"split must be one of {', '.join(EVAL_SPLITS)}; got {split!r}."
    )
  own = PROTOCOL_SPLITS[protocol]
  if protocol != "ours" and split not in (None, own):
    raise config_lib.ConfigError(
      f"protocol {protocol!r} draws its tasks from the authors' test "
      f"characters (split {own}); split {split!r} does not apply."
    )
  turned = [
    o for o in overrides if o.partition("=")[0].strip() == "class_rotations"
  ]
  if turned and "authors_test" in (own, split):
    raise config_lib.ConfigError(
      "the authors' test characters are always drawn as their code draws "
      "them (each class turned by its own multiple of 90 degrees per task); "
      f"{', '.join(turned)} does not apply."
    )
  if protocol == "authors":
    fixed = [
      o
      for o in overrides
      if o.partition("=")[0].strip() in exp_lib.AUTHORS_FIXED_FIELDS
    ]
    if fixed:
      raise config_lib.ConfigError(
        f"protocol 'authors' adapts on the support loss alone, without a "
        f"proximal term or a step check; {', '.join(fixed)} does not "
        "apply."
      )
  return own if split is None else split


def _check_dataset(
  protocol: str, split: str, config: config_lib.Config
) -> None:
  if (
    protocol != "ours" or split == "authors_test"
  ) and config.dataset != "omniglot":
    raise config_lib.ConfigError(
      f"the authors' evaluation and characters are Omniglot's; this run's "
      f"dataset is {config.dataset!r}."
    )
  if config.dataset == "sinusoid" and split != "test":
    raise config_lib.ConfigError(
      f"sinusoid tasks have no splits (every task is drawn from the same "
      f"family), so split {split!r} would test the test tasks again; "
      "--split applies to image datasets."
    )


def check_overrides_apply(
  protocol: str, config: config_lib.Config, overrides: Sequence[str]
) -> None:
  """Refuses a test-time override that the run's adaptation has no use for,
  so that a result file named after it cannot hold the test without it.

  ``lam`` is iMAML's proximal strength: MAML, first-order MAML and Reptile
  adapt without it. ``inner_lr`` is the step of every inner solver but the
  Hessian-free one (Newton steps with a line search), except under the
  authors' protocol, which adapts an iMAML run with its own SGD steps.

  Raises:
    ConfigError: such an override, naming the run's algorithm or inner
      solver.

  Example:
    >>> maml = config_lib.get_config("omniglot_5w1s_maml")
    >>> check_overrides_apply("ours", maml, ["eval_inner_steps=5"])
    >>> try:
    ...   check_overrides_apply("ours", maml, ["lam=8"])
    ... except config_lib.ConfigError as error:
    ...   print(str(error)[:40])
    lam=8 does not apply: lam is iMAML's pro
  """
  keys = {o.partition("=")[0].strip(): o for o in overrides}
  if "lam" in keys and config.algorithm != "imaml":
    raise config_lib.ConfigError(
      f"{keys['lam']} does not apply: lam is iMAML's proximal strength, "
      f"and this run's algorithm is {config.algorithm!r}."
    )
  authors_sgd = protocol == "authors" and config.algorithm == "imaml"
  if "inner_lr" in keys and config.inner == "hessian_free" and not authors_sgd:
    raise config_lib.ConfigError(
      f"{keys['inner_lr']} does not apply: the inner solver "
      "'hessian_free' takes Newton steps with a line search, no step size."
    )


def _test_images(
  exp: exp_lib.Experiment, split: str, config: config_lib.Config, data_dir
):
  """``(images, chunks, overlap)`` of the split the tasks are drawn from."""
  if split != "authors_test":
    return getattr(exp.data, split), None, None
  authors = exp_lib.load_authors_characters(config, data_dir)
  return (
    jax.device_put(authors.images),
    exp_lib.authors_evaluation_chunks,
    authors.overlap,
  )


def _adaptation(
  exp: exp_lib.Experiment, protocol: str, test_config: config_lib.Config
):
  """``(exp, description)``: the experiment adapting as the protocol does."""
  if protocol != "authors":
    return exp, exp.eval_algorithm.name
  exp = exp._replace(eval_algorithm=exp_lib.authors_eval_algorithm(test_config))
  return exp, (
    f"{exp.eval_algorithm.name}: its inner solver on the support "
    "loss alone (lam 0: no proximal term, no pull-back)"
  )


def protocol_overrides(protocol: str, config: config_lib.Config) -> list[str]:
  """The test-time overrides a protocol sets before the user's own.

  Example:
    >>> cfg = config_lib.get_config("omniglot_5w5s_imaml_gd")
    >>> protocol_overrides("ours", cfg), protocol_overrides("paper", cfg)
    ([], ['q_query=5'])
  """
  if protocol == "authors":
    return exp_lib.authors_overrides(config)
  if protocol == "paper":
    return [f"q_query={config.k_shot}"]
  return []


def restore_parameters(
  path, config: config_lib.Config, exp: exp_lib.Experiment, *, loaded=None
):
  """``(step, last_params, best)`` of checkpoint ``path``.

  The training metrics' sums play no part in a test: they are restored with
  the metric names the checkpoint holds, so a run saved before a metric was
  added can still be tested. ``loaded``: the ``(step, tree)`` already read
  from ``path`` (:func:`checkpoint.check_intact`), which is then not read
  again.
  """
  loaded = ckpt_lib.load(path) if loaded is None else loaded
  init, _ = im.make_meta_step(
    exp.loss, exp.optimizer, exp.algorithm, has_aux=True
  )
  state = init(exp.init_params(jax.random.key(0)))
  best = {
    "params": state.params,
    "score": np.float64(np.nan),
    "step": np.int64(-1),
  }
  stored_metrics = loaded[1].get("sums", {}).get("sums", {})
  step, state, _, best, _, _ = workdir_lib.restore(
    path,
    config,
    state,
    steps_lib.init_sums(stored_metrics),
    best,
    loaded=loaded,
  )
  return step, state.params, best


def evaluate_workdir(
  workdir: str | os.PathLike,
  data_dir: str | os.PathLike | None = None,
  *,
  n_tasks: int | None = None,
  overrides: Sequence[str] = (),
  split: str | None = None,
  protocol: str = "ours",
  log: Callable[[str], None] = print,
  progress: bool = False,
  test_last: bool = True,
  extend: bool = False,
  overwrite: bool = False,
) -> dict:
  """Tests a run's checkpoint under an evaluation protocol.

  ``protocol="ours"`` (default): tasks from the held-out test characters
  (never meta-trained on), ``q_query`` query images per class (15 in the
  Omniglot configs), adaptation by the run's own inner loop (proximal for
  iMAML), the best-validation parameters (``test``; the last ones in
  ``test_last``).

  ``protocol="authors"`` (Omniglot only): the evaluation script of the
  iMAML authors' code (``AUTHORS_SOURCE``). Tasks from their test
  characters (:func:`imaml_jax.data.omniglot_authors_split_indices`, seed
  12345, most of them meta-training characters of this run's split, see
  ``characters_overlap``), each class turned by its own random multiple of
  90 degrees; ``q_query = k_shot`` (one query image per class at 1-shot);
  adaptation with lam 0 on the support loss alone
  (:func:`imaml_jax.train.experiment.authors_eval_algorithm`: 16 plain
  gradient steps of 0.1 for iMAML); the last parameters (``test`` and
  ``test_last`` alike).

  ``protocol="paper"`` (Omniglot only): the measurement behind the
  paper's Table 2 with this run's own model. The authors' test characters
  and ``q_query = k_shot`` as under ``"authors"``, but the run's own
  adaptation (proximal for iMAML) and the best-validation parameters, as
  under ``"ours"``. The paper's intervals came from 600 tasks of 5 query
  answers at 5-way 1-shot; pass ``n_tasks`` (e.g. 3,000) for one of about
  +-0.2 points near 99%.

  ``overrides`` (``"key=value"`` strings) change test-time fields only
  (``config.TEST_TIME_FIELDS``: how the test tasks are drawn and adapted),
  e.g. more inner steps or ``q_query=1``; under the authors' protocol they
  apply on top of its settings, and ``lam`` and ``inner_backtrack`` are
  refused. ``split`` picks the characters (classes) the tasks are drawn
  from: ``"test"`` (held out), ``"val"``, ``"train"`` (those meta-trained
  on, which measures how much of the test error is a gap between seen and
  unseen classes) or ``"authors_test"`` (the authors' characters alone,
  under this protocol's other settings); ``None`` is the protocol's own.
  Every split uses ``test_seed`` and ``n_tasks`` tasks. Writes
  ``workdir/eval.json`` (or the :func:`eval_file_name` of the protocol,
  split and overrides) and returns the same dict; its ``protocol`` entry
  names the protocol and its settings. ``progress`` shows a bar of the
  tested tasks on standard error (``imaml-eval`` does, unless
  ``--no-progress``): a test of thousands of tasks can take an hour.
  ``test_last=False`` (``imaml-eval --skip-last``) tests only the reported
  parameters: where the best validation came before the last step the
  last parameters are not tested too, which halves the time, and
  ``test_last`` is ``None``.

  ``extend=True`` (``imaml-eval --extend``) adds tasks to the result file
  this test would write: where it holds a test of the first ``m`` of the
  ``n_tasks`` tasks, of the same checkpoint, best validation, protocol
  settings and overrides, only tasks ``m`` and on are tested and pooled
  with it (``evaluation.final_test(recorded=...)``), which is the test of
  all ``n_tasks`` up to rounding; ``extended_from`` records ``m`` (where
  ``m`` is ``n_tasks`` nothing is tested, and the file keeps its scores and
  the ``extended_from`` it had). Without
  such a file every task is tested. A 3,000-task test grows to 6,000 in
  the time of 3,000 more.

  A result file that records a test of more tasks than this one is not
  replaced unless ``overwrite=True`` (``imaml-eval --overwrite``): a
  rerun with the default count would otherwise discard hours of testing.

  Raises:
    ConfigError: an unknown protocol or split, a split the protocol does
      not draw from, an override of a field that is not a test-time field
      (or that the protocol fixes, or that the run's adaptation does not
      use: :func:`check_overrides_apply`), or the authors' characters for a
      run that is not on Omniglot; all before anything is loaded. Also an
      ``n_way`` larger than the classes of the split the tasks are drawn
      from (once the data is loaded, before any task is tested).
    WorkdirError, DataError, CheckpointError: as for training.
    RecordedTestError: without ``extend`` or ``overwrite``, a recorded
      test of more tasks (before anything is loaded); with ``extend``, a
      recorded test of another checkpoint, protocol setting or task set,
      or of more tasks (once the checkpoint is read, before any task is
      tested).
  """
  split = check_protocol(protocol, split, overrides)
  config, latest = workdir_lib.load_run(workdir)
  _check_dataset(protocol, split, config)
  check_overrides_apply(protocol, config, overrides)
  base = protocol_overrides(protocol, config)
  test_config = config_lib.apply_test_time_overrides(
    config, [*base, *overrides]
  )
  n_tasks = n_tasks or config.test_tasks
  path = Path(workdir).expanduser() / eval_file_name(overrides, split, protocol)
  if not (extend or overwrite):
    check_not_replacing_larger_test(path, n_tasks)
  # Read once, before the data loads: a trainer still running may replace
  # the file in the meantime, and this test is of the checkpoint found.
  loaded = ckpt_lib.check_intact(latest)
  data_dir = exp_lib.resolve_data_dir(config, data_dir)
  # Test-time fields change only the adaptation, not the parameters.
  exp = exp_lib.build(test_config, exp_lib.load_data(config, data_dir))
  images, chunks, overlap = _test_images(exp, split, config, data_dir)
  exp_lib.check_split_classes(test_config, split, images)
  exp, adaptation = _adaptation(exp, protocol, test_config)
  step, last_params, best = restore_parameters(
    latest, config, exp, loaded=loaded
  )
  reported = None if protocol == "authors" else best
  protocol_entry = protocol_record(
    protocol,
    test_config,
    split,
    adaptation,
    evaluation.reported_parameters(reported),
    overlap,
  )
  recorded = None
  if extend and path.exists():
    recorded = workdir_lib.read_json(path)
    _check_extensible(
      recorded,
      path.name,
      {
        "step": step,
        "best_validation step": int(best["step"]),
        "protocol": protocol_entry,
        "test_time_overrides": list(overrides),
      },
    )
  elif extend:
    log(f"no recorded {path.name} to extend: testing every task.")
  outcome = evaluation.final_test(
    evaluation.Evaluator(exp, chunks, progress=progress),
    images,
    n_tasks,
    test_config.test_seed,
    last_params=last_params,
    step=step,
    best=reported,
    test_last=test_last,
    recorded=recorded,
  )
  results = {
    "checkpoint": str(latest),
    "step": step,
    "split": split,
    "protocol": protocol_entry,
    "test_time_overrides": list(overrides),
    "test_params": outcome.test_params,
    "best_validation": {
      "step": int(best["step"]),
      "score": float(best["score"]),
    },
    "test": outcome.test,
    "test_last": outcome.test_last,
    "test_per_task": outcome.test_per_task,
  }
  if recorded is not None:
    results.update(_extension_record(recorded, outcome.test_per_task))
  workdir_lib.write_json(path, results)
  log(format_test(results))
  return results


def recorded_task_count(recorded: dict) -> int | None:
  """How many tasks a result file's test holds (``None`` if it says not).

  Example:
    >>> recorded_task_count({"test": {"loss_after": {"mean": 0.3, "n": 600}}})
    600
    >>> recorded_task_count({}) is None
    True
  """
  counts = [
    summary.get("n")
    for summary in (recorded.get("test") or {}).values()
    if isinstance(summary, dict) and isinstance(summary.get("n"), int)
  ]
  return max(counts) if counts else None


def check_not_replacing_larger_test(path: Path, n_tasks: int) -> None:
  """Refuses to replace a recorded test of more tasks than ``n_tasks``.

  A result file of thousands of tasks can hold hours of computation; a
  rerun with the default task count would silently overwrite it with a
  smaller test. An unreadable file, or one without a task count, is
  replaced as before.

  Raises:
    RecordedTestError: ``path`` records a test of more than ``n_tasks``
      tasks, naming both counts and the ways on.
  """
  if not path.is_file():
    return
  try:
    recorded = workdir_lib.read_json(path)
  except workdir_lib.WorkdirError:
    return
  count = recorded_task_count(recorded) if isinstance(recorded, dict) else None
  if count is not None and count > n_tasks:
    raise evaluation.RecordedTestError(
      f"{path} records a test of {count:,} tasks; this test of {n_tasks:,} "
      f"would replace it. Ask for --tasks {count} (with --extend, only new "
      "tasks are tested), or pass --overwrite to replace it."
    )


def _check_extensible(recorded: dict, name: str, expected: dict) -> None:
  """Raises ``RecordedTestError`` naming what ``recorded`` tested otherwise.

  ``expected`` maps a description to this test's value: the recorded
  ``step``, ``best_validation`` step, ``protocol`` entry and
  ``test_time_overrides`` must be equal (compared as JSON values).
  """
  found = {
    "step": recorded.get("step"),
    "best_validation step": recorded.get("best_validation", {}).get("step"),
    "protocol": recorded.get("protocol"),
    "test_time_overrides": recorded.get("test_time_overrides"),
  }
  if "test_per_task" not in recorded:
    raise evaluation.RecordedTestError(
      f"cannot extend {name}: it records no per-task scores; test from "
      "scratch (without --extend)."
    )
  for key, value in expected.items():
    value = json.loads(json.dumps(value))
    if found[key] != value:
      raise evaluation.RecordedTestError(
        f"cannot extend {name}: its {key} is {found[key]!r}, this test's "
        f"is {value!r}; test from scratch (without --extend)."
      )
