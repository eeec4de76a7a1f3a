"""TRAK (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale").

For members m (checkpoints) with projected margin gradients Φ_m (train, ``(n, k)``)
and φ_t,m (test):

    score(i, t) = [mean_m Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_t,mᵀ]_i · mean_m Q_m,i

with margin f = log p − log(1 − p) and Q = 1 − p, where p = exp(−loss) is the
probability of the correct label for a cross-entropy loss (or ``prob_fn``). The train
side uses ``loss_fn``, the test side ``target_fn``. λ_m = ``damping`` × mean diagonal
of Φ_mᵀΦ_m (relative, so the default 0.1 fits any gradient scale).

Stages: ``cache`` streams the training set once, keeping Φ (``(n, M, k)``), the
kernels Φ_mᵀΦ_m and Q; ``attribute`` projects the test gradients, solves the
``k × k`` systems and scores training rows tile by tile (dense or top-k).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri import _checks, engine
from jattri.func.grads import as_partial
from jattri.func.projection import (DEFAULT_CHUNK, check_projection_args,
                                     random_projection)
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Members, as_task

PyTree = Any


class TrakState(NamedTuple):
    """members: the Members scored. train: the in-memory training set (a reference) or
    ``None`` if streamed. phi: ``(n, M, k)`` projected train margin gradients.
    kernel: ``(M, k, k)`` Φ_mᵀΦ_m. q: ``(n,)`` mean_m (1 − p). made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``).

    Memory: n·M·k + M·k² floats (no ``(n, d)`` array)."""

    members: Members
    train: PyTree
    phi: jax.Array
    kernel: jax.Array
    q: jax.Array
    made: _common.Provenance


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
    kind, d, k, proj_chunk = config
    if k is None:
        return None
    return random_projection(kind, key, d, k, chunk_size=proj_chunk)


def _phi(proj_config, fn, params, aux, key, chunk):
    return _common.chunk_grads(fn, params, aux, chunk, _projection(proj_config, key))


def _cache_step(config, args, kernel, chunk):
    fns, members, keys = args  # keys (M,): member m's projection

    def one(params, aux, key):
        phi = _phi(config, fns.train_margin, params, aux, key, chunk)  # (size, k)
        q = jax.vmap(fns.q, (None, 0, 0, None))(params, chunk.data, chunk.index, aux)
        return phi, q

    phi, q = _common.member_map(one, members, keys)  # (M, size, k), (M, size)
    kernel = kernel + jnp.einsum("mbk,mbl->mkl", phi, phi)
    return kernel, (jnp.swapaxes(phi, 0, 1), jnp.mean(q, axis=0))


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


@jax.jit
def _solve(kernel, damping, phi_t):
    """``(M, k, n_test)`` (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_t,m: one compiled program for any
    damping (eagerly it was ten small compilations on a first call)."""
    return jnp.linalg.solve(damped_kernel(kernel, damping), jnp.transpose(phi_t, (1, 2, 0)))


@jax.jit
def _inverse(kernel, damping):
    return jnp.linalg.inv(damped_kernel(kernel, damping))


def damped_kernel(kernel: jax.Array, damping) -> jax.Array:
    """Φ_mᵀΦ_m + λ_m I with λ_m = damping · tr(Φ_mᵀΦ_m) / k, for every member."""
    k = kernel.shape[-1]
    lam = damping * jnp.trace(kernel, axis1=-2, axis2=-1) / k
    return kernel + lam[:, None, None] * jnp.eye(k, dtype=kernel.dtype)


def trak(task: Any, *, proj_dim: Optional[int] = 512, damping: float = 0.1,
         key: Optional[jax.Array] = None, prob_fn: Optional[Callable] = None,
         projection: str = "auto", chunk_size: Optional[int] = None,
         proj_chunk_size: Optional[int] = DEFAULT_CHUNK,
         shared_projection: bool = False) -> Attributor:
    """TRAK over the members given to ``cache`` (checkpoints / ensemble members).

    Args:
      task: a :class:`jattri.Task` or a ``loss_fn(params, example)``; the loss must be
        a negative log-probability of the correct label (cross-entropy) unless
        ``prob_fn`` is given.
      proj_dim: k, the JL projection dimension; ``None`` uses raw gradients. Member m
        is projected with its own key ``fold_in(key, m)``, as in the paper and its
        reference code: the members' projection errors are independent and average
        out in the ensemble (with one shared projection, M checkpoints of a convex
        model score like one).
      damping: relative λ ≥ 0 (see module docstring); must be > 0 when k exceeds n.
        ``attribute(..., damping=...)`` overrides it without re-caching. Default 0.1:
        λ_m = 0.1 × the mean eigenvalue of Φ_mᵀΦ_m, the rule of Kronfluence (Grosse
        et al., 2023) and LoGra, and jattri's for LoGra, DataInf and EK-FAC; relative
        because the kernel's scale follows the loss, the data and k. The former 1e-2
        (0.01 × the mean eigenvalue) was worse on both embedded digits settings; there
        the best value is 1-3 × the mean eigenvalue, which this rule does not reach
        (``benchmarks/RESULTS.md``, "Damping grids"). No ground-truth-free way to
        pick TRAK's damping is known (the paper has none; dattri's default is 0).
      key: PRNG key of the projection (default ``PRNGKey(0)``).
      prob_fn: optional ``prob_fn(params, example) -> p`` in (0, 1).
      projection: ``"auto"`` (default: the dense Gaussian while d·k ≤ 2²⁷, else the
        SJLT; ``jattri.func.projection.resolve_projection``), ``"gaussian"``,
        ``"rademacher"`` or ``"sjlt"`` (sparse, O(d) per example).
      chunk_size: examples per compiled step (default: 256 MiB of gradients, 1 GiB
        when projecting, to amortise the projection's per-call cost).
      proj_chunk_size: projection rows generated at a time.
      shared_projection: one projection (``key`` itself) for every member instead.

    Memory: state n·M·k + M·k² floats; peak ``chunk_size`` gradients of d floats plus
    the projection's ``proj_chunk_size × k`` block.
    """
    _checks.real(damping, "damping", low=0)
    check_projection_args(projection, proj_dim=proj_dim, proj_chunk_size=proj_chunk_size)
    chunk_size = engine.check_chunk_size(chunk_size)
    _checks.optional_callable(prob_fn, "prob_fn")
    task = as_task(task)
    key = jax.random.PRNGKey(0) if key is None else _checks.prng_key(key)
    shared = _checks.flag(shared_projection, "shared_projection")
    made = _common.hyper(task, proj_dim=proj_dim, key=key, prob_fn=prob_fn,
                         projection=projection, proj_chunk_size=proj_chunk_size,
                         shared_projection=shared)

    def keys(members):
        if shared:
            return jnp.broadcast_to(key, (members.num,) + key.shape)
        return _common.member_keys(key, members.num)

    def config(members):
        d = _common.num_params(members)
        return (projection, d, None if proj_dim is None else int(proj_dim), proj_chunk_size)

    def size(members, data, floats=None):
        projected = floats is None and proj_dim is not None  # gradient steps that project
        return _common.chunk_size_for(chunk_size, members, data, floats, projected=projected)

    def cache(members, train) -> TrakState:
        members = _common.setup(task, members, train)
        fns = _fns(task, prob_fn)
        cfg = config(members)
        k = cfg[1] if cfg[2] is None else cfg[2]
        _common.check_fits(members.num * k * k * 4, f"the ({members.num}, {k}, {k}) kernel "
                           "ΦᵀΦ", "proj_dim")
        kernel0 = jnp.zeros((members.num, k, k), _common.param_dtype(members))
        kernel, (phi, q), _ = engine.scan(_cache_step, cfg, (fns, members, keys(members)),
                                          kernel0, train, size(members, train), sums=True)
        return TrakState(members, _common.stored_train(train), phi, kernel, q,
                         _common.provenance("trak", made, members, train, phi.shape[0]))

    def test_phi(state, data):
        return engine.per_example(_test_phi, config(state.members),
                                  (_fns(task, prob_fn), state.members, keys(state.members)),
                                  data,
                                  size(state.members, data))

    def attribute(state: TrakState, test, *, train=None, top_k=None, lowest=False,
                  damping=damping):
        _common.check_state(state, TrakState, "trak", made, train=train)
        _checks.real(damping, "damping", low=0)
        _common.check_data(task, state.members, test, "test", target=True,
                           like=state.train)
        phi_t = test_phi(state, test)  # (n_test, M, k)
        solved = _solve(state.kernel, damping, phi_t)  # (M, k, n_test)
        rows = (state.phi, state.q)
        n_test = phi_t.shape[0]
        return engine.score(_tile, None, (solved, state.members.num), rows,
                            size(state.members, rows, state.phi[0].size + n_test), n_test,
                            phi_t.dtype, top_k=top_k, lowest=lowest)

    def self_attribute(state: TrakState, *, train=None, damping=damping):
        _common.check_state(state, TrakState, "trak", made, train=train)
        _checks.real(damping, "damping", low=0)
        inverse = _inverse(state.kernel, damping)
        right = (state.phi if task.target_is_loss else
                 test_phi(state, _common.train_for(state.train, train)))
        rows = (state.phi, state.q, right)
        return engine.per_example(_self_tile, None, inverse, rows,
                                  size(state.members, rows, 2 * state.phi[0].size))

    return Attributor(cache, attribute, self_attribute)
