"""The influence family (jattri.func.hessian / fisher, jattri.methods.influence) against
slow, obviously-correct float64 references: dense solves, explicit per-example
inverses, Kronecker products built by hand."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jattri
from jattri import engine
from jattri.func import fisher
from jattri.methods import influence
from jattri.func.hessian import (ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_lissa)
from jattri.methods.influence import (influence_arnoldi, influence_cg, influence_datainf,
                                      influence_ekfac, influence_explicit, influence_lissa)
from jattri.models import MLP, LogisticRegression


# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")


from _toy import classification_data as _classification_data  # noqa: E402
from _toy import f64 as _f64  # noqa: E402
from _toy import eigenbasis_scores, kronecker_eigenbasis  # noqa: E402
from _toy import assert_top_k_matches_dense, manual_mlp  # noqa: E402
from _toy import cache_quiet_and_reported  # noqa: E402


def _flax_loss(model, l2=0.0):
    def loss_fn(p, z):
        logits = model.apply({"params": p}, z[0][None])[0]
        reg = 0.5 * l2 * sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1]) + reg
    return loss_fn


def _problems():
    """(name, loss_fn(params, example), params, data, damping) with H + λI PD."""
    out = []
    # quadratic: least squares, H = XᵀX / n
    x = jax.random.normal(jax.random.PRNGKey(0), (40, 6), jnp.float64)
    y = x @ jnp.arange(6.0) + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (40,))
    ls = lambda p, z: 0.5 * (z[0] @ p["w"] - z[1]) ** 2
    out.append(("quadratic", ls, {"w": jnp.zeros(6)}, (x, y), 0.0))
    # L2-regularised softmax regression (PD Hessian anywhere)
    model = LogisticRegression(num_classes=3)
    data = _classification_data(40, 4, 3)
    params = _f64(model.init(jax.random.PRNGKey(2), data[0][:1])["params"])
    out.append(("l2_logreg", _flax_loss(model, l2=1e-2), params, data, 0.0))
    # tiny MLP; damping lifts the smallest Hessian eigenvalue to 0.05
    model = MLP(hidden=(5,), num_classes=3)
    data = _classification_data(40, 4, 3, seed=1)
    loss = _flax_loss(model)
    params = _f64(model.init(jax.random.PRNGKey(3), data[0][:1])["params"])
    out.append(("tiny_mlp", loss, params, data, 0.5))  # μ_min(H) ≈ -0.35 here
    return out


PROBLEMS = None


def problems():
    global PROBLEMS
    if PROBLEMS is None:
        PROBLEMS = _problems()
    return PROBLEMS


def _mean_loss(loss, data):
    return lambda p: jnp.mean(jax.vmap(loss, (None, 0))(p, data))


def _rel(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ------------------------------------------------------------------ IHVP primitives

@pytest.mark.parametrize("k", [0, 1, 2])
def test_ihvps_match_explicit(k):
    name, loss, params, data, damping = problems()[k]
    f = _mean_loss(loss, data)
    theta, unravel = ravel_pytree(params)
    hess = np.asarray(jax.jit(jax.hessian(lambda t: f(unravel(t))))(theta))
    v = jax.jit(jax.vmap(lambda z: jax.grad(loss)(params, z)))(
        jax.tree_util.tree_map(lambda a: a[:5], data))
    flat_v = np.asarray(jax.jit(jax.vmap(lambda g: ravel_pytree(g)[0]))(v))
    reference = jax.vmap(unravel)(np.linalg.solve(hess + damping * np.eye(len(theta)), flat_v.T).T)
    exact = ihvp_explicit(f, params, v, damping=damping)
    assert _rel(exact, reference) < 1e-8
    assert _rel(ihvp_cg(f, params, v, damping=damping, maxiter=500, tol=1e-12), exact) < 1e-6
    assert _rel(ihvp_arnoldi(f, params, v, rank=len(theta), damping=damping, tol=1e-12),
                exact) < 1e-6
    f_batch = lambda p, batch: _mean_loss(loss, batch)(p)
    scale = 1.2 * (np.linalg.eigvalsh(hess)[-1] + damping)
    lissa = ihvp_lissa(f_batch, params, v, data=data, key=jax.random.PRNGKey(0),
                       damping=damping, scale=scale, depth=4000)
    assert _rel(lissa, exact) < 1e-2, name
    if name == "l2_logreg":  # minibatch recursion (default scale): repeats stay close
        lissa = ihvp_lissa(f_batch, params, v, data=data, key=jax.random.PRNGKey(1),
                           damping=damping, depth=2000, batch_size=20, repeats=8)
        assert _rel(lissa, exact) < 0.1, name


def test_lissa_divergence_is_an_error():
    _, loss, params, data, _ = problems()[1]
    f_batch = lambda p, batch: _mean_loss(loss, batch)(p)
    v = jax.grad(loss)(params, jax.tree_util.tree_map(lambda a: a[0], data))
    with pytest.raises(ValueError, match="diverged"):
        ihvp_lissa(f_batch, params, v, data=data, key=jax.random.PRNGKey(0), scale=1e-3,
                   depth=200)


def test_singular_hessian_never_silent_nan():
    a = jnp.diag(jnp.array([3.0, 1.0, 0.0, 0.0]))
    f = lambda p: 0.5 * p @ a @ p
    p0 = jnp.zeros(4)
    in_range = jnp.array([1.0, 2.0, 0.0, 0.0])
    out_of_range = jnp.array([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="singular"):
        ihvp_explicit(f, p0, in_range)
    with pytest.raises(ValueError, match="non-finite"):
        ihvp_cg(f, p0, out_of_range)
    # Arnoldi: documented pseudo-inverse, zero eigenvalues dropped
    got = ihvp_arnoldi(f, p0, out_of_range, rank=4)
    np.testing.assert_allclose(got, np.linalg.pinv(np.asarray(a)) @ out_of_range, atol=1e-10)
    # EK-FAC with a dead unit and damping 0: the zero-curvature directions get 0
    fac = fisher.EKFACFactors({"l": fisher.EKFACLayer(jnp.eye(2), jnp.eye(2),
                                                       jnp.array([[1.0, 0.0], [2.0, 0.0]]))},
                              {"l": {"kernel": jnp.zeros((2, 2))}})
    out = fisher.ekfac_ihvp(fac, {"l": {"kernel": jnp.ones((2, 2))}}, 0.0)
    np.testing.assert_allclose(out["l"]["kernel"], [[1.0, 0.0], [0.5, 0.0]])


def test_arnoldi_rank_clipped_with_warning():
    _, loss, params, data, _ = problems()[0]
    f = _mean_loss(loss, data)
    with pytest.warns(UserWarning, match="clipped to 6"):
        out = ihvp_arnoldi(f, params, params, rank=50)
    assert np.all(np.isfinite(out["w"]))
    attr = influence_arnoldi(loss, rank=50)  # d is known at cache time
    with pytest.warns(UserWarning, match="clipped to 6"):
        attr.cache(params, data)


def test_arnoldi_float32_truncated_no_nan():
    _, loss, params, data, damping = problems()[2]
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    d32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, data)
    attr = influence_arnoldi(loss, rank=10, damping=0.0)
    scores = attr.attribute(attr.cache(p32, d32), d32)
    assert scores.dtype == jnp.float32 and np.all(np.isfinite(scores))


# ---------------------------------------------------------------- Fisher primitives

def test_fisher_products():
    _, loss, params, data, _ = problems()[1]
    theta, unravel = ravel_pytree(params)
    grads = jax.jit(jax.vmap(lambda z: ravel_pytree(jax.grad(loss)(params, z))[0]))(data)
    dense = grads.T @ grads / grads.shape[0]
    v = jax.random.normal(jax.random.PRNGKey(5), theta.shape, jnp.float64)
    np.testing.assert_allclose(ravel_pytree(fisher.efvp(loss, params, data, unravel(v),
                                                        chunk_size=7))[0], dense @ v, rtol=1e-10)
    got = ravel_pytree(fisher.ifvp_explicit(loss, params, data, unravel(v), damping=0.1))[0]
    np.testing.assert_allclose(got, np.linalg.solve(dense + 0.1 * np.eye(len(v)), v), rtol=1e-8)
    # GGN of a linear model under a convex loss is its Hessian
    x, y = data
    model = LogisticRegression(num_classes=3)
    out_fn = lambda p: model.apply({"params": p}, x)
    out_loss = lambda o: optax.softmax_cross_entropy_with_integer_labels(o, y).mean()
    hess = jax.jit(jax.hessian(lambda t: out_loss(out_fn(unravel(t)))))(theta)
    np.testing.assert_allclose(ravel_pytree(fisher.ggn_vp(out_fn, out_loss, params,
                                                          unravel(v)))[0], hess @ v, rtol=1e-9)


# ------------------------------------------------------------------------- EK-FAC

def _ekfac_reference_scores(params, data, test, damping):
    """Dense EK-FAC built by hand: per layer Q = Q_A ⊗ Q_S (eigenvectors = columns of
    eigh), Λ* = mean_i (Qᵀ vec[kernel; bias]_i)², block-diagonal over layers."""
    names = sorted(params)
    widths = [params[n]["bias"].shape[0] for n in names]

    def per_example(z):
        x, y = z
        deltas = [jnp.zeros(w) for w in widths]
        loss = lambda ds: optax.softmax_cross_entropy_with_integer_labels(
            manual_mlp(params, x, ds)[0], y)
        s = jax.grad(loss)(deltas)
        a = [jnp.append(u, 1.0) for u in manual_mlp(params, x, deltas)[1]]
        return a, s

    a, s = jax.jit(jax.vmap(per_example))(data)
    at, st = jax.jit(jax.vmap(per_example))(test)
    total = 0.0
    for k in range(len(names)):
        n = a[k].shape[0]
        q, _ = kronecker_eigenbasis(a[k].T @ a[k] / n, s[k].T @ s[k] / n)
        g = np.einsum("ni,no->nio", a[k], s[k]).reshape(n, -1)
        gt = np.einsum("ni,no->nio", at[k], st[k]).reshape(len(at[k]), -1)
        total = total + eigenbasis_scores(q, np.mean((g @ q) ** 2, axis=0), g, gt, damping)
    return total


@pytest.mark.parametrize("hidden", [(), (6,)])
def test_ekfac_matches_dense_reference(hidden):
    model = MLP(hidden=hidden, num_classes=3)
    x, y = _classification_data(30, 4, 3, seed=4)
    params = _f64(model.init(jax.random.PRNGKey(5), x[:1])["params"])
    attr = influence_ekfac(_flax_loss(model), damping=1e-2, curvature="empirical")
    state = attr.cache(params, (x[:24], y[:24]))
    got = attr.attribute(state, (x[24:], y[24:]))
    want = _ekfac_reference_scores(params, (x[:24], y[:24]), (x[24:], y[24:]), 1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(attr.attribute(state, (x[:24], y[:24]))), rtol=1e-9)


def test_ekfac_exact_when_fisher_is_kronecker():
    """One example: F = vec(a'sᵀ)vec(a'sᵀ)ᵀ = A ⊗ S exactly, so EK-FAC = the dense
    empirical-Fisher IF (the Fisher's own IHVP, ``ifvp_explicit``)."""
    model = LogisticRegression(num_classes=3)
    x, y = _classification_data(4, 3, 3, seed=6)
    params = _f64(model.init(jax.random.PRNGKey(7), x[:1])["params"])
    loss = _flax_loss(model)
    one = (x[:1], y[:1])
    grads = jax.jit(jax.vmap(lambda z: jax.grad(loss)(params, z)))((x, y))
    factors = fisher.ekfac_factors(loss, params, one, curvature="empirical")
    got = jax.vmap(lambda g: fisher.ekfac_ihvp(factors, g, 0.1))(grads)
    want = fisher.ifvp_explicit(loss, params, one, grads, damping=0.1)
    assert _rel(got, want) < 1e-10


def test_ekfac_factors_streamed_in_stages():
    """``jattri.func.ekfac_factors`` over a Stream (its two passes chunk by chunk) equals
    the one-chunk in-memory fit."""
    model = MLP(hidden=(4,), num_classes=3)
    x, y = _classification_data(13, 3, 3, seed=3)
    params = _f64(model.init(jax.random.PRNGKey(1), x[:1])["params"])
    loss = _flax_loss(model)
    stream = jattri.stream([(x[:5], y[:5]), (x[5:6], y[5:6]), (x[6:], y[6:])])
    for curvature in fisher.CURVATURES:
        want = fisher.ekfac_factors(loss, params, (x, y), curvature=curvature)
        got = fisher.ekfac_factors(loss, params, stream, curvature=curvature, chunk_size=4)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.abs(a), np.abs(b), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------ DataInf

def test_datainf_matches_closed_form():
    model = MLP(hidden=(3,), num_classes=2)
    x, y = _classification_data(12, 3, 2, seed=8)
    params = _f64(model.init(jax.random.PRNGKey(9), x[:1])["params"])
    loss = _flax_loss(model)
    attr = influence_datainf(loss, damping=0.1)
    state = attr.cache(params, (x[:9], y[:9]))
    got = np.asarray(attr.attribute(state, (x[9:], y[9:])))
    # slow reference: per layer, average of explicitly inverted rank-one matrices
    g = jax.jit(jax.vmap(lambda z: jax.grad(loss)(params, z)))
    gtr, gte = g((x[:9], y[:9])), g((x[9:], y[9:]))
    want = 0.0
    for name in ["fc1", "fc2"]:
        flat = lambda t: np.concatenate([np.asarray(t[name]["bias"]).reshape(len(t[name]["bias"]), -1),
                                         np.asarray(t[name]["kernel"]).reshape(len(t[name]["kernel"]), -1)], 1)
        a, b = flat(gtr), flat(gte)
        lam = 0.1 * np.mean(np.sum(a ** 2, 1)) / a.shape[1]
        inv = np.mean([np.linalg.inv(np.outer(gi, gi) + lam * np.eye(a.shape[1])) for gi in a], 0)
        want = want + a @ inv @ b.T
    np.testing.assert_allclose(got, want, rtol=1e-8)
    with pytest.raises(ValueError, match="damping"):
        influence_datainf(loss, damping=0.0)


# ----------------------------------------------------- methods, RelatIF, self-scores

def test_methods_agree_and_self_scores_are_diagonals():
    _, loss, params, data, damping = problems()[2]
    train = jax.tree_util.tree_map(lambda a: a[:30], data)
    test = jax.tree_util.tree_map(lambda a: a[30:], data)
    d = ravel_pytree(params)[0].shape[0]
    attrs = {
        "explicit": influence_explicit(loss, damping=damping),
        "cg": influence_cg(loss, damping=damping, tol=1e-12, maxiter=500),
        "arnoldi": influence_arnoldi(loss, damping=damping, rank=d, tol=1e-12),
        "lissa": influence_lissa(loss, damping=damping, depth=3000),
    }
    scores = {}
    for name, attr in attrs.items():
        state = attr.cache(params, train)
        scores[name] = np.asarray(attr.attribute(state, test))
        np.testing.assert_allclose(attr.self_attribute(state),
                                   np.diag(attr.attribute(state, train)), rtol=1e-8, atol=1e-12)
    ref = scores["explicit"]
    for name, tol in [("cg", 1e-6), ("arnoldi", 1e-6), ("lissa", 1e-2)]:
        assert np.abs(scores[name] - ref).max() / np.abs(ref).max() < tol, name


def test_relatif_normalisers():
    _, loss, params, data, _ = problems()[1]
    train = jax.tree_util.tree_map(lambda a: a[:30], data)
    test = jax.tree_util.tree_map(lambda a: a[30:], data)
    f = _mean_loss(loss, train)
    theta, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda t: f(unravel(t))))(theta)
    hinv = np.linalg.inv(np.asarray(hess) + 1e-2 * np.eye(len(theta)))
    grads = jax.jit(jax.vmap(lambda z: ravel_pytree(jax.grad(loss)(params, z))[0]))
    gtr, gte = np.asarray(grads(train)), np.asarray(grads(test))
    plain = gtr @ hinv @ gte.T
    norm_l = np.sqrt(np.sum((gtr @ hinv) * gtr, 1))
    norm_theta = np.linalg.norm(gtr @ hinv, axis=1)
    for method in (influence_explicit, influence_cg):
        for mode, norm in (("l", norm_l), ("theta", norm_theta)):
            kw = {"tol": 1e-12, "maxiter": 500} if method is influence_cg else {}
            attr = method(loss, damping=1e-2, relatif=mode, **kw)
            state = attr.cache(params, train)
            np.testing.assert_allclose(attr.attribute(state, test), plain / norm[:, None], rtol=1e-6)
            np.testing.assert_allclose(attr.self_attribute(state), np.diag(gtr @ hinv @ gtr.T) / norm,
                                       rtol=1e-6)
    with pytest.raises(ValueError, match="relatif"):
        influence_explicit(loss, relatif="x")


def test_relatif_l_is_score_over_root_self_influence():
    """relatif="l" divides score(i, ·) by √(g_iᵀ(H + λI)⁻¹g_i), the square root of the
    plain method's self-influence (target = loss); explicit and CG against dense
    references in ``test_relatif_normalisers``."""
    _, loss, params, data, damping = problems()[2]
    train = jax.tree_util.tree_map(lambda a: a[:20], data)
    test = jax.tree_util.tree_map(lambda a: a[20:25], data)
    makes = {
        "lissa": lambda **kw: influence_lissa(loss, damping=damping, depth=50, **kw),
        "arnoldi": lambda **kw: influence_arnoldi(loss, damping=damping, rank=8, **kw),
        "ekfac": lambda **kw: influence_ekfac(loss, damping=damping, **kw),
        "datainf": lambda **kw: influence_datainf(loss, **kw),
    }
    for name, make in makes.items():
        plain, rel = make(), make(relatif="l")
        state, rstate = plain.cache(params, train), rel.cache(params, train)
        norm = np.sqrt(np.asarray(plain.self_attribute(state)))
        np.testing.assert_allclose(rstate.norms[:, 0], norm, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(rel.attribute(rstate, test),
                                   plain.attribute(state, test) / norm[:, None],
                                   rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(rel.self_attribute(rstate), norm, rtol=1e-9, err_msg=name)


# ------------------------------------------- the contract: damping, streams, top-k, jit

def _ekfac_problem():
    model = MLP(hidden=(6,), num_classes=3)
    x, y = _classification_data(30, 4, 3, seed=4)
    params = _f64(model.init(jax.random.PRNGKey(5), x[:1])["params"])
    return _flax_loss(model), params, (x[:24], y[:24]), (x[24:], y[24:])


def test_ekfac_damping_at_attribute_time_needs_no_refit(monkeypatch):
    """attribute(state, test, damping=λ) equals a fresh cache at λ (and the dense
    reference), and the factors are fitted once: counted calls of the fit."""
    from jattri.methods import influence
    loss, params, train, test = _ekfac_problem()
    fits = []
    fit = influence._fit_ekfac
    monkeypatch.setattr(influence, "_fit_ekfac", lambda *a: fits.append(1) or fit(*a))
    for relatif in (None, "l"):
        fits.clear()
        attr = influence_ekfac(loss, damping=1e-2, relatif=relatif)
        state = attr.cache(params, train)
        assert len(fits) == 1
        got = attr.attribute(state, test, damping=0.3)
        self_got = attr.self_attribute(state, damping=0.3)
        top = attr.attribute(state, test, damping=0.3, top_k=3)
        assert len(fits) == 1  # a new damping never refits
        fresh = influence_ekfac(loss, damping=0.3, relatif=relatif)
        fresh_state = fresh.cache(params, train)
        assert len(fits) == 2
        want = fresh.attribute(fresh_state, test)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_allclose(self_got, fresh.self_attribute(fresh_state), rtol=1e-12)
        np.testing.assert_allclose(top.scores, fresh.attribute(fresh_state, test, top_k=3).scores,
                                   rtol=1e-12)
        if relatif is None:
            np.testing.assert_allclose(got, _ekfac_reference_scores(params, train, test, 0.3),
                                       rtol=1e-7)
        assert not np.allclose(got, attr.attribute(state, test), rtol=1e-3)


def _batches(data, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(jax.tree_util.tree_map(lambda a: a[start:start + size], data))
        start += size
    assert start == len(data[1])
    return out


@pytest.mark.parametrize("method", ["ekfac", "ekfac_ggn", "kfac", "datainf", "explicit"])
def test_streamed_cache_equals_in_memory(method):
    """A jattri.stream of 5 uneven batches, re-cut into the same chunks: the same
    factors / statistics, scores, self-scores, RelatIF normalisers and top-k."""
    loss, params, train, test = _ekfac_problem()
    make = {
        "ekfac": lambda: influence_ekfac(loss, damping=1e-2, chunk_size=7, relatif="theta"),
        "ekfac_ggn": lambda: influence_ekfac(loss, damping=1e-2, curvature="ggn",
                                             chunk_size=7, relatif="l"),
        "kfac": lambda: influence_ekfac(loss, damping=1e-2, correct_eigenvalues=False,
                                        chunk_size=7),
        "datainf": lambda: influence_datainf(loss, chunk_size=7, relatif="l"),
        "explicit": lambda: influence_explicit(loss, damping=0.5, chunk_size=7),
    }[method]
    attr = make()
    stream = jattri.stream(_batches(train, [3, 8, 1, 6, 6]))
    mem, streamed = attr.cache(params, train), attr.cache(params, stream)
    assert streamed.train is None
    for a, b in zip(jax.tree_util.tree_leaves(streamed.curvature),
                    jax.tree_util.tree_leaves(mem.curvature)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    if mem.norms is not None:
        np.testing.assert_allclose(streamed.norms, mem.norms, rtol=1e-10)
    want = np.asarray(attr.attribute(mem, test))
    np.testing.assert_allclose(attr.attribute(streamed, test, train=stream), want, rtol=1e-9,
                               atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(attr.self_attribute(streamed, train=stream),
                               attr.self_attribute(mem), rtol=1e-9)
    top = attr.attribute(streamed, test, train=stream, top_k=4)
    np.testing.assert_array_equal(top.indices, attr.attribute(mem, test, top_k=4).indices)
    with pytest.raises(ValueError, match="train"):
        attr.attribute(streamed, test)  # the stream must be given again


def test_streamed_cache_float32_rtol_1e6():
    """float32: streamed EK-FAC and DataInf equal the in-memory ones to 1e-6."""
    loss, params, train, test = _ekfac_problem()
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    f32 = lambda d: (d[0].astype(jnp.float32), d[1])
    train, test = f32(train), f32(test)
    stream = jattri.stream(_batches(train, [5, 5, 5, 5, 4]))
    for attr in (influence_ekfac(loss, damping=1e-2, chunk_size=5),
                 influence_datainf(loss, chunk_size=5)):
        want = np.asarray(attr.attribute(attr.cache(p32, train), test))
        got = attr.attribute(attr.cache(p32, stream), test, train=stream)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_hvp_methods_refuse_a_stream():
    _, loss, params, data, _ = problems()[1]
    stream = jattri.stream(_batches(data, [20, 20]))
    for attr in (influence_cg(loss), influence_lissa(loss, depth=2),
                 influence_arnoldi(loss, rank=2)):
        with pytest.raises(ValueError, match="in memory"):
            attr.cache(params, stream)


@pytest.mark.parametrize("name", ["explicit", "ekfac", "arnoldi"])
def test_top_k_equals_argsort_of_dense(name):
    _, loss, params, data, damping = problems()[2]
    train = jax.tree_util.tree_map(lambda a: a[:30], data)
    test = jax.tree_util.tree_map(lambda a: a[30:], data)
    attr = {"explicit": lambda: influence_explicit(loss, damping=damping, chunk_size=8),
            "ekfac": lambda: influence_ekfac(loss, damping=damping, chunk_size=8),
            "arnoldi": lambda: influence_arnoldi(loss, damping=damping, rank=10,
                                                 chunk_size=8)}[name]()
    state = attr.cache(params, train)
    dense = np.asarray(attr.attribute(state, test))
    top = attr.attribute(state, test, top_k=5, lowest=True)
    assert_top_k_matches_dense(top, dense, 5)


JIT_METHODS = {
    "explicit": lambda loss: influence_explicit(loss, damping=2.0),
    "cg": lambda loss: influence_cg(loss, damping=2.0, maxiter=5),
    "lissa": lambda loss: influence_lissa(loss, damping=2.0, depth=5, scale=10.0),
    "arnoldi": lambda loss: influence_arnoldi(loss, damping=2.0, rank=4),
    "ekfac": lambda loss: influence_ekfac(loss, damping=0.5, relatif="l"),
    "datainf": lambda loss: influence_datainf(loss),
}


@pytest.mark.parametrize("name", sorted(JIT_METHODS))
def test_jit_attribute_compiles_once_across_checkpoints(name):
    """One compiled ``attribute`` serves two checkpoints; members are traced, so a
    checkpoint pair (M = 2) is scored as the mean of the single ones."""
    model = MLP(hidden=(4,), num_classes=3)
    x, y = _classification_data(20, 3, 3, seed=2)
    loss = _flax_loss(model)
    params = [_f64(model.init(jax.random.PRNGKey(s), x[:1])["params"]) for s in (0, 1)]
    train, test = (x[:16], y[:16]), (x[16:], y[16:])
    attr = JIT_METHODS[name](loss)
    states = [attr.cache(p, train) for p in params]
    fn = jax.jit(attr.attribute)
    out = [np.asarray(fn(s, test)) for s in states]
    assert fn._cache_size() == 1
    np.testing.assert_allclose(out[1], attr.attribute(states[1], test), rtol=1e-9)
    assert not np.allclose(out[0], out[1])
    if name in ("explicit", "cg"):  # M > 1: tests/test_methods_core.py
        return
    pair = attr.cache(jattri.checkpoints(params), train)
    np.testing.assert_allclose(attr.attribute(pair, test), (out[0] + out[1]) / 2, rtol=1e-9)


def test_stages_hold_no_parameter_sized_constant():
    """``jax.make_jaxpr`` of ``cache`` and ``attribute`` on a 100k-parameter MLP holds no
    constant with more than 10,000 elements (params are arguments, never closed over);
    traced abstractly, nothing is computed."""
    model = MLP(hidden=(256, 256), num_classes=10)
    x = jnp.zeros((8, 128), jnp.float32)
    y = jnp.zeros(8, jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    assert sum(a.size for a in jax.tree_util.tree_leaves(params)) > 100_000
    loss = _flax_loss(model)
    train, test = (x, y), (x[:2], y[:2])
    members = jattri.checkpoints([params])
    for make in (lambda: influence_explicit(loss), lambda: influence_cg(loss, maxiter=2),
                 lambda: influence_lissa(loss, depth=2), lambda: influence_arnoldi(loss, rank=2),
                 lambda: influence_ekfac(loss, relatif="theta"), lambda: influence_datainf(loss)):
        attr = make()
        state = jax.eval_shape(attr.cache, members, train)
        for jaxpr in (jax.make_jaxpr(attr.cache)(members, train),
                      jax.make_jaxpr(attr.attribute)(state, test)):
            sizes = [np.size(c) for c in jaxpr.consts]
            assert max(sizes, default=0) <= 10_000, sizes


# ------------------------------------------------------------------------ metrics

def test_mislabel_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, 40).astype(float)  # many ties
    noisy = rng.random(40) < 0.3
    pos, neg = s[noisy], s[~noisy]
    want = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert jattri.metrics.mislabel_auc(s, noisy) == pytest.approx(want, abs=1e-12)
    assert jattri.metrics.mislabel_auc(noisy * 1.0, noisy) == 1.0
    with pytest.raises(ValueError, match="both"):
        jattri.metrics.mislabel_auc(s, np.zeros(40, bool))


def test_brittleness_against_loop_reference():
    """Nearest-class-mean classifier on weighted data: retraining is a weighted mean."""
    x, y = _classification_data(30, 2, 2, seed=11)
    xt, yt = _classification_data(4, 2, 2, seed=12)
    onehot = jax.nn.one_hot(y, 2)

    def train_fn(w):
        mass = (w[:, None] * onehot).sum(0)
        return (onehot * w[:, None]).T @ x / jnp.maximum(mass, 1e-12)[:, None]

    predict_fn = lambda means: jnp.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), 1)
    scores = np.asarray(jax.random.normal(jax.random.PRNGKey(13), (30, 4)))
    grid = [1, 3, 6, 12, 20]
    got = jattri.metrics.brittleness(scores, grid, train_fn, predict_fn, batch_size=7)
    base = np.asarray(predict_fn(train_fn(jnp.ones(30))))
    for t in range(4):
        want = np.inf
        for k in grid:
            w = np.ones(30)
            w[np.argsort(-scores[:, t], kind="stable")[:k]] = 0
            if np.asarray(predict_fn(train_fn(jnp.asarray(w))))[t] != base[t]:
                want = k
                break
        assert got[t] == want
    with pytest.raises(ValueError, match="k_grid"):
        jattri.metrics.brittleness(scores, [3, 1], train_fn, predict_fn)


def test_arnoldi_linearized_products_equal_recomputed_ones(monkeypatch):
    """Arnoldi multiplies by one H a hundred times: the default keeps the forward and
    backward passes' residuals (``jax.linearize`` of the mean gradient) within the chunk
    budget. Under a budget of 1 byte it recomputes each product chunk by chunk; both give
    the exact top eigenpairs of the dense Hessian, hence the same scores."""
    _, loss, params, data, damping = _problems()[2]
    theta, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda t: jnp.mean(jax.vmap(
        lambda z: loss(unravel(t), z))(data))))(theta)
    taken = []
    real = influence._linearized_cvp
    monkeypatch.setattr(influence, "_linearized_cvp",
                        lambda *a: taken.append(real(*a) is not None) or real(*a))

    def run():
        jax.clear_caches()  # the choice is made while tracing: trace again
        attr = influence_arnoldi(loss, rank=len(theta), damping=damping, chunk_size=7)
        state = attr.cache(params, data)
        return attr.attribute(state, data), state.curvature[0][0]

    scores, eigvals = run()
    assert taken == [True]
    monkeypatch.setattr(engine, "DEFAULT_CHUNK_BYTES", 1)
    again, eigvals2 = run()
    assert taken == [True, False]
    want = np.sort(np.linalg.eigvalsh(np.asarray(hess)))[::-1]
    for got in (eigvals, eigvals2):
        np.testing.assert_allclose(np.sort(np.asarray(got))[::-1], want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(again, scores, rtol=1e-7, atol=1e-10 * np.abs(scores).max())


def _arnoldi_run(matvec, dim, iters, key, cuts=()):
    """``(Q, T)`` of an Arnoldi run of ``iters`` steps, taken in slices of steps split
    at ``cuts`` (one call of ``arnoldi_steps`` per slice)."""
    from jattri.func import hessian
    carry = hessian.arnoldi_start(dim, iters, key, jnp.float64)
    for js in np.split(np.arange(iters, dtype=np.int32), list(cuts)):
        carry = hessian.arnoldi_steps(matvec, carry, jnp.asarray(js), key)
    return hessian.arnoldi_basis(carry)


def test_arnoldi_in_slices_of_steps_is_one_run():
    """A run taken in several calls of ``arnoldi_steps`` (as Arnoldi's fit inside
    ``progress``) is the run taken in one, breakdown restarts included."""
    q = jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(12, 12)))[0])
    a = q @ jnp.diag(jnp.asarray([4.0] * 5 + [1.0] * 4 + [0.3] * 3)) @ q.T
    whole = _arnoldi_run(lambda v: a @ v, 12, 10, jax.random.PRNGKey(5))
    for cuts in ((1,), (3, 4, 9), tuple(range(1, 10))):
        parts = _arnoldi_run(lambda v: a @ v, 12, 10, jax.random.PRNGKey(5), cuts)
        for x, y in zip(whole, parts):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-13)
    assert np.sum(np.abs(np.diag(np.asarray(whole[1]), -1)) < 1e-12) >= 2  # restarted


def test_arnoldi_restarts_after_breakdown():
    """On an operator with 3 distinct eigenvalues in 12 dimensions the Krylov space is
    invariant after 3 steps: the run restarts with a fresh orthogonal vector (drawn
    only then, inside a ``lax.cond``) and still finds the whole spectrum, with an
    orthonormal basis."""
    from jattri.func import hessian
    q = jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(12, 12)))[0])
    want = np.array([5.0] * 4 + [2.0] * 4 + [0.5] * 4)
    a = q @ jnp.diag(jnp.asarray(want)) @ q.T
    basis, t = _arnoldi_run(lambda v: a @ v, 12, 12, jax.random.PRNGKey(3))
    assert np.sum(np.abs(np.diag(np.asarray(t), -1)) < 1e-12) >= 3  # it broke down
    np.testing.assert_allclose(np.asarray(basis) @ np.asarray(basis).T, np.eye(12), atol=1e-12)
    np.testing.assert_allclose(np.asarray(basis) @ np.asarray(a) @ np.asarray(basis).T, t,
                               atol=1e-12)
    vals, _ = hessian.arnoldi_eigenpairs(lambda v: a @ v, 12, rank=12, num_iters=12,
                                         key=jax.random.PRNGKey(3), dtype=jnp.float64)
    np.testing.assert_allclose(np.sort(np.asarray(vals))[::-1], want, rtol=1e-10)
    # the zero operator breaks down exactly (w = 0) at every step: only the restart
    # vectors make the basis
    basis, t = _arnoldi_run(lambda v: 0.0 * v, 6, 6, jax.random.PRNGKey(3))
    np.testing.assert_allclose(np.asarray(basis) @ np.asarray(basis).T, np.eye(6), atol=1e-12)
    np.testing.assert_array_equal(t, np.zeros((6, 6)))


@pytest.mark.parametrize("cuts", [(), (3, 4, 9)])
def test_arnoldi_basis_in_row_blocks_is_the_same_run(monkeypatch, cuts):
    """A basis above ``PASS_BLOCK_BYTES`` is held in ``PASS_BLOCKS`` row blocks, and
    step j's passes read only the blocks that hold rows 0..j. The run equals the run on
    one block (restarts after breakdown included, whole or in slices of steps), and on
    an operator of 40 distinct eigenvalues its basis is orthonormal with T = QAQᵀ. A
    step reading one block too few, or a row written into the wrong block, fails it."""
    from jattri.func import hessian
    rng = np.random.default_rng(0)
    q = jnp.asarray(np.linalg.qr(rng.normal(size=(12, 12)))[0])
    clustered = q @ jnp.diag(jnp.asarray([5.0] * 4 + [2.0] * 4 + [0.5] * 4)) @ q.T
    q40 = jnp.asarray(np.linalg.qr(rng.normal(size=(40, 40)))[0])
    spread = q40 @ jnp.diag(jnp.asarray(np.linspace(0.1, 5.0, 40))) @ q40.T
    key = jax.random.PRNGKey(3)
    whole = [_arnoldi_run(lambda v: clustered @ v, 12, 12, key),
             _arnoldi_run(lambda v: spread @ v, 40, 30, key)]
    assert len(hessian.arnoldi_start(40, 30, key, jnp.float64)[0]) == 1
    monkeypatch.setattr(hessian, "PASS_BLOCK_BYTES", 0)
    assert [b.shape[0] for b in hessian.arnoldi_start(12, 12, key, jnp.float64)[0]] == [4, 4, 4, 1]
    blocked = [_arnoldi_run(lambda v: clustered @ v, 12, 12, key, cuts),
               _arnoldi_run(lambda v: spread @ v, 40, 30, key, cuts)]
    assert np.sum(np.abs(np.diag(np.asarray(blocked[0][1]), -1)) < 1e-12) >= 3  # restarted
    for (qa, ta), (qb, tb) in zip(whole, blocked):
        np.testing.assert_allclose(np.asarray(qb), np.asarray(qa), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(tb), np.asarray(ta), rtol=0, atol=1e-12)
    basis, t = blocked[1]
    np.testing.assert_allclose(np.asarray(basis) @ np.asarray(basis).T, np.eye(30), atol=1e-12)
    np.testing.assert_allclose(np.asarray(basis) @ np.asarray(spread) @ np.asarray(basis).T,
                               t[:30], atol=1e-12)


def test_chunk_grads_times_equals_raveled_product():
    """``chunk_grads_times`` multiplies leaf by leaf; it equals the raveled per-example
    gradients times the whole matrix, padding rows zero, for a pytree of mixed shapes."""
    from jattri.methods import _common
    params = {"b": jnp.arange(3.0), "w": jnp.arange(12.0).reshape(4, 3) / 7, "s": jnp.array(0.5)}
    fn = lambda p, z, i, aux: jnp.sum(jnp.tanh(z @ p["w"] + p["b"]) ** 2) * p["s"] + i * 0.0
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)))
    chunk = engine.Chunk(x, jnp.arange(5), jnp.array([True, True, True, True, False]))
    mat = jnp.asarray(np.random.default_rng(2).normal(size=(16, 6)))
    got = _common.chunk_grads_times(fn, params, None, chunk, _common.row_blocks(params, mat))
    want = _common.chunk_grads(fn, params, None, chunk) @ mat
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.asarray(got[4]) == 0) and np.all(np.abs(np.asarray(got[:4])) > 0)


def test_arnoldi_factored_coordinates_equal_formed_ones(monkeypatch):
    """Where every parameter is in a Dense layer at one position, Arnoldi's training
    coordinates Vᵀg_i are taken from the layers' inputs and output gradients
    (``_factored_grads_times``): they equal the formed gradients times V, padding rows
    zero, and the scores equal the float64 reference. A loss with an L2 term on the
    parameters is not rebuilt from the layers (no factored plan; the formed-gradient
    route it takes is scored in ``test_methods_agree_and_self_scores_are_diagonals``).
    (The size threshold n·d is lowered to 0 here, so the tiny model takes the path.)"""
    from jattri.methods import _common
    from jattri.task import as_task, as_members
    model = MLP(hidden=(5, 4), num_classes=3)
    x, y = _classification_data(9, 4, 3, seed=4)
    monkeypatch.setattr(influence, "_FACTORED_COORDS_MIN", 10 ** 9)
    assert influence._arnoldi_layers(as_task(_flax_loss(model)), as_members(_f64(
        model.init(jax.random.PRNGKey(5), x[:1])["params"])), (x, y), {}) is None
    monkeypatch.setattr(influence, "_FACTORED_COORDS_MIN", 0)
    params = _f64(model.init(jax.random.PRNGKey(5), x[:1])["params"])
    task = as_task(_flax_loss(model))
    members = as_members(params)
    memo = {}
    layers = influence._arnoldi_layers(task, members, (x, y), memo)
    assert layers is not None and len(layers) == 3
    theta, _ = ravel_pytree(params)
    mat = jnp.asarray(np.random.default_rng(6).normal(size=(theta.size, 7)))
    chunk = engine.Chunk((x, y), jnp.arange(9), jnp.arange(9) < 8)
    blocks = _common.row_blocks(params, mat)
    got = influence._factored_grads_times(layers, task.loss, params, None, chunk, blocks)
    want = _common.chunk_grads(task.loss, params, None, chunk) @ mat
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(got[8]) == 0) and np.all(np.abs(np.asarray(got[:8])) > 0)
    # the L2 term puts gradient outside the layers: no factored plan
    l2 = as_task(_flax_loss(model, l2=0.1))
    assert influence._arnoldi_layers(l2, members, (x, y), {}) is None
    # the scores against the float64 reference g_iᵀ V diag(1/(μ+λ)) Vᵀ g_t, the test
    # side taken from the layers too
    test = _classification_data(5, 4, 3, seed=7)
    taken = []
    real = influence._arnoldi_test_coords

    def spy(*args):
        taken.append(1)
        return real(*args)

    monkeypatch.setattr(influence, "_arnoldi_test_coords", spy)
    fn = _flax_loss(model)
    th, unravel = ravel_pytree(params)
    hess = np.asarray(jax.hessian(lambda t: jnp.mean(jax.vmap(
        lambda z: fn(unravel(t), z))((x, y))))(th))
    flat_grads = jax.vmap(lambda z: ravel_pytree(jax.grad(fn)(params, z))[0])
    mu, vec = np.linalg.eigh(hess)
    keep = mu + 2.0 > 1e-6 * np.max(mu + 2.0)
    left = np.asarray(flat_grads((x, y))) @ vec[:, keep]
    right = np.asarray(flat_grads(test)) @ vec[:, keep]
    want = left @ np.diag(1 / (mu[keep] + 2.0)) @ right.T
    attr = influence_arnoldi(fn, rank=th.size, damping=2.0)
    got = attr.attribute(attr.cache(params, (x, y)), test)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    assert taken  # the test side from the layers too


def test_progress_reports_arnoldis_fit_step_by_step(monkeypatch, capsys):
    """Under ``jattri.progress`` Arnoldi's fit is a stage of its own, ``"arnoldi
    fit"``, reporting each Krylov step of each member (``unit="Krylov steps"``): one
    Dense layer's output-space products (one member) and the generic products (two
    checkpoints, 2 × 12 steps). The fitted state equals a quiet fit's bitwise, and the
    default printer names the unit."""
    import flax.linen as nn

    class Softmax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(x)

    model = Softmax()
    train = _classification_data(40, 4, 3, seed=6)
    params = _f64(model.init(jax.random.PRNGKey(1), train[0][:1])["params"])
    taken = []
    real = influence._layer_operands
    monkeypatch.setattr(influence, "_layer_operands", lambda *a: taken.append(1) or real(*a))
    half = jax.tree_util.tree_map(lambda a: 0.5 * a, params)
    for members, total in ((params, 12), (jattri.checkpoints([params, half]), 24)):
        attr = influence_arnoldi(_flax_loss(model), rank=5, num_iters=12, damping=0.1)
        quiet, loud, fit = cache_quiet_and_reported(attr, members, train, "arnoldi fit")
        assert fit == ([(i, total, "Krylov steps", False) for i in range(1, total + 1)]
                       + [(total, total, "Krylov steps", True)]), fit
        for a, b in zip(jax.tree_util.tree_leaves(quiet), jax.tree_util.tree_leaves(loud)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if total == 12:
            assert taken  # the one-layer route
    capsys.readouterr()
    with jattri.progress(every=0.0):
        attr.cache(jattri.checkpoints([params, half]), train)
    assert "arnoldi fit: 24/24 Krylov steps" in capsys.readouterr().err


@pytest.mark.parametrize("bias,classes", [(True, 3), (False, 3), (True, 6)])
def test_arnoldi_one_layer_products_in_output_space(monkeypatch, bias, classes):
    """A softmax regression (one Dense layer, with and without a bias): Arnoldi's
    products are taken in the layer's output space (``_layer_product``: Ãᵀ(∂²ℓ/∂y² ÃV)
    in the parameters' raveled order). They give the dense Hessian's eigenvalues, and
    the scores equal the generic route's (the path switched off) and exact influence.
    The check runs once per shape, in a program of its own before the first fit; an
    L2 term inside the loss fails it, and every fit takes the generic route. With 6
    classes the products are taken at a width of 8, zero-padded (``_product_width``)."""
    import flax.linen as nn

    class Softmax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(classes, use_bias=bias, name="head")(x)

    assert (influence._product_width(classes) > classes) == (classes == 6)
    model = Softmax()
    data = _classification_data(40, 4, classes, seed=4)
    train = jax.tree_util.tree_map(lambda a: a[:30], data)
    test = jax.tree_util.tree_map(lambda a: a[30:], data)
    params = _f64(model.init(jax.random.PRNGKey(5), data[0][:1])["params"])
    theta, unravel = ravel_pytree(params)
    d = len(theta)
    taken = []
    real = influence._layer_operands
    monkeypatch.setattr(influence, "_layer_operands", lambda *a: taken.append(1) or real(*a))
    factored = []
    real_coords = influence._factored_grads_times
    monkeypatch.setattr(influence, "_factored_grads_times",
                        lambda *a: factored.append(1) or real_coords(*a))
    checks = []
    real_one = influence._one_layer
    monkeypatch.setattr(influence, "_one_layer",
                        lambda *a, **k: checks.append(1) or real_one(*a, **k))

    def run(loss, damping):
        jax.clear_caches()
        attr = influence_arnoldi(loss, rank=d, damping=damping, tol=1e-12)
        first = attr.cache(params, train)  # the fit that checks the plan
        state = attr.cache(params, train)  # a second fit of the same shapes: no check
        scores = np.asarray(attr.attribute(state, test))
        np.testing.assert_allclose(attr.attribute(first, test), scores, rtol=1e-7,
                                   atol=1e-10 * np.abs(scores).max())
        return scores, state.curvature[0][0]

    loss = _flax_loss(model)
    scores, eigvals = run(loss, 0.1)
    assert taken and len(checks) == 1
    assert factored  # coordinates from the layer too, below the n·d threshold
    hess = jax.hessian(lambda t: jnp.mean(jax.vmap(lambda z: loss(unravel(t), z))(train)))(theta)
    want = np.sort(np.linalg.eigvalsh(np.asarray(hess)))[::-1]
    np.testing.assert_allclose(np.sort(np.asarray(eigvals))[::-1], want, rtol=1e-8, atol=1e-10)
    explicit = influence_explicit(loss, damping=0.1)
    np.testing.assert_allclose(scores, explicit.attribute(explicit.cache(params, train), test),
                               rtol=1e-7, atol=1e-10 * np.abs(scores).max())
    if not bias or classes != 3:  # the generic route and the L2 term: once
        return
    with monkeypatch.context() as m:
        m.setattr(influence, "_arnoldi_one_layer", lambda *a: None)
        generic, _ = run(loss, 0.1)
    np.testing.assert_allclose(generic, scores, rtol=1e-7, atol=1e-10 * np.abs(scores).max())
    taken.clear()
    factored.clear()
    checks.clear()
    l2_loss = _flax_loss(model, l2=1e-2)
    l2_scores, _ = run(l2_loss, 0.1)
    # the check failed before any fit: no fit traced the layer's route, and the scores
    # are the generic route's (they include the L2 term the layer's products leave out)
    assert not taken and len(checks) == 1
    explicit = influence_explicit(l2_loss, damping=0.1)
    np.testing.assert_allclose(l2_scores,
                               explicit.attribute(explicit.cache(params, train), test),
                               rtol=1e-7, atol=1e-10 * np.abs(l2_scores).max())
