"""Seconds per task of the default training step, this version against another.

Timings on a shared machine drift from minute to minute, so two numbers
from two runs say little. This script starts one worker process per
(case, version), each of which builds and compiles its step once, and then
asks them in turn, round after round, to run ``--steps`` meta-steps: only
one worker computes at a time, drift hits every version alike, and the
ratios of the medians are what to read. Cases:

  * ``train:<config>``: the training step exactly as ``imaml-train <config>``
    builds it with its defaults (device count, ``task_chunk``, residual
    schedule of the version), on random binary images instead of Omniglot
    (the speed does not depend on the pixels). ``--set`` overrides config
    fields for every version alike (e.g. a smaller ``meta_batch`` for the
    20-way step, whose per-task time does not depend on it).
  * ``library``: ``make_meta_step(..., task_chunk=1)`` on the Omniglot
    5-way 1-shot iMAML-GD step (meta-batch 32, the default solver), jitted
    on one device (the earlier recipe), against ``im.use_cpu_cores()`` and
    ``shard_meta_step(..., per_device=True)`` where the version has them.

The other version runs from a source tree given by ``--before`` (put on
``PYTHONPATH``), e.g. ``git worktree add /tmp/before <commit>``.

    python benchmarks/speed_defaults.py --before /tmp/before \\
        --cases train:omniglot_5w1s_imaml_gd library --rounds 5

Writes ``benchmarks/results/speed_defaults_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

from arguments import count

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# A worker: builds one step, prints "ready", then answers each line "N" on
# stdin with the seconds N calls took.
_WORKER = r"""
import json, os, sys, time
case, overrides = sys.argv[1], sys.argv[2:]
import imaml_jax as im
from imaml_jax.train import config as config_lib, experiment as exp_lib
from imaml_jax.train import runtime
import imaml_jax.train as train
new = hasattr(im, "use_cpu_cores")
if case.startswith("train:"):
  config = config_lib.apply_overrides(
      config_lib.get_config(case.split(":", 1)[1]), overrides)
  if new:
    runtime.split_cpu(config)       # What imaml-train does first.
else:
  config = config_lib.apply_overrides(
      config_lib.get_config("omniglot_5w1s_imaml_gd"), overrides)
  if new:
    im.use_cpu_cores()
import jax, numpy as np
if config.dataset == "sinusoid":
  data = exp_lib.Data(None, None, None)
else:
  shape = (40 * config.n_way, 20, 28, 28, 1)
  fake = np.random.default_rng(0).integers(0, 2, shape, dtype=np.uint8)
  data = exp_lib.Data(fake, fake, fake)
exp = exp_lib.build(config, data)
key = jax.random.key(0)
init, _ = im.make_meta_step(exp.loss, exp.optimizer, exp.algorithm,
                            has_aux=True)
state = init(exp.init_params(key))
start = time.perf_counter()
if case.startswith("train:"):
  mesh = runtime.make_mesh(config)
  sums = train.init_sums(train.metric_shapes(exp, state, key))
  args = im.replicate((state, sums, exp.data.train, key), mesh)
  from imaml_jax.train import steps as steps_lib
  fn, _ = steps_lib.compile_train_step(train.make_train_step(exp, mesh), mesh,
                                   *args)
  def run(n, args=list(args)):
    for _ in range(n):
      args[0], args[1] = fn(*args)
    jax.block_until_ready(args[:2])
  devices = mesh.size
else:
  tasks = exp.sample(key, exp.data.train)
  if new:
    mesh = im.task_mesh()
    _, step = im.make_meta_step(exp.loss, exp.optimizer, exp.algorithm,
                                has_aux=True, task_chunk=1,
                                axis_name=im.TASK_AXIS)
    step = im.shard_meta_step(step, mesh, per_device=True)
    state, tasks = im.replicate(state, mesh), im.shard_tasks(tasks, mesh)
    devices = mesh.size
  else:
    _, step = im.make_meta_step(exp.loss, exp.optimizer, exp.algorithm,
                                has_aux=True, task_chunk=1)
    step = jax.jit(step)
    devices = 1
  jax.block_until_ready(step(state, tasks))
  def run(n, state=state):
    for _ in range(n):
      state, metrics = step(state, tasks)
    jax.block_until_ready(state)
compile_s = time.perf_counter() - start
run(1)
print(json.dumps({"ready": True, "compile_s": compile_s, "devices": devices,
                  "tasks": config.meta_batch, "jax": jax.__version__}),
      flush=True)
for line in sys.stdin:
  n = int(line)
  begin = time.perf_counter()
  run(n)
  print(json.dumps({"seconds": time.perf_counter() - begin}), flush=True)
"""


class Worker:
  """A worker process for one case under one version."""

  def __init__(
    self, case: str, label: str, pythonpath: str | None, overrides: list[str]
  ):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONWARNINGS"] = "ignore"
    if pythonpath:
      env["PYTHONPATH"] = pythonpath
    self.case, self.label = case, label
    # From a neutral directory: ``python -c`` puts the working directory
    # first on sys.path, ahead of PYTHONPATH.
    self.proc = subprocess.Popen(
      [sys.executable, "-c", _WORKER, case, *overrides],
      env=env,
      cwd=os.path.dirname(os.path.abspath(pythonpath or os.sep)),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.case} ({self.label}) died")
    return json.loads(line)

  def time(self, steps: int) -> float:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return self._read()["seconds"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--before", required=True, help="source tree of the other version"
  )
  parser.add_argument(
    "--cases", nargs="+", default=["train:omniglot_5w1s_imaml_gd", "library"]
  )
  parser.add_argument(
    "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE"
  )
  parser.add_argument("--rounds", type=count(1), default=5)
  parser.add_argument(
    "--steps", type=count(1), default=3, help="meta-steps per timing"
  )
  parser.add_argument("--tag", default="cpu")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
  versions = (
    ("before", os.path.abspath(args.before)),
    ("this version", os.path.abspath(here)),
  )
  for label, path in versions:  # Each worker must import its own tree.
    probe = subprocess.run(
      [sys.executable, "-c", "import imaml_jax; print(imaml_jax.__file__)"],
      env=dict(os.environ, PYTHONPATH=path),
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(path),
    ).stdout.strip()
    if not probe.startswith(path):
      raise SystemExit(f"{label}: {path} imports {probe}")
  print(
    f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; load "
    f"{os.getloadavg()}",
    flush=True,
  )
  load_before = os.getloadavg()
  summary = []
  for case in args.cases:
    workers = [
      Worker(case, label, path, args.overrides) for label, path in versions
    ]
    times = {w.label: [] for w in workers}
    for r in range(args.rounds):
      for w in workers if r % 2 == 0 else workers[::-1]:
        per_task = w.time(args.steps) / (args.steps * w.info["tasks"])
        times[w.label].append(per_task)
      print(
        f"{case} round {r}: "
        + ", ".join(f"{k} {v[-1]:.4g}" for k, v in times.items())
        + " s/task",
        flush=True,
      )
    for w in workers:
      w.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    # Each round's two timings ran back to back: their ratio is the paired
    # measure, less sensitive to the load drifting between rounds.
    ratios = [
      b / n for b, n in zip(times["before"], times["this version"], strict=True)
    ]
    entry = {
      "case": case,
      "overrides": args.overrides,
      "s_per_task": medians,
      "all": times,
      "devices": {w.label: w.info["devices"] for w in workers},
      "setup_s": {w.label: w.info["compile_s"] for w in workers},
      "speedup": statistics.median(ratios),
      "ratios": ratios,
    }
    summary.append(entry)
    print(
      f"{case}: before {medians['before']:.4g} s/task on "
      f"{entry['devices']['before']} device(s), this version "
      f"{medians['this version']:.4g} on "
      f"{entry['devices']['this version']}: x{entry['speedup']:.2f} "
      "(median of the rounds' ratios)",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"speed_defaults_{args.tag}.json")
  with open(path, "w") as f:
    json.dump(
      {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": args.rounds,
        "steps": args.steps,
        "results": summary,
      },
      f,
      indent=1,
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
