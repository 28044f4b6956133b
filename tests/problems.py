"""Small problems with independent answers, shared by the core tests."""

import jax
import jax.numpy as jnp
import numpy as np


def linreg_loss(w, batch):
  """``||X w - y||^2 / (2 n)``."""
  x, y = batch
  r = x @ w - y
  return 0.5 * jnp.mean(r**2)


def linreg_task(seed, n_support=20, n_query=30, dim=5, dtype=np.float64):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=dim)

  def batch(n):
    x = rng.normal(size=(n, dim))
    return x.astype(dtype), (x @ w_true + 0.1 * rng.normal(size=n)).astype(
      dtype
    )

  return batch(n_support), batch(n_query)


def linreg_exact(theta, support, query, lam):
  """Closed form phi* and the exact meta-gradient, in NumPy float64."""
  xs, ys = (np.asarray(a, np.float64) for a in support)
  xq, yq = (np.asarray(a, np.float64) for a in query)
  theta = np.asarray(theta, np.float64)
  n, d = xs.shape
  h = xs.T @ xs / n
  phi = np.linalg.solve(h + lam * np.eye(d), xs.T @ ys / n + lam * theta)
  grad_q = xq.T @ (xq @ phi - yq) / len(yq)
  g = np.linalg.solve(np.eye(d) + h / lam, grad_q)
  return phi, g


def mlp_init(key, sizes=(3, 8, 1), dtype=jnp.float64):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k = jax.random.split(key)
    params[f"w{i}"] = (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype)
    params[f"b{i}"] = jnp.zeros((b,), dtype)
  return params


def mlp_apply(params, x):
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def mlp_loss(params, batch):
  x, y = batch
  return jnp.mean((mlp_apply(params, x) - y) ** 2)


def mlp_task(key, n=16, dim=3, dtype=jnp.float64):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  xs = jax.random.normal(k1, (n, dim), dtype)
  xq = jax.random.normal(k2, (n, dim), dtype)
  a = jax.random.normal(k3, (dim,), dtype)
  f = lambda x: jnp.sin(x @ a)[:, None]
  return (xs, f(xs)), (xq, f(xq))


def rel_err(a, b):
  a, b = (np.asarray(jax.flatten_util.ravel_pytree(t)[0]) for t in (a, b))
  return np.linalg.norm(a - b) / np.linalg.norm(b)
