"""The documentation site: API coverage, a strict build, runnable examples.

* Every public name of ``imaml_jax``, ``imaml_jax.data``, ``imaml_jax.models``
  and ``imaml_jax.train`` (the package's ``__all__``, or else the names its
  ``__init__`` imports, submodules aside) is named on an API page under
  ``docs/reference/``.
* Every guide under ``docs/guides/`` is linked from the README and from the
  site's home page.
* ``mkdocs build --strict`` succeeds (warnings are errors).
* Every relative link of the Markdown files (README, docs, benchmarks and
  their results) reaches a file, and its ``#anchor`` a heading of that file
  as GitHub names it (the API pages' anchors are mkdocstrings' own).
* The ```` ```python ```` blocks of the README and of every page under
  ``docs/`` run: the blocks of one page in order, in one namespace, in a
  temporary working directory. A block preceded by the line
  ``<!-- docs-test: skip -->`` is shown but not run (for commands that need
  data or take long).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
API_PAGES = DOCS / "reference"
PACKAGES = (
  "imaml_jax",
  "imaml_jax.data",
  "imaml_jax.models",
  "imaml_jax.train",
)
SKIP_MARK = "<!-- docs-test: skip -->"
FENCE = re.compile(
  r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n`]*)$"
)


def public_names(package: str) -> list[str]:
  """``__all__``, or the non-module, non-private names of the package."""
  module = importlib.import_module(package)
  names = getattr(module, "__all__", None)
  if names is not None:
    return list(names)
  return [
    name
    for name, value in vars(module).items()
    if not name.startswith("_")
    and not inspect.ismodule(value)
    and type(value).__module__ != "__future__"
  ]


def api_text() -> str:
  return "\n".join(
    page.read_text(encoding="utf-8") for page in sorted(API_PAGES.glob("*.md"))
  )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_on_an_api_page(package):
  text = api_text()
  missing = [
    name
    for name in public_names(package)
    if not re.search(rf"(?<![\w.]){re.escape(package)}\.{name}(?!\w)", text)
  ]
  assert not missing, (
    f"public names of {package} absent from docs/reference/*.md (add a "
    f"'::: {package}.NAME' line to the right page): {missing}"
  )


@pytest.mark.parametrize(
  ("index", "prefix"),
  [(REPO / "README.md", "docs/guides/"), (DOCS / "index.md", "guides/")],
  ids=["README.md", "docs/index.md"],
)
def test_every_guide_is_linked_from_the_front_pages(index, prefix):
  text = index.read_text(encoding="utf-8")
  guides = sorted((DOCS / "guides").glob("*.md"))
  assert guides, "no guides under docs/guides/"
  missing = [g.name for g in guides if f"]({prefix}{g.name})" not in text]
  assert not missing, (
    f"guides not linked from {index.relative_to(REPO)} (a reader of that "
    f"page would not find them): {missing}"
  )


def test_site_builds_strictly(tmp_path):
  for module, what in (
    ("mkdocs", "mkdocs"),
    ("material", "mkdocs-material"),
    ("mkdocstrings_handlers.python", "mkdocstrings[python]"),
  ):
    if not _installed(module):
      pytest.skip(f"{what} is not installed (pip install -e '.[docs]')")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "mkdocs",
      "build",
      "--strict",
      "--quiet",
      "--config-file",
      str(REPO / "mkdocs.yml"),
      "--site-dir",
      str(tmp_path / "site"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
  )
  assert result.returncode == 0, (
    f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
  )
  assert (tmp_path / "site" / "index.html").is_file()
  assert (tmp_path / "site" / "reference" / "core" / "index.html").is_file()


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def python_blocks(page: Path) -> list[tuple[int, str]]:
  """``(line, code)`` of each ```` ```python ```` block, in order."""
  lines = page.read_text(encoding="utf-8").splitlines()
  blocks, i = [], 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    fence, indent = match["fence"], match["indent"]
    language = match["info"].strip().split(" ")[0].lstrip(".").lower()
    previous = next(
      (line.strip() for line in reversed(lines[:i]) if line.strip()), ""
    )
    start, i = i + 1, i + 1
    while i < len(lines) and not lines[i].strip().startswith(fence):
      i += 1
    body = [
      line[len(indent) :] if line.startswith(indent) else line
      for line in lines[start:i]
    ]
    if language == "python" and previous != SKIP_MARK:
      blocks.append((start + 1, "\n".join(body) + "\n"))
    i += 1
  return blocks


PAGES = sorted(
  page
  for page in [REPO / "README.md", *DOCS.rglob("*.md")]
  if python_blocks(page)
)


MARKDOWN_PAGES = [
  REPO / "README.md",
  *sorted(DOCS.rglob("*.md")),
  *sorted((REPO / "benchmarks").glob("*.md")),
  *sorted((REPO / "benchmarks" / "results").glob("*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a heading: lower case, punctuation dropped,
  spaces turned into hyphens.

  >>> github_anchor("curvature of `I + H/lam` at the adapted parameters")
  'curvature-of-i--hlam-at-the-adapted-parameters'
  """
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(page: Path) -> set[str]:
  """The anchors of a page's headings; a repeated one gains ``-1``, ``-2``."""
  seen: dict[str, int] = {}
  fenced = False
  for line in page.read_text(encoding="utf-8").splitlines():
    if FENCE.match(line):
      fenced = not fenced
    heading = re.match(r"#{1,6} (.*)", line)
    if heading and not fenced:
      anchor = github_anchor(heading.group(1))
      seen[anchor] = seen.get(anchor, -1) + 1
  return {
    a if n == 0 else f"{a}-{n}"
    for a, count in seen.items()
    for n in range(count + 1)
  }


def test_github_anchor_names_headings_as_github_does():
  assert github_anchor("Table 2's 20-way columns on a GPU") == (
    "table-2s-20-way-columns-on-a-gpu"
  )
  assert github_anchor("training stability over 20,000 meta-steps") == (
    "training-stability-over-20000-meta-steps"
  )


@pytest.mark.parametrize(
  "page", MARKDOWN_PAGES, ids=[str(p.relative_to(REPO)) for p in MARKDOWN_PAGES]
)
def test_relative_links_reach_their_file_and_heading(page):
  text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):
      continue  # http:, https:, mailto:
    path, _, anchor = target.partition("#")
    destination = (page.parent / path) if path else page
    if not destination.exists():
      broken.append(f"{target} (no such file)")
    elif (
      anchor
      and destination.suffix == ".md"
      and destination.parent != API_PAGES
      and anchor not in heading_anchors(destination)
    ):
      broken.append(f"{target} (no such heading)")
  assert not broken, broken


@pytest.mark.parametrize(
  "page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES]
)
def test_page_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"docs_{page.stem}"}
  for line, code in python_blocks(page):
    name = f"{page.relative_to(REPO)}:{line}"
    exec(compile(code, name, "exec", dont_inherit=True), namespace)  # noqa: S102


def test_block_parser(tmp_path):
  page = "\n".join(
    [
      "text",
      "```python",
      "a = 1",
      "```",
      "",
      SKIP_MARK,
      "```python",
      "raise SystemExit",
      "```",
      "```bash",
      "ls",
      "```",
      "- item",
      "    ```python",
      "    b = a + 1",
      "    ```",
      "",
    ]
  )
  path = tmp_path / "p.md"
  path.write_text(page, encoding="utf-8")
  assert python_blocks(path) == [(3, "a = 1\n"), (15, "b = a + 1\n")]
