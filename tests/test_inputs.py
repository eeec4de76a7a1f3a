"""Bad input gets a clear error naming the argument; nothing already computed is lost."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from test_ensemble import pending


def loss(p, z):
    x, y = z
    return jnp.sum((x @ p["w"] - y) ** 2)


@pytest.fixture
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (12, 2))
    params = {"w": 0.1 * jnp.ones((3, 2))}
    return jattri.Task(loss), params, (x, y)


ALL = {"grad_dot": jattri.grad_dot, "grad_cos": jattri.grad_cos,
       "influence_explicit": jattri.influence_explicit, "influence_cg": jattri.influence_cg,
       "trak": lambda t: jattri.trak(t, proj_dim=4)}


@pytest.mark.parametrize("name", sorted(ALL))
def test_mismatched_train_test(setup, name):
    with pending(name):
        _mismatched_train_test(*setup, ALL[name])


def _mismatched_train_test(task, params, data, make):
    x, y = data
    attr = make(task)
    state = attr.cache(params, (x, y))
    with pytest.raises(ValueError, match="`test` has per-example shape"):
        attr.attribute(state, (x[:, :2], y))
    with pytest.raises(ValueError, match="`test` has pytree structure"):
        attr.attribute(state, {"x": x, "y": y})
    # The state survives a bad call.
    assert attr.attribute(state, (x[:2], y[:2])).shape == (12, 2)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bad_train(setup, name):
    with pending(name):
        _bad_train(*setup, ALL[name])


def _bad_train(task, params, data, make):
    x, y = data
    attr = make(task)
    with pytest.raises(ValueError, match="`train` leaves disagree"):
        attr.cache(params, (x, y[:5]))
    with pytest.raises(ValueError, match="`train` has no examples"):
        attr.cache(params, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="`train` contains NaN"):
        attr.cache(params, (x.at[3, 1].set(jnp.nan), y))
    with pytest.raises(ValueError, match="`train` is empty"):
        attr.cache(params, ())
    with pytest.raises(ValueError, match="`test` contains NaN"):
        attr.attribute(attr.cache(params, (x, y)), (x[:2], y[:2].at[0, 0].set(jnp.inf)))


@pytest.mark.parametrize("name", sorted(ALL))
def test_bad_members(setup, name):
    with pending(name):
        _bad_members(*setup, ALL[name])


def _bad_members(task, params, data, make):
    x, y = data
    attr = make(task)
    with pytest.raises(ValueError, match="`members` contains NaN"):
        attr.cache({"w": jnp.full((3, 2), jnp.nan)}, (x, y))
    with pytest.raises(TypeError, match="wrap it as jattri.checkpoints"):
        attr.cache([params, params], (x, y))
    with pytest.raises(ValueError, match="does not divide"):
        attr.cache(jattri.Members({"w": jnp.ones((2, 3, 2))}, num=3), (x, y))


def test_non_scalar_loss(setup):
    _, _, (x, y) = setup
    batched = lambda p, z: (z[0] @ p["w"] - z[1]) ** 2  # returns (2,)
    task = jattri.Task(batched)
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar"):
        jattri.grad_dot(task).cache({"w": jnp.ones((3, 2))}, (x, y))
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar"):
        jattri.func.per_example_grads(batched, {"w": jnp.ones((3, 2))}, (x, y))


def test_loss_that_fails_on_one_example(setup):
    _, _, (x, y) = setup
    wrong = lambda p, z: jnp.sum(z[0] @ p["w"] @ jnp.ones((5,)))  # shape error
    task = jattri.Task(wrong)
    with pytest.raises(TypeError, match="`loss_fn` failed on one unbatched example"):
        jattri.grad_dot(task).cache({"w": jnp.ones((3, 2))}, (x, y))


def test_bad_target(setup):
    _, _, (x, y) = setup
    task = jattri.Task(loss, target_fn=lambda p, z: z[0] @ p["w"])
    attr = jattri.grad_dot(task)
    with pytest.raises(TypeError, match="`target_fn` must return a scalar"):
        attr.attribute(attr.cache({"w": jnp.ones((3, 2))}, (x, y)), (x, y))


def test_task_errors():
    p = {"w": jnp.ones((3, 2))}
    with pytest.raises(TypeError, match="non-empty list"):
        jattri.checkpoints([])
    with pytest.raises(TypeError, match="wrap it as jattri.checkpoints"):
        jattri.task.as_members([p, p])
    with pytest.raises(ValueError, match="mismatched checkpoints"):
        jattri.checkpoints([p, {"w": jnp.ones((3, 3))}])
    with pytest.raises(ValueError, match="mismatched checkpoints"):
        jattri.checkpoints([p, {"v": jnp.ones((3, 2))}])
    with pytest.raises(ValueError, match=r"`checkpoints\[1\]` contains NaN"):
        jattri.checkpoints([p, {"w": jnp.full((3, 2), jnp.nan)}])
    with pytest.raises(TypeError, match="floating point"):
        jattri.checkpoints([{"w": jnp.ones((3, 2), jnp.int32)}])
    with pytest.raises(TypeError, match="must accept \\(params, example\\)"):
        jattri.Task(lambda p: 0.0)
    with pytest.raises(TypeError, match="callable"):
        jattri.Task("loss")
    with pytest.raises(TypeError, match="already a Task"):
        jattri.Task(jattri.Task(loss))


def test_bad_hyperparameters(setup):
    task, _, _ = setup
    with pytest.raises(ValueError, match="damping"):
        jattri.influence_explicit(task, damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        jattri.influence_cg(task, damping=float("nan"))
    with pytest.raises(ValueError, match="proj_dim"):
        jattri.trak(task, proj_dim=0)
    with pytest.raises(TypeError, match="jattri.Task"):
        jattri.grad_dot(42)  # neither a Task nor a loss_fn (a bare loss_fn is a Task)


def test_per_example_grads_bad_params(setup):
    _, _, (x, y) = setup
    with pytest.raises(ValueError, match="`params` contains NaN"):
        jattri.func.per_example_grads(loss, {"w": jnp.full((3, 2), jnp.nan)}, (x, y))


def test_metric_errors():
    s = np.zeros((10, 4))
    with pytest.raises(ValueError, match="`scores` must be"):
        jattri.metrics.lds(np.zeros(10), np.zeros((5, 3), int), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="`targets` must be"):
        jattri.metrics.lds(s, np.zeros((5, 3), int), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="`subsets` indices"):
        jattri.metrics.lds(s, np.full((5, 3), 10), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="`subsets` must be"):
        jattri.metrics.lds(s, np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="`removed`"):
        jattri.metrics.loo_corr(s, np.array([0, 11]), np.zeros((2, 4)))


@pytest.mark.parametrize("host_max", [jattri._checks.HOST_CHECK_MAX, 0])
def test_nan_params_found_on_host_and_compiled_paths(monkeypatch, host_max):
    """Small CPU-resident params are checked in numpy (no compilation), larger ones
    by the compiled reduction (``HOST_CHECK_MAX`` 0 forces it here): both find one
    NaN or inf among finite values, in jax and in numpy leaves, and pass finite ones."""
    monkeypatch.setattr(jattri._checks, "HOST_CHECK_MAX", host_max)
    ok = {"w": jnp.ones((4, 3)), "b": np.zeros(3, np.float32), "h": jnp.ones(2, jnp.bfloat16)}
    jattri._checks.check_params(ok, "params")
    assert jattri._checks.all_finite(ok["w"])
    for leaf, bad in (("w", jnp.ones((4, 3)).at[2, 1].set(jnp.inf)),
                      ("b", np.array([0.0, np.nan, 0.0], np.float32)),
                      ("h", jnp.ones(2, jnp.bfloat16).at[0].set(jnp.nan))):
        with pytest.raises(ValueError, match="`params` contains NaN or inf"):
            jattri._checks.check_params(dict(ok, **{leaf: bad}), "params")
    assert not jattri._checks.all_finite(jnp.ones(5).at[4].set(-jnp.inf))


def test_finite_jax_arrays_are_read_once(monkeypatch):
    """A jax array found finite is not read again by later checks (it is immutable),
    a numpy array is (it may have changed), an array with a NaN is refused every time,
    and the record of an array goes with it."""
    import gc

    read = []
    real = jattri._checks._finite
    monkeypatch.setattr(jattri._checks, "_finite", lambda leaves: read.append(
        len(leaves)) or real(leaves))
    x, host = jnp.arange(6.0), np.arange(3.0)
    bad = jnp.ones(4).at[1].set(jnp.nan)
    for _ in range(2):
        assert jattri._checks.all_finite((x, host))
        assert not jattri._checks.all_finite(bad)
    assert read == [2, 1, 1, 1]  # x read once; host and bad every time
    host[0] = np.inf
    assert not jattri._checks.all_finite((x, host))
    key = id(x)
    del x
    gc.collect()
    assert key not in jattri._checks._FINITE
