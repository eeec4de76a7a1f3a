"""What is attributed: a Task holds ensemble members (params, loss_fn, target_fn)."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.tree_util import Partial

from jattri import _checks
from jattri.func.grads import as_partial, shared

PyTree = Any


class Member(NamedTuple):
    """One ensemble member.

    ``loss_fn(params, example, index)`` and ``target_fn(params, example, index)`` return
    a scalar for ONE unbatched example; ``index`` is the example's position (int32
    scalar) in the dataset being processed, which lets members key per-example
    randomness (dropout masks). Independent checkpoints, dropout masks and LoRA adapters
    are all members.

    The functions are ``jax.tree_util.Partial`` pytrees: what differs between members
    (a dropout key, a LoRA base) is an array leaf, traced like the params, while the
    code is in the treedef; members whose functions differ only in leaves share every
    compiled program. ``Task.from_members`` wraps plain callables
    (``jattri.func.grads.as_partial``).
    """

    params: PyTree
    loss_fn: Callable
    target_fn: Callable


_WITHOUT_INDEX: dict = {}


def _drop_index(fn: Callable) -> Partial:
    """Adapt a user ``fn(params, example)`` to the member signature; one object per
    ``fn``, so Tasks built from the same function share compiled code."""
    def make():
        def member_fn(params, example, index):
            del index
            return fn(params, example)

        member_fn.__wrapped__ = fn
        return Partial(member_fn)

    return shared(_WITHOUT_INDEX, fn, make)


class Task:
    """What to attribute: a loss, a target, and one or more ensemble members.

    ``Task(loss_fn, checkpoints, target_fn=None)``:

    * ``loss_fn(params, example) -> scalar``: training loss of ONE unbatched example.
    * ``checkpoints``: a non-empty list of params pytrees of identical structure and
      shapes (independent checkpoints, or checkpoints along one training run).
    * ``target_fn(params, example) -> scalar``: the quantity attributed on test
      examples, lower = better (defaults to ``loss_fn``). A positive score means that
      training on the example lowers the target (helps).

    Ensemble constructors (``jattri.ensemble``) return new Tasks via ``from_members``.
    """

    def __init__(self, loss_fn: Callable, checkpoints: Sequence[PyTree],
                 target_fn: Optional[Callable] = None):
        _checks.check_signature(loss_fn, "loss_fn")
        if target_fn is not None:
            _checks.check_signature(target_fn, "target_fn")
        if not isinstance(checkpoints, (list, tuple)):
            raise TypeError("`checkpoints` must be a list of params pytrees, got "
                            f"{type(checkpoints).__name__}; wrap a single model as [params]")
        loss = _drop_index(loss_fn)
        target = loss if target_fn is None else _drop_index(target_fn)
        members = tuple(Member(p, loss, target) for p in checkpoints)
        self._init(members, target_is_loss=target_fn is None)

    @classmethod
    def from_members(cls, members: Sequence[Member], *, target_is_loss: bool = False) -> "Task":
        """A Task from explicit members (functions take ``(params, example, index)``)."""
        task = cls.__new__(cls)
        def wrapped(m):
            loss = as_partial(m.loss_fn)
            target = loss if m.target_fn is m.loss_fn else as_partial(m.target_fn)
            return Member(m.params, loss, target)

        task._init(tuple(wrapped(Member(*m)) for m in members), target_is_loss=target_is_loss)
        return task

    def _init(self, members, *, target_is_loss):
        if not members:
            raise ValueError("`checkpoints` is empty: a Task needs at least one member")
        ref = jax.tree_util.tree_structure(members[0].params)
        ref_shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(members[0].params)]
        for k, m in enumerate(members):
            _checks.check_params(m.params, f"checkpoints[{k}]")
            if jax.tree_util.tree_structure(m.params) != ref:
                raise ValueError(f"mismatched checkpoints: checkpoints[{k}] has pytree "
                                 f"structure {jax.tree_util.tree_structure(m.params)}, "
                                 f"checkpoints[0] has {ref}")
            shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(m.params)]
            if shapes != ref_shapes:
                raise ValueError(f"mismatched checkpoints: checkpoints[{k}] has leaf "
                                 f"shapes {shapes}, checkpoints[0] has {ref_shapes}")
        self.members = members
        self.target_is_loss = bool(target_is_loss)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.members[0].params))
        return f"Task(members={self.num_members}, params_per_member={n})"
