"""The examples in the library's docstrings run and print what they show.

The model docstrings are run by test_models (their examples build and run
the conv nets, which takes most of a minute on two cores).
"""

import doctest
import importlib
import pkgutil

import pytest

import imaml_jax

SKIPPED_PACKAGES = ("imaml_jax.models",)


def library_modules():
  names = ["imaml_jax"]
  for info in pkgutil.walk_packages(imaml_jax.__path__, "imaml_jax."):
    if not info.name.startswith(SKIPPED_PACKAGES):
      names.append(info.name)
  return names


def test_the_core_modules_have_examples():
  # A module whose examples vanished would pass the test below unnoticed.
  for name in (
    "imaml_jax._src.inner",
    "imaml_jax._src.adapt",
    "imaml_jax._src.meta_step",
    "imaml_jax.train.config",
  ):
    finder = doctest.DocTestFinder()
    examples = sum(
      len(t.examples) for t in finder.find(importlib.import_module(name))
    )
    assert examples > 0, f"{name} has no docstring examples"


@pytest.mark.parametrize("name", library_modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(
    module,
    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    verbose=False,
  )
  assert result.failed == 0, f"{result.failed} failing example(s) in {name}"
