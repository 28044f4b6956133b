"""Throughput of the jit-compiled Omniglot meta-step (tasks per second).

For each Table 2 setting (5-way 1-shot, 5-way 5-shot, 20-way 1-shot, 20-way
5-shot) this compiles the meta-step of the chosen algorithm (default iMAML-GD
with the paper's settings: lam 2, 16 inner steps at 5-way and 25 at 20-way,
inner lr 0.05 with the step check of ``gd(backtrack=True)`` as in the
``omniglot_*_imaml_gd`` configs, 5 CG steps; 15 query images per class; Adam)
at the chosen meta-batch, then times it and reports

  * compile time, apart from step time;
  * seconds per meta-step (median of the timed repeats) and tasks per second;
  * the step's FLOP count, the achieved FLOP rate, and that rate divided by
    the FLOP rate of a large float32 matrix product measured in the same run
    ("efficiency"). XLA's cost analysis counts the body of a loop once, so
    the count of the whole step would miss all but one inner step and one CG
    iteration. The FLOPs are therefore counted per component with XLA's cost
    analysis of one task (an inner gradient step, the query gradient, one
    Hessian-vector product, the pre-adaptation query forward pass if any) and
    multiplied by how often the step runs each: for iMAML-GD
    ``tasks * (steps * inner + support_forward + query_grad + cg_steps *
    hvp)``: the checked GD takes a gradient at its starting point and at
    every trial point but the last, where it needs only the value; CG starts
    from zero without a product and reports its recurrence residual.

With ``--single-task`` it also runs the same step with one task at a time to
report how much vmapping the task batch gains per task.

Results go to ``benchmarks/results/throughput_<device>.{csv,json}``.

    python benchmarks/throughput.py                         # all four settings
    python benchmarks/throughput.py --quick                 # small, for tests
    python benchmarks/throughput.py --settings 5w1s --single-task
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from arguments import count

import imaml_jax as im
from imaml_jax import data
from imaml_jax import models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name: (n_way, k_shot, inner steps of iMAML-GD)
SETTINGS = {
  "5w1s": (5, 1, 16),
  "5w5s": (5, 5, 16),
  "20w1s": (20, 1, 25),
  "20w5s": (20, 5, 25),
}


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  if d.platform == "cpu":
    return (
      f"cpu ({platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores)"
    )
  return f"{d.platform} ({kind})"


def flops_of(compiled) -> float:
  """Total FLOPs of a compiled executable from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def component_flops(fn, *args) -> float:
  return flops_of(jax.jit(fn).lower(*args).compile())


def imaml_step_flops(
  loss_fn,
  params,
  tasks,
  inner_steps: int,
  cg_steps: int,
  algorithm: str,
  pre_adaptation: bool,
) -> float:
  """FLOPs of one meta-step from per-component cost analysis (see above)."""
  one = jax.tree.map(lambda a: a[0], tasks)
  scalar = lambda p, batch: loss_fn(p, batch)[0]
  objective = lambda p: im.proximal_objective(scalar, params, one.support, 2.0)(
    p
  )
  inner = component_flops(jax.grad(objective), params)
  query = component_flops(jax.grad(scalar), params, one.query)
  forward = component_flops(scalar, params, one.query)
  hvp = component_flops(
    lambda v: im.proximal_system_operator(
      lambda p: scalar(p, one.support), params, 2.0
    )(v),
    params,
  )
  per_task = inner_steps * inner + query + forward * pre_adaptation
  if algorithm == "imaml_gd":
    # The checked GD's last trial point: its value only.
    per_task += component_flops(objective, params) + cg_steps * hvp
  elif algorithm != "fomaml":
    return float("nan")  # MAML's reverse pass through the loop: not modelled
  n_tasks = jax.tree.leaves(tasks)[0].shape[0]
  return n_tasks * per_task


def matmul_size(quick: bool) -> int:
  """Side of the reference matrix product: large enough to run near peak."""
  if quick:
    return 512
  return 2048 if jax.devices()[0].platform == "cpu" else 8192


def default_task_chunk() -> int:
  """1 on a CPU, 0 (vmap the whole batch) on an accelerator.

  On a CPU the vmapped batch runs slower per task than one task at a time
  (the working set of many tasks leaves the caches); on a GPU vmapping is
  an order of magnitude faster (``benchmarks/results/throughput_*``).
  """
  return 1 if jax.devices()[0].platform == "cpu" else 0


def time_compiled(fn, args, repeats: int) -> list[float]:
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def matmul_flop_rate(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n x n float32 matrix product on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul).lower(a, b).compile()
  return 2.0 * n**3 / statistics.median(time_compiled(f, (a, b), repeats))


def make_algorithm(name: str, inner_steps: int, solver=None):
  """The benchmarked algorithm; ``solver`` replaces iMAML's ``cg(5)``."""
  # The step check as in the omniglot_*_imaml_gd configs; MAML's configs
  # run plain GD.
  inner = im.gd(inner_steps, 0.05, backtrack=name == "imaml_gd")
  if name == "imaml_gd":
    return im.imaml(lam=2.0, inner=inner, solver=solver or im.cg(maxiter=5))
  if name == "maml":
    return im.maml(inner)
  if name == "fomaml":
    return im.fomaml(inner)
  raise ValueError(f"unknown algorithm {name!r}")


def omniglot_problem(setting: str, conv: str = models.DEFAULT_CONV):
  """``(loss_fn, params)`` of the Omniglot network for a setting."""
  n_way, k_shot, _ = SETTINGS[setting]
  net = models.omniglot_convnet(n_way, conv=conv)
  params = models.init_params(
    net, jax.random.key(0), jnp.zeros((n_way * k_shot, 28, 28, 1))
  )
  return models.classification_loss(net), params


def random_tasks(n_way, k_shot, q_query, n_tasks, seed=0):
  """Episodes sampled on device from random 28x28 'characters'."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(
    rng.integers(0, 256, (max(n_way, 50), 20, 28, 28, 1), dtype=np.uint8)
  )
  return data.sample_tasks(
    jax.random.key(seed), images, n_way, k_shot, q_query, n_tasks
  )


def benchmark_setting(
  setting: str,
  meta_batch: int,
  algorithm: str,
  conv: str,
  q_query: int,
  repeats: int,
  inner_steps=None,
  pre_adaptation_metrics: bool = False,
  task_chunk=None,
):
  n_way, k_shot, default_steps = SETTINGS[setting]
  steps = inner_steps or default_steps
  loss_fn, params = omniglot_problem(setting, conv)
  init, step = im.make_meta_step(
    loss_fn,
    optax.adam(1e-3),
    make_algorithm(algorithm, steps),
    has_aux=True,
    pre_adaptation_metrics=pre_adaptation_metrics,
    task_chunk=task_chunk,
  )
  state = init(params)
  tasks = random_tasks(n_way, k_shot, q_query, meta_batch)
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, tasks).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  times = time_compiled(compiled, (state, tasks), repeats)
  step_s = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  flops = imaml_step_flops(
    loss_fn, params, tasks, steps, 5, algorithm, pre_adaptation_metrics
  )
  return {
    "setting": setting,
    "algorithm": algorithm,
    "conv": conv,
    "inner_steps": steps,
    "meta_batch": meta_batch,
    "q_query": q_query,
    "task_chunk": task_chunk or meta_batch,
    "compile_s": round(compile_s, 2),
    "step_s": step_s,
    "step_s_min": min(times),
    "tasks_per_s": meta_batch / step_s,
    "gflop_per_step": flops / 1e9,
    "gflop_per_s": flops / step_s / 1e9,
    "temp_mb": memory.temp_size_in_bytes / 2**20 if memory else None,
    # The process's peak so far (it never goes down; it includes the
    # reference matrix product's three operands, 768 MiB at n = 8192).
    "peak_device_mb_so_far": (
      stats["peak_bytes_in_use"] / 2**20
      if "peak_bytes_in_use" in stats
      else None
    ),
  }


def write_results(rows, stem: str, device: str, matmul: float | None) -> dict:
  """Writes ``stem.json`` (with the reference matmul rate, if measured) and
  ``stem.csv``."""
  meta = {"device": device, "jax": jax.__version__}
  if matmul is not None:
    meta["matmul_gflop_per_s"] = matmul / 1e9
  meta["rows"] = rows
  with open(stem + ".json", "w") as f:
    json.dump(meta, f, indent=2)
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
    writer.writeheader()
    writer.writerows(rows)
  return meta


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS)
  )
  parser.add_argument("--meta-batch", type=count(1), default=32)
  parser.add_argument(
    "--algorithm", default="imaml_gd", choices=["imaml_gd", "maml", "fomaml"]
  )
  parser.add_argument(
    "--conv",
    default=models.DEFAULT_CONV,
    choices=list(models.CONV_FORMULATIONS),
  )
  parser.add_argument(
    "--q-query",
    type=count(1),
    default=15,
    help="query images per class (default 15)",
  )
  parser.add_argument("--repeats", type=count(1), default=3)
  parser.add_argument(
    "--task-chunk",
    type=count(0),
    default=None,
    help="tasks vmapped together, the batch running as "
    "lax.map over chunks; 0 vmaps the whole batch "
    "(default: 1 on a CPU, where it is fastest, "
    "the whole batch elsewhere)",
  )
  parser.add_argument(
    "--single-task",
    nargs="*",
    choices=list(SETTINGS),
    default=None,
    metavar="SETTING",
    help="also time meta-batch 1 to measure the vmap gain "
    "(for the given settings; none given: all)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="5-way 1-shot only, meta-batch 4, 2 inner steps",
  )
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--tag", default="", help="suffix of the output files")
  args = parser.parse_args(argv)

  settings, inner_steps = args.settings, None
  if args.task_chunk is None:
    args.task_chunk = default_task_chunk()
  if args.quick:
    settings, args.meta_batch, args.repeats, inner_steps = ["5w1s"], 4, 1, 2
  device = device_name()
  matmul = matmul_flop_rate(matmul_size(args.quick))
  print(
    f"device: {device}; jax {jax.__version__}; "
    f"fp32 matmul: {matmul / 1e9:.1f} GFLOP/s"
  )
  rows = []
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(
    args.out,
    f"throughput_{jax.devices()[0].platform}"
    f"{'_quick' if args.quick else ''}{args.tag}",
  )
  single = (
    set() if args.single_task is None else set(args.single_task or settings)
  )
  for setting in settings:
    batches = [args.meta_batch] + ([1] if setting in single else [])
    for mb in batches:
      row = benchmark_setting(
        setting,
        mb,
        args.algorithm,
        args.conv,
        args.q_query,
        args.repeats,
        inner_steps,
        task_chunk=args.task_chunk or None,
      )
      row["efficiency"] = row["gflop_per_s"] * 1e9 / matmul
      rows.append(row)
      print(
        f"{setting:6s} {args.algorithm:9s} conv={args.conv:8s} "
        f"batch={mb:3d} chunk={row['task_chunk']:3d} compile {row['compile_s']:6.1f}s  "
        f"step {row['step_s']:8.3f}s  {row['tasks_per_s']:7.2f} tasks/s  "
        f"{row['gflop_per_s']:7.1f} GFLOP/s  "
        f"eff {100 * row['efficiency']:5.1f}%",
        flush=True,
      )
      write_results(rows, stem, device, matmul)  # As it goes.
    if setting in single:
      many, one = rows[-2], rows[-1]
      gain = many["tasks_per_s"] / one["tasks_per_s"]
      many["vmap_gain_per_task"] = gain
      print(
        f"{setting}: vmapping {many['meta_batch']} tasks is {gain:.2f}x "
        "faster per task than one task at a time"
      )
      write_results(rows, stem, device, matmul)
  meta = write_results(rows, stem, device, matmul)
  print(f"wrote {stem}.{{json,csv}}")
  return meta


if __name__ == "__main__":
  main()
