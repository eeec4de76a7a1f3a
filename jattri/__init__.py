"""jattri: training data attribution in JAX.

Score convention (every method): ``scores[i, t] > 0`` means training on example i
lowers the target (a loss: lower is better) on test example t, i.e. i helps t.
Scores are ``(n_train, n_test)``.
"""
from jattri import func, metrics
from jattri.methods import (Attributor, grad_cos, grad_dot, influence_cg,
                            influence_explicit, trak)
from jattri.methods import knn_shapley, logra, rps, tracin
from jattri.methods import (influence_arnoldi, influence_datainf, influence_ekfac,
                            influence_lissa)
from jattri.task import Member, Task
from jattri import ensemble  # noqa: E402  (after methods: ensembles build on them)
from jattri import interop, models  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Attributor", "Member", "Task", "ensemble", "func", "interop", "metrics", "models",
    "grad_cos", "grad_dot", "influence_cg", "influence_explicit", "trak",
    "tracin", "rps", "knn_shapley", "logra",
    "influence_lissa", "influence_arnoldi", "influence_ekfac", "influence_datainf",
]
