"""Meta-training and evaluation on top of the imaml_jax core.

Named configs for the paper's experiments (:mod:`.config`), the training
recipe (:mod:`.train`) with its steps (:mod:`.steps`), periodic actions
(:mod:`.periodic`), evaluation (:mod:`.evaluation`, :mod:`.protocols`), work
directory (:mod:`.workdir`) and devices (:mod:`.runtime`), and the
``imaml-train`` / ``imaml-eval`` commands (:mod:`.cli`).

Example:
  >>> from imaml_jax import train
  >>> cfg = train.get_config("sinusoid")
  >>> train.train_and_evaluate(cfg, "runs/sinusoid")  # doctest: +SKIP
"""

from imaml_jax.train.checkpoint import CheckpointError
from imaml_jax.train.config import Config
from imaml_jax.train.config import ConfigError
from imaml_jax.train.config import apply_overrides
from imaml_jax.train.config import config_names
from imaml_jax.train.config import get_config
from imaml_jax.train.evaluation import RecordedTestError
from imaml_jax.train.evaluation import pool_summaries
from imaml_jax.train.evaluation import summarize
from imaml_jax.train.experiment import DataError
from imaml_jax.train.experiment import Experiment
from imaml_jax.train.experiment import build_experiment
from imaml_jax.train.periodic import TrainingDiverged
from imaml_jax.train.protocols import evaluate_workdir
from imaml_jax.train.runtime import DeviceError
from imaml_jax.train.runtime import compiler_options
from imaml_jax.train.runtime import make_mesh
from imaml_jax.train.steps import init_sums
from imaml_jax.train.steps import make_train_step
from imaml_jax.train.steps import metric_shapes
from imaml_jax.train.train import train_and_evaluate
from imaml_jax.train.workdir import CONFIG_FILE
from imaml_jax.train.workdir import WorkdirError
from imaml_jax.train.workdir import load_run

__all__ = [
  "CONFIG_FILE",
  "CheckpointError",
  "Config",
  "ConfigError",
  "DataError",
  "DeviceError",
  "Experiment",
  "RecordedTestError",
  "TrainingDiverged",
  "WorkdirError",
  "apply_overrides",
  "build_experiment",
  "compiler_options",
  "config_names",
  "evaluate_workdir",
  "get_config",
  "init_sums",
  "load_run",
  "make_mesh",
  "make_train_step",
  "metric_shapes",
  "pool_summaries",
  "summarize",
  "train_and_evaluate",
]
