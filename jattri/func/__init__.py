"""Low-level primitives: pure functions over pytrees."""
from jattri.func.grads import per_example_grads
from jattri.func.hessian import hvp, ihvp_cg, ihvp_explicit
from jattri.func.hessian import arnoldi_eigenpairs, ihvp_arnoldi, ihvp_lissa
from jattri.func.fisher import (datainf_ihvp, efvp, ekfac_factors, ekfac_ihvp, ggn_vp,
                                ifvp_explicit)
from jattri.func.layers import dense, layer_inputs, layer_io, linear_layers
from jattri.func.projection import gaussian_projection
from jattri.func.projection import (kronecker_projection, project_leaves,
                                    rademacher_projection, random_projection,
                                    sjlt_projection)

__all__ = ["per_example_grads", "hvp", "ihvp_explicit", "ihvp_cg", "gaussian_projection",
           "rademacher_projection", "sjlt_projection", "random_projection",
           "kronecker_projection", "project_leaves",
           "ihvp_lissa", "ihvp_arnoldi", "arnoldi_eigenpairs", "efvp", "ggn_vp", "ifvp_explicit",
           "ekfac_factors", "ekfac_ihvp", "datainf_ihvp", "linear_layers", "layer_inputs",
           "layer_io", "dense"]
