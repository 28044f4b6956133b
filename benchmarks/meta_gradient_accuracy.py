"""Accuracy of the meta-gradient against the exact answer (the paper's Figure 2a).

On linear-regression tasks the proximal inner problem and the meta-gradient
have closed forms (``imaml_jax.data.linear_regression_exact_meta_gradient``).
This script measures, in float64, the relative error

    ||g_method - g_exact|| / ||g_exact||        (mean over tasks)

of
  * iMAML (``jax.grad`` through ``im.adapt``) as the inner gradient-descent
    steps grow, with conjugate gradient run to convergence, and as the CG
    steps grow, with the inner problem solved to convergence;
  * MAML: reverse-mode differentiation through the same inner steps
    (gradient descent on the same proximal objective), as the steps grow;
  * first-order MAML: the query gradient at the adapted parameters, i.e. the
    Jacobian replaced by the identity, as the steps grow.

Writes ``benchmarks/results/meta_gradient_accuracy.{csv,png}``.

    python benchmarks/meta_gradient_accuracy.py            # full study
    python benchmarks/meta_gradient_accuracy.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import csv
import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import imaml_jax as im  # noqa: E402
from imaml_jax import data  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOSS = data.linear_regression_loss


def imaml_gradient(theta, task, lam, inner, solver):
  """Meta-gradient of one task by implicit differentiation through im.adapt."""

  def meta_loss(t):
    phi = im.adapt(LOSS, t, task.support, lam=lam, inner=inner, solver=solver)
    return LOSS(phi, task.query)

  return jax.grad(meta_loss)(theta)


def maml_gradient(theta, task, lam, inner):
  """Reverse-mode differentiation through the unrolled proximal inner loop."""

  def meta_loss(t):
    phi = inner.run(im.proximal_objective(LOSS, t, task.support, lam), t)
    return LOSS(phi, task.query)

  return jax.grad(meta_loss)(theta)


def fomaml_gradient(theta, task, lam, inner):
  """Query gradient at the adapted parameters (identity Jacobian)."""
  phi = inner.run(im.proximal_objective(LOSS, theta, task.support, lam), theta)
  return jax.grad(LOSS)(phi, task.query)


def mean_relative_error(method, theta, tasks, exact):
  grads = jax.jit(jax.vmap(method, in_axes=(None, 0)))(theta, tasks)
  err = jnp.linalg.norm(grads - exact, axis=-1) / jnp.linalg.norm(
    exact, axis=-1
  )
  return float(jnp.mean(err))


def run(quick: bool):
  lam, dim, n_support, n_query = 1.0, 20, 10, 50
  n_tasks = 4 if quick else 32
  tasks = data.linear_regression_tasks(
    jax.random.key(0), n_tasks, n_support, n_query, dim, dtype=jnp.float64
  )
  theta = jax.random.normal(jax.random.key(1), (dim,), jnp.float64)
  exact = jax.vmap(
    data.linear_regression_exact_meta_gradient, in_axes=(None, 0, None)
  )(theta, tasks, lam)
  # Step size 1/L for the proximal objective, L = lam + largest eigenvalue of H.
  xs = tasks.support[0]
  h_max = float(
    jnp.max(jnp.linalg.eigvalsh(jnp.einsum("tni,tnj->tij", xs, xs) / n_support))
  )
  lr = 1.0 / (lam + h_max)
  inner_steps = (
    [1, 2, 4, 8, 16, 32, 64, 128]
    if quick
    else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
  )
  cg_steps = (
    [1, 2, 4, 8, 12, 16] if quick else [1, 2, 3, 4, 6, 8, 10, 12, 16, 20]
  )
  converged_cg = im.cg(maxiter=4 * dim, tol=0.0)
  converged_inner = im.gd(steps=4096, lr=lr)
  rows = []
  for k in inner_steps:
    inner = im.gd(steps=k, lr=lr)
    for name, method in (
      (
        "imaml",
        lambda t, task: imaml_gradient(t, task, lam, inner, converged_cg),
      ),
      ("maml", lambda t, task: maml_gradient(t, task, lam, inner)),
      ("fomaml", lambda t, task: fomaml_gradient(t, task, lam, inner)),
    ):
      rows.append(
        {
          "method": name,
          "sweep": "inner_steps",
          "inner_steps": k,
          "cg_steps": converged_cg_steps(name, dim),
          "rel_error": mean_relative_error(method, theta, tasks, exact),
        }
      )
  for m in cg_steps:
    solver = im.cg(maxiter=m, tol=0.0)
    rows.append(
      {
        "method": "imaml",
        "sweep": "cg_steps",
        "inner_steps": converged_inner.steps,
        "cg_steps": m,
        "rel_error": mean_relative_error(
          lambda t, task: imaml_gradient(t, task, lam, converged_inner, solver),
          theta,
          tasks,
          exact,
        ),
      }
    )
  return rows, dict(
    lam=lam,
    dim=dim,
    n_support=n_support,
    n_query=n_query,
    n_tasks=n_tasks,
    lr=lr,
  )


def converged_cg_steps(method, dim):
  return 4 * dim if method == "imaml" else ""


def write_csv(rows, path):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(rows, setting, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for name, style in (("imaml", "o-"), ("maml", "s--"), ("fomaml", "^:")):
    pts = [
      (r["inner_steps"], r["rel_error"])
      for r in rows
      if r["method"] == name and r["sweep"] == "inner_steps"
    ]
    left.loglog(*zip(*pts), style, label=name)
  left.set_xlabel("inner gradient steps")
  left.set_ylabel("relative error of the meta-gradient")
  left.set_title("vs inner steps (iMAML: CG converged)")
  left.legend()
  pts = [
    (r["cg_steps"], r["rel_error"]) for r in rows if r["sweep"] == "cg_steps"
  ]
  right.semilogy(*zip(*pts), "o-", label="imaml")
  right.set_xlabel("conjugate gradient steps")
  right.set_title("vs CG steps (inner problem converged)")
  right.legend()
  fig.suptitle(
    "Linear regression, float64: lam={lam}, dim={dim}, "
    "{n_support} support / {n_query} query points, "
    "{n_tasks} tasks".format(**setting)
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="fewer tasks and sweep points"
  )
  parser.add_argument("--out", default=RESULTS, help="output folder")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows, setting = run(args.quick)
  suffix = "_quick" if args.quick else ""
  csv_path = os.path.join(args.out, f"meta_gradient_accuracy{suffix}.csv")
  png_path = os.path.join(args.out, f"meta_gradient_accuracy{suffix}.png")
  write_csv(rows, csv_path)
  plot(rows, setting, png_path)
  print(
    f"{'method':8s} {'sweep':12s} {'inner':>6s} {'cg':>4s} {'rel_error':>10s}"
  )
  for r in rows:
    print(
      f"{r['method']:8s} {r['sweep']:12s} {r['inner_steps']:>6} "
      f"{r['cg_steps']!s:>4s} {r['rel_error']:10.3e}"
    )
  best = min(r["rel_error"] for r in rows if r["method"] == "imaml")
  print(f"best iMAML relative error: {best:.3e}; wrote {csv_path}, {png_path}")
  return rows


if __name__ == "__main__":
  main()
