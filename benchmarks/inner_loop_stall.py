"""Where iMAML's checked inner loop stops, is the proximal objective smooth?

The proximal objective of a task, ``G(phi) = L_s(phi) + lam/2 ||phi -
theta||^2``, is minimised by checked gradient descent (``gd(steps, lr,
backtrack=True)``). At 20-way 1-shot Omniglot that loop stops short: its
gradient stays at a few percent of its value at ``theta`` however many
steps it takes (``meta_gradient_omniglot.md``). This script asks why, at
the meta-parameters of a run's checkpoint (its last), on meta-training
tasks drawn as the run draws them. From ``phi``, where ``--steps`` checked
steps stop, it tries one plain gradient step ``phi - eta g`` of each size
``eta = lr * 2^-k`` (``--halvings``) and reports

  * the Armijo ratio ``r = (G(phi) - G(phi - eta g)) / (eta ||g||^2)``: 1
    for a small step on a smooth function, negative when the step raises
    ``G``;
  * the curvature the step feels along ``g``, ``c = 2 (1 - r) / eta``: on a
    quadratic it is ``g^T A g / ||g||^2`` whatever ``eta``; near a kink
    (a ReLU or a max-pool switching) it grows as ``eta`` shrinks, about
    like ``1 / eta``.

Beside them, the proximal gradient ``||grad G|| / ||grad G(theta)||`` after
the checked loop, after as many checked steps again from where it stopped
(the step size back at ``lr``), after plain gradient descent from
``theta`` (``--plain-steps`` at each ``--plain-lr``) and after Newton-CG
(``hessian_free(20, 20)``).

    python benchmarks/inner_loop_stall.py --tag 20w1s \\
        --workdir benchmarks/runs/omniglot_20w1s_imaml_gd
    python benchmarks/inner_loop_stall.py --tag 5w1s          # the published model
    python benchmarks/inner_loop_stall.py --quick             # random images

Writes ``benchmarks/results/inner_loop_stall[_<tag>].{csv,json}`` (one row a
quantity: its median, minimum and maximum over the tasks; the JSON also
holds each task's values).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import meta_gradient_omniglot as mg
import numpy as np
from jax.flatten_util import ravel_pytree

import imaml_jax as im
from imaml_jax import train
from imaml_jax.train import experiment as exp_lib

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def step_probe(objective, phi, lr: float, halvings) -> dict:
  """Armijo ratio and felt curvature of one gradient step from ``phi`` of
  each size ``lr * 2^-k``, ``k`` in ``halvings``."""
  value, grad = jax.value_and_grad(objective)(phi)
  g2 = ravel_pytree(grad)[0] @ ravel_pytree(grad)[0]
  out = {}
  for k in halvings:
    eta = lr * 0.5**k
    stepped = jax.tree.map(lambda p, g: p - eta * g, phi, grad)
    ratio = (value - objective(stepped)) / (eta * g2)
    out[f"armijo_ratio_k{k}"] = ratio
    out[f"felt_curvature_k{k}"] = 2.0 * (1.0 - ratio) / eta
  return out


def probe_task(objective, theta, settings) -> dict:
  """Every quantity of one task (see the module docstring): ``settings``
  holds ``steps``, ``lr``, ``halvings``, ``plain_steps``, ``plain_lr``."""

  def relative_gradient(phi):
    return jnp.linalg.norm(ravel_pytree(jax.grad(objective)(phi))[0]) / at_theta

  at_theta = jnp.linalg.norm(ravel_pytree(jax.grad(objective)(theta))[0])
  checked = im.gd(settings.steps, settings.lr, backtrack=True)
  phi = checked.run(objective, theta)
  out = {
    "prox_grad_rel_checked": relative_gradient(phi),
    "prox_grad_rel_restarted": relative_gradient(checked.run(objective, phi)),
  }
  for lr in settings.plain_lr:
    plain = im.gd(settings.plain_steps, lr).run(objective, theta)
    out[f"prox_grad_rel_plain_lr{lr}"] = relative_gradient(plain)
  newton = im.hessian_free(20, 20).run(objective, theta)
  out["prox_grad_rel_newton_cg"] = relative_gradient(newton)
  out.update(step_probe(objective, phi, settings.lr, settings.halvings))
  return out


def quantity_order(name: str) -> tuple:
  """Proximal gradients first, then each probe by its step size."""
  stem, _, k = name.rpartition("_k")
  if not k.isdigit():
    return (0, name, 0)
  return (1, stem, int(k))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--workdir", default=mg.DEFAULT_RUN, help="an Omniglot iMAML run"
  )
  parser.add_argument(
    "--steps", type=int, default=200, help="checked GD steps before the probe"
  )
  parser.add_argument(
    "--halvings",
    type=int,
    nargs="+",
    default=[0, 2, 4, 6, 8, 10],
    help="probe steps of the run's inner lr times 2^-k for these k",
  )
  parser.add_argument(
    "--plain-steps", type=int, default=1000, help="plain GD steps from theta"
  )
  parser.add_argument(
    "--plain-lr",
    type=float,
    nargs="+",
    default=[0.01, 0.02],
    help="plain GD step sizes",
  )
  parser.add_argument("--seed", type=int, default=1, help="task sampling")
  parser.add_argument(
    "--data-dir",
    default=None,
    help="Omniglot folder (default: $IMAML_OMNIGLOT_DIR)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="random images, 2 tasks, 5 steps (a smoke test)",
  )
  parser.add_argument("--tag", default=None, help="suffix of the file names")
  parser.add_argument("--out", default=RESULTS, help="output folder")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.plain_steps < 1:
    parser.error("--steps and --plain-steps must be >= 1")
  if min(args.halvings) < 0 or min(args.plain_lr) <= 0:
    parser.error("--halvings must be >= 0 and --plain-lr positive")
  config, path = mg.load_imaml_run(parser, args.workdir)
  sampled = config
  if args.quick:
    args.steps, args.plain_steps = 5, 5
    sampled = train.apply_overrides(config, ["meta_batch=2"])
  images = mg.meta_training_images(config, args.data_dir, args.quick)
  args.lr = config.inner_lr
  exp = exp_lib.build(sampled, None)
  label, theta = list(mg.load_points(path, config, exp).items())[-1]

  def per_task(task):
    support_loss = lambda p, _: exp.loss(p, task.support)[0]
    objective = im.proximal_objective(support_loss, theta, None, config.lam)
    return probe_task(objective, theta, args)

  start = time.perf_counter()
  tasks = exp.sample(jax.random.key(args.seed * 1000), jnp.asarray(images))
  values = jax.device_get(jax.jit(jax.vmap(per_task))(tasks))
  seconds = time.perf_counter() - start
  rows = [
    {
      "quantity": name,
      "median": float(np.median(values[name])),
      "min": float(np.min(values[name])),
      "max": float(np.max(values[name])),
    }
    for name in sorted(values, key=quantity_order)
  ]
  print(
    f"{config.n_way}-way {config.k_shot}-shot, lam {config.lam}, "
    f"{len(tasks.support[1])} meta-training tasks, parameters {label}; "
    f"checked GD: {args.steps} steps from lr {args.lr} ({seconds:.0f} s)"
  )
  for r in rows:
    print(
      f"  {r['quantity']:32s} median {r['median']:10.3e}  "
      f"min {r['min']:10.3e}  max {r['max']:10.3e}"
    )
  stem = "inner_loop_stall" + (f"_{args.tag}" if args.tag else "")
  stem = os.path.join(args.out, stem + ("_quick" if args.quick else ""))
  os.makedirs(args.out, exist_ok=True)
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(stem + ".json", "w") as f:
    settings = {
      k: getattr(args, k)
      for k in ("steps", "lr", "halvings", "plain_steps", "plain_lr", "seed")
    }
    json.dump(
      {
        "workdir": os.path.relpath(args.workdir, os.path.dirname(RESULTS)),
        "parameters": label,
        "settings": settings,
        "rows": rows,
        "tasks": {k: np.asarray(v).tolist() for k, v in values.items()},
      },
      f,
      indent=1,
    )
  print(f"wrote {stem}.csv and {stem}.json")


if __name__ == "__main__":
  main()
