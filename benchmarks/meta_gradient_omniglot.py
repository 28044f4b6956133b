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

``--variant KEY=VALUE[,KEY=VALUE]`` (repeatable) measures, against the same
``g*``, the gradient of the run's config with inner-loop or CG fields
changed (``VARIANT_FIELDS``), such as ``inner_steps=64`` or
``inner=nesterov``: how exact the meta-gradient would be with another inner
loop at the same meta-parameters. One row a parameter set and variant, the
run's own first, in ``meta_gradient_omniglot[_<tag>]_variants.csv``.

    python benchmarks/meta_gradient_omniglot.py     # the published model
    python benchmarks/meta_gradient_omniglot.py --workdir benchmarks/runs/omniglot_5w1s_imaml_gd \\
        --tag 5w1s_cpu
    python benchmarks/meta_gradient_omniglot.py --tag inner_loops \\
        --variant inner_steps=32 --variant inner_steps=64 --variant inner=nesterov
    python benchmarks/meta_gradient_omniglot.py --quick   # random images

Writes ``benchmarks/results/meta_gradient_omniglot[_<tag>].{csv,json}``
(one row a parameter set; the JSON also holds each task's numbers: its
scalars, and each gradient's norm and relative error against ``g*``).
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
# What --variant may change: how the inner loop and CG run, not the problem
# they solve (lam, the damping and the data stay the run's).
VARIANT_FIELDS = (
  "inner",
  "inner_steps",
  "inner_lr",
  "inner_backtrack",
  "inner_momentum",
  "hf_cg_steps",
  "cg_steps",
  "cg_stop_at_negative_curvature",
)
VARIANT_SCALARS = (
  "prox_grad_rel",
  "cg_residual",
  "query_loss",
  "query_accuracy",
)


def given(phi) -> im.InnerSolver:
  """An inner "solver" that returns ``phi``: a fixed adapted point."""
  return im.InnerSolver(
    run=lambda objective, x0, remat=False: phi, steps=1, name="given"
  )


def task_numbers(config, loss, run_algorithm, theta, task, args, variants=()):
  """The five gradients of one task (flat) and its scalar diagnostics.

  The run's gradient is the run's system solved at its own ``phi_K``
  (``run_algorithm.adapt``), which is what ``run_algorithm.task_gradient``
  computes; ``phi_K`` is run once and serves the inner loop's part too.
  Each of ``variants``, an ``(algorithm, linear solver)`` pair, adds the
  gradient ``variant<i>`` computed the same way with its inner loop and
  solver, and its scalars ``variant<i>_<name>`` (``VARIANT_SCALARS``).
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
  for i, (algorithm, solver) in enumerate(variants):
    phi_v = algorithm.adapt(loss, theta, task.support)
    gradients[f"variant{i}"], metrics = gradient(phi_v, solver)
    scalars[f"variant{i}_prox_grad_rel"] = (
      proximal_gradient_norm(phi_v) / at_theta
    )
    scalars[f"variant{i}_cg_residual"] = metrics["residual"]
    scalars[f"variant{i}_query_loss"] = metrics["loss_after"]
    scalars[f"variant{i}_query_accuracy"] = metrics["accuracy_after"]
  return gradients, scalars


def cosine(a, b) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative_error(a, reference) -> float:
  return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


def batch_report(gradients: dict) -> dict:
  """Errors against ``g*``: per task (median) and of the batch means, for
  every gradient of ``gradients`` but ``g*`` itself."""
  star = gradients["star"].astype(np.float64)
  out = {}
  for name in gradients:
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


def task_errors(batches: list[dict]) -> dict:
  """Per task, over the batches in order: the norm of every gradient
  (``<name>_norm``) and its relative error against ``g*``
  (``<name>_rel_error``), as lists."""
  star = np.concatenate([b["star"] for b in batches]).astype(np.float64)
  star_norm = np.linalg.norm(star, axis=1)
  out = {}
  for name in batches[0]:
    g = np.concatenate([b[name] for b in batches]).astype(np.float64)
    out[f"{name}_norm"] = np.linalg.norm(g, axis=1).tolist()
    if name != "star":
      error = np.linalg.norm(g - star, axis=1) / star_norm
      out[f"{name}_rel_error"] = error.tolist()
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


def load_imaml_run(parser, workdir):
  """The config and last checkpoint of the Omniglot iMAML run in
  ``workdir``; anything else is refused through ``parser.error``."""
  try:
    config, path = train.load_run(workdir)
  except train.WorkdirError as e:
    parser.error(str(e))
  if config.dataset != "omniglot" or config.algorithm != "imaml":
    parser.error(
      f"{workdir} is a {config.dataset} {config.algorithm} run; this "
      "script diagnoses Omniglot iMAML runs"
    )
  return config, path


def meta_training_images(config, data_dir, quick: bool):
  """The meta-training images the run drew its tasks from, or random ones
  of their shape with ``quick``."""
  if quick:
    return random_images(config)
  data_dir = exp_lib.resolve_data_dir(config, data_dir)
  return exp_lib.load_data(config, data_dir).train


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
  parser.add_argument(
    "--variant",
    action="append",
    default=[],
    metavar="KEY=VALUE[,KEY=VALUE]",
    help="also the gradient of the run's config with these fields changed "
    f"({', '.join(VARIANT_FIELDS)}), e.g. inner_steps=64; repeatable",
  )
  parser.add_argument("--tag", default=None)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if args.batches < 1 or args.ref_inner_steps < 1 or args.ref_cg_steps < 1:
    parser.error("--batches, --ref-inner-steps and --ref-cg-steps must be >= 1")
  try:
    variant_overrides = [parse_variant(text) for text in args.variant]
  except ValueError as e:
    parser.error(str(e))

  stored, path = load_imaml_run(parser, args.workdir)
  config = stored
  try:
    variants = [
      train.apply_overrides(config, overrides)
      for overrides in variant_overrides
    ]
  except train.ConfigError as e:
    parser.error(f"--variant: {e}")
  if args.quick:
    args.ref_inner_steps, args.ref_cg_steps = 20, 10
    config = train.apply_overrides(config, ["meta_batch=2"])
  images = meta_training_images(config, args.data_dir, args.quick)
  variant_solvers = [
    (exp_lib.algorithm(v), exp_lib.linear_solver(v)) for v in variants
  ]
  exp = exp_lib.build(config, None)
  points = load_points(path, stored, exp)
  images = jnp.asarray(images)
  per_task = jax.jit(
    jax.vmap(
      lambda theta, task: task_numbers(
        config, exp.loss, exp.algorithm, theta, task, args, variant_solvers
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
  rows, variant_rows, tasks_out = [], [], {}
  for label, theta in points.items():
    start = time.perf_counter()
    batches = []
    for b in range(args.batches):
      tasks = exp.sample(jax.random.key(args.seed * 1000 + b), images)
      gradients, scalars = jax.device_get(per_task(theta, tasks))
      batches.append((gradients, scalars))
    row = {"parameters": label, "tasks": args.batches * config.meta_batch}
    reports = [batch_report(g) for g, _ in batches]
    report = {k: float(np.median([r[k] for r in reports])) for k in reports[0]}
    row.update({k: v for k, v in report.items() if not k.startswith("variant")})
    scalars = {
      k: np.concatenate([np.asarray(s[k]) for _, s in batches])
      for k in batches[0][1]
    }
    for key, values in scalars.items():
      if key.startswith("variant"):
        continue
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
    tasks_out[label].update(task_errors([g for g, _ in batches]))
    print(summary_line(row))
    for i, variant in enumerate([config, *variants]):
      prefix = "run" if i == 0 else f"variant{i - 1}"
      variant_rows.append(
        variant_row(label, variant, config, prefix, report, scalars)
      )
      print("  " + variant_line(variant_rows[-1]))
  write(args, rows, tasks_out, config, variant_rows if variants else [])


def parse_variant(text: str) -> list[str]:
  """``"inner_steps=64,inner=nesterov"`` -> its overrides, each a field of
  ``VARIANT_FIELDS``.

  Raises:
    ValueError: an item that is not ``KEY=VALUE`` or a field outside them.
  """
  overrides = [item.strip() for item in text.split(",") if item.strip()]
  if not overrides:
    raise ValueError(f"--variant {text!r} changes nothing")
  for item in overrides:
    key, sep, _ = item.partition("=")
    if not sep or key.strip() not in VARIANT_FIELDS:
      raise ValueError(
        f"--variant {item!r}: give KEY=VALUE with KEY one of "
        f"{', '.join(VARIANT_FIELDS)}"
      )
  return overrides


def variant_row(label, variant, config, prefix, report, scalars) -> dict:
  """One parameter set's numbers for the run's gradient (``prefix`` "run")
  or a variant's: its error against ``g*`` and its scalars' means."""
  changed = {
    k: getattr(variant, k)
    for k in VARIANT_FIELDS
    if getattr(variant, k) != getattr(config, k)
  }
  own = {
    "prox_grad_rel": "prox_grad_rel_k",
    "cg_residual": "cg_residual_run",
    "query_loss": "query_loss_k",
    "query_accuracy": "query_accuracy_k",
  }
  row = {
    "parameters": label,
    "variant": ", ".join(f"{k}={v}" for k, v in changed.items())
    or "as trained",
    "algorithm": exp_lib.algorithm(variant).name,
  }
  for key in ("mean_rel_error", "mean_cosine", "task_rel_error_median"):
    row[key] = report[f"{prefix}_{key}"]
  for name in VARIANT_SCALARS:
    key = own[name] if prefix == "run" else f"{prefix}_{name}"
    row[f"{name}_median"] = float(np.median(scalars[key]))
    row[f"{name}_mean"] = float(np.mean(scalars[key]))
  return row


def variant_line(row: dict) -> str:
  return (
    f"{row['variant']} ({row['algorithm']}): batch mean against g* "
    f"{row['mean_rel_error']:.3f} (cos {row['mean_cosine']:.4f}), per task "
    f"median {row['task_rel_error_median']:.3f}; |grad G| rel. "
    f"{row['prox_grad_rel_median']:.2e}; CG residual "
    f"{row['cg_residual_median']:.3f}; query loss {row['query_loss_mean']:.4f}, "
    f"accuracy {row['query_accuracy_mean']:.4f}"
  )


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


def write(args, rows, tasks_out, config, variant_rows=()) -> None:
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
  if variant_rows:  # per parameter set: the run's own row, its variants'
    with open(stem + "_variants.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(variant_rows[0]))
      writer.writeheader()
      writer.writerows(variant_rows)
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
        "variants": list(variant_rows),
        "tasks": tasks_out,
      },
      f,
      indent=1,
    )
  print(f"wrote {stem}.csv and {stem}.json")
  if variant_rows:
    print(f"wrote {stem}_variants.csv")


if __name__ == "__main__":
  main()
