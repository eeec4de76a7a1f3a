"""JL error of each projection kind at k = 2048 on real per-example gradients of the
10.7M-parameter nanoGPT (issue 15), and its cost per example.

For n per-example gradients g_1..g_n (d = 10,745,088, dattri's Shakespeare nanoGPT at
its random initial weights, blocks of Python's pydoc_data.topics as in
benchmarks/scale.py), each projection P (``jattri.func``: Gaussian, Rademacher, SJLT;
scaled so E[<Pg, Ph>] = <g, h>) is applied once to all n, and reported:

* norm error: |‖Pg‖² / ‖g‖² − 1| (median and max over the n gradients);
* inner-product error: |<Pg_i, Pg_j> − <g_i, g_j>| / (‖g_i‖ ‖g_j‖) over pairs i < j;
* seconds per example of the projection (one call on all n, after a warm-up call),
  next to the seconds per example of the gradients themselves.

JL theory: both errors ~ √(2/k) ≈ 0.031 at k = 2048, whatever d, for Gaussian and
Rademacher; SJLT (one nonzero per row) matches it when no coordinate dominates ‖g‖.

    python benchmarks/jl_error.py                 # n = 8, k = 2048, every kind
    python benchmarks/jl_error.py --n 4 --kinds sjlt --small   # quick (a 2-layer model)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="gradients (>= 2)")
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--kinds", default="sjlt,rademacher,gaussian")
    p.add_argument("--small", action="store_true", help="a 2-layer 64-wide model instead")
    args = p.parse_args(argv)
    kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    from jattri.func.projection import PROJECTIONS
    if args.n < 2 or args.k < 1 or not kinds or set(kinds) - set(PROJECTIONS):
        p.error(f"--n >= 2, --k >= 1, --kinds from {','.join(PROJECTIONS)}")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from jattri.func.projection import random_projection
    from jattri.models import build
    from scale import NANOGPT, QUICK_NANOGPT, lm_loss, token_blocks

    config = QUICK_NANOGPT if args.small else NANOGPT
    model = build("nanogpt", **config)
    params = model.init(jax.random.PRNGKey(0))["params"]
    blocks = jnp.asarray(token_blocks(args.n, config["block_size"], config["vocab_size"]))
    flat, unravel = ravel_pytree(params)
    d = flat.size
    grad_one = jax.jit(lambda b: ravel_pytree(jax.grad(
        lambda p: lm_loss(model.module, p, b))(params))[0])
    grad_one(blocks[0]).block_until_ready()
    t0 = time.perf_counter()
    g = jnp.stack([grad_one(b) for b in blocks])
    g.block_until_ready()
    t_grad = (time.perf_counter() - t0) / args.n
    g64 = np.asarray(g, np.float64)
    norms = np.linalg.norm(g64, axis=1)
    gram = g64 @ g64.T
    iu = np.triu_indices(args.n, 1)
    print(f"d = {d:,}, n = {args.n}, k = {args.k}; gradient {t_grad * 1e3:.0f} ms/example; "
          f"max |g_r|²/‖g‖² = {float(np.max(g64 ** 2 / norms[:, None] ** 2)):.2e}",
          flush=True)
    rows = []
    for kind in kinds:
        proj = random_projection(kind, jax.random.PRNGKey(1), d, args.k)
        jax.block_until_ready(proj(g[:1]))  # compile (and, for dense kinds, one pass)
        t0 = time.perf_counter()
        pg = jax.block_until_ready(proj(g))
        t = time.perf_counter() - t0
        pg64 = np.asarray(pg, np.float64)
        norm_err = np.abs(np.sum(pg64 ** 2, 1) / norms ** 2 - 1)
        ip_err = np.abs((pg64 @ pg64.T - gram)[iu]) / (norms[:, None] * norms[None])[iu]
        rows.append((kind, float(np.median(norm_err)), float(norm_err.max()),
                     float(np.median(ip_err)), float(ip_err.max()), t / args.n))
        print(f"{kind}: done in {t:.1f} s", flush=True)
    print(f"\n| projection | norm error median | max | inner-product error median | max | "
          f"projection s / example | / gradient |")
    print("|---|---|---|---|---|---|---|")
    for kind, nm, nx, im, ix, t in rows:
        print(f"| {kind} | {nm:.4f} | {nx:.4f} | {im:.4f} | {ix:.4f} | {t:.3f} | "
              f"{t / t_grad:.2f} |")
    print(f"\nJL scale √(2/k) = {np.sqrt(2 / args.k):.4f}. machine: {platform.platform()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
