"""Peak resident memory of full-parameter explicit influence on ``digits_mlp`` (issue 12).

The 17,226-parameter MLP's dense curvature is 17,226² float32 = 1.19 GB. Each
configuration runs in a fresh subprocess, which loads the setting (ground truth from
the cache), runs ``influence_explicit(...).cache`` on the 1,000 training examples and
``attribute`` on the 200 test examples, and reports its peak resident set size
(``VmHWM`` of ``/proc/self/status``: the whole process, Python and XLA included).

    python benchmarks/explicit_memory.py                      # GGN and Hessian
    python benchmarks/explicit_memory.py --curvature ggn      # one of them

Prints one JSON line per configuration and a summary table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _peak_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(curvature: str, damping: float) -> dict:
    import jax
    import numpy as np
    import optax

    import jattri
    import jattri.benchmark
    from jax.flatten_util import ravel_pytree

    bench = jattri.benchmark.load("digits_mlp", progress=None)
    params = bench.models_full[0]

    def output_fn(p, z):
        return bench.apply_fn(p, z[0][None])[0]

    def output_loss_fn(logits, z):
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1])

    def loss_fn(p, z):
        return bench.loss_fn(p, z)

    task = jattri.Task(loss_fn, output_fn=output_fn, output_loss_fn=output_loss_fn)
    attr = jattri.influence_explicit(task, damping=damping, curvature=curvature)
    row = {"curvature": curvature, "damping": damping,
           "d": int(ravel_pytree(params)[0].size), "n_train": int(len(bench.train[1])),
           "n_test": int(len(bench.test[1])), "baseline_mib": round(_peak_mib(), 1)}
    start = time.perf_counter()
    try:
        state = jax.block_until_ready(attr.cache(params, bench.train))
        row["cache_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        scores = np.asarray(attr.attribute(state, bench.test))
        row["attribute_s"] = round(time.perf_counter() - start, 1)
        row["finite"] = bool(np.isfinite(scores).all())
    except ValueError as err:  # an indefinite Hessian at this damping
        row["error"] = str(err).splitlines()[0][:160]
        row["failed_after_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_mib"] = round(_peak_mib(), 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curvature", choices=("ggn", "hessian", "both"), default="both")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.curvature, args.damping)), flush=True)
        return 0
    rows = []
    for curvature in (("ggn", "hessian") if args.curvature == "both" else (args.curvature,)):
        out = subprocess.run([sys.executable, __file__, "--child", "--curvature", curvature,
                              "--damping", str(args.damping)], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'curvature':>9} {'d':>6} {'cache s':>8} {'attribute s':>11} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['curvature']:>9} {r['d']:>6} {r.get('cache_s', '-')!s:>8} "
              f"{r.get('attribute_s', '-')!s:>11} {r['peak_rss_mib']:>13}"
              + (f"  ({r['error']})" if "error" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
