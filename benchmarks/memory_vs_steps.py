"""Compute and memory of MAML vs iMAML as the inner steps grow (Figure 2b).

For the Omniglot conv net (default 20-way 5-shot, 15 query images per class)
this compiles the meta-step of

  * iMAML-GD (lam 2, 5 CG steps),
  * MAML (second order, reverse mode through the unrolled inner loop),
  * MAML with ``remat=True`` (each inner step rematerialised),
  * first-order MAML,

for each number of inner steps, and records the compiled executable's
temporary memory (``compiled.memory_analysis().temp_size_in_bytes``: the
buffers XLA allocates for the step beyond its inputs and outputs), on a GPU
also the device's peak bytes in use, and the median time of one meta-step.

Writes ``benchmarks/results/memory_vs_steps_<device>.{csv,json,png}``.

    python benchmarks/memory_vs_steps.py                    # 20w5s, batch 32
    python benchmarks/memory_vs_steps.py --no-time          # memory only
    python benchmarks/memory_vs_steps.py --quick            # seconds, for tests
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import imaml_jax as im
from imaml_jax import data, models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

ALGORITHMS = {
    "imaml": lambda k: im.imaml(2.0, im.gd(k, 0.1), im.cg(5)),
    "maml": lambda k: im.maml(im.gd(k, 0.1)),
    "maml_remat": lambda k: im.maml(im.gd(k, 0.1), remat=True),
    "fomaml": lambda k: im.fomaml(im.gd(k, 0.1)),
}


def peak_device_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure(algorithm: str, steps: int, n_way: int, k_shot: int, q_query: int,
            meta_batch: int, repeats: int):
  net = models.omniglot_convnet(n_way)
  loss_fn = models.classification_loss(net)
  params = models.init_params(net, jax.random.key(0),
                              jnp.zeros((n_way * k_shot, 28, 28, 1)))
  init, step = im.make_meta_step(loss_fn, optax.adam(1e-3),
                                 ALGORITHMS[algorithm](steps), has_aux=True,
                                 pre_adaptation_metrics=False)
  state = init(params)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (max(n_way, 50), 20, 28, 28, 1),
                                    dtype=np.uint8))
  tasks = data.sample_tasks(jax.random.key(0), images, n_way, k_shot, q_query,
                            meta_batch)
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, tasks).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  row = {"algorithm": algorithm, "inner_steps": steps,
         "temp_mb": memory.temp_size_in_bytes / 2 ** 20,
         "argument_mb": memory.argument_size_in_bytes / 2 ** 20,
         "compile_s": round(compile_s, 2)}
  if repeats:
    jax.block_until_ready(compiled(state, tasks))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, tasks))
      times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
    row["peak_device_mb"] = ((peak_device_bytes() or 0) / 2 ** 20) or None
  return row


def plot(rows, title, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  timed = any("step_s" in r for r in rows)
  fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10 if timed else 5, 4))
  axes = np.atleast_1d(axes)
  for name in ALGORITHMS:
    pts = sorted((r["inner_steps"], r["temp_mb"], r.get("step_s"))
                 for r in rows if r["algorithm"] == name)
    if not pts:
      continue
    steps, mem, secs = zip(*pts)
    axes[0].plot(steps, mem, "o-", label=name)
    if timed:
      axes[1].plot(steps, secs, "o-", label=name)
  axes[0].set_xlabel("inner steps")
  axes[0].set_ylabel("compiled temporary memory (MiB)")
  axes[0].legend()
  if timed:
    axes[1].set_xlabel("inner steps")
    axes[1].set_ylabel("seconds per meta-step")
    axes[1].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-way", type=int, default=20)
  parser.add_argument("--k-shot", type=int, default=5)
  parser.add_argument("--q-query", type=int, default=15)
  parser.add_argument("--meta-batch", type=int, default=32)
  parser.add_argument("--steps", type=int, nargs="+",
                      default=[1, 5, 10, 25, 50, 100])
  parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS),
                      choices=list(ALGORITHMS))
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed meta-steps per point (0: memory only)")
  parser.add_argument("--no-time", action="store_true",
                      help="memory only (same as --repeats 0)")
  parser.add_argument("--quick", action="store_true",
                      help="5-way 1-shot, batch 2, steps 1 and 4")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if args.quick:
    args.n_way, args.k_shot, args.meta_batch = 5, 1, 2
    args.steps, args.repeats = [1, 4], 1
  repeats = 0 if args.no_time else args.repeats
  device = jax.devices()[0]
  rows = []
  print(f"device: {device.device_kind}; {args.n_way}-way {args.k_shot}-shot, "
        f"{args.q_query} query/class, meta-batch {args.meta_batch}")
  for name in args.algorithms:
    for k in args.steps:
      row = measure(name, k, args.n_way, args.k_shot, args.q_query,
                    args.meta_batch, repeats)
      rows.append(row)
      timing = f"  step {row['step_s']:.3f}s" if "step_s" in row else ""
      print(f"{name:11s} steps={k:4d}  temp {row['temp_mb']:9.1f} MiB  "
            f"compile {row['compile_s']:6.1f}s{timing}", flush=True)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"memory_vs_steps_{device.platform}"
                      f"{'_quick' if args.quick else ''}")
  setting = {k: getattr(args, k) for k in ("n_way", "k_shot", "q_query",
                                           "meta_batch")}
  with open(stem + ".json", "w") as f:
    json.dump({"device": device.device_kind, "setting": setting,
               "rows": rows}, f, indent=2)
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
    writer.writeheader()
    writer.writerows(rows)
  plot(rows, f"Omniglot {args.n_way}-way {args.k_shot}-shot, meta-batch "
       f"{args.meta_batch} ({device.device_kind})", stem + ".png")
  print(f"wrote {stem}.{{csv,json,png}}")
  return rows


if __name__ == "__main__":
  main()
