"""Meta-training and evaluation on top of the imaml_jax core.

Named configs for the paper's experiments (:mod:`.config`), the training loop
with validation, checkpoints and a final test (:mod:`.train`), and the
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
from imaml_jax.train.experiment import DataError
from imaml_jax.train.train import CONFIG_FILE
from imaml_jax.train.train import DeviceError
from imaml_jax.train.train import TrainingDiverged
from imaml_jax.train.train import WorkdirError
from imaml_jax.train.train import evaluate_workdir
from imaml_jax.train.train import summarize
from imaml_jax.train.train import train_and_evaluate
