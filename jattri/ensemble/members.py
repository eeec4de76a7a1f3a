"""Ensemble bookkeeping: the cost record, independent (naive) ensembles, and access to
the user's functions behind a Task.

Deng et al. (2024), "Efficient Ensembles Improve Training Data Attribution", judge an
ensemble on three costs besides attribution quality: training time, serving
(attribution) time and bytes of parameters stored. Every constructor in
``jattri.ensemble`` that trains returns an :class:`EnsembleCosts` with the first and the
last; the serving time depends on the method and is measured by :func:`timed`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from jattri.task import Members, Task, as_task, check_members, unstack

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


def independent(train_fn: Callable, seeds: Sequence[int], loss_fn: Callable,
                target_fn: Optional[Callable] = None) -> Tuple[Task, Members, EnsembleCosts]:
    """The naive ensemble: K models trained independently, one per seed.

    Args:
      train_fn: ``train_fn(seeds) -> params`` with a leading model axis ``K``
        (vmap the training over seeds so the K models train in one program).
      seeds: ``(K,)`` ints, one per model.
      loss_fn, target_fn: the user's per-example functions, as for :class:`Task`.
    Returns:
      ``(task, members, costs)``: ``Task(loss_fn, target_fn)``; ``Members`` of the K
      stacked models as ``train_fn`` returned them (no copy); ``costs.train_seconds``
      is the measured time of ``train_fn`` (compilation included), ``stored_bytes`` K
      models.
    """
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or seeds.size == 0:
        raise ValueError(f"`seeds` must be a non-empty 1-d sequence, got shape {seeds.shape}")
    task = Task(loss_fn, target_fn)
    stacked, seconds = timed(train_fn, seeds)
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1
             for x in jax.tree_util.tree_leaves(stacked)}
    if sizes != {int(seeds.size)}:
        raise ValueError(f"`train_fn` returned models with leading axis sizes {sorted(sizes)} "
                         f"for {seeds.size} seeds")
    members = check_members(Members(stacked, num=int(seeds.size)))
    return task, members, EnsembleCosts(float(seconds), param_bytes(stacked))


def user_functions(task: Any, name: str = "this ensemble") -> Tuple[Callable, Callable]:
    """``(loss_fn, target_fn)``: the user's ``fn(params, example, ...)`` behind a Task.

    Ensembles that call the model differently (with a dropout key) need them; a Task
    built by :meth:`Task.from_member_fns` (another ensemble) has none.
    """
    task = as_task(task)
    if task.user_fns is None:
        raise TypeError(f"{name} needs the user's functions: a Task built as "
                        "jattri.Task(loss_fn, target_fn) (or a bare loss_fn), not one made "
                        "by Task.from_member_fns (another ensemble), whose functions take "
                        "(params, example, index, aux)")
    return task.user_fns


__all__ = ["EnsembleCosts", "independent", "param_bytes", "timed", "unstack",
           "user_functions"]
