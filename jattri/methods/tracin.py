"""TracInCP (Pruthi et al., 2020, "Estimating Training Data Influence by Tracing
Gradient Descent"), with Grad-Dot and Grad-Cos as its one-checkpoint cases.

Over the members k (checkpoints along a training run, or any ensemble):

    score(i, t) = Σ_k w_k ⟨P_k g_i^k, P_k g_t^k⟩

with g_i^k = ∇loss(z_i) and g_t^k = ∇target(z_t) at member k, P_k an optional JL
projection (one keyed projection per member) and, with ``normalize=True``, each
(projected) gradient divided by its norm (cosine similarity). A positive score means a
gradient step on z_i lowers the target on z_t (to first order), i.e. i helps t.

Stages: with a projection, ``cache`` keeps the projected training gradients
``(n, M, k)``; without one it keeps nothing of size n·d: ``attribute`` recomputes
training gradients chunk by chunk against the test gradients ``(n_test, M, d)``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jattri import _checks, engine
from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args,
                                     random_projection)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Members, as_task

PyTree = Any


class TracInState(NamedTuple):
    """members: the Members scored. train: the in-memory training set (a reference) or
    ``None`` if streamed. train_grads: ``(n, M, k)`` projected (and normalised if asked)
    training gradients, or ``None`` without a projection (recomputed when scoring).
    weights: ``(M,)`` member weights w_k. made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``).

    Memory: n·M·k floats with a projection; none proportional to n without."""

    members: Members
    train: PyTree
    train_grads: Optional[jax.Array]
    weights: jax.Array
    made: _common.Provenance


def _normalize(g: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
    return g / jnp.maximum(norm, jnp.finfo(g.dtype).tiny)


def _check_weights(weights, num_members: int) -> jax.Array:
    if weights is None:
        # Equal weights 1/M: the "average over members" convention of every method;
        # with one member this is Grad-Dot (Grad-Cos with normalize=True).
        return jnp.full((num_members,), 1.0 / num_members)
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"`weights` must be a sequence of real numbers or None, got {weights!r}")
    w = jnp.asarray(weights)
    if w.shape != (num_members,):
        raise ValueError(f"`weights` must have one entry per member, shape ({num_members},), "
                         f"got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"`weights` must be real numbers, got dtype {w.dtype}")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("`weights` contains NaN or inf")
    return w


def _features(config, fn, params, aux, key, chunk):
    """``(size, k)``: one member's gradients of a chunk, projected and normalised as
    configured (``(size, d)`` without a projection)."""
    kind, d, k, proj_chunk, normalize = config
    proj = None if k is None else random_projection(kind, key, d, k, chunk_size=proj_chunk)
    g = _common.chunk_grads(fn, params, aux, chunk, proj)
    return _normalize(g) if normalize else g


def _feature_step(config, args, chunk):
    fn, members, keys = args
    out = _common.member_map(lambda p, a, key: _features(config, fn, p, a, key, chunk),
                             members, keys)
    return jnp.swapaxes(out, 0, 1)  # (size, M, k)


def _stored_tile(config, args, chunk):
    test, weights = args  # (n_test, M, k), (M,)
    return jnp.einsum("bmk,tmk,m->bt", chunk.data, test, weights.astype(test.dtype))


def _recomputed_tile(config, args, chunk):
    loss, members, keys, test, weights = args
    per_member = _common.member_map(
        lambda p, a, key, t: _features(config, loss, p, a, key, chunk) @ t.T,
        members, keys, jnp.swapaxes(test, 0, 1))  # (M, size, n_test)
    return jnp.einsum("mbt,m->bt", per_member, weights.astype(per_member.dtype))


def _self_tile(config, args, chunk):
    weights = args
    left, right = chunk.data
    return jnp.einsum("bmk,bmk,m->b", left, right, weights.astype(left.dtype))


def tracin(task: Any, *, weights: Optional[Sequence[float]] = None,
           proj_dim: Optional[int] = None, projection: str = "auto",
           normalize: bool = False, key: Optional[jax.Array] = None,
           chunk_size: Optional[int] = None,
           proj_chunk_size: Optional[int] = DEFAULT_CHUNK) -> Attributor:
    """TracInCP: score(i, t) = Σ_k w_k ⟨P_k g_i^k, P_k g_t^k⟩ over the members.

    Members vs weights: with ``weights=None`` every member gets w_k = 1/M, so the
    score is the MEAN over members of the one-checkpoint score, like every jattri
    method, and one member gives Grad-Dot exactly. Given ``weights`` (the learning
    rates η_k of the checkpoints, as in the paper) they are used as they are, with no
    further division by M: the score is the paper's sum Σ_k η_k ⟨·,·⟩. Pass
    ``weights = η / M`` for a learning-rate-weighted mean.

    Args:
      task: a :class:`jattri.Task` or a ``loss_fn(params, example)``.
      weights: ``(M,)`` per-member weights w_k (checked against the members given to
        ``cache``), or ``None`` for 1/M each.
      proj_dim: k, the projection dimension; ``None`` uses the raw gradients.
      projection: ``"auto"`` (Gaussian while d·k ≤ 2²⁷, else SJLT), ``"gaussian"``,
        ``"rademacher"`` or ``"sjlt"`` (``jattri.func``); each
        is scaled so inner products are preserved in expectation. Member k uses
        ``fold_in(key, k)``.
      normalize: divide each (projected) gradient by its norm: cosine similarity.
      key: PRNG key of the projections (default ``PRNGKey(0)``).
      chunk_size: examples per compiled step (default: 256 MiB of gradients, 1 GiB
        with a projection);
        proj_chunk_size: parameters projected at a time.

    Memory: state n·M·k floats with a projection, none proportional to n without;
    ``attribute`` holds the test side n_test·M·k (k = d without a projection) and one
    chunk of ``chunk_size`` gradients.
    """
    return _tracin("tracin", task, weights=weights, proj_dim=proj_dim, projection=projection,
                   normalize=normalize, key=key, chunk_size=chunk_size,
                   proj_chunk_size=proj_chunk_size)


def _tracin(name: str, task: Any, *, weights: Optional[Sequence[float]] = None,
            proj_dim: Optional[int] = None, projection: str = "auto",
            normalize: bool = False, key: Optional[jax.Array] = None,
            chunk_size: Optional[int] = None,
            proj_chunk_size: Optional[int] = DEFAULT_CHUNK) -> Attributor:
    """:func:`tracin`, its states marked as made by ``name`` (``grad_dot``, ...)."""
    check_projection_args(projection, proj_dim=proj_dim, proj_chunk_size=proj_chunk_size)
    chunk_size = engine.check_chunk_size(chunk_size)
    _checks.flag(normalize, "normalize")
    if weights is not None:
        _check_weights(weights, len(weights) if hasattr(weights, "__len__") else -1)
    task = as_task(task)
    key = jax.random.PRNGKey(0) if key is None else _checks.prng_key(key)
    k = None if proj_dim is None else int(proj_dim)
    made = _common.hyper(task, weights=weights, proj_dim=proj_dim, projection=projection,
                         normalize=normalize, key=key, proj_chunk_size=proj_chunk_size)

    def config(members):
        return (projection, _common.num_params(members), k, proj_chunk_size, bool(normalize))

    def size(members, data, floats=None):
        projected = floats is None and proj_dim is not None  # gradient steps that project
        return _common.chunk_size_for(chunk_size, members, data, floats, projected=projected)

    def features(members, fn, data):
        args = (fn, members, _common.member_keys(key, members.num))
        return engine.per_example(_feature_step, config(members), args, data,
                                  size(members, data))

    def cache(members, train) -> TracInState:
        members = _common.setup(task, members, train)
        w = _check_weights(weights, members.num)
        grads = None if k is None else features(members, task.loss, train)
        return TracInState(members, _common.stored_train(train), grads, w,
                           _common.provenance(name, made, members, train,
                                              None if grads is None else grads.shape[0]))

    def attribute(state: TracInState, test, *, train=None, top_k=None, lowest=False):
        _common.check_state(state, TracInState, name, made, train=train)
        members = state.members
        _common.check_data(task, members, test, "test", target=True, like=state.train)
        t = features(members, task.target, test)  # (n_test, M, k)
        if state.train_grads is not None:
            rows = state.train_grads
            return engine.score(_stored_tile, None, (t, state.weights), rows,
                                size(members, rows, rows[0].size + t.shape[0]), t.shape[0],
                                t.dtype, top_k=top_k, lowest=lowest)
        rows = _common.train_for(state.train, train)
        args = (task.loss, members, _common.member_keys(key, members.num), t, state.weights)
        return engine.score(_recomputed_tile, config(members), args, rows,
                            size(members, rows), t.shape[0], t.dtype, top_k=top_k,
                            lowest=lowest)

    def self_attribute(state: TracInState, *, train=None):
        _common.check_state(state, TracInState, name, made, train=train)
        members = state.members
        data = (None if state.train_grads is not None and task.target_is_loss else
                _common.train_for(state.train, train))
        left = (state.train_grads if state.train_grads is not None else
                features(members, task.loss, data))
        right = left if task.target_is_loss else features(members, task.target, data)
        rows = (left, right)
        return engine.per_example(_self_tile, None, state.weights, rows,
                                  size(members, rows, 2 * left[0].size))

    return Attributor(cache, attribute, self_attribute)
