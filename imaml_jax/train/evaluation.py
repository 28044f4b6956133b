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

A recorded test can be extended to more tasks (``imaml-eval --extend``,
``final_test(recorded=...)``): the tasks do not depend on how many are
drawn, so only the new ones are tested and the summaries are pooled
(:func:`pool_summaries`), which gives the test of all of them.
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


class RecordedTestError(ValueError):
  """A recorded test that cannot be extended to the test asked for."""


def pool_summaries(first: dict, second: dict) -> dict:
  """The :func:`summarize` of two task sets together, from theirs alone.

  With counts ``n1, n2``, means ``m1, m2`` and population variances
  ``s1**2, s2**2``, the pooled ``n = n1 + n2`` tasks have the mean
  ``m = (n1 m1 + n2 m2) / n`` and the population variance
  ``(n1 (s1**2 + (m1 - m)**2) + n2 (s2**2 + (m2 - m)**2)) / n``; the 95%
  half-width is ``1.96 * std / sqrt(n)`` as in :func:`summarize`. The two
  must hold the same metrics (:class:`RecordedTestError` otherwise).

  Example:
    >>> a = summarize({"accuracy_after": np.array([1.0, 0.0])})
    >>> b = summarize({"accuracy_after": np.array([1.0, 1.0])})
    >>> pool_summaries(a, b)["accuracy_after"]["mean"]
    0.75
  """
  if set(first) != set(second):
    raise RecordedTestError(
      f"the recorded test's metrics ({', '.join(sorted(first))}) are not "
      f"this test's ({', '.join(sorted(second))})."
    )
  out = {}
  for key, a in first.items():
    b = second[key]
    n = a["n"] + b["n"]
    mean = (a["n"] * a["mean"] + b["n"] * b["mean"]) / n
    variance = (
      a["n"] * (a["std"] ** 2 + (a["mean"] - mean) ** 2)
      + b["n"] * (b["std"] ** 2 + (b["mean"] - mean) ** 2)
    ) / n
    std = math.sqrt(variance)
    out[key] = {
      "mean": mean,
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

  Within a chunk the tasks are mapped over as a training step maps over
  its batch (:func:`imaml_jax.train.runtime.task_chunk`: one at a time for
  the conv nets on a CPU, vmapped otherwise).

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
      im.make_eval_step(
        exp.loss,
        exp.eval_algorithm,
        has_aux=True,
        task_chunk=runtime.task_chunk(exp.config),
      )
    )
    self._compiled = {}
    self.compile_time_s = 0.0

  def __call__(
    self, params, images, n_tasks: int, seed: int, start: int = 0
  ) -> dict:
    """Per-task metrics of tasks ``start, ..., n_tasks - 1`` of the set.

    The set is that of ``n_tasks`` tasks; the first ``start`` are drawn but
    not tested (numpy arrays of length ``n_tasks - start``).
    """
    parts = []
    bar = tqdm.tqdm(
      total=n_tasks - start,
      unit="task",
      desc="test",
      disable=not self._progress,
      leave=False,
      dynamic_ncols=True,
    )
    drawn = 0
    for chunk in self._chunks(self._exp.config, images, n_tasks, seed):
      size = jax.tree.leaves(chunk)[0].shape[0]
      drawn += size
      if drawn <= start:
        continue
      if drawn - size < start:  # The chunk holding task ``start``.
        chunk = jax.tree.map(lambda x, s=start - drawn + size: x[s:], chunk)
      shape = jax.tree.map(lambda x: x.shape, chunk)
      key = jax.tree_util.tree_structure(chunk), tuple(jax.tree.leaves(shape))
      if key not in self._compiled:
        began = time.perf_counter()
        self._compiled[key] = self._fn.lower(params, chunk).compile(
          compiler_options=runtime.compiler_options()
        )
        self.compile_time_s += time.perf_counter() - began
      parts.append(self._compiled[key](params, chunk))
      if self._progress:
        jax.block_until_ready(parts[-1])
        bar.update(jax.tree.leaves(chunk)[0].shape[0])
    bar.close()
    if not parts:
      raise ValueError(f"no tasks from {start} to {n_tasks}")
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


def reported_parameters(best: dict | None) -> str:
  """``"best_validation"`` where a validation took place, else ``"last"``.

  Example:
    >>> reported_parameters({"step": 3}), reported_parameters(None)
    ('best_validation', 'last')
  """
  used = best is not None and int(best["step"]) >= 0
  return "best_validation" if used else "last"


def _tasks_to_reuse(recorded: dict, n_tasks: int, need_last: bool) -> int:
  """How many tasks a recorded test covers, checked against the new one."""
  tested = len(recorded["test_per_task"]["values"])
  if tested > n_tasks:
    raise RecordedTestError(
      f"the recorded test has {tested} tasks, more than the {n_tasks} asked "
      "for; ask for at least as many, or test from scratch."
    )
  if need_last and recorded.get("test_last") is None:
    raise RecordedTestError(
      "the recorded test left out the last parameters (--skip-last); extend "
      "it with --skip-last too, or test from scratch."
    )
  return tested


def _joined(recorded: dict | None, new: dict | None, start: int) -> dict:
  """Pooled summaries of a recorded test and ``new`` per-task metrics."""
  if new is None:
    return recorded
  if recorded is None or start == 0:
    return summarize(new)
  return pool_summaries(recorded, summarize(new))


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
  recorded: dict | None = None,
) -> FinalTest:
  """Tests the last parameters and, if given, the best-validation ones.

  The best-validation parameters are tested only when they come from
  before the last step (otherwise they are the last ones); the reported
  test is theirs whenever a validation took place. ``test_last=False``
  then leaves the last parameters untested, which halves the time of a
  test whose best validation came before the last step.

  ``recorded`` (the ``"test"``, ``"test_last"`` and ``"test_per_task"`` of
  an earlier result on the first ``m <= n_tasks`` of these tasks, with the
  same parameters and adaptation) extends that test: only tasks ``m`` and
  on are tested, and each summary is pooled with the recorded one
  (:func:`pool_summaries`), which is the summary of all ``n_tasks`` up to
  rounding. The recorded tasks are checked to be the first ``m`` of these
  (by fingerprint) before any task is tested.

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
    recorded: an earlier test of the same parameters to extend, or
      ``None`` to test all ``n_tasks``.

  Returns:
    A :class:`FinalTest`.

  Raises:
    RecordedTestError: ``recorded`` has more tasks than ``n_tasks``, other
      tasks than the first ones of these, other metrics, or no test of the
      last parameters where one is asked for.
  """
  test_params = reported_parameters(best)
  earlier_best = test_params == "best_validation" and int(best["step"]) < step
  prefixes = PREFIX_TASK_COUNTS
  start = 0
  if recorded is not None:
    start = _tasks_to_reuse(recorded, n_tasks, earlier_best and test_last)
    prefixes = (*prefixes, start)
  digests = evaluator.fingerprints(images, n_tasks, seed, prefixes)
  if recorded is not None and (
    digests[start] != recorded["test_per_task"]["tasks_sha256"]
  ):
    raise RecordedTestError(
      f"the recorded test's {start} tasks are not the first {start} of "
      f"these {n_tasks} (their fingerprints differ); test from scratch."
    )
  recorded = recorded or {"test": None, "test_last": None}

  def test(params):  # The new tasks' metrics, or None if there are none.
    if start == n_tasks:
      return None
    return evaluator(params, images, n_tasks, seed, start=start)

  params = best["params"] if earlier_best else last_params
  new = test(params)
  summary = _joined(recorded["test"], new, start)
  last = summary
  if earlier_best:
    last = (
      _joined(recorded["test_last"], test(last_params), start)
      if test_last
      else None
    )
  values = [] if start == 0 else recorded["test_per_task"]["values"]
  metric, _ = score_key(summary)
  if new is not None:
    values = [*values, *per_task_record(new, "")["values"]]
  return FinalTest(
    summary,
    last,
    per_task_record(
      {metric: np.asarray(values)}, digests.pop(n_tasks), digests
    ),
    test_params,
    params,
  )
