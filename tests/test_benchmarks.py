"""Every benchmark script runs end to end in its ``--quick`` form.

Each runs in a subprocess (as a user would run it), writes into a temporary
folder, and the test reads back what it wrote. The numbers themselves are
checked where the script makes a claim that a quick run can already show.
The runs start with the test session and run beside the other tests
(``quick_runs``, ``conftest.quick_run``); each test here waits for its own.
"""

import collections
import csv
import doctest
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import fast_compile
import jax.numpy as jnp
import numpy as np
import pytest
from problems import linreg_exact
from problems import linreg_loss
from problems import linreg_task
from quick_runs import BENCHMARKS
from quick_runs import QUICK_RUNS
from quick_runs import import_benchmark
from quick_runs import run_script
from scipy import stats as scipy_stats

import imaml_jax as im
from imaml_jax.train import cli
from imaml_jax.train import config as config_lib
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import train as train_lib

pytestmark = pytest.mark.slow

# The published model's run, whose checkpoint the repository keeps.
STABILITY_RUN = (
  BENCHMARKS / "runs_gpu_h200" / "stability_5w1s_constant_eps1e-3_mb32"
)


def import_tables():
  return import_benchmark("tables")


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def compare_runs_failing(*args):
  """Runs ``compare_runs.py`` expected to refuse its arguments; returns the
  completed process (its exit status and stderr are for the test to check)."""
  return subprocess.run(
    [sys.executable, str(BENCHMARKS / "compare_runs.py"), *args],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def test_meta_gradient_accuracy_quick(quick_run):
  _, out = quick_run("meta_gradient_accuracy")
  rows = read_csv(out / "meta_gradient_accuracy_quick.csv")
  assert (out / "meta_gradient_accuracy_quick.png").stat().st_size > 0
  imaml = [float(r["rel_error"]) for r in rows if r["method"] == "imaml"]
  # Converged inner loop and CG: the closed form to float64's rounding (a
  # float32 computation would stop near 1e-7).
  assert min(imaml) < 1e-13
  fomaml = [float(r["rel_error"]) for r in rows if r["method"] == "fomaml"]
  assert min(fomaml) > 0.1  # The identity Jacobian's bias stays.
  # The committed sweep over CG steps is that of im.cg as it is now: its
  # first points within 30% of this run's (4 of its 32 tasks); CG from
  # zero, which the file once held, errs 2.6x as much there.
  for row in rows:
    if row["sweep"] == "cg_steps" and int(row["cg_steps"]) <= 2:
      committed = error_at("imaml", "cg_steps", int(row["cg_steps"]))
      assert float(row["rel_error"]) == pytest.approx(committed, rel=0.3)


def test_stability_diagnostics_quick(quick_run):
  """Reads the published run: its metrics at its checkpoint and the
  spectrum of I + H/lam measured at the checkpoint's theta."""
  stdout, out = quick_run("stability_diagnostics")
  stem = out / "stability_stability_5w1s_constant_eps1e-3_mb32_quick"
  for ext in ("csv", "json", "png"):
    assert stem.with_suffix(f".{ext}").stat().st_size > 0
  rows = read_csv(stem.with_suffix(".csv"))
  # The committed checkpoint, beside the run's own logged metrics.
  logged = {}
  with open(STABILITY_RUN / "metrics.jsonl") as f:
    for line in f:
      record = json.loads(line)
      if record.get("split") == "train":
        logged[record["step"]] = record
  assert [int(r["step"]) for r in rows] == [20000]
  for r in rows:
    assert float(r["param_norm"]) == pytest.approx(
      logged[int(r["step"])]["param_norm"], rel=1e-6
    )
  assert all(float(r["eig_max"]) > 1.0 for r in rows)  # H/lam > 0 somewhere.
  assert all(0.0 <= float(r["indefinite_fraction_cg"]) <= 1.0 for r in rows)
  assert "eig(I + H/lam) in" in stdout


def test_compile_time_quick(quick_run):
  stdout, out = quick_run("compile_time")
  rows = read_csv(out / "compile_time_quick.csv")
  assert [r["step"] for r in rows] == ["sinusoid_eval"]
  assert float(rows[0]["compile_s"]) > 0 and int(rows[0]["fusions"]) > 0
  assert "lower + compile" in stdout


def test_sinusoid_diagnosis_quick(quick_run):
  _, out = quick_run("sinusoid_diagnosis")
  for ext in ("csv", "json", "md", "png"):
    assert (out / f"sinusoid_diagnosis_quick.{ext}").stat().st_size > 0
  rows = {
    float(r["lam"]): r for r in read_csv(out / "sinusoid_diagnosis_quick.csv")
  }
  assert set(rows) == {2.0, 30.0}
  assert all(int(r["star_converged_tasks"]) == 2 for r in rows.values())
  # At lam 30 and the converged minimiser, CG(5) solves iMAML's system.
  assert float(rows[30.0]["err_converged_cg5_smooth_max"]) < 1e-2


def test_throughput_quick(quick_run):
  stdout, out = quick_run("throughput")
  assert "tasks/s" in stdout
  result = json.loads((out / "throughput_cpu_quick.json").read_text())
  (row,) = result["rows"]
  assert row["tasks_per_s"] > 0 and row["gflop_per_step"] > 0
  assert result["matmul_gflop_per_s"] > 0
  assert row["task_chunk"] == 1  # the CPU default: one task at a time


def test_step_variants_quick(quick_run):
  stdout, out = quick_run("step_variants")
  rows = {
    r["variant"]: r for r in read_csv(out / "step_variants_cpu_quick.csv")
  }
  assert set(rows) == {"chunked", "single"}
  assert int(rows["chunked"]["tasks_per_step"]) == 2
  assert int(rows["single"]["tasks_per_step"]) == 1
  assert all(float(r["tasks_per_s"]) > 0 for r in rows.values())
  assert "tasks/s" in stdout


def test_step_variants_on_two_devices_keeps_the_one_device_result(tmp_path):
  """``benchmarks/README.md``'s second step_variants command, on two host
  devices, writes ``step_variants_cpu_2dev`` beside the one-device
  ``step_variants_cpu`` instead of replacing it."""
  one_device = tmp_path / "step_variants_cpu_quick.csv"
  one_device.write_text("kept\n")
  subprocess.run(
    [
      sys.executable,
      str(BENCHMARKS / "step_variants.py"),
      "--quick",
      "--variants",
      "single",
      "--out",
      str(tmp_path),
    ],
    check=True,
    capture_output=True,
    timeout=420,
    env=fast_compile.environ(
      XLA_FLAGS="--xla_force_host_platform_device_count=2"
    ),
  )
  assert one_device.read_text() == "kept\n"
  (row,) = read_csv(tmp_path / "step_variants_cpu_2dev_quick.csv")
  assert row["variant"] == "single" and float(row["tasks_per_s"]) > 0
  result = json.loads(
    (tmp_path / "step_variants_cpu_2dev_quick.json").read_text()
  )
  assert result["device"].endswith(", 2 devices")


def test_memory_vs_steps_quick(quick_run):
  # MAML only, the cheapest to compile of the algorithms whose memory grows;
  # iMAML's flat memory is tested in test_meta_step.
  _, out = quick_run("memory_vs_steps")
  rows = read_csv(out / "memory_vs_steps_cpu_quick.csv")
  temp = {
    (r["algorithm"], int(r["inner_steps"])): float(r["temp_mb"]) for r in rows
  }
  assert set(temp) == {("maml", 1), ("maml", 4)}
  assert temp[("maml", 4)] > temp[("maml", 1)]
  assert (out / "memory_vs_steps_cpu_quick.png").stat().st_size > 0


def test_evaluation_chunk_quick(quick_run):
  """Both ways score the tasks alike; one task at a time needs fewer
  temporaries than the vmapped chunk."""
  stdout, out = quick_run("evaluation_chunk")
  result = json.loads(
    (out / "evaluation_chunk_cpu_5w1s_maml_quick.json").read_text()
  )
  assert result["tasks"] == 4 and result["algorithm"] == "maml"
  assert result["temp_mib"]["one_at_a_time"] < result["temp_mib"]["vmapped"]
  assert result["largest_score_difference"]["accuracy_after"] == 0.0
  assert result["largest_score_difference"]["loss_after"] < 1e-4
  assert all(t > 0 for t in result["s_per_task"].values())
  assert "less memory" in stdout


def test_conv_formulations_quick(quick_run):
  # The default formulation only: test_models compares it with lax.conv.
  _, out = quick_run("conv_formulations")
  rows = read_csv(out.with_suffix(".csv"))
  assert {r["conv"] for r in rows} == {"patches"}
  assert all(float(r["seconds"]) > 0 for r in rows)


def test_scaling_quick(quick_run):
  _, out = quick_run("scaling")
  rows = read_csv(out / "scaling_cpu_quick.csv")
  assert [int(r["devices"]) for r in rows] == [2]
  assert float(rows[0]["tasks_per_s"]) > 0


def test_curvature_quick(quick_run):
  _, out = quick_run("curvature")
  result = json.loads((out / "curvature_5w1s_quick.json").read_text())
  gd, hf = result["rows"]
  assert gd["inner"] == "gd(steps=4, lr=0.1)"
  assert hf["inner"] == (
    "hessian_free(steps=4, cg_steps=5, stop_at_negative_curvature)"
  )
  for row in (gd, hf):
    assert row["eig_max_max"] >= row["eig_min_min"]
    assert 0.0 <= row["indefinite_fraction"] <= 1.0
    assert row["objective_median"] > 0
    reported = {k for k in row if k.endswith("_met_negative_curvature_max")}
    assert reported == {
      "cg5_met_negative_curvature_max",
      "cg20_met_negative_curvature_max",
    }
    assert 0.0 <= row["indefinite_fraction_cg"] <= 1.0


def test_curvature_statistics_against_dense_linear_algebra(x64):
  """On linear regression ``I + H/lam`` is ``I + X^T X / (n lam)``: the
  extreme eigenvalues match numpy's, CG with as many steps as dimensions
  solves the system and one step does not, per count of ``cg_steps``."""
  curvature = import_benchmark("curvature")
  support, query = linreg_task(0, dim=5)
  task = collections.namedtuple("Task", "support query")(support, query)
  lam = 0.5
  stats = curvature.task_statistics(
    linreg_loss,
    jnp.zeros(5),
    task,
    lam,
    im.gd(300, 0.2),
    iterations=400,
    cg_steps=(1, 5),
  )
  xs = support[0]
  eigs = np.linalg.eigvalsh(np.eye(5) + xs.T @ xs / (len(xs) * lam))
  np.testing.assert_allclose(stats["eig_max"], eigs[-1], rtol=1e-8)
  np.testing.assert_allclose(stats["eig_min"], eigs[0], rtol=1e-6)
  assert stats["cg5_residual"] < 1e-8 < 1e-3 < stats["cg1_residual"]
  assert stats["cg5_guarded_residual"] < 1e-8
  assert stats["inner_grad_norm"] < 1e-8
  assert stats["cg5_met_negative_curvature"] == 0.0
  assert stats["cg1_guarded_updates"] == 1.0
  assert stats["cg5_guarded_updates"] == 5.0  # n = dim steps: no stop


def test_curvature_cg_proves_an_indefinite_system(x64):
  """With lam below minus the smallest Hessian eigenvalue of a concave
  loss, ``I + H/lam`` is negative definite and the guarded CG stops at once.
  """
  curvature = import_benchmark("curvature")
  support, query = linreg_task(1, dim=4)
  task = collections.namedtuple("Task", "support query")(support, query)
  concave = lambda w, batch: -linreg_loss(w, batch)
  xs = support[0]
  lam = 0.5 * np.linalg.eigvalsh(xs.T @ xs / len(xs))[0]
  stats = curvature.task_statistics(
    concave,
    jnp.zeros(4),
    task,
    lam,
    im.gd(1, 1e-9),
    iterations=400,
    cg_steps=(4,),
  )
  assert stats["eig_min"] < 0
  assert stats["cg4_met_negative_curvature"] == 1.0
  assert stats["cg4_guarded_updates"] == 0.0  # the first direction


def test_meta_gradient_omniglot_quick(quick_run):
  """Reads the published run's checkpoint: both parameter sets, each with
  the run's gradient, its two parts and the reference's own check."""
  stdout, out = quick_run("meta_gradient_omniglot")
  rows = read_csv(out / "meta_gradient_omniglot_quick.csv")
  assert [r["parameters"] for r in rows] == [
    "best (step 15500)",
    "last (step 20000)",
  ]
  for r in rows:
    for name in ("run", "inner_part", "cg_part", "star_check"):
      assert -1.0 <= float(r[f"{name}_mean_cosine"]) <= 1.0 + 1e-9
      assert float(r[f"{name}_mean_rel_error"]) >= 0.0
    assert float(r["run_mean_rel_error"]) > 0.0  # 16 steps, CG(5): inexact.
    assert -1.0 <= float(r["star_batch_to_batch_cosine"]) <= 1.0 + 1e-9
  assert "batch mean against g*" in stdout
  # --variant inner_steps=20: per parameter set the run's own row, then it.
  variants = read_csv(out / "meta_gradient_omniglot_quick_variants.csv")
  assert [(r["parameters"], r["variant"]) for r in variants] == [
    (rows[0]["parameters"], "as trained"),
    (rows[0]["parameters"], "inner_steps=20"),
    (rows[1]["parameters"], "as trained"),
    (rows[1]["parameters"], "inner_steps=20"),
  ]
  for own, variant, r in zip(variants[::2], variants[1::2], rows):
    assert own["mean_rel_error"] == r["run_mean_rel_error"]
    assert own["prox_grad_rel_median"] == r["prox_grad_rel_k_median"]
    assert "gd(steps=16," in own["algorithm"]
    assert "gd(steps=20," in variant["algorithm"]
    assert float(variant["mean_rel_error"]) != float(own["mean_rel_error"])
  per_task = json.loads((out / "meta_gradient_omniglot_quick.json").read_text())
  for r in rows:
    numbers = per_task["tasks"][r["parameters"]]
    for name in ("run", "variant0", "star_check"):
      assert len(numbers[f"{name}_rel_error"]) == int(r["tasks"])
      assert min(numbers[f"{name}_norm"]) > 0.0
    assert len(numbers["star_norm"]) == int(r["tasks"])


def test_meta_gradient_omniglot_task_errors():
  """Per task, in batch order: norms, and errors against ``g*``."""
  mg = import_benchmark("meta_gradient_omniglot")
  star = np.array([[3.0, 4.0], [1.0, 0.0]])
  run = np.array([[3.0, 0.0], [1.0, 0.0]])
  batches = [
    {"star": star[:1], "run": run[:1]},
    {"star": star[1:], "run": run[1:]},
  ]
  out = mg.task_errors(batches)
  np.testing.assert_allclose(out["star_norm"], [5.0, 1.0])
  np.testing.assert_allclose(out["run_norm"], [3.0, 1.0])
  np.testing.assert_allclose(out["run_rel_error"], [0.8, 0.0])
  assert "star_rel_error" not in out


def test_meta_gradient_omniglot_against_closed_form(x64):
  """On linear regression ``phi*`` and ``g* = (I + H/lam)^{-1} grad
  L_q(phi*)`` have closed forms: the reference matches them, the inner
  loop's part is the exact solve at the run's ``phi_K`` (three plain
  steps, written out in numpy), and the report finds the run's one CG step
  inexact and the reference converged."""
  mg = import_benchmark("meta_gradient_omniglot")
  lam, lr = 0.5, 0.2
  support, query = linreg_task(0, dim=5)
  task = collections.namedtuple("Task", "support query")(support, query)
  loss = lambda w, batch: (linreg_loss(w, batch), {"accuracy": jnp.zeros(())})
  config = types.SimpleNamespace(
    lam=lam,
    inner_lr=lr,
    cg_steps=1,
    cg_stop_at_negative_curvature=False,
    cg_damping=0.0,
    lam_damping=0.0,
  )
  args = types.SimpleNamespace(ref_inner_steps=400, ref_cg_steps=5)
  run = im.imaml(lam, im.gd(3, lr), im.cg(1))
  theta = jnp.asarray(np.random.default_rng(1).normal(size=5))
  # Variants: the run's own inner loop and CG again, then an inner loop
  # and CG long enough to be exact (CG(5) is exact in 5 dimensions).
  converged = im.imaml(lam, im.gd(400, lr), im.cg(5))
  variants = ((run, im.cg(1)), (converged, im.cg(5)))
  grads, scalars = mg.task_numbers(
    config, loss, run, theta, task, args, variants
  )
  # The run's gradient is the run's own task gradient, computed once.
  np.testing.assert_allclose(
    grads["run"], run.task_gradient(loss, theta, task)[0], rtol=1e-12
  )

  phi_star, g_star = linreg_exact(theta, support, query, lam)
  np.testing.assert_allclose(grads["star"], g_star, rtol=1e-8)
  np.testing.assert_allclose(grads["star_check"], g_star, rtol=1e-8)
  xs, ys = support
  xq, yq = query
  h = xs.T @ xs / len(ys)
  prox_grad = lambda p: xs.T @ (xs @ p - ys) / len(ys) + lam * (p - theta)
  phi_k = np.asarray(theta)
  for _ in range(3):
    phi_k = phi_k - lr * prox_grad(phi_k)
  g_k = np.linalg.solve(np.eye(5) + h / lam, xq.T @ (xq @ phi_k - yq) / len(yq))
  np.testing.assert_allclose(grads["inner_part"], g_k, rtol=1e-8)
  np.testing.assert_allclose(
    scalars["prox_grad_rel_k"],
    np.linalg.norm(prox_grad(phi_k)) / np.linalg.norm(prox_grad(theta)),
    rtol=1e-8,
  )
  assert scalars["prox_grad_rel_star"] < 1e-8
  assert (
    scalars["cg_residual_ref_at_star"]
    < 1e-8
    < 1e-3
    < scalars["cg_residual_run"]
  )

  np.testing.assert_allclose(grads["variant0"], grads["run"], rtol=1e-12)
  own = {
    "prox_grad_rel": "prox_grad_rel_k",
    "cg_residual": "cg_residual_run",
    "query_loss": "query_loss_k",
  }
  for name, run_name in own.items():
    np.testing.assert_allclose(
      scalars[f"variant0_{name}"], scalars[run_name], rtol=1e-12
    )
  np.testing.assert_allclose(grads["variant1"], g_star, rtol=1e-8)
  assert scalars["variant1_prox_grad_rel"] < 1e-8
  assert scalars["variant1_cg_residual"] < 1e-8

  batch = {k: np.asarray(v)[None] for k, v in grads.items()}
  report = mg.batch_report(batch)
  assert report["variant0_mean_rel_error"] == report["run_mean_rel_error"]
  assert report["variant1_mean_rel_error"] < 1e-8
  assert report["star_check_mean_rel_error"] < 1e-8
  assert report["run_mean_rel_error"] > 1e-3
  assert report["cg_part_mean_rel_error"] > 1e-3  # one CG step at phi*
  assert report["run_mean_cosine"] < 1.0


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--batches", "0"], "must be >= 1"),
    (["--ref-cg-steps", "0"], "must be >= 1"),
    (["--workdir", "{tmp}/none"], "holds no run"),
    (["--workdir", "{tmp}/sinusoid"], "is a sinusoid imaml run"),
    (["--variant", "lam=3"], "KEY one of inner, inner_steps"),
    (["--variant", "inner_steps"], "give KEY=VALUE"),
    (["--variant", ","], "changes nothing"),
    (
      ["--workdir", "{tmp}/omniglot", "--variant", "inner_steps=0"],
      "--variant:",
    ),
  ],
)
def test_meta_gradient_omniglot_refuses_bad_requests(
  tmp_path, capsys, argv, message
):
  """Refused by name before any data is read or anything compiled."""
  mg = import_benchmark("meta_gradient_omniglot")
  run = tmp_path / "sinusoid"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(
    json.dumps(config_lib.to_dict(config_lib.get_config("sinusoid")))
  )
  (run / "checkpoints" / "checkpoint_000000001.ckpt").write_bytes(b"")
  omniglot = tmp_path / "omniglot"
  (omniglot / "checkpoints").mkdir(parents=True)
  config = config_lib.get_config("omniglot_5w1s_imaml_gd")
  (omniglot / "config.json").write_text(json.dumps(config_lib.to_dict(config)))
  (omniglot / "checkpoints" / "checkpoint_000000001.ckpt").write_bytes(b"")
  with pytest.raises(SystemExit):
    mg.main([a.format(tmp=tmp_path) for a in argv])
  assert message in capsys.readouterr().err


def test_inner_loop_stall_quick(quick_run):
  """The published model's last parameters on random images: every
  quantity, proximal gradients first, then each probe by its step size."""
  stdout, out = quick_run("inner_loop_stall")
  rows = read_csv(out / "inner_loop_stall_quick.csv")
  names = [r["quantity"] for r in rows]
  assert names[:5] == [
    "prox_grad_rel_checked",
    "prox_grad_rel_newton_cg",
    "prox_grad_rel_plain_lr0.01",
    "prox_grad_rel_plain_lr0.02",
    "prox_grad_rel_restarted",
  ]
  assert names[5:11] == [f"armijo_ratio_k{k}" for k in (0, 2, 4, 6, 8, 10)]
  assert names[11:] == [f"felt_curvature_k{k}" for k in (0, 2, 4, 6, 8, 10)]
  for r in rows:
    assert float(r["min"]) <= float(r["median"]) <= float(r["max"])
  # Random images give a smooth objective at small steps: the ratio -> 1.
  assert 0.9 < float(rows[10]["median"]) <= 1.0 + 1e-6
  assert "last (step 20000)" in stdout


def test_inner_loop_stall_step_probe_closed_forms(x64):
  """On a quadratic the felt curvature is ``g^T A g / ||g||^2`` at every
  step size; next to the kink of ``|x| + lam/2 (x - 0.1)^2`` a large step
  raises the objective and the felt curvature falls to ``lam`` only for
  steps that stay on the smooth side."""
  stall = import_benchmark("inner_loop_stall")
  a = jnp.array([1.0, 4.0])
  quadratic = lambda x: 0.5 * jnp.sum(a * x**2)
  phi = jnp.array([1.0, 1.0])
  out = stall.step_probe(quadratic, phi, 0.1, (0, 3))
  g = a * phi
  curvature = float(g @ (a * g) / (g @ g))
  for k in (0, 3):
    np.testing.assert_allclose(
      out[f"felt_curvature_k{k}"], curvature, rtol=1e-12
    )
    eta = 0.1 * 0.5**k
    np.testing.assert_allclose(
      out[f"armijo_ratio_k{k}"], 1 - eta * curvature / 2, rtol=1e-12
    )

  lam = 2.0
  kink = lambda x: jnp.sum(jnp.abs(x) + lam / 2 * (x - 0.1) ** 2)
  x = jnp.array([1e-3])
  out = stall.step_probe(kink, x, 0.05, (0, 9))
  grad = 1.0 + lam * (1e-3 - 0.1)
  stepped = 1e-3 - 0.05 * grad  # across the kink
  value = lambda y: abs(y) + lam / 2 * (y - 0.1) ** 2
  ratio = (value(1e-3) - value(stepped)) / (0.05 * grad**2)
  assert ratio < 0
  np.testing.assert_allclose(out["armijo_ratio_k0"], ratio, rtol=1e-10)
  assert out["felt_curvature_k0"] > 20 * lam
  np.testing.assert_allclose(out["felt_curvature_k9"], lam, rtol=1e-8)


def test_inner_loop_stall_probe_task_on_a_quadratic(x64):
  """A smooth, well-conditioned proximal objective: every method
  converges, and the restarted loop no worse than the first."""
  stall = import_benchmark("inner_loop_stall")
  a = jnp.array([0.5, 1.0, 3.0])
  theta = jnp.array([1.0, -2.0, 0.5])
  objective = lambda x: (
    0.5 * jnp.sum(a * (x - 1.0) ** 2) + jnp.sum((x - theta) ** 2)
  )
  settings = types.SimpleNamespace(
    steps=200, lr=0.05, halvings=(0,), plain_steps=1000, plain_lr=(0.05,)
  )
  out = stall.probe_task(objective, theta, settings)
  assert out["prox_grad_rel_checked"] < 1e-6
  assert out["prox_grad_rel_restarted"] < 1e-10
  assert out["prox_grad_rel_plain_lr0.05"] < 1e-10
  assert out["prox_grad_rel_newton_cg"] < 1e-10


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--steps", "0"], "must be >= 1"),
    (["--halvings", "-1"], "--halvings must be >= 0"),
    (["--plain-lr", "0"], "--plain-lr positive"),
    (["--workdir", "{tmp}/none"], "holds no run"),
  ],
)
def test_inner_loop_stall_refuses_bad_requests(tmp_path, capsys, argv, message):
  stall = import_benchmark("inner_loop_stall")
  with pytest.raises(SystemExit):
    stall.main([a.format(tmp=tmp_path) for a in argv])
  assert message in capsys.readouterr().err


def test_curvature_refuses_a_non_positive_cg_count(capsys):
  curvature = import_benchmark("curvature")
  with pytest.raises(SystemExit):
    curvature.main(["--quick", "--cg-steps", "5", "0"])
  assert "--cg-steps must be positive" in capsys.readouterr().err


def test_tables_quick_trains_omniglot_end_to_end(quick_run):
  """Also the end-to-end Omniglot run: archives to results.json and plots."""
  data_dir = os.environ.get("IMAML_OMNIGLOT_DIR")
  if not data_dir:
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  for name in ("images_background", "images_evaluation"):
    assert (Path(data_dir) / f"{name}.zip").is_file(), (
      f"IMAML_OMNIGLOT_DIR={data_dir} lacks {name}.zip"
    )
  stdout, out = quick_run("tables")
  assert "## Table 2: Omniglot" in stdout
  result = json.loads((out / "tables_quick.json").read_text())
  (cell,) = [
    r for r in result["rows"] if r["config"] == "omniglot_5w1s_imaml_gd"
  ]
  assert cell["test_tasks"] == 10 and 0 <= cell["accuracy"] <= 100
  assert cell["meta_steps"] == cell["meta_steps_target"] == 4
  assert cell["complete"] and cell["paper_accuracy"] == 99.16
  assert "meta_batch=2 (32)" in cell["changes"]  # The reduced budget.
  assert "(paper 99.16 ± 0.35)" in (out / "tables_quick.md").read_text()
  missing = [r for r in result["rows"] if "accuracy" not in r]
  assert len(missing) == len(result["rows"]) - 1
  workdir = out / "runs" / "omniglot_5w1s_imaml_gd"
  assert (workdir / "curves.png").stat().st_size > 0
  assert len(list((workdir / "checkpoints").iterdir())) == 1
  # The same parameters on tasks from the meta-training characters.
  assert cli.eval_main(["--workdir", str(workdir), "--split", "train"]) == 0
  seen = json.loads((workdir / "eval_train.json").read_text())
  held_out = json.loads((workdir / "results.json").read_text())
  assert seen["split"] == "train" and seen["test"]["loss_after"]["n"] == 10
  assert (
    seen["test"]["loss_after"]["mean"] != held_out["test"]["loss_after"]["mean"]
  )
  with pytest.raises(SystemExit):
    cli.eval_main(["--workdir", str(workdir), "--split", "training"])
  assert held_out["protocol"]["name"] == "ours"
  assert held_out["protocol"]["q_query"] == 15
  # The authors' evaluation: their characters, one query image per class,
  # plain adaptation, the last parameters; in a file of its own.
  assert (
    cli.eval_main(["--workdir", str(workdir), "--protocol", "authors"]) == 0
  )
  theirs = json.loads((workdir / "eval_protocol=authors.json").read_text())
  protocol = theirs["protocol"]
  assert protocol["name"] == "authors" and protocol["q_query"] == 1
  assert protocol["parameters"] == theirs["test_params"] == "last"
  assert "gd(steps=16, lr=0.1)" in protocol["adaptation"]
  assert theirs["split"] == "authors_test"
  assert protocol["characters_overlap"]["authors_meta_training"] == (
    pytest.approx(310 / 423)
  )
  accuracy = theirs["test"]["accuracy_after"]
  assert accuracy["n"] == 10
  # One query answer per class: each task scores a multiple of 1/5.
  answers = accuracy["mean"] * 10 * 5
  assert abs(answers - round(answers)) < 1e-3
  # The paper's measurement: their tasks, the run's own adaptation and its
  # best-validation parameters.
  assert cli.eval_main(["--workdir", str(workdir), "--protocol", "paper"]) == 0
  paper = json.loads((workdir / "eval_protocol=paper.json").read_text())
  assert paper["split"] == "authors_test"
  assert paper["protocol"]["name"] == "paper"
  assert paper["protocol"]["q_query"] == 1
  assert paper["protocol"]["adaptation"] == held_out["protocol"]["adaptation"]
  assert paper["test_params"] == held_out["test_params"]
  assert paper["best_validation"]["step"] == held_out["best_validation"]["step"]
  ours_answers = paper["test"]["accuracy_after"]["mean"] * 10 * 5
  assert abs(ours_answers - round(ours_answers)) < 1e-3
  assert (
    paper["test"]["loss_after"]["mean"] != theirs["test"]["loss_after"]["mean"]
  )
  # tables.py shows it in Table 2 under the authors' protocol; with
  # --eval authors it tests again only runs whose result is missing or stale.
  tables_out = out / "tables_with_authors"
  stdout = run_script(
    "tables.py",
    "--runs",
    str(out / "runs"),
    "--eval",
    "authors",
    "--out",
    str(tables_out),
  )
  assert "under protocol" not in stdout  # Up to date.
  (row,) = [
    r
    for r in json.loads((tables_out / "tables.json").read_text())["rows"]
    if r["config"] == "omniglot_5w1s_imaml_gd"
  ]
  assert row["authors_accuracy"] == pytest.approx(100 * accuracy["mean"])
  assert row["authors_q_query"] == 1 and row["authors_step"] == 4
  assert (
    "test accuracy (%), the authors' protocol"
    in (tables_out / "tables.md").read_text()
  )
  config = config_lib.apply_test_time_overrides(
    train_lib.load_run(workdir)[0], ["q_query=1"]
  )
  images = exp_lib.load_authors_characters(config, data_dir).images
  chunk = next(exp_lib.authors_evaluation_chunks(config, images, 10, 0))
  assert chunk.query[0].shape == (10, config.n_way, 28, 28, 1)
  # An unknown protocol: exit code 2, nothing written.
  before = sorted(p.name for p in workdir.iterdir())
  with pytest.raises(SystemExit) as info:
    cli.eval_main(["--workdir", str(workdir), "--protocol", "theirs"])
  assert info.value.code == 2
  assert sorted(p.name for p in workdir.iterdir()) == before


def test_compare_runs_quick(tmp_path):
  out = run_script("compare_runs.py", "--quick", "--out", str(tmp_path / "cmp"))
  assert "best validation 90.00% at 1000" in out
  assert "train CG relative residual" in out  # Run "a" logs it.
  assert "train tasks where CG met p^T A p <= 0" in out  # This too.
  rows = read_csv(tmp_path / "cmp.csv")
  assert {r["run"] for r in rows} == {"a", "b"} and len(rows) == 10
  assert (tmp_path / "cmp.png").stat().st_size > 0
  # Per-task differences 25, 25, 25, 0 points: mean 18.75, population std
  # 10.83, half-width 1.96 * 10.83 / sqrt(4).
  assert "| a minus b | +18.75 ± 10.61 | above 0 |" in out
  assert "| a + b minus b | +9.38 ± 5.30 | above 0 |" in out
  paired = read_csv(tmp_path / "cmp_paired.csv")
  assert [r["difference"] for r in paired] == ["a minus b", "a + b minus b"]
  assert float(paired[0]["mean"]) == pytest.approx(18.75)
  assert float(paired[0]["ci95"]) == pytest.approx(
    1.96 * np.std([25, 25, 25, 0]) / 2
  )


def write_tested_run(folder, values, tasks="t"):
  """A work directory with validation metrics and per-task test scores."""
  folder.mkdir()
  (folder / "metrics.jsonl").write_text(
    json.dumps({"step": 10, "split": "val", "accuracy_after": 0.5}) + "\n"
  )
  (folder / "results.json").write_text(
    json.dumps(
      {
        "test": {
          "accuracy_after": {
            "mean": float(np.mean(values)),
            "ci95": 0.0,
            "n": len(values),
          }
        },
        "budget": {"meta_steps": 10, "wall_time_s": 1.0, "device": "cpu"},
        "test_per_task": {
          "metric": "accuracy_after",
          "values": list(values),
          "tasks_sha256": tasks,
        },
      }
    )
  )
  return folder


def test_compare_runs_pairs_seed_means_task_by_task(tmp_path):
  """A side of several runs is their per-task mean; the interval is the
  paired one, against numpy on the same arrays."""
  rng = np.random.default_rng(0)
  hard = rng.uniform(0.5, 1.0, 200)
  seeds = [np.clip(hard + rng.normal(0, 0.05, 200), 0, 1) for _ in range(3)]
  runs = [
    f"{label}={write_tested_run(tmp_path / label, v)}"
    for label, v in zip(("a0", "a1", "b"), seeds)
  ]
  out = run_script(
    "compare_runs.py",
    "--out",
    str(tmp_path / "cmp"),
    *runs,
    "--paired",
    "a0 + a1 minus b",
    "--paired",
    "b minus a1",
    "--paired",
    "a0 + a1 minus b + a1",
  )
  diff = 100 * ((seeds[0] + seeds[1]) / 2 - seeds[2])
  first, second, third = read_csv(tmp_path / "cmp_paired.csv")
  assert float(first["mean"]) == pytest.approx(np.mean(diff))
  assert float(first["ci95"]) == pytest.approx(
    1.96 * np.std(diff) / np.sqrt(200)
  )
  assert float(second["mean"]) == pytest.approx(
    100 * np.mean(seeds[2] - seeds[1])
  )
  assert first["tasks"] == "200" and "| a0 + a1 minus b |" in out
  assert first["seed_ci95"] == "" and second["seed_ci95"] == ""  # One run.
  # Two runs a side: Welch's interval on the runs' mean accuracies.
  means = [100 * np.mean(v) for v in seeds]
  va = np.var(means[:2], ddof=1) / 2
  vb = np.var(means[1:], ddof=1) / 2
  nu = (va + vb) ** 2 / (va**2 + vb**2)
  half = scipy_stats.t.ppf(0.975, nu) * np.sqrt(va + vb)
  assert float(third["seed_ci95"]) == pytest.approx(half)
  assert "| a0 + a1 minus b + a1 |" in out and "(Welch)" in out
  # No run logged the CG metrics, so neither of their panels is drawn.
  assert "CG" not in out.partition("panels: ")[2].splitlines()[0]


def test_compare_runs_pairs_an_eval_file_of_a_run(tmp_path):
  """``LABEL:FILE`` reads the per-task scores of an ``imaml-eval`` result
  in the run's directory (here: other test-time settings, same tasks)."""
  run = write_tested_run(tmp_path / "a", [0.5, 0.5, 1.0])
  (run / "eval_eval_inner_steps=10.json").write_text(
    json.dumps(
      {
        "protocol": {"name": "paper"},
        "test_per_task": {
          "metric": "accuracy_after",
          "values": [1.0, 0.5, 1.0],
          "tasks_sha256": "t",
        },
      }
    )
  )
  out = run_script(
    "compare_runs.py",
    "--out",
    str(tmp_path / "cmp"),
    f"a={run}",
    "--paired",
    "a:eval_eval_inner_steps=10.json minus a",
  )
  # Differences 50, 0, 0: mean 16.67, half-width 1.96 * 23.57 / sqrt(3).
  assert "| a:eval_eval_inner_steps=10.json minus a | +16.67 ± 26.67 |" in out
  # Each side's protocol is the one its scores were tested under: the
  # file's own, and --protocol's (ours) for the run's results.json.
  assert "| contains 0 | - | paper / ours |" in out
  assert read_csv(tmp_path / "cmp_paired.csv")[0]["protocol"] == "paper / ours"
  done = compare_runs_failing(
    "--out",
    str(tmp_path / "x"),
    f"a={run}",
    "--paired",
    "a:eval_val.json minus a",
  )
  assert done.returncode != 0 and "a:eval_val.json: no per-task scores" in (
    done.stderr
  )


def test_compare_runs_counts_the_tasks_both_sides_share(tmp_path):
  """A longer test pairs with a shorter one over the shorter one's tasks
  (its first ones, by fingerprint), and the row counts those, not the
  longer side's."""
  long_values = [1.0, 0.0, 1.0, 1.0, 0.0]
  long = write_tested_run(tmp_path / "long", long_values, tasks="five")
  record = json.loads((long / "results.json").read_text())
  record["test_per_task"]["prefix_sha256"] = {"3": "three"}
  (long / "results.json").write_text(json.dumps(record))
  short = write_tested_run(tmp_path / "short", [0.5, 0.5, 0.5], tasks="three")
  run_script(
    "compare_runs.py",
    "--out",
    str(tmp_path / "cmp"),
    f"long={long}",
    f"short={short}",
    "--paired",
    "long minus short",
    "--paired",
    "short minus long",
  )
  rows = read_csv(tmp_path / "cmp_paired.csv")
  assert [r["tasks"] for r in rows] == ["3", "3"]
  # Over the first three tasks: differences 50, -50, 50.
  assert float(rows[0]["mean"]) == pytest.approx(100 / 6)


@pytest.mark.parametrize(
  "spec, tasks, message",
  [
    ("a minus c", "t", "names runs that were not given: c"),
    ("a minus b", "other", "not tested on the same tasks"),
    ("a + b minus a", "other", "cannot be averaged per task"),
    ("a - b", "t", 'a paired difference is "A minus B"'),
  ],
)
def test_compare_runs_names_a_bad_pairing(tmp_path, spec, tasks, message):
  a = write_tested_run(tmp_path / "a", [1.0, 0.5])
  b = write_tested_run(tmp_path / "b", [0.5, 0.5], tasks=tasks)
  done = compare_runs_failing(
    "--out", str(tmp_path / "x"), f"a={a}", f"b={b}", "--paired", spec
  )
  assert done.returncode != 0 and message in done.stderr
  assert not (tmp_path / "x.png").exists()  # Checked before plotting.


def test_compare_runs_needs_per_task_scores_to_pair(tmp_path):
  a = write_tested_run(tmp_path / "a", [1.0, 0.5])
  b = write_tested_run(tmp_path / "b", [0.5, 0.5])
  done = compare_runs_failing(
    "--out",
    str(tmp_path / "x"),
    f"a={a}",
    f"b={b}",
    "--paired",
    "a minus b",
    "--protocol",
    "authors",
  )
  assert done.returncode != 0
  assert "a: no per-task test scores under the authors' protocol" in (
    done.stderr
  )


def test_compare_runs_draws_against_tasks_seen(tmp_path):
  """``--x tasks`` scales each run's steps by its own meta-batch, so runs
  of different meta-batch sizes meet at equal numbers of tasks."""
  runs = []
  for label, meta_batch in (("mb8", 8), ("mb4", 4)):
    run = write_tested_run(tmp_path / label, [1.0, 0.5])
    (run / "config.json").write_text(json.dumps({"meta_batch": meta_batch}))
    runs.append(f"{label}={run}")
  out = run_script(
    "compare_runs.py", "--out", str(tmp_path / "cmp"), *runs, "--x", "tasks"
  )
  rows = read_csv(tmp_path / "cmp.csv")
  assert [(r["run"], r["step"], r["tasks"]) for r in rows] == [
    ("mb8", "10", "80"),
    ("mb4", "10", "40"),
  ]
  assert "wrote" in out and (tmp_path / "cmp.png").stat().st_size > 0
  # The default axis is the meta-step, and the CSV has no tasks column.
  run_script("compare_runs.py", "--out", str(tmp_path / "steps"), *runs)
  assert "tasks" not in read_csv(tmp_path / "steps.csv")[0]
  # A run without a readable meta_batch is named before anything is drawn.
  (tmp_path / "mb4" / "config.json").write_text("{}")
  done = compare_runs_failing(
    "--out", str(tmp_path / "x"), *runs, "--x", "tasks"
  )
  assert done.returncode != 0 and "needs the run's meta_batch" in done.stderr
  assert "mb4" in done.stderr and not (tmp_path / "x.png").exists()
  # A boolean is not a meta-batch, though Python counts it an int.
  (tmp_path / "mb4" / "config.json").write_text('{"meta_batch": true}')
  done = compare_runs_failing(
    "--out", str(tmp_path / "x"), *runs, "--x", "tasks"
  )
  assert done.returncode != 0 and "must be a positive integer" in done.stderr


def test_compare_runs_names_a_bad_run_argument(tmp_path):
  done = compare_runs_failing(
    "--out", str(tmp_path / "x"), f"a={tmp_path / 'missing.jsonl'}"
  )
  assert done.returncode == 2 and "no such metrics file" in done.stderr


def test_tables_tests_the_papers_ordering_at_equal_budget():
  tables = import_tables()
  cell = lambda acc, ci, steps, **k: {
    "accuracy": acc,
    "ci95": ci,
    "meta_steps": steps,
    **k,
  }
  by_key = {
    ("omniglot", "5w1s", "imaml_hf"): cell(97.0, 0.3, 6000),
    ("omniglot", "5w1s", "imaml_gd"): cell(
      96.5, 0.4, 6000, authors_accuracy=90.0, authors_ci95=1.0
    ),
    ("omniglot", "5w1s", "maml"): cell(
      95.0, 0.4, 6000, authors_accuracy=97.5, authors_ci95=0.5
    ),
    ("omniglot", "5w5s", "imaml_gd"): cell(95.0, 0.3, 1800),
    ("omniglot", "5w5s", "maml"): cell(99.0, 0.3, 1200),  # Unequal budget.
  }
  found = {
    (c["setting"], c["better"], c["worse"]): c["verdict"]
    for c in tables.ordering(by_key)
  }
  assert found == {
    ("5w1s", "imaml_hf", "imaml_gd"): "unresolved (intervals overlap)",
    ("5w1s", "imaml_gd", "maml"): "holds",
  }
  theirs = tables.ordering(by_key, "authors_")
  assert [(c["better"], c["verdict"]) for c in theirs] == [
    ("imaml_gd", "reversed")
  ]
  assert theirs[0]["difference"] == pytest.approx(-7.5)
  text = "\n".join(tables.ordering_lines(by_key))
  assert (
    "| 5-way 1-shot | authors' | iMAML, GD >= MAML | -7.50 | 6000 |" in text
  )


def test_tables_pairs_runs_tested_on_the_same_tasks():
  """With per-task scores on the same tasks the ordering test is paired: a
  difference far inside the runs' own intervals can still be resolved, and
  other tasks (another fingerprint) fall back to the intervals."""
  tables = import_tables()
  rng = np.random.default_rng(0)
  hard = rng.uniform(0.6, 1.0, 600)  # Shared task difficulty.
  noise = rng.normal(0.0, 0.01, 600)
  worse = np.clip(hard + noise, 0, 1)
  better = np.clip(worse + 0.005, 0, 1)
  per_task = lambda v, sha="t": {
    "metric": "accuracy_after",
    "values": list(v),
    "tasks_sha256": sha,
  }
  cell = lambda v, sha="t": {
    "accuracy": 100 * np.mean(v),
    "meta_steps": 6000,
    "per_task": per_task(v, sha),
    "ci95": 196 * np.std(v) / np.sqrt(v.size),
  }
  by_key = {
    ("omniglot", "5w1s", "imaml_gd"): cell(better),
    ("omniglot", "5w1s", "maml"): cell(worse),
  }
  (c,) = tables.ordering(by_key)
  diff = 100 * (better - worse)
  assert c["verdict"] == "holds"
  assert c["difference"] == pytest.approx(np.mean(diff))
  assert c["paired_ci95"] == pytest.approx(1.96 * np.std(diff) / np.sqrt(600))
  # The same scores without pairing: the runs' intervals overlap.
  assert c["paired_ci95"] < 0.1 < by_key[("omniglot", "5w1s", "maml")]["ci95"]
  by_key[("omniglot", "5w1s", "maml")] = cell(worse, sha="other tasks")
  (c,) = tables.ordering(by_key)
  assert c["paired_ci95"] is None
  assert c["verdict"] == "unresolved (intervals overlap)"
  # A paired interval that contains 0.
  by_key = {
    ("omniglot", "5w1s", "imaml_gd"): cell(worse + noise),
    ("omniglot", "5w1s", "maml"): cell(worse),
  }
  (c,) = tables.ordering(by_key)
  assert c["verdict"] == "unresolved (paired interval contains 0)"
  text = "\n".join(tables.ordering_lines(by_key))
  assert f"± {c['paired_ci95']:.2f} (paired, 600 tasks)" in text


def test_tables_pair_a_test_with_the_first_tasks_of_a_longer_one():
  """A run tested on 1,000 tasks pairs with one tested on 600 over the first
  600, when its fingerprint of those 600 is the other's; not otherwise."""
  tables = import_tables()
  rng = np.random.default_rng(1)
  worse = rng.uniform(0.6, 1.0, 1000)
  better = np.clip(worse[:600] + 0.01, 0, 1)
  longer = {
    "metric": "accuracy_after",
    "values": list(worse),
    "tasks_sha256": "all 1000",
    "prefix_sha256": {"600": "first 600"},
  }
  shorter = {
    "metric": "accuracy_after",
    "values": list(better),
    "tasks_sha256": "first 600",
  }
  assert tables.shared_tasks(shorter, longer) == 600
  mean, half = tables.paired_difference(shorter, longer)
  diff = 100 * (better - worse[:600])
  assert mean == pytest.approx(np.mean(diff))
  assert half == pytest.approx(1.96 * np.std(diff) / np.sqrt(600))
  assert tables.paired_difference(longer, shorter)[0] == pytest.approx(-mean)
  # Other first tasks, a count without a recorded prefix, another metric.
  assert (
    tables.shared_tasks({**shorter, "tasks_sha256": "other"}, longer) is None
  )
  assert (
    tables.shared_tasks({**shorter, "values": list(better[:500])}, longer)
    is None
  )
  assert (
    tables.shared_tasks({**shorter, "metric": "loss_after"}, longer) is None
  )


def test_tables_pair_two_longer_tests_over_their_common_first_tasks():
  """Tests on 9,000 and 21,000 tasks (neither count a recorded prefix of
  the other) pair over the largest prefix both fingerprinted alike."""
  tables = import_tables()
  rng = np.random.default_rng(2)
  a, b = rng.uniform(0.6, 1.0, 9000), rng.uniform(0.6, 1.0, 21000)

  def record(values, digest, prefixes):
    return {
      "metric": "accuracy_after",
      "values": list(values),
      "tasks_sha256": digest,
      "prefix_sha256": prefixes,
    }

  shared = {"600": "p600", "3000": "p3000", "6000": "p6000"}
  nine = record(a, "all 9000", shared)
  many = record(b, "all 21000", shared)
  assert tables.shared_tasks(nine, many) == tables.shared_tasks(many, nine)
  assert tables.shared_tasks(nine, many) == 6000
  mean, half = tables.paired_difference(nine, many)
  diff = 100 * (a[:6000] - b[:6000])
  assert mean == pytest.approx(np.mean(diff))
  assert half == pytest.approx(1.96 * np.std(diff) / np.sqrt(6000))
  # The largest prefix that agrees; none when none does.
  other = record(b, "all 21000", {**shared, "6000": "elsewhere"})
  assert tables.shared_tasks(nine, other) == 3000
  apart = record(b, "x", {m: "y" + m for m in shared})
  assert tables.shared_tasks(nine, apart) is None


def test_tables_eval_tests_only_the_reported_parameters(monkeypatch, tmp_path):
  """``tables.py --eval`` runs ``imaml-eval --skip-last`` on each run whose
  result is missing, with the protocol and task count asked for."""
  tables = import_tables()
  calls = []
  monkeypatch.setattr(tables.cli, "eval_main", calls.append)
  row = {
    "benchmark": "omniglot",
    "accuracy": 97.0,
    "config": "omniglot_5w1s_imaml_gd",
    "meta_steps": 10,
  }
  tables.eval_protocols(tmp_path, [row], None, ["paper", "ours"], 3000)
  assert len(calls) == 2
  for argv, protocol in zip(calls, ("paper", "ours")):
    args = cli.eval_parser().parse_args(argv)
    assert args.skip_last and args.protocol == protocol
    assert args.tasks == 3000
    assert args.workdir == str(tmp_path / "omniglot_5w1s_imaml_gd")
    assert not args.extend  # Nothing recorded to extend.
    assert args.overwrite  # A stale test on more tasks is replaced.


def test_tables_eval_extends_a_current_test_on_fewer_tasks(
  monkeypatch, tmp_path, capsys
):
  """A recorded test of the run's last step on 600 tasks is extended to
  3,000 (``imaml-eval --extend``); a refused extension (exit 2) is followed
  by a test of every task; a test of an earlier step is not extended."""
  tables = import_tables()
  calls = []

  def eval_main(argv):
    calls.append(cli.eval_parser().parse_args(argv))
    if calls[-1].extend and refuse:
      raise SystemExit(2)

  monkeypatch.setattr(tables.cli, "eval_main", eval_main)
  row = {
    "benchmark": "omniglot",
    "accuracy": 97.0,
    "config": "omniglot_5w1s_imaml_gd",
    "meta_steps": 10,
    "measured_paper_step": 10,
    "measured_paper_per_task": {},
    "measured_paper_test_tasks": 600,
  }
  refuse = False
  tables.eval_protocols(tmp_path, [row], None, ["paper"], 3000)
  assert [(a.extend, a.tasks) for a in calls] == [(True, 3000)]
  calls.clear()
  refuse = True
  tables.eval_protocols(tmp_path, [row], None, ["paper"], 3000)
  assert [(a.extend, a.overwrite) for a in calls] == [
    (True, False),
    (False, True),
  ]
  assert "testing every task" in capsys.readouterr().out
  calls.clear()
  tables.eval_protocols(
    tmp_path, [{**row, "measured_paper_step": 5}], None, ["paper"], 3000
  )
  assert [(a.extend, a.overwrite) for a in calls] == [(False, True)]


def test_tables_mark_and_leave_out_a_test_older_than_its_run():
  """An authors'-protocol test made before the run went on is shown with its
  step and kept out of the ordering (it measured other parameters)."""
  tables = import_tables()
  cell = lambda steps, authors_step: {
    "accuracy": 97.0,
    "ci95": 0.3,
    "meta_steps": steps,
    "complete": True,
    "authors_accuracy": 90.0,
    "authors_ci95": 1.0,
    "authors_step": authors_step,
    "paper_accuracy": 99.5,
    "paper_ci95": 0.26,
  }
  by_key = {
    ("omniglot", "5w1s", "imaml_hf"): cell(6000, 3000),
    ("omniglot", "5w1s", "imaml_gd"): cell(6000, 6000),
  }
  assert [c["better"] for c in tables.ordering(by_key)] == ["imaml_hf"]
  assert tables.ordering(by_key, "authors_") == []
  assert tables.format_cell(
    by_key[("omniglot", "5w1s", "imaml_hf")], "authors_"
  ) == ("90.00 ± 1.00 at step 3000 (paper 99.5 ± 0.26)")
  by_key[("omniglot", "5w1s", "imaml_hf")]["authors_step"] = 6000
  (c,) = tables.ordering(by_key, "authors_")
  assert c["meta_steps"] == 6000


def test_tables_read_every_protocol_and_prefer_more_test_tasks(tmp_path):
  """A run's three measurements: ours from results.json unless imaml-eval
  tested the same parameters on more tasks (eval.json), the paper's and
  the authors' from their files; each table and the ordering show them,
  and --eval asks again where a result has fewer tasks than --tasks."""
  tables = import_tables()

  def accuracy(mean, n):
    return {"mean": mean, "std": 0.1, "ci95": 0.196 / np.sqrt(n), "n": n}

  def per_task(value, n):
    return {
      "metric": "accuracy_after",
      "values": [value] * n,
      "tasks_sha256": f"tasks-{n}",
    }

  def write(path, record):
    path.write_text(json.dumps(record))

  budget = {
    "meta_steps": 6000,
    "meta_steps_target": 6000,
    "wall_time_s": 60.0,
    "device": "cpu:cpu",
  }
  for name, ours, paper in (
    ("omniglot_5w1s_imaml_gd", 0.96, 0.985),
    ("omniglot_5w1s_maml", 0.95, 0.97),
  ):
    run = tmp_path / name
    run.mkdir()
    write(
      run / "results.json",
      {
        "test": {"accuracy_after": accuracy(ours - 0.01, 600)},
        "budget": budget,
        "test_params": "best_validation",
        "test_per_task": per_task(ours - 0.01, 600),
      },
    )
    ours_eval = {
      "step": 6000,
      "test_params": "best_validation",
      "split": "test",
      "protocol": {"name": "ours", "q_query": 15},
      "test_time_overrides": [],
      "test": {"accuracy_after": accuracy(ours, 3000)},
      "test_per_task": per_task(ours, 3000),
    }
    write(run / "eval.json", ours_eval)
    for file, mean in (
      ("eval_protocol=paper.json", paper),
      ("eval_protocol=authors.json", paper - 0.1),
    ):
      write(
        run / file,
        {
          "step": 6000,
          "protocol": {"name": file[14:-5], "q_query": 1},
          "test": {"accuracy_after": accuracy(mean, 3000)},
          "test_per_task": per_task(mean, 3000),
        },
      )
  rows = tables.build_rows(tmp_path)
  by_key = {(r["benchmark"], r["setting"], r["algorithm"]): r for r in rows}
  gd = by_key[("omniglot", "5w1s", "imaml_gd")]
  assert gd["accuracy"] == pytest.approx(96.0) and gd["test_tasks"] == 3000
  assert gd["measured_paper_accuracy"] == pytest.approx(98.5)
  assert gd["authors_accuracy"] == pytest.approx(88.5)
  assert gd["paper_accuracy"] == 99.16  # The paper's own number, kept apart.
  text = tables.markdown(rows)
  paper_table = text.split("## Table 2")[1]
  assert "the paper's measurement" in paper_table
  assert "98.50 ± 0.36 (paper 99.16 ± 0.35)" in paper_table
  assert "| 5-way 1-shot | paper's | iMAML, GD >= MAML | +1.50 ± 0.00" in text
  for prefix in ("", "measured_paper_", "authors_"):
    assert not tables.needs_eval(gd, prefix, 3000)
    assert tables.needs_eval(gd, prefix, 6000)
  # A test of other parameters (an older step) leaves results.json's.
  ours_eval["step"] = 5000
  write(tmp_path / "omniglot_5w1s_imaml_gd" / "eval.json", ours_eval)
  (gd,) = [
    r
    for r in tables.build_rows(tmp_path)
    if r["config"] == "omniglot_5w1s_imaml_gd"
  ]
  assert gd["accuracy"] == pytest.approx(95.0) and gd["test_tasks"] == 600


@pytest.mark.parametrize(
  "name", ["tables", "compare_runs", "arguments", "step_variants"]
)
def test_benchmark_docstring_examples(name):
  results = doctest.testmod(import_benchmark(name))
  assert results.attempted > 0 and results.failed == 0


def test_compare_runs_seed_level_interval_is_welchs():
  """Against scipy's Welch t-test interval on the same groups."""
  compare_runs = import_benchmark("compare_runs")
  rng = np.random.default_rng(1)
  for na, nb in ((2, 2), (3, 3), (3, 5)):
    a, b = rng.normal(97.2, 0.4, na), rng.normal(97.0, 0.1, nb)
    difference, half = compare_runs.seed_level_difference(list(a), list(b))
    ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert difference == pytest.approx(np.mean(a) - np.mean(b))
    assert half == pytest.approx((ci.high - ci.low) / 2)
  assert compare_runs.seed_level_difference([97.0], [96.0, 96.5]) is None


def test_compare_runs_draws_every_run_past_forty(tmp_path, monkeypatch):
  """Each of 45 runs gets a curve (a 40-colour list once dropped the rest)."""
  compare_runs = import_benchmark("compare_runs")
  records = [{"step": s, "split": "val", "accuracy_after": 0.5} for s in (1, 2)]
  runs = {f"run {i}": records for i in range(45)}
  drawn = []
  save = compare_runs.plt.Figure.savefig

  def count_then_save(fig, *args, **kwargs):
    drawn.append(len(fig.axes[0].lines))
    return save(fig, *args, **kwargs)

  monkeypatch.setattr(compare_runs.plt.Figure, "savefig", count_then_save)
  compare_runs.plot(runs, str(tmp_path / "runs.png"))
  assert drawn == [45]


def run_shell_script(script, *args, **env):
  """``bash benchmarks/SCRIPT ARGS`` with ``env`` added, this Python as its
  ``PYTHON``; the completed process."""
  return subprocess.run(
    ["bash", str(BENCHMARKS / script), *args],
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, "PYTHON": sys.executable, **env},
  )


def table2_gpu(*args, **env):
  return run_shell_script("table2_gpu.sh", *args, **env)


def test_table2_gpu_variant_cells_train_their_config_with_their_overrides(
  tmp_path,
):
  """The dry run prints each cell's training command; every command names
  a registered config and overrides that the config accepts."""
  cells = ["20w1s_imaml_gd", "20w1s_imaml_gd_pullback", "20w5s_imaml_gd_cgstop"]
  done = table2_gpu(str(tmp_path / "t2"), "290", *cells, TABLE2_GPU_DRY_RUN="1")
  assert done.returncode == 0, done.stderr
  commands = done.stdout.splitlines()
  assert len(commands) == 3 and not (tmp_path / "t2").exists()
  configs = []
  for cell, command in zip(cells, commands):
    words = command.split()
    name = words[words.index("train") + 1]
    assert words[words.index("--workdir") + 1].endswith(f"omniglot_{cell}")
    overrides = words[words.index("--set") + 1 :]
    configs.append(
      config_lib.apply_overrides(config_lib.get_config(name), overrides)
    )
  plain, pullback, cgstop = configs
  assert config_lib.differences(plain, pullback).keys() == {
    "inner",
    "inner_lr",
    "inner_backtrack",
  }
  assert (pullback.inner, pullback.inner_lr) == ("gd_then_pull_back", 0.1)
  assert cgstop.n_way == 20 and cgstop.k_shot == 5
  assert cgstop.cg_stop_at_negative_curvature
  assert (cgstop.meta_steps, cgstop.meta_batch) == (1000, 16)


def test_table2_gpu_refuses_an_unknown_cell_before_any_work(tmp_path):
  done = table2_gpu(
    str(tmp_path / "t2"), "290", "20w1s_imaml_gd", "20w1s_imaml_gd_pulback"
  )
  assert done.returncode == 2
  assert "unknown cell 20w1s_imaml_gd_pulback" in done.stderr
  assert not (tmp_path / "t2").exists()


def table2_full_budget(*args, **env):
  return run_shell_script("table2_full_budget.sh", *args, **env)


def test_table2_full_budget_dry_run_prints_each_cells_training_command(
  tmp_path,
):
  """Every default cell continues its own run directory with its config;
  the diagnostic cell ``CELL+KEY=VALUE`` changes only that field."""
  out = tmp_path / "full"
  done = table2_full_budget(str(out), "480", TABLE2_FULL_DRY_RUN="1")
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert [line.split(":")[0] for line in lines] == [
    f"omniglot_{cell}"
    for cell in (
      "20w1s_imaml_gd",
      "20w1s_maml",
      "5w1s_imaml_hf",
      "5w5s_imaml_gd",
      "5w5s_maml",
      "20w5s_imaml_gd",
      "20w5s_maml",
      "5w1s_imaml_gd+inner_steps=64",
      "20w1s_imaml_gd+lam=0.5",
      "20w5s_imaml_gd+lam=0.5",
      "20w5s_imaml_gd+lam=0.5+cg_stop_at_negative_curvature=true",
    )
  ]
  assert not out.exists()
  configs = {}
  for line in lines:
    cell, command = line.split(": ", 1)
    assert f"would continue benchmarks/runs_gpu_full/{cell}: " in command
    words = command.split(": ", 1)[1].split()
    assert words[words.index("--workdir") + 1] == str(out / cell)
    # The slice's seconds less the time already spent in it and the
    # reserve for compiling, validation and the final test (180 s).
    assert 240 < int(words[words.index("--time-budget") + 1]) <= 300
    assert words[words.index("--compile-cache") + 1] == str(out / "xla" / cell)
    name = words[words.index("train") + 1]
    overrides = words[words.index("--set") + 1 :]
    configs[cell] = config_lib.apply_overrides(
      config_lib.get_config(name), overrides
    )
  for config in configs.values():
    assert config.task_chunk == 0 and config.keep_checkpoints == 1
  # The diagnostic is the published model's config (as its run stored it)
  # with 64 inner steps; the rest are the slice's logging and checkpoint
  # settings.
  diagnostic = configs["omniglot_5w1s_imaml_gd+inner_steps=64"]
  published = config_lib.from_dict(
    json.loads((STABILITY_RUN / "config.json").read_text())
  )
  assert diagnostic.inner_steps == 64 and published.inner_steps == 16
  assert (diagnostic.meta_steps, diagnostic.meta_batch) == (20000, 32)
  slice_settings = {
    "log_every",
    "val_every",
    "checkpoint_every",
    "keep_checkpoints",
    "task_chunk",
    "log_residual",
  }
  assert set(config_lib.differences(diagnostic, published)) <= {
    "inner_steps",
    *slice_settings,
  }
  # The 20-way diagnostics are the paper-form cells with lam 0.5, nothing
  # else.
  for setting in ("20w1s", "20w5s"):
    weak = configs[f"omniglot_{setting}_imaml_gd+lam=0.5"]
    paper_form = configs[f"omniglot_{setting}_imaml_gd"]
    assert (weak.lam, paper_form.lam) == (0.5, 2.0)
    assert set(config_lib.differences(weak, paper_form)) == {"lam"}
    assert (weak.meta_steps, weak.meta_batch) == (20000, 32)
  # The last diagnostic is the 20-way 5-shot lam 0.5 cell with CG stopped
  # at negative curvature, nothing else.
  guarded = configs[
    "omniglot_20w5s_imaml_gd+lam=0.5+cg_stop_at_negative_curvature=true"
  ]
  assert guarded.cg_stop_at_negative_curvature
  assert set(
    config_lib.differences(guarded, configs["omniglot_20w5s_imaml_gd"])
  ) == {"lam", "cg_stop_at_negative_curvature"}


def test_table2_full_budget_quick_trains_tests_and_then_skips_a_cell(
  tmp_path,
):
  """The smoke test a GPU slice relies on, end to end on Omniglot: a cell
  trains to its last meta-step and is tested under the three measurements;
  its run directory and compiled steps come back as archives, few enough
  for a GPU machine to return, and are unpacked into the tree; the same
  command then leaves the cell alone."""
  if not os.environ.get("IMAML_OMNIGLOT_DIR"):
    pytest.skip("IMAML_OMNIGLOT_DIR is not set")
  out = tmp_path / "full"

  def slice_():
    return subprocess.run(
      ["bash", str(BENCHMARKS / "table2_full_budget.sh"), str(out), "900"]
      + ["5w1s_maml"],
      capture_output=True,
      text=True,
      timeout=1000,
      env=fast_compile.environ(PYTHON=sys.executable, TABLE2_FULL_QUICK="1"),
    )

  done = slice_()
  assert done.returncode == 0, done.stdout + done.stderr
  returned = sorted(p.name for p in out.iterdir() if p.is_file())
  assert returned == ["omniglot_5w1s_maml.tar.gz", "slice.log", "xla.tar.gz"]
  summary = (out / "slice.log").read_text()
  for line in ("train: exit 0", "compiled steps: "):
    assert line in summary
  cell = out / "root" / "omniglot_5w1s_maml"
  log = (cell / "omniglot_5w1s_maml.log").read_text()
  for protocol in ("ours", "paper", "authors"):
    assert f"eval --protocol {protocol}: exit 0" in log
  results = json.loads((cell / "results.json").read_text())
  assert results["budget"]["meta_steps"] == 4
  for name, params in (
    ("eval.json", "best_validation"),
    ("eval_protocol=paper.json", "best_validation"),
    ("eval_protocol=authors.json", "last"),
  ):
    tested = json.loads((cell / name).read_text())
    assert tested["step"] == 4 and tested["test_params"] == params
    assert tested["test"]["accuracy_after"]["n"] == 10
  assert [p.name for p in (cell / "checkpoints").iterdir()] == [
    "checkpoint_000000004.ckpt"
  ]
  # The compiled steps came back, and went once the cell was tested.
  with tarfile.open(out / "xla.tar.gz") as archive:
    assert any(
      n.startswith("./omniglot_5w1s_maml/jit_") for n in archive.getnames()
    )
  assert not (out / "root" / "xla" / "omniglot_5w1s_maml").exists()

  # A slice that ended before a measurement: the next one resumes the run
  # from the tree and takes only the measurement that is missing.
  (cell / "eval_protocol=authors.json").unlink()
  for name in ("omniglot_5w1s_maml.tar.gz", "slice.log", "xla.tar.gz"):
    (out / name).unlink()
  earlier = (cell / "omniglot_5w1s_maml.log").read_text()
  resumed = slice_()
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  whole = (cell / "omniglot_5w1s_maml.log").read_text()
  assert whole.startswith(earlier)  # each slice's log after the last's
  log = whole[len(earlier) :]
  assert "Resuming from " in log and "(step 4)" in log
  assert "eval --protocol authors: exit 0" in log
  assert (
    "eval --protocol ours" not in log and "eval --protocol paper" not in log
  )
  tested = json.loads((cell / "eval_protocol=authors.json").read_text())
  assert tested["step"] == 4 and tested["test"]["accuracy_after"]["n"] == 10

  again = slice_()
  assert again.returncode == 0, again.stdout + again.stderr
  assert again.stdout.splitlines() == [
    "omniglot_5w1s_maml: finished and tested"
  ]


def _cell_archive(path: Path, folder: str, files: dict) -> None:
  with tarfile.open(path, "w:gz") as archive:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(f"{folder}/{name}")
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


def test_table2_full_budget_unpack_replaces_each_cells_run_directory(
  tmp_path,
):
  """``--unpack`` puts each archive's run directory in place of the tree's
  (no stale checkpoint left beside the new one), keeps the compiled steps
  of an unfinished cell, and refuses an archive that is not one cell's."""
  repo = tmp_path / "repo"
  shutil.copytree(BENCHMARKS, repo / "benchmarks", ignore=_no_runs)
  root = repo / "benchmarks" / "runs_gpu_full"
  diagnostic = "omniglot_5w1s_imaml_gd+inner_steps=64"
  stale = root / diagnostic / "checkpoints" / "checkpoint_000001000.ckpt"
  stale.parent.mkdir(parents=True)
  stale.write_text("old")
  unfinished = {"meta_steps": 2000, "meta_steps_target": 20000}
  slice_out = tmp_path / "slice"
  slice_out.mkdir()
  _cell_archive(
    slice_out / "omniglot_5w1s_imaml_gd__inner_steps-64.tar.gz",
    diagnostic,
    {
      "results.json": json.dumps({"budget": unfinished}),
      "checkpoints/checkpoint_000002000.ckpt": "new",
    },
  )
  _cell_archive(
    slice_out / "xla.tar.gz", f"./{diagnostic}", {"jit_step-1-cache": "x"}
  )

  def unpack(source):
    return subprocess.run(
      ["bash", str(repo / "benchmarks" / "table2_full_budget.sh"), "--unpack"]
      + [str(source)],
      capture_output=True,
      text=True,
      timeout=60,
      env={**os.environ, "PYTHON": sys.executable},
    )

  done = unpack(slice_out)
  assert done.returncode == 0, done.stderr
  assert (
    done.stdout == f"{diagnostic}: unpacked into {root.relative_to(repo)}\n"
  )
  assert [p.name for p in (root / diagnostic / "checkpoints").iterdir()] == [
    "checkpoint_000002000.ckpt"
  ]
  assert (root / "xla" / diagnostic / "jit_step-1-cache").read_text() == "x"

  bad = tmp_path / "bad"
  bad.mkdir()
  _cell_archive(bad / "omniglot_x.tar.gz", "elsewhere", {"a": "b"})
  done = unpack(bad)
  assert done.returncode == 2
  assert "does not hold one cell's run directory" in done.stderr
  assert not (root / "elsewhere").exists()
  done = unpack(tmp_path / "empty")
  assert done.returncode == 2 and "no omniglot_*.tar.gz in" in done.stderr


def _no_runs(folder, names):
  """``shutil.copytree``'s ``ignore``: the scripts, not the run folders."""
  return [n for n in names if n.startswith("runs") or n == "results"]


@pytest.mark.parametrize(
  ("cell", "message"),
  [
    ("5w1s_imaml_gx", "unknown config 'omniglot_5w1s_imaml_gx'"),
    ("5w1s_imaml_gd+inner_stepz=64", "unknown config field 'inner_stepz'"),
    ("5w1s_imaml_gd+inner_steps=0", "inner_steps must be >= 1"),
  ],
)
def test_table2_full_budget_refuses_a_bad_cell_before_any_work(
  tmp_path, cell, message
):
  out = tmp_path / "full"
  done = table2_full_budget(str(out), "420", "20w1s_imaml_gd", cell)
  assert done.returncode == 2
  assert f"cell {cell}: " in done.stderr and message in done.stderr
  assert not out.exists()


# The documentation's figures against the result files that back them.
RESULTS = BENCHMARKS / "results"
PERFORMANCE_GUIDE = BENCHMARKS.parent / "docs" / "guides" / "performance.md"


def markdown_section(path: Path, heading: str) -> str:
  """The text under the heading ``heading`` (any level) of a Markdown file,
  up to the next heading of the same or a higher level."""
  lines = path.read_text(encoding="utf-8").splitlines()
  for i, line in enumerate(lines):
    hashes, _, title = line.partition(" ")
    if set(hashes) == {"#"} and title.strip() == heading:
      level = len(hashes)
      body = []
      for other in lines[i + 1 :]:
        marks, _, _ = other.partition(" ")
        if set(marks) == {"#"} and len(marks) <= level:
          break
        body.append(other)
      return "\n".join(body)
  raise AssertionError(f"no heading {heading!r} in {path}")


def mib_column_in_gib(path: Path, *columns: str) -> set[str]:
  """The MiB figures of a result CSV's ``columns``, in GiB to 0.1."""
  return {
    f"{float(row[c]) / 1024:.1f}"
    for row in read_csv(path)
    for c in columns
    if row.get(c)
  }


@pytest.mark.parametrize(
  ("page", "heading", "files"),
  [
    (
      BENCHMARKS / "README.md",
      "memory vs inner steps (Figure 2b), compiled temporaries",
      ["memory_vs_steps_cpu.csv"],
    ),
    (
      BENCHMARKS / "README.md",
      "the same on a GPU, each point in its own process",
      ["memory_vs_steps_gpu_h100.csv"],
    ),
    (
      PERFORMANCE_GUIDE,
      "Memory against inner steps (Figure 2b)",
      ["memory_vs_steps_cpu.csv", "memory_vs_steps_gpu_h100.csv"],
    ),
  ],
)
def test_memory_figures_are_their_result_files_in_gib(page, heading, files):
  """The scripts record MiB (2^20 bytes); the docs quote GiB, each figure a
  compiled size or device peak of the files, or MAML's growth per inner
  step, rounded to 0.1."""
  text = markdown_section(page, heading)
  recorded = set()
  for name in files:
    recorded |= mib_column_in_gib(RESULTS / name, "temp_mb", "peak_device_mb")
  maml = {
    int(r["inner_steps"]): float(r["temp_mb"])
    for r in read_csv(RESULTS / "memory_vs_steps_cpu.csv")
    if r["algorithm"] == "maml"
  }
  first, last = min(maml), max(maml)
  recorded.add(f"{(maml[last] - maml[first]) / (last - first) / 1024:.1f}")
  quoted = re.findall(r"(\d+(?:\.\d+)?) GiB", text)
  assert quoted, f"no GiB figure under {heading!r}"
  assert not re.findall(r"\d GB\b", text), "sizes are quoted in GiB"
  assert set(quoted) <= recorded, sorted(set(quoted) - recorded)


def brace_expansions(token: str) -> list[str]:
  """``a.{csv,json}`` -> ``['a.csv', 'a.json']`` (nested braces too)."""
  match = re.search(r"\{([^{}]*)\}", token)
  if not match:
    return [token]
  head, tail = token[: match.start()], token[match.end() :]
  return [
    name
    for choice in match.group(1).split(",")
    for name in brace_expansions(head + choice + tail)
  ]


def cited_result_files(text: str) -> list[Path]:
  """The files under ``benchmarks/results/`` that ``text`` names in
  backticks (``name.csv``, ``name.{md,csv}``, ``name.*``)."""
  found = set()
  for token in re.findall(r"`([^`\s]+)`", text):
    token = token.removeprefix("benchmarks/").removeprefix("results/")
    for name in brace_expansions(token):
      found.update(p for p in RESULTS.glob(name) if p.is_file())
  return sorted(p for p in found if p.suffix != ".png")


def cited_runs(text: str) -> list[Path]:
  """The run directories under ``benchmarks/`` that ``text`` names in
  backticks (``runs/NAME/``, ``benchmarks/runs_gpu_h200/NAME/``)."""
  return [
    BENCHMARKS / name
    for name in re.findall(r"`(?:benchmarks/)?(runs[\w/.=-]*)/?`", text)
    if (BENCHMARKS / name).is_dir()
  ]


def run_intervals(run: Path) -> str:
  """Every test score of a run's ``results.json`` and ``eval*.json``, as
  ``mean ± 95% interval`` in percent to 0.01, one a line."""
  lines = []
  for path in sorted(run.glob("*.json")):
    record = json.loads(path.read_text())
    for key in ("test", "test_last"):
      for stats in (record.get(key) or {}).values():
        if isinstance(stats, dict) and {"mean", "ci95"} <= set(stats):
          lines.append(f"{100 * stats['mean']:.2f} ± {100 * stats['ci95']:.2f}")
  return "\n".join(lines)


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def results_sections() -> dict[str, str]:
  """The ``###`` sections under ``## Results`` of ``benchmarks/README.md``."""
  text = markdown_section(BENCHMARKS / "README.md", "Results")
  parts = re.split(r"^### (.+)$", text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def plus_minus_figures(text: str) -> list[str]:
  """Every ``A ± B`` of a text, signs and percent signs kept off B's end."""
  return re.findall(r"([+-]?\d[\d,]*(?:\.\d+)?%?) ± (\d[\d,]*(?:\.\d+)?)", text)


@pytest.mark.parametrize("heading", sorted(results_sections()))
def test_readme_result_intervals_are_in_the_files_they_cite(heading):
  """Each ``A ± B`` of a results section of ``benchmarks/README.md`` is
  written so in a result file that the section, or a section it links to,
  names."""
  sections = results_sections()
  text = sections[heading]
  linked = [
    sections[h]
    for h in sections
    if f"(#{github_anchor(h)})" in text and h != heading
  ]
  files = cited_result_files("\n".join([text, *linked]))
  written = "\n".join(
    [p.read_text(errors="replace") for p in files]
    + [run_intervals(run) for run in cited_runs(text)]
  )
  written = re.sub(r"\+(?=\d)", "", written.replace("+-", "±"))
  missing = [
    f"{a} ± {b}"
    for a, b in plus_minus_figures(text)
    if not re.search(
      rf"(?<![\d.]){re.escape(a.rstrip('%').lstrip('+'))}%? ± {re.escape(b)}",
      written,
    )
  ]
  assert not missing, (missing, [p.name for p in files])


def test_compile_time_refuses_an_other_path_without_the_package(tmp_path):
  """A tree without ``imaml_jax`` would have the child import the installed
  version and report it as the other version."""
  assert import_benchmark("compile_time").source_tree(str(BENCHMARKS.parent))
  out = tmp_path / "out"
  done = subprocess.run(
    [
      sys.executable,
      str(BENCHMARKS / "compile_time.py"),
      "--quick",
      "--other-path",
      str(tmp_path / "before"),
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
  assert "no imaml_jax package there" in done.stderr
  assert not out.exists()


@pytest.mark.parametrize("made", [False, True])
def test_tables_refuses_a_folder_without_runs(tmp_path, capsys, made):
  """A mistyped ``--runs`` (missing, or holding no config's run) was read as
  a table of empty cells and written over ``--out``'s tables."""
  runs = tmp_path / "runs"
  if made:
    (runs / "notes").mkdir(parents=True)
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    import_tables().main(["--runs", str(runs), "--out", str(out)])
  assert exit_info.value.code == 2
  assert "holds no work directory of a Table 2/3 config" in (
    capsys.readouterr().err
  )
  assert not out.exists()


def test_table2_cpu_usage_regenerates_the_committed_tables(tmp_path):
  """The ``tables.py`` command that ``table2_cpu.sh`` prints as its usage
  writes ``tables_cpu.md`` (here under a temporary ``--out``), and from the
  committed runs that is the committed table."""
  usage = run_shell_script("table2_cpu.sh").stderr
  (command,) = [
    line.lstrip("# ").split()
    for line in usage.splitlines()
    if "benchmarks/tables.py" in line
  ]
  assert command[:2] == ["python", "benchmarks/tables.py"]
  argv = [  # Nothing written under benchmarks/results/.
    arg.replace("benchmarks/results", str(tmp_path), 1) for arg in command[2:]
  ]
  subprocess.run(
    [sys.executable, str(BENCHMARKS / "tables.py"), *argv],
    cwd=BENCHMARKS.parent,
    capture_output=True,
    check=True,
    timeout=120,
  )
  assert (tmp_path / "tables_cpu.md").read_text() == (
    RESULTS / "tables_cpu.md"
  ).read_text()


def test_gap_decomposition_trains_the_committed_runs_configs(tmp_path):
  """Run on an empty folder (``imaml-train`` and ``taskset`` stubbed to
  record their arguments), ``gap_decomposition.sh`` asks for the config of
  each committed run of the study, field by field, whatever the configs'
  defaults have become since."""
  (tmp_path / "benchmarks" / "runs" / "gap_5w1s").mkdir(parents=True)
  shutil.copy(BENCHMARKS / "gap_decomposition.sh", tmp_path / "benchmarks")
  stubs = tmp_path / "bin"
  stubs.mkdir()
  calls = tmp_path / "calls.jsonl"
  (stubs / "taskset").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')
  (stubs / "imaml-train").write_text(
    f"#!{sys.executable}\nimport json, sys\n"
    f"with open({str(calls)!r}, 'a') as f:\n"
    "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
  )
  for stub in stubs.iterdir():
    stub.chmod(0o755)
  done = subprocess.run(
    ["bash", str(tmp_path / "benchmarks" / "gap_decomposition.sh"), "0"],
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"},
    check=False,
  )
  assert done.returncode == 0, done.stderr
  committed = BENCHMARKS / "runs" / "gap_5w1s"
  asked = [json.loads(line) for line in calls.read_text().splitlines()]
  labels = [Path(argv[argv.index("--workdir") + 1]).name for argv in asked]
  assert sorted(labels) == sorted(
    p.name for p in committed.iterdir() if (p / "config.json").exists()
  )
  for label, argv in zip(labels, asked):
    overrides = argv[argv.index("--set") + 1 :]
    config = config_lib.apply_overrides(
      config_lib.get_config(argv[0]), overrides
    )
    saved = json.loads((committed / label / "config.json").read_text())
    differ = {
      k: (v, getattr(config, k))
      for k, v in saved.items()
      if getattr(config, k) != v
    }
    assert not differ, (label, differ)


def accuracy_rows() -> list[dict]:
  return read_csv(RESULTS / "meta_gradient_accuracy.csv")


def error_at(method: str, sweep: str, count: int) -> float:
  """The committed relative error of ``method`` after ``count`` steps."""
  column = "cg_steps" if sweep == "cg_steps" else "inner_steps"
  (row,) = [
    r
    for r in accuracy_rows()
    if r["method"] == method and r["sweep"] == sweep and int(r[column]) == count
  ]
  return float(row["rel_error"])


@pytest.mark.parametrize(
  ("page", "heading"),
  [
    (BENCHMARKS / "README.md", "meta-gradient accuracy (Figure 2a)"),
    (
      PERFORMANCE_GUIDE.with_name("implicit_gradients.md"),
      "`im.adapt` with a loss of your own",
    ),
  ],
)
def test_meta_gradient_accuracy_figures_are_the_committed_ones(page, heading):
  """Each ``X with N CG steps`` / ``X after N inner steps`` of the docs is
  the committed error rounded as written, and that file is what the script
  computes with the library's CG today (its sweep over CG steps, where the
  solver's start shows)."""
  text = " ".join(markdown_section(page, heading).split())
  quoted = re.findall(
    r"(\d\.\d+e-\d+)(?: relative error)?(?: in float64)? with (\d+)"
    r"(?: CG steps)?|(\d\.\d+e-\d+) after (\d+) inner steps",
    text,
  )
  assert quoted
  for cg_error, cg_steps, maml_error, inner_steps in quoted:
    if cg_error:
      value = error_at("imaml", "cg_steps", int(cg_steps))
      assert f"{value:.1e}" == cg_error, (cg_steps, value)
    else:
      value = error_at("maml", "inner_steps", int(inner_steps))
      assert f"{value:.1e}" == maml_error, (inner_steps, value)


def numbers_in(text: str) -> list[str]:
  """The decimal numbers of a text as written (thousands separators kept)."""
  return re.findall(
    r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?", text
  )


def written_as(figure: str, values: list[float]) -> bool:
  """Whether one of ``values`` rounds to ``figure`` at its precision."""
  decimals = len(figure.partition(".")[2])
  target = float(figure.replace(",", ""))
  return any(
    abs(v - target) <= 0.5 * 10**-decimals * (1 + 1e-9) for v in values
  )


@pytest.mark.parametrize(
  ("page", "heading"),
  [
    (BENCHMARKS / "README.md", "compile time, and what XLA makes of a step"),
    (PERFORMANCE_GUIDE, "Compile time"),
  ],
)
def test_compile_time_figures_are_in_the_files_they_cite(page, heading):
  """Every duration in seconds of these sections is, rounded as written,
  a figure of a result file the section names."""
  text = " ".join(markdown_section(page, heading).split())
  files = cited_result_files(text)
  assert files
  values = [
    float(n.replace(",", ""))
    for path in files
    for n in numbers_in(path.read_text(errors="replace"))
  ]
  durations = re.findall(
    r"(\d+(?:\.\d+)?)(?: s| and (\d+(?:\.\d+)?) s|-(\d+(?:\.\d+)?) s)\b",
    text,
  )
  figures = [n for group in durations for n in group if n]
  assert figures
  unbacked = [f for f in figures if not written_as(f, values)]
  assert not unbacked, unbacked


def test_throughput_section_sizes_are_its_result_files():
  """The working sets the performance guide quotes for the vmapped and the
  one-task-at-a-time CPU steps are the throughput runs' compiled
  temporaries (MiB), rounded as written."""
  text = " ".join(
    markdown_section(PERFORMANCE_GUIDE, "Throughput of the meta-step").split()
  )
  recorded = {
    f"{float(row['temp_mb']):.0f}"
    for name in ("throughput_cpu.csv", "throughput_cpu_vmapped.csv")
    for row in read_csv(RESULTS / name)
  }
  quoted = re.findall(r"(\d+) MiB", text)
  assert quoted and not re.findall(r"\d MB\b", text)
  assert set(quoted) <= recorded, sorted(set(quoted) - recorded)


@pytest.mark.parametrize(
  ("script", "argv", "message"),
  [
    ("cg_warm_start.py", ["--problems", "linreg", "--tasks", "0"], "--tasks"),
    ("scaling.py", ["--quick", "--devices", "2,0"], "--devices"),
    ("scaling.py", ["--quick", "--repeats", "0"], "--repeats"),
    ("conv_formulations.py", ["--quick", "--repeats", "-1"], "--repeats"),
    ("compile_time.py", ["--quick", "--runs", "-1"], "--runs"),
    ("throughput.py", ["--quick", "--repeats", "0"], "--repeats"),
    ("step_variants.py", ["--quick", "--rounds", "0"], "--rounds"),
    ("memory_vs_steps.py", ["--quick", "--steps", "1", "-1"], "--steps"),
    ("curvature.py", ["--tasks", "-1"], "--tasks"),
    ("stability_diagnostics.py", ["--tasks", "0"], "--tasks"),
    ("sinusoid_diagnosis.py", ["--tasks", "0"], "--tasks"),
    ("speed_defaults.py", ["--before", ".", "--steps", "0"], "--steps"),
  ],
)
def test_benchmarks_refuse_a_count_below_its_minimum(
  tmp_path, script, argv, message
):
  """A count below its minimum (no tasks, rounds or repeats, a negative
  number of steps or devices) is refused as the arguments are parsed:
  exit status 2 and the argument named, no traceback after the work and
  no result files."""
  done = subprocess.run(
    [sys.executable, str(BENCHMARKS / script), *argv, "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert done.returncode == 2, done.stderr[-2000:]
  assert f"argument {message}: must be >= " in done.stderr
  assert "Traceback" not in done.stderr
  assert not any(tmp_path.iterdir())


def recorded_cpu(path: Path) -> str | None:
  """The CPU model a result note records on its ``Machine:`` line."""
  machine = re.search(r"^Machine:.*$", path.read_text(), flags=re.M)
  model = machine and re.search(r"AMD EPYC|Intel\(R\) Xeon\(R\)", machine[0])
  return model and model[0].replace("(R)", "")


@pytest.mark.parametrize("heading", sorted(results_sections()))
def test_readme_result_names_the_cpu_its_files_record(heading):
  """A results section names the CPU model that the notes it cites record
  (speeds differ between the project's machines)."""
  text = results_sections()[heading]
  for path in cited_result_files(text):
    if path.suffix == ".md" and (model := recorded_cpu(path)):
      assert model in text, (path.name, model)


def test_scaling_figures_are_the_committed_run():
  """The tasks/s the docs quote for the sharded step are the committed
  run's, device count by device count, and the docs name its setting."""
  rows = read_csv(RESULTS / "scaling_cpu_quick.csv")
  recorded = [f"{float(r['tasks_per_s']):.2f}" for r in rows]
  run = json.loads((RESULTS / "scaling_cpu_quick.json").read_text())
  for page, heading in [
    (BENCHMARKS / "README.md", "scaling over devices"),
    (PERFORMANCE_GUIDE, "Throughput of the meta-step"),
  ]:
    text = " ".join(markdown_section(page, heading).split())
    quoted = re.search(r"((?:\d+\.\d\d,? (?:and )?)+)tasks/s in", text) or (
      re.search(r"at ((?:\d+\.\d\d,? (?:and )?)+)tasks/s", text)
    )
    assert quoted, heading
    assert re.findall(r"\d+\.\d\d", quoted[1]) == recorded
    assert ("--quick" in text) == run["quick"]


def expand_braces(text: str) -> list[str]:
  """``a_{b,c}.{d,e}`` as the shell expands it: ``a_b.d``, ``a_b.e``, ..."""
  match = re.search(r"\{([^{}]*)\}", text)
  if match is None:
    return [text]
  return [
    name
    for choice in match[1].split(",")
    for name in expand_braces(
      text[: match.start()] + choice + text[match.end() :]
    )
  ]


def index_stem(script: str, args: list[str], devices: int) -> str | None:
  """The stem of the result files ``benchmarks/<script>`` writes on a CPU
  with ``args`` (None for the scripts this does not know)."""
  tag = args[args.index("--tag") + 1] if "--tag" in args else None
  if script == "step_variants.py":
    return import_benchmark("step_variants").output_name(
      "cpu", devices, "--quick" in args
    )
  defaults = {"compile_time.py": "cpu", "cg_warm_start.py": "cpu"}
  if script in defaults:
    return f"{script[:-3]}_{tag or defaults[script]}"
  if script in ("inner_loop_stall.py", "meta_gradient_omniglot.py"):
    return script[:-3] + (f"_{tag}" if tag else "")
  if script == "curvature.py":
    way = args[args.index("--n-way") + 1] if "--n-way" in args else "5"
    shot = args[args.index("--k-shot") + 1] if "--k-shot" in args else "1"
    return f"curvature_{tag or f'{way}w{shot}s'}"
  return None


def test_readme_index_commands_write_the_files_of_their_row():
  """Each command of ``benchmarks/README.md``'s index that runs a script
  whose file names follow its arguments writes the result files its row
  names, so that running it does not replace another row's files (a
  command with ``...`` elides arguments and is left out)."""
  index = markdown_section(BENCHMARKS / "README.md", "Index")
  checked = 0
  for row in index.splitlines():
    cells = row.split(" | ")
    if not row.startswith("| ") or len(cells) < 3:
      continue
    files = [
      name
      for span in re.findall(r"`([^`]+)`", cells[-1])
      for name in expand_braces(span)
    ]
    for command in re.findall(r"`([^`]*python benchmarks/[^`]*)`", row):
      if "..." in command:
        continue
      words = command.split()
      script = next(w for w in words if w.startswith("benchmarks/"))[11:]
      forced = re.search(r"device_count=(\d+)", command)
      stem = index_stem(
        script,
        words[words.index(f"benchmarks/{script}") + 1 :],
        int(forced[1]) if forced else 1,
      )
      if stem is None:
        continue
      written = [f"{stem}{end}" for end in (".csv", ".json", "_variants.csv")]
      assert any(  # The row's names may be globs (curvature_hf_*.json).
        fnmatch.fnmatchcase(w, name) for w in written for name in files
      ), (command, stem, files)
      checked += 1
  assert checked >= 8


def test_readme_compile_time_commands_measure_the_steps_of_their_files():
  """Each ``compile_time.py`` command of ``benchmarks/README.md``'s index
  names the steps that the result file it writes holds (all of them where
  it names none)."""
  index = markdown_section(BENCHMARKS / "README.md", "Index")
  every = list(import_benchmark("compile_time").STEPS)
  checked = 0
  for command in re.findall(
    r"`([^`]*benchmarks/compile_time\.py[^`]*)`", index
  ):
    words = command.split()
    args = words[words.index("benchmarks/compile_time.py") + 1 :]
    named = []
    if "--steps" in args:
      for word in args[args.index("--steps") + 1 :]:
        if word.startswith("--"):
          break
        named.append(word)
    stem = index_stem("compile_time.py", args, 1)
    record = json.loads((RESULTS / f"{stem}.json").read_text())
    measured = {row["step"] for row in record["rows"]}
    assert set(named or every) == measured, (command, sorted(measured))
    checked += 1
  assert checked == 4


def test_gpu_memory_command_is_the_one_its_result_file_records():
  """The GPU memory command that ``benchmarks/README.md`` and the
  performance guide give measures the inner-step counts of
  ``memory_vs_steps_gpu_h100.json`` under the per-point limit its timed-out
  points name (the script's defaults where the command gives none)."""
  record = json.loads((RESULTS / "memory_vs_steps_gpu_h100.json").read_text())
  steps = sorted({row["inner_steps"] for row in record["rows"]})
  limits = {
    float(re.search(r"after ([\d.]+) s", row["error"])[1])
    for row in record["rows"]
    if row.get("error")
  }
  pages = [BENCHMARKS / "README.md", PERFORMANCE_GUIDE]
  commands = [
    " ".join(command.split())
    for page in pages
    for command in re.findall(
      r"`(python benchmarks/memory_vs_steps\.py --isolate[^`]*)`",
      page.read_text(),
    )
  ]
  assert len(commands) == len(pages), commands
  for command in commands:
    given = re.search(r"--steps((?: \d+)+)", command)
    assert (
      [int(n) for n in given[1].split()] if given else [1, 5, 10, 25, 50, 100]
    ) == steps, command
    limit = re.search(r"--point-timeout ([\d.]+)", command)
    assert {float(limit[1]) if limit else 600.0} == limits, command


def test_readme_marks_each_command_that_needs_a_removed_checkpoint():
  """A command of the index that reads a run directory without a
  checkpoint (``--workdir`` of an evaluation or diagnostic) carries the
  dagger that points to restoring one; one whose run keeps its checkpoint
  does not need it."""
  index = markdown_section(BENCHMARKS / "README.md", "Index")
  checked = 0
  for match in re.finditer(
    r"`([^`]*--workdir (benchmarks/[^\s`]+)[^`]*)`", index
  ):
    command, workdir = match.groups()
    if "imaml-train" in command:
      continue  # --workdir is the run it writes.
    kept = any((BENCHMARKS.parent / workdir / "checkpoints").glob("*.ckpt"))
    after = index[match.end() :]
    marked = re.match(r"\s*(\([^)]*\))?\s*†", after) is not None
    assert marked != kept, (command, "checkpoint kept" if kept else "none")
    checked += 1
  assert checked >= 5


def test_test_time_lam_figures_are_the_runs_evaluations():
  """The implicit-gradients guide's test-time lam figures are those of the
  5-way 1-shot run: its own test and ``imaml-eval --set lam=...``."""
  run = BENCHMARKS / "runs" / "omniglot_5w1s_imaml_gd"

  def accuracy(name: str) -> str:
    record = json.loads((run / name).read_text())
    return f"{100 * record['test']['accuracy_after']['mean']:.2f}%"

  text = " ".join(
    markdown_section(
      PERFORMANCE_GUIDE.with_name("implicit_gradients.md"), "Choosing lam"
    ).split()
  )
  quoted = re.search(
    r"\(lam 8: ([\d.%-]+) against ([\d.]+%) as trained; lam 0\.5: ([\d.]+%)",
    text,
  )
  assert quoted
  assert quoted.groups() == (
    accuracy("eval_lam=8.json"),
    accuracy("results.json"),
    accuracy("eval_lam=0.5.json"),
  )


def test_twenty_way_gpu_step_rates_span_the_cells_that_finished():
  """The performance guide's range of 20-way 1-shot step rates on the H200
  runs from the slowest to the fastest cell that trained its 2,000 steps
  (the runs' ``results.json``)."""
  rates = {}
  for run in (BENCHMARKS / "runs").glob("omniglot_20w1s_*"):
    path = run / "results.json"
    if path.exists():
      budget = json.loads(path.read_text())["budget"]
      if budget["meta_steps"] == 2000 and "H200" in budget["device"]:
        rates[run.name] = budget["steps_per_s"]
  row = next(
    line
    for line in PERFORMANCE_GUIDE.read_text().splitlines()
    if line.startswith("| Omniglot 20-way 1-shot, Table 2 GPU cells")
  )
  low, high = re.search(r"([\d.]+) \([^)]*\) to ([\d.]+) \(", row).groups()
  assert (low, high) == (
    f"{min(rates.values()):.2f}",
    f"{max(rates.values()):.2f}",
  )


def test_five_way_cpu_wall_times_span_the_table_cells():
  """The performance guide's wall times of the 5-way 1-shot CPU cells run
  from the fastest cell to the slowest but iMAML-HF, which it quotes
  apart (the runs' ``results.json``, hours to 0.01)."""
  hours = {
    run.name: json.loads((run / "results.json").read_text())["budget"][
      "wall_time_s"
    ]
    / 3600
    for run in (BENCHMARKS / "runs").glob("omniglot_5w1s_*")
    if (run / "results.json").exists()
  }
  row = next(
    line
    for line in PERFORMANCE_GUIDE.read_text().splitlines()
    if line.startswith("| Omniglot 5-way 1-shot, Table 2 CPU cells")
  )
  low, high, hf = re.search(
    r"([\d.]+) h \([^)]*\) to ([\d.]+) h \(.*\) and ([\d.]+) h \(iMAML-HF",
    row,
  ).groups()
  hf_run = hours.pop("omniglot_5w1s_imaml_hf")
  assert (low, high, hf) == (
    f"{min(hours.values()):.2f}",
    f"{max(hours.values()):.2f}",
    f"{hf_run:.2f}",
  )


def test_cg_warm_start_quick(tmp_path):
  """The linear-regression part: at equal Hessian-vector products, CG from
  ``x0 = b`` (the default) solves at least as well as CG from zero."""
  run_script("cg_warm_start.py", "--quick", "--out", str(tmp_path))
  result = json.loads((tmp_path / "cg_warm_start_quick.json").read_text())
  assert set(result["results"]) == {"linreg_lam0.5", "linreg_lam2"}
  for problem in result["results"].values():
    for products, runs in problem.items():
      assert runs["warm"][0] <= runs["zero"][0], products  # residual
      assert runs["warm"][1] <= runs["zero"][1], products  # error
  assert (tmp_path / "cg_warm_start_quick.md").stat().st_size > 0


def test_every_quick_form_is_run_by_a_test():
  """``benchmarks/README.md``: the tests run every ``--quick`` form."""
  tests = Path(__file__).read_text()
  run = {args[0] for args in QUICK_RUNS.values() if "--quick" in args}
  run |= set(re.findall(r'run_script\(\s*"(\w+\.py)",\s*"--quick"', tests))
  scripts = {
    p.name for p in BENCHMARKS.glob("*.py") if '"--quick"' in p.read_text()
  }
  assert scripts <= run, sorted(scripts - run)


def test_sinusoid_lam2_figures_are_their_result_file():
  """The guides' MSE at lam 2 and lam 30 (main job, one core), quoted before
  they cite sinusoid_lam2_cpu.md, are the test results it records, in its
  order (lam 2 first)."""
  record = (RESULTS / "sinusoid_lam2_cpu.md").read_text()
  after = [
    f"{float(m):.2f} ± {float(c):.2f}"
    for m, c in re.findall(r"loss_after: ([\d.]+) \+- ([\d.]+)", record)
  ]
  assert len(after) == 2, after
  guides = BENCHMARKS.parent / "docs" / "guides"
  for page in ("getting_started.md", "implicit_gradients.md"):
    text = " ".join((guides / page).read_text().split())
    cited = text.index("sinusoid_lam2_cpu.md")
    quoted = re.findall(r"(\d+\.\d+ ± \d+\.\d+)", text[cited - 300 : cited])
    assert quoted == after, (page, quoted, after)


def test_sinusoid_maml_figure_is_its_result_file():
  """The getting-started guide's MSE for ``sinusoid_maml``, quoted before it
  cites sinusoid_maml_cpu.md, is the test result that file's output shows,
  and the file's table repeats it."""
  record = (RESULTS / "sinusoid_maml_cpu.md").read_text()
  (after,) = [
    f"{m} ± {c}"
    for m, c in re.findall(r"loss_after: ([\d.]+) \+- ([\d.]+)", record)
  ]
  assert f"| `sinusoid_maml` | 2.968 ± 0.239 | {after} |" in record
  page = BENCHMARKS.parent / "docs" / "guides" / "getting_started.md"
  text = " ".join(page.read_text().split())
  cited = text.index("sinusoid_maml_cpu.md")
  quoted = re.findall(r"(\d+\.\d+ ± \d+\.\d+)", text[cited - 200 : cited])
  assert quoted == [after], quoted


def test_sinusoid_fits_panels_are_their_result_file():
  """The panels of the main job's ``fits.png`` that the getting-started
  guide reads out are those sinusoid_main_job_seeds_cpu.md records."""
  panel = r"\d+\.\d+ -> \d+\.\d+"
  record = " ".join(
    (RESULTS / "sinusoid_main_job_seeds_cpu.md").read_text().split()
  )
  recorded = re.findall(panel, record[record.index("`fits.png`") :])
  assert len(recorded) == 4, recorded
  guide = " ".join(
    (BENCHMARKS.parent / "docs" / "guides" / "getting_started.md")
    .read_text()
    .split()
  )
  start = guide.index("the four panels read")
  end = guide.index("sinusoid_main_job_seeds_cpu.md", start)
  quoted = re.findall(panel, guide[start:end])
  assert quoted == recorded


def test_quick_start_timings_are_their_result_file():
  """The getting-started guide's install and run times, training time,
  meta-steps/s and compile time of the main job (the empty-cache run) are
  those quick_start_cpu.md records, and the file's output ends with the
  README's test."""
  record = (RESULTS / "quick_start_cpu.md").read_text()
  install = re.search(r"pip install -e \.\s+# ([\d.]+) s", record)[1]
  row = re.search(
    r"\| empty \| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+) \|",
    record,
  )
  command, compile_s, train_s, rate = row.groups()
  page = BENCHMARKS.parent / "docs" / "guides" / "getting_started.md"
  text = " ".join(page.read_text().split())
  cited = text.index("quick_start_cpu.md")
  quoted = text[cited - 400 : cited]
  assert f"took {float(install):.0f} s and the run {command} s" in quoted
  assert f"({train_s} s of training, {rate} meta-steps/s; {compile_s} s" in (
    quoted
  )
  readme = (BENCHMARKS.parent / "README.md").read_text()
  for line in ("loss_after: 0.371 +- 0.045", "loss_before: 3.350 +- 0.235"):
    assert line in record and line in readme
