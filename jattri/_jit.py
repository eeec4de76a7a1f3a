"""``jax.jit`` for jattri's own programs, compiled with XLA's classic CPU emitters.

On CPU, XLA's newer MLIR fusion emitters make backend compilation the largest part of
a method's first call. With the classic emitters XLA's compilation time per method
falls by about a third (dattri's 109,386-parameter MLP, 5,000 × 500: TRAK 2.35 s →
1.49 s, CG 1.86 s → 1.18 s, RPS 1.72 s → 1.12 s), and process start to scores, one
process each on the 2-core machine, EK-FAC 9.25 s → 8.53 s, Arnoldi 8.32 s → 7.59 s,
Grad-Dot on the LR 1.79 s → 1.67 s. Compiled calls are unchanged within run-to-run
noise, except explicit influence on the LR, 3-8% slower (`benchmarks/RESULTS.md`,
"Classic CPU emitters"). The one program once measured to compile slower with them,
the generation of the Kronecker projection's random factors (5.3 s against 2.2 s on
that MLP), draws its randomness from a hash now and compiles in 0.65-0.75 s with either
(`benchmarks/RESULTS.md`, "Counter-based projections").

Programs that run once per stage on little data (a rebuild check on one example, the
``k × k`` solve of TRAK, the eigendecompositions of EK-FAC's factors, the generation of
the Kronecker projection's factors) are declared ``jit(..., once=True)`` and compile
without LLVM's optimisation (``xla_backend_optimization_level=0``): XLA then spends a
fraction of the time compiling them and they run a few times slower, which on such a
program is milliseconds. The stages' scans over the data keep the optimised build: with
every program unoptimised, EK-FAC's compiled call on dattri's MLP went from 5.0 s to
7.2-7.9 s (`benchmarks/RESULTS.md`, "Programs that run once").

On jaxlib 0.10.2 and later, the reductions of jattri's programs stay with XLA's own
emitters, not YNNPACK's fused reductions, which compute some sums wrong on that jaxlib
(:data:`_YNN_FIX`; jax-ml/jax#39103).

The options go only to programs jattri compiles itself (each stage's ``jit`` called
outside any trace), and only when JAX's default backend is the CPU: the choice is made
at a program's first call, when the backend is known. JAX accepts compiler options on
top-level programs only, so a stage called inside a trace (``jax.jit(attr.attribute)``,
``vmap``) is an ordinary ``jax.jit`` and the user's program keeps the user's settings.
XLA's own choice of emitters is kept when ``XLA_FLAGS`` names
``xla_cpu_use_fusion_emitters``, its optimisation level when they name
``xla_backend_optimization_level``, and both everywhere when the environment variable
``JATTRI_XLA_DEFAULTS`` is ``1``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import jax

from jattri import _program_cache

_OPTION = "xla_cpu_use_fusion_emitters"
_LEVEL = "xla_backend_optimization_level"
_YNN = "xla_cpu_experimental_ynn_fusion_type"

try:  # JAX's own parse of the jaxlib version, e.g. (0, 10, 2)
    from jax._src.lib import version as _jaxlib_version
except ImportError:  # a JAX that does not say: no option
    _jaxlib_version = (0,)

#: jaxlib 0.10.2 hands a reduction fused with the product or elementwise work feeding
#: it to YNNPACK on CPU by default, and some of those fusions return wrong numbers
#: without an error (jax-ml/jax#39103, a matrix product summed; on the 2-core machine
#: ``sum(F @ ones((784, 10)))`` of a (1,000, 784) F gives nan under ``jax.jit``) or
#: crash (jax-ml/jax#39257, #40412). jattri's programs keep YNNPACK to single products
#: (``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``; in ``XLA_FLAGS`` the same fusions come
#: from ``--xla_cpu_experimental_ynn_fusion_type=-reduce``) from that jaxlib on (0.10.1
#: computes the issue's program right, and an older XLA may not know the option).
_YNN_FIX = tuple(_jaxlib_version) >= (0, 10, 2)


def cpu_options(once: bool = False) -> Optional[dict]:
    """The compiler options jattri adds on the CPU backend now, or ``None``.

    ``once``: a program that runs once per stage on little data (a check on one
    example, a ``k × k`` solve, the generation of small random factors), compiled
    without LLVM's optimisation (``xla_backend_optimization_level=0``): such a program
    spends far longer compiling than running (a one-example gradient check on a
    784 × 10 layer: 0.30 s → 0.05 s of XLA compilation, 1.9 → 3.7 ms per run;
    ``benchmarks/RESULTS.md``, "Programs that run once")."""
    if os.environ.get("JATTRI_XLA_DEFAULTS", "").strip() in ("1", "true", "yes", "on"):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if jax.default_backend() != "cpu":
        return None
    options = {} if _OPTION in flags else {_OPTION: False}
    if _YNN_FIX and _YNN not in flags:
        options[_YNN] = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    if once and _LEVEL not in flags:
        options[_LEVEL] = 0
    return options or None


_lapack_ready = False


def _lapack_without_scipy_linalg() -> None:
    """Hands jaxlib its LAPACK pointers before the first CPU linear-algebra lowering.

    jaxlib takes them from ``scipy.linalg.cython_blas`` and ``cython_lapack``; importing
    those runs ``scipy.linalg/__init__`` first, which pulls in most of scipy and numpy's
    lazy submodules (``numpy.f2py`` among them): the first ``eigh``, ``cholesky`` or
    ``solve`` lowered in a process took 0.54-0.70 s on the 2-core machine, against
    0.02-0.06 s after loading only the two extension modules (``benchmarks/RESULTS.md``,
    "scipy.linalg at the first factorisation"). They are loaded under their own names,
    jaxlib initialises from them, and they leave ``sys.modules`` again, so a later
    ``import scipy.linalg`` is the ordinary one. Once per process, CPU only; on any
    failure jaxlib imports scipy.linalg itself at the first lowering, as it would have
    (and :func:`ensure_lapack` before a program read back from disk runs)."""
    global _lapack_ready, _lapack_initialised
    if _lapack_ready:
        return
    _lapack_ready = True
    if "scipy.linalg" in sys.modules or jax.default_backend() != "cpu":
        return
    seeded = []
    try:
        import importlib.machinery
        import importlib.util

        import scipy
        from jax._src.lax import linalg as lax_linalg

        where = [os.path.join(os.path.dirname(scipy.__file__), "linalg")]
        for short in ("cython_blas", "cython_lapack"):
            name = f"scipy.linalg.{short}"
            if name in sys.modules:
                continue
            spec = importlib.machinery.PathFinder.find_spec(short, where)
            spec.name = name
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            seeded.append(name)
            spec.loader.exec_module(module)
        lax_linalg.initialize_lapack()
        _lapack_initialised = True
    except Exception:  # noqa: BLE001 - an optimisation only
        pass
    finally:
        for name in seeded:
            sys.modules.pop(name, None)


_lapack_initialised = False


def ensure_lapack() -> None:
    """jaxlib's LAPACK pointers handed over now (CPU). jaxlib does it when it lowers a
    factorisation; a program read back from disk (:mod:`jattri._program_cache`) is not
    lowered, and its LAPACK calls would run through null pointers (a segmentation
    fault on the first ``cholesky`` of explicit influence in a warm process)."""
    global _lapack_initialised
    if _lapack_initialised or jax.default_backend() != "cpu":
        return
    _lapack_without_scipy_linalg()  # (once per process; sets the flag where it worked)
    if not _lapack_initialised:  # scipy.linalg loaded already, or seeding failed
        from jax._src.lax import linalg as lax_linalg

        lax_linalg.initialize_lapack()
        _lapack_initialised = True


try:  # JAX's own test before it accepts compiler options: no trace is active
    from jax._src.core import trace_state_clean as _top_level
    outside_any_trace = _top_level
except ImportError:  # a JAX that does not say: XLA's defaults everywhere
    def _top_level() -> bool:
        return False

    def outside_any_trace() -> bool:  # unknown: values are read wherever leaves are
        return True


class _Jitted:
    """``jax.jit(fun, **kwargs)``: with :func:`cpu_options` when called outside any
    trace, plain inside one. Both are built at their first use."""

    def __init__(self, fun: Callable, kwargs: dict, once: bool = False,
                 closed: bool = False):
        self._fun, self._kwargs, self._once, self._closed = fun, kwargs, once, closed
        self._jitted: Optional[Callable] = None
        self._options: Optional[dict] = None
        self._programs: Optional[_program_cache.Programs] = None
        self._plain = jax.jit(fun, **kwargs)
        self.__wrapped__ = fun
        self.__name__ = getattr(fun, "__name__", "jitted")
        self.__doc__ = getattr(fun, "__doc__", None)

    def _get(self):
        _lapack_without_scipy_linalg()
        if not _top_level():
            return self._plain
        if self._jitted is None:
            options = self._options = cpu_options(self._once)
            self._jitted = (self._plain if options is None else
                            jax.jit(self._fun, compiler_options=options, **self._kwargs))
        return self._jitted

    def __call__(self, *args, **kwargs):
        jitted = self._get()
        where = _program_cache.directory() if _top_level() else None
        if where is None:  # inside a trace, or the program cache off
            return jitted(*args, **kwargs)
        if self._programs is None:
            self._programs = _program_cache.Programs(self._fun, self._kwargs, self._closed)
        return self._programs(jitted, self._options, where, args, kwargs)

    def _cache_size(self) -> int:
        """Compiled signatures: ``jax.jit``'s, or those dispatched through
        :mod:`jattri._program_cache` once it is in use."""
        if self._programs is None:
            jitted = self._plain._cache_size()
            if self._jitted is not None and self._jitted is not self._plain:
                jitted += self._jitted._cache_size()
            return jitted
        return len(self._programs)  # (tracing them fills jit's tables: not counted)

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape
        if name.startswith("__") or name in ("_fun", "_kwargs", "_jitted", "_plain",
                                             "_once", "_options", "_programs", "_closed"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit(fun: Optional[Callable] = None, *, once: bool = False, closed: bool = False,
        **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`cpu_options` (``once``: a program that
    runs once per stage on little data, compiled unoptimised); also a decorator
    (``@jit`` or ``@partial(jit, static_argnums=...)``).

    ``closed``: no user function reaches the program (its arguments are arrays and
    plain static values, and it calls only jattri's code and the libraries'), so a
    later process finds it in :mod:`jattri._program_cache` without tracing it."""
    if fun is None:
        return lambda f: _Jitted(f, kwargs, once, closed)
    return _Jitted(fun, kwargs, once, closed)
