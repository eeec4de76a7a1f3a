"""Hessian-vector products and inverse-Hessian-vector products (IHVPs).

All functions take a scalar function ``f(params)`` (typically the mean training loss)
and work for any params pytree. Vectors ``v`` are pytrees shaped like ``params``; an
extra leading axis on every leaf means a batch of vectors.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

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
    """Flatten ``f`` and ``v``; report whether ``v`` carries a batch axis."""
    theta, unravel = ravel_pytree(params)
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
    flat_f = lambda t: f(unravel(t))
    return theta, flat_f, flat_v, unravel, batched


def _unflat(x, unravel, batched):
    return jax.vmap(unravel)(x) if batched else unravel(x)


def dense_hessian(f: Callable, theta: jax.Array) -> jax.Array:
    """The ``(d, d)`` Hessian of scalar ``f`` at flat ``theta`` (d HVPs)."""
    return jax.hessian(f)(theta)


def damped_inverse(h: jax.Array, damping: float, *, what: str = "Hessian") -> jax.Array:
    """``(H + λI)⁻¹`` for symmetric ``(d, d)`` ``H`` by eigendecomposition.

    Raises ``ValueError`` when ``H + λI`` is singular or indefinite (an eigenvalue
    ≤ 1e-12 · max|eigenvalue|), instead of returning inf/NaN: pass a larger damping.
    """
    h = 0.5 * (h + h.T)
    w, q = jnp.linalg.eigh(h)
    w = w + damping
    scale = float(jnp.max(jnp.abs(w)))
    wmin = float(jnp.min(w))
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"the {what} has non-finite entries")
    if wmin <= 1e-12 * max(scale, 1e-30):
        raise ValueError(
            f"{what} + damping*I is singular or indefinite (smallest eigenvalue "
            f"{wmin:.3g} with damping={damping}); increase `damping`")
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
    inv = damped_inverse(dense_hessian(flat_f, theta), damping)
    out = flat_v @ inv  # inv is symmetric
    return _unflat(out, unravel, batched)


def cg_solve(matvec: Callable, b: jax.Array, *, maxiter: Optional[int], tol: float) -> jax.Array:
    """Solve ``A x = b`` by conjugate gradients; ``b`` is ``(d,)`` or ``(k, d)`` (vmapped)."""
    solve = lambda rhs: jax.scipy.sparse.linalg.cg(matvec, rhs, tol=tol, maxiter=maxiter)[0]
    return jax.vmap(solve)(b) if b.ndim == 2 else solve(b)


def ihvp_cg(f: Callable, params: PyTree, v: PyTree, *, damping: float = 0.0,
            maxiter: Optional[int] = 100, tol: float = 1e-7) -> PyTree:
    """(H + λI)⁻¹ v by conjugate gradients on HVPs (``jax.scipy.sparse.linalg.cg``).

    H + λI must be positive definite (CG's requirement); for non-convex losses use a
    damping larger than minus the smallest Hessian eigenvalue.

    Args:
      f: scalar function of params. v: pytree like params, optionally batched.
      damping: λ ≥ 0. maxiter: CG iterations. tol: relative residual tolerance.
    Returns:
      pytree like ``v``.
    """
    theta, flat_f, flat_v, unravel, batched = _flat(f, params, v)
    matvec = lambda x: hvp(flat_f, theta, x) + damping * x
    out = cg_solve(matvec, flat_v, maxiter=maxiter, tol=tol)
    return _unflat(out, unravel, batched)
