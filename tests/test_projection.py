"""JL projections: scaling convention, JL distortion, chunk invariance, SJLT structure,
Kronecker-factored projection."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _jaxprs import nested
from jattri.func import projection as P

KINDS = ("gaussian", "rademacher", "sjlt")


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


def dense_matrix(kind, key, d, k, chunk_size=None):
    """P itself, recovered by projecting the identity (each row is one row of P)."""
    return np.asarray(P.random_projection(kind, key, d, k, chunk_size=chunk_size)(
        jnp.eye(d)))


def seeded_dense(kind, seed, d, k):
    """P of the projector of seed words ``seed``, recovered by projecting the identity."""
    return np.asarray(P.seeded_projection(kind, seed, d, k, chunk_size=None)(jnp.eye(d)))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    key = jax.random.PRNGKey(3)
    d, k = 53, 16
    x = jax.random.normal(jax.random.PRNGKey(1), (5, d))
    # Projecting [I; x]: the first d rows of the result are P itself.
    xs = jnp.concatenate([jnp.eye(d), x])
    whole = np.asarray(P.random_projection(kind, key, d, k, chunk_size=None)(xs))
    p_whole, out_whole = whole[:d], whole[d:]
    np.testing.assert_allclose(out_whole, np.asarray(x) @ p_whole, rtol=1e-12, atol=1e-12)
    for chunk in (1, 7, 500):
        out = np.asarray(P.random_projection(kind, key, d, k, chunk_size=chunk)(xs))
        # The matrix is the same whatever the chunking: the same keys draw the same
        # numbers (to the last bit, which the suite's classic XLA emitters may round
        # differently by position in the normal transform: 4e-16 relative) ...
        np.testing.assert_allclose(out[:d], p_whole, rtol=2e-15, atol=0)
        # ... so results differ only by the order of the floating-point sums.
        np.testing.assert_allclose(out[d:], out_whole, rtol=1e-12, atol=1e-12)
    # A single vector maps to a single vector.
    one = P.random_projection(kind, key, d, k, chunk_size=None)(x[0])
    np.testing.assert_allclose(one, out_whole[0], rtol=1e-12)
    # Another key, another matrix.
    assert not np.allclose(dense_matrix(kind, jax.random.PRNGKey(4), d, k), p_whole)


def jl_epsilon(num_points, k):
    """ε with k = 4 ln(m) / (ε²/2 − ε³/3) (Dasgupta & Gupta, 2003): all m points keep
    their squared norms within 1 ± ε with probability ≥ 1 − 1/m."""
    target = 4 * math.log(num_points) / k
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid ** 2 / 2 - mid ** 3 / 3 < target else (lo, mid)
    return hi


@pytest.mark.parametrize("kind", KINDS)
def test_jl_distortion_of_inner_products(kind):
    d, k, m = 1000, 256, 20
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(11), (m, d)))
    norms = np.linalg.norm(x, axis=1)
    gram = x @ x.T / np.outer(norms, norms)
    # Inner products of unit vectors u, v follow from the norms of u ± v (polarisation),
    # so the JL guarantee for the 2m² points u ± v bounds every |<uP, vP> − <u, v>| by ε.
    eps = jl_epsilon(2 * m * m, k)
    for seed in range(3):
        xp = np.asarray(P.random_projection(kind, jax.random.PRNGKey(seed), d, k)(x))
        gram_p = xp @ xp.T / np.outer(norms, norms)
        err = np.abs(gram_p - gram)
        assert err.max() <= eps, (kind, err.max(), eps)
        # Typical error: Var <uP, vP> ≤ (1 + <u, v>²)/k ≤ 2/k for all three types.
        rms = np.sqrt(np.mean(err ** 2))
        assert rms <= 1.5 * math.sqrt(2 / k), (kind, rms)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_preserved_in_expectation(kind):
    d, k, keys = 12, 4, 2000
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, d)))
    proj = jax.vmap(lambda key: P.random_projection(kind, key, d, k)(x))(
        jax.random.split(jax.random.PRNGKey(5), keys))
    inner = np.sum(np.asarray(proj[:, 0] * proj[:, 1]), axis=-1)  # (keys,)
    sq = np.sum(np.asarray(proj[:, 0] ** 2), axis=-1)
    exact, exact_sq = x[0] @ x[1], x[0] @ x[0]
    # Mean over keys within 5 standard errors of the exact value (no scaling bias).
    assert abs(inner.mean() - exact) <= 5 * inner.std() / math.sqrt(keys)
    assert abs(sq.mean() - exact_sq) <= 5 * sq.std() / math.sqrt(keys)


def test_entries_have_the_documented_law():
    d, k = 400, 8
    key = jax.random.PRNGKey(2)
    rad = dense_matrix("rademacher", key, d, k)
    np.testing.assert_allclose(np.abs(rad), 1 / math.sqrt(k), rtol=1e-12)
    gauss = dense_matrix("gaussian", key, d, k)
    assert abs(gauss.std() * math.sqrt(k) - 1) < 0.05
    sjlt = dense_matrix("sjlt", key, d, k)
    # Exactly one ±1 per input coordinate, buckets and signs roughly balanced.
    assert np.all(np.sum(sjlt != 0, axis=1) == 1)
    assert set(np.unique(sjlt[sjlt != 0])) == {-1.0, 1.0}
    counts = np.sum(sjlt != 0, axis=0)
    assert counts.min() > d / k / 2 and np.abs(sjlt.sum()) < 4 * math.sqrt(d)


@pytest.mark.parametrize("kind", ("gaussian", "rademacher"))
def test_counter_based_entries_look_independent(kind):
    """The hashed entries (``_entry_words``) behave as i.i.d. draws of the law: moments,
    and sums along rows, along columns, of neighbours and across two keys whose
    spread would grow with any correlation the hash left (rows or columns repeated,
    neighbouring counters alike, a key that does not reach every entry)."""
    d, k = 4000, 256
    m = [dense_matrix(kind, jax.random.PRNGKey(s), d, k) * math.sqrt(k) for s in (0, 1)]
    z = m[0]
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    kurt = np.mean(z ** 4) / z.var() ** 2
    assert abs(kurt - (3.0 if kind == "gaussian" else 1.0)) < (0.05 if kind == "gaussian"
                                                                else 1e-3)
    # Sums of d (k) independent unit-variance entries have variance d (k): estimated
    # over k (d) sums, within 6 standard errors of 1 after normalisation.
    for sums, count in ((z.sum(0) / math.sqrt(d), k), (z.sum(1) / math.sqrt(k), d)):
        assert abs(sums.var() - 1) < 6 * math.sqrt(2 / count), sums.var()
    # Neighbouring counters, along rows and along columns, and two keys: uncorrelated.
    for a, b in ((z[:, 1:], z[:, :-1]), (z[1:], z[:-1]), (m[0], m[1])):
        assert abs(np.mean(a * b)) < 6 / math.sqrt(a.size)
    if kind == "gaussian":  # the tails: P(|z| > 3) = 0.0027
        assert abs(np.mean(np.abs(z) > 3) - 0.0027) < 6 * math.sqrt(0.0027 / n)
        assert np.abs(z).max() < 5.4
def test_sjlt_is_a_scatter_add_not_a_matmul():
    """The jaxpr of the SJLT has a scatter-add and no (n, chunk) x (chunk, k) dot."""
    proj = P.sjlt_projection(jax.random.PRNGKey(0), 50, 8, chunk_size=16)
    text = str(jax.make_jaxpr(proj)(jnp.ones((3, 50))))
    assert "scatter-add" in text or "scatter_add" in text
    assert "dot_general" not in text


def test_kronecker_projection_equals_dense_kron():
    key = jax.random.PRNGKey(7)
    # Square sides for the three kinds share one compilation each; one non-square case.
    cases = [(kind, 6, 6, 3, 3) for kind in KINDS] + [("gaussian", 6, 5, 3, 4)]
    for kind, d_in, d_out, k_in, k_out in cases:
        a = jax.random.normal(jax.random.PRNGKey(1), (6, d_in))  # 6 positions
        s = jax.random.normal(jax.random.PRNGKey(2), (6, d_out))
        grad = np.asarray(a).T @ np.asarray(s)  # Σ_τ a_τ ⊗ s_τ, (d_in, d_out)
        kp = P.kronecker_projection(key, d_in, d_out, k_in, k_out, kind=kind,
                                    chunk_size=None)
        p_in = seeded_dense(kind, P.derive_key(key, 0), d_in, k_in)
        p_out = seeded_dense(kind, P.derive_key(key, 1), d_out, k_out)
        expect = grad.reshape(-1) @ np.kron(p_in, p_out)
        np.testing.assert_allclose(kp(a, s), expect, rtol=1e-10, atol=1e-12)
    # Identity on both sides returns the flattened gradient itself.
    ident = P.kronecker_projection(key, d_in, d_out, None, None)
    np.testing.assert_allclose(ident(a, s), grad.reshape(-1), rtol=1e-12)
    # One position given as vectors.
    np.testing.assert_allclose(ident(a[0], s[0]), np.outer(a[0], s[0]).reshape(-1),
                               rtol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="projection"):
        P.random_projection("dense", jax.random.PRNGKey(0), 4, 2)
    with pytest.raises(ValueError, match="positive"):
        P.sjlt_projection(jax.random.PRNGKey(0), 4, 0)
    with pytest.raises(ValueError, match="shape"):
        P.rademacher_projection(jax.random.PRNGKey(0), 4, 2)(jnp.ones((2, 5)))
    kp = P.kronecker_projection(jax.random.PRNGKey(0), 3, 2, 2, 2)
    with pytest.raises(ValueError, match="positions"):
        kp(jnp.ones((2, 3)), jnp.ones((3, 2)))


def test_auto_projection_rule():
    """"auto" is the dense Gaussian while P has at most 2²⁷ entries, else the SJLT, and
    a projector built as "auto" is that kind's projector exactly."""
    assert P.resolve_projection("auto", 2**17, 2**10) == "gaussian"
    assert P.resolve_projection("auto", 2**17 + 1, 2**10) == "sjlt"
    assert P.resolve_projection("rademacher", 10**9, 10**4) == "rademacher"
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 50))
    key = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(P.random_projection("auto", key, 50, 8)(x),
                                  P.gaussian_projection(key, 50, 8)(x))


def test_projection_matrix_is_the_projector():
    """The ``(d, k)`` matrix of each kind (the Kronecker factors LoGra, TRAK and TracIn
    multiply by) applies exactly as the chunked projector of the same key."""
    key = jax.random.PRNGKey(4)
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 37))
    for kind in KINDS:
        m = P.projection_matrix(key, kind=kind, d=37, k=5)
        assert m.shape == (37, 5)
        np.testing.assert_allclose(x @ m, P.random_projection(kind, key, 37, 5)(x),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="projection"):
        P.projection_matrix(key, kind="auto", d=4, k=2)


def test_seeded_projection_and_derived_keys():
    """``random_projection(kind, key)`` is ``seeded_projection(kind, seed_words(key))``;
    ``derive_key`` (the Kronecker factors' seeds, a hash) is a function of the key's
    words and the counter only: a typed key and its raw words agree, a 4-word key is
    folded to two words, and different counters or keys give matrices whose entries are
    uncorrelated at the 1/√(entries) scale."""
    key = jax.random.PRNGKey(11)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 40))
    for kind in KINDS:
        np.testing.assert_array_equal(
            P.seeded_projection(kind, P.seed_words(key), 40, 8)(x),
            P.random_projection(kind, key, 40, 8)(x))
    np.testing.assert_array_equal(P.derive_key(jax.random.key(11), 3), P.derive_key(key, 3))
    assert P.derive_key(key, 3).dtype == jnp.uint32 and P.derive_key(key, 3).shape == (2,)
    wide = jax.random.key(11, impl="rbg")  # 4 words
    assert P.key_words(wide).shape == (2,)
    assert not np.array_equal(P.derive_key(wide, 0), P.derive_key(wide, 1))
    seeds = [P.derive_key(key, 0), P.derive_key(key, 1), P.derive_key(P.derive_key(key, 0), 0),
             P.derive_key(jax.random.PRNGKey(12), 0)]
    mats = [np.asarray(P.seeded_matrix(s, kind="gaussian", d=200, k=100)).ravel() for s in seeds]
    for i in range(len(mats)):
        for j in range(i):
            r = np.corrcoef(mats[i], mats[j])[0, 1]
            assert abs(r) < 4 / np.sqrt(mats[i].size), (i, j, r)
    # the Kronecker factors of two members and two layers are the derived ones
    from jattri.methods.logra import _kronecker_factors
    f = _kronecker_factors(((5, 4), (4, 3)), ((3, 2), (2, None)), "rademacher", 2, False, key)
    for m in range(2):
        for l, (d_in, d_out) in enumerate(((5, 4), (4, 3))):
            lkey = P.derive_key(P.derive_key(key, m), l)
            np.testing.assert_array_equal(
                f[l][0][m], P.seeded_matrix(P.derive_key(lkey, 0), kind="rademacher",
                                            d=d_in, k=(3, 2)[l]))
    assert f[1][1] is None
    assert not np.array_equal(f[0][0][0], f[0][0][1])


def test_seeded_normal_is_standard_normal_per_key():
    """``seeded_normal`` (Arnoldi's start and restart vectors): unit-variance normal
    entries in the dtype asked for, the same under ``jit``, and unrelated across derived
    keys."""
    n = 200_000
    key = P.derive_key(jnp.zeros((2,), jnp.uint32), 0)
    z = np.asarray(P.seeded_normal(key, n, jnp.float64))
    assert z.dtype == np.float64 and z.shape == (n,)
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(np.abs(z) > 3) - 0.0027) < 6 * math.sqrt(0.0027 / n)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(P.seeded_normal, static_argnums=(1, 2))(key, n, jnp.float64)), z)
    other = np.asarray(P.seeded_normal(P.derive_key(jnp.zeros((2,), jnp.uint32), 1), n,
                                       jnp.float64))
    assert abs(np.mean(z * other)) < 6 / math.sqrt(n)


def _shapes_in(closed):
    """Every equation output's shape in ``closed`` and its nested jaxprs."""
    return [tuple(v.aval.shape) for jaxpr, _ in nested(closed) for eqn in jaxpr.eqns
            for v in eqn.outvars if hasattr(v.aval, "shape")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seeded", (False, True))
def test_project_leaves_is_the_projection_of_the_concatenation(kind, seeded):
    """Pieces of x project as their concatenation does, the same rows of P meeting the
    same entries: pieces of 4 chunks or more in loops of their own (with and without a
    rest), pieces of half a chunk or more in one product each, the smaller ones and the
    rests joined (here a block wider than the chunk and not a multiple of it: its last
    chunk moved back, the overlap zeroed)."""
    n, k, chunk = 4, 6, 7
    shapes = [(n, 3, 4), (n, 5, 6), (n, 2, 2, 2), (n, 1), (n, 4, 7), (n, 16), (n, 3),
              (n, 3), (n, 2)]  # own: 12, 8, 16; loops: 30 (rest 2), 28; joined: 11
    keys = jax.random.split(jax.random.PRNGKey(8), len(shapes))
    leaves = [jax.random.normal(kk, s) for kk, s in zip(keys, shapes)]
    x = jnp.concatenate([leaf.reshape(n, -1) for leaf in leaves], axis=1)
    d = x.shape[1]
    key = jax.random.PRNGKey(9)
    if seeded:
        proj = P.seeded_projection(kind, P.seed_words(key), d, k, chunk_size=chunk)
    else:
        proj = P.random_projection(kind, key, d, k, chunk_size=chunk)
    want = np.asarray(x) @ dense_matrix(kind, key, d, k)
    np.testing.assert_allclose(P.project_leaves(proj, leaves), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(proj(x), want, rtol=1e-12, atol=1e-12)
    # Under jit, as the methods call it, and with one piece only.
    np.testing.assert_allclose(jax.jit(P.project_leaves)(proj, leaves), want,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(P.project_leaves(proj, [x]), want, rtol=1e-12, atol=1e-12)
    # Any other callable gets the concatenation.
    np.testing.assert_allclose(P.project_leaves(lambda a: a * 2.0, leaves), 2 * x)
    with pytest.raises(ValueError, match=f"{d} entries per row"):
        P.project_leaves(proj, leaves[:-1])
    with pytest.raises(ValueError, match="one n"):
        P.project_leaves(proj, leaves[:-1] + [jnp.ones((n + 1, 16))])


def test_projected_gradients_are_never_concatenated():
    """The methods' projected per-example gradients (``_common.chunk_grads`` with a
    projector) meet P leaf by leaf: no ``(size, d)`` array, raveled or padded, in the
    program; and the result is the projection of the raveled gradients."""
    from jax.flatten_util import ravel_pytree

    from jattri import engine
    from jattri.methods import _common

    def loss(p, z, i, aux):
        h = jnp.tanh(z @ p["w1"] + p["b1"])
        return jnp.sum((h @ p["w2"]) ** 2)

    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(ks[0], (6, 5)), "b1": jnp.zeros(5),
              "w2": jax.random.normal(ks[1], (5, 3))}
    d = 6 * 5 + 5 + 5 * 3
    size = 4
    chunk = engine.Chunk(data=jax.random.normal(ks[2], (size, 6)), index=jnp.arange(size),
                         valid=jnp.array([True, True, True, False]))
    proj = P.gaussian_projection(ks[3], d, 8, chunk_size=4)  # w1 in a loop of its own
    out = _common.chunk_grads(loss, params, None, chunk, proj)
    g = jax.vmap(lambda z: ravel_pytree(jax.grad(loss)(params, z, 0, None))[0])(chunk.data)
    want = np.asarray(g) @ dense_matrix("gaussian", ks[3], d, 8)
    want[3] = 0.0
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    shapes = _shapes_in(jax.make_jaxpr(
        lambda c: _common.chunk_grads(loss, params, None, c, proj))(chunk))
    wide = [s for s in shapes if len(s) == 2 and s[0] == size and s[1] >= d]
    assert not wide, wide


def test_kronecker_factors_memo_outside_traces_only():
    """With a factory's ``memo``, factors made outside a trace are returned again for
    the same plan (the last ``FACTOR_MEMO`` plans), equal to fresh ones; inside a trace
    they are made in the trace (no constant baked in) and not remembered."""
    import sys
    from jattri.func.layers import Layer
    logra = sys.modules["jattri.methods.logra"]
    layer = lambda d_in, d_out: Layer("l", "dense", d_in, d_out, True, 1, (d_in, d_out), ())
    key, memo = jax.random.PRNGKey(3), {}
    args = ((layer(5, 4),), ((3, 2),), "gaussian")
    first = logra.kronecker_factors(*args, key, 2, memo=memo)
    assert logra.kronecker_factors(*args, key, 2, memo=memo) is first
    with jax.enable_x64(not jax.config.jax_enable_x64):  # not the kept factors
        assert logra.kronecker_factors(*args, key, 2, memo=memo) is not first
    memo.clear()
    first = logra.kronecker_factors(*args, key, 2, memo=memo)
    np.testing.assert_array_equal(first[0][0], logra.kronecker_factors(*args, key, 2)[0][0])
    jaxpr = jax.make_jaxpr(lambda k: logra.kronecker_factors(*args, k, 2, memo=memo))(key)
    assert jaxpr.eqns and not jaxpr.consts and len(memo) == 1
    closed = jax.make_jaxpr(lambda: logra.kronecker_factors(*args, key, 2, memo=memo))()
    assert closed.eqns and len(memo) == 1  # the memo's arrays are not returned in a trace
    for num in (3, 4):  # two more plans: the first is dropped
        logra.kronecker_factors(*args, key, num, memo=memo)
    assert len(memo) == logra.FACTOR_MEMO
    assert logra.kronecker_factors(*args, key, 2, memo=memo) is not first


def _bf16(a):
    """``a`` rounded to bfloat16 (to nearest, ties to even), back in float64."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float64))


@pytest.mark.parametrize("kind", ("gaussian", "rademacher"))
def test_bfloat16_product_is_the_rounded_product(kind):
    """``dtype="bfloat16"``: x P with x and P (P's entries made in float32) rounded to
    bfloat16 and the product accumulated in x's dtype, on any chunking and through
    ``project_leaves``; it moves the exact product by about 2⁻⁹, far below the JL
    error of the projection itself (√(2/k) = 35% at k = 16)."""
    key = jax.random.PRNGKey(3)
    d, k = 300, 16
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, d)))
    made = P._SEEDED_ROWS[kind](P.seed_words(key), jnp.arange(d), k, jnp.float32)
    rounded = _bf16(np.asarray(made, np.float64))
    # P itself: the identity's rows are exact in bfloat16, one term per sum
    np.testing.assert_array_equal(
        P.random_projection(kind, key, d, k, dtype="bfloat16")(jnp.eye(d)), rounded)
    want = _bf16(x) @ rounded
    scale = np.linalg.norm(want)
    for chunk in (None, 7, 64):
        proj = P.random_projection(kind, key, d, k, chunk_size=chunk, dtype=jnp.bfloat16)
        got = np.asarray(proj(x))
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
        pieces = [x[:, :100].reshape(6, 10, 10), x[:, 100:]]
        np.testing.assert_allclose(P.project_leaves(proj, pieces), want, rtol=1e-5,
                                   atol=1e-6 * scale)
    exact = x @ dense_matrix(kind, key, d, k)
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 2**-12 < err < 2**-7, err


def test_bfloat16_product_arguments():
    key = jax.random.PRNGKey(0)
    for bad in ("float16", jnp.float32, "bf16", True):
        with pytest.raises(ValueError, match=r"`dtype` must be None .* \('bfloat16',\)"):
            P.gaussian_projection(key, 8, 4, dtype=bad)
    with pytest.raises(ValueError, match="the SJLT sums in the inputs' own dtype"):
        P.random_projection("sjlt", key, 8, 4, dtype="bfloat16")
    with pytest.raises(ValueError, match="SJLT"):
        P.seeded_projection("sjlt", P.seed_words(key), 8, 4, dtype="bfloat16")
    # "auto" drops it where it picks the SJLT (no product): the SJLT's result exactly
    d, k = 2**17 + 1, 2**10
    x = jax.random.normal(jax.random.PRNGKey(2), (1, d))
    np.testing.assert_array_equal(P.random_projection("auto", key, d, k, dtype="bfloat16")(x),
                                  P.sjlt_projection(key, d, k)(x))
    with pytest.raises(ValueError, match="`dtype`"):
        P.random_projection("auto", key, d, k, dtype="float16")
