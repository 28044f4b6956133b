"""The ``imaml-train`` and ``imaml-eval`` commands the documentation shows
are commands the CLI accepts.

The shell lines of the README, the guides, the models page and
``benchmarks/README.md`` (fenced ``bash`` blocks, indented blocks and
inline code) are parsed as a reader would type them: each flag must be one
of the command's parser, a config name one of the registry, every ``--set``
of ``imaml-train`` a field of that config with a value it accepts, and every
``--set`` of ``imaml-eval`` a test-time field that the run named by
``--workdir`` uses (the committed run's ``config.json`` where the page
names one, else the shipped 5-way 1-shot iMAML-GD config). Nothing is run.
The spans of bare ``KEY=VALUE`` overrides that a page offers for the
shipped iMAML-GD configs apply to them as written.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from imaml_jax.train import cli
from imaml_jax.train import config as config_lib
from imaml_jax.train import protocols

REPO = Path(__file__).resolve().parents[1]
PAGES = [
  REPO / "README.md",
  REPO / "docs" / "guides" / "training_cli.md",
  REPO / "docs" / "guides" / "getting_started.md",
  REPO / "docs" / "guides" / "reproducing_the_paper.md",
  REPO / "docs" / "guides" / "performance.md",
  REPO / "docs" / "guides" / "devices.md",
  REPO / "docs" / "models.md",
  REPO / "benchmarks" / "README.md",
]
FENCED = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
COMMAND = re.compile(r"(?<![\w-])(imaml-train|imaml-eval)(?![\w-])(.*)")
# A value that names what the reader puts there: W, S, N, "...".
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z_]*)$")
# The run the examples' own work directories (runs/o5w1s, ...) hold.
DEFAULT_CONFIG = "omniglot_5w1s_imaml_gd"


def shell_lines(text: str) -> list[str]:
  """The lines a reader could paste: fenced blocks, 4-space indented lines
  and inline code, continuation lines joined, comments dropped."""
  text = re.sub(r"\\\n[ \t]*", " ", text)
  lines = []
  for block in FENCED.findall(text):
    lines += block.splitlines()
  prose = FENCED.sub("", text)
  lines += [line for line in prose.splitlines() if line.startswith("    ")]
  lines += [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
  return [re.split(r"\s#\s", line)[0].strip() for line in lines]


def documented_commands(page: Path) -> list[tuple[str, list[str], dict]]:
  """``(program, arguments, variables)`` of each command of ``page``
  (:func:`is_command`); ``variables`` are the page's ``NAME=value``
  assignments (``W=benchmarks/runs/...``) made before it."""
  found, variables = [], {}
  for line in shell_lines(page.read_text(encoding="utf-8")):
    for piece in re.split(r"&&|;", line):
      assigned = re.fullmatch(r"([A-Z]+)=(\S+)", piece.strip())
      if assigned:
        variables[assigned[1]] = assigned[2]
      match = COMMAND.search(piece)
      if match and is_command(match[1], shlex.split(match[2])):
        found.append((match[1], shlex.split(match[2]), dict(variables)))
  return found


def is_command(program: str, args: list[str]) -> bool:
  """Whether ``program args`` is a command to run rather than a flag named
  in prose (``imaml-eval --protocol paper``): ``imaml-train`` with a config
  name or ``--list``, ``imaml-eval`` with its required ``--workdir``."""
  if program == "imaml-eval":
    return "--workdir" in args
  return bool(args) and (args[0] == "--list" or not args[0].startswith("-"))


def literal(config: config_lib.Config, overrides: list[str]) -> list[str]:
  """The overrides with a placeholder value (``seed=S``, ``init_from=...``)
  left out, or given a stand-in where the field holds text (a path)."""
  out = []
  for item in written(overrides):
    key, _, value = item.partition("=")
    if not PLACEHOLDER.match(value):
      out.append(item)
    elif isinstance(getattr(config, key, None), str):
      out.append(f"{key}=runs/placeholder")
  return out


def written(overrides: list[str]) -> list[str]:
  """The overrides less the "..." that stands for more of them."""
  return [o for o in overrides if o != "..."]


def run_config(workdir: str, variables: dict) -> config_lib.Config:
  """The config of the run in ``workdir``: a committed run's own, else the
  default one."""
  for name, value in variables.items():
    workdir = workdir.replace(f"${name}", value)
  stored = REPO / workdir / "config.json"
  if workdir.startswith("benchmarks/") and stored.exists():
    return config_lib.from_dict(json.loads(stored.read_text()))
  return config_lib.get_config(DEFAULT_CONFIG)


def check_train(args: list[str]) -> None:
  """Parses ``imaml-train args`` and applies its config and overrides.

  Raises:
    SystemExit: the parser refuses a flag or value.
    ConfigError: an unknown config, or an override the config refuses.
  """
  parsed = cli.train_parser().parse_args(args)
  if parsed.list:
    return
  assert parsed.config in config_lib.config_names(), parsed.config
  config = config_lib.get_config(parsed.config)
  fields = set(config_lib.to_dict(config))
  for item in written(parsed.overrides):
    assert item.partition("=")[0] in fields, item
  config_lib.apply_overrides(config, literal(config, parsed.overrides))


def check_eval(args: list[str], variables: dict) -> None:
  """Parses ``imaml-eval args`` and checks its protocol, split and
  test-time overrides against the run it names.

  Raises:
    SystemExit: the parser refuses a flag or value.
    ConfigError: what ``imaml-eval`` would refuse before testing.
  """
  parsed = cli.eval_parser().parse_args(args)
  config = run_config(parsed.workdir, variables)
  overrides = literal(config, parsed.overrides)
  split = protocols.check_protocol(parsed.protocol, parsed.split, overrides)
  assert split in ("test", "val", "train", "authors_test")
  config_lib.apply_test_time_overrides(config, overrides)
  protocols.check_overrides_apply(parsed.protocol, config, overrides)


CASES = [
  pytest.param(
    program,
    args,
    variables,
    id=f"{page.relative_to(REPO)}: {' '.join(args)}",
  )
  for page in PAGES
  for program, args, variables in documented_commands(page)
]


def test_the_pages_show_commands():
  programs = [case.values[0] for case in CASES]
  assert programs.count("imaml-train") >= 20
  assert programs.count("imaml-eval") >= 20


@pytest.mark.parametrize("program, args, variables", CASES)
def test_documented_command_is_accepted(program, args, variables):
  try:
    if program == "imaml-train":
      check_train(args)
    else:
      check_eval(args, variables)
  except SystemExit as error:  # argparse: an unknown flag or value.
    pytest.fail(f"{program} {shlex.join(args)}: refused ({error.code})")
  except config_lib.ConfigError as error:
    pytest.fail(f"{program} {shlex.join(args)}: {error}")


def override_spans(page: Path, section: str, end: str) -> list[str]:
  """The inline spans of only ``KEY=VALUE`` tokens between the headings or
  lines ``section`` and ``end`` of ``page``."""
  text = page.read_text(encoding="utf-8")
  start = text.index(section)
  part = text[start : text.index(end, start)]
  spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", part)]
  return [
    s for s in spans if all(re.fullmatch(r"\w+=\S+", t) for t in s.split())
  ]


@pytest.mark.parametrize(
  "page, section, end",
  [
    (
      "docs/guides/training_cli.md",
      "- The authors' pieces one at a time",
      "- `weight_decay=W`",
    ),
    (
      "docs/guides/reproducing_the_paper.md",
      "## What the authors' code does differently",
      "How the classes are drawn",
    ),
  ],
)
def test_the_authors_pieces_apply_to_the_imaml_configs(page, section, end):
  """The overrides a page gives for switching on one of the authors'
  departures apply to the shipped iMAML-GD configs as written."""
  spans = override_spans(REPO / page, section, end)
  assert spans
  for name in config_lib.config_names():
    if name.startswith("omniglot_") and name.endswith("_imaml_gd"):
      for span in spans:
        try:
          config_lib.apply_overrides(config_lib.get_config(name), span.split())
        except config_lib.ConfigError as error:
          pytest.fail(f"{page}: `{span}` on {name}: {error}")
