"""Shared machinery of the attribution methods: the Attributor type, member gradients."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jattri import _checks
from jattri.func.grads import (as_partial, flat_fn, map_examples, per_example_grads_flat,
                               unravel_fn)
from jattri.task import Task

PyTree = Any


class Attributor(NamedTuple):
    """A method: three pure functions over a pytree state.

    * ``cache(train) -> state``: the train-side work (gradients, inverse-Hessian
      products, projections), done once.
    * ``attribute(state, test) -> (n_train, n_test)`` scores; larger = training
      example i lowers test example t's target more (helps it).
    * ``self_attribute(state) -> (n_train,)``: score(i, i), each training example
      scored as its own test example.
    """

    cache: Callable
    attribute: Callable
    self_attribute: Callable


class FlatMember(NamedTuple):
    """A member on flat parameters: ``loss(theta, example, index)``, likewise target
    (``jattri.func.grads.flat_fn``: ``Partial`` pytrees, so members whose functions
    differ only in arrays share every compiled program)."""

    theta: jax.Array
    loss: Callable
    target: Callable
    unravel: Callable


def flat_members(task: Task) -> tuple:
    if not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task, got {type(task).__name__}")
    out = []
    for m in task.members:
        theta = ravel_pytree(m.params)[0]
        loss = flat_fn(m.loss_fn, m.params)
        target = loss if m.target_fn is m.loss_fn else flat_fn(m.target_fn, m.params)
        out.append(FlatMember(theta, loss, target, unravel_fn(m.params)))
    return tuple(out)


def check_train(task: Task, train: PyTree, name: str = "train") -> int:
    n = _checks.check_data(train, name)
    m0 = task.members[0]
    idx = jnp.zeros((), jnp.int32)
    _checks.check_scalar_fn(m0.loss_fn, m0.params, train, "loss_fn", idx)
    return n


def check_test(task: Task, train: PyTree, test: PyTree, name: str = "test") -> int:
    n = _checks.check_data(test, name)
    _checks.check_like(test, train, name, "train")
    m0 = task.members[0]
    idx = jnp.zeros((), jnp.int32)
    _checks.check_scalar_fn(m0.target_fn, m0.params, test, "target_fn", idx)
    return n


def indices_for(data: PyTree) -> jax.Array:
    return jnp.arange(_checks.num_examples(data), dtype=jnp.int32)


_grads_jit = jax.jit(per_example_grads_flat, static_argnames=("chunk_size",))


def member_grads(fn: Callable, theta: jax.Array, data: PyTree, *,
                 chunk_size: Optional[int] = None,
                 transform: Optional[Callable] = None) -> jax.Array:
    """``(n, d)`` gradients of ``fn(theta, z_i, i)``, or ``(n, k)`` = ``transform(grads)``.

    ``fn`` is a ``Partial`` (a FlatMember's function) and ``transform`` is made one
    (jattri's projections are, with their key as the traced leaf): neither is static, so
    members and attributors that differ only in arrays share one compilation.

    ``transform`` (e.g. a projection) is applied chunk by chunk of examples.
    """
    return _grads_jit(fn, theta, data, indices_for(data), chunk_size=chunk_size,
                      transform=None if transform is None else as_partial(transform))


def mean_loss(loss: Callable, theta: jax.Array, data: PyTree, *,
              chunk_size: Optional[int] = None) -> jax.Array:
    """(1/n) Σ_i loss(θ, z_i, i): the mean training loss over the WHOLE set."""
    indices = indices_for(data)
    vals = map_examples(lambda zi: loss(theta, zi[0], zi[1]), (data, indices), chunk_size)
    return jnp.mean(vals)


def member_mean(per_member: Callable, members: tuple) -> jax.Array:
    """Average ``per_member(k, member)`` over the ensemble members."""
    total = None
    for k, m in enumerate(members):
        s = per_member(k, m)
        total = s if total is None else total + s
    return total / len(members)
