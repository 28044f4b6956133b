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
* The same for the Table 2 rows of ``docs/guides/reproducing_the_paper.md``
  (each row's run is named here): the leading result of each measurement,
  the paper's number, the budget and device of the 5-way rows, and in the
  20-way table the column's budget, the meta-steps and ``*`` of a run
  stopped before them.
* ``imaml-eval`` reproduces every published model's committed test under
  the paper's measurement and ours, task by task on the first 20 tasks
  (needs Omniglot in ``$IMAML_OMNIGLOT_DIR``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from quick_runs import BENCHMARKS
from quick_runs import import_benchmark
from test_repository import models_page
from test_repository import sections

REPO = Path(__file__).resolve().parents[1]
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
# A cell's result, bold aside: mean ± ci95, then optionally `*` (a run
# stopped before its meta-steps) and the number of test tasks, which may
# open a longer bracket: "96.58 ± 0.38 (600; collapsed near ...)".
LEADING_RESULT = re.compile(
  r"(?P<mean>\d+\.\d\d) ± (?P<ci>\d+\.\d\d)(?P<stopped>\*?)"
  r"(?: \((?P<n>[\d,]+)[;,)])?"
)
BUDGET = re.compile(r"([\d,]+) x (\d+)")
DEVICE = re.compile(r"\b(CPU|H100|H200)\b")
RUN_LINK = re.compile(r"^\[run\]\(([^)\s]+)\)")
LAM = re.compile(r"\blam (\d+(?:\.\d+)?)\b")


@pytest.fixture(scope="module")
def tables():
  return import_benchmark("tables")


def table_rows(text: str, header: str) -> list[list[str]]:
  """The cells of each row under ``header`` in ``text``."""
  lines = text.splitlines()
  assert header in lines, f"no table with the header {header!r}"
  rows = []
  for line in lines[lines.index(header) + 2 :]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
  return rows


def markdown_table(text: str, header: str) -> list[dict]:
  """The rows below ``header`` in a markdown page, each a dict keyed by
  ``COLUMNS``; an error names a row with the wrong number of cells."""
  rows = []
  for cells in table_rows(text, header):
    line = " | ".join(cells)
    assert len(cells) == len(COLUMNS), f"{len(cells)} cells: {line}"
    rows.append(dict(zip(COLUMNS, cells)))
  return rows


def parse_result(text: str, whole: bool) -> tuple[str, str, int, bool]:
  """``(mean, ci95, test tasks, stopped)`` of a cell that starts with
  ``mean ± ci95[*] [(tasks)]`` (bold aside), the numbers as written; with
  ``whole``, the cell must hold nothing else."""
  plain = text.replace("**", "")
  found = LEADING_RESULT.match(plain)
  assert found and (not whole or found.end() == len(plain)), (
    f"not 'mean ± ci95[*] [(tasks)]': {text!r}"
  )
  n = found["n"]
  return (
    found["mean"],
    found["ci"],
    DEFAULT_TEST_TASKS if n is None else int(n.replace(",", "")),
    bool(found["stopped"]),
  )


def test_parse_result():
  assert parse_result("**98.65 ± 0.19**", True) == (
    "98.65",
    "0.19",
    3000,
    False,
  )
  assert parse_result("72.51 ± 0.19 (36,000)", True)[2] == 36000
  assert parse_result("**67.66 ± 0.19* (3,600)**", True)[2:] == (3600, True)
  assert parse_result("**87.80 ± 0.14***", True)[3]
  cell = "96.58 ± 0.38 (600; collapsed near step 14,000)"
  assert parse_result(cell, False)[2] == 600
  for bad, whole in ((cell, True), ("98.7", False)):
    with pytest.raises(AssertionError, match="mean"):
      parse_result(bad, whole)


def readme_rows() -> list[dict]:
  return markdown_table(README.read_text(), README_TABLE_HEADER)


def test_readme_table_has_rows():
  assert len(readme_rows()) >= 10


def committed_tables() -> list[Path]:
  return sorted(RESULTS.glob("tables*.json"))


def test_some_tables_are_committed():
  assert {p.name for p in committed_tables()} >= {"tables_cpu.json"}


@pytest.mark.parametrize("table", committed_tables(), ids=lambda p: p.stem)
def test_committed_table_is_what_its_runs_say(
  table, tables, tmp_path, monkeypatch
):
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
  tables.main(args)
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


@pytest.mark.parametrize(
  "row", readme_rows(), ids=lambda r: f"{r['setting']}: {r['row']}"
)
def test_readme_table_row_is_its_runs(row, tables):
  run = run_directory(row)
  entry, config = run_entry(run, tables)
  setting, algorithm = setting_and_algorithm(config)
  assert row["setting"] == tables.SETTING_TITLES[setting]
  assert row["row"].lower().startswith(tables.ALGORITHMS[algorithm].lower())
  check_paper_number(row["paper"], config, tables)
  for lam in LAM.findall(row["row"]):
    assert config["lam"] == float(lam), f"the run's lam is {config['lam']}"
  check_budget(row["budget"], row["budget"], entry, config)
  for column, (prefix, filename, protocol, params) in MEASUREMENTS.items():
    check_result(row[column], run, prefix, entry, whole=True)
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


# The reproduction page's Table 2 rows and their run directories (under
# benchmarks/), by section and row (the device too where a row name
# repeats); a row of the 20-way table names one run per column.
REPRODUCTION_PAGE = REPO / "docs" / "guides" / "reproducing_the_paper.md"
FIVE_WAY_HEADER = (
  "| row | budget (meta-steps x tasks) | device | paper's measurement "
  "| ours | authors' | paper |"
)
TWENTY_WAY_HEADER = (
  "| row | 20-way 1-shot: 2,000 x 16 | paper | 20-way 5-shot: 1,000 x 16 "
  "| paper |"
)
FIVE_WAY_RUNS = {
  "Table 2, 5-way 1-shot": {
    ("**iMAML, GD, the paper's budget**", "H200"): (
      "runs_gpu_h200/stability_5w1s_constant_eps1e-3_mb32"
    ),
    (
      "**iMAML, GD, the row above trained on with 64 inner steps**",
      "H200, then CPU",
    ): "runs/finetune_5w1s/inner_steps64",
    (
      "iMAML, GD, the row above trained on with 16 inner steps (the control)",
      "H200, then CPU",
    ): "runs/finetune_5w1s/inner_steps16",
    (
      "iMAML, GD, Adam eps 1e-8",
      "H100",
    ): "runs_gpu_h100/omniglot_5w1s_imaml_gd",
    ("iMAML, GD, Adam eps 1e-8", "H200"): (
      "runs_gpu_h200/stability_5w1s_linear_mb32"
    ),
    ("MAML", "CPU"): "runs/omniglot_5w1s_maml",
    ("first-order MAML", "CPU"): "runs/omniglot_5w1s_fomaml",
    ("Reptile (Reptile's inner loop)", "CPU"): "runs/omniglot_5w1s_reptile",
    ("iMAML, GD", "CPU"): "runs/omniglot_5w1s_imaml_gd",
    (
      "iMAML, GD, authors' recipe",
      "CPU",
    ): "runs/omniglot_5w1s_imaml_gd_authors",
    ("iMAML, Hessian-free (20 Newton steps)", "CPU"): (
      "runs/omniglot_5w1s_imaml_hf"
    ),
  },
  "Table 2, 5-way 5-shot": {
    ("MAML", "CPU"): "runs/omniglot_5w5s_maml",
    ("iMAML, GD", "CPU"): "runs/omniglot_5w5s_imaml_gd",
    (
      "iMAML, GD, authors' recipe",
      "CPU",
    ): "runs/omniglot_5w5s_imaml_gd_authors",
  },
}
TWENTY_WAY_RUNS = {  # row: (20-way 1-shot run, 20-way 5-shot run)
  "MAML": ("runs/omniglot_20w1s_maml", "runs/omniglot_20w5s_maml"),
  "first-order MAML": ("runs/omniglot_20w1s_fomaml", None),
  "Reptile": ("runs/omniglot_20w1s_reptile", None),
  "iMAML, GD": ("runs/omniglot_20w1s_imaml_gd", "runs/omniglot_20w5s_imaml_gd"),
  "iMAML, GD, authors' recipe": (
    "runs/omniglot_20w1s_imaml_gd_authors",
    "runs/omniglot_20w5s_imaml_gd_authors",
  ),
  "iMAML, GD, lam 1 (CPU)": ("runs/gap_20w1s/lam1", None),
  "iMAML, GD, lam 0.5 (CPU)": (
    "runs/gap_20w1s/lam0.5",
    "runs/gap_20w5s/lam0.5",
  ),
  "iMAML, Hessian-free": ("runs/omniglot_20w1s_imaml_hf", None),
}
NOT_RUN = ("not run", "not measured")
# The key prefixes of the three measurements in ``tables.read_run``, in the
# pages' column order: the paper's, ours, the authors'.
MEASURED_PREFIXES = ("measured_paper_", "", "authors_")


def run_entry(run: Path, tables) -> tuple[dict, dict]:
  """``tables.read_run``'s entry and the stored config of a run directory.
  A run stopped before it wrote ``results.json`` (the 20-way 1-shot
  Hessian-free cell) is read from its ``imaml-eval`` files and
  ``config.json``."""
  entry = tables.read_run(run)
  if entry is not None:
    return entry, json.loads((run / "results.json").read_text())["config"]
  config = json.loads((run / "config.json").read_text())
  ours = json.loads((run / tables.OURS_EVAL).read_text())
  assert ours["protocol"]["name"] == "ours" and not ours["test_time_overrides"]
  accuracy = ours["test"]["accuracy_after"]
  entry = {
    "accuracy": 100 * accuracy["mean"],
    "ci95": 100 * accuracy["ci95"],
    "test_tasks": accuracy["n"],
    "meta_steps": ours["step"],
    "meta_steps_target": config["meta_steps"],
    "complete": ours["step"] >= config["meta_steps"],
  }
  for prefix, name in tables.PROTOCOL_EVALS.items():
    entry.update(tables.read_protocol_eval(run / name, prefix))
  return entry, config


def check_result(
  text: str,
  run: Path,
  prefix: str,
  entry: dict,
  whole: bool = False,
  marks_stopped: bool = False,
) -> None:
  """A page's cell (``parse_result``) against the run's result under the
  measurement ``prefix`` (as in ``tables.read_run``), and, in a table that
  ``marks_stopped``, its ``*`` against whether the run reached its
  meta-steps."""
  where = f"{run.relative_to(REPO)}, measurement {prefix or 'ours'}"
  mean, ci95, n, stopped = parse_result(text, whole)
  assert (mean, ci95, n) == (
    f"{entry[prefix + 'accuracy']:.2f}",
    f"{entry[prefix + 'ci95']:.2f}",
    entry[prefix + "test_tasks"],
  ), where
  if marks_stopped:
    assert stopped == (not entry["complete"]), (
      f"{where}: '*' must mark exactly the runs stopped before their "
      f"meta-steps ({entry['meta_steps']} of {entry['meta_steps_target']})"
    )


def check_budget(budget: str, device: str, entry: dict, config: dict) -> None:
  """A row's budget (``meta-steps x tasks`` stretches, the run's own last)
  and device (the last of CPU, H100, H200 named) against the run; a first
  stretch is the run it was started from (``init_from``), at that run's
  best validation."""
  stretches = [
    (int(steps.replace(",", "")), int(batch))
    for steps, batch in BUDGET.findall(budget)
  ]
  assert stretches, f"no 'meta-steps x tasks' in {budget!r}"
  assert stretches[-1] == (entry["meta_steps"], config["meta_batch"]), (
    f"the run made {entry['meta_steps']} x {config['meta_batch']}"
  )
  devices = DEVICE.findall(device)
  assert devices, f"no device in {device!r}"
  ran_on = entry["device"].lower()
  if devices[-1] == "CPU":
    assert ran_on.startswith("cpu"), f"the run's device is {ran_on}"
  else:
    assert devices[-1].lower() in ran_on, f"the run's device is {ran_on}"
  if len(stretches) > 1:
    assert len(stretches) == 2 and config["init_from"], budget
    assert config["init_params"] == "best"
    source = json.loads(
      (REPO / config["init_from"] / "results.json").read_text()
    )
    assert stretches[0] == (
      source["best_validation"]["step"],
      source["config"]["meta_batch"],
    ), f"the run started from {config['init_from']}"


def setting_and_algorithm(config: dict) -> tuple[str, str]:
  """``("5w1s", "imaml_gd")`` from a run's config name, checked against its
  ways and shots."""
  name = re.fullmatch(r"omniglot_(\d+w\d+s)_(\w+)", config["name"])
  assert name, f"not an Omniglot Table 2 config: {config['name']}"
  assert name[1] == f"{config['n_way']}w{config['k_shot']}s", config["name"]
  return name[1], name[2]


def check_paper_number(text: str, config: dict, tables) -> None:
  """A cell ``mean ± ci95`` against the paper's number for the run's setting
  and algorithm."""
  setting, algorithm = setting_and_algorithm(config)
  paper = tables.PAPER[("omniglot", algorithm)][tables.SETTINGS.index(setting)]
  assert [float(x) for x in text.split(" ± ")] == list(paper), (
    f"the paper's number for {config['name']} is {paper[0]} ± {paper[1]}"
  )


def test_reproduction_page_five_way_rows_are_their_runs(tables):
  page = sections(REPRODUCTION_PAGE.read_text())
  for section, runs in FIVE_WAY_RUNS.items():
    seen = set()
    for row, budget, device, *results, paper in table_rows(
      page[section], FIVE_WAY_HEADER
    ):
      if budget == "not run":
        continue
      key = (row, device)
      assert key in runs, f"{section}: no run known for the row {key}"
      seen.add(key)
      run = BENCHMARKS / runs[key]
      entry, config = run_entry(run, tables)
      check_budget(budget, device, entry, config)
      check_paper_number(paper, config, tables)
      for prefix, cell in zip(MEASURED_PREFIXES, results):
        if not cell.startswith(NOT_RUN):
          check_result(cell, run, prefix, entry)
    assert seen == set(runs), f"{section}: rows gone: {set(runs) - seen}"


def test_reproduction_page_twenty_way_rows_are_their_runs(tables):
  section = sections(REPRODUCTION_PAGE.read_text())[
    "Table 2, 20-way 1-shot and 20-way 5-shot"
  ]
  # Each column's budget, from the header: (meta-steps, tasks per step).
  budgets = [
    (int(steps.replace(",", "")), int(batch))
    for steps, batch in BUDGET.findall(TWENTY_WAY_HEADER)
  ]
  rows = table_rows(section, TWENTY_WAY_HEADER)
  assert {row[0] for row in rows} == set(TWENTY_WAY_RUNS)
  for row, one_shot, paper_1, five_shot, paper_5 in rows:
    for cell, paper, name, budget in zip(
      (one_shot, five_shot), (paper_1, paper_5), TWENTY_WAY_RUNS[row], budgets
    ):
      if name is None:
        assert cell == "not run", (row, cell)
        continue
      run = BENCHMARKS / name
      entry, config = run_entry(run, tables)
      assert (entry["meta_steps_target"], config["meta_batch"]) == budget, (
        f"{name} is not a run of the column's budget {budget}"
      )
      check_paper_number(paper, config, tables)
      results = cell.split(" / ")
      assert len(results) == 3, f"{row}: not 'paper's / ours / authors'"
      steps = re.search(r"\(([\d,]+) steps\)$", cell)
      if steps or not entry["complete"]:
        assert steps, f"{row}: a stopped run names its meta-steps"
        assert int(steps[1].replace(",", "")) == entry["meta_steps"], row
      for prefix, result in zip(MEASURED_PREFIXES, results):
        check_result(result, run, prefix, entry, marks_stopped=True)


TEST_TIME_STEPS_HEADER = (
  "| 20-way 1-shot, best-validation parameters | MAML | iMAML-GD, lam 2 |"
)
TEST_TIME_STEPS_FILES = [
  "eval.json",
  "eval_class_rotations=per_task.json",
  "eval_authors_test.json",
  "eval_protocol=paper.json",
]


def test_twenty_way_test_time_steps_are_their_evaluations():
  """The reproduction page's 20-way 1-shot steps from ours to the paper's
  measurement: each cell is the test of the file its row names, in the
  column's run, and each difference quoted below the table is the
  difference of two consecutive rows, with their intervals combined."""
  text = REPRODUCTION_PAGE.read_text()
  rows = table_rows(text, TEST_TIME_STEPS_HEADER)
  assert len(rows) == len(TEST_TIME_STEPS_FILES)
  runs = ["omniglot_20w1s_maml", "omniglot_20w1s_imaml_gd"]
  scores = {run: [] for run in runs}
  for cells, name in zip(rows, TEST_TIME_STEPS_FILES):
    for cell, run in zip(cells[1:], runs):
      path = REPO / "benchmarks" / "runs" / run / name
      stats = json.loads(path.read_text())["test"]["accuracy_after"]
      mean, ci = 100 * stats["mean"], 100 * stats["ci95"]
      assert cell == f"{mean:.2f}% ± {ci:.2f}%", (run, name, cell)
      scores[run].append((mean, ci))
  after = text[text.index(TEST_TIME_STEPS_HEADER) :]
  for run in runs:
    for (m0, c0), (m1, c1) in zip(scores[run], scores[run][1:]):
      quoted = f"{m1 - m0:+.2f} ± {math.hypot(c0, c1):.2f}"
      assert quoted.lstrip("+") in after, (run, quoted)
