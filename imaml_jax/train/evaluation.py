"""Evaluating parameters on fixed task sets, and the final test of a run.

Model selection: every ``val_every`` steps the meta-parameters are evaluated
on a fixed set of ``val_tasks`` tasks from the validation split
(:class:`imaml_jax.train.periodic.Validation`); the parameters with the best
validation score (:func:`score_key`: highest accuracy, or lowest query loss
where the loss has no accuracy, e.g. the sinusoid MSE) are kept. The final
test (:func:`final_test`, the same for ``imaml-train`` and ``imaml-eval``)
reports these best-validation parameters first (``results["test"]``) and the
last parameters too (``results["test_last"]``; ``imaml-eval --skip-last``
leaves them out where they differ, which halves a long test).

Test statistics (:func:`summarize`): mean over tasks and the 95% interval
half-width ``1.96 * std / sqrt(n)`` with the population standard deviation
(``ddof=0``), as ``numpy.std`` in the authors' evaluation script. Every
task's score of the reported test is kept too (``results["test_per_task"]``,
:func:`per_task_record`) with a fingerprint of the task set, so two runs
tested on the same tasks can be compared task by task (paired).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
import tqdm

import imaml_jax as im
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import runtime


def summarize(per_task: dict[str, np.ndarray]) -> dict[str, dict]:
  """Mean, population std (ddof=0) and 95% half-width per metric.

  Example:
    >>> summarize({"accuracy_after": np.array([1.0, 0.0])})["accuracy_after"]
    {'mean': 0.5, 'std': 0.5, 'ci95': 0.6929646455628166, 'n': 2}
  """
  out = {}
  for key, values in per_task.items():
    values = np.asarray(values, np.float64)
    n = values.size
    std = float(np.std(values))
    out[key] = {
      "mean": float(np.mean(values)),
      "std": std,
      "ci95": 1.96 * std / math.sqrt(n),
      "n": int(n),
    }
  return out


# Task counts whose fingerprint a test on more tasks also records
# (``prefix_sha256``): a result on 6,000 tasks can then be paired with one on
# 3,000 over the tasks they share.
PREFIX_TASK_COUNTS = (600, 1000, 3000, 6000)


def per_task_record(
  per_task: dict[str, np.ndarray],
  tasks_sha256: str,
  prefix_sha256: dict[int, str] | None = None,
) -> dict:
  """The ``"test_per_task"`` entry of a results file: the selection metric
  (:func:`score_key`) of every test task, in task order, and the task set's
  fingerprint (:meth:`Evaluator.fingerprint`).

  Two runs tested on the same tasks (equal ``tasks_sha256``) can then be
  compared task by task: the 95% interval of the mean of paired differences,
  ``1.96 * std(a - b) / sqrt(n)``, is narrower than the two runs' own
  intervals added whenever their per-task scores are correlated.
  ``prefix_sha256`` (``{m: digest}``, :meth:`Evaluator.fingerprints`) adds
  the fingerprints of the first ``m`` tasks, so that a test on fewer tasks
  can be paired with the first ones of this one.

  Example:
    >>> per_task_record({"accuracy_after": np.array([1.0, 0.5])}, "ab")
    {'metric': 'accuracy_after', 'values': [1.0, 0.5], 'tasks_sha256': 'ab'}
    >>> per_task_record({"loss_after": np.array([2.0])}, "cd", {1: "cd"})
    {'metric': 'loss_after', 'values': [2.0], 'tasks_sha256': 'cd', 'prefix_sha256': {'1': 'cd'}}
  """
  key, _ = score_key(per_task)
  values = np.asarray(per_task[key], np.float64)
  record = {
    "metric": key,
    "values": [round(float(v), 6) for v in values],
    "tasks_sha256": tasks_sha256,
  }
  if prefix_sha256:
    record["prefix_sha256"] = {str(m): d for m, d in prefix_sha256.items()}
  return record


def score_key(metric_names: Iterable[str]) -> tuple[str, bool]:
  """``(metric, higher_is_better)`` used for model selection.

  Example:
    >>> score_key(["loss_after", "accuracy_after"])
    ('accuracy_after', True)
  """
  names = set(metric_names)
  if "accuracy_after" in names:
    return "accuracy_after", True
  return "loss_after", False


def improves(score: float, best: float, higher_is_better: bool) -> bool:
  """Whether ``score`` beats ``best`` (any score beats a NaN best).

  Example:
    >>> improves(0.5, float("nan"), True), improves(0.5, 0.4, False)
    (True, False)
  """
  if math.isnan(best):
    return True
  return score > best if higher_is_better else score < best


class Evaluator:
  """Evaluates parameters on fixed task sets; compiles once per chunk shape.

  ``chunks(config, images, n_tasks, seed)`` yields the tasks
  (:func:`imaml_jax.train.experiment.evaluation_chunks` by default).
  With ``progress`` a tqdm bar counts the tested tasks (each chunk is
  waited for, so the bar shows finished work).
  """

  def __init__(
    self,
    exp: exp_lib.Experiment,
    chunks: Callable | None = None,
    *,
    progress: bool = False,
  ):
    self._exp = exp
    self._chunks = chunks or exp_lib.evaluation_chunks
    self._progress = progress
    self._fn = jax.jit(
      im.make_eval_step(exp.loss, exp.eval_algorithm, has_aux=True)
    )
    self._compiled = {}
    self.compile_time_s = 0.0

  def __call__(self, params, images, n_tasks: int, seed: int) -> dict:
    """Per-task metrics (numpy arrays of length ``n_tasks``)."""
    parts = []
    bar = tqdm.tqdm(
      total=n_tasks,
      unit="task",
      desc="test",
      disable=not self._progress,
      leave=False,
      dynamic_ncols=True,
    )
    for chunk in self._chunks(self._exp.config, images, n_tasks, seed):
      shape = jax.tree.map(lambda x: x.shape, chunk)
      key = jax.tree_util.tree_structure(chunk), tuple(jax.tree.leaves(shape))
      if key not in self._compiled:
        start = time.perf_counter()
        self._compiled[key] = self._fn.lower(params, chunk).compile(
          compiler_options=runtime.compiler_options()
        )
        self.compile_time_s += time.perf_counter() - start
      parts.append(self._compiled[key](params, chunk))
      if self._progress:
        jax.block_until_ready(parts[-1])
        bar.update(jax.tree.leaves(chunk)[0].shape[0])
    bar.close()
    parts = jax.device_get(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def fingerprint(self, images, n_tasks: int, seed: int) -> str:
    """SHA-256 of the ``n_tasks`` tasks that ``__call__`` evaluates.

    The digest is that of each array of the whole task set in turn
    (support and query inputs and labels, all tasks in order), preceded by
    its dtype and shape, so it does not depend on ``eval_chunk``; it is
    computed one chunk at a time (the chunks are drawn again for each
    array). Two results with the same fingerprint were measured on the same
    tasks, so their per-task scores can be compared task by task.
    """
    return self.fingerprints(images, n_tasks, seed)[n_tasks]

  def fingerprints(
    self, images, n_tasks: int, seed: int, prefixes=()
  ) -> dict[int, str]:
    """:meth:`fingerprint` of the ``n_tasks`` tasks and of their first ``m``.

    For each ``m`` of ``prefixes`` below ``n_tasks``, the digest of the
    first ``m`` tasks *as drawn for this set*: it equals
    ``fingerprint(images, m, seed)`` exactly when a test on ``m`` tasks
    draws the same tasks as the first ``m`` of this one, which is what
    makes pairing their per-task scores sound.

    Returns:
      ``{m: digest}`` for those ``m`` and ``n_tasks``.
    """
    counts = sorted({m for m in prefixes if 0 < m < n_tasks} | {n_tasks})

    def leaves():  # Each chunk's arrays, on the host.
      for chunk in self._chunks(self._exp.config, images, n_tasks, seed):
        yield [
          np.ascontiguousarray(x)
          for x in jax.device_get(jax.tree.leaves(chunk))
        ]

    first = next(leaves())
    digests = {m: hashlib.sha256() for m in counts}
    for i, leaf in enumerate(first):
      for m, digest in digests.items():
        digest.update(f"{leaf.dtype}{(m, *leaf.shape[1:])}".encode())
      done = 0
      for chunk in leaves():
        for m, digest in digests.items():
          if done < m:
            digest.update(chunk[i][: m - done].tobytes())
        done += chunk[i].shape[0]
    return {m: digest.hexdigest() for m, digest in digests.items()}


class FinalTest(NamedTuple):
  """The outcome of :func:`final_test`.

  Attributes:
    test: summaries (:func:`summarize`) of the reported parameters.
    test_last: summaries of the last parameters, or ``None`` where they
      were not tested (``test_last=False``).
    test_per_task: :func:`per_task_record` of the reported test.
    test_params: ``"best_validation"`` or ``"last"``: what ``test`` reports.
    params: the parameters ``test`` was measured on.
  """

  test: dict
  test_last: dict | None
  test_per_task: dict
  test_params: str
  params: Any


def final_test(
  evaluator: Evaluator,
  images,
  n_tasks: int,
  seed: int,
  *,
  last_params,
  step: int,
  best: dict | None,
  test_last: bool = True,
) -> FinalTest:
  """Tests the last parameters and, if given, the best-validation ones.

  The best-validation parameters are tested only when they come from
  before the last step (otherwise they are the last ones); the reported
  test is theirs whenever a validation took place. ``test_last=False``
  then leaves the last parameters untested, which halves the time of a
  test whose best validation came before the last step.

  Args:
    evaluator: the evaluator of the run's experiment.
    images: the images the test tasks are drawn from.
    n_tasks: the number of test tasks.
    seed: the seed of the test tasks.
    last_params: the parameters of step ``step``.
    step: the last step.
    best: ``{"params", "step", ...}`` of the best validation (``step`` -1
      if there was none), or ``None`` to report the last parameters.
    test_last: also test the last parameters where the best-validation
      ones are reported and differ from them.

  Returns:
    A :class:`FinalTest`.
  """
  use_best = best is not None and int(best["step"]) >= 0
  earlier_best = use_best and int(best["step"]) < step
  if earlier_best:
    params = best["params"]
    test = evaluator(params, images, n_tasks, seed)
    last = evaluator(last_params, images, n_tasks, seed) if test_last else None
  else:
    params = last_params
    test = last = evaluator(params, images, n_tasks, seed)
  digests = evaluator.fingerprints(images, n_tasks, seed, PREFIX_TASK_COUNTS)
  test_per_task = per_task_record(
    test,
    digests.pop(n_tasks),
    digests,
  )
  return FinalTest(
    summarize(test),
    None if last is None else summarize(last),
    test_per_task,
    "best_validation" if use_best else "last",
    params,
  )
