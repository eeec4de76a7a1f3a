"""`import jattri` stays light: the heavy optional packages load on first use only.

Every script pays the import on each run (issue 15's end-to-end times start at the
process's launch); Flax, SciPy's stats, optax and orbax together took ~3 s of it.
"""
import os
import subprocess
import sys

HEAVY = ("flax", "scipy.stats", "optax", "orbax.checkpoint", "matplotlib", "torch",
         "sklearn")


def test_import_jattri_loads_no_heavy_package():
    code = ("import sys, jattri; jattri.Task; jattri.trak; jattri.metrics.lds; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert out == "[]", f"`import jattri` imported {out}"


def test_lazy_pieces_load_when_used():
    """jattri.models (Flax) and the deferred imports resolve on first use."""
    code = ("import sys, numpy as np, jattri\n"
            "m = jattri.models.build('mnist_lr')\n"
            "r = jattri.metrics.lds(np.arange(4.)[:, None], np.array([[0, 1], [1, 2], "
            "[2, 3]]), np.array([[1.], [3.], [5.]]))\n"
            "assert r[0] == 1.0, r\n"
            "print('flax.linen' in sys.modules, 'scipy.stats' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["True", "True"]


def _after_import(code: str, **env) -> list:
    run = subprocess.run([sys.executable, "-c", "import gc, jattri\n" + code],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return run.stdout.split()


def test_import_freezes_what_it_made_and_later_objects_are_collected():
    """`import jattri` moves the objects tracked then out of later collections
    (jattri._gc), and a reference cycle made afterwards is still reclaimed."""
    code = ("import weakref\n"
            "class Node: pass\n"
            "a = Node(); a.self = a; alive = weakref.ref(a); del a\n"
            "found = gc.collect()\n"
            "print(gc.get_freeze_count(), gc.isenabled(), alive() is None, found > 0)")
    frozen, enabled, freed, found = _after_import(code)
    assert int(frozen) > 10_000  # jax's and jattri's objects
    assert (enabled, freed, found) == ("True", "True", "True")


def test_gc_freeze_can_be_turned_off():
    frozen, enabled = _after_import("print(gc.get_freeze_count(), gc.isenabled())",
                                    JATTRI_GC_FREEZE="0")
    assert (frozen, enabled) == ("0", "True")


_SPIN = """
import os, time
import jattri, jax.numpy as jnp, numpy as np
a = jnp.asarray(np.random.default_rng(0).standard_normal((1000, 1000)), jnp.float32)
a = a @ a.T + 1000 * jnp.eye(1000)
for _ in range(3):  # LAPACK's LU and triangular solves, on OpenBLAS's threads
    jnp.linalg.solve(a, a).block_until_ready()
cpu = time.process_time(); time.sleep(0.3)
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"), time.process_time() - cpu)
"""


def _spin(**env) -> tuple:
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = subprocess.run([sys.executable, "-c", _SPIN], capture_output=True, text=True,
                         timeout=120, env={**base, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    setting, cpu = run.stdout.split()[-2:]
    return setting, float(cpu)


def test_openblas_threads_sleep_after_a_lapack_call():
    """jattri._blas: after `import jattri`, OpenBLAS's idle threads (jaxlib's LAPACK)
    stop spinning within microseconds, instead of burning a core for ~0.09 s while XLA
    runs the next program. A user's own OPENBLAS_THREAD_TIMEOUT is kept; with
    OpenBLAS's default (28) the same process spins, which shows the check can fail."""
    setting, cpu = _spin()
    assert setting == "16"
    assert cpu < 0.005, f"{cpu:.4f} s of CPU while the process slept"
    kept, spun = _spin(OPENBLAS_THREAD_TIMEOUT="28")
    assert kept == "28"
    if len(os.sched_getaffinity(0)) >= 2:  # one core: OpenBLAS starts no worker threads
        # alone, 0.054-0.065 s; beside another busy process the spinner gets less
        assert spun > 0.01, f"OpenBLAS's default spun {spun:.4f} s only"
