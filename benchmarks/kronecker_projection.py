"""The Kronecker projection of TRAK and TracIn (``projection="kronecker"``) against the
dense Gaussian at the same k (issue 15): JL error, cost, and LDS.

1. JL error and cost on the MNIST-shaped models of ``benchmarks/vs_dattri.py``
   (``mnist_lr``: 7,850 params, one 784 → 10 layer; ``mnist_mlp``: 109,386 params,
   784 → 128 → 128 → 10), random weights, digits upsampled to 28 × 28: for n per-example
   loss gradients g_i, the projected features φ_i of ``jattri.tracin(..., proj_dim=k)``
   (its cache), and

   * norm error |‖φ_i‖² / ‖g_i‖² − 1| (median, max),
   * inner-product error |⟨φ_i, φ_j⟩ − ⟨g_i, g_j⟩| / (‖g_i‖ ‖g_j‖) over pairs i < j
     (median, max), the exact ⟨g_i, g_j⟩ from Grad-Dot,
   * the compiled ``cache`` time for ``--n-time`` examples (the second call).

2. LDS of TRAK-1 / TRAK-5 at k = 512, default damping, on the embedded ``digits_lr``
   and ``digits_mlp`` settings (ground truth from the cache), Gaussian against
   Kronecker.

    python benchmarks/kronecker_projection.py
    python benchmarks/kronecker_projection.py --skip-lds --n-time 5000
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattri


def _data(n):
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits
    digits = load_digits()
    idx = np.random.default_rng(0).integers(0, len(digits.images), n)
    x = np.stack([zoom(digits.images[i] / 16.0, 3.5, order=1) for i in idx])
    return (jnp.asarray(x.reshape(n, 784), jnp.float32),
            jnp.asarray(digits.target[idx], jnp.int32))


def jl_rows(model_name, k, n, n_time, kinds):
    module = jattri.models.build(f"mnist_{model_name}").module
    x, y = _data(max(n, n_time))
    params = module.init(jax.random.PRNGKey(0), x[:1])["params"]

    def loss_fn(p, z):
        return -jax.nn.log_softmax(module.apply({"params": p}, z[0]))[z[1]]

    small = (x[:n], y[:n])
    dot = jattri.grad_dot(loss_fn)
    exact = np.asarray(dot.attribute(dot.cache(params, small), small), np.float64)
    norms = np.sqrt(np.diag(exact))
    iu = np.triu_indices(n, 1)
    rows = []
    for kind in kinds:
        attr = jattri.tracin(loss_fn, proj_dim=k, projection=kind)
        phi = np.asarray(attr.cache(params, small).train_grads[:, 0], np.float64)
        gram = phi @ phi.T
        norm_err = np.abs(np.diag(gram) / norms ** 2 - 1)
        ip_err = (np.abs(gram - exact) / np.outer(norms, norms))[iu]
        big = (x[:n_time], y[:n_time])
        jax.block_until_ready(attr.cache(params, big).train_grads)  # compile
        t = time.perf_counter()
        jax.block_until_ready(attr.cache(params, big).train_grads)
        rows.append(dict(model=model_name, kind=kind, k=k, K=phi.shape[1],
                         norm_med=float(np.median(norm_err)), norm_max=float(norm_err.max()),
                         ip_med=float(np.median(ip_err)), ip_max=float(ip_err.max()),
                         seconds=time.perf_counter() - t))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def lds_rows(kinds, k=512):
    from jattri import benchmark
    rows = []
    for setting in ("digits_lr", "digits_mlp"):
        bench = benchmark.load(setting, progress=None)
        task = jattri.Task(bench.loss_fn, bench.target_fn)
        for m in (1, 5):
            members = jattri.checkpoints(bench.models_full[:m])
            for kind in kinds:
                attr = jattri.trak(task, proj_dim=k, projection=kind)
                t = time.perf_counter()
                state = attr.cache(members, bench.train)
                scores = np.asarray(attr.attribute(state, bench.test))
                lds = float(np.nanmean(jattri.metrics.lds(scores, *bench.lds)))
                rows.append(dict(setting=setting, method=f"trak_{m}", kind=kind, k=k,
                                 K=int(state.phi.shape[-1]), lds=lds,
                                 seconds=time.perf_counter() - t))
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--n", type=int, default=200, help="gradients for the JL errors")
    p.add_argument("--n-time", type=int, default=5000, help="examples timed")
    p.add_argument("--models", default="lr,mlp")
    p.add_argument("--skip-lds", action="store_true")
    args = p.parse_args(argv)
    kinds = ("gaussian", "kronecker")
    print("| model | projection | k (K) | norm err median / max | inner-product err "
          f"median / max | cache s ({args.n_time} examples, compiled) |\n|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for r in jl_rows(model, args.k, args.n, args.n_time, kinds):
            print(f"| {r['model']} | {r['kind']} | {r['k']} ({r['K']}) | {r['norm_med']:.3f} / "
                  f"{r['norm_max']:.3f} | {r['ip_med']:.4f} / {r['ip_max']:.4f} | "
                  f"{r['seconds']:.3f} |", flush=True)
    if not args.skip_lds:
        print("\n| setting | method | projection | k (K) | LDS | cache + attribute s |\n"
              "|---|---|---|---|---|---|")
        for r in lds_rows(kinds, args.k):
            print(f"| {r['setting']} | {r['method']} | {r['kind']} | {r['k']} ({r['K']}) | "
                  f"{r['lds']:.3f} | {r['seconds']:.1f} |", flush=True)
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
