"""Bad input gets a clear error naming the argument; nothing already computed is lost."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri


def loss(p, z):
    x, y = z
    return jnp.sum((x @ p["w"] - y) ** 2)


@pytest.fixture
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (12, 2))
    params = {"w": 0.1 * jnp.ones((3, 2))}
    return jattri.Task(loss, [params]), (x, y)


ALL = [jattri.grad_dot, jattri.grad_cos, jattri.influence_explicit, jattri.influence_cg,
       lambda t: jattri.trak(t, proj_dim=4)]


@pytest.mark.parametrize("make", ALL)
def test_mismatched_train_test(setup, make):
    task, (x, y) = setup
    attr = make(task)
    state = attr.cache((x, y))
    with pytest.raises(ValueError, match="`test` has per-example shape"):
        attr.attribute(state, (x[:, :2], y))
    with pytest.raises(ValueError, match="`test` has pytree structure"):
        attr.attribute(state, {"x": x, "y": y})
    # The state survives a bad call.
    assert attr.attribute(state, (x[:2], y[:2])).shape == (12, 2)


@pytest.mark.parametrize("make", ALL)
def test_bad_train(setup, make):
    task, (x, y) = setup
    attr = make(task)
    with pytest.raises(ValueError, match="`train` leaves disagree"):
        attr.cache((x, y[:5]))
    with pytest.raises(ValueError, match="`train` has no examples"):
        attr.cache((x[:0], y[:0]))
    with pytest.raises(ValueError, match="`train` contains NaN"):
        attr.cache((x.at[3, 1].set(jnp.nan), y))
    with pytest.raises(ValueError, match="`train` is empty"):
        attr.cache(())
    with pytest.raises(ValueError, match="`test` contains NaN"):
        attr.attribute(attr.cache((x, y)), (x[:2], y[:2].at[0, 0].set(jnp.inf)))


def test_non_scalar_loss(setup):
    _, (x, y) = setup
    batched = lambda p, z: (z[0] @ p["w"] - z[1]) ** 2  # returns (2,)
    task = jattri.Task(batched, [{"w": jnp.ones((3, 2))}])
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar"):
        jattri.grad_dot(task).cache((x, y))
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar"):
        jattri.func.per_example_grads(batched, {"w": jnp.ones((3, 2))}, (x, y))


def test_loss_that_fails_on_one_example(setup):
    _, (x, y) = setup
    wrong = lambda p, z: jnp.sum(z[0] @ p["w"] @ jnp.ones((5,)))  # shape error
    task = jattri.Task(wrong, [{"w": jnp.ones((3, 2))}])
    with pytest.raises(TypeError, match="`loss_fn` failed on one unbatched example"):
        jattri.grad_dot(task).cache((x, y))


def test_bad_target(setup):
    _, (x, y) = setup
    task = jattri.Task(loss, [{"w": jnp.ones((3, 2))}], target_fn=lambda p, z: z[0] @ p["w"])
    attr = jattri.grad_dot(task)
    with pytest.raises(TypeError, match="`target_fn` must return a scalar"):
        attr.attribute(attr.cache((x, y)), (x, y))


def test_task_errors():
    p = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="`checkpoints` is empty"):
        jattri.Task(loss, [])
    with pytest.raises(TypeError, match="wrap a single model"):
        jattri.Task(loss, p)
    with pytest.raises(ValueError, match="mismatched checkpoints"):
        jattri.Task(loss, [p, {"w": jnp.ones((3, 3))}])
    with pytest.raises(ValueError, match="mismatched checkpoints"):
        jattri.Task(loss, [p, {"v": jnp.ones((3, 2))}])
    with pytest.raises(ValueError, match=r"`checkpoints\[1\]` contains NaN"):
        jattri.Task(loss, [p, {"w": jnp.full((3, 2), jnp.nan)}])
    with pytest.raises(TypeError, match="floating point"):
        jattri.Task(loss, [{"w": jnp.ones((3, 2), jnp.int32)}])
    with pytest.raises(TypeError, match="must accept \\(params, example\\)"):
        jattri.Task(lambda p: 0.0, [p])
    with pytest.raises(TypeError, match="callable"):
        jattri.Task("loss", [p])


def test_bad_hyperparameters(setup):
    task, _ = setup
    with pytest.raises(ValueError, match="damping"):
        jattri.influence_explicit(task, damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        jattri.influence_cg(task, damping=float("nan"))
    with pytest.raises(ValueError, match="proj_dim"):
        jattri.trak(task, proj_dim=0)
    with pytest.raises(TypeError, match="jattri.Task"):
        jattri.grad_dot(lambda p, z: 0.0)


def test_per_example_grads_bad_params(setup):
    _, (x, y) = setup
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
