"""Is iMAML's linear system positive definite where it is solved?

Lemma 1 of the paper needs ``I + H/lam`` invertible, and CG needs it
positive definite. At an exact minimiser of the proximal objective
``L_s(phi) + lam/2 ||phi - theta||^2`` it is positive semi-definite, but
after a few gradient steps on a non-convex loss it need not be. For Omniglot
tasks and the conv net this script adapts ``theta`` (the initialisation, or
the meta-parameters of a checkpoint) with ``gd(steps, lr)`` for each inner
learning rate asked for, and reports per task

  * the largest and smallest eigenvalue of ``A = I + H/lam`` at the adapted
    parameters (power iteration on ``A`` and on ``eig_max I - A``, from
    Hessian-vector products);
  * the norm of the proximal objective's gradient there (0 at the exact
    minimiser);
  * the relative residual ``||A x - g|| / ||g||`` of 5 CG steps (or each
    count of ``--cg-steps``) for the query gradient ``g``, with plain CG and
    with CG that stops at negative curvature;
  * whether that guarded CG met a direction ``p`` with ``p^T A p <= 0``
    (its ``SolveInfo.negative_curvature``), which proves ``A`` indefinite
    (``indefinite_fraction_cg``), and how many updates it applied before
    stopping (``cg<n>_guarded_updates``). Power
    iteration from a shift converges slowly when the spectrum is wide, so
    its smallest eigenvalue can miss negative ones that CG finds.

Gradient descent on the proximal objective is stable only for
``lr < 2 / (lam * eig_max)``, which the script prints too, with the
proximal objective's value at the adapted parameters.

``--inner hessian_free_plain_cg`` adapts with iMAML-HF's Newton-CG instead
(``--inner-steps`` Newton steps of ``--hf-cg-steps`` CG iterations, CG
taking every step as ``jax.scipy``'s does: the library's default);
``--inner hessian_free`` stops its CG at negative curvature.

    python benchmarks/curvature.py                      # 5-way 1-shot, init
    python benchmarks/curvature.py --inner-lr 0.1 0.05 --tasks 16
    python benchmarks/curvature.py --workdir runs/o5w1s  # trained parameters
    python benchmarks/curvature.py --checkpoint runs/o5w1s/checkpoints/checkpoint_000001000.ckpt \
        --inner-lr 0.05 --backtrack --tag o5w1s_step1000
    python benchmarks/curvature.py --inner hessian_free hessian_free_plain_cg \
        --inner-steps 5 --workdir runs/omniglot_5w1s_imaml_hf --tag hf
    python benchmarks/curvature.py --n-way 20 --inner-steps 25 --inner-lr 0.05 \
        --backtrack --cg-steps 5 20 80 --workdir runs/o20w1s  # more CG steps
    python benchmarks/curvature.py --quick              # synthetic images

Writes ``benchmarks/results/curvature_<tag>.{csv,json}``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from arguments import count
from jax.flatten_util import ravel_pytree

import imaml_jax as im
from imaml_jax import data
from imaml_jax import models
from imaml_jax.train import checkpoint as ckpt_lib

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def flat_operator(matvec, unravel):
  return lambda v: ravel_pytree(matvec(unravel(v)))[0]


def power_iteration(matvec, v0, iterations: int):
  """Rayleigh quotient after ``iterations`` normalised products."""

  def body(_, v):
    w = matvec(v)
    return w / jnp.linalg.norm(w)

  v = jax.lax.fori_loop(0, iterations, body, v0 / jnp.linalg.norm(v0))
  return v @ matvec(v)


def task_statistics(
  scalar_loss, theta, task, lam, inner, iterations, cg_steps=(5,)
):
  """The numbers of the module docstring for one task.

  ``cg_steps``: the CG iteration counts whose residuals are reported, as
  ``cg<n>_residual`` and ``cg<n>_guarded_residual``, with
  ``cg<n>_met_negative_curvature`` (1.0 where the guarded CG stopped at a
  direction of non-positive curvature within ``n`` steps, else 0.0) and
  ``cg<n>_guarded_updates`` (the updates it applied).
  """
  objective = im.proximal_objective(scalar_loss, theta, task.support, lam)
  phi = inner.run(objective, theta)
  flat_phi, unravel = ravel_pytree(phi)
  system = im.proximal_system_operator(
    lambda p: scalar_loss(p, task.support), phi, lam
  )
  a = flat_operator(system, unravel)
  v0 = jax.random.normal(jax.random.key(0), flat_phi.shape, flat_phi.dtype)
  top = power_iteration(a, v0, iterations)
  bottom = top - power_iteration(lambda v: top * v - a(v), v0, iterations)
  g = jax.grad(scalar_loss)(phi, task.query)
  grad_norm = jnp.linalg.norm(ravel_pytree(jax.grad(objective)(phi))[0])
  stats = {
    "eig_max": top,
    "eig_min": bottom,
    "inner_grad_norm": grad_norm,
    "objective": objective(phi),
  }
  for n in cg_steps:
    _, plain = im.cg(n).solve(system, g)
    _, guarded = im.cg(n, stop_at_negative_curvature=True).solve(system, g)
    stats[f"cg{n}_residual"] = plain.residual
    stats[f"cg{n}_guarded_residual"] = guarded.residual
    dtype = plain.residual.dtype
    stats[f"cg{n}_met_negative_curvature"] = guarded.negative_curvature.astype(
      dtype
    )
    stats[f"cg{n}_guarded_updates"] = guarded.iterations.astype(dtype)
  return stats


INNER_SOLVERS = ("gd", "hessian_free", "hessian_free_plain_cg")


def inner_solver(
  name: str, steps: int, lr: float, backtrack: bool, hf_cg_steps: int
) -> im.InnerSolver:
  """The inner loop named by ``--inner``."""
  if name == "gd":
    return im.gd(steps, lr, backtrack=backtrack)
  return im.hessian_free(
    steps, hf_cg_steps, stop_at_negative_curvature=(name == "hessian_free")
  )


@functools.cache
def batch_statistics(
  n_way: int,
  lam: float,
  inner_name: str,
  steps: int,
  lr: float,
  backtrack: bool,
  hf_cg_steps: int,
  iterations: int,
  cg_steps: tuple = (5,),
):
  """``f(theta, tasks)``: :func:`task_statistics` of every task, jit-compiled
  once per setting (the meta-parameters are an argument, so the checkpoints
  of a run, e.g. ``stability_diagnostics.py``, share one compilation)."""
  loss_fn = models.classification_loss(models.omniglot_convnet(n_way))
  scalar = lambda p, batch: loss_fn(p, batch)[0]
  inner = inner_solver(inner_name, steps, lr, backtrack, hf_cg_steps)
  return jax.jit(
    jax.vmap(
      lambda theta, task: task_statistics(
        scalar, theta, task, lam, inner, iterations, cg_steps
      ),
      in_axes=(None, 0),
    )
  )


def load_theta(workdir=None, checkpoint=None):
  """Meta-parameters of ``checkpoint``, or of ``workdir``'s latest one."""
  path = checkpoint or ckpt_lib.latest_checkpoint(
    os.path.join(workdir, "checkpoints")
  )
  if path is None:
    raise SystemExit(f"no checkpoint in {workdir}/checkpoints")
  _, tree = ckpt_lib.load(path)
  return jax.tree.map(jnp.asarray, tree["state"]["params"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-way", type=count(1), default=5)
  parser.add_argument("--k-shot", type=count(1), default=1)
  parser.add_argument("--q-query", type=count(1), default=15)
  parser.add_argument("--lam", type=float, default=2.0)
  parser.add_argument("--inner-steps", type=count(1), default=16)
  parser.add_argument(
    "--inner-lr",
    type=float,
    nargs="+",
    default=[0.1, 0.05],
    help="GD step sizes, one row each (--inner gd)",
  )
  parser.add_argument(
    "--inner",
    nargs="+",
    choices=INNER_SOLVERS,
    default=["gd"],
    help="inner loops, one row each",
  )
  parser.add_argument(
    "--hf-cg-steps",
    type=count(1),
    default=5,
    help="CG iterations per Newton step (hessian_free)",
  )
  parser.add_argument(
    "--cg-steps",
    type=int,
    nargs="+",
    default=[5],
    help="CG iteration counts whose residuals are reported",
  )
  parser.add_argument("--tasks", type=count(1), default=8)
  parser.add_argument(
    "--iterations",
    type=count(1),
    default=60,
    help="power-iteration products per eigenvalue",
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="take the meta-parameters of this run's latest "
    "checkpoint (default: the initialisation)",
  )
  parser.add_argument(
    "--checkpoint",
    default=None,
    help="take the meta-parameters of this checkpoint file",
  )
  parser.add_argument(
    "--backtrack",
    action="store_true",
    help="checked gradient descent (gd(backtrack=True)), "
    "as the Omniglot iMAML-GD configs use",
  )
  parser.add_argument(
    "--data-dir",
    default=os.environ.get("IMAML_OMNIGLOT_DIR"),
    help="Omniglot folder ($IMAML_OMNIGLOT_DIR)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="random images, 2 tasks, 4 inner steps, 10 iterations",
  )
  parser.add_argument("--tag", default=None)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if min(args.cg_steps) < 1:
    parser.error(f"--cg-steps must be positive; got {args.cg_steps}")
  if args.quick:
    args.tasks, args.inner_steps, args.iterations = 2, 4, 10
    images = jnp.asarray(
      np.random.default_rng(0).integers(
        0, 256, (20, 20, 28, 28, 1), dtype=np.uint8
      )
    )
  else:
    if not args.data_dir:
      parser.error("give --data-dir or set IMAML_OMNIGLOT_DIR (or --quick)")
    images = data.omniglot_splits(args.data_dir).train
  tasks = data.sample_tasks(
    jax.random.key(1), images, args.n_way, args.k_shot, args.q_query, args.tasks
  )
  net = models.omniglot_convnet(args.n_way)
  if args.workdir or args.checkpoint:
    theta = load_theta(args.workdir, args.checkpoint)
  else:
    theta = models.init_params(
      net, jax.random.key(0), jnp.zeros((args.n_way * args.k_shot, 28, 28, 1))
    )
  source = args.checkpoint or args.workdir or "initialisation"
  rows = []
  print(
    f"{args.n_way}-way {args.k_shot}-shot, lam {args.lam}, "
    f"{args.inner_steps} inner steps, parameters: {source}"
  )
  settings = [
    (name, lr)
    for name in args.inner
    for lr in (args.inner_lr if name == "gd" else [0.0])
  ]
  for name, lr in settings:
    inner = inner_solver(
      name, args.inner_steps, lr, args.backtrack, args.hf_cg_steps
    )
    stats = batch_statistics(
      args.n_way,
      args.lam,
      name,
      args.inner_steps,
      lr,
      args.backtrack,
      args.hf_cg_steps,
      args.iterations,
      tuple(args.cg_steps),
    )(theta, tasks)
    stats = {k: np.asarray(v) for k, v in stats.items()}
    row = {
      "inner": inner.name,
      "inner_lr": lr,
      "tasks": args.tasks,
      "parameters": source,
      "indefinite_fraction": float(np.mean(stats["eig_min"] <= 0)),
      "indefinite_fraction_cg": float(
        np.mean(
          np.max(
            [stats[f"cg{n}_met_negative_curvature"] for n in args.cg_steps],
            axis=0,
          )
        )
      ),
      "stable_lr_bound": float(2 / (args.lam * stats["eig_max"].max())),
    }
    for key, values in stats.items():
      row[f"{key}_median"] = float(np.median(values))
      row[f"{key}_min"] = float(values.min())
      row[f"{key}_max"] = float(values.max())
    rows.append(row)
    print(
      f"{inner.name}: objective median {row['objective_median']:.3f}; "
      f"eig(I + H/lam) in [{row['eig_min_min']:.2f}, "
      f"{row['eig_max_max']:.2f}], indefinite on "
      f"{100 * row['indefinite_fraction']:.0f}% of tasks by power "
      f"iteration, {100 * row['indefinite_fraction_cg']:.0f}% by a CG "
      f"direction of non-positive curvature; "
      f"|grad| median {row['inner_grad_norm_median']:.3f}; "
      + "; ".join(
        f"CG({n}) residual median {row[f'cg{n}_residual_median']:.3f} "
        f"(guarded {row[f'cg{n}_guarded_residual_median']:.3f})"
        for n in args.cg_steps
      )
      + f"; GD stable for lr < {row['stable_lr_bound']:.3f}",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  tag = args.tag or (
    f"{args.n_way}w{args.k_shot}s" + ("_quick" if args.quick else "")
  )
  stem = os.path.join(args.out, f"curvature_{tag}")
  with open(stem + ".json", "w") as f:
    json.dump({"setting": vars(args), "rows": rows}, f, indent=2)
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {stem}.{{csv,json}}")
  return rows


if __name__ == "__main__":
  main()
