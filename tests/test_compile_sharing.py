"""Members that differ only in arrays (dropout keys, LoRA adapters, checkpoints) share
every compiled program: member functions are ``Partial`` pytrees, traced rather than
static. Measured by the cache sizes of jattri's jitted programs, which must not grow
when a second ensemble with more members and another key is scored."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from jattri.ensemble import dropout, lora
from jattri.func import hessian
from jattri.methods import _common, influence

# modules, not the functions of the same names that jattri.methods re-exports
logra, trak = (importlib.import_module(f"jattri.methods.{m}") for m in ("logra", "trak"))

from test_ensemble import init_mlp, mlp_data, mlp_loss

# float64 throughout (the conftest fixture restores the setting afterwards)
pytestmark = pytest.mark.usefixtures("x64")

PROGRAMS = [_common._grads_jit, influence._mean_loss_hessian, influence._cg_ihvp,
            influence._arnoldi_hessian, influence._ekfac_factors_jit, influence._ekfac_ihvps,
            hessian._lissa_jit, hessian._top_eigenvalue_jit, logra._projected_layer_grads,
            trak._q_values]

METHODS = {
    "grad_dot": lambda t: jattri.grad_dot(t),
    "tracin_sjlt": lambda t: jattri.tracin(t, proj_dim=8, projection="sjlt"),
    "trak": lambda t: jattri.trak(t, proj_dim=8),
    "influence_explicit": lambda t: jattri.influence_explicit(t, damping=1.0),
    "influence_cg": lambda t: jattri.influence_cg(t, damping=1.0, maxiter=5),
    "influence_lissa": lambda t: jattri.influence_lissa(t, damping=1.0, depth=5),
    "influence_arnoldi": lambda t: jattri.influence_arnoldi(t, rank=4, damping=1.0),
    "influence_ekfac": lambda t: jattri.influence_ekfac(t, damping=0.1),
    "logra": lambda t: jattri.logra(t, proj_dim_in=3, proj_dim_out=2),
}


def _compiled():
    return [p._cache_size() for p in PROGRAMS]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dropout_members_share_compilations(method):
    params = init_mlp(jax.random.PRNGKey(0))
    train, test = mlp_data(jax.random.PRNGKey(1), 12), mlp_data(jax.random.PRNGKey(2), 3)
    base = jattri.Task(mlp_loss, [params])
    make = METHODS[method]

    def score(task):
        attr = make(task)
        return attr.attribute(attr.cache(train), test)

    score(dropout(base, 1, jax.random.PRNGKey(3)))
    before = _compiled()
    scores = score(dropout(base, 3, jax.random.PRNGKey(4)))
    assert _compiled() == before, f"{method}: a dropout member compiled its own program"
    assert scores.shape == (12, 3) and bool(jnp.all(jnp.isfinite(scores)))


def test_lora_adapters_share_compilations():
    params = init_mlp(jax.random.PRNGKey(0))
    train, test = mlp_data(jax.random.PRNGKey(1), 12), mlp_data(jax.random.PRNGKey(2), 3)
    base = jattri.Task(mlp_loss, [params])
    tasks = [lora(base, train, k, jax.random.PRNGKey(k), rank=2, steps=3, batch_size=4)[0]
             for k in (1, 3)]
    for task in tasks[:1]:
        attr = jattri.trak(task, proj_dim=8)
        attr.attribute(attr.cache(train), test)
    before = _compiled()
    attr = jattri.trak(tasks[1], proj_dim=8)
    attr.attribute(attr.cache(train), test)
    assert _compiled() == before


class _UnhashableLoss:
    """A callable loss holding an array, with value equality: not hashable."""

    def __init__(self, scale):
        self.scale = scale

    def __eq__(self, other):
        return isinstance(other, _UnhashableLoss) and bool(jnp.all(self.scale == other.scale))

    __hash__ = None

    def __call__(self, params, example, rng=None):
        return self.scale * mlp_loss(params, example, rng)


def test_unhashable_loss_functions_work_uncached():
    params = init_mlp(jax.random.PRNGKey(0))
    train, test = mlp_data(jax.random.PRNGKey(1), 8), mlp_data(jax.random.PRNGKey(2), 2)
    loss = _UnhashableLoss(jnp.asarray(2.0))
    same = lambda p, z, rng=None: 2.0 * mlp_loss(p, z, rng)  # hashable twin
    key = jax.random.PRNGKey(0)
    for build in (lambda f: jattri.Task(f, [params]),
                  lambda f: dropout(jattri.Task(f, [params]), 2, key)):
        got, want = [jattri.grad_dot(build(f)) for f in (loss, same)]
        np.testing.assert_allclose(got.attribute(got.cache(train), test),
                                   want.attribute(want.cache(train), test), rtol=1e-12)


def test_func_level_solvers_compile_once_for_one_function():
    """``ihvp_explicit`` / ``ihvp_cg`` / ``ihvp_arnoldi`` / ``ihvp_lissa`` called again
    with the same ``f`` (other params values and vectors) reuse their programs."""
    from jattri import func
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 3))
    f = lambda p: jnp.mean((x @ p["w"] - 1.0) ** 2) + 0.5 * jnp.sum(p["w"] ** 2)
    f_batch = lambda p, b: jnp.mean((b @ p["w"] - 1.0) ** 2) + 0.5 * jnp.sum(p["w"] ** 2)
    calls = [
        lambda p, v: func.ihvp_explicit(f, p, v, damping=0.1),
        lambda p, v: func.ihvp_cg(f, p, v, damping=0.1),
        lambda p, v: func.ihvp_arnoldi(f, p, v, rank=3, damping=0.1),
        lambda p, v: func.ihvp_lissa(f_batch, p, v, data=x, key=jax.random.PRNGKey(1),
                                     damping=0.1, depth=20),
    ]
    programs = [hessian._dense_hessian_jit, hessian._cg_jit, hessian._arnoldi_ihvp_jit,
                hessian._lissa_jit, hessian._top_eigenvalue_jit]
    for call in calls:
        call({"w": jnp.ones(3)}, {"w": jnp.ones(3)})
    before = [p._cache_size() for p in programs]
    for call in calls:
        out = call({"w": jnp.arange(3.0)}, {"w": jnp.arange(3.0) - 1.0})
        assert bool(jnp.all(jnp.isfinite(out["w"])))
    assert [p._cache_size() for p in programs] == before
