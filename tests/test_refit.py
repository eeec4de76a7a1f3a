"""RPS's refit (L-BFGS with a backtracking line search) against Newton's method in
float64, and in float32 down to the tolerance (the line search's rounding allowance)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri.methods.rps  # noqa: F401  (the module, not the factory of the same name)

rps = sys.modules["jattri.methods.rps"]


def _newton_optimum(f, p, l2):
    """argmin (1/n) Σ CE(softmax(f W), p) + l2 ‖W‖² by Newton's method in float64 numpy
    with the exact Hessian, to ‖∇‖ < 1e-13: the obviously-correct reference."""
    n, d = f.shape
    c = p.shape[1]
    w = np.zeros((d, c))
    for _ in range(100):
        z = f @ w
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        g = f.T @ (q - p) / n + 2 * l2 * w
        if np.linalg.norm(g) < 1e-13:
            break
        # Σ_i (f_i f_iᵀ) ⊗ (diag q_i − q_i q_iᵀ), W raveled row-major: entry ((a, k),
        # (b, l)) = Σ_i f_ia f_ib (q_ik δ_kl − q_ik q_il)
        z = (f[:, :, None] * q[:, None, :]).reshape(n, d * c)
        diag = np.zeros((d, c, d, c))
        for k in range(c):
            diag[:, k, :, k] = (f * q[:, k:k + 1]).T @ f
        diag = diag.reshape(d * c, d * c)
        h = (diag - z.T @ z) / n + 2 * l2 * np.eye(d * c)
        w = w - np.linalg.solve(h, g.reshape(-1)).reshape(d, c)
    return w


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_refit_equals_newton_optimum(x64, l2):
    rng = np.random.default_rng(1)
    f = rng.standard_normal((60, 5))
    logits = rng.standard_normal((60, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # soft targets
    w, gnorm = rps.refit_last_layer(jnp.asarray(f), jnp.asarray(p), l2, tol=1e-10)
    want = _newton_optimum(f, p, l2)
    np.testing.assert_allclose(w, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    assert float(gnorm) <= 1e-10


def test_refit_float32_reaches_the_tolerance():
    """In float32 the objective's changes near the optimum are below its rounding: the
    line search accepts them within 1e-6 of f and the refit ends at ‖∇‖ ≤ 1e-6, at the
    float64 optimum to float32 accuracy. Without that allowance (optax's ``rtol=0``)
    the search stalls above the tolerance and this test fails, as does the float64 one
    at ``l2=0.1``."""
    rng = np.random.default_rng(2)
    n, d, c, l2 = 2000, 64, 10, 3e-3
    f = rng.random((n, d)).astype(np.float32)
    p = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]

    w, gnorm = jax.jit(lambda f, p: rps.refit_last_layer(f, p, l2, tol=1e-6))(f, p)
    assert w.dtype == jnp.float32 and float(gnorm) <= 1e-6
    want = _newton_optimum(f.astype(np.float64), p.astype(np.float64), l2)
    np.testing.assert_allclose(np.asarray(w), want, rtol=0, atol=1e-4 * np.abs(want).max())


def _two_loop(g, pairs, gamma):
    """Nocedal & Wright's Algorithm 7.4 in float64 numpy: −H g from (s, y) pairs listed
    oldest first, H₀ = γI. The obviously-correct reference of the compact form."""
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (s @ y)
        q -= alpha * y
        alphas.append(alpha)
    r = gamma * q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += s * (alpha - (y @ r) / (s @ y))
    return -r


@pytest.mark.parametrize("stored", [0, 1, 4, 7, 11, 19])
def test_compact_direction_equals_the_two_loop_recursion(x64, stored):
    """The refit's compact-form direction with a circular history of m = 7 slots, empty
    (0), partly filled (1, 4), full (7) and after the history wrapped (11, 19: the
    newest pairs overwrite the oldest slots), equals the two-loop recursion over the
    last min(stored, m) pairs."""
    rng = np.random.default_rng(stored)
    m, dim = 7, 12
    a = rng.standard_normal((dim, dim))
    hess = a @ a.T + dim * np.eye(dim)  # SPD, so every pair has sᵀy > 0
    history = [(s, hess @ s) for s in rng.standard_normal((stored, dim))]
    pairs = np.zeros((2 * m, dim))
    for i, (s, y) in enumerate(history):  # pair i goes to slot i mod m
        pairs[i % m], pairs[m + i % m] = s, y
    sy, yy = pairs[:m] @ pairs[m:].T, pairs[m:] @ pairs[m:].T
    gamma = 0.37
    g = rng.standard_normal(dim)
    got = rps._compact_direction(jnp.asarray(g), jnp.asarray(pairs), jnp.asarray(sy),
                                 jnp.asarray(yy), stored, gamma)
    want = _two_loop(g, history[-m:] if stored else [], gamma)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
