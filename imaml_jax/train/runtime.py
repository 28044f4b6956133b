"""Where the steps run: the device mesh, XLA's options, host copies.

The training step runs data-parallel over a 1-D device mesh
(:func:`make_mesh`, :func:`imaml_jax.task_mesh`, all devices by default). The
meta-state, the metric sums, the training images and the base key are
replicated; every device samples and adapts its ``meta_batch / devices``
tasks and the meta-gradient is all-reduced. The tasks drawn do not depend on
the device count, so runs on different counts agree up to float rounding of
the reductions (amplified where the meta-gradient is sensitive, e.g. when its
CG solve is far from converged), and a run may resume on another count. With
one device the step is the plain single-device step. Validation and testing
run on the first local device (:func:`first_replica`). With several
processes (:func:`imaml_jax.initialize_distributed`), every process runs the
same loop on the same work directory (a shared file system) and only process
0 (:func:`is_lead`) writes to it and logs.

On a CPU the steps are compiled with XLA's older loop emitters
(:func:`compiler_options`), which compile them 1.3-2x faster and run them as
fast.

Every core by default: before JAX starts, the commands split a CPU into one
JAX device per core (:func:`split_cpu`, through
:func:`imaml_jax.use_cpu_cores`), as many as divide the meta-batch, and the
step maps over each device's own tasks one at a time (``task_chunk=0``, the
configs' default, is one task at a time on a CPU: :func:`task_chunk`).
``--devices N`` asks for ``N`` of them; a device count set by the user
(``XLA_FLAGS=--xla_force_host_platform_device_count``, or
``jax_num_cpu_devices``) is kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

import imaml_jax as im
from imaml_jax._src import sharding as sharding_lib
from imaml_jax.train import config as config_lib


class DeviceError(ValueError):
  """The requested devices are not available."""


def make_mesh(config: config_lib.Config, devices: int | None = None):
  """The task mesh of a run: ``devices`` devices, all of them if ``None``.

  Args:
    config: the run's config (its ``meta_batch`` must split evenly).
    devices: number of devices, the first ones of ``jax.devices()`` (all
      processes; with several processes, the first ones of each process,
      as evenly as they go: ``im.task_mesh``); ``None`` for all, except on
      a CPU, where it is as many of them as divide ``meta_batch``
      (:func:`cpu_device_count`: a command run again in one Python process
      keeps the CPU devices of its first run, which another meta-batch may
      not split over).

  Returns:
    A 1-D ``jax.sharding.Mesh`` with axis ``"tasks"``.

  Raises:
    DeviceError: fewer devices than requested, a count below 1, or fewer
      devices than processes.
    ConfigError: ``meta_batch`` is not a multiple of the device count.
  """
  if devices is None and jax.default_backend() == "cpu":
    devices = cpu_device_count(config.meta_batch, len(jax.devices()))
  try:
    mesh = im.task_mesh(devices)
  except ValueError as e:
    raise DeviceError(str(e)) from e
  try:
    im.check_divisible(config.meta_batch, mesh)
  except ValueError as e:
    raise config_lib.ConfigError(
      f"{e} Pass --devices with a divisor of {config.meta_batch}, or "
      "--set meta_batch=... with a multiple of the device count."
    ) from e
  return mesh


CPU_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def cpu_device_count(
  meta_batch: int, cores: int, devices: int | None = None
) -> int:
  """How many devices to split a CPU of ``cores`` cores into for a run.

  ``devices`` (``--devices``) if given, capped at ``cores`` (asking for
  more then fails as "asked for N devices"); otherwise the largest count
  up to ``cores`` that divides ``meta_batch``, so that every core gets the
  same number of tasks (a meta-batch of 25 on 2 cores: one device).

  Example:
    >>> cpu_device_count(32, 2), cpu_device_count(25, 2), cpu_device_count(
    ...     32, 16, devices=4)
    (2, 1, 4)
  """
  if devices is not None:
    return max(1, min(devices, cores))
  return max(d for d in range(1, max(cores, 1) + 1) if meta_batch % d == 0)


def split_cpu(
  config: config_lib.Config, devices: int | None = None
) -> int | None:
  """Splits the CPU into one JAX device per core before JAX starts.

  Calls :func:`imaml_jax.use_cpu_cores` with :func:`cpu_device_count`.
  Does nothing (returns ``None``) when the user set the count
  (``XLA_FLAGS`` names ``--xla_force_host_platform_device_count``, or
  ``jax_num_cpu_devices`` is set) or JAX's backends already started with
  another number of CPU devices (a command called from a Python session
  that has run JAX: its devices are used as they are). Other backends
  than the CPU's are not affected.

  Either way, several CPU devices wait for each other at an all-reduce for
  up to ``sharding.CPU_COLLECTIVE_TIMEOUT_S`` seconds before XLA ends the
  run (:func:`imaml_jax._src.sharding.patient_cpu_collectives`).

  Returns:
    The number of CPU devices set, or ``None``.
  """
  if (
    CPU_DEVICE_FLAG in os.environ.get("XLA_FLAGS", "")
    or jax.config.jax_num_cpu_devices >= 0
  ):
    sharding_lib.patient_cpu_collectives()
    return None
  try:
    return im.use_cpu_cores(
      cpu_device_count(
        config.meta_batch, sharding_lib.available_cores(), devices
      )
    )
  except RuntimeError:  # JAX already runs: its devices are used as they are.
    return None


def task_chunk(
  config: config_lib.Config, platform: str | None = None
) -> int | None:
  """The ``task_chunk`` of a training meta-step (``None``: vmap the batch).

  A positive ``config.task_chunk`` is used as it is. ``0`` (auto, the
  configs' default) is one task at a time on a CPU for the conv nets
  (Omniglot, mini-ImageNet: XLA's CPU code runs a batch of small
  convolutions slower than the tasks one by one,
  ``benchmarks/results/throughput_cpu.md``) and the whole batch vmapped
  for the sinusoid MLP and on other platforms (GPUs).

  Example:
    >>> from imaml_jax.train import config as c
    >>> omniglot = c.get_config("omniglot_5w1s_imaml_gd")
    >>> task_chunk(omniglot, "cpu"), task_chunk(omniglot, "gpu")
    (1, None)
  """
  if config.task_chunk:
    return config.task_chunk
  platform = jax.default_backend() if platform is None else platform
  if platform == "cpu" and config.dataset != "sinusoid":
    return 1
  return None


# XLA options of the trainer's compilations on a CPU. XLA's fusion emitters
# (its newer CPU code generator) spend far longer compiling these steps than
# its older loop emitters, whose code runs as fast: measured in one process,
# interleaved, on this project's 2-core CPU (benchmarks/compile_time.py,
# benchmarks/results/compile_time_flags_cpu.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(platform: str | None = None) -> dict:
  """XLA options for compiling the trainer's steps on ``platform``.

  ``CPU_COMPILER_OPTIONS`` on a CPU (the default backend if ``platform`` is
  None), nothing elsewhere. An option that ``XLA_FLAGS`` names is left out,
  so the user's setting wins:
  ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=true imaml-train ...`` compiles
  with the newer emitters.

  Example:
    >>> compiler_options("cpu") in ({"xla_cpu_use_fusion_emitters": False}, {})
    True
    >>> compiler_options("gpu")
    {}
  """
  platform = jax.default_backend() if platform is None else platform
  if platform != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {
    k: v for k, v in CPU_COMPILER_OPTIONS.items() if f"--{k}" not in flags
  }


def device_name(mesh=None) -> str:
  """``"platform:kind"`` of the mesh's first device (or JAX's first)."""
  device = (jax.devices() if mesh is None else mesh.devices.flat)[0]
  return f"{device.platform}:{getattr(device, 'device_kind', '')}"


def is_lead() -> bool:
  """Whether this is the process that writes the work directory and logs."""
  return jax.process_index() == 0


def _local_leaf(x):
  """A leaf on the host; a global array is read from a local replica."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return x


def to_host(tree) -> Any:
  """``tree`` as numpy arrays (replicated arrays: this process's copy)."""
  return jax.tree.map(
    lambda x: x if isinstance(x, str) else np.asarray(x),
    jax.device_get(jax.tree.map(_local_leaf, tree)),
  )


def first_replica(tree) -> Any:
  """The first local replica of every leaf, a single-device array."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


def lead_decides(flag: bool) -> bool:
  """``flag`` as process 0 has it, on every process of a multi-host job."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))
