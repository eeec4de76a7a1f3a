"""Curvature other than the Hessian: Gauss-Newton and Fisher products, K-FAC / EK-FAC
factors of linear (Dense and Conv) layers, and DataInf's closed-form layer inverse.

Per-example functions take ``loss_fn(params, example) -> scalar`` for ONE example;
datasets are pytrees with a leading example axis n. g_i = ∇θ loss(z_i).

* empirical Fisher  F = (1/n) Σ_i g_i g_iᵀ                     (``efvp``, ``ifvp_explicit``)
* Gauss-Newton      G = Jᵀ ∇²ℓ J for f = ℓ ∘ out              (``ggn_vp``)
* K-FAC             F_l ≈ A_l ⊗ S_l per Dense/Conv layer l   (``ekfac_factors(correct_eigenvalues=False)``)
* EK-FAC            F_l ≈ (Q_A ⊗ Q_S) diag(Λ*) (Q_A ⊗ Q_S)ᵀ    (``ekfac_factors``)
  K-FAC / EK-FAC of the Gauss-Newton instead of the empirical Fisher: ``curvature="ggn"``
* DataInf           (F_l + λI)⁻¹ ≈ (1/n) Σ_i (g_il g_ilᵀ + λI)⁻¹ (``datainf_ihvp``)

K-FAC / EK-FAC see the linear layers of any model, through ``jattri.func.layers``:
Flax linen ``nn.Dense`` / ``nn.Conv`` (``model.apply({"params": params}, x)``), Flax
NNX ``nnx.Linear`` / ``nnx.Conv`` (``nnx.merge(graphdef, params)(x)`` inside the loss,
``graphdef, params = nnx.split(model)``; params the ``nnx.State`` or its pure dict),
both with the loss unchanged, and in a plain-JAX model the layers it computes with
``jattri.func.layers.dense(x, params[...]["w"], params[...]["b"])`` instead of
``x @ w + b``. Layers are keyed by name (``"fc1"``, ``"layers/0"``, ``"fc1/w+fc1/b"``;
``jattri.func.layers``) in the factors, and found by that name in any pytree like the
params (``ekfac_ihvp``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from jattri import _checks, engine
from jattri._products import tmatmul, transposed_copy, transposed_result
from jattri.func.grads import as_partial, map_examples
from jattri.func.hessian import damped_inverse
from jattri.func.layers import (Layer, find_layers, input_rows, layer_io, layer_keys,
                                 leaf_key, leaf_keys, perturbed_loss)

PyTree = Any


def chunked_mean(fn: Callable, data: PyTree, chunk_size: Optional[int] = None) -> PyTree:
    """(1/n) Σ_i fn(z_i), summed chunk by chunk so no per-example output is stored.

    ``fn(example) -> pytree``; ``chunk_size=None`` vmaps over all n at once.
    """
    n = _checks.num_examples(data)
    chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    weight = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(n_chunks, chunk)
    padded = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x, data)
    chunks = jax.tree_util.tree_map(lambda x: x.reshape((n_chunks, chunk) + x.shape[1:]),
                                    padded)
    template = jax.eval_shape(fn, _checks.first_example(data))
    acc0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)

    def step(acc, c):
        z, w = c
        out = jax.vmap(fn)(z)
        return jax.tree_util.tree_map(
            lambda a, o: a + jnp.tensordot(w.astype(o.dtype), o, axes=1), acc, out), None

    total, _ = jax.lax.scan(step, acc0, (chunks, weight))
    return jax.tree_util.tree_map(lambda t: t / n, total)


# ------------------------------------------------------------ Fisher / GGN products

def ggn_vp(output_fn: Callable, out_loss_fn: Callable, params: PyTree, v: PyTree) -> PyTree:
    """Gauss-Newton vector product G v = Jᵀ (∇²ℓ) J v for f(θ) = ℓ(out(θ)).

    ``output_fn(params) -> outputs`` (any pytree, e.g. logits ``(n, c)`` of the whole
    training set) and ``out_loss_fn(outputs) -> scalar`` (e.g. the mean cross-entropy).
    G equals the Hessian of f minus the terms with second derivatives of ``out``; it is
    PSD whenever ℓ is convex. Costs one jvp, one output-space HVP and one vjp.

    Args:
      params: pytree. v: pytree like params (no batch axis; ``jax.vmap`` for several).
    Returns:
      pytree like ``params``.
    """
    outputs, jv = jax.jvp(output_fn, (params,), (v,))
    hjv = jax.jvp(jax.grad(out_loss_fn), (outputs,), (jv,))[1]
    _, vjp = jax.vjp(output_fn, params)
    return vjp(hjv)[0]


def efvp(loss_fn: Callable, params: PyTree, data: PyTree, v: PyTree, *,
         chunk_size: Optional[int] = None) -> PyTree:
    """Empirical-Fisher vector product F v = (1/n) Σ_i g_i (g_iᵀ v), never forming F.

    Args:
      loss_fn: per-example loss. data: n examples. v: pytree like params (no batch axis).
      chunk_size: examples per vectorised chunk.
    Returns:
      pytree like ``params``.
    """
    def one(z):
        g = jax.grad(loss_fn)(params, z)
        coef = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                  jax.tree_util.tree_leaves(v)))
        return jax.tree_util.tree_map(lambda x: coef * x, g)

    return chunked_mean(one, data, chunk_size)


def empirical_fisher(loss_fn: Callable, params: PyTree, data: PyTree, *,
                     chunk_size: Optional[int] = None) -> jax.Array:
    """The dense ``(d, d)`` empirical Fisher (1/n) Σ_i g_i g_iᵀ on flat parameters."""
    theta, unravel = ravel_pytree(params)

    def outer(z):
        g = ravel_pytree(jax.grad(loss_fn)(unravel(theta), z))[0]
        return jnp.outer(g, g)

    return chunked_mean(outer, data, chunk_size)


def ifvp_explicit(loss_fn: Callable, params: PyTree, data: PyTree, v: PyTree, *,
                  damping: float = 0.0, chunk_size: Optional[int] = None) -> PyTree:
    """(F + λI)⁻¹ v with the dense empirical Fisher; small models only.

    A singular ``F + λI`` raises ``ValueError`` (F has rank ≤ n: use λ > 0 when d > n).

    Args:
      loss_fn: per-example loss. data: n examples. v: pytree like params, optionally
        with a leading batch axis. damping: λ ≥ 0.
    Returns:
      pytree like ``v``.
    """
    theta, unravel = ravel_pytree(params)
    batched = (jax.tree_util.tree_leaves(v)[0].ndim
               == jax.tree_util.tree_leaves(params)[0].ndim + 1)
    flat_v = (jax.vmap(lambda x: ravel_pytree(x)[0])(v) if batched else ravel_pytree(v)[0])
    inv = damped_inverse(empirical_fisher(loss_fn, params, data, chunk_size=chunk_size),
                         damping, what="empirical Fisher")
    out = flat_v @ inv
    return jax.vmap(unravel)(out) if batched else unravel(out)


# ------------------------------------------------------------------- K-FAC / EK-FAC

class EKFACLayer(NamedTuple):
    """Eigenbasis and eigenvalues of one Dense or Conv layer's Fisher block (Conv: d_in =
    prod(kernel_size)·in_features, the kernel flattened by ``reshape(-1, features)``).

    qa: ``(d_in + b, d_in + b)`` eigenvectors of A = E[a aᵀ] as COLUMNS (b = 1 with a
    bias: the input is augmented with a trailing 1, so the bias is the LAST row of the
    ``(d_in + 1, d_out)`` layer gradient [kernel; bias]). qs: ``(d_out, d_out)``
    eigenvectors of S = E[s sᵀ] as columns. eigvals: ``(d_in + b, d_out)``; entry
    (j, k) is the curvature along qa[:, j] ⊗ qs[:, k].
    """

    qa: jax.Array
    qs: jax.Array
    eigvals: jax.Array


class EKFACFactors(NamedTuple):
    """layers: ``{name: EKFACLayer}``. diag: pytree like params, the diagonal empirical
    Fisher E[g²] for parameters outside Dense/Conv layers (zeros on their leaves)."""

    layers: Dict[str, EKFACLayer]
    diag: PyTree


def augment(a: jax.Array, use_bias: bool) -> jax.Array:
    """ã = [a, 1] along the last axis (the bias as a constant input) if ``use_bias``."""
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], -1) if use_bias else a


def _layer_leaves(layers: tuple) -> Dict[str, tuple]:
    """``{leaf_key: (layer name, "kernel"|"bias")}`` of the factored layers' leaves."""
    out = {}
    for layer in layers:
        out[layer.kernel_key] = (layer.name, "kernel")
        if layer.bias_key is not None:
            out[layer.bias_key] = (layer.name, "bias")
    return out


CURVATURES = ("empirical", "ggn")


def projected_output_hessian(loss_fn: Callable, params: PyTree, example: PyTree,
                             args: tuple, layer: Layer, p_out: Optional[jax.Array] = None):
    """``(a (T, d_in), P_outᵀ H P_out (T, k_out, T, k_out))`` of ONE layer and ONE
    example of ``loss_fn(params, example, *args)``: a the layer's input rows, H =
    ∂²loss/∂δ² ``(T, d_out, T, d_out)`` at δ = 0, δ the zero perturbation of the
    layer's outputs at its T positions (the handle ``layer_io`` differentiates once).
    One Hessian-vector product (forward over reverse) per column of ``p_out``
    ``(d_out, k_out)`` and position, T·k_out in all, never the whole H; ``p_out=None``
    is the identity (T·d_out products: H itself)."""
    sizes = [int(np.prod(s[:-1], dtype=np.int64)) for s, _ in layer.out_shapes]

    def loss_at(flat):
        parts = jnp.split(flat, np.cumsum(sizes)[:-1], axis=0)
        deltas = [x.reshape(s) for x, (s, _) in zip(parts, layer.out_shapes)]
        return perturbed_loss(loss_fn, params, example, args, {layer.name: deltas})

    flat0 = jnp.zeros((layer.positions, layer.d_out), layer.out_shapes[0][1])
    _, inputs = loss_at(flat0)
    grad = jax.grad(lambda flat: loss_at(flat)[0])
    cols = (jnp.eye(layer.d_out, dtype=flat0.dtype) if p_out is None
            else p_out.astype(flat0.dtype))  # (d_out, k_out)
    t, k = layer.positions, cols.shape[1]
    # tangent (τ, j): column j of P_out at position τ, zero elsewhere
    tangents = jnp.einsum("tu,cj->tjuc", jnp.eye(t, dtype=cols.dtype), cols).reshape(
        t * k, t, layer.d_out)
    hv = jax.vmap(lambda v: jax.jvp(grad, (flat0,), (v,))[1])(tangents)  # (T·k, T, d_out)
    hp = hv if p_out is None else hv @ cols
    return input_rows(layer, inputs[layer.name]), hp.reshape(t, k, t, k)


def layer_hessian_blocks(layers: tuple, factors: tuple, loss_fn: Callable, params: PyTree,
                         aux: PyTree, chunk) -> tuple:
    """Per layer ``(k_in·k_out, k_in·k_out)``: Σ over the chunk's valid examples of
    (P_in ⊗ P_out)ᵀ G_ℓ,i (P_in ⊗ P_out), G_ℓ,i = Σ_τσ ã_τ ã_σᵀ ⊗ ∂²loss_i/∂y_τ∂y_σ the
    block of the loss's Hessian for layer ℓ's own parameters (exact: the layer is linear
    in them), rows in block order (input row-major, the bias as the last input row, then
    the output). ``factors``: per layer ``(P_in, P_out)``, ``None`` the identity. T·k_out
    products of :func:`projected_output_hessian` per example and layer (one member's
    ``params``; ``loss_fn(params, example, index, aux)``)."""
    out = []
    for layer, (p_in, p_out) in zip(layers, factors):
        a, hp = jax.vmap(lambda z, i: projected_output_hessian(
            loss_fn, params, z, (i, aux), layer, p_out))(chunk.data, chunk.index)
        a = augment(a, layer.use_bias)
        pa = a if p_in is None else a @ p_in.astype(a.dtype)  # (b, T, k_in)
        w = chunk.valid.astype(hp.dtype)
        if layer.positions == 1:
            out.append(_one_position_block(pa[:, 0], hp[:, 0, :, 0], w))
            continue
        g = jnp.einsum("b,btk,buK,btluL->klKL", w, pa, pa, hp)
        out.append(g.reshape(g.shape[0] * g.shape[1], -1))
    return tuple(out)


def _one_position_block(a, h, w):
    """``(k·c, k·c)``: Σ_b w_b (a_b a_bᵀ) ⊗ h_b for a (b, k) and symmetric h (b, c, c),
    from the c(c + 1)/2 class pairs l ≤ L only: block (l, L) = Σ_b w_b h_b[l, L] a_b a_bᵀ
    equals block (L, l) (half the flops of the whole einsum). Each such block is itself
    symmetric, so with k ≥ 256 its columns are split in g = min(4, k // 128) groups and
    only the row-group-by-later-column products are made, (g + 1)/(2g) of the flops
    (the softmax regression's 7,850² Hessian over 5,000 examples: 3.26 s → 2.52 s).

    Each group's product is aᵀ · S with S = (b, P·k_i) the weighted rows, written
    example-major as they are computed; as ``einsum("bp,bk,bK->pkK")`` XLA wrote S
    transposed, (P·k_i, b), a strided copy as slow as the product on this CPU (the
    same Hessian's block: 1.91-2.01 s → 1.48-1.59 s; ``benchmarks/RESULTS.md``,
    "RPS's refit in compact form; explicit influence's
    factor stored upper")."""
    c, k = h.shape[-1], a.shape[-1]
    rows, cols = np.triu_indices(c)
    hw = h[:, rows, cols] * w[:, None]  # (b, P)
    groups = max(1, min(4, k // 128))
    edges = np.linspace(0, k, groups + 1).astype(int)
    a_t = transposed_copy(a)  # (k, b), made once
    # upper[i] (P, k_i, k - e_i): rows of group i against the columns of groups i, i+1, …
    upper = [jnp.transpose((a_t[e0:] @ (hw[:, :, None] * a[:, None, e0:e1]).reshape(
                 a.shape[0], -1)).reshape(k - e0, len(rows), e1 - e0), (1, 2, 0))
             for e0, e1 in zip(edges[:-1], edges[1:])]
    parts = []
    for i, (e0, e1) in enumerate(zip(edges[:-1], edges[1:])):
        lower = [jnp.swapaxes(upper[j][:, :, e0 - edges[j]:e1 - edges[j]], 1, 2)
                 for j in range(i)]
        parts.append(jnp.concatenate(lower + [upper[i]], axis=2))
    blocks = jnp.concatenate(parts, axis=1)  # (P, k, k)
    pair = np.zeros((c, c), np.int64)
    pair[rows, cols] = pair[cols, rows] = np.arange(len(rows))
    full = blocks[pair.reshape(-1)].reshape(c, c, k, k)  # [l, L, k, K]
    return jnp.transpose(full, (2, 0, 3, 1)).reshape(k * c, k * c)


def hessian_block_floats(layer: Layer, k_in: int, k_out: int) -> int:
    """Floats per example of :func:`layer_hessian_blocks` for one layer: its T·k_out
    products ``(T, d_out)``, their projection and the input rows."""
    return layer.positions ** 2 * k_out * (layer.d_out + k_out) + layer.positions * k_in


def _layer_output_hessians(loss_fn: Callable, params: PyTree, example: PyTree,
                           layers: Dict[str, Layer], *args) -> Dict[str, tuple]:
    """Inputs ``a: (T, d_in)`` and output Hessians ``H: (T, d_out, T, d_out)`` of every
    layer, for ONE example of ``loss_fn(params, example, *args)``
    (:func:`projected_output_hessian` without a projection)."""
    return {name: projected_output_hessian(loss_fn, params, example, args, layer)
            for name, layer in layers.items()}


# The fit runs in streamable stages (as Kronfluence's): (1) the covariance sums A, S
# (and the diagonal Fisher of other parameters) over chunks of the training set,
# (2) their eigendecompositions, (3) the eigenvalue correction, a second pass over the
# chunks in the fixed eigenbasis. Each chunk function below is pure over ONE member's
# ``loss(params, example, index, aux)``, ``params``, ``aux`` and an ``engine.Chunk``,
# and returns sums over the chunk's valid examples; ``ekfac_factors`` (one params
# pytree) and ``jattri.influence_ekfac`` (stacked members) fold them with
# ``jattri.engine.scan``, so a Stream is read chunk by chunk, twice.

class EKFACCovariances(NamedTuple):
    """Sums over examples i (divide by n for the means of ``ekfac_factors``):
    a: ``{name: (d_in + b, d_in + b)}`` Σ_i (1/T) Σ_t a'_t a'_tᵀ. s: ``{name: (d_out,
    d_out)}`` Σ_i Σ_t s_t s_tᵀ (``"ggn"``: Σ_i Σ_t H_i[t, t]). diag: pytree like params,
    Σ_i g_i² on leaves outside the factored layers (zeros on theirs)."""

    a: Dict[str, jax.Array]
    s: Dict[str, jax.Array]
    diag: PyTree


def ekfac_layers(loss_fn: Callable, params: PyTree, example: PyTree, *args) -> tuple:
    """The linear layers (linen Dense/Conv, NNX Linear/Conv, ``jattri.func.layers.dense``)
    ``loss_fn(params, example, *args)`` calls, as a tuple of
    ``jattri.func.layers.Layer`` (static, hashable); ``params``, ``example`` and ``args``
    may be arrays or ``jax.ShapeDtypeStruct``s. Raises ``ValueError`` if there are none
    (saying what is supported) or a layer's kernel is not the params leaf of its name."""
    layers = find_layers(loss_fn, params, example, *args)
    leaves = dict(leaf_keys(params))
    for layer in layers.values():
        kernel = leaves.get(layer.kernel_key)
        if kernel is None or tuple(np.shape(kernel)) != tuple(layer.kernel_shape):
            raise ValueError(f"layer {layer.name!r}: params leaf {layer.kernel_key!r} is "
                             f"{None if kernel is None else np.shape(kernel)}, the layer "
                             f"computes with a kernel of shape {layer.kernel_shape}; linen "
                             "params must be laid out by module path")
    return tuple(layers.values())


def _covered(params: PyTree, layers: tuple) -> PyTree:
    """Bool pytree like params: True on the kernel/bias leaves of a factored layer."""
    mine = _layer_leaves(layers)
    return jax.tree_util.tree_map_with_path(lambda p, x: leaf_key(p) in mine, params)


def ekfac_zero_covariances(layers: tuple, params: PyTree, dtype) -> EKFACCovariances:
    """Zero :class:`EKFACCovariances` (the start of a sum); ``params`` may be
    ``jax.ShapeDtypeStruct``s."""
    dims = {l.name: (l.d_in + int(l.use_bias), l.d_out) for l in layers}
    return EKFACCovariances({k: jnp.zeros((a, a), dtype) for k, (a, _) in dims.items()},
                            {k: jnp.zeros((s, s), dtype) for k, (_, s) in dims.items()},
                            jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                   params))


def _chunk_io(loss, params, aux, chunk, layers, curvature, bias_column: bool = True):
    """``{name: (a' (size, T, d_in + b), s (size, T, d_out) | H (size, T, d_out, T, d_out))}``;
    ``bias_column=False``: the inputs a as they are, ``(size, T, d_in)``."""
    by_name = {layer.name: layer for layer in layers}

    def one(z, i):
        if curvature == "ggn":
            io = _layer_output_hessians(loss, params, z, by_name, i, aux)
        else:
            io = layer_io(loss, params, z, i, aux, layers=by_name)
        return {k: (augment(a, by_name[k].use_bias and bias_column), s)
                for k, (a, s) in io.items()}

    return jax.vmap(one)(chunk.data, chunk.index)


def ekfac_covariance_sums(loss: Callable, params: PyTree, aux: PyTree, chunk, layers: tuple,
                          curvature: str = "empirical") -> EKFACCovariances:
    """Stage 1 on one chunk: :class:`EKFACCovariances` summed over its valid examples.

    ``loss(params, example, index, aux)``; peak memory one chunk's layer inputs and
    output gradients (``"ggn"``: output Hessians, (T·d_out)² per example and layer)."""
    io = _chunk_io(loss, params, aux, chunk, layers, curvature)
    a_sum, s_sum = {}, {}
    for layer in layers:
        a, s = io[layer.name]
        w = chunk.valid.astype(a.dtype)
        a_sum[layer.name] = jnp.einsum("n,nti,ntj->ij", w / a.shape[1], a, a)
        if curvature == "ggn":  # Σ_t H[t, t]: the curvature analogue of Σ_t s_t s_tᵀ
            s_sum[layer.name] = jnp.einsum("n,ntatb->ab", w.astype(s.dtype), s)
        else:
            s_sum[layer.name] = jnp.einsum("n,nta,ntb->ab", w.astype(s.dtype), s, s)
    covered = _covered(params, layers)
    if all(jax.tree_util.tree_leaves(covered)):
        diag = jax.tree_util.tree_map(jnp.zeros_like, params)
    else:
        g = jax.vmap(lambda z, i: jax.grad(loss)(params, z, i, aux))(chunk.data, chunk.index)
        diag = jax.tree_util.tree_map(
            lambda c, x: jnp.zeros(x.shape[1:], x.dtype) if c else jnp.einsum(
                "n,n...->...", chunk.valid.astype(x.dtype), x ** 2), covered, g)
    return EKFACCovariances(a_sum, s_sum, diag)


def ekfac_eigenbasis(cov: EKFACCovariances, n) -> tuple:
    """Stage 2: ``(qa, qs, la, ls)`` dicts by layer: the eigenvectors (COLUMNS) and
    eigenvalues of A = cov.a / n and S = cov.s / n (``eigh``; batched over any leading
    member axis)."""
    ea = {k: jnp.linalg.eigh(v / n) for k, v in cov.a.items()}
    es = {k: jnp.linalg.eigh(v / n) for k, v in cov.s.items()}
    return ({k: e[1] for k, e in ea.items()}, {k: e[1] for k, e in es.items()},
            {k: e[0] for k, e in ea.items()}, {k: e[0] for k, e in es.items()})


def _rotated_grads(a: jax.Array, s: jax.Array, qa: jax.Array, qs: jax.Array) -> jax.Array:
    """``(n, d_in + b, d_out)`` Q_Aᵀ G_i Q_S of the per-example gradients
    G_i = Σ_t a_t s_tᵀ, in the cheaper of two exact orders (static shapes):
    rotate the T rows first, Σ_t (Q_Aᵀa_t)(Q_Sᵀs_t)ᵀ, at T·(i² + o² + i·o) flops per
    example; or form G_i first, at T·i·o + i·o·(i + o). One position (T = 1, an MLP or
    an LR on 785 inputs and 10 classes): the first is 10× cheaper."""
    t, i, o = a.shape[1], a.shape[2], s.shape[2]
    if t * (i * i + o * o + i * o) <= t * i * o + i * o * (i + o):
        u = jnp.einsum("nti,ij->ntj", a, qa)
        v = jnp.einsum("nto,ok->ntk", s, qs)
        return jnp.einsum("ntj,ntk->njk", u, v)
    g = jnp.einsum("nti,nto->nio", a, s)  # per-example [kernel; bias] gradients
    return jnp.einsum("ij,nik->njk", qa, jnp.einsum("nio,ok->nik", g, qs))


def ekfac_eigenvalue_sums(loss: Callable, params: PyTree, aux: PyTree, chunk, layers: tuple,
                          qa: Dict[str, jax.Array], qs: Dict[str, jax.Array],
                          curvature: str = "empirical") -> Dict[str, jax.Array]:
    """Stage 3 on one chunk: ``{name: (d_in + b, d_out)}`` Σ_i (Q_Aᵀ G_i Q_S)² over its
    valid examples (``"ggn"``: Σ_i Σ_{t,t'} (q_Aʲᵀa'_t)(q_Aʲᵀa'_t') q_Sᵏᵀ H_i[t, t'] q_Sᵏ)."""
    io = _chunk_io(loss, params, aux, chunk, layers, curvature)
    out = {}
    for layer in layers:
        name = layer.name
        a, s = io[name]
        w = chunk.valid.astype(a.dtype)
        if curvature == "ggn":
            u = a @ qa[name]  # (size, T, d_in + b)
            hq = jnp.einsum("ntauc,ak,ck->ntuk", s, qs[name], qs[name])  # (size, T, T, d_out)
            out[name] = jnp.einsum("n,ntj,nuj,ntuk->jk", w, u, u, hq)
        elif a.shape[1] == 1:  # Σ_n w_n (ã_nj s̃_nk)² = ((w ⊙ ã²)ᵀ s̃²)_jk, nothing (n, i, o)
            u, v = a[:, 0] @ qa[name], s[:, 0] @ qs[name]
            out[name] = tmatmul(u * u * w[:, None], v * v)
        else:
            out[name] = jnp.einsum("n,njk->jk", w, _rotated_grads(a, s, qa[name], qs[name]) ** 2)
    return out


def ekfac_finish(qa: Dict[str, jax.Array], qs: Dict[str, jax.Array], la, ls,
                 eig_sums: Optional[Dict[str, jax.Array]], diag_sum: PyTree, n,
                 curvature: str = "empirical") -> EKFACFactors:
    """The factors: EK-FAC eigenvalues eig_sums / n (``"ggn"``: clamped at 0, a smooth
    activation can make H indefinite and Λ* < 0 would flip the inverse), or K-FAC's
    max(λ_A, 0) ⊗ max(λ_S, 0) when ``eig_sums`` is ``None``; diag = diag_sum / n."""
    if eig_sums is None:
        eigvals = {k: jnp.maximum(la[k], 0)[..., :, None] * jnp.maximum(ls[k], 0)[..., None, :]
                   for k in qa}
    else:
        eigvals = {k: v / n for k, v in eig_sums.items()}
        if curvature == "ggn":
            eigvals = {k: jnp.maximum(v, 0) for k, v in eigvals.items()}
    diag = jax.tree_util.tree_map(lambda x: x / n, diag_sum)
    return EKFACFactors({k: EKFACLayer(qa[k], qs[k], eigvals[k]) for k in qa}, diag)


def _user_loss(fn, params, example, index, aux):
    del index, aux
    return fn(params, example)


def _covariance_step(config, args, acc, chunk):
    layers, curvature = config
    loss, params = args
    new = ekfac_covariance_sums(loss, params, None, chunk, layers, curvature)
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), acc, new), None


def _eigenvalue_step(config, args, acc, chunk):
    layers, curvature = config
    loss, params, qa, qs = args
    new = ekfac_eigenvalue_sums(loss, params, None, chunk, layers, qa, qs, curvature)
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), acc, new), None


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def ekfac_factors(loss_fn: Callable, params: PyTree, data: Any, *,
                  correct_eigenvalues: bool = True, curvature: str = "empirical",
                  chunk_size: Optional[int] = None) -> EKFACFactors:
    """K-FAC / EK-FAC factors of every linear (Dense/Linear and Conv) layer, from layer
    inputs and output gradients captured without hooks (``jattri.func.layers``).

    For layer l with augmented inputs a'_t = [a_t, 1] and output gradients s_t
    (t over the T positions of an example; the empirical Fisher, i.e. gradients of the
    training loss at the observed labels):

        A = E_i[(1/T) Σ_t a'_t a'_tᵀ],   S = E_i[Σ_t s_t s_tᵀ],   A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ

    K-FAC (``correct_eigenvalues=False``, Martens & Grosse, 2015) uses eigenvalues
    Λ_A ⊗ Λ_S. EK-FAC (George et al., 2018, "Fast Approximate Natural Gradient Descent
    in a Kronecker-factored Eigenbasis"; Grosse et al., 2023) replaces them by the
    second moment of the per-example layer gradients G_i = Σ_t a'_t s_tᵀ in the
    eigenbasis: Λ*_{jk} = E_i[(Q_Aᵀ G_i Q_S)_{jk}²]. Parameters outside those layers
    get the diagonal empirical Fisher.

    A Conv layer is the same linear map applied at every output position t with a'_t
    the input patch under the kernel (KFC: Grosse & Martens, 2016, "A Kronecker-factored
    approximate Fisher matrix for convolution layers"; A is their Ω, S is T·Γ), so the
    formulas above hold as written with T = the number of output positions.

    ``curvature="ggn"`` replaces the observed-label outer products s sᵀ by the loss's
    own curvature at the layer output; for softmax cross-entropy and squared error this
    is the "true Fisher" (Kronfluence's default, which samples labels from the model)
    in closed form, without sampling. Per example, let H_i = ∂²loss/∂δ²
    ``(T, d_out, T, d_out)``, δ the zero perturbation of the layer outputs; the
    per-example Hessian of the layer's [kernel; bias] is then exactly
    Σ_{t,t'} a'_t a'_t'ᵀ ⊗ H_i[t, t'] (the layer is linear in its weights and its inputs
    do not depend on them, barring weight sharing that feeds a layer its own output), and

        S = E_i[Σ_t H_i[t, t]],   Λ*_{jk} = E_i[Σ_{t,t'} (q_Aʲᵀa'_t)(q_Aʲᵀa'_t') q_Sᵏᵀ H_i[t, t'] q_Sᵏ]

    i.e. Λ* is the diagonal of the exact per-layer Hessian block in the Kronecker
    eigenbasis (T = 1: E_i[(q_Aʲᵀa')² q_Sᵏᵀ H_i q_Sᵏ]). For the last layer H_i is the
    output Hessian of the loss (softmax cross-entropy: diag(p) − ppᵀ), so this is the
    Gauss-Newton block; for hidden layers of piecewise-linear (ReLU) networks it is the
    GGN block too (the activations' second derivatives vanish a.e.). With smooth
    activations H_i also carries the activations' second-order terms and may be
    indefinite: negative eigenvalues of S and negative Λ* are clamped at 0. Costs d_out
    forward-over-reverse passes per layer and example (the empirical Fisher: one
    backward pass in all) and (T·d_out)² memory per example and layer: fine for MLPs,
    prohibitive for wide layers over long sequences (an LM head over T tokens) and for
    Conv layers over large feature maps (T = H'·W').

    Stages (each a pass of ``jattri.engine.scan`` over chunks, so ``data`` may be a
    ``jattri.Stream``, read twice for EK-FAC and once for K-FAC):
    ``ekfac_covariance_sums`` → ``ekfac_eigenbasis`` → ``ekfac_eigenvalue_sums`` →
    ``ekfac_finish``.

    Memory: the factors, Σ_l [(d_in,l + b)² + d_out,l² + (d_in,l + b)·d_out,l] floats
    (+ d for the diagonal Fisher); peak one chunk's layer inputs and output gradients
    (and, with parameters outside the layers, ``chunk_size`` gradients of d floats).

    Args:
      loss_fn: per-example loss whose linear layers ``jattri.func.layers`` sees (module
        docstring: linen, NNX, or ``jattri.func.layers.dense`` in a plain-JAX
        model). data: n examples (a pytree with a
        leading example axis, or a ``jattri.Stream`` of such batches).
        correct_eigenvalues: EK-FAC (True) or K-FAC (False). curvature: ``"empirical"``
        (E[s sᵀ] of the observed loss gradients) or ``"ggn"`` (E[∂²loss/∂δ²], above).
        chunk_size: examples per chunk (default: all of an in-memory ``data`` at once,
        ``jattri.engine.default_chunk_size`` for a stream).
    Returns:
      ``EKFACFactors``; raises ``ValueError`` if ``loss_fn`` calls no linear layer (the
      message says what is supported) or ``curvature`` is unknown.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
    chunk_size = engine.check_chunk_size(chunk_size)
    loss = Partial(_user_loss, as_partial(loss_fn))
    example = jax.tree_util.tree_map(_spec, engine.first_example(data))
    layers = ekfac_layers(loss, params, example, jax.ShapeDtypeStruct((), jnp.int32), None)
    n = engine.num_examples(data)
    if chunk_size is not None:
        size = chunk_size if n is None else min(chunk_size, n)
    else:
        size = n if n is not None else engine.default_chunk_size(
            4 * sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params)))
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params), jnp.float32)
    cov, _, n = engine.scan(_covariance_step, (layers, curvature), (loss, params),
                            ekfac_zero_covariances(layers, params, dtype), data, size,
                            sums=True)
    qa, qs, la, ls = ekfac_eigenbasis(cov, n)
    sums = None
    if correct_eigenvalues:
        zero = {k: jnp.zeros((q.shape[0], qs[k].shape[0]), q.dtype) for k, q in qa.items()}
        sums, _, _ = engine.scan(_eigenvalue_step, (layers, curvature), (loss, params, qa, qs),
                                 zero, data, size, sums=True)
    return ekfac_finish(qa, qs, la, ls, sums, cov.diag, n, curvature)


def ekfac_coordinates(fn: Callable, params: PyTree, aux: PyTree, chunk, layers: tuple,
                      factors: EKFACFactors) -> jax.Array:
    """``(size, Σ_l (d_in,l + b)·d_out,l)`` the per-example gradients of ``fn`` in the
    EK-FAC eigenbasis, Q_Aᵀ G_i Q_S of every layer flattened in ``layers``' order, from
    the layers' inputs and output gradients (never the d-float gradient G_i; zero on
    padding rows). Exact only where every parameter is a kernel or bias of ``layers``
    and enters ``fn`` through its layer (see ``jattri.methods.tracin.rebuilt_layers``).

    In these coordinates (F_EKFAC + λI)⁻¹ is the diagonal
    :func:`ekfac_inverse_weights`, so g_iᵀ(F + λI)⁻¹g_t is a weighted inner product of
    coordinates: no test vector is rotated back to the parameters."""
    io = _chunk_io(fn, params, aux, chunk, layers, "empirical")
    parts = []
    for layer in layers:
        a, s = io[layer.name]
        f = factors.layers[layer.name]
        parts.append(_rotated_grads(a, s, f.qa, f.qs).reshape(a.shape[0], -1))
    return jnp.concatenate(parts, axis=1) * chunk.valid[:, None].astype(parts[0].dtype)


def ekfac_scores(fn: Callable, params: PyTree, aux: PyTree, chunk, layers: tuple,
                 factors: EKFACFactors, u: jax.Array) -> jax.Array:
    """``(size, n_test)``: :func:`ekfac_coordinates` of the chunk times ``uᵀ``
    (``u (n_test, k)``, the test side's coordinates in the same order), with a layer
    at one position never formed as ``(size, i·o)`` coordinates when that is no
    smaller than the ``(size, n_test, min(i, o))`` product that replaces it.

    Per such layer (i = d_in + b, o = d_out, ã = Q_Aᵀa, s̃ = Q_Sᵀs of an example),
    Σ_jk ã_j s̃_k U_t[j, k] = s̃ᵀ(U_tᵀ ã): one (size × i) · (i × n_test·o) product and a
    contraction with s̃ (or the same with the sides exchanged when i < o). The
    multiply-adds are the same; what is saved is writing and reading the formed
    coordinates (on dattri's MLP, 5,000 × 500: 2.9 → 2.6 s for the scoring products,
    ``benchmarks/RESULTS.md``)."""
    io = _chunk_io(fn, params, aux, chunk, layers, "empirical")
    n_test = u.shape[0]
    total, start = 0.0, 0
    for layer in layers:
        a, s = io[layer.name]
        f = factors.layers[layer.name]
        i, o = a.shape[2], s.shape[2]
        u_l = u[:, start:start + i * o]
        start += i * o
        if a.shape[1] == 1 and n_test * min(i, o) <= i * o:
            left, right = a[:, 0] @ f.qa, s[:, 0] @ f.qs  # (size, i), (size, o)
            part = _rank_one_scores(left, right, u_l.reshape(n_test, i, o))
        else:
            part = _rotated_grads(a, s, f.qa, f.qs).reshape(a.shape[0], -1) @ u_l.T
        total = total + part
    return total * chunk.valid[:, None].astype(total.dtype)


_SCANNED_RANK = 16


def _rank_one_scores(left: jax.Array, right: jax.Array, u3: jax.Array) -> jax.Array:
    """``(size, n_test)`` Σ_jk left_bj right_bk u3[t, j, k] (``left (size, i)``, ``right
    (size, o)``, ``u3 (n_test, i, o)``), contracting the larger of i and o first. With
    at most ``_SCANNED_RANK`` on the smaller side, a scan over it: each step one
    (size × max) · (max × n_test) product scaled by a column of the other side and
    added; otherwise the (size, n_test, min) product, formed and contracted. On the
    LR's 5,000 × 500 (i = 785, o = 10) the scan took 0.27-0.32 s against 0.34-0.39 s
    formed; on dattri's MLP (first layer o = 128) the whole compiled EK-FAC call took
    4.65-5.09 s with every layer scanned against 3.81-4.08 s with this rule
    (``benchmarks/kernel_shapes.py``, ``benchmarks/RESULTS.md``)."""
    if left.shape[1] < right.shape[1]:
        left, right, u3 = right, left, jnp.swapaxes(u3, 1, 2)
    if right.shape[1] > _SCANNED_RANK:
        return jnp.einsum("bto,bo->bt", jnp.einsum("bi,tio->bto", left, u3), right)
    stacked = jnp.transpose(u3, (2, 1, 0))  # (min, max, n_test)

    def add(acc, x):
        u, column = x
        return acc + (left @ u) * column[:, None], None

    zero = jnp.zeros((left.shape[0], u3.shape[0]), jnp.result_type(left, u3))
    # (a bare right.T is folded into right's product, which XLA then gives to oneDNN)
    return jax.lax.scan(add, zero, (stacked, transposed_result(right)))[0]


def ekfac_inverse_weights(factors: EKFACFactors, layers: tuple, damping) -> jax.Array:
    """``(Σ_l (d_in,l + b)·d_out,l,)`` 1/(Λ* + λ) in the order of
    :func:`ekfac_coordinates` (0 where Λ* + λ = 0, as :func:`ekfac_ihvp`)."""
    return jnp.concatenate([_safe_inverse(factors.layers[l.name].eigvals + damping).ravel()
                            for l in layers])


def ekfac_rotation_floats(layers: tuple) -> tuple:
    """Multiply-adds ``(coordinates, dense, back)``: per example of
    :func:`ekfac_coordinates`; per example of the parameter-space route's gradients,
    Σ T·i·o; and per test example of its rotation into the eigenbasis and back,
    2·Σ i·o·(i + o); i = d_in + b, o = d_out."""
    coords = dense = back = 0
    for l in layers:
        t, i, o = l.positions, l.d_in + int(l.use_bias), l.d_out
        coords += min(t * (i * i + o * o + i * o), t * i * o + i * o * (i + o))
        dense += t * i * o
        back += 2 * i * o * (i + o)
    return coords, dense, back


def _safe_inverse(x: jax.Array) -> jax.Array:
    """1/x where x > 0, else 0: the pseudo-inverse of a PSD diagonal, never inf/NaN."""
    return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def ekfac_ihvp(factors: EKFACFactors, v: PyTree, damping: float) -> PyTree:
    """(F_EKFAC + λI)⁻¹ v for ONE vector ``v`` (a pytree like params; vmap for many).

    Per linear layer, with V = [kernel; bias] of ``v`` (Conv kernel flattened):
    Q_A [(Q_Aᵀ V Q_S) ⊘ (Λ* + λ)] Q_Sᵀ; other parameters: v / (diag + λ). Directions
    with Λ* + λ = 0 (possible only with λ = 0) get 0: a pseudo-inverse, never NaN.
    Layers are found in ``v`` by name (``jattri.func.layers.layer_keys``).
    """
    leaves = dict(leaf_keys(v))
    new = {}
    for name, f in factors.layers.items():
        kernel_key, bias_key = layer_keys(v, name)
        x = leaves[kernel_key]
        kernel = x.reshape(-1, f.qs.shape[0])  # Conv: (prod(size)·C_in, C_out)
        use_bias = f.qa.shape[0] == kernel.shape[0] + 1
        if use_bias and bias_key is None:
            raise KeyError(f"layer {name!r}: the factors have a bias row, `v` no bias leaf")
        g = jnp.concatenate([kernel, leaves[bias_key][None]], 0) if use_bias else kernel
        rot = f.qa.T @ g @ f.qs
        g = f.qa @ (rot * _safe_inverse(f.eigvals + damping)) @ f.qs.T
        new[kernel_key] = g[:kernel.shape[0]].reshape(x.shape)
        if use_bias:
            new[bias_key] = g[-1]

    def leaf(path, x, dg):
        key = leaf_key(path)
        if key in new:
            return new[key].astype(x.dtype)
        return x * _safe_inverse(dg + damping)

    return jax.tree_util.tree_map_with_path(leaf, v, factors.diag)


# -------------------------------------------------------------------------- DataInf

def parameter_groups(params: PyTree) -> Dict[str, np.ndarray]:
    """Layers as parameter groups: leaves sharing a parent path (``fc1/kernel`` and
    ``fc1/bias``) form one group. Returns ``{group: flat indices}`` into
    ``ravel_pytree(params)[0]``, in leaf order."""
    groups: Dict[str, list] = {}
    offset = 0
    for key, x in leaf_keys(params):
        size = int(np.prod(np.shape(x), dtype=np.int64))
        name = key.rpartition("/")[0]
        groups.setdefault(name, []).append(np.arange(offset, offset + size))
        offset += size
    return {k: np.concatenate(v) for k, v in groups.items()}


def datainf_damping(train_grads: jax.Array, relative: float) -> jax.Array:
    """Kwon et al.'s default λ_l = relative · (1/(n d_l)) Σ_i ‖g_il‖² (> 0 unless all
    gradients vanish; floored at the dtype's ``tiny``)."""
    lam = relative * jnp.mean(jnp.sum(train_grads ** 2, -1)) / train_grads.shape[-1]
    return jnp.maximum(lam, jnp.finfo(train_grads.dtype).tiny)


def datainf_ihvp(train_grads: jax.Array, v: jax.Array, damping, *,
                 chunk_size: Optional[int] = None) -> jax.Array:
    """DataInf's closed-form inverse (Kwon et al., 2023, "DataInf: Efficiently
    Estimating Data Influence in LoRA-tuned LLMs and Diffusion Models") for ONE layer:

        (F + λI)⁻¹ v ≈ (1/n) Σ_i (g_i g_iᵀ + λI)⁻¹ v
                    = (1/λ) [v − (1/n) Σ_i g_i (g_iᵀ v) / (λ + ‖g_i‖²)]   (Sherman–Morrison)

    Args:
      train_grads: ``(n, d_l)`` the layer's training gradients g_i.
      v: ``(d_l,)`` or ``(m, d_l)``. damping: λ > 0 (scalar; see ``datainf_damping``).
      chunk_size: rows of ``v`` per chunk (bounds the ``(chunk, n)`` temporary).
    Returns:
      array shaped like ``v``.
    """
    weights = 1.0 / (damping + jnp.sum(train_grads ** 2, -1))  # (n,)
    n = train_grads.shape[0]

    def apply(x):
        coef = (train_grads @ x) * weights / n
        return (x - train_grads.T @ coef) / damping

    if v.ndim == 1:
        return apply(v)
    return map_examples(apply, v, chunk_size)
