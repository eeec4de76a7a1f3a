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
    # (chunks balanced: as many chunks as DENSE_EXAMPLES-example ones, as equal as can be)
    assert -(-5000 // examples) == -(-5000 // influence.DENSE_EXAMPLES) and block < dense_block(d)
    assert block * examples * pair <= budget
    # a small training set: all of it in one chunk, with the most tangents
    block, examples = influence._dense_shape(d, pair, lambda f: size(f, 100), 100)
    assert (block, examples) == (dense_block(d), 100)
    # a chunk_size the user gave is kept, with the most tangents
    block, examples = influence._dense_shape(d, pair, lambda f: 10, 5000)
    assert (block, examples) == (dense_block(d), 10)


def _dense_reference(loss, params, train, test, damping):
    """g_iᵀ (H + λI)⁻¹ g_t with H = jax.hessian of the mean loss, float64."""
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(params)
    mean = lambda f: jnp.mean(jax.vmap(lambda x, y: loss(unravel(f), (x, y)))(*train))
    h = np.asarray(jax.hessian(mean)(flat)) + damping * np.eye(len(flat))
    grads = jax.vmap(lambda x, y: ravel_pytree(jax.grad(loss)(params, (x, y)))[0])
    return np.asarray(grads(*train)) @ np.linalg.solve(h, np.asarray(grads(*test)).T)


def test_one_linear_layer_builds_its_hessian_from_output_products(monkeypatch, x64):
    """A model that is one linear layer (softmax regression through flax Dense, a
    bias-free Dense, a Conv with bias) builds H from T·d_out output-space products
    (``_layer_fit``) and scores as jax.hessian's H; a loss with its own L2 term reads θ
    outside the layer and keeps the generic build, still exact."""
    import flax.linen as nn

    used = []
    real = influence._layer_fit
    monkeypatch.setattr(influence, "_layer_fit", lambda *a: used.append(1) or real(*a))
    x, y = classification_data(30, 8, 3, seed=2)
    train, test = (x[:24], y[:24]), (x[24:], y[24:])
    images = (x.reshape(30, 2, 2, 2), y)
    cases = {
        "dense": (nn.Dense(3), train, test, 0.0),
        "dense_no_bias": (nn.Dense(3, use_bias=False), train, test, 0.0),
        "conv": (nn.Conv(3, (2, 2), padding="VALID"),
                 jax.tree_util.tree_map(lambda a: a[:24], images),
                 jax.tree_util.tree_map(lambda a: a[24:], images), 0.0),
        "l2_in_loss": (nn.Dense(3), train, test, 0.05),
    }
    for name, (module, tr, te, l2) in cases.items():
        params = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) + 0.3,
            module.init(jax.random.PRNGKey(1), tr[0][:1])["params"])

        def loss(p, z, module=module, l2=l2):
            logits = module.apply({"params": p}, z[0][None]).reshape(-1)
            penalty = 0.5 * l2 * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))
            return -jax.nn.log_softmax(logits)[z[1]] + penalty

        used.clear()
        attr = influence_explicit(loss, damping=0.1)
        got = np.asarray(attr.attribute(attr.cache(params, tr), te))
        np.testing.assert_allclose(got, _dense_reference(loss, params, tr, te, 0.1),
                                   rtol=1e-8, atol=1e-12, err_msg=name)
        assert used == ([] if l2 else [1]), name


def test_one_position_block_of_wide_inputs_from_symmetric_pieces(x64):
    """With k ≥ 256 input rows the class-pair blocks are built from their upper column
    groups (2 and 4 groups here) and mirrored: equal to the whole einsum."""
    from jattri.func.fisher import _one_position_block
    rng = np.random.default_rng(0)
    for k in (300, 530):
        a = jnp.asarray(rng.normal(size=(7, k)))
        h = rng.normal(size=(7, 3, 3))
        h = jnp.asarray(h + np.swapaxes(h, 1, 2))
        w = jnp.asarray([1.0, 1, 1, 0, 1, 1, 1])
        want = np.einsum("b,bk,bK,blL->klKL", np.asarray(w), np.asarray(a), np.asarray(a),
                         np.asarray(h)).reshape(3 * k, 3 * k)
        np.testing.assert_allclose(_one_position_block(a, h, w), want, rtol=1e-12, atol=1e-12)
