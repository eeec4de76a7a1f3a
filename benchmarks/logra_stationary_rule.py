"""A candidate default for LoGra's damping, measured and rejected (issue 12).

The influence family's default damping is the stationary L2 λ̂ (the L2 coefficient under
which the checkpoint is a stationary point of its training objective; see
``jattri.stationary_damping``). Carried into LoGra, it would damp each layer's projected
Fisher by λ̂ · d_ℓ / k_ℓ (λ̂ I in the layer's d_ℓ = (d_in + 1)·d_out gradient
coordinates, pushed through a projection that preserves inner products, PᵀP ≈ (d/k) I).
This script scores ``logra``, ``logra_5`` and ``logra_exact`` of the benchmark registry
with that absolute per-layer damping (× 0.3, 1, 3) on the embedded settings and prints
the LDS next to the equivalent relative damping per layer. The rule is not in jattri, so
the script swaps LoGra's preconditioner for one that adds λ_ℓ·I instead of
damping·tr(F_ℓ)/k_ℓ·I.

    python benchmarks/logra_stationary_rule.py digits_lr,digits_mlp
"""
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jattri
from jattri import benchmark
from jattri.benchmark.registry import METHODS

L = importlib.import_module("jattri.methods.logra")
ABSOLUTE = []  # λ_ℓ per layer of the state being scored


def _absolute_precondition(fisher, damping, rhs):
    out = []
    for f, (a, b), lam in zip(fisher, L._blocks(fisher), ABSOLUTE):
        m = f + lam * damping * jnp.eye(f.shape[-1], dtype=f.dtype)
        out.append(jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m, lower=True),
                                              rhs[:, a:b]))
    return jnp.concatenate(out, axis=1)


def main(settings):
    L._precondition = _absolute_precondition
    for setting in settings.split(","):
        bench = benchmark.load(setting, progress=None)
        task = jattri.Task(bench.loss_fn, bench.target_fn)
        dims = [(x.shape[0] + 1) * x.shape[1]  # linen Dense kernels, with the bias
                for p, x in jax.tree_util.tree_leaves_with_path(bench.models_full[0])
                if "kernel" in jax.tree_util.keystr(p)]
        for name, nck in (("logra", 1), ("logra_5", 5), ("logra_exact", 1)):
            members = jattri.checkpoints(bench.models_full[:nck])
            lam = float(jattri.stationary_damping(task, members, bench.train))
            attr = METHODS[name].build(task, bench)
            state = attr.cache(members, bench.train)
            ABSOLUTE[:] = [lam * d / f.shape[-1] for f, d in zip(state.fisher, dims)]
            relative = [float(np.mean(lam * d / np.trace(np.asarray(f), axis1=-2, axis2=-1)))
                        for f, d in zip(state.fisher, dims)]
            lds = [float(np.nanmean(jattri.metrics.lds(
                np.asarray(attr.attribute(state, bench.test, damping=m)), *bench.lds)))
                for m in (0.3, 1.0, 3.0)]
            print(f"{setting} {name}: λ̂ = {lam:.3g}; per layer d_ℓ = {dims}, as relative "
                  f"damping {np.round(relative, 2).tolist()}; LDS at 0.3×, 1×, 3× the rule: "
                  f"{np.round(lds, 3).tolist()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "digits_lr,digits_mlp")
