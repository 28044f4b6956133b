import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_init
from problems import mlp_loss
from problems import mlp_task

import imaml_jax as im


def test_hvp_matches_dense_hessian_on_pytree(x64):
  params = mlp_init(jax.random.PRNGKey(0))
  batch, _ = mlp_task(jax.random.PRNGKey(1))
  flat, unravel = ravel_pytree(params)
  f_flat = lambda p: mlp_loss(unravel(p), batch)
  hessian = jax.hessian(f_flat)(flat)
  v = jax.random.normal(jax.random.PRNGKey(2), flat.shape, flat.dtype)
  hv = im.hvp(lambda p: mlp_loss(p, batch), params, unravel(v))
  np.testing.assert_allclose(
    ravel_pytree(hv)[0], hessian @ v, rtol=1e-11, atol=1e-12
  )


def test_proximal_operator_is_identity_plus_scaled_hessian(x64):
  params = mlp_init(jax.random.PRNGKey(3))
  batch, _ = mlp_task(jax.random.PRNGKey(4))
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda p: mlp_loss(unravel(p), batch))(flat)
  lam = 0.7
  v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, flat.dtype)
  expected = v + hessian @ v / lam
  for linearize in (False, True):
    op = im.proximal_system_operator(
      lambda p: mlp_loss(p, batch), params, lam, linearize=linearize
    )
    np.testing.assert_allclose(
      ravel_pytree(op(unravel(v)))[0], expected, rtol=1e-11, atol=1e-12
    )


def test_damped_operator_matches_dense_damped_matrix(x64):
  # The authors' system: (1 + r) v + H v / (lam + d), here r = 1, d = 10.
  params = mlp_init(jax.random.PRNGKey(6))
  batch, _ = mlp_task(jax.random.PRNGKey(7))
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda p: mlp_loss(unravel(p), batch))(flat)
  v = jax.random.normal(jax.random.PRNGKey(8), flat.shape, flat.dtype)
  for damping, lam_damping in ((1.0, 10.0), (1.0, 0.0), (0.0, 10.0)):
    matrix = (1 + damping) * jnp.eye(flat.size) + hessian / (2.0 + lam_damping)
    for linearize in (False, True):
      op = im.proximal_system_operator(
        lambda p: mlp_loss(p, batch),
        params,
        2.0,
        linearize=linearize,
        damping=damping,
        lam_damping=lam_damping,
      )
      np.testing.assert_allclose(
        ravel_pytree(op(unravel(v)))[0], matrix @ v, rtol=1e-11, atol=1e-12
      )


def test_zero_damping_is_the_undamped_operator_bit_for_bit():
  params = mlp_init(jax.random.PRNGKey(9), dtype=jnp.float32)
  batch, _ = mlp_task(jax.random.PRNGKey(10), dtype=jnp.float32)
  loss = lambda p: mlp_loss(p, batch)
  for linearize in (False, True):
    plain = im.proximal_system_operator(loss, params, 0.7, linearize=linearize)
    zero = im.proximal_system_operator(
      loss, params, 0.7, linearize=linearize, damping=0.0, lam_damping=0
    )
    for a, b in zip(
      jax.tree.leaves(jax.jit(plain)(params)),
      jax.tree.leaves(jax.jit(zero)(params)),
    ):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"damping": -1.0}, r"^damping must be >= 0"),
    ({"lam_damping": -10.0}, r"^lam_damping must be >= 0"),
    ({"damping": float("nan")}, r"^damping must be a finite number"),
  ],
)
def test_negative_damping_is_refused_by_name(kwargs, message):
  with pytest.raises(ValueError, match=message):
    im.proximal_system_operator(
      lambda x: (x**2).sum(), jnp.zeros(2), 2.0, **kwargs
    )
