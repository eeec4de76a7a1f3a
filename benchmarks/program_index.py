"""Warm processes with and without the program index (``JATTRI_PROGRAM_INDEX``, issue 15):
programs that call the user's loss found in a later process from the loss's own jaxpr
(``jattri._program_cache.open_key``) against traced there as before.

Each process is ``benchmarks/vs_dattri.py``'s own jattri worker on its MNIST-shaped
workload (dattri's LR or MLP, 5,000 × 500 by default; preparing it needs the
``.[compare]`` extra: torch trains the checkpoints). Per method: one process fills a
fresh cache, then ``--reps`` pairs of warm processes on it, the index off and on
alternated (which goes first alternates too). Reported: medians and ranges of the
first call and of process start to scores, and the scores' equality across all of
them (SHA-256 of the score matrix).

    python benchmarks/program_index.py                        # 7 LR methods, 6 pairs
    python benchmarks/program_index.py --methods if_ekfac --reps 3 --model mlp
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_dattri  # noqa: E402

DEFAULT = "grad_dot,grad_cos,tracin,trak,if_arnoldi,if_ekfac,trak_kron"


def _digest(path: str) -> str:
    import numpy as np
    return hashlib.sha256(np.ascontiguousarray(np.load(path)).tobytes()).hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--model", default="lr", choices=vs_dattri.MODELS)
    p.add_argument("--reps", type=int, default=6, help="alternated pairs per method")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=500)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(vs_dattri.METHODS))
    if bad or args.reps < 1:
        p.error(f"--methods from {','.join(vs_dattri.METHODS)} (unknown: {bad}); "
                "--reps >= 1")
    vs_dattri._byte_compile_jattri()
    root = tempfile.mkdtemp(prefix="program_index_")
    saved = os.environ.get("JATTRI_PROGRAM_INDEX")
    try:
        work = os.path.join(root, args.model)
        vs_dattri._prepare(work, args.model, args.n_train, args.n_test)
        print(f"{args.model}, {args.n_train} x {args.n_test}; warm processes, "
              f"{args.reps} alternated pairs each (medians [ranges], s)")
        print("| method | index | first call | process start to scores | scores |")
        print("|---|---|---|---|---|")
        for method in methods:
            cache = tempfile.mkdtemp(prefix="cache_", dir=root)
            os.environ["JATTRI_PROGRAM_INDEX"] = "1"
            fill = os.path.join(root, "fill.npy")
            out = vs_dattri._spawn("jattri", method, work, cache, fill, 900)
            if "error" in out:
                print(f"| {method} | | {out['error']} | | |")
                continue
            reference = _digest(fill)
            runs = {"0": [], "1": []}
            same = True
            for rep in range(args.reps):
                for side in ("0", "1") if rep % 2 == 0 else ("1", "0"):
                    os.environ["JATTRI_PROGRAM_INDEX"] = side
                    save = os.path.join(root, f"{method}_{side}.npy")
                    out = vs_dattri._spawn("jattri", method, work, cache, save, 900,
                                           calls=1)
                    if "error" in out:
                        raise SystemExit(f"{method}, index {side}: {out['error']}")
                    runs[side].append((out["first_s"], out["e2e_s"]))
                    same &= _digest(save) == reference
            shutil.rmtree(cache, ignore_errors=True)
            for side, label in (("0", "off"), ("1", "on")):
                first = sorted(r[0] for r in runs[side])
                e2e = sorted(r[1] for r in runs[side])
                print(f"| {method} | {label} | {statistics.median(first):.3f} "
                      f"[{first[0]:.2f}-{first[-1]:.2f}] | {statistics.median(e2e):.3f} "
                      f"[{e2e[0]:.2f}-{e2e[-1]:.2f}] | "
                      f"{'equal' if same else 'DIFFER'} |", flush=True)
    finally:
        if saved is None:
            os.environ.pop("JATTRI_PROGRAM_INDEX", None)
        else:
            os.environ["JATTRI_PROGRAM_INDEX"] = saved
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
