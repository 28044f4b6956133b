"""The work directory of a run: its files, the checks, the restore.

A run lives in one directory::

  DIR/config.json        the resolved config (a resumed run must match it)
  DIR/metrics.jsonl      one JSON object per line: training windows and
                         validations, keyed by "step" and "split"
  DIR/checkpoints/       the newest ``keep_checkpoints`` checkpoints
  DIR/results.json       test results, best validation, budget
  DIR/curves.png         learning curves
  DIR/fits.png           sinusoid only: held-out tasks, true curve, support
                         points, predictions before and after adaptation
  DIR/init_from.json     with ``init_from`` only: the run, checkpoint and
                         step whose parameters this run started from

Everything is checked before anything is written (:func:`prepare`); a run
of the same config resumes from its latest checkpoint (:func:`restore`),
a new one with ``init_from`` starts from another run's parameters
(:func:`initial_parameters`) or branches from its whole state
(:func:`branch`),
also one written before a training metric existed
(:func:`with_added_metrics`). Only process 0 writes (:func:`open_run`),
holding the run's lock (:class:`RunLock`) so that no second process
trains the same run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

try:
  import fcntl
except ImportError:  # Not on Windows: runs there are not locked.
  fcntl = None

import jax
import numpy as np

import imaml_jax as im
from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import config as config_lib
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import metrics_log

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
FITS_FILE = "fits.png"
INIT_FILE = "init_from.json"
CHECKPOINT_DIR = "checkpoints"
# The files only the trainer writes atomically: it drops their temporaries.
TRAINER_FILES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, INIT_FILE)


class WorkdirError(ValueError):
  """The work directory holds a run that does not fit the request."""


class RunLock:
  """Keeps two processes from training in one work directory at once.

  An exclusive lock (``flock``) on the run's ``checkpoints/`` directory,
  held while a process trains there. The operating system drops it when the
  process ends, also when it is killed, so a stopped run leaves nothing to
  clean up. Only the lead process locks (``enabled``); where the file
  system cannot lock, or on a system without ``fcntl``, nothing is locked.

  Args:
    workdir: the work directory.
    enabled: whether this process locks.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.workdir = Path(workdir).expanduser()
    self.enabled = enabled and fcntl is not None
    self._fd = None

  @property
  def held(self) -> bool:
    """Whether this process holds the lock."""
    return self._fd is not None

  def acquire_existing(self) -> None:
    """Locks the run if its directory exists (nothing is created).

    Raises:
      WorkdirError: another process trains in the work directory.
    """
    directory = self.workdir / CHECKPOINT_DIR
    if self.enabled and not self.held and directory.is_dir():
      self._lock(directory)

  def acquire_to_write(self, latest: Path | None) -> None:
    """Locks the run before its directory is first written.

    ``latest`` is the checkpoint the run was checked to resume from; if the
    lock is taken only now, the directory must still hold no newer one.

    Raises:
      WorkdirError: another process trains in the work directory, or did
        until this one took the lock.
    """
    if not self.enabled or self.held:
      return
    directory = self.workdir / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    self._lock(directory)
    if self.held and ckpt_lib.latest_checkpoint(directory) != latest:
      raise WorkdirError(
        f"another process trained in {self.workdir} while this one started "
        "(its newest checkpoint changed); run the command again to resume."
      )

  def _lock(self, directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirError(
        f"workdir {self.workdir} is in use: another process is training "
        "this run. Wait for it to end (or stop it), then run the command "
        "again to resume."
      ) from None
    except OSError:  # The file system cannot lock: go on unlocked.
      os.close(fd)
      self.enabled = False
      return
    self._fd = fd

  def release(self) -> None:
    """Drops the lock, if held."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def read_json(path: Path) -> Any:
  """The JSON value in ``path``; :class:`WorkdirError` if unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f"cannot read {path}: {e}") from e


def _stored_config(path: Path) -> config_lib.Config:
  try:
    return config_lib.from_dict(read_json(path))
  except config_lib.ConfigError as e:
    raise WorkdirError(f"{path}: {e}") from e


def check_workdir(config: config_lib.Config, workdir: Path) -> Path | None:
  """Checks that ``workdir`` is new or holds a run of the same config.

  Returns:
    The latest checkpoint to resume from, or ``None``.

  Raises:
    WorkdirError: the stored config differs (listing the fields) or the
      directory cannot be used.
    CheckpointError: the latest checkpoint is corrupt.
  """
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {workdir} exists and is not a directory.")
  stored_path = workdir / CONFIG_FILE
  if stored_path.exists():
    stored = _stored_config(stored_path)
    diff = config_lib.differences(stored, config)
    if diff:
      lines = "; ".join(
        f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in diff.items()
      )
      raise WorkdirError(
        f"workdir {workdir} holds a run of config {stored.name!r} with "
        f"different settings ({lines}). Use another --workdir, or repeat "
        "the stored config and overrides to resume."
      )
  latest = ckpt_lib.latest_checkpoint(workdir / CHECKPOINT_DIR)
  if latest is not None and not stored_path.exists():
    raise WorkdirError(
      f"workdir {workdir} has checkpoints but no "
      f"{CONFIG_FILE}; refusing to guess its config."
    )
  if latest is None:
    _check_nothing_to_lose(config, workdir, stored_path.exists())
  return latest


def _check_nothing_to_lose(
  config: config_lib.Config, workdir: Path, has_config: bool
) -> None:
  """Refuses a fresh start that would overwrite a run's records.

  A run with no checkpoint starts from step 0, truncating ``metrics.jsonl``
  and later replacing ``results.json``. That is right for a run stopped
  before its first checkpoint was in place (also while validating or
  checkpointing at its step, whose records are already written), whose
  records would be recomputed as they were; it is not for a directory whose
  checkpoints were removed (a finished run, tested or logged past its first
  checkpoint step) or for one holding another program's files of those
  names.

  Raises:
    WorkdirError: naming the files that would be overwritten.
  """
  if not workdir.is_dir():
    return
  metrics = workdir / METRICS_FILE
  tested = [p.name for p in [workdir / RESULTS_FILE] if p.is_file()]
  tested += sorted(p.name for p in workdir.glob("eval*.json"))
  if not has_config:
    found = tested + (
      [METRICS_FILE] if metrics.is_file() and metrics.stat().st_size else []
    )
    if found:
      raise WorkdirError(
        f"workdir {workdir} holds {', '.join(found)} but no {CONFIG_FILE}: "
        "not a run to resume, and training would overwrite them. Use "
        "another --workdir."
      )
    return
  last = max(
    (r["step"] for r in metrics_log.read_records(metrics)), default=None
  )
  # A branch (init_params=state) starts, and logs, at its source's step,
  # recorded once its source's records are copied; before, it is unknown.
  origin = workdir / INIT_FILE
  origin = read_json(origin) if origin.is_file() else {}
  first = origin.get("step", 0) if origin.get("params") == "state" else 0
  start_known = config.init_params != "state" or "step" in origin
  logged_past_checkpoint = (
    start_known
    and last is not None
    and config.checkpoint_every > 0
    and last > first_checkpoint_step(first, config.checkpoint_every)
  )
  if tested or logged_past_checkpoint:
    what = ", ".join(tested) or f"{METRICS_FILE} up to step {last}"
    raise WorkdirError(
      f"workdir {workdir} holds a run's records ({what}) but none of its "
      f"checkpoints in {CHECKPOINT_DIR}/: training would start again from "
      "step 0 and overwrite them. Use another --workdir, or restore the "
      "checkpoints to resume (remove the records to start over)."
    )


def first_checkpoint_step(start: int, every: int) -> int:
  """The first step past ``start`` that a run checkpoints at.

  Its training and validation records are written before its checkpoint,
  so a run killed while validating or checkpointing at that step has logged
  it without having a checkpoint.

  Example:
    >>> first_checkpoint_step(0, 10), first_checkpoint_step(505, 10)
    (10, 510)
  """
  return (start // every + 1) * every


def prepare(
  config: config_lib.Config,
  workdir: str | os.PathLike,
  data_dir: str | os.PathLike | None = None,
  mesh=None,
):
  """Checks the request without writing anything.

  Args:
    config: the run's config.
    workdir: the work directory.
    data_dir: the dataset directory, or ``None`` for the default.
    mesh: if given, ``config.meta_batch`` must split evenly over it.

  Returns:
    ``(workdir, data_dir, latest_checkpoint)``.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointError: with a message.
  """
  config_lib.validate(config)
  if mesh is not None:
    try:
      im.check_divisible(config.meta_batch, mesh)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from e
  data_dir = exp_lib.resolve_data_dir(config, data_dir)
  workdir = Path(workdir).expanduser()
  latest = check_workdir(config, workdir)
  if latest is not None:
    ckpt_lib.check_intact(latest)  # Fails early on a corrupt file.
  elif config.init_from:  # Fails early on a missing or unfit source.
    template = exp_lib.build(config, None).init_params(jax.random.key(0))
    initial_parameters(config, template, workdir)
  return workdir, data_dir, latest


def load_run(workdir: str | os.PathLike):
  """Config and latest checkpoint of a finished or interrupted run.

  Returns:
    ``(config, checkpoint_path)``.

  Raises:
    WorkdirError: no run in ``workdir``.
  """
  workdir = Path(workdir).expanduser()
  path = workdir / CONFIG_FILE
  if not path.is_file():
    raise WorkdirError(f"{workdir} holds no run ({CONFIG_FILE} not found).")
  config = _stored_config(path)
  latest = ckpt_lib.latest_checkpoint(workdir / CHECKPOINT_DIR)
  if latest is None and (workdir / RESULTS_FILE).is_file():
    raise WorkdirError(
      f"{workdir} holds a finished run ({RESULTS_FILE}) whose checkpoints "
      f"were removed ({CHECKPOINT_DIR}/ holds none): restore its last "
      "checkpoint to test it or train from it (docs/models.md, 'Recovering "
      "a removed checkpoint')."
    )
  if latest is None:
    raise WorkdirError(f"{workdir} has no checkpoint yet.")
  return config, latest


def initial_parameters(
  config: config_lib.Config, template, workdir: Path | None = None
):
  """The meta-parameters ``config.init_from``'s run gives this one.

  ``config.init_params`` picks that run's best-validation parameters
  (``"best"``) or those of its latest checkpoint (``"last"``, and
  ``"state"``, whose remaining state :func:`branch` reads), all read from
  its latest checkpoint.

  Args:
    config: this run's config, with ``init_from`` set.
    template: parameters shaped like this run's (e.g. a fresh
      initialisation); every array's shape and dtype must match.
    workdir: this run's work directory, which may not be the source.

  Returns:
    ``(params, record)``: the parameters, structured like ``template``, and
    a JSON-compatible record of where they came from (``workdir``,
    ``checkpoint``, ``params``, ``step``: the meta-step they were taken at,
    ``source_config``, ``source_meta_steps``: the meta-steps the source had
    trained; with ``"state"`` also ``changed``: the settings this run
    changes).

  Raises:
    WorkdirError: no run or no checkpoint at ``init_from``, the source is
      this run's own directory, ``"best"`` asked of a run that never
      validated, or ``"state"`` of a run already at ``config.meta_steps``
      or with another ``seed`` (which a branch could not honour).
    CheckpointError: the source checkpoint is corrupt, or its parameters
      do not fit this run's network (the message names the entry).
  """
  source = Path(config.init_from).expanduser()
  if workdir is not None and source.resolve() == workdir.resolve():
    raise WorkdirError(
      f"init_from={config.init_from!r} is this run's own work directory; "
      "a run resumes from its own checkpoints without init_from."
    )
  source_config, latest = load_run(source)
  if config.init_params == "state" and config.seed != source_config.seed:
    raise WorkdirError(
      f"init_params=state continues {source}'s task stream and state, so "
      f"seed={config.seed} would change nothing; repeat the source's "
      f"seed={source_config.seed}, or use init_params=last for new tasks."
    )
  meta_steps, tree = ckpt_lib.load(latest)
  try:
    if config.init_params == "best":
      stored, step = tree["best"]["params"], int(tree["best"]["step"])
      if step < 0:
        raise WorkdirError(
          f"{source} never validated, so it has no best-validation "
          "parameters; use init_params=last."
        )
    else:
      stored, step = tree["state"]["params"], meta_steps
  except (KeyError, TypeError) as e:
    raise ckpt_lib.CheckpointError(f"{latest} holds no parameters: {e}") from e
  params = ckpt_lib.restore_into(
    template, stored, what=f"init_from {latest} ({config.init_params} params)"
  )
  record = {
    "workdir": str(source),
    "checkpoint": latest.name,
    "params": config.init_params,
    "step": step,
    "source_config": source_config.name,
    "source_meta_steps": meta_steps,
  }
  if config.init_params == "state":
    if meta_steps >= config.meta_steps:
      raise WorkdirError(
        f"{source} is at meta-step {meta_steps}, so init_params=state "
        f"leaves nothing to train with meta_steps={config.meta_steps}; ask "
        "for more meta_steps."
      )
    record["changed"] = changed_settings(source_config, config)
  return params, record


def changed_settings(
  source: config_lib.Config, config: config_lib.Config
) -> list[str]:
  """The settings ``config`` changes from ``source`` (``init_*`` aside)."""
  return sorted(
    k
    for k in config_lib.differences(source, config)
    if k not in ("name", "init_from", "init_params")
  )


def branch(origin: dict, state, best):
  """The training state that ``init_params="state"`` continues from.

  Reads the checkpoint that ``origin`` (:func:`initial_parameters`'
  record) names into templates shaped like this run's: the parameters,
  the outer optimizer's state (its meta-step included),
  the best validation so far and the key of the task stream, so the
  branch meets the tasks the source would have met had it gone on. The
  window of training metrics starts afresh.

  Returns:
    ``(step, state, best, base_key, elapsed_s)``.

  Raises:
    CheckpointError: the source's state does not fit this run's (another
      optimizer or network; the message names the entry).
  """
  latest = Path(origin["workdir"]).expanduser() / CHECKPOINT_DIR
  latest = latest / origin["checkpoint"]
  step, tree = ckpt_lib.load(latest)
  try:
    state, best, base_key, elapsed = _read_loop_state(
      latest, step, tree, state, best
    )
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(
      f"init_params=state cannot continue from it: {e} A branch keeps its "
      "source's outer optimizer and network; change only settings that "
      "keep their shapes, or start afresh with init_params=last."
    ) from e
  return step, state, best, base_key, elapsed


def copy_trunk_metrics(source: str | os.PathLike, step: int, metrics) -> None:
  """Writes the records of run ``source`` up to ``step`` into ``metrics``.

  A branch's log thus starts with the history it shares with its source,
  and its curves show where it left it. Whatever an earlier, killed start
  of the branch wrote is dropped first.
  """
  metrics.truncate(-1)  # Every record has a step >= 0.
  path = Path(source).expanduser() / METRICS_FILE
  for record in metrics_log.read_records(path):
    if record["step"] <= step:
      metrics.write(record)
  metrics.flush()


def check_same_start(step: int) -> None:
  """With several processes, fails unless all resume from the same step."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  try:
    multihost_utils.assert_equal(
      np.int64(step), "processes resume from different checkpoints"
    )
  except AssertionError as e:
    raise WorkdirError(
      f"{e}: every process must see the same work directory (a shared "
      "file system)."
    ) from e


def checkpoint_tree(
  state, sums, best, base_key, config: config_lib.Config, elapsed_s: float
) -> dict:
  """What a checkpoint holds: the loop's state and the run's identity."""
  return {
    "state": state,
    "sums": sums,
    "best": best,
    "base_key": jax.random.key_data(base_key),
    "config": json.dumps(config_lib.to_dict(config), sort_keys=True),
    "elapsed_s": np.float64(elapsed_s),
  }


def with_added_metrics(stored_sums: dict, template: dict) -> dict:
  """``stored_sums`` plus a zero sum for each metric it lacks.

  A checkpoint written before a training metric existed (e.g.
  ``param_norm``) has no running sum for it; the sum starts at zero, which
  is exact at a logging boundary, where the window has just been reset.
  A checkpoint without ``measured`` counts (written when every step
  measured the residual) gets the window's step count for each. Metrics
  the template lacks are left for :func:`checkpoint.restore_into`
  to refuse.
  """
  if not isinstance(stored_sums, dict) or "sums" not in stored_sums:
    return stored_sums
  stored = dict(stored_sums["sums"])
  for name, value in template["sums"].items():
    if name not in stored:
      stored[name] = np.zeros(np.shape(value), np.asarray(value).dtype)
  out = {**stored_sums, "sums": stored}
  if "measured" in template and "measured" not in stored_sums:
    # Written when every counted step measured its occasional metrics.
    count = np.asarray(stored_sums.get("count", 0), np.int32)
    out["measured"] = {k: count for k in template["measured"]}
  return out


def _check_checkpoint_config(
  path: Path, tree: dict, config: config_lib.Config
) -> None:
  try:
    stored = config_lib.from_dict(json.loads(tree["config"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ckpt_lib.CheckpointError(f"{path}: no readable config: {e}") from e
  diff = config_lib.differences(stored, config)
  if diff:
    raise ckpt_lib.CheckpointError(
      f"{path} was written by a run with a different config "
      f"({', '.join(diff)} differ)."
    )


def restore(
  path: Path, config: config_lib.Config, state, sums, best, *, loaded=None
):
  """Loads checkpoint ``path`` into templates shaped like this run's.

  ``loaded`` is the ``(step, tree)`` of :func:`checkpoint.load` when the
  file was read already; it is then not read again.

  Returns:
    ``(step, state, sums, best, base_key, elapsed_s)``.

  Raises:
    CheckpointError: corrupt file, other config, or other shapes.
  """
  step, tree = ckpt_lib.load(path) if loaded is None else loaded
  _check_checkpoint_config(path, tree, config)
  state, best, base_key, elapsed = _read_loop_state(
    path, step, tree, state, best
  )
  try:
    sums = ckpt_lib.restore_into(
      sums, with_added_metrics(tree["sums"], sums), what=f"{path} sums"
    )
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ckpt_lib.CheckpointError):
      raise
    raise ckpt_lib.CheckpointError(f"{path} is incompatible: {e}") from e
  return step, state, sums, best, base_key, elapsed


def _read_loop_state(path: Path, step: int, tree: dict, state, best):
  """``(state, best, base_key, elapsed_s)`` of the checkpoint ``tree`` of
  meta-step ``step``, read into templates ``state`` and ``best``."""
  try:
    state = ckpt_lib.restore_into(state, tree["state"], what=f"{path} state")
    best = ckpt_lib.restore_into(best, tree["best"], what=f"{path} best")
    base_key = jax.random.wrap_key_data(np.asarray(tree["base_key"]))
    elapsed = float(tree["elapsed_s"])
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ckpt_lib.CheckpointError):
      raise
    raise ckpt_lib.CheckpointError(f"{path} is incompatible: {e}") from e
  if int(state.step) != step:
    raise ckpt_lib.CheckpointError(
      f"{path}: header step {step} != state step {int(state.step)}."
    )
  return state, best, base_key, elapsed


class _NoLog:
  """Stands in for the metrics log on processes other than 0."""

  def truncate(self, step: int) -> None:
    del step

  def write(self, record: dict) -> None:
    del record

  def flush(self) -> None:
    pass

  def sync(self) -> None:
    pass


def open_run(workdir: Path, config: config_lib.Config, step: int, lead: bool):
  """Starts writing ``workdir`` for a run resuming at ``step``.

  On the lead process: creates the checkpoint directory (dropping the
  temporary files a killed trainer left there and beside its files in
  ``workdir``), writes the config and opens the
  metrics log; elsewhere nothing is written. Either way the log drops the
  records after ``step``.

  Returns:
    The metrics log (``write``, ``flush``, ``truncate``).
  """
  metrics = _NoLog()
  if lead:
    ckpt_dir = workdir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_lib.remove_stale_temporaries(ckpt_dir)
    ckpt_lib.remove_stale_temporaries(workdir, TRAINER_FILES)
    write_json(
      workdir / CONFIG_FILE, config_lib.to_dict(config), sort_keys=True
    )
    metrics = metrics_log.MetricsLog(workdir / METRICS_FILE)
  metrics.truncate(step)
  return metrics


def record_origin(workdir: Path, origin: dict | None, lead: bool):
  """Where the run's first parameters came from, kept across resumptions.

  A fresh run started from ``init_from`` passes its ``origin`` (written to
  ``INIT_FILE`` on the lead process); a resumed run passes ``None`` and gets
  the stored record back, or ``None`` if it started from a fresh
  initialisation.
  """
  path = workdir / INIT_FILE
  if origin is not None:
    if lead:
      write_json(path, origin)
    return origin
  return read_json(path) if path.is_file() else None


def write_json(path: Path, value: Any, sort_keys: bool = False) -> None:
  """Writes ``value`` as indented JSON, atomically."""
  ckpt_lib.write_atomic(
    path, json.dumps(value, indent=2, sort_keys=sort_keys).encode()
  )


def write_plots(workdir: Path, exp: exp_lib.Experiment, test_params) -> None:
  """The learning curves, and for sinusoid the fits of held-out tasks."""
  from imaml_jax.train import plots  # pylint: disable=import-outside-toplevel

  config = exp.config
  plots.plot_curves(
    workdir / METRICS_FILE,
    workdir / CURVES_FILE,
    title=config.name,
    loss_name=("MSE" if config.dataset == "sinusoid" else "loss"),
  )
  if config.dataset == "sinusoid":
    from imaml_jax.train import fits  # pylint: disable=import-outside-toplevel

    plots.plot_sinusoid_fits(
      fits.fit_curves(exp, test_params, seed=config.test_seed),
      workdir / FITS_FILE,
      title=f"{config.name}: held-out tasks, {config.k_shot} support points",
    )
