"""No option is silently ignored.

An option that does nothing is worse than a missing one: a run that sets it
reports a setting it never had. ``im.maml(adapts=...)`` was such an option
until its predicate was applied to the parameters as the default flattened
meta-step sees them; tests that called the internals could not see it. Here
every option is changed through the way a user sets it, and what is computed
must change:

* every field of the training ``Config`` (``dataclasses.fields``, so a field
  added later fails here until it is listed): a short run with the field
  changed computes other metrics, parameters or files than the same run
  without the change, or the field is in ``NO_EFFECT_ON_TRAINING`` with the
  reason and a check of that reason; the test-time fields also act under
  ``imaml-eval --set``;
* every parameter of the public factories (``inspect.signature``, so a new
  keyword fails until it is listed): a one-step meta-update (or evaluation,
  or adaptation) computes something else when it changes from its default,
  or, for the options that change only speed or memory, the same numbers
  from another compiled program.

The short runs are mostly compilation, so they run in two subprocesses
started with the test session (``BACKGROUND_JOBS``, ``conftest``), with the
child settings of ``fast_compile`` and a persistent compilation cache of
their own, under which a run whose programs were compiled before compiles
nothing. Run as a script, this file is that subprocess:
``python tests/test_options_act.py GROUP OUT``.
"""

import dataclasses
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fast_compile
import jax
import jax.numpy as jnp
import numpy as np
import optax
import problems
import pytest

import imaml_jax as im
from imaml_jax import models
from imaml_jax.train import config as config_lib

# ----------------------------------------------------------------------------
# Config fields: the short runs.

OMNIGLOT_ENV = "IMAML_OMNIGLOT_DIR"

# Two meta-steps of two tasks, one inner step: each run is mostly its
# compilation. Validation only at the last step (val_every=2), a checkpoint
# each step.
SINUSOID = (
  "sinusoid",
  [
    "meta_steps=2",
    "meta_batch=2",
    "inner_steps=1",
    "cg_steps=1",
    "log_every=1",
    "val_every=2",
    "val_tasks=2",
    "test_tasks=2",
    "eval_chunk=2",
    "checkpoint_every=1",
    "keep_checkpoints=2",
  ],
)
# First-order MAML: the cheapest Omniglot step to compile that can leave the
# batch norms out of the inner loop (adapt_norm=false).
OMNIGLOT = (
  "omniglot_5w1s_fomaml",
  [
    "meta_steps=2",
    "meta_batch=2",
    "inner_steps=1",
    "eval_inner_steps=1",
    "q_query=2",
    "log_every=1",
    "val_every=2",
    "val_tasks=2",
    "test_tasks=2",
    "eval_chunk=2",
    "checkpoint_every=1",
    "keep_checkpoints=2",
  ],
)

# The runs each changed run is compared with: the small run above with the
# settings under which the field has something to do.
BASES = {
  "sinusoid": [],
  "sinusoid_maml": ["algorithm=maml"],
  # Momentum acts from the second step on (a first step of Nesterov's
  # method from rest is a gradient step).
  "sinusoid_two_steps": ["inner_backtrack=false", "inner_steps=2"],
  "sinusoid_nesterov": [
    "inner_backtrack=false",
    "inner_steps=2",
    "inner=nesterov",
  ],
  # Steps that the step check rejects (sinusoid's Hessian has eigenvalues
  # up to 500).
  "sinusoid_long_steps": ["inner_lr=0.5"],
  "sinusoid_hessian_free": ["inner=hessian_free", "inner_backtrack=false"],
  # A weak pull-back leaves I + H/lam indefinite at initialisation, so CG
  # meets a direction of negative curvature.
  "sinusoid_indefinite": ["lam=0.1", "cg_steps=3"],
  # Every meta-gradient non-finite (test_train_run's diverging run).
  "sinusoid_diverging": [
    "algorithm=fomaml",
    "inner_lr=1e30",
    "inner_backtrack=false",
    "max_consecutive_skips=5",
  ],
  # A run whose best validation (step 1) comes before its last step, so
  # that init_params=best and =last start from different parameters; and a
  # run that starts from it. "{out}" is the folder of the background job's
  # runs, and a source is trained before the runs that start from it.
  "sinusoid_best_before_last": ["val_every=1", "meta_lr=0.02"],
  "sinusoid_init_from": ["init_from={out}/sinusoid_best_before_last"],
  "omniglot": [],
  # One image per class, twice over in a batch of 10: more shots or a
  # smaller batch changes the batch (a step reads the pool shot by shot
  # across the classes, wrapping around).
  "omniglot_reptile": [
    "algorithm=reptile",
    "reptile_train_shots=1",
    "reptile_inner_batch=10",
  ],
}

# field: (base, overrides of the changed run). The changed run must compute
# something else than its base.
ACTS = {
  "dataset": ("omniglot", ["dataset=sinusoid"]),
  "n_way": ("omniglot", ["n_way=3"]),
  "k_shot": ("sinusoid", ["k_shot=5"]),
  "q_query": ("sinusoid", ["q_query=5"]),
  "split_seed": ("omniglot", ["split_seed=1"]),
  "network": ("omniglot", ["network=maml"]),
  "adapt_norm": ("omniglot", ["adapt_norm=false"]),
  "algorithm": ("sinusoid", BASES["sinusoid_maml"]),
  "lam": ("sinusoid", ["lam=3"]),
  "cg_steps": ("sinusoid", ["cg_steps=3"]),
  "cg_stop_at_negative_curvature": (
    "sinusoid_indefinite",
    ["cg_stop_at_negative_curvature=true"],
  ),
  "cg_damping": ("sinusoid", ["cg_damping=1"]),
  "lam_damping": ("sinusoid", ["lam_damping=10"]),
  "inner": ("sinusoid_two_steps", ["inner=nesterov"]),
  "inner_steps": ("sinusoid", ["inner_steps=3"]),
  "inner_lr": ("sinusoid", BASES["sinusoid_long_steps"]),
  "inner_backtrack": ("sinusoid_long_steps", ["inner_backtrack=false"]),
  "inner_momentum": ("sinusoid_nesterov", ["inner_momentum=0.5"]),
  "hf_cg_steps": ("sinusoid_hessian_free", ["hf_cg_steps=2"]),
  "eval_inner_steps": ("sinusoid", ["eval_inner_steps=3"]),
  "reptile_train_shots": ("omniglot_reptile", ["reptile_train_shots=2"]),
  "reptile_inner_batch": ("omniglot_reptile", ["reptile_inner_batch=5"]),
  "optimizer": ("sinusoid", ["optimizer=sgd"]),
  "adam_eps": ("sinusoid", ["adam_eps=1"]),
  "weight_decay": ("sinusoid", ["weight_decay=0.5"]),
  "meta_lr": ("sinusoid", ["meta_lr=0.01"]),
  "lr_schedule": ("sinusoid", ["lr_schedule=linear"]),
  "meta_batch": ("sinusoid", ["meta_batch=3"]),
  "meta_steps": ("sinusoid", ["meta_steps=3"]),
  "seed": ("sinusoid", ["seed=1"]),
  "log_every": ("sinusoid", ["log_every=2"]),
  "log_residual": ("sinusoid", ["log_residual=true"]),
  "val_every": ("sinusoid", ["val_every=1"]),
  "val_tasks": ("sinusoid", ["val_tasks=4"]),
  "val_seed": ("sinusoid", ["val_seed=2"]),
  "test_tasks": ("sinusoid", ["test_tasks=4"]),
  "test_seed": ("sinusoid", ["test_seed=1"]),
  "checkpoint_every": ("sinusoid", ["checkpoint_every=2"]),
  "keep_checkpoints": ("sinusoid", ["keep_checkpoints=1"]),
  "max_consecutive_skips": ("sinusoid_diverging", ["max_consecutive_skips=1"]),
  "init_from": ("sinusoid", BASES["sinusoid_init_from"]),
  "init_params": ("sinusoid_init_from", ["init_params=last"]),
  "class_rotations": ("omniglot", ["class_rotations=per_task"]),
}

# Fields that by design do not change what training computes, each with the
# reason; each reason is checked below.
NO_EFFECT_ON_TRAINING = {
  # Metadata: the registry name a config was built from.
  "name": "metadata",
  # Two formulations of the same convolution (im2col patches or
  # lax.conv): the same numbers to rounding from another program.
  "conv": "equivalent convolution formulation",
  # Tasks vmapped together per lax.map chunk: the same meta-gradient.
  "task_chunk": "speed only",
  # Rematerialising MAML's inner steps: memory only.
  "maml_remat": "memory only",
  # Tasks evaluated together: the same evaluation, chunk by chunk.
  "eval_chunk": "speed only",
}

# The fields of NO_EFFECT_ON_TRAINING that are run anyway, to check that they
# give the same numbers (conv is checked on the network itself, below).
SAME_NUMBERS = {
  "task_chunk": ("sinusoid", ["task_chunk=1"]),
  "maml_remat": ("sinusoid_maml", ["maml_remat=true"]),
  "eval_chunk": ("sinusoid", ["eval_chunk=1"]),
}

# imaml-eval --set on a finished sinusoid run: (reference, changed) overrides
# of each test-time field. The step check is seen at a step size it rejects;
# lam after more than one step (a first step from theta does not see the
# proximal term, whose gradient is zero there).
TEST_TIME_CHANGES = {
  "eval_inner_steps": ([], ["eval_inner_steps=3"]),
  "inner_lr": ([], ["inner_lr=0.05"]),
  "inner_backtrack": (
    ["inner_lr=0.5"],
    ["inner_lr=0.5", "inner_backtrack=false"],
  ),
  "lam": (["eval_inner_steps=3"], ["eval_inner_steps=3", "lam=3"]),
  "q_query": ([], ["q_query=5"]),
  "test_seed": ([], ["test_seed=1"]),
}
# Test-time fields that do not apply to a sinusoid run, with the test of
# test_train_run.py that sees them act through imaml-eval on an Omniglot run.
TEST_TIME_CHANGES_ELSEWHERE = {
  "class_rotations": "test_tables_quick_run_tested_with_class_rotations_per_task",
}


# The sinusoid bases that run in the Omniglot job, which has fewer runs but
# slower ones: the two jobs then take about as long.
SINUSOID_BASES_OF_OMNIGLOT_JOB = (
  "sinusoid_maml",
  "sinusoid_two_steps",
  "sinusoid_nesterov",
  "sinusoid_hessian_free",
  "sinusoid_indefinite",
  "sinusoid_diverging",
)


def _small(base: str) -> tuple:
  return SINUSOID if base.startswith("sinusoid") else OMNIGLOT


def _group(base: str) -> str:
  """The background job that trains the runs of ``base``."""
  if base.startswith("omniglot") or base in SINUSOID_BASES_OF_OMNIGLOT_JOB:
    return "omniglot"
  return "sinusoid"


def _overrides(base: str, changes=()) -> tuple:
  return (*_small(base)[1], *BASES[base], *changes)


def _run_name(base: str, changes=()) -> str:
  """The folder of a run: named after the first run with its overrides
  (``inner=nesterov`` on sinusoid_two_steps is the run sinusoid_nesterov)."""
  wanted = _overrides(base, changes)
  for name, (other_base, other_changes) in _all_runs().items():
    if _overrides(other_base, other_changes) == wanted:
      return name
  raise KeyError((base, changes))


def _all_runs() -> dict:
  """name: (base, changes) of every run, each base before the runs compared
  with it."""
  runs = {base: (base, ()) for base in BASES}
  for base, changes in [*ACTS.values(), *SAME_NUMBERS.values()]:
    runs.setdefault("+".join([base, *changes]), (base, tuple(changes)))
  return runs


def _runs_of(group: str) -> dict:
  """name: (config name, overrides) of the distinct runs of ``group``."""
  runs = {}
  for base, changes in _all_runs().values():
    name = _run_name(base, changes)
    if _group(_all_runs()[name][0]) == group and name not in runs:
      runs[name] = (_small(base)[0], list(_overrides(base, changes)))
  return runs


def _train_step_programs(cache: Path) -> set:
  """The training steps in the persistent cache (one entry per program)."""
  return {p.name for p in cache.glob("jit_train_step*")}


def _skip_figures() -> None:
  """The figures take a second a run and are the same drawing of the
  numbers compared here."""
  from imaml_jax.train import plots

  plots.plot_curves = lambda *args, **kwargs: None
  plots.plot_sinusoid_fits = lambda *args, **kwargs: None


def run_group(group: str, out: Path) -> None:
  """Trains every run of ``group`` in ``out/<run>``; writes
  ``out/outcomes.json``: per run, its exit code (None: not run, for want
  of Omniglot) and whether its training step is a program no earlier run
  had compiled (a new entry in the persistent cache); for the sinusoid
  group also the imaml-eval files of the test-time changes."""
  from imaml_jax.train import cli

  _skip_figures()
  cache = Path(jax.config.jax_compilation_cache_dir)
  outcomes = {}
  for name, (config, overrides) in _runs_of(group).items():
    if config != SINUSOID[0] and not os.environ.get(OMNIGLOT_ENV):
      outcomes[name] = {"code": None}  # The tests skip.
      continue
    before = _train_step_programs(cache)
    try:
      code = cli.train_main(
        [
          config,
          "--workdir",
          str(out / name),
          "--no-progress",
          "--set",
          *(o.replace("{out}", str(out)) for o in overrides),
        ]
      )
    except SystemExit as e:
      code = e.code
    outcomes[name] = {
      "code": code,
      "new_step": bool(_train_step_programs(cache) - before),
    }
  if group == "sinusoid":
    outcomes["eval"] = _evaluate_test_time_changes(out)
  (out / "outcomes.json").write_text(json.dumps(outcomes, indent=1))


def _evaluate_test_time_changes(out: Path) -> dict:
  """The eval files of each (reference, changed) pair of
  TEST_TIME_CHANGES, on a copy of the sinusoid base run."""
  from imaml_jax.train import cli

  workdir = out / "evaluated"
  shutil.copytree(out / "sinusoid", workdir)
  files = {}
  for field, pair in TEST_TIME_CHANGES.items():
    files[field] = []
    for overrides in pair:
      before = {p.name: p.stat().st_mtime_ns for p in workdir.glob("eval*")}
      cli.eval_main(
        ["--workdir", str(workdir), "--set", *overrides]
        if overrides
        else ["--workdir", str(workdir)]
      )
      written = [
        p.name
        for p in workdir.glob("eval*.json")
        if before.get(p.name) != p.stat().st_mtime_ns
      ]
      assert len(written) == 1, written
      files[field].append(written[0])
  return files


def _background_group(group: str):
  def job(out: Path) -> Path:
    env = fast_compile.environ(
      JAX_COMPILATION_CACHE_DIR=str(out / "cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
      JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
      [sys.executable, __file__, group, str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
      timeout=900,
    )
    (out / "log.txt").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return out

  return job


BACKGROUND_JOBS = {
  "omniglot": _background_group("omniglot"),
  "sinusoid": _background_group("sinusoid"),
}


# ----------------------------------------------------------------------------
# Config fields: the tests.


def _flat(value, path="") -> dict:
  """``{path: leaf}`` of nested dicts and lists (array leaves as NumPy)."""
  if isinstance(value, dict):
    return {
      k: v
      for key in sorted(value)
      for k, v in _flat(value[key], f"{path}/{key}").items()
    }
  if isinstance(value, (list, tuple)):
    return {
      k: v
      for i, item in enumerate(value)
      for k, v in _flat(item, f"{path}/{i}").items()
    }
  if hasattr(value, "shape"):
    return {path: np.asarray(value)}
  return {path: value}


def _fingerprint(workdir: Path) -> dict:
  """What a run computed: its metrics log, its test results (without the
  config, which differs by construction, and without timings), its final
  parameters and the names of the files it wrote."""
  from imaml_jax.train import checkpoint as ckpt_lib
  from imaml_jax.train import metrics_log

  found = {
    "metrics": metrics_log.read_records(workdir / "metrics.jsonl"),
    "files": sorted(
      str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()
    ),
  }
  if (workdir / "results.json").exists():
    results = json.loads((workdir / "results.json").read_text())
    found["results"] = {
      key: results[key]
      for key in ("test", "test_last", "test_per_task", "best_validation")
    }
    found["results"]["trained"] = {
      key: results["budget"][key] for key in ("meta_steps", "skipped_steps")
    }
  latest = ckpt_lib.latest_checkpoint(workdir / "checkpoints")
  if latest is not None:
    found["params"] = ckpt_lib.load(latest)[1]["state"]["params"]
  return _flat(found)


def _differences(a: dict, b: dict, rtol=1e-4, atol=1e-6) -> list:
  """The paths where two flat fingerprints differ by more than float32
  rounding (an option must change a run by more than that)."""
  if a.keys() != b.keys():
    return sorted(a.keys() ^ b.keys())
  differ = []
  for path, x in a.items():
    y = b[path]
    if isinstance(x, (str, bool, type(None))) or isinstance(y, str):
      same = x == y
    else:
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      same = x.shape == y.shape and np.allclose(
        x, y, rtol=rtol, atol=atol, equal_nan=True
      )
    if not same:
      differ.append(path)
  return differ


def _finished(background, base: str, changes=()):
  """The folder and the outcome of a run of the background jobs."""
  name = _run_name(base, changes)
  out = background(_group(_all_runs()[name][0]))
  outcome = json.loads((out / "outcomes.json").read_text())[name]
  if outcome["code"] is None:
    pytest.skip(f"{OMNIGLOT_ENV} is not set")
  return out / name, outcome


def test_every_config_field_is_checked():
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  unchecked = fields - set(ACTS) - set(NO_EFFECT_ON_TRAINING)
  assert not unchecked, f"fields with no test that they act: {unchecked}"
  assert not set(ACTS) & set(NO_EFFECT_ON_TRAINING)
  assert set(ACTS) | set(NO_EFFECT_ON_TRAINING) == fields
  assert set(config_lib.TEST_TIME_FIELDS) == (
    set(TEST_TIME_CHANGES) | set(TEST_TIME_CHANGES_ELSEWHERE)
  )
  run_tests = (Path(__file__).parent / "test_train_run.py").read_text()
  for test in TEST_TIME_CHANGES_ELSEWHERE.values():
    assert f"def {test}(" in run_tests, test
  assert set(SAME_NUMBERS) | {"name", "conv"} == set(NO_EFFECT_ON_TRAINING)


def test_init_params_has_two_parameter_sets_to_choose_from(background):
  """The source of the init_from runs validated best before its last step,
  so its best and last parameters differ (else init_params could not act)."""
  source, _ = _finished(background, "sinusoid_best_before_last")
  results = json.loads((source / "results.json").read_text())
  assert results["best_validation"]["step"] == 1
  assert results["budget"]["meta_steps"] == 2
  started, _ = _finished(background, "sinusoid_init_from")
  origin = json.loads((started / "results.json").read_text())
  assert origin["initialised_from"]["step"] == 1


def test_name_cannot_be_set():
  """``name`` says which registered config a run started from; a user
  cannot set it (so cannot expect it to change anything)."""
  with pytest.raises(config_lib.ConfigError, match="name cannot be"):
    config_lib.apply_overrides(
      config_lib.get_config("sinusoid"), ["name=other"]
    )


@pytest.mark.parametrize("field", sorted(ACTS))
def test_config_field_changes_the_run(field, background):
  base, changes = ACTS[field]
  base_dir, base_outcome = _finished(background, base)
  changed_dir, changed_outcome = _finished(background, base, changes)
  assert base_outcome["code"] == 0
  # The diverging run stops, as asked, at the first skipped step.
  expected = 3 if field == "max_consecutive_skips" else 0
  assert changed_outcome["code"] == expected
  assert _differences(_fingerprint(base_dir), _fingerprint(changed_dir)), (
    f"{field}: {changes} computed the same run as {base}"
  )


@pytest.mark.parametrize("field", sorted(SAME_NUMBERS))
def test_config_field_for_speed_or_memory_gives_the_same_run(field, background):
  base, changes = SAME_NUMBERS[field]
  base_dir, _ = _finished(background, base)
  changed_dir, outcome = _finished(background, base, changes)
  assert outcome["code"] == 0
  # Summation orders differ (task_chunk sums the tasks in another order).
  assert not _differences(
    _fingerprint(base_dir), _fingerprint(changed_dir), rtol=1e-3, atol=1e-5
  )
  if field != "eval_chunk":  # Which changes the evaluation's program.
    assert outcome["new_step"], f"{field}: the training step did not change"


def test_conv_formulations_are_the_same_network_built_differently():
  """The network a run builds for each ``conv``, on the same parameters and
  images: the same logits to rounding, from different programs."""
  from imaml_jax.train import experiment as exp_lib

  assert len(models.CONV_FORMULATIONS) > 1
  base = config_lib.get_config("omniglot_5w1s_imaml_gd")
  images = jax.random.uniform(jax.random.key(0), (5, 28, 28, 1))
  networks = [
    exp_lib.network(dataclasses.replace(base, conv=conv))[0]
    for conv in models.CONV_FORMULATIONS
  ]
  params = _compiled(networks[0].init, jax.random.key(1), images)
  outputs = [_compiled(net.apply, params, images) for net in networks]
  programs = [
    jax.jit(net.apply).lower(params, images).as_text() for net in networks
  ]
  for output, program in zip(outputs[1:], programs[1:], strict=True):
    np.testing.assert_allclose(output, outputs[0], rtol=1e-4, atol=1e-5)
    assert program != programs[0]


@pytest.mark.parametrize("field", sorted(TEST_TIME_CHANGES))
def test_test_time_field_acts_under_imaml_eval(field, background):
  out = background("sinusoid")
  files = json.loads((out / "outcomes.json").read_text())["eval"][field]
  reference, changed = (
    json.loads((out / "evaluated" / name).read_text()) for name in files
  )
  keys = ("test", "test_per_task")
  assert _differences(
    _flat({k: reference[k] for k in keys}), _flat({k: changed[k] for k in keys})
  ), (
    f"imaml-eval --set {TEST_TIME_CHANGES[field][1]} tested the same as "
    f"{TEST_TIME_CHANGES[field][0]}"
  )


# ----------------------------------------------------------------------------
# Factory keywords: a one-step meta-update of a small MLP (x64).

N_TASKS = 4


@functools.lru_cache
def _tasks() -> im.Task:
  keys = jax.random.split(jax.random.key(5), N_TASKS)
  pairs = [problems.mlp_task(k) for k in keys]
  stack = lambda i: jax.tree.map(
    lambda *a: jnp.stack(a), *[pair[i] for pair in pairs]
  )
  return im.Task(stack(0), stack(1))


@functools.lru_cache
def _theta():
  return problems.mlp_init(jax.random.key(0))


def _aux_loss(params, batch):
  loss = problems.mlp_loss(params, batch)
  return loss, {"root": jnp.sqrt(loss)}


def _dropout_loss(params, batch, key):
  """The MLP's loss with half of its inputs dropped at random."""
  x, y = batch
  keep = jax.random.bernoulli(key, 0.5, x.shape)
  return problems.mlp_loss(params, (jnp.where(keep, 2 * x, 0.0), y))


def _dropout_aux_loss(params, batch, key):
  return _dropout_loss(params, batch, key), {}


# LLVM at -O0: these programs run once, on a few numbers; compiling them is
# what takes the time (fast_compile).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compiled(f, *args):
  """``f(*args)``, jitted and compiled for speed of compilation."""
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _meta_step(
  algorithm, loss=problems.mlp_loss, optimizer=None, key=None, **options
):
  """One jitted meta-step: ``{"params", "metrics"}``."""
  init, step = _option(
    im.make_meta_step, loss, optimizer or optax.sgd(0.5), algorithm, **options
  )
  args = (init(_theta()), _tasks()) + ((key,) if key is not None else ())
  state, metrics = _compiled(step, *args)
  return {"params": state.params, "metrics": metrics}


def _meta_program(algorithm, **options) -> str:
  init, step = im.make_meta_step(
    problems.mlp_loss, optax.sgd(0.5), algorithm, **options
  )
  return jax.jit(step).lower(init(_theta()), _tasks()).as_text()


def _evaluation(algorithm, loss=problems.mlp_loss, key=None, **options):
  evaluate = im.make_eval_step(loss, algorithm, **options)
  args = (_theta(), _tasks()) + ((key,) if key is not None else ())
  return _compiled(evaluate, *args)


def _eval_program(algorithm, **options) -> str:
  evaluate = im.make_eval_step(problems.mlp_loss, algorithm, **options)
  return jax.jit(evaluate).lower(_theta(), _tasks()).as_text()


def _adapted(loss=problems.mlp_loss, params=None, support=None, **options):
  """Task 0's adapted parameters and the gradient of its query loss with
  respect to the meta-parameters (through the implicit backward pass)."""
  tasks = _tasks()
  task = jax.tree.map(lambda a: a[0], tasks)
  support = task.support if support is None else support
  options = {"lam": 1.0, "inner": im.gd(20, 0.1), **options}

  def query_loss(theta):
    phi = im.adapt(loss, theta, support, **options)
    return problems.mlp_loss(phi, task.query), phi

  (_, phi), grad = _compiled(
    jax.value_and_grad(query_loss, has_aux=True),
    _theta() if params is None else params,
  )
  return {"phi": phi, "grad": grad}


def _adapt_program(**options) -> str:
  task = jax.tree.map(lambda a: a[0], _tasks())
  options = {"lam": 1.0, "inner": im.gd(20, 0.1), **options}
  query_loss = lambda theta: problems.mlp_loss(
    im.adapt(problems.mlp_loss, theta, task.support, **options), task.query
  )
  return jax.jit(jax.grad(query_loss)).lower(_theta()).as_text()


GD = im.gd(2, 0.1)
# Steps of 3.0 overshoot on this loss: a step check has steps to reject.
TOO_LONG = 3.0


def _reptile_minibatches(minibatches: bool):
  """Reptile on each task's support set cut into two mini-batches of eight,
  one an inner step, or on the whole set each step."""
  tasks = _tasks()
  if minibatches:
    tasks = tasks._replace(
      support=jax.tree.map(
        lambda a: a.reshape(N_TASKS, 2, 8, *a.shape[2:]), tasks.support
      )
    )
  init, step = im.make_meta_step(
    problems.mlp_loss, optax.sgd(0.5), im.reptile(GD, minibatches=minibatches)
  )
  return _compiled(step, init(_theta()), tasks)[0].params


def _axis_name(axis_name):
  """The step run as two vmapped halves of the task batch: with the axis
  named, both halves take the meta-gradient averaged over all tasks."""
  init, step = im.make_meta_step(
    problems.mlp_loss, optax.sgd(0.5), im.fomaml(GD), axis_name=axis_name
  )
  halves = jax.tree.map(
    lambda a: a.reshape(2, N_TASKS // 2, *a.shape[1:]), _tasks()
  )
  both = jax.vmap(step, in_axes=(None, 0), axis_name="halves")
  state, _ = _compiled(both, init(_theta()), halves)
  return state.params


def _nonfinite_step(**options):
  """A step whose meta-gradient is NaN (a loss with a NaN in its query)."""
  tasks = _tasks()
  tasks = tasks._replace(
    query=(tasks.query[0].at[0, 0, 0].set(jnp.nan), tasks.query[1])
  )
  init, step = im.make_meta_step(
    problems.mlp_loss, optax.sgd(0.5), im.fomaml(GD), **options
  )
  return _compiled(step, init(_theta()), tasks)[0].params


def _overshooting_newton(max_backtracks: int):
  """One Newton step on ``sum sqrt(1 + (w - 0)^2)`` from ``w = 2``: the full
  step lands at -8, half of it at -3, both worse; a quarter, at -0.5, is
  the first trial the line search accepts (two backtracks)."""
  zeros = jnp.zeros((N_TASKS, 3))
  tasks = im.Task((zeros,), (zeros,))
  loss = lambda w, batch: jnp.sum(jnp.sqrt(1 + (w - batch[0]) ** 2))
  newton = im.hessian_free(1, 5, max_backtracks=max_backtracks)
  init, step = im.make_meta_step(loss, optax.sgd(0.5), im.fomaml(newton))
  return _compiled(step, init(jnp.full(3, 2.0)), tasks)[0].params


def _indefinite(solver):
  """iMAML with a weak pull-back after one inner step: I + H/lam is
  indefinite here, so CG meets negative curvature."""
  return _meta_step(im.imaml(0.05, im.gd(1, 0.1), solver))


KEY = jax.random.key(3)


def _with_two_dropout_keys(build):
  """``build`` (a step or an evaluation) of first-order MAML on a dropout
  loss, with the step key ``KEY`` and with another: another key, other
  dropout masks, another result."""

  def outcome(key):
    return lambda: build(
      im.fomaml(GD),
      loss=_dropout_aux_loss,
      key=key,
      stochastic=True,
      has_aux=True,
    )

  return outcome(KEY), outcome(jax.random.key(4))


# (factory, parameter): (outcome with the default or a first value, outcome
# with another value). The two must differ: in value, or in the metrics
# reported (report_residual, per_task_metrics, pre_adaptation_metrics,
# has_aux).
DIFFERS = {
  ("imaml", "lam"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(3.0, GD)),
  ),
  ("imaml", "inner"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, im.gd(4, 0.1))),
  ),
  ("imaml", "solver"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD, im.cg(1))),
  ),
  ("imaml", "damping"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD, damping=1.0)),
  ),
  ("imaml", "lam_damping"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD, lam_damping=10.0)),
  ),
  ("maml", "inner"): (
    lambda: _meta_step(im.maml(GD)),
    lambda: _meta_step(im.maml(im.gd(4, 0.1))),
  ),
  ("maml", "adapts"): (
    lambda: _meta_step(im.maml(GD)),
    lambda: _meta_step(
      im.maml(GD, adapts=lambda path: "w0" not in jax.tree_util.keystr(path))
    ),
  ),
  ("fomaml", "inner"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(im.fomaml(im.gd(4, 0.1))),
  ),
  ("fomaml", "adapts"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(
      im.fomaml(GD, adapts=lambda path: "w0" not in jax.tree_util.keystr(path))
    ),
  ),
  ("reptile", "inner"): (
    lambda: _meta_step(im.reptile(GD)),
    lambda: _meta_step(im.reptile(im.gd(4, 0.1))),
  ),
  ("reptile", "minibatches"): (
    lambda: _reptile_minibatches(False),
    lambda: _reptile_minibatches(True),
  ),
  ("gd", "steps"): (
    lambda: _meta_step(im.fomaml(im.gd(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.gd(3, 0.1))),
  ),
  ("gd", "lr"): (
    lambda: _meta_step(im.fomaml(im.gd(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.gd(2, 0.2))),
  ),
  ("gd", "backtrack"): (
    lambda: _meta_step(im.fomaml(im.gd(2, TOO_LONG))),
    lambda: _meta_step(im.fomaml(im.gd(2, TOO_LONG, backtrack=True))),
  ),
  ("gd", "shrink"): (
    lambda: _meta_step(im.fomaml(im.gd(2, TOO_LONG, backtrack=True))),
    lambda: _meta_step(
      im.fomaml(im.gd(2, TOO_LONG, backtrack=True, shrink=0.2))
    ),
  ),
  # A demanding Armijo fraction rejects steps that the default accepts.
  ("gd", "armijo"): (
    lambda: _meta_step(im.fomaml(im.gd(2, 0.5, backtrack=True))),
    lambda: _meta_step(im.fomaml(im.gd(2, 0.5, backtrack=True, armijo=0.9))),
  ),
  ("nesterov", "steps"): (
    lambda: _meta_step(im.fomaml(im.nesterov(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.nesterov(3, 0.1))),
  ),
  ("nesterov", "lr"): (
    lambda: _meta_step(im.fomaml(im.nesterov(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.nesterov(2, 0.2))),
  ),
  ("nesterov", "momentum"): (
    lambda: _meta_step(im.fomaml(im.nesterov(3, 0.1))),
    lambda: _meta_step(im.fomaml(im.nesterov(3, 0.1, momentum=0.5))),
  ),
  ("adam", "steps"): (
    lambda: _meta_step(im.fomaml(im.adam(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.adam(3, 0.1))),
  ),
  ("adam", "lr"): (
    lambda: _meta_step(im.fomaml(im.adam(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.adam(2, 0.2))),
  ),
  ("adam", "b1"): (
    lambda: _meta_step(im.fomaml(im.adam(3, 0.1))),
    lambda: _meta_step(im.fomaml(im.adam(3, 0.1, b1=0.0))),
  ),
  ("adam", "b2"): (
    lambda: _meta_step(im.fomaml(im.adam(3, 0.1))),
    lambda: _meta_step(im.fomaml(im.adam(3, 0.1, b2=0.5))),
  ),
  ("adam", "eps"): (
    lambda: _meta_step(im.fomaml(im.adam(2, 0.1))),
    lambda: _meta_step(im.fomaml(im.adam(2, 0.1, eps=1.0))),
  ),
  ("gd_then_pull_back", "steps"): (
    lambda: _meta_step(im.imaml(1.0, im.gd_then_pull_back(2, 0.1))),
    lambda: _meta_step(im.imaml(1.0, im.gd_then_pull_back(3, 0.1))),
  ),
  ("gd_then_pull_back", "lr"): (
    lambda: _meta_step(im.imaml(1.0, im.gd_then_pull_back(2, 0.1))),
    lambda: _meta_step(im.imaml(1.0, im.gd_then_pull_back(2, 0.2))),
  ),
  ("hessian_free", "steps"): (
    lambda: _meta_step(im.imaml(1.0, im.hessian_free(1, 2))),
    lambda: _meta_step(im.imaml(1.0, im.hessian_free(2, 2))),
  ),
  ("hessian_free", "cg_steps"): (
    lambda: _meta_step(im.imaml(1.0, im.hessian_free(1, 1))),
    lambda: _meta_step(im.imaml(1.0, im.hessian_free(1, 2))),
  ),
  # First-order MAML's inner objective is the support loss alone, whose
  # Hessian is indefinite here.
  ("hessian_free", "stop_at_negative_curvature"): (
    lambda: _meta_step(im.fomaml(im.hessian_free(1, 5))),
    lambda: _meta_step(
      im.fomaml(im.hessian_free(1, 5, stop_at_negative_curvature=True))
    ),
  ),
  ("hessian_free", "max_backtracks"): (
    lambda: _overshooting_newton(10),
    lambda: _overshooting_newton(1),
  ),
  ("hessian_free", "shrink"): (
    lambda: _meta_step(im.fomaml(im.hessian_free(1, 5))),
    lambda: _meta_step(im.fomaml(im.hessian_free(1, 5, shrink=0.2))),
  ),
  ("hessian_free", "armijo"): (
    lambda: _meta_step(im.fomaml(im.hessian_free(1, 5))),
    lambda: _meta_step(im.fomaml(im.hessian_free(1, 5, armijo=0.9))),
  ),
  ("cg", "maxiter"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.cg())),
    lambda: _meta_step(im.imaml(1.0, GD, im.cg(2))),
  ),
  ("cg", "tol"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.cg())),
    lambda: _meta_step(im.imaml(1.0, GD, im.cg(tol=0.5))),
  ),
  ("cg", "atol"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.cg())),
    lambda: _meta_step(im.imaml(1.0, GD, im.cg(atol=0.1))),
  ),
  ("cg", "stop_at_negative_curvature"): (
    lambda: _indefinite(im.cg()),
    lambda: _indefinite(im.cg(stop_at_negative_curvature=True)),
  ),
  ("cg", "warm_start"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.cg(2))),
    lambda: _meta_step(im.imaml(1.0, GD, _option(im.cg, 2, warm_start=False))),
  ),
  ("cg", "report_residual"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.cg())),
    lambda: _meta_step(im.imaml(1.0, GD, im.cg(report_residual=False))),
  ),
  ("neumann", "terms"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.neumann())),
    lambda: _meta_step(im.imaml(1.0, GD, im.neumann(2))),
  ),
  ("neumann", "step"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.neumann())),
    lambda: _meta_step(im.imaml(1.0, GD, im.neumann(step=0.5))),
  ),
  ("neumann", "report_residual"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.neumann())),
    lambda: _meta_step(im.imaml(1.0, GD, im.neumann(report_residual=False))),
  ),
  ("dense", "report_residual"): (
    lambda: _meta_step(im.imaml(1.0, GD, im.dense())),
    lambda: _meta_step(im.imaml(1.0, GD, im.dense(report_residual=False))),
  ),
  ("make_meta_step", "loss_fn"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(
      im.fomaml(GD),
      loss=lambda p, b: jnp.mean(jnp.abs(problems.mlp_apply(p, b[0]) - b[1])),
    ),
  ),
  ("make_meta_step", "optimizer"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(im.fomaml(GD), optimizer=optax.adam(0.5)),
  ),
  ("make_meta_step", "algorithm"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(im.maml(GD)),
  ),
  ("make_meta_step", "has_aux"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(im.fomaml(GD), loss=_aux_loss, has_aux=True),
  ),
  ("make_meta_step", "report_residual"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD), report_residual=False),
  ),
  ("make_meta_step", "per_task_metrics"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(im.fomaml(GD), per_task_metrics=True),
  ),
  ("make_meta_step", "skip_nonfinite"): (
    lambda: _nonfinite_step(),
    lambda: _nonfinite_step(skip_nonfinite=False),
  ),
  ("make_meta_step", "pre_adaptation_metrics"): (
    lambda: _meta_step(im.fomaml(GD)),
    lambda: _meta_step(im.fomaml(GD), pre_adaptation_metrics=False),
  ),
  ("make_meta_step", "axis_name"): (
    lambda: _axis_name(None),
    lambda: _axis_name("halves"),
  ),
  # The loss draws its dropout from the key given to the step: another key,
  # another update.
  ("make_meta_step", "stochastic"): _with_two_dropout_keys(_meta_step),
  ("make_eval_step", "loss_fn"): (
    lambda: _evaluation(im.fomaml(GD)),
    lambda: _evaluation(
      im.fomaml(GD),
      loss=lambda p, b: jnp.mean(jnp.abs(problems.mlp_apply(p, b[0]) - b[1])),
    ),
  ),
  ("make_eval_step", "algorithm"): (
    lambda: _evaluation(im.fomaml(GD)),
    lambda: _evaluation(im.fomaml(im.gd(4, 0.1))),
  ),
  ("make_eval_step", "has_aux"): (
    lambda: _evaluation(im.fomaml(GD)),
    lambda: _evaluation(im.fomaml(GD), loss=_aux_loss, has_aux=True),
  ),
  ("make_eval_step", "stochastic"): _with_two_dropout_keys(_evaluation),
  ("adapt", "loss_fn"): (
    lambda: _adapted(),
    lambda: _adapted(loss=lambda p, b: 2 * problems.mlp_loss(p, b)),
  ),
  ("adapt", "params"): (
    lambda: _adapted(),
    lambda: _adapted(params=problems.mlp_init(jax.random.key(1))),
  ),
  ("adapt", "support"): (
    lambda: _adapted(),
    lambda: _adapted(support=jax.tree.map(lambda a: a[1], _tasks().support)),
  ),
  ("adapt", "lam"): (lambda: _adapted(), lambda: _adapted(lam=3.0)),
  ("adapt", "inner"): (
    lambda: _adapted(),
    lambda: _adapted(inner=im.gd(5, 0.1)),
  ),
  ("adapt", "solver"): (lambda: _adapted(), lambda: _adapted(solver=im.cg(1))),
  ("adapt", "damping"): (lambda: _adapted(), lambda: _adapted(damping=1.0)),
  ("adapt", "lam_damping"): (
    lambda: _adapted(),
    lambda: _adapted(lam_damping=10.0),
  ),
}

# Options that change how a result is computed, not what: the same numbers
# to rounding, from another compiled program. (outcome, program) builders
# for the default and the other value.
SAME_RESULT_OTHER_PROGRAM = {
  # Linearises the support gradient once at phi for CG's products.
  ("imaml", "linearize"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD, linearize=True)),
    lambda: _meta_program(im.imaml(1.0, GD)),
    lambda: _meta_program(im.imaml(1.0, GD, linearize=True)),
  ),
  # Recomputes the inner steps in the backward pass: memory only.
  ("maml", "remat"): (
    lambda: _meta_step(im.maml(GD)),
    lambda: _meta_step(im.maml(GD, remat=True)),
    lambda: _meta_program(im.maml(GD)),
    lambda: _meta_program(im.maml(GD, remat=True)),
  ),
  # Measures the residual with one more product instead of reading CG's
  # own (equal in exact arithmetic); only on the guarded path.
  ("cg", "exact_residual"): (
    lambda: _indefinite(im.cg(stop_at_negative_curvature=True)),
    lambda: _indefinite(
      im.cg(stop_at_negative_curvature=True, exact_residual=True)
    ),
    lambda: _meta_program(
      im.imaml(0.05, im.gd(1, 0.1), im.cg(stop_at_negative_curvature=True))
    ),
    lambda: _meta_program(
      im.imaml(
        0.05,
        im.gd(1, 0.1),
        im.cg(stop_at_negative_curvature=True, exact_residual=True),
      )
    ),
  ),
  # Tasks mapped in chunks of one: speed only.
  ("make_meta_step", "task_chunk"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD), task_chunk=1),
    lambda: _meta_program(im.imaml(1.0, GD)),
    lambda: _meta_program(im.imaml(1.0, GD), task_chunk=1),
  ),
  # The parameters as one vector or as their leaves: compilation speed.
  ("make_meta_step", "flatten"): (
    lambda: _meta_step(im.imaml(1.0, GD)),
    lambda: _meta_step(im.imaml(1.0, GD), flatten=False),
    lambda: _meta_program(im.imaml(1.0, GD)),
    lambda: _meta_program(im.imaml(1.0, GD), flatten=False),
  ),
  ("make_eval_step", "flatten"): (
    lambda: _evaluation(im.imaml(1.0, GD)),
    lambda: _evaluation(im.imaml(1.0, GD), flatten=False),
    lambda: _eval_program(im.imaml(1.0, GD)),
    lambda: _eval_program(im.imaml(1.0, GD), flatten=False),
  ),
  # The tasks of an evaluation one at a time: speed and memory only.
  ("make_eval_step", "task_chunk"): (
    lambda: _evaluation(im.imaml(1.0, GD)),
    lambda: _evaluation(im.imaml(1.0, GD), task_chunk=1),
    lambda: _eval_program(im.imaml(1.0, GD)),
    lambda: _eval_program(im.imaml(1.0, GD), task_chunk=1),
  ),
  ("adapt", "linearize"): (
    lambda: _adapted(),
    lambda: _adapted(linearize=True),
    lambda: _adapt_program(),
    lambda: _adapt_program(linearize=True),
  ),
}

FACTORIES = (
  "imaml",
  "maml",
  "fomaml",
  "reptile",
  "gd",
  "nesterov",
  "adam",
  "gd_then_pull_back",
  "hessian_free",
  "cg",
  "neumann",
  "dense",
  "make_meta_step",
  "make_eval_step",
  "adapt",
)


def _option(factory, *args, **options):
  """``factory(*args, **options)``; skips the test where this version of the
  library does not have the options yet."""
  known = inspect.signature(factory).parameters
  missing = [name for name in options if name not in known]
  if missing:
    pytest.skip(f"{factory.__name__} has no {missing} in this version")
  return factory(*args, **options)


def _differs(a, b, rtol=1e-7, atol=1e-10) -> list:
  return _differences(_flat(a), _flat(b), rtol=rtol, atol=atol)


def test_every_factory_parameter_is_checked():
  checked = set(DIFFERS) | set(SAME_RESULT_OTHER_PROGRAM)
  # has_aux of adapt is checked on its own, below.
  checked.add(("adapt", "has_aux"))
  assert not set(DIFFERS) & set(SAME_RESULT_OTHER_PROGRAM)
  parameters = {
    (name, p)
    for name in FACTORIES
    for p in inspect.signature(getattr(im, name)).parameters
  }
  assert parameters - checked == set(), "parameters with no check"
  # Checks of options that a later version added skip on earlier ones.
  assert {factory for factory, _ in checked} == set(FACTORIES)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module's tests: most checks
  compile a default setting that another check compiled already."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {name: getattr(jax.config, name) for name in names}
  new = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, -1)
  for name, value in zip(names, new, strict=True):
    jax.config.update(name, value)
  cc.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.mark.parametrize("factory,parameter", sorted(DIFFERS))
def test_factory_parameter_changes_the_result(
  factory, parameter, x64, compile_cache
):
  first, other = (build() for build in DIFFERS[factory, parameter])
  assert _differs(first, other), (
    f"{factory}({parameter}=...) computed the same as without it"
  )


@pytest.mark.parametrize("factory,parameter", sorted(SAME_RESULT_OTHER_PROGRAM))
def test_factory_parameter_for_speed_gives_the_same_result(
  factory, parameter, x64, compile_cache
):
  first, other, first_program, other_program = SAME_RESULT_OTHER_PROGRAM[
    factory, parameter
  ]
  assert not _differs(first(), other(), rtol=1e-6, atol=1e-9)
  assert first_program() != other_program(), (
    f"{factory}({parameter}=...) compiled the same program"
  )


def test_adapt_has_aux_takes_the_loss_from_the_pair(x64, compile_cache):
  plain = _adapted()
  from_pair = _adapted(loss=_aux_loss, has_aux=True)
  assert not _differs(plain, from_pair)
  with pytest.raises(TypeError):
    _adapted(loss=_aux_loss)


@pytest.mark.parametrize("build", [_meta_step, _evaluation])
def test_stochastic_loss_without_aux_gets_its_key(build, x64, compile_cache):
  """A stochastic loss that returns the loss alone (has_aux=False) is called
  with its key too, and the key acts."""
  first, other = (
    build(im.fomaml(GD), loss=_dropout_loss, key=key, stochastic=True)
    for key in (KEY, jax.random.key(4))
  )
  assert _differs(first, other)


if __name__ == "__main__":
  run_group(sys.argv[1], Path(sys.argv[2]))
