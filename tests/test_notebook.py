"""The quick-start notebook: it runs headless, and its committed outputs show
iMAML learning (so a reader of the repository sees the fits)."""

import os
import pathlib
import re

import fast_compile
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def _text_outputs(nb) -> str:
  return "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )


def _execute_quickstart(out: pathlib.Path) -> str:
  """Background job: runs the notebook in its quick mode in a fresh kernel
  (working directory ``out``); returns its text outputs."""
  env = dict(
    os.environ,
    IMAML_NOTEBOOK_QUICK="1",
    MPLBACKEND="Agg",
    XLA_FLAGS=fast_compile.environ()["XLA_FLAGS"],
  )
  for name in ("IMAML_OMNIGLOT_DIR", "IMAML_CACHE_DIR"):
    if os.environ.get(name):  # The kernel runs in out: no relative paths.
      env[name] = os.path.abspath(os.environ[name])
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(out)}},
  ).execute(env=env)
  return _text_outputs(nb)


# Started with the test session (conftest._background).
BACKGROUND_JOBS = {"quickstart": _execute_quickstart}


@pytest.mark.slow
def test_quickstart_notebook_runs(background):
  outputs = background("quickstart")
  assert "relative difference of the two meta-gradients" in outputs
  assert "meta-steps in" in outputs
  assert "held-out query MSE after adaptation" in outputs


def test_committed_notebook_shows_learning():
  """The committed outputs (``python notebooks/regenerate.py``) hold the
  figures and a held-out MSE after adaptation far below the one before."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(images) >= 2, "notebook committed without its figures"
  outputs = _text_outputs(nb)
  before = re.search(r"MSE before adaptation: ([\d.]+)", outputs)
  after = re.search(r"MSE after adaptation:\s+([\d.]+)", outputs)
  assert before and after, "notebook committed without the held-out MSE"
  assert float(after.group(1)) < 0.5
  assert float(after.group(1)) < 0.25 * float(before.group(1))
