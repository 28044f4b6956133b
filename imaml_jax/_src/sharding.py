r"""Data-parallel meta-training over tasks with JAX's sharding.

The meta-step of :func:`~imaml_jax.make_meta_step` averages independent
per-task meta-gradients,

.. math::

  g = \frac{1}{n} \sum_{i=1}^{n} g_i,
  \qquad g_i = (I + H_i/\lambda)^{-1} \nabla L^{query}_i(\phi_i),

so it parallelises over tasks without any change to the algorithm. With a
1-D :class:`jax.sharding.Mesh` of ``D`` devices whose axis is named
``"tasks"``, the task batch is split along its leading axis (``n / D`` tasks
per device, ``PartitionSpec("tasks")``) while the meta-parameters and the
optimizer state are replicated (``PartitionSpec()``). ``jax.jit`` with these
shardings compiles the unchanged step into an SPMD program: every device
adapts its own tasks and computes their ``g_i``; the mean over the task axis
becomes a partial sum on every device followed by one all-reduce, after which
every device applies the same optax update to its replica. The result equals
the single-device step up to the order of the floating-point summation.

Tasks can be placed on the devices from the host (:func:`shard_tasks`,
:func:`tasks_from_process_local_data`) or, better, sampled on the devices
themselves (:func:`imaml_jax.data.make_sharded_sampler`,
:func:`constrain_tasks`): every device then draws only its own tasks from a
replicated copy of the image array, and no task data moves between devices
or through the host.

Several hosts: call :func:`initialize_distributed` first on every process
(same program, same arguments apart from ``process_id``); ``jax.devices()``
then lists the devices of all processes and :func:`task_mesh` spans them.
Two ways of feeding tasks are supported:

* on-device sampling (recommended): every process loads the same image
  array, :func:`replicate` places it on every device, and the jitted step
  samples from a key that is identical on all processes;
  :func:`imaml_jax.data.make_sharded_sampler` makes each device draw its
  own slice of tasks.
* host-side batches: each process builds only its own slice of the batch
  (in process order, as many tasks per device it holds as every other
  device gets: ``n_tasks / jax.process_count()`` when the processes hold
  as many devices) and
  :func:`tasks_from_process_local_data` assembles the global array with
  ``jax.make_array_from_process_local_data``.

Everything here is thin glue over ``jax.sharding``; there is no custom
communication and no ``pmap``.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import imaml_jax as im
  >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  >>> init, step = im.make_meta_step(loss, optax.adam(1e-2),
  ...                                im.imaml(2.0, im.gd(5, 0.1), im.cg(3)))
  >>> mesh = im.task_mesh()          # all devices, axis "tasks"
  >>> sharded_step = im.shard_meta_step(step, mesh)
  >>> state = im.replicate(init(jnp.zeros(3)), mesh)
  >>> n = 2 * mesh.size
  >>> tasks = im.Task((jnp.ones((n, 6, 3)), jnp.ones((n, 6))),
  ...                 (jnp.ones((n, 6, 3)), jnp.ones((n, 6))))
  >>> state, metrics = sharded_step(state, im.shard_tasks(tasks, mesh))
  >>> int(state.step)
  1
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from imaml_jax._src import validation
from imaml_jax._src.types import PyTree
from imaml_jax._src.types import Task

TASK_AXIS = "tasks"


def task_mesh(
  devices: int | Sequence[jax.Device] | None = None, *, axis: str = TASK_AXIS
) -> Mesh:
  """A 1-D device mesh whose single axis carries the task batch.

  Args:
    devices: ``None`` for every device of every process (``jax.devices()``),
      an int ``N`` for ``N`` of them (the first ``N`` with one process; with
      several, dealt over the processes as evenly as they go, see
      :func:`spread_over_processes`), or an explicit sequence of devices.
    axis: the mesh axis name.

  Returns:
    ``jax.sharding.Mesh`` of shape ``{axis: number of devices}``.

  Raises:
    ValueError: ``N`` is not between 1 and ``len(jax.devices())``, ``N`` is
      smaller than the number of processes, or the sequence is empty.
    TypeError: ``devices`` is neither ``None``, an int nor a sequence of
      devices (e.g. ``True``).

  Example:
    >>> import jax
    >>> mesh = task_mesh(1)
    >>> mesh.shape["tasks"], mesh.devices.tolist() == jax.devices()[:1]
    (1, True)
  """
  available = jax.devices()
  if devices is None:
    devices = available
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if not 1 <= devices <= len(available):
      raise ValueError(
        f"asked for {devices} devices but {len(available)} are available "
        f"({available[0].platform}); the count must be between 1 and "
        f"{len(available)}."
      )
    devices = spread_over_processes(available, int(devices))
  elif isinstance(devices, bool) or not isinstance(devices, Iterable):
    raise TypeError(
      "task_mesh takes None (every device), a device count or a sequence "
      f"of devices, got {devices!r}."
    )
  devices = list(devices)
  if not devices:
    raise ValueError("task_mesh needs at least one device, got none.")
  return Mesh(np.array(devices, dtype=object), (axis,))


def spread_over_processes(available: Sequence, n: int) -> list:
  """``n`` of the ``available`` devices, as evenly over their processes as
  they go.

  Every process of a multi-process program takes part in each sharded step
  (it feeds its own devices and reads the state from them), so each must
  hold at least one device of the mesh. The devices are dealt to the
  processes in turn (process order, then each process's own order) and
  listed process by process; with one process these are the first ``n``.

  Raises:
    ValueError: ``n`` is smaller than the number of processes.

  Example:
    >>> from types import SimpleNamespace as D
    >>> devices = [D(id=i, process_index=i // 4) for i in range(8)]
    >>> [d.id for d in spread_over_processes(devices, 4)]
    [0, 1, 4, 5]
    >>> [d.id for d in spread_over_processes(devices, 3)]
    [0, 1, 4]
    >>> spread_over_processes(devices, 1)
    Traceback (most recent call last):
    ...
    ValueError: asked for 1 device(s) across 2 processes; every ...
  """
  by_process = {}
  for device in available:
    by_process.setdefault(device.process_index, []).append(device)
  if n < len(by_process):
    raise ValueError(
      f"asked for {n} device(s) across {len(by_process)} processes; every "
      f"process needs at least one: ask for {len(by_process)} or more."
    )
  dealt = [
    (rank, p) for p, own in by_process.items() for rank in range(len(own))
  ]
  chosen = set(sorted(dealt)[:n])
  return [
    d
    for p, own in by_process.items()
    for rank, d in enumerate(own)
    if (rank, p) in chosen
  ]


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, PartitionSpec())``: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def task_sharding(mesh: Mesh, axis: str = TASK_AXIS) -> NamedSharding:
  """``NamedSharding(mesh, PartitionSpec(axis))``: leading axis split."""
  _check_axis(mesh, axis)
  return NamedSharding(mesh, PartitionSpec(axis))


def _check_axis(mesh: Mesh, axis: str) -> None:
  if axis not in mesh.shape:
    raise ValueError(
      f"mesh has no axis named {axis!r}; its axes are {tuple(mesh.axis_names)}."
    )


def check_divisible(n_tasks: int, mesh: Mesh, axis: str = TASK_AXIS) -> None:
  """Raises ``ValueError`` unless ``n_tasks`` splits evenly over ``axis``.

  Uneven batches are not padded: a padded task would change the mean
  meta-gradient, so the meta-batch size must be a multiple of the number of
  devices along the task axis.
  """
  _check_axis(mesh, axis)
  n_devices = mesh.shape[axis]
  if n_tasks % n_devices:
    raise ValueError(
      f"the meta-batch of {n_tasks} tasks does not divide evenly over "
      f"{n_devices} devices (mesh axis {axis!r}); use a meta-batch that is "
      f"a multiple of {n_devices} or a mesh whose size divides {n_tasks}."
    )


def _put(x, sharding: NamedSharding):
  """``device_put`` that also builds global arrays from host values.

  With one process (or an array that is already global) this is
  ``jax.device_put``. With several processes a host value must be the same
  on every process; each process then places the pieces its own devices hold.
  """
  if sharding.is_fully_addressable or (
    isinstance(x, jax.Array) and not x.is_fully_addressable
  ):
    return jax.device_put(x, sharding)
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    data = _put(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(
    host.shape, sharding, lambda index: host[index]
  )


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a full copy of every leaf of ``tree`` on every device of ``mesh``.

  Use it for the meta-state (``MetaState``: parameters, optimizer state,
  counters), the image array sampled on device and PRNG keys. With several
  processes every process must pass the same values. Like
  ``jax.device_put``, it may return the input's own buffers when they are
  already placed this way: copy them first if the result is donated (e.g.
  ``shard_meta_step(..., donate_state=True)``) and the input is used again.

  Example:
    >>> import jax.numpy as jnp
    >>> x = replicate({"w": jnp.ones(3)}, task_mesh())
    >>> x["w"].sharding.is_fully_replicated
    True
  """
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_tasks(tasks: Task, mesh: Mesh, *, axis: str = TASK_AXIS) -> Task:
  """Splits a global task batch over ``mesh`` along its leading axis.

  Device ``d`` of the ``D`` devices on ``axis`` receives tasks
  ``d * n/D .. (d + 1) * n/D - 1``. With several processes every process
  passes the same full batch (see :func:`tasks_from_process_local_data` to
  pass only the local slice instead).

  Args:
    tasks: a batched :class:`~imaml_jax.Task` (leading task axis on every
      leaf).
    mesh: the device mesh.
    axis: the mesh axis to split the tasks over.

  Returns:
    The same tasks as global ``jax.Array`` s sharded on the leading axis.

  Raises:
    ValueError: the number of tasks is not a multiple of the device count.

  Example:
    >>> import jax.numpy as jnp
    >>> import imaml_jax as im
    >>> mesh = task_mesh()
    >>> n = 2 * mesh.size
    >>> t = shard_tasks(im.Task(jnp.zeros((n, 5)), jnp.zeros((n, 7))), mesh)
    >>> t.support.sharding.is_equivalent_to(task_sharding(mesh), 2)
    True
  """
  check_divisible(validation.check_task_batch(tasks), mesh, axis)
  sharding = task_sharding(mesh, axis)
  return jax.tree.map(lambda x: _put(x, sharding), tasks)


def tasks_from_process_local_data(
  tasks: Task, mesh: Mesh, *, axis: str = TASK_AXIS
) -> Task:
  """Assembles a global task batch from every process's own slice.

  For multi-host input pipelines: every device along ``axis`` holds the
  same number of tasks, so a process whose devices take ``d`` of the
  ``D`` positions of ``axis`` passes ``n * d / D`` tasks (``n / P`` when
  each of the ``P`` processes holds as many devices), and the global batch
  of ``n`` tasks (in the mesh's device order, process 0's slice first for
  :func:`task_mesh`) is built with
  ``jax.make_array_from_process_local_data``, without copying data between
  hosts. With one process this equals :func:`shard_tasks`.

  Args:
    tasks: this process's tasks, a batched :class:`~imaml_jax.Task`.
    mesh: a mesh over the devices of all processes (:func:`task_mesh`).
    axis: the mesh axis to split the tasks over.

  Returns:
    Global tasks sharded on the leading axis.

  Raises:
    ValueError: this process holds no device of ``mesh``, or its number of
      tasks is not a multiple of its devices along ``axis``.
  """
  n_local = validation.check_task_batch(tasks)
  held = _positions_held(mesh, axis, jax.process_index())
  if not held:
    raise ValueError(
      f"process {jax.process_index()} holds no device of the mesh, so it "
      "cannot feed tasks to it; build the mesh with task_mesh(), which "
      "gives every process a device."
    )
  if n_local % held:
    raise ValueError(
      f"process {jax.process_index()} passed {n_local} tasks for its "
      f"{held} of the mesh's {mesh.shape[axis]} devices along {axis!r}; "
      f"pass a multiple of {held} (every device holds as many tasks)."
    )
  n_global = n_local // held * mesh.shape[axis]
  sharding = task_sharding(mesh, axis)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (n_global,) + np.shape(x)[1:]
    ),
    tasks,
  )


def _positions_held(mesh: Mesh, axis: str, process: int) -> int:
  """How many positions of ``axis`` hold a device of ``process``."""
  _check_axis(mesh, axis)
  own = np.vectorize(lambda d: d.process_index == process, otypes=[bool])(
    mesh.devices
  )
  return len(np.unique(np.nonzero(own)[mesh.axis_names.index(axis)]))


def constrain_tasks(tasks: Task, mesh: Mesh, *, axis: str = TASK_AXIS) -> Task:
  """Inside ``jax.jit``: declares that the task batch is split over ``axis``.

  ``jax.lax.with_sharding_constraint`` on every leaf. Applied to tasks
  sampled inside a jitted step by any sampler (e.g. the synthetic task
  families), it lets the compiler partition the sampling itself, so every
  device produces its own tasks. How well it partitions depends on the
  sampler's operations (``lax.top_k`` in the episode sampler, for example, is
  computed after gathering its small key array); for N-way K-shot episodes
  :func:`imaml_jax.data.make_sharded_sampler` guarantees purely local
  sampling.

  Raises:
    ValueError: the number of tasks is not a multiple of the device count.
  """
  check_divisible(validation.check_task_batch(tasks), mesh, axis)
  sharding = task_sharding(mesh, axis)
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, sharding), tasks
  )


def per_device_step(
  step: Callable, mesh: Mesh, axis: str = TASK_AXIS, *, keyed: bool = False
) -> Callable:
  """``step`` run by each device on its own tasks under ``jax.shard_map``.

  ``step`` must come from ``make_meta_step(..., axis_name=axis)``; see
  :func:`shard_meta_step` with ``per_device=True``, which jits this. The
  state goes in replicated, the tasks split on ``axis``, and everything
  comes out replicated. With ``keyed`` the step takes a third argument, the
  PRNG key of a stochastic loss, replicated.

  Raises:
    ValueError: ``step`` was not built with ``axis_name=axis``.
  """
  if getattr(step, "axis_name", None) != axis:
    raise ValueError(
      "per_device=True needs a step built with make_meta_step(..., "
      f"axis_name={axis!r}), which averages over the devices; this step "
      f"has axis_name={getattr(step, 'axis_name', None)!r}."
    )
  in_specs = (PartitionSpec(), PartitionSpec(axis))
  if keyed:
    in_specs += (PartitionSpec(),)
  return jax.shard_map(
    step,
    mesh=mesh,
    in_specs=in_specs,
    out_specs=PartitionSpec(),
    check_vma=False,
  )


def shard_meta_step(
  step: Callable,
  mesh: Mesh,
  *,
  axis: str = TASK_AXIS,
  donate_state: bool = False,
  per_device: bool = False,
) -> Callable:
  r"""Jits a meta-step to run data-parallel over tasks on ``mesh``.

  ``step`` is the ``step(state, tasks) -> (state, metrics)`` of
  :func:`~imaml_jax.make_meta_step`, unchanged. The returned function is
  ``jax.jit(step, in_shardings=(replicated, tasks split on axis),
  out_shardings=replicated)``: each of the ``D`` devices computes the
  meta-gradients of its ``n / D`` tasks, their sum is all-reduced, and every
  device applies the same update, so the new state is replicated and equal
  (to float rounding of the summation order) to ``jax.jit(step)`` on one
  device. Metrics come back replicated as well (``per_task`` metrics are
  gathered).

  With ``per_device=True`` the step runs under ``jax.shard_map`` instead:
  each device executes ``step`` on its own ``n / D`` tasks as a separate
  program, and ``step`` must come from ``make_meta_step(...,
  axis_name=axis)``, which averages the meta-gradient and metrics over the
  devices. Use it with ``task_chunk``, whose ``lax.map`` then runs over each
  device's own tasks (under plain ``jit`` a ``lax.map`` over the split task
  axis would not stay split). The outputs are replicated by construction
  (``pmean``, ``all_gather``), which ``shard_map`` is not asked to verify
  (``check_vma=False``). On a CPU split into one host device per core
  (:func:`use_cpu_cores`, or
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2``) this runs one task
  per core at a time: for the Omniglot 5-way 1-shot step on 2 cores, 15.1
  tasks per second against 11.6 for one task at a time on the first device
  of the same process, and 14.5 in a process without the split
  (``benchmarks/step_variants.py``, ``benchmarks/results/step_variants_*``).

  Inputs that are not yet placed this way are moved by ``jit`` (single
  process only); place them once with :func:`replicate` and
  :func:`shard_tasks` (or sample on device) to avoid transfers per step.

  Args:
    step: a meta-step, ``step(state, tasks) -> (state, metrics)``.
    mesh: the device mesh, e.g. :func:`task_mesh`.
    axis: the mesh axis that splits the task batch.
    donate_state: donate the input state's buffers to the output.
    per_device: run ``step`` per device under ``jax.shard_map`` (see above).

  Returns:
    ``sharded_step(state, tasks) -> (state, metrics)``, or
    ``sharded_step(state, tasks, key)`` for a step built with
    ``stochastic=True`` (the key is replicated); it also has
    ``lower(state, tasks[, key])`` for ahead-of-time compilation.

  Raises:
    ValueError: ``per_device=True`` with a step whose ``axis_name`` is not
      ``axis`` (at once); the number of tasks is not a multiple of the
      number of devices on ``axis`` (when called).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import imaml_jax as im
    >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    >>> init, step = im.make_meta_step(loss, optax.sgd(0.1),
    ...                                im.imaml(1.0, im.gd(3, 0.1), im.cg(2)))
    >>> mesh = im.task_mesh()
    >>> n = mesh.size
    >>> x = jnp.ones((n, 4, 2)); y = jnp.ones((n, 4))
    >>> state, _ = im.shard_meta_step(step, mesh)(init(jnp.zeros(2)),
    ...                                           im.Task((x, y), (x, y)))
    >>> state.params.sharding.is_fully_replicated
    True
  """
  if per_device:
    per_device_step(step, mesh, axis)  # Checks the step's axis_name now.
  jitted = {}

  def compiled(keyed: bool) -> Callable:
    if keyed not in jitted:
      fn = (
        per_device_step(step, mesh, axis, keyed=keyed) if per_device else (step)
      )
      replicated = replicated_sharding(mesh)
      in_shardings = (replicated, task_sharding(mesh, axis))
      if keyed:
        in_shardings += (replicated,)
      jitted[keyed] = jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=replicated,
        donate_argnums=(0,) if donate_state else (),
      )
    return jitted[keyed]

  def check(tasks, key):
    if not isinstance(tasks, Task):
      raise TypeError(f"tasks must be an im.Task, got {type(tasks).__name__}.")
    if len(key) > 1:
      raise TypeError(
        "the sharded step takes (state, tasks) or (state, tasks, key); got "
        f"{2 + len(key)} arguments."
      )
    check_divisible(validation.check_task_batch(tasks), mesh, axis)

  @functools.wraps(step)
  def sharded_step(state, tasks, *key):
    check(tasks, key)
    return compiled(bool(key))(state, tasks, *key)

  def lower(state, tasks, *key):
    check(tasks, key)
    return compiled(bool(key)).lower(state, tasks, *key)

  sharded_step.lower = lower
  return sharded_step


def available_cores() -> int:
  """The number of CPU cores this process may run on (its affinity mask)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on every platform.
    return os.cpu_count() or 1


# XLA's CPU collectives end the process when one device reaches an
# all-reduce too long after the others (20 s before a warning, then 40 s:
# "Termination timeout for all reduce ... exceeded"), which a long run on a
# loaded machine can hit although every device is making progress. The
# option that sets the second wait exists from jaxlib 0.8.0 on (an older
# jaxlib refuses an unknown XLA flag, so it is not set there).
CPU_COLLECTIVE_TIMEOUT_FLAG = (
  "--xla_cpu_collective_call_terminate_timeout_seconds"
)
CPU_COLLECTIVE_TIMEOUT_S = 600
_CPU_COLLECTIVE_TIMEOUT_JAXLIB = (0, 8, 0)


def with_cpu_collective_timeout(
  xla_flags: str, timeout_s: int, jaxlib_version: tuple[int, ...]
) -> str:
  """``xla_flags`` with XLA's CPU all-reduce waiting ``timeout_s`` seconds.

  Unchanged when the flags already name the option (the user's setting
  wins) or ``jaxlib_version`` (``jaxlib.version.__version_info__``) is
  older than 0.8.0 (no such option there).

  Example:
    >>> with_cpu_collective_timeout("", 600, (0, 10, 2))
    '--xla_cpu_collective_call_terminate_timeout_seconds=600'
    >>> with_cpu_collective_timeout("--a=1", 600, (0, 7, 2))
    '--a=1'
  """
  if CPU_COLLECTIVE_TIMEOUT_FLAG in xla_flags or (
    tuple(jaxlib_version) < _CPU_COLLECTIVE_TIMEOUT_JAXLIB
  ):
    return xla_flags
  flag = f"{CPU_COLLECTIVE_TIMEOUT_FLAG}={int(timeout_s)}"
  return f"{xla_flags} {flag}" if xla_flags.strip() else flag


def patient_cpu_collectives(timeout_s: int = CPU_COLLECTIVE_TIMEOUT_S) -> None:
  """Lets XLA's CPU all-reduce wait ``timeout_s`` s for a late device.

  Adds the option to ``XLA_FLAGS`` (see :func:`with_cpu_collective_timeout`),
  which XLA reads when JAX starts its backends: call it before any JAX
  computation. Afterwards it changes nothing.
  """
  validation.check_positive_int("collective timeout_s", timeout_s)
  from jaxlib import version  # pylint: disable=import-outside-toplevel

  flags = os.environ.get("XLA_FLAGS", "")
  patient = with_cpu_collective_timeout(
    flags, timeout_s, version.__version_info__
  )
  if patient != flags:
    os.environ["XLA_FLAGS"] = patient


def use_cpu_cores(
  n: int | None = None, collective_timeout_s: int = CPU_COLLECTIVE_TIMEOUT_S
) -> int:
  r"""Splits the CPU into ``n`` JAX devices, one per core; call before JAX runs.

  XLA's CPU backend is one device by default, and a meta-step that maps
  over its tasks one at a time (``make_meta_step(..., task_chunk=1)``, the
  fastest way on a CPU) keeps only part of a multi-core CPU busy: its
  small convolutions do not parallelise well. With ``n`` host devices and
  the task batch split over them (``n`` tasks at a time, one per core),

  .. math:: t_{\text{step}} \approx \frac{m}{n}\, t_{\text{task}}

  for a meta-batch of ``m`` tasks. This sets ``jax_num_cpu_devices`` (the
  same as ``XLA_FLAGS=--xla_force_host_platform_device_count=n``), which JAX
  reads when it starts its CPU backend, so call it first: before any JAX
  computation, ``jax.devices()`` included (importing ``jax`` and
  ``imaml_jax`` is fine). It changes nothing on other backends. Then build
  the step per device::

    step = im.make_meta_step(..., task_chunk=1, axis_name=im.TASK_AXIS).step
    step = im.shard_meta_step(step, im.task_mesh(), per_device=True)

  On the 2-core CPU of ``benchmarks/results/speed_defaults_cpu.md`` the
  Omniglot 5-way 1-shot step runs 1.5x as many tasks a second this way as
  one task at a time on one device. Results equal the one-device step's up
  to the order of the sum over tasks.

  With several devices their all-reduce waits up to
  ``collective_timeout_s`` for the last one (:func:`patient_cpu_collectives`;
  XLA's own limit, 60 s, has ended a long training on a loaded 2-core
  machine), unless ``XLA_FLAGS`` sets that wait.

  Args:
    n: number of CPU devices; ``None`` for every core this process may use.
    collective_timeout_s: how long, in seconds, a device waits at an
      all-reduce for the others before XLA ends the process (after its
      20 s warning).

  Returns:
    The number of CPU devices JAX will have.

  Raises:
    RuntimeError: JAX's backends already started with another number of
      CPU devices (calling it again with the same number is fine).
    ValueError: ``n`` is not a positive integer.

  Example:
    >>> import subprocess, sys
    >>> code = ("import imaml_jax as im; n = im.use_cpu_cores(2); "
    ...         "import jax; print(n, len(jax.devices('cpu')))")
    >>> subprocess.run([sys.executable, "-c", code], capture_output=True,
    ...                text=True).stdout.split()
    ['2', '2']
  """
  n = available_cores() if n is None else n
  validation.check_positive_int("use_cpu_cores n", n)
  validation.check_positive_int(
    "use_cpu_cores collective_timeout_s", collective_timeout_s
  )
  try:
    # JAX refuses the setting once its backends run.
    jax.config.update("jax_num_cpu_devices", n)
    if n > 1:
      patient_cpu_collectives(collective_timeout_s)
  except RuntimeError:
    have = len(jax.devices("cpu"))
    if have == n:
      return n
    raise RuntimeError(
      f"use_cpu_cores({n}) must run before JAX starts its backends, but "
      f"they are already running with {have} CPU device(s). Call it right "
      "after the imports, before any JAX computation or jax.devices(), or "
      f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before "
      "starting Python."
    ) from None
  return n


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  **kwargs: Any,
) -> None:
  """Joins this process to a multi-host JAX job (``jax.distributed``).

  A thin wrapper of ``jax.distributed.initialize``: call it once per process,
  before any other JAX call, with the same ``coordinator_address``
  (``"host:port"`` of process 0) and ``num_processes`` on every process and
  this process's ``process_id`` in ``0 .. num_processes - 1``. On managed
  clusters (SLURM, Cloud TPU, Kubernetes with the right environment) all three
  may be left ``None`` and are detected. Afterwards ``jax.devices()`` lists
  the devices of all processes, ``jax.local_devices()`` this process's own,
  and :func:`task_mesh` spans all of them. ``num_processes=1`` is a
  single-process run: nothing is initialised. On CPU-only machines the
  cross-process collectives need
  ``jax.config.update("jax_cpu_collectives_implementation", "gloo")``
  before this call.

  Args:
    coordinator_address: ``"host:port"`` of process 0's coordinator.
    num_processes: number of processes in the job.
    process_id: this process's index.
    **kwargs: passed to ``jax.distributed.initialize`` (e.g.
      ``local_device_ids``, ``initialization_timeout``).

  Raises:
    ValueError: only some of the three arguments are given, or
      ``process_id`` is outside ``0 .. num_processes - 1``; with none given,
      ``jax.distributed.initialize`` raises if it detects no cluster.

  Example:
    >>> # On host i of 2 (same script everywhere):
    >>> initialize_distributed("10.0.0.1:1234", 2, i)  # doctest: +SKIP
  """
  given = [
    v is not None for v in (coordinator_address, num_processes, process_id)
  ]
  if any(given) and not all(given):
    raise ValueError(
      "give all of coordinator_address, num_processes and process_id, or "
      f"none of them to detect a cluster; got coordinator_address="
      f"{coordinator_address!r}, num_processes={num_processes!r}, "
      f"process_id={process_id!r}."
    )
  if all(given):
    validation.check_positive_int("num_processes", num_processes)
    if not 0 <= process_id < num_processes:
      raise ValueError(
        f"process_id must be in 0..{num_processes - 1}, got {process_id}."
      )
    if num_processes == 1:
      return
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    **kwargs,
  )
