"""Careless and hostile arguments (issue 13): every hyperparameter is checked at the
factory with an error naming it; bfloat16 params give float32 answers; a state is
refused by an attributor that did not make it, naming what differs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(5, name="fc1")(x)))


MODEL = MLP()


def loss(params, z):
    x, y = z
    return -jax.nn.log_softmax(MODEL.apply({"params": params}, x))[y]


def features(params, z):
    return nn.relu(z[0] @ params["fc1"]["kernel"] + params["fc1"]["bias"])


def logits(params, z):
    return MODEL.apply({"params": params}, z[0])


@pytest.fixture(scope="module")
def problem():
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
    y = jnp.arange(10) % 3
    params = MODEL.init(jax.random.PRNGKey(1), x[0])["params"]
    return params, (x, y)


# ------------------------------------------------------------ factory arguments

# (factory, keyword, bad value, exception, text the message must contain)
BAD = [
    (jattri.trak, "damping", float("inf"), ValueError, "`damping` must be finite"),
    (jattri.trak, "damping", "0.1", TypeError, "`damping` must be a real number"),
    (jattri.trak, "damping", -1.0, ValueError, "`damping` must be a real number >= 0"),
    (jattri.trak, "proj_dim", "16", TypeError, "`proj_dim` must be an int"),
    (jattri.trak, "proj_dim", 16.0, TypeError, "`proj_dim`"),
    (jattri.trak, "proj_chunk_size", 0, ValueError, "`proj_chunk_size`"),
    (jattri.trak, "projection", "dense", ValueError, "`projection` must be one of"),
    (jattri.trak, "projection_dtype", "float16", ValueError,
     "`projection_dtype` must be None (the gradients' own dtype) or one of ('bfloat16',)"),
    (jattri.trak, "projection_dtype", True, ValueError, "`projection_dtype` must be None"),
    (jattri.tracin, "projection_dtype", jnp.float16, ValueError, "`projection_dtype`"),
    (jattri.tracin, "projection_dtype", "bfloat16", ValueError,
     "`projection_dtype` applies to a projection: it needs `proj_dim`"),
    (jattri.trak, "key", 0, TypeError, "`key` must be a JAX PRNG key"),
    (jattri.trak, "prob_fn", "softmax", TypeError, "`prob_fn` must be callable"),
    (jattri.trak, "chunk_size", 0, ValueError, "`chunk_size` must be a positive int"),
    (jattri.trak, "chunk_size", -3, ValueError, "`chunk_size` must be a positive int"),
    (jattri.trak, "chunk_size", "8", ValueError, "`chunk_size` must be a positive int"),
    (jattri.grad_dot, "chunk_size", 2.5, ValueError, "`chunk_size`"),
    (jattri.tracin, "normalize", "yes", TypeError, "`normalize` must be True or False"),
    (jattri.tracin, "weights", "1,2", TypeError, "`weights`"),
    (jattri.tracin, "weights", [1.0, float("nan")], ValueError, "`weights` contains NaN"),
    (jattri.logra, "damping", 0.0, ValueError, "`damping` must be a real number > 0"),
    (jattri.logra, "damping", float("nan"), ValueError, "`damping` must be finite"),
    (jattri.logra, "proj_dim_in", True, TypeError, "`proj_dim_in`"),
    (jattri.logra, "layers", "fc1", TypeError, "`layers` must be a sequence"),
    (jattri.influence_explicit, "damping", float("inf"), ValueError, "`damping`"),
    (jattri.influence_explicit, "relatif", "L", ValueError, "`relatif` must be one of"),
    (jattri.influence_cg, "maxiter", 0, ValueError, "`maxiter` must be an int >= 1"),
    (jattri.influence_cg, "maxiter", "10", TypeError, "`maxiter`"),
    (jattri.influence_cg, "tol", -1e-6, ValueError, "`tol`"),
    (jattri.influence_cg, "damping", "1e-3", TypeError, "`damping`"),
    (jattri.influence_lissa, "depth", 0, ValueError, "`depth` must be an int >= 1"),
    (jattri.influence_lissa, "repeats", 1.5, TypeError, "`repeats`"),
    (jattri.influence_lissa, "batch_size", 0, ValueError, "`batch_size`"),
    (jattri.influence_lissa, "scale", 0.0, ValueError, "`scale` must be a real number > 0"),
    (jattri.influence_arnoldi, "rank", 0, ValueError, "`rank` must be an int >= 1"),
    (jattri.influence_arnoldi, "num_iters", "30", TypeError, "`num_iters`"),
    (jattri.influence_arnoldi, "tol", 1.5, ValueError, "`tol`"),
    (jattri.influence_ekfac, "curvature", "gn", ValueError, "`curvature` must be one of"),
    (jattri.influence_ekfac, "correct_eigenvalues", "no", TypeError,
     "`correct_eigenvalues` must be True or False"),
    (jattri.influence_ekfac, "damping", float("-inf"), ValueError, "`damping`"),
    (jattri.influence_datainf, "damping", 0.0, ValueError, "`damping` must be a real number > 0"),
]


@pytest.mark.parametrize("factory,name,value,exc,text", BAD,
                         ids=[f"{f.__name__}-{n}={v!r}" for f, n, v, _, _ in BAD])
def test_factory_refuses(factory, name, value, exc, text):
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        factory(loss, **{name: value})


@pytest.mark.parametrize("factory", [jattri.trak, jattri.tracin])
@pytest.mark.parametrize("projection", ["sjlt", "kronecker"])
def test_projection_dtype_refused_without_a_dense_product(factory, projection):
    """A projection named with no dense product refuses ``projection_dtype``, naming
    both arguments; ``"auto"`` takes it (and drops it where it picks one of those)."""
    with pytest.raises(ValueError, match=f"projection={projection!r} does no dense product"):
        factory(loss, proj_dim=8, projection=projection, projection_dtype="bfloat16")
    factory(loss, proj_dim=8, projection="auto", projection_dtype="bfloat16")


@pytest.mark.parametrize("name,value,exc,text", [
    ("l2", 0.0, ValueError, "`l2` must be a real number > 0"),
    ("l2", "1e-3", TypeError, "`l2`"),
    ("maxiter", 0, ValueError, "`maxiter` must be an int >= 1"),
    ("bias", 1, TypeError, "`bias` must be True or False"),
    ("tol", float("nan"), ValueError, "`tol` must be finite"),
])
def test_rps_refuses(name, value, exc, text):
    with pytest.raises(exc, match=text):
        jattri.rps(features_fn=features, logits_fn=logits, **{name: value})


@pytest.mark.parametrize("value,exc", [(0, ValueError), (2.0, TypeError), ("3", TypeError),
                                       (True, TypeError)])
def test_knn_shapley_refuses_k(value, exc):
    with pytest.raises(exc, match="`k` must be an int >= 1"):
        jattri.knn_shapley(value)


def test_attribute_time_damping_is_checked(problem):
    params, train = problem
    attr = jattri.influence_explicit(loss, damping=1.0)  # H + I > 0 on this MLP
    state = attr.cache(params, train)
    with pytest.raises(ValueError, match="`damping` must be finite"):
        attr.attribute(state, train, damping=float("inf"))
    with pytest.raises(TypeError, match="`damping`"):
        attr.attribute(state, train, damping="0.1")
    # the state survives the bad calls
    assert np.isfinite(np.asarray(attr.attribute(state, train))).all()
    trak = jattri.trak(loss, proj_dim=4)
    state = trak.cache(params, train)
    with pytest.raises(ValueError, match="`damping` must be finite"):
        trak.attribute(state, train, damping=float("inf"))
    with pytest.raises(ValueError, match="`damping` must be a real number >= 0"):
        trak.self_attribute(state, damping=-1.0)
    with pytest.raises(TypeError, match="`lowest` must be True or False"):
        trak.attribute(state, train, top_k=2, lowest="yes")
    with pytest.raises(ValueError, match="`top_k` must be a positive int"):
        trak.attribute(state, train, top_k="2")


def test_ensemble_arguments():
    task = jattri.Task(loss)
    with pytest.raises(TypeError, match="`rate`"):
        jattri.ensemble.dropout_trak(task, 2, jax.random.PRNGKey(0), rate="0.1")
    with pytest.raises(ValueError, match="`rate`"):
        jattri.ensemble.dropout_trak(task, 2, jax.random.PRNGKey(0), rate=1.0)
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        jattri.ensemble.dropout_trak(task, 2, 0)


# ---------------------------------------------------------------------- bfloat16

@pytest.mark.parametrize("make", [
    lambda: jattri.grad_dot(loss),
    lambda: jattri.trak(loss, proj_dim=8),
    lambda: jattri.influence_ekfac(loss, damping=1e-2),
    lambda: jattri.logra(loss, proj_dim_in=2, proj_dim_out=2),
    lambda: jattri.logra(loss, proj_dim_in=None, proj_dim_out=None),
], ids=["grad_dot", "trak", "influence_ekfac", "logra", "logra_exact"])
def test_bfloat16_params_compute_in_float32(problem, make):
    """bfloat16 params are accepted, and scored exactly as their float32 values."""
    params, train = problem
    low = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    same = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), low)
    attr = make()
    got = attr.attribute(attr.cache(low, train), train)
    want = attr.attribute(attr.cache(same, train), train)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and the numpy bfloat16 arrays a checkpoint reader returns
    host = jax.tree_util.tree_map(np.asarray, low)
    np.testing.assert_array_equal(np.asarray(attr.attribute(attr.cache(host, train), train)),
                                  np.asarray(want))


def test_integer_params_still_refused(problem):
    params, train = problem
    ints = jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), params)
    with pytest.raises(TypeError, match="parameters must be floating point"):
        jattri.grad_dot(loss).cache(ints, train)


# ------------------------------------------------------------------------ states

def test_state_of_another_method_is_refused(problem):
    params, train = problem
    cos = jattri.grad_cos(loss)
    dot = jattri.grad_dot(loss)
    with pytest.raises(ValueError, match="cached by grad_cos; this attributor is grad_dot"):
        dot.attribute(cos.cache(params, train), train)
    arnoldi = jattri.influence_arnoldi(loss, rank=5, damping=1e-2)
    explicit = jattri.influence_explicit(loss, damping=1e-2)
    datainf = jattri.influence_datainf(loss)
    state = arnoldi.cache(params, train)
    with pytest.raises(ValueError, match="cached by influence_arnoldi; this attributor is "
                                         "influence_explicit"):
        explicit.attribute(state, train)
    with pytest.raises(ValueError, match="influence_datainf"):
        explicit.self_attribute(datainf.cache(params, train))
    with pytest.raises(TypeError, match=r"`state` is a TrakState \(made by trak\); "
                                        "influence_explicit takes the InfluenceState"):
        explicit.attribute(jattri.trak(loss, proj_dim=4).cache(params, train), train)
    with pytest.raises(TypeError, match="`state` is a dict"):
        dot.attribute({"members": params}, train)
    # the refused state still works with its own attributor
    assert np.isfinite(np.asarray(arnoldi.attribute(state, train))).all()


@pytest.mark.parametrize("make_a,make_b,text", [
    (lambda: jattri.trak(loss, proj_dim=8), lambda: jattri.trak(loss, proj_dim=8,
     key=jax.random.PRNGKey(1)), "cached with key="),
    (lambda: jattri.trak(loss, proj_dim=8), lambda: jattri.trak(loss, proj_dim=8,
     projection="sjlt"), "cached with projection='auto'; this trak has "
                         "projection='sjlt'"),
    (lambda: jattri.logra(loss, proj_dim_in=2), lambda: jattri.logra(loss, proj_dim_in=3),
     "cached with proj_dim_in=2"),
    (lambda: jattri.influence_ekfac(loss), lambda: jattri.influence_ekfac(
        loss, correct_eigenvalues=False), "cached with correct_eigenvalues=True"),
    (lambda: jattri.influence_explicit(loss, damping=1.0, relatif="l"),
     lambda: jattri.influence_explicit(loss, damping=2.0, relatif="l"),
     "cached with damping=1.0"),
    (lambda: jattri.grad_dot(loss), lambda: jattri.grad_dot(lambda p, z: 2 * loss(p, z)),
     "cached with loss_fn="),
], ids=["trak-key", "trak-projection", "logra-dim", "ekfac-kfac", "relatif-damping",
        "loss"])
def test_state_with_other_hyperparameters_is_refused(problem, make_a, make_b, text):
    params, train = problem
    state = make_a().cache(params, train)
    with pytest.raises(ValueError, match=text):
        make_b().attribute(state, train)


def _frozen_loss(table, params, z):
    """``loss`` plus a term from a frozen array the ``Partial`` holds."""
    return loss(params, z) + 1e-3 * jnp.sum(table[:4] * z[0])


def test_a_partial_holding_a_large_array_stands_by_a_digest(problem):
    """A ``Partial`` loss holding a frozen array (as the README advises over a closure)
    enters a state's hyperparameters as its shape, dtype and a digest, not as a tuple
    of every value (which took seconds and gigabytes at backbone sizes and was hashed
    again at every call); a changed array is still refused, an equal copy accepted."""
    params, train = problem
    table = np.random.default_rng(0).normal(size=(4 * 1024,)).astype(np.float32)
    table = table.reshape(1024, 4)
    a = jattri.grad_dot(jax.tree_util.Partial(_frozen_loss, jnp.asarray(table)))
    state = a.cache(params, train)
    _, name, (held,) = dict(state.made.hyper)["loss_fn"]
    assert name.endswith("_frozen_loss")
    assert held[:3] == ("array", (1024, 4), "float32") and len(held) == 4
    same = jattri.grad_dot(jax.tree_util.Partial(_frozen_loss, jnp.asarray(table.copy())))
    np.testing.assert_array_equal(np.asarray(same.attribute(state, train)),
                                  np.asarray(a.attribute(state, train)))
    other = jattri.grad_dot(jax.tree_util.Partial(_frozen_loss, jnp.asarray(table * 2)))
    with pytest.raises(ValueError, match="cached with loss_fn="):
        other.attribute(state, train)
    small = jattri.grad_dot(jax.tree_util.Partial(_frozen_loss, jnp.ones((2, 4))))
    assert dict(small.cache(params, train).made.hyper)["loss_fn"][2] == ((1.0,) * 8,)


def test_a_loss_closing_over_large_arrays_is_warned_once(problem):
    """A loss that closes over more than ``CLOSURE_WARN_BYTES`` of arrays gets one
    ``jattri.ClosureWarning`` naming the largest array and the remedy; the same array
    bound by a ``Partial`` (the remedy) and a small closure get none, and every
    version scores alike."""
    import warnings

    from jattri import _checks
    params, train = problem
    rows = _checks.CLOSURE_WARN_BYTES // 16 + 1
    table = jnp.asarray(np.random.default_rng(0).normal(size=(rows, 4)).astype(np.float32))

    def closing(params, z):
        return _frozen_loss(table, params, z)

    with pytest.warns(jattri.ClosureWarning) as caught:
        attr = jattri.grad_dot(closing)
        scores = attr.attribute(attr.cache(params, train), train)
        attr.attribute(attr.cache(params, train), train)
        # other shapes (int16 labels): checked again, not warned again
        attr.attribute(attr.cache(params, train), (train[0], train[1].astype(jnp.int16)))
    ours = [w for w in caught if w.category is jattri.ClosureWarning]
    texts = [str(w.message) for w in ours]
    assert len(texts) == 1, texts
    assert ours[0].filename == __file__  # the user's line, not jattri's
    assert f"({rows}, 4) float32" in texts[0] and "`loss_fn`" in texts[0]
    assert "jax.tree_util.Partial" in texts[0]
    small = table[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error", jattri.ClosureWarning)
        bound = jattri.grad_dot(jax.tree_util.Partial(_frozen_loss, table))
        np.testing.assert_allclose(np.asarray(bound.attribute(bound.cache(params, train),
                                                              train)),
                                   np.asarray(scores), rtol=1e-5, atol=1e-7)
        tiny = jattri.grad_dot(lambda p, z: _frozen_loss(small, p, z))
        np.testing.assert_allclose(np.asarray(tiny.attribute(tiny.cache(params, train),
                                                             train)),
                                   np.asarray(scores), rtol=1e-5, atol=1e-7)


def test_same_hyperparameters_accept_each_others_states(problem):
    """Two attributors built alike (damping only differs where it is applied at
    attribute time) share states, and the answer is the same."""
    params, train = problem
    a = jattri.trak(loss, proj_dim=8, damping=0.1)
    b = jattri.trak(loss, proj_dim=8, damping=0.1)
    state = a.cache(params, train)
    np.testing.assert_array_equal(np.asarray(b.attribute(state, train)),
                                  np.asarray(a.attribute(state, train)))
    c = jattri.influence_ekfac(loss, damping=0.5)
    d = jattri.influence_ekfac(loss, damping=0.1)
    np.testing.assert_allclose(np.asarray(d.attribute(c.cache(params, train), train)),
                               np.asarray(c.attribute(c.cache(params, train), train,
                                                      damping=0.1)), rtol=1e-6)


def test_changed_members_and_training_set_are_refused(problem):
    params, train = problem
    attr = jattri.grad_dot(loss)
    state = attr.cache(params, train)
    other = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    tampered = state._replace(members=jattri.task.as_members(other))
    with pytest.raises(ValueError, match="`state.members` differ from the members"):
        attr.attribute(tampered, train)
    x, y = train
    with pytest.raises(ValueError, match="`train` has 6 examples; the state was cached on 10"):
        attr.attribute(state, train, train=(x[:6], y[:6]))
    # the original state is untouched
    assert attr.attribute(state, train).shape == (10, 10)


def test_states_stay_jittable(problem):
    """The provenance is static: a jitted attribute takes the state as an argument."""
    params, train = problem
    attr = jattri.trak(loss, proj_dim=8)
    state = attr.cache(params, train)
    got = jax.jit(attr.attribute)(state, train)
    np.testing.assert_allclose(np.asarray(got), np.asarray(attr.attribute(state, train)),
                               rtol=1e-5, atol=1e-6)
    jitted_state = jax.jit(attr.cache)(params, train)
    assert jitted_state.made.method == "trak" and jitted_state.made.n_train == 10


def test_stream_batches_that_disagree_are_refused(problem):
    params, (x, y) = problem
    bad = jattri.stream([(x[:5], y[:5]), (x[5:, :3], y[5:])])
    with pytest.raises(ValueError, match="`batch 1 of the stream` has per-example shape"):
        jattri.trak(loss, proj_dim=4, chunk_size=3).cache(params, bad)


def test_impossible_sizes_are_refused_before_allocating(problem):
    params, train = problem
    with pytest.raises(ValueError, match="reduce `proj_dim`"):
        jattri.trak(loss, proj_dim=10**7, projection="gaussian").cache(params, train)
    # the Kronecker projection ("auto" picks it at this d·k) keeps every side whole at
    # k ≥ d: K = d, nothing impossible to allocate
    d = sum(v.size for v in jax.tree_util.tree_leaves(params))
    assert jattri.trak(loss, proj_dim=10**7).cache(params, train).phi.shape[-1] == d


def test_damping_must_be_a_scalar():
    with pytest.raises(TypeError, match="`damping` must be a real number"):
        jattri.trak(loss, damping=np.ones(3))
    with pytest.raises(TypeError, match="`damping` must be a real number"):
        jattri.influence_ekfac(loss, damping=jnp.ones(2))


@pytest.mark.parametrize("host", [True, False])
def test_members_fingerprint_on_host_and_compiled(problem, monkeypatch, host):
    """The members' fingerprint is summed by numpy for CPU-held leaves and by a compiled
    program otherwise (``host=False`` forces that path here): either way an unchanged
    copy is accepted, and a change of one entry, of a bfloat16 or integer leaf
    included, is refused."""
    from jattri import _checks
    from jattri.methods import _common
    monkeypatch.setattr(_checks, "on_cpu", lambda leaves: host)
    params, train = problem
    stacked = jax.tree_util.tree_map(lambda x: x[None], params)

    def members(h, i):  # a bfloat16 parameter, an integer aux leaf
        return jattri.task.Members({**stacked, "h": h[None]}, {"i": i[None]}, 1)

    h, i = jnp.arange(6, dtype=jnp.bfloat16), jnp.arange(4, dtype=jnp.int32)
    before = _common.fingerprint(members(h, i))
    assert _common._same_members(before, _common.fingerprint(members(jnp.copy(h),
                                                                      jnp.copy(i))))
    for other in (members(h.at[2].add(1), i), members(h, i.at[2].add(1))):
        assert not _common._same_members(before, _common.fingerprint(other))
    attr = jattri.grad_dot(loss)
    state = attr.cache(params, train)
    tampered = state._replace(members=jattri.task.as_members(
        jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].add(0.5), params)))
    with pytest.raises(ValueError, match="`state.members` differ from the members"):
        attr.attribute(tampered, train)
    assert attr.attribute(state, train).shape == (10, 10)
