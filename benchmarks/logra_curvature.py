"""LoGra's Fisher: the empirical Fisher of the loss gradients (LoGra's) against the
Gauss-Newton blocks (``curvature="ggn"``) and the default ``"auto"`` (the Gauss-Newton
blocks here), each over its damping grid.

On the embedded ``digits_lr`` and ``digits_mlp`` settings (ground truth from the cache),
for the three LoGra builds of ``python -m jattri.bench`` (16 × 16 projections with one
and five checkpoints, identity projections): the compiled ``cache`` time, the LDS at the
default damping (``damping=None``: the stationary L2 on exact Gauss-Newton blocks, else
0.1 relative), at 0.1 relative and at every value of ``damping_grid.py``'s relative grid
(1e-4 … 1e3 in half-decades, applied at ``attribute`` on the same state), and whether
the default is within 0.03 of the grid's best (issue 12's rule).

    python benchmarks/logra_curvature.py
    python benchmarks/logra_curvature.py --settings digits_lr
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

import jattri
from jattri import benchmark

sys.path.insert(0, os.path.dirname(__file__))
from damping_grid import RELATIVE_HALF  # noqa: E402

BUILDS = (("logra", 1, 16), ("logra_5", 5, 16), ("logra_exact", 1, None))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="digits_lr,digits_mlp")
    args = ap.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}", flush=True)
    print("| setting | build | curvature | cache s | default LDS | LDS at 0.1 | best grid "
          "LDS (at) | default ≥ best − 0.03 |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        bench = benchmark.load(setting, progress=None)
        task = jattri.Task(bench.loss_fn, bench.target_fn)
        for name, num, k in BUILDS:
            members = jattri.checkpoints(bench.models_full[:num])
            for curvature in ("empirical", "ggn", "auto"):
                attr = jattri.logra(task, proj_dim_in=k, proj_dim_out=k, curvature=curvature)
                jax.block_until_ready(attr.cache(members, bench.train).fisher)  # compile
                t0 = time.perf_counter()
                state = attr.cache(members, bench.train)
                jax.block_until_ready(state.fisher)
                took = time.perf_counter() - t0

                def lds(damping):
                    try:
                        scores = attr.attribute(state, bench.test, damping=damping)
                    except ValueError:  # a block not numerically positive definite
                        return float("nan")
                    return float(np.nanmean(jattri.metrics.lds(np.asarray(scores),
                                                               *bench.lds)))

                grid = {v: lds(v) for v in RELATIVE_HALF}
                best = max(grid, key=lambda v: -np.inf if np.isnan(grid[v]) else grid[v])
                default = lds(None)
                ok = "yes" if default >= grid[best] - 0.03 else "**no**"
                print(f"| {setting} | {name} | {curvature} | {took:.2f} | {default:.3f} | "
                      f"{lds(0.1):.3f} | {grid[best]:.3f} ({best:g}) | {ok} |", flush=True)
                print("  grid: " + " ".join(f"{v:g}:{grid[v]:.3f}" for v in RELATIVE_HALF),
                      file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
