"""Command-line entry points: ``imaml-train`` and ``imaml-eval``.

Usage::

  imaml-train CONFIG --workdir DIR [--data-dir DIR] [--set key=value ...]
              [--time-budget S] [--compile-cache DIR | --no-compile-cache]
              [--devices N] [--coordinator HOST:PORT|auto
              --num-processes P --process-id I]
  imaml-train --list
  imaml-eval --workdir DIR [--data-dir DIR] [--tasks N] [--set key=value ...]
             [--split test|val|train|authors_test]
             [--protocol ours|paper|authors] [--skip-last] [--extend]
             [--overwrite]
             [--compile-cache DIR | --no-compile-cache]
  python -m imaml_jax train ...   # same as imaml-train
  python -m imaml_jax eval ...    # same as imaml-eval

``--data-dir`` defaults to ``$IMAML_OMNIGLOT_DIR`` (Omniglot) or
``$IMAML_MINI_IMAGENET_DIR`` (mini-ImageNet). Compiled steps are kept in
JAX's persistent compilation cache (``$IMAML_CACHE_DIR/xla`` by default), so
running a config again, resuming it, or testing it again, skips most of the
compilation.
Exit codes: 0 done; 2 bad input (unknown config or field, wrong value type
or range, missing data, an ``n_way`` larger than a split, a work directory
holding another run or the records of one whose checkpoints are gone, or
a run another process is training, a corrupt checkpoint, more devices than
there are or fewer than processes, a meta-batch that does not split evenly
over the devices, incomplete multi-host flags; for ``imaml-eval`` a
recorded test of more tasks, without ``--overwrite``),
reported before anything is written; 3 training stopped after too many
consecutive non-finite meta-gradients; 128 + the signal's number (130,
143) stopped by SIGINT (Ctrl-C) or SIGTERM, which ``imaml-train`` answers
with the checkpoint the same command resumes from, ``imaml-eval`` with a
line saying that it wrote nothing.

Devices: the meta-step is data-parallel over ``--devices N`` devices (the
first ``N`` of all processes' devices, spread evenly over the processes;
default: all of them, and on a CPU see below), each sampling
and adapting ``meta_batch / N`` tasks. On a CPU the command first splits the
CPU into one device per core (as many as divide ``meta_batch``; ``--devices
N`` asks for ``N``), unless ``XLA_FLAGS`` sets
``--xla_force_host_platform_device_count``. A run may resume on another
number of devices. Several hosts: start the same command on every host with
``--coordinator HOST:PORT`` (process 0's address), ``--num-processes P`` and
that host's ``--process-id I``, or ``--coordinator auto`` alone where the
cluster is detected (SLURM, Cloud TPU); the work directory must be on a file
system all hosts share, and only process 0 writes to it.

Example:
  >>> train_main(["sinusoid", "--workdir", "/tmp/sin"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import imaml_jax as im
from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import config as config_lib
from imaml_jax.train import evaluation
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import periodic
from imaml_jax.train import protocols
from imaml_jax.train import runtime
from imaml_jax.train import train as train_lib
from imaml_jax.train import workdir as workdir_lib

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
AUTO = "auto"
_INPUT_ERRORS = (
  config_lib.ConfigError,
  exp_lib.DataError,
  workdir_lib.WorkdirError,
  ckpt_lib.CheckpointError,
  runtime.DeviceError,
  evaluation.RecordedTestError,
)


def _fail(prog: str, message: str, code: int) -> None:
  print(f"{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(code)


class Interrupted(BaseException):
  """SIGINT or SIGTERM arrived while a command ran.

  A ``BaseException``, as ``KeyboardInterrupt`` is, so that no handler of
  ordinary errors swallows it on its way out.

  Attributes:
    signum: the signal's number.
  """

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def raise_on_signals():
  """Within, SIGINT and SIGTERM raise :class:`Interrupted`.

  A signal the process ignores (a background job of a script ignores
  SIGINT) stays ignored; outside the main thread nothing changes.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del frame
    raise Interrupted(signum)

  previous = {}
  for signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(signum) is not signal.SIG_IGN:
      previous[signum] = signal.signal(signum, handler)
  try:
    yield
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def interrupted_message(signum: int, workdir: str) -> str:
  """What an interrupted ``imaml-train`` says: where the run stands.

  Example:
    >>> interrupted_message(signal.SIGTERM, "/nonexistent")
    'stopped by SIGTERM before its first checkpoint; the same command starts the run again.'
  """
  name = signal.Signals(signum).name
  found = ckpt_lib.list_checkpoints(
    Path(workdir).expanduser() / workdir_lib.CHECKPOINT_DIR
  )
  if not found:
    return (
      f"stopped by {name} before its first checkpoint; the same command "
      "starts the run again."
    )
  step, latest = found[-1]
  return (
    f"stopped by {name}; the newest checkpoint is {latest} (meta-step "
    f"{step}): the same command resumes from it, and steps trained after "
    "it are trained again."
  )


def eval_interrupted_message(signum: int) -> str:
  """What an interrupted ``imaml-eval`` says.

  The test writes its result file once, at its end, so an interrupted test
  leaves the run directory as it was.

  Example:
    >>> print(eval_interrupted_message(signal.SIGINT))
    stopped by SIGINT before the test ended; nothing was written (a result
    file of an earlier test is as it was); the same command starts the test
    again.
  """
  name = signal.Signals(signum).name
  return (
    f"stopped by {name} before the test ended; nothing was written (a "
    "result file of an earlier test is as it was); the same command starts "
    "the test again."
  )


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
  """``--data-dir``, shared by ``imaml-train`` and ``imaml-eval``."""
  parser.add_argument(
    "--data-dir",
    default=None,
    help="dataset directory (default: $IMAML_OMNIGLOT_DIR "
    "or $IMAML_MINI_IMAGENET_DIR)",
  )


def train_parser(prog: str = "imaml-train") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=prog, description="Meta-train a named config, then test it."
  )
  parser.add_argument(
    "config",
    nargs="?",
    help="config name (see --list), e.g. sinusoid or omniglot_5w1s_imaml_gd",
  )
  parser.add_argument(
    "--workdir",
    help="run directory (resumes if it holds a run of the same config)",
  )
  add_data_dir_argument(parser)
  parser.add_argument(
    "--set",
    dest="overrides",
    action="extend",
    nargs="+",
    default=[],
    metavar="KEY=VALUE",
    help="override a config field, e.g. --set meta_steps=100 meta_batch=4",
  )
  parser.add_argument(
    "--list", action="store_true", help="list the config names and exit"
  )
  parser.add_argument(
    "--no-progress", action="store_true", help="no progress bar"
  )
  parser.add_argument(
    "--time-budget",
    type=float,
    default=None,
    metavar="SECONDS",
    help="stop meta-training after SECONDS of training in "
    "this invocation, checkpoint and test; the same "
    "command resumes later",
  )
  _add_compile_cache_arguments(parser)
  _add_device_arguments(parser)
  return parser


def _add_compile_cache_arguments(parser: argparse.ArgumentParser) -> None:
  """``--compile-cache DIR`` and ``--no-compile-cache``."""
  parser.add_argument(
    "--compile-cache",
    default=None,
    metavar="DIR",
    help="persistent XLA compilation cache: a rerun of "
    "the same step loads it instead of compiling "
    "(default: $IMAML_CACHE_DIR/xla, else "
    "~/.cache/imaml_jax/xla; a cache already set "
    "through JAX's own configuration is kept)",
  )
  parser.add_argument(
    "--no-compile-cache", action="store_true", help="compile every step afresh"
  )


def enable_compile_cache(path: str | None) -> str | None:
  """Points JAX's persistent compilation cache at ``path`` (or the default).

  Leaves a cache directory already configured (``jax.config`` or
  ``JAX_COMPILATION_CACHE_DIR``) untouched. Returns the directory in use.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from imaml_jax import data  # pylint: disable=import-outside-toplevel

  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  directory = str(path or data.default_cache_dir() / "xla")
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("devices and hosts")
  group.add_argument(
    "--devices",
    type=int,
    default=None,
    metavar="N",
    help="train on the first N devices (with several "
    "processes, spread evenly over them), splitting each "
    "meta-batch over them (default: all devices of "
    "all processes; on a CPU, one device per core, as "
    "many as divide meta_batch); meta_batch must be a "
    "multiple of N",
  )
  group.add_argument(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="join a multi-host job whose process 0 listens "
    "at HOST:PORT (give --num-processes and "
    "--process-id too), or 'auto' to detect the "
    "cluster (SLURM, Cloud TPU)",
  )
  group.add_argument(
    "--num-processes",
    type=int,
    default=None,
    metavar="P",
    help="number of processes of the multi-host job",
  )
  group.add_argument(
    "--process-id",
    type=int,
    default=None,
    metavar="I",
    help="this process's index, 0 .. P-1",
  )


def check_device_arguments(args: argparse.Namespace) -> str | None:
  """Checks ``--devices`` and the multi-host flags without touching JAX.

  Returns:
    A message describing the first problem, or ``None``.
  """
  if args.devices is not None and args.devices < 1:
    return f"--devices must be >= 1; got {args.devices}."
  given = {
    "--num-processes": args.num_processes,
    "--process-id": args.process_id,
  }
  if args.coordinator is None:
    extra = [flag for flag, value in given.items() if value is not None]
    if extra:
      return (
        f"{' and '.join(extra)} given without --coordinator; a "
        "multi-host run needs --coordinator HOST:PORT (process 0's "
        "address), --num-processes and --process-id."
      )
    return None
  if args.coordinator == AUTO:
    extra = [flag for flag, value in given.items() if value is not None]
    if extra:
      return (
        f"--coordinator auto detects the cluster; drop "
        f"{' and '.join(extra)}, or give --coordinator HOST:PORT."
      )
    return None
  missing = [flag for flag, value in given.items() if value is None]
  if missing:
    return (
      f"--coordinator {args.coordinator} needs {' and '.join(missing)} too."
    )
  if args.num_processes < 1:
    return f"--num-processes must be >= 1; got {args.num_processes}."
  if not 0 <= args.process_id < args.num_processes:
    return (
      f"--process-id must be in 0..{args.num_processes - 1}; got "
      f"{args.process_id}."
    )
  return None


def join_processes(args: argparse.Namespace) -> None:
  """Joins the multi-host job named by the flags (first JAX call).

  Raises:
    DeviceError: the job cannot be joined or no cluster is detected.
  """
  if args.coordinator is None:
    return
  try:
    if args.coordinator == AUTO:
      im.initialize_distributed()
    else:
      im.initialize_distributed(
        args.coordinator, args.num_processes, args.process_id
      )
  except (ValueError, RuntimeError) as e:
    raise runtime.DeviceError(
      f"cannot join the multi-host job (--coordinator {args.coordinator}): {e}"
    ) from e


def eval_parser(prog: str = "imaml-eval") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=prog,
    description="Test a run's best-validation and last "
    "parameters on the held-out test tasks.",
  )
  parser.add_argument("--workdir", required=True, help="run directory")
  add_data_dir_argument(parser)
  parser.add_argument(
    "--tasks",
    type=int,
    default=None,
    help="number of test tasks (default: the config's)",
  )
  parser.add_argument(
    "--set",
    dest="overrides",
    action="extend",
    nargs="+",
    default=[],
    metavar="KEY=VALUE",
    help="test with another value of a test-time field ("
    f"{', '.join(config_lib.TEST_TIME_FIELDS)}), e.g. "
    "--set eval_inner_steps=32; the result goes to "
    "eval_<KEY>=<VALUE>.json",
  )
  parser.add_argument(
    "--split",
    choices=protocols.EVAL_SPLITS,
    default=None,
    help="characters to draw the tasks from: the held-out "
    "test split (the default of protocol ours), "
    "validation, the meta-training split, or the "
    "authors' test characters (authors_test, the "
    "default of protocol authors); the result goes "
    "to eval_<SPLIT>.json for a split other than the "
    "protocol's",
  )
  parser.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress bar of the tested tasks",
  )
  parser.add_argument(
    "--protocol",
    choices=protocols.EVAL_PROTOCOLS,
    default="ours",
    help="ours (default): held-out characters, the "
    "config's query images per class, the run's own "
    "adaptation, best-validation parameters; "
    "authors (Omniglot): the iMAML authors' "
    "evaluation script, i.e. their test characters "
    "(mostly meta-training ones), K query images per "
    "class, 16 plain SGD steps of 0.1 on the support "
    "loss for iMAML, last parameters; the result "
    "goes to eval_protocol=authors.json; paper "
    "(Omniglot): the tasks that measured the paper's "
    "Table 2 (the authors' test characters, K query "
    "images per class) with the run's own adaptation "
    "and best-validation parameters; the result goes "
    "to eval_protocol=paper.json",
  )
  parser.add_argument(
    "--skip-last",
    action="store_true",
    help="test only the reported parameters: where the best "
    "validation came before the last step, do not test the last "
    "parameters too (half the time; test_last is then null)",
  )
  parser.add_argument(
    "--extend",
    action="store_true",
    help="add tasks to the recorded test in the result file: where it "
    "tested the first M of the --tasks N tasks (same checkpoint, protocol "
    "and settings), test only the N - M new ones and pool them with it, "
    "which gives the test of all N; without such a file, test every task",
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a result file that records a test of more tasks than "
    "this one (refused otherwise, before anything is loaded)",
  )
  _add_compile_cache_arguments(parser)
  return parser


def train_main(
  argv: Sequence[str] | None = None, prog: str = "imaml-train"
) -> int:
  """``imaml-train``: returns 0, or raises ``SystemExit`` with the code."""
  args = train_parser(prog).parse_args(argv)
  if args.list:
    print("\n".join(config_lib.config_names()))
    return 0
  if not args.config:
    _fail(
      prog,
      "a config name is required; valid configs: "
      f"{', '.join(config_lib.config_names())}.",
      EXIT_BAD_INPUT,
    )
  if not args.workdir:
    _fail(prog, "--workdir is required.", EXIT_BAD_INPUT)
  problem = check_device_arguments(args)
  if problem:
    _fail(prog, problem, EXIT_BAD_INPUT)
  if args.time_budget is not None and not args.time_budget > 0:
    _fail(
      prog,
      f"--time-budget must be positive; got {args.time_budget}.",
      EXIT_BAD_INPUT,
    )
  try:
    _run_stoppably(
      prog,
      lambda: _train(args),
      lambda signum: interrupted_message(signum, args.workdir),
    )
  except periodic.TrainingDiverged as e:
    _fail(prog, str(e), EXIT_DIVERGED)
  return 0


def _run_stoppably(
  prog: str, work: Callable[[], None], stopped: Callable[[int], str]
) -> None:
  """Runs ``work()`` with SIGINT and SIGTERM raising :class:`Interrupted`.

  A signal ends the command with the line ``stopped(signum)`` and exit code
  128 + the signal's number; bad input with its message and exit code 2.
  """
  try:
    with raise_on_signals():
      work()
  except Interrupted as e:
    print(f"{prog}: {stopped(e.signum)}", file=sys.stderr)
    raise SystemExit(128 + e.signum) from None
  except _INPUT_ERRORS as e:
    _fail(prog, str(e), EXIT_BAD_INPUT)


def _train(args: argparse.Namespace) -> None:
  """The work of ``imaml-train`` on checked arguments."""
  config = config_lib.apply_overrides(
    config_lib.get_config(args.config), args.overrides
  )
  if not args.no_compile_cache:
    enable_compile_cache(args.compile_cache)
  runtime.split_cpu(config, args.devices)
  join_processes(args)
  mesh = runtime.make_mesh(config, args.devices)
  train_lib.train_and_evaluate(
    config,
    args.workdir,
    args.data_dir,
    mesh=mesh,
    progress=not args.no_progress,
    time_budget_s=args.time_budget,
  )


def eval_main(
  argv: Sequence[str] | None = None, prog: str = "imaml-eval"
) -> int:
  """``imaml-eval``: returns 0, or raises ``SystemExit`` with the code."""
  args = eval_parser(prog).parse_args(argv)
  if args.tasks is not None and args.tasks < 1:
    _fail(prog, f"--tasks must be >= 1; got {args.tasks}.", EXIT_BAD_INPUT)
  if not args.no_compile_cache:
    enable_compile_cache(args.compile_cache)
  _run_stoppably(prog, lambda: _evaluate(args), eval_interrupted_message)
  return 0


def _evaluate(args: argparse.Namespace) -> None:
  """The work of ``imaml-eval`` on checked arguments."""
  protocols.evaluate_workdir(
    args.workdir,
    args.data_dir,
    n_tasks=args.tasks,
    overrides=args.overrides,
    split=args.split,
    protocol=args.protocol,
    progress=not args.no_progress,
    test_last=not args.skip_last,
    extend=args.extend,
    overwrite=args.overwrite,
  )


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m imaml_jax {train,eval} ...``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"train": train_main, "eval": eval_main}
  if not argv or argv[0] not in commands:
    if argv and argv[0] in ("-h", "--help"):
      print("usage: python -m imaml_jax {train,eval} ...")
      return 0
    _fail(
      "python -m imaml_jax",
      "expected a command, train or eval "
      "(usage: python -m imaml_jax {train,eval} ...).",
      EXIT_BAD_INPUT,
    )
  command = argv[0]
  return commands[command](argv[1:], prog=f"python -m imaml_jax {command}")
