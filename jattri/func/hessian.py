"""Hessian-vector products and inverse-Hessian-vector products (IHVPs).

All functions take a scalar function ``f(params)`` (typically the mean training loss)
and work for any params pytree. Vectors ``v`` are pytrees shaped like ``params``; an
extra leading axis on every leaf means a batch of vectors.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from jattri import _checks
from jattri._jit import jit
from jattri._products import tmatmul
from jattri.func.grads import as_partial, flat_fn, unravel_fn
from jattri.func.projection import derive_key, seeded_normal

PyTree = Any


def hvp(f: Callable, params: PyTree, v: PyTree) -> PyTree:
    """H v with H = ∇²f(params), by forward-over-reverse (``jvp`` of ``grad``).

    Args:
      f: scalar function of params. params, v: pytrees of the same structure.
    Returns:
      pytree like ``params``.
    """
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


def _flat(f, params, v):
    """Flatten ``f`` and ``v``; report whether ``v`` carries a batch axis. ``flat_f`` is
    a ``Partial`` (``flat_fn``): the jitted solvers below take it as a traced argument,
    so repeated calls with the same ``f`` compile once."""
    theta = ravel_pytree(params)[0]
    leaves_p = jax.tree_util.tree_leaves(params)
    leaves_v = jax.tree_util.tree_leaves(v)
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(v):
        raise ValueError("v must have the same pytree structure as params, got "
                         f"{jax.tree_util.tree_structure(v)} vs "
                         f"{jax.tree_util.tree_structure(params)}")
    batched = leaves_v[0].ndim == leaves_p[0].ndim + 1
    for lp, lv in zip(leaves_p, leaves_v):
        want = ((lv.shape[0],) if batched else ()) + lp.shape
        if lv.shape != want:
            raise ValueError(f"v leaf has shape {lv.shape}, expected {want} "
                             "(params' shape, optionally with one leading batch axis)")
    if batched:
        flat_v = jax.vmap(lambda x: ravel_pytree(x)[0])(v)
    else:
        flat_v = ravel_pytree(v)[0]
    return theta, flat_fn(f, params), flat_v, unravel_fn(params), batched


def _unflat(x, unravel, batched):
    return jax.vmap(unravel)(x) if batched else unravel(x)


def add_dense(acc: jax.Array, matvec: Callable, block: int, *, at=None) -> jax.Array:
    """``acc + A`` for a symmetric ``(d, d)`` operator A known by its products,
    ``block`` unit vectors at a time: ⌈d / block⌉ calls ``matvec(V) -> V A`` on
    ``(block, d)`` rows of the identity, each adding ``block`` rows of A to ``acc`` in
    place (a ``dynamic_update_slice`` of the loop carry; the last block overlaps the
    one before and adds only its new rows). Temporaries are O(block·d) floats besides
    ``acc``: never the d tangents of ``jax.hessian`` at once.

    ``at``: an index into a leading axis of ``acc`` (``(M, d, d)``): A is added to
    ``acc[at]``, still in place.
    """
    d = acc.shape[-1]
    block = max(1, min(int(block), d))
    lead = () if at is None else (at,)

    def body(j, acc):
        first = j * block
        start = jnp.minimum(first, d - block)
        rows = start + jnp.arange(block)
        eye = (rows[:, None] == jnp.arange(d)[None, :]).astype(acc.dtype)
        new = matvec(eye) * (rows >= first)[:, None].astype(acc.dtype)
        where = lead + (start, 0)
        size = (1,) * len(lead) + (block, d)
        old = jax.lax.dynamic_slice(acc, where, size)
        return jax.lax.dynamic_update_slice(acc, old + new.astype(acc.dtype).reshape(size),
                                            where)

    return jax.lax.fori_loop(0, -(-d // block), body, acc)


def dense_block(d: int, budget_floats: Optional[int] = None) -> int:
    """Unit vectors per block of :func:`add_dense` for a d-dimensional operator: the
    block's four ``(block, d)`` temporaries (unit vectors, products, old and new
    rows) within ``budget_floats`` (default ``jattri.engine.DEFAULT_CHUNK_BYTES`` of
    float32)."""
    if budget_floats is None:
        from jattri.engine import DEFAULT_CHUNK_BYTES
        budget_floats = DEFAULT_CHUNK_BYTES // 4
    return max(1, min(int(d), int(budget_floats) // (4 * int(d))))


def dense_hessian(f: Callable, theta: jax.Array, block: Optional[int] = None) -> jax.Array:
    """The ``(d, d)`` Hessian of scalar ``f`` at flat ``theta``: d HVPs, ``block`` at a
    time (default :func:`dense_block`), so memory is the Hessian plus O(block·d)."""
    d = theta.shape[0]
    block = dense_block(d) if block is None else block
    matvec = jax.vmap(lambda v: hvp(f, theta, v))
    return add_dense(jnp.zeros((d, d), theta.dtype), matvec, block)


_dense_hessian_jit = jit(dense_hessian, static_argnums=2)


def damped_inverse(h: jax.Array, damping: float, *, what: str = "Hessian") -> jax.Array:
    """``(H + λI)⁻¹`` for symmetric ``(d, d)`` ``H`` by eigendecomposition.

    Raises ``ValueError`` when ``H + λI`` is singular or indefinite (an eigenvalue
    ≤ 1e-12 · max|eigenvalue|), instead of returning inf/NaN: pass a larger damping.
    """
    w, q = _sym_eigh(h)
    w = w + damping
    scale = float(jnp.max(jnp.abs(w)))
    wmin = float(jnp.min(w))
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"the {what} has non-finite entries")
    if wmin <= 1e-12 * max(scale, 1e-30):
        raise ValueError(
            f"{what} + damping*I is singular or indefinite (smallest eigenvalue "
            f"{wmin:.3g} with damping={damping}); increase `damping`")
    return _inverse_from_eigh(w, q)


@jit
def _sym_eigh(h):
    return jnp.linalg.eigh(0.5 * (h + h.T))


@jit
def _inverse_from_eigh(w, q):
    return (q / w) @ q.T


def ihvp_explicit(f: Callable, params: PyTree, v: PyTree, *, damping: float = 0.0) -> PyTree:
    """(H + λI)⁻¹ v with the dense Hessian of ``f``; for small models (d ≲ 10⁴).

    Args:
      f: scalar function of params. v: pytree like params, optionally with a leading
        batch axis ``(b, ...)`` on every leaf.
      damping: λ ≥ 0. A singular ``H + λI`` raises ``ValueError``.
    Returns:
      pytree like ``v``.
    """
    theta, flat_f, flat_v, unravel, batched = _flat(f, params, v)
    inv = damped_inverse(_dense_hessian_jit(flat_f, theta), damping)
    out = flat_v @ inv  # inv is symmetric
    return _unflat(out, unravel, batched)


@partial(jit, static_argnums=(4, 5))
def _cg_jit(flat_f, theta, b, damping, maxiter, tol):
    return cg_solve(lambda x: hvp(flat_f, theta, x) + damping * x, b, maxiter=maxiter, tol=tol)


def _stop(tol: float, dtype) -> jax.Array:
    """The relative residual at which a CG solve stops: ``tol``, but never below the
    dtype's eps. A residual below eps·‖b‖ is rounding: further steps change nothing
    but, once it underflows, read pᵀAp = 0 as singular curvature: ``tol=0`` with
    ``maxiter=20`` on a linear softmax model at zero weights (its damped Hessian has 52
    distinct eigenvalues, so CG converges exactly) came back NaN, and
    ``influence_cg`` raised."""
    return jnp.maximum(tol, jnp.finfo(dtype).eps)


def cg_solve(matvec: Callable, b: jax.Array, *, maxiter: Optional[int], tol: float,
             at_once: Optional[int] = None) -> jax.Array:
    """Solve ``A x = b`` by conjugate gradients (Hestenes & Stiefel, 1952) from x₀ = 0,
    stopping when ‖r‖ ≤ ``tol``·‖b‖ (``tol`` at least the dtype's eps) or after
    ``maxiter`` steps (default 10·d), as ``jax.scipy.sparse.linalg.cg`` does; ``b`` is ``(d,)`` or ``(k, d)``: the k systems
    are vmapped, ``at_once`` of them together (default all; the groups one after
    another, :func:`in_groups`), so the solve holds about four ``(at_once, d)``
    arrays. The grouping changes no system's result (up to rounding).

    A must be positive definite. A search direction p with pᵀAp ≤ 0 (A indefinite or
    singular along p) stops the solve and makes that right-hand side's result NaN,
    which :func:`check_cg` turns into a ``ValueError`` at the boundary: CG's iterates
    after such a step are meaningless, and ``jax.scipy.sparse.linalg.cg`` (which has no
    such test, hence this loop) returns them silently.
    """
    maxiter = 10 * b.shape[-1] if maxiter is None else int(maxiter)

    def solve(rhs):
        stop = _stop(tol, rhs.dtype) ** 2 * jnp.vdot(rhs, rhs)

        def cond(state):
            _, _, _, gamma, k, bad = state
            return (gamma > stop) & (k < maxiter) & ~bad

        def body(state):
            x, r, p, gamma, k, _ = state
            ap = matvec(p)
            curvature = jnp.vdot(p, ap)
            bad = curvature <= 0
            alpha = gamma / jnp.where(bad, 1.0, curvature)
            x = x + alpha * p
            r = r - alpha * ap
            gamma_new = jnp.vdot(r, r)
            p = r + (gamma_new / gamma) * p
            return x, r, p, gamma_new, k + 1, bad

        zero = jnp.zeros_like(rhs)
        state = (zero, rhs, rhs, jnp.vdot(rhs, rhs), 0, jnp.array(False))
        x, _, _, _, _, bad = jax.lax.while_loop(cond, body, state)
        return jnp.where(bad, jnp.nan, x)

    return in_groups(solve, b, at_once) if b.ndim == 2 else solve(b)


def group_count(k: int, at_once: Optional[int]) -> int:
    """How many groups :func:`in_groups` splits ``k`` rows into, ``at_once`` at a time."""
    return 1 if at_once is None or int(at_once) >= k else -(-k // max(1, int(at_once)))


def group_size(k: int, at_once: Optional[int]) -> int:
    """Rows in each of :func:`in_groups`' groups (balanced: 500 rows at 153 go as
    4 × 125, not 4 × 153)."""
    return -(-k // group_count(k, at_once))


def _block_rows(k: int, block: Optional[int]) -> int:
    """Rows of each of :func:`block_cg_solve`'s blocks."""
    return k if block is None else max(1, min(int(block), k))


def cg_group_rows(k: int, at_once: Optional[int], block: Optional[int] = 1) -> int:
    """Right-hand sides per group of :func:`cg_solve` (``block=1``) or
    :func:`block_cg_solve` on ``k`` of them: each group is solved on its own, so a
    caller may solve the groups one call each (``jattri.progress``'s CG)."""
    if block == 1:
        return group_size(k, at_once)
    s = _block_rows(k, block)
    return s * group_size(-(-k // s), None if at_once is None else max(1, int(at_once) // s))


def in_groups(solve: Callable, rows: jax.Array, at_once: Optional[int], *,
              batched: bool = False) -> jax.Array:
    """``jax.vmap(solve)(rows)``, ``at_once`` rows at a time: the k rows split into
    ⌈k / at_once⌉ groups of equal size (zero rows padding the last), vmapped within a
    group and run one group after another (``lax.map``), so memory follows the group,
    not k. ``solve`` must map a zero row to zero (a solve from x₀ = 0 stops there at
    once). ``at_once=None`` (or ≥ k): all rows together. ``batched=True``: ``solve``
    takes a whole group ``(rows, ...)`` itself (not vmapped). Inside
    :func:`jattri.progress`, CG's groups are solved one program call each instead
    (``jattri.methods.influence._apply_in_groups``), with the same groups."""
    k = rows.shape[0]
    run = solve if batched else jax.vmap(solve)
    groups = group_count(k, at_once)
    if groups == 1:
        return run(rows)
    size = group_size(k, at_once)
    padded = jnp.pad(rows, ((0, groups * size - k),) + ((0, 0),) * (rows.ndim - 1))
    out = jax.lax.map(run, padded.reshape((groups, size) + rows.shape[1:]))
    return out.reshape((groups * size,) + out.shape[2:])[:k]


def block_cg_solve(matmat: Callable, b: jax.Array, *, maxiter: Optional[int], tol: float,
                   block: Optional[int] = None, at_once: Optional[int] = None) -> jax.Array:
    """Solve ``A X = B`` for the rows of ``b`` ``(k, d)`` by block conjugate gradients
    (O'Leary, 1980, "The block conjugate gradient algorithm and related methods"),
    ``block`` rows at a time (default all ``k``); ``matmat`` maps ``(s, d)`` rows to
    their products with A.

    The rows of a block share one Krylov space: every step adds A applied to all their
    residuals, so each system is solved over a space ``s`` times the size plain CG
    searches after as many products. Where a few large eigenvalues of A set plain CG's
    pace, the block's first steps take them out for every row at once. On the
    7,850-parameter LR with 500 test gradients (λ = 1% of the top eigenvalue, float32,
    ``benchmarks/block_cg.py``) blocks of 128 stop at ``tol=1e-6`` after 5 steps (true
    relative residual 1.2·10⁻⁵ at most), where one CG per system is at 1.3·10⁻³ after
    20.

    Each step: the residuals, A-orthogonalised against the previous step's directions
    and scaled to unit rows, are multiplied by A once; their Gram matrix Zᵀ A Z
    (``(s, s)``) is diagonalised and its eigenvectors above ``10·eps`` of the largest
    eigenvalue give A-orthonormal directions P (nearly dependent ones, such as the rows
    of systems already solved, are dropped, so a rank-deficient block does not break
    down); X += R Pᵀ P, R −= R Pᵀ (A P). It stops when every row has
    ‖r‖ ≤ ``tol``·‖b‖ (``tol`` at least the dtype's eps), after ``maxiter`` steps
    (default 10·d), when no direction is left, or once the
    directions searched number 2·d: in exact arithmetic the block ends within d of them
    (⌈d/s⌉ steps), and beyond twice that only rounding would be reworked (float32 on an
    ill-conditioned A, where ``tol`` is out of reach, would otherwise run ``maxiter``
    steps). Zero rows (padding) stay zero.

    In exact arithmetic the solutions do not depend on how rows are grouped once
    converged; before that, a row's iterate is the best one in its block's shared
    space, so it depends on the other rows of its block (plain CG's, in
    :func:`cg_solve`, does not).

    A must be positive definite. A Gram matrix with an eigenvalue below −√eps of its
    largest (or no positive one for a non-zero block) means A is indefinite or
    singular there: that block's rows come back NaN, which :func:`check_cg` turns into
    ``ValueError``.

    Memory: about eight ``(s, d)`` arrays per block (solutions, residuals and the last
    directions and their products, carried; the new directions and their products,
    before and after each pass) and a few ``(s, s)``. The blocks of ``b`` are vmapped,
    as many together as hold ``at_once`` rows (default all; at least one block), the
    groups one after another (:func:`in_groups`); the grouping changes no block's
    result (up to rounding). Cost per step and row: one product with A and about 11·s·d
    multiply-adds.
    """
    if b.ndim != 2:
        raise ValueError(f"b must be (k, d), got shape {b.shape}")
    k, d = b.shape
    maxiter = 10 * d if maxiter is None else int(maxiter)
    s = _block_rows(k, block)
    pad = (-k) % s
    blocks = jnp.pad(b, ((0, pad), (0, 0))).reshape(-1, s, d)
    out = in_groups(lambda rhs: _block_cg(matmat, rhs, maxiter, tol), blocks,
                    None if at_once is None else max(1, int(at_once) // s))
    return out.reshape(-1, d)[:k]


def _a_orthonormal(z, az, cut):
    """Rows ``(P, AP)`` spanning the rows of ``z`` with P A Pᵀ = I, from the
    eigendecomposition of the Gram matrix z A zᵀ (``az`` = z A); directions whose
    eigenvalue is at most ``cut`` times the largest become zero rows. Also returns the
    eigenvalues."""
    gram = z @ az.T
    w, v = jnp.linalg.eigh((gram + gram.T) / 2)
    keep = w > cut * w[-1]
    scale = v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1)), 0)
    return tmatmul(scale, z), tmatmul(scale, az), keep, w


def _block_cg(matmat, b, maxiter, tol):
    dtype = b.dtype
    eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny
    stop = _stop(tol, dtype) ** 2 * jnp.sum(b * b, axis=1)

    # the dimensions searched so far: in exact arithmetic the block ends once they reach
    # d; at twice that, further steps would only rework rounding (float32 on an
    # ill-conditioned A, where `tol` may be out of reach). A step that keeps no
    # direction ends the solve too.
    most = 2 * b.shape[1]

    def cond(state):
        _, r, _, _, k, bad, dims = state
        return (jnp.any(jnp.sum(r * r, axis=1) > stop) & (k < maxiter) & ~bad
                & (dims < most))

    def body(state):
        x, r, p_prev, ap_prev, k, _, dims = state
        z = r - (r @ ap_prev.T) @ p_prev          # A-orthogonal to the last directions
        norms = jnp.linalg.norm(z, axis=1, keepdims=True)
        z = z / jnp.maximum(norms, tiny)
        az = matmat(z)
        p, ap, keep, w = _a_orthonormal(z, az, 10 * eps)
        bad = jnp.any(norms > 0) & ((w[-1] <= 0) | (w[0] < -jnp.sqrt(eps) * w[-1]))
        # a second pass: in float32 the first one's small eigenvalues are inexact, and
        # directions only nearly A-orthonormal slow the block down (on the LR of
        # benchmarks/block_cg.py, 14 steps instead of 4 to a residual of 10⁻⁶)
        p, ap, keep, _ = _a_orthonormal(p, ap, 0.5)
        c = r @ p.T
        kept = jnp.sum(keep)
        return x + c @ p, r - c @ ap, p, ap, k + 1, bad, jnp.where(kept > 0, dims + kept, most)

    zero = jnp.zeros_like(b)
    state = (zero, b, zero, zero, 0, jnp.array(False), jnp.array(0))
    x, _, _, _, _, bad, _ = jax.lax.while_loop(cond, body, state)
    return jnp.where(bad, jnp.nan, x)


CG_ADVICE = "increase `damping`, or use a positive semi-definite curvature"


def check_cg(out: Any, advice: str = CG_ADVICE) -> Any:
    """Raise ``ValueError`` when a concrete CG result (solutions, or scores computed
    from them) is non-finite: :func:`cg_solve` met pᵀ(H + λI)p ≤ 0."""
    if _is_concrete(out) and not _checks.all_finite(out):
        raise ValueError(
            "CG returned non-finite values: it met non-positive curvature "
            "(pᵀ(H + damping·I)p <= 0 along a search direction), so H + damping·I is "
            f"singular or indefinite and its inverse is not what CG computes; {advice}")
    return out


def ihvp_cg(f: Callable, params: PyTree, v: PyTree, *, damping: float = 0.0,
            maxiter: Optional[int] = 100, tol: float = 1e-7) -> PyTree:
    """(H + λI)⁻¹ v by conjugate gradients on HVPs (``jax.scipy.sparse.linalg.cg``).

    H + λI must be positive definite (CG's requirement); for non-convex losses use a
    damping larger than minus the smallest Hessian eigenvalue. A search direction with
    pᵀ(H + λI)p ≤ 0 (negative curvature, or a singular system that breaks down) raises
    ``ValueError`` rather than returning wrong values or NaN (for v in the range of a
    singular PSD H, CG from 0 returns the minimum-norm solution).

    Args:
      f: scalar function of params. v: pytree like params, optionally batched.
      damping: λ ≥ 0. maxiter: CG iterations. tol: relative residual tolerance.
    Returns:
      pytree like ``v``.
    """
    theta, flat_f, flat_v, unravel, batched = _flat(f, params, v)
    out = check_cg(_cg_jit(flat_f, theta, flat_v, damping, maxiter, tol),
                   "increase `damping`, or solve with the Gauss-Newton matrix "
                   "(jattri.func.ggn_vp), which is positive semi-definite")
    return _unflat(out, unravel, batched)


def check_finite_solve(out: jax.Array, what: str) -> jax.Array:
    """Raise ``ValueError`` (instead of returning NaN) when a concrete solve failed."""
    if not isinstance(out, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(out))):
        raise ValueError(f"{what} returned non-finite values: H + damping*I is singular or "
                         "indefinite for these vectors; increase `damping`")
    return out


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------- LiSSA

def top_eigenvalue(matvec: Callable, dim: int, *, key: jax.Array, iters: int = 30,
                   dtype=jnp.float32) -> jax.Array:
    """Largest-magnitude eigenvalue of a symmetric operator by power iteration.

    Returns the Rayleigh quotient after ``iters`` steps (a lower bound on |λ_max| for
    a PSD operator; use a safety factor).
    """
    x = jax.random.normal(key, (dim,), dtype)
    x = x / jnp.linalg.norm(x)

    def step(x, _):
        y = matvec(x)
        return y / jnp.maximum(jnp.linalg.norm(y), jnp.finfo(dtype).tiny), None

    x, _ = jax.lax.scan(step, x, None, length=iters)
    return jnp.vdot(x, matvec(x))


def _lissa_flat(flat_f_batch, theta, v, data, key, damping, scale, depth, repeats,
                batch_size, n):
    """Average over ``repeats`` of the Neumann recursion; ``v`` is ``(k, d)``."""
    hvp_batch = lambda batch, x: hvp(lambda t: flat_f_batch(t, batch), theta, x)
    many_hvp = jax.vmap(hvp_batch, (None, 0))

    def one_repeat(rkey):
        def step(h, skey):
            if batch_size >= n:
                batch = data
            else:
                idx = jax.random.choice(skey, n, (batch_size,), replace=False)
                batch = jax.tree_util.tree_map(lambda x: x[idx], data)
            # h <- v + h - (H_S + λI) h / scale: the fixed point is scale (H + λI)⁻¹ v.
            h = v + h - (many_hvp(batch, h) + damping * h) / scale
            return h, None

        h, _ = jax.lax.scan(step, v, jax.random.split(rkey, depth))
        return h / scale

    out = jax.lax.map(one_repeat, jax.random.split(key, repeats))
    return jnp.mean(out, axis=0)


# The functions are ``Partial`` pytrees (``as_partial``): traced, not static.
_lissa_jit = jit(_lissa_flat, static_argnums=(7, 8, 9, 10))
_top_eigenvalue_jit = jit(lambda f, t, k: top_eigenvalue(lambda x: hvp(f, t, x), t.shape[0],
                                                        key=k, dtype=t.dtype))


def _on_batch(flat_f_batch, batch, theta):
    return flat_f_batch(theta, batch)


def lissa_scale(flat_f: Callable, theta: jax.Array, damping: float, key: jax.Array,
                factor: float = 1.5) -> float:
    """Default LiSSA scale: ``factor · (λ̂_max(H) + damping)``, λ̂_max by power iteration."""
    top = _top_eigenvalue_jit(as_partial(flat_f), theta, key)
    return float(factor * (jnp.abs(top) + damping))


def lissa_flat(flat_f_batch: Callable, theta: jax.Array, v: jax.Array, data: PyTree, *,
               key: jax.Array, damping: float, scale: Optional[float], depth: int,
               repeats: int, batch_size: Optional[int]) -> jax.Array:
    """LiSSA on flat parameters; ``flat_f_batch(theta, batch)``, ``v`` ``(d,)`` or ``(k, d)``.

    Checks the arguments, picks the default scale, runs the jitted recursion and
    raises ``ValueError`` when it diverged (see ``ihvp_lissa``).
    """
    n = _checks.num_examples(data)
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}")
    if int(depth) < 1 or int(repeats) < 1:
        raise ValueError(f"`depth` and `repeats` must be >= 1, got {depth}, {repeats}")
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size}")
    batch_size = min(batch_size, n)
    key_scale, key_run = jax.random.split(key)
    if scale is None:
        scale = lissa_scale(Partial(_on_batch, as_partial(flat_f_batch), data), theta,
                            damping, key_scale)
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0, got {scale}")
    squeeze = v.ndim == 1
    vv = jnp.atleast_2d(v)
    out = _lissa_jit(as_partial(flat_f_batch), theta, vv, data, key_run, float(damping),
                     float(scale), int(depth), int(repeats), batch_size, n)
    if _is_concrete(out):
        # With scale > λ_max(H_S) + λ every factor of the series is a contraction,
        # so ‖h‖ ≤ (depth + 1)‖v‖; anything above that is divergence, not data.
        bound = (depth + 1) * jnp.linalg.norm(vv, axis=-1) / scale
        norms = jnp.linalg.norm(out, axis=-1)
        if not bool(jnp.all(jnp.isfinite(out))) or bool(jnp.any(norms > 1.01 * bound + 1e-30)):
            raise ValueError(
                f"LiSSA diverged: `scale`={scale:.4g} must exceed the largest eigenvalue "
                "of the minibatch Hessian plus damping (increase `scale` or "
                "`batch_size`), and H + damping*I must be positive definite")
    return out[0] if squeeze else out


def ihvp_lissa(f_batch: Callable, params: PyTree, v: PyTree, *, data: PyTree,
               key: jax.Array, damping: float = 0.0, scale: Optional[float] = None,
               depth: int = 1000, repeats: int = 1,
               batch_size: Optional[int] = None) -> PyTree:
    """(H + λI)⁻¹ v by LiSSA's stochastic Neumann series (Agarwal et al., 2017,
    "Second-Order Stochastic Optimization for Machine Learning in Linear Time";
    Koh & Liang, 2017).

    With H the Hessian of the mean loss over ``data`` and H_S that of a minibatch S
    drawn (without replacement) for each step,

        h₀ = v,   h_{j+1} = v + h_j − (H_S h_j + λ h_j) / scale,   result = h_depth / scale,

    averaged over ``repeats`` independent runs. Its fixed point is exactly
    (H + λI)⁻¹ v; the error decays like (1 − (μ_min + λ)/scale)^depth. ``damping`` is
    the Tikhonov λ of every other IHVP in jattri (not the "(1 − d)" of the reference
    recursion, which is ``d = λ/scale`` here). The same minibatches are used for every
    vector in a batch, so the result is one linear map applied to all of them.

    Degenerate cases: a divergent run (scale too small, or H + λI indefinite) raises
    ``ValueError``. On a singular H with λ = 0 the series does not converge along the
    null space (those components grow linearly with ``depth``): use λ > 0.

    Args:
      f_batch: ``f_batch(params, batch) -> scalar`` mean loss of a batch (a pytree
        slice of ``data`` with a leading axis).
      params: pytree. v: pytree like params, optionally with a leading batch axis.
      data: pytree of arrays with a leading example axis n.
      key: PRNG key for the minibatches (and the scale estimate).
      damping: λ ≥ 0. scale: > λ_max(H_S) + λ; default ``1.5 (λ̂_max(H) + λ)`` with
        λ̂_max from 30 power iterations on the full-data Hessian.
      depth: recursion steps. repeats: independent runs averaged.
      batch_size: |S|; ``None`` = the whole data set (a deterministic Neumann series).
    Returns:
      pytree like ``v``.
    """
    theta, flat_f_batch, flat_v, unravel, batched = _flat(f_batch, params, v)
    out = lissa_flat(flat_f_batch, theta, flat_v, data, key=key, damping=damping,
                     scale=scale, depth=depth, repeats=repeats, batch_size=batch_size)
    return _unflat(out, unravel, batched)


# ------------------------------------------------------------------------- Arnoldi

def arnoldi_start(dim: int, num_iters: int, key, dtype):
    """The state ``(basis, T (num_iters + 1, num_iters))`` of an Arnoldi run before
    its first step: the basis ``(num_iters + 1, dim)`` as a tuple of row blocks
    (:func:`_basis_blocks`), the start vector (hashed from ``key``, counter 0),
    normalised, in row 0; zeros elsewhere."""
    q0 = seeded_normal(derive_key(key, 0), dim, dtype)
    blocks = [jnp.zeros((r, dim), dtype) for r in _basis_blocks(num_iters + 1, dim, dtype)]
    blocks[0] = blocks[0].at[0].set(q0 / jnp.linalg.norm(q0))
    return tuple(blocks), jnp.zeros((num_iters + 1, num_iters), dtype)


def arnoldi_basis(carry):
    """``(Q (num_iters, dim), T (num_iters, num_iters))`` of a finished run's state."""
    blocks, hess = carry
    basis = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)
    return basis[:-1], hess[:-1]


#: Bytes of an Arnoldi basis above which it is held in :data:`PASS_BLOCKS` row blocks
#: and a step's passes read only the blocks that hold its vectors so far: a basis
#: beyond the CPU's cache is streamed from memory four times a step, and a step j
#: reads rows 0..j only (:func:`arnoldi_steps`).
PASS_BLOCK_BYTES = 16 * 2**20
PASS_BLOCKS = 4


def _basis_blocks(size: int, dim: int, dtype) -> tuple:
    """The row counts of the blocks an Arnoldi basis of ``size`` rows is held in: one
    block where the basis takes at most :data:`PASS_BLOCK_BYTES`, else
    :data:`PASS_BLOCKS` blocks of ⌈size / PASS_BLOCKS⌉ rows (the last one what is
    left)."""
    blocks = PASS_BLOCKS
    if size * dim * jnp.dtype(dtype).itemsize <= PASS_BLOCK_BYTES or size < 2 * blocks:
        return (size,)
    r = -(-size // blocks)
    return tuple(min(r, size - k * r) for k in range(blocks) if size > k * r)


def _block_row(blocks, i):
    """Row ``i`` (traced) of the basis held as ``blocks``."""
    if len(blocks) == 1:
        return blocks[0][i]
    r = blocks[0].shape[0]
    out = blocks[0][jnp.clip(i, 0, r - 1)]
    for k, b in enumerate(blocks[1:], 1):
        out = jnp.where(i >= k * r, b[jnp.clip(i - k * r, 0, b.shape[0] - 1)], out)
    return out


def _set_block_row(blocks, i, x):
    """``blocks`` with row ``i`` (traced) of the basis set to ``x``, each block
    updated in place."""
    if len(blocks) == 1:
        return (blocks[0].at[i].set(x),)
    r = blocks[0].shape[0]
    out = []
    for k, b in enumerate(blocks):
        local = jnp.clip(i - k * r, 0, b.shape[0] - 1)
        inside = (i >= k * r) & (i < k * r + b.shape[0])
        out.append(b.at[local].set(jnp.where(inside, x, b[local])))
    return tuple(out)


def _block_passes(p: int, blocks, v, active):
    """``(coefficients (size,), w)``: v orthogonalised against the basis's rows by
    classical Gram-Schmidt run twice (twice is enough, Giraud et al., 2005), reading
    only ``blocks[:p + 1]`` (the later ones are zero); rows where ``active`` is 0
    take no part."""
    used = blocks[:p + 1]
    masks = jnp.split(active, np.cumsum([b.shape[0] for b in blocks])[:-1])
    first = [(b @ v) * m for b, m in zip(used, masks)]
    w = v - sum(c @ b for c, b in zip(first, used))
    second = [(b @ w) * m for b, m in zip(used, masks)]
    w = w - sum(c @ b for c, b in zip(second, used))
    coefs = [c1 + c2 for c1, c2 in zip(first, second)]
    coefs += [jnp.zeros((b.shape[0],), v.dtype) for b in blocks[p + 1:]]
    return (coefs[0] if len(coefs) == 1 else jnp.concatenate(coefs)), w


def arnoldi_steps(matvec, carry, js, key):
    """The state of an Arnoldi run (:func:`arnoldi_start`) after its steps ``js``
    (``(s,)`` int32, in order, each below ``num_iters``): a run may be taken in several
    calls, ``js`` a slice of ``arange(num_iters)`` each, with the results of one.

    Arnoldi with full (twice-repeated) reorthogonalisation: after ``num_iters`` steps
    the basis ``Q`` ``(num_iters, dim)`` and the projected matrix
    ``T = Q A Qᵀ`` ``(num_iters, num_iters)`` (:func:`arnoldi_basis`). On breakdown
    (the Krylov space is invariant) a fresh random vector orthogonal to the basis
    continues the run, with a zero sub-diagonal entry, so the decomposition stays
    exact. The start vector (counter 0) and the restart of step j (counter j + 1) are
    hashed from the key
    (:func:`jattri.func.projection.seeded_normal`), not drawn by threefry, whose three
    call sites here were a large part of the program's compilation.

    Each step orthogonalises in a loop of at most two rounds: A q_j, then, only on
    breakdown, the fresh vector, through the same two passes over the basis. So the
    restart reads the basis only when it happens (computing it at every step read the
    whole basis twice more per step: 100 steps at d = 109,386, dattri's MNIST MLP,
    1.2-1.5 s → 0.6 s), and the passes are compiled once: as a branch of their own
    (``lax.cond``) they made the fit's XLA compilation on dattri's LR 0.76-0.85 s instead
    of 0.46-0.61 s (``benchmarks/RESULTS.md``). The fresh vector is hashed only in the
    second round (a ``lax.cond`` around its generation alone): hashed in every step, 100
    steps at d = 109,386 with a diagonal product took 0.49-0.63 s instead of 0.45-0.48 s.

    A basis larger than :data:`PASS_BLOCK_BYTES` is held in row blocks, and step j's
    passes read only the blocks that hold rows 0..j (a ``lax.switch`` over the block
    of row j; the rows after j are zero): on dattri's MLP (a 101 × 109,386 float32
    basis, 44 MB; 5,000 examples) the compiled Arnoldi call took 2.48 s against 2.73 s
    with the basis whole (medians of 12 calls in alternated processes), its fit's XLA
    compilation 1.55 s against 1.35 s (``benchmarks/RESULTS.md``).
    """
    blocks, hess = carry
    num_iters, dim = hess.shape[1], blocks[0].shape[1]
    dtype = blocks[0].dtype
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny
    passes = [partial(_block_passes, p) for p in range(len(blocks))]

    def step(carry, j):
        blocks, hess = carry
        active = (jnp.arange(num_iters + 1) <= j).astype(dtype)
        w0 = matvec(_block_row(blocks, j))

        def orthogonalise(state):
            """Round 0: A q_j; round 1 (on breakdown): the fresh vector. The
            coefficients kept are round 0's, the column of T."""
            rounds, _, _, coef, _ = state
            v = jax.lax.cond(rounds == 0, lambda: w0,
                             lambda: seeded_normal(derive_key(key, j + 1), dim, dtype))
            if len(passes) == 1:
                coefs, w = passes[0](blocks, v, active)
            else:  # the blocks that hold rows 0..j
                coefs, w = jax.lax.switch(j // blocks[0].shape[0], passes, blocks, v, active)
            beta = jnp.linalg.norm(w)
            broke = beta <= 100 * eps * jnp.maximum(jnp.linalg.norm(v), tiny)
            return (rounds + 1, w, beta, jnp.where(rounds == 0, coefs, coef), broke)

        start = (jnp.zeros((), jnp.int32), w0, jnp.zeros((), dtype),
                 jnp.zeros((num_iters + 1,), dtype), jnp.zeros((), bool))
        rounds, w, beta, coef, _ = jax.lax.while_loop(
            lambda state: (state[0] == 0) | ((state[0] == 1) & state[4]), orthogonalise,
            start)
        restarted = rounds > 1
        coef = coef.at[j + 1].set(jnp.where(restarted, 0.0, beta))
        nxt = w / jnp.maximum(beta, tiny)
        return (_set_block_row(blocks, j + 1, nxt), hess.at[:, j].set(coef)), None

    return jax.lax.scan(step, (blocks, hess), js)[0]


def arnoldi_sizes(rank: int, num_iters: Optional[int], dim: int, *, who: str,
                  stacklevel: int = 2) -> tuple:
    """Validate ``(rank, num_iters)`` for a ``dim``-dimensional Arnoldi run.

    ``rank > dim`` is clipped to ``dim`` with a ``warnings.warn``; ``num_iters``
    defaults to ``max(2·rank, rank + 20)`` and is clipped to ``dim``.
    """
    import warnings
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}")
    if rank > dim:
        warnings.warn(f"{who}: `rank`={rank} exceeds the number of parameters {dim}; "
                      f"clipped to {dim}", stacklevel=stacklevel + 1)
        rank = dim
    iters = max(2 * rank, rank + 20) if num_iters is None else int(num_iters)
    iters = min(iters, dim)
    if iters < rank:
        raise ValueError(f"`num_iters`={iters} must be >= `rank`={rank}")
    return rank, iters


def arnoldi_eigenpairs(matvec: Callable, dim: int, *, rank: int, num_iters: Optional[int] = None,
                       key: Optional[jax.Array] = None, dtype=jnp.float32):
    """Top-``rank`` eigenpairs of a symmetric operator by Arnoldi (Schioppa et al., 2022,
    "Scaling Up Influence Functions"): ``num_iters`` Krylov steps with full
    reorthogonalisation, then the eigendecomposition of the projected matrix is
    distilled to its ``rank`` largest eigenvalues.

    ``rank`` (and ``num_iters``) larger than ``dim`` are clipped to ``dim`` with a
    ``warnings.warn``. With ``num_iters = rank = dim`` the result is the full
    eigendecomposition.

    Args:
      matvec: ``x (dim,) -> A x``, A symmetric. dim: size. rank: eigenpairs kept.
      num_iters: Krylov steps (≥ rank); default ``min(dim, max(2·rank, rank + 20))``.
      key: PRNG key of the start vector (default ``PRNGKey(0)``). dtype: float dtype.
    Returns:
      ``(eigvals (rank,), eigvecs (dim, rank))``, eigenvalues in decreasing order,
      eigenvectors as orthonormal COLUMNS.
    """
    dim = int(dim)
    rank, num_iters = arnoldi_sizes(rank, num_iters, dim, who="Arnoldi", stacklevel=3)
    key = jax.random.PRNGKey(0) if key is None else key
    return arnoldi_top(arnoldi_steps(matvec, arnoldi_start(dim, num_iters, key, dtype),
                                     jnp.arange(num_iters), key), rank)


def arnoldi_top(carry, rank: int):
    """``(eigvals (rank,), eigvecs (dim, rank))`` of a finished Arnoldi run's state
    (:func:`arnoldi_steps`): the eigendecomposition of its projected matrix, distilled
    to the ``rank`` largest eigenvalues (decreasing), the eigenvectors as columns."""
    basis, proj = arnoldi_basis(carry)
    proj = 0.5 * (proj + proj.T)  # A is symmetric; T is tridiagonal up to round-off
    w, u = jnp.linalg.eigh(proj)
    w, u = w[::-1][:rank], u[:, ::-1][:, :rank]
    return w, tmatmul(basis, u)


def arnoldi_inverse_weights(eigvals: jax.Array, damping: float, tol: float) -> jax.Array:
    """1/(μ + λ) for kept eigenvalues, 0 for dropped ones.

    A damped eigenvalue μ + λ is dropped when it is ≤ tol · max(μ + λ) or ≤ 0
    (non-positive curvature has no meaningful inverse): the result is the
    pseudo-inverse of H + λI restricted to the kept eigenvectors, never inf/NaN. Where
    H + λI is positive definite (the only case ``ihvp_explicit`` accepts) nothing above
    the tolerance is dropped, so both agree.
    """
    damped = eigvals + damping
    keep = (damped > tol * jnp.maximum(jnp.max(damped), 0.0)) & (damped > 0)
    return jnp.where(keep, 1.0 / jnp.where(keep, damped, 1.0), 0.0)


@partial(jit, static_argnums=(5, 6, 7))
def _arnoldi_ihvp_jit(flat_f, theta, flat_v, key, damping, rank, num_iters, tol):
    eigvals, eigvecs = arnoldi_eigenpairs(lambda x: hvp(flat_f, theta, x), theta.shape[0],
                                          rank=rank, num_iters=num_iters, key=key,
                                          dtype=theta.dtype)
    weights = arnoldi_inverse_weights(eigvals, damping, tol)
    return ((flat_v @ eigvecs) * weights) @ eigvecs.T


def ihvp_arnoldi(f: Callable, params: PyTree, v: PyTree, *, rank: int,
                 num_iters: Optional[int] = None, damping: float = 0.0, tol: float = 1e-6,
                 key: Optional[jax.Array] = None) -> PyTree:
    """(H + λI)⁺ v ≈ V diag(1/(μ + λ)) Vᵀ v on the top-``rank`` eigenpairs (μ, V) of H
    found by Arnoldi on HVPs (``arnoldi_eigenpairs``).

    Damped eigenvalues μ + λ ≤ ``tol``·max(μ + λ), and non-positive ones, are dropped
    (their directions contribute 0): on a singular H with λ = 0 this is the
    pseudo-inverse, never NaN. A ``rank``
    above the number of parameters is clipped with a warning. With full rank (and no
    dropped eigenvalue) it equals ``ihvp_explicit``.

    Args:
      f: scalar function of params. v: pytree like params, optionally batched.
      rank: eigenpairs kept. num_iters: Krylov steps. damping: λ ≥ 0.
      tol: relative eigenvalue cut-off. key: start-vector key.
    Returns:
      pytree like ``v``.
    """
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}")
    theta, flat_f, flat_v, unravel, batched = _flat(f, params, v)
    import warnings
    d = theta.shape[0]
    if int(rank) > d:
        warnings.warn(f"Arnoldi `rank`={rank} exceeds the number of parameters {d}; "
                      f"clipped to {d}", stacklevel=2)
        rank = d

    out = _arnoldi_ihvp_jit(flat_f, theta, flat_v, jax.random.PRNGKey(0) if key is None else key,
                            damping, rank, num_iters, tol)
    return _unflat(out, unravel, batched)
