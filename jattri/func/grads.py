"""Per-example gradients, computed in chunks so memory stays bounded."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from jattri import _checks
from jattri._program_cache import user_fn

PyTree = Any


def as_partial(fn: Callable) -> Partial:
    """``fn`` as a ``jax.tree_util.Partial`` pytree (unchanged if it is one), so it can
    be passed to ``jax.jit`` as a traced argument: its code is static (the treedef),
    its bound arrays are traced, and functions that differ only in those arrays share
    one compilation. A function that is not jattri's own is held as a
    :class:`jattri._program_cache.UserFn` (the function, and the arguments it is traced
    with), so a later process finds the programs that call it from its own jaxpr. The
    ``UserFn`` refers to the function weakly (JAX's caches keep it for the life of the
    process); the returned ``Partial`` holds it, so keep the ``Partial`` (or the
    function) while it is called."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    raw = fn.func if isinstance(fn, Partial) else fn
    func = user_fn(raw)
    if func is raw:
        return fn if isinstance(fn, Partial) else Partial(fn)
    out = (Partial(func, *fn.args, **(fn.keywords or {})) if isinstance(fn, Partial)
           else Partial(func))
    # The UserFn holds the function weakly (JAX's caches keep it); this Partial, which
    # the caller keeps to call it again, holds what was given (a Partial given: it, so
    # an id-keyed FunctionTable entry of it lives no longer than it). Not a pytree
    # child: copies that JAX unflattens inside a trace do not carry it.
    out._jattri_keep = fn
    return out


def shared(cache: dict, key: Any, make: Callable) -> Any:
    """``cache[key]``, made by ``make()`` on first use: one object per key (e.g. per
    user function), so jit caches keyed on it are reused. An unhashable key (a callable
    dataclass holding arrays) gets a fresh, uncached object.

    A :class:`FunctionTable` ``cache`` holds its objects weakly: a function's object
    lives while someone uses it (a Task), and with it the function."""
    try:
        found = cache.get(key)
        if found is None:
            found = make()
            cache[key] = found
        return found
    except TypeError:
        return make()


class FunctionTable:
    """A cache for :func:`shared` keyed by functions whose objects keep their key alive
    (a ``Partial`` of the function): the objects are held weakly, by the key's ``id``,
    so the table keeps neither. An entry lives while its object does, and the object
    holds the function, so no id in a live entry is reused by another object."""

    def __init__(self):
        self._table: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

    def get(self, key: Any) -> Any:
        hash(key)  # TypeError for an unhashable key, as a dict
        return self._table.get(id(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._table[id(key)] = value


_UNRAVEL: dict = {}


def unravel_fn(params: PyTree) -> Partial:
    """``unravel`` of ``ravel_pytree(params)`` as a ``Partial``, one object per parameter
    layout (treedef, shapes, dtypes), so functions built on it share compilations."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    layout = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    return shared(_UNRAVEL, layout, lambda: Partial(ravel_pytree(params)[1]))


def _on_unraveled(fn, unravel, theta, *args):
    return fn(unravel(theta), *args)


def flat_fn(fn: Callable, params: PyTree) -> Partial:
    """``flat(theta, *args) = fn(unravel(theta), *args)`` on flat parameters, as a
    ``Partial`` pytree: traced (``fn``'s bound arrays are leaves), its code one object
    per (code of ``fn``, parameter layout)."""
    return Partial(_on_unraveled, as_partial(fn), unravel_fn(params))


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

    ``indices`` (``(n,)`` int) default to ``arange(n)``. (The methods compute
    per-example gradients chunk by chunk through ``jattri.engine``; this is the
    function-level primitive.)
    """
    if indices is None:
        indices = jnp.arange(_checks.num_examples(data), dtype=jnp.int32)
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
    _checks.check_scalar_fn(loss_fn, params, data, "loss_fn")
    theta, unravel = ravel_pytree(params)
    return per_example_grads_flat(lambda t, z, i: loss_fn(unravel(t), z), theta, data,
                                  chunk_size=chunk_size)
