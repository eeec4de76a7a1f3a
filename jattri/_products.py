"""xᵀy, written so that XLA's CPU backend runs it with YNNPACK.

jaxlib 0.10's CPU backend hands a matrix product to YNNPACK only when its left operand
is contracted along its last axis (and neither side is a vector). A product xᵀy as
written, a sum over the rows of two tall matrices (TRAK's kernel ΦᵀΦ, EK-FAC's
eigenvalue sums, block CG's rotations), contracts the left operand along its first
axis: XLA runs it with Eigen on oneDNN's kernels instead. The first oneDNN product
of a process JIT-generates its kernels, 25-48 ms on the 2-core machine whatever the
product's size, and on narrow products oneDNN is the slower (EK-FAC's (5,000 × 785)ᵀ ·
(5,000 × 10): 2.45 ms against 0.65 ms with YNNPACK and the copy); on TRAK's 512 × 512
kernel over 5,000 rows it is the faster in the steady state (20.0 against 22.6 ms),
a few ms a call against the generator's once (``benchmarks/RESULTS.md``, "Products
that XLA gave to oneDNN"). The smaller operand is therefore transposed in memory
first, behind an optimisation barrier (XLA folds a bare transpose back into the
product, whether it feeds the product or is taken of its result).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def transposed_copy(x: jax.Array) -> jax.Array:
    """``(..., b, a)``: x ``(..., a, b)`` with its last two axes swapped, in memory, for a
    product to read (a bare transpose feeding a product is folded into it)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def transposed_result(p: jax.Array) -> jax.Array:
    """``(..., b, a)``: the product p ``(..., a, b)`` transposed after it is made (a bare
    transpose of a product's result is folded into the product)."""
    return jnp.swapaxes(jax.lax.optimization_barrier(p), -1, -2)


def tmatmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """``(..., a, b)`` xᵀy = Σ_n x[..., n, :]ᵀ y[..., n, :] for x ``(..., n, a)`` and y
    ``(..., n, b)`` (leading axes batched). On the CPU, the operand with fewer columns
    is copied transposed first (n·min(a, b) floats per batch entry), so that the
    product is (a, n)·(n, b), or (b, n)·(n, a) transposed after; elsewhere the product
    as written."""
    if jax.default_backend() != "cpu":
        return jnp.swapaxes(x, -1, -2) @ y
    if x.shape[-1] <= y.shape[-1]:
        return transposed_copy(x) @ y
    return transposed_result(transposed_copy(y) @ x)
