"""layer_io: Dense inputs/output-gradients from an unchanged Flax loss, vs jax.grad."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattri.func.layers import layer_inputs, layer_io, layer_params, linear_layers
from jattri.models import MLP


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


def _mlp_setup():
    model = MLP(hidden=(5, 4), num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 7), jnp.float64)
    y = jnp.arange(6) % 3
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)

    def loss_fn(p, z):
        xi, yi = z
        logits = model.apply({"params": p}, xi[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi)

    return loss_fn, params, (x, y)


def test_discovers_layers_and_shapes():
    loss_fn, params, (x, y) = _mlp_setup()
    layers = linear_layers(loss_fn, params, (x[0], y[0]))
    assert list(layers) == ["fc1", "fc2", "fc3"]
    assert [(l.d_in, l.d_out, l.use_bias, l.positions) for l in layers.values()] == [
        (7, 5, True, 1), (5, 4, True, 1), (4, 3, True, 1)]
    assert layer_params(params, "fc2")["kernel"].shape == (5, 4)
    with pytest.raises(KeyError, match="fc9"):
        layer_params(params, "fc9")


def test_outer_products_equal_per_example_gradients():
    loss_fn, params, data = _mlp_setup()
    io = jax.vmap(lambda z: layer_io(loss_fn, params, z))(data)
    grads = jax.vmap(jax.grad(loss_fn), (None, 0))(params, data)
    for name in ["fc1", "fc2", "fc3"]:
        a, s = io[name]
        assert a.shape[:2] == (6, 1)
        kernel = jnp.einsum("nti,nto->nio", a, s)
        np.testing.assert_allclose(kernel, grads[name]["kernel"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.sum(1), grads[name]["bias"], rtol=1e-10, atol=1e-12)
    # The recorded input of the first layer is the example itself.
    np.testing.assert_allclose(io["fc1"][0][:, 0], data[0])
    # The forward-only capture gives the same inputs.
    layers = linear_layers(loss_fn, params, (data[0][0], data[1][0]))
    inputs = jax.vmap(lambda z: layer_inputs(loss_fn, params, z, layers=layers))(data)
    for name in ["fc1", "fc2", "fc3"]:
        np.testing.assert_array_equal(inputs[name], io[name][0])


class _Shared(nn.Module):
    """One Dense applied to every row of a sequence and reused twice; no bias."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3, use_bias=False, name="shared")
        h = jnp.tanh(dense(x))          # (T, 3) from (T, 3)
        return nn.Dense(1, name="head")(dense(h)).sum()


def test_weight_sharing_and_sequences():
    model = _Shared()
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 3), jnp.float64)  # T = 4 positions
    params = model.init(jax.random.PRNGKey(3), x)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    loss_fn = lambda p, z: model.apply({"params": p}, z) ** 2
    layers = linear_layers(loss_fn, params, x)
    assert layers["shared"].positions == 8 and not layers["shared"].use_bias
    io = layer_io(loss_fn, params, x)
    g = jax.grad(loss_fn)(params, x)
    a, s = io["shared"]
    np.testing.assert_allclose(a.T @ s, g["shared"]["kernel"], rtol=1e-10)
    a, s = io["head"]
    np.testing.assert_allclose(s.sum(0), g["head"]["bias"], rtol=1e-10)


def test_non_flax_loss_has_no_layers():
    loss_fn = lambda p, z: jnp.sum((p["w"] * z) ** 2)
    params = {"w": jnp.ones(3)}
    assert linear_layers(loss_fn, params, jnp.ones(3)) == {}
    assert layer_io(loss_fn, params, jnp.ones(3)) == {}


def test_bare_dense_model():
    """A bare nn.Dense applied as the whole model has the empty path."""
    import flax.linen as nn
    from jattri.func.layers import layer_inputs, layer_io, layer_params, linear_layers
    model = nn.Dense(3)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
    loss = lambda p, z: jnp.sum(model.apply({"params": p}, z[None]) ** 2)
    z = jnp.arange(4.0)
    layers = linear_layers(loss, params, z)
    assert list(layers) == [""]
    a, s = layer_io(loss, params, z, layers=layers)[""]
    g = jax.grad(loss)(params, z)
    np.testing.assert_allclose(layer_params(g, "")["kernel"], a.T @ s, rtol=1e-6)
    np.testing.assert_allclose(layer_params(g, "")["bias"], s.sum(0), rtol=1e-6)


def test_extra_arguments_and_abstract_discovery():
    """Member functions ``loss(params, example, index, aux)`` (as methods call them):
    the extra arguments pass through; discovery works on shapes alone."""
    base, params, (x, y) = _mlp_setup()
    loss = lambda p, z, i, aux: aux * base(p, z) * (1.0 + i)
    z, i, aux = (x[0], y[0]), jnp.int32(2), jnp.float64(0.5)
    spec = lambda t: jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), t)
    layers = linear_layers(loss, spec(params), spec(z), spec(i), spec(aux))
    assert layers == linear_layers(loss, params, z, i, aux)
    io = layer_io(loss, params, z, i, aux, layers=layers)
    g = jax.grad(loss)(params, z, i, aux)
    for name in layers:
        a, s = io[name]
        np.testing.assert_allclose(a.T @ s, g[name]["kernel"], rtol=1e-10, atol=1e-14)
