"""Ensemble bookkeeping: the cost record, independent (naive) ensembles, and access to
the user's functions behind a Task's members.

Deng et al. (2024), "Efficient Ensembles Improve Training Data Attribution", judge an
ensemble on three costs besides attribution quality: training time, serving
(attribution) time and bytes of parameters stored. Every constructor in
``jattri.ensemble`` returns an :class:`EnsembleCosts` with the first and the last; the
serving time depends on the method and is measured by :func:`timed`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from jattri.task import Member, Task

PyTree = Any


class EnsembleCosts(NamedTuple):
    """What an ensemble costs.

    * ``train_seconds``: wall-clock time to produce every member's parameters (the base
      model included), measured on this machine.
    * ``stored_bytes``: bytes of parameters that must be kept to rebuild the members
      (K models for a naive ensemble; one model for a dropout ensemble; the base plus K
      adapters for a LoRA ensemble).
    * ``attribution_seconds``: serving time of one method on one dataset, ``nan`` until
      measured (see :func:`timed`).
    """

    train_seconds: float
    stored_bytes: int
    attribution_seconds: float = float("nan")


def param_bytes(params: PyTree) -> int:
    """Bytes held by the arrays of a params pytree."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params)))


def block(tree: PyTree) -> PyTree:
    """Wait for every array of ``tree`` (so that wall-clock timings are honest)."""
    return jax.block_until_ready(tree)


def timed(fn: Callable, *args, **kwargs) -> Tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``, waiting for the result's arrays."""
    t0 = time.perf_counter()
    out = block(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def unstack(stacked: PyTree) -> list:
    """A params pytree with a leading model axis -> a list of params pytrees."""
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, k=k: a[k], stacked) for k in range(n)]


def independent(train_fn: Callable, seeds: Sequence[int], loss_fn: Callable,
                target_fn: Optional[Callable] = None) -> Tuple[Task, EnsembleCosts]:
    """The naive ensemble: K models trained independently, one per seed.

    Args:
      train_fn: ``train_fn(seeds) -> params`` with a leading model axis ``K``
        (vmap the training over seeds so the K models train in one program).
      seeds: ``(K,)`` ints, one per model.
      loss_fn, target_fn: the user's per-example functions, as for :class:`Task`.
    Returns:
      ``(task, costs)``: a Task of K members; ``costs.train_seconds`` is the measured
      time of ``train_fn`` (compilation included), ``stored_bytes`` K models.
    """
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or seeds.size == 0:
        raise ValueError(f"`seeds` must be a non-empty 1-d sequence, got shape {seeds.shape}")
    stacked, seconds = timed(train_fn, seeds)
    models = unstack(stacked)
    if len(models) != seeds.size:
        raise ValueError(f"`train_fn` returned {len(models)} models for {seeds.size} seeds")
    task = Task(loss_fn, models, target_fn)
    return task, EnsembleCosts(float(seconds), param_bytes(stacked))


def user_functions(task: Task) -> list:
    """``[(params, loss_fn, target_fn)]`` with the user's ``fn(params, example, ...)``.

    A :class:`Task` built from ``Task(loss_fn, checkpoints, target_fn)`` wraps the
    user's functions to the member signature ``(params, example, index)`` and keeps
    the original as ``__wrapped__``; ensembles that need to call the model differently
    (with a dropout key) unwrap it.
    """
    out = []
    for k, m in enumerate(task.members):
        fns = []
        for f, name in ((m.loss_fn, "loss_fn"), (m.target_fn, "target_fn")):
            user = getattr(getattr(f, "func", f), "__wrapped__", None)
            if user is None:
                raise TypeError(
                    f"member {k}'s {name} has no `__wrapped__` user function: this ensemble "
                    "needs a Task built as Task(loss_fn, checkpoints, target_fn) whose "
                    "functions accept an `rng` keyword")
            fns.append(user)
        out.append((m.params, fns[0], fns[1]))
    return out


__all__ = ["EnsembleCosts", "Member", "independent", "param_bytes", "timed", "unstack",
           "user_functions"]
