"""Johnson–Lindenstrauss random projections, generated from a key chunk by chunk.

Every projector here maps ``x: (n, d) -> x P: (n, k)`` and is scaled so that inner
products are preserved in expectation, ``E[<xP, yP>] = <x, y>``. Row ``r`` of ``P``
is drawn from ``fold_in(key, r)``, so the matrix depends on the key only: applying it
in chunks of any size gives the same result, and no dense ``d × k`` matrix is ever
held whole (peak memory ``chunk_size × k``).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 4096


def keyed_projection(row_fn: Callable[[jax.Array], jax.Array], key: jax.Array, d: int,
                     k: int, *, chunk_size: Optional[int] = DEFAULT_CHUNK) -> Callable:
    """Build ``x -> x P`` where row r of P is ``row_fn(fold_in(key, r))``, shape ``(k,)``.

    ``chunk_size`` rows of P are generated at a time (``None``: all ``d`` at once).
    """
    d, k = int(d), int(k)
    if d <= 0 or k <= 0:
        raise ValueError(f"projection sizes must be positive, got d={d}, k={k}")
    chunk = d if chunk_size is None else max(1, min(int(chunk_size), d))
    n_chunks = -(-d // chunk)
    rows_of = jax.vmap(lambda r: row_fn(jax.random.fold_in(key, r)))

    def apply(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        squeeze = x.ndim == 1
        x = jnp.atleast_2d(x)
        if x.shape[-1] != d:
            raise ValueError(f"projection input must have last axis {d}, got shape {x.shape}")
        pad = n_chunks * chunk - d
        xb = jnp.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], n_chunks, chunk)

        def step(acc, c):
            rows = c * chunk + jnp.arange(chunk)
            block = rows_of(rows).astype(x.dtype)  # (chunk, k)
            block = jnp.where((rows < d)[:, None], block, 0)
            xc = jax.lax.dynamic_index_in_dim(xb, c, axis=1, keepdims=False)
            return acc + xc @ block, None

        acc0 = jnp.zeros((x.shape[0], k), x.dtype)
        out, _ = jax.lax.scan(step, acc0, jnp.arange(n_chunks))
        return out[0] if squeeze else out

    return apply


def gaussian_projection(key: jax.Array, d: int, k: int, *,
                        chunk_size: Optional[int] = DEFAULT_CHUNK) -> Callable:
    """Gaussian JL projector: P_rj ~ N(0, 1/k), so ``E[<xP, yP>] = <x, y>``.

    Args:
      key: PRNG key; the same key gives the same P. d: input dim. k: output dim.
      chunk_size: rows of P generated at a time.
    Returns:
      ``apply(x)`` mapping ``(n, d)`` (or ``(d,)``) to ``(n, k)`` (or ``(k,)``).
    """
    scale = 1.0 / jnp.sqrt(k)
    return keyed_projection(lambda kr: scale * jax.random.normal(kr, (k,)), key, d, k,
                            chunk_size=chunk_size)
