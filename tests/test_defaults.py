"""Default damping rules (issue 12): each default equals its stated rule, computed here
slowly in float64 numpy; no LDS and no timing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from jattri.methods.influence import stationary_damping


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _problem(weight_decay, steps=3000):
    """Softmax regression (5 features, 3 classes, 40 examples) trained by gradient
    descent on mean cross-entropy + (weight_decay/2)‖θ‖²."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = rng.integers(0, 3, size=40)

    def loss_fn(params, example):
        xi, yi = example
        logits = xi @ params["w"] + params["b"]
        return -jax.nn.log_softmax(logits)[yi]

    def objective(params):
        ce = jnp.mean(jax.vmap(lambda a, b: loss_fn(params, (a, b)))(x, y))
        l2 = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return ce + 0.5 * weight_decay * l2

    params = {"w": jnp.asarray(rng.normal(size=(5, 3)) * 0.1), "b": jnp.zeros(3)}
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, p,
                                                    jax.grad(objective)(p)))
    for _ in range(steps):
        params = step(params)
    return loss_fn, params, (jnp.asarray(x), jnp.asarray(y)), (x, y)


def _numpy_rule(params, x, y):
    """−⟨ḡ, θ⟩/‖θ‖² in float64 numpy, the softmax-CE gradient written out."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(3)[y]                       # ∂CE/∂logits
    gw, gb = x.T @ r / len(x), r.mean(0)
    theta = np.concatenate([b.ravel(), w.ravel()])
    g = np.concatenate([gb.ravel(), gw.ravel()])
    return -g @ theta / (theta @ theta)


def test_stationary_damping_equals_the_numpy_rule_and_recovers_the_training_l2():
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.05)
    assert jattri.stationary_damping is stationary_damping  # exported at top level
    lam = float(stationary_damping(loss_fn, params, train))
    np.testing.assert_allclose(lam, _numpy_rule(params, x, y), rtol=1e-10)
    np.testing.assert_allclose(lam, 0.05, rtol=1e-4)  # converged: stationarity gives it back


@pytest.mark.parametrize("factory", [jattri.influence_explicit, jattri.influence_cg,
                                     jattri.influence_arnoldi, jattri.influence_lissa])
def test_influence_default_damping_is_the_stationary_rule(factory):
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.02)
    attr = factory(loss_fn)
    state = attr.cache(params, train)
    want = _numpy_rule(params, x, y)
    np.testing.assert_allclose(float(state.damping), want, rtol=1e-10)
    # the default scores are the scores at that damping
    np.testing.assert_allclose(np.asarray(attr.attribute(state, train)),
                               np.asarray(attr.attribute(state, train, damping=want)),
                               rtol=1e-6, atol=1e-9)


def test_explicit_default_matches_dense_influence_at_the_rule():
    """Slow reference: g_iᵀ (H + λ̂I)⁻¹ g_t with H from jax.hessian of the mean loss."""
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.02)
    attr = jattri.influence_explicit(loss_fn)
    scores = np.asarray(attr.attribute(attr.cache(params, train), train))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    per = lambda t: jax.vmap(lambda a, b: loss_fn(unravel(t), (a, b)))(*train)
    h = np.asarray(jax.hessian(lambda t: jnp.mean(per(t)))(flat))
    g = np.asarray(jax.jacobian(per)(flat))
    lam = _numpy_rule(params, x, y)
    want = g @ np.linalg.solve(h + lam * np.eye(len(flat)), g.T)
    np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-9)


def test_stationary_damping_falls_back_without_l2():
    # At −θ* (θ* trained with L2) the mean gradient points along θ: λ̂ ≤ 0, checked.
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.05)
    flipped = jax.tree_util.tree_map(lambda a: -a, params)
    assert _numpy_rule(flipped, x, y) <= 0
    assert float(stationary_damping(loss_fn, flipped, train)) == pytest.approx(1e-3)


def test_explicit_damping_given_is_kept():
    loss_fn, params, train, _ = _problem(weight_decay=0.05, steps=10)
    state = jattri.influence_explicit(loss_fn, damping=0.3).cache(params, train)
    assert float(state.damping) == pytest.approx(0.3)


def test_ekfac_default_damping_is_a_tenth_of_the_mean_eigenvalue():
    """EK-FAC's corrected eigenvalues sum to E‖G_i‖² per layer (the basis is orthogonal),
    so its mean eigenvalue is the mean squared per-example gradient per parameter."""
    _, params, train, (x, y) = _problem(weight_decay=0.02, steps=200)
    dense_loss = lambda p, z: -jax.nn.log_softmax(
        jattri.func.dense(z[0], p["w"], p["b"]))[z[1]]
    state = jattri.influence_ekfac(dense_loss).cache(params, train)
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(3)[y]
    sq = (np.sum(x ** 2, 1) + 1.0) * np.sum(r ** 2, 1)   # ‖x_i r_iᵀ‖² + ‖r_i‖²
    np.testing.assert_allclose(float(state.damping), 0.1 * sq.mean() / (w.size + b.size),
                               rtol=1e-8)


def test_trak_default_damping_is_the_objectives_l2_in_the_kernel():
    """damping = n·λ̂·d / (r̄ · tr ΦᵀΦ), r̄ = mean p(1 − p), λ̂ the numpy stationary L2;
    with ``prob_fn`` the same (λ̂ then from a separate gradient pass); an explicit
    damping keeps Kronfluence's relative rule."""
    from test_methods_core import trak_reference
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.02, steps=200)
    task = jattri.Task(loss_fn)
    key = jax.random.PRNGKey(3)
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    logits = x @ w + b
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True))[np.arange(len(y)), y]
    r_bar = np.mean(prob * (1 - prob))
    lam, n, d = _numpy_rule(params, x, y), len(y), w.size + b.size
    rule = lambda kern: n * lam * d / (r_bar * np.trace(kern))
    want = trak_reference(task, [params], train, train, 8, rule, key)
    members = jattri.checkpoints([params])
    attr = jattri.trak(task, proj_dim=8, key=key)
    state = attr.cache(members, train)
    np.testing.assert_allclose(np.asarray(attr.attribute(state, train)), want, rtol=1e-7,
                               atol=1e-10)
    assert 0.01 < float(state.damping[0]) < 1e3
    prob_fn = lambda p, z: jax.nn.softmax(z[0] @ p["w"] + p["b"])[z[1]]
    with_prob = jattri.trak(task, proj_dim=8, key=key, prob_fn=prob_fn)
    np.testing.assert_allclose(with_prob.cache(members, train).damping, state.damping,
                               rtol=1e-8)
    # the SJLT (φ projected leaf by leaf and Σ∇loss by one backward pass, as the dense),
    # and no projection (Σ∇loss from the raveled gradients that are φ)
    for k, projection in ((8, "sjlt"), (None, "auto")):
        other = jattri.trak(task, proj_dim=k, key=key, projection=projection)
        np.testing.assert_allclose(
            np.asarray(other.attribute(other.cache(members, train), train)),
            trak_reference(task, [params], train, train, k, rule, key,
                           projection=projection),
            rtol=1e-7, atol=1e-10)
    fixed = jattri.trak(task, proj_dim=8, key=key, damping=0.1)
    assert fixed.cache(members, train).damping is None
    np.testing.assert_allclose(
        np.asarray(fixed.attribute(fixed.cache(members, train), train)),
        trak_reference(task, [params], train, train, 8, 0.1, key), rtol=1e-7, atol=1e-10)


def test_rps_stationary_l2_is_half_the_stationary_l2():
    """``l2="stationary"``: λ̂/2 (the refit's λ‖W‖² against training's (λ/2)‖θ‖²), λ̂
    the numpy rule over every parameter under the cross-entropy of ``logits_fn`` at the
    labels; with ``label_fn="predicted"`` there is no label objective: 1e-3."""
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.05)
    lam = _numpy_rule(params, x, y)
    assert abs(lam - 0.05) < 1e-3  # the training L2, recovered
    kw = dict(features_fn=lambda p, z: z[0], logits_fn=lambda p, z: z[0] @ p["w"] + p["b"],
              tol=1e-10, l2="stationary")
    got = jattri.rps(**kw).cache(params, train)
    np.testing.assert_allclose(got.l2, [lam / 2], rtol=1e-8)
    want = jattri.rps(**{**kw, "l2": lam / 2}).cache(params, train)
    np.testing.assert_allclose(got.alpha, want.alpha, rtol=1e-6)
    assert not np.allclose(got.alpha, jattri.rps(**{**kw, "l2": 1e-3}).cache(
        params, train).alpha, rtol=1e-2)
    predicted = jattri.rps(label_fn="predicted", **kw).cache(params, train)
    np.testing.assert_allclose(predicted.l2, [1e-3])


def _numpy_refit(f, targets, l2):
    """argmin (1/n) Σ CE(softmax(f W), t) + l2‖W‖² by scipy's L-BFGS, float64."""
    from scipy.optimize import minimize
    n, (p, c) = len(f), (f.shape[1], targets.shape[1])

    def fun(wflat):
        z = f @ wflat.reshape(p, c)
        z = z - z.max(1, keepdims=True)
        q = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        value = -np.sum(targets * np.log(q)) / n + l2 * wflat @ wflat
        return value, (f.T @ (q - targets) / n).ravel() + 2 * l2 * wflat

    res = minimize(fun, np.zeros(p * c), jac=True, method="L-BFGS-B",
                   options=dict(gtol=1e-12, ftol=1e-15, maxiter=10_000))
    return res.x.reshape(p, c)


def test_rps_default_l2_maximises_the_logit_fidelity():
    """Default ``l2``: the λ whose refit's logits correlate best (rows centred) with
    the model's, found on the 1/16-decade lattice of its search; here compared with a
    scipy refit at every lattice point of 10^-6.5 … 10^1.5 (129 refits, float64). The
    model's logits come from a bias-carrying softmax regression trained with L2 0.05,
    so neither end of the range reproduces them."""
    loss_fn, params, train, (x, y) = _problem(weight_decay=0.05)
    logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    onehot = np.eye(3)[y]

    def fidelity(l2):
        z = x @ _numpy_refit(x, onehot, l2)
        zc, lc = z - z.mean(1, keepdims=True), logits - logits.mean(1, keepdims=True)
        return np.sum(zc * lc) / np.sqrt(np.sum(zc ** 2) * np.sum(lc ** 2))

    lattice = -6.5 + np.arange(129) / 16
    values = np.array([fidelity(10.0 ** v) for v in lattice])
    best = lattice[np.argmax(values)]
    assert -6 < best < 1  # an interior optimum: the rule is tested, not the range's end
    kw = dict(features_fn=lambda p, z: z[0], logits_fn=lambda p, z: z[0] @ p["w"] + p["b"],
              tol=1e-10)
    state = jattri.rps(**kw).cache(params, train)
    np.testing.assert_allclose(np.log10(state.l2), [best], atol=1e-9)
    fixed = jattri.rps(l2=float(state.l2[0]), **kw).cache(params, train)
    np.testing.assert_allclose(state.alpha, fixed.alpha, rtol=1e-6)
    assert jattri.rps(l2=1e-3, **kw).cache(params, train).l2[0] == 1e-3
    # logits, rows centred: a sharper model (×5) with per-example offsets is the same
    # model to the rule (the probabilities' correlation would pick 10^-6.5 here)
    sharp = dict(kw, logits_fn=lambda p, z: 5 * (z[0] @ p["w"] + p["b"]) + jnp.sum(z[0]))
    np.testing.assert_allclose(jattri.rps(**sharp).cache(params, train).l2, state.l2,
                               rtol=1e-12)
