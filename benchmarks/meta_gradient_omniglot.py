"""How exact is iMAML's meta-gradient at a trained Omniglot model?

The implicit meta-gradient of Lemma 1, ``g* = (I + H/lam)^{-1} grad L_q(phi*)``
with ``H`` the support loss's Hessian, holds at the proximal minimiser
``phi*``. A run computes instead ``g = CG_m(I + H(phi_K)/lam, grad
L_q(phi_K))``: its inner loop stops at ``phi_K`` and CG after ``m`` steps.
For the meta-parameters ``theta`` of a run's checkpoint (best-validation and
last), on meta-training tasks drawn as the run draws them (``meta_batch`` a
batch), this script measures how far ``g`` is from ``g*``, per task and for
the batch mean (the direction Adam is given), and splits the error:

* **the run's gradient** ``g``: its own ``task_gradient`` (inner loop and
  CG as configured);
* **the inner loop's part**: ``phi_K`` with the reference CG;
* **CG's part**: the reference ``phi*`` with the run's CG;
* **the reference** ``g*``: ``phi*`` from ``--ref-inner-steps`` checked
  gradient steps on the proximal objective, then ``--ref-cg-steps`` CG
  steps. It is checked against itself: as many more inner steps from
  ``phi*`` and twice the CG steps give ``g**``, and ``||g** - g*|| /
  ||g*||`` says how well the reference has converged; the comparison means
  something where that is far below the run's error.

Beside them: the proximal gradient ``||grad G(phi)|| / ||grad G(theta)||``
at ``phi_K`` and ``phi*`` (``G = L_s + lam/2 ||phi - theta||^2``, 0 at a
smooth minimiser; ReLU kinks can keep it above 0), CG's relative residuals,
the query loss and accuracy at ``phi_K`` and ``phi*``, and, for scale, the
cosine between the mean ``g*`` of two independent batches: how much the
meta-gradient changes from one batch of tasks to the next.

    python benchmarks/meta_gradient_omniglot.py     # the published model
    python benchmarks/meta_gradient_omniglot.py --workdir benchmarks/runs/omniglot_5w1s_imaml_gd \\
        --tag 5w1s_cpu
    python benchmarks/meta_gradient_omniglot.py --quick   # random images

Writes ``benchmarks/results/meta_gradient_omniglot[_<tag>].{csv,json}``
(one row a parameter set; the JSON also holds each task's numbers).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import imaml_jax as im
from imaml_jax import train
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import protocols

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# The published model's run: the one whose checkpoint the repository keeps.
DEFAULT_RUN = os.path.join(
  HERE, "runs_gpu_h200", "stability_5w1s_constant_eps1e-3_mb32"
)
GRADIENTS = ("run", "inner_part", "cg_part", "star", "star_check")


def given(phi) -> im.InnerSolver:
  """An inner "solver" that returns ``phi``: a fixed adapted point."""
  return im.InnerSolver(
    run=lambda objective, x0, remat=False: phi, steps=1, name="given"
  )


def task_numbers(config, loss, run_algorithm, theta, task, args):
  """The five gradients of one task (flat) and its scalar diagnostics.

  The run's gradient is the run's system solved at its own ``phi_K``
  (``run_algorithm.adapt``), which is what ``run_algorithm.task_gradient``
  computes; ``phi_K`` is run once and serves the inner loop's part too.
  """
  support_loss = lambda p, _: loss(p, task.support)[0]
  objective = im.proximal_objective(support_loss, theta, None, config.lam)
  reference = im.gd(args.ref_inner_steps, config.inner_lr, backtrack=True)
  phi_k = run_algorithm.adapt(loss, theta, task.support)
  phi_star = reference.run(objective, theta)
  phi_check = reference.run(objective, phi_star)

  def gradient(phi, solver):
    algorithm = im.imaml(
      config.lam,
      given(phi),
      solver,
      damping=config.cg_damping,
      lam_damping=config.lam_damping,
    )
    g, metrics = algorithm.task_gradient(loss, theta, task)
    return ravel_pytree(g)[0], metrics

  def proximal_gradient_norm(phi):
    return jnp.linalg.norm(ravel_pytree(jax.grad(objective)(phi))[0])

  runs_cg = exp_lib.linear_solver(config)
  exact, exact_check = im.cg(args.ref_cg_steps), im.cg(2 * args.ref_cg_steps)
  g_run, run_metrics = gradient(phi_k, runs_cg)
  g_inner, inner_metrics = gradient(phi_k, exact)
  g_cg, _ = gradient(phi_star, runs_cg)
  g_star, star_metrics = gradient(phi_star, exact)
  g_check, check_metrics = gradient(phi_check, exact_check)
  at_theta = proximal_gradient_norm(theta)
  gradients = {
    "run": g_run,
    "inner_part": g_inner,
    "cg_part": g_cg,
    "star": g_star,
    "star_check": g_check,
  }
  scalars = {
    "prox_grad_rel_k": proximal_gradient_norm(phi_k) / at_theta,
    "prox_grad_rel_star": proximal_gradient_norm(phi_star) / at_theta,
    "prox_grad_rel_check": proximal_gradient_norm(phi_check) / at_theta,
    "cg_residual_run": run_metrics["residual"],
    "cg_residual_ref_at_k": inner_metrics["residual"],
    "cg_residual_ref_at_star": star_metrics["residual"],
    "cg_residual_check": check_metrics["residual"],
    "query_loss_k": run_metrics["loss_after"],
    "query_loss_star": star_metrics["loss_after"],
    "query_accuracy_k": run_metrics["accuracy_after"],
    "query_accuracy_star": star_metrics["accuracy_after"],
  }
  return gradients, scalars


def cosine(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative_error(a, reference) -> float:
  return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


def batch_report(gradients: dict) -> dict:
  """Errors against ``g*``: per task (median) and of the batch means."""
  star = gradients["star"].astype(np.float64)
  out = {}
  for name in GRADIENTS:
    if name == "star":
      continue
    g = gradients[name].astype(np.float64)
    per_task_err = [relative_error(a, b) for a, b in zip(g, star)]
    per_task_cos = [cosine(a, b) for a, b in zip(g, star)]
    out[f"{name}_task_rel_error_median"] = float(np.median(per_task_err))
    out[f"{name}_task_cosine_median"] = float(np.median(per_task_cos))
    out[f"{name}_task_cosine_min"] = float(np.min(per_task_cos))
    out[f"{name}_mean_rel_error"] = relative_error(g.mean(0), star.mean(0))
    out[f"{name}_mean_cosine"] = cosine(g.mean(0), star.mean(0))
  return out


def load_points(path, config, exp) -> dict:
  """The last and (if earlier) best-validation meta-parameters of checkpoint
  ``path``, restored as ``imaml-eval`` restores them."""
  step, last, best = protocols.restore_parameters(path, config, exp)
  points = {}
  if 0 <= int(best["step"]) < step:
    points[f"best (step {int(best['step'])})"] = best["params"]
  points[f"last (step {step})"] = last
  return points


def random_images(config) -> np.ndarray:
  """Random uint8 images in the shape of Omniglot's (``--quick``)."""
  classes = max(2 * config.n_way, 10)
  return np.random.default_rng(0).integers(
    0, 256, (classes, 20, 28, 28, 1), dtype=np.uint8
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--workdir", default=DEFAULT_RUN, help="an Omniglot iMAML run"
  )
  parser.add_argument(
    "--batches",
    type=int,
    default=2,
    help="batches of meta_batch meta-training tasks (2 or more give the "
    "batch-to-batch cosine)",
  )
  parser.add_argument("--ref-inner-steps", type=int, default=500)
  parser.add_argument("--ref-cg-steps", type=int, default=100)
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument(
    "--data-dir",
    default=None,
    help="Omniglot folder (default: $IMAML_OMNIGLOT_DIR)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="random images, 2 tasks a batch, 20 reference steps, CG(10)",
  )
  parser.add_argument("--tag", default=None)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if args.batches < 1 or args.ref_inner_steps < 1 or args.ref_cg_steps < 1:
    parser.error("--batches, --ref-inner-steps and --ref-cg-steps must be >= 1")

  try:
    stored, path = train.load_run(args.workdir)
  except train.WorkdirError as e:
    parser.error(str(e))
  config = stored
  if config.dataset != "omniglot" or config.algorithm != "imaml":
    parser.error(
      f"{args.workdir} is a {config.dataset} {config.algorithm} run; this "
      "script diagnoses Omniglot iMAML runs"
    )
  if args.quick:
    args.ref_inner_steps, args.ref_cg_steps = 20, 10
    config = train.apply_overrides(config, ["meta_batch=2"])
    images = random_images(config)
  else:
    data_dir = exp_lib.resolve_data_dir(config, args.data_dir)
    images = exp_lib.load_data(config, data_dir).train
  exp = exp_lib.build(config, None)
  points = load_points(path, stored, exp)
  images = jnp.asarray(images)
  per_task = jax.jit(
    jax.vmap(
      lambda theta, task: task_numbers(
        config, exp.loss, exp.algorithm, theta, task, args
      ),
      in_axes=(None, 0),
    )
  )
  print(
    f"{config.n_way}-way {config.k_shot}-shot, lam {config.lam}, the run's "
    f"gradient: {exp.algorithm.name}; reference: {args.ref_inner_steps} "
    f"checked GD steps, CG({args.ref_cg_steps}); {args.batches} batches of "
    f"{config.meta_batch} meta-training tasks; checkpoint {path}"
  )
  rows, tasks_out = [], {}
  for label, theta in points.items():
    start = time.perf_counter()
    batches = []
    for b in range(args.batches):
      tasks = exp.sample(jax.random.key(args.seed * 1000 + b), images)
      gradients, scalars = jax.device_get(per_task(theta, tasks))
      batches.append((gradients, scalars))
    row = {"parameters": label, "tasks": args.batches * config.meta_batch}
    reports = [batch_report(g) for g, _ in batches]
    for key in reports[0]:
      row[key] = float(np.median([r[key] for r in reports]))
    scalars = {
      k: np.concatenate([np.asarray(s[k]) for _, s in batches])
      for k in batches[0][1]
    }
    for key, values in scalars.items():
      row[f"{key}_median"] = float(np.median(values))
      row[f"{key}_mean"] = float(np.mean(values))
      row[f"{key}_max"] = float(np.max(values))
    if args.batches > 1:
      means = [g["star"].astype(np.float64).mean(0) for g, _ in batches]
      row["star_batch_to_batch_cosine"] = float(
        np.median(
          [
            cosine(means[i], means[j])
            for i in range(len(means))
            for j in range(i + 1, len(means))
          ]
        )
      )
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    tasks_out[label] = {k: v.tolist() for k, v in scalars.items()}
    print(summary_line(row))
  write(args, rows, tasks_out, config)


def summary_line(row: dict) -> str:
  text = (
    f"{row['parameters']}: batch mean against g*: the run's "
    f"{row['run_mean_rel_error']:.3f} (cos {row['run_mean_cosine']:.4f}), "
    f"inner loop's part {row['inner_part_mean_rel_error']:.3f}, CG's part "
    f"{row['cg_part_mean_rel_error']:.3f}, reference check "
    f"{row['star_check_mean_rel_error']:.4f}; per task median "
    f"{row['run_task_rel_error_median']:.3f} (cos "
    f"{row['run_task_cosine_median']:.4f}); |grad G| rel. at phi_K "
    f"{row['prox_grad_rel_k_median']:.3f}, at phi* "
    f"{row['prox_grad_rel_star_median']:.2e}; CG residual run "
    f"{row['cg_residual_run_median']:.3f}, reference "
    f"{row['cg_residual_ref_at_star_median']:.1e}; mean query accuracy "
    f"phi_K {row['query_accuracy_k_mean']:.4f} / phi* "
    f"{row['query_accuracy_star_mean']:.4f}, loss "
    f"{row['query_loss_k_mean']:.4f} / {row['query_loss_star_mean']:.4f}"
  )
  if "star_batch_to_batch_cosine" in row:
    text += f"; g* batch to batch cos {row['star_batch_to_batch_cosine']:.3f}"
  return text + f" ({row['seconds']:.0f} s)"


def write(args, rows, tasks_out, config) -> None:
  os.makedirs(args.out, exist_ok=True)
  stem = "meta_gradient_omniglot"
  if args.tag:
    stem += f"_{args.tag}"
  if args.quick:
    stem += "_quick"
  stem = os.path.join(args.out, stem)
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(stem + ".json", "w") as f:
    json.dump(
      {
        "workdir": os.path.relpath(args.workdir, HERE),
        "config": {
          k: getattr(config, k)
          for k in ("n_way", "k_shot", "lam", "inner_steps", "inner_lr")
        },
        "ref_inner_steps": args.ref_inner_steps,
        "ref_cg_steps": args.ref_cg_steps,
        "backend": jax.default_backend(),
        "rows": rows,
        "tasks": tasks_out,
      },
      f,
      indent=1,
    )
  print(f"wrote {stem}.csv and {stem}.json")


if __name__ == "__main__":
  main()
