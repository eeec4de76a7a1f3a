"""Shared machinery of the attribution methods: the Attributor type, member reductions,
per-chunk gradients, and the generic scoring entry points over ``jattri.engine``."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattri import _checks, engine
from jattri.task import Members, Task, as_members, first_member, member

PyTree = Any


class Attributor(NamedTuple):
    """A method: three pure functions over a pytree state.

    * ``cache(members, train) -> state``: the train-side work (curvature, projected
      features, factors), done once. ``members`` are :class:`jattri.Members` (or one
      params pytree); ``train`` a pytree with a leading example axis or a
      :class:`jattri.Stream` of batches.
    * ``attribute(state, test, *, train=None, top_k=None, lowest=False)``:
      ``(n_train, n_test)`` scores (larger = training example i lowers test example
      t's target more, i.e. helps it), or with ``top_k=K`` a :class:`jattri.TopK`
      computed in tiles without the dense matrix. ``train`` is needed only when the
      state references no in-memory training set (it was streamed) and the method
      recomputes training gradients at scoring time; it is ignored otherwise.
    * ``self_attribute(state, *, train=None) -> (n_train,)``: score(i, i).

    All three are jittable (for in-memory data): params and every array are traced
    arguments, never constants.
    """

    cache: Callable
    attribute: Callable
    self_attribute: Callable


def member_map(fn: Callable, members: Members, *per_member: PyTree) -> PyTree:
    """``fn(params_j, aux_j, *per_member_j)`` for every member j, stacked on a leading
    axis M; sequential over members (``lax.map``) so memory is one member's.
    ``per_member``: pytrees with a leading axis M (e.g. each member's projection key)."""
    def one(j):
        rows = jax.tree_util.tree_map(lambda x: x[j], per_member)
        return fn(*member(members, j), *rows)

    if members.num == 1:
        return jax.tree_util.tree_map(lambda x: x[None], one(0))
    return jax.lax.map(one, jnp.arange(members.num))


def member_keys(key: jax.Array, num: int) -> jax.Array:
    """``(num,)`` keys ``fold_in(key, j)``: member j's own projection (or mask) key."""
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num))


def flat_grad(fn: Callable, params: PyTree, example: PyTree, index, aux) -> jax.Array:
    """``(d,)`` gradient of ``fn(params, example, index, aux)`` w.r.t. params, raveled."""
    return ravel_pytree(jax.grad(fn)(params, example, index, aux))[0]


def chunk_grads(fn: Callable, params: PyTree, aux: PyTree, chunk: engine.Chunk,
                transform: Optional[Callable] = None) -> jax.Array:
    """``(size, d)`` per-example gradients of one chunk (zero on padding rows), or
    ``(size, k)`` = ``transform(grads)``."""
    g = jax.vmap(lambda z, i: flat_grad(fn, params, z, i, aux))(chunk.data, chunk.index)
    if transform is not None:
        g = transform(g)
    return g * chunk.valid[:, None].astype(g.dtype)


def num_params(members: Members) -> int:
    return int(sum(np.prod(np.shape(x)[1:], dtype=np.int64)
                   for x in jax.tree_util.tree_leaves(members.params)))


def param_dtype(members: Members):
    leaves = jax.tree_util.tree_leaves(members.params)
    return jnp.result_type(*[jnp.result_type(x) for x in leaves], jnp.float32)


#: Chunk budget multiplier for steps that project gradients: a projection call has a
#: fixed cost (the SJLT hash or the Gaussian rows of all d coordinates) that larger
#: chunks amortise (nanoGPT 10.7M, k = 2048: 27% of featurise time at 6 examples a
#: chunk, 17% at 16; benchmarks/RESULTS.md, "Scale").
PROJECTED_CHUNK_FACTOR = 4


def chunk_size_for(chunk_size: Optional[int], members: Members, data: Any = None,
                   per_example_floats: Optional[int] = None, *,
                   projected: bool = False) -> int:
    """The user's ``chunk_size``, or :func:`jattri.engine.default_chunk_size` for
    ``per_example_floats`` (default d, one gradient) floats per example; with
    ``projected``, a :data:`PROJECTED_CHUNK_FACTOR` times larger budget."""
    n = None if data is None else engine.num_examples(data)
    if chunk_size is not None:
        return chunk_size if n is None else max(1, min(chunk_size, n))
    floats = num_params(members) if per_example_floats is None else per_example_floats
    if projected:
        floats = max(1, floats // PROJECTED_CHUNK_FACTOR)
    return engine.default_chunk_size(4 * floats, n)


def setup(task: Task, members: Any, train: Any, name: str = "train") -> Members:
    """Boundary checks of ``cache``: ``members`` validated (a bare params pytree is one
    checkpoint); ``train`` checked (in memory: every leaf, and the loss on one example;
    a stream: its first batch)."""
    members = as_members(members)
    check_data(task, members, train, name, target=False)
    return members


def check_data(task: Task, members: Members, data: Any, name: str, *, target: bool,
               like: Any = None) -> Optional[int]:
    """Validate a dataset (in memory or streamed) and the loss/target on one example."""
    if data is None:
        raise ValueError(f"`{name}` is required here")
    n = None
    if not engine.is_stream(data):
        n = _checks.check_data(data, name)
        if like is not None and not engine.is_stream(like):
            _checks.check_like(data, like, name, "train")
    if is_concrete(members):
        params, aux = first_member(members)
        z = engine.first_example(data)
        fn, fname = (task.target, "target_fn") if target else (task.loss, "loss_fn")
        _checks.check_scalar_fn(fn, params, jax.tree_util.tree_map(lambda x: x[None], z),
                                fname, jnp.zeros((), jnp.int32), aux)
    return n


def is_concrete(tree) -> bool:
    """No leaf of ``tree`` is a tracer (value checks run only then)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def stored_train(train: Any) -> Any:
    """What a state keeps of the training set: the in-memory pytree itself (a
    reference, no copy) or ``None`` for a stream."""
    return None if engine.is_stream(train) else train


def train_for(state_train: Any, train: Any) -> Any:
    """The training set a scoring call reads: the one given, else the state's."""
    if train is not None:
        return train
    if state_train is None:
        raise ValueError("`train` is required: this state was cached from a stream, and "
                         "the method recomputes training gradients at scoring time; pass "
                         "the same stream again as attribute(..., train=...)")
    return state_train


__all__ = ["Attributor", "chunk_grads", "chunk_size_for", "check_data", "flat_grad",
           "member_map", "num_params", "param_dtype", "setup", "stored_train", "train_for"]
