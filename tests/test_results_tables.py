"""The results the repository shows are what its committed runs say.

* Every ``benchmarks/results/tables*.{md,csv,json}`` is what
  ``benchmarks/tables.py`` writes today from the run directories named in
  its ``command`` (no stale table after a run is re-tested or the script's
  layout changes).
* Every row of the README's Table 2 links its run directory, and each of
  its numbers is that run's: the three measurements (mean, 95% interval and
  the number of test tasks, 3,000 unless the cell gives another), the
  parameters each measurement tested, the budget (meta-steps x tasks per
  meta-step, and the device of the last stretch of training), the paper's
  number for the run's setting and algorithm, and the lam a row names.
* ``imaml-eval`` reproduces every published model's committed test under
  the paper's measurement and ours, task by task on the first 20 tasks
  (needs Omniglot in ``$IMAML_OMNIGLOT_DIR``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
README = REPO / "README.md"
README_TABLE_HEADER = (
  "| setting | row | budget, device | paper's measurement | paper | ours "
  "| authors' | file |"
)
COLUMNS = (
  "setting",
  "row",
  "budget",
  "paper_measurement",
  "paper",
  "ours",
  "authors",
  "file",
)
# The README's cells state this many test tasks unless they give another.
DEFAULT_TEST_TASKS = 3000
# A measurement's column: (key prefix in ``tables.read_run``, result file of
# ``imaml-eval``, protocol name, parameters it tests).
MEASUREMENTS = {
  "paper_measurement": (
    "measured_paper_",
    "eval_protocol=paper.json",
    "paper",
    "best_validation",
  ),
  "ours": ("", None, "ours", "best_validation"),
  "authors": ("authors_", "eval_protocol=authors.json", "authors", "last"),
}
CELL = re.compile(
  r"\**(?P<mean>\d+\.\d\d) ± (?P<ci>\d+\.\d\d)\**(?: \((?P<n>[\d,]+)\))?"
)
BUDGET = re.compile(r"([\d,]+) x (\d+)")
DEVICE = re.compile(r"\b(CPU|H100|H200)\b")
RUN_LINK = re.compile(r"^\[run\]\(([^)\s]+)\)")
LAM = re.compile(r"\blam (\d+(?:\.\d+)?)\b")


def import_tables():
  """``benchmarks/tables.py`` as a module (the scripts are not a package)."""
  sys.path.insert(0, str(BENCHMARKS))
  try:
    return importlib.import_module("tables")
  finally:
    sys.path.remove(str(BENCHMARKS))


def markdown_table(text: str, header: str) -> list[dict]:
  """The rows below ``header`` in a markdown page, each a dict keyed by
  ``COLUMNS``; an error names a row with the wrong number of cells."""
  lines = text.splitlines()
  if header not in lines:
    raise AssertionError(f"no table with the header {header!r}")
  rows = []
  for line in lines[lines.index(header) + 2 :]:
    if not line.startswith("|"):
      break
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if len(cells) != len(COLUMNS):
      raise AssertionError(f"{len(cells)} cells, not {len(COLUMNS)}: {line}")
    rows.append(dict(zip(COLUMNS, cells)))
  return rows


def parse_cell(text: str) -> tuple[str, str, int]:
  """``(mean, ci95, test tasks)`` of a cell such as ``**97.55 ± 0.18**
  (6,000)``, the numbers as written."""
  found = CELL.fullmatch(text)
  if found is None:
    raise AssertionError(f"not 'mean ± ci95 [(tasks)]': {text!r}")
  n = found["n"]
  return (
    found["mean"],
    found["ci"],
    DEFAULT_TEST_TASKS if n is None else int(n.replace(",", "")),
  )


def test_parse_cell():
  assert parse_cell("**98.65 ± 0.19**") == ("98.65", "0.19", 3000)
  assert parse_cell("72.51 ± 0.19 (36,000)") == ("72.51", "0.19", 36000)
  with pytest.raises(AssertionError, match="mean"):
    parse_cell("98.7")


def readme_rows() -> list[dict]:
  return markdown_table(README.read_text(), README_TABLE_HEADER)


def test_readme_table_has_rows():
  assert len(readme_rows()) >= 10


def committed_tables() -> list[Path]:
  return sorted(RESULTS.glob("tables*.json"))


def test_some_tables_are_committed():
  assert {p.name for p in committed_tables()} >= {"tables_cpu.json"}


@pytest.mark.parametrize("table", committed_tables(), ids=lambda p: p.stem)
def test_committed_table_is_what_its_runs_say(table, tmp_path, monkeypatch):
  """Re-runs the ``tables.py`` command a committed table records (reading
  only, no training and no tests) and compares what it writes."""
  committed = json.loads(table.read_text())
  argv = shlex.split(committed["command"])
  assert argv[0] == "benchmarks/tables.py", committed["command"]
  args = argv[1:]
  assert "--train" not in args and "--eval" not in args, (
    f"{table.name}: its command trains or tests; re-run it, then commit "
    "a command that only reads"
  )
  args[args.index("--out") + 1] = str(tmp_path)
  monkeypatch.chdir(REPO)
  import_tables().main(args)
  for suffix in (".md", ".csv"):
    written = (tmp_path / table.with_suffix(suffix).name).read_text()
    assert written == table.with_suffix(suffix).read_text(), (
      f"{table.with_suffix(suffix).name} is stale: re-run "
      f"`python {committed['command']}`"
    )
  rewritten = json.loads((tmp_path / table.name).read_text())
  assert rewritten["rows"] == committed["rows"], f"{table.name} is stale"


def run_directory(row: dict) -> Path:
  """The run a README row links first in its ``file`` column."""
  link = RUN_LINK.match(row["file"])
  assert link, f"the row {row['row']!r} does not link its run first"
  path = REPO / link[1]
  assert (path / "results.json").is_file(), f"{path} has no results.json"
  return path


@pytest.fixture(scope="module")
def tables():
  return import_tables()


@pytest.mark.parametrize(
  "row", readme_rows(), ids=lambda r: f"{r['setting']}: {r['row']}"
)
def test_readme_table_row_is_its_runs(row, tables):
  run = run_directory(row)
  results = json.loads((run / "results.json").read_text())
  config = results["config"]
  entry = tables.read_run(run)

  # The setting and the algorithm, hence the paper's number.
  name = re.fullmatch(r"omniglot_(\d+w\d+s)_(\w+)", config["name"])
  assert name, config["name"]
  setting, algorithm = name.groups()
  assert setting == f"{config['n_way']}w{config['k_shot']}s"
  assert row["setting"] == tables.SETTING_TITLES[setting]
  assert row["row"].lower().startswith(tables.ALGORITHMS[algorithm].lower())
  mean, ci95 = tables.PAPER[("omniglot", algorithm)][
    tables.SETTINGS.index(setting)
  ]
  paper = [float(x) for x in row["paper"].split(" ± ")]
  assert paper == [mean, ci95], f"the paper's number is {mean} ± {ci95}"
  for lam in LAM.findall(row["row"]):
    assert config["lam"] == float(lam), f"the run's lam is {config['lam']}"

  # The budget: the run's own stretch last, with its device.
  stretches = BUDGET.findall(row["budget"])
  assert stretches, row["budget"]
  steps, batch = stretches[-1]
  assert int(steps.replace(",", "")) == entry["meta_steps"], (
    f"the run made {entry['meta_steps']} meta-steps"
  )
  assert int(batch) == config["meta_batch"], (
    f"the run's meta-batch is {config['meta_batch']}"
  )
  devices = DEVICE.findall(row["budget"])
  assert devices, f"no device in {row['budget']!r}"
  device = entry["device"].lower()
  if devices[-1] == "CPU":
    assert device.startswith("cpu"), f"the run's device is {device}"
  else:
    assert devices[-1].lower() in device, f"the run's device is {device}"
  if len(stretches) > 1:  # trained on from another run's parameters
    assert len(stretches) == 2 and config["init_from"], row["budget"]
    source = json.loads(
      (REPO / config["init_from"] / "results.json").read_text()
    )
    assert config["init_params"] == "best"
    assert (
      int(stretches[0][0].replace(",", ""))
      == (source["best_validation"]["step"])
    )
    assert int(stretches[0][1]) == source["config"]["meta_batch"]

  # The three measurements.
  for column, (prefix, filename, protocol, params) in MEASUREMENTS.items():
    mean, ci95, n = parse_cell(row[column])
    assert (mean, ci95, n) == (
      f"{entry[prefix + 'accuracy']:.2f}",
      f"{entry[prefix + 'ci95']:.2f}",
      entry[prefix + "test_tasks"],
    ), f"{column} of {run.relative_to(REPO)}"
    if filename is None:
      assert entry["test_params"] == params
      continue
    tested = json.loads((run / filename).read_text())
    assert tested["protocol"]["name"] == protocol
    assert tested["test_params"] == params
    assert tested["step"] == entry["meta_steps"], f"{filename} is older"
    assert not tested["test_time_overrides"]


def published_runs() -> list[Path]:
  """The run directories of the models ``docs/models.md`` publishes."""
  from test_repository import models_page

  published, _ = models_page()
  return sorted(REPO / Path(path).parent.parent for path in published)


def test_some_models_are_published():
  assert published_runs()


def differing_tasks(a: list[float], b: list[float], step: float) -> list[int]:
  """Indices of the tasks whose scores differ; a score that moved by more
  than ``step`` (one query image) counts twice, so that it alone exceeds a
  tolerance of one task."""
  assert len(a) == len(b)
  out = []
  for i, (x, y) in enumerate(zip(a, b)):
    if abs(x - y) > 1e-6:
      out += [i] if abs(x - y) <= step + 1e-6 else [i, i]
  return out


def test_differing_tasks():
  assert differing_tasks([1.0, 0.8], [1.0, 0.8], 0.2) == []
  assert differing_tasks([1.0, 0.8], [1.0, 0.6], 0.2) == [1]
  assert differing_tasks([1.0, 0.8], [0.6, 0.8], 0.2) == [0, 0]


# (protocol, the committed result file it reproduces).
REPRODUCED = [("paper", "eval_protocol=paper.json"), ("ours", "eval.json")]
REPRODUCED_TASKS = 20


@pytest.mark.parametrize(
  "protocol, filename", REPRODUCED, ids=[p for p, _ in REPRODUCED]
)
@pytest.mark.parametrize(
  "run", published_runs(), ids=lambda p: str(p.relative_to(REPO))
)
def test_published_model_reproduces_its_first_test_tasks(
  run, protocol, filename, tmp_path
):
  """``imaml-eval`` on a copy of a published model's run scores its first
  20 test tasks as the committed result does, task by task: one task may
  differ by one query image (a prediction on the edge of a tie can round
  either way on another CPU), no more."""
  data_dir = os.environ.get("IMAML_OMNIGLOT_DIR")
  if not data_dir:
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  from imaml_jax.train import cli

  committed = json.loads((run / filename).read_text())
  assert committed["test_params"] == "best_validation"
  copy = tmp_path / run.name
  copy.mkdir()
  for name in ("config.json", "results.json"):
    shutil.copy(run / name, copy / name)
  shutil.copytree(run / "checkpoints", copy / "checkpoints")
  code = cli.eval_main(
    [
      "--workdir",
      str(copy),
      "--tasks",
      str(REPRODUCED_TASKS),
      "--protocol",
      protocol,
      "--skip-last",
      "--no-progress",
    ]
  )
  assert code == 0
  tested = json.loads((copy / filename).read_text())
  assert tested["step"] == committed["step"]
  assert tested["best_validation"] == committed["best_validation"]
  queries = (
    committed["protocol"]["q_query"]
    * json.loads((run / "config.json").read_text())["n_way"]
  )
  expected = committed["test_per_task"]["values"][:REPRODUCED_TASKS]
  got = tested["test_per_task"]["values"]
  differ = differing_tasks(got, expected, 1 / queries)
  assert len(differ) <= 1, (
    f"{run.relative_to(REPO)} under protocol {protocol}: tasks {differ} "
    f"score {[got[i] for i in differ]}, committed "
    f"{[expected[i] for i in differ]}"
  )
