"""Scaling efficiency of the data-parallel meta-step over devices.

The Omniglot 5-way 1-shot iMAML-GD meta-step (``models.omniglot_convnet``,
``models.classification_loss``; lam 2, inner lr 0.05, 15 query images per
class, Adam 1e-3) is run with ``shard_meta_step`` on 1, 2, 4 and 8 devices
(a 1-D ``task_mesh`` over the first N devices), the task batch split over the
devices and the meta-state replicated. The tasks are drawn on the devices
with ``make_sharded_sampler`` from random images. For each device count the
script reports the compile time, the median seconds per meta-step, tasks per
second, the speed-up over one device and the scaling efficiency

    efficiency(N) = tasks_per_s(N) / (N * tasks_per_s(1)).

Results go to ``benchmarks/results/scaling_<platform>.{csv,json}``.

On a machine without accelerators the CPU is split into ``--host-devices``
virtual devices (``XLA_FLAGS=--xla_force_host_platform_device_count``; the
script re-executes itself with the flag, which must be set before jax is
imported). Those devices share the same physical cores, so no speed-up is
expected there: the CPU run checks that the sharded step runs at every
device count and measures its overhead, not the scaling of real hardware.

    python benchmarks/scaling.py                  # meta-batch 32, paper steps
    python benchmarks/scaling.py --quick          # meta-batch 16, 2+2 steps (*_quick.*)
    python benchmarks/scaling.py --devices 1,2,4,8 --host-devices 8
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

from arguments import count

_FORCE_FLAG = "--xla_force_host_platform_device_count"


def device_counts(text: str) -> list[int]:
  """``--devices``: comma-separated counts, each at least 1."""
  return [count(1)(c) for c in text.split(",") if c.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="meta-batch 16, 2 inner GD and 2 CG steps, 2 timed repeats",
  )
  parser.add_argument(
    "--devices",
    type=device_counts,
    default="1,2,4,8",
    help="comma-separated device counts (default 1,2,4,8)",
  )
  parser.add_argument(
    "--host-devices",
    type=count(0),
    default=8,
    help="virtual CPU devices to create (0: leave XLA_FLAGS "
    "alone); affects only the CPU platform",
  )
  parser.add_argument(
    "--meta-batch",
    type=count(1),
    default=None,
    help="tasks per meta-step (default 32, quick 16)",
  )
  parser.add_argument(
    "--inner-steps",
    type=count(1),
    default=None,
    help="inner GD steps (default 16, quick 2)",
  )
  parser.add_argument(
    "--cg-steps",
    type=count(1),
    default=None,
    help="CG steps (default 5, quick 2)",
  )
  parser.add_argument(
    "--repeats",
    type=count(1),
    default=None,
    help="timed meta-steps per device count (default 5, quick 2)",
  )
  parser.add_argument(
    "--out", default=None, help="output folder (default benchmarks/results)"
  )
  return parser.parse_args(argv)


def ensure_host_devices(n: int) -> None:
  """Re-executes this script with ``n`` forced host devices if needed."""
  flags = os.environ.get("XLA_FLAGS", "")
  if n <= 0 or _FORCE_FLAG in flags:
    return
  if "jax" in sys.modules:
    raise RuntimeError("jax is already imported; set XLA_FLAGS before it.")
  env = dict(os.environ, XLA_FLAGS=f"{flags} {_FORCE_FLAG}={n}".strip())
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv=None):
  args = parse_args(argv)
  ensure_host_devices(args.host_devices)

  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import imaml_jax as im
  from imaml_jax import make_sharded_sampler
  from imaml_jax import models
  from imaml_jax import replicate
  from imaml_jax import shard_meta_step
  from imaml_jax import task_mesh

  quick = args.quick
  meta_batch = args.meta_batch or (16 if quick else 32)
  inner_steps = args.inner_steps or (2 if quick else 16)
  cg_steps = args.cg_steps or (2 if quick else 5)
  repeats = args.repeats or (2 if quick else 5)
  n_way, k_shot, q_query, lam, inner_lr = 5, 1, 15, 2.0, 0.05

  available = jax.devices()
  counts = args.devices
  skipped = [c for c in counts if c > len(available) or meta_batch % c]
  counts = [c for c in counts if c not in skipped]
  device = available[0]
  forced = device.platform == "cpu" and _FORCE_FLAG in os.environ.get(
    "XLA_FLAGS", ""
  )
  note = (
    "The devices are virtual CPU devices forced with "
    f"{_FORCE_FLAG}; they share this machine's {os.cpu_count()} "
    "cores, so no speed-up with more devices is expected here; the "
    "numbers show that the sharded step runs and what it costs."
    if forced
    else ""
  )
  print(
    f"{len(available)} x {device.platform} ({device.device_kind}); "
    f"meta-batch {meta_batch}, {inner_steps} inner GD steps, {cg_steps} "
    f"CG steps."
  )
  if note:
    print("NOTE: " + note)
  if skipped:
    print(
      f"skipping device counts {skipped} (more than {len(available)} "
      f"devices or not a divisor of the meta-batch {meta_batch})"
    )

  net = models.omniglot_convnet(n_way)
  loss = models.classification_loss(net)
  algorithm = im.imaml(lam, im.gd(inner_steps, inner_lr), im.cg(cg_steps))
  init, step = im.make_meta_step(
    loss, optax.adam(1e-3), algorithm, has_aux=True
  )
  params = models.init_params(
    net, jax.random.key(0), jnp.zeros((n_way * k_shot, 28, 28, 1))
  )
  images = np.random.default_rng(0).integers(
    0, 256, (100, 20, 28, 28, 1), dtype=np.uint8
  )

  rows = []
  for n in counts:
    mesh = task_mesh(n)
    sample = make_sharded_sampler(mesh, n_way, k_shot, q_query, meta_batch)
    tasks = sample(jax.random.key(1), replicate(images, mesh))
    state = replicate(init(params), mesh)
    sharded_step = shard_meta_step(step, mesh)
    start = time.perf_counter()
    compiled = sharded_step.lower(state, tasks).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, tasks)  # warm-up
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      state, metrics = compiled(state, tasks)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    rows.append(
      {
        "devices": n,
        "meta_batch": meta_batch,
        "tasks_per_device": meta_batch // n,
        "compile_s": round(compile_s, 2),
        "step_s": step_s,
        "step_s_min": min(times),
        "tasks_per_s": meta_batch / step_s,
        "loss_after": float(metrics["loss_after"]),
      }
    )
    print(f"  {n} device(s): {step_s:.3f} s/step", flush=True)

  base = next((r["tasks_per_s"] for r in rows if r["devices"] == 1), None)
  for r in rows:
    r["speedup"] = r["tasks_per_s"] / base if base else float("nan")
    r["efficiency"] = r["speedup"] / r["devices"] if base else float("nan")

  header = (
    f"{'devices':>7} {'tasks/dev':>9} {'compile s':>9} "
    f"{'step s':>8} {'tasks/s':>8} {'speed-up':>8} {'efficiency':>10}"
  )
  print(header)
  for r in rows:
    print(
      f"{r['devices']:>7} {r['tasks_per_device']:>9} "
      f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} "
      f"{r['tasks_per_s']:>8.2f} {r['speedup']:>8.2f} "
      f"{r['efficiency']:>10.2f}"
    )
  if note:
    print("NOTE: " + note)

  out = args.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results"
  )
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(
    out, f"scaling_{device.platform}" + ("_quick" if quick else "")
  )
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  summary = {
    "device": device.platform,
    "device_kind": device.device_kind,
    "n_devices_available": len(available),
    "forced_host_devices": forced,
    "cpu_cores": os.cpu_count(),
    "machine": platform.machine(),
    "note": note,
    "jax": jax.__version__,
    "quick": quick,
    "setting": {
      "n_way": n_way,
      "k_shot": k_shot,
      "q_query": q_query,
      "algorithm": "imaml_gd",
      "lam": lam,
      "inner_lr": inner_lr,
      "inner_steps": inner_steps,
      "cg_steps": cg_steps,
      "meta_batch": meta_batch,
      "optimizer": "adam(1e-3)",
      "repeats": repeats,
    },
    "command": " ".join(["python", "benchmarks/scaling.py"] + sys.argv[1:]),
    "rows": rows,
  }
  with open(stem + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {stem}.csv and {stem}.json")


if __name__ == "__main__":
  main()
