"""Tests of data-parallel meta-steps over a device mesh.

The multi-device tests run in a subprocess with 8 forced host CPU devices
(``XLA_FLAGS`` must be set before jax is imported, and this process already
imported it). The subprocess writes its results to an ``.npz`` file that the
tests compare. A slow test runs two processes with two CPU devices each,
joined by ``initialize_distributed`` (gloo collectives), as two hosts would.
Both start in the background with the test session (``BACKGROUND_JOBS``,
``conftest._background``).
"""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import fast_compile
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import two_hosts
from jaxlib import version as jaxlib_version

import imaml_jax as im
from imaml_jax import data
from imaml_jax._src import sharding as sh

N_DEVICES = 8

# iMAML meta-steps (sinusoid regression, the MLP of imaml_jax.models, Adam)
# on 1, 2, 4 and 8 devices and unsharded; a checkpoint written
# from the 8-device run after STEPS steps resumes on 8, 2 and 1 devices.
_SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = sys.argv[2]
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax, jax.numpy as jnp, numpy as np, optax
  import imaml_jax as im
  from imaml_jax import data, models
  from imaml_jax._src import sharding as sh
  from imaml_jax.train import checkpoint as ckpt

  out_dir = sys.argv[1]
  assert jax.device_count() == 8, jax.devices()
  # CG from zero: on these systems, far from converged (residuals up to 4),
  # the warm start's trajectory over several Adam steps amplifies the
  # rounding of the summation order beyond the tolerances below, although
  # its first meta-gradients agree to 1e-7 on any device count. Where the
  # iterations start is no part of what sharding has to preserve.
  CG = im.cg(3, warm_start=False)
  STEPS, N_TASKS = 3, 8
  net = models.MLP(hidden=(16, 16), out=1)
  loss = models.regression_loss(net)
  init, step = im.make_meta_step(
      loss, optax.adam(1e-2), im.imaml(2.0, im.gd(3, 0.05), CG),
      has_aux=True)
  params = models.init_params(net, jax.random.key(0), jnp.zeros((5, 1)))
  keys = jax.random.split(jax.random.key(2), 2 * STEPS)
  batches = [data.sinusoid_tasks(k, N_TASKS, 5, 5) for k in keys]
  results = {}

  def run(fn, state, tasks_list, place):
    for tasks in tasks_list:
      state, metrics = fn(state, place(tasks))
    return state, metrics

  def record(name, state, metrics):
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    for path, leaf in flat:
      results[name + "/state" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    results[name + "/loss_after"] = np.asarray(metrics["loss_after"])

  state, metrics = run(jax.jit(step), init(params), batches[:STEPS],
                       lambda t: t)
  record("unsharded", state, metrics)
  state, metrics = run(jax.jit(step), state, batches[STEPS:], lambda t: t)
  record("unsharded_resumed", state, metrics)

  steps = {}
  for n in (1, 2, 4, 8):
    mesh = sh.task_mesh(n)
    steps[n] = (mesh, sh.shard_meta_step(step, mesh))
    state, metrics = run(steps[n][1], sh.replicate(init(params), mesh),
                         batches[:STEPS], lambda t: sh.shard_tasks(t, mesh))
    assert state.params["dense2"]["kernel"].sharding.is_fully_replicated
    assert len(state.params["dense2"]["kernel"].sharding.device_set) == n
    assert list(mesh.devices.flat) == jax.devices()[:n]  # the first n
    record(f"devices_{n}", state, metrics)
    if n == 8:
      path = ckpt.save(out_dir, STEPS, {"state": state})

  # Per device under shard_map, one task at a time on each device, for iMAML
  # and for MAML (which differentiates through the inner loop).
  for name, algorithm in [("imaml", im.imaml(2.0, im.gd(3, 0.05), CG)),
                          ("maml", im.maml(im.gd(3, 0.05)))]:
    kwargs = dict(has_aux=True, per_task_metrics=True)
    init_a, plain = im.make_meta_step(loss, optax.adam(1e-2), algorithm,
                                      **kwargs)
    _, per_device = im.make_meta_step(loss, optax.adam(1e-2), algorithm,
                                      task_chunk=1, axis_name="tasks",
                                      **kwargs)
    state, metrics = run(jax.jit(plain), init_a(params), batches[:STEPS],
                         lambda t: t)
    record(f"{name}_unsharded", state, metrics)
    results[f"{name}_unsharded/per_task"] = np.asarray(
        metrics["per_task"]["loss_after"])
    for n in (2, 8):
      mesh = sh.task_mesh(n)
      fn = sh.shard_meta_step(per_device, mesh, per_device=True)
      state, metrics = run(fn, sh.replicate(init_a(params), mesh),
                           batches[:STEPS], lambda t: sh.shard_tasks(t, mesh))
      assert state.params["dense2"]["kernel"].sharding.is_fully_replicated
      record(f"{name}_per_device_{n}", state, metrics)
      results[f"{name}_per_device_{n}/per_task"] = np.asarray(
          metrics["per_task"]["loss_after"])

  # A stochastic loss (dropout on the hidden layer): per-task keys from the
  # step's key, the same on 1, 2 and 8 devices and in chunks of one task.
  def dropout_loss(p, batch, key):
    x, y = batch
    hidden = jax.nn.relu(x @ p["w1"])
    mask = jax.random.bernoulli(key, 0.5, hidden.shape)
    pred = (jnp.where(mask, hidden, 0.0) * 2.0) @ p["w2"]
    return jnp.mean((pred - y) ** 2), {"mask": jnp.sum(mask * jnp.arange(
        mask.size).reshape(mask.shape))}
  d_params = {"w1": jax.random.normal(jax.random.key(5), (1, 16)),
              "w2": jax.random.normal(jax.random.key(6), (16, 1)) / 4}
  d_alg = im.imaml(2.0, im.gd(3, 0.05), CG)
  d_kwargs = dict(has_aux=True, per_task_metrics=True, stochastic=True)
  d_init, d_plain = im.make_meta_step(dropout_loss, optax.adam(1e-2), d_alg,
                                      **d_kwargs)
  _, d_device = im.make_meta_step(dropout_loss, optax.adam(1e-2), d_alg,
                                  task_chunk=1, axis_name="tasks", **d_kwargs)
  d_key = jax.random.key(7)
  state, metrics = jax.jit(d_plain)(d_init(d_params), batches[0], d_key)
  results["dropout_unsharded/mask"] = np.asarray(
      metrics["per_task"]["mask_after"])
  results["dropout_unsharded/w1"] = np.asarray(state.params["w1"])
  for n in (1, 2, 8):
    mesh = sh.task_mesh(n)
    fn = sh.shard_meta_step(d_device, mesh, per_device=True)
    state, metrics = fn(sh.replicate(d_init(d_params), mesh),
                        sh.shard_tasks(batches[0], mesh), d_key)
    results[f"dropout_per_device_{n}/mask"] = np.asarray(
        metrics["per_task"]["mask_after"])
    results[f"dropout_per_device_{n}/w1"] = np.asarray(state.params["w1"])

  _, restored = ckpt.load(path)
  template = {"state": jax.device_get(init(params))}
  for n in (8, 2, 1):
    mesh, fn = steps[n]
    state = sh.replicate(ckpt.restore_into(template, restored)["state"], mesh)
    state, metrics = run(fn, state, batches[STEPS:],
                         lambda t: sh.shard_tasks(t, mesh))
    record(f"resumed_on_{n}", state, metrics)

  # The sharded sampler draws the same tasks, with no collectives.
  mesh8 = steps[8][0]
  images = jax.random.randint(jax.random.key(1), (12, 4, 6, 6, 1), 0, 256
                              ).astype(jnp.uint8)
  sample = data.make_sharded_sampler(mesh8, 3, 1, 2, N_TASKS)
  on_device = sample(keys[0], sh.replicate(images, mesh8))
  episodes = data.sample_tasks(keys[0], images, 3, 1, 2, N_TASKS)
  for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(episodes)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding.spec == jax.sharding.PartitionSpec("tasks")
    assert len(a.addressable_shards) == 8
    assert a.addressable_shards[0].data.shape[0] == 1
  hlo = sample.lower(keys[0], sh.replicate(images, mesh8)).compile().as_text()
  results["sampler_collectives"] = np.array(sum(
      hlo.count(op) for op in ("all-gather", "all-reduce", "all-to-all",
                               "collective-permute")))
  lowered = steps[8][1].lower(sh.replicate(init(params), mesh8),
                              sh.shard_tasks(batches[0], mesh8))
  hlo = lowered.compile().as_text()
  results["step_all_gathers"] = np.array(hlo.count("all-gather"))

  # A meta-batch that does not divide the device count.
  try:
    steps[8][1](state, jax.tree.map(lambda x: x[:6], batches[0]))
  except ValueError as e:
    results["uneven_error"] = np.array(str(e))
  np.savez(os.path.join(out_dir, "results.npz"), **results)
""")


# One of two processes with two CPU devices each, joined by
# initialize_distributed: a 4-device mesh across processes.
_WORKER = textwrap.dedent("""
  import os, sys
  os.environ["JAX_PLATFORMS"] = "cpu"   # XLA_FLAGS: 2 devices, from the parent
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from imaml_jax._src import sharding as sh
  pid, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  sh.initialize_distributed(f"localhost:{port}", 2, pid)
  import jax.numpy as jnp, numpy as np, optax
  import imaml_jax as im
  from imaml_jax import data
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  init, step = im.make_meta_step(loss, optax.sgd(0.1),
                                 im.imaml(2.0, im.gd(5, 0.1), im.cg(3)))
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(8, 6, 3)), rng.normal(size=(8, 6))
  tasks = im.Task((x, y), (x, y))
  mesh = sh.task_mesh()
  sharded_step = sh.shard_meta_step(step, mesh)
  theta = np.linspace(-1.0, 1.0, 3).astype(np.float32)
  state = sh.replicate(init(theta), mesh)
  from_global, _ = sharded_step(state, sh.shard_tasks(tasks, mesh))
  local = jax.tree.map(lambda a: a[4 * pid:4 * pid + 4], tasks)
  from_local, _ = sharded_step(state,
                               sh.tasks_from_process_local_data(local, mesh))
  images = rng.integers(0, 256, (10, 4, 5, 5, 1), dtype=np.uint8)
  sample = data.make_sharded_sampler(mesh, 3, 1, 2, 8)
  key = jax.random.key(3)
  sampled = sample(sh.replicate(key, mesh), sh.replicate(images, mesh))
  want = data.sample_tasks(key, images, 3, 1, 2, 8)
  for a, b in zip(jax.tree.leaves(sampled), jax.tree.leaves(want)):
    assert len(a.addressable_shards) == 2
    for shard in a.addressable_shards:
      np.testing.assert_array_equal(shard.data, np.asarray(b)[shard.index])
  # task_mesh(N) deals its N devices over the processes: two gives each
  # process one, three gives process 0 two and process 1 one.
  meshes = {n: sh.task_mesh(n) for n in (2, 3)}
  holders = {n: [d.process_index for d in m.devices.flat]
             for n, m in meshes.items()}
  try:
    sh.task_mesh(1)
    too_few = ""
  except ValueError as e:
    too_few = str(e)
  # Unequal shares: 4 tasks from process 0 (two devices), 2 from process 1.
  mesh3 = meshes[3]
  step3 = sh.shard_meta_step(step, mesh3)
  state3 = sh.replicate(init(theta), mesh3)
  six = jax.tree.map(lambda a: a[:6], tasks)
  own = jax.tree.map(lambda a: a[:4] if pid == 0 else a[4:6], six)
  uneven, _ = step3(state3, sh.tasks_from_process_local_data(own, mesh3))
  uneven_global, _ = step3(state3, sh.shard_tasks(six, mesh3))
  try:
    bad = jax.tree.map(lambda a: a[:3], tasks)
    sh.tasks_from_process_local_data(bad, mesh3) if pid == 0 else None
    odd_share = ""
  except ValueError as e:
    odd_share = str(e)
  two, _ = sh.shard_meta_step(step, meshes[2])(
      sh.replicate(init(theta), meshes[2]), sh.shard_tasks(tasks, meshes[2]))
  np.savez(os.path.join(out_dir, f"process_{pid}.npz"),
           theta=theta, x=x, y=y,
           from_global=from_global.params.addressable_data(0),
           from_local=from_local.params.addressable_data(0),
           on_two=two.params.addressable_data(0),
           uneven=uneven.params.addressable_data(0),
           uneven_global=uneven_global.params.addressable_data(0),
           holders_2=holders[2], holders_3=holders[3],
           too_few=too_few, odd_share=odd_share)
""")


def _run_two_processes(out: pathlib.Path) -> list[dict]:
  """Background job: the two processes' results (``.npz`` contents)."""
  two_hosts.run(_WORKER, lambda pid: [out], timeout=300)
  return [dict(np.load(out / f"process_{pid}.npz")) for pid in (0, 1)]


def _run_multi_device(out: pathlib.Path) -> dict:
  """Background job: the 8-device script's results, as a dict."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  # Its results are compared with each other only, so it may compile fast.
  xla_flags = fast_compile.flags("--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT, str(out), xla_flags],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with np.load(out / "results.npz") as f:
    return dict(f)


# Started with the test session (conftest._background).
BACKGROUND_JOBS = {
  "two_processes": _run_two_processes,
  "multi_device": _run_multi_device,
}


@pytest.mark.slow
def test_two_processes_match_one(background):
  """initialize_distributed + a mesh over two processes' devices."""
  results = background("two_processes")
  r = results[0]
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  init, step = im.make_meta_step(
    loss, optax.sgd(0.1), im.imaml(2.0, im.gd(5, 0.1), im.cg(3))
  )
  tasks = im.Task((r["x"], r["y"]), (r["x"], r["y"]))
  want = jax.jit(step)(init(jnp.asarray(r["theta"])), tasks)[0].params
  assert not np.allclose(want, r["theta"])
  for result in results:
    np.testing.assert_allclose(result["from_global"], want, rtol=1e-5)
    np.testing.assert_allclose(result["from_local"], want, rtol=1e-5)
    np.testing.assert_allclose(result["on_two"], want, rtol=1e-5)


@pytest.mark.slow
def test_task_mesh_deals_devices_over_processes(background):
  """task_mesh(N) with two processes: every process holds a device (the
  first N of all would all be process 0's, and process 1 could not take
  part); fewer devices than processes is refused."""
  results = background("two_processes")
  for result in results:
    assert result["holders_2"].tolist() == [0, 1]
    assert result["holders_3"].tolist() == [0, 0, 1]
    assert "every process needs at least one" in str(result["too_few"])


@pytest.mark.slow
def test_process_local_data_in_unequal_shares(background):
  """Process 0 holds two of the mesh's three devices and passes 4 of the 6
  tasks, process 1 passes 2: the same step as the global batch."""
  results = background("two_processes")
  r = results[0]
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  init, step = im.make_meta_step(
    loss, optax.sgd(0.1), im.imaml(2.0, im.gd(5, 0.1), im.cg(3))
  )
  six = im.Task((r["x"][:6], r["y"][:6]), (r["x"][:6], r["y"][:6]))
  want = jax.jit(step)(init(jnp.asarray(r["theta"])), six)[0].params
  for result in results:
    np.testing.assert_allclose(result["uneven"], want, rtol=1e-5)
    np.testing.assert_allclose(result["uneven_global"], want, rtol=1e-5)
  assert "passed 3 tasks for its 2 of the mesh's 3" in str(
    results[0]["odd_share"]
  )


@pytest.fixture(scope="module")
def multi_device(background):
  """The 8-device script's results (run in the background)."""
  return background("multi_device")


def _state(results, name):
  prefix = name + "/state"
  return {
    k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)
  }


def _assert_same_state(results, name, reference):
  got, want = _state(results, name), _state(results, reference)
  assert got.keys() == want.keys() and got
  # float32 sums over tasks in another order on every device count; after
  # six Adam steps that moves the state by up to a few 1e-5 (2.3e-5 measured
  # on Adam's first moment of a bias, with jax.scipy's CG in the step).
  for key in want:
    np.testing.assert_allclose(
      got[key],
      want[key],
      rtol=1e-4,
      atol=5e-5,
      err_msg=f"{name} vs {reference}: {key}",
    )
  np.testing.assert_allclose(
    results[name + "/loss_after"], results[reference + "/loss_after"], rtol=1e-5
  )


@pytest.mark.parametrize("n_devices", [1, 2, 4, 8])
def test_sharded_step_matches_unsharded_step(multi_device, n_devices):
  _assert_same_state(multi_device, f"devices_{n_devices}", "unsharded")
  assert int(multi_device[f"devices_{n_devices}/state.step"]) == 3


@pytest.mark.parametrize("algorithm", ["imaml", "maml"])
@pytest.mark.parametrize("n_devices", [2, 8])
def test_per_device_step_matches_unsharded_step(
  multi_device, algorithm, n_devices
):
  """shard_meta_step(per_device=True), each device mapping over its tasks."""
  name = f"{algorithm}_per_device_{n_devices}"
  _assert_same_state(multi_device, name, f"{algorithm}_unsharded")
  # Per-task metrics come back gathered, in task order.
  np.testing.assert_allclose(
    multi_device[name + "/per_task"],
    multi_device[f"{algorithm}_unsharded/per_task"],
    rtol=1e-5,
  )
  assert multi_device[name + "/per_task"].shape == (8,)


@pytest.mark.parametrize("n_devices", [1, 2, 8])
def test_stochastic_loss_gets_the_same_task_keys_on_any_device_count(
  multi_device, n_devices
):
  """Dropout masks per task: distinct, and independent of the device count."""
  masks = multi_device["dropout_unsharded/mask"]
  assert len(set(masks.tolist())) == len(masks)  # every task its own mask
  name = f"dropout_per_device_{n_devices}"
  np.testing.assert_array_equal(multi_device[name + "/mask"], masks)
  np.testing.assert_allclose(
    multi_device[name + "/w1"],
    multi_device["dropout_unsharded/w1"],
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize("n_devices", [8, 2, 1])
def test_checkpoint_from_8_devices_resumes_on_other_counts(
  multi_device, n_devices
):
  _assert_same_state(
    multi_device, f"resumed_on_{n_devices}", "unsharded_resumed"
  )
  _assert_same_state(multi_device, f"resumed_on_{n_devices}", "resumed_on_8")
  assert int(multi_device[f"resumed_on_{n_devices}/state.step"]) == 6


def test_sharded_sampler_and_step_move_no_task_data(multi_device):
  assert int(multi_device["sampler_collectives"]) == 0
  assert int(multi_device["step_all_gathers"]) == 0


def test_uneven_meta_batch_names_both_numbers(multi_device):
  message = str(multi_device["uneven_error"])
  assert "6 tasks" in message and "8 devices" in message


# Single-device tests in this process.


def _regression_step():
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  return im.make_meta_step(
    loss, optax.adam(1e-2), im.imaml(2.0, im.gd(5, 0.1), im.cg(3))
  )


def _regression_tasks(n, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, 6, 3))
  y = jax.random.normal(ky, (n, 6))
  return im.Task((x, y), (x, y))


def test_one_device_mesh_matches_jit():
  init, step = _regression_step()
  mesh = sh.task_mesh(1)
  tasks = _regression_tasks(4)
  want, want_metrics = jax.jit(step)(init(jnp.ones(3)), tasks)
  got, got_metrics = sh.shard_meta_step(step, mesh)(
    sh.replicate(init(jnp.ones(3)), mesh), sh.shard_tasks(tasks, mesh)
  )
  np.testing.assert_allclose(got.params, want.params, rtol=1e-6)
  np.testing.assert_allclose(
    got_metrics["loss_after"], want_metrics["loss_after"], rtol=1e-6
  )
  assert got.params.sharding == sh.replicated_sharding(mesh)


def test_lower_compiles_ahead_of_time():
  init, step = _regression_step()
  mesh = sh.task_mesh()
  sharded = sh.shard_meta_step(step, mesh, donate_state=True)
  state = sh.replicate(init(jnp.ones(3)), mesh)
  tasks = sh.shard_tasks(_regression_tasks(mesh.size), mesh)
  compiled = sharded.lower(state, tasks).compile()
  new_state, _ = compiled(state, tasks)
  assert int(new_state.step) == 1


@pytest.mark.parametrize("donate", [True, False])
def test_donate_state_gives_the_input_buffers_to_the_output(donate):
  init, step = _regression_step()
  mesh = sh.task_mesh()
  sharded = sh.shard_meta_step(step, mesh, donate_state=donate)
  state = sh.replicate(init(jnp.ones(3)), mesh)
  new_state, _ = sharded(state, sh.shard_tasks(_regression_tasks(4), mesh))
  assert int(new_state.step) == 1
  assert state.params.is_deleted() == donate
  assert state.opt_state[0].mu.is_deleted() == donate


def test_task_mesh_arguments():
  assert sh.task_mesh().shape == {"tasks": jax.device_count()}
  assert sh.task_mesh(1, axis="batch").axis_names == ("batch",)
  assert sh.task_mesh(jax.devices()[:1]).size == 1
  with pytest.raises(ValueError, match="asked for 1000 devices"):
    sh.task_mesh(1000)
  with pytest.raises(ValueError, match="asked for 0 devices"):
    sh.task_mesh(0)
  with pytest.raises(ValueError, match="at least one device"):
    sh.task_mesh([])
  with pytest.raises(TypeError, match="a device count or a sequence"):
    sh.task_mesh(True)


def test_unknown_axis_is_named():
  with pytest.raises(ValueError, match="no axis named 'batch'"):
    sh.task_sharding(sh.task_mesh(), "batch")


def test_check_divisible_message():
  sh.check_divisible(5, sh.task_mesh(1))
  mesh = jax.sharding.AbstractMesh((4,), ("tasks",))
  sh.check_divisible(12, mesh)
  with pytest.raises(ValueError, match="10 tasks .* over 4 devices"):
    sh.check_divisible(10, mesh)


def test_shard_meta_step_rejects_non_tasks():
  _, step = _regression_step()
  with pytest.raises(TypeError, match="im.Task"):
    sh.shard_meta_step(step, sh.task_mesh())(None, (1, 2))


@pytest.mark.parametrize("per_device", [False, True])
def test_sharded_step_refuses_a_second_key(per_device):
  init, step = im.make_meta_step(
    lambda w, b, key: jnp.mean((b[0] @ w - b[1]) ** 2),
    optax.sgd(0.1),
    im.imaml(2.0, im.gd(2, 0.1), im.cg(2)),
    stochastic=True,
    task_chunk=1 if per_device else None,
    axis_name=sh.TASK_AXIS if per_device else None,
  )
  sharded = sh.shard_meta_step(step, sh.task_mesh(), per_device=per_device)
  key = jax.random.key(0)
  tasks = _regression_tasks(jax.device_count())
  with pytest.raises(TypeError, match="or \\(state, tasks, key\\); got 4"):
    sharded(init(jnp.ones(3)), tasks, key, key)
  with pytest.raises(TypeError, match="got 4 arguments"):
    sharded.lower(init(jnp.ones(3)), tasks, key, key)
  assert int(sharded(init(jnp.ones(3)), tasks, key)[0].step) == 1


def test_per_device_needs_a_step_that_averages_over_the_axis():
  _, step = _regression_step()  # built without axis_name
  with pytest.raises(ValueError, match="axis_name='tasks'"):
    sh.shard_meta_step(step, sh.task_mesh(), per_device=True)


def test_sharded_sampler_equals_sample_tasks_on_one_device():
  mesh = sh.task_mesh(1)
  images = jax.random.randint(
    jax.random.key(1), (10, 5, 4, 4, 1), 0, 256
  ).astype(jnp.uint8)
  sample = data.make_sharded_sampler(mesh, 3, 2, 1, 4)
  got = sample(jax.random.key(7), sh.replicate(images, mesh))
  want = data.sample_tasks(jax.random.key(7), images, 3, 2, 1, 4)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_sampler_rejects_bad_counts():
  with pytest.raises(ValueError, match="n_tasks must be positive"):
    data.make_sharded_sampler(sh.task_mesh(), 5, 1, 1, 0)
  with pytest.raises(ValueError, match="k_shot must be a Python int"):
    data.make_sharded_sampler(sh.task_mesh(), 5, 1.0, 1, 4)
  with pytest.raises(ValueError, match="3 tasks .* over 2 devices"):
    data.make_sharded_sampler(
      jax.sharding.AbstractMesh((2,), ("tasks",)), 5, 1, 1, 3
    )


def test_top_level_sampler_name_is_the_data_one():
  assert im.make_sharded_sampler is data.make_sharded_sampler


def _imported_modules(path):
  """Every module a source file imports, at any depth of its code."""
  tree = ast.parse(path.read_text(), filename=str(path))
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the package imaml_jax._src
        package = "imaml_jax._src".rsplit(".", node.level - 1)[0]
        base = f"{package}.{node.module}" if node.module else package
      else:
        base = node.module
      names += [base] + [f"{base}.{alias.name}" for alias in node.names]
  return names


def test_core_imports_nothing_above_it():
  src = pathlib.Path(sh.__file__).parent
  files = sorted(src.glob("*.py"))
  assert len(files) > 5 and src / "sharding.py" in files
  upper = ("imaml_jax.data", "imaml_jax.models", "imaml_jax.train")
  for path in files:
    for name in _imported_modules(path):
      assert not (name.startswith(upper) or name == "imaml_jax"), (
        f"{path.name} imports {name}"
      )


def test_replicate_keeps_prng_keys_and_structure():
  mesh = sh.task_mesh()
  tree = {"key": jax.random.key(3), "w": np.arange(3.0)}
  out = sh.replicate(tree, mesh)
  assert jax.random.key_impl(out["key"]) == jax.random.key_impl(tree["key"])
  np.testing.assert_array_equal(
    jax.random.key_data(out["key"]), jax.random.key_data(tree["key"])
  )
  assert out["w"].sharding.is_fully_replicated


def test_tasks_from_process_local_data_single_process():
  mesh = sh.task_mesh()
  tasks = _regression_tasks(mesh.size)
  got = sh.tasks_from_process_local_data(tasks, mesh)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tasks)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding.spec == jax.sharding.PartitionSpec("tasks")


def test_constrain_tasks_inside_jit():
  mesh = sh.task_mesh()
  fn = jax.jit(lambda t: sh.constrain_tasks(t, mesh))
  tasks = _regression_tasks(mesh.size)
  out = fn(tasks)
  assert out.support[0].sharding.is_equivalent_to(sh.task_sharding(mesh), 3)
  np.testing.assert_array_equal(out.support[0], tasks.support[0])


def test_initialize_distributed_validates_arguments():
  with pytest.raises(ValueError, match="give all of"):
    sh.initialize_distributed("localhost:1234")
  with pytest.raises(ValueError, match="process_id must be in 0..1"):
    sh.initialize_distributed("localhost:1234", 2, 2)
  # One process: nothing to join, nothing initialised.
  sh.initialize_distributed("localhost:1234", 1, 0)
  assert jax.process_count() == 1


_CORES_SCRIPT = r"""
import os
import imaml_jax as im
from imaml_jax.train import config, runtime
assert im.use_cpu_cores(2) == 2
assert runtime.split_cpu(config.get_config("omniglot_5w1s_imaml_gd")) is None
import jax
assert [d.platform for d in jax.devices("cpu")] == ["cpu", "cpu"]
assert im.use_cpu_cores(2) == 2   # The same count again is fine.
try:
  im.use_cpu_cores(3)
except RuntimeError as e:
  assert "before JAX starts" in str(e), e
else:
  raise AssertionError("no error once the backend runs")
print("ok")
"""

_DEFAULT_SPLIT_SCRIPT = r"""
import os
from imaml_jax.train import config, runtime
from imaml_jax._src import sharding
cfg = config.get_config("omniglot_5w1s_imaml_gd")
n = runtime.split_cpu(cfg)
import jax
cores = sharding.available_cores()
assert n == runtime.cpu_device_count(32, cores) == len(jax.devices("cpu"))
flag = f"{sharding.CPU_COLLECTIVE_TIMEOUT_FLAG}={sharding.CPU_COLLECTIVE_TIMEOUT_S}"
from jaxlib import version
patient = n > 1 and version.__version_info__ >= (0, 8, 0)
assert (flag in os.environ.get("XLA_FLAGS", "")) == patient, os.environ
print("ok", n)
"""


def test_use_cpu_cores_splits_the_cpu_before_jax_starts():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  for script in (_CORES_SCRIPT, _DEFAULT_SPLIT_SCRIPT):
    proc = subprocess.run(
      [sys.executable, "-c", script],
      env=env,
      capture_output=True,
      text=True,
      check=False,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
  # A count the user set through XLA_FLAGS is kept.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      (
        "import os\n"
        "from imaml_jax.train import config, runtime\n"
        "assert runtime.split_cpu(config.get_config('sinusoid')) is None\n"
        "import jax; print(len(jax.devices()), os.environ['XLA_FLAGS'])"
      ),
    ],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  words = proc.stdout.split()
  assert words[:2] == ["3", env["XLA_FLAGS"]], proc.stderr[-2000:]
  # The devices the user asked for also wait for each other (jaxlib >= 0.8).
  if jaxlib_version.__version_info__ >= (0, 8, 0):
    flag = f"{sh.CPU_COLLECTIVE_TIMEOUT_FLAG}={sh.CPU_COLLECTIVE_TIMEOUT_S}"
    assert words[2:] == [flag], words


# One of two CPU devices reaches the all-reduce `sleep` seconds late (a host
# callback sleeps on device 0 only). argv: collective_timeout_s ("default"
# for use_cpu_cores' own) and the delay in seconds.
_LATE_DEVICE_SCRIPT = r"""
import os, sys, time
import imaml_jax as im
timeout, delay = sys.argv[1], float(sys.argv[2])
kwargs = {} if timeout == "default" else {"collective_timeout_s": int(timeout)}
assert im.use_cpu_cores(2, **kwargs) == 2
print("XLA_FLAGS", os.environ.get("XLA_FLAGS"), flush=True)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P

def late(x):
  time.sleep(delay)
  return x

def total(x):
  x = jax.lax.cond(jax.lax.axis_index("t") == 0,
                   lambda y: jax.pure_callback(late, y, y), lambda y: y, x)
  return jax.lax.psum(x, "t")

mesh = Mesh(np.array(jax.devices()), ("t",))
f = jax.jit(jax.shard_map(total, mesh=mesh, in_specs=P("t"), out_specs=P(),
                          check_vma=False))
print("sum", float(f(jnp.arange(2.0))[0]), flush=True)
"""


@pytest.mark.skipif(
  jaxlib_version.__version_info__ < (0, 8, 0),
  reason="jaxlib before 0.8.0 has no option for XLA's CPU all-reduce wait",
)
def test_cpu_all_reduce_waits_for_a_late_device():
  """use_cpu_cores makes the devices' all-reduce wait for a late device.

  XLA warns after the first wait (set to 1 s here) and ends the process
  after the second; a 1 s second wait must end it, the default must not.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
  runs = {
    timeout: subprocess.Popen(
      [sys.executable, "-c", _LATE_DEVICE_SCRIPT, timeout, "4"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for timeout in ("default", "1")
  }
  out = {timeout: run.communicate(timeout=300) for timeout, run in runs.items()}
  stdout, stderr = out["default"]
  assert runs["default"].returncode == 0, stderr[-2000:]
  assert "sum 1.0" in stdout, stdout
  flag = f"{sh.CPU_COLLECTIVE_TIMEOUT_FLAG}={sh.CPU_COLLECTIVE_TIMEOUT_S}"
  assert flag in stdout, stdout
  stdout, stderr = out["1"]
  assert runs["1"].returncode != 0, stdout
  assert "Termination timeout" in stderr, stderr[-2000:]


def test_cpu_collective_timeout_keeps_the_users_setting():
  flag = sh.CPU_COLLECTIVE_TIMEOUT_FLAG
  assert sh.with_cpu_collective_timeout("", 30, (0, 10, 2)) == f"{flag}=30"
  assert (
    sh.with_cpu_collective_timeout("--xla_dump_to=x", 30, (0, 8, 0))
    == f"--xla_dump_to=x {flag}=30"
  )
  mine = f"--xla_dump_to=x {flag}=5"
  assert sh.with_cpu_collective_timeout(mine, 30, (0, 10, 2)) == mine
  # jaxlib before 0.8.0 has no such option and refuses unknown XLA flags.
  assert sh.with_cpu_collective_timeout("", 30, (0, 7, 2)) == ""
  with pytest.raises(ValueError, match="timeout"):
    im.use_cpu_cores(1, collective_timeout_s=0)


def test_cpu_device_count_divides_the_meta_batch():
  from imaml_jax.train import runtime  # pylint: disable=import-outside-toplevel

  assert runtime.cpu_device_count(32, 2) == 2
  assert runtime.cpu_device_count(25, 2) == 1
  assert runtime.cpu_device_count(30, 4) == 3
  assert runtime.cpu_device_count(32, 2, devices=1) == 1
  assert runtime.cpu_device_count(32, 2, devices=8) == 2
