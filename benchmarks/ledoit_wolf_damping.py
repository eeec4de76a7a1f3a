"""Ledoit-Wolf shrinkage as a ground-truth-free damping for TRAK and LoGra (issue 12),
measured and rejected.

Ledoit & Wolf (2004) shrink a sample covariance S toward μI (μ = tr(S)/k, the mean
eigenvalue) with the intensity ρ̂ that minimises the expected Frobenius error, estimated
from the data alone: (1 − ρ)S + ρμI, whose inverse is that of S + (ρ/(1 − ρ))·μI. So
ρ̂/(1 − ρ̂) is a relative damping in exactly TRAK's and LoGra's convention (λ = damping ×
the mean eigenvalue). This script prints it for the stored features of ``trak_1``,
``trak_5``, ``logra`` and ``logra_exact`` (per member, and per layer for LoGra) on the
embedded settings (scikit-learn's ``ledoit_wolf_shrinkage``, uncentred like the kernels).

    python benchmarks/ledoit_wolf_damping.py
"""
import importlib

import numpy as np
from sklearn.covariance import ledoit_wolf_shrinkage

import jattri
from jattri import benchmark
from jattri.benchmark.registry import METHODS
for setting in ("digits_lr", "digits_mlp"):
    bench = benchmark.load(setting, progress=None)
    task = jattri.Task(bench.loss_fn, bench.target_fn)
    for name, nck in (("trak_1", 1), ("trak_5", 5), ("logra", 1), ("logra_exact", 1)):
        members = jattri.checkpoints(bench.models_full[:nck])
        attr = METHODS[name].build(task, bench)
        st = attr.cache(members, bench.train)
        phi = np.asarray(st.phi, np.float64)  # (n, M, K)
        blocks = ([(0, phi.shape[2])] if name.startswith("trak") else
                  importlib.import_module("jattri.methods.logra")._blocks(st.fisher))
        out = []
        for m in range(phi.shape[1]):
            for a, b in blocks:
                rho = ledoit_wolf_shrinkage(phi[:, m, a:b], assume_centered=True)
                out.append(round(float(rho / (1 - rho)), 3))
        print(setting, name, "Ledoit-Wolf relative damping", out, flush=True)
