"""LoGra (Choe et al., 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation
with Influence Functions").

For every Dense or Conv layer ℓ (y = a W + b; Conv: a = the input patch) the per-example
gradient is G_ℓ = Σ_τ ã_τ ⊗ s_τ, with ã = [a, 1] (the bias as a constant input) and
s = ∂loss/∂y. LoGra projects it by
the Kronecker product of two small random projections without ever forming it,

    φ_ℓ = vec(G_ℓ) (P_in ⊗ P_out) = vec(Σ_τ (ã_τ P_in) ⊗ (s_τ P_out))     (k_in·k_out,)

and scores with the damped empirical Fisher of each layer in that projected space,

    score(i, t) = Σ_ℓ φ_ℓ,iᵀ (F_ℓ + λ_ℓ I)⁻¹ ψ_ℓ,t,   F_ℓ = (1/n) Σ_j φ_ℓ,j φ_ℓ,jᵀ,

ψ being the same projection of ∇target(z_t). This is influence (jattri's orientation:
positive = i lowers the target on t) under a block-diagonal (per-layer) Fisher.
λ_ℓ = ``damping`` × tr(F_ℓ)/dim(F_ℓ), relative like TRAK's, so one default fits every
layer's gradient scale. Layer inputs and output gradients come hook-free from
``jattri.func.layers`` (Flax ``intercept_methods``); only ``nn.Dense`` and ``nn.Conv`` layers
are attributed through (other parameters are left out, as in LoGra).
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jattri import _checks
from jattri.func.grads import map_examples
from jattri.func.layers import layer_io, linear_layers
from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args,
                                     kronecker_projection)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class LograState(NamedTuple):
    """train: data. phi: ``(M, n, K)`` projected train gradients of all layers
    (K = Σ_ℓ k_ℓ). features: ``(M, n, K)`` = φ (F + λ)⁻¹ per layer block.
    fisher: tuple over layers of ``(M, k_ℓ, k_ℓ)`` damped Fisher blocks."""

    train: PyTree
    phi: jax.Array
    features: jax.Array
    fisher: tuple


def _layer_dims(layer, proj_dim_in, proj_dim_out):
    d_in = layer.d_in + int(layer.use_bias)
    k_in = d_in if proj_dim_in is None else int(proj_dim_in)
    k_out = layer.d_out if proj_dim_out is None else int(proj_dim_out)
    return d_in, k_in, k_out


@partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _projected_layer_grads(fn, params, data, key, layers, proj_dim_in, proj_dim_out,
                           projection, proj_chunk_size, chunk_size):
    """``(n, Σ_ℓ k_in·k_out)``: every example's Kronecker-projected layer gradients.

    ``layers`` is a static tuple of ``jattri.func.layers.Layer``; layer ℓ uses the
    projections of ``fold_in(key, ℓ)``.
    """
    projections = []
    for l, layer in enumerate(layers):
        d_in, _, _ = _layer_dims(layer, proj_dim_in, proj_dim_out)
        projections.append(kronecker_projection(
            jax.random.fold_in(key, l), d_in, layer.d_out, proj_dim_in, proj_dim_out,
            kind=projection, chunk_size=proj_chunk_size))
    by_name = {layer.name: layer for layer in layers}

    def one(zi):
        io = layer_io(fn, params, zi[0], zi[1], layers=by_name)
        out = []
        for layer, proj in zip(layers, projections):
            a, s = io[layer.name]
            if layer.use_bias:
                a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
            out.append(proj(a, s))
        return jnp.concatenate(out)

    return map_examples(one, (data, _common.indices_for(data)), chunk_size)


@jax.jit
def _damped_fisher_solve(phi, damping):
    """``(φ (F + λI)⁻¹, F + λI)`` with F = φᵀφ / n and λ = damping · tr(F) / k."""
    n, k = phi.shape
    fisher = phi.T @ phi / n
    lam = damping * jnp.trace(fisher) / k
    fisher = fisher + lam * jnp.eye(k, dtype=fisher.dtype)
    chol = jax.scipy.linalg.cho_factor(fisher, lower=True)
    return jax.scipy.linalg.cho_solve(chol, phi.T).T, fisher


def logra(task: Task, *, proj_dim_in: Optional[int] = 16, proj_dim_out: Optional[int] = 16,
          damping: float = 0.1, key: Optional[jax.Array] = None,
          projection: str = "gaussian", layers: Optional[Sequence[str]] = None,
          chunk_size: Optional[int] = None,
          proj_chunk_size: Optional[int] = DEFAULT_CHUNK) -> Attributor:
    """LoGra influence: Σ_ℓ φ_ℓ,iᵀ (F_ℓ + λ_ℓ I)⁻¹ ψ_ℓ,t, mean over members.

    Args:
      task: the Task; its loss must call Flax ``nn.Dense`` / ``nn.Conv`` layers through
        ``Module.apply`` (they are found by ``jattri.func.layers``).
      proj_dim_in, proj_dim_out: k_in, k_out of the Kronecker factors P_in
        ``(d_in + 1, k_in)`` and P_out ``(d_out, k_out)`` of every layer; ``None`` is the
        identity on that side (both ``None``: exact per-layer gradients).
      damping: relative λ > 0: λ_ℓ = damping · tr(F_ℓ) / dim(F_ℓ).
      key: PRNG key (member m, layer ℓ: ``fold_in(fold_in(key, m), ℓ)``); default
        ``PRNGKey(0)``.
      projection: ``"gaussian"``, ``"rademacher"`` or ``"sjlt"`` for both factors.
      layers: names of the Dense/Conv layers to use (default: all, in call order).
      chunk_size: examples per vectorised chunk; proj_chunk_size: input coordinates
        projected at a time.
    Returns:
      An Attributor whose state holds the projected gradients, φ(F + λ)⁻¹ and the
      damped Fisher blocks.
    """
    if not damping > 0:
        raise ValueError(f"`damping` must be > 0 (the Fisher of n < k examples is "
                         f"singular), got {damping}")
    check_projection_args(projection, proj_dim_in=proj_dim_in, proj_dim_out=proj_dim_out)
    if not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task, got {type(task).__name__}")
    members = task.members
    key = jax.random.PRNGKey(0) if key is None else key
    found = {}

    def layers_of(fn, data, name):
        z = _checks.first_example(data)
        idx = jnp.zeros((), jnp.int32)
        all_layers = linear_layers(fn, members[0].params, z, idx)
        if not all_layers:
            raise ValueError(f"`{name}` calls no flax.linen.Dense or Conv layer: LoGra "
                             "attributes through those layers only")
        wanted = list(all_layers) if layers is None else list(layers)
        missing = [w for w in wanted if w not in all_layers]
        if missing:
            raise ValueError(f"`layers` names {missing}, not Dense/Conv layers of `{name}`; "
                             f"found {list(all_layers)}")
        return tuple(all_layers[w] for w in wanted)

    def layer_specs(data, target):
        name = "target_fn" if target else "loss_fn"
        if name not in found:
            found[name] = layers_of(members[0].target_fn if target else members[0].loss_fn,
                                    data, name)
            other = found.get("loss_fn")
            if target and [(l.name, l.d_in, l.d_out, l.use_bias) for l in found[name]] != \
                    [(l.name, l.d_in, l.d_out, l.use_bias) for l in other]:
                raise ValueError("`target_fn` must use the same Dense/Conv layers as `loss_fn`")
        return found[name]

    def grads(m, data, target):
        member = members[m]
        fn = member.target_fn if target else member.loss_fn
        return _projected_layer_grads(fn, member.params, data, jax.random.fold_in(key, m),
                                      layer_specs(data, target), proj_dim_in, proj_dim_out,
                                      projection, proj_chunk_size, chunk_size)

    def blocks():
        sizes = [k_in * k_out for _, k_in, k_out in
                 (_layer_dims(l, proj_dim_in, proj_dim_out) for l in found["loss_fn"])]
        edges = [0]
        for s in sizes:
            edges.append(edges[-1] + s)
        return list(zip(edges[:-1], edges[1:]))

    def cache(train: PyTree) -> LograState:
        _common.check_train(task, train)
        layer_specs(train, False)
        phis, feats, fishers = [], [], []
        for m in range(len(members)):
            phi = grads(m, train, False)
            solved = [_damped_fisher_solve(phi[:, a:b], damping) for a, b in blocks()]
            phis.append(phi)
            feats.append(jnp.concatenate([s for s, _ in solved], axis=1))
            fishers.append([f for _, f in solved])
        fisher = tuple(jnp.stack([f[l] for f in fishers]) for l in range(len(blocks())))
        return LograState(train, jnp.stack(phis), jnp.stack(feats), fisher)

    def attribute(state: LograState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        layer_specs(state.train, False)
        return _common.member_mean(
            lambda m, _: state.features[m] @ grads(m, test, True).T, members)

    def self_attribute(state: LograState) -> jax.Array:
        layer_specs(state.train, False)

        def one(m, _):
            right = state.phi[m] if task.target_is_loss else grads(m, state.train, True)
            return jnp.sum(state.features[m] * right, axis=-1)

        return _common.member_mean(one, members)

    return Attributor(cache, attribute, self_attribute)
