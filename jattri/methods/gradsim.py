"""Gradient similarity: Grad-Dot ⟨g_i, g_t⟩ and Grad-Cos ⟨g_i, g_t⟩ / (‖g_i‖‖g_t‖)
(Charpiat et al., 2019, "Input Similarity from the Neural Network Perspective"),
averaged over the task's members.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class GradState(NamedTuple):
    """train: the training data. train_grads: ``(M, n, d)`` (normalised for Grad-Cos)."""

    train: PyTree
    train_grads: jax.Array


def _normalize(g: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
    return g / jnp.maximum(norm, jnp.finfo(g.dtype).tiny)


def _gradient_similarity(task: Task, *, normalize: bool, chunk_size: Optional[int]) -> Attributor:
    members = _common.flat_members(task)
    post = _normalize if normalize else (lambda g: g)

    def grads(k, data, target):
        m = members[k]
        return post(_common.member_grads(m.target if target else m.loss, m.theta, data,
                                         chunk_size=chunk_size))

    def cache(train: PyTree) -> GradState:
        _common.check_train(task, train)
        return GradState(train, jnp.stack([grads(k, train, False) for k in range(len(members))]))

    def attribute(state: GradState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        return _common.member_mean(lambda k, m: state.train_grads[k] @ grads(k, test, True).T,
                                   members)

    def self_attribute(state: GradState) -> jax.Array:
        def one(k, m):
            right = state.train_grads[k] if task.target_is_loss else grads(k, state.train, True)
            return jnp.sum(state.train_grads[k] * right, axis=-1)
        return _common.member_mean(one, members)

    return Attributor(cache, attribute, self_attribute)


def grad_dot(task: Task, *, chunk_size: Optional[int] = None) -> Attributor:
    """Grad-Dot: score(i, t) = ⟨∇loss(z_i), ∇target(z_t)⟩, mean over members."""
    return _gradient_similarity(task, normalize=False, chunk_size=chunk_size)


def grad_cos(task: Task, *, chunk_size: Optional[int] = None) -> Attributor:
    """Grad-Cos: cosine of ∇loss(z_i) and ∇target(z_t), mean over members."""
    return _gradient_similarity(task, normalize=True, chunk_size=chunk_size)
