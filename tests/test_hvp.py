import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import imaml_jax as im
from problems import mlp_init, mlp_loss, mlp_task


def test_hvp_matches_dense_hessian_on_pytree(x64):
  params = mlp_init(jax.random.PRNGKey(0))
  batch, _ = mlp_task(jax.random.PRNGKey(1))
  flat, unravel = ravel_pytree(params)
  f_flat = lambda p: mlp_loss(unravel(p), batch)
  hessian = jax.hessian(f_flat)(flat)
  v = jax.random.normal(jax.random.PRNGKey(2), flat.shape, flat.dtype)
  hv = im.hvp(lambda p: mlp_loss(p, batch), params, unravel(v))
  np.testing.assert_allclose(ravel_pytree(hv)[0], hessian @ v, rtol=1e-11,
                             atol=1e-12)


def test_proximal_operator_is_identity_plus_scaled_hessian(x64):
  params = mlp_init(jax.random.PRNGKey(3))
  batch, _ = mlp_task(jax.random.PRNGKey(4))
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda p: mlp_loss(unravel(p), batch))(flat)
  lam = 0.7
  v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, flat.dtype)
  expected = v + hessian @ v / lam
  for linearize in (False, True):
    op = im.proximal_system_operator(lambda p: mlp_loss(p, batch), params,
                                     lam, linearize=linearize)
    np.testing.assert_allclose(ravel_pytree(op(unravel(v)))[0], expected,
                               rtol=1e-11, atol=1e-12)
