"""EK-FAC scored in its eigenbasis (``jattri.methods.influence._ekfac_basis``): both
sides' gradients as coordinates Q_Aᵀ G Q_S made from the layers, the inverse a diagonal
between them. In float64 against a reference from ``jax.grad`` per-example gradients
rotated by the state's own factors, and against the parameter-space route (the plan
switched off); the plan is taken only where exact and cheaper."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jattri
from jattri.func import fisher
from jattri.methods import influence
from jattri.models import MLP

from _toy import assert_top_k_matches_dense, classification_data, f64

pytestmark = pytest.mark.usefixtures("x64")


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (5, 6, 3) -> 3 classes
        h = jnp.tanh(nn.Conv(4, (3, 3), padding="SAME", name="conv")(x))
        return nn.Dense(3, name="head")(h.reshape(-1))


def _loss(model, l2=0.0):
    def loss_fn(p, z):
        logits = model.apply({"params": p}, z[0])
        reg = 0.5 * l2 * sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1]) + reg
    return loss_fn


def _mlp_problem(seed=0):
    model = MLP(hidden=(6,), num_classes=3)
    x, y = classification_data(30, 4, 3, seed=seed)
    params = f64(model.init(jax.random.PRNGKey(seed + 1), x[0])["params"])
    return model, params, (x[:24], y[:24]), (x[24:], y[24:])


def _conv_problem(n_train, n_test):
    model = ConvNet()
    n = n_train + n_test
    x = jax.random.normal(jax.random.PRNGKey(3), (n, 5, 6, 3), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(4), (n,), 0, 3)
    params = f64(model.init(jax.random.PRNGKey(5), x[0])["params"])
    return model, params, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _counting(monkeypatch):
    """Counts the traces of ``fisher.ekfac_coordinates`` (the eigenbasis plan); the
    caches are cleared so that no program compiled by another test hides a trace."""
    jax.clear_caches()
    calls = []
    real = fisher.ekfac_coordinates
    monkeypatch.setattr(fisher, "ekfac_coordinates",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _parameter_space(monkeypatch, make):
    """Scores of a factory made with the eigenbasis plan switched off."""
    with monkeypatch.context() as m:
        m.setattr(influence, "_ekfac_basis", lambda *a: None)
        return make()


def _reference(loss, target, params, state, train, test, damping):
    """Σ_layers vec(Q_AᵀG_iQ_S) · vec(Q_AᵀG_tQ_S) / (Λ* + λ), G from ``jax.grad``."""
    factors = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), state.curvature)

    def layer_grads(fn, data):
        g = jax.jit(jax.vmap(jax.grad(fn), (None, 0)))(params, data)
        out = {}
        for name in factors.layers:
            kernel = np.asarray(g[name]["kernel"]).reshape(len(data[1]), -1,
                                                          g[name]["bias"].shape[-1])
            out[name] = np.concatenate([kernel, np.asarray(g[name]["bias"])[:, None]], 1)
        return out

    gi, gt = layer_grads(loss, train), layer_grads(target, test)
    total = 0.0
    for name, f in factors.layers.items():
        ri = np.einsum("ji,njk,kl->nil", f.qa, gi[name], f.qs).reshape(len(gi[name]), -1)
        rt = np.einsum("ji,njk,kl->nil", f.qa, gt[name], f.qs).reshape(len(gt[name]), -1)
        total = total + (ri / (f.eigvals.ravel() + damping)) @ rt.T
    return total


def test_mlp_scores_in_the_eigenbasis_equal_the_reference(monkeypatch):
    model, params, train, test = _mlp_problem()
    loss = _loss(model)
    calls = _counting(monkeypatch)
    attr = jattri.influence_ekfac(loss, damping=1e-2)
    state = attr.cache(params, train)
    got = np.asarray(attr.attribute(state, test))
    assert calls, "the eigenbasis plan was not taken on an MLP"
    want = _reference(loss, loss, params, state, train, test, 1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    # another damping at attribute, and top-k, through the same plan
    np.testing.assert_allclose(attr.attribute(state, test, damping=0.3),
                               _reference(loss, loss, params, state, train, test, 0.3),
                               rtol=1e-9)
    assert_top_k_matches_dense(attr.attribute(state, test, top_k=5, lowest=True), got, 5,
                               rtol=1e-9)
    old = _parameter_space(monkeypatch, lambda: jattri.influence_ekfac(loss, damping=1e-2))
    np.testing.assert_allclose(old.attribute(old.cache(params, train), test), got, rtol=1e-9)
    # a streamed test set: its size unknown, the cost rule cannot run, the
    # parameter-space route gives the same scores
    traced = len(calls)
    batches = [jax.tree_util.tree_map(lambda x: x[i:i + 4], test) for i in (0, 4)]
    streamed = attr.attribute(state, jattri.Stream(batches))
    np.testing.assert_allclose(streamed, got, rtol=1e-9)
    assert len(calls) == traced


def test_target_function_and_members(monkeypatch):
    """A target other than the loss (its own layer inputs and output gradients), and
    two members (scores averaged, each in its own eigenbasis)."""
    model, params, train, test = _mlp_problem(seed=2)
    _, params2, _, _ = _mlp_problem(seed=5)
    loss = _loss(model)
    target = lambda p, z: model.apply({"params": p}, z[0])[0] ** 2  # one logit, squared
    task = jattri.Task(loss, target_fn=target)
    calls = _counting(monkeypatch)
    attr = jattri.influence_ekfac(task, damping=1e-2)
    state = attr.cache(params, train)
    got = np.asarray(attr.attribute(state, test))
    assert calls
    np.testing.assert_allclose(got, _reference(loss, target, params, state, train, test, 1e-2),
                               rtol=1e-9)
    members = jattri.checkpoints([params, params2])
    both = attr.attribute(attr.cache(members, train), test)
    old = _parameter_space(monkeypatch, lambda: jattri.influence_ekfac(task, damping=1e-2))
    np.testing.assert_allclose(both, old.attribute(old.cache(members, train), test),
                               rtol=1e-9)


@pytest.mark.parametrize("n_train, n_test, taken", [(6, 24, True), (40, 4, False)])
def test_conv_layers_and_the_cost_rule(monkeypatch, n_train, n_test, taken):
    """A Conv layer at T = 30 positions (i = 28, o = 4) and a Dense head (i = 121,
    o = 3). Per example the coordinates cost 6,944 + 15,013 multiply-adds, the formed
    gradients 3,360 + 363, and each test gradient's rotation there and back 7,168 +
    90,024 more: the plan is cheaper while (n + m)·18,234 ≤ m·97,192, i.e. n_train ≤
    4.33·n_test. Either way the scores are the reference's."""
    model, params, train, test = _conv_problem(n_train, n_test)
    loss = _loss(model)
    calls = _counting(monkeypatch)
    attr = jattri.influence_ekfac(loss, damping=1e-2)
    state = attr.cache(params, train)
    got = np.asarray(attr.attribute(state, test))
    assert bool(calls) == taken
    want = _reference(loss, loss, params, state, train, test, 1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-11 * np.abs(want).max())


def test_an_l2_term_in_the_loss_keeps_the_parameter_space_route(monkeypatch):
    """The L2 term's gradient is not made by the layers: the rebuilt gradient differs
    from ``jax.grad``, so the plan is refused and the scores use the exact gradients."""
    model, params, train, test = _mlp_problem()
    loss = _loss(model, l2=0.1)
    calls = _counting(monkeypatch)
    attr = jattri.influence_ekfac(loss, damping=1e-2)
    state = attr.cache(params, train)
    got = attr.attribute(state, test)
    assert not calls
    grads = lambda data: jax.vmap(lambda z: ravel_pytree(jax.grad(loss)(params, z))[0])(data)
    u = jax.vmap(lambda g: ravel_pytree(fisher.ekfac_ihvp(
        jax.tree_util.tree_map(lambda x: x[0], state.curvature),
        ravel_pytree(params)[1](g), 1e-2))[0])(grads(test))
    np.testing.assert_allclose(got, grads(train) @ u.T, rtol=1e-9)


@pytest.mark.parametrize("scanned", [0, 16])
@pytest.mark.parametrize("n_test", [2, 6, 40])
def test_scores_without_formed_coordinates_equal_the_formed_product(monkeypatch, n_test,
                                                                     scanned):
    """``fisher.ekfac_scores`` (a one-position layer's scores as s̃ᵀ(U_tᵀ ã), where
    that is no larger than its formed coordinates) equals ``ekfac_coordinates @ uᵀ``
    for every branch: the MLP's 5 × 6 layer (i < o) and 7 × 3 layer (i ≥ o) taken
    factored at 2 and 6 test rows, formed at 40; factored as a scan over the smaller
    side (``_SCANNED_RANK`` 16) or as one contraction (0); padded rows give 0."""
    monkeypatch.setattr(fisher, "_SCANNED_RANK", scanned)
    from jattri.engine import Chunk
    from jattri.func.layers import find_layers

    model, params, train, _ = _mlp_problem()
    loss = _loss(model)
    state = jattri.influence_ekfac(loss, damping=1e-2).cache(params, train)
    factors = jax.tree_util.tree_map(lambda x: x[0], state.curvature)
    layers = tuple(find_layers(lambda p, z, i, a: loss(p, z), params,
                               jax.tree_util.tree_map(lambda x: x[0], train),
                               jax.ShapeDtypeStruct((), jnp.int32), None).values())
    fn = lambda p, z, i, a: loss(p, z)
    valid = jnp.arange(24) < 21
    chunk = Chunk(train, jnp.arange(24, dtype=jnp.int32), valid)
    coords = fisher.ekfac_coordinates(fn, params, None, chunk, layers, factors)
    u = jax.random.normal(jax.random.PRNGKey(7), (n_test, coords.shape[1]), jnp.float64)
    formed = []
    real = fisher._rotated_grads
    monkeypatch.setattr(fisher, "_rotated_grads", lambda *a: formed.append(1) or real(*a))
    got = fisher.ekfac_scores(fn, params, None, chunk, layers, factors, u)
    assert len(formed) == (0 if n_test <= 6 else 2)  # which layers were formed
    np.testing.assert_allclose(got, coords @ u.T, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(got)[21:] == 0)


def test_the_training_side_is_checked_before_the_fit(monkeypatch):
    """``cache`` checks the training side's rebuilt gradient (``tracin._rebuild_error``)
    before it dispatches the fit's first program, and ``attribute`` reuses that answer:
    checked in ``attribute``, reading it waited for the whole fit to run."""
    import importlib

    from jattri import engine
    tracin = importlib.import_module("jattri.methods.tracin")  # the module, not the method

    model, params, train, test = _mlp_problem()
    order = []
    real_check, real_scan = tracin._rebuild_error, engine.scan
    monkeypatch.setattr(tracin, "_rebuild_error",
                        lambda *a: order.append("check") or real_check(*a))
    monkeypatch.setattr(engine, "scan", lambda step, *a, **k: order.append(
        step.__name__) or real_scan(step, *a, **k))
    attr = jattri.influence_ekfac(_loss(model), damping=1e-2)
    state = attr.cache(params, train)
    assert order[0] == "check" and "_ekfac_covariance_step" in order, order
    attr.attribute(state, test)
    assert order.count("check") == 1, order
