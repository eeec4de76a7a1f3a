"""Influence functions (Koh & Liang, 2017, "Understanding Black-box Predictions via
Influence Functions"): score(i, t) = g_iᵀ (H + λI)⁻¹ g_t, where H is the Hessian of the
MEAN training loss over the whole training set (never per batch), g_i = ∇loss(z_i) and
g_t = ∇target(z_t). Positive = up-weighting z_i lowers the target on z_t.

The family differs only in how (H + λI)⁻¹ is applied: dense solve (``influence_explicit``),
conjugate gradients (``influence_cg``), LiSSA (``influence_lissa``), top eigenpairs by
Arnoldi (``influence_arnoldi``), or a curvature approximation: EK-FAC
(``influence_ekfac``), DataInf (``influence_datainf``). Every train-side product
(H + λI)⁻¹ g_i is computed once in ``cache``; ``attribute`` only takes test gradients
and inner products.

RelatIF (Barshan et al., 2020, "RelatIF: Identifying Explanatory Training Examples via
Relative Influence") is an option of every method: ``relatif="l"`` divides score(i, ·)
by √(g_iᵀ(H + λI)⁻¹g_i), ``relatif="theta"`` by ‖(H + λI)⁻¹g_i‖ (per member, before the
member average). A zero normaliser leaves the (then zero) score unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from jattri.func import fisher
from jattri.func.grads import map_examples
from jattri.func.hessian import (arnoldi_eigenpairs, arnoldi_inverse_weights, arnoldi_sizes,
                                 cg_solve, check_finite_solve, damped_inverse, hvp, lissa_flat)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any

_RELATIF = (None, "l", "theta")


class InfluenceState(NamedTuple):
    """State of the influence family (M members, n train examples).

    train: the training data. train_grads: ``(M, n, p)`` training-loss gradients in
    the method's coordinates. ihvp_train: ``(M, n, p)`` (H + λI)⁻¹ g_i in the same
    coordinates. basis: ``None`` (coordinates = parameters, p = d) or ``(M, d, p)``
    with orthonormal columns (Arnoldi's eigenvectors); a gradient g has coordinates
    g @ basis. norms: ``(M, n)`` RelatIF normalisers (ones without RelatIF).
    """

    train: PyTree
    train_grads: jax.Array
    ihvp_train: jax.Array
    basis: Optional[jax.Array]
    norms: jax.Array


class CGInfluenceState(NamedTuple):
    """train: the training data. train_grads: ``(M, n, d)``."""

    train: PyTree
    train_grads: jax.Array


def _batch_mean_loss(loss, theta, batch):
    """Mean of ``loss(theta, z_i, i)`` over a batch ``(examples, indices)``."""
    z, i = batch
    return jnp.mean(jax.vmap(loss, (None, 0, 0))(theta, z, i))


def _mean_loss_fn(loss, data, chunk_size):
    return lambda t: _common.mean_loss(loss, t, data, chunk_size=chunk_size)


@partial(jax.jit, static_argnums=(3,))
def _mean_loss_hessian(loss, theta, data, chunk_size):
    return jax.hessian(_mean_loss_fn(loss, data, chunk_size))(theta)


@partial(jax.jit, static_argnums=(4, 5, 6))
def _cg_ihvp(loss, theta, data, vectors, maxiter, tol, chunk_size, damping):
    f = _mean_loss_fn(loss, data, chunk_size)
    matvec = lambda x: hvp(f, theta, x) + damping * x
    return cg_solve(matvec, vectors, maxiter=maxiter, tol=tol)


@partial(jax.jit, static_argnums=(3, 4, 6))
def _arnoldi_hessian(loss, theta, data, rank, num_iters, key, chunk_size):
    f = _mean_loss_fn(loss, data, chunk_size)
    return arnoldi_eigenpairs(lambda x: hvp(f, theta, x), theta.shape[0], rank=rank,
                              num_iters=num_iters, key=key, dtype=theta.dtype)


def _target_grads(members, data, chunk_size, k):
    m = members[k]
    return _common.member_grads(m.target, m.theta, data, chunk_size=chunk_size)


def _check_damping(damping, name="damping"):
    if not damping >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {damping}")


def _check_relatif(relatif):
    if relatif not in _RELATIF:
        raise ValueError(f"`relatif` must be None, 'l' or 'theta', got {relatif!r}")


def _relatif_norms(grads, ihvps, relatif):
    """(n,) normalisers; ``ihvps`` live in coordinates with an orthonormal basis, so
    ‖(H + λI)⁻¹ g_i‖ is the norm of the coordinates."""
    if relatif is None:
        return jnp.ones(grads.shape[0], grads.dtype)
    if relatif == "l":
        norm = jnp.sqrt(jnp.maximum(jnp.sum(grads * ihvps, -1), 0.0))
    else:
        norm = jnp.linalg.norm(ihvps, axis=-1)
    return jnp.where(norm > 0, norm, 1.0)


def _influence(task: Task, train_side: Callable, *, chunk_size: Optional[int],
               relatif: Optional[str]) -> Attributor:
    """The shared Attributor of the family.

    ``train_side(k, member, train, grads) -> (coords, ihvp, basis)``: for member k and
    its ``(n, d)`` training gradients, the gradients in the method's coordinates, the
    train-side inverse products in those coordinates, and the basis (or ``None``).
    """
    _check_relatif(relatif)
    members = _common.flat_members(task)

    def cache(train: PyTree) -> InfluenceState:
        _common.check_train(task, train)
        coords, ihvps, bases, norms = [], [], [], []
        for k, m in enumerate(members):
            g = _common.member_grads(m.loss, m.theta, train, chunk_size=chunk_size)
            c, h, b = train_side(k, m, train, g)
            check_finite_solve(h, "the inverse-Hessian product")
            coords.append(c)
            ihvps.append(h)
            bases.append(b)
            norms.append(_relatif_norms(c, h, relatif))
        basis = None if bases[0] is None else jnp.stack(bases)
        return InfluenceState(train, jnp.stack(coords), jnp.stack(ihvps), basis,
                              jnp.stack(norms))

    def test_coords(state, k, data):
        g = _target_grads(members, data, chunk_size, k)
        return g if state.basis is None else g @ state.basis[k]

    def attribute(state: InfluenceState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        return _common.member_mean(
            lambda k, m: (state.ihvp_train[k] / state.norms[k][:, None])
            @ test_coords(state, k, test).T, members)

    def self_attribute(state: InfluenceState) -> jax.Array:
        def one(k, m):
            right = (state.train_grads[k] if task.target_is_loss else
                     test_coords(state, k, state.train))
            return jnp.sum(state.ihvp_train[k] * right, axis=-1) / state.norms[k]
        return _common.member_mean(one, members)

    return Attributor(cache, attribute, self_attribute)


# ----------------------------------------------------------------------- explicit / CG

def influence_explicit(task: Task, *, damping: float = 1e-3,
                       chunk_size: Optional[int] = None,
                       relatif: Optional[str] = None) -> Attributor:
    """Influence with the dense Hessian: score(i, t) = g_iᵀ (H + λI)⁻¹ g_t.

    For small models (d ≲ 10⁴ parameters): builds the ``(d, d)`` Hessian of the mean
    training loss for every member, inverts it by eigendecomposition (a singular
    ``H + λI`` raises ``ValueError``) and stores ``(H + λI)⁻¹ g_i`` for every training
    example in ``cache``. Scores are averaged over the task's members.

    Args:
      task: the Task. damping: λ ≥ 0. chunk_size: examples per vectorised chunk.
      relatif: ``None``, ``"l"`` or ``"theta"`` (see the module docstring).
    """
    _check_damping(damping)

    def train_side(k, m, train, g):
        inv = damped_inverse(_mean_loss_hessian(m.loss, m.theta, train, chunk_size), damping)
        return g, g @ inv, None

    return _influence(task, train_side, chunk_size=chunk_size, relatif=relatif)


def influence_cg(task: Task, *, damping: float = 1e-3, maxiter: int = 100, tol: float = 1e-6,
                 chunk_size: Optional[int] = None,
                 relatif: Optional[str] = None) -> Attributor:
    """Influence with (H + λI)⁻¹ g by conjugate gradients on exact HVPs.

    Without RelatIF, ``cache`` stores the training gradients and ``attribute`` solves
    one CG system per TEST example (vmapped; cheaper when tests are few), each
    Hessian-vector product taken over the whole training set
    (``jax.scipy.sparse.linalg.cg``). With ``relatif``, the normalisers need
    (H + λI)⁻¹ g_i for every training example, so those are solved once in ``cache``
    instead. H + λI must be positive definite: on a non-convex loss choose λ above
    minus the smallest Hessian eigenvalue; a solve that breaks down raises
    ``ValueError`` instead of returning NaN.

    Args:
      task: the Task. damping: λ ≥ 0. maxiter: CG iterations. tol: relative residual.
      chunk_size: examples per vectorised chunk (gradients and HVPs).
      relatif: ``None``, ``"l"`` or ``"theta"``.
    """
    _check_damping(damping)
    _check_relatif(relatif)

    if relatif is not None:
        def train_side(k, m, train, g):
            return g, _cg_ihvp(m.loss, m.theta, train, g, maxiter, tol, chunk_size,
                               damping), None
        return _influence(task, train_side, chunk_size=chunk_size, relatif=relatif)

    members = _common.flat_members(task)

    def cache(train: PyTree) -> CGInfluenceState:
        _common.check_train(task, train)
        grads = [_common.member_grads(m.loss, m.theta, train, chunk_size=chunk_size)
                 for m in members]
        return CGInfluenceState(train, jnp.stack(grads))

    def _solve(state, k, vectors):
        m = members[k]
        return check_finite_solve(_cg_ihvp(m.loss, m.theta, state.train, vectors, maxiter,
                                           tol, chunk_size, damping), "CG")

    def attribute(state: CGInfluenceState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        return _common.member_mean(
            lambda k, m: state.train_grads[k] @ _solve(
                state, k, _target_grads(members, test, chunk_size, k)).T,
            members)

    def self_attribute(state: CGInfluenceState) -> jax.Array:
        def one(k, m):
            right = (state.train_grads[k] if task.target_is_loss else
                     _target_grads(members, state.train, chunk_size, k))
            return jnp.sum(state.train_grads[k] * _solve(state, k, right), axis=-1)
        return _common.member_mean(one, members)

    return Attributor(cache, attribute, self_attribute)


# ------------------------------------------------------------------------------ LiSSA

def influence_lissa(task: Task, *, damping: float = 1e-3, depth: int = 1000,
                    repeats: int = 1, batch_size: Optional[int] = None,
                    scale: Optional[float] = None, key: Optional[jax.Array] = None,
                    chunk_size: Optional[int] = None,
                    relatif: Optional[str] = None) -> Attributor:
    """Influence with (H + λI)⁻¹ g_i by LiSSA (``jattri.func.ihvp_lissa``).

    ``cache`` runs the stochastic Neumann recursion once for all training gradients
    together (the same minibatches for every vector, so one linear map approximates
    (H + λI)⁻¹), with minibatches drawn from the whole training set; H_S is the Hessian
    of the mean loss over S.

    Args:
      task: the Task. damping: λ ≥ 0 (Tikhonov, as in every IF method).
      depth: recursion steps; the error decays like (1 − (μ_min + λ)/scale)^depth.
      repeats: independent recursions averaged. batch_size: |S| (``None``: the whole
        training set, a deterministic Neumann series). scale: > λ_max(H_S) + λ
        (default 1.5 (λ̂_max(H) + λ) by power iteration; a divergent run raises
        ``ValueError``). key: minibatch key (default ``PRNGKey(0)``; member k uses
        ``fold_in(key, k)``). chunk_size: examples per vectorised gradient chunk.
      relatif: ``None``, ``"l"`` or ``"theta"``.
    """
    _check_damping(damping)
    key = jax.random.PRNGKey(0) if key is None else key

    def train_side(k, m, train, g):
        data = (train, _common.indices_for(train))
        h = lissa_flat(Partial(_batch_mean_loss, m.loss), m.theta, g, data,
                       key=jax.random.fold_in(key, k), damping=damping, scale=scale,
                       depth=depth, repeats=repeats, batch_size=batch_size)
        return g, h, None

    return _influence(task, train_side, chunk_size=chunk_size, relatif=relatif)


# ---------------------------------------------------------------------------- Arnoldi

def influence_arnoldi(task: Task, *, rank: int = 100, num_iters: Optional[int] = None,
                      damping: float = 1e-3, tol: float = 1e-6,
                      key: Optional[jax.Array] = None, chunk_size: Optional[int] = None,
                      relatif: Optional[str] = None) -> Attributor:
    """Influence on the top eigenspace of H (Schioppa et al., 2022, "Scaling Up
    Influence Functions"): score(i, t) = (Vᵀg_i)ᵀ diag(1/(μ + λ)) (Vᵀg_t).

    ``cache`` runs Arnoldi (full reorthogonalisation) on HVPs of the mean training
    loss, keeps the top-``rank`` eigenpairs (μ, V) and stores the ``rank``-dim
    coordinates Vᵀg_i of the training gradients. Damped eigenvalues μ + λ ≤
    ``tol``·max(μ + λ), and non-positive ones, are dropped (weight 0), so no score is
    ever NaN. A ``rank``
    above the parameter count is clipped with a warning.

    Args:
      task: the Task. rank: eigenpairs kept. num_iters: Krylov steps (default
        ``min(d, max(2·rank, rank + 20))``). damping: λ ≥ 0. tol: relative cut-off.
      key: start-vector key (default ``PRNGKey(0)``; member k uses ``fold_in(key, k)``).
      chunk_size: examples per vectorised chunk. relatif: ``None``, ``"l"``, ``"theta"``.
    """
    _check_damping(damping)
    d = _common.flat_members(task)[0].theta.shape[0]
    rank, iters = arnoldi_sizes(rank, num_iters, d, who="influence_arnoldi", stacklevel=2)
    key = jax.random.PRNGKey(0) if key is None else key

    def train_side(k, m, train, g):
        eigvals, eigvecs = _arnoldi_hessian(m.loss, m.theta, train, rank, iters,
                                            jax.random.fold_in(key, k), chunk_size)
        coords = g @ eigvecs
        return coords, coords * arnoldi_inverse_weights(eigvals, damping, tol), eigvecs

    return _influence(task, train_side, chunk_size=chunk_size, relatif=relatif)


# ---------------------------------------------------------------------- EK-FAC, DataInf

def _indexed_call(fn, params, zi):
    return fn(params, zi[0], zi[1])


def _pytree_loss(member) -> Partial:
    """A member's loss on pytree params with the example carrying its index."""
    return Partial(_indexed_call, member.loss_fn)


def influence_ekfac(task: Task, *, damping: float = 1e-3, correct_eigenvalues: bool = True,
                    curvature: str = "empirical", chunk_size: Optional[int] = None,
                    relatif: Optional[str] = None) -> Attributor:
    """Influence with the EK-FAC approximation of the curvature (George et al., 2018;
    Grosse et al., 2023, "Studying Large Language Model Generalization with Influence
    Functions"): score(i, t) = g_iᵀ (F_EKFAC + λI)⁻¹ g_t.

    Per Flax ``nn.Dense`` or ``nn.Conv`` layer (found without hooks,
    ``jattri.func.layers``; Conv layers as KFC, Grosse & Martens 2016), F is
    approximated in the Kronecker eigenbasis Q_A ⊗ Q_S of A = E[a aᵀ] (inputs with a
    trailing 1 for the bias) and S = E[s sᵀ] (output gradients of the training loss),
    with eigenvalues corrected to the second moment of the per-example layer gradients
    in that basis (``jattri.func.fisher.ekfac_factors``); ``correct_eigenvalues=False``
    gives K-FAC. ``curvature="ggn"`` builds the factors from the loss's Hessian at each
    layer output instead of the observed gradients' outer products (the Gauss-Newton
    blocks for ReLU networks; closer to the Hessian than the empirical Fisher, see
    ``ekfac_factors``; it costs d_out backward passes per layer and example instead of
    one). Parameters outside Dense/Conv layers get the diagonal empirical Fisher.
    Curvature that does not flow through layer outputs (an L2 term inside the loss)
    is not seen: fold it into ``damping``. ``cache`` computes the factors once over the
    whole training set and applies the inverse to every training gradient.

    Args:
      task: the Task (its loss must call ``nn.Dense`` / ``nn.Conv`` through
        ``Module.apply`` with ``{"params": params}``). damping: λ ≥ 0 (directions with
        zero curvature and λ = 0 get weight 0). correct_eigenvalues: EK-FAC (True) or K-FAC.
      curvature: ``"empirical"`` (empirical Fisher) or ``"ggn"`` (Gauss-Newton).
      chunk_size: examples per vectorised chunk. relatif: ``None``, ``"l"``, ``"theta"``.
    """
    _check_damping(damping)
    if curvature not in fisher.CURVATURES:
        raise ValueError(f"`curvature` must be one of {fisher.CURVATURES}, got {curvature!r}")

    def train_side(k, m, train, g):
        member = task.members[k]
        data = (train, _common.indices_for(train))
        factors = _ekfac_factors_jit(_pytree_loss(member), member.params, data,
                                     correct_eigenvalues, curvature, chunk_size)
        return g, _ekfac_ihvps(factors, g, damping, m.unravel, chunk_size), None

    return _influence(task, train_side, chunk_size=chunk_size, relatif=relatif)


@partial(jax.jit, static_argnums=(3, 4))
def _ekfac_ihvps(factors, g, damping, unravel, chunk_size):
    """``(n, d)``: (F_EKFAC + λI)⁻¹ g_i for every row of ``g``."""
    one = lambda x: ravel_pytree(fisher.ekfac_ihvp(factors, unravel(x), damping))[0]
    return map_examples(one, g, chunk_size)


_ekfac_factors_jit = jax.jit(
    lambda loss, params, data, correct, curvature, chunk: fisher.ekfac_factors(
        loss, params, data, correct_eigenvalues=correct, curvature=curvature,
        chunk_size=chunk),
    static_argnums=(3, 4, 5))


def influence_datainf(task: Task, *, damping: float = 0.1,
                      chunk_size: Optional[int] = None,
                      relatif: Optional[str] = None) -> Attributor:
    """DataInf (Kwon et al., 2023): per layer l, the inverse of the damped Fisher is
    replaced by the average of rank-one inverses, in closed form:

        score(i, t) = Σ_l g_ilᵀ (1/λ_l)[g_tl − (1/n) Σ_j g_jl (g_jlᵀ g_tl)/(λ_l + ‖g_jl‖²)]

    Layers are parameter groups: leaves with the same parent path (a Dense layer's
    kernel and bias). λ_l = ``damping`` · (1/(n d_l)) Σ_i ‖g_il‖², the paper's
    default, > 0 (the reference's default of 0 divides by zero). ``cache`` applies
    the operator to every training gradient (O(n² d)).

    Args:
      task: the Task. damping: relative regularisation > 0 (default 0.1).
      chunk_size: rows per chunk (gradients, and the ``(chunk, n)`` temporaries).
      relatif: ``None``, ``"l"`` or ``"theta"``.
    """
    if not damping > 0:
        raise ValueError(f"`damping` must be > 0 for DataInf (λ_l = damping · mean "
                         f"squared gradient), got {damping}")
    groups = fisher.parameter_groups(task.members[0].params)

    def train_side(k, m, train, g):
        h = jnp.zeros_like(g)
        for idx in groups.values():
            gl = g[:, idx]
            lam = fisher.datainf_damping(gl, damping)
            h = h.at[:, idx].set(_datainf_jit(gl, lam, chunk_size))
        return g, h, None

    return _influence(task, train_side, chunk_size=chunk_size, relatif=relatif)


_datainf_jit = jax.jit(lambda g, lam, chunk: fisher.datainf_ihvp(g, g, lam, chunk_size=chunk),
                       static_argnums=(2,))
