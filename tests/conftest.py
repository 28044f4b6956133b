"""Shared fixtures, and the work that the session starts in the background.

Much of the suite's time is XLA compiling in subprocesses: the benchmarks'
quick runs (``quick_runs``), the multi-device and multi-process runs of
``test_sharding`` and ``test_train_sharded`` and the notebook's kernel
(``test_notebook``). XLA compiles on one core, so these start in the
background when the session starts, two at a time (``_background``), beside
the tests that run in this process. A test module lists its background jobs
in a module-level dict ``BACKGROUND_JOBS = {name: job}``, where
``job(out: Path)`` runs in a worker thread (a fresh folder ``out`` for its
files) and returns what the tests read; its tests get that through the
``background`` fixture. Tests that wait for background work run last
(``pytest_collection_modifyitems``): first those of the modules' jobs, then
those of the quick runs. Everything compiles with the XLA settings of
``fast_compile``.
"""

from concurrent.futures import ThreadPoolExecutor

import fast_compile

fast_compile.use_in_process()  # Before JAX starts its backend.

# pylint: disable=wrong-import-position
import jax
import pytest
import quick_runs


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled (restored afterwards)."""
  with jax.enable_x64(True):
    yield


def _waits_for_background(item) -> int:
  """0: runs in this process only; 1: reads a module's background job;
  2: reads a quick run (the longest jobs, so these go last)."""
  names = getattr(item, "fixturenames", ())
  return 2 if "quick_run" in names else 1 if "background" in names else 0


def pytest_collection_modifyitems(items):
  """Tests that wait for background work go last (a stable sort: each
  module's tests stay together and in order)."""
  items.sort(key=_waits_for_background)


def _modules_with_jobs(items) -> list:
  """The modules of the selected tests that wait for a background job."""
  modules = []
  for item in items:
    module = getattr(item, "module", None)
    jobs = getattr(module, "BACKGROUND_JOBS", None)
    if (
      isinstance(jobs, dict)
      and _waits_for_background(item) == 1
      and module not in modules
    ):
      modules.append(module)
  return modules


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory):
  """Starts the background jobs of the selected tests; yields their futures.

  Jobs of test modules go first (their tests run before the quick runs'),
  then the quick runs of the selected ``test_<name>_quick*`` tests.
  """
  items = request.session.items
  jobs = {}
  for module in _modules_with_jobs(items):
    for name, job in module.BACKGROUND_JOBS.items():
      key = f"{module.__name__}.{name}"
      jobs[key] = (job, tmp_path_factory.mktemp(name))
  root = tmp_path_factory.mktemp("quick")
  for name in quick_runs.selected([item.name for item in items]):
    jobs[name] = (quick_runs.job(name), root / name)
  pool = ThreadPoolExecutor(max_workers=2)
  futures = {key: pool.submit(job, out) for key, (job, out) in jobs.items()}
  yield futures, root
  for future in futures.values():
    future.cancel()
  pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def quick_run(_background):
  """``quick_run(name) -> (stdout, out)``: waits for that script's run."""
  futures, root = _background
  return lambda name: (futures[name].result(), root / name)


@pytest.fixture(scope="module")
def background(request, _background):
  """``background(name)``: waits for the job ``name`` of the requesting
  module's ``BACKGROUND_JOBS`` and returns its result (or raises its error)."""
  futures, _ = _background
  prefix = request.module.__name__
  return lambda name: futures[f"{prefix}.{name}"].result()
