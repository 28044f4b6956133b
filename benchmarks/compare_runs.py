"""Learning curves of several training runs on one figure.

Each run is a ``metrics.jsonl`` written by ``imaml-train`` (or the work
directory holding it), given as ``LABEL=PATH``. The figure's panels, against
the meta-step: validation accuracy after adaptation; the training query loss
at the meta-parameters before adaptation (``loss_before``, whose growth shows
the meta-parameters' predictions sharpening); the training meta-gradient
norm (log scale); and, where a run logs it (iMAML), CG's relative residual
on the meta-gradient's linear system. The validation points of every run go
to a CSV beside the PNG, with the step and value of each run's best
validation.

    python benchmarks/compare_runs.py --out benchmarks/results/stability \\
        plain=benchmarks/results/gpu_5w1s_plain_h100_metrics.jsonl \\
        checked=benchmarks/runs_gpu_h100/omniglot_5w1s_imaml_gd
    python benchmarks/compare_runs.py --quick     # two synthetic runs (tests)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from imaml_jax.train import metrics_log, plots  # noqa: E402

PANELS = (("val", "accuracy_after", "validation accuracy after adaptation",
           False),
          ("train", "loss_before", "train query loss at theta", True),
          ("train", "grad_norm", "train meta-gradient norm", True))
# Drawn when a run logs it (iMAML): how well CG solved the linear system.
RESIDUAL_PANEL = ("train", "residual", "train CG relative residual", True)


def parse_run(text: str) -> tuple[str, Path]:
  label, sep, path = text.partition("=")
  if not sep or not label or not path:
    raise argparse.ArgumentTypeError(
        f"a run is LABEL=PATH (metrics.jsonl or its work directory); got "
        f"{text!r}")
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


def best_validation(records) -> tuple[int | None, float | None]:
  steps, values = plots.curves(records, "val", "accuracy_after")
  if not values:
    return None, None
  best = max(range(len(values)), key=values.__getitem__)
  return steps[best], values[best]


def panels_for(runs: dict[str, list[dict]]) -> tuple:
  """``PANELS``, and the CG residual's where any run logged it."""
  logged = any(plots.curves(records, *RESIDUAL_PANEL[:2])[0]
               for records in runs.values())
  return PANELS + ((RESIDUAL_PANEL,) if logged else ())


def plot(runs: dict[str, list[dict]], out_png: str) -> tuple:
  """Draws ``runs`` into ``out_png``; returns the panels drawn."""
  panels = panels_for(runs)
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
  for ax, (split, key, title, log) in zip(axes, panels):
    for label, records in runs.items():
      steps, values = plots.curves(records, split, key)
      if steps:
        ax.plot(steps, values, label=label, marker="." if split == "val"
                else None)
    ax.set_title(title)
    ax.set_xlabel("meta-step")
    if log:
      ax.set_yscale("log")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return panels


def write_csv(runs: dict[str, list[dict]], out_csv: str) -> list[dict]:
  rows = []
  for label, records in runs.items():
    best_step, best = best_validation(records)
    for step, value in zip(*plots.curves(records, "val", "accuracy_after")):
      rows.append({"run": label, "step": step, "val_accuracy_after": value,
                   "best_step": best_step, "best_val_accuracy_after": best})
  with open(out_csv, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["run", "step",
                                           "val_accuracy_after", "best_step",
                                           "best_val_accuracy_after"])
    writer.writeheader()
    writer.writerows(rows)
  return rows


def synthetic_runs(folder: Path) -> list[tuple[str, Path]]:
  """Two small metrics files for ``--quick``."""
  runs = []
  for label, peak in (("a", 0.9), ("b", 0.7)):
    path = folder / f"{label}.jsonl"
    with open(path, "w") as f:
      for step in range(100, 1001, 100):
        train = {"step": step, "split": "train",
                 "loss_before": 1.6 + step / 1000,
                 "grad_norm": 0.3 + step / 5000}
        if label == "a":      # An iMAML run; "b" stands for MAML.
          train["residual"] = 0.1 + step / 10000
        f.write(json.dumps(train) + "\n")
        if step % 200 == 0:
          f.write(json.dumps({"step": step, "split": "val",
                              "accuracy_after": peak * step / 1000}) + "\n")
    runs.append((label, path))
  return runs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="*", type=parse_run, metavar="LABEL=PATH")
  parser.add_argument("--out", default=None,
                      help="output stem: writes OUT.png and OUT.csv")
  parser.add_argument("--quick", action="store_true",
                      help="plot two synthetic runs")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    if args.quick:
      args.runs = synthetic_runs(Path(tmp))
      args.out = args.out or os.path.join(tmp, "compare_runs_quick")
    if not args.runs:
      parser.error("give at least one LABEL=PATH (or --quick)")
    if not args.out:
      parser.error("give --out STEM")
    runs = load_runs(args.runs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    panels = plot(runs, args.out + ".png")
    print("panels: " + "; ".join(title for _, _, title, _ in panels))
    write_csv(runs, args.out + ".csv")
    for label, records in runs.items():
      step, best = best_validation(records)
      last = records[-1].get("step")
      best_text = "none" if best is None else f"{100 * best:.2f}% at {step}"
      print(f"{label}: last step {last}; best validation {best_text}")
    print(f"wrote {args.out}.{{png,csv}}")


if __name__ == "__main__":
  main()
