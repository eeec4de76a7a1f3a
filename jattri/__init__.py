"""jattri: training data attribution in JAX.

Score convention (every method): ``scores[i, t] > 0`` means training on example i
lowers the target (a loss: lower is better) on test example t, i.e. i helps t.
Scores are ``(n_train, n_test)``, or a :class:`TopK` when ``top_k`` is given.

A method is built from a :class:`Task` (or a bare ``loss_fn``) and hyperparameters;
checkpoints are :class:`Members`, passed with the data::

    attr = jattri.trak(loss_fn, proj_dim=512)
    state = attr.cache(params, train)          # or jattri.checkpoints([...]), a Stream
    scores = attr.attribute(state, test)       # (n_train, n_test), or top_k=10
"""
from jattri import _blas

_blas.settle()  # OpenBLAS's idle threads: 20 µs of spinning, not 0.09 s (if unset)

from jattri import _compile_cache  # noqa: E402

_compile_cache.enable()  # JAX's persistent compilation cache (JATTRI_COMPILE_CACHE=0: off)

from jattri import func, metrics  # noqa: E402
from jattri.engine import Progress, Stream, TopK, progress, shard, stream
from jattri._resume import resumable
from jattri._checks import ClosureWarning
from jattri.task import Members, Task, checkpoints
from jattri.methods import (Attributor, grad_cos, grad_dot, influence_cg,
                            influence_explicit, trak)
from jattri.methods import knn_shapley, logra, rps, tracin
from jattri.methods import (influence_arnoldi, influence_datainf, influence_ekfac,
                            influence_lissa, stationary_damping)
from jattri import ensemble  # noqa: E402  (after methods: ensembles build on them)
from jattri import interop  # noqa: E402
from jattri import plot  # noqa: E402  (imports matplotlib only when a function is called)
from jattri import _gc  # noqa: E402

_gc.settle()  # what the imports made, frozen out of later collections (JATTRI_GC_FREEZE=0: not)

__version__ = "0.1.0"


def __getattr__(name):
    # `jattri.models` (Flax model zoo) is imported on first use: Flax costs ~1 s of a
    # process's start, and a user's own model does not need it.
    if name == "models":
        import importlib
        return importlib.import_module("jattri.models")
    raise AttributeError(f"module 'jattri' has no attribute {name!r}")

__all__ = [
    "Attributor", "ClosureWarning", "Members", "Progress", "Stream", "Task", "TopK",
    "checkpoints", "ensemble",
    "func", "progress", "shard", "resumable",
    "interop", "metrics", "models", "plot", "stream",
    "grad_cos", "grad_dot", "influence_cg", "influence_explicit", "trak",
    "tracin", "rps", "knn_shapley", "logra",
    "influence_lissa", "influence_arnoldi", "influence_ekfac", "influence_datainf",
    "stationary_damping",
]
