"""Projected per-example gradients leaf by leaf against the raveled concatenation
(issue 15): ``jattri.func.project_leaves(projector, leaves)`` against
``projector(concatenate(leaves))``, on leaves shaped as a model's parameters.

Both are compiled here (XLA compilation timed, the persistent caches off) and run
``--reps`` times after one warm-up; the best run is reported, with the largest
relative difference of the two results (the order of float sums only).

Models (parameter shapes only; the leaves are normal noise, ``--n`` rows each):

* ``lr``: dattri's MNIST LR, 784 × 10 + 10 (d = 7,850);
* ``mlp``: dattri's MNIST MLP, 784-128-64-10 (d = 109,386);
* ``nanogpt``: a 6-layer, 384-wide GPT of 65 characters and 256 positions, 77 leaves
  (d = 10,795,776).

    python benchmarks/projection_leaves.py --model mlp --kind gaussian --n 1667 --k 512
    python benchmarks/projection_leaves.py --model nanogpt --kind sjlt --n 24 --k 2048
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("JATTRI_COMPILE_CACHE", "0")


def shapes(model: str) -> list:
    if model == "lr":
        return [(784, 10), (10,)]
    if model == "mlp":
        return [(784, 128), (128,), (128, 64), (64,), (64, 10), (10,)]
    out = [(65, 384), (256, 384)]
    for _ in range(6):
        out += [(384,), (384,), (384, 1152), (1152,), (384, 384), (384,), (384,), (384,),
                (384, 1536), (1536,), (1536, 384), (384,)]
    return out + [(384,), (384,), (384, 65)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("lr", "mlp", "nanogpt"), default="mlp")
    p.add_argument("--kind", choices=("gaussian", "rademacher", "sjlt"), default="gaussian")
    p.add_argument("--n", type=int, default=1667, help="rows (examples) per call")
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jattri.func as jattri_func
    from jattri.func import projection as P

    sizes = [int(np.prod(s)) for s in shapes(args.model)]
    d, n = sum(sizes), args.n
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.standard_normal((n,) + s, dtype=np.float32))
              for s in shapes(args.model)]
    proj = P.random_projection(args.kind, jax.random.PRNGKey(0), d, args.k)
    ways = {
        "leaves": jax.jit(lambda ls: jattri_func.project_leaves(proj, ls)),
        "concatenated": jax.jit(
            lambda ls: proj(jnp.concatenate([x.reshape(n, -1) for x in ls], axis=1))),
    }
    print(f"{args.model}: d = {d:,} in {len(sizes)} leaves, n = {n}, k = {args.k}, "
          f"{args.kind}; {platform.platform()}, {os.cpu_count()} CPUs")
    results = {}
    for name, f in ways.items():
        t = time.perf_counter()
        compiled = f.lower(leaves).compile()
        compile_s = time.perf_counter() - t
        results[name] = compiled(leaves).block_until_ready()
        runs = []
        for _ in range(args.reps):
            t = time.perf_counter()
            compiled(leaves).block_until_ready()
            runs.append(time.perf_counter() - t)
        print(f"  {name:13s} compile {compile_s:6.2f} s   run {min(runs):7.3f} s "
              f"(runs {', '.join(f'{r:.3f}' for r in runs)})", flush=True)
    a, b = (np.asarray(r) for r in results.values())
    print(f"  largest relative difference {np.max(np.abs(a - b)) / np.max(np.abs(b)):.2e}")


if __name__ == "__main__":
    main()
