"""Does a long meta-training run drift towards collapse? Diagnostics per checkpoint.

For every checkpoint of an Omniglot run (``checkpoint_every`` apart), this
script puts side by side

  * from the run's ``metrics.jsonl`` (window means of the training steps
    that end at the checkpoint's step): the norm of theta (``param_norm``),
    the query loss before adaptation (``loss_before``: its rise is the
    sharpening that preceded every collapse seen so far), the CG(5) relative
    residual, the meta-gradient norm, and the validation accuracy;
  * measured here at the checkpoint's theta (``benchmarks/curvature.py``):
    the extreme eigenvalues of ``I + H/lam`` at the parameters the run's own
    inner loop reaches, on ``--tasks`` meta-training tasks, and the fraction
    of tasks where the system is indefinite: by power iteration (which
    misses negative eigenvalues when the spectrum is wide) and where CG
    met a direction of non-positive curvature within 5 steps (the paper's
    count), a proof.

    python benchmarks/stability_diagnostics.py --workdir benchmarks/runs/RUN \\
        --label "constant lr, Adam eps 1e-3"
    python benchmarks/stability_diagnostics.py --quick     # random images

Writes ``benchmarks/results/stability_<tag>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile

import matplotlib
from arguments import count

matplotlib.use("Agg")
import curvature  # pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from imaml_jax.train import CONFIG_FILE  # pylint: disable=wrong-import-position
from imaml_jax.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from imaml_jax.train import config as config_lib  # pylint: disable=wrong-import-position
from imaml_jax.train import metrics_log  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# The published model's run: the one whose checkpoint the repository keeps.
DEFAULT_RUN = os.path.join(
  HERE, "runs_gpu_h200", "stability_5w1s_constant_eps1e-3_mb32"
)
METRICS = (
  "param_norm",
  "loss_before",
  "residual",
  "grad_norm",
  "accuracy_after",
)


def metrics_at(records: list[dict], step: int) -> dict:
  """The training window and validation records logged at ``step``."""
  out = {}
  for record in records:
    if record.get("step") != step:
      continue
    if record.get("split") == "train":
      out.update({k: record[k] for k in METRICS if k in record})
    elif record.get("split") == "val":
      out["val_accuracy"] = record.get("accuracy_after")
  return out


def spectrum_at(
  checkpoint: str, config: config_lib.Config, tasks: int, quick: bool
) -> dict:
  """Extreme eigenvalues of ``I + H/lam`` after the run's inner loop."""
  argv = [
    "--checkpoint",
    checkpoint,
    "--n-way",
    str(config.n_way),
    "--k-shot",
    str(config.k_shot),
    "--lam",
    str(config.lam),
    "--inner-steps",
    str(config.inner_steps),
    "--inner-lr",
    str(config.inner_lr),
    "--tasks",
    str(tasks),
  ]
  if config.inner_backtrack:
    argv.append("--backtrack")
  if quick:
    argv.append("--quick")
  with tempfile.TemporaryDirectory() as out:
    (row,) = curvature.main(argv + ["--out", out, "--tag", "probe"])
  return {
    "eig_min": row["eig_min_min"],
    "eig_min_median": row["eig_min_median"],
    "eig_max": row["eig_max_max"],
    "indefinite_fraction": row["indefinite_fraction"],
    "indefinite_fraction_cg": row["indefinite_fraction_cg"],
    "cg5_residual_measured": row["cg5_residual_median"],
  }


def plot(rows: list[dict], path: str, title: str) -> None:
  panels = [
    ("param_norm", "||theta||"),
    ("loss_before", "query loss at theta"),
    ("residual", "CG(5) relative residual (training)"),
    ("eig", "eigenvalues of I + H/lam"),
    ("val_accuracy", "validation accuracy"),
  ]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  steps = [r["step"] for r in rows]
  for ax, (key, label) in zip(axes, panels):
    if key == "eig":
      ax.plot(steps, [r["eig_max"] for r in rows], "o-", label="largest")
      ax.plot(steps, [r["eig_min"] for r in rows], "o-", label="smallest")
      ax.plot(
        steps,
        [r["eig_min_median"] for r in rows],
        "o--",
        label="smallest (task median)",
      )
      ax.axhline(0, color="black", lw=0.8)
      ax.set_yscale("symlog", linthresh=1)
      ax.legend(fontsize=7)
    else:
      ax.plot(steps, [r.get(key) for r in rows], "o-")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("meta-step")
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=DEFAULT_RUN)
  parser.add_argument("--tasks", type=count(1), default=8)
  parser.add_argument("--label", default=None)
  parser.add_argument(
    "--quick",
    action="store_true",
    help="the last two checkpoints, random images, 2 tasks",
  )
  parser.add_argument("--tag", default=None)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  config_path = os.path.join(args.workdir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    parser.error(f"{args.workdir} holds no run (no {CONFIG_FILE})")
  with open(config_path) as f:
    config = config_lib.from_dict(json.load(f))
  if config.dataset != "omniglot" or config.algorithm != "imaml":
    parser.error("the spectrum is measured for Omniglot iMAML runs only")
  checkpoints = ckpt_lib.list_checkpoints(
    os.path.join(args.workdir, "checkpoints")
  )
  if not checkpoints:
    parser.error(f"no checkpoint in {args.workdir}/checkpoints")
  if args.quick:
    checkpoints = checkpoints[-2:]
  records = metrics_log.read_records(
    os.path.join(args.workdir, "metrics.jsonl")
  )
  rows = []
  for step, path in checkpoints:
    row = {
      "step": step,
      **metrics_at(records, step),
      **spectrum_at(str(path), config, args.tasks, args.quick),
    }
    rows.append(row)
    print(
      f"step {step}: ||theta|| {row.get('param_norm', float('nan')):.2f}, "
      f"loss_before {row.get('loss_before', float('nan')):.3f}, "
      f"CG residual {row.get('residual', float('nan')):.3f}, "
      f"eig(I + H/lam) in [{row['eig_min']:.2f}, {row['eig_max']:.2f}], "
      f"indefinite on {100 * row['indefinite_fraction']:.0f}% of tasks "
      f"by power iteration, {100 * row['indefinite_fraction_cg']:.0f}% "
      "by CG",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  tag = args.tag or (
    os.path.basename(os.path.normpath(args.workdir))
    + ("_quick" if args.quick else "")
  )
  stem = os.path.join(args.out, f"stability_{tag}")
  with open(stem + ".json", "w") as f:
    json.dump(
      {
        "workdir": args.workdir,
        "label": args.label,
        "config": config_lib.to_dict(config),
        "rows": rows,
      },
      f,
      indent=2,
    )
  with open(stem + ".csv", "w", newline="") as f:
    fields = sorted(
      {k for r in rows for k in r}, key=lambda k: (k != "step", k)
    )
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  plot(rows, stem + ".png", args.label or tag)
  print(f"wrote {stem}.{{csv,json,png}}")
  return rows


if __name__ == "__main__":
  main()
