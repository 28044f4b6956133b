r"""CG for the implicit meta-gradient at equal Hessian-vector products.

``im.cg`` solves ``(I + H/lam) g = v`` with ``jax.scipy.sparse.linalg.cg``,
which spends its first product on ``r_0 = v - A x_0``. Started from
``x_0 = 0`` (as before) that product computes ``A 0`` and adds nothing;
started from ``x_0 = v`` (the first-order approximation, now the default) it
starts the Krylov space. This script compares, at the same number ``P`` of
products with ``A``:

  * ``zero``: ``im.cg(P - 1, warm_start=False)``, the previous default
    (``P - 1`` iterations, one product on ``A 0``);
  * ``warm``: ``im.cg(P - 1)``, from ``x_0 = v`` (``P - 1`` iterations);
  * ``own_loop``: ``im.cg(P, stop_at_negative_curvature=True)``, the
    library's own CG loop from zero, which wastes no product (``P``
    iterations; on a system that is not positive definite it stops early).

For each it prints the relative residual ``||A g - v|| / ||v||`` (measured
apart, in float64 where the problem is) and the meta-gradient's relative
error ``||g - g*|| / ||g*||`` against an independent answer ``g*``:

  * ``linreg``: the linear regression of ``tests/problems.py`` with 60
    features and 20 support points (``H`` of rank 20), float64, against the
    closed form ``linreg_exact``; several tasks and two values of ``lam``;
  * ``omniglot_init`` / ``omniglot_trained``: the Omniglot 5-way 1-shot conv
    net at its initialisation and at the published checkpoint
    (``benchmarks/runs_gpu_h200/stability_5w1s_constant_eps1e-3_mb32``),
    ``phi`` from the paper's 16 proximal GD steps (lam 2) on validation
    tasks, in float64, against 150 iterations of CG from zero in float64.

    python benchmarks/cg_warm_start.py              # all three problems
    python benchmarks/cg_warm_start.py --problems linreg --tasks 4
    python benchmarks/cg_warm_start.py --quick      # linreg, 2 tasks

Writes ``benchmarks/results/cg_warm_start_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
from arguments import count

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import imaml_jax as im  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CHECKPOINT_RUN = os.path.join(
  HERE, "runs_gpu_h200", "stability_5w1s_constant_eps1e-3_mb32"
)
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
PRODUCTS = (2, 3, 4, 5, 6, 7)


def solvers(products: int) -> dict:
  """The three ways of spending ``products`` products with ``A``."""
  return {
    "zero": im.cg(
      products - 1, tol=0.0, warm_start=False, report_residual=False
    ),
    "warm": im.cg(products - 1, tol=0.0, report_residual=False),
    "own_loop": im.cg(
      products, tol=0.0, stop_at_negative_curvature=True, report_residual=False
    ),
  }


def flat(tree) -> np.ndarray:
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


_JITTED = {}


def _jitted(key, fn):
  """One compilation per solver and problem, shared by its tasks."""
  if key not in _JITTED:
    _JITTED[key] = jax.jit(fn)
  return _JITTED[key]


def compare(system, args, b, exact, problem: str) -> dict:
  """``{P: {solver: (residual, error)}}`` for the system ``system(args)``
  (a matvec), right-hand side ``b`` and answer ``exact``."""
  apply = _jitted((problem, "matvec"), lambda a, v: system(a)(v))
  b_norm = np.linalg.norm(flat(b))
  exact_flat = flat(exact)
  out = {}
  for products in PRODUCTS:
    row = {}
    for name, solver in solvers(products).items():
      solve = _jitted(
        (problem, name, products),
        lambda a, v, s=solver: s.solve(system(a), v)[0],
      )
      g = solve(args, b)
      residual = np.linalg.norm(flat(apply(args, g)) - flat(b)) / b_norm
      error = np.linalg.norm(flat(g) - exact_flat) / np.linalg.norm(exact_flat)
      row[name] = (float(residual), float(error))
    out[products] = row
  return out


def linreg(n_tasks: int) -> dict:
  """Linear regression with the closed-form meta-gradient, float64."""
  import problems  # pylint: disable=import-outside-toplevel

  results = {}
  for lam in (0.5, 2.0):
    per_task = []
    for seed in range(n_tasks):
      support, query = problems.linreg_task(
        seed, n_support=20, n_query=30, dim=60
      )
      theta = np.zeros(60)
      phi, exact = problems.linreg_exact(theta, support, query, lam)
      phi = jnp.asarray(phi)
      b = jax.grad(problems.linreg_loss)(phi, query)
      system = lambda a, lam=lam: im.proximal_system_operator(
        lambda p: problems.linreg_loss(p, a[1]), a[0], lam
      )
      per_task.append(compare(system, (phi, support), b, exact, f"linreg{lam}"))
    results[f"linreg_lam{lam:g}"] = mean_over_tasks(per_task)
  return results


def mean_over_tasks(per_task: list) -> dict:
  """Geometric means over tasks of each residual and error."""

  def geomean(values):
    return float(np.exp(np.mean(np.log(np.maximum(values, 1e-300)))))

  return {
    products: {
      name: tuple(
        geomean([t[products][name][i] for t in per_task]) for i in (0, 1)
      )
      for name in per_task[0][products]
    }
    for products in per_task[0]
  }


def omniglot(n_tasks: int, which: str) -> dict:
  """The Omniglot 5-way 1-shot conv net, float64, against 150 CG steps."""
  from imaml_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from imaml_jax.train import experiment as exp_lib  # pylint: disable=import-outside-toplevel
  from imaml_jax.train import protocols  # pylint: disable=import-outside-toplevel

  config = config_lib.from_dict(
    json.load(open(os.path.join(CHECKPOINT_RUN, "config.json")))
  )
  data = exp_lib.load_data(config, exp_lib.resolve_data_dir(config, None))
  exp = exp_lib.build(
    config, exp_lib.Data(data.train[:1], data.val, data.test[:1])
  )
  if which == "trained":
    path = os.path.join(
      CHECKPOINT_RUN, "checkpoints", "checkpoint_000020000.ckpt"
    )
    _, params, _ = protocols.restore_parameters(path, config, exp)
  else:
    params = exp.init_params(jax.random.key(0))
  to64 = lambda t: jax.tree.map(
    lambda x: (
      jnp.asarray(x, jnp.float64)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
      else x
    ),
    t,
  )
  params = to64(params)
  theta, unravel = jax.flatten_util.ravel_pytree(params)
  loss = lambda v, batch: exp.loss(unravel(v), to64(batch))[0]
  chunk = next(
    exp_lib.evaluation_chunks(config, exp.data.val, n_tasks, config.val_seed)
  )
  inner = im.gd(config.inner_steps, config.inner_lr)
  adapt = jax.jit(
    lambda t, support: inner.run(
      im.proximal_objective(loss, t, support, config.lam), t
    )
  )
  query_grad = jax.jit(jax.grad(loss))
  system = lambda a: im.proximal_system_operator(
    lambda p: loss(p, a[1]), a[0], config.lam
  )
  reference = im.cg(150, tol=0.0, warm_start=False, report_residual=False)
  solve_exactly = _jitted(
    ("omniglot", "reference"), lambda a, v: reference.solve(system(a), v)[0]
  )
  per_task = []
  for i in range(n_tasks):
    task = jax.tree.map(lambda x, i=i: x[i], chunk)
    phi = adapt(theta, task.support)
    b = query_grad(phi, task.query)
    exact = solve_exactly((phi, task.support), b)
    per_task.append(compare(system, (phi, task.support), b, exact, "omniglot"))
  return {f"omniglot_{which}": mean_over_tasks(per_task)}


def markdown(results: dict, header: str) -> str:
  lines = [header, ""]
  for problem, table in results.items():
    lines += [
      f"## {problem}",
      "",
      "| products | residual zero | residual warm | residual own loop "
      "| error zero | error warm | error own loop |",
      "|---|---|---|---|---|---|---|",
    ]
    for products, row in table.items():
      cells = [f"{row[n][0]:.2e}" for n in ("zero", "warm", "own_loop")]
      cells += [f"{row[n][1]:.2e}" for n in ("zero", "warm", "own_loop")]
      lines.append(f"| {products} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--problems",
    nargs="+",
    default=["linreg", "omniglot_init", "omniglot_trained"],
    choices=["linreg", "omniglot_init", "omniglot_trained"],
  )
  parser.add_argument("--tasks", type=count(1), default=8)
  parser.add_argument(
    "--quick", action="store_true", help="linear regression only, 2 tasks"
  )
  parser.add_argument("--tag", default="cpu")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  if args.quick:
    args.problems, args.tasks, args.tag = ["linreg"], 2, "quick"
  start = time.perf_counter()
  results = {}
  for problem in args.problems:
    if problem == "linreg":
      results.update(linreg(args.tasks))
    else:
      results.update(omniglot(args.tasks, problem.split("_")[1]))
    print(
      markdown(
        {
          k: v
          for k, v in results.items()
          if k.startswith(problem.split("_")[0])
        },
        "",
      ),
      flush=True,
    )
  header = (
    "# CG at equal Hessian-vector products: from zero, from b, own loop\n\n"
    f"`python benchmarks/cg_warm_start.py --tasks {args.tasks}` "
    f"({time.perf_counter() - start:.0f} s). Geometric means over "
    f"{args.tasks} tasks of the relative residual `||A g - v|| / ||v||` "
    "and of the meta-gradient's relative error `||g - g*|| / ||g*||`; "
    "`zero` is `im.cg(P - 1, warm_start=False)` (the earlier default, one "
    "product on `A 0`), `warm` is `im.cg(P - 1)` (from `x0 = v`, the new "
    "default), `own loop` is `im.cg(P, stop_at_negative_curvature=True)`."
  )
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"cg_warm_start_{args.tag}")
  with open(base + ".json", "w") as f:
    json.dump(
      {
        "tasks": args.tasks,
        "results": {
          k: {str(p): r for p, r in v.items()} for k, v in results.items()
        },
      },
      f,
      indent=1,
    )
  with open(base + ".md", "w") as f:
    f.write(markdown(results, header))
  print(f"wrote {base}.{{json,md}}")


if __name__ == "__main__":
  main()
