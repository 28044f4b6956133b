"""Times the convolution formulations of the Omniglot network under `vmap` over tasks.

For each setting (5-way 1-shot: support 5, query 75; 20-way 5-shot: support
100, query 100) and each formulation in `imaml_jax.models.CONV_FORMULATIONS`,
with 8 tasks, each with its own parameters, under `jax.vmap`:

  (a) ``grad``: loss and gradient on the query set (`jax.value_and_grad`);
  (b) ``scan16``: 16 gradient-descent steps on the support set in `lax.scan`;
  (c) ``hvp5``: 5 chained Hessian-vector products of the support loss
      (forward-over-reverse, `jax.jvp` of `jax.grad`) in `lax.scan`, the
      pattern of conjugate gradient.

Times are medians over repeats after compilation, with `block_until_ready`;
the repeats of all formulations are interleaved, so that a change in the load
of a shared machine affects them alike.
FLOPs come from XLA's cost analysis of the compiled single step (one gradient,
one HVP), multiplied by the number of steps, since the analysis of a loop may
count its body once. The FLOP rate of a 2048 x 2048 float32 matrix product
measured in the same run gives the scale of what the machine can do.

Usage:
  python benchmarks/conv_formulations.py            # full run
  python benchmarks/conv_formulations.py --quick    # 5-way 1-shot, fewer repeats
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
from arguments import count
from jax import lax

from imaml_jax import models

N_TASKS = 8
INNER_STEPS = 16
HVP_STEPS = 5
INNER_LR = 0.1
SETTINGS = {
  # name: (n_way, support size, query size)
  "5way1shot": (5, 5, 75),
  "20way5shot": (20, 100, 100),
}
RESULTS_DIR = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "results"
)


def _median_time(fn, args, repeats):
  """Median wall time of `fn(*args)` over `repeats` calls, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _flops(compiled):
  """FLOPs of a compiled function by XLA cost analysis (dict or list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def matmul_flop_rate(n=2048, repeats=5):
  """FLOP/s of an `n x n` float32 matrix product on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  return 2.0 * n**3 / _median_time(f, (a, b), repeats)


def make_fns(loss_fn):
  """The three per-task workloads, vmapped over tasks and jitted."""
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def value_and_grad(params, batch):
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)

  def sgd_step(params, batch):
    g, _ = grad_fn(params, batch)
    return jax.tree.map(lambda p, d: p - INNER_LR * d, params, g)

  def inner_scan(params, batch):
    def body(p, _):
      return sgd_step(p, batch), None

    return lax.scan(body, params, None, length=INNER_STEPS)[0]

  def hvp(params, v, batch):
    return jax.jvp(lambda p: grad_fn(p, batch)[0], (params,), (v,))[1]

  def hvp_chain(params, v, batch):
    def body(u, _):
      hu = hvp(params, u, batch)
      norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(hu)))
      return jax.tree.map(lambda x: x / (norm + 1e-12), hu), None

    return lax.scan(body, v, None, length=HVP_STEPS)[0]

  v = jax.vmap
  # name: (timed function, single step for the FLOP count, steps per call).
  return {
    "grad": (jax.jit(v(value_and_grad)), None, 1),
    "scan16": (jax.jit(v(inner_scan)), jax.jit(v(sgd_step)), INNER_STEPS),
    "hvp5": (jax.jit(v(hvp_chain)), jax.jit(v(hvp)), HVP_STEPS),
  }


def make_data(n_way, n_support, n_query, key):
  """Per-task random images and labels: `[N_TASKS, n, 28, 28, 1]`."""
  ks, kq, kl = jax.random.split(key, 3)
  xs = jax.random.normal(ks, (N_TASKS, n_support, 28, 28, 1))
  xq = jax.random.normal(kq, (N_TASKS, n_query, 28, 28, 1))
  ys = jnp.tile(jnp.arange(n_support) % n_way, (N_TASKS, 1))
  yq = jnp.tile(jnp.arange(n_query) % n_way, (N_TASKS, 1))
  del kl
  return (xs, ys), (xq, yq)


def run(settings, formulations, repeats, max_seconds, on_row=None):
  """Compiles every (formulation, workload), then times them round-robin.

  Interleaving the repeats spreads any change in the machine's load (other
  processes on a shared CPU) over all formulations alike. A cell stops being
  repeated once its timed calls add up to more than `max_seconds`.
  """
  rows = []
  for setting in settings:
    n_way, n_support, n_query = SETTINGS[setting]
    support, query = make_data(n_way, n_support, n_query, jax.random.key(0))
    cells = {}
    for conv in formulations:
      net = models.omniglot_convnet(n_way, conv=conv)
      keys = jax.random.split(jax.random.key(1), N_TASKS)
      init = jax.jit(
        jax.vmap(lambda k: models.init_params(net, k, support[0][0]))
      )
      params = init(keys)
      tangent = jax.tree.map(jnp.ones_like, params)
      args = {
        "grad": (params, query),
        "scan16": (params, support),
        "hvp5": (params, tangent, support),
      }
      fns = make_fns(models.classification_loss(net))
      for workload, (fn, step_fn, n_steps) in fns.items():
        t0 = time.perf_counter()
        compiled = fn.lower(*args[workload]).compile()
        t1 = time.perf_counter()
        jax.block_until_ready(compiled(*args[workload]))
        first_run_s = time.perf_counter() - t1
        step = (
          compiled
          if step_fn is None
          else (step_fn.lower(*args[workload]).compile())
        )
        # A call slower than `max_seconds` is not repeated: its first run,
        # after compilation, is its one measurement.
        times = [first_run_s] if first_run_s > max_seconds else []
        cells[(conv, workload)] = dict(
          fn=compiled,
          args=args[workload],
          times=times,
          compile_s=t1 - t0,
          flops=n_steps * _flops(step),
        )
        print(
          f"{setting:11s} {conv:8s} {workload:7s} compiled in "
          f"{t1 - t0:5.1f} s, first run {first_run_s:7.2f} s",
          flush=True,
        )
    for _ in range(repeats):
      for cell in cells.values():
        if cell["times"] and sum(cell["times"]) > max_seconds:
          continue
        start = time.perf_counter()
        jax.block_until_ready(cell["fn"](*cell["args"]))
        cell["times"].append(time.perf_counter() - start)
    for (conv, workload), cell in cells.items():
      seconds = statistics.median(cell["times"])
      row = dict(
        setting=setting,
        conv=conv,
        workload=workload,
        seconds=seconds,
        min_seconds=min(cell["times"]),
        repeats=len(cell["times"]),
        compile_s=cell["compile_s"],
        flops=cell["flops"],
        gflops_per_s=cell["flops"] / seconds / 1e9,
      )
      rows.append(row)
      if on_row is not None:
        on_row(rows)
      print(
        f"{setting:11s} {conv:8s} {workload:7s} {seconds * 1e3:9.1f} ms "
        f"(min {row['min_seconds'] * 1e3:8.1f}, n={row['repeats']}) "
        f"{row['gflops_per_s']:7.2f} GFLOP/s",
        flush=True,
      )
  return rows


def print_table(rows, matmul_gflops):
  settings = sorted({r["setting"] for r in rows}, key=list(SETTINGS).index)
  workloads = ["grad", "scan16", "hvp5"]
  convs = list(dict.fromkeys(r["conv"] for r in rows))
  print(
    f"\nMedian time in ms (GFLOP/s by XLA's count); "
    f"2048^2 matmul: {matmul_gflops:.1f} GFLOP/s"
  )
  header = f"{'setting':11s} {'conv':8s} " + " ".join(
    f"{w:>20s}" for w in workloads
  )
  print(header)
  for s in settings:
    for c in convs:
      cells = []
      for w in workloads:
        r = next(
          r
          for r in rows
          if (r["setting"], r["conv"], r["workload"]) == (s, c, w)
        )
        cells.append(f"{r['seconds'] * 1e3:10.1f} ({r['gflops_per_s']:6.1f})")
      print(f"{s:11s} {c:8s} " + " ".join(f"{x:>20s}" for x in cells))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="5-way 1-shot only, 3 repeats"
  )
  parser.add_argument(
    "--repeats",
    type=count(1),
    default=None,
    help="timed repeats per measurement (default 7, quick 3)",
  )
  parser.add_argument(
    "--max-seconds",
    type=float,
    default=20.0,
    help="stop repeating a measurement after this much time",
  )
  parser.add_argument(
    "--conv",
    nargs="+",
    default=list(models.CONV_FORMULATIONS),
    choices=list(models.CONV_FORMULATIONS),
    help="formulations to time",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="output stem (default results/conv_formulations_<platform>)",
  )
  args = parser.parse_args()

  settings = ["5way1shot"] if args.quick else list(SETTINGS)
  repeats = args.repeats or (3 if args.quick else 7)
  device = jax.devices()[0]
  print(
    f"device: {device.device_kind} ({device.platform}), "
    f"{os.cpu_count()} CPUs visible, jax {jax.__version__}",
    flush=True,
  )
  matmul = matmul_flop_rate()
  print(f"2048 x 2048 float32 matmul: {matmul / 1e9:.1f} GFLOP/s", flush=True)
  stem = args.out or os.path.join(
    RESULTS_DIR, f"conv_formulations_{device.platform}"
  )
  meta = dict(
    device=str(device.device_kind),
    platform=device.platform,
    cpu_count=os.cpu_count(),
    machine=platform.machine(),
    jax=jax.__version__,
    quick=args.quick,
    repeats=repeats,
    max_seconds=args.max_seconds,
    n_tasks=N_TASKS,
    inner_steps=INNER_STEPS,
    hvp_steps=HVP_STEPS,
    matmul_2048_gflops_per_s=matmul / 1e9,
    load_average_at_start=os.getloadavg(),
  )
  rows = run(
    settings,
    args.conv,
    repeats,
    args.max_seconds,
    on_row=lambda rows: write_results(stem, meta, rows),
  )
  print_table(rows, matmul / 1e9)
  meta["load_average_at_end"] = os.getloadavg()
  write_results(stem, meta, rows)
  print(f"wrote {stem}.json and {stem}.csv")


def write_results(stem, meta, rows):
  """Writes `rows` (and `meta`) to `stem`.json and `stem`.csv."""
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=2)
  with open(stem + ".csv", "w", newline="") as f:
    fields = ["device", "quick"] + list(rows[0])
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in rows:
      writer.writerow(dict(device=meta["device"], quick=meta["quick"], **r))


if __name__ == "__main__":
  main()
