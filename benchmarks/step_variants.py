"""Interleaved timing of variants of the Omniglot iMAML-GD meta-step.

Timings on a shared 2-core machine drift by 30% or more from one process to
the next, so comparing two numbers from two runs of ``throughput.py`` says
little. This script compiles every variant first and then times them in
turns, round after round, in one process: drift hits every variant alike and
the ratios between them are what to read. Variants (the iMAML-GD step of
``throughput.py``: lam 2, 16 or 25 checked GD steps at lr 0.05, 5 CG steps,
15 query images per class, Adam):

  * ``chunked``: a meta-batch of ``--meta-batch`` tasks run one task at a
    time (``make_meta_step(task_chunk=1)``, a ``lax.map`` over tasks);
  * ``vmapped``: the same batch, all tasks vmapped at once;
  * ``per_device``: the same batch split over all devices of the process,
    each device running its tasks one at a time (``make_meta_step(
    task_chunk=1, axis_name=...)`` under ``shard_meta_step(per_device=True)``).
    On a CPU, split it into one device per core first:
    ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; the other
    variants then run on the first device, as before;
  * ``single``: one task per meta-step;
  * ``scipy_cg``: one task per meta-step with ``jax.scipy.sparse.linalg.cg``
    called directly from zero and the residual measured with one more
    product (7 products a task for 5 iterations). ``im.cg`` did this by
    default until it started from ``x0 = b`` (6 products, the residual's
    product only when asked; ``speed_defaults.py``); the
    earlier hand-written CG, which spent no product on ``A @ 0`` and
    reported its recurrence residual, was about 10% faster per step
    (``throughput_cpu.md``).

It reports the median and fastest seconds per meta-step and tasks per
second of each, and writes ``benchmarks/results/step_variants_<platform>``
``.{csv,json}``; a process with several devices writes
``step_variants_<platform>_<N>dev.{csv,json}`` instead (e.g.
``step_variants_cpu_2dev``), beside the one-device result.

    python benchmarks/step_variants.py                  # 5w1s, meta-batch 32
    python benchmarks/step_variants.py --setting 5w5s --rounds 5
    python benchmarks/step_variants.py --quick          # small, for tests
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python benchmarks/step_variants.py --variants chunked per_device
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import optax
import throughput
from arguments import count

import imaml_jax as im

VARIANTS = ("chunked", "vmapped", "per_device", "single", "scipy_cg")


def scipy_cg(maxiter: int) -> im.LinearSolver:
  """``jax.scipy.sparse.linalg.cg`` with the residual measured by a product."""

  def solve(matvec, b):
    x, _ = jax.scipy.sparse.linalg.cg(matvec, b, tol=1e-10, maxiter=maxiter)
    return x, im.SolveInfo(residual=im.relative_residual(matvec, x, b))

  return im.LinearSolver(solve=solve, name=f"jax.scipy cg({maxiter})")


def compile_variant(
  variant: str, setting: str, meta_batch: int, inner_steps: int | None
):
  """Returns ``(compiled step, its arguments, tasks per step, compile s)``."""
  n_way, k_shot, default_steps = throughput.SETTINGS[setting]
  loss_fn, params = throughput.omniglot_problem(setting)
  algorithm = throughput.make_algorithm(
    "imaml_gd",
    inner_steps or default_steps,
    solver=scipy_cg(5) if variant == "scipy_cg" else None,
  )
  n_tasks = meta_batch if variant in ("chunked", "vmapped", "per_device") else 1
  per_device = variant == "per_device"
  init, step = im.make_meta_step(
    loss_fn,
    optax.adam(1e-3),
    algorithm,
    has_aux=True,
    pre_adaptation_metrics=False,
    task_chunk=1 if variant in ("chunked", "per_device") else None,
    axis_name=im.TASK_AXIS if per_device else None,
  )
  state = init(params)
  tasks = throughput.random_tasks(n_way, k_shot, 15, n_tasks)
  if per_device:
    mesh = im.task_mesh()
    im.check_divisible(n_tasks, mesh)
    step = im.shard_meta_step(step, mesh, per_device=True)
    state, tasks = im.replicate(state, mesh), im.shard_tasks(tasks, mesh)
  else:
    step = jax.jit(step)
  t0 = time.perf_counter()
  compiled = step.lower(state, tasks).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(state, tasks))  # warm-up
  return compiled, (state, tasks), n_tasks, compile_s


def time_in_turns(compiled: dict, rounds: int, min_seconds: float):
  """Per variant, the seconds per call of each round (variants in turn)."""
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, (fn, args, _, _) in compiled.items():
      calls, t0 = 0, time.perf_counter()
      while True:  # at least min_seconds per measurement
        jax.block_until_ready(fn(*args))
        calls += 1
        if time.perf_counter() - t0 >= min_seconds:
          break
      times[name].append((time.perf_counter() - t0) / calls)
  return times


def output_name(platform: str, devices: int, quick: bool) -> str:
  """The stem of the result files: a run on several devices is marked
  ``_<N>dev``, so that it does not replace the one-device result.

  Example:
    >>> output_name("cpu", 1, False), output_name("cpu", 2, True)
    ('step_variants_cpu', 'step_variants_cpu_2dev_quick')
  """
  split = f"_{devices}dev" if devices > 1 else ""
  return f"step_variants_{platform}{split}{'_quick' if quick else ''}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--setting", default="5w1s", choices=list(throughput.SETTINGS)
  )
  parser.add_argument(
    "--variants", nargs="+", default=None, choices=VARIANTS, help="default: all"
  )
  parser.add_argument("--meta-batch", type=count(1), default=32)
  parser.add_argument("--rounds", type=count(1), default=9)
  parser.add_argument(
    "--min-seconds",
    type=float,
    default=1.0,
    help="shortest measurement: a fast variant is called "
    "repeatedly until this much time has passed",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="meta-batch 2, 2 inner steps, 2 rounds; only the "
    "chunked and single variants unless --variants "
    "is given",
  )
  parser.add_argument("--out", default=throughput.RESULTS)
  args = parser.parse_args(argv)
  inner_steps = None
  if args.quick:
    args.meta_batch, args.rounds, args.min_seconds, inner_steps = 2, 2, 0, 2
    args.variants = args.variants or ["chunked", "single"]
  args.variants = args.variants or list(VARIANTS)

  if "per_device" in args.variants and jax.device_count() < 2:
    parser.error(
      "the per_device variant needs several devices; on a CPU set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=2 (one "
      "per core) before running the script"
    )
  device = throughput.device_name()
  if jax.device_count() > 1:
    device += f", {jax.device_count()} devices"
  print(
    f"device: {device}; jax {jax.__version__}; setting {args.setting}",
    flush=True,
  )
  compiled = {}
  for name in args.variants:
    compiled[name] = compile_variant(
      name, args.setting, args.meta_batch, inner_steps
    )
    print(f"compiled {name} in {compiled[name][3]:.1f}s", flush=True)
  times = time_in_turns(compiled, args.rounds, args.min_seconds)
  rows = []
  for name, ts in times.items():
    n_tasks, step_s = compiled[name][2], statistics.median(ts)
    rows.append(
      {
        "variant": name,
        "setting": args.setting,
        "tasks_per_step": n_tasks,
        "rounds": args.rounds,
        "compile_s": round(compiled[name][3], 2),
        "step_s": step_s,
        "step_s_min": min(ts),
        "tasks_per_s": n_tasks / step_s,
      }
    )
    print(
      f"{name:9s} {n_tasks:3d} tasks/step  step {step_s:8.4f}s "
      f"(fastest {min(ts):.4f}s)  {n_tasks / step_s:7.2f} tasks/s",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(
    args.out,
    output_name(jax.devices()[0].platform, jax.device_count(), args.quick),
  )
  meta = throughput.write_results(rows, stem, device, matmul=None)
  print(f"wrote {stem}.{{json,csv}}")
  return meta


if __name__ == "__main__":
  main()
