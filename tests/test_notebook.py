"""Executes notebooks/quickstart.ipynb headless so that it never rots."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch, tmp_path):
  monkeypatch.setenv("IMAML_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  for name in ("IMAML_OMNIGLOT_DIR", "IMAML_CACHE_DIR"):
    if os.environ.get(name):   # The kernel runs in tmp_path: no relative paths.
      monkeypatch.setenv(name, os.path.abspath(os.environ[name]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "relative difference of the two meta-gradients" in outputs
  assert "meta-steps in" in outputs
