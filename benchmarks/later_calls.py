"""Later ``attribute`` calls on test sets of other sizes: with the test set padded to
``jattri.engine.bucket_size`` rows (the default) against every count compiled on its own
(``jattri.engine.TEST_BUCKETS = False``), issue 15: "every later call share one program".

Workload: logistic regression on 784 features, 10 classes (7,850 parameters, random
weights), 1,000 training examples (``benchmarks/first_call.py``'s). In one process,
``cache`` once, ``attribute`` on 100 test examples, then on 99, 98, 97 and 103 (all in
the bucket of 104); the later calls are timed together (each blocked on its scores) and
their XLA compilations counted. Each (method, mode) is a fresh process with the persistent
compilation cache off; the two modes alternate per repetition.

    python benchmarks/later_calls.py                          # 5 methods, 3 repetitions
    python benchmarks/later_calls.py --methods trak --reps 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ("grad_dot", "tracin", "trak", "influence_arnoldi", "influence_ekfac")
LATER = (99, 98, 97, 103)


def _attributor(name, loss):
    import jattri
    return {
        "grad_dot": lambda: jattri.grad_dot(loss),
        "tracin": lambda: jattri.tracin(loss, proj_dim=512),
        "trak": lambda: jattri.trak(loss, proj_dim=512),
        "influence_arnoldi": lambda: jattri.influence_arnoldi(loss, rank=50, damping=1e-2),
        "influence_ekfac": lambda: jattri.influence_ekfac(loss, damping=1e-2),
    }[name]()


def worker(name: str, buckets: bool) -> dict:
    import jax
    import flax.linen as nn
    import numpy as np

    import jattri
    from jattri import engine

    engine.TEST_BUCKETS = buckets
    compiles = {"n": 0}

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    model = nn.Dense(10)

    def loss(params, z):
        x, y = z
        return -jax.nn.log_softmax(model.apply({"params": params}, x))[y]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=1200).astype(np.int32)
    params = model.init(jax.random.PRNGKey(2), x[0])["params"]
    train = (x[:1000], y[:1000])
    attr = _attributor(name, loss)
    t0 = time.perf_counter()
    state = attr.cache(params, train)
    first = jax.block_until_ready(attr.attribute(state, (x[1000:1100], y[1000:1100])))
    t1 = time.perf_counter()
    before = compiles["n"]
    for n in LATER:
        scores = jax.block_until_ready(attr.attribute(state, (x[1000:1000 + n],
                                                              y[1000:1000 + n])))
        assert scores.shape == (1000, n)
        np.testing.assert_allclose(np.asarray(scores)[:, :97], np.asarray(first)[:, :97],
                                   rtol=1e-4, atol=1e-5 * float(np.abs(first).max()))
    t2 = time.perf_counter()
    return dict(first_s=t1 - t0, later_s=t2 - t1, later_compiles=compiles["n"] - before)


def run(name: str, buckets: bool) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JATTRI_COMPILE_CACHE"] = "0"
    out = subprocess.run([sys.executable, __file__, "--worker", name,
                          "--buckets", str(int(buckets))],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{name} (buckets={buckets}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--buckets", type=int, help=argparse.SUPPRESS)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, bool(args.buckets))))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods or args.reps < 1:
        p.error(f"--methods from {','.join(METHODS)} and --reps >= 1 (unknown: {unknown})")
    print("| method | first call s (buckets / exact) | 4 later calls s (buckets / exact) | "
          "their XLA compiles (buckets / exact) |")
    print("|---|---|---|---|")
    for name in methods:
        runs = {True: [], False: []}
        for rep in range(args.reps):
            for buckets in ((True, False) if rep % 2 == 0 else (False, True)):
                runs[buckets].append(run(name, buckets))
        med = lambda b, key: sorted(r[key] for r in runs[b])[len(runs[b]) // 2]
        span = lambda b, key: "-".join(f"{v:.2f}" for v in (min(r[key] for r in runs[b]),
                                                             max(r[key] for r in runs[b])))
        print(f"| {name} | {med(True, 'first_s'):.2f} / {med(False, 'first_s'):.2f} | "
              f"{span(True, 'later_s')} / {span(False, 'later_s')} | "
              f"{med(True, 'later_compiles')} / {med(False, 'later_compiles')} |", flush=True)
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; {args.reps} alternated repetitions (medians; "
          "later calls: min-max)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
