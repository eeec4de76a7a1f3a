"""Dense random projections, side by side in one process: jattri's counter-based
Gaussian and Rademacher projectors, the threefry generator they replaced, and dattri's
``BasicProjector`` (torch, CPU) where dattri is installed (issue 15, "fast projections").

Each projector maps x: (n, d) to x P: (n, k), regenerating P block by block in every
call (none of them holds the d × k matrix). Per kind the libraries are called in
turn, ``--reps`` times each after one warm-up call, and the median call is reported,
with its ratio to dattri's and the JL error of that call:

* norm error |‖xP‖² / ‖x‖² − 1| (median over the n rows; x has i.i.d. normal rows),
  next to the JL scale √(2/k).

Generators:

* ``jattri`` — ``jattri.func.gaussian_projection`` / ``rademacher_projection``: every
  entry hashed from its (row, column) and two seed words of the key
  (``jattri.func.projection._entry_words``);
* ``threefry`` — the generator jattri used before: one ``jax.random.normal`` (or
  ``rademacher``) draw of k entries per row r from ``fold_in(key, r)``, rows in chunks
  of 4,096 (jattri's default chunk), written out here;
* ``dattri`` — ``dattri.func.projection.BasicProjector`` (blocks of 100 columns,
  ``torch.Generator`` per block; ``proj_type`` "normal" / "rademacher").

    python benchmarks/projection_speed.py                      # d = 262,144, k = 2048, n = 8
    python benchmarks/projection_speed.py --d 20000 --k 512 --n 8 --reps 2   # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def _threefry(kind, key, d, k, chunk):
    """The pre-change generator: row r of P from ``fold_in(key, r)``."""
    import jax
    import jax.numpy as jnp

    def rows_of(rows):
        def one(r):
            sub = jax.random.fold_in(key, r)
            return (jax.random.normal(sub, (k,)) if kind == "gaussian" else
                    jax.random.rademacher(sub, (k,), dtype=jnp.float32))
        return jax.vmap(one)(rows) / jnp.sqrt(k)

    n_chunks = -(-d // chunk)

    @jax.jit
    def project(x):
        xb = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - d))).reshape(x.shape[0], n_chunks,
                                                                      chunk)

        def step(acc, c):
            xc = jax.lax.dynamic_index_in_dim(xb, c, axis=1, keepdims=False)
            return acc + xc @ rows_of(c * chunk + jnp.arange(chunk)), None

        return jax.lax.scan(step, jnp.zeros((x.shape[0], k), x.dtype),
                            jnp.arange(n_chunks))[0]

    return project


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=262_144)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kinds", default="gaussian,rademacher")
    args = p.parse_args(argv)
    kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    if (args.d < 1 or args.k < 1 or args.n < 1 or args.reps < 1
            or set(kinds) - {"gaussian", "rademacher"}):
        p.error("--d, --k, --n, --reps >= 1; --kinds from gaussian,rademacher")

    import jax
    import numpy as np

    from jattri.func.projection import DEFAULT_CHUNK, random_projection

    try:
        import torch
        from dattri.func.projection import BasicProjector, ProjectionType
    except ImportError:
        torch = None
    x = np.array(jax.random.normal(jax.random.PRNGKey(1), (args.n, args.d)), np.float32)
    xj = jax.device_put(x)
    sq = (x.astype(np.float64) ** 2).sum(1)
    key = jax.random.PRNGKey(0)

    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
          + ("" if torch is None else f", torch {torch.__version__}"))
    print(f"# d = {args.d:,}, k = {args.k}, n = {args.n}, {args.reps} calls each "
          f"(after one warm-up); JL scale sqrt(2/k) = {np.sqrt(2 / args.k):.4f}\n")
    print("| kind | generator | s per call (median) | min-max | / dattri | "
          "norm error median |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        calls = {
            "jattri": lambda f=random_projection(kind, key, args.d, args.k): np.asarray(f(xj)),
            "threefry": lambda f=_threefry(kind, key, args.d, args.k, DEFAULT_CHUNK):
                np.asarray(f(xj)),
        }
        if torch is not None:
            proj = BasicProjector(args.d, args.k, seed=0, device=torch.device("cpu"),
                                  proj_type=(ProjectionType.normal if kind == "gaussian"
                                             else ProjectionType.rademacher))
            xt = torch.from_numpy(x)
            calls["dattri"] = lambda: proj.project(xt, ensemble_id=0).numpy()
        times = {name: [] for name in calls}
        errors = {}
        for name, call in calls.items():  # warm-up (compilation) and the JL error
            out = call().astype(np.float64)
            errors[name] = float(np.median(np.abs((out ** 2).sum(1) / sq - 1)))
        for _ in range(args.reps):  # the generators in turn, each rep
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
        ref = statistics.median(times["dattri"]) if "dattri" in times else None
        for name, ts in times.items():
            med = statistics.median(ts)
            ratio = "–" if ref is None else f"{med / ref:.2f}"
            print(f"| {kind} | {name} | {med:.3f} | {min(ts):.3f}-{max(ts):.3f} | {ratio} | "
                  f"{errors[name]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
