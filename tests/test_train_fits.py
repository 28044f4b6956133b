"""Sinusoid fit curves: the true sine recovered from a task's points, and the
predictions before and after adaptation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imaml_jax.train import config as config_lib
from imaml_jax.train import experiment as exp_lib
from imaml_jax.train import fits
from imaml_jax.train import plots


def test_sine_coefficients_recover_amplitude_and_phase():
  rng = np.random.default_rng(0)
  x = rng.uniform(-5, 5, 7)
  amplitude, phase = 2.7, 1.1
  c1, c2 = fits.sine_coefficients(x, amplitude * np.sin(x - phase))
  np.testing.assert_allclose(np.hypot(c1, c2), amplitude, rtol=1e-12)
  np.testing.assert_allclose(np.arctan2(-c2, c1), phase, rtol=1e-12)


@pytest.fixture(scope="module")
def sinusoid_exp():
  cfg = config_lib.get_config("sinusoid")
  return exp_lib.build(cfg, None)


def test_fit_curves_match_network_and_adaptation(sinusoid_exp, tmp_path):
  exp = sinusoid_exp
  params = exp.init_params(jax.random.key(0))
  out = fits.fit_curves(exp, params, n_tasks=3, seed=5, points=50)
  assert out["x"].shape == (50,)
  for key in ("true", "before", "after"):
    assert out[key].shape == (3, 50)
  assert out["support_x"].shape == (3, 10)
  # "before" is the network at theta; the same tasks as the test set's seed.
  net, _ = exp_lib.network(exp.config)
  np.testing.assert_allclose(
    out["before"][0],
    net.apply({"params": params}, jnp.asarray(out["x"])[:, None])[:, 0],
    rtol=1e-5,
    atol=1e-6,
  )
  tasks = next(
    exp_lib.evaluation_chunks(
      dataclasses.replace(exp.config, eval_chunk=3), None, 3, 5
    )
  )
  np.testing.assert_allclose(
    out["support_x"], np.asarray(tasks.support[0])[..., 0]
  )
  # The true curve passes through the support points.
  for i in range(3):
    c1, c2 = fits.sine_coefficients(out["support_x"][i], out["support_y"][i])
    np.testing.assert_allclose(
      np.interp(out["support_x"][i], out["x"], out["true"][i]),
      c1 * np.sin(out["support_x"][i]) + c2 * np.cos(out["support_x"][i]),
      atol=0.05,
    )
  # Adaptation lowers the support-fitted query error on average.
  assert out["mse_after"].mean() < out["mse_before"].mean()
  plots.plot_sinusoid_fits(out, tmp_path / "fits.png", title="t")
  assert (tmp_path / "fits.png").stat().st_size > 0


def test_fit_curves_refuse_classification_runs():
  exp = exp_lib.build(config_lib.get_config("omniglot_5w1s_imaml_gd"), None)
  with pytest.raises(ValueError, match="sinusoid"):
    fits.fit_curves(exp, None)
