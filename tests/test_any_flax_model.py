"""EK-FAC, K-FAC and LoGra on any model: a Flax NNX MLP and a plain-JAX MLP (layers
named with ``jattri.func.layers.dense``) score exactly as the linen MLP of the same
weights; a loss without recognisable layers says what is supported."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jattri
from jattri.func.layers import dense, layer_io, linear_layers

pytestmark = pytest.mark.usefixtures("x64")

SIZES = (6, 5, 4, 3)  # d_in, hidden, hidden, classes


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(SIZES[1], name="fc1")(x))
        x = jnp.tanh(nn.Dense(SIZES[2], name="fc2")(x))
        return nn.Dense(SIZES[3], name="fc3")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs, param_dtype=jnp.float64)
        self.fc2 = nnx.Linear(SIZES[1], SIZES[2], rngs=rngs, param_dtype=jnp.float64)
        self.fc3 = nnx.Linear(SIZES[2], SIZES[3], rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.fc3(jnp.tanh(self.fc2(jax.nn.relu(self.fc1(x)))))


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _models():
    """The same weights as linen params, an ``nnx.State`` and a plain dict, with the loss
    of each; and train / test data."""
    model = LinenMLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (24, SIZES[0]), jnp.float64)
    y = jnp.arange(24) % SIZES[3]
    linen = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    linen = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), linen)

    def linen_loss(p, z):
        return _xent(model.apply({"params": p}, z[0][None])[0], z[1])

    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(lambda a: a, dict(linen)))

    def nnx_loss(p, z):
        return _xent(nnx.merge(graphdef, p)(z[0]), z[1])

    plain = {k: {"w": v["kernel"], "b": v["bias"]} for k, v in linen.items()}

    def plain_loss(p, z):
        h = jax.nn.relu(dense(z[0], p["fc1"]["w"], p["fc1"]["b"]))
        h = jnp.tanh(dense(h, p["fc2"]["w"], p["fc2"]["b"]))
        return _xent(dense(h, p["fc3"]["w"], p["fc3"]["b"]), z[1])

    train, test = (x[:18], y[:18]), (x[18:], y[18:])
    return ((linen_loss, linen), (nnx_loss, state), (plain_loss, plain)), train, test


def _scores(make, cases, train, test):
    return [np.asarray(make(loss).attribute(make(loss).cache(p, train), test))
            for loss, p in cases]


def _assert_same(scores):
    ref = scores[0]
    assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0
    for got in scores[1:]:
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_layers_found_and_named():
    cases, train, _ = _models()
    z = (train[0][0], train[1][0])
    names = [list(linear_layers(loss, p, z)) for loss, p in cases]
    assert names == [["fc1", "fc2", "fc3"], ["fc1", "fc2", "fc3"],
                     ["fc1/w+fc1/b", "fc2/w+fc2/b", "fc3/w+fc3/b"]]
    # the NNX classes are restored after every capture
    assert not hasattr(vars(nnx.Linear)["__call__"], "__wrapped__")
    assert not hasattr(vars(nnx.Conv)["__call__"], "__wrapped__")


@pytest.mark.parametrize("correct", [True, False], ids=["ekfac", "kfac"])
def test_ekfac_same_scores(correct):
    cases, train, test = _models()
    make = lambda loss: jattri.influence_ekfac(loss, damping=1e-3, correct_eigenvalues=correct)
    _assert_same(_scores(make, cases, train, test))


@pytest.mark.parametrize("proj", [None, (3, 2)], ids=["exact", "projected"])
def test_logra_same_scores(proj):
    cases, train, test = _models()
    dims = dict(proj_dim_in=None, proj_dim_out=None) if proj is None else dict(
        proj_dim_in=proj[0], proj_dim_out=proj[1])
    make = lambda loss: jattri.logra(loss, damping=0.1, key=jax.random.PRNGKey(3),
                                    projection="rademacher", **dims)
    _assert_same(_scores(make, cases, train, test))


def test_nnx_pure_dict_and_conv():
    """NNX params as a pure dict work too; nnx.Conv layers give per-example gradients."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), strides=2, padding="SAME", rngs=rngs,
                                 param_dtype=jnp.float64)
            self.head = nnx.Linear(3, 2, use_bias=False, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.head(jnp.tanh(self.conv(x)).mean((0, 1)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    pure = nnx.to_pure_dict(state)
    loss = lambda p, z: jnp.sum(nnx.merge(graphdef, p)(z) ** 2)
    z = jax.random.normal(jax.random.PRNGKey(2), (5, 5, 2), jnp.float64)
    layers = linear_layers(loss, pure, z)
    assert [(l.name, l.kind, l.use_bias) for l in layers.values()] == [
        ("conv", "conv", True), ("head", "dense", False)]
    io = layer_io(loss, pure, z, layers=layers)
    g = jax.grad(loss)(pure, z)
    a, s = io["conv"]
    np.testing.assert_allclose((a.T @ s).reshape(g["conv"]["kernel"].shape),
                               g["conv"]["kernel"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s.sum(0), g["conv"]["bias"], rtol=1e-10, atol=1e-14)
    a, s = io["head"]
    np.testing.assert_allclose(a.T @ s, g["head"]["kernel"], rtol=1e-10, atol=1e-14)


def test_no_layers_error_says_what_is_supported():
    _, train, _ = _models()
    params = {"w": jnp.ones((SIZES[0], SIZES[3]), jnp.float64)}
    bare = lambda p, z: _xent(z[0] @ p["w"], z[1])
    for make in (jattri.influence_ekfac, jattri.logra):
        with pytest.raises(ValueError, match="no linear layer") as err:
            make(bare).cache(params, train)
        msg = str(err.value)
        for part in ("nn.Dense", "nnx.Linear", "jattri.func.layers.dense"):
            assert part in msg
    # a kernel that is not a leaf of params (cast inside the loss) is reported as skipped
    cast = lambda p, z: _xent(dense(z[0], p["w"] * 1.0), z[1])
    with pytest.raises(ValueError, match="not a leaf of the params"):
        jattri.influence_ekfac(cast).cache(params, train)


def test_plain_params_outside_layers_get_the_diagonal_fisher():
    """Leaves the loss uses outside ``dense`` (a temperature) get E[g²]; layer leaves 0."""
    cases, train, _ = _models()
    _, plain = cases[2]
    params = {"net": plain, "temperature": jnp.array(1.5, jnp.float64)}

    def loss(p, z):
        h = jax.nn.relu(dense(z[0], p["net"]["fc1"]["w"], p["net"]["fc1"]["b"]))
        h = jnp.tanh(dense(h, p["net"]["fc2"]["w"], p["net"]["fc2"]["b"]))
        return _xent(dense(h, p["net"]["fc3"]["w"], p["net"]["fc3"]["b"]) / p["temperature"],
                     z[1])

    factors = jattri.func.ekfac_factors(loss, params, train)
    assert sorted(factors.layers) == ["net/fc1/w+net/fc1/b", "net/fc2/w+net/fc2/b",
                                      "net/fc3/w+net/fc3/b"]
    g = jax.vmap(jax.grad(loss), (None, 0))(params, train)["temperature"]
    np.testing.assert_allclose(factors.diag["temperature"], np.mean(g ** 2), rtol=1e-10)
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(factors.diag["net"]))
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    out = jattri.func.ekfac_ihvp(factors, v, 1e-3)
    np.testing.assert_allclose(out["temperature"], 1.0 / (np.mean(g ** 2) + 1e-3), rtol=1e-10)
    assert out["net"]["fc1"]["w"].shape == plain["fc1"]["w"].shape
