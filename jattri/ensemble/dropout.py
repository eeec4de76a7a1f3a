"""Dropout ensembles (Deng et al., 2024, "Efficient Ensembles Improve Training Data
Attribution", §3): one trained model, K members that differ only by dropout masks.

Contract with the user's functions: ``loss_fn(params, example, rng=None)`` (likewise
``target_fn``). With ``rng=None`` dropout is off; with a key it is on under that key
(a Flax linen model: ``model.apply(..., deterministic=False, rngs={"dropout": rng})``).

Member j of the ensemble (j = c·K + m for base member c and mask m) draws its masks
from ``k_j = fold_in(key, j)``:

* ``mode="member"``: every example is processed with key ``k_j``: member j is one fixed
  sub-network, and its train-side (loss) and test-side (target) gradients use the same
  mask. The mask is a function of (key, j) only.
* ``mode="example"``: example i is processed with ``fold_in(k_j, i)``, i its position
  in the dataset being scored: a fresh mask per example (the reference's behaviour,
  where the torch model is simply left in train mode). Note that train example i and
  test example i share a mask key.

``dropout_trak`` is the cheap TRAK variant of the paper: gradients from the plain model,
only the Q = 1 − p term averaged over the K masks (forward passes only).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri._checks import check_signature
from jattri.ensemble.members import user_functions
from jattri.func.grads import map_examples, shared
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.methods.trak import TrakState, trak
from jattri.task import Member, Task

PyTree = Any

MODES = ("member", "example")


def _check(task, num_masks, mode, rate):
    if not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task, got {type(task).__name__}")
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"`num_masks` must be a positive int, got {num_masks!r}")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if rate is not None and not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"`rate` must be None or in [0, 1), got {rate}")
    fns = user_functions(task)
    extra = {"rng": None} if rate is None else {"rng": None, "rate": 0.0}
    for _, loss, target in fns[:1]:
        check_signature(loss, "loss_fn", **extra)
        check_signature(target, "target_fn", **extra)
    return fns


_MASKED: dict = {}


def _masked(fn: Callable, member_key: jax.Array, mode: str, rate: Optional[float]) -> Partial:
    """``fn(params, example, rng=...)`` as a member function ``(params, example, index)``
    whose mask key is a traced leaf: the members of one ensemble share their code (one
    object per (fn, mode, rate)) and so every compiled program."""
    def make():
        kw = {} if rate is None else {"rate": rate}
        if mode == "member":
            def member_fn(key, params, example, index):
                del index  # one sub-network per member: the mask ignores the example
                return fn(params, example, rng=key, **kw)
        else:
            def member_fn(key, params, example, index):
                return fn(params, example, rng=jax.random.fold_in(key, index), **kw)
        member_fn.__wrapped__ = fn
        return member_fn

    return Partial(shared(_MASKED, (fn, mode, rate), make), member_key)


def mask_keys(key: jax.Array, num_members: int) -> jax.Array:
    """``(num_members,)`` member keys ``fold_in(key, j)``."""
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_members))


def dropout(task: Task, num_masks: int, key: jax.Array, *, rate: Optional[float] = None,
            mode: str = "member") -> Task:
    """A dropout ensemble: every member of ``task`` times ``num_masks`` dropout masks.

    Scores of any method on the returned Task average over the ``len(task.members) ×
    num_masks`` members, each with its own mask key (see the module docstring).

    Args:
      task: a Task built as ``Task(loss_fn, checkpoints, target_fn)`` whose functions
        accept ``rng=`` (the dropout key; ``None`` = off).
      num_masks: K, masks per base member.
      key: PRNG key of the masks; the same key gives the same members.
      rate: ``None`` keeps the model's own dropout rate; a float is passed to the
        user's functions as the keyword ``rate=`` (they must accept it: a linen model
        can be rebuilt with ``model.clone(dropout_rate=rate)``).
      mode: ``"member"`` (one mask per member, shared by train and test gradients) or
        ``"example"`` (a fresh mask per example).
    Returns:
      a new Task; its parameters are shared with ``task`` (nothing is copied), so the
      ensemble stores one model per base member.
    """
    fns = _check(task, num_masks, mode, rate)
    keys = mask_keys(key, len(fns) * num_masks)
    members = []
    for c, (params, loss, target) in enumerate(fns):
        for m in range(num_masks):
            k = keys[c * num_masks + m]
            loss_m = _masked(loss, k, mode, rate)
            target_m = loss_m if task.target_is_loss else _masked(target, k, mode, rate)
            members.append(Member(params, loss_m, target_m))
    return Task.from_members(members, target_is_loss=task.target_is_loss)


def dropout_q(task: Task, num_masks: int, key: jax.Array, data: PyTree, *,
              rate: Optional[float] = None, mode: str = "member",
              chunk_size: Optional[int] = None) -> jax.Array:
    """``(n,)`` mean over members and masks of Q = 1 − p, p = exp(−loss) under dropout.

    The masks are those of ``dropout(task, num_masks, key, rate=rate, mode=mode)``.
    Forward passes only: no gradients.
    """
    fns = _check(task, num_masks, mode, rate)
    keys = mask_keys(key, len(fns) * num_masks).reshape((len(fns), num_masks) + key.shape)
    kw = {} if rate is None else {"rate": rate}
    idx = _common.indices_for(data)
    total = 0.0
    for c, (params, loss, _) in enumerate(fns):
        def q_all_masks(zi, loss=loss, params=params, c=c):
            z, i = zi
            def q(k):
                rng = k if mode == "member" else jax.random.fold_in(k, i)
                return -jnp.expm1(-loss(params, z, rng=rng, **kw))
            return jnp.mean(jax.vmap(q)(keys[c]))
        total = total + jax.jit(lambda d: map_examples(q_all_masks, d, chunk_size))((data, idx))
    return total / len(fns)


def dropout_trak(task: Task, num_masks: int, key: jax.Array, *, rate: Optional[float] = None,
                 mode: str = "member", chunk_size: Optional[int] = None,
                 **trak_kwargs) -> Attributor:
    """TRAK whose Q term alone is averaged over a dropout ensemble (the paper's cheap
    variant):

        score(i, t) = [mean_c Φ_c (Φ_cᵀΦ_c + λI)⁻¹ φ_t,cᵀ]_i · mean_{c,m} (1 − p_c,m,i)

    Φ_c are the projected margin gradients of the plain (dropout-off) base members c,
    exactly as in ``jattri.trak(task, ...)``; p_c,m,i = exp(−loss) of training example
    i under mask m of member c (masks as in :func:`dropout`). The extra cost over
    single-model TRAK is K forward passes over the training set.

    Args:
      task, num_masks, key, rate, mode: as in :func:`dropout`.
      chunk_size: examples per vectorised chunk.
      **trak_kwargs: forwarded to ``jattri.trak`` (``proj_dim``, ``damping``, ...); the
        projection key, ``key=`` there, is passed here as ``proj_key=`` (``key`` is
        the masks').
    """
    if "prob_fn" in trak_kwargs:
        raise ValueError("`prob_fn` is not supported by dropout_trak: Q is computed from "
                         "the loss under dropout as 1 − exp(−loss)")
    _check(task, num_masks, mode, rate)
    proj_key = trak_kwargs.pop("proj_key", None)
    base = trak(task, key=proj_key, chunk_size=chunk_size, **trak_kwargs)

    def cache(train: PyTree) -> TrakState:
        state = base.cache(train)
        q = dropout_q(task, num_masks, key, train, rate=rate, mode=mode, chunk_size=chunk_size)
        return state._replace(q=q.astype(state.q.dtype))

    return Attributor(cache, base.attribute, base.self_attribute)


__all__ = ["MODES", "dropout", "dropout_q", "dropout_trak", "mask_keys"]
