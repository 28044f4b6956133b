"""Rules about what the repository tracks, and metadata that must agree.

A checkpoint (``*.ckpt``) is tracked only when ``docs/models.md`` lists it:
as a published model, whose file must match the SHA-256 given there, or as
the checkpoint of an unfinished run that a documented command resumes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import imaml_jax

REPO = Path(__file__).resolve().parents[1]
MODELS_PAGE = REPO / "docs" / "models.md"
CKPT_PATH = re.compile(r"`([^`\s]+\.ckpt)`")
SHA256 = re.compile(r"`([0-9a-f]{64})`")


def tracked_checkpoints() -> list[str]:
  """Tracked ``*.ckpt`` paths; skips the test outside a git checkout."""
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  inside = subprocess.run(
    ["git", "rev-parse", "--show-toplevel"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  if inside.returncode != 0 or Path(inside.stdout.strip()).resolve() != REPO:
    pytest.skip(f"{REPO} is not a git checkout (e.g. an unpacked sdist)")
  listed = subprocess.run(
    ["git", "ls-files", "-z", "--", "*.ckpt"],
    cwd=REPO,
    capture_output=True,
    check=True,
  )
  return sorted(p for p in listed.stdout.decode().split("\0") if p)


def sections(text: str) -> dict[str, str]:
  """The page's ``## `` sections by heading."""
  parts = re.split(r"^## +(.+?)\s*$", text, flags=re.MULTILINE)
  return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def models_page() -> tuple[dict[str, str], set[str]]:
  """Published ``{path: sha256}`` and the unfinished runs' paths."""
  page = sections(MODELS_PAGE.read_text(encoding="utf-8"))
  published = {}
  for row in page["Published models"].splitlines():
    paths, digests = CKPT_PATH.findall(row), SHA256.findall(row)
    if paths:
      assert len(paths) == 1 and len(digests) == 1, (
        f"a published row names one checkpoint and one SHA-256: {row}"
      )
      published[paths[0]] = digests[0]
  unfinished = {
    path
    for row in page["Unfinished runs"].splitlines()
    if row.startswith("|")
    for path in CKPT_PATH.findall(row)
  }
  return published, unfinished


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def test_models_page_lists_some_checkpoints():
  published, unfinished = models_page()
  assert published, "docs/models.md lists no published model"
  assert not set(published) & unfinished, (
    "a checkpoint is both published and unfinished: "
    f"{sorted(set(published) & unfinished)}"
  )


def test_every_tracked_checkpoint_is_published_or_unfinished():
  tracked = tracked_checkpoints()
  published, unfinished = models_page()
  stray = [p for p in tracked if p not in published and p not in unfinished]
  assert not stray, (
    f"{len(stray)} tracked checkpoint(s) are neither a published model nor "
    "an unfinished run in docs/models.md; list them there (with the "
    f"command that resumes the run) or `git rm` them: {stray}"
  )


def test_published_checkpoints_match_their_sha256():
  tracked = set(tracked_checkpoints())
  published, _ = models_page()
  for path, digest in published.items():
    assert path in tracked, f"published model {path} is not tracked"
    assert sha256_of(REPO / path) == digest, (
      f"{path} differs from the SHA-256 in docs/models.md"
    )


def test_unfinished_runs_listed_are_tracked():
  tracked = set(tracked_checkpoints())
  _, unfinished = models_page()
  gone = sorted(unfinished - tracked)
  assert not gone, (
    f"docs/models.md lists unfinished runs whose checkpoint is not "
    f"tracked (finished or removed? update the page): {gone}"
  )


def test_citation_version_is_the_package_version():
  citation = (REPO / "CITATION.cff").read_text(encoding="utf-8")
  found = re.search(
    r"^version:\s*\"?([^\"\s]+)\"?\s*$", citation, flags=re.MULTILINE
  )
  assert found, "CITATION.cff has no version"
  assert found.group(1) == imaml_jax.__version__


def test_changelog_has_the_package_version():
  changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
  assert f"## [{imaml_jax.__version__}]" in changelog
  assert "## [Unreleased]" in changelog
