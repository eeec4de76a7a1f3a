"""TRAK (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale").

For members m (checkpoints) with projected margin gradients Φ_m (train, ``(n, k)``)
and φ_t,m (test):

    score(i, t) = [mean_m Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_t,mᵀ]_i · mean_m Q_m,i

with margin f = log p − log(1 − p) and Q = 1 − p, where p = exp(−loss) is the
probability of the correct label for a cross-entropy loss (or ``prob_fn``). The train
side uses ``loss_fn``, the test side ``target_fn``. λ_m = ``damping`` × mean diagonal
of Φ_mᵀΦ_m (relative). The default damping follows from the training objective:

    damping_m = n · λ̂ · d / (r̄_m · tr(Φ_mᵀΦ_m)),   r̄_m = mean_i p_i(1 − p_i),

with λ̂ the members' stationary L2 (``jattri.stationary_damping``). Why: TRAK's kernel
stands in for the Gauss-Newton matrix of the objective the model minimised, Σ_i
p_i(1 − p_i) ∇f_i ∇f_iᵀ + nλ̂I (sum of the margin loss's curvature p(1 − p) and the
L2 term), projected: Pᵀ(·)P with PᵀP ≈ (d/k) I. TRAK replaces the weights p_i(1 − p_i)
by one constant (Park et al., 2023, the R of their one-step Newton estimate); taking
it as their mean r̄ gives r̄ (ΦᵀΦ + nλ̂d/(r̄k) I), i.e. the damping above.

Stages: ``cache`` streams the training set once, keeping Φ (``(n, M, k)``), the
kernels Φ_mᵀΦ_m and Q; ``attribute`` projects the test gradients, solves the
``k × k`` systems and scores training rows tile by tile (dense or top-k).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri import _checks, engine
from jattri._jit import jit
from jattri._products import tmatmul
from jattri.func.grads import as_partial
from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args,
                                     check_projection_dtype, random_projection)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.methods.influence import _stationary, _stationary_damping
from jattri.methods.logra import kronecker_factors, kronecker_phi
from jattri.methods.tracin import kronecker_plan, kronecker_width
from jattri.task import Members, as_task

PyTree = Any


class TrakState(NamedTuple):
    """members: the Members scored. train: the in-memory training set (a reference) or
    ``None`` if streamed. phi: ``(n, M, k)`` projected train margin gradients.
    kernel: ``(M, k, k)`` Φ_mᵀΦ_m. q: ``(n,)`` mean_m (1 − p). made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``). damping:
    ``(M,)`` the relative damping of the default rule (module docstring), used by
    ``attribute`` when neither it nor the factory is given one; ``None`` when the
    factory had a damping.

    Memory: n·M·k + M·k² floats (no ``(n, d)`` array)."""

    members: Members
    train: PyTree
    phi: jax.Array
    kernel: jax.Array
    q: jax.Array
    made: _common.Provenance
    damping: Optional[jax.Array] = None


def margin_from_loss(loss: jax.Array) -> jax.Array:
    """log p − log(1 − p) with p = exp(−loss).

    A loss that rounds to 0 (p = 1 in floating point) has no finite margin; such an
    example gets margin 0 with zero gradient (its Q = 1 − p is 0 too) instead of NaN.
    """
    ok = loss > 1e3 * jnp.finfo(jnp.result_type(loss, jnp.float32)).tiny
    safe = jnp.where(ok, loss, 1.0)
    return jnp.where(ok, -safe - jnp.log(-jnp.expm1(-safe)), 0.0)


def _margin_of_loss(loss, params, z, i, aux):
    return margin_from_loss(loss(params, z, i, aux))


def _margin_of_prob(prob_fn, params, z, i, aux):
    p = prob_fn(params, z)
    return jnp.log(p) - jnp.log1p(-p)


def _q_of_loss(loss, params, z, i, aux):
    return -jnp.expm1(-loss(params, z, i, aux))


def _q_of_prob(prob_fn, params, z, i, aux):
    return 1.0 - prob_fn(params, z)


class _Fns(NamedTuple):
    """The member functions of TRAK (Partials: code static, bound arrays traced)."""

    train_margin: Callable
    test_margin: Callable
    q: Callable


def _fns(task, prob_fn) -> _Fns:
    if prob_fn is None:
        return _Fns(Partial(_margin_of_loss, task.loss), Partial(_margin_of_loss, task.target),
                    Partial(_q_of_loss, task.loss))
    p = as_partial(prob_fn)
    return _Fns(Partial(_margin_of_prob, p), Partial(_margin_of_prob, p), Partial(_q_of_prob, p))


def _projection(config, key):
    kind, d, k, proj_chunk, dtype, _ = config
    if k is None:
        return None
    return random_projection(kind, key, d, k, chunk_size=proj_chunk, dtype=dtype)


def _phi(proj_config, fn, params, aux, key, chunk):
    kron = proj_config[-1]
    if kron is not None:  # (layers, dims); ``key``: this member's Kronecker factors
        return kronecker_phi(kron[0], key, fn, params, aux, chunk)
    return _common.chunk_grads(fn, params, aux, chunk, _projection(proj_config, key))


def _cache_step(config, args, carry, chunk):
    """carry: the kernels ``(M, k, k)``; with ``stats`` ≥ 1 (config's last entry) also
    Σ_i p_i(1 − p_i) ``(M,)``, with ``stats`` = 2 also Σ_i ∇loss_i ``(M, d)``, from
    ∇loss = −(1 − p)∇f (a cross-entropy loss: f = log p − log(1 − p), p = e^−loss)."""
    proj_config, stats = config
    fns, members, keys = args  # keys (M,): member m's projection
    valid = chunk.valid.astype(carry[0].dtype)

    def one(params, aux, key):
        q = jax.vmap(fns.q, (None, 0, 0, None))(params, chunk.data, chunk.index, aux)
        qv = q.astype(valid.dtype) * valid
        r = jnp.sum(qv * (1 - q.astype(valid.dtype)))
        phi = _phi(proj_config, fns.train_margin, params, aux, key, chunk)
        if stats < 2:
            return phi, q, r, None
        if proj_config[2] is None:  # no projection: φ is the raveled gradients themselves
            return phi, q, r, -(qv.astype(phi.dtype) @ phi)
        # projected (the Kronecker kind too): the sum by one backward pass, so that the
        # projection meets the gradients leaf by leaf, never raveled (on dattri's MLP,
        # 5,000 examples, k = 512, the raveled gradients cost the default-damping call
        # about 11%, 4.72 s against 4.19 s: benchmarks/trak_default_damping.py)
        return phi, q, r, -_common.grad_sum(fns.train_margin, params, aux, chunk, qv)

    phi, q, r, gsum = _common.member_map(one, members, keys)  # (M, size, k), (M, size)
    out = (jnp.swapaxes(phi, 0, 1), jnp.mean(q, axis=0))
    kernel = carry[0] + tmatmul(phi, phi)
    if stats == 0:
        return (kernel,), out
    if stats == 1:
        return (kernel, carry[1] + r), out
    return (kernel, carry[1] + r, carry[2] + gsum), out


@partial(jit, once=True, closed=True)
def _default_damping(kernel, r, lam, n, d):
    """``(M,)`` n·λ̂·d / (r̄_m · tr K_m), r̄_m = r_m / n (module docstring); 0.1 where
    it is not a positive finite number (no curvature left: every p is 1)."""
    rel = n * lam * d / ((r / n) * jnp.trace(kernel, axis1=-2, axis2=-1))
    return jnp.where(jnp.isfinite(rel) & (rel > 0), rel, 0.1).astype(kernel.dtype)


def _test_phi(config, args, chunk):
    fns, members, keys = args
    phi = _common.member_map(
        lambda p, a, key: _phi(config, fns.test_margin, p, a, key, chunk), members, keys)
    return jnp.swapaxes(phi, 0, 1)  # (size, M, k)


def _tile(config, args, chunk):
    solved, num = args  # (M, k, n_test)
    phi, q = chunk.data
    return jnp.einsum("bmk,mkt->bt", phi, solved) / num * q[:, None]


def _self_tile(config, inverse, chunk):
    phi, q, right = chunk.data  # right: the test-side φ of the same examples
    return jnp.einsum("bmk,mkl,bml->b", phi, inverse, right) / phi.shape[1] * q


@partial(jit, once=True, closed=True)
def _solve(kernel, damping, phi_t):
    """``(M, k, n_test)`` (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_t,m: one compiled program for any
    damping (eagerly it was ten small compilations on a first call)."""
    return jnp.linalg.solve(damped_kernel(kernel, damping), jnp.transpose(phi_t, (1, 2, 0)))


@partial(jit, once=True, closed=True)
def _inverse(kernel, damping):
    return jnp.linalg.inv(damped_kernel(kernel, damping))


def damped_kernel(kernel: jax.Array, damping) -> jax.Array:
    """Φ_mᵀΦ_m + λ_m I with λ_m = damping · tr(Φ_mᵀΦ_m) / k, for every member."""
    k = kernel.shape[-1]
    lam = damping * jnp.trace(kernel, axis1=-2, axis2=-1) / k
    return kernel + lam[:, None, None] * jnp.eye(k, dtype=kernel.dtype)


def trak(task: Any, *, proj_dim: Optional[int] = 512, damping: Optional[float] = None,
         key: Optional[jax.Array] = None, prob_fn: Optional[Callable] = None,
         projection: str = "auto", chunk_size: Optional[int] = None,
         proj_chunk_size: Optional[int] = DEFAULT_CHUNK,
         shared_projection: bool = False, projection_dtype=None) -> Attributor:
    """TRAK over the members given to ``cache`` (checkpoints / ensemble members).

    Args:
      task: a :class:`jattri.Task` or a ``loss_fn(params, example)``; the loss must be
        a negative log-probability of the correct label (cross-entropy) unless
        ``prob_fn`` is given.
      proj_dim: k, the JL projection dimension; ``None`` uses raw gradients. Member m
        is projected with its own key ``fold_in(key, m)`` (``projection="kronecker"``:
        its own factors, ``jattri.methods.logra.kronecker_factors``), as in the paper and its
        reference code: the members' projection errors are independent and average
        out in the ensemble (with one shared projection, M checkpoints of a convex
        model score like one).
      damping: relative λ ≥ 0 (λ_m = damping × the mean eigenvalue of Φ_mᵀΦ_m); must
        be > 0 when k exceeds n. ``attribute(..., damping=...)`` overrides it without
        re-caching. Default ``None``: the rule of the module docstring, n·λ̂·d /
        (r̄_m · tr Φ_mᵀΦ_m), the damping of the training objective's own L2 carried
        into TRAK's kernel (``state.damping``; on the embedded digits settings 1.8-1.9
        on the LR, 0.7-0.8 on the MLP, where the grids peak at 1-3 and 0.3-3:
        ``benchmarks/RESULTS.md``). It costs no extra pass for a cross-entropy loss
        (∇loss = −(1 − p)∇f in the same pass), one gradient pass with ``prob_fn``. The
        former default, 0.1 × the mean eigenvalue (Kronfluence's rule), stays
        available as ``damping=0.1``.
      key: PRNG key of the projection (default ``PRNGKey(0)``).
      prob_fn: optional ``prob_fn(params, example) -> p`` in (0, 1).
      projection: ``"auto"`` (default: the dense Gaussian while d·k ≤ 2²⁷; above, the
        Kronecker projection where every parameter is in a linear layer, else the
        SJLT; ``jattri.methods.tracin.resolve_kronecker``), ``"gaussian"``,
        ``"rademacher"``, ``"sjlt"`` (sparse, O(d) per example) or ``"kronecker"``
        (each linear layer's margin gradient projected by P_in ⊗ P_out without forming
        it, as LoGra; K ≤ k coordinates split over layers by
        ``jattri.methods.tracin.kronecker_dims``; larger JL error than a dense
        projection at the same k).
      chunk_size: examples per compiled step (default: 256 MiB of gradients, 1 GiB
        when projecting, to amortise the projection's per-call cost).
      proj_chunk_size: projection rows generated at a time.
      shared_projection: one projection (``key`` itself) for every member instead.
      projection_dtype: ``None`` (default): the dense projection's product in the
        gradients' dtype. ``"bfloat16"``: gradients and P rounded to bfloat16 in the
        product, accumulated in the gradients' dtype (traker's CUDA projector also
        works in half precision): the projected gradients err by about 0.2% against
        the JL error √(2/k) (6% at k = 512), and the product runs as a bfloat16
        matrix product where the hardware has one (``jattri.func.gaussian_projection``).
        On the digits settings the scores moved by 0.09-0.32% and the LDS by at most
        0.0003; the compiled call on dattri's MLP took 0.64-0.69× the float32 one on
        a 2-core Zen 4 CPU (``benchmarks/projection_dtype.py``; ``benchmarks/RESULTS.md``,
        "bfloat16 products for the dense projection"). The kernel, its solve and the
        scores stay in the gradients' dtype. Needs ``proj_dim``; dropped where
        ``"auto"`` picks the SJLT or Kronecker projection (no dense product);
        ``"sjlt"`` or ``"kronecker"`` named with it is an error.

    Memory: state n·M·k + M·k² floats; peak ``chunk_size`` gradients of d floats plus
    the projection's ``proj_chunk_size × k`` block; with the Kronecker projection no
    d-float gradient: ``chunk_size`` examples' layer inputs and output gradients
    (Σ_ℓ T_ℓ·(d_in,ℓ + d_out,ℓ) floats each) and the factors, M·Σ_ℓ (d_in,ℓ·k_in,ℓ +
    d_out,ℓ·k_out,ℓ) floats.
    """
    _checks.real(damping, "damping", low=0, none=True)
    check_projection_args(projection, ("kronecker",), proj_dim=proj_dim,
                          proj_chunk_size=proj_chunk_size)
    projection_dtype = check_projection_dtype(projection, projection_dtype, proj_dim)
    chunk_size = engine.check_chunk_size(chunk_size)
    _checks.optional_callable(prob_fn, "prob_fn")
    task = as_task(task)
    key = _common.default_key() if key is None else _checks.prng_key(key)
    shared = _checks.flag(shared_projection, "shared_projection")
    made = _common.hyper(task, proj_dim=proj_dim, key=key, prob_fn=prob_fn,
                         projection=projection, proj_chunk_size=proj_chunk_size,
                         shared_projection=shared, projection_dtype=projection_dtype)

    # made once: the Partials are static arguments of compiled programs (the layer
    # check of the Kronecker projection), keyed by identity
    fns = _fns(task, prob_fn)
    memo = {}  # the Kronecker choices made concretely (``resolve_kronecker``)
    factors = {}  # their factors, made once (``kronecker_factors``)

    def keys(members, cfg):
        """Member m's projection key, or with the Kronecker projection its factors."""
        if cfg[-1] is not None:
            return kronecker_factors(*cfg[-1], "gaussian", key, members.num, shared,
                                     memo=factors)
        if shared:
            return jnp.broadcast_to(key, (members.num,) + key.shape)
        return _common.member_keys(key, members.num)

    def config(members, data, target=False):
        """The projection's static config; its last entry ``(layers, dims)`` when the
        margin gradients are Kronecker-projected (``projection="kronecker"``, or
        ``"auto"`` at large d·k: ``jattri.methods.tracin.resolve_kronecker``)."""
        d = _common.num_params(members)
        k = None if proj_dim is None else int(proj_dim)
        kron = None if k is None else kronecker_plan(
            projection, fns.train_margin, fns.test_margin if target else None, members,
            data, k, method="TRAK", memo=memo)
        return (projection, d, k, proj_chunk_size, projection_dtype, kron)

    size = partial(_common.step_chunk_size, chunk_size, proj_dim)

    def cache(members, train) -> TrakState:
        members = _common.setup(task, members, train)
        cfg = config(members, train)
        k = cfg[1] if cfg[2] is None else (cfg[2] if cfg[-1] is None
                                           else kronecker_width(*cfg[-1]))
        _common.check_fits(members.num * k * k * 4, f"the ({members.num}, {k}, {k}) kernel "
                           "ΦᵀΦ", "proj_dim")
        dtype = _common.param_dtype(members)
        stats = 0 if damping is not None else (2 if prob_fn is None else 1)
        zero = lambda *shape: jax.ShapeDtypeStruct((members.num,) + shape, dtype)
        carry0 = ((zero(k, k),) + ((zero(),) if stats else ())
                  + ((zero(cfg[1]),) if stats == 2 else ()))
        carry, (phi, q), n = engine.scan(_cache_step, (cfg, stats),
                                         (fns, members, keys(members, cfg)), carry0, train,
                                         size(members, train, dense=cfg[-1] is None), sums=True)
        default = None
        if stats:
            if stats == 2:
                lam = _stationary(carry[2], n, members)
            else:  # prob_fn: ∇loss is not −(1 − p)∇f; one gradient pass of the loss
                lam = _stationary_damping(task.loss, members, train, size(members, train))
            default = _default_damping(carry[0], carry[1], lam, n, cfg[1])
        return TrakState(members, _common.stored_train(train), phi, carry[0], q,
                         _common.provenance("trak", made, members, train, phi.shape[0]),
                         default)

    def test_phi(state, data):
        target = not (task.target_is_loss and prob_fn is None)
        cfg = config(state.members, data, target)
        return engine.per_example(_test_phi, cfg,
                                  (fns, state.members, keys(state.members, cfg)), data,
                                  size(state.members, data, dense=cfg[-1] is None))

    def damping_of(damping, state):
        """The relative damping: ``damping``, else the factory's, else the state's rule."""
        if damping is not None:
            return _checks.real(damping, "damping", low=0)
        return state.damping if state.damping is not None else 0.1

    def attribute(state: TrakState, test, *, train=None, top_k=None, lowest=False,
                  damping=damping):
        _common.check_state(state, TrakState, "trak", made, train=train)
        damping = damping_of(damping, state)
        _common.check_data(task, state.members, test, "test", target=True,
                           like=state.train)
        phi_t = test_phi(state, test)  # (n_test, M, k)
        solved = _solve(state.kernel, damping, phi_t)  # (M, k, n_test)
        rows = (state.phi, state.q)
        n_test = phi_t.shape[0]
        tile = size(state.members, rows, _common.row_floats(state.phi) + n_test)
        return engine.score(_tile, None, (solved, state.members.num), rows, tile, n_test,
                            phi_t.dtype, top_k=top_k, lowest=lowest)

    def self_attribute(state: TrakState, *, train=None, damping=damping):
        _common.check_state(state, TrakState, "trak", made, train=train)
        damping = damping_of(damping, state)
        inverse = _inverse(state.kernel, damping)
        right = (state.phi if task.target_is_loss else
                 test_phi(state, _common.train_for(state.train, train)))
        rows = (state.phi, state.q, right)
        return engine.per_example(_self_tile, None, inverse, rows,
                                  size(state.members, rows, 2 * _common.row_floats(state.phi)))

    return Attributor(cache, engine.bucketed(attribute), self_attribute)
