"""How long the training and evaluation steps take to compile, and why.

For each step asked for, a fresh Python process builds the experiment of a
named config (random images stand in for Omniglot: compilation does not
depend on pixel values), traces and lowers the jitted step
(``jax.jit(...).lower``) and compiles it (``.compile()``), timing the two
apart, and counts what XLA made of it: HLO instructions and fusions (each
fusion becomes one kernel that LLVM compiles; on a CPU, code generation
dominates the compile time). Besides the wall times it reports the
process's CPU time for lowering and compiling (``time.process_time``), which
other processes sharing the core inflate far less. A step is measured once
per repetition, each
in its own process, so no in-process cache helps. Each is compiled as the
trainer compiles it, with ``imaml_jax.train.compiler_options()`` (on a
CPU: XLA's older loop emitters, unless ``XLA_FLAGS`` names that option;
``--xla-flags new=--xla_cpu_use_fusion_emitters=true`` measures the newer);
``--interleave N`` also compiles it without those options in the same
process and alternates N calls of the two, so their speeds are compared
under the same load. Omniglot tasks are drawn from random binary images.

    python benchmarks/compile_time.py                       # the four steps below
    python benchmarks/compile_time.py --steps sinusoid_train --repeats 3
    python benchmarks/compile_time.py --quick               # sinusoid eval step only
    python benchmarks/compile_time.py --python /other/venv/bin/python --tag before
    python benchmarks/compile_time.py --other-path /tmp/before   # a worktree
    python benchmarks/compile_time.py --steps sinusoid_train --runs 20 \
        --xla-flags O0=--xla_backend_optimization_level=0
    python benchmarks/compile_time.py --steps omniglot_5w1s_train --repeats 1 \
        --interleave 20 --tag compiler_options_cpu

Steps: ``sinusoid_train`` (the main job's train step: sampling, meta-step,
metric sums), ``sinusoid_eval`` (its evaluation step over 100 tasks),
``omniglot_5w1s_train`` (``omniglot_5w1s_imaml_gd`` at meta-batch 8 with
``task_chunk=1``, the CPU training setting) and ``omniglot_5w1s_eval``.
``--python`` runs the measurements under another interpreter (e.g. a checkout
of an earlier version) to compare versions on the same machine in one run,
alternating with this one; the child uses the public names of
``imaml_jax.train`` (``make_train_step``, ``init_sums``, ``metric_shapes``,
``compiler_options``), so that version must export them. ``--xla-flags``
measures this version under other ``XLA_FLAGS`` as well (alternating too),
and ``--runs`` times the compiled step, since a flag that compiles faster may
run slower.

Writes ``benchmarks/results/compile_time_<tag>.{csv,json}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys

from arguments import count

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STEPS = (
  "sinusoid_train",
  "sinusoid_eval",
  "omniglot_5w1s_train",
  "omniglot_5w1s_eval",
)
# Each step's recipe is spelled out, so that versions whose named configs
# differ still compile the same computation.
_CONFIGS = {
  "sinusoid": (
    "sinusoid",
    ["lam=30", "inner_lr=0.005", "inner_backtrack=true"],
  ),
  "omniglot_5w1s": ("omniglot_5w1s_imaml_gd", ["meta_batch=8", "task_chunk=1"]),
}

# Runs in a fresh interpreter; prints one JSON line.
_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import imaml_jax as im
from imaml_jax import train
from imaml_jax.train import config as config_lib, experiment as exp_lib

step_name, config_name = sys.argv[1], sys.argv[2]
runs, interleave = int(sys.argv[3]), int(sys.argv[4])
overrides = sys.argv[5:]
config = config_lib.apply_overrides(config_lib.get_config(config_name),
                                    overrides)
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
if step_name.endswith("_train"):
  fn = train.make_train_step(exp)
  sums = train.init_sums(train.metric_shapes(exp, state, key))
  args = (state, sums, exp.data.train, key)
else:
  fn = im.make_eval_step(exp.loss, exp.eval_algorithm, has_aux=True)
  chunk = next(exp_lib.evaluation_chunks(config, exp.data.val,
                                         config.eval_chunk, 0))
  args = (state.params, chunk)
# As the trainer compiles it.
options = train.compiler_options()
start, cpu_start = time.perf_counter(), time.process_time()
lowered = jax.jit(fn).lower(*args)
lowered_at, cpu_lowered = time.perf_counter(), time.process_time()
compiled = lowered.compile(compiler_options=options)
done, cpu_done = time.perf_counter(), time.process_time()
run_s = None
if runs:   # The compiled step's own speed: the median of ``runs`` calls.
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(runs):
    begin = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - begin)
  run_s = sorted(times)[len(times) // 2]
ab = {}
if interleave:  # The same step compiled plainly, calls alternating.
  begin = time.perf_counter()
  plain = jax.jit(fn).lower(*args).compile()
  ab["plain_compile_s"] = time.perf_counter() - begin
  jax.block_until_ready(plain(*args))
  calls = {"options": [], "plain": []}
  for i in range(interleave):
    order = (("options", compiled), ("plain", plain))
    for label, step in (order if i % 2 == 0 else order[::-1]):
      begin = time.perf_counter()
      jax.block_until_ready(step(*args))
      calls[label].append(time.perf_counter() - begin)
  ab.update({f"{k}_call_s": sorted(v)[len(v) // 2] for k, v in calls.items()})
text = compiled.as_text()
lines = [l for l in text.splitlines() if " = " in l]
print(json.dumps({
    "lower_s": lowered_at - start, "compile_s": done - lowered_at,
    "lower_cpu_s": cpu_lowered - cpu_start,
    "compile_cpu_s": cpu_done - cpu_lowered,
    "run_s": run_s,
    "hlo_instructions": len(lines),
    "fusions": sum(" fusion(" in l for l in lines),
    "compiler_options": {k: str(v) for k, v in options.items()}, **ab,
    "jax": jax.__version__}))
"""


def measure(
  python: str,
  step: str,
  xla_flags: str | None = None,
  runs: int = 0,
  interleave: int = 0,
  pythonpath: str | None = None,
) -> dict:
  """One measurement of ``step`` in a fresh ``python`` process, with
  ``XLA_FLAGS=xla_flags`` if given, timing ``runs`` calls of it after, and
  with ``interleave`` the trainer's compiler options against none, in turn.
  ``pythonpath``: a source tree to import ``imaml_jax`` from (the child
  then starts in its parent directory, since ``python -c`` puts the
  working directory ahead of ``PYTHONPATH``)."""
  prefix = step.rsplit("_", 1)[0]
  config_name, overrides = _CONFIGS[prefix]
  env = dict(os.environ, PYTHONWARNINGS="ignore")
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  cwd = None
  if pythonpath:
    env["PYTHONPATH"] = os.path.abspath(pythonpath)
    cwd = os.path.dirname(os.path.abspath(pythonpath))
  proc = subprocess.run(
    [
      python,
      "-c",
      _CHILD,
      step,
      config_name,
      str(runs),
      str(interleave),
      *overrides,
    ],
    capture_output=True,
    text=True,
    check=False,
    env=env,
    cwd=cwd,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"{step} under {python} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def source_tree(path: str) -> bool:
  """Whether ``path`` holds an ``imaml_jax`` package to import: a child
  given a ``PYTHONPATH`` without one would import the installed version
  instead, and measure it under the other version's label."""
  return os.path.isfile(os.path.join(path, "imaml_jax", "__init__.py"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
  parser.add_argument("--repeats", type=count(1), default=2)
  parser.add_argument(
    "--python",
    default=None,
    help="another interpreter to measure beside this one",
  )
  parser.add_argument(
    "--other-path",
    default=None,
    metavar="DIR",
    help="another source tree (e.g. a git worktree of an "
    "earlier commit) to measure beside this one, "
    "with this interpreter",
  )
  parser.add_argument("--label", default="this version")
  parser.add_argument("--other-label", default="other version")
  parser.add_argument(
    "--xla-flags",
    nargs="+",
    default=[],
    metavar="LABEL=FLAGS",
    help="also measure this version under these XLA_FLAGS, "
    "e.g. O0=--xla_backend_optimization_level=0",
  )
  parser.add_argument(
    "--runs",
    type=count(0),
    default=0,
    help="after compiling, time this many calls of the "
    "step (the median is reported as run_s)",
  )
  parser.add_argument(
    "--interleave",
    type=count(0),
    default=0,
    metavar="N",
    help="also compile each step without the trainer's "
    "compiler options and time N calls of each, "
    "alternating, in the same process",
  )
  parser.add_argument(
    "--quick", action="store_true", help="sinusoid evaluation step, once"
  )
  parser.add_argument("--tag", default=None)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  if args.other_path and not source_tree(args.other_path):
    parser.error(
      f"--other-path {args.other_path}: no imaml_jax package there "
      f"({os.path.join(args.other_path, 'imaml_jax', '__init__.py')} not "
      "found); give the root of a source tree, e.g. a git worktree"
    )
  steps, repeats = args.steps, args.repeats
  if args.quick:
    steps, repeats = ["sinusoid_eval"], 1
  tag = args.tag or ("quick" if args.quick else "cpu")
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
  pythons = [(args.label, sys.executable, None, here)]
  if args.python:
    pythons.append((args.other_label, args.python, None, None))
  if args.other_path:
    pythons.append((args.other_label, sys.executable, None, args.other_path))
  for variant in args.xla_flags:
    label, sep, flags = variant.partition("=")
    if not sep or not label:
      parser.error(f"--xla-flags takes LABEL=FLAGS; got {variant!r}")
    pythons.append((label, sys.executable, flags, here))

  rows = []
  for step in steps:
    for repeat in range(repeats):
      for label, python, flags, path in pythons:  # Interleaved.
        result = measure(python, step, flags, args.runs, args.interleave, path)
        rows.append(
          {
            "step": step,
            "version": label,
            "repeat": repeat,
            "xla_flags": flags or "",
            **result,
          }
        )
        run = (
          f"  run {result['run_s']:.4f} s"
          if result.get("run_s") is not None
          else ""
        )
        if "plain_call_s" in result:
          run += (
            f"\n{'':37s}without the options: compile "
            f"{result['plain_compile_s']:6.2f} s; a call "
            f"{result['options_call_s']:.4f} s with them, "
            f"{result['plain_call_s']:.4f} s without (x"
            f"{result['options_call_s'] / result['plain_call_s']:.3f})"
          )
        print(
          f"{step:22s} {label:14s} lower {result['lower_s']:6.2f} s  "
          f"compile {result['compile_s']:6.2f} s "
          f"({result['lower_cpu_s'] + result['compile_cpu_s']:6.2f} s "
          "CPU in all)  "
          f"{result['hlo_instructions']:6d} HLO instructions, "
          f"{result['fusions']:5d} fusions{run}",
          flush=True,
        )
  print("\nmedians:")
  summary = []
  for step in steps:
    for label, _, flags, _ in pythons:
      mine = [r for r in rows if r["step"] == step and r["version"] == label]
      runs = [r["run_s"] for r in mine if r.get("run_s") is not None]
      entry = {
        "step": step,
        "version": label,
        "xla_flags": flags or "",
        "lower_s": statistics.median(r["lower_s"] for r in mine),
        "compile_s": statistics.median(r["compile_s"] for r in mine),
        "cpu_s": statistics.median(
          r["lower_cpu_s"] + r["compile_cpu_s"] for r in mine
        ),
        "run_s": statistics.median(runs) if runs else None,
        "hlo_instructions": mine[0]["hlo_instructions"],
        "fusions": mine[0]["fusions"],
      }
      summary.append(entry)
      run = (
        f", then {entry['run_s']:.4f} s a call"
        if entry["run_s"] is not None
        else ""
      )
      print(
        f"{step:22s} {label:14s} lower + compile "
        f"{entry['lower_s'] + entry['compile_s']:6.2f} s "
        f"({entry['cpu_s']:6.2f} s CPU){run}"
      )
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"compile_time_{tag}")
  with open(base + ".json", "w") as f:
    json.dump(
      {
        "rows": rows,
        "medians": summary,
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
      },
      f,
      indent=2,
    )
  with open(base + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {base}.{{csv,json}}")


if __name__ == "__main__":
  main()
