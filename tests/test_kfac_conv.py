"""K-FAC / EK-FAC and LoGra through Flax ``nn.Conv`` layers (KFC, Grosse & Martens,
2016), against references built by hand in float64: input patches cut out with explicit
slicing loops, a hand-written forward pass for the output gradients, per-example
gradients from ``jax.grad``, and exact (dense-Hessian) influence."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jattri
from jattri.func import fisher
from jattri.func.layers import layer_io, layer_params, linear_layers
from jattri.methods.influence import influence_ekfac
from jattri.models import ResNet9

from _toy import assert_ggn_ekfac_is_exact, eigenbasis_scores, f64, kronecker_eigenbasis

# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


# ------------------------------------------------------------------ layer_io on Conv

GEOMETRIES = [
    dict(kernel_size=(3, 3), padding="SAME"),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(3, 2), padding="CIRCULAR"),
    dict(kernel_size=(2, 2), kernel_dilation=2, padding=[(1, 0), (2, 1)]),
    dict(kernel_size=(2, 2), input_dilation=2, padding=[(1, 1), (0, 1)], use_bias=False),
    dict(kernel_size=3, padding="CAUSAL"),  # 1-D convolution over a sequence
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(map(str, g.values())))
def test_conv_rows_and_output_gradients_give_the_per_example_gradient(geometry):
    one_d = isinstance(geometry["kernel_size"], int)
    shape = (7, 3) if one_d else (5, 6, 3)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.sum(jnp.tanh(nn.Conv(4, name="conv", **geometry)(x))
                           * jnp.arange(1.0, 5.0))

    net = Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (3,) + shape, jnp.float64)
    params = f64(net.init(jax.random.PRNGKey(1), x[0])["params"])
    loss_fn = lambda p, z: net.apply({"params": p}, z)
    layer = linear_layers(loss_fn, params, x[0])["conv"]
    kernel = params["conv"]["kernel"]
    size = (3,) if one_d else tuple(geometry["kernel_size"])
    assert layer.kind == "conv" and layer.kernel_shape == kernel.shape
    assert layer.d_in == int(np.prod(size)) * 3 and layer.d_out == 4

    a, s = jax.vmap(lambda z: layer_io(loss_fn, params, z)["conv"])(x)
    grads = jax.vmap(jax.grad(loss_fn), (None, 0))(params, x)
    assert a.shape == (3, layer.positions, layer.d_in)
    np.testing.assert_allclose(jnp.einsum("nti,nto->nio", a, s).reshape((3,) + kernel.shape),
                               grads["conv"]["kernel"], rtol=1e-10, atol=1e-12)
    # The rows are the patches: rows @ kernel (+ bias) is the layer's own output.
    bound = nn.Conv(4, **geometry)
    out = jax.vmap(lambda z: bound.apply({"params": params["conv"]}, z))(x)
    np.testing.assert_allclose(a @ kernel.reshape(layer.d_in, 4)
                               + params["conv"].get("bias", 0.0),
                               out.reshape(3, -1, 4), rtol=1e-10, atol=1e-12)
    if "bias" in params["conv"]:
        np.testing.assert_allclose(s.sum(1), grads["conv"]["bias"], rtol=1e-10, atol=1e-12)


def test_grouped_and_masked_convs_are_not_factored():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(4, (2, 2), feature_group_count=2, name="grouped")(x)
            h = nn.Conv(2, (2, 2), mask=jnp.ones((2, 2, 4, 2)), name="masked")(h)
            return nn.Conv(2, (2, 2), name="plain")(h).sum()

    params = Net().init(jax.random.PRNGKey(0), jnp.ones((4, 4, 2)))["params"]
    layers = linear_layers(lambda p, z: Net().apply({"params": p}, z), params, jnp.ones((4, 4, 2)))
    assert list(layers) == ["plain"]


# --------------------------------------------------- EK-FAC of a small CNN, by hand

class CNN(nn.Module):
    """conv1 (3x3 SAME) - relu - conv2 (2x2, stride 2, VALID, no bias) - tanh - fc."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3, 3), padding="SAME", name="conv1")(x))
        h = jnp.tanh(nn.Conv(2, (2, 2), strides=2, padding="VALID", use_bias=False,
                             name="conv2")(h))
        return nn.Dense(3, name="fc")(h.reshape(h.shape[:-3] + (-1,)))


def _patches(x, k, stride, pad):
    """(H'·W', k·k·C) by explicit slicing: rows in output raster order, each patch
    flattened in (row offset, column offset, channel) order."""
    x = np.pad(np.asarray(x), ((pad, pad), (pad, pad), (0, 0)))
    rows = []
    for i in range(0, x.shape[0] - k + 1, stride):
        for j in range(0, x.shape[1] - k + 1, stride):
            rows.append(x[i:i + k, j:j + k, :].reshape(-1))
    return np.stack(rows)


def _cnn_by_hand(params, x, deltas):
    """The CNN written out with ``_patches``: ``(logits, [conv1 rows, conv2 rows, fc row])``,
    ``deltas[k]`` added to layer k's pre-activation output (positions × features)."""
    p1 = jnp.asarray(_patches(x, 3, 1, 1))
    h = jax.nn.relu(p1 @ params["conv1"]["kernel"].reshape(18, 3) + params["conv1"]["bias"]
                    + deltas[0])
    p2 = jnp.stack([h.reshape(6, 6, 3)[i:i + 2, j:j + 2].reshape(-1)
                    for i in (0, 2, 4) for j in (0, 2, 4)])
    h = jnp.tanh(p2 @ params["conv2"]["kernel"].reshape(12, 2) + deltas[1])
    f = h.reshape(-1)
    logits = f @ params["fc"]["kernel"] + params["fc"]["bias"] + deltas[2]
    return logits, [p1, p2, f[None]]


def _cnn_problem(n=12, m=3):
    net = CNN()
    kx, ky = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (n + m, 6, 6, 2), jnp.float64)
    y = jax.random.randint(ky, (n + m,), 0, 3)
    params = f64(net.init(jax.random.PRNGKey(4), x[:1])["params"])
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss_fn = lambda p, z: ce(net.apply({"params": p}, z[0][None])[0], z[1])
    return loss_fn, params, (x[:n], y[:n]), (x[n:], y[n:])


NAMES = ("conv1", "conv2", "fc")
OUT = ((36, 3), (9, 2), (3,))


def _block(g, name):
    """[kernel (row-major); bias] of one layer of a gradient tree, flat."""
    parts = [np.asarray(g[name]["kernel"]).reshape(-1)]
    if "bias" in g[name]:
        parts.append(np.asarray(g[name]["bias"]))
    return np.concatenate(parts)


def _reference_ekfac_scores(loss_fn, params, train, test, damping, correct):
    """Dense EK-FAC / K-FAC scores: A, S from ``_cnn_by_hand``, Λ from jax.grad."""
    ce = optax.softmax_cross_entropy_with_integer_labels
    zeros = [jnp.zeros(s) for s in OUT]
    a_mom = {name: 0.0 for name in NAMES}
    s_mom = {name: 0.0 for name in NAMES}
    n = len(train[1])
    for i in range(n):
        x, y = np.asarray(train[0][i]), train[1][i]
        logits, rows = _cnn_by_hand(params, x, zeros)
        np.testing.assert_allclose(logits, CNN().apply({"params": params}, x[None])[0],
                                   rtol=1e-10)  # the hand-written forward is the CNN
        s = jax.grad(lambda d: ce(_cnn_by_hand(params, x, d)[0], y))(zeros)
        for k, name in enumerate(NAMES):
            r = np.asarray(rows[k])
            if "bias" in params[name]:
                r = np.concatenate([r, np.ones((len(r), 1))], 1)
            sk = np.asarray(s[k]).reshape(len(r), -1)
            a_mom[name] = a_mom[name] + r.T @ r / len(r) / n
            s_mom[name] = s_mom[name] + sk.T @ sk / n
    grad = jax.jit(jax.grad(loss_fn))
    g_train = [grad(params, (train[0][i], train[1][i])) for i in range(n)]
    g_test = [grad(params, (test[0][i], test[1][i])) for i in range(len(test[1]))]
    total = 0.0
    for name in NAMES:
        q, kfac = kronecker_eigenbasis(a_mom[name], s_mom[name])
        gtr = np.stack([_block(g, name) for g in g_train])
        gte = np.stack([_block(g, name) for g in g_test])
        assert gtr.shape[1] == q.shape[0]
        lam = np.mean((gtr @ q) ** 2, axis=0) if correct else kfac
        total = total + eigenbasis_scores(q, lam, gtr, gte, damping)
    return total


@pytest.mark.parametrize("correct", [True, False], ids=["ekfac", "kfac"])
def test_cnn_ekfac_matches_dense_reference(correct):
    loss_fn, params, train, test = _cnn_problem()
    layers = linear_layers(loss_fn, params, (train[0][0], train[1][0]))
    assert [(l.name, l.kind, l.d_in, l.positions) for l in layers.values()] == [
        ("conv1", "conv", 18, 36), ("conv2", "conv", 12, 9), ("fc", "dense", 18, 1)]
    attr = influence_ekfac(loss_fn, damping=1e-3, correct_eigenvalues=correct)
    got = np.asarray(attr.attribute(attr.cache(params, train), test))
    want = _reference_ekfac_scores(loss_fn, params, train, test, 1e-3, correct)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())


# ------------------------------------ Kronecker-exact case: exact influence recovered

def test_conv_with_squared_loss_ggn_ekfac_is_exact_influence():
    """A conv layer regressed with squared loss on all its outputs: the Hessian of the
    mean loss in [kernel; bias] is (mean_i Σ_t ã_t ã_tᵀ) ⊗ I, exactly a Kronecker
    product, so GGN EK-FAC (and GGN K-FAC) equal exact influence."""
    conv = nn.Conv(2, (2, 2), strides=(1, 2), padding="SAME", name="conv")
    kx, kt = jax.random.split(jax.random.PRNGKey(5))
    x = jax.random.normal(kx, (30, 4, 4, 2), jnp.float64)
    t = jax.random.normal(kt, (30, 4, 2, 2), jnp.float64)
    params = f64(conv.init(jax.random.PRNGKey(6), x[0])["params"])
    loss_fn = lambda p, z: 0.5 * jnp.sum((conv.apply({"params": p}, z[0]) - z[1]) ** 2)
    assert_ggn_ekfac_is_exact(loss_fn, params, (x[:24], t[:24]), (x[24:], t[24:]))


# ------------------------------------------------------------------- LoGra and ResNet

def test_logra_identity_projection_on_cnn_equals_block_fisher_influence():
    loss_fn, params, train, test = _cnn_problem()
    grad = jax.jit(jax.grad(loss_fn))
    total = 0.0
    for name in NAMES:
        gtr = np.stack([_block(grad(params, (train[0][i], train[1][i])), name)
                        for i in range(len(train[1]))])
        gte = np.stack([_block(grad(params, (test[0][i], test[1][i])), name)
                        for i in range(len(test[1]))])
        f = gtr.T @ gtr / len(gtr)
        f += 0.05 * np.trace(f) / len(f) * np.eye(len(f))
        total = total + gtr @ np.linalg.solve(f, gte.T)
    attr = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None, damping=0.05,
                        curvature="empirical")
    np.testing.assert_allclose(attr.attribute(attr.cache(params, train), test), total,
                               rtol=1e-8)


def test_resnet9_every_conv_is_factored():
    model = ResNet9(num_classes=2, widths=(4, 4, 4, 4), channels_first=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3), jnp.float64)
    y = jnp.arange(6) % 2
    variables = f64(model.init(jax.random.PRNGKey(1), x[:1]))
    stats = variables["batch_stats"]
    ce = optax.softmax_cross_entropy_with_integer_labels

    def loss_fn(p, z):
        return ce(model.apply({"params": p, "batch_stats": stats}, z[0][None])[0], z[1])

    params = variables["params"]
    layers = linear_layers(loss_fn, params, (x[0], y[0]))
    convs = [name for name, l in layers.items() if l.kind == "conv"]
    n_convs = sum(1 for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 4)
    assert len(convs) == n_convs == 9 and list(layers)[-1] == "linear"
    for name in convs:
        assert layer_params(params, name)["kernel"].shape == layers[name].kernel_shape
    factors = fisher.ekfac_factors(loss_fn, params, (x, y))
    # BatchNorm scales/offsets are outside the factored layers: diagonal Fisher there,
    # zeros on every conv/linear leaf.
    for path, leaf in jax.tree_util.tree_leaves_with_path(factors.diag):
        key = jax.tree_util.keystr(path)
        if "bn" in key:
            assert np.all(np.asarray(leaf) >= 0)
        else:
            assert np.all(np.asarray(leaf) == 0), key
    attr = influence_ekfac(loss_fn, damping=1e-3)
    scores = np.asarray(attr.attribute(attr.cache(params, (x, y)), (x[:2], y[:2])))
    assert scores.shape == (6, 2) and np.all(np.isfinite(scores))
