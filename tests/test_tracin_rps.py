"""TracInCP (with Grad-Dot/Grad-Cos as its one-checkpoint cases) and representer points,
against explicit float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jattri
from _toy import assert_top_k_matches_dense, cache_quiet_and_reported


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


def init_params(key, d_in=4, hidden=5, classes=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (d_in, hidden)) / 2,
            "b1": jax.random.normal(k2, (hidden,)) / 4,
            "w2": jax.random.normal(k3, (hidden, classes)) / 2,
            "b2": jnp.zeros((classes,))}


def features(p, z):
    return jnp.tanh(z[0] @ p["w1"] + p["b1"])


def logits(p, z):
    return features(p, z) @ p["w2"] + p["b2"]


def loss_fn(p, z):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, z), z[1])


def target_fn(p, z):  # a target different from the loss: minus the correct logit
    return -logits(p, z)[z[1]]


def make_data(key, n, d_in=4, classes=3):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (n, d_in)), jax.random.randint(ky, (n,), 0, classes))



@pytest.fixture
def setup():
    checkpoints = [init_params(jax.random.PRNGKey(s)) for s in range(3)]
    train = make_data(jax.random.PRNGKey(10), 12)
    test = make_data(jax.random.PRNGKey(11), 5)
    return checkpoints, train, test


_GRAD = {}


def explicit_grad(fn, params, data, i):
    """Flat gradient of ONE example, taken by a plain jax.grad (no vmap)."""
    if fn not in _GRAD:
        _GRAD[fn] = jax.jit(jax.grad(fn))
    z = jax.tree_util.tree_map(lambda x: x[i], data)
    return np.asarray(ravel_pytree(_GRAD[fn](params, z))[0])


def reference_tracin(checkpoints, weights, train, test, target=loss_fn, cos=False):
    """Σ_k w_k ⟨g_i^k, g_t^k⟩ by explicit Python loops over members and examples."""
    n, m = len(train[1]), len(test[1])
    out = np.zeros((n, m))
    for w, p in zip(weights, checkpoints):
        g_train = [explicit_grad(loss_fn, p, train, i) for i in range(n)]
        g_test = [explicit_grad(target, p, test, t) for t in range(m)]
        for i, gi in enumerate(g_train):
            for t, gt in enumerate(g_test):
                dot = gi @ gt
                if cos:
                    dot /= np.linalg.norm(gi) * np.linalg.norm(gt)
                out[i, t] += w * dot
    return out


def test_tracin_equals_explicit_weighted_sum(setup):
    checkpoints, train, test = setup
    lrs = [0.5, 0.3, 0.1]
    task = jattri.Task(loss_fn, target_fn=target_fn)
    members = jattri.checkpoints(checkpoints)
    attr = jattri.tracin(task, weights=lrs)
    state = attr.cache(members, train)
    ref = reference_tracin(checkpoints, lrs, train, test, target=target_fn)
    np.testing.assert_allclose(attr.attribute(state, test), ref, rtol=1e-10, atol=1e-12)
    self_ref = np.diag(reference_tracin(checkpoints, lrs, train, train, target=target_fn))
    np.testing.assert_allclose(attr.self_attribute(state), self_ref, rtol=1e-10)

    # Default weights: the mean over members.
    mean = jattri.tracin(task)
    np.testing.assert_allclose(
        mean.attribute(mean.cache(members, train), test),
        reference_tracin(checkpoints, [1 / 3] * 3, train, test, target=target_fn),
        rtol=1e-10, atol=1e-12)


def test_grad_dot_and_grad_cos_are_one_checkpoint_tracin(setup):
    checkpoints, train, test = setup
    one = checkpoints[0]
    ref = reference_tracin(checkpoints[:1], [1.0], train, test)
    for attr in (jattri.grad_dot(loss_fn), jattri.tracin(loss_fn)):
        state = attr.cache(one, train)
        np.testing.assert_allclose(attr.attribute(state, test), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(attr.self_attribute(state),
                                   np.diag(attr.attribute(state, train)), rtol=1e-10)
    ref_cos = reference_tracin(checkpoints[:1], [1.0], train, test, cos=True)
    for attr in (jattri.grad_cos(loss_fn), jattri.tracin(loss_fn, normalize=True)):
        state = attr.cache(one, train)
        np.testing.assert_allclose(attr.attribute(state, test), ref_cos, rtol=1e-10)
        np.testing.assert_allclose(attr.self_attribute(state), 1.0, rtol=1e-10)
    # Several members: grad_dot averages, i.e. tracin with equal weights 1/M.
    gd = jattri.grad_dot(loss_fn)
    np.testing.assert_allclose(gd.attribute(gd.cache(jattri.checkpoints(checkpoints), train),
                                            test),
                               reference_tracin(checkpoints, [1 / 3] * 3, train, test),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher", "sjlt"])
def test_projected_tracin_converges(setup, projection):
    checkpoints, train, _ = setup
    members = jattri.checkpoints(checkpoints[:2])
    exact_attr = jattri.tracin(loss_fn)
    exact = np.asarray(exact_attr.attribute(exact_attr.cache(members, train), train))
    dims = (8, 128, 2048)
    keys = [jax.random.PRNGKey(s) for s in range(3)]
    errors = []
    for k in dims:
        errs = []
        for key in keys:  # the same fixed keys at every k
            attr = jattri.tracin(loss_fn, proj_dim=k, projection=projection, key=key)
            approx = np.asarray(attr.attribute(attr.cache(members, train), train))
            errs.append(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
        errors.append(np.mean(errs))
    # Error ~ 1/√k: it must fall at every step (×16 in k: ≈ ×0.25 expected) and by
    # far overall.
    assert all(b < 0.6 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15 * errors[0] and errors[-1] < 0.1, errors


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_bfloat16_projected_tracin_is_the_rounded_product(setup, projection):
    """``projection_dtype="bfloat16"``: Σ_k w_k ⟨bf16(g_i) P̃_k, bf16(g_t) P̃_k⟩ with the
    gradients rounded to bfloat16 and P̃_k member k's projection (key ``fold_in(key,
    k)``) rounded to bfloat16, all else float64; Grad-Cos's norms after rounding."""
    checkpoints, train, test = setup
    lrs, k, key = [0.5, 0.3], 16, jax.random.PRNGKey(7)
    task = jattri.Task(loss_fn, target_fn=target_fn)
    members = jattri.checkpoints(checkpoints[:2])
    rnd = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float64))
    want, cos, full = (np.zeros((12, 5)) for _ in range(3))
    for j, (w, p) in enumerate(zip(lrs, checkpoints)):
        d = ravel_pytree(p)[0].size
        make = lambda **kw: jattri.func.random_projection(
            projection, jax.random.fold_in(key, j), d, k, **kw)(jnp.eye(d))
        low, exact = np.asarray(make(dtype="bfloat16")), np.asarray(make())
        g = np.stack([explicit_grad(loss_fn, p, train, i) for i in range(12)])
        gt = np.stack([explicit_grad(target_fn, p, test, t) for t in range(5)])
        a, b = rnd(g) @ low, rnd(gt) @ low
        want += w * a @ b.T
        cos += w * (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
            b / np.linalg.norm(b, axis=1, keepdims=True)).T
        full += w * (g @ exact) @ (gt @ exact).T
    got = {}
    for normalize, ref in ((False, want), (True, cos)):
        attr = jattri.tracin(task, weights=lrs, proj_dim=k, projection=projection, key=key,
                             normalize=normalize, projection_dtype="bfloat16")
        got[normalize] = np.asarray(attr.attribute(attr.cache(members, train), test))
        np.testing.assert_allclose(got[normalize], ref, rtol=1e-5,
                                   atol=1e-6 * np.abs(ref).max())
    err = np.linalg.norm(got[False] - full) / np.linalg.norm(full)
    assert 2**-14 < err < 2**-6, err


def test_tracin_bad_arguments(setup):
    checkpoints, train, _ = setup
    members = jattri.checkpoints(checkpoints)
    # weights: one per member, checked when the members arrive (at cache)
    with pytest.raises(ValueError, match="weights"):
        jattri.tracin(loss_fn, weights=[1.0, 2.0]).cache(members, train)
    with pytest.raises(ValueError, match="weights"):
        jattri.tracin(loss_fn, weights=[1.0, np.nan, 1.0]).cache(members, train)
    with pytest.raises(ValueError, match="projection"):
        jattri.tracin(loss_fn, proj_dim=8, projection="dense")
    with pytest.raises(ValueError, match="proj_dim"):
        jattri.tracin(loss_fn, proj_dim=0)


# ----------------------------------------------------------------------------- RPS

def lr_logits(p, z):
    return z[0] @ p["w"] + p["b"]


def lr_loss(p, z):
    return optax.softmax_cross_entropy_with_integer_labels(lr_logits(p, z), z[1])


def lr_params(key, d_in=4, classes=3):
    return {"w": jax.random.normal(key, (d_in, classes)), "b": jnp.full((classes,), 0.1)}


@pytest.mark.parametrize("targets", ["predictions", "labels"])
def test_rps_representer_decomposition_on_a_linear_model(targets):
    train = make_data(jax.random.PRNGKey(0), 40)
    test = make_data(jax.random.PRNGKey(1), 6)
    l2, tol = 1e-2, 1e-9
    params = lr_params(jax.random.PRNGKey(2))
    attr = jattri.rps(features_fn=lambda p, z: z[0], logits_fn=lr_logits,
                      label_fn=lambda z: z[1], targets=targets, bias=True, l2=l2, tol=tol)
    state = attr.cache(params, train)
    w = np.asarray(state.weights[0])  # (p + 1, C) with the bias row last
    assert float(state.grad_norm[0]) <= tol

    # The refit is stationary for an independently written objective.
    f_train = np.concatenate([np.asarray(train[0]), np.ones((40, 1))], axis=1)
    if targets == "predictions":
        probs = np.asarray(jax.nn.softmax(lr_logits(params, train)))
    else:
        probs = np.eye(3)[np.asarray(train[1])]

    def objective(w):
        logp = jax.nn.log_softmax(f_train @ w)
        return -jnp.sum(probs * logp) / 40 + l2 * jnp.sum(w ** 2)

    grad = np.asarray(jax.grad(objective)(jnp.asarray(w)))
    assert np.linalg.norm(grad) <= 10 * tol

    # α from the stationarity condition; the refit's logits = Σ_i α_i ⟨f_i, f_t⟩.
    alpha = (probs - np.asarray(jax.nn.softmax(f_train @ w))) / (2 * l2 * 40)
    np.testing.assert_allclose(state.alpha[:, 0], alpha, rtol=1e-8, atol=1e-12)
    f_test = np.concatenate([np.asarray(test[0]), np.ones((6, 1))], axis=1)
    refit_logits = f_test @ w
    decomposed = (f_test @ f_train.T) @ alpha  # (m, C)
    # The residual is exactly f_t ∇objective / (2λ): bounded by the refit's tolerance.
    bound = np.linalg.norm(f_test, axis=1)[:, None] * np.linalg.norm(grad) / (2 * l2)
    assert np.all(np.abs(refit_logits - decomposed) <= bound + 1e-12)
    assert np.abs(refit_logits - decomposed).max() < 1e-6

    # Scores: α_i[y_t] ⟨f_i, f_t⟩; summed over i they give the refit logit of y_t.
    scores = np.asarray(attr.attribute(state, test))
    y_t = np.asarray(test[1])
    np.testing.assert_allclose(scores, alpha[:, y_t] * (f_train @ f_test.T), rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(scores.sum(0), refit_logits[np.arange(6), y_t], atol=1e-6)
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(attr.attribute(state, train)), rtol=1e-10)


def test_rps_features_of_a_deep_model_and_member_average(setup):
    checkpoints, train, test = setup
    members = jattri.checkpoints(checkpoints[:2])
    kw = dict(features_fn=features, logits_fn=logits, l2=1e-2, tol=1e-9)
    both = jattri.rps(**kw)
    state = both.cache(members, train)
    scores = both.attribute(state, test)
    singles = []
    for p in checkpoints[:2]:
        a = jattri.rps(loss_fn, **kw)  # a loss may be passed first; RPS does not use it
        singles.append(a.attribute(a.cache(p, train), test))
    np.testing.assert_allclose(scores, np.mean(singles, axis=0), rtol=1e-10, atol=1e-14)
    # Default label: example[1]; self_attribute is the diagonal of attribute.
    np.testing.assert_allclose(both.self_attribute(state),
                               np.diag(both.attribute(state, train)), rtol=1e-10)
    np.testing.assert_array_equal(state.labels[:, 0], np.asarray(train[1]))
    # Without the bias feature (the default) the features have the model's width only.
    assert state.features.shape == (12, 2, 5)
    assert jattri.rps(bias=True, **kw).cache(members, train).features.shape == (12, 2, 6)
    # "predicted": each member's predicted class is explained (and fitted).
    pred = jattri.rps(label_fn="predicted", **kw)
    ps = pred.cache(members, train)
    want = np.stack([np.argmax(np.asarray(jax.vmap(lambda z: logits(p, z))(train)), -1)
                     for p in checkpoints[:2]], axis=1)
    np.testing.assert_array_equal(ps.labels, want)
    np.testing.assert_allclose(pred.self_attribute(ps), np.diag(pred.attribute(ps, train)),
                               rtol=1e-10)


def test_progress_reports_the_rps_refit(setup):
    """Under ``jattri.progress`` RPS's refit is a stage of its own, ``"rps refit"``,
    counting L-BFGS steps (no total), every 10 steps and at each refit's end: with
    ``tol=0`` each refit runs all ``maxiter`` steps, so two members at ``maxiter=25``
    report 10, 20, 25, 35, 45, 50, and the fidelity rule's 27 refits per member at
    ``maxiter=7`` report every 7 steps, up to 2 × 27 × 7. The state equals a quiet
    cache's to rounding (the callback's operand may change how XLA fuses the step)."""
    checkpoints, train, _ = setup
    members = jattri.checkpoints(checkpoints[:2])
    cases = ((dict(l2=1e-2, maxiter=25), [10, 20, 25, 35, 45, 50]),
             (dict(l2=None, maxiter=7), list(range(7, 2 * 27 * 7 + 1, 7))))
    for kw, want in cases:
        attr = jattri.rps(features_fn=features, logits_fn=logits, tol=0.0, **kw)
        quiet, loud, refit = cache_quiet_and_reported(attr, members, train, "rps refit")
        assert refit == ([(d, None, "L-BFGS steps", False) for d in want]
                         + [(want[-1], None, "L-BFGS steps", True)]), refit
        for a, b in zip(jax.tree_util.tree_leaves(quiet), jax.tree_util.tree_leaves(loud)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                                       err_msg=str(kw))


def test_rps_bad_arguments(setup):
    checkpoints, train, _ = setup
    members = jattri.checkpoints(checkpoints)
    with pytest.raises(ValueError, match="l2"):
        jattri.rps(features_fn=features, logits_fn=logits, l2=0.0)
    with pytest.raises(TypeError, match="features_fn"):
        jattri.rps(features_fn=None, logits_fn=logits)
    bad = jattri.rps(features_fn=features, logits_fn=lambda p, z: logits(p, z)[None])
    with pytest.raises(TypeError, match="logits_fn"):
        bad.cache(members, train)
    bad_label = jattri.rps(features_fn=features, logits_fn=logits, label_fn=lambda z: z[0])
    with pytest.raises(TypeError, match="label_fn"):
        bad_label.cache(members, train)


def test_rps_streamed_cache_top_k_and_jit(setup):
    checkpoints, train, test = setup
    members = jattri.checkpoints(checkpoints[:2])
    attr = jattri.rps(features_fn=features, logits_fn=logits, l2=1e-2, tol=1e-9,
                      chunk_size=5)
    state = attr.cache(members, train)
    streamed = attr.cache(members, jattri.stream(
        [jax.tree_util.tree_map(lambda x, a=a: x[a:a + 4], train) for a in (0, 4, 8)]))
    assert streamed.train is None
    for got, want in zip(streamed[2:-1], state[2:-1]):  # the arrays (not `made`)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    dense = np.asarray(attr.attribute(state, test))
    np.testing.assert_allclose(attr.attribute(streamed, test), dense, rtol=1e-12, atol=1e-14)
    # the classes are stored: self_attribute needs no training set, even after a stream
    np.testing.assert_allclose(attr.self_attribute(streamed), attr.self_attribute(state),
                               rtol=1e-12)
    top = attr.attribute(state, test, top_k=4, lowest=True)
    assert_top_k_matches_dense(top, dense, 4)
    np.testing.assert_allclose(jax.jit(attr.attribute)(state, test), dense, rtol=1e-12)


def test_rps_self_attribution_ranks_flipped_labels_first(x64):
    """With label targets, α_i[y_i] = (1 − q_i[y_i]) / (2λn): a flipped label the
    refit cannot fit gets a large positive self-score (mislabel detection)."""
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (120, 4), jnp.float64)
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)  # ‖f_i‖ = 1: the score is α_i[y_i]
    w_true = jax.random.normal(jax.random.PRNGKey(4), (4, 3), jnp.float64)
    y = np.asarray(jnp.argmax(4.0 * x @ w_true, -1))
    flipped = np.zeros(120, bool)
    flipped[::10] = True
    y_noisy = np.where(flipped, (y + 1) % 3, y)
    params = {"w": w_true, "b": jnp.zeros(3, jnp.float64)}  # the clean model
    attr = jattri.rps(features_fn=lambda p, z: z[0], logits_fn=lr_logits, l2=1e-1)
    self_scores = np.asarray(attr.self_attribute(attr.cache(params, (x, y_noisy))))
    assert jattri.metrics.mislabel_auc(self_scores, flipped) > 0.95
    assert np.all(self_scores > 0)
    # the prediction-target variant has no such sign: it does not detect them here
    pred = jattri.rps(features_fn=lambda p, z: z[0], logits_fn=lr_logits, l2=1e-1,
                      targets="predictions")
    other = np.asarray(pred.self_attribute(pred.cache(params, (x, y_noisy))))
    assert jattri.metrics.mislabel_auc(other, flipped) < 0.5


def test_refit_history_length_rule():
    """The refit's L-BFGS history: 80 pairs for small layers, cut to 64 MiB of float32
    pairs for large ones, never below optax's 10."""
    from jattri.methods.rps import LBFGS_MEMORY_BYTES, lbfgs_memory
    assert lbfgs_memory(7_840) == 80  # the MNIST LR's 784 × 10 refit
    assert lbfgs_memory(200_000) == LBFGS_MEMORY_BYTES // (8 * 200_000) == 41
    assert lbfgs_memory(4_096_000) == 10  # 4,096 features × 1,000 classes
