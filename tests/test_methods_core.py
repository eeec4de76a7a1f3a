"""Core methods vs slow references: IF vs leave-one-out retraining, formulas by hand."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from jax.flatten_util import ravel_pytree

import jattri

LAMBDA = 0.1  # L2 coefficient of the training objective


def lr_loss(p, z):
    x, y = z
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)


def lr_target(p, z):  # a target different from the loss: minus the log-prob margin
    x, y = z
    logits = x @ p["w"] + p["b"]
    return -(logits[y] - jax.nn.logsumexp(logits))


def make_data(key, n=40, d=4, c=3):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (d, c))
    y = jnp.argmax(x @ w + 0.8 * jax.random.normal(kw, (n, c)), -1).astype(jnp.int32)
    return x, y


@functools.partial(jax.jit, static_argnames="steps")
def fit(x, y, weights, steps=30):
    """Newton's method on Σ_i w_i loss_i / Σ w + (λ/2)‖θ‖² — converges in float64."""
    d, c = x.shape[1], 3
    p0 = {"w": jnp.zeros((d, c)), "b": jnp.zeros(c)}
    theta, unravel = ravel_pytree(p0)

    def obj(t):
        losses = jax.vmap(lambda a, b: lr_loss(unravel(t), (a, b)))(x, y)
        return jnp.sum(weights * losses) / jnp.sum(weights) + 0.5 * LAMBDA * t @ t

    def step(t, _):
        return t - jnp.linalg.solve(jax.hessian(obj)(t), jax.grad(obj)(t)), None

    theta, _ = jax.lax.scan(step, theta, None, length=steps)
    return unravel(theta)


def test_influence_explicit_matches_leave_one_out(x64):
    x, y = make_data(jax.random.PRNGKey(0))
    xt, yt = make_data(jax.random.PRNGKey(1), n=6)
    n = len(x)
    params = fit(x, y, jnp.ones(n))
    attr = jattri.influence_explicit(lr_loss, damping=LAMBDA)
    scores = np.asarray(attr.attribute(attr.cache(params, (x, y)), (xt, yt)))

    loo = jax.vmap(lambda i: fit(x, y, jnp.ones(n).at[i].set(0.0)))(jnp.arange(n))
    loss_t = lambda p: jax.vmap(lambda a, b: lr_loss(p, (a, b)))(xt, yt)
    delta = np.asarray(jax.vmap(loss_t)(loo) - loss_t(params)[None])  # (n, n_test)
    # Removing a helpful example raises the test loss: delta ≈ score / n.
    for t in range(xt.shape[0]):
        r = scipy.stats.pearsonr(scores[:, t], delta[:, t])[0]
        assert r >= 0.95, (t, r)
    np.testing.assert_allclose(scores / n, delta, atol=0.25 * np.abs(delta).max())
    # The metric agrees: utility = −loss of the retrained models.
    util = -np.asarray(jax.vmap(loss_t)(loo))
    assert np.all(jattri.metrics.loo_corr(scores, np.arange(n), util) >= 0.95)


@functools.lru_cache(maxsize=None)
def _tasks(seed, two_members=False, target=None):
    """``(task, params list, train)``."""
    x, y = make_data(jax.random.PRNGKey(seed))
    params = fit(x, y, jnp.ones(len(x)))
    members = [params]
    if two_members:
        members.append(jax.tree_util.tree_map(lambda a: 0.7 * a + 0.01, params))
    return jattri.Task(lr_loss, target), members, (x, y)


def dense_reference(task, params_list, train, test, kind):
    """score[i, t] by explicit Python loops of jax.grad, averaged over members."""
    (x, y), (xt, yt) = train, test
    loss_fn, target_fn = task.user_fns
    out = 0
    for p in params_list:
        theta, unravel = ravel_pytree(p)
        grad_l, grad_t = jax.jit(jax.grad(loss_fn)), jax.jit(jax.grad(target_fn))
        g = np.stack([ravel_pytree(grad_l(p, (x[i], y[i])))[0] for i in range(len(x))])
        gt = np.stack([ravel_pytree(grad_t(p, (xt[j], yt[j])))[0] for j in range(len(xt))])
        if kind == "grad_dot":
            s = g @ gt.T
        elif kind == "grad_cos":
            s = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (
                gt / np.linalg.norm(gt, axis=1, keepdims=True)).T
        else:  # influence
            h = np.asarray(jax.hessian(lambda t: jnp.mean(jax.vmap(
                lambda a, b: loss_fn(unravel(t), (a, b)))(x, y)))(theta))
            s = g @ np.linalg.solve(h + LAMBDA * np.eye(len(theta)), gt.T)
        out = out + s
    return out / len(params_list)


METHODS = {
    "influence_explicit": lambda t: jattri.influence_explicit(t, damping=LAMBDA),
    "influence_cg": lambda t: jattri.influence_cg(t, damping=LAMBDA, tol=1e-12, maxiter=500),
    "grad_dot": jattri.grad_dot,
    "grad_cos": jattri.grad_cos,
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("two_members", [False, True])
@pytest.mark.parametrize("target", [None, lr_target])
def test_methods_match_dense_reference(x64, name, two_members, target):
    task, params, train = _tasks(2, two_members, target)
    test = make_data(jax.random.PRNGKey(3), n=5)
    attr = METHODS[name](task)
    state = attr.cache(jattri.checkpoints(params), train)
    scores = attr.attribute(state, test)
    assert scores.shape == (40, 5)
    kind = "influence" if name.startswith("influence") else name
    np.testing.assert_allclose(scores, dense_reference(task, params, train, test, kind),
                               rtol=1e-7, atol=1e-10)
    # self_attribute is the diagonal of attribute(state, train).
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(np.asarray(attr.attribute(state, train))),
                               rtol=1e-7, atol=1e-10)


def _bf16(a):
    """``a`` rounded to bfloat16, back in float64."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float64))


def trak_reference(task, params_list, train, test, proj_dim, damping, key, shared=False,
                   bfloat16=False, projection="gaussian"):
    """TRAK by hand: margins by loops, dense projection matrices (member m's drawn from
    ``fold_in(key, m)``, or ``key`` for all with ``shared``; ``projection`` the kind, its
    matrix read from the projector; ``proj_dim=None``: no projection, P = I), explicit
    formula.
    ``bfloat16``: the margin gradients and P rounded to bfloat16 before their product
    (P's rounded entries read from the projector: the identity's rows are exact)."""
    (x, y), (xt, yt) = train, test
    loss_fn, target_fn = task.user_fns
    margin = lambda f: (lambda p, z: -f(p, z) - jnp.log(-jnp.expm1(-f(p, z))))
    acc, q = 0, 0
    for m, p in enumerate(params_list):
        d = ravel_pytree(p)[0].size
        if proj_dim is None:
            pm = np.eye(d)
        else:
            proj = jattri.func.random_projection(
                projection, key if shared else jax.random.fold_in(key, m), d, proj_dim,
                dtype="bfloat16" if bfloat16 else None)
            pm = np.asarray(proj(jnp.eye(d)))  # the dense (d, k) matrix, for reference
        rnd = _bf16 if bfloat16 else (lambda a: a)
        grad_l = jax.jit(jax.grad(margin(loss_fn)))
        grad_t = jax.jit(jax.grad(margin(target_fn)))
        phi = rnd(np.stack([ravel_pytree(grad_l(p, (x[i], y[i])))[0]
                            for i in range(len(x))])) @ pm
        phit = rnd(np.stack([ravel_pytree(grad_t(p, (xt[j], yt[j])))[0]
                             for j in range(len(xt))])) @ pm
        kern = phi.T @ phi
        rel = damping(kern) if callable(damping) else damping  # relative to tr/k
        k = pm.shape[1]
        kern += rel * np.trace(kern) / k * np.eye(k)
        acc = acc + phi @ np.linalg.inv(kern) @ phit.T
        loss_i = jax.jit(loss_fn)
        q = q + np.array([1 - np.exp(-float(loss_i(p, (x[i], y[i])))) for i in range(len(x))])
    return acc / len(params_list) * (q / len(params_list))[:, None]


@pytest.mark.parametrize("two_members,shared", [(False, False), (True, False),
                                               (True, True)])
def test_trak_matches_formula(x64, two_members, shared):
    task, params, train = _tasks(4, two_members)
    test = make_data(jax.random.PRNGKey(5), n=5)
    key = jax.random.PRNGKey(9)
    attr = jattri.trak(task, proj_dim=8, damping=0.05, key=key, shared_projection=shared)
    state = attr.cache(jattri.checkpoints(params), train)
    want = trak_reference(task, params, train, test, 8, 0.05, key, shared)
    np.testing.assert_allclose(attr.attribute(state, test), want, rtol=1e-7, atol=1e-10)
    if two_members:  # the other variant's projections give other scores
        other = trak_reference(task, params, train, test, 8, 0.05, key, not shared)
        assert not np.allclose(want, other, rtol=1e-3)
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(np.asarray(attr.attribute(state, train))), rtol=1e-7)


def test_trak_bfloat16_projection_matches_formula(x64):
    """``projection_dtype="bfloat16"``: TRAK's formula with the margin gradients and P
    rounded to bfloat16 in their product, the kernel, solve and scores in float64;
    the scores move from the float64 ones by about 2⁻⁹ relative."""
    task, params, train = _tasks(4, True)
    test = make_data(jax.random.PRNGKey(5), n=5)
    key = jax.random.PRNGKey(9)
    attr = jattri.trak(task, proj_dim=8, damping=0.05, key=key, projection_dtype="bfloat16")
    state = attr.cache(jattri.checkpoints(params), train)
    assert state.phi.dtype == jnp.float64
    got = np.asarray(attr.attribute(state, test))
    want = trak_reference(task, params, train, test, 8, 0.05, key, bfloat16=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    full = trak_reference(task, params, train, test, 8, 0.05, key)
    err = np.linalg.norm(got - full) / np.linalg.norm(full)
    assert 2**-14 < err < 2**-6, err
    # a state of one precision is refused by the other's attributor, naming it
    with pytest.raises(ValueError, match="projection_dtype"):
        jattri.trak(task, proj_dim=8, damping=0.05, key=key).attribute(state, test)
    for kw in (dict(projection="sjlt"), dict(projection="kronecker"), dict(proj_dim=None)):
        with pytest.raises(ValueError, match="projection_dtype"):
            jattri.trak(task, **{"proj_dim": 8, **kw}, projection_dtype="bfloat16")


def test_identical_members_give_single_member_scores(x64):
    task, (p,), train = _tasks(2)
    test = make_data(jax.random.PRNGKey(7), n=3)
    triple = jattri.checkpoints([p, p, p])
    # (TRAK with one projection for all members: by default each has its own)
    for make in list(METHODS.values()) + [
            lambda t: jattri.trak(t, proj_dim=6, shared_projection=True)]:
        attr = make(task)
        np.testing.assert_allclose(attr.attribute(attr.cache(triple, train), test),
                                   attr.attribute(attr.cache(p, train), test), rtol=1e-10)


def test_methods_jit_and_state_is_pytree(x64):
    task, (p,), train = _tasks(2)
    test = make_data(jax.random.PRNGKey(9), n=3)
    attr = jattri.grad_dot(task)
    state = attr.cache(p, train)
    leaves = jax.tree_util.tree_leaves(state)
    assert all(isinstance(l, jax.Array) for l in leaves)
    jitted = jax.jit(attr.attribute)(state, test)
    np.testing.assert_allclose(jitted, attr.attribute(state, test), rtol=1e-6)


def test_influence_on_nonconvex_singular_hessian_raises():
    x, y = make_data(jax.random.PRNGKey(0))
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}  # softmax: Hessian is singular
    attr = jattri.influence_explicit(lr_loss, damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        attr.cache(params, (x, y))
