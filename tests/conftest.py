import os

# Compilations are counted by some tests: no persistent cache may turn them into hits.
os.environ.setdefault("JATTRI_COMPILE_CACHE", "0")

# The suite's time is mostly XLA compiling many small CPU programs; LLVM's optimisation
# passes are most of that and buy nothing on test-sized arrays (78 s -> 52 s for
# tests/test_compile_sharing.py -k dropout_members_share on the 2-core machine). XLA's
# newer MLIR fusion emitters cost about half of what remains (tests/test_logra.py alone:
# 49 s -> 25 s of backend compilation, 85 s -> 61 s wall); the classic emitters' results
# differ at most in the last bit. Set before jax is imported; subprocesses inherit it.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                 "--xla_cpu_use_fusion_emitters=false")
# Subprocesses that build their own XLA_FLAGS (notebooks, multi-host runs) add these.
os.environ["JATTRI_TEST_FAST_XLA"] = " ".join(_FAST_COMPILE)
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [f for f in _FAST_COMPILE if f.split("=")[0]
                                                not in _flags]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


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


# The heaviest files first, by their measured time (pytest --durations, 2026-12-02):
# xdist's ``--dist loadfile`` hands whole files to its two workers in collection order,
# and a heavy file started last keeps one worker busy while the other has nothing left.
_HEAVY_FIRST = ("test_influence_family.py", "test_notebooks.py", "test_compile_sharing.py",
                "test_logra.py", "test_sharding.py", "test_resume.py", "test_ekfac_basis.py",
                "test_scale_memory.py", "test_benchmark.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest
