"""Curvature other than the Hessian: Gauss-Newton and Fisher products, K-FAC / EK-FAC
factors of Dense and Conv layers, and DataInf's closed-form layer inverse.

Per-example functions take ``loss_fn(params, example) -> scalar`` for ONE example;
datasets are pytrees with a leading example axis n. g_i = ∇θ loss(z_i).

* empirical Fisher  F = (1/n) Σ_i g_i g_iᵀ                     (``efvp``, ``ifvp_explicit``)
* Gauss-Newton      G = Jᵀ ∇²ℓ J for f = ℓ ∘ out              (``ggn_vp``)
* K-FAC             F_l ≈ A_l ⊗ S_l per Dense/Conv layer l   (``ekfac_factors(correct_eigenvalues=False)``)
* EK-FAC            F_l ≈ (Q_A ⊗ Q_S) diag(Λ*) (Q_A ⊗ Q_S)ᵀ    (``ekfac_factors``)
  K-FAC / EK-FAC of the Gauss-Newton instead of the empirical Fisher: ``curvature="ggn"``
* DataInf           (F_l + λI)⁻¹ ≈ (1/n) Σ_i (g_il g_ilᵀ + λI)⁻¹ (``datainf_ihvp``)
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattri import _checks
from jattri.func.grads import map_examples
from jattri.func.hessian import damped_inverse
from jattri.func.layers import (Layer, input_rows, layer_io, layer_params, linear_layers,
                                 perturbed_loss)

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


def _augment(a: jax.Array, use_bias: bool) -> jax.Array:
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], -1) if use_bias else a


def _layer_grad(layer: Layer, sub: PyTree) -> jax.Array:
    """[kernel; bias] ``(d_in + b, d_out)`` of one layer's params (or gradient) sub-tree
    (a Conv kernel flattened to ``(prod(kernel_size)·in_features, features)``)."""
    g = sub["kernel"]
    if tuple(g.shape) != tuple(layer.kernel_shape):
        raise ValueError(f"layer {layer.name!r}: params kernel has shape {g.shape}, the "
                         f"layer computes {layer.kernel_shape}; params must be laid "
                         "out by module path")
    g = g.reshape(layer.d_in, layer.d_out)
    return jnp.concatenate([g, sub["bias"][None]], 0) if layer.use_bias else g


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _layer_leaf(path, layers) -> Optional[tuple]:
    """(layer name, "kernel"|"bias") if the leaf at ``path`` belongs to a Dense/Conv layer."""
    keys = [_key_name(k) for k in path]
    name, last = "/".join(keys[:-1]), keys[-1] if keys else ""
    if name in layers and last in ("kernel", "bias"):
        return name, last
    return None


CURVATURES = ("empirical", "ggn")


def _layer_output_hessians(loss_fn: Callable, params: PyTree, example: PyTree,
                           layers: Dict[str, Layer]) -> Dict[str, tuple]:
    """Inputs ``a: (T, d_in)`` and output Hessians ``H: (T, d_out, T, d_out)`` of every
    layer, for ONE example: H = ∂²loss/∂δ² at δ = 0, δ the zero perturbation of the
    layer's outputs at its T positions (the handle ``layer_io`` differentiates once;
    here forward-over-reverse, one jvp of the gradient per output coordinate)."""
    def flat_loss(name, flat):
        layer = layers[name]
        sizes = [int(np.prod(s[:-1], dtype=np.int64)) for s, _ in layer.out_shapes]
        parts = jnp.split(flat, np.cumsum(sizes)[:-1], axis=0)
        mine = [p.reshape(s) for p, (s, _) in zip(parts, layer.out_shapes)]
        loss, inputs = perturbed_loss(loss_fn, params, example, (), {name: mine})
        return loss, inputs[name]

    out = {}
    for name, layer in layers.items():
        flat0 = jnp.zeros((layer.positions, layer.d_out), layer.out_shapes[0][1])
        grad = jax.grad(partial(flat_loss, name), has_aux=True)
        hess, inputs = jax.jacfwd(grad, has_aux=True)(flat0)
        out[name] = (input_rows(layer, inputs), hess)
    return out


def ekfac_factors(loss_fn: Callable, params: PyTree, data: PyTree, *,
                  correct_eigenvalues: bool = True, curvature: str = "empirical",
                  chunk_size: Optional[int] = None) -> EKFACFactors:
    """K-FAC / EK-FAC factors of every Dense and Conv layer, from layer inputs and output
    gradients captured without hooks (``jattri.func.layers``).

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

    Args:
      loss_fn: per-example loss calling Flax ``nn.Dense`` / ``nn.Conv`` layers via
        ``Module.apply`` with ``{"params": params}``. data: n examples. correct_eigenvalues: EK-FAC
        (True) or K-FAC (False). curvature: ``"empirical"`` (E[s sᵀ] of the observed
        loss gradients) or ``"ggn"`` (E[∂²loss/∂δ²], above). chunk_size: examples per chunk.
    Returns:
      ``EKFACFactors``; raises ``ValueError`` if ``loss_fn`` calls no Dense/Conv layer or
      ``curvature`` is unknown.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
    example = _checks.first_example(data)
    layers = linear_layers(loss_fn, params, example)
    if not layers:
        raise ValueError("`loss_fn` calls no flax.linen.Dense or Conv layer: K-FAC/EK-FAC "
                         "need such layers applied through Module.apply")
    for layer in layers.values():
        _layer_grad(layer, layer_params(params, layer.name))  # layout check
    if curvature == "ggn":
        io = lambda z: _layer_output_hessians(loss_fn, params, z, layers)
        # Σ_t H[t, t]: the output-side factor, the curvature analogue of Σ_t s_t s_tᵀ.
        output_moment = lambda h: jnp.einsum("tatb->ab", h)
    else:
        io = lambda z: layer_io(loss_fn, params, z, layers=layers)
        output_moment = lambda s: s.T @ s

    def moments(z):
        out = {}
        for name, (a, s) in io(z).items():
            a = _augment(a, layers[name].use_bias)
            out[name] = (a.T @ a / a.shape[0], output_moment(s))
        return out

    second = chunked_mean(moments, data, chunk_size)
    eig = {name: (jnp.linalg.eigh(a), jnp.linalg.eigh(s)) for name, (a, s) in second.items()}
    qa = {name: e[0][1] for name, e in eig.items()}  # eigenvectors are the COLUMNS
    qs = {name: e[1][1] for name, e in eig.items()}
    if correct_eigenvalues and curvature == "ggn":
        def rotated_curvature(z):
            out = {}
            for name, (a, h) in io(z).items():
                u = _augment(a, layers[name].use_bias) @ qa[name]  # (T, d_in + b)
                hq = jnp.einsum("tauc,ak,ck->tuk", h, qs[name], qs[name])  # (T, T, d_out)
                out[name] = jnp.einsum("tj,uj,tuk->jk", u, u, hq)
            return out
        # A smooth activation can make H indefinite; Λ* < 0 would flip the inverse.
        eigvals = jax.tree_util.tree_map(
            lambda x: jnp.maximum(x, 0), chunked_mean(rotated_curvature, data, chunk_size))
    elif correct_eigenvalues:
        def rotated_sq(z):
            out = {}
            for name, (a, s) in io(z).items():
                g = _augment(a, layers[name].use_bias).T @ s  # (d_in + b, d_out)
                out[name] = (qa[name].T @ g @ qs[name]) ** 2
            return out
        eigvals = chunked_mean(rotated_sq, data, chunk_size)
    else:
        eigvals = {name: jnp.outer(jnp.maximum(e[0][0], 0), jnp.maximum(e[1][0], 0))
                   for name, e in eig.items()}
    factors = {name: EKFACLayer(qa[name], qs[name], eigvals[name]) for name in layers}

    covered = jax.tree_util.tree_map_with_path(
        lambda p, x: _layer_leaf(p, layers) is not None, params)
    if all(jax.tree_util.tree_leaves(covered)):
        diag = jax.tree_util.tree_map(jnp.zeros_like, params)
    else:
        diag = chunked_mean(
            lambda z: jax.tree_util.tree_map(jnp.square, jax.grad(loss_fn)(params, z)),
            data, chunk_size)
        diag = jax.tree_util.tree_map(lambda c, x: jnp.where(c, 0.0, x).astype(x.dtype),
                                      covered, diag)
    return EKFACFactors(factors, diag)


def _safe_inverse(x: jax.Array) -> jax.Array:
    """1/x where x > 0, else 0: the pseudo-inverse of a PSD diagonal, never inf/NaN."""
    return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def ekfac_ihvp(factors: EKFACFactors, v: PyTree, damping: float) -> PyTree:
    """(F_EKFAC + λI)⁻¹ v for ONE vector ``v`` (a pytree like params; vmap for many).

    Per Dense/Conv layer, with V = [kernel; bias] of ``v`` (Conv kernel flattened):
    Q_A [(Q_Aᵀ V Q_S) ⊘ (Λ* + λ)] Q_Sᵀ; other parameters: v / (diag + λ). Directions
    with Λ* + λ = 0 (possible only with λ = 0) get 0: a pseudo-inverse, never NaN.
    """
    layers = factors.layers
    new = {}
    for name, f in layers.items():
        sub = layer_params(v, name)
        kernel = sub["kernel"].reshape(-1, f.qs.shape[0])  # Conv: (prod(size)·C_in, C_out)
        use_bias = f.qa.shape[0] == kernel.shape[0] + 1
        g = jnp.concatenate([kernel, sub["bias"][None]], 0) if use_bias else kernel
        rot = f.qa.T @ g @ f.qs
        g = f.qa @ (rot * _safe_inverse(f.eigvals + damping)) @ f.qs.T
        new[name] = {"kernel": g[:kernel.shape[0]].reshape(sub["kernel"].shape)}
        if use_bias:
            new[name]["bias"] = g[-1]

    def leaf(path, x, dg):
        hit = _layer_leaf(path, layers)
        if hit is not None:
            return new[hit[0]][hit[1]].astype(x.dtype)
        return x * _safe_inverse(dg + damping)

    return jax.tree_util.tree_map_with_path(leaf, v, factors.diag)


# -------------------------------------------------------------------------- DataInf

def parameter_groups(params: PyTree) -> Dict[str, np.ndarray]:
    """Layers as parameter groups: leaves sharing a parent path (``fc1/kernel`` and
    ``fc1/bias``) form one group. Returns ``{group: flat indices}`` into
    ``ravel_pytree(params)[0]``, in leaf order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    groups: Dict[str, list] = {}
    offset = 0
    for path, x in leaves:
        size = int(np.size(x))
        name = "/".join(_key_name(k) for k in path[:-1])
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
