"""``python -m imaml_jax {train,eval} ...``; see :mod:`imaml_jax.train.cli`."""

import sys

from imaml_jax.train import cli

if __name__ == "__main__":
  sys.exit(cli.main())
