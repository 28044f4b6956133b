"""The code is clean under the ruff settings of pyproject.toml.

Run as tests so that the suite, and so CI, checks lint and format with
the same command as everything else.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
  exe = shutil.which("ruff")
  command = [exe] if exe else [sys.executable, "-m", "ruff"]
  return subprocess.run(
    [*command, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


@pytest.fixture(scope="module", autouse=True)
def _needs_pyproject():
  if not (ROOT / "pyproject.toml").is_file():
    pytest.skip("not run from a source tree with pyproject.toml")


def test_ruff_check_is_clean():
  result = _ruff("check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
  result = _ruff("format", "--check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout + result.stderr
