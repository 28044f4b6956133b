"""Hessian-vector products by forward-over-reverse differentiation."""
from __future__ import annotations

from typing import Callable

import jax

from imaml_jax._src import tree_util as tu
from imaml_jax._src.types import PyTree


def hvp(fun: Callable[[PyTree], jax.Array], x: PyTree, v: PyTree) -> PyTree:
  r"""Hessian-vector product :math:`\nabla^2 f(x)\, v`.

  Computed as the directional derivative of the gradient,
  :math:`\frac{d}{dt} \nabla f(x + t v)|_{t=0}`, i.e. ``jax.jvp`` over
  ``jax.grad`` (forward-over-reverse). It costs a small constant multiple of one
  gradient evaluation and never forms the Hessian.

  Args:
    fun: scalar function of a pytree.
    x: point at which the Hessian is taken.
    v: direction, a pytree shaped like ``x``.

  Returns:
    ``H v`` with the structure of ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> from imaml_jax import hvp
    >>> hvp(lambda x: (x ** 3).sum(), jnp.array([1., 2.]), jnp.array([1., 1.]))
    Array([ 6., 12.], dtype=float32)
  """
  return jax.jvp(jax.grad(fun), (x,), (v,))[1]


def hvp_operator(fun: Callable[[PyTree], jax.Array], x: PyTree, *,
                 linearize: bool = False) -> Callable[[PyTree], PyTree]:
  """Returns ``v -> H v`` for the Hessian of ``fun`` at ``x``.

  With ``linearize=True`` the gradient is linearised once with
  ``jax.linearize`` (forward-over-reverse as well) and every product only
  evaluates the stored linear map, which saves recomputing the primal pass
  when many products are taken at the same point (conjugate gradient).
  """
  if linearize:
    _, lin = jax.linearize(jax.grad(fun), x)
    return lin
  return lambda v: hvp(fun, x, v)


def proximal_system_operator(loss: Callable[[PyTree], jax.Array], phi: PyTree,
                             lam, *, linearize: bool = False):
  r"""Returns the matrix-free operator ``v -> (I + H / lam) v``.

  ``H`` is the Hessian of ``loss`` at the adapted parameters ``phi``. This is
  the symmetric system of the paper's Lemma 1, whose inverse is the Jacobian of
  the proximal solution with respect to the meta-parameters.
  """
  h = hvp_operator(loss, phi, linearize=linearize)
  return lambda v: tu.tree_axpy(1.0 / lam, h(v), v)
