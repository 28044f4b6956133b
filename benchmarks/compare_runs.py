"""Learning curves of several training runs on one figure.

Each run is a ``metrics.jsonl`` written by ``imaml-train`` (or the work
directory holding it), given as ``LABEL=PATH``. The figure's panels, against
the meta-step: validation accuracy after adaptation; the training query loss
at the meta-parameters before adaptation (``loss_before``, whose growth shows
the meta-parameters' predictions sharpening); the training meta-gradient
norm (log scale); where a run logs it (iMAML), CG's relative residual
on the meta-gradient's linear system; and where a run logs it (iMAML with
CG stopping at negative curvature), the fraction of training tasks whose
CG stopped at a direction of non-positive curvature of ``I + H/lam``. The
validation points of every run go
to a CSV beside the PNG, with the step and value of each run's best
validation. ``--x tasks`` draws the panels against the training tasks seen
instead (meta-step times the run's ``meta_batch``, read from the
``config.json`` beside its metrics), so that runs of different meta-batch
sizes line up at equal numbers of tasks; the CSV then gains a ``tasks``
column.

``--paired "A minus B"`` compares the test scores of runs given as work
directories and tested on the same tasks, task by task: the mean per-task
accuracy difference ``A - B`` in points with its 95% interval
(``tables.paired_difference``; the spread of task difficulty that both runs
share cancels). A side may average several runs' per-task scores, such as
training seeds: ``"A0 + A1 minus B0 + B1"`` (the interval then counts test
tasks, not seeds; where both sides hold two runs or more, a seed-level
interval is given beside it: Welch's 95% interval of the difference of the
two sides' mean run accuracies, which counts seeds, not tasks).
``--protocol authors`` pairs the tests of ``imaml-eval
--protocol authors`` instead of ``results.json``'s; ``LABEL:FILE`` takes the
scores of another ``imaml-eval`` result in that run's directory, such as
``"m:eval_val_eval_inner_steps=10.json minus m:eval_val.json"`` (10
test-time steps against the trained number, on validation tasks). The
differences are printed as a Markdown table and written to
``OUT_paired.csv``.

    python benchmarks/compare_runs.py --out benchmarks/results/stability \\
        plain=benchmarks/results/gpu_5w1s_plain_h100_metrics.jsonl \\
        checked=benchmarks/runs_gpu_h100/omniglot_5w1s_imaml_gd
    python benchmarks/compare_runs.py --out /tmp/seeds \\
        gd0=benchmarks/runs/meta_lr_5w1s/imaml_gd_lr3e-3 \\
        gd1=benchmarks/runs/meta_lr_5w1s/imaml_gd_lr3e-3_seed1 \\
        maml0=benchmarks/runs/meta_lr_5w1s/maml_lr3e-3 \\
        --paired "gd1 minus gd0" --paired "gd0 + gd1 minus maml0"
    python benchmarks/compare_runs.py --out /tmp/batch --x tasks \\
        mb8=benchmarks/runs/meta_lr_5w1s/maml_lr3e-3 \\
        mb4=benchmarks/runs/meta_lr_5w1s/maml_lr3e-3_mb4
    python benchmarks/compare_runs.py --quick     # two synthetic runs (tests)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from imaml_jax.train import CONFIG_FILE  # noqa: E402
from imaml_jax.train import metrics_log  # noqa: E402
from imaml_jax.train import plots  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tables  # noqa: E402  (benchmarks/tables.py)

PANELS = (
  ("val", "accuracy_after", "validation accuracy after adaptation", False),
  ("train", "loss_before", "train query loss at theta", True),
  ("train", "grad_norm", "train meta-gradient norm", True),
)
# Drawn when a run logs it (iMAML): how well CG solved the linear system.
RESIDUAL_PANEL = ("train", "residual", "train CG relative residual", True)
# Drawn when a run logs it (iMAML, CG stopping at negative curvature): the
# share of tasks whose system CG proved indefinite.
NEGATIVE_CURVATURE_PANEL = (
  "train",
  "negative_curvature",
  "train tasks where CG met p^T A p <= 0",
  False,
)
OPTIONAL_PANELS = (RESIDUAL_PANEL, NEGATIVE_CURVATURE_PANEL)
# What the panels' horizontal axis counts (--x).
X_LABELS = {
  "meta-step": "meta-step",
  "tasks": "training tasks seen (meta-step x meta-batch)",
}


def parse_run(text: str) -> tuple[str, Path]:
  label, sep, path = text.partition("=")
  if not sep or not label or not path:
    raise argparse.ArgumentTypeError(
      f"a run is LABEL=PATH (metrics.jsonl or its work directory); got {text!r}"
    )
  path = Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  if not path.is_file():
    raise argparse.ArgumentTypeError(f"{path}: no such metrics file")
  return label, path


def load_runs(runs) -> dict[str, list[dict]]:
  loaded = {}
  for label, path in runs:
    records = metrics_log.read_records(path)
    if not records:
      raise SystemExit(f"{path}: no records")
    loaded[label] = records
  return loaded


def tasks_per_step(path: Path) -> int:
  """The ``meta_batch`` of the run whose metrics are ``path``, from the
  ``config.json`` beside them; exits naming the run if it cannot be read."""
  config = path.parent / CONFIG_FILE
  try:
    meta_batch = json.loads(config.read_text())["meta_batch"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(
      f"{path}: --x tasks needs the run's meta_batch from {config} ({e!r})"
    ) from None
  if (
    isinstance(meta_batch, bool)
    or not isinstance(meta_batch, int)
    or meta_batch < 1
  ):
    raise SystemExit(
      f"{config}: meta_batch must be a positive integer; got {meta_batch!r}"
    )
  return meta_batch


def x_scales(runs, x: str) -> dict[str, int]:
  """Per run label, the factor from its meta-step to the ``x`` axis: 1 for
  ``"meta-step"``, the run's meta-batch for ``"tasks"``."""
  if x == "meta-step":
    return {label: 1 for label, _ in runs}
  return {label: tasks_per_step(path) for label, path in runs}


def best_validation(records) -> tuple[int | None, float | None]:
  steps, values = plots.curves(records, "val", "accuracy_after")
  if not values:
    return None, None
  best = max(range(len(values)), key=values.__getitem__)
  return steps[best], values[best]


def panels_for(runs: dict[str, list[dict]]) -> tuple:
  """``PANELS``, and each of ``OPTIONAL_PANELS`` that some run logged."""
  return PANELS + tuple(
    panel
    for panel in OPTIONAL_PANELS
    if any(plots.curves(records, *panel[:2])[0] for records in runs.values())
  )


def plot(
  runs: dict[str, list[dict]],
  out_png: str,
  scales: dict[str, int] | None = None,
  x_label: str = X_LABELS["meta-step"],
) -> tuple:
  """Draws ``runs`` into ``out_png`` against the meta-step times
  ``scales[label]`` (1 if not given); returns the panels drawn."""
  panels = panels_for(runs)
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
  # One colour per run up to twenty runs (tab10, then tab20), cycling past.
  palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
  colours = [palette[i % len(palette)] for i in range(len(runs))]
  for ax, (split, key, title, log) in zip(axes, panels):
    for (label, records), colour in zip(runs.items(), colours):
      steps, values = plots.curves(records, split, key)
      if steps:
        scale = 1 if scales is None else scales[label]
        ax.plot(
          [scale * step for step in steps],
          values,
          label=label,
          color=colour,
          marker="." if split == "val" else None,
        )
    ax.set_title(title)
    ax.set_xlabel(x_label)
    if log:
      ax.set_yscale("log")
  # One entry per run (from whichever panel drew it), beside the panels,
  # where it hides no curve.
  entries = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      entries.setdefault(label, handle)
  fig.tight_layout()
  fig.legend(
    list(entries.values()),
    list(entries),
    loc="upper left",
    bbox_to_anchor=(1.0, 0.95),
    fontsize="small",
  )
  fig.savefig(out_png, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return panels


def write_csv(
  runs: dict[str, list[dict]],
  out_csv: str,
  scales: dict[str, int] | None = None,
) -> list[dict]:
  """The validation points of ``runs``; with ``scales`` (tasks per
  meta-step, per run) each row also gives the ``tasks`` seen."""
  rows = []
  for label, records in runs.items():
    best_step, best = best_validation(records)
    for step, value in zip(*plots.curves(records, "val", "accuracy_after")):
      row = {"run": label, "step": step}
      if scales is not None:
        row["tasks"] = scales[label] * step
      rows.append(
        {
          **row,
          "val_accuracy_after": value,
          "best_step": best_step,
          "best_val_accuracy_after": best,
        }
      )
  fields = (
    ["run", "step"]
    + (["tasks"] if scales is not None else [])
    + ["val_accuracy_after", "best_step", "best_val_accuracy_after"]
  )
  with open(out_csv, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  return rows


def parse_paired(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``"A + B minus C"`` as ``(("A", "B"), ("C",))``."""
  left, sep, right = text.partition(" minus ")
  sides = tuple(
    tuple(label.strip() for label in side.split(" + "))
    for side in (left, right)
  )
  if not sep or " minus " in right or not all(all(s) for s in sides):
    raise argparse.ArgumentTypeError(
      f'a paired difference is "A minus B", a side one label or labels '
      f'joined by " + "; got {text!r}'
    )
  return sides


def split_item(item: str, paths: dict[str, Path]) -> tuple[str, str]:
  """``(label, eval file)`` of a side's item: ``("m", "")`` for a label,
  ``("m", "eval_val.json")`` for ``"m:eval_val.json"``."""
  if item in paths:
    return item, ""
  label, _, eval_file = item.partition(":")
  return label, eval_file


def per_task_scores(item: str, paths: dict[str, Path], protocol: str) -> dict:
  """The per-task test scores of ``item``: a run's label (its work directory
  holds ``paths[label]``), tested under ``protocol``, or ``LABEL:FILE``, the
  scores in the ``imaml-eval`` result ``FILE`` of that run's directory, under
  the protocol that file names; exits naming the run if it has none. The
  scores carry their protocol's name as ``"protocol"``."""
  label, eval_file = split_item(item, paths)
  if eval_file:
    path = paths[label].parent / eval_file
    try:
      found = json.loads(path.read_text())
      scores = found["test_per_task"]
    except (OSError, ValueError, KeyError) as e:
      raise SystemExit(
        f"{item}: no per-task scores in {path} ({e!r})"
      ) from None
    # Files written before protocols existed were all tested under ours.
    name = found.get("protocol", {}).get("name", "ours")
    return {**scores, "protocol": name}
  path = paths[label]
  run = tables.read_run(path.parent)
  key = "authors_per_task" if protocol == "authors" else "per_task"
  if run is None or key not in run:
    source = (
      "imaml-eval --protocol authors"
      if protocol == "authors"
      else "results.json (or imaml-eval)"
    )
    whose = {"ours": "our", "authors": "the authors'"}[protocol]
    raise SystemExit(
      f"{label}: no per-task test scores under {whose} "
      f"protocol in {path.parent} (from {source})"
    )
  return {**run[key], "protocol": protocol}


# What the runs of one side must share to be averaged task by task.
SAME_TO_AVERAGE = ("tasks_sha256", "metric", "protocol")


def mean_scores(labels, scores: dict[str, dict]) -> dict:
  """The per-task mean of the runs ``labels``, which must share tasks."""
  first = scores[labels[0]]
  for label in labels[1:]:
    other = scores[label]
    if any(other[k] != first[k] for k in SAME_TO_AVERAGE) or len(
      other["values"]
    ) != len(first["values"]):
      raise SystemExit(
        f"{labels[0]} and {label} were not tested on the same "
        f"tasks (or metric, or protocol); they cannot be averaged per task"
      )
  values = np.mean([scores[label]["values"] for label in labels], axis=0)
  return {**first, "values": values.tolist()}


def paired_differences(
  pairs, paths: dict[str, Path], protocol: str
) -> list[dict]:
  """One row per ``(left, right)`` pair of label tuples: the paired mean
  difference of their (seed-averaged) per-task scores and its interval."""
  named = list(
    dict.fromkeys(label for pair in pairs for side in pair for label in side)
  )  # In order, once each.
  unknown = [item for item in named if split_item(item, paths)[0] not in paths]
  if unknown:
    raise SystemExit(
      f"--paired names runs that were not given: {', '.join(unknown)}"
    )
  scores = {item: per_task_scores(item, paths, protocol) for item in named}
  rows = []
  for left, right in pairs:
    a, b = mean_scores(left, scores), mean_scores(right, scores)
    found = tables.paired_difference_and_tasks(a, b)
    if found is None:
      raise SystemExit(
        f"{' + '.join(left)} and {' + '.join(right)} were not "
        f"tested on the same tasks; they cannot be paired"
      )
    mean, ci95, tasks = found
    seeds = seed_level_difference(
      [run_accuracy(scores[item]) for item in left],
      [run_accuracy(scores[item]) for item in right],
    )
    rows.append(
      {
        "difference": f"{' + '.join(left)} minus {' + '.join(right)}",
        # The protocol of each side's scores (one name where they agree).
        "protocol": " / ".join(dict.fromkeys((a["protocol"], b["protocol"]))),
        "mean": mean,
        "ci95": ci95,
        "tasks": tasks,  # Those both sides were tested on.
        "sign": sign(mean, ci95),
        "seed_ci95": "" if seeds is None else seeds[1],
      }
    )
  return rows


def run_accuracy(scores: dict) -> float:
  """A run's mean per-task score, in points."""
  return 100 * float(np.mean(scores["values"]))


def seed_level_difference(
  a: list[float], b: list[float]
) -> tuple[float, float] | None:
  """Difference of the means of two groups of runs (one accuracy per run,
  such as training seeds) and its 95% half-width by Welch's t interval, or
  ``None`` unless each group holds two runs or more.

  With ``v = var_a / n_a + var_b / n_b`` (sample variances) the half-width
  is ``t(0.975, nu) * sqrt(v)``, ``nu = v^2 / ((var_a / n_a)^2 / (n_a - 1)
  + (var_b / n_b)^2 / (n_b - 1))`` (Welch-Satterthwaite).

  Example:
    >>> [round(x, 3) for x in seed_level_difference([97.0, 97.6, 97.2],
    ...                                             [97.1, 96.9, 97.0])]
    [0.267, 0.679]
  """
  if len(a) < 2 or len(b) < 2:
    return None
  va, vb = (np.var(g, ddof=1) / len(g) for g in (a, b))
  difference = float(np.mean(a) - np.mean(b))
  if va + vb == 0:
    return difference, 0.0
  nu = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  return difference, float(scipy.stats.t.ppf(0.975, nu) * np.sqrt(va + vb))


def sign(mean: float, ci95: float) -> str:
  """Where the 95% interval of a difference lies with respect to 0."""
  if mean - ci95 > 0:
    return "above 0"
  if mean + ci95 < 0:
    return "below 0"
  return "contains 0"


def paired_markdown(rows: list[dict]) -> list[str]:
  lines = [
    "| difference (points) | paired mean ± 95% "
    "| interval | seed-level 95% (Welch) | protocol |",
    "|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['difference']} | {r['mean']:+.2f} ± {r['ci95']:.2f} | "
    f"{r['sign']} | {seed_text(r)} | {r['protocol']} |"
    for r in rows
  ]
  return lines


def seed_text(row: dict) -> str:
  if row["seed_ci95"] == "":
    return "-"
  return f"± {row['seed_ci95']:.2f} ({sign(row['mean'], row['seed_ci95'])})"


def write_paired_csv(rows: list[dict], out_csv: str) -> None:
  with open(out_csv, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def synthetic_runs(folder: Path) -> list[tuple[str, Path]]:
  """Two small work directories for ``--quick``: metrics, and a test on the
  same four tasks where "a" scores 0.25 above "b" on all but one."""
  runs = []
  per_task = {"a": [1.0, 0.75, 1.0, 0.5], "b": [0.75, 0.5, 0.75, 0.5]}
  for label, peak in (("a", 0.9), ("b", 0.7)):
    workdir = folder / label
    workdir.mkdir()
    with open(workdir / "metrics.jsonl", "w") as f:
      for step in range(100, 1001, 100):
        train = {
          "step": step,
          "split": "train",
          "loss_before": 1.6 + step / 1000,
          "grad_norm": 0.3 + step / 5000,
        }
        if label == "a":  # An iMAML run; "b" stands for MAML.
          train["residual"] = 0.1 + step / 10000
          train["negative_curvature"] = 0.125 * (step > 500)
        f.write(json.dumps(train) + "\n")
        if step % 200 == 0:
          f.write(
            json.dumps(
              {
                "step": step,
                "split": "val",
                "accuracy_after": peak * step / 1000,
              }
            )
            + "\n"
          )
    values = per_task[label]
    results = {
      "test": {
        "accuracy_after": {
          "mean": float(np.mean(values)),
          "ci95": 0.0,
          "n": len(values),
        }
      },
      "budget": {"meta_steps": 1000, "wall_time_s": 1.0, "device": "cpu"},
      "test_per_task": {
        "metric": "accuracy_after",
        "values": values,
        "tasks_sha256": "four synthetic tasks",
      },
    }
    (workdir / "results.json").write_text(json.dumps(results))
    runs.append((label, workdir / "metrics.jsonl"))
  return runs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="*", type=parse_run, metavar="LABEL=PATH")
  parser.add_argument(
    "--out",
    default=None,
    help="output stem: writes OUT.png and OUT.csv (and "
    "OUT_paired.csv with --paired)",
  )
  parser.add_argument(
    "--paired",
    action="append",
    default=[],
    type=parse_paired,
    metavar='"A minus B"',
    help="paired per-task test difference of two runs (a "
    'side may be "A0 + A1", their per-task mean); '
    "repeatable",
  )
  parser.add_argument(
    "--protocol",
    choices=("ours", "authors"),
    default="ours",
    help="whose test --paired compares (default: ours)",
  )
  parser.add_argument(
    "--x",
    choices=tuple(X_LABELS),
    default="meta-step",
    help="the panels' horizontal axis: the meta-step "
    "(default), or the training tasks seen, meta-step x "
    "the run's meta_batch (from its config.json)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="plot two synthetic runs and pair their tests",
  )
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    if args.quick:
      args.runs = synthetic_runs(Path(tmp))
      args.out = args.out or os.path.join(tmp, "compare_runs_quick")
      args.paired = args.paired or [(("a",), ("b",)), (("a", "b"), ("b",))]
    if not args.runs:
      parser.error("give at least one LABEL=PATH (or --quick)")
    if not args.out:
      parser.error("give --out STEM")
    runs = load_runs(args.runs)
    scales = x_scales(args.runs, args.x)
    paired = paired_differences(args.paired, dict(args.runs), args.protocol)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    panels = plot(runs, args.out + ".png", scales, X_LABELS[args.x])
    print("panels: " + "; ".join(title for _, _, title, _ in panels))
    write_csv(runs, args.out + ".csv", scales if args.x == "tasks" else None)
    for label, records in runs.items():
      step, best = best_validation(records)
      last = records[-1].get("step")
      best_text = "none" if best is None else f"{100 * best:.2f}% at {step}"
      print(f"{label}: last step {last}; best validation {best_text}")
    print(f"wrote {args.out}.{{png,csv}}")
    if paired:
      print("\n".join(paired_markdown(paired)))
      write_paired_csv(paired, args.out + "_paired.csv")
      print(f"wrote {args.out}_paired.csv")


if __name__ == "__main__":
  main()
