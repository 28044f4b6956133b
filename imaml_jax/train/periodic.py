"""What the training loop does besides stepping: small periodic actions.

After every meta-step the loop (:func:`run_loop`) calls each action on the
:class:`LoopState`; each action decides whether it is due and does one job:

* :class:`TimeBudget` stops the loop once this invocation has trained for
  its budget;
* :class:`WindowLog` writes the training metrics of each ``log_every``
  window to ``metrics.jsonl`` and starts a new window;
* :class:`ProgressBar` moves the progress bar;
* :class:`DivergenceGuard` stops a run whose meta-steps keep being skipped;
* :class:`Validation` evaluates the parameters every ``val_every`` steps and
  keeps the best ones;
* :class:`Checkpointing` writes a checkpoint every ``checkpoint_every``
  steps.

Every :class:`PeriodicAction` also runs at the last step, whether that is
``meta_steps`` or the step where the time budget ran out. Validation and
checkpointing run off the training clock (:class:`Clock`), so the time
budget and the reported steps per second count training alone.

Example:
  >>> loop = LoopState(step=0, state=None, sums=None, best=None,
  ...                  base_key=None, meta_steps=4)
  >>> class Count(PeriodicAction):
  ...   def run(self, loop):
  ...     print("step", loop.step)
  >>> count = Count(every=3)
  >>> for loop.step in range(1, 5):
  ...   count(loop)
  step 3
  step 4
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import imaml_jax as im
from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import config as config_lib
from imaml_jax.train import evaluation
from imaml_jax.train import runtime
from imaml_jax.train import steps as steps_lib
from imaml_jax.train import workdir as workdir_lib


class TrainingDiverged(RuntimeError):
  """Too many consecutive meta-steps were skipped (non-finite gradients)."""


@dataclasses.dataclass
class LoopState:
  """What the training loop carries from one step to the next.

  Attributes:
    step: the number of meta-steps taken.
    state: the meta-state (replicated over the mesh).
    sums: the running sums of the current logging window.
    best: the best validation: ``{"params", "score", "step"}``.
    base_key: the key the task batches are drawn from.
    meta_steps: the step to train to.
    stopped: whether the time budget stopped the loop at this step.
    window: the latest training record written, if any.
  """

  step: int
  state: Any
  sums: Any
  best: Any
  base_key: Any
  meta_steps: int
  stopped: bool = False
  window: dict | None = None

  @property
  def last(self) -> bool:
    """Whether this is the loop's last step."""
    return self.step == self.meta_steps or self.stopped

  @property
  def done(self) -> bool:
    """Whether the loop has no more steps to take."""
    return self.step >= self.meta_steps or self.stopped


class Clock:
  """The run's wall clock and this invocation's training clock.

  Args:
    elapsed_before: wall seconds of the run before this invocation.
  """

  def __init__(self, elapsed_before: float = 0.0):
    self.wall_start = time.perf_counter()
    self.elapsed_before = elapsed_before
    self.train_start = self.wall_start
    self.aside_s = 0.0

  def start_training(self) -> None:
    """Starts the training clock (at the first step of this invocation)."""
    self.train_start = time.perf_counter()

  def trained_s(self) -> float:
    """Seconds trained in this invocation, time off the clock left out."""
    return time.perf_counter() - self.train_start - self.aside_s

  def elapsed_s(self) -> float:
    """Wall seconds of the run, this invocation's included."""
    return self.elapsed_before + time.perf_counter() - self.wall_start

  @contextlib.contextmanager
  def off_the_clock(self):
    """Time spent inside does not count as training."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.aside_s += time.perf_counter() - start


class PeriodicAction:
  """Runs every ``every`` steps and at the last step (``every`` 0: at the
  last step only). Subclasses implement :meth:`run`.

  Attributes:
    off_the_clock: whether the action's time is left out of the training
      time.
  """

  off_the_clock = False

  def __init__(self, every: int):
    self.every = every

  def due(self, loop: LoopState) -> bool:
    return loop.last or (self.every > 0 and loop.step % self.every == 0)

  def __call__(self, loop: LoopState) -> None:
    if self.due(loop):
      self.run(loop)

  def run(self, loop: LoopState) -> None:
    raise NotImplementedError

  def close(self) -> None:
    """Called once when the loop ends, normally or not."""


class TimeBudget(PeriodicAction):
  """Stops the loop once this invocation has trained ``budget_s`` seconds
  (never if ``budget_s`` is ``None``).

  The budget is checked (with a host sync) every ``log_every`` steps; in a
  single process also at the first step whose dispatch clock passes the
  budget, so a slow step (Hessian-free: 7.7 s on a CPU core) cannot overrun
  it by ``log_every`` steps. Processes of a multi-host job check only on the
  shared schedule and follow process 0's answer, so that all of them stop
  at the same step. Runs before the other actions, which then see whether
  this step is the last.
  """

  def __init__(
    self,
    budget_s: float | None,
    log_every: int,
    clock: Clock,
    log: Callable[[str], None],
  ):
    super().__init__(log_every)
    self.budget_s = budget_s
    self.clock = clock
    self.log = log

  def due(self, loop: LoopState) -> bool:
    if self.budget_s is None:
      return False
    if loop.step % self.every == 0:
      return True
    return jax.process_count() == 1 and self.clock.trained_s() > self.budget_s

  def spent(self, sums) -> bool:
    """Whether the budget is spent, as process 0 sees it (waiting for
    ``sums``, the latest step's, before answering)."""
    trained_s = self.clock.trained_s()
    jax.block_until_ready(sums)
    return runtime.lead_decides(trained_s > self.budget_s)

  def run(self, loop: LoopState) -> None:
    loop.stopped = loop.step < loop.meta_steps and self.spent(loop.sums)
    if loop.stopped:
      self.log(
        f"step {loop.step}: time budget of {self.budget_s:g} s spent; "
        f"stopping before meta_steps={loop.meta_steps} (run the same "
        "command again to resume)."
      )


class WindowLog(PeriodicAction):
  """Writes each window's training record and starts the next window.

  Args:
    every: ``log_every``.
    metrics: the metrics log.
    mesh: the mesh the sums are replicated over.
    loop: the loop as it starts (its skipped steps not yet logged are those
      of its current window).
  """

  def __init__(self, every: int, metrics, mesh, loop: LoopState):
    super().__init__(every)
    self.metrics = metrics
    self.mesh = mesh
    self.skipped_total = int(runtime.to_host(loop.state.skipped)) - int(
      runtime.to_host(loop.sums["skipped"])
    )

  def run(self, loop: LoopState) -> None:
    host_sums = runtime.to_host(loop.sums)
    record = steps_lib.window_record(loop.step, host_sums)
    self.skipped_total += record["skipped"]
    record["skipped_total"] = self.skipped_total
    self.metrics.write(record)
    loop.window = record
    loop.sums = im.replicate(steps_lib.reset_window(host_sums), self.mesh)

  def close(self) -> None:
    self.metrics.flush()


def _postfix(record: dict) -> dict:
  out = {"loss": f"{record.get('loss_after', float('nan')):.4g}"}
  if "accuracy_after" in record:
    out["acc"] = f"{100 * record['accuracy_after']:.2f}%"
  out["skipped"] = record["skipped_total"]
  return out


class ProgressBar(PeriodicAction):
  """A tqdm bar of the steps, with the latest window's loss and skips.

  It counts every step (tqdm redraws at most ten times a second), so a
  slow run shows its pace from the first steps on; the loss and skips
  change with each window written.
  """

  def __init__(self, loop: LoopState, enabled: bool):
    super().__init__(1)
    self.shown = loop.step
    self.window = None
    self.bar = tqdm.tqdm(
      total=loop.meta_steps,
      initial=loop.step,
      unit="step",
      disable=not enabled,
      dynamic_ncols=True,
      smoothing=0.1,
    )

  def run(self, loop: LoopState) -> None:
    # The postfix first: ``update`` draws the bar, which then shows this
    # step's window rather than the one before.
    if loop.window is not None and loop.window is not self.window:
      self.bar.set_postfix(_postfix(loop.window), refresh=False)
      self.window = loop.window
    self.bar.update(loop.step - self.shown)
    self.shown = loop.step

  def close(self) -> None:
    self.bar.close()


class DivergenceGuard(PeriodicAction):
  """Raises :class:`TrainingDiverged` once ``max_skips`` consecutive
  meta-steps were skipped for non-finite meta-gradients."""

  def __init__(self, every: int, max_skips: int):
    super().__init__(every)
    self.max_skips = max_skips

  def run(self, loop: LoopState) -> None:
    skips = loop.window["consecutive_skips"]
    if skips >= self.max_skips:
      raise TrainingDiverged(
        f"stopped at step {loop.step}: the last {skips} meta-steps were "
        "skipped for non-finite meta-gradients (max_consecutive_skips="
        f"{self.max_skips}). Lower inner_lr or meta_lr."
      )


class Validation(PeriodicAction):
  """Evaluates the parameters on the validation tasks; keeps the best.

  Runs every ``config.val_every`` steps and at the last step; never if
  ``val_every`` is 0.

  Args:
    config: the run's config (``val_every``, ``val_tasks``, ``val_seed``).
    evaluator: the run's evaluator.
    images: the validation split.
    select: ``(metric, higher_is_better)`` (:func:`evaluation.score_key`).
    metrics: the metrics log.
    log: where the status line goes.
  """

  off_the_clock = True

  def __init__(
    self,
    config: config_lib.Config,
    evaluator: evaluation.Evaluator,
    images,
    select: tuple[str, bool],
    metrics,
    log: Callable[[str], None],
  ):
    super().__init__(config.val_every)
    self.config = config
    self.evaluator = evaluator
    self.images = images
    self.select_key, self.higher_better = select
    self.metrics = metrics
    self.log = log

  def due(self, loop: LoopState) -> bool:
    return self.every > 0 and super().due(loop)

  def run(self, loop: LoopState) -> None:
    params = runtime.first_replica(loop.state.params)
    summary = evaluation.summarize(
      self.evaluator(
        params, self.images, self.config.val_tasks, self.config.val_seed
      )
    )
    score = summary[self.select_key]["mean"]
    # A non-finite score is neither kept nor recorded as the best.
    improved = math.isfinite(score) and evaluation.improves(
      score, float(loop.best["score"]), self.higher_better
    )
    if improved:
      loop.best = {
        "params": jax.tree.map(jnp.copy, params),
        "score": np.float64(score),
        "step": np.int64(loop.step),
      }
    record = {"step": loop.step, "split": "val"}
    record.update({k: v["mean"] for k, v in summary.items()})
    record["best"] = bool(improved)
    self.metrics.write(record)
    self.log(
      f"step {loop.step}: validation {self.select_key} = {score:.4f}"
      f"{' (best)' if improved else ''}"
    )


class Checkpointing(PeriodicAction):
  """Writes a checkpoint of the loop (lead process only), keeping the
  newest ``config.keep_checkpoints``."""

  off_the_clock = True

  def __init__(
    self,
    config: config_lib.Config,
    directory: Path,
    metrics,
    clock: Clock,
    lead: bool,
  ):
    super().__init__(config.checkpoint_every)
    self.config = config
    self.directory = directory
    self.metrics = metrics
    self.clock = clock
    self.lead = lead

  def run(self, loop: LoopState) -> None:
    if not self.lead:
      return
    elapsed_s = self.clock.elapsed_s()
    self.metrics.sync()
    tree = workdir_lib.checkpoint_tree(
      loop.state, loop.sums, loop.best, loop.base_key, self.config, elapsed_s
    )
    ckpt_lib.save(
      self.directory,
      loop.step,
      runtime.to_host(tree),
      keep=self.config.keep_checkpoints,
    )


def run_loop(
  step_fn: Callable, train_data, loop: LoopState, actions: list, clock: Clock
) -> LoopState:
  """Steps ``loop`` until it is done, calling every action after each step.

  Actions run in order; those ``off_the_clock`` do not count as training
  time. Every action is closed when the loop ends, also by an exception.
  """
  clock.start_training()
  try:
    while not loop.done:
      loop.state, loop.sums = step_fn(
        loop.state, loop.sums, train_data, loop.base_key
      )
      loop.step += 1
      for action in actions:
        aside = action.off_the_clock
        with clock.off_the_clock() if aside else contextlib.nullcontext():
          action(loop)
  finally:
    for action in actions:
      action.close()
  jax.block_until_ready(loop.state)
  return loop
