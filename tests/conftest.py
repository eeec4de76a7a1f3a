import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in float64, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop JAX's compiled programs after each test module: a whole-suite run keeps
    its memory at one module's, not the sum of all (under memory pressure XLA's CPU
    compiler can crash instead of raising)."""
    yield
    jax.clear_caches()
