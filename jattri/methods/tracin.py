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
training gradients chunk by chunk against the test gradients ``(n_test, M, d)``, or,
factored (``factored=``, below), against the test examples' layer inputs and output
gradients, never forming a d-float gradient.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattri import _checks, engine
from jattri._jit import jit
from jattri.func.fisher import augment
from jattri.func.layers import (find_layers, layer_io, layer_io_and_grad, layer_keys, leaf_keys,
                                 same_layers)
from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args,
                                     check_projection_dtype, random_projection,
                                     resolve_projection)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.methods.logra import kronecker_factors, kronecker_phi
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
        return jax.device_put(np.full((num_members,), 1.0 / num_members,
                                      jnp.result_type(float)))
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"`weights` must be a sequence of real numbers or None, got {weights!r}")
    traced = isinstance(weights, jax.core.Tracer)
    w = weights if traced else np.asarray(weights)  # numpy: eager jnp checks compile
    if w.shape != (num_members,):
        raise ValueError(f"`weights` must have one entry per member, shape ({num_members},), "
                         f"got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating) and not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"`weights` must be real numbers, got dtype {w.dtype}")
    if traced:
        return w
    if not np.all(np.isfinite(w)):
        raise ValueError("`weights` contains NaN or inf")
    return jax.device_put(w)


def _features(config, fn, params, aux, key, chunk):
    """``(size, k)``: one member's gradients of a chunk, projected and normalised as
    configured (``(size, d)`` without a projection; ``(size, K)`` Kronecker-projected
    when ``kron = (layers, dims)``, never forming a gradient)."""
    kind, d, k, proj_chunk, dtype, normalize, kron = config
    if kron is not None:  # ``key``: this member's Kronecker factors
        g = kronecker_phi(kron[0], key, fn, params, aux, chunk)
    else:
        proj = None if k is None else random_projection(kind, key, d, k,
                                                        chunk_size=proj_chunk, dtype=dtype)
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


# ------------------------------------------ factored ("ghost") gradient inner products
#
# Without a projection, when every parameter is the kernel or bias of a linear layer,
# a per-example gradient is a sum of outer products per layer: ∇W_ℓ = Σ_τ ã_τ ⊗ s_τ
# (ã = [a, 1] with a bias, s = ∂loss/∂y, τ over the layer's T positions). Then
#
#     ⟨g_i, g_t⟩ = Σ_ℓ Σ_{τ,σ} ⟨ã_iτ, ã_tσ⟩ ⟨s_iτ, s_tσ⟩,
#
# which costs T²·(d_in + 1 + d_out) per pair and layer instead of (d_in + 1)·d_out, and
# never forms the d-float gradient (the "ghost" inner product of Goodfellow, 2015,
# "Efficient Per-Example Gradient Computations", used for data attribution by Wang et
# al., 2024, "Data Shapley in One Training Run").


def _factors(layers, fn, params, aux, example, index):
    """One example's factors: a tuple over layers of ``(ã (T, d_in + b), s (T, d_out))``."""
    io = layer_io(fn, params, example, index, aux, layers={l.name: l for l in layers})
    return _io_factors(layers, io)


def _io_factors(layers, io) -> tuple:
    """``layer_io``'s ``{name: (a, s)}`` as factors ``((ã, s), ...)`` in ``layers`` order."""
    return tuple((augment(io[l.name][0], l.use_bias), io[l.name][1]) for l in layers)


def _chunk_factors(layers, fn, params, aux, chunk):
    """``_factors`` of every example of a chunk (leading ``size`` axis; zero on padding)."""
    out = jax.vmap(lambda z, i: _factors(layers, fn, params, aux, z, i))(chunk.data,
                                                                         chunk.index)
    valid = chunk.valid[:, None, None]
    return tuple((a, s * valid.astype(s.dtype)) for a, s in out)


def _factored_dot(left, right) -> jax.Array:
    """``(b, t)`` gradient inner products from factors ``(b, T, ·)`` and ``(t, T', ·)``."""
    total = 0.0
    for (a1, s1), (a2, s2) in zip(left, right):
        if a1.shape[1] == 1 and a2.shape[1] == 1:
            total = total + (a1[:, 0] @ a2[:, 0].T) * (s1[:, 0] @ s2[:, 0].T)
        else:
            total = total + jnp.einsum("btxy,btxy->bt", jnp.einsum("bxp,typ->btxy", a1, a2),
                                       jnp.einsum("bxq,tyq->btxy", s1, s2))
    return total


def _factored_pair(left, right) -> jax.Array:
    """``(b,)`` inner products of example b's gradient on the left and on the right."""
    total = 0.0
    for (a1, s1), (a2, s2) in zip(left, right):
        total = total + jnp.einsum("bxy,bxy->b", jnp.einsum("bxp,byp->bxy", a1, a2),
                                   jnp.einsum("bxq,byq->bxy", s1, s2))
    return total


def _norm(factors) -> jax.Array:
    norm = jnp.sqrt(jnp.maximum(_factored_pair(factors, factors), 0.0))
    return jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)


def _factored_step(config, args, chunk):
    """Factors ``(size, M, T, ·)`` of every member for one chunk, and with
    ``normalize`` the gradient norms ``(size, M)``."""
    layers, normalize = config
    fn, members = args
    out = _common.member_map(lambda p, a: _chunk_factors(layers, fn, p, a, chunk), members)
    norms = jax.vmap(_norm)(out) if normalize else None
    swap = lambda x: jnp.swapaxes(x, 0, 1)
    return jax.tree_util.tree_map(swap, out), (None if norms is None else swap(norms))


def _factored_tile(config, args, chunk):
    layers, normalize = config
    loss, members, (test, test_norms), weights = args
    swap = lambda x: jnp.swapaxes(x, 0, 1)

    def one(p, a, t, t_norm):  # t_norm: None unless normalize
        f = _chunk_factors(layers, loss, p, a, chunk)
        dots = _factored_dot(f, t)
        return dots / (_norm(f)[:, None] * t_norm[None, :]) if normalize else dots

    per = _common.member_map(one, members, *jax.tree_util.tree_map(swap, (test, test_norms)))
    return jnp.einsum("mbt,m->bt", per, weights.astype(per.dtype))


def _factored_self_step(config, args, chunk):
    """``(size,)`` Σ_m w_m ⟨∇loss, ∇target⟩ (cosine with ``normalize``) per example;
    ``right_layers`` is ``None`` when the target is the loss."""
    left_layers, right_layers, normalize = config
    loss, target, members, weights = args

    def one(p, a):
        left = _chunk_factors(left_layers, loss, p, a, chunk)
        right = (left if right_layers is None else
                 _chunk_factors(right_layers, target, p, a, chunk))
        pair = _factored_pair(left, right)
        return pair / (_norm(left) * _norm(right)) if normalize else pair

    per = _common.member_map(one, members)
    return jnp.einsum("mb,m->b", per, weights.astype(per.dtype))


def _factored_error(layers, fn, params, aux, example) -> jax.Array:
    """‖∇fn − the gradient rebuilt from the layer factors‖ / ‖∇fn‖ on one example:
    0 when every parameter enters the loss only through its linear layer (not, e.g.,
    through an L2 penalty or a weight tied elsewhere)."""
    index = jnp.zeros((), jnp.int32)
    io, pgrads = layer_io_and_grad(fn, params, example, index, aux,
                                   layers={l.name: l for l in layers})
    grads = dict(leaf_keys(pgrads))
    rebuilt = {}
    for layer, (a, s) in zip(layers, _io_factors(layers, io)):
        kernel, bias = layer_keys(grads, layer.name)
        outer = a.T @ s  # (d_in + b, d_out)
        rebuilt[kernel] = outer[:layer.d_in].reshape(layer.kernel_shape)
        if bias is not None:
            rebuilt[bias] = outer[layer.d_in]
    diff = sum(jnp.sum(jnp.square(g - rebuilt[k])) for k, g in grads.items())
    norm = sum(jnp.sum(jnp.square(g)) for g in grads.values())
    return jnp.sqrt(diff / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))


def _member0_error(layers, fn, params, aux, rows) -> jax.Array:
    """:func:`_factored_error` of member 0 on the first of ``rows`` (both sliced inside
    the program)."""
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    return _factored_error(layers, fn, first(params), first(aux), first(rows))


_member0_error_jit = jit(_member0_error, static_argnums=(0, 1), once=True)


def _first_rows(data):
    """Rows of ``data`` (a stream: its first chunk) whose first is the example checked:
    numpy leaves cut to one row on the host (never copied whole to the device), jax
    leaves whole, sliced inside the check's program (a program of its own to slice
    them cost 0.03 s of compilation on a first call, an eager slice per leaf one each)."""
    rows = engine.as_stream(data).peek() if engine.is_stream(data) else data
    return jax.tree_util.tree_map(
        lambda x: x[:1] if isinstance(x, (np.ndarray, np.generic)) else x, rows)


def _plan_key(fn_name: str, k, members: Members, data) -> tuple:
    """What a factory's record of a layer plan is keyed by: the function's role, k, and
    the members' and one example's structure, shapes and dtypes."""
    return fn_name, k, _checks.signature((members.params, members.aux,
                                          _common.example_spec(data)))


def _linear_cover(fn, members: Members, data, fn_name: str, method: str):
    """``(layers, None)``: the linear layers ``jattri.func.layers`` finds in ``fn`` when
    every parameter leaf is the kernel or bias of one of them; else ``(None, why)``."""
    params = _common.row_spec(members.params)
    try:
        found = find_layers(fn, params, _common.example_spec(data),
                            jax.ShapeDtypeStruct((), jnp.int32),
                            _common.row_spec(members.aux), fn_name=fn_name, method=method)
    except ValueError as err:
        return None, str(err).splitlines()[0]
    layers = tuple(found.values())
    covered = {l.kernel_key for l in layers} | {l.bias_key for l in layers if l.bias_key}
    outside = [k for k, _ in leaf_keys(params) if k not in covered]
    if outside:
        return None, f"parameters {outside[:5]} of `{fn_name}` are not in a linear layer"
    return layers, None


def _concrete(members, data) -> bool:
    return _common.is_concrete((members.params, members.aux)) and (
        engine.is_stream(data) or _common.is_concrete(data))


def _rebuild_error(layers, fn, members, data) -> float:
    """:func:`_factored_error` on the first example of ``data`` (member 0; concrete)."""
    try:
        hash(fn)
        check = partial(_member0_error_jit, layers, fn)
    except TypeError:  # an unhashable loss: compiled afresh
        check = jit(partial(_member0_error, layers, fn), once=True)
    return float(check(members.params, members.aux, _first_rows(data)))


def _rebuilds(layers, fn, members, data) -> bool:
    """The gradient rebuilt from the layer factors equals ``jax.grad`` on the first
    example, to 1e3 · machine epsilon."""
    eps = float(jnp.finfo(_common.param_dtype(members)).eps)
    return _rebuild_error(layers, fn, members, data) <= 1e3 * eps


def factored_layers(fn, members: Members, data, *, fn_name: str = "loss_fn",
                    required: bool = False, memo: Optional[dict] = None) -> Optional[tuple]:
    """The linear layers through which ``fn``'s per-example gradient inner products can
    be taken factored (see above), or ``None`` (``required``: raise ValueError saying
    why). Conditions: every parameter leaf is the kernel or bias of a layer
    ``jattri.func.layers`` finds; unless ``required``, every layer has one position
    (T = 1: a layer at T positions makes a ``(chunk, n_test, T, T)`` tile), the
    factored cost Σ_ℓ (d_in,ℓ + 1 + d_out,ℓ) per pair is below d, and on the first
    example of ``data`` (member 0, concrete params only) the gradient rebuilt from the
    factors equals ``jax.grad`` to 1e3 · machine epsilon. ``memo``: the factory's record
    of these decisions by :func:`_plan_key`, made concretely once and reused by every
    later call of the same shapes, traced ones included (no second check)."""
    method = "factored Grad-Dot/Grad-Cos/TracIn"
    layers, why = _linear_cover(fn, members, data, fn_name, method)
    if layers is None:
        if required:
            raise ValueError(f"`factored=True`: {why}")
        return None
    if required:
        return layers
    cost = sum(l.d_in + int(l.use_bias) + l.d_out for l in layers)
    if any(l.positions > 1 for l in layers) or cost >= _common.num_params(members):
        return None
    return rebuilt_layers(fn, members, data, fn_name=fn_name, method=method, memo=memo)


def rebuilt_layers(fn, members: Members, data, *, fn_name: str, method: str,
                   memo: Optional[dict] = None) -> Optional[tuple]:
    """The linear layers ``jattri.func.layers`` finds in ``fn`` (any number of
    positions), when every parameter leaf is a kernel or bias of one of them and, on the
    first example of ``data`` (member 0), the gradient rebuilt from their inputs and
    output gradients equals ``jax.grad`` to 1e3 · machine epsilon; else ``None`` (also
    for traced members or data, where the check cannot run). ``memo``: the factory's
    record by :func:`_plan_key`, so the check compiles and runs once per shape."""
    key = _plan_key(fn_name, "rebuilt", members, data)
    if memo is not None and key in memo:
        return memo[key]
    if not _concrete(members, data):
        return None
    layers, _ = _linear_cover(fn, members, data, fn_name, method)
    plan = layers if layers is not None and _rebuilds(layers, fn, members, data) else None
    if memo is not None:
        memo[key] = plan
    return plan


# ------------------------------------- the Kronecker projection of TRAK and TracIn
#
# A linear layer's per-example gradient G_ℓ = Σ_τ ã_τ ⊗ s_τ is projected by P_in ⊗ P_out
# as Σ_τ (ã_τ P_in) ⊗ (s_τ P_out) (LoGra; ``jattri.methods.logra.kronecker_phi``),
# at Σ_τ (d_in·k_in + d_out·k_out) multiply-adds per example and layer instead of the
# d·k of a dense projection of the formed gradient.


def kronecker_dims(layers, k: int) -> tuple:
    """``((k_in, k_out), ...)`` per layer (``None``: the identity on that side) for a
    total of at most ``k`` projected coordinates (every layer keeps at least one, so
    at most the number of layers when k is smaller).

    Rule: layer ℓ gets k_ℓ = ⌊k · d_ℓ / d⌋ ≥ 1 coordinates (d_ℓ = (d_in + b)·d_out, its
    share of the d parameters: a dense projection's share, and P_ℓᵀP_ℓ ≈ (d/k) I in
    every block, the scale TRAK's damping rule assumes). Within the layer, the split
    k_in·k_out ≤ k_ℓ is the one, over every width of the narrower side, that minimises
    the relative variance of a rank-one gradient's projected squared norm, 2/k_in +
    2/k_out (Gaussian factors; a side kept whole is exact and adds 0). E.g. a 785 × 10
    layer at k = 512 keeps its 10 outputs whole and projects its inputs to 51; at
    k_ℓ ≥ d_ℓ the layer is exact. (Shares ∝ √d_ℓ or equal shares were measured too:
    at most 0.022 more LDS on digits_mlp, and they break the uniform scale;
    ``benchmarks/RESULTS.md``.)"""
    sizes = [(l.d_in + int(l.use_bias), l.d_out) for l in layers]
    d = sum(a * b for a, b in sizes)
    out = []
    for d_in, d_out in sizes:
        k_l = max(1, (int(k) * d_in * d_out) // d)
        best = None
        for k_small in range(1, min(d_in, d_out) + 1):
            small_is_in = d_in <= d_out
            k_big = min(d_out if small_is_in else d_in, k_l // k_small)
            if k_big < 1:
                break
            k_in, k_out = (k_small, k_big) if small_is_in else (k_big, k_small)
            var = (0.0 if k_in == d_in else 2.0 / k_in) + (0.0 if k_out == d_out
                                                           else 2.0 / k_out)
            rank = (var, -(k_in * k_out))
            if best is None or rank < best[0]:
                best = (rank, k_in, k_out)
        _, k_in, k_out = best
        out.append((None if k_in == d_in else k_in, None if k_out == d_out else k_out))
    return tuple(out)


def kronecker_width(layers, dims) -> int:
    """K = Σ_ℓ k_in,ℓ·k_out,ℓ: the projected dimension of ``kronecker_dims``."""
    return sum((l.d_in + int(l.use_bias) if ki is None else ki) *
               (l.d_out if ko is None else ko) for l, (ki, ko) in zip(layers, dims))


def resolve_kronecker(projection: str, fn, members: Members, data, k: int, *,
                      fn_name: str = "loss_fn", method: str,
                      memo: Optional[dict] = None) -> Optional[tuple]:
    """``(layers, dims)`` when gradients of ``fn`` are to be Kronecker-projected, else
    ``None`` (a named dense or sparse projection).

    ``projection="kronecker"``: required; ValueError when a parameter is outside a
    linear layer or (concrete params) the gradient rebuilt from the layers' inputs and
    output gradients is not ``jax.grad`` (e.g. an L2 penalty inside the loss).
    ``"auto"``: Kronecker where the dense Gaussian would be too big to regenerate
    (d·k > ``AUTO_DENSE_ENTRIES``), every parameter is in a linear layer and the rebuilt
    gradient matches; otherwise the rule of ``resolve_projection`` (dense Gaussian, or
    the SJLT at that size).

    ``memo``: the factory's record of choices made with the rebuild check, by the
    members' and one example's structure, shapes and dtypes: a later stage of the same
    shapes reuses it (no second layer trace or check), and so does a stage under
    ``jax.jit``, where the check cannot run (a concrete ``cache`` then a jitted
    ``attribute`` project both sides alike); a traced stage with no record decides on
    the layers alone."""
    if projection not in ("kronecker", "auto"):
        return None
    d = _common.num_params(members)
    if projection == "auto" and resolve_projection("auto", d, k) == "gaussian":
        return None
    sig = _plan_key(fn_name, k, members, data)
    if memo is not None and sig in memo:
        return memo[sig]
    concrete = _concrete(members, data)
    layers, why = _linear_cover(fn, members, data, fn_name, method)
    if layers is None:
        if projection == "kronecker":
            raise ValueError(f'`projection="kronecker"`: {why}')
        return None
    plan = layers, kronecker_dims(layers, k)
    if concrete:
        error = _rebuild_error(layers, fn, members, data)
        if error > 1e3 * float(jnp.finfo(_common.param_dtype(members)).eps):
            if projection == "auto":
                plan = None
            else:
                raise ValueError(
                    f'`projection="kronecker"`: the gradient of `{fn_name}` rebuilt from '
                    f"its linear layers' inputs and output gradients differs from "
                    f"jax.grad (relative error {error:.3g} on the first example): a "
                    "parameter also enters the loss outside its layer (an L2 penalty "
                    "inside the loss, a tied weight); use a dense or sparse projection")
        if memo is not None:
            memo[sig] = plan
    return plan


def kronecker_plan(projection: str, fn, target_fn, members: Members, data, k: int, *,
                   method: str, memo: Optional[dict] = None) -> Optional[tuple]:
    """``(layers, dims)`` for the gradients of ``target_fn`` (``None``: of ``fn``)
    under the Kronecker projection that :func:`resolve_kronecker` picks from ``fn``
    (the training side decides, so both sides agree), or ``None``. ValueError when
    ``target_fn`` does not use the same linear layers."""
    plan = resolve_kronecker(projection, fn, members, data, k, method=method, memo=memo)
    if plan is None or target_fn is None:
        return plan
    layers, dims = plan
    right, why = _linear_cover(target_fn, members, data, "target_fn", method)
    if not same_layers(right, layers):
        raise ValueError("the Kronecker projection needs `target_fn` to use the same linear "
                         f"layers as `loss_fn`{'' if why is None else ' (' + why + ')'}")
    return right, dims


def tracin(task: Any, *, weights: Optional[Sequence[float]] = None,
           proj_dim: Optional[int] = None, projection: str = "auto",
           normalize: bool = False, key: Optional[jax.Array] = None,
           chunk_size: Optional[int] = None,
           proj_chunk_size: Optional[int] = DEFAULT_CHUNK,
           factored: Optional[bool] = None, projection_dtype=None) -> Attributor:
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
      projection: ``"auto"`` (Gaussian while d·k ≤ 2²⁷; above, the Kronecker
        projection where every parameter is in a linear layer, else the SJLT:
        :func:`resolve_kronecker`), ``"gaussian"``, ``"rademacher"``, ``"sjlt"``
        (``jattri.func``) or ``"kronecker"``: each linear layer's gradient Σ_τ ã_τ ⊗ s_τ
        projected by P_in ⊗ P_out without forming it (LoGra's projection; Choe et al.,
        2024), Σ_τ (d_in·k_in + d_out·k_out) multiply-adds per example and layer
        instead of d·k, to K ≤ k coordinates split over layers by
        :func:`kronecker_dims`; its JL error is larger than a dense projection's at the
        same k (``benchmarks/RESULTS.md``). Each is scaled so inner products are
        preserved in expectation. Member k uses ``fold_in(key, k)`` (Kronecker: its own
        factors, ``jattri.methods.logra.kronecker_factors``).
      normalize: divide each (projected) gradient by its norm: cosine similarity.
      key: PRNG key of the projections (default ``PRNGKey(0)``).
      chunk_size: examples per compiled step (default: 256 MiB of gradients, 1 GiB
        with a projection);
        proj_chunk_size: parameters projected at a time.
      projection_dtype: ``None`` (default): the dense projection's product in the
        gradients' dtype; ``"bfloat16"``: rounded to bfloat16 in the product and
        accumulated in the gradients' dtype, about 0.2% error in the projected
        gradients against the JL error √(2/k), faster where the hardware has bfloat16
        products (:func:`jattri.trak`'s argument of the same name). Needs ``proj_dim``;
        dropped where ``"auto"`` picks the SJLT or Kronecker projection; ``"sjlt"`` or
        ``"kronecker"`` named with it is an error.
      factored: without a projection, take the inner products from each linear layer's
        inputs and output gradients, ⟨g_i, g_t⟩ = Σ_ℓ Σ_τσ ⟨ã_iτ, ã_tσ⟩⟨s_iτ, s_tσ⟩
        (Goodfellow, 2015), never forming a d-float gradient: exact, and
        (d_in + 1)·d_out / (T²·(d_in + 1 + d_out)) times fewer flops per pair and
        layer. ``None`` (default): whenever every parameter is the kernel or bias of a
        linear layer ``jattri.func.layers`` sees, at one position each (T = 1: an
        MLP's Dense layers), it is cheaper, and on the first example the rebuilt
        gradient equals ``jax.grad`` (an L2 penalty inside the loss, or a weight also
        used outside its layer, fails that check); ``True``: always, layers at T > 1
        positions included (a scoring tile then holds chunk·n_test·T² floats;
        ValueError where a parameter is outside a layer; the caller vouches for the
        rest); ``False``: never.

    Memory: state n·M·k floats with a projection, none proportional to n without;
    ``attribute`` holds the test side n_test·M·k (k = d without a projection; factored:
    n_test·M·Σ_ℓ T_ℓ·(d_in,ℓ + 1 + d_out,ℓ)) and one chunk of ``chunk_size`` gradients
    (Kronecker: their layer inputs and output gradients instead, plus the factors,
    M·Σ_ℓ (d_in,ℓ·k_in,ℓ + d_out,ℓ·k_out,ℓ) floats).
    """
    return _tracin("tracin", task, weights=weights, proj_dim=proj_dim, projection=projection,
                   normalize=normalize, key=key, chunk_size=chunk_size,
                   proj_chunk_size=proj_chunk_size, factored=factored,
                   projection_dtype=projection_dtype)


def _tracin(name: str, task: Any, *, weights: Optional[Sequence[float]] = None,
            proj_dim: Optional[int] = None, projection: str = "auto",
            normalize: bool = False, key: Optional[jax.Array] = None,
            chunk_size: Optional[int] = None,
            proj_chunk_size: Optional[int] = DEFAULT_CHUNK,
            factored: Optional[bool] = None, projection_dtype=None) -> Attributor:
    """:func:`tracin`, its states marked as made by ``name`` (``grad_dot``, ...)."""
    check_projection_args(projection, ("kronecker",), proj_dim=proj_dim,
                          proj_chunk_size=proj_chunk_size)
    projection_dtype = check_projection_dtype(projection, projection_dtype, proj_dim)
    if factored is not None:
        _checks.flag(factored, "factored")
    if factored and proj_dim is not None:
        raise ValueError("`factored=True` takes the raw gradients' inner products: it needs "
                         f"`proj_dim=None`, got proj_dim={proj_dim!r}")
    chunk_size = engine.check_chunk_size(chunk_size)
    _checks.flag(normalize, "normalize")
    if weights is not None:
        _check_weights(weights, len(weights) if hasattr(weights, "__len__") else -1)
    task = as_task(task)
    key = _common.default_key() if key is None else _checks.prng_key(key)
    k = None if proj_dim is None else int(proj_dim)
    made = _common.hyper(task, weights=weights, proj_dim=proj_dim, projection=projection,
                         normalize=normalize, key=key, proj_chunk_size=proj_chunk_size,
                         projection_dtype=projection_dtype)

    memo = {}  # the Kronecker / factored plans made concretely (``_plan_key``)
    factors = {}  # the Kronecker factors, made once (``kronecker_factors``)

    def config(members, kron=None):
        return (projection, _common.num_params(members), k, proj_chunk_size, projection_dtype,
                bool(normalize), kron)

    size = partial(_common.step_chunk_size, chunk_size, proj_dim)

    def features(members, fn, data):
        kron = None if k is None else kronecker_plan(
            projection, task.loss, None if fn is task.loss or task.target_is_loss else fn,
            members, data, k, method=name, memo=memo)
        keys = (_common.member_keys(key, members.num) if kron is None else
                kronecker_factors(*kron, "gaussian", key, members.num, memo=factors))
        args = (fn, members, keys)
        return engine.per_example(_feature_step, config(members, kron), args, data,
                                  size(members, data, dense=kron is None))

    def plan(members, left, right):
        """``(left_layers, right_layers)`` for factored inner products of ∇loss on
        ``left`` and ∇target on ``right``, or ``None`` (the dense path)."""
        if k is not None or factored is False:
            return None
        required = factored is True
        left_layers = factored_layers(task.loss, members, left, required=required,
                                      memo=memo)
        if left_layers is None:
            return None
        if task.target_is_loss:
            return left_layers, None
        right_layers = factored_layers(task.target, members, right, fn_name="target_fn",
                                       required=required, memo=memo)
        if not same_layers(right_layers, left_layers):
            if required:
                raise ValueError("`factored=True`: `target_fn` must use the same linear "
                                 "layers as `loss_fn`")
            return None
        return left_layers, right_layers

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
        if state.train_grads is None:
            rows = _common.train_for(state.train, train)
            layers = plan(members, rows, test)
            if layers is not None:
                left, right = layers
                t = engine.per_example(_factored_step, (right or left, bool(normalize)),
                                       (task.target, members), test, size(members, test))
                n_test = jax.tree_util.tree_leaves(t)[0].shape[0]
                return engine.score(_factored_tile, (left, bool(normalize)),
                                    (task.loss, members, t, state.weights), rows,
                                    size(members, rows), n_test,
                                    _common.param_dtype(members), top_k=top_k,
                                    lowest=lowest)
        t = features(members, task.target, test)  # (n_test, M, k)
        if state.train_grads is not None:
            rows = state.train_grads
            tile = size(members, rows, _common.row_floats(rows) + t.shape[0])
            return engine.score(_stored_tile, None, (t, state.weights), rows, tile,
                                t.shape[0], t.dtype, top_k=top_k, lowest=lowest)
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
        layers = None if state.train_grads is not None else plan(members, data, data)
        if layers is not None:
            return engine.per_example(_factored_self_step, layers + (bool(normalize),),
                                      (task.loss, task.target, members, state.weights), data,
                                      size(members, data))
        left = (state.train_grads if state.train_grads is not None else
                features(members, task.loss, data))
        right = left if task.target_is_loss else features(members, task.target, data)
        rows = (left, right)
        return engine.per_example(_self_tile, None, state.weights, rows,
                                  size(members, rows, 2 * _common.row_floats(left)))

    return Attributor(cache, engine.bucketed(attribute), self_attribute)
