"""Command-line entry points: ``imaml-train`` and ``imaml-eval``.

Usage::

  imaml-train CONFIG --workdir DIR [--data-dir DIR] [--set key=value ...]
  imaml-train --list
  imaml-eval --workdir DIR [--data-dir DIR] [--tasks N]
  python -m imaml_jax train ...   # same as imaml-train
  python -m imaml_jax eval ...    # same as imaml-eval

``--data-dir`` defaults to ``$IMAML_OMNIGLOT_DIR`` (Omniglot) or
``$IMAML_MINI_IMAGENET_DIR`` (mini-ImageNet). Exit codes: 0 done; 2 bad
input (unknown config or field, wrong value type, missing data, a work
directory holding another run, a corrupt checkpoint), reported before
anything is written; 3 training stopped after too many consecutive
non-finite meta-gradients.

Example:
  >>> train_main(["sinusoid", "--workdir", "/tmp/sin"])  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from imaml_jax.train import checkpoint as ckpt_lib
from imaml_jax.train import config as config_lib
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import train as train_lib

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
_INPUT_ERRORS = (config_lib.ConfigError, exp_lib.DataError,
                 train_lib.WorkdirError, ckpt_lib.CheckpointError)


def _fail(prog: str, message: str, code: int) -> None:
  print(f"{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(code)


def train_parser(prog: str = "imaml-train") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=prog, description="Meta-train a named config, then test it.")
  parser.add_argument("config", nargs="?",
                      help="config name (see --list), e.g. sinusoid or "
                           "omniglot_5w1s_imaml_gd")
  parser.add_argument("--workdir", help="run directory (resumes if it "
                      "holds a run of the same config)")
  parser.add_argument("--data-dir", default=None,
                      help="dataset directory (default: $IMAML_OMNIGLOT_DIR "
                           "or $IMAML_MINI_IMAGENET_DIR)")
  parser.add_argument("--set", dest="overrides", action="extend", nargs="+",
                      default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set "
                           "meta_steps=100 meta_batch=4")
  parser.add_argument("--list", action="store_true",
                      help="list the config names and exit")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar")
  return parser


def eval_parser(prog: str = "imaml-eval") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=prog, description="Test a run's best-validation and last "
                             "parameters on the held-out test tasks.")
  parser.add_argument("--workdir", required=True, help="run directory")
  parser.add_argument("--data-dir", default=None,
                      help="dataset directory (default: $IMAML_OMNIGLOT_DIR "
                           "or $IMAML_MINI_IMAGENET_DIR)")
  parser.add_argument("--tasks", type=int, default=None,
                      help="number of test tasks (default: the config's)")
  return parser


def train_main(argv: Sequence[str] | None = None,
               prog: str = "imaml-train") -> int:
  """``imaml-train``: returns 0, or raises ``SystemExit`` with the code."""
  args = train_parser(prog).parse_args(argv)
  if args.list:
    print("\n".join(config_lib.config_names()))
    return 0
  if not args.config:
    _fail(prog, "a config name is required; valid configs: "
          f"{', '.join(config_lib.config_names())}.", EXIT_BAD_INPUT)
  if not args.workdir:
    _fail(prog, "--workdir is required.", EXIT_BAD_INPUT)
  try:
    config = config_lib.apply_overrides(config_lib.get_config(args.config),
                                        args.overrides)
    train_lib.train_and_evaluate(config, args.workdir, args.data_dir,
                                 progress=not args.no_progress)
  except _INPUT_ERRORS as e:
    _fail(prog, str(e), EXIT_BAD_INPUT)
  except train_lib.TrainingDiverged as e:
    _fail(prog, str(e), EXIT_DIVERGED)
  return 0


def eval_main(argv: Sequence[str] | None = None,
              prog: str = "imaml-eval") -> int:
  """``imaml-eval``: returns 0, or raises ``SystemExit`` with the code."""
  args = eval_parser(prog).parse_args(argv)
  if args.tasks is not None and args.tasks < 1:
    _fail(prog, f"--tasks must be >= 1; got {args.tasks}.", EXIT_BAD_INPUT)
  try:
    train_lib.evaluate_workdir(args.workdir, args.data_dir,
                               n_tasks=args.tasks)
  except _INPUT_ERRORS as e:
    _fail(prog, str(e), EXIT_BAD_INPUT)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m imaml_jax {train,eval} ...``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"train": train_main, "eval": eval_main}
  if not argv or argv[0] not in commands:
    if argv and argv[0] in ("-h", "--help"):
      print("usage: python -m imaml_jax {train,eval} ...")
      return 0
    _fail("python -m imaml_jax", "expected a command, train or eval "
          "(usage: python -m imaml_jax {train,eval} ...).", EXIT_BAD_INPUT)
  command = argv[0]
  return commands[command](argv[1:], prog=f"python -m imaml_jax {command}")
