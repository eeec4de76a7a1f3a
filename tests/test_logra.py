"""LoGra against explicit influence under the per-layer block-diagonal damped empirical
Fisher, built densely from jax.grad in float64."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jattri
from jattri.func.projection import derive_key, seeded_projection


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


class Net(nn.Module):
    """Dense layers only; ``pool=True`` takes (T, d) inputs: Dense per position, then
    mean over positions (layer gradients are sums over positions)."""

    pool: bool = False

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, name="fc1")(x))
        if self.pool:
            h = h.mean(axis=-2)
        h = jnp.tanh(nn.Dense(4, name="fc2", use_bias=False)(h))
        return nn.Dense(3, name="fc3")(h)


LAYERS = ("fc1", "fc2", "fc3")


def make(pool=False, members=1, n=14, m=4, seq=3):
    net = Net(pool=pool)
    shape = (seq, 3) if pool else (3,)
    params = [jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                     net.init(jax.random.PRNGKey(s), jnp.zeros(shape))["params"])
              for s in range(members)]

    def loss_fn(p, z):
        logits = net.apply({"params": p}, z[0][None] if not pool else z[0])
        logits = logits.reshape(-1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1])

    def data(seed, size):
        kx, ky = jax.random.split(jax.random.PRNGKey(seed))
        return (jax.random.normal(kx, (size,) + shape), jax.random.randint(ky, (size,), 0, 3))

    return loss_fn, params, data(10, n), data(11, m)


def layer_block_grads(loss_fn, params, data, layers=LAYERS):
    """Per example and layer: [∂kernel (row-major), ∂bias], by an explicit loop."""
    grad = jax.jit(jax.grad(loss_fn))
    out = {name: [] for name in layers}
    for i in range(len(data[1])):
        g = grad(params, (data[0][i], data[1][i]))
        for name in layers:
            parts = [np.asarray(g[name]["kernel"]).reshape(-1)]
            if "bias" in g[name]:
                parts.append(np.asarray(g[name]["bias"]))
            out[name].append(np.concatenate(parts))
    return {name: np.stack(v) for name, v in out.items()}


def dense_projection(key, member, layer, name, k_in=3, k_out=2):
    """The dense (P_in ⊗ P_out) LoGra never forms: member ``member``'s Rademacher
    factors of ``LAYERS[layer]`` (seeds ``derive_key(derive_key(derive_key(key, m), ℓ),
    side)``)."""
    d_in, d_out = {"fc1": (4, 5), "fc2": (5, 4), "fc3": (5, 3)}[name]  # d_in with the bias
    layer_key = derive_key(derive_key(key, member), layer)
    p_in = seeded_projection("rademacher", derive_key(layer_key, 0), d_in, k_in)
    p_out = seeded_projection("rademacher", derive_key(layer_key, 1), d_out, k_out)
    return np.kron(np.asarray(p_in(jnp.eye(d_in))), np.asarray(p_out(jnp.eye(d_out))))


def reference(loss_fn, params, train, test, damping, project=None):
    """Σ_ℓ g_ℓ,iᵀ (F_ℓ + λ_ℓ I)⁻¹ g_ℓ,t with F_ℓ = mean_j g_ℓ,j g_ℓ,jᵀ (dense)."""
    g_train = layer_block_grads(loss_fn, params, train)
    g_test = layer_block_grads(loss_fn, params, test)
    total = 0.0
    for l, name in enumerate(LAYERS):
        a, b = g_train[name], g_test[name]
        if project is not None:
            a, b = a @ project[l], b @ project[l]
        fisher = a.T @ a / len(a)
        fisher += damping * np.trace(fisher) / len(fisher) * np.eye(len(fisher))
        total = total + a @ np.linalg.solve(fisher, b.T)
    return total


@pytest.mark.parametrize("pool", [False, True])
def test_identity_projection_equals_block_diagonal_fisher_influence(pool):
    loss_fn, params, train, test = make(pool=pool)
    attr = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None, damping=0.05,
                        curvature="empirical")
    state = attr.cache(params[0], train)
    expect = reference(loss_fn, params[0], train, test, 0.05)
    np.testing.assert_allclose(attr.attribute(state, test), expect, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(reference(loss_fn, params[0], train, train, 0.05)),
                               rtol=1e-8)
    # The exact per-layer gradients: full layer blocks (bias as the last input row).
    assert state.phi.shape == (14, 1, 4 * 5 + 5 * 4 + 5 * 3)


def test_projected_equals_dense_kronecker_projection_of_full_gradients():
    loss_fn, params, train, _ = make(members=2)
    key = jax.random.PRNGKey(3)
    attr = jattri.logra(loss_fn, proj_dim_in=3, proj_dim_out=2, damping=0.1, key=key,
                        projection="rademacher", curvature="empirical")
    state = attr.cache(jattri.checkpoints(params), train)
    per_member = []
    for m, p in enumerate(params):
        proj = [dense_projection(key, m, l, name) for l, name in enumerate(LAYERS)]
        # Scored on the training set itself (one compilation less than a test set).
        per_member.append(reference(loss_fn, p, train, train, 0.1, project=proj))
    scores = attr.attribute(state, train)
    np.testing.assert_allclose(scores, np.mean(per_member, axis=0), rtol=1e-8, atol=1e-12)
    assert state.phi.shape == (14, 2, 3 * 6)
    np.testing.assert_allclose(attr.self_attribute(state), np.diag(scores), rtol=1e-8)


def test_layer_selection_and_target_fn():
    loss_fn, params, train, test = make()
    # A target different from the loss: minus the correct logit.
    net = Net()
    target_fn = lambda p, z: -net.apply({"params": p}, z[0][None])[0, z[1]]
    task = jattri.Task(loss_fn, target_fn=target_fn)
    attr = jattri.logra(task, proj_dim_in=None, proj_dim_out=None, damping=0.05,
                        layers=["fc3"], curvature="empirical")
    state = attr.cache(params[0], train)
    g_train = layer_block_grads(loss_fn, params[0], train, layers=["fc3"])["fc3"]
    g_test = layer_block_grads(target_fn, params[0], test, layers=["fc3"])["fc3"]
    fisher = g_train.T @ g_train / 14
    fisher += 0.05 * np.trace(fisher) / len(fisher) * np.eye(len(fisher))
    np.testing.assert_allclose(attr.attribute(state, test),
                               g_train @ np.linalg.solve(fisher, g_test.T), rtol=1e-8,
                               atol=1e-12)
    g_self = layer_block_grads(target_fn, params[0], train, layers=["fc3"])["fc3"]
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.sum(g_train @ np.linalg.inv(fisher) * g_self, axis=1),
                               rtol=1e-8)


def test_bad_arguments():
    loss_fn, params, train, test = make()
    with pytest.raises(ValueError, match="damping"):
        jattri.logra(loss_fn, damping=0.0)
    with pytest.raises(ValueError, match="proj_dim_in"):
        jattri.logra(loss_fn, proj_dim_in=0)
    with pytest.raises(ValueError, match="layers"):
        jattri.logra(loss_fn, layers=["conv1"]).cache(params[0], train)
    plain = lambda p, z: jnp.sum((z[0] @ p["w"]) ** 2)
    with pytest.raises(ValueError, match="Dense"):
        jattri.logra(plain).cache({"w": jnp.ones((3, 2))}, train)
    attr = jattri.logra(loss_fn)
    state = attr.cache(params[0], train)
    with pytest.raises(ValueError, match="damping"):
        attr.attribute(state, test, damping=-1.0)


def test_singular_fisher_block_is_refused_not_nan():
    """A layer whose gradients are all zero has F = 0, so F + damping·tr(F)/k·I = 0 and
    its Cholesky is NaN: attribute and self_attribute say so instead of returning NaN."""
    loss_fn, params, train, test = make()
    dead = lambda p, z: loss_fn(p, z) + 0.0 * jnp.sum(
        nn.Dense(2, name="dead").apply({"params": p["dead"]}, z[0]))
    p = dict(params[0], dead={"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)})
    attr = jattri.logra(dead, proj_dim_in=None, proj_dim_out=None)
    state = attr.cache(p, train)
    for call in (lambda: attr.attribute(state, test), lambda: attr.self_attribute(state)):
        with pytest.raises(ValueError, match="not numerically positive definite"):
            call()
    # leaving the dead layer out works
    alive = jattri.logra(dead, proj_dim_in=None, proj_dim_out=None, layers=list(LAYERS))
    assert np.all(np.isfinite(alive.attribute(alive.cache(p, train), test)))


def test_streamed_cache_damping_override_and_top_k():
    loss_fn, params, train, test = make(members=2)
    members = jattri.checkpoints(params)
    attr = jattri.logra(loss_fn, proj_dim_in=3, proj_dim_out=2, damping=0.1, chunk_size=4,
                        curvature="empirical")
    state = attr.cache(members, train)
    # Five batches of uneven sizes, re-cut into chunks of 4: the same φ and Fisher.
    cuts = [0, 3, 5, 9, 10, 14]
    batches = [jax.tree_util.tree_map(lambda x, a=a, b=b: x[a:b], train)
               for a, b in zip(cuts, cuts[1:])]
    streamed = attr.cache(members, jattri.stream(batches))
    assert streamed.train is None
    np.testing.assert_allclose(streamed.phi, state.phi, rtol=1e-12, atol=1e-14)
    for f, g in zip(streamed.fisher, state.fisher):
        np.testing.assert_allclose(f, g, rtol=1e-12, atol=1e-14)
    dense = np.asarray(attr.attribute(state, test))
    np.testing.assert_allclose(attr.attribute(streamed, test), dense, rtol=1e-10, atol=1e-14)
    # Damping changed at scoring time == a fresh cache at that damping.
    fresh = jattri.logra(loss_fn, proj_dim_in=3, proj_dim_out=2, damping=0.01, chunk_size=4,
                         curvature="empirical")
    fresh_state = fresh.cache(members, train)
    np.testing.assert_allclose(attr.attribute(state, test, damping=0.01),
                               fresh.attribute(fresh_state, test), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(attr.self_attribute(state, damping=0.01),
                               fresh.self_attribute(fresh_state), rtol=1e-10)
    assert not np.allclose(attr.attribute(state, test, damping=0.01), dense)
    # top-k (and lowest) merged tile by tile == the dense matrix's argsort.
    top = attr.attribute(state, test, top_k=3, lowest=True)
    order = np.argsort(-dense, axis=0, kind="stable")
    np.testing.assert_array_equal(top.indices, order[:3].T)
    np.testing.assert_allclose(top.scores, np.take_along_axis(dense, order[:3], 0).T,
                               rtol=1e-12)
    low = np.argsort(dense, axis=0, kind="stable")[:3].T
    np.testing.assert_array_equal(top.lowest_indices, low)
    np.testing.assert_allclose(top.lowest_scores, np.take_along_axis(dense.T, low, 1),
                               rtol=1e-12)
    # The stage is jittable with the members traced.
    np.testing.assert_allclose(jax.jit(attr.attribute)(state, test), dense, rtol=1e-12)


def layer_hessian_blocks(loss_fn, params, data, layers=LAYERS):
    """Per layer, the dense (d_ℓ, d_ℓ) Hessian of the mean training loss with respect to
    that layer's own parameters (kernel row-major, then bias), by ``jax.hessian``."""
    out = {}
    for name in layers:
        mine = params[name]

        def mean_loss(leaves, name=name):
            p = dict(params, **{name: leaves})
            return jnp.mean(jax.vmap(lambda x, y: loss_fn(p, (x, y)))(*data))

        flat0, unravel = jax.flatten_util.ravel_pytree(
            [mine["kernel"]] + ([mine["bias"]] if "bias" in mine else []))
        out[name] = np.asarray(jax.hessian(lambda f: mean_loss(dict(zip(
            ["kernel", "bias"], unravel(f)))))(flat0))
    return out


@pytest.mark.parametrize("pool", [False, True])
def test_ggn_is_each_layers_hessian_block(pool):
    """``curvature="ggn"``: F_ℓ is the block of the loss's Hessian for layer ℓ's own
    parameters (the layer is linear in them, so the block is Σ_τσ ã_τ ã_σᵀ ⊗
    ∂²loss/∂y_τ∂y_σ: the Gauss-Newton block when the rest of the network is piecewise
    linear), cross-position terms included when the layer runs at T = 3 positions
    (``pool``); scores are influence under those damped blocks."""
    import jax.flatten_util  # noqa: F401  (ravel_pytree in the reference)

    loss_fn, params, train, test = make(pool=pool)
    hess = layer_hessian_blocks(loss_fn, params[0], train)
    # tanh layers: a block may be indefinite; a relative damping that makes every one
    # positive definite
    damping = 0.1 + max(2 * max(0.0, -np.linalg.eigvalsh(h)[0]) * len(h) / np.trace(h)
                        for h in hess.values())
    attr = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None, damping=damping,
                        curvature="ggn", chunk_size=5)
    state = attr.cache(params[0], train)
    for f, name in zip(state.fisher, LAYERS):
        np.testing.assert_allclose(f[0], hess[name], rtol=1e-9, atol=1e-12)
    g_train = layer_block_grads(loss_fn, params[0], train)
    g_test = layer_block_grads(loss_fn, params[0], test)
    expect = 0.0
    for name in LAYERS:
        h = hess[name] + damping * np.trace(hess[name]) / len(hess[name]) * np.eye(len(hess[name]))
        expect = expect + g_train[name] @ np.linalg.solve(h, g_test[name].T)
    np.testing.assert_allclose(attr.attribute(state, test), expect, rtol=1e-8, atol=1e-12)
    # the empirical Fisher is another matrix
    emp = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None,
                       curvature="empirical").cache(params[0], train)
    assert not np.allclose(emp.fisher[0], state.fisher[0], rtol=1e-3)


@pytest.mark.parametrize("pool", [False, True])
def test_ggn_projected_is_the_projected_hessian_block(pool):
    """With P_in ⊗ P_out (two members, each its own factors) F_ℓ = (P_in ⊗ P_out)ᵀ H_ℓ
    (P_in ⊗ P_out): one Hessian-vector product per column of P_out, never the whole
    output Hessian; at one position (the class-pair path) and at T = 3."""
    import jax.flatten_util  # noqa: F401

    loss_fn, params, train, _ = make(members=2, pool=pool)
    key = jax.random.PRNGKey(3)
    attr = jattri.logra(loss_fn, proj_dim_in=3, proj_dim_out=2, key=key,
                        projection="rademacher", curvature="ggn")
    state = attr.cache(jattri.checkpoints(params), train)
    for m, p in enumerate(params):
        hess = layer_hessian_blocks(loss_fn, p, train)
        for l, name in enumerate(LAYERS):
            proj = dense_projection(key, m, l, name)
            np.testing.assert_allclose(state.fisher[l][m], proj.T @ hess[name] @ proj,
                                       rtol=1e-9, atol=1e-12)


def test_curvature_is_validated_and_recorded():
    loss_fn, params, train, test = make()
    with pytest.raises(ValueError, match="curvature"):
        jattri.logra(loss_fn, curvature="hessian")
    attr = jattri.logra(loss_fn, curvature="ggn", chunk_size=4)
    state = attr.cache(params[0], train)
    with pytest.raises(ValueError, match="curvature"):  # a state of the other Fisher
        jattri.logra(loss_fn).attribute(state, test)
    # streamed in uneven batches: the same Gauss-Newton blocks
    batches = [jax.tree_util.tree_map(lambda x, a=a: x[a:a + 5], train) for a in (0, 5, 10)]
    streamed = attr.cache(params[0], jattri.stream(batches))
    for f, g in zip(streamed.fisher, state.fisher):
        np.testing.assert_allclose(f, g, rtol=1e-12, atol=1e-14)


def test_ggn_conv_layer_is_its_hessian_block():
    """A Conv layer (16 output positions, kernel-ordered patches): F is the block of
    the loss's Hessian for the kernel and bias, cross-position terms included."""
    import jax.flatten_util

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(3, (2, 2), name="c1")(x))
            return nn.Dense(3, name="fc")(x.reshape(-1))

    cnn = CNN()
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 4, 4, 2))
    y = jnp.arange(10) % 3
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    cnn.init(jax.random.PRNGKey(0), x[0])["params"])
    loss = lambda p, z: -jax.nn.log_softmax(cnn.apply({"params": p}, z[0]))[z[1]]
    state = jattri.logra(loss, proj_dim_in=None, proj_dim_out=None,
                         curvature="ggn").cache(params, (x, y))
    for f, name in zip(state.fisher, ("c1", "fc")):
        flat0, unravel = jax.flatten_util.ravel_pytree(
            [params[name]["kernel"], params[name]["bias"]])

        def mean_loss(flat, name=name):
            kernel, bias = unravel(flat)
            p = dict(params, **{name: {"kernel": kernel, "bias": bias}})
            return jnp.mean(jax.vmap(lambda a, c: loss(p, (a, c)))(x, y))

        np.testing.assert_allclose(f[0], jax.hessian(mean_loss)(flat0), rtol=1e-9,
                                   atol=1e-12)


def test_many_calls_with_many_members_return():
    """Regression: with 5 members and three layer blocks, LoGra's factorisations were
    batched over members, and on a 2-core CPU jaxlib 0.10.2's thread pool deadlocked
    after about 30 ``attribute``-sized solves (every thread idle, the call never
    returning). In a subprocess, so a hang fails the test instead of the suite."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import importlib
        import jax.numpy as jnp
        import numpy as np
        L = importlib.import_module("jattri.methods.logra")
        rng = np.random.default_rng(0)
        fisher = []
        for k in (256, 256, 160):
            a = rng.normal(size=(5, 300, k)).astype(np.float32)
            fisher.append(jnp.asarray(np.einsum("mnk,mnl->mkl", a, a) / 300))
        fisher = tuple(fisher)
        psi = jnp.asarray(rng.normal(size=(200, 5, 672)).astype(np.float32))
        for i in range(120):
            np.asarray(L._solve(fisher, 10.0 ** (-3 + (i % 30) * 0.2), psi))
            if i % 20 == 0:
                np.asarray(L._inverses(fisher, 0.1)[0])
        print("returned")
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("120 LoGra solves with 5 members did not return within 240 s")
    assert "returned" in out.stdout, out.stderr[-2000:]


class ReluNet(nn.Module):
    """Net with ReLUs: every layer's Hessian block is its Gauss-Newton block (PSD)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(5, name="fc1")(x))
        h = nn.relu(nn.Dense(4, name="fc2", use_bias=False)(h))
        return nn.Dense(3, name="fc3")(h)


def test_default_is_gauss_newton_with_the_stationary_l2_on_exact_blocks():
    """Defaults (``curvature="auto"``, ``damping=None``) on a ReLU MLP of T·k_out ≤ 256:
    the Gauss-Newton blocks; with identity projections damped by the stationary L2 λ̂
    (absolute, every layer), scores Σ_ℓ g_ℓ,iᵀ (H_ℓ + λ̂I)⁻¹ g_ℓ,t with H_ℓ from
    ``jax.hessian``; projected, LogIX's relative 0.1."""
    import jax.flatten_util  # noqa: F401  (ravel_pytree in the reference)

    net = ReluNet()
    x = jax.random.normal(jax.random.PRNGKey(10), (14, 3))
    y = jax.random.randint(jax.random.PRNGKey(11), (14,), 0, 3)
    train, test = (x[:10], y[:10]), (x[10:], y[10:])
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    net.init(jax.random.PRNGKey(0), x[0])["params"])
    loss_fn = lambda p, z: optax.softmax_cross_entropy_with_integer_labels(
        net.apply({"params": p}, z[0]), z[1])
    attr = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None)
    state = attr.cache(params, train)
    lam = float(jattri.stationary_damping(loss_fn, params, train))
    assert [float(d[0]) for d in state.damping] == [lam] * 3
    hess = layer_hessian_blocks(loss_fn, params, train)
    g_train = layer_block_grads(loss_fn, params, train)
    g_test = layer_block_grads(loss_fn, params, test)
    expect = 0.0
    for f, name in zip(state.fisher, LAYERS):
        np.testing.assert_allclose(f[0], hess[name], rtol=1e-9, atol=1e-12)
        h = hess[name] + lam * np.eye(len(hess[name]))
        expect = expect + g_train[name] @ np.linalg.solve(h, g_test[name].T)
    np.testing.assert_allclose(attr.attribute(state, test), expect, rtol=1e-8, atol=1e-12)
    fixed = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None, curvature="ggn",
                         damping=0.3)  # a given damping is relative
    np.testing.assert_allclose(attr.attribute(state, test, damping=0.3),
                               fixed.attribute(fixed.cache(params, train), test), rtol=1e-10)
    # projected: the same Gauss-Newton blocks as curvature="ggn", relative 0.1
    projected = jattri.logra(loss_fn, proj_dim_in=3, proj_dim_out=2)
    ggn = jattri.logra(loss_fn, proj_dim_in=3, proj_dim_out=2, curvature="ggn", damping=0.1)
    got, want = projected.cache(params, train), ggn.cache(params, train)
    assert got.damping is None
    for f, g in zip(got.fisher, want.fisher):
        np.testing.assert_allclose(f, g, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(projected.attribute(got, test), ggn.attribute(want, test),
                               rtol=1e-10, atol=1e-14)


def test_auto_falls_back_to_the_empirical_fisher(monkeypatch):
    """``curvature="auto"`` keeps the empirical Fisher where a Gauss-Newton block is
    indefinite at the default damping (tanh at random weights), with a warning, and
    where a layer would need more than ``GGN_AUTO_PRODUCTS`` products (silently)."""
    import importlib
    L = importlib.import_module("jattri.methods.logra")

    loss_fn, params, train, test = make()
    empirical = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None,
                             curvature="empirical")
    want = empirical.cache(params[0], train)
    auto = jattri.logra(loss_fn, proj_dim_in=None, proj_dim_out=None)
    with pytest.warns(UserWarning, match="not positive definite"):
        got = auto.cache(params[0], train)
    for f, g in zip(got.fisher, want.fisher):
        np.testing.assert_allclose(f, g, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(auto.attribute(got, test), empirical.attribute(want, test),
                               rtol=1e-10, atol=1e-14)  # at relative 0.1 per layer
    monkeypatch.setattr(L, "GGN_AUTO_PRODUCTS", 1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cheap = auto.cache(params[0], train)
    assert cheap.damping is None
    for f, g in zip(cheap.fisher, want.fisher):
        np.testing.assert_allclose(f, g, rtol=1e-12, atol=1e-15)
