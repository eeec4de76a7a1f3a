"""Block CG (``jattri.func.hessian.block_cg_solve``) and ``influence_cg``'s ``block``,
against float64 solves."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from jattri.func.hessian import block_cg_solve, cg_solve


@pytest.fixture(autouse=True)
def _float64(x64):
    """Every test here in float64 (conftest's ``x64``), float32 where asked."""
    yield


def _spd(d, top, seed=0):
    """A symmetric positive-definite matrix: `len(top)` outlying eigenvalues `top`,
    the others spread over [1, 2]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = np.concatenate([np.asarray(top, float), 1 + rng.random(d - len(top))])
    return (q * w) @ q.T


def test_block_cg_solves_every_row_to_the_float64_solution():
    a = _spd(40, [50.0, 200.0, 900.0])
    b = np.random.default_rng(1).standard_normal((10, 40))
    want = np.linalg.solve(a, b.T).T
    aj = jnp.asarray(a)
    for block in (None, 1, 3, 4, 10):
        got = np.asarray(block_cg_solve(lambda v: v @ aj, jnp.asarray(b), maxiter=200,
                                        tol=1e-13, block=block))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=str(block))


def test_a_block_solves_in_fewer_products_than_one_cg_per_row():
    """With 6 outlying eigenvalues and 8 right-hand sides the block's shared Krylov
    space takes the outliers out for every row: after 5 steps each row's residual is
    below 1e-3 (4.6e-4 measured), where 5 steps of plain CG per row leave one above 1
    (3.05)."""
    a = _spd(60, [30.0, 80.0, 150.0, 400.0, 700.0, 1000.0], seed=2)
    b = np.random.default_rng(3).standard_normal((8, 60))
    aj, bj = jnp.asarray(a), jnp.asarray(b)

    def residual(x):
        return np.max(np.linalg.norm(b - np.asarray(x) @ a, axis=1) / np.linalg.norm(b, axis=1))

    assert residual(block_cg_solve(lambda v: v @ aj, bj, maxiter=5, tol=0.0)) < 1e-3
    assert residual(cg_solve(lambda v: aj @ v, bj, maxiter=5, tol=0.0)) > 1.0


def test_zero_and_repeated_rows():
    """Zero rows (padding) stay zero; a block with repeated rows (rank-deficient) does
    not break down: its duplicate directions are dropped."""
    a = _spd(30, [100.0])
    rng = np.random.default_rng(4)
    base = rng.standard_normal((3, 30))
    b = np.concatenate([base, base, np.zeros((2, 30)), 2 * base[:1]])   # 9 rows, rank 3
    got = np.asarray(block_cg_solve(lambda v: v @ jnp.asarray(a), jnp.asarray(b),
                                    maxiter=100, tol=1e-12))
    np.testing.assert_allclose(got, np.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-10)
    assert np.all(got[6:8] == 0)


def test_an_indefinite_matrix_gives_nan():
    a = _spd(20, [10.0])
    a -= 3.0 * np.eye(20)                     # eigenvalues in [-2, -1] and 7
    b = np.random.default_rng(5).standard_normal((4, 20))
    got = np.asarray(block_cg_solve(lambda v: v @ jnp.asarray(a), jnp.asarray(b),
                                    maxiter=50, tol=1e-10))
    assert np.all(np.isnan(got))


def test_float32_block_stops_at_its_tolerance():
    """float32, condition number 1,000, 40 outlying eigenvalues, 32 right-hand sides:
    with the second A-orthonormalisation pass the block reaches ``tol=1e-5`` in 13
    steps (a single pass does not stop within 20: it runs into the 2·d stop at 21, and
    without that stop needed 50) and is within 1e-3 of the float64 solution (4.9e-5
    measured); plain CG after 20 steps is 0.14 away."""
    a = _spd(300, np.geomspace(5.0, 1000.0, 40), seed=6)
    b = np.random.default_rng(7).standard_normal((32, 300))
    want = np.linalg.solve(a, b.T).T
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    def err(x):
        return np.max(np.abs(np.asarray(x, np.float64) - want)) / np.max(np.abs(want))

    def solve(k):
        return np.asarray(block_cg_solve(lambda v: v @ a32, b32, maxiter=k, tol=1e-5))

    assert np.array_equal(solve(20), solve(21))          # it stopped within 20 steps
    assert err(solve(20)) < 1e-3
    assert err(cg_solve(lambda v: a32 @ v, b32, maxiter=20, tol=1e-5)) > 1e-2


def test_block_cg_refuses_an_unbatched_rhs():
    with pytest.raises(ValueError, match=r"b must be \(k, d\)"):
        block_cg_solve(lambda v: v, jnp.ones(3), maxiter=2, tol=1e-6)


def _problem(seed=0, n=40, d_in=5, classes=3):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((d_in, classes)) * 0.5),
              "b": jnp.asarray(rng.standard_normal(classes) * 0.1)}
    x = jnp.asarray(rng.standard_normal((n, d_in)))
    y = jnp.asarray(rng.integers(0, classes, n))
    xt = jnp.asarray(rng.standard_normal((7, d_in)))
    yt = jnp.asarray(rng.integers(0, classes, 7))

    def loss(p, z):
        xi, yi = z
        return -jax.nn.log_softmax(xi @ p["w"] + p["b"])[yi]
    return loss, params, (x, y), (xt, yt)


def test_influence_cg_blocks_equal_explicit_influence():
    """Every block size gives explicit influence's scores (float64, converged), with
    the test side split over several blocks (7 test examples, blocks of 1, 2, 3, 128)
    and the train side's systems (``self_attribute``)."""
    loss, params, train, test = _problem()
    exact = jattri.influence_explicit(loss, damping=0.05)
    st = exact.cache(params, train)
    want, want_self = np.asarray(exact.attribute(st, test)), np.asarray(exact.self_attribute(st))
    for block in (1, 2, 3, 128):
        attr = jattri.influence_cg(loss, damping=0.05, maxiter=300, tol=1e-12, block=block)
        s = attr.cache(params, train)
        np.testing.assert_allclose(np.asarray(attr.attribute(s, test)), want,
                                   rtol=1e-7, atol=1e-9, err_msg=str(block))
        np.testing.assert_allclose(np.asarray(attr.self_attribute(s)), want_self,
                                   rtol=1e-7, atol=1e-9, err_msg=str(block))


@pytest.mark.parametrize("value, err, match", [
    (0, ValueError, "`block` must be an int >= 1"),
    (2.0, TypeError, "`block` must be an int"),
    ("8", TypeError, "`block` must be an int"),
])
def test_influence_cg_checks_block(value, err, match):
    loss, *_ = _problem()
    with pytest.raises(err, match=match):
        jattri.influence_cg(loss, block=value)


def test_block_cg_stops_once_it_has_searched_twice_the_dimension():
    """float32 at condition number 10⁴ with ``tol=0`` (out of reach): the block stops
    once its directions number 2·d (40 unknowns, 8 rows: 14 steps, fewer than 8
    directions kept in some), not at ``maxiter``; without that stop it was still
    running after 59 steps. Its answer is at float32's reach of the float64 solution
    (9.7e-4 measured; 4.5e-4 after 1,000 steps without the stop)."""
    a = _spd(40, np.geomspace(10.0, 1e4, 6), seed=9)
    b = np.random.default_rng(10).standard_normal((8, 40))
    want = np.linalg.solve(a, b.T).T
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    solve = lambda k: np.asarray(block_cg_solve(lambda v: v @ a32, b32, maxiter=k, tol=0.0))
    assert np.array_equal(solve(20), solve(1000))
    assert not np.array_equal(solve(5), solve(1000))
    assert np.max(np.abs(solve(1000) - want)) / np.max(np.abs(want)) < 5e-3
