"""Learning curves from a run's ``metrics.jsonl`` (matplotlib, Agg backend).

Example:
  >>> plot_curves("runs/sinusoid/metrics.jsonl",
  ...             "runs/sinusoid/curves.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from imaml_jax.train import metrics_log  # pylint: disable=wrong-import-position


def curves(records: list[dict], split: str, key: str) -> tuple[list, list]:
  """``(steps, values)`` of ``key`` in the records of ``split``."""
  points = [
    (r["step"], r[key]) for r in records if r.get("split") == split and key in r
  ]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(
  metrics_path: str | os.PathLike,
  out_path: str | os.PathLike,
  *,
  title: str = "",
  loss_name: str = "loss",
) -> bool:
  """Draws query loss (and accuracy, if logged) against the meta-step.

  Training curves are window means of the query metrics after adaptation;
  validation curves are means over the fixed validation tasks. ``loss_name``
  labels the loss axis (e.g. ``"MSE"`` for regression).

  Returns:
    Whether a figure was written (``False`` when there is nothing to plot).
  """
  records = metrics_log.read_records(metrics_path)
  if not records:
    return False
  panels = [("loss_after", f"query {loss_name} after adaptation")]
  if any("accuracy_after" in r for r in records):
    panels.append(("accuracy_after", "query accuracy after adaptation"))
  fig, axes = plt.subplots(
    1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False
  )
  for ax, (key, label) in zip(axes[0], panels):
    for split, style in (("train", "-"), ("val", "o-")):
      steps, values = curves(records, split, key)
      if steps:
        ax.plot(steps, values, style, label=split, markersize=3)
    ax.set_xlabel("meta-step")
    ax.set_ylabel(label)
    if key.startswith("loss"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def plot_sinusoid_fits(
  fits: dict, out_path: str | os.PathLike, *, title: str = ""
) -> None:
  """Draws each task's true sine, support points and the two predictions.

  Args:
    fits: the arrays of :func:`imaml_jax.train.fits.fit_curves`.
    out_path: the PNG to write.
    title: the figure's title.
  """
  n_tasks = len(fits["true"])
  cols = min(n_tasks, 4)
  rows = -(-n_tasks // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharex=True
  )
  for i, ax in enumerate(axes.ravel()):
    if i >= n_tasks:
      ax.axis("off")
      continue
    x = fits["x"]
    ax.plot(x, fits["true"][i], color="black", lw=1.5, label="true")
    ax.plot(
      x, fits["before"][i], "--", color="tab:gray", label="before adaptation"
    )
    ax.plot(x, fits["after"][i], color="tab:red", label="after adaptation")
    ax.plot(
      fits["support_x"][i],
      fits["support_y"][i],
      "o",
      color="tab:blue",
      markersize=4,
      label="support points",
    )
    ax.set_title(
      f"query MSE {fits['mse_before'][i]:.2f} -> {fits['mse_after'][i]:.2f}",
      fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.set_xlabel("x")
  axes[0, 0].legend(fontsize=7, loc="lower left")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
