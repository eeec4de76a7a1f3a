"""A loss that closes over a large array, against the same array bound by a ``Partial``.

The loss is a linear head on ``tanh(x @ W1)``, ``W1`` a frozen 784 × ``width`` float32
matrix (a frozen backbone, as in a LoRA or last-layer setting): ``closure`` closes over
``W1``, so JAX compiles it into every program as a constant; ``partial`` passes it as
``jax.tree_util.Partial(loss, W1)``, so it is a traced argument. 1,000 training and
100 test examples of 784 random features. Every run is a fresh process with its own
empty persistent compilation cache; the modes alternate. Each process reports

- build: the attributor's factory call (``jattri.grad_dot(fn)``, ``jattri.trak(fn)``),
- first: the first ``cache`` + ``attribute`` (compilation included),
- second: the same again (compiled),
- peak: the process's VmHWM,
- cache: bytes written to the persistent cache directory (XLA's and jattri's programs).

    python benchmarks/closure_constants.py --widths 2048 4096 16384 --reps 3
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time


def worker(mode: str, method: str, width: int) -> None:
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jattri

    warnings.simplefilter("ignore")  # the closure's ClosureWarning: measured, not shown
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(size=(784, width)).astype(np.float32) * 0.03)

    def head(p, z, y):
        return -jax.nn.log_softmax(z @ p["w"] + p["b"])[y]

    if mode == "closure":
        def fn(p, ex):
            return head(p, jnp.tanh(ex[0] @ w1), ex[1])
    else:
        def bound(w1, p, ex):
            return head(p, jnp.tanh(ex[0] @ w1), ex[1])
        fn = jax.tree_util.Partial(bound, w1)
    params = {"w": jnp.asarray(rng.normal(size=(width, 10)).astype(np.float32) * 0.01),
              "b": jnp.zeros(10)}
    x = rng.normal(size=(1100, 784)).astype(np.float32)
    y = rng.integers(0, 10, 1100).astype(np.int32)
    train, test = jax.device_put(((x[:1000], y[:1000]), (x[1000:], y[1000:])))
    t0 = time.perf_counter()
    attr = jattri.grad_dot(fn) if method == "grad_dot" else jattri.trak(fn, proj_dim=512)
    t1 = time.perf_counter()
    np.asarray(attr.attribute(attr.cache(params, train), test))
    t2 = time.perf_counter()
    np.asarray(attr.attribute(attr.cache(params, train), test))
    t3 = time.perf_counter()
    with open("/proc/self/status") as f:
        peak = int(f.read().split("VmHWM:")[1].split()[0]) / 2**20
    print(f"RESULT {t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {peak:.2f}")


def cache_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 16384])
    ap.add_argument("--methods", nargs="+", default=["grad_dot", "trak"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print("| method | width (W1 MB) | mode | build s | first s | second s | peak GiB | "
          "cache MB |\n|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for width in args.widths:
            rows = {"closure": [], "partial": []}
            for rep in range(args.reps):
                for mode in (("closure", "partial") if rep % 2 == 0 else
                             ("partial", "closure")):
                    with tempfile.TemporaryDirectory() as cache:
                        env = dict(os.environ, JATTRI_COMPILE_CACHE=cache)
                        out = subprocess.run(
                            [sys.executable, __file__, "--worker", mode, method,
                             str(width)], env=env, capture_output=True, text=True,
                            check=True).stdout
                        line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][0]
                        rows[mode].append([float(v) for v in line.split()[1:]]
                                          + [cache_bytes(cache) / 1e6])
            for mode, runs in rows.items():
                build, first, second, peak, cache = zip(*runs)
                spans = " | ".join(f"{min(c):.2f}-{max(c):.2f}" for c in (build, first, second))
                print(f"| {method} | {width} ({784 * width * 4 / 1e6:.1f}) | {mode} | "
                      f"{spans} | {max(peak):.2f} | {max(cache):.1f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
