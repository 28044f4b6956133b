"""Meta-training with periodic validation, checkpoints and a final test.

:func:`train_and_evaluate` is the recipe of a run: set up or resume
(:mod:`.workdir`), compile the training step (:mod:`.steps`), step it while
the periodic actions (:mod:`.periodic`) log, validate, checkpoint and watch
the time budget, test (:mod:`.evaluation`) and write the results. Where the
steps run is :mod:`.runtime`'s concern; testing a finished run under another
protocol is :mod:`.protocols`'. ``docs/guides/training_layout.md`` walks
through the modules.

Example:
  >>> from imaml_jax.train import config as config_lib, train
  >>> cfg = config_lib.apply_overrides(config_lib.get_config("sinusoid"),
  ...                                  ["meta_steps=20"])
  >>> results = train.train_and_evaluate(cfg, "/tmp/run")  # doctest: +SKIP
  >>> results["test"]["loss_after"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np
import tqdm

import imaml_jax as im
from imaml_jax.train import config as config_lib
from imaml_jax.train import evaluation
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import periodic
from imaml_jax.train import protocols
from imaml_jax.train import runtime
from imaml_jax.train import steps as steps_lib
from imaml_jax.train import workdir as workdir_lib

# Names that scripts import from this module; each lives where its job is.
from imaml_jax.train.evaluation import Evaluator
from imaml_jax.train.evaluation import summarize
from imaml_jax.train.periodic import TrainingDiverged
from imaml_jax.train.protocols import EVAL_PROTOCOLS
from imaml_jax.train.protocols import EVAL_SPLITS
from imaml_jax.train.protocols import evaluate_workdir
from imaml_jax.train.protocols import format_test
from imaml_jax.train.runtime import DeviceError
from imaml_jax.train.runtime import compiler_options
from imaml_jax.train.runtime import make_mesh
from imaml_jax.train.steps import init_sums
from imaml_jax.train.steps import make_train_step
from imaml_jax.train.steps import metric_shapes
from imaml_jax.train.workdir import CONFIG_FILE
from imaml_jax.train.workdir import WorkdirError
from imaml_jax.train.workdir import load_run
from imaml_jax.train.workdir import with_added_metrics

__all__ = [
  # The recipe and its parts.
  "STATISTICS",
  "budget_record",
  "compile_step",
  "results_record",
  "start_or_resume",
  "train_and_evaluate",
  # Importable from here as before the modules were split.
  "CONFIG_FILE",
  "DeviceError",
  "EVAL_PROTOCOLS",
  "EVAL_SPLITS",
  "Evaluator",
  "TrainingDiverged",
  "WorkdirError",
  "compiler_options",
  "evaluate_workdir",
  "format_test",
  "init_sums",
  "load_run",
  "make_mesh",
  "make_train_step",
  "metric_shapes",
  "summarize",
  "with_added_metrics",
]

STATISTICS = (
  "mean over tasks; ci95 = 1.96 * std / sqrt(n), population std (ddof=0)"
)


def train_and_evaluate(
  config: config_lib.Config,
  workdir: str | os.PathLike,
  data_dir: str | os.PathLike | None = None,
  *,
  mesh=None,
  progress: bool = True,
  log: Callable[[str], None] | None = None,
  time_budget_s: float | None = None,
) -> dict:
  """Meta-trains ``config`` in ``workdir`` (resuming if possible) and tests.

  Args:
    config: the run's config.
    workdir: the work directory (created; an existing run of the same
      config resumes from its latest checkpoint, possibly written on another
      number of devices).
    data_dir: dataset directory; ``None`` uses ``IMAML_OMNIGLOT_DIR`` /
      ``IMAML_MINI_IMAGENET_DIR`` (unused for sinusoid).
    mesh: the devices to train on (:func:`runtime.make_mesh`); ``None`` for
      all devices of all processes.
    progress: show a tqdm progress bar (process 0 only).
    log: where status lines go (default: ``tqdm.write``); only process 0
      logs.
    time_budget_s: stop meta-training once this invocation has trained for
      this many seconds (compilation, validation and checkpoints not
      counted), then validate, checkpoint and test as at the last step.
      Running the same command again resumes towards ``config.meta_steps``.
      ``None``: no limit.

  Returns:
    The results dict also written to ``workdir/results.json``.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: bad request,
      raised before anything is written; also a work directory another
      process is training in.
    TrainingDiverged: ``max_consecutive_skips`` consecutive meta-steps were
      skipped for a non-finite meta-gradient.
  """
  clock = periodic.Clock()
  _check_request(config, time_budget_s)
  mesh = runtime.make_mesh(config) if mesh is None else mesh
  lead = runtime.is_lead()
  lock = workdir_lib.RunLock(workdir, enabled=lead)
  try:
    return _train_and_evaluate(
      config, workdir, data_dir, mesh, progress, log, time_budget_s, clock, lock
    )
  finally:
    lock.release()


def _train_and_evaluate(
  config, workdir, data_dir, mesh, progress, log, time_budget_s, clock, lock
) -> dict:
  """:func:`train_and_evaluate` under the run's ``lock``, which the caller
  releases."""
  lock.acquire_existing()  # A run another process trains is refused.
  workdir, data_dir, latest = workdir_lib.prepare(
    config, workdir, data_dir, mesh
  )
  lead = runtime.is_lead()
  log = (log or tqdm.tqdm.write) if lead else (lambda _: None)
  exp = exp_lib.build_experiment(config, data_dir)
  loop, select, clock.elapsed_before, origin = start_or_resume(exp, latest, log)
  start_step = loop.step

  # Everything is checked; from here on the work directory is written.
  lock.acquire_to_write(latest)
  metrics = workdir_lib.open_run(workdir, config, start_step, lead)
  if origin is not None and origin["params"] == "state":
    workdir_lib.copy_trunk_metrics(origin["workdir"], start_step, metrics)
  origin = workdir_lib.record_origin(workdir, origin, lead)
  loop.state, loop.sums, train_data, loop.base_key = im.replicate(
    (loop.state, loop.sums, exp.data.train, loop.base_key), mesh
  )
  exp = exp._replace(data=exp.data._replace(train=None))  # Frees the copy.
  loop.best = dict(loop.best, params=jax.device_put(loop.best["params"]))
  step_fn, compile_time = compile_step(exp, mesh, loop, train_data, log)
  evaluator = evaluation.Evaluator(exp)
  actions = [  # Run in this order after every step.
    periodic.TimeBudget(time_budget_s, config.log_every, clock, log),
    periodic.WindowLog(config.log_every, metrics, mesh, loop),
    periodic.ProgressBar(loop, progress and lead),
    periodic.DivergenceGuard(config.log_every, config.max_consecutive_skips),
    periodic.Validation(config, evaluator, exp.data.val, select, metrics, log),
    periodic.Checkpointing(
      config, workdir / workdir_lib.CHECKPOINT_DIR, metrics, clock, lead
    ),
  ]
  periodic.run_loop(step_fn, train_data, loop, actions, clock)
  train_time = clock.trained_s()

  outcome = evaluation.final_test(
    evaluator,
    exp.data.test,
    config.test_tasks,
    config.test_seed,
    last_params=runtime.first_replica(loop.state.params),
    step=loop.step,
    best=loop.best,
  )
  results = results_record(
    exp,
    loop,
    outcome,
    select[0],
    budget_record(
      loop,
      start_step,
      latest is not None,
      clock,
      train_time,
      compile_time,
      evaluator.compile_time_s,
      mesh,
    ),
    origin,
  )
  if lead:
    workdir_lib.write_json(workdir / workdir_lib.RESULTS_FILE, results)
    workdir_lib.write_plots(workdir, exp, outcome.params)
  log(protocols.format_test(results))
  return results


def _check_request(
  config: config_lib.Config, time_budget_s: float | None
) -> None:
  if time_budget_s is not None and not time_budget_s > 0:
    raise config_lib.ConfigError(
      f"time_budget_s must be positive, got {time_budget_s!r}."
    )
  config_lib.check_training(config)


def start_or_resume(
  exp: exp_lib.Experiment, latest, log: Callable[[str], None]
):
  """The loop's first state: fresh, or restored from checkpoint ``latest``.

  A fresh run starts from a new initialisation, or with ``init_from`` from
  another run's parameters (:func:`workdir.initial_parameters`), or with
  ``init_params="state"`` from its whole training state
  (:func:`workdir.branch`).

  Returns:
    ``(loop, select, elapsed_before, origin)``: the
    :class:`periodic.LoopState` (on the host), the model-selection
    ``(metric, higher_is_better)``, the wall seconds the run took before
    this invocation, and where a fresh run's parameters came from (``None``
    when resuming or freshly initialised).
  """
  config = exp.config
  init, _ = im.make_meta_step(
    exp.loss, exp.optimizer, exp.algorithm, has_aux=True
  )
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  params, origin = exp.init_params(init_key), None
  if latest is None and config.init_from:
    params, origin = workdir_lib.initial_parameters(config, params)
  state = init(params)
  shapes = steps_lib.metric_shapes(exp, state, base_key)
  sums = steps_lib.init_sums(shapes)
  # A host copy: the device buffers of ``state`` are donated to each step.
  best = {
    "params": runtime.to_host(state.params),
    "score": np.float64(np.nan),
    "step": np.int64(-1),
  }
  step, elapsed_before = 0, 0.0
  if latest is not None:
    step, state, sums, best, base_key, elapsed_before = workdir_lib.restore(
      latest, config, state, sums, best
    )
    log(f"Resuming from {latest} (step {step}).")
  elif origin is not None and origin["params"] == "state":
    step, state, best, base_key, elapsed_before = workdir_lib.branch(
      origin, state, best
    )
  if origin is not None:
    log(_origin_line(origin))
  workdir_lib.check_same_start(step)
  loop = periodic.LoopState(
    step=step,
    state=state,
    sums=sums,
    best=best,
    base_key=base_key,
    meta_steps=config.meta_steps,
  )
  return loop, evaluation.score_key(shapes), elapsed_before, origin


def _origin_line(origin: dict) -> str:
  """The status line of a run starting from another run's checkpoint."""
  if origin["params"] != "state":
    return (
      f"Starting from {origin['workdir']}: its {origin['params']} "
      f"parameters (meta-step {origin['step']})."
    )
  changed = ", ".join(origin["changed"]) or "nothing"
  return (
    f"Branching from {origin['workdir']} at meta-step {origin['step']}: "
    f"its parameters, optimizer state and task stream; changed: {changed}."
  )


def compile_step(
  exp: exp_lib.Experiment,
  mesh,
  loop: periodic.LoopState,
  train_data,
  log: Callable[[str], None],
):
  """``(step_fn, compile_seconds)``; ``(None, 0.0)`` if no step is left."""
  if loop.done:
    return None, 0.0
  step_fn, seconds = steps_lib.compile_train_step(
    steps_lib.make_train_step(exp, mesh),
    mesh,
    loop.state,
    loop.sums,
    train_data,
    loop.base_key,
  )
  log(
    f"{exp.config.name}: {exp.algorithm.name} on {mesh.size} "
    f"{runtime.device_name(mesh)} device(s); train step compiled in "
    f"{seconds:.1f} s."
  )
  return step_fn, seconds


def budget_record(
  loop: periodic.LoopState,
  start_step: int,
  resumed: bool,
  clock: periodic.Clock,
  train_time_s: float,
  compile_time_s: float,
  eval_compile_time_s: float,
  mesh,
) -> dict:
  """The ``"budget"`` entry of the results: steps, times, devices."""
  counts = runtime.to_host(
    {"step": loop.state.step, "skipped": loop.state.skipped}
  )
  steps_done = loop.step - start_step
  return {
    "meta_steps": int(counts["step"]),
    "meta_steps_this_run": steps_done,
    "meta_steps_target": loop.meta_steps,
    "stopped_by_time_budget": loop.stopped,
    "skipped_steps": int(counts["skipped"]),
    "wall_time_s": clock.elapsed_s(),
    "train_time_s_this_run": train_time_s,
    "compile_time_s": compile_time_s,
    "eval_compile_time_s": eval_compile_time_s,
    "steps_per_s": (steps_done / train_time_s if train_time_s > 0 else None),
    "device": runtime.device_name(mesh),
    "devices": mesh.size,
    "processes": jax.process_count(),
    "resumed_from_step": start_step if resumed else None,
  }


def results_record(
  exp: exp_lib.Experiment,
  loop: periodic.LoopState,
  outcome: evaluation.FinalTest,
  select_key: str,
  budget: dict,
  origin: dict | None = None,
) -> dict:
  """The results of a run (``results.json``).

  ``origin``: with ``init_from``, the run whose parameters this one started
  from (:func:`workdir.initial_parameters`); its meta-steps come on top of
  ``budget``'s.
  """
  best_step = int(loop.best["step"])
  return {
    "config": config_lib.to_dict(exp.config),
    "algorithm": exp.algorithm.name,
    "test": outcome.test,
    "test_last": outcome.test_last,
    "test_per_task": outcome.test_per_task,
    "test_params": outcome.test_params,
    "protocol": protocols.protocol_record(
      "ours", exp.config, "test", exp.eval_algorithm.name, outcome.test_params
    ),
    "test_note": (
      "the best validation was at the last step: test and "
      "test_last are the same parameters"
      if best_step == loop.step
      else None
    ),
    "best_validation": {
      "step": best_step,
      "metric": select_key,
      "score": float(loop.best["score"]),
    },
    "statistics": STATISTICS,
    "budget": budget,
    "initialised_from": origin,
  }
