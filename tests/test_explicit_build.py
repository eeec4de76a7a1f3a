"""influence_explicit's dense build and its factors at the cached damping (float32, as
users run it): the shape of the build's blocks, and no refactorisation when attribute
is called at the damping the state was cached with."""
import jax
import jax.numpy as jnp
import numpy as np

from jattri import engine
from jattri.func.hessian import dense_block
from jattri.methods import influence
from jattri.methods.influence import influence_explicit

from _toy import classification_data


def _loss(p, z):
    return -jax.nn.log_softmax(z[0] @ p["w"] + p["b"])[z[1]]


def _problem():
    x, y = classification_data(30, 5, 3, seed=2)
    params = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(0), (5, 3), jnp.float32),
              "b": jnp.zeros(3, jnp.float32)}
    return params, (x[:24].astype(np.float32), y[:24]), (x[24:].astype(np.float32), y[24:])


def test_attribute_at_the_cached_damping_reuses_the_factors(monkeypatch):
    """0.1 is not a float32: the cached damping is its float32 rounding, and an
    attribute call at the factory's 0.1 must not refactor (it did on every call)."""
    params, train, test = _problem()
    attr = influence_explicit(_loss, damping=0.1)
    state = attr.cache(params, train)
    calls = []
    real = influence._refactor
    monkeypatch.setattr(influence, "_refactor",
                        lambda *a: calls.append(a[2]) or real(*a))
    scores = np.asarray(attr.attribute(state, test))
    attr.self_attribute(state)
    assert calls == []
    # another damping refactors once, and equals a state cached at that damping
    moved = np.asarray(attr.attribute(state, test, damping=0.3))
    assert len(calls) == 1
    fresh = influence_explicit(_loss, damping=0.3)
    want = np.asarray(fresh.attribute(fresh.cache(params, train), test))
    np.testing.assert_allclose(moved, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(moved, scores)


def test_dense_build_trades_tangents_for_examples_within_the_budget():
    budget = engine.DEFAULT_CHUNK_BYTES // 4
    d, pair = 7850, 219
    size = lambda floats, n=5000: engine.default_chunk_size(4 * floats, n)
    block, examples = influence._dense_shape(d, pair, size, 5000)
    # the default split had 2,137 tangents x 143 examples; the rule keeps the memory
    assert size(dense_block(d) * pair) < influence.DENSE_EXAMPLES
    assert examples >= influence.DENSE_EXAMPLES and block < dense_block(d)
    assert block * examples * pair <= budget
    # a small training set: all of it in one chunk, with the most tangents
    block, examples = influence._dense_shape(d, pair, lambda f: size(f, 100), 100)
    assert (block, examples) == (dense_block(d), 100)
    # a chunk_size the user gave is kept, with the most tangents
    block, examples = influence._dense_shape(d, pair, lambda f: 10, 5000)
    assert (block, examples) == (dense_block(d), 10)
