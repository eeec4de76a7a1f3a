"""Influence on non-convex models (issue 12): the Gauss-Newton curvature of
influence_explicit / cg / lissa / arnoldi against float64 references built with
``jax.jacobian`` and dense solves; CG's negative-curvature error; the dense curvature
built in blocks; CG and LiSSA solving the smaller side."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jattri
from jattri.func.hessian import add_dense, cg_solve, dense_block
from jattri.methods import influence
from jattri.methods.influence import (influence_arnoldi, influence_cg, influence_explicit,
                                      influence_lissa)

pytestmark = pytest.mark.usefixtures("x64")

from _toy import classification_data  # noqa: E402


# ------------------------------------------------------------------- tiny models

def mlp_output(p, z):
    """A ReLU MLP 4-6-3 written by hand: logits of one example."""
    h = jax.nn.relu(z[0] @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def cross_entropy(logits, z):
    return -jax.nn.log_softmax(logits)[z[1]]


def mlp_loss(p, z):
    return cross_entropy(mlp_output(p, z), z)


def linear_output(p, z):
    return z[0] @ p["w"] + p["b"]


def linear_loss(p, z):
    return cross_entropy(linear_output(p, z), z)


def squares_output(p, z):
    return z[0] @ p["w"]


def half_square(out, z):
    return 0.5 * (out - z[1]) ** 2


def squares_loss(p, z):
    return half_square(squares_output(p, z), z)


def mlp_problem():
    x, y = classification_data(36, 4, 3, seed=3)
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    params = {"w1": jax.random.normal(keys[0], (4, 6), jnp.float64),
              "b1": jnp.full((6,), 0.1, jnp.float64),
              "w2": jax.random.normal(keys[1], (6, 3), jnp.float64),
              "b2": jnp.zeros(3, jnp.float64)}
    task = jattri.Task(mlp_loss, output_fn=mlp_output, output_loss_fn=cross_entropy)
    return task, params, (x[:24], y[:24]), (x[24:], y[24:])


def grads(loss, params, data):
    g = jax.vmap(lambda z: ravel_pytree(jax.grad(loss)(params, z))[0])(data)
    return np.asarray(g)


def ggn_reference(output, output_loss, params, data):
    """(1/n) Σ_i J_iᵀ H_i J_i, J_i = ∂output/∂θ by ``jax.jacobian``, H_i = ∇²ℓ_i."""
    theta, unravel = ravel_pytree(params)
    total = np.zeros((theta.size, theta.size))
    n = len(data[1])
    for i in range(n):
        z = jax.tree_util.tree_map(lambda a: a[i], data)
        jac = np.atleast_2d(np.asarray(jax.jacobian(lambda t: output(unravel(t), z))(theta)))
        o = output(params, z)
        h = np.atleast_2d(np.asarray(jax.hessian(lambda u: output_loss(u, z))(o)))
        total += jac.T @ h @ jac
    return total / n


def hessian_reference(loss, params, data):
    theta, unravel = ravel_pytree(params)
    mean = lambda t: jnp.mean(jax.vmap(lambda z: loss(unravel(t), z))(data))
    return np.asarray(jax.hessian(mean)(theta))


def dense_scores(curvature, damping, g_train, g_test):
    c = curvature + damping * np.eye(len(curvature))
    return g_train @ np.linalg.solve(c, g_test.T)


# ----------------------------------------------------------- GGN against references

def test_ggn_equals_hessian_on_convex_models():
    """Softmax regression and linear least squares: the model is linear in θ, so G = H
    and ``curvature="ggn"`` scores equal ``"hessian"`` ones to float64 precision."""
    x, y = classification_data(30, 4, 3, seed=1)
    lr = jattri.Task(linear_loss, output_fn=linear_output, output_loss_fn=cross_entropy)
    lr_params = {"w": 0.3 * jnp.ones((4, 3)), "b": jnp.array([0.1, -0.2, 0.0])}
    ls = jattri.Task(squares_loss, output_fn=squares_output, output_loss_fn=half_square)
    targets = x @ jnp.arange(4.0)
    for task, params, data, damping in ((lr, lr_params, (x, y), 1e-3),
                                        (ls, {"w": jnp.zeros(4)}, (x, targets), 0.0)):
        train = jax.tree_util.tree_map(lambda a: a[:20], data)
        test = jax.tree_util.tree_map(lambda a: a[20:], data)
        scores = {}
        for curvature in ("hessian", "ggn"):
            for name, make in (("explicit", lambda c: influence_explicit(
                                    task, damping=damping, curvature=c)),
                               ("cg", lambda c: influence_cg(
                                   task, damping=damping, curvature=c, maxiter=200,
                                   tol=1e-13))):
                attr = make(curvature)
                scores[name, curvature] = np.asarray(attr.attribute(attr.cache(params, train),
                                                                    test))
        ref = scores["explicit", "hessian"]
        for key, got in scores.items():
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max(),
                                       err_msg=str(key))


def test_explicit_ggn_is_jacobian_reference_on_relu_mlp():
    """The dense GGN the explicit method factors is (1/n) Σ J_iᵀ ∇²ℓ_i J_i built by
    ``jax.jacobian``, it differs from the (indefinite) Hessian, and the scores are the
    dense solve's."""
    task, params, train, test = mlp_problem()
    damping = 1e-3
    attr = influence_explicit(task, damping=damping, curvature="ggn", chunk_size=5)
    state = attr.cache(params, train)
    ggn = ggn_reference(mlp_output, cross_entropy, params, train)
    factor = np.asarray(state.curvature[0])  # UᵀU = G + λI (the upper factor)
    np.testing.assert_allclose(factor.T @ factor - damping * np.eye(len(ggn)), ggn,
                               rtol=1e-9, atol=1e-11 * np.abs(ggn).max())
    assert np.linalg.eigvalsh(ggn).min() > -1e-10  # positive semi-definite
    hess = hessian_reference(mlp_loss, params, train)
    assert np.linalg.eigvalsh(hess).min() < -10 * damping  # indefinite at this damping
    g_train, g_test = grads(mlp_loss, params, train), grads(mlp_loss, params, test)
    want = dense_scores(ggn, damping, g_train, g_test)
    np.testing.assert_allclose(attr.attribute(state, test), want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    # a new damping at attribute time: one more factorisation, no refit
    want = dense_scores(ggn, 0.1, g_train, g_test)
    np.testing.assert_allclose(attr.attribute(state, test, damping=0.1), want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    np.testing.assert_allclose(attr.self_attribute(state, damping=0.1),
                               np.diag(dense_scores(ggn, 0.1, g_train, g_train)), rtol=1e-8)
    # the Hessian itself, at the same damping, is refused
    with pytest.raises(ValueError, match='curvature="ggn"'):
        influence_explicit(task, damping=damping).cache(params, train)


def test_iterative_ggn_methods_agree_with_explicit():
    """CG, LiSSA (full-batch series) and full-rank Arnoldi with ``curvature="ggn"`` give
    the explicit GGN scores on the ReLU MLP whose Hessian is indefinite."""
    task, params, train, test = mlp_problem()
    damping = 0.05
    explicit = influence_explicit(task, damping=damping, curvature="ggn")
    want = np.asarray(explicit.attribute(explicit.cache(params, train), test))
    d = ravel_pytree(params)[0].size
    for attr, rtol in (
            (influence_cg(task, damping=damping, curvature="ggn", maxiter=300, tol=1e-12),
             1e-7),
            (influence_arnoldi(task, damping=damping, curvature="ggn", rank=d, num_iters=d,
                               tol=1e-12), 1e-7),
            (influence_lissa(task, damping=damping, curvature="ggn", depth=3000), 1e-6)):
        got = np.asarray(attr.attribute(attr.cache(params, train), test))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_add_dense_builds_the_matrix_in_blocks():
    """Any block size (one, one that leaves an overlapping last block, all) gives the
    same symmetric matrix, added in place to what the accumulator held."""
    a = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (7, 7), jnp.float64))
    a = a + a.T
    start = np.arange(49.0).reshape(7, 7)
    for block in (1, 3, 7, 50):
        got = jax.jit(lambda acc: add_dense(acc, lambda v: v @ a, block))(jnp.asarray(start))
        np.testing.assert_allclose(got, start + a, rtol=1e-14)
    many = jnp.zeros((2, 7, 7))
    got = add_dense(many, lambda v: v @ a, 3, at=1)
    np.testing.assert_allclose(got[1], a, rtol=1e-14)
    np.testing.assert_array_equal(got[0], 0.0)
    assert dense_block(17_226) == 2**26 // (4 * 17_226)  # four (block, d) float32 in 256 MiB


# --------------------------------------------------------------- negative curvature

def test_cg_raises_on_negative_curvature_and_ggn_works():
    """Tiny damping on the ReLU MLP: H + λI is indefinite; CG raises (attribute and
    self_attribute) pointing at ``curvature="ggn"``, where the GGN solve is fine."""
    task, params, train, test = mlp_problem()
    assert np.linalg.eigvalsh(hessian_reference(mlp_loss, params, train)).min() < -1e-2
    attr = influence_cg(task, damping=1e-3, maxiter=200)
    state = attr.cache(params, train)
    with pytest.raises(ValueError, match=r'non-positive curvature.*curvature="ggn"'):
        attr.attribute(state, test)
    with pytest.raises(ValueError, match='curvature="ggn"'):
        attr.self_attribute(state)
    with pytest.raises(ValueError, match="non-positive curvature"):
        influence_cg(task, damping=1e-3, relatif="l").cache(params, train)
    ggn = influence_cg(task, damping=1e-3, curvature="ggn", maxiter=200)
    assert np.isfinite(np.asarray(ggn.attribute(ggn.cache(params, train), test))).all()


def test_cg_solve_flags_only_non_positive_directions():
    """``cg_solve``: a PD system is solved; an indefinite one gives NaN for a right-hand
    side that meets negative curvature; a zero right-hand side is 0."""
    a = jnp.diag(jnp.array([3.0, 1.0, -0.5]))
    b = jnp.array([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = np.asarray(cg_solve(lambda x: a @ x, b, maxiter=20, tol=1e-12))
    np.testing.assert_allclose(out[0], [1 / 3, 2.0, 0.0], rtol=1e-12)
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[2], 0.0)


# ------------------------------------------------------------- the smaller side

def test_cg_and_lissa_solve_the_smaller_side(monkeypatch):
    """n_train < n_test: the training gradients are solved (chunk by chunk, never a
    call with the n_test test vectors); n_test < n_train: the test gradients; both give
    the dense-solve scores, RelatIF and top-k included."""
    task, params, data, extra = mlp_problem()
    x = jnp.concatenate([data[0], extra[0]])
    y = jnp.concatenate([data[1], extra[1]])
    train, test = (x[:8], y[:8]), (x[8:], y[8:])  # 8 train, 28 test
    damping = 0.1
    ggn = ggn_reference(mlp_output, cross_entropy, params, train)
    g_train, g_test = grads(mlp_loss, params, train), grads(mlp_loss, params, test)
    want = dense_scores(ggn, damping, g_train, g_test)
    inv_train = np.linalg.solve(ggn + damping * np.eye(len(ggn)), g_train.T).T
    theta_norms = np.linalg.norm(inv_train, axis=1)

    seen = []
    for name in ("_cg_apply", "_lissa_apply"):
        original = getattr(influence, name)

        def spy(config, args, v, original=original):
            seen.append(v.shape[1])
            return original(config, args, v)

        monkeypatch.setattr(influence, name, spy)
    for make, rtol in ((lambda **kw: influence_cg(task, damping=damping, curvature="ggn",
                                                   maxiter=300, tol=1e-12, chunk_size=3,
                                                   **kw), 1e-7),
                       (lambda **kw: influence_lissa(task, damping=damping, curvature="ggn",
                                                     depth=1500, chunk_size=3, **kw), 1e-6)):
        attr = make()
        state = attr.cache(params, train)
        seen.clear()
        got = np.asarray(attr.attribute(state, test))
        assert seen and max(seen) <= 3, seen  # training chunks of 3, never 28 test vectors
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
        seen.clear()
        few = np.asarray(attr.attribute(state, jax.tree_util.tree_map(lambda a: a[:5], test)))
        assert 5 in seen  # the 5 test vectors are the smaller side
        np.testing.assert_allclose(few, want[:, :5], rtol=rtol, atol=rtol * np.abs(want).max())
        top = attr.attribute(state, test, top_k=2)
        np.testing.assert_array_equal(top.indices, np.argsort(-want, axis=0)[:2].T)
        rel = make(relatif="theta")
        got = np.asarray(rel.attribute(rel.cache(params, train), test))
        np.testing.assert_allclose(got, want / theta_norms[:, None], rtol=10 * rtol,
                                   atol=10 * rtol * np.abs(want / theta_norms[:, None]).max())


# ------------------------------------------------------------------- arguments

def test_curvature_arguments_are_checked_and_recorded():
    task, params, train, test = mlp_problem()
    for factory in (influence_explicit, influence_cg, influence_lissa, influence_arnoldi):
        with pytest.raises(ValueError, match="`curvature` must be one of"):
            factory(task, curvature="gn")
        with pytest.raises(ValueError, match="output_fn"):
            factory(mlp_loss, curvature="ggn")  # a bare loss has no split
    with pytest.raises(ValueError, match="go together"):
        jattri.Task(mlp_loss, output_fn=mlp_output)
    with pytest.raises(TypeError, match="`output_loss_fn` must be callable"):
        jattri.Task(mlp_loss, output_fn=mlp_output, output_loss_fn="ce")
    wrong = jattri.Task(mlp_loss, output_fn=lambda p, z: 2 * mlp_output(p, z),
                        output_loss_fn=cross_entropy)
    with pytest.raises(ValueError, match="does not reproduce its loss"):
        influence_cg(wrong, curvature="ggn").cache(params, train)
    ggn = influence_cg(task, damping=0.1, curvature="ggn")
    state = ggn.cache(params, train)
    assert ("curvature", "ggn") in state.made.hyper
    assert dict(state.made.hyper)["output_fn"].endswith("mlp_output")
    with pytest.raises(ValueError, match="curvature"):
        influence_cg(task, damping=0.1).attribute(state, test)
    # explicit keeps the factors of C + damping·I: a state of another damping is refused
    explicit = influence_explicit(task, damping=0.1, curvature="ggn")
    with pytest.raises(ValueError, match="damping"):
        influence_explicit(task, damping=1.0, curvature="ggn").attribute(
            explicit.cache(params, train), test)
