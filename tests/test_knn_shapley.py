"""Exact KNN-Shapley: efficiency axiom and brute-force Shapley values by enumeration."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from _toy import assert_top_k_matches_dense
from jattri.methods.shapley import knn_utility


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


def data(seed, n, classes=2, dim=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.integers(0, classes, n)


def utility(x, y, xt, yt, subset, k):
    """U_t(S) written out: labels of the K nearest members of S (ties: lower index)."""
    near = sorted(subset, key=lambda i: (np.sum((x[i] - xt) ** 2), i))[:k]
    return sum(y[i] == yt for i in near) / k


def brute_force_shapley(x, y, xt, yt, k):
    """Shapley values by enumerating every subset S ⊆ N \\ {i}."""
    n = len(y)
    out = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                out[i] += weight * (utility(x, y, xt, yt, subset + (i,), k) -
                                    utility(x, y, xt, yt, subset, k))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 6, 8])  # 8 > n: every point counts
def test_matches_brute_force_shapley(k):
    x, y = data(0, 6)
    xt, yt = data(1, 4)
    attr = jattri.knn_shapley(k)
    state = attr.cache(None, (x, y))
    scores = np.asarray(attr.attribute(state, (xt, yt)))
    assert scores.shape == (6, 4)
    for t in range(4):
        np.testing.assert_allclose(scores[:, t], brute_force_shapley(x, y, xt[t], yt[t], k),
                                   atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5, 50, 120])
def test_efficiency_axiom(k):
    x, y = data(2, 100, classes=3, dim=4)
    xt, yt = data(3, 30, classes=3, dim=4)
    attr = jattri.knn_shapley(k, chunk_size=7)
    scores = np.asarray(attr.attribute(attr.cache(None, (x, y)), (xt, yt)))
    full = np.array([utility(x, y, xt[t], yt[t], range(100), k) for t in range(30)])
    # Σ_i s_i = U(N) − U(∅), U(∅) = 0; the values are multiples of 1/(K·lcm) summed
    # in float64, so equality holds to rounding.
    np.testing.assert_allclose(scores.sum(axis=0), full - 0.0, rtol=0, atol=1e-12)
    # knn_utility (the library's own U) agrees with the reference one.
    dist = np.sum((x[None] - xt[:, None]) ** 2, -1)
    lib = jax.vmap(lambda d, m: knn_utility(d, m, jnp.ones(100, bool), k))(
        dist, y[None] == yt[:, None])
    np.testing.assert_allclose(lib, full, atol=1e-15)


def test_self_attribute_and_ties():
    x, y = data(4, 9)
    x[3] = x[5]  # a tie: broken by training index, the same rule everywhere
    attr = jattri.knn_shapley(2)
    state = attr.cache(None, (x, y))
    full = np.asarray(attr.attribute(state, (x, y)))
    np.testing.assert_allclose(attr.self_attribute(state), np.diag(full), atol=1e-15)
    small = jattri.knn_shapley(2)
    vals = np.asarray(small.attribute(small.cache(None, (x[:6], y[:6])), (x[5:6], y[5:6])))[:, 0]
    np.testing.assert_allclose(vals, brute_force_shapley(x[:6], y[:6], x[5], y[5], 2),
                               atol=1e-12)


def test_features_from_a_task_average_over_members():
    x, y = data(5, 20, dim=3)
    xt, yt = data(6, 4, dim=3)
    members = [{"w": jnp.asarray(np.random.default_rng(s).normal(size=(3, 2)))}
               for s in range(2)]
    feats = lambda p, z: jnp.tanh(z[0] @ p["w"])
    both = jattri.knn_shapley(3, features_fn=feats)
    scores = both.attribute(both.cache(jattri.checkpoints(members), (x, y)), (xt, yt))
    singles = []
    for p in members:
        one = jattri.knn_shapley(3, features_fn=lambda _, z, p=p: feats(p, z))
        singles.append(one.attribute(one.cache(None, (x, y)), (xt, yt)))
    np.testing.assert_allclose(scores, np.mean(singles, axis=0), atol=1e-15)
    # A custom distance (L1) and label function on a dict example.
    l1 = jattri.knn_shapley(1, features_fn=lambda _, z: z["x"], label_fn=lambda z: z["y"],
                            distance=lambda a, b: jnp.sum(jnp.abs(a - b)))
    s = np.asarray(l1.attribute(l1.cache(None, {"x": x, "y": y}), {"x": xt, "y": yt}))
    nearest = np.argmin(np.abs(x[None] - xt[:, None]).sum(-1), axis=1)
    # K = 1: the nearest neighbour alone decides the test label, and its value is at
    # least that of every other point.
    for t in range(4):
        assert s[nearest[t], t] == s[:, t].max() or y[nearest[t]] != yt[t]


def test_bad_arguments():
    x, y = data(0, 5)
    with pytest.raises(ValueError, match="`k`"):
        jattri.knn_shapley(0)
    with pytest.raises(TypeError, match="label_fn"):
        a = jattri.knn_shapley(1, label_fn=lambda z: z[0])
        a.cache(None, (x, y))
    # members: None (model-free), a params pytree or jattri.Members
    with pytest.raises(TypeError, match="members"):
        jattri.knn_shapley(1).cache("model", (x, y))
    a = jattri.knn_shapley(1)
    with pytest.raises(ValueError, match="test"):
        a.attribute(a.cache(None, (x, y)), (np.ones((3, 4)), y[:3]))


def test_top_k_streamed_cache_and_jit():
    x, y = data(7, 40, classes=3, dim=3)
    xt, yt = data(8, 6, classes=3, dim=3)
    attr = jattri.knn_shapley(4, chunk_size=4)
    state = attr.cache(None, (x, y))
    dense = np.asarray(attr.attribute(state, (xt, yt)))
    # Top-k per test point (ties: lower training index first) == the dense argsort.
    top = attr.attribute(state, (xt, yt), top_k=5, lowest=True)
    assert_top_k_matches_dense(top, dense, 5, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="top_k"):
        attr.attribute(state, (xt, yt), top_k=41)
    # A stream of batches gives the same features and values.
    streamed = attr.cache(None, jattri.stream([(x[a:a + 9], y[a:a + 9])
                                               for a in range(0, 40, 9)]))
    assert streamed.train is None
    np.testing.assert_array_equal(streamed.features, state.features)
    np.testing.assert_allclose(attr.attribute(streamed, (xt, yt)), dense, atol=1e-15)
    np.testing.assert_allclose(jax.jit(attr.attribute)(state, (xt, yt)), dense, atol=1e-15)
