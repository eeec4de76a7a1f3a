"""First-call cost: process start to scores, with JAX's persistent compilation cache
off, on but empty (cold), and on after one earlier process (warm); and the number of
XLA compilations each method runs (issue 15).

Workload (MNIST-shaped, as issue 15): logistic regression on 784 features, 10 classes
(7,850 parameters, random weights), 1,000 training and 100 test examples. Every run is
a fresh process (`python benchmarks/first_call.py --worker ...`), the three modes
alternated per repetition; "wall" is measured by the parent from just before the child
starts to the moment it has the scores (imports included).

    python benchmarks/first_call.py                # every method, 3 repetitions
    python benchmarks/first_call.py --methods grad_dot,trak --reps 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

METHODS = ("grad_dot", "grad_cos", "trak", "influence_explicit", "influence_cg",
           "influence_lissa", "influence_arnoldi", "influence_datainf", "influence_ekfac")
MODES = ("off", "cold", "warm")


def _attributor(name, loss):
    import jattri
    return {
        "grad_dot": lambda: jattri.grad_dot(loss),
        "grad_cos": lambda: jattri.grad_cos(loss),
        "trak": lambda: jattri.trak(loss, proj_dim=512),
        "influence_explicit": lambda: jattri.influence_explicit(loss, damping=1e-2),
        "influence_cg": lambda: jattri.influence_cg(loss, damping=1e-2, maxiter=50),
        # full-batch steps: on these random 784-d inputs a 100-example minibatch
        # Hessian's top eigenvalue exceeds the scale set from the full one, and LiSSA
        # (rightly) refuses the diverged series
        "influence_lissa": lambda: jattri.influence_lissa(loss, damping=1e-2, depth=100,
                                                          batch_size=1000),
        "influence_arnoldi": lambda: jattri.influence_arnoldi(loss, rank=50, damping=1e-2),
        "influence_datainf": lambda: jattri.influence_datainf(loss),
        "influence_ekfac": lambda: jattri.influence_ekfac(loss, damping=1e-2),
    }[name]()


def worker(name: str, start: float) -> dict:
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    compiles = {"n": 0, "s": 0.0}

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles["n"] += 1
            compiles["s"] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    import jattri
    t_import = time.time() - start

    model = nn.Dense(10)

    def loss(params, z):
        x, y = z
        return -jax.nn.log_softmax(model.apply({"params": params}, x))[y]

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (1100, 784))
    y = jax.random.randint(k[1], (1100,), 0, 10)
    params = model.init(k[2], x[0])["params"]
    train, test = (x[:1000], y[:1000]), (x[1000:], y[1000:])
    attr = _attributor(name, loss)
    t0 = time.time()
    state = attr.cache(params, train)
    scores = jax.block_until_ready(attr.attribute(state, test))
    t1 = time.time()
    assert scores.shape == (1000, 100) and bool(jnp.all(jnp.isfinite(scores)))
    return dict(wall_s=t1 - start, import_s=t_import, stages_s=t1 - t0,
                compiles=compiles["n"], compile_s=compiles["s"],
                cache_dir=jax.config.jax_compilation_cache_dir)


def run(name: str, mode: str, cache_dir: str) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JATTRI_COMPILE_CACHE"] = "0" if mode == "off" else cache_dir
    start = time.time()
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--start", repr(start)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{name} ({mode}) failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - start  # parent-side: process start to exit
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--start", type=float, help=argparse.SUPPRESS)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.start)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods or args.reps < 1:
        p.error(f"--methods from {','.join(METHODS)} and --reps >= 1 (unknown: {unknown})")
    rows = []
    for name in methods:
        runs = {m: [] for m in MODES}
        for _ in range(args.reps):
            tmp = tempfile.mkdtemp(prefix="jattri_xla_")
            try:
                for mode in MODES:  # off, then cold (empty dir), then warm (same dir)
                    runs[mode].append(run(name, mode, tmp))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        med = lambda mode, key: sorted(r[key] for r in runs[mode])[len(runs[mode]) // 2]
        row = dict(method=name, **{f"{m}_wall_s": med(m, "wall_s") for m in MODES},
                   compiles=med("off", "compiles"), compile_s=med("off", "compile_s"),
                   warm_compiles=med("warm", "compiles"), import_s=med("off", "import_s"),
                   runs=runs)
        rows.append(row)
        print(f"{name:<20} off {row['off_wall_s']:6.2f} s  cold {row['cold_wall_s']:6.2f} s  "
              f"warm {row['warm_wall_s']:6.2f} s  compiles {row['compiles']:3d} "
              f"({row['compile_s']:.2f} s; warm: {row['warm_compiles']})", flush=True)
    machine = (f"{platform.platform()}, {os.cpu_count()} CPUs, python "
               f"{platform.python_version()}")
    print("\n| method | cache off s | cold s | warm s | warm / off | XLA compiles (s) | "
          "compiles, warm |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['off_wall_s']:.2f} | {r['cold_wall_s']:.2f} | "
              f"{r['warm_wall_s']:.2f} | {r['warm_wall_s'] / r['off_wall_s']:.2f} | "
              f"{r['compiles']} ({r['compile_s']:.2f}) | {r['warm_compiles']} |")
    print(f"\nmachine: {machine}; median of {args.reps} alternated repetitions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": machine, "reps": args.reps}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
