"""What is attributed, split the way optax splits a transformation from its params:

* :class:`Task`: the functions (a loss, a target), pure, no arrays of the model;
* :class:`Members`: the arrays (checkpoints, dropout keys, LoRA adapters and bases),
  stacked on a leading member axis and passed to every stage as traced data.

A method is built from a Task and hyperparameters; ``cache(members, train)`` takes the
members as an argument, so one compiled program serves every checkpoint of an
architecture and ``jax.make_jaxpr`` of a stage holds no parameter-sized constant.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jattri import _checks
from jattri._jit import jit
from jattri.func.grads import FunctionTable, as_partial, shared

PyTree = Any


def _call_user(fn, params, example, index, aux):
    del index, aux
    return fn(params, example)


def _call_user_output_loss(fn, outputs, example, index, aux):
    del index, aux
    return fn(outputs, example)


_USER = FunctionTable()  # one member function per user function, held weakly
_USER_OUTPUT_LOSS = FunctionTable()


def _member_signature(fn: Callable) -> Partial:
    """A user ``fn(params, example)`` as a member function ``(params, example, index,
    aux)``; one object per ``fn`` so Tasks of the same function share compiled code."""
    return shared(_USER, fn, lambda: Partial(_call_user, as_partial(fn)))


def _output_loss_signature(fn: Callable) -> Partial:
    """A user ``output_loss_fn(outputs, example)`` as ``(outputs, example, index, aux)``."""
    return shared(_USER_OUTPUT_LOSS, fn,
                  lambda: Partial(_call_user_output_loss, as_partial(fn)))


def _split(output, output_loss, names: tuple) -> tuple:
    """The Gauss-Newton split ``(output, output_loss)``: both given or both ``None``."""
    if (output is None) != (output_loss is None):
        raise ValueError(f"`{names[0]}` and `{names[1]}` go together (the split of the loss "
                         "into the model's outputs and a loss of those outputs): give both "
                         "or neither")
    for fn, name in zip((output, output_loss), names):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    return output, output_loss


class Task:
    """The functions attributed: ``Task(loss_fn, target_fn=None)``.

    * ``loss_fn(params, example) -> scalar``: training loss of ONE unbatched example.
    * ``target_fn(params, example) -> scalar``: the quantity attributed on a test
      example, lower = better (default ``loss_fn``). A positive score means training
      on the example lowers the target (helps).

    * ``output_fn(params, example) -> outputs`` and ``output_loss_fn(outputs, example)
      -> scalar`` (optional, together): where the loss splits into the model's outputs
      (logits, predictions: any pytree) and a loss of those outputs that is convex in
      them, with ``loss_fn(p, z) == output_loss_fn(output_fn(p, z), z)``. Methods with
      ``curvature="ggn"`` (``influence_explicit``, ``influence_cg``,
      ``influence_lissa``, ``influence_arnoldi``) use it for the Gauss-Newton matrix
      G = (1/n) Σ_i J_iᵀ ∇²ℓ_i J_i, J_i = ∂output/∂θ (Schraudolph, 2002; Martens,
      2020); scores still use ``loss_fn`` and ``target_fn``.

    Every method factory takes a Task or a bare ``loss_fn`` (shorthand for
    ``Task(loss_fn)``). A Task holds no arrays of the model: checkpoints are
    :class:`Members`, given to ``cache``.

    Internally (and for ensembles, :meth:`from_member_fns`) the functions take
    ``(params, example, index, aux)``: ``index`` is the example's int32 position in
    the dataset, ``aux`` the member's non-differentiated arrays (a dropout key, a LoRA
    base; see :class:`Members`). Both are ``jax.tree_util.Partial`` pytrees: their code
    is static and their bound arrays traced.
    """

    def __init__(self, loss_fn: Callable, target_fn: Optional[Callable] = None, *,
                 output_fn: Optional[Callable] = None,
                 output_loss_fn: Optional[Callable] = None):
        if isinstance(loss_fn, Task):
            raise TypeError("`loss_fn` is already a Task")
        _checks.check_signature(loss_fn, "loss_fn")
        if target_fn is not None:
            _checks.check_signature(target_fn, "target_fn")
        _split(output_fn, output_loss_fn, ("output_fn", "output_loss_fn"))
        self.loss = _member_signature(loss_fn)
        self.target = self.loss if target_fn is None else _member_signature(target_fn)
        self.user_fns = (loss_fn, loss_fn if target_fn is None else target_fn)
        self.output = self.output_loss = None
        if output_fn is not None:
            _checks.check_signature(output_fn, "output_fn")
            _checks.check_signature(output_loss_fn, "output_loss_fn")
            self.output = _member_signature(output_fn)
            self.output_loss = _output_loss_signature(output_loss_fn)
        self.user_split = None if output_fn is None else (output_fn, output_loss_fn)

    @classmethod
    def from_member_fns(cls, loss: Callable, target: Optional[Callable] = None, *,
                        output: Optional[Callable] = None,
                        output_loss: Optional[Callable] = None) -> "Task":
        """A Task from functions of ``(params, example, index, aux)`` (ensembles); the
        optional split likewise: ``output(params, example, index, aux)``,
        ``output_loss(outputs, example, index, aux)``."""
        _split(output, output_loss, ("output", "output_loss"))
        task = cls.__new__(cls)
        task.loss = as_partial(loss)
        task.target = task.loss if target is None else as_partial(target)
        task.user_fns = None
        task.output = None if output is None else as_partial(output)
        task.output_loss = None if output_loss is None else as_partial(output_loss)
        task.user_split = None
        return task

    @property
    def target_is_loss(self) -> bool:
        return self.target is self.loss

    def __repr__(self) -> str:
        return f"Task(loss={self.loss.func}, target_is_loss={self.target_is_loss})"


def as_task(task: Any) -> Task:
    """A Task, or a bare ``loss_fn`` callable as ``Task(loss_fn)``."""
    if isinstance(task, Task):
        return task
    if callable(task):
        return Task(task)
    raise TypeError(f"`task` must be a jattri.Task or a loss_fn(params, example) callable, "
                    f"got {type(task).__name__}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Members:
    """The M ensemble members, as arrays with a leading member axis.

    * ``params``: what gradients are taken with respect to; every leaf has a leading
      axis of size P, where P divides M. Member j uses row ``j // (M // P)``: P = M
      for independent checkpoints; P = 1 for K dropout masks of one model.
    * ``aux``: arrays the functions receive but are not differentiated (dropout keys,
      LoRA bases), leading axis A dividing M (member j uses row ``j // (M // A)``), or
      ``None``.
    * ``num``: M (static).

    Build one with :func:`checkpoints` (a list of params pytrees) or
    ``Members(stacked_params, num=M)``; a bare params pytree given to ``cache`` is one
    checkpoint. Members are a pytree: jit over them, shard them, save them.
    """

    params: PyTree
    aux: PyTree = None
    num: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __post_init__(self):
        if self.num == 0:
            leaves = jax.tree_util.tree_leaves(self.params)
            object.__setattr__(self, "num", int(np.shape(leaves[0])[0]) if leaves else 0)


def _rows(tree: PyTree, name: str) -> Optional[int]:
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree_util.tree_leaves(tree)}
    if not sizes:
        return None
    if -1 in sizes or len(sizes) != 1:
        raise ValueError(f"`members.{name}` leaves must share one leading member axis, got "
                         f"leading sizes {sorted(sizes)}")
    return sizes.pop()


def check_members(members: Members) -> Members:
    if not isinstance(members, Members):
        raise TypeError(f"`members` must be jattri.Members, got {type(members).__name__}")
    m = members.num
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"`members.num` must be a positive int, got {m!r}")
    p = _rows(members.params, "params")
    if p is None:
        raise ValueError("`members.params` holds no arrays")
    for name, rows in (("params", p), ("aux", _rows(members.aux, "aux"))):
        if rows is not None and (rows < 1 or m % rows):
            raise ValueError(f"`members.{name}` has {rows} rows on its member axis, which "
                             f"does not divide the number of members {m}")
    _checks.check_params(members.params, "members.params")
    return members


def _float32(x):
    """Floating leaves narrower than float32 (bfloat16, float16) as float32."""
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.asarray(x, jnp.float32)
    return x


def _computing(members: Members) -> Members:
    """Members as methods compute with them: bfloat16 / float16 params and aux arrays
    upcast to float32 (gradients, projections and curvature of a low-precision model
    would otherwise be accumulated at 8 or 11 bits of mantissa); wider dtypes as
    they are. The upcast copy costs 4 bytes per parameter."""
    leaves = jax.tree_util.tree_leaves((members.params, members.aux))
    if not any(_float32(x) is not x for x in leaves):
        return members
    return Members(jax.tree_util.tree_map(_float32, members.params),
                   jax.tree_util.tree_map(_float32, members.aux), members.num)


def as_members(members: Any) -> Members:
    """:class:`Members` as they are, or a bare params pytree as one checkpoint;
    bfloat16 / float16 leaves computed in float32."""
    if isinstance(members, Members):
        return _computing(check_members(members))
    if isinstance(members, (list, tuple)) and members and all(
            isinstance(p, dict) for p in members):
        raise TypeError("`members` is a list of params pytrees: wrap it as "
                        "jattri.checkpoints([...]) (or pass one params pytree)")
    _checks.check_params(members, "members")
    return _computing(Members(_one_member(members), num=1))


def _on_host(leaves) -> bool:
    """Every leaf is numpy or a jax array on one CPU device (``_checks.on_cpu``, one
    device so that its placement can be kept): then a new member axis is made by numpy
    and one transfer, no compiled program (a program of its own in every first call,
    looked up again in the persistent cache by every later process)."""
    return _checks.on_cpu(leaves) and all(
        not isinstance(x, jax.Array) or len(x.devices()) == 1 for x in leaves)


def _host_put(like, value: np.ndarray):
    """``value`` where ``like`` is: on its device if ``like`` is a committed jax array,
    else uncommitted on the default device (as a compiled program's output from such
    inputs: free to join arrays placed elsewhere, e.g. a dataset sharded on a mesh)."""
    committed = isinstance(like, jax.Array) and like.committed
    return jax.device_put(value, like.sharding if committed else None)


def _one_member(params: PyTree) -> PyTree:
    """A leading member axis of size 1 on every leaf (host leaves: a numpy copy and one
    transfer; elsewhere one compiled call, not one eager op per leaf)."""
    if _on_host(jax.tree_util.tree_leaves(params)):
        return jax.tree_util.tree_map(lambda x: _host_put(x, np.array(x)[None]), params)
    return _one_member_jit(params)


@jit
def _one_member_jit(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[None], params)


def checkpoints(params_list: Sequence[PyTree]) -> Members:
    """Members from a non-empty list of params pytrees of one structure and shapes
    (independent checkpoints, or checkpoints along one training run)."""
    if not isinstance(params_list, (list, tuple)) or not params_list:
        raise TypeError("`checkpoints` takes a non-empty list of params pytrees, got "
                        f"{type(params_list).__name__}")
    ref = jax.tree_util.tree_structure(params_list[0])
    ref_shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(params_list[0])]
    for k, p in enumerate(params_list):
        _checks.check_params(p, f"checkpoints[{k}]")
        if jax.tree_util.tree_structure(p) != ref:
            raise ValueError(f"mismatched checkpoints: checkpoints[{k}] has pytree structure "
                             f"{jax.tree_util.tree_structure(p)}, checkpoints[0] has {ref}")
        shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(p)]
        if shapes != ref_shapes:
            raise ValueError(f"mismatched checkpoints: checkpoints[{k}] has leaf shapes "
                             f"{shapes}, checkpoints[0] has {ref_shapes}")
    return Members(_stack(list(params_list)), num=len(params_list))


def _stack(params_list: list) -> PyTree:
    """The checkpoints stacked leaf by leaf: by numpy and one transfer per leaf when
    every leaf is on the host (see ``_on_host``), else in one compiled program
    (eagerly, one compilation per distinct leaf shape)."""
    if _on_host(jax.tree_util.tree_leaves(params_list)):
        return jax.tree_util.tree_map(
            lambda *xs: _host_put(xs[0], np.stack([np.asarray(x) for x in xs])),
            *params_list)
    return _stack_jit(params_list)


@jit
def _stack_jit(params_list: list) -> PyTree:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params_list)


def _row(tree: PyTree, j, num: int) -> PyTree:
    def take(x):
        rows = x.shape[0]
        return jax.lax.dynamic_index_in_dim(x, j // (num // rows), keepdims=False)
    return jax.tree_util.tree_map(take, tree)


def member(members: Members, j) -> tuple:
    """``(params, aux)`` of member ``j`` (an int or a traced int32)."""
    return _row(members.params, j, members.num), _row(members.aux, j, members.num)


def first_member(members: Members) -> tuple:
    return member(members, 0)


def unstack(stacked: PyTree) -> list:
    """A pytree with a leading axis -> a list of pytrees."""
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, k=k: a[k], stacked) for k in range(n)]


__all__ = ["Members", "Task", "as_members", "as_task", "checkpoints", "member", "unstack"]
