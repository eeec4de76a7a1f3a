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
import optax

from jattri import _checks
from jattri.ensemble.members import EnsembleCosts, param_bytes, timed, unstack
from jattri.task import Member, Task

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


def _adapted_call(fn, base, scale, adapters, example, index):
    return fn(merge(base, adapters, scale), example, index)


def _adapted(fn: Callable, base: PyTree, scale: float) -> Partial:
    """The member function of an adapter on ``base``: base params and scale are traced
    leaves, so adapters on different bases share compiled code too."""
    return Partial(_adapted_call, fn, base, scale)


def lora(task: Task, train: PyTree, num_adapters: int, key: jax.Array, *, rank: int = 4,
         layers: Optional[Sequence[str]] = None, alpha: Optional[float] = None,
         steps: int = 200, batch_size: int = 50, learning_rate: float = 1e-3,
         base_train_seconds: float = 0.0) -> Tuple[Task, EnsembleCosts]:
    """A LoRA ensemble: ``num_adapters`` adapters fine-tuned on each base member.

    Each adapter k (key ``fold_in(key, k)``) is trained for ``steps`` Adam steps on
    minibatches of the mean training loss ``(1/b) Σ loss(W + (α/r)A_k B_k; z_i)``, the
    base frozen; all K adapters train in one vmapped program.

    Args:
      task: the base model(s); its members' functions are reused (``loss_fn`` for
        fine-tuning and train gradients, ``target_fn`` on test examples).
      train: training data (pytree, leading example axis).
      num_adapters: K. key: PRNG key of the adapters (init and data order).
      rank: r. layers: layer names to adapt (default: every 2-d kernel).
      alpha: LoRA scale numerator (default ``rank``, i.e. scale 1).
      steps, batch_size, learning_rate: the fine-tuning.
      base_train_seconds: training time of the base model, added to the reported cost.
    Returns:
      ``(task, costs)``: a Task of ``len(task.members) × K`` members whose params are
      adapters; ``costs.train_seconds`` = base + measured fine-tuning (compilation
      included), ``stored_bytes`` = base models + all adapters.
    """
    if not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task, got {type(task).__name__}")
    for name, v in (("num_adapters", num_adapters), ("rank", rank), ("steps", steps),
                    ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate}")
    n = _checks.check_data(train, "train")
    targets = lora_targets(task.members[0].params, layers)
    for path, leaf in targets.items():
        if rank > min(leaf.shape):
            raise ValueError(f"`rank`={rank} exceeds min(d_in, d_out)={min(leaf.shape)} of "
                             f"{path}")
    scale = float(rank if alpha is None else alpha) / rank
    bs = min(batch_size, n)
    per_epoch = n // bs
    opt = optax.adam(learning_rate)
    train = jax.tree_util.tree_map(jnp.asarray, train)
    indices = jnp.arange(n, dtype=jnp.int32)

    members, seconds, stored = [], 0.0, 0
    for c, base_member in enumerate(task.members):
        base = base_member.params
        loss = _adapted(base_member.loss_fn, base, scale)
        target = loss if task.target_is_loss else _adapted(base_member.target_fn, base, scale)

        def objective(adapters, batch, idx, loss=loss):
            return jnp.mean(jax.vmap(loss, (None, 0, 0))(adapters, batch, idx))

        def fit(k, objective=objective):
            k_init, k_order = jax.random.split(k)
            adapters = init_adapters(k_init, targets, rank)

            def step(carry, s):
                adapters, state = carry
                order = jax.random.permutation(jax.random.fold_in(k_order, s // per_epoch), n)
                idx = jax.lax.dynamic_slice_in_dim(order, (s % per_epoch) * bs, bs)
                batch = jax.tree_util.tree_map(lambda x: x[idx], train)
                grads = jax.grad(objective)(adapters, batch, indices[idx])
                updates, state = opt.update(grads, state, adapters)
                return (optax.apply_updates(adapters, updates), state), None

            (adapters, _), _ = jax.lax.scan(step, (adapters, opt.init(adapters)),
                                            jnp.arange(steps))
            return adapters

        keys = jax.vmap(lambda k: jax.random.fold_in(key, c * num_adapters + k))(
            jnp.arange(num_adapters))
        stacked, t = timed(jax.jit(jax.vmap(fit)), keys)
        seconds += t
        stored += param_bytes(base) + param_bytes(stacked)
        members += [Member(a, loss, target) for a in unstack(stacked)]
    out = Task.from_members(members, target_is_loss=task.target_is_loss)
    return out, EnsembleCosts(float(base_train_seconds) + seconds, stored)


__all__ = ["init_adapters", "lora", "lora_targets", "merge"]
