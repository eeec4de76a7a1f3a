"""What the machine itself allows for the cells of issue 15 that jattri misses
(``benchmarks/RESULTS.md``, "Floors"): the least work each method's definition needs
on the MNIST-shaped LR at 5,000 train × 500 test, written as the shortest pure-JAX
program (no jattri), timed on this machine, against the bound the issue sets
(1/10 of dattri's compiled call, 1/5 of its end-to-end time).

    python benchmarks/floors.py                # about a minute
    python benchmarks/floors.py --dattri-cg 72 ...   # dattri's times of another run

Each figure is the fastest of ``--reps`` calls of a compiled program (float32, random
data of the workload's shapes: the cost of these programs does not depend on values).
The dattri times default to those measured by ``benchmarks/vs_dattri.py`` on this
machine (RESULTS.md); pass others with the flags.

- ``ekfac``: EK-FAC scores need g_iᵀ u_t for every pair, u_t the preconditioned test
  gradient: one (5,000 × 7,850) · (7,850 × 500) product, 3.9·10¹⁰ multiply-adds, whatever
  the basis (the eigenvalue-corrected inverse is not a Kronecker product, so no
  factorisation shortens it).
- ``cg``: 20 CG iterations (and the initial residual) on 500 right-hand sides, each one
  Hessian-vector product of the softmax regression over 5,000 examples: X̃V, the 10 × 10
  softmax Hessian per example, X̃ᵀZ. Timed: the two matrix products alone (3.9·10¹⁰
  multiply-adds each), 21 times, a lower bound on any implementation.
- ``trak``: TRAK with the Kronecker projection (k = 510): features of 5,500 examples,
  the 510 × 510 kernel, its solve against the 500 test features, the 5,000 × 500 scores.
- ``import``: ``python -c "import jax"``, the least a JAX process spends before any
  work, against 1/5 of dattri's end-to-end time for the fastest methods.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

N, M, D_IN, C = 5000, 500, 785, 10


def _best(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def ekfac(reps):
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal((N, D_IN * C), np.float32))
    u = jnp.asarray(rng.standard_normal((M, D_IN * C), np.float32))
    return _best(jax.jit(lambda g, u: g @ u.T), g, u, reps=reps)


def cg(reps, iters=21):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.random((N, D_IN), np.float32))
    v = jnp.asarray(rng.standard_normal((D_IN, C * M), np.float32))
    z = jnp.asarray(rng.standard_normal((N, C * M), np.float32))
    # only the two products over the training set that every H V needs, X̃V and X̃ᵀZ
    # (the softmax Hessian between them left out): a lower bound
    return iters * (_best(jax.jit(lambda x, v: x @ v), x, v, reps=reps)
                    + _best(jax.jit(lambda x, z: x.T @ z), x, z, reps=reps))


def trak(reps):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((N, D_IN - 1), np.float32))
    xt = jnp.asarray(rng.random((M, D_IN - 1), np.float32))
    w = jnp.asarray(rng.standard_normal((D_IN - 1, C), np.float32) * 0.01)
    proj = jnp.asarray(rng.standard_normal((D_IN, 51), np.float32))

    def features(x):  # (ã P_in) ⊗ ∂margin/∂logits, never the 7,850-float gradient
        p = jax.nn.softmax(x @ w, -1)
        s = p - jax.nn.one_hot(jnp.zeros(len(x), jnp.int32), C)
        a = jnp.concatenate([x, jnp.ones((len(x), 1), x.dtype)], 1) @ proj
        return (a[:, :, None] * s[:, None, :]).reshape(len(x), -1)

    @jax.jit
    def cache(x):
        phi = features(x)
        return phi, phi.T @ phi

    @jax.jit
    def attribute(phi, kernel, xt):
        solved = jnp.linalg.solve(kernel + 1e-3 * jnp.eye(kernel.shape[0]), features(xt).T)
        return phi @ solved

    def both(x, xt):
        return attribute(*cache(x), xt)

    return _best(both, x, xt, reps=reps)


def imports(reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import jax"], check=True)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dattri-ekfac", type=float, default=1.740,
                   help="dattri's compiled EK-FAC call, s")
    p.add_argument("--dattri-cg", type=float, default=40.06, help="dattri's CG call, s")
    p.add_argument("--dattri-trak", type=float, default=0.748,
                   help="dattri's compiled TRAK call, s")
    p.add_argument("--dattri-e2e", type=float, default=4.51,
                   help="dattri's fastest end-to-end run (Grad-Dot), s")
    args = p.parse_args(argv)
    rows = [
        ("EK-FAC compiled", "1/10", args.dattri_ekfac / 10, ekfac(args.reps)),
        ("CG compiled", "1/10", args.dattri_cg / 10, cg(max(1, args.reps // 3))),
        ("TRAK (Kronecker) compiled", "1/10", args.dattri_trak / 10, trak(args.reps)),
        ("end to end, warm", "1/5", args.dattri_e2e / 5, imports(max(1, args.reps // 2))),
    ]
    print("| cell (LR, 5,000 × 500) | bound | bound s | least work, pure JAX, s | floor / bound |")
    print("|---|---|---|---|---|")
    for name, frac, bound, floor in rows:
        print(f"| {name} | {frac} of dattri | {bound:.3f} | {floor:.3f} | {floor / bound:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
