"""EK-FAC / K-FAC with the Gauss-Newton curvature (``curvature="ggn"``) against dense
float64 references: the Kronecker eigenbasis built by hand with eigenvalues read off
the exact Hessian block, and exact (dense-Hessian) influence."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattri.func import fisher
from jattri.methods.influence import influence_ekfac
from jattri.models import MLP, LogisticRegression


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


from _toy import classification_data as _classification_data  # noqa: E402
from _toy import f64 as _f64  # noqa: E402
from _toy import assert_ggn_ekfac_is_exact  # noqa: E402
from _toy import eigenbasis_scores, kronecker_eigenbasis  # noqa: E402
from _toy import manual_mlp  # noqa: E402


def _ce_loss(model):
    def loss_fn(p, z):
        logits = model.apply({"params": p}, z[0][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1])
    return loss_fn


def _dense_ggn_ekfac_scores(forward, out_shapes, params, train, test, damping):
    """GGN-EK-FAC built by hand, block-diagonal over the Dense layers ``sorted(params)``
    (``forward(params, x, deltas) -> (logits, inputs)`` written out by hand, layer k
    called at T_k positions, ``out_shapes[k] = (T_k, d_out)``), each layer's
    parameters laid out as vec([kernel; bias]) row-major:

      A = mean_i (1/T) Σ_t ã_it ã_itᵀ,  S = mean_i Σ_t ∂²loss_i/∂y_t²,  Q = Q_A ⊗ Q_S
      (columns of eigh),  Λ = diag(Qᵀ H_l Q) with H_l the layer's block of the exact
      mean-loss Hessian (= mean_i Σ_tt' ã_it ã_it'ᵀ ⊗ ∂²loss_i/∂y_t∂y_t', the layer
      being linear in its weights).

    Output Hessians by ``jax.hessian`` on the perturbations, the Hessian block by
    ``jax.hessian`` on the parameters: no code shared with jattri.
    """
    names = sorted(params)
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss_fn = lambda p, z: ce(forward(p, z[0], zeros)[0], z[1])
    zeros = [jnp.zeros(shape) for shape in out_shapes]

    def per_example(z):
        x, y = z
        inputs = forward(params, x, zeros)[1]
        a = [jnp.concatenate([u.reshape(-1, u.shape[-1]), jnp.ones((u.size // u.shape[-1], 1))],
                             1) for u in inputs]
        h = jax.hessian(lambda ds: ce(forward(params, x, ds)[0], y))(zeros)
        return ([u.T @ u / u.shape[0] for u in a],
                [jnp.einsum("tatb->ab", h[k][k].reshape(2 * (int(np.prod(shape[:-1])), shape[-1])))
                 for k, shape in enumerate(out_shapes)])

    a_mom, s_mom = jax.jit(jax.vmap(per_example))(train)

    def layer_grads(z):
        g = jax.grad(loss_fn)(params, z)
        return [jnp.concatenate([g[n]["kernel"], g[n]["bias"][None]]).ravel() for n in names]

    def block_loss(k, w):
        name = names[k]
        w = w.reshape(params[name]["kernel"].shape[0] + 1, -1)
        p = dict(params, **{name: {"kernel": w[:-1], "bias": w[-1]}})
        return jnp.mean(jax.vmap(lambda z: loss_fn(p, z))(train))

    g_train = jax.jit(jax.vmap(layer_grads))(train)
    g_test = jax.jit(jax.vmap(layer_grads))(test)
    total = 0.0
    for k, name in enumerate(names):
        q, _ = kronecker_eigenbasis(jnp.mean(a_mom[k], 0), jnp.mean(s_mom[k], 0))
        w0 = jnp.concatenate([params[name]["kernel"], params[name]["bias"][None]]).ravel()
        hess = np.asarray(jax.jit(jax.hessian(lambda w: block_loss(k, w)))(w0))
        lam = np.maximum(np.einsum("pi,pq,qi->i", q, hess, q), 0)
        total = total + eigenbasis_scores(q, lam, g_train[k], g_test[k], damping)
    return total


# --------------------------------------------------------------- exact references

@pytest.mark.parametrize("hidden", [(), (5,)])
def test_ggn_ekfac_matches_dense_reference(hidden):
    model = MLP(hidden=hidden, num_classes=3)
    x, y = _classification_data(30, 4, 3, seed=1)
    params = _f64(model.init(jax.random.PRNGKey(2), x[:1])["params"])
    loss = _ce_loss(model)
    attr = influence_ekfac(loss, damping=1e-2, curvature="ggn")
    train, test = (x[:24], y[:24]), (x[24:], y[24:])
    state = attr.cache(params, train)
    got = np.asarray(attr.attribute(state, test))
    names = sorted(params)
    shapes = [(params[n]["bias"].shape[0],) for n in names]
    want = _dense_ggn_ekfac_scores(manual_mlp, shapes, params, train, test, 1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(attr.attribute(state, train)), rtol=1e-9)


class _TokenMLP(nn.Module):
    """fc1 applied at every one of T positions, then mean-pooled into fc2."""

    @nn.compact
    def __call__(self, x):  # (T, d)
        h = nn.relu(nn.Dense(5, name="fc1")(x))
        return nn.Dense(3, name="fc2")(h.mean(0))


def _token_mlp_forward(p, x, deltas):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"] + deltas[0])
    u = h.mean(0)
    return u @ p["fc2"]["kernel"] + p["fc2"]["bias"] + deltas[1], [x, u]


def test_ggn_ekfac_multi_position_layer_matches_dense_reference():
    """A layer applied at T = 4 positions: the cross-position terms H[t, t'] enter Λ."""
    model = _TokenMLP()
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    x = jax.random.normal(k1, (26, 4, 3), jnp.float64)
    y = jax.random.randint(k2, (26,), 0, 3)
    params = _f64(model.init(jax.random.PRNGKey(8), x[0])["params"])
    loss = lambda p, z: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, z[0]), z[1])
    attr = influence_ekfac(loss, damping=1e-2, curvature="ggn")
    train, test = (x[:20], y[:20]), (x[20:], y[20:])
    got = np.asarray(attr.attribute(attr.cache(params, train), test))
    want = _dense_ggn_ekfac_scores(_token_mlp_forward, [(4, 5), (3,)], params, train, test,
                                   1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


def test_ggn_differs_from_empirical():
    """The option is not a no-op: softmax S = E[diag(p) − ppᵀ] ≠ E[s sᵀ] off the optimum."""
    model = LogisticRegression(num_classes=3)
    x, y = _classification_data(20, 3, 3, seed=3)
    params = _f64(model.init(jax.random.PRNGKey(4), x[:1])["params"])
    loss = _ce_loss(model)
    emp = fisher.ekfac_factors(loss, params, (x, y))
    ggn = fisher.ekfac_factors(loss, params, (x, y), curvature="ggn")
    e, g = [np.concatenate([np.ravel(f.eigvals) for f in fac.layers.values()])
            for fac in (emp, ggn)]
    assert np.abs(e - g).max() > 1e-3 * np.abs(g).max()


def test_linear_mse_ggn_ekfac_is_exact_influence():
    """y = W x + b with 0.5‖y − t‖²: ∂²loss/∂y² = I, so the Hessian is E[ããᵀ] ⊗ I, a
    Kronecker product; GGN-EK-FAC and GGN-K-FAC both equal exact influence."""
    model = LogisticRegression(num_classes=2)  # one Dense, used here as a linear map
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(k1, (30, 4), jnp.float64) + 0.5
    t = x @ jax.random.normal(k2, (4, 2), jnp.float64) + 0.3 * jax.random.normal(k3, (30, 2))
    params = _f64(model.init(jax.random.PRNGKey(6), x[:1])["params"])
    loss = lambda p, z: 0.5 * jnp.sum((model.apply({"params": p}, z[0]) - z[1]) ** 2)
    assert_ggn_ekfac_is_exact(loss, params, (x[:24], t[:24]), (x[24:], t[24:]))


# ---------------------------------------------- agreement with exact influence
# How close EK-FAC is to exact influence over damping, and why (Kronecker factorisation,
# block-diagonality, Hessian vs Gauss-Newton): tests/test_ekfac_accuracy.py.


def test_curvature_is_validated():
    model = LogisticRegression(num_classes=2)
    with pytest.raises(ValueError, match="curvature"):
        influence_ekfac(_ce_loss(model), curvature="fisher")
