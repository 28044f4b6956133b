"""The paper's Tables 2 and 3 from this library's runs, with the paper's
numbers beside them.

Reads finished (or stopped) work directories of ``imaml-train``, one per
config, named after the config: ``RUNS/omniglot_5w1s_imaml_gd/results.json``
and so on. With ``--train`` it first trains the configs named (resuming
whatever is already in ``RUNS``), optionally under a time budget per config
and with ``--set`` overrides, exactly as ``imaml-train`` would.

For every cell it prints the test accuracy on the config's test tasks with
its 95% interval (``1.96 * std / sqrt(n)``, as the paper), the paper's number,
and the budget actually used: meta-steps done against the config's target,
wall time and device. A cell whose run stopped before its target (a time
budget, or still running) is marked with ``*``; a missing run is ``-``.

Table 2 comes three times, once per measurement (``imaml-eval --protocol``):
the paper's (``eval_protocol=paper.json``: the tasks that measured the
paper's table, with the run's own adaptation and best-validation
parameters), ours (``results.json``, or ``eval.json`` where ``imaml-eval``
tested the same parameters on more tasks: held-out characters, 15 query
images per class) and the iMAML authors' script (``eval_protocol=authors.json``).
``--eval PROTOCOL ... --tasks N`` first runs ``imaml-eval`` for every
Omniglot run whose result under a protocol is missing, older than the run's
last step, without per-task scores or on fewer than ``N`` tasks. The row
"iMAML, GD (authors' recipe)" is the config ``*_imaml_gd_authors``; the paper's
iMAML-GD numbers stand beside both iMAML-GD rows.

The paper's ordering at equal budget (iMAML-HF >= iMAML-GD >= MAML) is
tested per setting and protocol. Where both runs of a pair keep every test
task's score (``test_per_task``, written by ``imaml-train`` and ``imaml-eval``)
and were tested on the same tasks (equal task fingerprints), the test is
paired: the 95% interval of the mean per-task difference; otherwise a pair is
unresolved when the two runs' intervals overlap. ``--eval ours`` first
re-tests (``imaml-eval``, ``eval.json``) every run whose ``results.json``
predates the per-task scores.

Writes ``benchmarks/results/tables.{md,csv,json}`` (or ``--out``).

    python benchmarks/tables.py --runs runs
    python benchmarks/tables.py --runs runs --train omniglot_5w1s_imaml_gd \\
        --time-budget 3600
    python benchmarks/tables.py --runs benchmarks/runs \
        --eval paper ours authors --tasks 3000 \
        --out benchmarks/results --tag _cpu
    python benchmarks/tables.py --quick     # a tiny 5w1s run, for the tests
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from imaml_jax.train import cli
from imaml_jax.train import config as config_lib
from imaml_jax.train import train as train_lib

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s")
# Fields that change what a run logs or stores, not what it learns.
BOOKKEEPING = {
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "eval_chunk",
}
SETTING_TITLES = {
  "5w1s": "5-way 1-shot",
  "5w5s": "5-way 5-shot",
  "20w1s": "20-way 1-shot",
  "20w5s": "20-way 5-shot",
}
ALGORITHMS = {  # config suffix: the paper's row name
  "maml": "MAML",
  "fomaml": "first-order MAML",
  "reptile": "Reptile",
  "imaml_gd": "iMAML, GD",
  "imaml_gd_authors": "iMAML, GD (authors' recipe)",
  "imaml_hf": "iMAML, Hessian-Free",
}
# The result files of ``imaml-eval --protocol NAME`` in a run directory,
# by the prefix of their keys in a row ("" for ours).
PROTOCOL_EVALS = {
  "measured_paper_": "eval_protocol=paper.json",
  "authors_": "eval_protocol=authors.json",
}
# The result file of ``imaml-eval`` (our protocol, no test-time overrides).
OURS_EVAL = "eval.json"
# Each measurement: (prefix of its keys in a row, ``--protocol`` name, the
# name the tables give it), in the order the tables show them.
PROTOCOLS = (
  ("measured_paper_", "paper", "paper's"),
  ("", "ours", "ours"),
  ("authors_", "authors", "authors'"),
)
# Per-task scores: kept in the rows for the paired tests, not written out.
PER_TASK_KEYS = ("per_task", "authors_per_task", "measured_paper_per_task")
# The paper's Table 2 (Omniglot) and Table 3 (mini-ImageNet 5-way 1-shot):
# (mean, 95% half-width) in percent.
PAPER = {
  ("omniglot", "maml"): [(98.7, 0.4), (99.9, 0.1), (95.8, 0.3), (98.9, 0.2)],
  ("omniglot", "fomaml"): [(98.3, 0.5), (99.2, 0.2), (89.4, 0.5), (97.9, 0.1)],
  ("omniglot", "reptile"): [
    (97.68, 0.04),
    (99.48, 0.06),
    (89.43, 0.14),
    (97.12, 0.32),
  ],
  ("omniglot", "imaml_gd"): [
    (99.16, 0.35),
    (99.67, 0.12),
    (94.46, 0.42),
    (98.69, 0.1),
  ],
  # The paper's iMAML-GD numbers, which the authors' recipe produced.
  ("omniglot", "imaml_gd_authors"): [
    (99.16, 0.35),
    (99.67, 0.12),
    (94.46, 0.42),
    (98.69, 0.1),
  ],
  ("omniglot", "imaml_hf"): [
    (99.50, 0.26),
    (99.74, 0.11),
    (96.18, 0.36),
    (99.14, 0.1),
  ],
  ("miniimagenet", "maml"): [(48.70, 1.84)],
  ("miniimagenet", "fomaml"): [(48.07, 1.75)],
  ("miniimagenet", "reptile"): [(49.97, 0.32)],
  ("miniimagenet", "imaml_gd"): [(48.96, 1.84)],
  ("miniimagenet", "imaml_hf"): [(49.30, 1.88)],
}


def config_name(benchmark: str, setting: str, algorithm: str) -> str:
  return f"{benchmark}_{setting}_{algorithm}"


def read_cell(runs: Path, name: str) -> dict | None:
  """The table entry of the run directory ``runs/name`` (``name`` a
  registered config), or ``None`` if it has no result."""
  found = read_run_and_config(runs / name)
  if found is None:
    return None
  cell, stored = found
  return {"changes": config_changes(name, stored), "config": name, **cell}


def read_run(run_dir: Path) -> dict | None:
  """Test result, budget and per-task scores of one ``imaml-train`` work
  directory under both protocols, or ``None`` if it has no ``results.json``.

  Our protocol's result comes from ``results.json``, or from ``eval.json``
  where ``imaml-eval`` tested the same parameters on more tasks (or kept the
  per-task scores that an older ``results.json`` lacks); the paper's
  measurement (``measured_paper_*``; ``paper_*`` are the paper's own
  numbers) and the authors' (``authors_*``) from
  ``eval_protocol=paper.json`` and ``eval_protocol=authors.json`` where
  ``imaml-eval`` made them.
  """
  found = read_run_and_config(run_dir)
  return None if found is None else found[0]


def read_run_and_config(run_dir: Path) -> tuple[dict, dict | None] | None:
  """``read_run``'s entry and the config stored in the same ``results.json``
  (read once), or ``None`` if the directory has no ``results.json``."""
  path = run_dir / "results.json"
  if not path.is_file():
    return None
  try:
    results = json.loads(path.read_text())
    accuracy = results["test"]["accuracy_after"]
    budget = results["budget"]
  except (ValueError, KeyError) as e:
    raise SystemExit(
      f"{path}: not a results file of imaml-train ({e})"
    ) from None
  target = budget.get(
    "meta_steps_target", results.get("config", {}).get("meta_steps")
  )
  cell = {
    "accuracy": 100 * accuracy["mean"],
    "ci95": 100 * accuracy["ci95"],
    "test_tasks": accuracy["n"],
    "meta_steps": budget["meta_steps"],
    "meta_steps_target": target,
    "complete": target is not None and budget["meta_steps"] >= target,
    "wall_time_s": budget["wall_time_s"],
    "device": budget["device"],
    "test_params": results.get("test_params"),
  }
  per_task = results.get("test_per_task")
  if per_task:
    cell["per_task"] = per_task
  cell.update(ours_eval(run_dir / OURS_EVAL, cell))
  for prefix, name in PROTOCOL_EVALS.items():
    cell.update(read_protocol_eval(run_dir / name, prefix))
  return cell, results.get("config")


def ours_eval(path: Path, cell: dict) -> dict:
  """What ``imaml-eval``'s test under our protocol (``eval.json``) adds to a
  run's ``results.json`` entry ``cell``: nothing unless it tested the same
  parameters (same step and choice, no test-time overrides) on the test
  split; then its accuracy where it used more tasks, else its per-task
  scores where ``results.json`` predates them (on as many tasks)."""
  if not path.is_file():
    return {}
  try:
    result = json.loads(path.read_text())
  except ValueError as e:
    raise SystemExit(f"{path}: not a result of imaml-eval ({e})") from None
  same = (
    result.get("step") == cell["meta_steps"]
    and result.get("test_params") == cell["test_params"]
    and result.get("protocol", {}).get("name") == "ours"
    and result.get("split") == "test"
    and not result.get("test_time_overrides")
  )
  accuracy = result.get("test", {}).get("accuracy_after", {})
  if not same or not accuracy:
    return {}
  if accuracy["n"] > cell["test_tasks"]:
    update = {
      "accuracy": 100 * accuracy["mean"],
      "ci95": 100 * accuracy["ci95"],
      "test_tasks": accuracy["n"],
    }
    if result.get("test_per_task"):
      update["per_task"] = result["test_per_task"]
    return update
  if accuracy["n"] == cell["test_tasks"] and "per_task" not in cell:
    return {"per_task": result.get("test_per_task")}
  return {}


def read_protocol_eval(path: Path, prefix: str) -> dict:
  """The run's test under another protocol (``prefix``: ``"measured_paper_"`` or
  ``"authors_"``), if ``imaml-eval`` made one: its keys prefixed."""
  if not path.is_file():
    return {}
  try:
    result = json.loads(path.read_text())
    accuracy = result["test"]["accuracy_after"]
    protocol = result["protocol"]
  except (ValueError, KeyError) as e:
    raise SystemExit(
      f"{path}: not a result of imaml-eval --protocol {prefix[:-1]} ({e})"
    ) from None
  cell = {
    f"{prefix}accuracy": 100 * accuracy["mean"],
    f"{prefix}ci95": 100 * accuracy["ci95"],
    f"{prefix}test_tasks": accuracy["n"],
    f"{prefix}q_query": protocol["q_query"],
    f"{prefix}step": result.get("step"),
  }
  if result.get("test_per_task"):
    cell[f"{prefix}per_task"] = result["test_per_task"]
  return cell


def config_changes(name: str, stored: dict | None) -> str:
  """The run's departures from the registered config, ``key=run (config)``."""
  if stored is None:
    return "unknown"
  diffs = config_lib.differences(
    config_lib.get_config(name), config_lib.from_dict(stored)
  )
  return (
    ", ".join(
      f"{k}={b} ({a})"
      for k, (a, b) in sorted(diffs.items())
      if k not in BOOKKEEPING
    )
    or "none"
  )


def build_rows(runs: Path) -> list[dict]:
  rows = []
  for (benchmark, algorithm), paper in PAPER.items():
    settings = SETTINGS if benchmark == "omniglot" else ("5w1s",)
    for setting, (mean, ci) in zip(settings, paper):
      cell = read_cell(runs, config_name(benchmark, setting, algorithm)) or {
        "config": config_name(benchmark, setting, algorithm)
      }
      cell.update(
        benchmark=benchmark,
        setting=setting,
        algorithm=algorithm,
        paper_accuracy=mean,
        paper_ci95=ci,
      )
      rows.append(cell)
  return rows


def step_under_test(row: dict, prefix: str = "") -> int:
  """The meta-step whose training a cell's test under a protocol reflects:
  the run's own for ours, the step ``imaml-eval`` tested for the others
  (older than the run's when the run went on after that test)."""
  step = row.get(prefix + "step") if prefix else None
  return row["meta_steps"] if step is None else step


def format_cell(row: dict, prefix: str = "") -> str:
  """``mean ± ci95`` of the cell under a protocol (``prefix``: "" for ours,
  ``"measured_paper_"`` or ``"authors_"`` for the others), and the paper's
  number; a test older than the run's last step names its step.

  Example:
    >>> row = {"paper_accuracy": 99.5, "paper_ci95": 0.26, "complete": False,
    ...        "meta_steps": 5201, "accuracy": 96.32, "ci95": 0.38,
    ...        "authors_accuracy": 94.57, "authors_ci95": 0.83,
    ...        "authors_step": 2936}
    >>> format_cell(row)
    '96.32 ± 0.38* (paper 99.5 ± 0.26)'
    >>> format_cell(row, "authors_")
    '94.57 ± 0.83* at step 2936 (paper 99.5 ± 0.26)'
  """
  paper = f"{row['paper_accuracy']:g} ± {row['paper_ci95']:g}"
  if f"{prefix}accuracy" not in row:
    return f"- (paper {paper})"
  mark = "" if row["complete"] else "*"
  step = step_under_test(row, prefix)
  if step != row["meta_steps"]:
    mark += f" at step {step}"
  return (
    f"{row[prefix + 'accuracy']:.2f} ± {row[prefix + 'ci95']:.2f}"
    f"{mark} (paper {paper})"
  )


def omniglot_table(by_key: dict, prefix: str) -> list[str]:
  lines = [
    "| Algorithm | " + " | ".join(SETTING_TITLES[s] for s in SETTINGS) + " |",
    "|---" * (len(SETTINGS) + 1) + "|",
  ]
  for algorithm, title in ALGORITHMS.items():
    cells = [
      format_cell(by_key[("omniglot", s, algorithm)], prefix) for s in SETTINGS
    ]
    lines.append(f"| {title} | " + " | ".join(cells) + " |")
  return lines


# The paper's claim at equal budget (Section 5, Table 2): iMAML-HF >= iMAML-GD
# >= MAML, as (better, worse) pairs of config suffixes.
CLAIMS = (("imaml_hf", "imaml_gd"), ("imaml_gd", "maml"))


def _fingerprints(record: dict) -> dict[int, str]:
  """``{m: fingerprint of the record's first m tasks}``: its recorded
  prefixes and, at its own task count, its whole task set."""
  prints = {int(m): d for m, d in record.get("prefix_sha256", {}).items()}
  if record.get("tasks_sha256") is not None:
    prints[len(record["values"])] = record["tasks_sha256"]
  return prints


def shared_tasks(a: dict | None, b: dict | None) -> int | None:
  """How many tasks two per-task records were both tested on, first ones
  first, or ``None`` if none are known to be shared.

  Each record fingerprints its whole task set (``tasks_sha256``) and its
  first ``m`` tasks for a few counts ``m`` (``prefix_sha256``, as it drew
  them). Two records share their first ``m`` tasks for the largest ``m``
  that both fingerprinted alike: all of them at equal fingerprints, the
  shorter one's when the longer one's prefix of that length is its
  fingerprint, otherwise a common prefix (tests on 9,000 and 21,000 tasks
  pair over the first 6,000). The metric must be the same.

  Example:
    >>> r = lambda n, d, **k: {"metric": "accuracy_after",
    ...                        "values": [1.0] * n, "tasks_sha256": d, **k}
    >>> shared_tasks(r(2, "x"), r(2, "x")), shared_tasks(r(2, "x"), r(2, "y"))
    (2, None)
    >>> shared_tasks(r(3, "z", prefix_sha256={"2": "x"}), r(2, "x"))
    2
    >>> shared_tasks(r(5, "u", prefix_sha256={"1": "w", "2": "x"}),
    ...              r(4, "v", prefix_sha256={"1": "w", "2": "x"}))
    2
  """
  if not a or not b or a.get("metric") != b.get("metric"):
    return None
  theirs = _fingerprints(b)
  shared = [m for m, d in _fingerprints(a).items() if theirs.get(m) == d]
  return max(shared, default=None)


def paired_difference_and_tasks(
  a: dict | None, b: dict | None
) -> tuple[float, float, int] | None:
  """:func:`paired_difference` and the number of tasks it is over (the
  shorter test's, or a common prefix: :func:`shared_tasks`)."""
  n = shared_tasks(a, b)
  if n is None:
    return None
  diff = train_lib.summarize(
    {"d": 100 * (np.asarray(a["values"][:n]) - np.asarray(b["values"][:n]))}
  )["d"]
  return diff["mean"], diff["ci95"], n


def paired_difference(
  a: dict | None, b: dict | None
) -> tuple[float, float] | None:
  """Mean and 95% half-width (points) of the per-task accuracy difference
  ``a - b`` over the tasks both were tested on (:func:`shared_tasks`), or
  ``None`` if they share none.

  Each task is tested by both runs, so the difference's interval is
  ``1.96 * std(a_i - b_i) / sqrt(n)`` (population std, as every interval of
  the tables): the task-to-task spread that the two runs share cancels.

  Example:
    >>> t = lambda v: {"metric": "accuracy_after", "values": v,
    ...                "tasks_sha256": "x"}
    >>> [round(x, 6) for x in paired_difference(t([1.0, 0.5]),
    ...                                         t([0.75, 0.25]))]
    [25.0, 0.0]
  """
  paired = paired_difference_and_tasks(a, b)
  return None if paired is None else paired[:2]


def ordering(by_key: dict, prefix: str = "") -> list[dict]:
  """The paper's ordering tested on every Omniglot setting where both cells
  of a pair were trained and tested at the same meta-step (``prefix`` as
  :func:`format_cell`; see :func:`step_under_test`). With per-task scores
  of both runs on the same tasks (:func:`paired_difference`) a pair holds
  or is reversed when the paired 95% interval of the difference excludes 0,
  and is unresolved when it contains 0; without them it is unresolved when
  the two runs' own 95% intervals overlap."""
  out = []
  for setting in SETTINGS:
    for better, worse in CLAIMS:
      a = by_key.get(("omniglot", setting, better), {})
      b = by_key.get(("omniglot", setting, worse), {})
      key = prefix + "accuracy"
      if key not in a or key not in b:
        continue
      step = step_under_test(a, prefix)
      if (
        step != step_under_test(b, prefix) or a["meta_steps"] != b["meta_steps"]
      ):
        continue
      diff = a[key] - b[key]
      paired = paired_difference_and_tasks(
        a.get(prefix + "per_task"), b.get(prefix + "per_task")
      )
      tasks = None
      if paired is not None:
        diff, half, tasks = paired
        verdict = (
          "holds"
          if diff - half > 0
          else "reversed"
          if diff + half < 0
          else "unresolved (paired interval contains 0)"
        )
      else:
        half = None
        overlap = abs(diff) <= a[prefix + "ci95"] + b[prefix + "ci95"]
        verdict = (
          "unresolved (intervals overlap)"
          if overlap
          else "holds"
          if diff > 0
          else "reversed"
        )
      out.append(
        {
          "setting": setting,
          "better": better,
          "worse": worse,
          "difference": diff,
          "paired_ci95": half,
          "paired_tasks": tasks,
          "meta_steps": step,
          "verdict": verdict,
        }
      )
  return out


def ordering_lines(by_key: dict) -> list[str]:
  lines = [
    "## The paper's ordering at equal budget",
    "",
    "iMAML-HF >= iMAML-GD >= MAML (Table 2), on every setting where "
    "both runs of a pair reached the same meta-steps. Where both were "
    "tested on the same tasks with per-task scores kept, the "
    "difference is paired (mean over tasks of the per-task "
    "difference, ± its 95% interval) and the pair is unresolved when "
    "that interval contains 0; otherwise a pair whose two 95% "
    "intervals overlap is unresolved.",
    "",
    "| setting | protocol | claim | difference (points) | meta-steps "
    "| verdict |",
    "|---|---|---|---|---|---|",
  ]
  found = False
  for prefix, _, protocol in PROTOCOLS:
    for c in ordering(by_key, prefix):
      found = True
      difference = f"{c['difference']:+.2f}"
      if c["paired_ci95"] is not None:
        difference += (
          f" ± {c['paired_ci95']:.2f} (paired, {c['paired_tasks']:,} tasks)"
        )
      lines.append(
        f"| {SETTING_TITLES[c['setting']]} | {protocol} | "
        f"{ALGORITHMS[c['better']]} >= {ALGORITHMS[c['worse']]} | "
        f"{difference} | {c['meta_steps']} | {c['verdict']} |"
      )
  if not found:
    lines.append("| - | - | no pair trained to equal meta-steps | - | - | - |")
  return lines


def markdown(rows: list[dict]) -> str:
  by_key = {(r["benchmark"], r["setting"], r["algorithm"]): r for r in rows}
  lines = [
    "## Table 2: Omniglot, test accuracy (%), the paper's measurement",
    "",
    "`imaml-eval --protocol paper`: the tasks that measured the paper's "
    "table (the test characters of the authors' evaluation script, two "
    "thirds of them among our meta-training characters; K query images "
    "per class), the run's own adaptation, best-validation parameters. "
    "The measurement to compare with the paper's numbers.",
    "",
  ]
  lines += omniglot_table(by_key, "measured_paper_")
  lines += [
    "",
    "## Table 2: Omniglot, test accuracy (%), our protocol",
    "",
    "Held-out characters (none seen in meta-training or validation), "
    "15 query images per class, the run's own adaptation, "
    "best-validation parameters.",
    "",
  ]
  lines += omniglot_table(by_key, "")
  lines += [
    "",
    "## Table 2: Omniglot, test accuracy (%), the authors' protocol",
    "",
    "`imaml-eval --protocol authors` on the same runs: the tasks of the "
    "paper's measurement, adapted as the authors' evaluation script "
    "adapts (16 SGD steps of 0.1 on the support loss alone for iMAML), "
    "last parameters.",
    "",
  ]
  lines += omniglot_table(by_key, "authors_")
  lines += [""] + ordering_lines(by_key)
  lines += [
    "",
    "## Table 3: mini-ImageNet 5-way 1-shot, test accuracy (%)",
    "",
    "| Algorithm | 5-way 1-shot |",
    "|---|---|",
  ]
  for algorithm, title in ALGORITHMS.items():
    row = by_key.get(("miniimagenet", "5w1s", algorithm))
    if row is not None:
      lines.append(f"| {title} | {format_cell(row)} |")
  lines += [
    "",
    "## Budget of each run",
    "",
    "| config | meta-steps (target) | wall time | device | "
    "test tasks | parameters tested | changed from the config: "
    "run (config) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "accuracy" in r:
      lines.append(
        f"| {r['config']} | {r['meta_steps']} ({r['meta_steps_target']}) | "
        f"{r['wall_time_s'] / 3600:.2f} h | {r['device']} | "
        f"{r['test_tasks']} | {r['test_params']} | {r['changes']} |"
      )
  lines += [
    "",
    "Each cell: mean test accuracy ± 1.96 std / sqrt(tasks) over "
    "the run's test tasks; the paper's number in brackets. `*`: the "
    "run stopped before its configured meta-steps (reduced budget). "
    "`-`: not run. The last column lists every setting in which the "
    "run departs from its named config (logging and checkpointing "
    "aside).",
  ]
  return "\n".join(lines) + "\n"


def train(names, runs: Path, time_budget, overrides, data_dir) -> None:
  for name in names:
    argv = [name, "--workdir", str(runs / name), "--no-progress"]
    if time_budget:
      argv += ["--time-budget", str(time_budget)]
    if data_dir:
      argv += ["--data-dir", data_dir]
    if overrides:
      argv += ["--set", *overrides]
    print(f"training {name} in {runs / name}", flush=True)
    cli.train_main(argv)


def needs_eval(row: dict, prefix: str, tasks: int | None) -> bool:
  """Whether a run's test under a protocol is missing, older than the run's
  last step, without per-task scores, or on fewer than ``tasks`` tasks.

  Example:
    >>> row = {"meta_steps": 10, "authors_step": 10, "authors_per_task": {},
    ...        "authors_test_tasks": 600}
    >>> needs_eval(row, "authors_", None), needs_eval(row, "authors_", 3000)
    (False, True)
  """
  if not can_extend(row, prefix):
    return True
  return tasks is not None and row[prefix + "test_tasks"] < tasks


def can_extend(row: dict, prefix: str) -> bool:
  """Whether a run's recorded test under a protocol is of its last step and
  has per-task scores, so that ``imaml-eval --extend`` tests only the tasks
  it lacks.

  Example:
    >>> row = {"meta_steps": 10, "authors_step": 10, "authors_per_task": {}}
    >>> can_extend(row, "authors_"), can_extend({**row, "meta_steps": 20}, "authors_")
    (True, False)
  """
  current = not prefix or row.get(prefix + "step") == row["meta_steps"]
  return current and prefix + "per_task" in row


def eval_protocols(
  runs: Path, rows: list[dict], data_dir, protocols, tasks: int | None
) -> None:
  """Tests every Omniglot run under each of ``protocols`` where
  :func:`needs_eval` says so, on ``tasks`` tasks (the config's if ``None``).

  A current test on fewer tasks is extended (:func:`can_extend`); where
  ``imaml-eval`` refuses to extend it, every task is tested."""
  prefixes = {name: prefix for prefix, name, _ in PROTOCOLS}
  for name in protocols:
    for row in rows:
      if row["benchmark"] != "omniglot" or "accuracy" not in row:
        continue
      if not needs_eval(row, prefixes[name], tasks):
        continue
      workdir = runs / row["config"]
      print(f"testing {workdir} under protocol {name}", flush=True)
      extra = [] if tasks is None else ["--tasks", str(tasks)]
      # The tables read the reported test alone.
      args = ["--protocol", name, "--skip-last", *extra]
      # A stale recorded test is replaced even where it held more tasks.
      if not can_extend(row, prefixes[name]):
        run_eval(workdir, data_dir, *args, "--overwrite")
        continue
      try:
        run_eval(workdir, data_dir, *args, "--extend")
      except SystemExit as e:
        if e.code != 2:
          raise
        print(f"testing every task of {workdir} again", flush=True)
        run_eval(workdir, data_dir, *args, "--overwrite")


def run_eval(workdir: Path, data_dir, *args: str) -> None:
  """``imaml-eval --workdir WORKDIR [--data-dir DATA_DIR] ARGS``."""
  argv = ["--workdir", str(workdir), "--no-progress", *args]
  if data_dir:
    argv += ["--data-dir", data_dir]
  cli.eval_main(argv)


def without_per_task(row: dict) -> dict:
  return {k: v for k, v in row.items() if k not in PER_TASK_KEYS}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--runs",
    default="runs",
    help="folder of work directories named after configs",
  )
  parser.add_argument(
    "--train",
    nargs="*",
    default=[],
    metavar="CONFIG",
    help="train these configs in RUNS first (resuming)",
  )
  parser.add_argument(
    "--time-budget",
    type=float,
    default=None,
    help="seconds of training per config and invocation",
  )
  parser.add_argument(
    "--set",
    dest="overrides",
    nargs="+",
    default=[],
    metavar="KEY=VALUE",
    help="overrides for --train",
  )
  parser.add_argument(
    "--eval",
    nargs="+",
    default=[],
    choices=[name for _, name, _ in PROTOCOLS],
    metavar="PROTOCOL",
    help="first test every Omniglot run under these protocols "
    "(imaml-eval --protocol: paper, ours, authors) where that "
    "result is missing, stale, without per-task scores or on fewer "
    "than --tasks tasks",
  )
  parser.add_argument(
    "--tasks",
    type=int,
    default=None,
    help="test tasks of --eval (default: each config's)",
  )
  parser.add_argument("--data-dir", default=None)
  parser.add_argument(
    "--quick",
    action="store_true",
    help="train omniglot_5w1s_imaml_gd for 4 meta-steps "
    "of 2 tasks, test on 10 tasks, in --runs",
  )
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--tag", default="")
  args = parser.parse_args(argv)
  runs = Path(args.runs)
  if args.tasks is not None and args.tasks < 1:
    parser.error(f"--tasks must be >= 1, got {args.tasks}")
  if args.tasks is not None and not args.eval:
    parser.error("--tasks applies to --eval")
  if args.quick:
    args.train = ["omniglot_5w1s_imaml_gd"]
    args.overrides = [
      "meta_batch=2",
      "meta_steps=4",
      "log_every=2",
      "val_every=0",
      "test_tasks=10",
      "eval_chunk=10",
      "checkpoint_every=0",
    ]
    args.tag = args.tag or "_quick"
  table_configs = {r["config"] for r in build_rows(runs)}
  unknown = [n for n in args.train if n not in table_configs]
  if unknown:
    parser.error(f"not a Table 2/3 config: {', '.join(unknown)}")
  if not args.train and not any((runs / c).is_dir() for c in table_configs):
    parser.error(
      f"--runs {runs} holds no work directory of a Table 2/3 config (such "
      f"as {runs / 'omniglot_5w1s_imaml_gd'}): give the folder of the runs, "
      "e.g. benchmarks/runs, or --train CONFIG to train into it"
    )
  train(args.train, runs, args.time_budget, args.overrides, args.data_dir)
  rows = build_rows(runs)
  if args.eval:
    eval_protocols(runs, rows, args.data_dir, args.eval, args.tasks)
    rows = build_rows(runs)
  text = markdown(rows)
  rows = [without_per_task(r) for r in rows]
  print(text)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"tables{args.tag}")
  with open(stem + ".md", "w") as f:
    f.write(text)
  with open(stem + ".json", "w") as f:
    json.dump(
      {"runs": str(runs), "command": " ".join(sys.argv), "rows": rows},
      f,
      indent=2,
    )
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {stem}.{{md,csv,json}}")
  return rows


if __name__ == "__main__":
  main()
