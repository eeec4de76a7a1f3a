"""TRAK's call with its default damping (``damping=None``: the stationary L2 carried
into the kernel, which needs Σ_i ∇loss_i from the same pass) against ``damping=0.0``
(no statistics), on dattri's MLP shape (784-128-64-10, 109,386 parameters; random
weights and inputs: the times do not depend on them; ``vs_dattri.py``'s plain-JAX
model), 5,000 train × 500 test, k = 512.
Each call is ``cache`` + ``attribute``; the first includes compilation.

    python benchmarks/trak_default_damping.py --reps 3

To compare two checkouts side by side, alternate this script between them in fresh
processes, e.g. with ``PYTHONPATH=/path/to/other/checkout``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="calls per damping (the first compiles)")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=500)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jattri
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from floors import MLP_SIZES
    from vs_dattri import _dense_logits  # vs_dattri's plain-JAX model of dattri's MLP

    dims = tuple(zip(MLP_SIZES[:-1], MLP_SIZES[1:]))
    keys = jax.random.split(jax.random.PRNGKey(0), len(dims))
    params = {f"fc{i + 1}": {"kernel": jax.random.normal(kk, (a, b)) / np.sqrt(a),
                             "bias": jnp.zeros(b)}
              for i, (kk, (a, b)) in enumerate(zip(keys, dims))}

    def loss(p, z):
        h, y = z
        return -jax.nn.log_softmax(_dense_logits(p, h))[y]

    rng = np.random.default_rng(0)
    n = args.n_train
    train = (jnp.asarray(rng.random((n, 784), np.float32)),
             jnp.asarray(rng.integers(0, 10, n).astype(np.int32)))
    test = (train[0][:args.n_test] + 0.1, train[1][:args.n_test])
    print(f"jattri from {os.path.dirname(jattri.__file__)}")
    for damping in (None, 0.0):
        attr = jattri.trak(loss, proj_dim=512, damping=damping)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            scores = np.asarray(attr.attribute(attr.cache(params, train), test))
            times.append(time.perf_counter() - t)
        print(f"damping={damping}: calls " + ", ".join(f"{x:.3f}" for x in times)
              + f" s; Σ|scores| {float(np.abs(scores).sum()):.6g}", flush=True)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; 1-min load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
