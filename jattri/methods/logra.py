"""LoGra (Choe et al., 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation
with Influence Functions").

For every linear layer ℓ (y = a W + b; Conv: a = the input patch) the per-example
gradient is G_ℓ = Σ_τ ã_τ ⊗ s_τ, with ã = [a, 1] (the bias as a constant input) and
s = ∂loss/∂y. LoGra projects it by the Kronecker product of two small random
projections without ever forming it,

    φ_ℓ = vec(G_ℓ) (P_in ⊗ P_out) = vec(Σ_τ (ã_τ P_in) ⊗ (s_τ P_out))     (k_in·k_out,)

and scores with the damped empirical Fisher of each layer in that projected space,

    score(i, t) = Σ_ℓ φ_ℓ,iᵀ (F_ℓ + λ_ℓ I)⁻¹ ψ_ℓ,t,   F_ℓ = (1/n) Σ_j φ_ℓ,j φ_ℓ,jᵀ,

ψ being the same projection of ∇target(z_t), averaged over members. This is influence
(jattri's orientation: positive = i lowers the target on t) under a block-diagonal
(per-layer) Fisher. λ_ℓ = ``damping`` × tr(F_ℓ)/dim(F_ℓ), relative like TRAK's, so one
value fits every layer's gradient scale (LogIX's 0.1 by default; with exact
Gauss-Newton blocks the default is the training objective's own L2 instead: ``logra``).

``curvature="ggn"`` replaces the empirical Fisher by each layer's block of the loss's
Hessian, projected: F_ℓ = (1/n) Σ_j (P_in ⊗ P_out)ᵀ [Σ_τσ ã_τ ã_σᵀ ⊗ ∂²loss_j/∂y_τ∂y_σ]
(P_in ⊗ P_out). The layer is linear in its own parameters, so this is that block of
the Hessian exactly; with only piecewise-linear activations above the layer (ReLU) it is
the Gauss-Newton block, and for a cross-entropy loss the Fisher of the model's own
predictive distribution (Kronfluence's default "true Fisher", in closed form instead of
sampled labels). The empirical Fisher of the observed-label gradients can be a poor
stand-in for it (Kunstner et al., 2019, "Limitations of the Empirical Fisher
Approximation for Natural Gradient Descent"). Its price: T·k_out Hessian-vector
products (forward over reverse) per example and layer instead of one backward pass, so
the default ``curvature="auto"`` takes it only while that is at most 256.
Layer inputs and output gradients come
hook-free from ``jattri.func.layers``; only linear layers are attributed through (other
parameters are left out, as in LoGra): Flax linen ``nn.Dense`` / ``nn.Conv``, Flax NNX
``nnx.Linear`` / ``nnx.Conv`` of ``nnx.merge(graphdef, params)`` inside the loss, and in a
plain-JAX model the products written ``jattri.func.layers.dense(x, w, b)``.

Stages: ``cache`` streams the training set once, keeping φ ``(n, M, K)`` and the
undamped Fisher blocks F_ℓ; ``attribute`` projects the test gradients, preconditions
them by (F_ℓ + λ_ℓ I)⁻¹ (damping can change here without re-caching) and scores the
stored rows tile by tile (dense or top-k).
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattri import _checks, engine
from jattri._jit import jit
from jattri.func.fisher import augment, hessian_block_floats, layer_hessian_blocks
from jattri.func.layers import find_layers, layer_io, same_layers
from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args, derive_key,
                                     key_words, seeded_matrix)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Members, as_task

PyTree = Any


class LograState(NamedTuple):
    """members: the Members scored. train: the in-memory training set (a reference) or
    ``None`` if streamed. phi: ``(n, M, K)`` projected train loss gradients of all
    layers (K = Σ_ℓ k_ℓ, k_ℓ = k_in·k_out). fisher: tuple over layers of ``(M, k_ℓ,
    k_ℓ)`` undamped F_ℓ = (1/n) Σ_j φ_ℓ,j φ_ℓ,jᵀ (or the Gauss-Newton blocks).
    damping: per layer ``(M,)`` the absolute λ of the default rule where it applies
    (exact Gauss-Newton blocks: the stationary L2), else ``None``. made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``).

    Memory: n·M·K + M·Σ_ℓ k_ℓ² floats (no ``(n, d)`` array)."""

    members: Members
    train: PyTree
    phi: jax.Array
    fisher: tuple
    damping: Optional[jax.Array]
    made: _common.Provenance


#: ``curvature``: the Fisher F_ℓ of the empirical loss gradients, or the Gauss-Newton blocks.
CURVATURES = ("empirical", "ggn")

#: ``curvature="auto"`` takes the Gauss-Newton blocks while every layer needs at most
#: this many Hessian-vector products per example (T·k_out), else the empirical Fisher.
GGN_AUTO_PRODUCTS = 256

#: The relative damping where no absolute rule applies: LogIX's 0.1 × tr(F_ℓ)/k_ℓ.
RELATIVE_DAMPING = 0.1


def resolve_curvature(curvature: str, layers, proj_dim_out: Optional[int]) -> str:
    """The blocks ``cache`` accumulates: ``"auto"`` → ``"auto"`` (the Gauss-Newton
    blocks, kept per member or not by :func:`_auto_blocks`) if max_ℓ
    T_ℓ·k_out,ℓ ≤ :data:`GGN_AUTO_PRODUCTS`, else ``"empirical"``; any other value as
    it is."""
    if curvature != "auto":
        return curvature
    products = max(layer.positions * (layer.d_out if proj_dim_out is None
                                      else int(proj_dim_out)) for layer in layers)
    return "auto" if products <= GGN_AUTO_PRODUCTS else "empirical"

# config = (layers: tuple of func.layers.Layer, proj_dim_in, proj_dim_out, projection,
#           curvature): static and hashable.

def _layer_dims(layer, proj_dim_in, proj_dim_out):
    d_in = layer.d_in + int(layer.use_bias)
    k_in = d_in if proj_dim_in is None else int(proj_dim_in)
    k_out = layer.d_out if proj_dim_out is None else int(proj_dim_out)
    return d_in, k_in, k_out


def _block_sizes(config) -> tuple:
    """k_ℓ = k_in·k_out of every layer: the sizes of φ's layer blocks."""
    layers, proj_dim_in, proj_dim_out = config[:3]
    return tuple(k_in * k_out for _, k_in, k_out in
                 (_layer_dims(layer, proj_dim_in, proj_dim_out) for layer in layers))


def _member_phi(config, fn, params, aux, factors, chunk):
    """``(size, K)`` Kronecker-projected layer gradients of one member (zero on
    padding), with that member's :func:`kronecker_factors`."""
    return kronecker_phi(config[0], factors, fn, params, aux, chunk)


def _dims(config) -> tuple:
    layers, proj_dim_in, proj_dim_out = config[:3]
    return tuple((proj_dim_in, proj_dim_out) for _ in layers)


def kronecker_factors(layers, dims, kind: str, key: jax.Array, num: int,
                      shared: bool = False, memo: Optional[dict] = None) -> tuple:
    """Per layer ``(P_in (M, d_in + b, k_in), P_out (M, d_out, k_out))`` of the ``num``
    members (``None``: the identity on that side, ``dims[ℓ] = (k_in, k_out)``): member
    m's layer ℓ side j is the projector of seed ``derive_key(derive_key(keys[m], ℓ), j)``
    with member m's key ``keys[m] = derive_key(key, m)`` (``shared``: ``key`` itself for
    every member; ``jattri.func.projection.derive_key``, a hash, no threefry), derived
    inside the same program: the matrices of
    ``jattri.func.projection.kronecker_projection(derive_key(keys[m], ℓ), ...)``.
    (Derived with threefry ``fold_in``, the program's XLA compilation took 0.73-0.90 s
    on dattri's 109,386-parameter MLP at k = 512, now 0.23-0.34 s.) Made once per
    stage (with ``memo``, once per factory), outside the compiled steps, which then
    only multiply (generated inside every step, TRAK's programs on a 3-layer 109k MLP
    compiled in 1.96 s and 2.04 s; now 0.37-0.40 s and
    0.25-0.31 s, plus 0.65-0.75 s once for the factors), all in one program (one
    compilation per model shape instead of one per factor). Memory
    M·Σ_ℓ (d_in·k_in + d_out·k_out) floats.

    ``memo``: a factory's dict for a factory's one ``key``: the factors made outside
    any trace are kept there (the last :data:`FACTOR_MEMO` layer plans) and returned
    again by every later stage of the same plan outside a trace instead of made anew
    (a program's run, twice in each TRAK call: 2.3 ms a call on the MNIST LR under
    cProfile); inside a trace they are made there, not baked in as constants. The kept
    factors live as long as the factory."""
    plan = (tuple((l.d_in + int(l.use_bias), l.d_out) for l in layers), tuple(dims), kind,
            int(num), bool(shared))
    concrete = memo is not None and _common.is_concrete(key)  # no constants in a trace
    kept = plan + (bool(jax.config.jax_enable_x64),)  # the factors' dtype
    if concrete and kept in memo:
        return memo[kept]
    made = _kronecker_factors(*plan, key)
    if concrete and FACTOR_MEMO > 0:
        while len(memo) >= FACTOR_MEMO:  # the oldest plan goes
            memo.pop(next(iter(memo)))
        memo[kept] = made
    return made


#: Layer plans whose factors a factory's ``memo`` keeps (:func:`kronecker_factors`).
FACTOR_MEMO = 2


@partial(jit, static_argnums=(0, 1, 2, 3, 4), once=True, closed=True)
def _kronecker_factors(sizes, dims, kind, num, shared, key):
    # Seeds are hashed from the key's words (derive_key), every matrix from its seed:
    # no threefry call site, each of which cost 0.05-0.3 s of XLA compilation.
    words = key_words(key)
    keys = (jnp.broadcast_to(words, (num, 2)) if shared else
            jax.vmap(lambda m: derive_key(words, m))(jnp.arange(num)))
    sides = [(l, j, int(d), int(k)) for l, (size, ks) in enumerate(zip(sizes, dims))
             for j, (d, k) in enumerate(zip(size, ks)) if k is not None]
    if not sides:
        return tuple((None, None) for _ in sizes)
    ls, js = jnp.array([s[0] for s in sides]), jnp.array([s[1] for s in sides])
    seeds = jax.vmap(lambda w: jax.vmap(lambda l, j: derive_key(derive_key(w, l), j))(
        ls, js))(keys)  # (num, sides, 2)
    made = {(l, j): jax.vmap(partial(seeded_matrix, kind=kind, d=d, k=k))(seeds[:, i])
            for i, (l, j, d, k) in enumerate(sides)}
    return tuple((made.get((l, 0)), made.get((l, 1))) for l in range(len(sizes)))


def kronecker_phi(layers, factors, fn, params, aux, chunk):
    """``(size, Σ_ℓ k_in,ℓ·k_out,ℓ)``: every example's layer gradients G_ℓ = Σ_τ ã_τ ⊗ s_τ
    projected by P_in,ℓ ⊗ P_out,ℓ (``factors``: one member's :func:`kronecker_factors`),
    never forming G_ℓ; zero on padding. The layer inputs and output gradients of the
    whole chunk are captured first, then each factor multiplies all of them at once.
    Shared by LoGra and the ``projection="kronecker"`` of TRAK and TracIn."""
    by_name = {layer.name: layer for layer in layers}
    io = jax.vmap(lambda z, i: layer_io(fn, params, z, i, aux, layers=by_name))(
        chunk.data, chunk.index)
    b = chunk.valid.shape[0]
    out = []
    for layer, (p_in, p_out) in zip(layers, factors):
        a, s = io[layer.name]  # (b, T, d_in), (b, T, d_out)
        if p_in is None:
            pa = augment(a, layer.use_bias)
        else:  # ã·P_in = a·P_in[:-1] + P_in[-1]: no (b, T, d_in + 1) copy of a
            p_in = p_in.astype(a.dtype)
            pa = a @ p_in[:-1] + p_in[-1] if layer.use_bias else a @ p_in
        ps = s if p_out is None else s @ p_out.astype(s.dtype)
        out.append(jnp.einsum("btk,btl->bkl", pa, ps).reshape(b, -1))
    phi = jnp.concatenate(out, axis=1)
    return phi * chunk.valid[:, None].astype(phi.dtype)


def _phi(config, args, chunk):
    """``(size, M, K)``: φ of every member for one chunk (member j projects with its own
    factors, :func:`kronecker_factors`)."""
    fn, members, factors = args
    phi = _common.member_map(lambda p, a, f: _member_phi(config, fn, p, a, f, chunk),
                             members, factors)
    return jnp.swapaxes(phi, 0, 1)


def _cache_step(config, args, fisher, chunk):
    """Adds the chunk's blocks to ``fisher``: the Gauss-Newton blocks (``"ggn"``, and
    ``"auto"``: :func:`_auto_blocks` chooses afterwards) or the empirical ones."""
    phi = _phi(config, args, chunk)
    if config[-1] in ("ggn", "auto"):
        fn, members, factors = args
        new = _common.member_map(
            lambda p, a, f: layer_hessian_blocks(config[0], f, fn, p, a, chunk),
            members, factors)
    else:
        new = _empirical_blocks(phi, _blocks(fisher))
    return tuple(f + g.astype(f.dtype) for f, g in zip(fisher, new)), phi


def _ggn_floats(config) -> int:
    """Floats per example of the Gauss-Newton fit's largest layer."""
    layers, proj_dim_in, proj_dim_out = config[:3]
    return max(hessian_block_floats(layer, k_in, k_out) for layer, (_, k_in, k_out) in
               ((l, _layer_dims(l, proj_dim_in, proj_dim_out)) for l in layers))


def _empirical_blocks(phi: jax.Array, edges: tuple) -> tuple:
    """Per layer ``(M, k_ℓ, k_ℓ)``: Σ over rows of φ_ℓ φ_ℓᵀ, φ ``(rows, M, K)``."""
    return tuple(jnp.einsum("bmk,bml->mkl", phi[..., a:b], phi[..., a:b]) for a, b in edges)


def _tile(config, solved, chunk):
    return jnp.einsum("bmk,mkt->bt", chunk.data, solved) / solved.shape[0]


def _self_tile(edges, inverses, chunk):
    phi, right = chunk.data
    total = sum(jnp.einsum("bmk,mkl,bml->b", phi[..., a:b], inv, right[..., a:b])
                for inv, (a, b) in zip(inverses, edges))
    return total / phi.shape[1]


def _positive_definite(fisher: jax.Array, lam: jax.Array) -> jax.Array:
    """``(M,)``: whether F + λI (``(M, k, k)``, ``(M,)``) has a finite Cholesky factor,
    member by member."""
    eye = jnp.eye(fisher.shape[-1], dtype=fisher.dtype)

    def one(f, l):  # a failed factorisation is NaN throughout: its diagonal shows it
        factor = jax.lax.linalg.cholesky(f + l * eye, symmetrize_input=False)
        return jnp.all(jnp.isfinite(jnp.diagonal(factor)))

    return _common.each_member(one, fisher, lam)


def _relative(fisher: jax.Array, damping) -> jax.Array:
    """``(M,)`` λ = damping · tr(F)/k of every member."""
    return damping * jnp.trace(fisher, axis1=-2, axis2=-1) / fisher.shape[-1]


@partial(jit, once=True)
def _auto_blocks(ggn: tuple, phi: jax.Array, stationary):
    """``curvature="auto"``'s blocks and absolute damping: per member, the Gauss-Newton
    blocks where every layer's is positive definite at the default damping (``stationary``
    absolute, or ``RELATIVE_DAMPING`` relative where ``None``), else the empirical
    Fisher's, made from the stored φ ``(n, M, K)`` only when some member needs them
    (``lax.cond``). Returns ``(blocks, absolute, kept)``: absolute per layer ``(M,)``
    (the stationary L2 where the Gauss-Newton blocks were kept, else the relative rule
    on the empirical blocks; ``None`` without ``stationary``), kept ``(M,)``."""
    lam = tuple(_relative(g, RELATIVE_DAMPING) if stationary is None
                else jnp.broadcast_to(stationary, g.shape[:1]).astype(g.dtype) for g in ggn)
    kept = jnp.all(jnp.stack([_positive_definite(g, l) for g, l in zip(ggn, lam)]), axis=0)

    def mixed(_):
        empirical = tuple(e.astype(g.dtype) / phi.shape[0]
                          for g, e in zip(ggn, _empirical_blocks(phi, _blocks(ggn))))
        blocks = tuple(jnp.where(kept[:, None, None], g, e) for g, e in zip(ggn, empirical))
        return blocks, tuple(jnp.where(kept, l, _relative(e, RELATIVE_DAMPING))
                             for l, e in zip(lam, empirical))

    blocks, absolute = jax.lax.cond(jnp.all(kept), lambda _: (ggn, lam), mixed, None)
    return blocks, None if stationary is None else absolute, kept


def damped_fisher(fisher: jax.Array, damping, absolute=None) -> jax.Array:
    """F + λ I for every member (``(M, k, k)``): λ = ``absolute`` if given, else
    damping · tr(F) / k."""
    lam = (_relative(fisher, damping) if absolute is None
           else jnp.broadcast_to(jnp.asarray(absolute, fisher.dtype), fisher.shape[:1]))
    return fisher + lam[:, None, None] * jnp.eye(fisher.shape[-1], dtype=fisher.dtype)


def _blocks(fisher) -> tuple:
    """``((start, stop), ...)``: layer ℓ's coordinates of φ, from the Fisher blocks."""
    stops = np.cumsum([f.shape[-1] for f in fisher])
    return tuple((int(b - f.shape[-1]), int(b)) for f, b in zip(fisher, stops))


def _cholesky_inverse(spd: jax.Array) -> jax.Array:
    """``(k, k)`` inverse of ONE symmetric positive definite block."""
    eye = jnp.eye(spd.shape[-1], dtype=spd.dtype)
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(spd, lower=True), eye)


@partial(jit, once=True)
def _solve(fisher: tuple, damping, psi: jax.Array, absolute=None) -> jax.Array:
    """``(M, K, n_test)``: :func:`_precondition` of the test side ``psi``
    ``(n_test, M, K)``, in one program (eagerly, fourteen compilations on a first
    call)."""
    return _precondition(fisher, damping, jnp.transpose(psi, (1, 2, 0)), absolute)


@partial(jit, once=True)
def _inverses(fisher: tuple, damping, absolute=None) -> tuple:
    """(F_ℓ + λ_ℓ I)⁻¹ of every block, in one program."""
    return _common.each_member(lambda *blocks: tuple(_cholesky_inverse(f) for f in blocks),
                             *_damped(fisher, damping, absolute))


def _damped(fisher: tuple, damping, absolute) -> tuple:
    """Every block damped: ``absolute`` ``None`` or one λ ``(M,)`` per block."""
    absolute = (None,) * len(fisher) if absolute is None else absolute
    return tuple(damped_fisher(f, damping, a) for f, a in zip(fisher, absolute))


@partial(jit, once=True)
def _mean(fisher: tuple, n) -> tuple:
    return tuple(f / n for f in fisher)


def _precondition(fisher: tuple, damping, rhs: jax.Array, absolute=None) -> jax.Array:
    """``(M, K, t)``: (F_ℓ + λ_ℓ I)⁻¹ applied to layer ℓ's rows of ``rhs`` ``(M, K, t)``,
    by Cholesky, block by block."""
    edges = _blocks(fisher)

    def one(rhs_m, *blocks):
        return jnp.concatenate([
            jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(f, lower=True),
                                       rhs_m[a:b]) for f, (a, b) in zip(blocks, edges)])

    return _common.each_member(one, rhs, *_damped(fisher, damping, absolute))


def _check_solved(x, damping):
    """A (concrete) preconditioned result must be finite: a Cholesky of a block that is
    not numerically positive definite returns NaN, never an error."""
    if _common.is_concrete(x) and not _checks.all_finite(x):
        raise ValueError(
            f"LoGra's damped Fisher F + λI ({damping}) is "
            "not numerically positive definite in a layer's block, so its inverse is NaN: "
            "increase `damping`, or leave out (`layers=`) a layer whose projected "
            "gradients are all zero (with curvature=\"ggn\", a layer followed by smooth "
            "activations can have an indefinite Hessian block)")
    return x


def _check_damping(damping):
    # > 0: the Fisher of n < k examples is singular
    return _checks.real(damping, "damping", low=0, open_low=True, none=True)


def _damping_of(damping, state):
    """``(relative, absolute, text)`` of an ``attribute`` call: a given ``damping`` is
    relative; ``None`` is the state's absolute λ where the default rule set one, else
    :data:`RELATIVE_DAMPING` relative."""
    if damping is None and state.damping is not None:
        return RELATIVE_DAMPING, state.damping, "λ = the stationary L2 of the default rule"
    relative = RELATIVE_DAMPING if damping is None else damping
    return relative, None, f"λ = damping · tr(F)/k, damping={relative!r}"


def logra(task: Any, *, proj_dim_in: Optional[int] = 16, proj_dim_out: Optional[int] = 16,
          damping: Optional[float] = None, key: Optional[jax.Array] = None,
          projection: str = "gaussian", layers: Optional[Sequence[str]] = None,
          curvature: str = "auto", chunk_size: Optional[int] = None,
          proj_chunk_size: Optional[int] = DEFAULT_CHUNK) -> Attributor:
    """LoGra influence: Σ_ℓ φ_ℓ,iᵀ (F_ℓ + λ_ℓ I)⁻¹ ψ_ℓ,t, mean over members.

    Args:
      task: a :class:`jattri.Task` or a ``loss_fn(params, example)`` whose linear layers
        are found by ``jattri.func.layers``, with the user's code unchanged for Flax:
        linen ``nn.Dense`` / ``nn.Conv`` called through ``model.apply({"params":
        params}, x)``; NNX ``nnx.Linear`` / ``nnx.Conv`` of a module rebuilt inside the
        loss, ``nnx.merge(graphdef, params)(x)`` with ``graphdef, params =
        nnx.split(model)`` (params: the ``nnx.State`` or ``nnx.to_pure_dict(state)``). In a
        plain-JAX model, name each linear layer by computing it as
        ``jattri.func.layers.dense(x, params["fc1"]["w"], params["fc1"]["b"])`` instead
        of ``x @ w + b`` (same value; the kernel and bias must be leaves of ``params``).
      proj_dim_in, proj_dim_out: k_in, k_out of the Kronecker factors P_in
        ``(d_in + 1, k_in)`` and P_out ``(d_out, k_out)`` of every layer; ``None`` is the
        identity on that side (both ``None``: exact per-layer gradients).
      damping: relative λ > 0: λ_ℓ = damping · tr(F_ℓ) / dim(F_ℓ) (LogIX's form);
        ``attribute(..., damping=...)`` overrides it without re-caching. Default
        ``None``, a stated rule: with exact Gauss-Newton blocks (both projections
        ``None`` and ``curvature`` resolved to ``"ggn"``) the blocks are those of the
        loss's Hessian, and the objective a model was trained on adds its L2 to them:
        λ_ℓ = λ̂, the stationary L2 of the whole model (``jattri.stationary_damping``,
        the influence family's default, one gradient pass at ``cache``; stored as
        ``state.damping``). Everywhere else LogIX's relative 0.1: λI does not survive
        a random projection as a multiple of the identity, and an empirical Fisher is
        not the Hessian λ̂ is added to. On the embedded digits settings the default
        scores within 0.03 of the best damping of the grid in all six LoGra builds
        (``benchmarks/RESULTS.md``, "LoGra's defaults").
      key: PRNG key (member m, layer ℓ: the factors of
        ``kronecker_projection(derive_key(derive_key(key, m), ℓ), ...)``,
        ``jattri.func.projection``); default ``PRNGKey(0)``.
      projection: ``"gaussian"``, ``"rademacher"`` or ``"sjlt"`` for both factors.
      layers: names of the layers to use (default: all, in call order): linen module
        paths (``"fc1"``), NNX attribute paths (``"layers/0"``), plain layers by their
        leaves (``"fc1/w+fc1/b"``); ``jattri.func.linear_layers`` lists them.
      curvature: ``"empirical"`` (LoGra's: F_ℓ from the observed-label gradients φ),
        ``"ggn"`` (each layer's projected block of the loss's Hessian, the Gauss-Newton
        block for ReLU networks and the model's own Fisher for cross-entropy: module
        docstring), or ``"auto"`` (default): ``"ggn"`` while every layer needs at most
        ``GGN_AUTO_PRODUCTS`` = 256 Hessian-vector products per example (T·k_out: 16
        per layer with 16 × 16 projections on a one-position model, d_out with exact
        blocks), else ``"empirical"`` (a 64-token text model's 16-column P_out needs
        1,024 per layer, against one backward pass). Why the Gauss-Newton blocks where
        they are affordable: influence needs the curvature of the loss, which the
        empirical Fisher approximates poorly (Kunstner et al., 2019); Kronfluence's
        default is the same "true Fisher". On the digits settings they score higher in
        every build (LDS 0.714 → 0.791 for 16 × 16 projections on the LR, 0.380 →
        0.476 for exact blocks on the MLP; ``benchmarks/RESULTS.md``, "LoGra with
        Gauss-Newton blocks"). A block can be indefinite when smooth activations (tanh,
        GELU) follow the layer: ``"auto"`` factorises every block once at ``cache`` and
        keeps the empirical Fisher (made from the stored φ) for a member with a block
        that is not positive definite at the default damping, with a ``UserWarning``
        naming it; with ``"ggn"``, ``attribute`` refuses such a block with
        ``ValueError`` (pass ``curvature="empirical"`` or more damping).
      chunk_size: examples per compiled step (default: 256 MiB of d-float gradients;
        with ``"ggn"`` at least T²·k_out·(d_out + k_out) floats per example);
        proj_chunk_size: accepted for compatibility and ignored: the Kronecker
        factors are made whole, (d_in + 1)·k_in and d_out·k_out floats per layer.

    Memory: state n·M·K + M·Σ_ℓ k_ℓ² floats (K = Σ_ℓ k_ℓ, k_ℓ = k_in·k_out); peak
    ``chunk_size`` examples' layer inputs and output gradients (Σ_ℓ T_ℓ·(d_in,ℓ +
    d_out,ℓ) floats each, never the ``d``-float gradient) plus one projection block; a
    scoring tile is ``chunk_size × n_test``.
    """
    _check_damping(damping)
    check_projection_args(projection, proj_dim_in=proj_dim_in, proj_dim_out=proj_dim_out,
                          proj_chunk_size=proj_chunk_size)
    _checks.choice(curvature, "curvature", CURVATURES + ("auto",))
    chunk_size = engine.check_chunk_size(chunk_size)
    task = as_task(task)
    key = _common.default_key() if key is None else _checks.prng_key(key)
    if layers is not None and (isinstance(layers, str) or not all(
            isinstance(w, str) for w in layers)):
        raise TypeError(f"`layers` must be a sequence of layer names (str) or None, got "
                        f"{layers!r}")
    wanted = None if layers is None else tuple(layers)
    made = _common.hyper(task, proj_dim_in=proj_dim_in, proj_dim_out=proj_dim_out, key=key,
                         projection=projection, layers=wanted,
                         proj_chunk_size=proj_chunk_size,
                         # recorded only for "ggn": states cached before the option
                         # existed (empirical) stay valid
                         **({} if curvature != "ggn" else {"curvature": curvature}))
    factors = {}  # the projections' factors, made once (``kronecker_factors``)

    def discover(members, data, target):
        fn, name = (task.target, "target_fn") if target else (task.loss, "loss_fn")
        found = find_layers(fn, _common.row_spec(members.params), _common.example_spec(data),
                            jax.ShapeDtypeStruct((), jnp.int32), _common.row_spec(members.aux),
                            fn_name=name, method="LoGra")
        names = list(found) if wanted is None else list(wanted)
        missing = [w for w in names if w not in found]
        if missing:
            raise ValueError(f"`layers` names {missing}, not linear layers of `{name}`; "
                             f"found {list(found)}")
        return tuple(found[w] for w in names)

    def config(members, data, target):
        specs = discover(members, data, target)
        if target and not task.target_is_loss:
            if not same_layers(specs, discover(members, data, False)):
                raise ValueError("`target_fn` must use the same linear layers as "
                                 "`loss_fn`")
        return (specs, proj_dim_in, proj_dim_out, projection,
                resolve_curvature(curvature, specs, proj_dim_out))

    def size(members, data, floats=None):
        return _common.chunk_size_for(chunk_size, members, data, floats)

    def cache(members, train) -> LograState:
        members = _common.setup(task, members, train)
        cfg = config(members, train, False)
        dtype = _common.param_dtype(members)
        fisher0 = tuple(jax.ShapeDtypeStruct((members.num, k, k), dtype)
                        for k in _block_sizes(cfg))
        args = (task.loss, members, kronecker_factors(cfg[0], _dims(cfg), projection, key,
                                                      members.num, memo=factors))
        ggn = cfg[-1] != "empirical"
        floats = max(_common.num_params(members), _ggn_floats(cfg)) if ggn else None
        fisher, phi, n = engine.scan(_cache_step, cfg, args, fisher0, train,
                                     size(members, train, floats), sums=True)
        fisher = _mean(fisher, n)
        lam = None
        if damping is None and ggn and proj_dim_in is None and proj_dim_out is None:
            from jattri.methods.influence import _stationary_damping
            lam = _stationary_damping(task.loss, members, train, size(members, train))
        if cfg[-1] == "auto":
            fisher, lam, kept = _auto_blocks(fisher, phi, lam)
            if _common.is_concrete(kept) and not bool(np.all(np.asarray(kept))):
                warnings.warn(
                    "LoGra (curvature='auto'): a layer's Gauss-Newton block is not positive "
                    "definite at the default damping (smooth activations above it), so the "
                    "empirical Fisher is used for members "
                    f"{np.flatnonzero(~np.asarray(kept)).tolist()}; pass curvature='ggn' "
                    "with more damping, or curvature='empirical', to choose", stacklevel=2)
        elif lam is not None:
            lam = tuple(lam for _ in fisher)
        return LograState(members, _common.stored_train(train), phi, fisher, lam,
                          _common.provenance("logra", made, members, train, phi.shape[0]))

    def target_phi(state, data):
        cfg = config(state.members, data, True)
        args = (task.target, state.members, kronecker_factors(
            cfg[0], _dims(cfg), projection, key, state.members.num, memo=factors))
        return engine.per_example(_phi, cfg, args, data, size(state.members, data))

    def attribute(state: LograState, test, *, train=None, top_k=None, lowest=False,
                  damping=damping):
        """``(n_train, n_test)`` scores (or a TopK); ``damping`` overrides the factory's.
        ``train`` is not needed (φ is stored) and ignored."""
        _common.check_state(state, LograState, "logra", made, train=train)
        _check_damping(damping)
        _common.check_data(task, state.members, test, "test", target=True,
                           like=state.train)
        psi = target_phi(state, test)  # (n_test, M, K)
        relative, absolute, text = _damping_of(damping, state)
        solved = _check_solved(_solve(state.fisher, relative, psi, absolute), text)
        n_test = psi.shape[0]
        return engine.score(_tile, None, solved, state.phi,
                            size(state.members, state.phi, _common.row_floats(state.phi) + n_test),
                            n_test, psi.dtype, top_k=top_k, lowest=lowest)

    def self_attribute(state: LograState, *, train=None, damping=damping):
        """score(i, i) = Σ_ℓ φ_ℓ,iᵀ (F_ℓ + λ_ℓ I)⁻¹ ψ_ℓ,i (ψ = φ when the target is the
        loss; else recomputed from ``train``, required if the state was streamed)."""
        _common.check_state(state, LograState, "logra", made, train=train)
        _check_damping(damping)
        right = state.phi
        if not task.target_is_loss:
            right = target_phi(state, _common.train_for(state.train, train))
        relative, absolute, text = _damping_of(damping, state)
        inverses = tuple(_check_solved(inv, text)
                         for inv in _inverses(state.fisher, relative, absolute))
        rows = (state.phi, right)
        return engine.per_example(_self_tile, _blocks(state.fisher), inverses, rows,
                                  size(state.members, rows, 2 * _common.row_floats(state.phi)))

    return Attributor(cache, engine.bucketed(attribute), self_attribute)

