"""Attribution methods built from ``jattri.func``; each is a factory returning an
``Attributor(cache, attribute, self_attribute)``."""
from jattri.methods._common import Attributor
from jattri.methods.gradsim import grad_cos, grad_dot
from jattri.methods.influence import influence_cg, influence_explicit
from jattri.methods.influence import (influence_arnoldi, influence_datainf, influence_ekfac,
                                      influence_lissa, stationary_damping)
from jattri.methods.trak import trak
from jattri.methods.tracin import tracin
from jattri.methods.rps import rps
from jattri.methods.shapley import knn_shapley
from jattri.methods.logra import logra

__all__ = ["Attributor", "grad_cos", "grad_dot", "influence_cg", "influence_explicit", "trak",
           "tracin", "rps", "knn_shapley", "logra",
           "influence_lissa", "influence_arnoldi", "influence_ekfac", "influence_datainf"]
# stationary_damping (imported above, re-exported by jattri) is a rule, not a method
