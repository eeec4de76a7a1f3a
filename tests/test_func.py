"""jattri.func primitives against slow, obviously-correct references (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jattri.func import (gaussian_projection, hvp, ihvp_cg, ihvp_explicit,
                         per_example_grads)


def mlp_params(key, d_in=3, h=4, d_out=2):
    k1, k2 = jax.random.split(key)
    return {"l1": {"w": jax.random.normal(k1, (d_in, h)), "b": jnp.zeros(h) + 0.1},
            "l2": {"w": jax.random.normal(k2, (h, d_out))}}


def mlp_loss(p, z):
    x, y = z
    logits = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]
    return -jax.nn.log_softmax(logits)[y]


def data(key, n=13, d_in=3):
    x = jax.random.normal(key, (n, d_in))
    return x, (x[:, 0] > 0).astype(jnp.int32)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 13, 50])
def test_per_example_grads_matches_python_loop(x64, chunk_size):
    params = mlp_params(jax.random.PRNGKey(0))
    x, y = data(jax.random.PRNGKey(1))
    got = per_example_grads(mlp_loss, params, (x, y), chunk_size=chunk_size)
    want = np.stack([ravel_pytree(jax.grad(mlp_loss)(params, (x[i], y[i])))[0]
                     for i in range(len(x))])
    assert got.shape == want.shape == (13, ravel_pytree(params)[0].size)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _mean_loss(params, x, y):
    return jnp.mean(jax.vmap(lambda a, b: mlp_loss(params, (a, b)))(x, y))


def test_hvp_matches_dense_hessian(x64):
    params = mlp_params(jax.random.PRNGKey(0))
    x, y = data(jax.random.PRNGKey(1))
    f = lambda p: _mean_loss(p, x, y)
    theta, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(2), theta.shape)
    dense = jax.hessian(lambda t: f(unravel(t)))(theta)
    got = ravel_pytree(hvp(f, params, unravel(v)))[0]
    np.testing.assert_allclose(got, dense @ v, rtol=1e-10, atol=1e-12)


def _quadratic_problem(key, d=7):
    a = jax.random.normal(key, (d, d))
    h = a @ a.T / d + 0.5 * jnp.eye(d)
    params = {"u": jnp.zeros(3), "w": jnp.zeros((2, 2))}
    _, unravel = ravel_pytree(params)
    f = lambda p: 0.5 * ravel_pytree(p)[0] @ h @ ravel_pytree(p)[0]
    return h, params, unravel, f


@pytest.mark.parametrize("batched", [False, True])
def test_ihvps_match_solve(x64, batched):
    h, params, unravel, f = _quadratic_problem(jax.random.PRNGKey(3))
    damping = 0.3
    vs = jax.random.normal(jax.random.PRNGKey(4), (5, 7))
    v = jax.vmap(unravel)(vs) if batched else unravel(vs[0])
    want = np.linalg.solve(np.asarray(h) + damping * np.eye(7), np.asarray(vs).T).T
    want = want if batched else want[0]
    flat = (lambda t: jax.vmap(lambda x: ravel_pytree(x)[0])(t)) if batched else (
        lambda t: ravel_pytree(t)[0])
    for got in (ihvp_explicit(f, params, v, damping=damping),
                ihvp_cg(f, params, v, damping=damping, maxiter=200, tol=1e-12)):
        np.testing.assert_allclose(flat(got), want, rtol=1e-8, atol=1e-10)


def test_ihvp_on_mlp_hessian(x64):
    params = mlp_params(jax.random.PRNGKey(0))
    x, y = data(jax.random.PRNGKey(1), n=30)
    f = lambda p: _mean_loss(p, x, y)
    theta, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda t: f(unravel(t)))(theta))
    damping = 1.0 - min(0.0, np.linalg.eigvalsh(dense).min())  # positive definite
    v = jax.random.normal(jax.random.PRNGKey(5), theta.shape)
    want = np.linalg.solve(dense + damping * np.eye(len(v)), v)
    got_e = ravel_pytree(ihvp_explicit(f, params, unravel(v), damping=damping))[0]
    got_c = ravel_pytree(ihvp_cg(f, params, unravel(v), damping=damping, tol=1e-12,
                                 maxiter=500))[0]
    np.testing.assert_allclose(got_e, want, rtol=1e-8)
    np.testing.assert_allclose(got_c, want, rtol=1e-6)


def test_ihvp_explicit_singular_raises(x64):
    params = {"w": jnp.zeros(3)}
    f = lambda p: (p["w"][0] + p["w"][1]) ** 2  # rank-1 Hessian
    with pytest.raises(ValueError, match="damping"):
        ihvp_explicit(f, params, {"w": jnp.ones(3)}, damping=0.0)


def test_ihvp_rejects_mismatched_vector():
    params = {"w": jnp.zeros(3)}
    f = lambda p: jnp.sum(p["w"] ** 2)
    with pytest.raises(ValueError, match="shape"):
        ihvp_cg(f, params, {"w": jnp.ones(4)}, damping=0.1)


def test_gaussian_projection_preserves_inner_products(x64):
    d, k, n = 3000, 1024, 6
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d))
    proj = gaussian_projection(jax.random.PRNGKey(1), d, k)
    px = proj(x)
    assert px.shape == (n, k)
    gram, pgram = np.asarray(x @ x.T), np.asarray(px @ px.T)
    norms = np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    # JL: |<Px,Py> - <x,y>| <= eps ‖x‖‖y‖ with eps ~ c·sqrt(log(n²)/k); 5 sigma ≈ 0.16.
    assert np.max(np.abs(pgram - gram) / norms) < 5 / np.sqrt(k)


def test_gaussian_projection_unbiased_and_chunk_invariant(x64):
    d, k = 50, 8
    x = jax.random.normal(jax.random.PRNGKey(0), (2, d))
    key = jax.random.PRNGKey(7)
    full = gaussian_projection(key, d, k, chunk_size=None)(x)
    for chunk in (1, 7, 16, 50, 1000):
        np.testing.assert_allclose(gaussian_projection(key, d, k, chunk_size=chunk)(x), full,
                                   rtol=1e-12, atol=1e-12)
    # Unbiased: average <Px, Py> over many keys approaches <x, y>.
    est = np.mean([float(jnp.prod(gaussian_projection(jax.random.PRNGKey(s), d, k)(x), 0).sum())
                   for s in range(400)])
    exact = float(x[0] @ x[1])
    scale = float(jnp.linalg.norm(x[0]) * jnp.linalg.norm(x[1]))
    assert abs(est - exact) < 4 * scale * np.sqrt(2 / k / 400)


def test_projection_rejects_bad_shapes():
    proj = gaussian_projection(jax.random.PRNGKey(0), 10, 4)
    with pytest.raises(ValueError, match="projection input must have shape"):
        proj(jnp.ones((3, 11)))
    with pytest.raises(ValueError, match="positive"):
        gaussian_projection(jax.random.PRNGKey(0), 0, 4)
