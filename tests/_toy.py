"""Small shared builders for the influence tests (float64 toy problems)."""
import jax
import jax.numpy as jnp


def f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def classification_data(n, d_in, classes, seed=0):
    """``(x, y)``: Gaussian inputs, labels from a random linear model plus Gumbel noise."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (n, d_in), jnp.float64)
    w = jax.random.normal(k2, (d_in, classes), jnp.float64)
    y = jnp.argmax(x @ w + jax.random.gumbel(k3, (n, classes), jnp.float64), -1)
    return x, y


def manual_mlp(params, x, deltas, names=None):
    """The Flax ReLU MLP written out by hand: ``(logits, each Dense layer's input)``,
    with the zero perturbation ``deltas[k]`` added to layer k's output. ``names``:
    the layers in order (default: sorted param names, e.g. fc1, fc2)."""
    names = sorted(params) if names is None else names
    inputs, h = [], x
    for k, name in enumerate(names):
        inputs.append(h)
        h = h @ params[name]["kernel"] + params[name]["bias"] + deltas[k]
        if k < len(names) - 1:
            h = jax.nn.relu(h)
    return h, inputs


def assert_ggn_ekfac_is_exact(loss_fn, params, train, test, damping=1e-3):
    """GGN EK-FAC and GGN K-FAC scores equal exact (dense-Hessian) influence to 1e-8,
    and empirical-Fisher EK-FAC does not: for losses whose Hessian in every factored
    layer is exactly a Kronecker product (a linear map with squared loss)."""
    import numpy as np

    from jattri.methods.influence import influence_ekfac, influence_explicit

    exact = influence_explicit(loss_fn, damping=damping)
    want = np.asarray(exact.attribute(exact.cache(params, train), test))
    for correct in (True, False):
        attr = influence_ekfac(loss_fn, damping=damping, curvature="ggn",
                               correct_eigenvalues=correct)
        got = np.asarray(attr.attribute(attr.cache(params, train), test))
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    # the empirical Fisher is not this Kronecker product: EK-FAC-empirical is not exact
    emp = influence_ekfac(loss_fn, damping=damping)
    assert not np.allclose(emp.attribute(emp.cache(params, train), test), want, rtol=1e-3)


def kronecker_eigenbasis(a_moment, s_moment):
    """``(Q, λ_A ⊗ λ_S)``: Q = Q_A ⊗ Q_S (eigenvectors as columns) of one layer's
    factors, for the row-major vec of its ``(d_in + b, d_out)`` gradient
    (vec(Q_Aᵀ G Q_S) = Qᵀ vec(G)), and the K-FAC eigenvalues (clamped at 0)."""
    import numpy as np

    la, qa = np.linalg.eigh(np.asarray(a_moment))
    ls, qs = np.linalg.eigh(np.asarray(s_moment))
    return np.kron(qa, qs), np.kron(np.maximum(la, 0), np.maximum(ls, 0))


def eigenbasis_scores(q, eigvals, g_train, g_test, damping):
    """``(n_train, n_test)`` = g_train Q diag(1/(eigvals + λ)) Qᵀ g_testᵀ for one layer."""
    import numpy as np

    return (np.asarray(g_train) @ q / (eigvals + damping)) @ (np.asarray(g_test) @ q).T


def assert_top_k_matches_dense(top, dense, k, atol=0.0, rtol=1e-12):
    """``top`` (a ``jattri.TopK`` with ``lowest=True``) equals the stable argsort of the
    dense ``(n_train, n_test)`` scores: highest and lowest k, indices and values."""
    import numpy as np

    dense = np.asarray(dense)
    for indices, scores, sign in ((top.indices, top.scores, -1),
                                  (top.lowest_indices, top.lowest_scores, 1)):
        order = np.argsort(sign * dense, axis=0, kind="stable")[:k].T
        np.testing.assert_array_equal(indices, order)
        np.testing.assert_allclose(scores, np.take_along_axis(dense.T, order, 1),
                                   rtol=rtol, atol=atol)


def cache_quiet_and_reported(attr, members, train, stage):
    """``(quiet, loud, reports)``: ``attr.cache`` without and under ``jattri.progress``,
    and the reports of ``stage`` as ``(done, total, unit, final)``."""
    import jattri
    quiet = attr.cache(members, train)
    seen = []
    with jattri.progress(lambda p, final=False: seen.append((p, final))):
        loud = attr.cache(members, train)
    return quiet, loud, [(p.done, p.total, p.unit, final) for p, final in seen
                         if p.stage == stage]
