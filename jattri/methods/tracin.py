"""TracInCP (Pruthi et al., 2020, "Estimating Training Data Influence by Tracing
Gradient Descent"), with Grad-Dot and Grad-Cos as its one-checkpoint cases.

Over the task's members k (checkpoints along a training run, or any ensemble):

    score(i, t) = Σ_k w_k ⟨P_k g_i^k, P_k g_t^k⟩

with g_i^k = ∇loss(z_i) and g_t^k = ∇target(z_t) at member k, P_k an optional JL
projection (one keyed projection per member) and, with ``normalize=True``, each
(projected) gradient divided by its norm (cosine similarity). A positive score means a
gradient step on z_i lowers the target on z_t (to first order), i.e. i helps t.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args,
                                     random_projection)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class TracInState(NamedTuple):
    """train: the training data. train_grads: ``(M, n, k)`` per-member training
    gradients, projected (k = proj_dim, else d) and normalised if asked.
    weights: ``(M,)`` checkpoint weights w_k."""

    train: PyTree
    train_grads: jax.Array
    weights: jax.Array


def _normalize(g: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
    return g / jnp.maximum(norm, jnp.finfo(g.dtype).tiny)


def _check_weights(weights, num_members: int) -> jax.Array:
    if weights is None:
        # Equal weights 1/M: the "average over members" convention of every method;
        # with one member this is Grad-Dot (Grad-Cos with normalize=True).
        return jnp.full((num_members,), 1.0 / num_members)
    w = jnp.asarray(weights)
    if w.shape != (num_members,):
        raise ValueError(f"`weights` must have one entry per task member, shape "
                         f"({num_members},), got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"`weights` must be real numbers, got dtype {w.dtype}")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("`weights` contains NaN or inf")
    return w


def _normalized(proj, g):
    return _normalize(g if proj is None else proj(g))


def _transform(key, d, config) -> Optional[Partial]:
    """The projection (key as a traced leaf) then, if asked, the normalisation."""
    projection, proj_dim, proj_chunk_size, normalize = config
    proj = (None if proj_dim is None else
            random_projection(projection, key, d, proj_dim, chunk_size=proj_chunk_size))
    return Partial(_normalized, proj) if normalize else proj


def tracin(task: Task, *, weights: Optional[Sequence[float]] = None,
           proj_dim: Optional[int] = None, projection: str = "gaussian",
           normalize: bool = False, key: Optional[jax.Array] = None,
           chunk_size: Optional[int] = None,
           proj_chunk_size: Optional[int] = DEFAULT_CHUNK) -> Attributor:
    """TracInCP: score(i, t) = Σ_k w_k ⟨P_k g_i^k, P_k g_t^k⟩ over the task's members.

    Members vs weights: with ``weights=None`` every member gets w_k = 1/M, so the
    score is the MEAN over members of the one-checkpoint score, like every jattri
    method, and a one-member Task gives Grad-Dot exactly. Given ``weights`` (the
    learning rates η_k of the checkpoints, as in the paper) they are used as they are,
    with no further division by M: the score is the paper's sum Σ_k η_k ⟨·,·⟩. Pass
    ``weights = η / M`` for a learning-rate-weighted mean.

    Args:
      task: the Task; its members are the checkpoints.
      weights: ``(M,)`` per-member weights w_k, or ``None`` for 1/M each.
      proj_dim: k, the projection dimension; ``None`` uses the raw gradients.
      projection: ``"gaussian"``, ``"rademacher"`` or ``"sjlt"`` (``jattri.func``); each
        is scaled so inner products are preserved in expectation. Member k uses
        ``fold_in(key, k)``.
      normalize: divide each (projected) gradient by its norm: cosine similarity.
      key: PRNG key of the projections (default ``PRNGKey(0)``).
      chunk_size: examples per vectorised chunk; proj_chunk_size: parameters projected
        at a time.
    Returns:
      An Attributor; ``cache`` stores the ``(M, n, k)`` training gradients.
    """
    check_projection_args(projection, proj_dim=proj_dim)
    if not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task, got {type(task).__name__}")
    members = _common.flat_members(task)
    w = _check_weights(weights, len(members))
    key = jax.random.PRNGKey(0) if key is None else key
    config = (projection, None if proj_dim is None else int(proj_dim), proj_chunk_size,
              bool(normalize))
    transforms = [_transform(jax.random.fold_in(key, k), m.theta.shape[0], config)
                  for k, m in enumerate(members)]

    def grads(k, data, target):
        m = members[k]
        return _common.member_grads(m.target if target else m.loss, m.theta, data,
                                    chunk_size=chunk_size, transform=transforms[k])

    def weighted_sum(weights, per_member):
        total = 0.0
        for k in range(len(members)):
            s = per_member(k)
            total = total + weights[k].astype(s.dtype) * s
        return total

    def cache(train: PyTree) -> TracInState:
        _common.check_train(task, train)
        return TracInState(train, jnp.stack([grads(k, train, False)
                                             for k in range(len(members))]), w)

    def attribute(state: TracInState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        return weighted_sum(state.weights, lambda k: state.train_grads[k] @ grads(k, test, True).T)

    def self_attribute(state: TracInState) -> jax.Array:
        def one(k):
            right = state.train_grads[k] if task.target_is_loss else grads(k, state.train, True)
            return jnp.sum(state.train_grads[k] * right, axis=-1)
        return weighted_sum(state.weights, one)

    return Attributor(cache, attribute, self_attribute)
