"""jattri's own programs compile with XLA's classic CPU emitters (``jattri._jit``):
the option reaches the compiler, and the user can keep XLA's defaults."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattri import _jit

# the option is for the CPU backend only; elsewhere cpu_options() is None
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU option")


def test_cpu_options_follow_the_environment(monkeypatch):
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS", raising=False)
    monkeypatch.setattr(_jit, "_YNN_FIX", False)  # (its own test below)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert _jit.cpu_options() == {"xla_cpu_use_fusion_emitters": False}
    monkeypatch.setenv("JATTRI_XLA_DEFAULTS", "1")
    assert _jit.cpu_options() is None
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS")
    # the user's own choice of emitters is kept
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    assert _jit.cpu_options() is None


def test_programs_that_run_once_compile_unoptimised(monkeypatch):
    """``jit(..., once=True)``: XLA's backend optimisation level 0 on top of the
    emitters' option, unless the user's XLA_FLAGS name the level; the same values."""
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS", raising=False)
    monkeypatch.setattr(_jit, "_YNN_FIX", False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert _jit.cpu_options(once=True) == {"xla_cpu_use_fusion_emitters": False,
                                           "xla_backend_optimization_level": 0}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    assert _jit.cpu_options(once=True) == {"xla_cpu_use_fusion_emitters": False}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    assert _jit.cpu_options(once=True) == {"xla_backend_optimization_level": 0}
    assert _jit.cpu_options() is None
    monkeypatch.setenv("JATTRI_XLA_DEFAULTS", "1")
    assert _jit.cpu_options(once=True) is None
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS")
    # the level reaches the compiler of a once-program only: a name XLA does not know
    # fails that compilation and no other
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(_jit, "_LEVEL", "xla_no_such_level")
    x = jnp.arange(4.0)
    with pytest.raises(Exception, match="xla_no_such_level"):
        _jit.jit(lambda v: jnp.cos(v) + 3, once=True)(x)
    np.testing.assert_allclose(_jit.jit(lambda v: jnp.cos(v) + 3)(x), np.cos(np.arange(4.0)) + 3,
                               rtol=1e-6)
    monkeypatch.setattr(_jit, "_LEVEL", "xla_backend_optimization_level")
    f = _jit.jit(lambda v, k: jnp.tanh(v) * k, static_argnums=1, once=True)
    np.testing.assert_allclose(f(x, 3), np.tanh(np.arange(4.0)) * 3, rtol=1e-6)


@pytest.mark.skipif(not _jit._YNN_FIX, reason="a jaxlib without YNNPACK's reduce fusions")
def test_reductions_of_products_are_computed_right(monkeypatch):
    """jaxlib 0.10.2 fuses a reduction with the product feeding it into a YNNPACK call
    that can return wrong numbers (jax-ml/jax#39103, and a summed product with a
    constant matrix: nan on the 2-core machine). jattri's programs keep YNNPACK to
    single products; the answers equal float64 numpy's. The user's XLA_FLAGS and
    JATTRI_XLA_DEFAULTS win."""
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert _jit.cpu_options()[_jit._YNN] == "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    f = jnp.asarray(np.random.default_rng(0).random((1000, 784), dtype=np.float32))
    summed = _jit.jit(lambda f: (f @ jnp.ones((784, 10))).sum())(f)
    np.testing.assert_allclose(summed, np.asarray(f, np.float64).sum() * 10, rtol=1e-5)
    # the program: the last row's squared norm after an identity matrix
    i = jnp.arange(32_769, dtype=jnp.float32)
    x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
    eye = jnp.eye(3)
    norms = _jit.jit(jax.vmap(lambda row: jnp.sum((eye @ row) ** 2)))(x)
    np.testing.assert_allclose(norms, np.arange(32_769, dtype=np.float64) ** 2, rtol=1e-6)
    # the same with the matrix an argument, as jattri passes weights: wrong there too
    norms = _jit.jit(lambda x, m: jax.vmap(lambda row: jnp.sum((m @ row) ** 2))(x))(x, eye)
    np.testing.assert_allclose(norms, np.arange(32_769, dtype=np.float64) ** 2, rtol=1e-6)
    monkeypatch.setenv("XLA_FLAGS", f"--{_jit._YNN}=")
    assert _jit._YNN not in _jit.cpu_options()
    monkeypatch.setenv("JATTRI_XLA_DEFAULTS", "1")
    assert _jit.cpu_options() is None


def test_the_option_reaches_the_compiler(monkeypatch):
    """An option name XLA does not know fails the compilation: so the options are
    passed to it. Without them the same program compiles and runs."""
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(_jit, "_OPTION", "xla_cpu_no_such_option")
    x = jnp.arange(3.0)
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        _jit.jit(lambda v: jnp.sin(v) * 2)(x)
    monkeypatch.setenv("JATTRI_XLA_DEFAULTS", "1")
    f = _jit.jit(lambda v, k: jnp.sin(v) * k, static_argnums=1)
    np.testing.assert_allclose(f(x, 2), np.sin(np.arange(3.0)) * 2, rtol=1e-6)
    assert f.__wrapped__ is not None and f.lower(x, 2) is not None  # jax.jit's attributes


def test_inside_a_trace_the_stage_is_a_plain_jit(monkeypatch):
    """JAX takes compiler options on top-level programs only: inside the user's
    ``jax.jit`` or ``vmap`` a stage compiles as part of the user's program. With an
    option XLA would refuse, the nested calls still run."""
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(_jit, "_OPTION", "xla_cpu_no_such_option")
    f = _jit.jit(lambda v: jnp.sin(v) * 2)
    x = jnp.arange(3.0)
    np.testing.assert_allclose(jax.jit(lambda v: f(v) + 1)(x), np.sin(np.arange(3.0)) * 2 + 1,
                               rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(x[:, None])[:, 0], np.sin(np.arange(3.0)) * 2,
                               rtol=1e-6)
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        f(x)  # the same stage at top level carries the option


def test_a_method_runs_top_level_and_inside_jit_with_the_option(monkeypatch):
    import jattri
    monkeypatch.delenv("JATTRI_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert _jit.cpu_options()["xla_cpu_use_fusion_emitters"] is False

    def loss(w, z):
        x, y = z
        return (x @ w - y) ** 2

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x, y = jax.random.normal(k1, (12, 5)), jax.random.normal(k2, (12,))
    w = jnp.linspace(-1.0, 1.0, 5)
    attr = jattri.grad_dot(loss, chunk_size=4)
    top = attr.attribute(attr.cache(w, (x[:8], y[:8])), (x[8:], y[8:]))
    nested = jax.jit(lambda w: attr.attribute(attr.cache(w, (x[:8], y[:8])), (x[8:], y[8:])))(w)
    g = 2 * (x @ w - y)[:, None] * x  # the per-example gradients, by hand
    ref = np.asarray(g[:8], np.float64) @ np.asarray(g[8:], np.float64).T  # (train, test)
    scale = 1e-5 * np.abs(ref).max()  # float32 scores
    np.testing.assert_allclose(top, ref, rtol=1e-5, atol=scale)
    np.testing.assert_allclose(nested, top, rtol=1e-5, atol=scale)


_LAPACK_SCRIPT = r"""
import sys
import numpy as np
import jax, jax.numpy as jnp
from jattri import _jit
a = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]], np.float32)
w = _jit.jit(jnp.linalg.eigvalsh)(a)
x = _jit.jit(jnp.linalg.solve)(a, np.ones(3, np.float32))
print("after", "scipy.linalg" in sys.modules)
np.testing.assert_allclose(w, np.linalg.eigvalsh(a.astype(np.float64)), rtol=1e-5)
np.testing.assert_allclose(x, np.linalg.solve(a.astype(np.float64), np.ones(3)), rtol=1e-5)
import scipy.linalg, scipy.linalg.cython_lapack  # the ordinary import, later
np.testing.assert_allclose(scipy.linalg.eigh(a)[0], w, rtol=1e-5)
print("cython_lapack", hasattr(scipy.linalg, "cython_lapack"))
"""


def test_linear_algebra_lowers_without_importing_scipy_linalg():
    """jaxlib's LAPACK pointers come from scipy's two Cython modules, loaded alone
    (``_jit._lapack_without_scipy_linalg``): a first factorisation in a fresh process
    leaves ``scipy.linalg`` unimported, computes the right answer, and a later ordinary
    ``import scipy.linalg`` still works."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JATTRI_XLA_DEFAULTS"}
    out = subprocess.run([sys.executable, "-c", _LAPACK_SCRIPT], env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "after False" in out.stdout, out.stdout
    assert "cython_lapack True" in out.stdout, out.stdout


def test_value_checks_skip_under_an_outer_jit_with_members_closed_over(x64):
    """Under an outer ``jax.jit`` even members and data closed over (concrete arrays)
    give traced results, so no check that reads a value may run there
    (``_common.is_concrete``): factored Grad-Dot's rebuild check and the one-layer
    check of explicit influence and Arnoldi take their traced-safe route, and the
    scores equal the top-level call's. (Before, Grad-Dot raised
    ConcretizationTypeError and the one-layer check TracerBoolConversionError.)"""
    import flax.linen as nn

    import jattri

    model = nn.Dense(3)
    rng = np.random.RandomState(0)
    x, y = rng.randn(24, 4), np.arange(24) % 3
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64),
                                    model.init(jax.random.PRNGKey(0), x[:1])["params"])

    def loss(p, z):  # an L2 term: the one-layer and factored checks must fail
        penalty = sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))
        return -jax.nn.log_softmax(model.apply({"params": p}, z[0]))[z[1]] + 1e-2 * penalty

    train, test = (x[:18], y[:18]), (x[18:], y[18:])
    members = jattri.checkpoints([params])
    for attr in (jattri.grad_dot(loss), jattri.influence_explicit(loss, damping=0.1),
                 jattri.influence_arnoldi(loss, rank=15, damping=0.1, tol=1e-12)):
        # nested first: no plan recorded yet by a top-level call of the same shapes
        nested = jax.jit(lambda: attr.attribute(attr.cache(members, train), test))()
        top = np.asarray(attr.attribute(attr.cache(members, train), test))
        np.testing.assert_allclose(nested, top, rtol=1e-9, atol=1e-12 * np.abs(top).max())
