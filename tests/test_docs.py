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
  data or take long). A ```` ```text ```` block right after a block that runs
  (blank lines between at most) shows what it prints: such a page runs in a
  fresh Python process with a reader's XLA settings, and the printed words
  must be those, numbers within 1% or half a unit of their last digit.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import fast_compile
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


# A dotted name of the library in code: im.cg, imaml_jax.data.sample_tasks,
# data.sample_tasks, models.omniglot_convnet, train.get_config, ...
LIBRARY_NAME = re.compile(
  r"(?<![\w./-])((?:im|imaml_jax|data|models|train)(?:\.[A-Za-z_]\w*)+)"
)
ALIASES = {
  "im": "imaml_jax",
  "data": "imaml_jax.data",
  "models": "imaml_jax.models",
  "train": "imaml_jax.train",
}
FILE_SUFFIXES = (".py", ".md", ".json", ".jsonl", ".png", ".csv", ".ckpt")
NAMING_PAGES = [
  REPO / "README.md",
  REPO / "CHANGELOG.md",
  REPO / "benchmarks" / "README.md",
  *sorted((REPO / "benchmarks" / "results").glob("*.md")),
  *sorted(DOCS.rglob("*.md")),
]


def code_text(page: Path) -> str:
  """The code of a Markdown page: its fenced blocks and inline code."""
  text = page.read_text(encoding="utf-8")
  fenced = re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, flags=re.M | re.S)
  rest = re.sub(r"^\s*```[^\n]*\n.*?^\s*```", "", text, flags=re.M | re.S)
  return "\n".join([*fenced, *re.findall(r"`([^`\n]+)`", rest)])


def library_object(name: str):
  """The object a dotted name of the library refers to (``None`` if none)."""
  head, *parts = name.split(".")
  path = ALIASES.get(head, head)
  obj = importlib.import_module(path)
  for part in parts:
    if hasattr(obj, part):
      obj, path = getattr(obj, part), f"{path}.{part}"
      continue
    try:
      obj = importlib.import_module(f"{path}.{part}")
    except ImportError:
      return None
    path = f"{path}.{part}"
  return obj


@pytest.mark.parametrize(
  "page", NAMING_PAGES, ids=[str(p.relative_to(REPO)) for p in NAMING_PAGES]
)
def test_library_names_in_code_exist(page):
  """A function, class or module the docs name in code (``im.cg``,
  ``train.get_config``) is one the library has."""
  missing = sorted(
    {
      name
      for name in LIBRARY_NAME.findall(code_text(page))
      if not name.endswith(FILE_SUFFIXES) and library_object(name) is None
    }
  )
  assert not missing, f"{page.relative_to(REPO)} names {missing}"


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


class Block(NamedTuple):
  """A fenced block of a Markdown page."""

  language: str
  line: int  # the first line of its body, counted from 1
  body: str
  skipped: bool  # preceded by the line SKIP_MARK
  adjacent: bool  # only blank lines between it and the block before


def fenced_blocks(page: Path) -> list[Block]:
  """Every fenced block of ``page``, in order."""
  lines = page.read_text(encoding="utf-8").splitlines()
  blocks, i, closed = [], 0, None
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
    adjacent = closed is not None and not any(
      line.strip() for line in lines[closed + 1 : i]
    )
    start, i = i + 1, i + 1
    while i < len(lines) and not lines[i].strip().startswith(fence):
      i += 1
    body = [
      line[len(indent) :] if line.startswith(indent) else line
      for line in lines[start:i]
    ]
    blocks.append(
      Block(
        language,
        start + 1,
        "\n".join(body) + "\n",
        previous == SKIP_MARK,
        adjacent,
      )
    )
    closed = i
    i += 1
  return blocks


def python_blocks(page: Path) -> list[tuple[int, str]]:
  """``(line, code)`` of each ```` ```python ```` block that runs, in order."""
  return [
    (block.line, block.body)
    for block in fenced_blocks(page)
    if block.language == "python" and not block.skipped
  ]


def shown_outputs(page: Path) -> dict[int, str]:
  """``{line: text}``: what the page shows a ```` ```python ```` block print.

  That is the ```` ```text ```` block right after it (nothing but blank
  lines between), keyed by the line of the Python block as
  :func:`python_blocks` gives it.
  """
  blocks = fenced_blocks(page)
  return {
    code.line: text.body
    for code, text in zip(blocks, blocks[1:])
    if code.language == "python"
    and not code.skipped
    and text.language == "text"
    and text.adjacent
  }


NUMBER = re.compile(r"[-+]?(?:\d+(?:\.(\d*))?|\.(\d+))(?:[eE]([-+]?\d+))?")
# Printed numbers agree with the page's within this relative tolerance, or
# half a unit of the page's last digit: the digits depend a little on the
# CPU (the order of XLA's sums).
OUTPUT_RTOL = 0.01


def _numbers_agree(printed: str, shown: str) -> bool:
  match = NUMBER.fullmatch(shown)
  decimals = len(match[1] or match[2] or "")
  unit = 10.0 ** (int(match[3] or 0) - decimals)
  a, b = float(printed), float(shown)
  return abs(a - b) <= OUTPUT_RTOL * max(abs(a), abs(b)) + unit / 2


def output_mismatch(printed: str, shown: str) -> str | None:
  """Where ``printed`` differs from ``shown``, or ``None`` if it does not.

  Both are compared word by word (line breaks and spacing aside); a word's
  numbers may differ as :data:`OUTPUT_RTOL` allows, the rest not at all.
  """
  words, expected = printed.split(), shown.split()
  for word, want in zip(words, expected):
    numbers = [m.group() for m in NUMBER.finditer(word)]
    wanted = [m.group() for m in NUMBER.finditer(want)]
    if NUMBER.sub("#", word) != NUMBER.sub("#", want) or not all(
      map(_numbers_agree, numbers, wanted)
    ):
      return f"{word!r} where the page shows {want!r}"
  if len(words) != len(expected):
    return f"{len(words)} words where the page shows {len(expected)}"
  return None


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


def run_page(page: Path) -> dict[int, str]:
  """Runs the page's blocks in order, in one namespace, in the working
  directory; returns ``{line: what the block printed}``."""
  namespace = {"__name__": f"docs_{page.stem}"}
  printed = {}
  for line, code in python_blocks(page):
    name = f"{page.relative_to(REPO)}:{line}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, name, "exec", dont_inherit=True), namespace)  # noqa: S102
    printed[line] = out.getvalue()
  return printed


def run_page_as_a_user(page: Path, directory: Path) -> dict[int, str]:
  """:func:`run_page` in a fresh Python process in ``directory``, with the
  XLA settings a reader has: without the suite's ``fast_compile.IN_PROCESS``
  code generator, whose rounding the printed digits follow."""
  suite_flags = fast_compile.IN_PROCESS.split()
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
    flag for flag in env.get("XLA_FLAGS", "").split() if flag not in suite_flags
  )
  out = directory / "printed.json"
  result = subprocess.run(
    [sys.executable, __file__, str(page), str(out)],
    cwd=directory,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return {int(k): v for k, v in json.loads(out.read_text()).items()}


@pytest.mark.parametrize(
  "page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES]
)
def test_page_examples_run(page, tmp_path, monkeypatch):
  shown = shown_outputs(page)
  if shown:
    printed = run_page_as_a_user(page, tmp_path)
  else:
    monkeypatch.chdir(tmp_path)
    printed = run_page(page)
  for line, text in shown.items():
    mismatch = output_mismatch(printed[line], text)
    assert mismatch is None, (
      f"{page.relative_to(REPO)}:{line} printed what the text block after "
      f"it does not show: {mismatch}.\nPrinted:\n{printed[line]}"
    )


def test_block_parser(tmp_path):
  page = "\n".join(
    [
      "text",
      "```python",
      "a = 1",
      "```",
      "",
      "```text",
      "1",
      "```",
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
      "text between",
      "```text",
      "2",
      "```",
    ]
  )
  path = tmp_path / "p.md"
  path.write_text(page, encoding="utf-8")
  assert python_blocks(path) == [(3, "a = 1\n"), (18, "b = a + 1\n")]
  assert shown_outputs(path) == {3: "1\n"}


def test_output_comparison():
  assert (
    output_mismatch("loss 0.123, after 4.5e-03", "loss 0.12,\nafter 4.5e-3")
    is None
  )
  assert output_mismatch("loss 0.121", "loss 0.12") is None  # within 1%
  assert output_mismatch("loss 0.20", "loss 0.12") == (
    "'0.20' where the page shows '0.12'"
  )
  assert output_mismatch("7.77188 7.77188", "6.67114 6.67114") is not None
  assert output_mismatch("4.05, after", "3.87, after") is not None
  assert output_mismatch("loss: 0.5", "loss 0.5") is not None
  assert output_mismatch("a b", "a b c") == "2 words where the page shows 3"


if __name__ == "__main__":
  # python tests/test_docs.py PAGE OUT: run_page(PAGE), written to OUT as JSON.
  if len(sys.argv) != 3:
    sys.exit("usage: python tests/test_docs.py PAGE OUT")
  outputs = run_page(Path(sys.argv[1]).resolve())
  Path(sys.argv[2]).write_text(json.dumps(outputs), encoding="utf-8")
