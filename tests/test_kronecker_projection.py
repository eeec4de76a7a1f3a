"""The Kronecker projection of TRAK and TracIn (``projection="kronecker"``, LoGra's
P_in ⊗ P_out applied to each linear layer's gradient without forming it) against a
float64 reference built from ``jax.grad`` and the explicit projection matrices; the
split of k over layers; the "auto" rule; the refusals."""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jattri
from jattri.func import projection as P
from jattri.func.layers import Layer
from jattri.methods.trak import margin_from_loss

from _toy import classification_data, f64

tracin_module = importlib.import_module("jattri.methods.tracin")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)  # Dense_0, called first
        return nn.Dense(3)(jnp.tanh(h))


MODEL = MLP()


def _loss(p, z):
    return optax.softmax_cross_entropy_with_integer_labels(
        MODEL.apply({"params": p}, z[0][None])[0], z[1])


def _setup():
    x, y = classification_data(16, 5, 3, seed=4)
    params = f64(MODEL.init(jax.random.PRNGKey(3), x[:1])["params"])
    return params, (x[:12], y[:12]), (x[12:], y[12:])


def _reference_phi(fn, params, data, key, k):
    """``(n, K)``: per layer, vec([∇kernel; ∇bias]) (P_in ⊗ P_out), P from the same keys
    (member 0: ``derive_key(key, 0)``; layer ℓ; side 0 = inputs, 1 = outputs)."""
    names = ("Dense_0", "Dense_1")
    shapes = [(6, 6), (7, 3)]  # (d_in + 1, d_out)
    layers = [Layer(n, "dense", a - 1, b, True, 1, (a - 1, b), ()) for n, (a, b) in
              zip(names, shapes)]
    dims = tracin_module.kronecker_dims(layers, k)
    member = P.derive_key(key, 0)
    grads = jax.vmap(jax.grad(fn), (None, 0))(params, data)
    out = []
    for l, (name, (d_in, d_out), (k_in, k_out)) in enumerate(zip(names, shapes, dims)):
        g = np.concatenate([np.asarray(grads[name]["kernel"]),
                            np.asarray(grads[name]["bias"])[:, None, :]], axis=1)
        lkey = P.derive_key(member, l)
        side = lambda s, d, kk: (np.eye(d) if kk is None else np.asarray(
            P.seeded_projection("gaussian", P.derive_key(lkey, s), d, kk)(jnp.eye(d))))
        out.append(g.reshape(len(g), -1) @ np.kron(side(0, d_in, k_in), side(1, d_out, k_out)))
    return np.concatenate(out, axis=1), dims


def test_kronecker_features_equal_the_reference(x64):
    params, train, test = _setup()
    key = jax.random.PRNGKey(5)
    want, dims = _reference_phi(_loss, params, train, key, 20)
    assert any(k is not None for pair in dims for k in pair)  # something is projected
    tr = jattri.tracin(_loss, proj_dim=20, projection="kronecker", key=key)
    state = tr.cache(params, train)
    np.testing.assert_allclose(state.train_grads[:, 0], want, rtol=1e-9, atol=1e-12)
    t_want, _ = _reference_phi(_loss, params, test, key, 20)
    np.testing.assert_allclose(tr.attribute(state, test), want @ t_want.T, rtol=1e-9,
                               atol=1e-12)
    # TRAK projects the margin's gradient
    margin = lambda p, z: margin_from_loss(_loss(p, z))
    want, _ = _reference_phi(margin, params, train, key, 20)
    state = jattri.trak(_loss, proj_dim=20, projection="kronecker", key=key).cache(params,
                                                                                    train)
    np.testing.assert_allclose(state.phi[:, 0], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state.kernel[0], want.T @ want, rtol=1e-9, atol=1e-12)


def test_kronecker_at_k_above_d_is_exact(x64):
    """k ≥ d keeps every side whole: TracIn is Grad-Dot and TRAK is TRAK on the raw
    gradients, the default damping (λ̂ from one backward pass) included."""
    params, train, test = _setup()
    dot = jattri.grad_dot(_loss)
    want = dot.attribute(dot.cache(params, train), test)
    tr = jattri.tracin(_loss, proj_dim=100, projection="kronecker")
    np.testing.assert_allclose(tr.attribute(tr.cache(params, train), test), want, rtol=1e-9)
    raw = jattri.trak(_loss, proj_dim=None)
    raw_state = raw.cache(params, train)
    kron = jattri.trak(_loss, proj_dim=100, projection="kronecker")
    state = kron.cache(params, train)
    assert state.phi.shape == (12, 1, 57)
    np.testing.assert_allclose(state.damping, raw_state.damping, rtol=1e-9)
    np.testing.assert_allclose(kron.attribute(state, test), raw.attribute(raw_state, test),
                               rtol=1e-7, atol=1e-10)


def _layer(d_in, d_out):
    return Layer("x", "dense", d_in, d_out, True, 1, (d_in, d_out), ())


def test_kronecker_dims_rule():
    # a narrow side is kept whole: 785 x 10 at k = 512 projects the inputs only
    assert tracin_module.kronecker_dims([_layer(784, 10)], 512) == ((51, None),)
    layers = [_layer(784, 128), _layer(128, 128), _layer(128, 10)]
    dims = tracin_module.kronecker_dims(layers, 512)
    assert tracin_module.kronecker_width(layers, dims) <= 512
    # shares follow the layers' sizes
    widths = [(a or 785) * (b or 128) for a, b in dims[:1]] + [
        (a or 129) * (b or 128) for a, b in dims[1:2]]
    assert widths[0] > widths[1]
    # k ≥ d: every side whole
    assert tracin_module.kronecker_dims(layers, 10**6) == ((None, None),) * 3


def test_auto_rule_and_refusals(x64, monkeypatch):
    params, train, test = _setup()
    # small d·k: "auto" is the dense Gaussian (k columns)
    assert jattri.tracin(_loss, proj_dim=20).cache(params, train).train_grads.shape[-1] == 20
    # above the threshold: Kronecker where every parameter is in a linear layer
    monkeypatch.setattr(P, "AUTO_DENSE_ENTRIES", 100)
    auto = jattri.tracin(_loss, proj_dim=20).cache(params, train).train_grads
    kron = jattri.tracin(_loss, proj_dim=20, projection="kronecker").cache(params, train)
    np.testing.assert_array_equal(auto, kron.train_grads)

    def l2_loss(p, z):  # a parameter also enters outside its layer
        return _loss(p, z) + 1e-2 * jnp.sum(p["Dense_0"]["kernel"] ** 2)

    # "auto" falls back to the SJLT (k columns); "kronecker" refuses, naming why
    assert jattri.tracin(l2_loss, proj_dim=20).cache(params, train).train_grads.shape[-1] == 20
    with pytest.raises(ValueError, match="jax.grad"):
        jattri.trak(l2_loss, proj_dim=20, projection="kronecker").cache(params, train)

    def scaled(p, z):  # a parameter outside every linear layer
        return _loss(p, z) * p["scale"]

    with pytest.raises(ValueError, match="not in a linear layer"):
        jattri.tracin(scaled, proj_dim=20, projection="kronecker").cache(
            {**params, "scale": jnp.ones(())}, train)
    with pytest.raises(ValueError, match="projection"):
        jattri.trak(_loss, projection="kron")


def test_kronecker_with_a_target_and_prob_fn_is_exact_at_k_above_d(x64):
    """The test side differentiates the target (its own layers), and ``prob_fn``'s
    margin: at k ≥ d both equal TRAK and TracIn on raw gradients."""
    params, train, test = _setup()

    def target(p, z):  # the label's logit, not the loss
        return -MODEL.apply({"params": p}, z[0][None])[0][z[1]]

    def prob(p, z):
        return jax.nn.softmax(MODEL.apply({"params": p}, z[0][None])[0])[z[1]]

    task = jattri.Task(_loss, target)
    for kwargs in ({}, {"prob_fn": prob}):
        raw = jattri.trak(task, proj_dim=None, **kwargs)
        kron = jattri.trak(task, proj_dim=100, projection="kronecker", **kwargs)
        want = raw.attribute(raw.cache(params, train), test)
        np.testing.assert_allclose(kron.attribute(kron.cache(params, train), test), want,
                                   rtol=1e-7, atol=1e-10)
    dot = jattri.tracin(task)
    tr = jattri.tracin(task, proj_dim=100, projection="kronecker")
    np.testing.assert_allclose(tr.attribute(tr.cache(params, train), test),
                               dot.attribute(dot.cache(params, train), test), rtol=1e-9)
    np.testing.assert_allclose(tr.self_attribute(tr.cache(params, train), train=train),
                               dot.self_attribute(dot.cache(params, train), train=train),
                               rtol=1e-9)


def test_auto_choice_made_concretely_holds_under_jit(x64, monkeypatch):
    """Above the threshold, a loss with an L2 term gets the SJLT from a concrete
    ``cache``; a jitted ``attribute`` (its test data traced: no rebuild check possible)
    must project the test side the same way, not by Kronecker."""
    params, train, test = _setup()
    monkeypatch.setattr(P, "AUTO_DENSE_ENTRIES", 100)

    def l2_loss(p, z):
        return _loss(p, z) + 1e-2 * jnp.sum(p["Dense_0"]["kernel"] ** 2)

    for attr in (jattri.tracin(l2_loss, proj_dim=20), jattri.trak(l2_loss, proj_dim=20)):
        state = attr.cache(params, train)
        want = np.asarray(attr.attribute(state, test))
        got = jax.jit(lambda s, t: attr.attribute(s, t))(state, test)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_factories_make_their_kronecker_factors_once(x64, monkeypatch):
    """TRAK, TracIn and LoGra with Kronecker projections run the factors' program once
    for a ``cache`` and two ``attribute`` calls (kept by the factory), and their scores
    equal those of a factory that makes them at every stage."""
    logra_module = importlib.import_module("jattri.methods.logra")
    params, train, test = _setup()
    made = []
    real = logra_module._kronecker_factors
    counting = lambda *a: made.append(a[:-1]) or real(*a)
    factories = {
        "trak": lambda: jattri.trak(_loss, proj_dim=8, projection="kronecker", damping=0.1),
        "tracin": lambda: jattri.tracin(_loss, proj_dim=8, projection="kronecker"),
        "logra": lambda: jattri.logra(_loss, proj_dim_in=3, proj_dim_out=2, damping=0.1,
                                      curvature="empirical"),
    }
    for name, make in factories.items():
        monkeypatch.setattr(logra_module, "_kronecker_factors", counting)
        made.clear()
        attr = make()
        state = attr.cache(params, train)
        kept = [np.asarray(attr.attribute(state, test)) for _ in range(2)]
        assert len(made) == 1, (name, made)
        np.testing.assert_array_equal(kept[0], kept[1])
        monkeypatch.setattr(logra_module, "FACTOR_MEMO", 0)  # nothing kept: made anew
        made.clear()
        fresh = make()
        fresh_scores = np.asarray(fresh.attribute(fresh.cache(params, train), test))
        assert len(made) == 2, (name, made)
        np.testing.assert_allclose(kept[0], fresh_scores, rtol=1e-12, atol=1e-12)
        monkeypatch.undo()
