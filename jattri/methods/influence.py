"""Influence functions (Koh & Liang, 2017, "Understanding Black-box Predictions via
Influence Functions"): score(i, t) = g_iᵀ (H + λI)⁻¹ g_t, where H is the Hessian of the
MEAN training loss over the whole training set (never per batch), g_i = ∇loss(z_i) and
g_t = ∇target(z_t). Positive = up-weighting z_i lowers the target on z_t. Over members
m (checkpoints, ensemble members) scores are averaged: mean_m g_i,mᵀ (H_m + λI)⁻¹ g_t,m.

The family differs only in how (H + λI)⁻¹ is applied: a dense Cholesky solve
(``influence_explicit``), conjugate gradients (``influence_cg``), LiSSA
(``influence_lissa``), top eigenpairs by Arnoldi (``influence_arnoldi``), or a curvature
approximation: EK-FAC / K-FAC (``influence_ekfac``), DataInf (``influence_datainf``).

On a non-convex model H + λI is indefinite at small λ. The first four take
``curvature="ggn"``: H is replaced by the Gauss-Newton matrix G = (1/n) Σ_i J_iᵀ ∇²ℓ_i
J_i (Schraudolph, 2002, "Fast curvature matrix-vector products for second-order
gradient descent"; Martens, 2020, "New insights and perspectives on the natural
gradient method"), positive semi-definite for a loss ℓ convex in the model's outputs,
whose Jacobian is J_i; G-vector products are a ``jvp`` of the outputs, an output-space
HVP and a ``vjp``. The Task says where the split is (``jattri.Task(loss_fn,
output_fn=..., output_loss_fn=...)``). The default stays ``"hessian"``: the influence
of Koh & Liang, which G equals on models linear in θ (logistic, least squares).

Stages, as in Kronfluence: ``cache(members, train)`` fits what the method is made of
(nothing but the members for CG and LiSSA; the dense curvature, built in blocks of
columns; the top eigenpairs and the coordinates Vᵀg_i; the EK-FAC factors; DataInf's
per-layer statistics), each curvature a sum over chunks of the whole training set.
``attribute(state, test)`` preconditions the TEST side, u_t = (H + λI)⁻¹ g_t for the
n_test test gradients (CG and LiSSA: the smaller side, the training gradients when
n_train < n_test, as Koh & Liang's s_test chooses the side), then scores the training
set tile by tile
(``jattri.engine.score``, dense or ``top_k``), recomputing g_i chunk by chunk from the
training data (``state.train``, or ``train=`` for a state cached from a stream). No
state holds ``(n, d)`` gradients or inverse-Hessian products, and ``damping`` can be
changed at ``attribute`` / ``self_attribute`` time without refitting.

Default damping (explicit, CG, LiSSA, Arnoldi): the L2 coefficient the model implies,
λ̂ = −⟨∇L̄(θ), θ⟩/‖θ‖² (:func:`stationary_damping`): Koh & Liang's H is the Hessian
of the objective the model minimised, H + λI for a model trained with L2 λ, and
stationarity gives λ back from θ and the data. EK-FAC: 0.1 × its mean eigenvalue;
DataInf: the paper's relative 0.1 (``benchmarks/RESULTS.md``, "Damping grids").

RelatIF (Barshan et al., 2020, "RelatIF: Identifying Explanatory Training Examples via
Relative Influence") is an option of every method: ``relatif="l"`` divides score(i, ·)
by √(g_iᵀ(H + λI)⁻¹g_i), ``relatif="theta"`` by ‖(H + λI)⁻¹g_i‖ (per member, before the
member average). A zero normaliser leaves the (then zero) score unchanged. The ``(n, M)``
normalisers are computed in ``cache`` by one more pass over the training chunks (and
again at ``attribute`` time only when ``damping`` is overridden).

Memory (d parameters, M members, n train, n_test test examples, b = ``chunk_size``):
every ``attribute`` holds the M·n_test·d preconditioned test gradients, b gradients of
d floats and a b × n_test score tile (``top_k``: (K + b)·n_test, never n·n_test); each
method's state is given in its docstring (+ n·M with RelatIF).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattri import _checks, engine
from jattri._jit import jit
from jattri._products import tmatmul
from jattri.func import fisher
from jattri.func.grads import unravel_fn
from jattri.func.layers import (find_layers, layer_io, layer_io_and_grad, leaf_key, leaf_keys,
                                same_layers)
from jattri.func.projection import derive_key, seeded_normal
from jattri.func.hessian import (add_dense, arnoldi_eigenpairs, arnoldi_inverse_weights,
                                 arnoldi_sizes, arnoldi_start, arnoldi_steps, arnoldi_top,
                                 block_cg_solve, cg_group_rows, cg_solve, check_cg,
                                 dense_block, group_count, group_size, hvp, in_groups,
                                 top_eigenvalue)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.methods.tracin import _chunk_factors, _concrete, _plan_key, rebuilt_layers
from jattri.task import Members, as_task, first_member, member

PyTree = Any

_RELATIF = (None, "l", "theta")


class InfluenceState(NamedTuple):
    """State of the influence family (M members, n train examples).

    members: the Members scored. train: the in-memory training set (a reference) or
    ``None`` if it was streamed. curvature: what the method is made of, every leaf with
    a leading member axis M (see each method). coords: ``(n, M, r)`` Arnoldi's
    coordinates Vᵀg_i, else ``None``. norms: ``(n, M)`` RelatIF normalisers at the
    factory's damping, else ``None``. made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``). damping:
    the λ the state was cached at, a scalar array (the factory's ``damping``, or the
    value of its default rule, :func:`stationary_damping`); ``attribute`` uses it when
    given no ``damping``.
    """

    members: Members
    train: PyTree
    curvature: PyTree
    coords: Optional[jax.Array]
    norms: Optional[jax.Array]
    made: _common.Provenance
    damping: Optional[jax.Array] = None


# ------------------------------------------------------------------- member helpers

def _grads(config, args, chunk) -> jax.Array:
    """``(M, size, d)`` gradients of ``fn`` for one chunk (zero on padding)."""
    fn, members = args
    return _common.member_map(lambda p, a: _common.chunk_grads(fn, p, a, chunk), members)


def _test_side(config, args, chunk) -> jax.Array:
    """``(M, size, k)``: (H + λI)⁻¹ g_t of one chunk of test examples, for a method
    whose ``apply`` does not read the training set."""
    apply, apply_config = config
    target, fns, members, curvature, damping = args
    g = _grads(None, (target, members), chunk)
    return apply(apply_config, (fns, members, curvature, damping, None), g)


_grads_jit = jit(_grads, static_argnums=0)


# ------------------------------------- Hessian or Gauss-Newton of the mean training loss

CURVATURES = ("hessian", "ggn")


def _check_curvature(curvature, task) -> None:
    """``curvature`` is one of :data:`CURVATURES`; ``"ggn"`` needs the Task's split."""
    _checks.choice(curvature, "curvature", CURVATURES)
    if curvature == "ggn" and task.output is None:
        raise ValueError(
            '`curvature="ggn"` needs to know where the loss splits into the model\'s '
            "outputs and a loss convex in them: pass jattri.Task(loss_fn, "
            "output_fn=..., output_loss_fn=...) with loss_fn(p, z) == "
            "output_loss_fn(output_fn(p, z), z)")


def _curvature_fns(task, curvature):
    """What the curvature-vector products differentiate: the loss (``"hessian"``) or
    the split ``(output, output_loss)`` (``"ggn"``), as a traced pytree."""
    return (task.output, task.output_loss) if curvature == "ggn" else task.loss


def _curvature_hyper(task, curvature) -> tuple:
    """The hyperparameters a state records for ``curvature`` (the split's functions
    by name when ``"ggn"``)."""
    if curvature != "ggn":
        return (("curvature", curvature),)
    output, output_loss = task.user_split or (task.output, task.output_loss)
    return (("curvature", curvature), ("output_fn", output), ("output_loss_fn", output_loss))


@partial(jit, once=True)
def _split_losses(loss, output, output_loss, members, data):
    """``loss(p, z)`` and ``output_loss(output(p, z), z)`` on the first example and
    member."""
    p, a = first_member(members)
    z, i = jax.tree_util.tree_map(lambda x: x[0], data), jnp.zeros((), jnp.int32)
    return loss(p, z, i, a), output_loss(output(p, z, i, a), z, i, a)


def _check_split(task, members, data) -> None:
    """``loss_fn(p, z) == output_loss_fn(output_fn(p, z), z)`` on the first example of
    the first member (a mismatched split would give the GGN of another loss)."""
    if not _common.is_concrete((members, data)) or engine.is_stream(data):
        return
    want, got = (float(x) for x in _split_losses(task.loss, task.output, task.output_loss,
                                                  members, data))
    if not np.isclose(got, want, rtol=1e-4, atol=1e-6 * max(1.0, abs(want))):
        raise ValueError(
            f"the Task's split does not reproduce its loss on the first training example: "
            f"output_loss_fn(output_fn(p, z), z) = {got:.6g}, loss_fn(p, z) = {want:.6g}")


def _chunk_loss(loss, params, aux, chunk, indexed):
    """Σ of ``loss`` over the chunk's valid examples; ``indexed``: the chunk's data is
    ``(examples, dataset indices)`` (a gathered minibatch)."""
    data, index = chunk.data if indexed else (chunk.data, chunk.index)
    losses = jax.vmap(loss, (None, 0, 0, None))(params, data, index, aux)
    return jnp.sum(jnp.where(chunk.valid, losses, 0.0))


def _chunk_cvp(fns, params, aux, chunk, vs, indexed=False) -> jax.Array:
    """``(k, d)``: Σ over the chunk's valid examples of H_z v (``fns`` the loss) or of
    G_z v = J_zᵀ ∇²ℓ_z J_z v (``fns`` the split ``(output, output_loss)``, J_z the
    Jacobian of the outputs), for every row v of ``vs`` ``(k, d)``.

    GGN-vector products as Schraudolph (2002): a ``jvp`` of the outputs, an
    output-space HVP of ℓ, a ``vjp`` back (``jattri.func.ggn_vp`` for one chunk), the
    forward pass and its pullback shared by the k vectors."""
    unravel = unravel_fn(params)
    flat = lambda tree: ravel_pytree(tree)[0]
    if not isinstance(fns, tuple):
        f = lambda p: _chunk_loss(fns, p, aux, chunk, indexed)
        return jax.vmap(lambda v: flat(hvp(f, params, unravel(v))))(vs)
    output, output_loss = fns
    data, index = chunk.data if indexed else (chunk.data, chunk.index)
    outputs_of = lambda p: jax.vmap(output, (None, 0, 0, None))(p, data, index, aux)

    def loss_of(outputs):
        losses = jax.vmap(output_loss, (0, 0, 0, None))(outputs, data, index, aux)
        return jnp.sum(jnp.where(chunk.valid, losses, 0.0))

    outputs, pullback = jax.vjp(outputs_of, params)

    def one(v):
        jv = jax.jvp(outputs_of, (params,), (unravel(v),))[1]
        return flat(pullback(hvp(loss_of, outputs, jv))[0])

    return jax.vmap(one)(vs)


def _cvp_step(indexed, args, acc, chunk):
    fns, params, aux, vs = args
    return acc + _chunk_cvp(fns, params, aux, chunk, vs, indexed).astype(acc.dtype), None


def _mean_cvp(fns, params, aux, data, vs, size, indexed=False) -> jax.Array:
    """``(k, d)``: C v for every row v of ``vs``, C the Hessian (``fns`` the loss) or
    the Gauss-Newton matrix (``fns`` the split) of the mean loss over ``data`` (in
    memory), summed chunk by chunk."""
    acc, _, n = engine.scan(_cvp_step, indexed, (fns, params, aux, vs), _common.spec_of(vs),
                            data, size, sums=True)
    return acc / n


def _grad_sum_chunk(config, args, acc, chunk):
    """``acc`` (a pytree like the params) += the chunk's summed gradient, not raveled
    (the caller ravels once, after the sum)."""
    loss, params, aux = args
    return _add(acc, _common.grad_sum(loss, params, aux, chunk, flat=False)), None


def _linearized_cvp(fns, params, aux, data, size) -> Optional[Callable]:
    """``v (d,) -> H v``, H the Hessian of the mean loss over ``data``, as ONE linear
    function (``jax.linearize`` of the mean gradient): the forward and backward passes
    at θ run once and their residuals are kept, so each product reruns only the tangent
    passes (Arnoldi's fit on dattri's 109,386-parameter MLP, 5,000 examples: 4.9-5.8 s
    → 3.8-3.9 s). For a method that multiplies by the same H many times in a row.
    ``None`` (the caller recomputes each product chunk by chunk, as :func:`_mean_cvp`) for the Gauss-Newton matrix, or when the residuals exceed the
    chunk budget (``jattri.engine.DEFAULT_CHUNK_BYTES``; a large model's activations
    over the whole training set)."""
    if isinstance(fns, tuple):
        return None
    theta, unravel = ravel_pytree(params)

    def mean_grad(t):
        acc, _, n = engine.scan(_grad_sum_chunk, None, (fns, unravel(t), aux),
                                jax.tree_util.tree_map(
                                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                                data, size, sums=True)
        return ravel_pytree(acc)[0] / n

    kept = jax.eval_shape(lambda t: jax.vjp(mean_grad, t)[1], theta)
    held = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(kept))
    if held > engine.DEFAULT_CHUNK_BYTES:
        return None
    return jax.linearize(mean_grad, theta)[1]


def _dense_step(block, args, acc, chunk):
    """``acc (M, d, d)`` += the chunk's summed Hessian / GGN of every member, ``block``
    columns at a time, in place (``jattri.func.hessian.add_dense``)."""
    fns, members = args

    def one(m, acc):
        p, a = member(members, m)
        return add_dense(acc, lambda vs: _chunk_cvp(fns, p, a, chunk, vs), block, at=m)

    return jax.lax.fori_loop(0, members.num, one, acc), None


def _add(acc, new):
    """``acc + new`` leaf by leaf, in the accumulator's dtypes."""
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), acc, new)


# ------------------------------------------------------------ the shared Attributor

class _Spec(NamedTuple):
    """One method of the family.

    fit(task, members, train, size) -> (curvature, coords): the cache-side fit;
      ``size(floats=None)`` is the chunk size for ``floats`` per example (default d).
    apply(config, args, v): module-level, ``(M, b, d)`` vectors -> ``(M, b, k)``
      (C + λI)⁻¹ v in the method's coordinates; args = (fns, members, curvature,
      damping, train): fns what its curvature-vector products differentiate (the loss,
      or with ``ggn`` the Task's split), curvature as ``prepare`` made it, train only
      when ``reads_train``.
    config(members, size) -> the static config of ``apply``.
    project(curvature, g): module-level, ``(M, b, d)`` -> ``(M, b, k)`` coordinates
      of gradients (None: the parameters themselves).
    diagonal(curvature, damping) -> ``(M, k)``: with stored ``coords``, (H + λI)⁻¹ in
      those coordinates (Arnoldi); None otherwise.
    check(curvature, damping, v, u): raises ValueError on a failed solve (concrete);
      ``v`` is None where only ``u`` (solutions or scores made from them) is at hand.
    prepare(curvature, damping) -> what ``apply`` reads at that damping, once per
      call of a stage (the explicit method's Cholesky factors); it raises ValueError
      on a concrete failure. None: the state's curvature as it is.
    """

    name: str
    damping: float
    fit: Callable
    apply: Callable
    config: Callable
    project: Optional[Callable] = None
    diagonal: Optional[Callable] = None
    check: Optional[Callable] = None
    prepare: Optional[Callable] = None
    in_memory: bool = False    # its curvature-vector products read the whole training set
    reads_train: bool = False  # apply reads the training set
    positive: bool = False     # damping must be > 0 (DataInf)
    ggn: bool = False          # apply's products are the Gauss-Newton's (Task split)
    hyper: tuple = ()          # ((name, value), ...) the state depends on
    damped_fit: bool = False   # fit takes the cached damping: fit(..., size, damping)
    default_damping: Optional[Callable] = None  # curvature -> λ when damping is None
                                                # (else the stationary L2)
    # basis(task, members, train, test, memo) -> a static plan or None: score in the
    # curvature's eigenbasis, both sides' coordinates made from the layers
    # (``_basis_test`` / ``_basis_tile``; EK-FAC), instead of forming gradients and
    # rotating the test side back to the parameters
    basis: Optional[Callable] = None
    # basis_check(task, members, train, memo): the part of ``basis``'s decision that
    # reads only the training side, made in ``cache`` before the fit is dispatched
    # and recorded in ``memo`` (a concrete check read back after the fit would wait
    # for the whole fit to run: the CPU runs programs in the order they came)
    basis_check: Optional[Callable] = None
    # test_side(task, members, test) -> (step, config) or None: a step
    # ``step(config, (target, members, curvature, damping), chunk) -> (M, size, k)``
    # that makes the test side's preconditioned coordinates without forming gradients
    # (Arnoldi's factored coordinates); None: ``_test_side``
    test_side: Optional[Callable] = None
    # solve_progress(config, v) -> (total, unit) of a reporting solve's stage (only
    # with ``reads_train``); None: the examples whose systems are solved, M·b
    solve_progress: Optional[Callable] = None
    # solve_group(config, b) -> rows: the solve takes its b systems this many at a
    # time, each group's result independent of the others (CG's ``in_groups``), and
    # ``apply``'s result has ``v``'s shape; inside ``progress`` several groups are
    # then solved one program call each, reported from the host (no callback, so the
    # program is cached); None (and no ``solve_driven``), or a single group: the quiet
    # program, reported once it is done
    solve_group: Optional[Callable] = None
    # solve_driven(config, args, v, layout, stage) -> apply's result: inside
    # ``progress``, the solve driven from the host in calls of programs without
    # callbacks (cached), each reported to ``stage`` (LiSSA's recursion in segments)
    solve_driven: Optional[Callable] = None


def _check_damping(damping, positive=False, none=False):
    return _checks.real(damping, "damping", low=0, open_low=positive, none=none)


# ------------------------------------------ the default damping: the L2 the model implies

_FALLBACK_DAMPING = 1e-3


def _grad_sum_step(config, args, acc, chunk):
    loss, members = args
    return acc + _common.member_map(
        lambda p, a: _common.grad_sum(loss, p, a, chunk), members).astype(acc.dtype), None


@partial(jit, once=True)
def _stationary(gsum, n, members):
    def one(p, a, g):
        theta = ravel_pytree(p)[0].astype(g.dtype)
        return -jnp.vdot(g / n, theta) / jnp.vdot(theta, theta)

    lam = jnp.mean(_common.member_map(one, members, gsum))
    return jnp.where(lam > 0, lam, jnp.asarray(_FALLBACK_DAMPING, lam.dtype))


def stationary_damping(task: Any, members: Members, train, *,
                       chunk_size: Optional[int] = None) -> jax.Array:
    """The L2 coefficient under which the members are stationary points of their
    training objective: λ̂ = −⟨ḡ, θ⟩ / ‖θ‖², ḡ = ∇ of the mean training loss at θ
    (one gradient pass over ``train``), averaged over members; 1e-3 where λ̂ ≤ 0.

    Why it is the influence family's default damping: Koh & Liang's influence is
    g_iᵀ H_obj⁻¹ g_t with H_obj the Hessian of the objective the model minimised. A
    model trained on mean loss + (λ/2)‖θ‖² has H_obj = H + λI, so the damping that
    makes influence exact is the training L2, and at a minimiser ∇L̄(θ) + λθ = 0
    gives it back from θ and the data alone: λ̂ = −⟨ḡ, θ⟩/‖θ‖² (on the embedded
    ``digits_lr``, trained with λ = 1e-2: λ̂ = 0.99998e-2; on ``digits_mlp``, 1e-4:
    0.9-1.0e-4). A model trained without L2, or far from a stationary point, gives
    λ̂ ≤ 0 or a noisy value: the rule then falls back to 1e-3 (and the user should
    pass ``damping``). No ground-truth-free way to pick damping is established in the
    literature; Kronfluence's 0.1 × the curvature's mean eigenvalue is a heuristic
    (``benchmarks/RESULTS.md``, "Damping grids").

    Returns a scalar array.
    """
    task = as_task(task)
    members = _common.setup(task, members, train)
    size = _common.chunk_size_for(engine.check_chunk_size(chunk_size), members, train, None)
    return _stationary_damping(task.loss, members, train, size)


def _stationary_damping(loss, members, train, size) -> jax.Array:
    d = _common.num_params(members)
    zero = jax.ShapeDtypeStruct((members.num, d), _common.param_dtype(members))
    gsum, _, n = engine.scan(_grad_sum_step, None, (loss, members), zero, train, size,
                             sums=True)
    return _stationary(gsum, n, members)


def _check_relatif(relatif):
    _checks.choice(relatif, "relatif", _RELATIF)


def _norm(mode, left, u):
    """RelatIF normalisers over the last axis (exactly 0 -> 1; NaN stays NaN, so a
    failed solve is seen): √max(leftᵀu, 0) or ‖u‖."""
    if mode == "l":
        norm = jnp.sqrt(jnp.maximum(jnp.sum(left * u, -1), 0.0))
    else:
        norm = jnp.linalg.norm(u, axis=-1)
    return jnp.where(norm == 0, 1.0, norm)


def _combine(config, left, u, norms, index):
    """``(size,)`` self-scores mean_m left·u / norm (``mode == "self"``), or ``(size, M)``
    normalisers."""
    mode = config
    if mode != "self":
        return jnp.swapaxes(_norm(mode, left, u), 0, 1)
    s = jnp.sum(left * u, axis=-1)  # (M, size)
    if norms is not None:
        s = s / jnp.swapaxes(norms[index], 0, 1)
    return jnp.mean(s, axis=0)


_combine_jit = jit(_combine, static_argnums=0)


def _self_fn(config, args, chunk, eager=False):
    """Per chunk of training examples i: mode ``"self"``: mean_m g_iᵀ (H + λI)⁻¹ g'_i
    (g' the target gradient) over the normaliser; ``"l"`` / ``"theta"``: the RelatIF
    normalisers ``(size, M)``. ``eager``: the apply runs outside jit (it streams)."""
    mode, same_target, apply, apply_config, project = config
    loss, target, fns, members, curvature, damping, train, norms = args
    grads = _grads_jit if eager else _grads
    g = grads(None, (loss, members), chunk)
    right = g if mode != "self" or same_target else grads(None, (target, members), chunk)
    u = apply(apply_config, (fns, members, curvature, damping, train), right)
    left = g if project is None else project(curvature, g)
    return (_combine_jit if eager else _combine)(mode, left, u, norms, chunk.index)


def _grad_tile(config, args, chunk):
    """``(size, n_test)``: mean_m g_i,mᵀ u_t,m (/ norm_i,m), g recomputed for the chunk."""
    loss, members, u, norms = args  # u (M, n_test, d)
    s = _common.member_map(lambda p, a, uj: _common.chunk_grads(loss, p, a, chunk) @ uj.T,
                           members, u)  # (M, size, n_test)
    if norms is not None:
        s = s / jnp.swapaxes(norms[chunk.index], 0, 1)[:, :, None]
    return jnp.mean(s, axis=0)


def _solved_tile(config, args, chunk):
    """``(size, n_test)``: mean_m ((H + λI)⁻¹ g_i,m)ᵀ g_t,m (/ norm_i,m): the TRAINING
    side solved, chunk by chunk, against the held test gradients ``v (M, n_test, d)``
    (used when the training set is the smaller side)."""
    apply, apply_config = config
    loss, fns, members, curvature, damping, train, v, norms = args
    u = apply(apply_config, (fns, members, curvature, damping, train),
              _grads(None, (loss, members), chunk))  # (M, size, d)
    s = jnp.einsum("msd,mtd->mst", u, v)
    if norms is not None:
        s = s / jnp.swapaxes(norms[chunk.index], 0, 1)[:, :, None]
    return jnp.mean(s, axis=0)


def _basis_test(config, args, chunk):
    """``(M, size, k)``: the test chunk's gradient coordinates in the eigenbasis, times
    (Λ + λ)⁻¹ (``config = (coordinates, weights)``, module-level functions of the plan)."""
    coordinates, weights = config
    fn, members, curvature, damping = args
    return _common.member_map(
        lambda p, a, f: coordinates(fn, p, a, chunk, f) * weights(f, damping)[None],
        members, curvature)


def _basis_tile(config, args, chunk):
    """``(size, n_test)``: mean_m of the training chunk's coordinates against ``u``."""
    coordinates, = config
    loss, members, curvature, u = args  # u (M, n_test, k)
    s = _common.member_map(lambda p, a, f, uj: coordinates.scores(loss, p, a, chunk, f, uj),
                           members, curvature, u)
    return jnp.mean(s, axis=0)


def _coord_tile(config, u, chunk):
    """``(size, n_test)`` from stored coordinates ``(size, M, r)`` and ``u (M, n_test, r)``."""
    coords, norms = chunk.data
    s = jnp.einsum("bmr,mtr->bmt", coords, u)
    if norms is not None:
        s = s / norms[..., None]
    return jnp.mean(s, axis=1)


def _apply_traced(apply, config, args, v, layout):
    return engine.traced_with_layout(layout, args[-1], lambda: apply(config, args, v))


_apply_jit = jit(_apply_traced, static_argnums=(0, 1, 4))


def _apply(spec, config, args, v):
    """``spec.apply`` compiled once per (method, config, layout of the training set
    over devices), or run eagerly when it streams the training set (DataInf on a
    Stream). Under :func:`jattri.progress` a solve over the training set (CG, LiSSA,
    DataInf: ``spec.reads_train``) is a stage of its own, "<method> solve", run in
    programs without callbacks (cached like any other). CG's counts the examples whose
    systems are solved, its groups solved one call each of the quiet program
    (``spec.solve_group``); LiSSA's counts its recursion steps
    (``spec.solve_progress``), run in segments (``spec.solve_driven``); DataInf's
    reports once, when its one program is done."""
    if engine.is_stream(args[-1]):
        return spec.apply(config, args, v)
    layout = engine.layout_of(args[-1])
    if not spec.reads_train:
        return _apply_jit(spec.apply, config, args, v, layout)
    name = spec.name.replace("influence_", "") + " solve"
    total, unit = ((v.shape[0] * v.shape[1], "examples") if spec.solve_progress is None
                   else spec.solve_progress(config, v))
    driven = spec.solve_driven
    if spec.solve_group is not None and spec.solve_group(config, v.shape[1]) < v.shape[1]:
        driven = partial(_apply_in_groups, spec)
    with engine.solve_stage(name, total, args, v, unit=unit) as stage:
        if stage is None:
            return _apply_jit(spec.apply, config, args, v, layout)
        if driven is not None:
            return driven(config, args, v, layout, stage)
        # one group, or a solve with no steps to count: the quiet program, reported
        # once it is done
        out = jax.block_until_ready(_apply_jit(spec.apply, config, args, v, layout))
        stage.update(total)
        return out


def _group_rows(v, start, rows):
    """Systems ``start ... start + rows`` of ``v`` ``(..., b, d)``, zero rows past the
    last (as ``in_groups`` pads its last group)."""
    b = v.shape[-2]
    at = start + jnp.arange(rows)
    return jnp.where((at < b)[:, None], jnp.take(v, jnp.minimum(at, b - 1), axis=-2),
                     0).astype(v.dtype)


def _group_index(b: int, start, rows):
    """Where a group's ``rows`` solutions go among ``b``: past the last, index ``b``
    (dropped by ``.at[...].set(..., mode="drop")``)."""
    at = start + jnp.arange(rows)
    return jnp.where(at < b, at, b)


@partial(jit, static_argnames=("apply", "config", "rows", "layout"),
         donate_argnames=("out",))
def _apply_group_jit(apply, config, args, v, out, start, rows, layout):
    # rows start ... start + rows of every member's systems, solved and written into
    # ``out`` in place
    solved = _apply_traced(apply, config, args, _group_rows(v, start, rows), layout)
    out = out.at[:, _group_index(v.shape[1], start, rows)].set(solved.astype(out.dtype),
                                                               mode="drop")
    return out, engine.token(solved)


_zeros_like_jit = jit(jnp.zeros_like)


def _apply_in_groups(spec, config, args, v, layout, stage):
    """``apply``'s solve of ``v`` ``(M, b, d)`` in several groups of systems, one call
    per group (the groups the quiet program runs in turn: the same results), each
    reported to ``stage`` as it is done; the solutions are written in place into one
    buffer."""
    b = v.shape[1]
    rows = spec.solve_group(config, b)
    state = {"out": _zeros_like_jit(v)}

    def run(k, start):
        state["out"], token = _apply_group_jit(spec.apply, config, args, v, state["out"],
                                               np.int32(start), rows=rows, layout=layout)
        return token

    engine.reported_chunks(stage, run, range(0, b, rows), rows * v.shape[0],
                           b * v.shape[0])
    return state["out"]


def _influence(task: Any, spec: _Spec, *, relatif: Optional[str],
               chunk_size: Optional[int]) -> Attributor:
    """The Attributor of the family from a method's :class:`_Spec`."""
    _check_relatif(relatif)
    chunk_size = engine.check_chunk_size(chunk_size)
    task = as_task(task)
    if spec.ggn:
        _check_curvature("ggn", task)
    fns = _curvature_fns(task, "ggn" if spec.ggn else "hessian")
    # RelatIF's normalisers are cached at the factory's damping
    made = _common.hyper(task, relatif=relatif,
                         **{**dict(spec.hyper),
                            **({} if relatif is None else {"damping": spec.damping})})

    memo = {}  # the eigenbasis plan's checks, made concretely once per shape

    def check_state(state, train=None):
        _common.check_state(state, InfluenceState, spec.name, made, train=train)

    def size(members, data, floats=None):
        return _common.chunk_size_for(chunk_size, members, data, floats)

    def need_memory(data, where):
        if spec.in_memory and engine.is_stream(data):
            raise ValueError(
                f"{spec.name} needs the training set in memory (its Hessian-vector "
                f"products read the whole set at every iteration); {where} got a Stream: "
                "pass a pytree with a leading example axis, or use influence_ekfac / "
                "influence_datainf / influence_explicit, which stream")

    def damping_of(damping, state):
        """λ: ``damping``, else the factory's, else (its default rule) the state's."""
        if damping is None:
            return spec.damping if spec.damping is not None else state.damping
        _check_damping(damping, spec.positive)
        return damping

    def ready(curvature, lam, base):
        """``curvature`` prepared at λ = ``lam``, from the state's at λ₀ = ``base``."""
        return curvature if spec.prepare is None else spec.prepare(curvature, lam, base)

    def checked(curvature, lam, v, u):
        """``u`` (solutions, or scores made from them: an array or a TopK), once
        ``spec.check`` passed it (concrete only)."""
        x = u.scores if isinstance(u, engine.TopK) else u
        if spec.check is not None and _common.is_concrete(x):
            spec.check(curvature, lam, v, x)
        return u

    def self_map(mode, state, data, damping, norms, curvature):
        """``_self_fn`` over every training chunk: one compiled scan, or (a stream read
        again inside every chunk, DataInf) a Python loop over the stream's chunks."""
        members = state.members
        d = _common.num_params(members)
        config = (mode, task.target_is_loss, spec.apply,
                  spec.config(members, size(members, data)), spec.project)
        args = (task.loss, task.target, fns, members, curvature, damping,
                data if spec.reads_train else None, norms)
        b = size(members, data, 3 * members.num * d)
        if not (spec.reads_train and engine.is_stream(data)):
            return engine.per_example(_self_fn, config, args, data, b)
        outs = [_self_fn(config, args, chunk, eager=True)[:count]
                for chunk, count in engine.stream_chunks(engine.as_stream(data), b)]
        return jnp.concatenate(outs)

    def normalisers(state, data, damping, curvature):
        if spec.diagonal is not None:
            u = state.coords * spec.diagonal(state.curvature, damping)[None]
            return _norm(relatif, state.coords, u)
        norms = checked(curvature, damping, None,
                        self_map(relatif, state, data, damping, None, curvature))
        if _common.is_concrete(norms) and not bool(jnp.all(jnp.isfinite(norms))):
            raise ValueError("the RelatIF normalisers are non-finite: H + damping*I is "
                             "singular or indefinite; increase `damping`")
        return norms

    def norms_at(state, data, damping, curvature):
        """The RelatIF normalisers at ``damping`` (None: the cached ones);
        ``curvature``: the state's, prepared at that damping."""
        if relatif is None:
            return None
        if damping is None:
            return state.norms
        return normalisers(state, data, damping_of(damping, state), curvature)

    def cache(members, train) -> InfluenceState:
        members = _common.setup(task, members, train)
        need_memory(train, "cache")
        if spec.ggn:
            _check_split(task, members, train)
        sizes = lambda floats=None: size(members, train, floats)
        lam0 = spec.damping
        if lam0 is None and spec.default_damping is None:
            lam0 = _stationary_damping(task.loss, members, train, sizes())
        if lam0 is not None:
            lam0 = _common.scalar(lam0, _common.param_dtype(members))
        if spec.basis_check is not None and relatif is None:
            spec.basis_check(task, members, train, memo)
        curvature, coords = spec.fit(task, members, train, sizes,
                                     *((lam0,) if spec.damped_fit else ()))
        if lam0 is None:
            lam0 = _common.scalar(spec.default_damping(curvature),
                                  _common.param_dtype(members))
        state = InfluenceState(members, _common.stored_train(train), curvature, coords, None,
                               _common.provenance(spec.name, made, members, train), lam0)
        if spec.check is not None and _common.is_concrete(curvature):
            spec.check(curvature, lam0, None, None)
        if spec.prepare is not None or relatif is not None:
            prepared = ready(curvature, lam0, lam0)  # raises on a failed factorisation
            if relatif is not None:
                state = state._replace(norms=normalisers(state, train, lam0, prepared))
        return state

    def attribute(state: InfluenceState, test, *, train=None, top_k=None, lowest=False,
                  damping=None):
        """``(n_train, n_test)`` scores, or a ``TopK`` with ``top_k``; ``damping``
        (default: the factory's, or with its default rule ``state.damping``) changes
        λ without refitting. ``train``: the training set, needed only when the state
        was cached from a stream."""
        check_state(state, train)
        _common.check_data(task, state.members, test, "test", target=True,
                           like=state.train)
        members = state.members
        lam = damping_of(damping, state)
        data = None if spec.diagonal is not None else _common.train_for(state.train, train)
        need_memory(data, "attribute")
        d = _common.num_params(members)
        curvature = ready(state.curvature, lam, state.damping)
        b = size(members, test, members.num * d)
        n_test = engine.num_examples(test)
        plan = (None if spec.basis is None or relatif is not None
                else spec.basis(task, members, data, test, memo))
        if plan is not None:  # (train coordinates, test coordinates, weights)
            u = engine.per_example(_basis_test, plan[1:], (task.target, members, curvature,
                                                           lam), test, b, axis=1)  # (M, n_test, k)
            n_test = u.shape[1]
            return engine.score(_basis_tile, plan[:1], (task.loss, members, curvature, u), data,
                                size(members, data, d + n_test), n_test, u.dtype,
                                top_k=top_k, lowest=lowest)
        apply_config = spec.config(members, size(members, data))
        # Koh & Liang's s_test solves the n_test test systems; when the training set is
        # the smaller side, solving its n_train systems gives the same scores (H + λI
        # is symmetric) for fewer solves.
        train_side = (spec.in_memory and spec.reads_train and n_test is not None
                      and engine.num_examples(data) < n_test)
        if spec.reads_train:  # the solve reads the training set: all test vectors at once
            v = engine.per_example(_grads, None, (task.target, members), test, b,
                                   axis=1)  # (M, n_test, d)
            u = None if train_side else checked(
                curvature, lam, v, _apply(spec, apply_config, (fns, members, curvature, lam,
                                                               data), v))
        else:  # preconditioned chunk by chunk: only u is ever held whole
            v = None
            own = None if spec.test_side is None else spec.test_side(task, members, test)
            step, step_config, args = (
                (_test_side, (spec.apply, apply_config),
                 (task.target, fns, members, curvature, lam)) if own is None else
                own + ((task.target, members, curvature, lam),))
            u = checked(curvature, lam, None, engine.per_example(step, step_config, args,
                                                                 test, b, axis=1))
        norms = norms_at(state, data, damping, curvature)
        if train_side:
            n_test = v.shape[1]
            scores = engine.score(
                _solved_tile, (spec.apply, apply_config),
                (task.loss, fns, members, curvature, lam, data, v, norms), data,
                size(members, data, 3 * members.num * d), n_test, v.dtype, top_k=top_k,
                lowest=lowest)
            return checked(curvature, lam, None, scores)
        n_test = u.shape[1]
        if spec.diagonal is not None:
            rows = (state.coords, norms)
            return engine.score(_coord_tile, None, u, rows,
                                size(members, rows, 2 * _common.row_floats(u)), n_test, u.dtype,
                                top_k=top_k, lowest=lowest)
        return engine.score(_grad_tile, None, (task.loss, members, u, norms), data,
                            size(members, data, d + n_test), n_test, u.dtype,
                            top_k=top_k, lowest=lowest)

    def self_attribute(state: InfluenceState, *, train=None, damping=None):
        """``(n_train,)`` score(i, i) (the diagonal of ``attribute(state, train)``)."""
        check_state(state, train)
        lam = damping_of(damping, state)
        if spec.diagonal is not None and task.target_is_loss:
            norms = norms_at(state, None, damping, state.curvature)
            return _diagonal_self(spec.diagonal, state.coords, state.curvature, lam, norms)
        data = _common.train_for(state.train, train)
        need_memory(data, "self_attribute")
        curvature = ready(state.curvature, lam, state.damping)
        return checked(curvature, lam, None,
                       self_map("self", state, data, lam,
                                norms_at(state, data, damping, curvature), curvature))

    return Attributor(cache, engine.bucketed(attribute), self_attribute)


# ---------------------------------------------------------------------- explicit

def _jaxpr_floats(jaxpr) -> int:
    """Elements of every intermediate a jaxpr creates, nested jaxprs included."""
    # imported here: ``jax.extend`` pulls in Pallas, 15 ms of every ``import jattri``
    from jax.extend.core import ClosedJaxpr, Jaxpr

    total = 0
    for eqn in jaxpr.eqns:
        total += sum(int(np.prod(v.aval.shape)) for v in eqn.outvars
                     if hasattr(v.aval, "shape"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    total += _jaxpr_floats(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    total += _jaxpr_floats(sub)
    return total


def _forward_floats(loss, members, data) -> int:
    """Floats one example's loss creates (traced abstractly, nothing computed): the
    residuals a curvature-vector product keeps per example and tangent."""
    row = _common.row_spec
    closed = jax.make_jaxpr(loss)(row(members.params), _common.example_spec(data),
                                  jax.ShapeDtypeStruct((), jnp.int32), row(members.aux))
    return max(1, _jaxpr_floats(closed.jaxpr))


def _explicit_fit(curvature, task, members, train, size, damping):
    """``(M, d, d)``: the upper Cholesky factors U of C + λ₀I (λ₀ the cached
    damping), C the Hessian (or GGN) of the mean training loss of every member, summed
    over chunks ``block`` columns at a time (``_dense_step``): ``block`` unit vectors
    whose four ``(block, d)`` temporaries fit the chunk budget
    (``jattri.func.hessian.dense_block``), on chunks of as many examples as keep
    block · examples · 3F floats within it, F the floats of one example's forward pass
    (its residuals, tangents and cotangents); see :func:`_dense_shape`."""
    one = _one_layer(task, members, train) if curvature == "hessian" else None
    if one is not None:
        return _layer_fit(task, *one, members, train, size, damping), None
    block, examples = _dense_shape(_common.num_params(members),
                                   3 * _forward_floats(task.loss, members, train), size,
                                   engine.num_examples(train))
    fns = _curvature_fns(task, curvature)
    if engine.is_stream(train):  # a Python loop over the stream's chunks
        return _cholesky(_dense_sum(block, examples, fns, members, train), damping), None
    # in memory: one program, whose accumulator starts inside it (an argument would be
    # copied into the loop's carry) and is factored in it once dead: M·d² floats
    # live, then 2·M·d² in the factorisation, never the sum and its factors together
    return _dense_factors(block, examples, fns, members, train, damping,
                          engine.layout_of(train)), None


def _one_layer(task, members, train, check: bool = True):
    """``(layer, order)`` where the members' parameters are all in one linear layer
    (``jattri.func.layers``) called once per example and the loss reads them only
    through its outputs y = ã W, else ``None``. Then the Hessian in W is exactly
    Σ_i Σ_τσ ã_iτ ã_iσᵀ ⊗ ∂²loss_i/∂y_τ∂y_σ (:func:`_layer_fit`); ``order`` maps the
    raveled parameters to that block order (:func:`_layer_order`). In memory only: the
    check reads one example (a stream keeps the generic build). ``check=False``: the
    candidate without that check (the caller runs :func:`_reads_only_through` itself)."""
    if engine.is_stream(train):
        return None
    try:
        found = find_layers(task.loss, _common.row_spec(members.params),
                            _common.example_spec(train), jax.ShapeDtypeStruct((), jnp.int32),
                            _common.row_spec(members.aux))
    except (ValueError, TypeError):
        return None
    layer = next(iter(found.values()))
    if (len(found) != 1 or len(layer.out_shapes) != 1 or _common.num_params(members)
            != (layer.d_in + int(layer.use_bias)) * layer.d_out):
        return None
    order = _layer_order(layer, members)
    if check and not (_concrete(members, train) and bool(
            _only_through(layer, task.loss, members.params, members.aux, train, order))):
        return None  # traced: the check cannot be read, so the generic build
    return layer, jax.device_put(order)  # no program of its own, as jnp.asarray has


def _reads_only_through(layer, loss, params, aux, data, order):
    """Whether the loss reads the parameters only through ``layer``'s outputs, checked
    where a penalty on θ (an L2 term in the loss) would show: at θ' = θ + noise, on one
    example, ∇_θ loss must equal the layer's ã ⊗ ∂loss/∂y (relative 1e-4). Member 0 and
    the first example of ``data`` are sliced inside the program (eagerly, each leaf's
    slice compiled a program of its own)."""
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    params, aux, z = first(params), first(aux), first(data)
    flat, unravel = ravel_pytree(params)
    noise = seeded_normal(jnp.zeros((2,), jnp.uint32), flat.shape[0], flat.dtype)  # no threefry
    moved = unravel(flat + noise * (1 + jnp.std(flat)))
    index = jnp.zeros((), jnp.int32)
    io, grads = layer_io_and_grad(loss, moved, z, index, aux, layers={layer.name: layer})
    grad, (a, s) = ravel_pytree(grads)[0], io[layer.name]
    structured = jnp.einsum("tk,tl->kl", fisher.augment(a, layer.use_bias), s).reshape(-1)
    err = jnp.linalg.norm(grad - structured[order])
    return err <= 1e-4 * jnp.linalg.norm(grad) + 1e-30


_only_through = jit(_reads_only_through, static_argnums=0, once=True)


def _layer_order(layer, members) -> np.ndarray:
    """``(d,)``: for each coordinate of the raveled params, its index in the layer's
    block order (kernel rows row-major, the bias as the last input row), the order of
    :func:`jattri.func.fisher.layer_hessian_blocks`."""
    d_in, d_out = layer.d_in, layer.d_out
    index = {layer.kernel_key: np.arange(d_in * d_out, dtype=np.float64).reshape(
        layer.kernel_shape)}
    if layer.use_bias:
        index[layer.bias_key] = d_in * d_out + np.arange(d_out, dtype=np.float64)
    probe = jax.tree_util.tree_map_with_path(
        lambda path, leaf: index[leaf_key(path)], _common.row_spec(members.params))
    # ravel_pytree's order (the leaves' flattening order, each raveled), in numpy: jnp
    # would compile an eager program per leaf
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(probe)]
                          ).astype(np.int64)


def _layer_step(layer, args, acc, chunk):
    """``acc (M, d, d)`` += the chunk's summed Hessian block of the single layer, in
    block order: T·d_out output-space products per example, never d."""
    loss, members = args
    blocks = _common.member_map(lambda p, a: fisher.layer_hessian_blocks(
        (layer,), ((None, None),), loss, p, a, chunk)[0], members)
    return acc + blocks.astype(acc.dtype), None


@partial(jit, static_argnums=(0, 1, 7))
def _layer_factors(layer, examples, loss, members, train, order, damping, layout=None):
    def build():
        d = _common.num_params(members)
        h0 = jax.ShapeDtypeStruct((members.num, d, d), _common.param_dtype(members))
        h, _, n = engine.scan(_layer_step, layer, (loss, members), h0, train, examples,
                              sums=True)
        return _factor(h[:, order[:, None], order[None, :]] / n, damping)  # one gather

    return engine.traced_with_layout(layout, train, build)


def _layer_fit(task, layer, order, members, train, size, damping):
    """:func:`_explicit_fit` for a model that is one linear layer (logistic or softmax
    regression, a single Conv; :func:`_one_layer`): the Hessian from T·d_out
    Hessian-vector products of the loss in the layer's outputs per example instead of
    d in the parameters (7,850-parameter softmax regression, 5,000 examples:
    ``benchmarks/RESULTS.md``), then factored as there."""
    examples = size(fisher.hessian_block_floats(layer, layer.d_in + int(layer.use_bias),
                                                layer.d_out))
    return _layer_factors(layer, examples, task.loss, members, train, order, damping,
                          engine.layout_of(train))


#: Examples per chunk the dense curvature build trades tangents for (below).
DENSE_EXAMPLES = 512


def _dense_shape(d, pair_floats, size, n=None):
    """``(block, examples)`` of the dense curvature build: ``block`` tangents of a
    product over ``examples`` examples, ``pair_floats`` floats per (tangent, example).

    Rule: the most tangents that fit the budget (``dense_block(d)``), unless that leaves
    fewer than ``DENSE_EXAMPLES`` examples per chunk; then fewer tangents, so that
    ``min(n, DENSE_EXAMPLES)`` examples fit the same budget (a ``chunk_size`` the user
    gave is kept, with the most tangents). The memory is the same;
    the products' matrix multiplications get a longer example axis, which XLA runs
    faster (the 7,850-parameter LR at 5,000 examples: 2,137 tangents × 143 examples
    took 15.5 s, 306 × 1,000 took 9.6 s; ``benchmarks/RESULTS.md``)."""
    block = dense_block(d)
    examples = size(block * pair_floats)
    want = DENSE_EXAMPLES if n is None else min(int(n), DENSE_EXAMPLES)
    if examples < want:
        budget = engine.DEFAULT_CHUNK_BYTES // 4
        fewer = max(1, min(block, budget // max(1, want * pair_floats)))
        more = size(fewer * pair_floats)
        if more > examples:  # (a chunk_size given by the user stays as it is)
            block, examples = fewer, more
    return block, examples


def _dense_sum(block, examples, fns, members, train):
    d = _common.num_params(members)
    h0 = jax.ShapeDtypeStruct((members.num, d, d), _common.param_dtype(members))
    h, _, n = engine.scan(_dense_step, block, (fns, members), h0, train, examples,
                          sums=True)
    return h / n


@partial(jit, static_argnums=(0, 1, 6))
def _dense_factors(block, examples, fns, members, train, damping, layout=None):
    return engine.traced_with_layout(layout, train, lambda: _factor(
        _dense_sum(block, examples, fns, members, train), damping))


def _factor(h, damping):
    """``(M, d, d)`` upper Cholesky factors U of H + λI (UᵀU = H + λI; U = Lᵀ),
    member by member; the upper triangle of H is read.

    Upper, not lower: LAPACK factors and solves column-major matrices, and a row-major
    U is L in column-major order. Factoring the transposed sum and keeping the factor
    transposed leaves every d² pass a plain copy, and ``_explicit_apply``'s solves read
    U without the transposed copy of L they made (7,850² float32 on this CPU:
    factorisation 1.65 → 1.09 s, solves against 512 vectors 0.58 → 0.36 s;
    ``benchmarks/RESULTS.md``, "RPS's refit in compact form; explicit influence's
    factor stored upper")."""
    lam = jnp.broadcast_to(jnp.asarray(damping, h.dtype), h.shape[:1])

    def one(hm, lm):
        eye = jnp.arange(hm.shape[0])
        damped = hm + jnp.where(eye[:, None] == eye[None, :], lm, 0).astype(hm.dtype)
        return jax.lax.linalg.cholesky(damped.T, symmetrize_input=False).T

    return _common.each_member(one, h, lam)


_cholesky = jit(_factor)


@jit
def _refactor(factors, base, damping):
    """Factors of C + λI from those of C + λ₀I: C + λI = UᵀU + (λ − λ₀) I."""
    lam = jnp.broadcast_to(jnp.asarray(damping, factors.dtype), factors.shape[:1])
    lam0 = jnp.broadcast_to(jnp.asarray(base, factors.dtype), factors.shape[:1])
    return _factor(_common.each_member(lambda u: u.T @ u, factors), lam - lam0)


@partial(jit, once=True)
def _bad_pivots(factors) -> jax.Array:
    """A member's Cholesky factor has a non-finite pivot or one ≤ 1e-12 of its largest
    (one program; eagerly, eleven compilations on a first call)."""
    pivots = jnp.square(jnp.diagonal(factors, axis1=-2, axis2=-1))  # (M, d)
    top = jnp.max(pivots, axis=-1)
    bad = ~jnp.all(jnp.isfinite(pivots), axis=-1) | (jnp.min(pivots, axis=-1) <= 1e-12 * top)
    return jnp.any(bad)


def _explicit_prepare(what):
    def prepare(factors, damping, base):
        """U with UᵀU = C + λI: the state's at its damping λ₀ = ``base``, else one
        factorisation of U₀ᵀU₀ + (λ − λ₀)I. A concrete factorisation that failed
        (C + λI indefinite) or has a pivot ≤ 1e-12 of the largest (singular) raises
        ValueError."""
        # compared in the state's dtype: a Python float equal to the cached damping
        # differs from its float32 rounding, and would refactor on every call
        same = (_common.is_concrete((damping, base))
                and np.array_equal(np.asarray(damping, np.asarray(base).dtype),
                                   np.asarray(base)))
        if not same:
            factors = _refactor(factors, base, damping)
        if _common.is_concrete(factors):
            if bool(_bad_pivots(factors)):
                advice = "increase `damping`" + (
                    ', or use curvature="ggn" (positive semi-definite)'
                    if what == "Hessian" else "")
                raise ValueError(
                    f"{what} + damping*I is singular or indefinite (its Cholesky "
                    f"factorisation failed or has a pivot <= 1e-12 of the largest, with "
                    f"damping={damping}); {advice}")
        return factors
    return prepare


def _explicit_apply(config, args, v):
    _, _, factors, _, _ = args
    return _common.each_member(
        lambda u, vm: jax.scipy.linalg.cho_solve((u.T, True), vm.T).T, factors, v)


def _explicit_check(curvature, damping, v, u):
    # (the factors themselves are checked by ``prepare``: finite pivots, none tiny)
    if u is not None and not _checks.all_finite(u):
        raise ValueError("influence_explicit returned non-finite values: the curvature + "
                         "damping*I is singular or indefinite; increase `damping`")


def influence_explicit(task: Any, *, damping: Optional[float] = None,
                       curvature: str = "hessian",
                       chunk_size: Optional[int] = None,
                       relatif: Optional[str] = None) -> Attributor:
    """Influence with the dense curvature: score(i, t) = g_iᵀ (C + λI)⁻¹ g_t, C the
    Hessian H of the mean training loss (``curvature="hessian"``, Koh & Liang 2017) or
    its Gauss-Newton matrix G = (1/n) Σ_i J_iᵀ ∇²ℓ_i J_i (``"ggn"``; Schraudolph,
    2002; Martens, 2020, "New insights and perspectives on the natural gradient
    method"), J_i the Jacobian of the model's outputs on z_i and ℓ_i the loss of those
    outputs, convex, so G is positive semi-definite where H of a non-convex model is
    not; on a model linear in θ (logistic or least-squares regression) G = H.
    ``"ggn"`` needs the split: ``jattri.Task(loss_fn, output_fn=..., output_loss_fn=...)``.

    For models of up to some 10⁴ parameters: ``cache`` builds the ``(d, d)`` matrix C
    of every member from curvature-vector products (HVPs, or GGN-vector products
    J ᵀ ∇²ℓ J v by ``jvp``/``vjp``), summed over chunks of the training set (a
    ``jattri.Stream`` works), ``block`` unit vectors at a time written into C in
    place, so that besides C only O(block·d) floats of tangents are live, within the
    chunk budget (``jattri.engine.DEFAULT_CHUNK_BYTES``); it keeps the Cholesky
    factors UᵀU = C + λ₀I at the cached damping λ₀ (d³/3 flops). ``attribute``
    applies (C + λI)⁻¹ by two triangular solves; another ``damping`` costs one
    factorisation of UᵀU + (λ − λ₀)I, no refit. A singular or indefinite C + λI
    raises ``ValueError`` (at ``cache`` for the cached damping, which must
    therefore make C + λ₀I positive definite).

    Args:
      task: a :class:`jattri.Task` or a ``loss_fn(params, example)``. damping: λ ≥ 0
        (``attribute(..., damping=...)`` overrides it), or ``None`` (default): the L2 coefficient under which the
        members are stationary points of their training objective,
        λ̂ = −⟨∇L̄(θ), θ⟩/‖θ‖² (:func:`stationary_damping`, one gradient pass at
        ``cache``; 1e-3 where λ̂ ≤ 0): the Hessian of a model trained on mean loss +
        (λ/2)‖θ‖² is H + λI, so this is the damping that makes influence Koh &
        Liang's; recorded in ``state.damping``. curvature: ``"hessian"``
        (default: exact influence, as Koh & Liang; convex models) or ``"ggn"``
        (non-convex models, where H + λI is indefinite at small λ). chunk_size:
        examples per compiled step. relatif: ``None``, ``"l"`` or ``"theta"`` (module
        docstring).

    Memory: state M·d² floats (the factors); ``cache`` on a training set in memory
    M·d² plus the chunk budget while summing, 2·M·d² while factoring (3·M·d² from a
    Stream); ``attribute`` / ``self_attribute`` nothing d²-sized at the factory's
    damping, 3·M·d² more at another. On the 17,226-parameter digits MLP in float32
    d² is 1.19 GB: ``benchmarks/explicit_memory.py`` (``benchmarks/RESULTS.md``,
    "Explicit influence in bounded memory").
    """
    _check_damping(damping, none=True)
    _checks.choice(curvature, "curvature", CURVATURES)
    task = as_task(task)
    _check_curvature(curvature, task)
    what = "Hessian" if curvature == "hessian" else "Gauss-Newton matrix"
    spec = _Spec("influence_explicit", damping, partial(_explicit_fit, curvature),
                 _explicit_apply, lambda members, size: None, check=_explicit_check,
                 prepare=_explicit_prepare(what), ggn=curvature == "ggn", damped_fit=True,
                 # the state's factors are those of C + damping·I
                 hyper=(("damping", damping),) + _curvature_hyper(task, curvature))
    return _influence(task, spec, relatif=relatif, chunk_size=chunk_size)


# --------------------------------------------------------------------------- CG

#: right-hand sides solved together by ``influence_cg``'s block CG (see its docstring)
CG_BLOCK = 128


#: (d,)-sized arrays a CG solve holds per system: about eight with blocks (solutions,
#: residuals, directions and their products, the new ones before and after each pass),
#: four one system at a time (:func:`jattri.func.hessian.block_cg_solve`, ``cg_solve``).
_CG_ROW_FLOATS = {True: 8, False: 4}


def _cg_rows(chunk_size, members, block) -> int:
    """Systems solved at once: as many as hold their CG vectors within the chunk budget
    (:func:`jattri.methods._common.chunk_size_for`, or the user's ``chunk_size``), at
    least one block. dattri's 7,850-parameter LR at 512 test vectors and blocks of 128:
    1,068 rows, all four blocks together; a 10.7M-parameter model: one block at a
    time."""
    d = _common.num_params(members)
    return _common.chunk_size_for(chunk_size, members, None, _CG_ROW_FLOATS[block > 1] * d)


def _cg_group(config, b: int) -> int:
    """Rows per group of ``_cg_apply``'s ``b`` systems (block CG's groups of blocks,
    or plain CG's groups of systems)."""
    _, _, block, _, rows = config
    return cg_group_rows(b, rows, block if block > 1 else 1)


def _cg_apply(config, args, v):
    maxiter, tol, block, size, rows = config
    fns, members, _, damping, train = args

    def one(p, a, vj):
        matmat = lambda xs: _mean_cvp(fns, p, a, train, xs, size) + damping * xs
        if block > 1:
            return block_cg_solve(matmat, vj, maxiter=maxiter, tol=tol, block=block,
                                  at_once=rows)
        return cg_solve(lambda x: matmat(x[None])[0], vj, maxiter=maxiter, tol=tol,
                        at_once=rows)

    return _common.member_map(one, members, v)


def _cg_check(advice):
    def check(curvature, damping, v, u):
        if u is not None:
            check_cg(u, advice)
    return check


def influence_cg(task: Any, *, damping: Optional[float] = None, maxiter: int = 100,
                 tol: float = 1e-6, block: int = CG_BLOCK,
                 curvature: str = "hessian", chunk_size: Optional[int] = None,
                 relatif: Optional[str] = None) -> Attributor:
    """Influence with (C + λI)⁻¹ by conjugate gradients on exact curvature-vector
    products, C the Hessian of the mean training loss (``curvature="hessian"``) or its
    Gauss-Newton matrix (``"ggn"``, products J ᵀ ∇²ℓ J v by ``jvp``/``vjp``;
    Schraudolph, 2002; Martens, 2020; see ``influence_explicit``; it needs the Task's
    ``output_fn`` / ``output_loss_fn`` split).

    ``cache`` keeps nothing but the members (and the training set's reference);
    ``attribute`` solves one system per example of the SMALLER side, as Koh &
    Liang's s_test does for the test side: u_t = (C + λI)⁻¹ g_t for the n_test test
    gradients, ``block`` systems at a time by block CG (O'Leary, 1980;
    :func:`jattri.func.hessian.block_cg_solve`), then scores the training chunks; or,
    when n_train < n_test, u_i = (C + λI)⁻¹ g_i chunk by chunk against the held test
    gradients (the same scores, C + λI being symmetric). Each product is summed over
    chunks of the whole training set. With ``relatif`` (and for ``self_attribute``)
    the systems of the training examples are solved chunk by chunk.

    C + λI must be positive definite. A search direction p with pᵀ(C + λI)p ≤ 0 (with
    a block: a Gram eigenvalue of its directions below −√eps of the largest; the
    Hessian of a non-convex model at a damping below minus its smallest eigenvalue)
    raises ``ValueError`` advising ``curvature="ggn"`` or a larger damping, instead
    of returning scores from a meaningless solve. The training set must be in memory.

    Args:
      task: a Task or a loss. damping: λ ≥ 0 (overridable at ``attribute``), or
        ``None`` (default): the L2 coefficient under which the
        members are stationary points of their training objective,
        λ̂ = −⟨∇L̄(θ), θ⟩/‖θ‖² (:func:`stationary_damping`, one gradient pass at
        ``cache``; 1e-3 where λ̂ ≤ 0): the Hessian of a model trained on mean loss +
        (λ/2)‖θ‖² is H + λI, so this is the damping that makes influence Koh &
        Liang's; recorded in ``state.damping`` (as ``influence_explicit``).
      maxiter: CG iterations (steps of the block: one product per system each).
        tol: relative residual, every system's (at least the dtype's eps). block:
        systems solved together (default ``CG_BLOCK`` = 128). They share one Krylov
        space, so each is solved in fewer products: on the 7,850-parameter LR with
        500 test gradients (``benchmarks/block_cg.py``, float32) 5 steps reach ``tol=1e-6`` (true
        residual 1.2·10⁻⁵) where one CG per system (``block=1``, Koh & Liang's) is at
        1.3·10⁻³ after 20; its call is 3.75 s instead of 10.15 s. Where ``maxiter``
        binds (an ill-conditioned system) a block step costs more than a plain one
        but gets closer (the LR at λ = 1e-3: after 20 steps a score error of 8.5e-5
        against 0.21). A system's iterate depends on the others of its block until
        both converge.
        curvature: ``"hessian"``
        (default, Koh & Liang's exact influence) or ``"ggn"`` (positive
        semi-definite; for non-convex models). chunk_size: examples per chunk
        (gradients and products). relatif: ``None``, ``"l"`` or ``"theta"``.

    Memory: state nothing (+ n·M with RelatIF); ``attribute`` the n_test·d test
    gradients, about eight CG vectors of d floats per system solved at once (four with
    ``block=1``), and one chunk's products for as many tangents. Systems are solved
    as many at once as fit the chunk budget (``jattri.engine.DEFAULT_CHUNK_BYTES``,
    256 MiB: 1,068 systems at d = 7,850 with blocks) or ``chunk_size`` of them, at
    least one block; the rest wait their turn. The train side solves one chunk's.
    Cost per step and system: one curvature-vector product over the training set and
    about 11·block·d multiply-adds.
    """
    _check_damping(damping, none=True)
    maxiter = _checks.integer(maxiter, "maxiter")
    tol = _checks.real(tol, "tol", low=0)
    block = _checks.integer(block, "block")
    chunk_size = engine.check_chunk_size(chunk_size)
    _checks.choice(curvature, "curvature", CURVATURES)
    task = as_task(task)
    _check_curvature(curvature, task)
    advice = ("increase `damping`" if curvature == "ggn" else
              'use curvature="ggn" (the Gauss-Newton matrix, positive semi-definite) or '
              "increase `damping` above minus the Hessian's smallest eigenvalue")
    spec = _Spec("influence_cg", damping, lambda task, members, train, size: (None, None),
                 _cg_apply, lambda members, size: (maxiter, tol, block, size,
                                                   _cg_rows(chunk_size, members, block)),
                 check=_cg_check(advice), in_memory=True, reads_train=True,
                 ggn=curvature == "ggn", solve_group=_cg_group,
                 hyper=(("maxiter", maxiter), ("tol", tol), ("block", block))
                 + _curvature_hyper(task, curvature))
    return _influence(task, spec, relatif=relatif, chunk_size=chunk_size)


# ------------------------------------------------------------------------ LiSSA

_LISSA_FACTOR = 1.5


@partial(jit, static_argnums=1, once=True)
def _lissa_keys(key, num):
    """Member m's scale key and run key: ``split(fold_in(key, m))``, in one program."""
    keys = jax.vmap(jax.random.split)(_common.member_keys(key, num))
    return keys[:, 0], keys[:, 1]


def _lissa_top(size, args):
    return _lissa_top_jit(size, args, engine.layout_of(args[2]))


@partial(jit, static_argnums=(0, 2))
def _lissa_top_jit(size, args, layout):
    return engine.traced_with_layout(layout, args[2], lambda: _lissa_tops(size, args))


def _lissa_tops(size, args):
    """``(M,)`` λ̂_max(C) of every member by 30 power iterations on the mean-loss
    curvature-vector product (``fns``: the loss or the GGN split)."""
    fns, members, train, keys = args
    d, dtype = _common.num_params(members), _common.param_dtype(members)
    return _common.member_map(
        lambda p, a, k: top_eigenvalue(
            lambda x: _mean_cvp(fns, p, a, train, x[None], size)[0], d, key=k, dtype=dtype),
        members, keys)


def _lissa_scale(scale, top, damping):
    # abs(), not jnp.abs: numpy in the host-side divergence check, jax when traced
    return scale if scale is not None else _LISSA_FACTOR * (abs(top) + damping)


#: (d,)-sized arrays LiSSA holds per system: the right-hand side, the iterate and its
#: product.
_LISSA_ROW_FLOATS = 3


def _lissa_progress(config, v) -> tuple:
    """``(total, unit)`` of LiSSA's solve inside ``progress``: its recursion steps,
    depth × repeats for each group of systems (``in_groups``) of each member."""
    depth, repeats, rows = config[0], config[1], config[5]
    return v.shape[0] * group_count(v.shape[1], rows) * repeats * depth, "LiSSA steps"


def _report_every(steps: int) -> int:
    """Steps between two progress reports of a solve driven from the host (one program
    call each: LiSSA's recursion, Arnoldi's run): every step up to 100 steps, else
    about 100 reports per run."""
    return max(1, -(-int(steps) // 100))


def _lissa_recursion(config, fns, params, aux, top, damping, train) -> tuple:
    """``(s, step)`` of one member: its scale s and one recursion step
    ``step(rhs, h, skey) = rhs + h − (C_S h + λh) / s`` on a group of systems
    ``(g, d)``, S the minibatch ``skey`` draws (every system of the group the same)."""
    depth, repeats, batch_size, scale, size, rows = config
    n = engine.num_examples(train)
    bs = n if batch_size is None else min(int(batch_size), n)
    s = _lissa_scale(scale, top, damping)

    def hvp_batch(skey, x):
        if bs >= n:
            return _mean_cvp(fns, params, aux, train, x, size)
        idx = jax.random.choice(skey, n, (bs,), replace=False)
        batch = (jax.tree_util.tree_map(lambda z: z[idx], train), idx.astype(jnp.int32))
        return _mean_cvp(fns, params, aux, batch, x, min(size, bs), indexed=True)

    def step(rhs, h, skey):
        # the fixed point of h <- v + h - (H_S + λI) h / scale is scale (H + λI)⁻¹ v
        return rhs + h - (hvp_batch(skey, h) + damping * h) / s

    return s, step


def _lissa_step_keys(key, repeat, config) -> jax.Array:
    """``(depth,)`` minibatch keys of recursion ``repeat`` of the member keyed ``key``."""
    depth, repeats = config[0], config[1]
    return jax.random.split(jax.random.split(key, repeats)[repeat], depth)


def _lissa_apply(config, args, v):
    depth, repeats, rows = config[0], config[1], config[5]
    fns, members, (top, keys), damping, train = args

    def one(p, a, t, key, vj):
        s, step = _lissa_recursion(config, fns, p, a, t, damping, train)

        def solve(rhs):  # a group of systems (g, d): every group draws the same
            def one_repeat(r):  # minibatches, so grouping changes nothing
                h, _ = jax.lax.scan(lambda h, skey: (step(rhs, h, skey), None), rhs,
                                    _lissa_step_keys(key, r, config))
                return h / s

            return jnp.mean(jax.lax.map(one_repeat, jnp.arange(repeats)), axis=0)

        return in_groups(solve, vj, rows, batched=True)

    return _common.member_map(one, members, top, keys, v)


# LiSSA inside ``progress``: the recursion driven from the host in segments of steps,
# each one call of a program without callbacks (cached like any other program; a
# ``jax.debug.callback`` per step was compiled again in every process). Per member,
# per group of systems (as ``in_groups``' groups in the quiet program), per repeat:
# ``_lissa_rhs`` takes the group's right-hand sides, ``_lissa_segment`` runs the steps,
# ``_lissa_repeat_end`` adds the recursion's h / s to the sum over repeats, and
# ``_lissa_group_end`` writes the mean into the solutions. Only the steps run once per
# segment: on dattri's LR (5,000 × 500, depth 100, one step a segment) reading and
# writing the group's rows in every segment's program made the solve 1.8× as long.

@partial(jit, static_argnums=3)
def _lissa_rhs(v, m, start, g):
    """``(g, d)``: member ``m``'s systems ``start ... start + g`` of ``v`` ``(M, b, d)``."""
    return _group_rows(v[m], start, g)


def _lissa_segment(config, args, rhs, h, m, repeat, j0):
    """Steps ``j0 ... j0 + every`` (:func:`_report_every`; none past ``depth``)
    of recursion ``repeat`` of member ``m`` on its group of systems ``rhs`` ``(g, d)``,
    from ``h`` (from ``rhs`` at ``j0 == 0``): :func:`_lissa_apply`'s steps."""
    depth = config[0]
    fns, members, (top, keys), damping, train = args
    p, a = member(members, m)
    _, step = _lissa_recursion(config, fns, p, a, top[m], damping, train)
    skeys = _lissa_step_keys(keys[m], repeat, config)

    def body(h, i):
        j = j0 + i
        return jnp.where(j < depth, step(rhs, h, skeys[jnp.minimum(j, depth - 1)]), h), None

    h, _ = jax.lax.scan(body, jnp.where(j0 == 0, rhs, h),
                        jnp.arange(_report_every(depth)))
    return h


@partial(jit, static_argnames=("config", "layout"), donate_argnames=("h",))
def _lissa_segment_jit(config, args, rhs, h, m, repeat, j0, layout):
    h = engine.traced_with_layout(
        layout, args[-1], lambda: _lissa_segment(config, args, rhs, h, m, repeat, j0))
    return h, engine.token(h)


@partial(jit, static_argnums=0, donate_argnums=4)
def _lissa_repeat_end(scale, top, damping, h, acc, m, repeat):
    """The sum over repeats ``acc`` plus recursion ``repeat``'s ``h / s``, s member
    ``m``'s scale (``acc`` restarts at repeat 0)."""
    return jnp.where(repeat == 0, 0, acc) + h / _lissa_scale(scale, top[m], damping)


@partial(jit, static_argnums=0, donate_argnums=1)
def _lissa_group_end(repeats, out, acc, m, start):
    """``out`` ``(M, b, d)`` with member ``m``'s rows ``start ...`` set to the mean
    over repeats ``acc / repeats`` (rows past the last system dropped)."""
    return out.at[m, _group_index(out.shape[1], start, acc.shape[0])].set(
        (acc / repeats).astype(out.dtype), mode="drop")


def _lissa_driven(config, args, v, layout, stage):
    """LiSSA's solve of ``v`` ``(M, b, d)`` inside :func:`jattri.progress`: every
    recursion in segments of :func:`_report_every` steps, one call each of a
    program without callbacks, member by member and group by group as
    :func:`_lissa_apply`, each segment reported to ``stage`` as it is done."""
    depth, repeats, rows = config[0], config[1], config[5]
    num, b = v.shape[:2]
    g, every = group_size(b, rows), _report_every(depth)
    at = lambda x: np.int32(x)
    state = {"out": _zeros_like_jit(v), "h": None, "acc": None, "rhs": None}

    def segment(m, start, r, j0):
        if j0 == 0 and r == 0:
            state["rhs"] = _lissa_rhs(v, at(m), at(start), g)
        if state["h"] is None:
            state["h"] = _zeros_like_jit(state["rhs"])
            state["acc"] = _zeros_like_jit(state["rhs"])
        state["h"], token = _lissa_segment_jit(config, args, state["rhs"], state["h"],
                                               at(m), at(r), at(j0), layout=layout)
        if j0 + every >= depth:
            state["acc"] = _lissa_repeat_end(config[3], args[2][0], args[3], state["h"],
                                             state["acc"], at(m), at(r))
            if r == repeats - 1:
                state["out"] = _lissa_group_end(repeats, state["out"], state["acc"],
                                                at(m), at(start))
        return token

    def calls():
        done = 0
        for m in range(num):
            for start in range(0, b, g):
                for r in range(repeats):
                    for j0 in range(0, depth, every):
                        done += min(every, depth - j0)
                        yield partial(segment, m, start, r, j0), done

    engine.reported_calls(stage, calls())
    return state["out"]


def influence_lissa(task: Any, *, damping: Optional[float] = None, depth: int = 1000,
                    repeats: int = 1, batch_size: Optional[int] = None,
                    scale: Optional[float] = None, key: Optional[jax.Array] = None,
                    curvature: str = "hessian", chunk_size: Optional[int] = None,
                    relatif: Optional[str] = None) -> Attributor:
    """Influence with (C + λI)⁻¹ by LiSSA (Agarwal et al., 2017; ``jattri.func.ihvp_lissa``):

        h₀ = v,   h_{j+1} = v + h_j − (C_S h_j + λ h_j) / scale,   result = h_depth / scale,

    averaged over ``repeats`` runs, with S a minibatch drawn (without replacement) from
    the whole training set for each step, C_S the Hessian of its mean loss
    (``curvature="hessian"``) or its Gauss-Newton matrix (``"ggn"``: J ᵀ ∇²ℓ J v by
    ``jvp``/``vjp``, positive semi-definite, so the series converges on non-convex
    models too; Schraudolph, 2002; Martens, 2020; it needs the Task's
    ``output_fn`` / ``output_loss_fn`` split), summed over chunks.

    ``attribute`` runs the recursion on the SMALLER side, as Koh & Liang's s_test does
    for the test side: all n_test test gradients together, or, when n_train < n_test,
    the training gradients chunk by chunk against the held test gradients. The same
    minibatches serve every vector, so one linear map L ≈ (C + λI)⁻¹ is applied; with
    ``batch_size=None`` L is a polynomial in C, symmetric, and both sides give the
    same scores; with minibatches L is not exactly symmetric and the two sides are
    two estimates of the same scores. ``self_attribute`` and RelatIF run the map on
    training chunks. ``cache`` keeps the members, the per-member keys and, for the
    default scale, λ̂_max(C) by 30 power iterations. The training set must be in
    memory.

    Args:
      task: a Task or a loss. damping: λ ≥ 0 (Tikhonov, as in every IF method;
        overridable at ``attribute``), or ``None`` (default): the L2 coefficient under which the
        members are stationary points of their training objective,
        λ̂ = −⟨∇L̄(θ), θ⟩/‖θ‖² (:func:`stationary_damping`, one gradient pass at
        ``cache``; 1e-3 where λ̂ ≤ 0): the Hessian of a model trained on mean loss +
        (λ/2)‖θ‖² is H + λI, so this is the damping that makes influence Koh &
        Liang's; recorded in ``state.damping`` (as ``influence_explicit``).
      depth: recursion steps; the error decays like (1 − (μ_min + λ)/scale)^depth.
      repeats: independent recursions averaged. batch_size: |S| (``None``: the whole
        training set, a deterministic Neumann series). scale: > λ_max(H_S) + λ
        (default 1.5 (λ̂_max(H) + λ); a divergent run raises ``ValueError``).
      key: minibatch key (default ``PRNGKey(0)``; member m uses ``fold_in(key, m)``).
      curvature: ``"hessian"`` (default, Koh & Liang's) or ``"ggn"``.
      chunk_size: examples per chunk. relatif: ``None``, ``"l"`` or ``"theta"``.

    Memory: state 3·M floats (+ n·M with RelatIF); ``attribute`` the n_test·d test
    gradients, about three vectors of d floats per system solved at once and one
    chunk's products for as many tangents. Systems are solved as many at once as fit
    the chunk budget (``jattri.engine.DEFAULT_CHUNK_BYTES``) or ``chunk_size`` of them,
    the rest in turn, every group with the same minibatches (the grouping changes no
    result); the train side solves one chunk's.
    """
    _check_damping(damping, none=True)
    chunk_size = engine.check_chunk_size(chunk_size)
    depth = _checks.integer(depth, "depth")
    repeats = _checks.integer(repeats, "repeats")
    batch_size = _checks.integer(batch_size, "batch_size", none=True)
    scale = _checks.real(scale, "scale", low=0, open_low=True, none=True)
    key = _common.default_key() if key is None else _checks.prng_key(key)
    _checks.choice(curvature, "curvature", CURVATURES)
    task = as_task(task)
    _check_curvature(curvature, task)

    def fit(task, members, train, size):
        scale_keys, run_keys = _lissa_keys(key, members.num)
        if scale is None:
            top = _lissa_top(size(), (_curvature_fns(task, curvature), members, train,
                                      scale_keys))
        else:
            top = jax.device_put(np.zeros(members.num, _common.param_dtype(members)))
        return (top, run_keys), None

    def check(fitted, damping, v, u):
        if u is None:
            return
        finite = _checks.all_finite(u)
        diverged = not finite
        if v is not None and finite:  # (else u are scores from solutions: finiteness only)
            top = np.asarray(fitted[0])  # the scale in numpy: no eager compilation
            s = np.asarray(_lissa_scale(scale, top, np.asarray(damping, top.dtype)),
                           top.dtype).reshape(-1, 1)
            # With scale > λ_max(C_S) + λ every factor of the series is a contraction, so
            # ‖h‖ ≤ (depth + 1)‖v‖; anything above that is divergence, not data.
            bound = (depth + 1) * np.linalg.norm(np.asarray(v), axis=-1) / s
            diverged = np.any(np.linalg.norm(np.asarray(u), axis=-1) > 1.01 * bound + 1e-30)
        if diverged:
            raise ValueError(
                "LiSSA diverged: `scale` must exceed the largest eigenvalue of the "
                "minibatch Hessian plus damping (increase `scale` or `batch_size`), and "
                "H + damping*I must be positive definite")

    config = lambda members, size: (
        int(depth), int(repeats), batch_size, None if scale is None else float(scale), size,
        _common.chunk_size_for(chunk_size, members, None,
                               _LISSA_ROW_FLOATS * _common.num_params(members)))
    spec = _Spec("influence_lissa", damping, fit, _lissa_apply, config, check=check,
                 in_memory=True, reads_train=True, ggn=curvature == "ggn",
                 solve_progress=_lissa_progress, solve_driven=_lissa_driven,
                 hyper=(("depth", depth), ("repeats", repeats), ("batch_size", batch_size),
                        ("scale", scale), ("key", key)) + _curvature_hyper(task, curvature))
    return _influence(task, spec, relatif=relatif, chunk_size=chunk_size)


@partial(jit, static_argnums=0)
def _diagonal_self(diagonal, coords, curvature, lam, norms):
    """``(n,)`` Σ_r coords² · diagonal(λ) (over ``norms``), averaged over members, in
    one program (eagerly, a dozen compilations on a first call)."""
    s = jnp.sum(coords ** 2 * diagonal(curvature, lam)[None], -1)
    return jnp.mean(s if norms is None else s / norms, axis=1)


# ---------------------------------------------------------------------- Arnoldi

def _arnoldi_weights(curvature, damping, tol):
    eigvals = curvature[0]
    return jax.vmap(arnoldi_inverse_weights, (0, None, None))(eigvals, damping, tol)


def _arnoldi_project(curvature, g):
    return jnp.einsum("mbd,mdr->mbr", g, curvature[1])


def _arnoldi_apply(config, args, v):
    tol = config
    _, _, curvature, damping, _ = args
    return _arnoldi_project(curvature, v) * _arnoldi_weights(curvature, damping, tol)[:, None]


def _factored_grads_times(layers, fn, params, aux, chunk, blocks) -> jax.Array:
    """``(size, k)``: as :func:`jattri.methods._common.chunk_grads_times`, from each
    linear layer's input ã (with a 1 for the bias) and output gradient s instead of the
    formed gradient: ⟨ã ⊗ s, V_r⟩ = ãᵀ V_r s, as one product ã · [V_1 … V_k] of the
    chunk's inputs with the layer's block of the matrix, then a contraction with s.
    Layers at one position only (``layers`` from :func:`_arnoldi_layers`). The same
    multiply-adds as forming the gradients, as one compute-bound product instead of a
    memory-bound pass over (size, d) gradients (dattri's 109,386-parameter MLP, 5,000
    examples, k = 50: the compiled ``cache`` 4.6 s → 3.1-3.3 s,
    ``benchmarks/RESULTS.md``)."""
    by_key = dict(zip((k for k, _ in leaf_keys(params)), blocks))
    factors = _chunk_factors(layers, fn, params, aux, chunk)  # s is zero on padding
    out = 0.0
    for layer, (a, s) in zip(layers, factors):
        kernel = by_key[layer.kernel_key]  # (d_in·d_out, k)
        k = kernel.shape[-1]
        s = s[:, 0].astype(kernel.dtype)
        t = a[:, 0, :layer.d_in].astype(kernel.dtype) @ kernel.reshape(layer.d_in, -1)
        out = out + jnp.einsum("bqk,bq->bk", t.reshape(-1, layer.d_out, k), s)
        if layer.use_bias:  # the bias gradient is s itself
            out = out + s @ by_key[layer.bias_key]
    return out


def _arnoldi_coords(config, args, chunk):
    layers = config
    loss, members, blocks = args  # blocks: eigvecs (M, d, r) split by leaf
    times = (_common.chunk_grads_times if layers is None
             else partial(_factored_grads_times, layers))
    c = _common.member_map(lambda p, a, b: times(loss, p, a, chunk, b), members, blocks)
    return jnp.swapaxes(c, 0, 1)  # (size, M, r)


def _arnoldi_test_coords(config, args, chunk):
    """``(M, size, r)``: the test chunk's coordinates Vᵀg_t from the layers
    (:func:`_factored_grads_times`), times the inverse weights (``_arnoldi_apply``'s
    result without forming g_t)."""
    layers, tol = config
    target, members, curvature, damping = args
    blocks = _common.row_blocks(_common.row_spec(members.params), curvature[1], axis=1)
    c = _common.member_map(lambda p, a, b: _factored_grads_times(layers, target, p, a,
                                                                 chunk, b), members, blocks)
    return c * _arnoldi_weights(curvature, damping, tol)[:, None]


#: n·d (training examples × parameters) from which Arnoldi's training coordinates are
#: taken factored: below it the formed gradients' pass costs less than the check that
#: the factors rebuild the gradient (a compilation on the first call: 0.09-0.14 s on
#: dattri's LR, 0.28-0.55 s on its MLP).
_FACTORED_COORDS_MIN = 2 ** 27


def _arnoldi_layers(task, members, train, memo, one=None) -> Optional[tuple]:
    """The linear layers from which the training coordinates Vᵀg_i are taken factored
    (:func:`_factored_grads_times`): the one layer of a one-layer plan ``one``
    (:func:`_arnoldi_one_layer`, whose check already shows g = ã ⊗ s), else where
    n·d ≥ ``_FACTORED_COORDS_MIN`` (134M floats of formed gradients, e.g. 5,000
    examples of a 27,000-parameter model: below it the formed gradients' pass costs less
    than a check of its own), every parameter in a layer at one position, the gradient
    rebuilt from them equal to ``jax.grad`` on the first example (``rebuilt_layers``;
    concrete members and data only), else ``None``. At T > 1 positions the factored
    product costs T times the formed gradient's."""
    if one is not None:
        return (one[0],)
    n = engine.num_examples(train)
    if n is None or n * _common.num_params(members) < _FACTORED_COORDS_MIN:
        return None
    layers = rebuilt_layers(task.loss, members, train, fn_name="loss_fn",
                            method="influence_arnoldi", memo=memo)
    if layers is None or any(l.positions > 1 for l in layers):
        return None
    return layers


def _arnoldi_plan(task, members, train, memo, one=None) -> Optional[tuple]:
    """:func:`_arnoldi_layers`, recorded in ``memo`` by the members' and one example's
    shapes, where :func:`_arnoldi_test_plan` finds it."""
    layers = _arnoldi_layers(task, members, train, memo, one)
    memo[_plan_key("loss_fn", "arnoldi", members, train)] = layers
    return layers


def _arnoldi_test_plan(task, members, test, memo, tol) -> Optional[tuple]:
    """``_Spec.test_side`` of Arnoldi: the test side from the layers where the last fit
    of these shapes took the training side from them and the target is the loss (no
    check of its own, so nothing more to compile), else ``None``."""
    if not task.target_is_loss or engine.is_stream(test):
        return None
    layers = memo.get(_plan_key("loss_fn", "arnoldi", members, test))
    return None if layers is None else (_arnoldi_test_coords, (layers, float(tol)))


def _arnoldi_one_layer(task, members, train, curvature, memo):
    """The ``(layer, order)`` (:func:`_one_layer`) where Arnoldi's Hessian-vector
    products may be taken in the single layer's output space (:func:`_layer_product`),
    else ``None``: the Hessian, one member axis on one device, the layer at one
    position, its inputs and output Hessians over the training set within the chunk
    budget, and the loss reading the parameters only through the layer
    (:func:`_reads_only_through` on one example; concrete members and data only).
    Decided once per shape and recorded in ``memo``.

    The one-example check is a program of its own, compiled unoptimised, read before
    the fit is dispatched: the fit then runs while the caller goes on (``attribute``
    traces and compiles its programs meanwhile). Inside the fit program, as before, its
    answer could only be read once the whole fit had run: Arnoldi's first call on
    dattri's LR, 5,000 examples, took 2.22-2.39 s instead of 2.66-2.98 s (medians of 6
    and 8 alternated processes, ``benchmarks/RESULTS.md``)."""
    if (curvature != "hessian" or engine.is_stream(train)
            or engine.layout_of(train) is not None):
        return None
    key = _plan_key("loss_fn", "arnoldi-one-layer", members, train)
    if key in memo:
        return memo[key]
    if not _concrete(members, train):
        return None
    one = _one_layer(task, members, train, check=False)
    if one is not None:
        layer, order = one
        i, o = layer.d_in + int(layer.use_bias), layer.d_out
        held = engine.num_examples(train) * (2 * i + o * o) * jnp.dtype(
            _common.param_dtype(members)).itemsize
        if (layer.positions != 1 or held > engine.DEFAULT_CHUNK_BYTES or not bool(
                _only_through(layer, task.loss, members.params, members.aux, train,
                              order))):
            one = None
    memo[key] = one
    return one


def _product_width(o: int) -> int:
    """The width a one-layer Hessian product's thin (n × d_in) · (d_in × o) matrix
    products are taken at: o rounded up to a multiple of 8 between 4 and 16, where XLA's
    CPU products of 5,000 × 785 rows ran faster on the wider, zero-padded matrix (50
    products each way at o = 10: 0.087-0.135 s padded to 16 against 0.117-0.174 s; at
    o = 6 and 7: 0.077-0.106 s at 8 against 0.100-0.130 s; at 20 padding to 24 was no
    faster, at 33 to 40 faster in two runs of four; ``benchmarks/kernel_shapes.py``).
    dattri's LR: Arnoldi's compiled fit 0.29-0.35 s against 0.34-0.39 s."""
    return -(-o // 8) * 8 if 4 < o < 16 else o


def _layer_operands(layer, loss, params, aux, train) -> tuple:
    """``(X (n, d_in), Ãᵀ (d_in + b, n), output Hessians (n, o, o))`` of
    :func:`_layer_product`, made once per fit: the layer's inputs as they are, and
    their transpose with the bias's constant row appended, Ã = [X, 1] (Ãᵀ as an array
    of its own: with ``a.T`` inside the product the compiled fit on dattri's LR took
    0.42-0.45 s instead of 0.24-0.26 s). The forward product reads X itself, not a
    padded copy: with Ã used on both sides XLA padded the inputs twice per fit and
    transposed them through a third copy, 28 ms of a 0.26 s call on dattri's LR."""
    n = engine.num_examples(train)
    chunk = engine.Chunk(train, jnp.arange(n, dtype=jnp.int32), jnp.ones((n,), bool))
    x, h = fisher._chunk_io(loss, params, aux, chunk, (layer,), "ggn",
                            bias_column=False)[layer.name]
    x, h = x[:, 0], h[:, 0, :, 0, :]  # (n, d_in), (n, o, o)
    return x, jnp.transpose(fisher.augment(x, layer.use_bias)), h


def _layer_product(operands, order) -> Callable:
    """``v (d,) -> H v`` for a model that is one linear layer at one position
    (:func:`_arnoldi_one_layer`): H = (1/n) Σ_i ã_iã_iᵀ ⊗ ∂²loss_i/∂y², so
    H v = vec((1/n) Ãᵀ Z) with z_i = ∂²loss_i/∂y² (ã_iᵀ V), V = v in the layer's block
    order. The inputs X ``(n, d_in)``, Ãᵀ ``(d_in + b, n)`` and the output Hessians
    ``(n, d_out, d_out)`` are the ``operands`` (:func:`_layer_operands`); a product is
    two thin matrix products and n small ones. dattri's LR, 5,000 examples: 100
    products through ``jax.linearize`` of the mean gradient took 0.38-0.44 s; the
    compiled fit went from 0.58-0.62 s to 0.30-0.34 s with these
    (``benchmarks/RESULTS.md``)."""
    a, at, h = operands
    n, i, o = a.shape[0], at.shape[0], h.shape[1]
    inverse = jnp.argsort(order)  # block coordinate -> raveled coordinate
    wide = _product_width(o)

    def product(v):
        w = jnp.pad(v[inverse].reshape(i, o).astype(a.dtype), ((0, 0), (0, wide - o)))
        return ((_output_space_product(a, at, h, w)[:, :o]).reshape(-1) / n)[
            order].astype(v.dtype)

    return product


def _output_space_product(x: jax.Array, at: jax.Array, h: jax.Array,
                          w: jax.Array) -> jax.Array:
    """``(i, wide)`` Ãᵀ Z with z_b = H_b (Ã W)_b, Ã = [X, 1] where the layer has a bias
    (i = d_in + 1; W's last row is the bias's, added to X W) and X otherwise: ``x`` X
    ``(n, d_in)``, ``at`` Ãᵀ ``(i, n)`` (an array of its own), ``h`` ``(n, o, o)``,
    ``w`` ``(i, wide)``: the layer's o columns zero-padded to :func:`_product_width`;
    the columns past o of the result are 0. The n small products H_b y_b are one
    elementwise product and sum: XLA's batched (n, o, o) · (n, o) product and its pad
    took 0.148 ms a call against 0.096-0.115 ms on dattri's LR."""
    o, wide, d_in = h.shape[1], w.shape[1], x.shape[1]
    y = x @ w[:d_in]
    if w.shape[0] > d_in:  # the bias's row
        y = y + w[d_in]
    z = jnp.sum(h * y[:, None, :o], axis=-1)
    return at @ jnp.pad(z, ((0, 0), (0, wide - o)))


def _arnoldi_fit(config, args):
    """The fit: one program, dispatched and left running while the caller goes on.
    Under :func:`jattri.progress` it is a stage of its own, ``"arnoldi fit"``,
    counting Krylov steps (``num_iters`` per member), driven from the host in segments
    of steps (:func:`_arnoldi_driven`), each a call of a program without callbacks
    (cached like any other); the coordinates' pass over the training set follows the
    last step inside the stage, read to its end before the stage closes."""
    _, iters, _, _, _ = config
    members, train = args[2], args[3]
    layout = engine.layout_of(train)
    with engine.solve_stage("arnoldi fit", iters * members.num, members, train,
                            unit="Krylov steps") as stage:
        if stage is None:
            return _arnoldi_fit_jit(config, args, layout)
        return jax.block_until_ready(_arnoldi_driven(config, args, layout, stage))


@partial(jit, static_argnums=(0, 2))
def _arnoldi_fit_jit(config, args, layout):
    return engine.traced_with_layout(layout, args[3], lambda: _arnoldi_fits(config, args))


def _arnoldi_operands(config, args, p, a):
    """What member ``(p, a)``'s curvature-vector product needs besides the vector, made
    once per fit: the layer's inputs, their transpose and its output Hessians (a
    one-layer plan, :func:`_layer_operands`); else the mean gradient linearized at θ
    (:func:`_linearized_cvp`, a ``jax.tree_util.Partial`` holding its residuals), or
    ``None`` where each product is recomputed from the data."""
    size, layer = config[2], config[4]
    fns, loss, _, train, _, _ = args
    if layer is not None:
        return _layer_operands(layer, loss, p, a, train)
    return _linearized_cvp(fns, p, a, train, size)


def _arnoldi_product(config, args, p, a, operands) -> Callable:
    """``v (d,) -> C v`` of member ``(p, a)`` from its :func:`_arnoldi_operands`."""
    size, layer = config[2], config[4]
    fns, _, _, train, _, order = args
    if layer is not None:
        return _layer_product(operands, order)
    return operands or (lambda x: _mean_cvp(fns, p, a, train, x[None], size)[0])


def _arnoldi_fits(config, args):
    """``((eigvals (M, r), eigvecs (M, d, r)), coords (n, M, r))`` of every member;
    with a one-layer plan ``layer`` (:func:`_arnoldi_one_layer`), its products from
    the layer's inputs and output Hessians."""
    rank, iters = config[0], config[1]
    members, key = args[2], args[4]
    # member m's start key derive_key(key, m), hashed inside this program (threefry's
    # fold_in would be one more call site to compile)
    keys = jax.vmap(lambda m: derive_key(key, m))(jnp.arange(members.num))
    d, dtype = _common.num_params(members), _common.param_dtype(members)

    def one(p, a, k):
        product = _arnoldi_product(config, args, p, a, _arnoldi_operands(config, args, p, a))
        return arnoldi_eigenpairs(product, d, rank=rank, num_iters=iters, key=k, dtype=dtype)

    return _arnoldi_coords_of(config, args, *_common.member_map(one, members, keys))


def _arnoldi_coords_of(config, args, eigvals, eigvecs):
    """``((eigvals, eigvecs), coords (n, M, r))``: the training coordinates Vᵀg_i."""
    size, layers = config[2], config[3]
    loss, members, train = args[1], args[2], args[3]
    blocks = _common.row_blocks(_common.row_spec(members.params), eigvecs, axis=1)
    coords = engine.per_example(_arnoldi_coords, layers, (loss, members, blocks), train,
                                 size)
    return (eigvals, eigvecs), coords


# Arnoldi's fit inside ``progress``: each member's run driven from the host in
# segments of Krylov steps (``_report_every``), each one call of a program without
# callbacks (a ``jax.debug.callback`` per step was compiled again in every process).
# The product's operands are made once per member (``_arnoldi_begin_jit``) and passed
# to every segment; the steps are ``arnoldi_steps``, the quiet run's.

@partial(jit, static_argnames=("config", "layout"))
def _arnoldi_begin_jit(config, args, m, layout):
    """Member ``m``'s product operands and its run's start state."""
    iters = config[1]
    members, key = args[2], args[4]

    def run():
        p, a = member(members, m)
        return (_arnoldi_operands(config, args, p, a),
                arnoldi_start(_common.num_params(members), iters, derive_key(key, m),
                              _common.param_dtype(members)))

    return engine.traced_with_layout(layout, args[3], run)


@partial(jit, static_argnames=("config", "count", "layout"), donate_argnames=("carry",))
def _arnoldi_segment_jit(config, args, operands, carry, m, j0, count, layout):
    """Member ``m``'s run after its steps ``j0 ... j0 + count``, and a one-entry token."""
    members, key = args[2], args[4]

    def run():
        p, a = member(members, m)
        return arnoldi_steps(_arnoldi_product(config, args, p, a, operands), carry,
                             j0 + jnp.arange(count, dtype=jnp.int32), derive_key(key, m))

    carry = engine.traced_with_layout(layout, args[3], run)
    return carry, engine.token(carry)


_arnoldi_top_jit = jit(arnoldi_top, static_argnums=1)


@partial(jit, static_argnames=("config", "layout"))
def _arnoldi_end_jit(config, args, tops, layout):
    """The members' eigenpairs (one ``arnoldi_top`` each, taken as its run ends: one
    member's basis held at a time, as in the quiet program) -> :func:`_arnoldi_fits`'
    result."""
    eigvals, eigvecs = (jnp.stack([t[i] for t in tops]) for i in (0, 1))
    return engine.traced_with_layout(
        layout, args[3], lambda: _arnoldi_coords_of(config, args, eigvals, eigvecs))


def _arnoldi_driven(config, args, layout, stage):
    """:func:`_arnoldi_fits`' result, each member's run in segments of steps driven
    from the host, each segment reported to ``stage`` as it is done."""
    iters = config[1]
    every = _report_every(iters)
    state, finished = {}, []

    def segment(m, j0):
        if j0 == 0:
            state["operands"], state["carry"] = _arnoldi_begin_jit(config, args, np.int32(m),
                                                                   layout=layout)
        count = min(every, iters - j0)
        state["carry"], token = _arnoldi_segment_jit(
            config, args, state["operands"], state["carry"], np.int32(m), np.int32(j0),
            count=count, layout=layout)
        if j0 + count >= iters:
            finished.append(_arnoldi_top_jit(state.pop("carry"), config[0]))
            state.clear()
        return token

    engine.reported_calls(stage, ((partial(segment, m, j0), m * iters + min(iters, j0 + every))
                                  for m in range(args[2].num)
                                  for j0 in range(0, iters, every)))
    return _arnoldi_end_jit(config, args, tuple(finished), layout=layout)


def influence_arnoldi(task: Any, *, rank: int = 100, num_iters: Optional[int] = None,
                      damping: Optional[float] = None, tol: float = 1e-6,
                      key: Optional[jax.Array] = None, curvature: str = "hessian",
                      chunk_size: Optional[int] = None,
                      relatif: Optional[str] = None) -> Attributor:
    """Influence on the top eigenspace of C (Schioppa et al., 2022, "Scaling Up
    Influence Functions"): score(i, t) = (Vᵀg_i)ᵀ diag(1/(μ + λ)) (Vᵀg_t), C the
    Hessian of the mean training loss (``curvature="hessian"``) or its Gauss-Newton
    matrix (``"ggn"``: products J ᵀ ∇²ℓ J v by ``jvp``/``vjp``, positive
    semi-definite, so no eigenvalue is dropped for being negative; Schraudolph, 2002;
    Martens, 2020; it needs the Task's ``output_fn`` / ``output_loss_fn`` split).

    ``cache`` runs Arnoldi (full reorthogonalisation) on products with C of the mean
    training loss (summed over chunks), keeps the top-``rank`` eigenpairs (μ, V) and the
    ``rank``-dim coordinates Vᵀg_i of the training gradients (taken from each linear
    layer's inputs and output gradients, no gradient formed, where every parameter is
    in a Dense layer at one position and the training set is large: n·d ≥ 2²⁷;
    ``_arnoldi_layers``; ``attribute`` takes the test side's the same way when the
    target is the loss); ``attribute`` scores from those coordinates (no training
    pass). Damped eigenvalues μ + λ ≤
    ``tol``·max(μ + λ), and non-positive ones, are dropped (weight 0), so no score is
    ever NaN. A ``rank`` above the parameter count is clipped with a warning (at
    ``cache``). The training set must be in memory.

    Args:
      task: a Task or a loss. rank: eigenpairs kept. num_iters: Krylov steps (default
        ``min(d, max(2·rank, rank + 20))``). damping: λ ≥ 0 (overridable at
        ``attribute``), or ``None`` (default): the L2 coefficient under which the
        members are stationary points of their training objective,
        λ̂ = −⟨∇L̄(θ), θ⟩/‖θ‖² (:func:`stationary_damping`, one gradient pass at
        ``cache``; 1e-3 where λ̂ ≤ 0): the Hessian of a model trained on mean loss +
        (λ/2)‖θ‖² is H + λI, so this is the damping that makes influence Koh &
        Liang's; recorded in ``state.damping`` (as ``influence_explicit``). tol: relative cut-off. key: start-vector key (default
        ``PRNGKey(0)``; member m uses ``fold_in(key, m)``). curvature: ``"hessian"``
        (default) or ``"ggn"``. chunk_size: examples per chunk. relatif: ``None``,
        ``"l"``, ``"theta"``.

    Memory: state M·rank·(d + 1) + n·M·rank floats; the fit holds num_iters·d floats
    (the Krylov basis) per member, and, with ``curvature="hessian"``, the forward and
    backward passes' residuals over the whole training set when they fit the chunk
    budget (``jattri.engine.DEFAULT_CHUNK_BYTES``), so that each of the num_iters
    products reruns only the tangent passes; else every product is recomputed chunk by
    chunk.
    """
    _check_damping(damping, none=True)
    rank = _checks.integer(rank, "rank")
    num_iters = _checks.integer(num_iters, "num_iters", none=True)
    tol = _checks.real(tol, "tol", low=0, high=1, open_high=True)
    key = _common.default_key() if key is None else _checks.prng_key(key)
    _checks.choice(curvature, "curvature", CURVATURES)
    task = as_task(task)
    _check_curvature(curvature, task)

    memo = {}  # the factored coordinates' check and plan, made once per shape

    def fit(task, members, train, size):
        r, iters = arnoldi_sizes(rank, num_iters, _common.num_params(members),
                                 who="influence_arnoldi", stacklevel=4)

        def run(one):
            layers = _arnoldi_plan(task, members, train, memo, one)
            layer, order = (None, None) if one is None else one
            return _arnoldi_fit((r, iters, size(), layers, layer),
                                (_curvature_fns(task, curvature), task.loss, members, train,
                                 key, order))

        return run(_arnoldi_one_layer(task, members, train, curvature, memo))

    spec = _Spec("influence_arnoldi", damping, fit, _arnoldi_apply,
                 lambda members, size: float(tol), project=_arnoldi_project,
                 diagonal=partial(_arnoldi_weights, tol=float(tol)),
                 in_memory=True, ggn=curvature == "ggn",
                 test_side=partial(_arnoldi_test_plan, memo=memo, tol=tol),
                 hyper=(("rank", rank), ("num_iters", num_iters), ("tol", tol), ("key", key))
                 + _curvature_hyper(task, curvature))
    return _influence(task, spec, relatif=relatif, chunk_size=chunk_size)


# ------------------------------------------------------------------------ EK-FAC

def _ekfac_covariance_step(config, args, acc, chunk):
    layers, curvature, _ = config
    loss, members = args
    new = _common.member_map(
        lambda p, a: fisher.ekfac_covariance_sums(loss, p, a, chunk, layers, curvature),
        members)
    return _add(acc, new), None


def _ekfac_eigenvalue_step(config, args, acc, chunk):
    layers, curvature, _ = config
    loss, members, qa, qs = args
    new = _common.member_map(
        lambda p, a, qa_j, qs_j: fisher.ekfac_eigenvalue_sums(loss, p, a, chunk, layers,
                                                              qa_j, qs_j, curvature),
        members, qa, qs)
    return _add(acc, new), None


# stages 2 and 3 of the fit as one program each (eagerly, every division and eigh was a
# compilation of its own on first use: seven on the LR, 0.4 s)
_ekfac_eigenbasis = jit(fisher.ekfac_eigenbasis, once=True, closed=True)
_ekfac_finish = jit(fisher.ekfac_finish, static_argnames=("curvature",), once=True,
                    closed=True)


_ZERO_COVARIANCES: dict = {}


def _zero_covariances(layers, params, dtype):
    """The shapes of ``fisher.ekfac_zero_covariances``, traced once per layers,
    parameter shapes and dtype (a compiled call traces nothing)."""
    key = (layers, _checks.signature(params), str(dtype))
    if key not in _ZERO_COVARIANCES:
        _ZERO_COVARIANCES[key] = jax.eval_shape(
            lambda: fisher.ekfac_zero_covariances(layers, params, dtype))
    return _ZERO_COVARIANCES[key]


def _fit_ekfac(config, loss, members: Members, train, size) -> fisher.EKFACFactors:
    """The EK-FAC / K-FAC factors of every member (leading axis M), in the stages of
    ``jattri.func.ekfac_factors``: (1) covariance sums A, S (and the diagonal Fisher of
    other parameters) over the training chunks, (2) their eigendecompositions, (3) for
    EK-FAC the eigenvalue correction, a second pass. Each pass reads the data once for
    all members; a Stream is read chunk by chunk."""
    layers, curvature, correct = config
    m = members.num
    stacked = lambda tree: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((m,) + tuple(x.shape), x.dtype), tree)
    zero = stacked(_zero_covariances(layers, _common.row_spec(members.params),
                                     _common.param_dtype(members)))
    cov, _, n = engine.scan(_ekfac_covariance_step, config, (loss, members), zero, train, size,
                            sums=True)
    qa, qs, la, ls = _ekfac_eigenbasis(cov, n)
    sums = None
    if correct:
        zero = {k: jax.ShapeDtypeStruct(q.shape[:-1] + (qs[k].shape[-1],), q.dtype)
                for k, q in qa.items()}
        sums, _, _ = engine.scan(_ekfac_eigenvalue_step, config, (loss, members, qa, qs), zero,
                                 train, size, sums=True)
    return _ekfac_finish(qa, qs, la, ls, sums, cov.diag, n, curvature=curvature)


def _ekfac_apply(config, args, v):
    _, members, factors, damping, _ = args

    def one(p, a, f, vj):
        unravel = unravel_fn(p)
        # ``config`` test vectors at a time: the rotated temporaries of all n_test at
        # once were 6 GiB on a 10.7M-parameter model (benchmarks/RESULTS.md, "Scale").
        return jax.lax.map(
            lambda x: ravel_pytree(fisher.ekfac_ihvp(f, unravel(x), damping))[0], vj,
            batch_size=config)

    return _common.member_map(one, members, factors, v)


class _EKFACCoordinates(NamedTuple):
    """``fisher.ekfac_coordinates`` through ``layers``: hashable by value, so every
    factory with the same layers shares the compiled programs of its plan."""
    layers: tuple

    def __call__(self, fn, params, aux, chunk, factors):
        return fisher.ekfac_coordinates(fn, params, aux, chunk, self.layers, factors)

    def scores(self, fn, params, aux, chunk, factors, u):
        """``self(...) @ u.T`` without forming the coordinates where that saves memory
        traffic (``fisher.ekfac_scores``)."""
        return fisher.ekfac_scores(fn, params, aux, chunk, self.layers, factors, u)


class _EKFACWeights(NamedTuple):
    layers: tuple

    def __call__(self, factors, damping):
        return fisher.ekfac_inverse_weights(factors, self.layers, damping)


def _ekfac_basis(task, members, train, test, memo):
    """EK-FAC's eigenbasis plan (``_Spec.basis``): both sides' gradients as coordinates
    Q_Aᵀ G Q_S made from the layers' inputs and output gradients, the inverse a
    diagonal between them, so no test vector is rotated back. Taken where exact (every
    parameter in a factored layer, the gradient rebuilt from the layers equal to
    ``jax.grad`` on the first example of each side: ``rebuilt_layers``) and cheaper in
    multiply-adds than forming the gradients and rotating the test side there and back
    (``fisher.ekfac_rotation_floats``); else ``None``. On dattri's MLP (109,386
    parameters, 5,000 × 500) the compiled ``cache`` + ``attribute`` goes from 5.2 s to
    4.2 s, of which 3.2 s is the (5,000 × d) · (d × 500) product that both routes share;
    scored without forming the training coordinates (``fisher.ekfac_scores``), 3.7 s
    on a faster box where the formed coordinates took 4.3-4.5 s
    (``benchmarks/RESULTS.md``)."""
    n, m = engine.num_examples(train), engine.num_examples(test)
    if n is None or m is None:  # a Stream: coordinates cost more per example than the
        return None             # formed gradients, so only the test side's count can pay
    left = _ekfac_train_layers(task, members, train, memo)
    if left is None:
        return None
    right = left
    if not task.target_is_loss:
        right = rebuilt_layers(task.target, members, test, fn_name="target_fn",
                               method="influence_ekfac", memo=memo)
        if not same_layers(right, left):
            return None
    coords, dense, back = fisher.ekfac_rotation_floats(left)
    if (n + m) * coords > (n + m) * dense + m * back:
        return None
    return _EKFACCoordinates(left), _EKFACCoordinates(right), _EKFACWeights(left)


def _ekfac_train_layers(task, members, train, memo) -> Optional[tuple]:
    """The training side of :func:`_ekfac_basis`: ``rebuilt_layers`` of the loss on
    its first example, recorded in ``memo``; ``None`` on a Stream (no eigenbasis plan
    there, nothing checked). Also ``_Spec.basis_check``: made in ``cache`` before the
    fit is dispatched. Read in ``attribute``, after the fit, the check's answer could
    come only once the whole fit had run, and nothing was traced or compiled meanwhile.
    On dattri's LR (5,000 × 500) first calls moved within this machine's noise: cold
    1.61-2.06 s against 1.84-2.02 s, warm 0.87-1.03 s against 0.92-1.05 s
    (``benchmarks/RESULTS.md``)."""
    if engine.num_examples(train) is None:
        return None
    return rebuilt_layers(task.loss, members, train, fn_name="loss_fn",
                          method="influence_ekfac", memo=memo)


_EKFAC_RELATIVE_DAMPING = 0.1


@partial(jit, once=True)
def _ekfac_damping(factors: fisher.EKFACFactors) -> jax.Array:
    """0.1 × the mean eigenvalue of the EK-FAC / K-FAC curvature, averaged over members:
    (Σ_layers Σ Λ* + Σ diag) / d, the diagonal Fisher counting only the parameters
    outside the factored layers (it is zero on theirs)."""
    diag = jax.tree_util.tree_leaves(factors.diag)
    d = sum(x[0].size for x in diag)
    trace = sum(jnp.sum(x.reshape(x.shape[0], -1), -1) for x in diag)
    trace = trace + sum(jnp.sum(f.eigvals.reshape(f.eigvals.shape[0], -1), -1)
                        for f in factors.layers.values())
    return _EKFAC_RELATIVE_DAMPING * jnp.mean(trace / d)


def influence_ekfac(task: Any, *, damping: Optional[float] = None,
                    correct_eigenvalues: bool = True,
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
    is not seen: fold it into ``damping``.

    Stages: ``cache`` fits the factors of every member once, over the whole training
    set (a ``jattri.Stream`` works: two passes over its chunks for EK-FAC, one for
    K-FAC) and keeps them; ``attribute`` applies
    Q_A [(Q_Aᵀ V Q_S) ⊘ (Λ* + λ)] Q_Sᵀ to the test gradients, with λ the factory's
    ``damping`` or ``attribute(..., damping=...)``: a new damping never refits. Where
    every parameter is in a Dense/Conv layer that the loss (and the target) reads it
    through, and it costs fewer multiply-adds, ``attribute`` works in the eigenbasis
    instead: both sides' gradients as Q_Aᵀ G Q_S, made from each layer's inputs and
    output gradients, and (Λ* + λ)⁻¹ as a diagonal between them (the same scores; no
    test vector rotated back; without ``relatif``).

    Args:
      task: a Task or a loss. Its linear layers are found by ``jattri.func.layers``:
        Flax linen ``nn.Dense`` / ``nn.Conv`` through ``model.apply({"params": params},
        x)``, or Flax NNX ``nnx.Linear`` / ``nnx.Conv`` of ``nnx.merge(graphdef,
        params)(x)`` inside the loss (params: the ``nnx.State`` from
        ``nnx.split(model)`` or ``nnx.to_pure_dict(state)``), both unchanged; in a
        plain-JAX model, write each linear layer as ``jattri.func.dense(x,
        params["fc1"]["w"], params["fc1"]["b"])`` instead of ``x @ w + b``. damping: λ ≥ 0 (directions with
        zero curvature and λ = 0 get weight 0), or ``None`` (default): 0.1 × the mean
        eigenvalue of the fitted EK-FAC / K-FAC curvature, (Σ Λ* + Σ diag)/d, averaged
        over members and recorded in ``state.damping`` (the rule of Grosse et al.,
        2023, and Kronfluence, which applies it per layer; jattri applies one λ to all
        layers). Why relative: the curvature's scale is set by the loss and the data
        (on the embedded digits settings the empirical Fisher's mean eigenvalue is
        4e-3 on the LR and 3-8e-6 on the MLP), so no absolute constant suits both: the
        former default, an absolute 1e-3, is 300× the MLP's mean eigenvalue. No ground-truth-free way to choose the
        factor is known (``benchmarks/RESULTS.md``, "Damping grids"). correct_eigenvalues: EK-FAC (True) or
        K-FAC. curvature: ``"empirical"`` (empirical Fisher) or ``"ggn"``
        (Gauss-Newton). chunk_size: examples per chunk. relatif: ``None``, ``"l"``,
        ``"theta"``.

    Memory: state M·[Σ_l ((d_in,l + b)² + d_out,l² + (d_in,l + b)·d_out,l) + d] floats
    (the eigenbases, the corrected eigenvalues and the diagonal Fisher); the fit holds
    one chunk's layer inputs and output gradients per member.
    """
    _check_damping(damping, none=True)
    _checks.flag(correct_eigenvalues, "correct_eigenvalues")
    _checks.choice(curvature, "curvature", fisher.CURVATURES)

    def fit(task, members, train, size):
        layers = fisher.ekfac_layers(task.loss, _common.row_spec(members.params),
                                     _common.example_spec(train),
                                     jax.ShapeDtypeStruct((), jnp.int32),
                                     _common.row_spec(members.aux))
        return _fit_ekfac((layers, curvature, bool(correct_eigenvalues)), task.loss, members,
                          train, size()), None

    spec = _Spec("influence_ekfac", damping, fit, _ekfac_apply, lambda members, size: size,
                 hyper=(("correct_eigenvalues", correct_eigenvalues), ("curvature", curvature)),
                 default_damping=_ekfac_damping, basis=_ekfac_basis,
                 basis_check=_ekfac_train_layers)
    return _influence(task, spec, relatif=relatif, chunk_size=chunk_size)


# ----------------------------------------------------------------------- DataInf

def _param_groups(members: Members) -> tuple:
    """Layers as parameter groups (``fisher.parameter_groups``) as static runs
    ``((start, stop), ...)`` of the flat parameter vector, one tuple per group."""
    out = []
    for idx in fisher.parameter_groups(_common.row_spec(members.params)).values():
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        out.append(tuple((int(r[0]), int(r[-1]) + 1) for r in np.split(idx, cuts)))
    return tuple(out)


def _take(x, runs):
    return jnp.concatenate([x[..., a:b] for a, b in runs], axis=-1)


def _put(parts, groups):
    """Per-group ``(..., d_l)`` arrays back into ``(..., d)`` in parameter order."""
    pieces = []
    for part, runs in zip(parts, groups):
        off = 0
        for a, b in runs:
            pieces.append((a, part[..., off:off + b - a]))
            off += b - a
    return jnp.concatenate([p for _, p in sorted(pieces, key=lambda t: t[0])], axis=-1)


def _datainf_stats_step(groups, args, acc, chunk):
    loss, members = args

    def one(p, a):
        g = _common.chunk_grads(loss, p, a, chunk)
        return jnp.stack([jnp.sum(_take(g, runs) ** 2) for runs in groups])

    return _add(acc, _common.member_map(one, members)), None


def _datainf_step(groups, args, acc, chunk):
    """Σ_j g_jl (g_jlᵀ v_l) / (λ_l + ‖g_jl‖²) over the chunk, per member and layer."""
    loss, members, lam, v = args

    def one(p, a, lam_j, vj):
        g = _common.chunk_grads(loss, p, a, chunk)  # (size, d), zero on padding
        parts = []
        for l, runs in enumerate(groups):
            gl, vl = _take(g, runs), _take(vj, runs)
            coef = (gl @ vl.T) / (lam_j[l] + jnp.sum(gl ** 2, -1))[:, None]  # (size, b)
            parts.append(tmatmul(coef, gl))
        return _put(parts, groups)

    return _add(acc, _common.member_map(one, members, lam, v)), None


def _datainf_lambdas(stats, damping):
    return jnp.maximum(damping * stats, jnp.finfo(stats.dtype).tiny)


def _datainf_apply(config, args, v):
    groups, size = config
    loss, members, stats, damping, train = args
    lam = _datainf_lambdas(stats, damping)  # (M, L)
    corr, _, n = engine.scan(_datainf_step, groups, (loss, members, lam, v), _common.spec_of(v),
                             train, size, sums=True)
    parts = [(_take(v, runs) - _take(corr, runs) / n) / lam[:, l, None, None]
             for l, runs in enumerate(groups)]
    return _put(parts, groups)


@partial(jit, once=True)
def _per_float(sums, count):
    """``sums / count`` in the dtype of ``sums``, compiled (not an eager op)."""
    return (sums / count).astype(sums.dtype)


def influence_datainf(task: Any, *, damping: float = 0.1,
                      chunk_size: Optional[int] = None,
                      relatif: Optional[str] = None) -> Attributor:
    """DataInf (Kwon et al., 2023): per layer l, the inverse of the damped Fisher is
    replaced by the average of rank-one inverses, in closed form:

        score(i, t) = Σ_l g_ilᵀ (1/λ_l)[g_tl − (1/n) Σ_j g_jl (g_jlᵀ g_tl)/(λ_l + ‖g_jl‖²)]

    Layers are parameter groups: leaves with the same parent path (a Dense layer's
    kernel and bias). λ_l = ``damping`` · (1/(n d_l)) Σ_i ‖g_il‖², the paper's
    default, > 0 (the reference's default of 0 divides by zero). ``cache`` keeps the
    per-layer statistics (1/(n d_l)) Σ_i ‖g_il‖² (one pass over the training chunks);
    ``attribute`` applies the operator to the test gradients (one pass, recomputing
    g_j), then scores (another). ``self_attribute`` and RelatIF apply it to every
    training gradient: O(n² d) time, as the closed form costs. A ``jattri.Stream``
    works everywhere.

    Args:
      task: a Task or a loss. damping: relative regularisation > 0 (default 0.1;
        overridable at ``attribute``). chunk_size: examples per chunk.
      relatif: ``None``, ``"l"`` or ``"theta"``.

    Memory: state M·L floats (L layers); ``attribute`` 2·M·n_test·d (the test gradients
    and their correction).
    """
    _check_damping(damping, positive=True)  # λ_l = damping · mean squared gradient

    def fit(task, members, train, size):
        groups = _param_groups(members)
        zero = jax.ShapeDtypeStruct((members.num, len(groups)), _common.param_dtype(members))
        sums, _, n = engine.scan(_datainf_stats_step, groups, (task.loss, members), zero,
                                 train, size(), sums=True)
        dims = np.array([sum(b - a for a, b in runs) for runs in groups], np.float64)
        return _per_float(sums, n * dims), None

    spec = _Spec("influence_datainf", damping, fit, _datainf_apply,
                 lambda members, size: (_param_groups(members), size), reads_train=True,
                 positive=True)
    return _influence(task, spec, relatif=relatif, chunk_size=chunk_size)


__all__ = ["InfluenceState", "stationary_damping", "influence_arnoldi", "influence_cg", "influence_datainf",
           "influence_ekfac", "influence_explicit", "influence_lissa"]
