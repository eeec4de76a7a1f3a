"""LoRA ensembles (Deng et al., 2024, "Efficient Ensembles Improve Training Data
Attribution", §3; LoRA: Hu et al., 2022): one trained base model, K low-rank adapters.

For every chosen 2-d weight ``W: (d_in, d_out)`` (a Dense ``kernel``), adapter k adds

    W_k = W + (α / r) A_k B_k,    A_k: (d_in, r) ~ N(0, 1/d_in),  B_k: (r, d_out) = 0 at init

and is fine-tuned briefly on the training loss from its own key (init of A_k and data
order), the base frozen. Member k's parameters ARE its adapters: every method then
differentiates with respect to the adapters only, so per-example gradients have
Σ r (d_in + d_out) entries instead of the model's size.

The delta is written around the params pytree rather than as ``flax.nnx.LoRA`` modules:
it is the same function ``x (W + (α/r) A B) + b`` as ``nnx.LoRA`` wrapped around a Dense,
and it works for any model whose params are a pytree (linen, nnx state, plain dicts)
without rebuilding the model.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial
import numpy as np

from jattri import _checks
from jattri._jit import jit
from jattri.ensemble.members import EnsembleCosts, param_bytes, timed
from jattri.methods import _common
from jattri.task import Members, Task, as_members, as_task, check_members, first_member, member

PyTree = Any


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                    for p in path)


def lora_targets(params: PyTree, layers: Optional[Sequence[str]] = None
                 ) -> Dict[str, jax.ShapeDtypeStruct]:
    """``{path: ShapeDtypeStruct((d_in, d_out), dtype)}`` of the 2-d ``kernel`` leaves
    that get adapters.

    ``layers``: names of the layers to adapt (a leaf is chosen when one of its path
    components equals a name, e.g. ``("fc2", "fc3")``); ``None``: every 2-d kernel.
    """
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [_path_name([p]) for p in path]
        if names[-1] != "kernel" or np.ndim(leaf) != 2:
            continue
        if layers is None or any(n in layers for n in names[:-1]):
            found[_path_name(path)] = jax.ShapeDtypeStruct(np.shape(leaf),
                                                           jnp.result_type(leaf))
    if not found:
        raise ValueError(f"`layers`={layers!r} selects no 2-d `kernel` parameter; paths "
                         "with kernels: " + ", ".join(
                             _path_name(p) for p, _ in
                             jax.tree_util.tree_flatten_with_path(params)[0]))
    if layers is not None:
        missing = [n for n in layers if not any(n in k.split("/") for k in found)]
        if missing:
            raise ValueError(f"`layers` names {missing} match no 2-d kernel; found "
                             f"{sorted(found)}")
    return found


def init_adapters(key: jax.Array, targets: Dict[str, jax.ShapeDtypeStruct],
                  rank: int) -> Dict[str, Dict[str, jax.Array]]:
    """Adapters ``{path: {"a": (d_in, r), "b": (r, d_out)}}`` in the kernel's dtype;
    A ~ N(0, 1/d_in), B = 0 (so every member starts as the base model)."""
    out = {}
    for j, (path, leaf) in enumerate(sorted(targets.items())):
        (d_in, d_out), dtype = leaf.shape, leaf.dtype
        a = jax.random.normal(jax.random.fold_in(key, j), (d_in, rank), dtype) / np.sqrt(d_in)
        out[path] = {"a": a, "b": jnp.zeros((rank, d_out), dtype)}
    return out


def merge(base: PyTree, adapters: Dict[str, Dict[str, jax.Array]], scale: float) -> PyTree:
    """Base params with ``W + scale · A B`` on every adapted kernel."""
    def one(path, w):
        ad = adapters.get(_path_name(path))
        return w if ad is None else w + scale * (ad["a"] @ ad["b"]).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(one, base)


def _adapted_call(fn, scale, adapters, example, index, base):
    return fn(merge(base, adapters, scale), example, index, None)


def _adapted(fn: Callable, scale: float) -> Partial:
    """The member function of an adapter: ``(adapters, example, index, base)`` ->
    ``fn(base + scale·AB, example, index)``; the base params are the member's ``aux``
    (traced), so adapters on different bases share compiled code."""
    return Partial(_adapted_call, fn, scale)


def lora(task: Any, members: Any, train: PyTree, num_adapters: int, key: jax.Array, *,
         rank: int = 4, layers: Optional[Sequence[str]] = None, alpha: Optional[float] = None,
         steps: int = 200, batch_size: int = 50, learning_rate: float = 1e-3,
         base_train_seconds: float = 0.0) -> Tuple[Task, Members, EnsembleCosts]:
    """A LoRA ensemble: ``num_adapters`` adapters fine-tuned on each base member.

    Each adapter k of base member c (key ``fold_in(key, c·K + k)``) is trained for
    ``steps`` Adam steps on minibatches of the mean training loss
    ``(1/b) Σ loss(W + (α/r)A_k B_k; z_i)``, the base frozen; the K adapters of a base
    train in one vmapped program.

    Args:
      task: a :class:`jattri.Task` (or a bare ``loss_fn``) of the base model: ``loss``
        for fine-tuning and train gradients, ``target`` on test examples.
      members: the C base models (:class:`jattri.Members` without ``aux``, or one params
        pytree).
      train: training data (pytree, leading example axis).
      num_adapters: K. key: PRNG key of the adapters (init and data order).
      rank: r. layers: layer names to adapt (default: every 2-d kernel).
      alpha: LoRA scale numerator (default ``rank``, i.e. scale 1).
      steps, batch_size, learning_rate: the fine-tuning.
      base_train_seconds: training time of the base model, added to the reported cost.
    Returns:
      ``(task, members, costs)``: a Task whose functions merge base and adapter; Members
      of C·K members with ``params`` = the adapters (``(C·K, ...)`` leaves: every method
      differentiates with respect to them only) and ``aux`` = the base params (C rows,
      not copied: member j uses base ``j // K``); ``costs.train_seconds`` = base +
      measured fine-tuning (compilation included), ``stored_bytes`` = base models + all
      adapters.
    """
    task = as_task(task)
    members = as_members(members)
    if members.aux is not None:
        raise ValueError("`members` of a LoRA ensemble are plain checkpoints (no `aux`); "
                         "these carry aux arrays of another ensemble")
    for name, v in (("num_adapters", num_adapters), ("rank", rank), ("steps", steps),
                    ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    _checks.real(learning_rate, "learning_rate", low=0, open_low=True)
    _checks.prng_key(key)
    _checks.real(alpha, "alpha", low=0, open_low=True, none=True)
    n = _checks.check_data(train, "train")
    targets = lora_targets(first_member(members)[0], layers)
    for path, leaf in targets.items():
        if rank > min(leaf.shape):
            raise ValueError(f"`rank`={rank} exceeds min(d_in, d_out)={min(leaf.shape)} of "
                             f"{path}")
    scale = float(rank if alpha is None else alpha) / rank
    bs = min(batch_size, n)
    per_epoch = n // bs
    import optax  # deferred: only the adapters' training needs it

    opt = optax.adam(learning_rate)
    train = jax.tree_util.tree_map(jnp.asarray, train)
    indices = jnp.arange(n, dtype=jnp.int32)
    loss = _adapted(task.loss, scale)
    target = None if task.target_is_loss else _adapted(task.target, scale)

    def objective(adapters, base, batch, idx):
        return jnp.mean(jax.vmap(loss, (None, 0, 0, None))(adapters, batch, idx, base))

    def fit(k, base):
        k_init, k_order = jax.random.split(k)
        adapters = init_adapters(k_init, targets, rank)

        def step(carry, s):
            adapters, state = carry
            order = jax.random.permutation(jax.random.fold_in(k_order, s // per_epoch), n)
            idx = jax.lax.dynamic_slice_in_dim(order, (s % per_epoch) * bs, bs)
            batch = jax.tree_util.tree_map(lambda x: x[idx], train)
            grads = jax.grad(objective)(adapters, base, batch, indices[idx])
            updates, state = opt.update(grads, state, adapters)
            return (optax.apply_updates(adapters, updates), state), None

        (adapters, _), _ = jax.lax.scan(step, (adapters, opt.init(adapters)),
                                        jnp.arange(steps))
        return adapters

    fit_all = jit(jax.vmap(fit, (0, None)))
    stacks, seconds = [], 0.0
    for c in range(members.num):  # training only; attribution sees one stacked Members
        base = member(members, c)[0]
        keys = _common.member_keys(key, members.num * num_adapters)[
            c * num_adapters:(c + 1) * num_adapters]
        stacked, t = timed(fit_all, keys, base)
        stacks.append(stacked)
        seconds += t
    adapters = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *stacks)
    num = members.num * num_adapters
    out = check_members(Members(adapters, aux=members.params, num=num))
    stored = param_bytes(members.params) + param_bytes(adapters)
    return (Task.from_member_fns(loss, target), out,
            EnsembleCosts(float(base_train_seconds) + seconds, stored))


__all__ = ["init_adapters", "lora", "lora_targets", "merge"]
