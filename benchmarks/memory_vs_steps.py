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
    python benchmarks/memory_vs_steps.py --isolate          # GPU: peak bytes
                                                            # per point
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
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

ALGORITHMS = {
  "imaml": lambda k: im.imaml(2.0, im.gd(k, 0.05), im.cg(5)),
  "maml": lambda k: im.maml(im.gd(k, 0.1)),
  "maml_remat": lambda k: im.maml(im.gd(k, 0.1), remat=True),
  "fomaml": lambda k: im.fomaml(im.gd(k, 0.1)),
}


def peak_device_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure(
  algorithm: str,
  steps: int,
  n_way: int,
  k_shot: int,
  q_query: int,
  meta_batch: int,
  repeats: int,
):
  net = models.omniglot_convnet(n_way)
  loss_fn = models.classification_loss(net)
  params = models.init_params(
    net, jax.random.key(0), jnp.zeros((n_way * k_shot, 28, 28, 1))
  )
  init, step = im.make_meta_step(
    loss_fn,
    optax.adam(1e-3),
    ALGORITHMS[algorithm](steps),
    has_aux=True,
    pre_adaptation_metrics=False,
  )
  state = init(params)
  rng = np.random.default_rng(0)
  images = jnp.asarray(
    rng.integers(0, 256, (max(n_way, 50), 20, 28, 28, 1), dtype=np.uint8)
  )
  tasks = data.sample_tasks(
    jax.random.key(0), images, n_way, k_shot, q_query, meta_batch
  )
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, tasks).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  row = {
    "algorithm": algorithm,
    "inner_steps": steps,
    "temp_mb": memory.temp_size_in_bytes / 2**20,
    "argument_mb": memory.argument_size_in_bytes / 2**20,
    "compile_s": round(compile_s, 2),
  }
  if repeats:
    try:
      jax.block_until_ready(compiled(state, tasks))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, tasks))
        times.append(time.perf_counter() - t0)
    except Exception as e:  # pylint: disable=broad-except
      # Typically RESOURCE_EXHAUSTED: the step does not fit the device.
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      return row
    row["step_s"] = statistics.median(times)
    row["peak_device_mb"] = ((peak_device_bytes() or 0) / 2**20) or None
  return row


def _point_command(algorithm: str, steps: int, args, compile_only: bool):
  command = [
    sys.executable,
    os.path.abspath(__file__),
    "--point",
    algorithm,
    str(steps),
  ] + [
    f"--{k.replace('_', '-')}={getattr(args, k)}"
    for k in ("n_way", "k_shot", "q_query", "meta_batch", "repeats")
  ]
  if args.no_time or compile_only:
    command.append("--no-time")
  return command


def _point_row(algorithm, steps, done) -> dict:
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
  return {"algorithm": algorithm, "inner_steps": steps, "error": tail[:300]}


def _point_env(cache_dir):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if cache_dir:
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def precompile_points(points, args, cache_dir: str) -> dict:
  """Compiles every point in ``args.jobs`` parallel processes.

  The executables land in JAX's persistent compilation cache at
  ``cache_dir``, so the timed processes that follow load them instead of
  compiling; each point's compile time and compiled memory come from here.
  """
  import concurrent.futures  # pylint: disable=import-outside-toplevel

  def compile_point(point):
    try:
      done = subprocess.run(
        _point_command(*point, args, compile_only=True),
        capture_output=True,
        text=True,
        check=False,
        timeout=args.point_timeout,
        env=_point_env(cache_dir),
      )
    except subprocess.TimeoutExpired:
      return point, {
        "algorithm": point[0],
        "inner_steps": point[1],
        "error": f"compile timed out after {args.point_timeout} s",
      }
    return point, _point_row(*point, done)

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    return dict(pool.map(compile_point, points))


def measure_in_subprocess(
  algorithm: str, steps: int, args, cache_dir: str | None = None
) -> dict:
  """``measure`` in a fresh process, so the device's peak bytes are its own.

  A point that fails (the device runs out of memory, say) or outlasts
  ``--point-timeout`` gives a row with an ``error`` field instead of numbers.
  """
  try:
    done = subprocess.run(
      _point_command(algorithm, steps, args, False),
      capture_output=True,
      text=True,
      check=False,
      timeout=args.point_timeout,
      env=_point_env(cache_dir),
    )
  except subprocess.TimeoutExpired:
    return {
      "algorithm": algorithm,
      "inner_steps": steps,
      "error": f"timed out after {args.point_timeout} s",
    }
  return _point_row(algorithm, steps, done)


def write_rows(rows, stem: str, device_kind: str, setting: dict) -> None:
  with open(stem + ".json", "w") as f:
    json.dump(
      {"device": device_kind, "setting": setting, "rows": rows}, f, indent=2
    )
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
    writer.writeheader()
    writer.writerows(rows)


def plot(rows, title, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  timed = any("step_s" in r for r in rows)
  fig, axes = plt.subplots(
    1, 2 if timed else 1, figsize=(10 if timed else 5, 4)
  )
  axes = np.atleast_1d(axes)
  for name in ALGORITHMS:
    pts = sorted(
      (r["inner_steps"], r["temp_mb"], r.get("step_s"))
      for r in rows
      if r["algorithm"] == name and "temp_mb" in r
    )
    if not pts:
      continue
    steps, mem, _ = zip(*pts)
    axes[0].plot(steps, mem, "o-", label=name)
    timed_pts = [(k, t) for k, _, t in pts if t is not None]
    if timed and timed_pts:
      axes[1].plot(*zip(*timed_pts), "o-", label=name)
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
  parser.add_argument("--n-way", type=count(1), default=20)
  parser.add_argument("--k-shot", type=count(1), default=5)
  parser.add_argument("--q-query", type=count(1), default=15)
  parser.add_argument("--meta-batch", type=count(1), default=32)
  parser.add_argument(
    "--steps", type=count(1), nargs="+", default=[1, 5, 10, 25, 50, 100]
  )
  parser.add_argument(
    "--algorithms",
    nargs="+",
    default=list(ALGORITHMS),
    choices=list(ALGORITHMS),
  )
  parser.add_argument(
    "--repeats",
    type=count(0),
    default=2,
    help="timed meta-steps per point (0: memory only)",
  )
  parser.add_argument(
    "--no-time", action="store_true", help="memory only (same as --repeats 0)"
  )
  parser.add_argument(
    "--quick", action="store_true", help="5-way 1-shot, batch 2, steps 1 and 4"
  )
  parser.add_argument(
    "--isolate",
    action="store_true",
    help="measure each point in a fresh process (the "
    "device's peak bytes are then per point, and a "
    "point that runs out of memory is recorded)",
  )
  parser.add_argument(
    "--point-timeout",
    type=float,
    default=600.0,
    help="seconds allowed per isolated point",
  )
  parser.add_argument(
    "--jobs",
    type=count(1),
    default=1,
    help="with --isolate: compile the points in this many "
    "parallel processes first (through JAX's "
    "persistent compilation cache), then time them "
    "one at a time",
  )
  parser.add_argument("--tag", default="", help="suffix of the output files")
  parser.add_argument(
    "--point", nargs=2, metavar=("ALGORITHM", "STEPS"), help=argparse.SUPPRESS
  )
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if args.point:
    name, k = args.point[0], int(args.point[1])
    print(
      json.dumps(
        measure(
          name,
          k,
          args.n_way,
          args.k_shot,
          args.q_query,
          args.meta_batch,
          0 if args.no_time else args.repeats,
        )
      )
    )
    return None
  if args.quick:
    args.n_way, args.k_shot, args.meta_batch = 5, 1, 2
    args.steps, args.repeats = [1, 4], 1
  repeats = 0 if args.no_time else args.repeats
  if args.isolate:
    # The points run in child processes: this one must not hold the GPU's
    # memory (JAX preallocates most of it at the first device query).
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  device = jax.devices()[0]
  rows = []
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(
    args.out,
    f"memory_vs_steps_{device.platform}"
    f"{'_quick' if args.quick else ''}{args.tag}",
  )
  setting = {
    k: getattr(args, k) for k in ("n_way", "k_shot", "q_query", "meta_batch")
  }
  print(
    f"device: {device.device_kind}; {args.n_way}-way {args.k_shot}-shot, "
    f"{args.q_query} query/class, meta-batch {args.meta_batch}"
  )
  points = [(name, k) for name in args.algorithms for k in args.steps]
  compiled, cache_dir = {}, None
  if args.isolate and args.jobs > 1:
    import tempfile  # pylint: disable=import-outside-toplevel

    cache_dir = tempfile.mkdtemp(prefix="imaml_memory_cache_")
    start = time.perf_counter()
    compiled = precompile_points(points, args, cache_dir)
    print(
      f"compiled {len(points)} points in {args.jobs} processes in "
      f"{time.perf_counter() - start:.0f} s",
      flush=True,
    )
  for name, k in points:
    if args.isolate:
      first = compiled.get((name, k), {})
      if first and "temp_mb" not in first:
        row = first  # It did not even compile.
      else:
        row = measure_in_subprocess(name, k, args, cache_dir)
        if "compile_s" in first and "temp_mb" in row:
          row["compile_s"] = first["compile_s"]  # Not the cache load.
    else:
      row = measure(
        name, k, args.n_way, args.k_shot, args.q_query, args.meta_batch, repeats
      )
    rows.append(row)
    write_rows(rows, stem, device.device_kind, setting)  # As it goes.
    if "temp_mb" not in row:
      print(f"{name:11s} steps={k:4d}  failed: {row['error']}", flush=True)
      continue
    timing = f"  step {row['step_s']:.3f}s" if "step_s" in row else ""
    if row.get("peak_device_mb"):
      timing += f"  peak {row['peak_device_mb']:9.1f} MiB"
    if "error" in row:
      timing += f"  run failed: {row['error'][:120]}"
    print(
      f"{name:11s} steps={k:4d}  temp {row['temp_mb']:9.1f} MiB  "
      f"compile {row['compile_s']:6.1f}s{timing}",
      flush=True,
    )
  write_rows(rows, stem, device.device_kind, setting)
  plot(
    rows,
    f"Omniglot {args.n_way}-way {args.k_shot}-shot, meta-batch "
    f"{args.meta_batch} ({device.device_kind})",
    stem + ".png",
  )
  print(f"wrote {stem}.{{csv,json,png}}")
  return rows


if __name__ == "__main__":
  main()
