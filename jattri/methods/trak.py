"""TRAK (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale").

For members m (checkpoints) with projected margin gradients Φ_m (train, ``(n, k)``)
and φ_t,m (test):

    score(i, t) = [mean_m Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_t,mᵀ]_i · mean_m Q_m,i

with margin f = log p − log(1 − p) and Q = 1 − p, where p = exp(−loss) is the
probability of the correct label for a cross-entropy loss (or ``prob_fn``). The train
side uses ``loss_fn``, the test side ``target_fn``. λ_m = ``damping`` × mean diagonal
of Φ_mᵀΦ_m (relative, so the default fits any gradient scale).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri.func.grads import as_partial
from jattri.func.projection import gaussian_projection
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class TrakState(NamedTuple):
    """train: data. phi: ``(M, n, k)`` projected train margin gradients.
    features: ``(M, n, k)`` = Φ_m (Φ_mᵀΦ_m + λI)⁻¹. q: ``(n,)`` mean_m (1 − p)."""

    train: PyTree
    phi: jax.Array
    features: jax.Array
    q: jax.Array


def margin_from_loss(loss: jax.Array) -> jax.Array:
    """log p − log(1 − p) with p = exp(−loss).

    A loss that rounds to 0 (p = 1 in floating point) has no finite margin; such an
    example gets margin 0 with zero gradient (its Q = 1 − p is 0 too) instead of NaN.
    """
    ok = loss > 1e3 * jnp.finfo(jnp.result_type(loss, jnp.float32)).tiny
    safe = jnp.where(ok, loss, 1.0)
    return jnp.where(ok, -safe - jnp.log(-jnp.expm1(-safe)), 0.0)


def _margin_of_loss(loss, t, z, i):
    return margin_from_loss(loss(t, z, i))


def _margin_of_prob(prob_fn, unravel, t, z, i):
    p = prob_fn(unravel(t), z)
    return jnp.log(p) - jnp.log1p(-p)


def _q_of_loss(loss, t, z, i):
    return -jnp.expm1(-loss(t, z, i))


def _q_of_prob(prob_fn, unravel, t, z, i):
    return 1.0 - prob_fn(unravel(t), z)


def _member_fn(of_loss: Callable, of_prob: Callable, fn: Partial, unravel: Callable,
               prob_fn: Optional[Callable]) -> Partial:
    """The margin / Q function of a member as a ``Partial`` (code static, the member's
    bound arrays traced): from its loss, or from ``prob_fn`` when given."""
    if prob_fn is None:
        return Partial(of_loss, fn)
    return Partial(of_prob, as_partial(prob_fn), unravel)


@jax.jit
def _q_values(q_fn: Partial, theta: jax.Array, data: PyTree, idx: jax.Array) -> jax.Array:
    return jax.vmap(q_fn, (None, 0, 0))(theta, data, idx)


def trak(task: Task, *, proj_dim: Optional[int] = 512, damping: float = 1e-2,
         key: Optional[jax.Array] = None, prob_fn: Optional[Callable] = None,
         chunk_size: Optional[int] = None, proj_chunk_size: Optional[int] = 4096) -> Attributor:
    """TRAK over the task's members (each a checkpoint / ensemble member).

    Args:
      task: the Task; its loss must be a negative log-probability of the correct
        label (cross-entropy) unless ``prob_fn`` is given.
      proj_dim: k, the JL projection dimension (Gaussian, one keyed projection shared
        by all members); ``None`` uses raw gradients.
      damping: relative λ ≥ 0 (see module docstring); must be > 0 when k exceeds n.
      key: PRNG key of the projections (default ``PRNGKey(0)``).
      prob_fn: optional ``prob_fn(params, example) -> p`` in (0, 1).
      chunk_size: examples per vectorised chunk; proj_chunk_size: projection rows
        generated at a time.
    """
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}")
    if proj_dim is not None and int(proj_dim) <= 0:
        raise ValueError(f"`proj_dim` must be a positive int or None, got {proj_dim}")
    members = _common.flat_members(task)
    key = jax.random.PRNGKey(0) if key is None else key
    d = members[0].theta.shape[0]
    # One projection shared by all members (as in TRAK): identical members then give
    # exactly the single-member scores.
    projection = (None if proj_dim is None else
                  gaussian_projection(key, d, int(proj_dim), chunk_size=proj_chunk_size))
    margins = tuple((_member_fn(_margin_of_loss, _margin_of_prob, m.loss, m.unravel, prob_fn),
                     _member_fn(_margin_of_loss, _margin_of_prob, m.target, m.unravel, prob_fn))
                    for m in members)
    qs = tuple(_member_fn(_q_of_loss, _q_of_prob, m.loss, m.unravel, prob_fn) for m in members)

    def phi(k, data, target):
        m = members[k]
        return _common.member_grads(margins[k][1 if target else 0], m.theta, data,
                                    chunk_size=chunk_size, transform=projection)

    def cache(train: PyTree) -> TrakState:
        _common.check_train(task, train)
        idx = _common.indices_for(train)
        phis, feats, q = [], [], 0.0
        for k, m in enumerate(members):
            p = phi(k, train, False)
            kernel = p.T @ p
            lam = damping * jnp.trace(kernel) / kernel.shape[0]
            kernel = kernel + lam * jnp.eye(kernel.shape[0], dtype=kernel.dtype)
            feats.append(jnp.linalg.solve(kernel, p.T).T)
            phis.append(p)
            q = q + _q_values(qs[k], m.theta, train, idx)
        return TrakState(train, jnp.stack(phis), jnp.stack(feats), q / len(members))

    def attribute(state: TrakState, test: PyTree) -> jax.Array:
        _common.check_test(task, state.train, test)
        s = _common.member_mean(lambda k, m: state.features[k] @ phi(k, test, True).T, members)
        return s * state.q[:, None]

    def self_attribute(state: TrakState) -> jax.Array:
        def one(k, m):
            right = state.phi[k] if task.target_is_loss else phi(k, state.train, True)
            return jnp.sum(state.features[k] * right, axis=-1)
        return _common.member_mean(one, members) * state.q

    return Attributor(cache, attribute, self_attribute)
