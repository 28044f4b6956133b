"""Executes notebooks/quickstart.ipynb in place, so it is committed with outputs.

    python notebooks/regenerate.py            # full run (about 2 minutes on a CPU)

Set ``IMAML_OMNIGLOT_DIR`` to draw the Omniglot example from the real test
characters; without it, random images stand in.
"""

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).with_name("quickstart.ipynb")


def main() -> int:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(
    nb,
    timeout=1800,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  ).execute()
  nbformat.write(nb, NOTEBOOK)
  print(f"wrote {NOTEBOOK} with outputs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
