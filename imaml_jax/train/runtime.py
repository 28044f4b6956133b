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
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

import imaml_jax as im
from imaml_jax.train import config as config_lib


class DeviceError(ValueError):
  """The requested devices are not available."""


def make_mesh(config: config_lib.Config, devices: int | None = None):
  """The task mesh of a run: ``devices`` devices, all of them if ``None``.

  Args:
    config: the run's config (its ``meta_batch`` must split evenly).
    devices: number of devices, the first ones of ``jax.devices()`` (all
      processes); ``None`` for all.

  Returns:
    A 1-D ``jax.sharding.Mesh`` with axis ``"tasks"``.

  Raises:
    DeviceError: fewer devices than requested, or a count below 1.
    ConfigError: ``meta_batch`` is not a multiple of the device count.
  """
  try:
    mesh = im.task_mesh(devices)
  except ValueError as e:
    raise DeviceError(str(e)) from e
  try:
    im.check_divisible(config.meta_batch, mesh)
  except ValueError as e:
    raise config_lib.ConfigError(
        f"{e} Pass --devices with a divisor of {config.meta_batch}, or "
        "--set meta_batch=... with a multiple of the device count.") from e
  return mesh


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
  return {k: v for k, v in CPU_COMPILER_OPTIONS.items()
          if f"--{k}" not in flags}


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
  return jax.tree.map(lambda x: x if isinstance(x, str) else np.asarray(x),
                      jax.device_get(jax.tree.map(_local_leaf, tree)))


def first_replica(tree) -> Any:
  """The first local replica of every leaf, a single-device array."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


def lead_decides(flag: bool) -> bool:
  """``flag`` as process 0 has it, on every process of a multi-host job."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))
