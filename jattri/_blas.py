"""OpenBLAS's idle threads, kept from spinning beside XLA's.

On the CPU, jaxlib runs LAPACK (``jnp.linalg.solve``, ``cholesky``, ``eigh``, triangular
solves) through scipy's OpenBLAS. After a call that used its worker threads, OpenBLAS
keeps them busy-waiting for 2**28 cycles (its default thread timeout, about 0.09 s at
3 GHz) before they sleep. XLA's own thread pool runs the next programs meanwhile, one
thread a core, and a spinning OpenBLAS thread takes a core from them. On a 2-core box,
TRAK's score product right after its kernel solve took 28-31 ms against 13-14 ms alone,
and compiled TRAK-Kronecker calls on dattri's LR (5,000 × 500) took 0.077-0.136 s
(median 0.094) against 0.052-0.090 s (median 0.070) with this module's timeout
(``benchmarks/RESULTS.md``, "OpenBLAS's spinning threads").

So ``import jattri`` sets the environment variable ``OPENBLAS_THREAD_TIMEOUT`` (the
log2 of the cycles OpenBLAS's threads spin, clamped by OpenBLAS to 4-30) to
:data:`TIMEOUT` when it is not set. The threads stay (a large factorisation still runs
on every core); only their idle spinning ends sooner. OpenBLAS reads the variable once,
when it is loaded, and jaxlib loads scipy's OpenBLAS at the first LAPACK call, so it
takes effect unless scipy's linear algebra was imported before jattri (scikit-learn
imports it): set the variable before any import then. A value the user set is kept
(``OPENBLAS_THREAD_TIMEOUT=28`` is OpenBLAS's default). Child processes inherit it.
MKL, Accelerate and a jaxlib built without OpenBLAS ignore it.
"""
from __future__ import annotations

import os

ENV = "OPENBLAS_THREAD_TIMEOUT"
#: 2**16 cycles (about 20 µs): long enough to keep the threads awake between the BLAS
#: calls of one LAPACK routine, far shorter than the gap to the next XLA program
TIMEOUT = 16


def settle() -> None:
    """At the start of ``import jattri``: ``OPENBLAS_THREAD_TIMEOUT`` set to
    :data:`TIMEOUT` unless the environment has it."""
    if not os.environ.get(ENV, "").strip():
        os.environ[ENV] = str(TIMEOUT)
