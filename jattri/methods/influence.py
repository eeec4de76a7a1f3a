"""Influence functions (Koh & Liang, 2017, "Understanding Black-box Predictions via
Influence Functions"): score(i, t) = g_iᵀ (H + λI)⁻¹ g_t, where H is the Hessian of the
MEAN training loss over the whole training set (never per batch), g_i = ∇loss(z_i) and
g_t = ∇target(z_t). Positive = up-weighting z_i lowers the target on z_t.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jattri.func.hessian import cg_solve, damped_inverse, hvp
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class ExplicitInfluenceState(NamedTuple):
    """train: the training data. train_grads, ihvp_train: ``(M, n, d)`` for M members."""

    train: PyTree
    train_grads: jax.Array
    ihvp_train: jax.Array


class CGInfluenceState(NamedTuple):
    """train: the training data. train_grads: ``(M, n, d)``."""

    train: PyTree
    train_grads: jax.Array


@partial(jax.jit, static_argnums=(0, 3))
def _mean_loss_hessian(loss, theta, data, chunk_size):
    return jax.hessian(lambda t: _common.mean_loss(loss, t, data, chunk_size=chunk_size))(theta)


@partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _cg_ihvp(loss, theta, data, vectors, maxiter, tol, chunk_size, damping):
    f = lambda t: _common.mean_loss(loss, t, data, chunk_size=chunk_size)
    matvec = lambda x: hvp(f, theta, x) + damping * x
    return cg_solve(matvec, vectors, maxiter=maxiter, tol=tol)


def _target_grads(members, data, chunk_size, k):
    m = members[k]
    return _common.member_grads(m.target, m.theta, data, chunk_size=chunk_size)


def _check_damping(damping):
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}")


def influence_explicit(task: Task, *, damping: float = 1e-3,
                       chunk_size: Optional[int] = None) -> Attributor:
    """Influence with the dense Hessian: score(i, t) = g_iᵀ (H + λI)⁻¹ g_t.

    For small models (d ≲ 10⁴ parameters): builds the ``(d, d)`` Hessian of the mean
    training loss for every member, inverts it by eigendecomposition (a singular
    ``H + λI`` raises ``ValueError``) and stores ``(H + λI)⁻¹ g_i`` for every training
    example in ``cache``. Scores are averaged over the task's members.

    Args:
      task: the Task. damping: λ ≥ 0. chunk_size: examples per vectorised chunk.
    """
    _check_damping(damping)
    members = _common.flat_members(task)

    def cache(train: PyTree) -> ExplicitInfluenceState:
        _common.check_train(task, train)
        grads, ihvps = [], []
        for m in members:
            g = _common.member_grads(m.loss, m.theta, train, chunk_size=chunk_size)
            h = _mean_loss_hessian(m.loss, m.theta, train, chunk_size)
            grads.append(g)
            ihvps.append(g @ damped_inverse(h, damping))
        return ExplicitInfluenceState(train, jnp.stack(grads), jnp.stack(ihvps))

    def attribute(state: ExplicitInfluenceState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        return _common.member_mean(
            lambda k, m: state.ihvp_train[k] @ _target_grads(members, test, chunk_size, k).T,
            members)

    def self_attribute(state: ExplicitInfluenceState) -> jax.Array:
        if task.target_is_loss:
            return jnp.mean(jnp.sum(state.ihvp_train * state.train_grads, axis=-1), axis=0)
        return _common.member_mean(
            lambda k, m: jnp.sum(state.ihvp_train[k] *
                                 _target_grads(members, state.train, chunk_size, k), -1),
            members)

    return Attributor(cache, attribute, self_attribute)


def influence_cg(task: Task, *, damping: float = 1e-3, maxiter: int = 100, tol: float = 1e-6,
                 chunk_size: Optional[int] = None) -> Attributor:
    """Influence with (H + λI)⁻¹ g_t by conjugate gradients on exact HVPs.

    ``cache`` stores the training gradients; ``attribute`` solves one CG system per
    test example (vmapped), each Hessian-vector product taken over the whole training
    set (``jax.scipy.sparse.linalg.cg``). H + λI must be positive definite: on a
    non-convex loss choose λ above minus the smallest Hessian eigenvalue.

    Args:
      task: the Task. damping: λ ≥ 0. maxiter: CG iterations. tol: relative residual.
      chunk_size: examples per vectorised chunk (gradients and HVPs).
    """
    _check_damping(damping)
    members = _common.flat_members(task)

    def cache(train: PyTree) -> CGInfluenceState:
        _common.check_train(task, train)
        grads = [_common.member_grads(m.loss, m.theta, train, chunk_size=chunk_size)
                 for m in members]
        return CGInfluenceState(train, jnp.stack(grads))

    def _solve(state, k, vectors):
        m = members[k]
        return _cg_ihvp(m.loss, m.theta, state.train, vectors, maxiter, tol, chunk_size,
                        damping)

    def attribute(state: CGInfluenceState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        return _common.member_mean(
            lambda k, m: state.train_grads[k] @ _solve(
                state, k, _target_grads(members, test, chunk_size, k)).T,
            members)

    def self_attribute(state: CGInfluenceState) -> jax.Array:
        def one(k, m):
            right = (state.train_grads[k] if task.target_is_loss else
                     _target_grads(members, state.train, chunk_size, k))
            return jnp.sum(state.train_grads[k] * _solve(state, k, right), axis=-1)
        return _common.member_mean(one, members)

    return Attributor(cache, attribute, self_attribute)
