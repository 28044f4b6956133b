r"""Predictions of a sinusoid model before and after adaptation, for plots.

The figure known from the MAML paper: for a few held-out regression tasks
``y = A sin(x - b)``, the true curve, the ``K`` support points, and the
network's prediction at the meta-parameters ``theta`` (before adaptation) and
at the adapted parameters ``phi`` (after adaptation on the support points,
with the run's own adaptation: proximal for iMAML, plain for the baselines).

The true curve is recovered from the task's points, with no access to the
sampler's amplitude and phase: ``A sin(x - b) = c_1 \sin x + c_2 \cos x``
with ``c_1 = A \cos b`` and ``c_2 = -A \sin b``, so a least-squares fit of
``(c_1, c_2)`` on two or more noise-free points with distinct ``x mod pi``
is exact.

Example:
  >>> import numpy as np
  >>> x = np.array([-1.0, 0.5, 2.0])
  >>> c = sine_coefficients(x, 3.0 * np.sin(x - 0.7))
  >>> round(float(np.hypot(*c)), 6)   # the amplitude
  3.0
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imaml_jax.train import experiment as exp_lib


def sine_coefficients(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """``(c_1, c_2)`` with ``y = c_1 sin x + c_2 cos x``, by least squares."""
  x = np.asarray(x, np.float64).ravel()
  design = np.stack([np.sin(x), np.cos(x)], axis=1)
  coefficients, *_ = np.linalg.lstsq(
    design, np.asarray(y, np.float64).ravel(), rcond=None
  )
  return coefficients


def fit_curves(
  exp: exp_lib.Experiment,
  params: Any,
  *,
  n_tasks: int = 4,
  seed: int = 0,
  points: int = 200,
) -> dict[str, np.ndarray]:
  """Curves of ``n_tasks`` held-out sinusoid tasks before and after adaptation.

  Args:
    exp: a sinusoid experiment (:func:`imaml_jax.train.experiment.build`).
    params: the meta-parameters ``theta``.
    n_tasks: tasks to draw, with :func:`imaml_jax.data.sinusoid_tasks` from
      the key ``jax.random.key(seed, impl="threefry2x32")``, the test set's
      key (with fewer tasks the draws differ from the test set's first ones).
    seed: the key's seed.
    points: grid points on the input range ``[-5, 5]``.

  Returns:
    Host arrays: ``x`` ``[points]``; ``true``, ``before``, ``after``
    ``[n_tasks, points]``; ``support_x``, ``support_y`` ``[n_tasks, K]``;
    ``mse_before``, ``mse_after`` ``[n_tasks]``, the query MSE of each task.

  Raises:
    ValueError: ``exp`` is not a sinusoid experiment.
  """
  config = exp.config
  if config.dataset != "sinusoid":
    raise ValueError(
      f"fit curves are for sinusoid runs; this run's dataset "
      f"is {config.dataset!r}."
    )
  if n_tasks < 1 or points < 2:
    raise ValueError(
      f"need n_tasks >= 1 and points >= 2; got {n_tasks} and {points}."
    )
  tasks = next(
    exp_lib.evaluation_chunks(
      dataclasses.replace(config, eval_chunk=n_tasks), None, n_tasks, seed
    )
  )
  net, _ = exp_lib.network(config)
  grid = jnp.linspace(-5.0, 5.0, points)[:, None]

  def one(task):
    phi = exp.eval_algorithm.adapt(exp.loss, params, task.support)
    predict = lambda p: net.apply({"params": p}, grid)[:, 0]
    return {
      "before": predict(params),
      "after": predict(phi),
      "mse_before": exp.loss(params, task.query)[0],
      "mse_after": exp.loss(phi, task.query)[0],
    }

  out = jax.device_get(jax.jit(jax.vmap(one))(tasks))
  support_x, support_y = jax.device_get(task_points(tasks.support))
  query_x, query_y = jax.device_get(task_points(tasks.query))
  x = np.asarray(grid[:, 0])
  true = []
  for i in range(n_tasks):
    c1, c2 = sine_coefficients(
      np.concatenate([support_x[i], query_x[i]]),
      np.concatenate([support_y[i], query_y[i]]),
    )
    true.append(c1 * np.sin(x) + c2 * np.cos(x))
  return {
    "x": x,
    "true": np.stack(true),
    "support_x": support_x,
    "support_y": support_y,
    **{k: np.asarray(v) for k, v in out.items()},
  }


def task_points(batch) -> tuple[jax.Array, jax.Array]:
  """``(x, y)`` of a batch ``[tasks, K, 1]`` as ``[tasks, K]`` arrays."""
  x, y = batch
  return x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
