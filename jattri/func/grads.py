"""Per-example gradients, computed in chunks so memory stays bounded."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jattri import _checks

PyTree = Any


def flatten_fn(fn: Callable, params: PyTree):
    """Return ``(theta, flat_fn, unravel)``: ``flat_fn(theta, *args) == fn(unravel(theta), *args)``.

    ``theta`` is ``ravel_pytree(params)[0]``, a ``(d,)`` vector.
    """
    theta, unravel = ravel_pytree(params)

    def flat_fn(theta, *args):
        return fn(unravel(theta), *args)

    return theta, flat_fn, unravel


def map_examples(fn: Callable, xs: PyTree, chunk_size: Optional[int]):
    """``vmap(fn)(xs)``, evaluated ``chunk_size`` examples at a time (``lax.map``).

    ``chunk_size=None`` vmaps over everything at once.
    """
    if chunk_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=int(chunk_size))


def per_example_grads_flat(flat_loss: Callable, theta: jax.Array, data: PyTree,
                           indices: Optional[jax.Array] = None, *,
                           chunk_size: Optional[int] = None) -> jax.Array:
    """Gradients of ``flat_loss(theta, example, index)`` for every example: ``(n, d)``.

    ``indices`` (``(n,)`` int) default to ``arange(n)``; members of a dropout ensemble
    use them to key per-example masks.
    """
    n = _checks.num_examples(data)
    if indices is None:
        indices = jnp.arange(n, dtype=jnp.int32)
    grad_fn = jax.grad(flat_loss)
    return map_examples(lambda zi: grad_fn(theta, zi[0], zi[1]), (data, indices), chunk_size)


def per_example_grads(loss_fn: Callable, params: PyTree, data: PyTree, *,
                      chunk_size: Optional[int] = None) -> jax.Array:
    """Per-example gradients g_i = ∇θ loss_fn(params, z_i), flattened.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE unbatched example.
      params: any pytree of arrays.
      data: pytree of arrays with a leading example axis of size n.
      chunk_size: examples per vectorised chunk (``lax.map``); bounds peak memory to
        about ``chunk_size * d`` floats plus activations. ``None``: all at once.

    Returns:
      ``(n, d)`` array; row i is ``ravel_pytree(grad)[0]``. To get pytrees back use
      ``jax.vmap(ravel_pytree(params)[1])``.
    """
    _checks.check_data(data, "data")
    _checks.check_params(params, "params")
    _checks.check_scalar_loss(loss_fn, params, data, "loss_fn")
    theta, flat_loss, _ = flatten_fn(loss_fn, params)
    return per_example_grads_flat(lambda t, z, i: flat_loss(t, z), theta, data,
                                  chunk_size=chunk_size)
