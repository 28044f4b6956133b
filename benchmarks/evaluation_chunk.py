"""Testing a chunk of tasks vmapped or one task at a time.

``imaml-eval`` and the validation of a training run test their tasks in
chunks (``eval_chunk``, 100 in the Omniglot configs); within a chunk
``make_eval_step(task_chunk=...)`` either vmaps the tasks (``None``) or maps
over them (``1``: one at a time). For the Omniglot conv net this script
compiles both, checks that they score every task alike, and records the
compiled program's temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``) and the median time per
task, the two ways interleaved in one process.

Writes ``benchmarks/results/evaluation_chunk_<platform>_<N>w<K>s_<algorithm>.json``.

    python benchmarks/evaluation_chunk.py                  # 20-way 1-shot, MAML
    python benchmarks/evaluation_chunk.py --algorithm imaml
    python benchmarks/evaluation_chunk.py --n-way 5        # 5-way 1-shot
    python benchmarks/evaluation_chunk.py --quick          # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from arguments import count
from speed_defaults import cpu_model

import imaml_jax as im
from imaml_jax import data
from imaml_jax import models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The test-time adaptation of the Omniglot configs at 20-way.
ALGORITHMS = {
  "maml": lambda: im.maml(im.gd(5, 0.1)),
  "imaml": lambda: im.imaml(2.0, im.gd(25, 0.05, backtrack=True), im.cg(5)),
}


def problem(n_way: int, k_shot: int, q_query: int, n_tasks: int):
  """``(loss, params, tasks)``: the conv net at its initial parameters and
  ``n_tasks`` tasks of random images (the cost does not depend on them)."""
  net = models.omniglot_convnet(n_way)
  images = np.random.default_rng(0).integers(
    0, 256, (max(2 * n_way, 10), k_shot + q_query, 28, 28, 1), dtype=np.uint8
  )
  tasks = data.evaluation_tasks(images, n_way, k_shot, q_query, n_tasks)
  params = models.init_params(
    net, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32)
  )
  return models.classification_loss(net), params, tasks


def compile_both(loss, algorithm, params, tasks) -> dict:
  """``{task_chunk: compiled evaluation}`` for ``None`` and ``1``."""
  compiled = {}
  for chunk in (None, 1):
    evaluate = im.make_eval_step(
      loss, algorithm, has_aux=True, task_chunk=chunk
    )
    compiled[chunk] = jax.jit(evaluate).lower(params, tasks).compile()
  return compiled


def measure(compiled: dict, params, tasks, repeats: int) -> dict:
  """Median seconds per task of each way (interleaved), their temporaries
  and the largest per-task difference of their scores."""
  n_tasks = jax.tree.leaves(tasks)[0].shape[0]
  scores = {c: jax.device_get(fn(params, tasks)) for c, fn in compiled.items()}
  times = {c: [] for c in compiled}
  for _ in range(repeats):
    for chunk, fn in compiled.items():
      began = time.perf_counter()
      jax.block_until_ready(fn(params, tasks))
      times[chunk].append((time.perf_counter() - began) / n_tasks)
  label = {None: "vmapped", 1: "one_at_a_time"}
  return {
    "tasks": n_tasks,
    "temp_mib": {
      label[c]: fn.memory_analysis().temp_size_in_bytes / 2**20
      for c, fn in compiled.items()
    },
    "s_per_task": {label[c]: statistics.median(t) for c, t in times.items()},
    "largest_score_difference": {
      name: float(np.max(np.abs(scores[1][name] - scores[None][name])))
      for name in scores[None]
    },
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-way", type=count(1), default=20)
  parser.add_argument("--k-shot", type=count(1), default=1)
  parser.add_argument("--q-query", type=count(1), default=15)
  parser.add_argument(
    "--tasks", type=count(1), default=100, help="tasks per chunk"
  )
  parser.add_argument("--algorithm", choices=list(ALGORITHMS), default="maml")
  parser.add_argument("--repeats", type=count(1), default=3)
  parser.add_argument(
    "--quick", action="store_true", help="5-way 1-shot, 4 tasks, one repeat"
  )
  parser.add_argument("--tag", default="", help="suffix of the output file")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if args.quick:
    args.n_way, args.k_shot, args.q_query = 5, 1, 5
    args.tasks, args.repeats = 4, 1
  device = jax.devices()[0]
  kind = cpu_model() if device.platform == "cpu" else device.device_kind
  loss, params, tasks = problem(
    args.n_way, args.k_shot, args.q_query, args.tasks
  )
  compiled = compile_both(loss, ALGORITHMS[args.algorithm](), params, tasks)
  result = measure(compiled, params, tasks, args.repeats)
  result.update(
    device=kind,
    algorithm=args.algorithm,
    setting=f"{args.n_way}-way {args.k_shot}-shot, {args.q_query} query/class",
    repeats=args.repeats,
  )
  os.makedirs(args.out, exist_ok=True)
  name = (
    f"evaluation_chunk_{device.platform}_{args.n_way}w{args.k_shot}s_"
    f"{args.algorithm}{'_quick' if args.quick else ''}{args.tag}.json"
  )
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(result, f, indent=1)
  temp, speed = result["temp_mib"], result["s_per_task"]
  print(
    f"{kind}, {result['setting']}, {args.algorithm}, "
    f"{args.tasks} tasks a chunk:\n"
    f"  vmapped:         {speed['vmapped']:.4f} s/task, "
    f"{temp['vmapped']:.0f} MiB of temporaries\n"
    f"  one at a time:   {speed['one_at_a_time']:.4f} s/task, "
    f"{temp['one_at_a_time']:.0f} MiB of temporaries\n"
    f"  one at a time is x{speed['vmapped'] / speed['one_at_a_time']:.2f} "
    f"as fast with {temp['vmapped'] / temp['one_at_a_time']:.1f}x less "
    "memory; largest score difference "
    f"{max(result['largest_score_difference'].values()):.1e}"
  )
  return result


if __name__ == "__main__":
  main()
