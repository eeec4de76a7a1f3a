"""Dropout ensembles (Deng et al., 2024, "Efficient Ensembles Improve Training Data
Attribution", §3): one trained model, K members that differ only by dropout masks.

Contract with the user's functions: ``loss_fn(params, example, rng=None)`` (likewise
``target_fn``). With ``rng=None`` dropout is off; with a key it is on under that key
(a Flax linen model: ``model.apply(..., deterministic=False, rngs={"dropout": rng})``).

Member j of the ensemble (j = c·K + m for input member c and mask m) draws its masks
from ``k_j = fold_in(key, j)``, held as the member's ``aux`` (a traced array: every
member shares one compiled program):

* ``mode="member"``: every example is processed with key ``k_j``: member j is one fixed
  sub-network, and its train-side (loss) and test-side (target) gradients use the same
  mask. The mask is a function of (key, j) only.
* ``mode="example"``: example i is processed with ``fold_in(k_j, i)``, i its position
  in the dataset being scored: a fresh mask per example (the reference's behaviour,
  where the torch model is simply left in train mode). Note that train example i and
  test example i share a mask key.

The members' params are the input members' (P rows, not copied K times): member j uses
params row ``j // (M // P)`` (see :class:`jattri.Members`).

``dropout_trak`` is the cheap TRAK variant of the paper: gradients from the plain model,
only the Q = 1 − p term averaged over the K masks (forward passes only).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri import _checks, engine
from jattri._checks import check_signature
from jattri.ensemble.members import user_functions
from jattri.func.grads import shared
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.methods.trak import TrakState, trak
from jattri.task import Members, Task, as_members

PyTree = Any

MODES = ("member", "example")


def _check(task, num_masks, mode, rate):
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"`num_masks` must be a positive int, got {num_masks!r}")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    _checks.real(rate, "rate", low=0.0, high=1.0, open_high=True, none=True)
    loss, target = user_functions(task, "a dropout ensemble")
    extra = {"rng": None} if rate is None else {"rng": None, "rate": 0.0}
    check_signature(loss, "loss_fn", **extra)
    check_signature(target, "target_fn", **extra)
    return loss, target


_MASKED: dict = {}


def _masked(fn: Callable, mode: str, rate: Optional[float]) -> Partial:
    """``fn(params, example, rng=...)`` as a member function ``(params, example, index,
    aux)`` whose ``aux`` is the member's mask key; one object per (fn, mode, rate), so
    every dropout ensemble of one function shares its compiled programs."""
    def make():
        kw = {} if rate is None else {"rate": rate}
        if mode == "member":
            def member_fn(params, example, index, key):
                del index  # one sub-network per member: the mask ignores the example
                return fn(params, example, rng=key, **kw)
        else:
            def member_fn(params, example, index, key):
                return fn(params, example, rng=jax.random.fold_in(key, index), **kw)
        member_fn.__wrapped__ = fn
        return Partial(member_fn)

    return shared(_MASKED, (fn, mode, rate), make)


def mask_keys(key: jax.Array, num_members: int) -> jax.Array:
    """``(num_members,)`` member keys ``fold_in(key, j)``."""
    return _common.member_keys(key, num_members)


def dropout(task: Any, members: Any, num_masks: int, key: jax.Array, *,
            rate: Optional[float] = None, mode: str = "member") -> Tuple[Task, Members]:
    """A dropout ensemble: every input member times ``num_masks`` dropout masks.

    Scores of any method on the returned ``(task, members)`` average over the
    M = P·K members, each with its own mask key (see the module docstring).

    Args:
      task: a :class:`jattri.Task` (or a bare ``loss_fn``) built from the user's
        functions, which accept ``rng=`` (the dropout key; ``None`` = off).
      members: the input :class:`jattri.Members` (checkpoints, or one params pytree);
        they carry no ``aux``.
      num_masks: K, masks per input member.
      key: PRNG key of the masks; the same key gives the same members.
      rate: ``None`` keeps the model's own dropout rate; a float is passed to the
        user's functions as the keyword ``rate=`` (they must accept it: a linen model
        can be rebuilt with ``model.clone(dropout_rate=rate)``).
      mode: ``"member"`` (one mask per member, shared by train and test gradients) or
        ``"example"`` (a fresh mask per example).
    Returns:
      ``(task, members)``: a Task whose functions run the user's under member j's mask
      key, and Members with ``params`` = the input params (nothing is copied: the
      ensemble stores one model per input member) and ``aux`` = ``(M,)`` mask keys.
    """
    _checks.prng_key(key)
    loss, target = _check(task, num_masks, mode, rate)
    members = as_members(members)
    if members.aux is not None:
        raise ValueError("`members` of a dropout ensemble are plain checkpoints (no `aux`); "
                         "these carry aux arrays of another ensemble")
    num = members.num * num_masks
    loss_m = _masked(loss, mode, rate)
    target_m = None if target is loss else _masked(target, mode, rate)
    out = Members(members.params, aux=mask_keys(key, num), num=num)
    return Task.from_member_fns(loss_m, target_m), out


def _q_chunk(config, args, chunk):
    loss, members = args

    def one(params, aux):
        return jax.vmap(loss, (None, 0, 0, None))(params, chunk.data, chunk.index, aux)

    losses = _common.member_map(one, members)  # (M, size)
    return jnp.mean(-jnp.expm1(-losses), axis=0)


def dropout_q(task: Any, members: Any, num_masks: int, key: jax.Array, data: Any, *,
              rate: Optional[float] = None, mode: str = "member",
              chunk_size: Optional[int] = None) -> jax.Array:
    """``(n,)`` mean over members and masks of Q = 1 − p, p = exp(−loss) under dropout.

    The masks are those of ``dropout(task, members, num_masks, key, rate=rate,
    mode=mode)``. Forward passes only: no gradients. ``data``: in memory (jittable)
    or a :class:`jattri.Stream`. Memory: ``chunk_size`` examples' activations for one
    member at a time, and the ``(n,)`` result.
    """
    dtask, dmembers = dropout(task, members, num_masks, key, rate=rate, mode=mode)
    size = _common.chunk_size_for(engine.check_chunk_size(chunk_size), dmembers, data)
    return engine.per_example(_q_chunk, None, (dtask.loss, dmembers), data, size)


def dropout_trak(task: Any, num_masks: int, key: jax.Array, *, rate: Optional[float] = None,
                 mode: str = "member", chunk_size: Optional[int] = None,
                 **trak_kwargs) -> Attributor:
    """TRAK whose Q term alone is averaged over a dropout ensemble (the paper's cheap
    variant):

        score(i, t) = [mean_c Φ_c (Φ_cᵀΦ_c + λI)⁻¹ φ_t,cᵀ]_i · mean_{c,m} (1 − p_c,m,i)

    Φ_c are the projected margin gradients of the plain (dropout-off) members c given to
    ``cache``, exactly as in ``jattri.trak(task, ...)``; p_c,m,i = exp(−loss) of
    training example i under mask m of member c (masks as in :func:`dropout`). The
    extra cost over TRAK is K forward passes over the training set per member.

    Args:
      task, num_masks, key, rate, mode: as in :func:`dropout`.
      chunk_size: examples per compiled step.
      **trak_kwargs: forwarded to ``jattri.trak`` (``proj_dim``, ``damping``, ...); the
        projection key, ``key=`` there, is passed here as ``proj_key=`` (``key`` is
        the masks').
    Returns:
      an Attributor; ``cache(members, train)`` is TRAK's with Q replaced (memory as
      TRAK's), ``attribute`` and ``self_attribute`` are TRAK's.
    """
    if "prob_fn" in trak_kwargs:
        raise ValueError("`prob_fn` is not supported by dropout_trak: Q is computed from "
                         "the loss under dropout as 1 − exp(−loss)")
    _checks.prng_key(key)
    _check(task, num_masks, mode, rate)
    proj_key = trak_kwargs.pop("proj_key", None)
    base = trak(task, key=proj_key, chunk_size=chunk_size, **trak_kwargs)

    def cache(members, train) -> TrakState:
        state = base.cache(members, train)
        q = dropout_q(task, state.members, num_masks, key, train, rate=rate, mode=mode,
                      chunk_size=chunk_size)
        return state._replace(q=q.astype(state.q.dtype))

    return Attributor(cache, base.attribute, base.self_attribute)


__all__ = ["MODES", "dropout", "dropout_q", "dropout_trak", "mask_keys"]
