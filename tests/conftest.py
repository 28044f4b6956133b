"""Shared fixtures, and the benchmarks' quick runs in the background."""
import inspect

import jax
import pytest

import quick_runs


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled (restored afterwards)."""
  with jax.enable_x64(True):
    yield


def _reads_a_quick_run(item) -> bool:
  function = getattr(item, "function", None)
  return (function is not None
          and "quick_run" in inspect.signature(function).parameters)


def pytest_collection_modifyitems(items):
  """The tests that read a quick benchmark run go last, so that the runs,
  started with the session, overlap the rest of the suite."""
  items.sort(key=_reads_a_quick_run)


@pytest.fixture(scope="session", autouse=True)
def quick_run(request, tmp_path_factory):
  """``quick_run(name) -> (stdout, out)``: waits for that script's run.

  The runs of the selected tests start when the session does (none if no
  such test is selected).
  """
  root = tmp_path_factory.mktemp("quick")
  names = quick_runs.selected([item.name for item in request.session.items])
  pool, futures = quick_runs.start(names, root)
  yield lambda name: (futures[name].result(), root / name)
  for future in futures.values():
    future.cancel()
  pool.shutdown(wait=True)
