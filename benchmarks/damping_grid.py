"""Each method's main hyperparameter over a grid, against its default (issue 12).

For every method of ``python -m jattri.bench`` with a damping or regularisation, on the
embedded ``digits_lr`` and ``digits_mlp`` settings (ground truth from the cache): the LDS
with the registry's build as it is (the factory's default damping: what
``python -m jattri.bench`` runs) and the LDS at every value of a grid of at least 7
values over at least 6 decades, applied at ``attribute(..., damping=...)`` on the SAME
cached state (RPS: its ``l2``, a cache-time argument, by rebuilding). The judged rule:
default ≥ best − 0.03.

Damping is absolute for the influence family (λ added to the curvature's eigenvalues)
and relative for TRAK, LoGra and DataInf (λ = damping × the mean eigenvalue of the
matrix damped); the table says which.

    python benchmarks/damping_grid.py                       # both settings, every method
    python benchmarks/damping_grid.py --settings digits_lr --methods trak_5,logra
    python benchmarks/damping_grid.py --json /tmp/grid.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

import jattri
from jattri import benchmark
from jattri.benchmark.registry import METHODS

DECADES = tuple(10.0 ** k for k in range(-6, 2))        # absolute λ: 1e-6 … 10
HALF = tuple(sorted(DECADES + tuple(3 * v for v in DECADES[:-1])))
RELATIVE = tuple(10.0 ** k for k in range(-4, 4))        # relative: 1e-4 … 1e3
RELATIVE_HALF = tuple(sorted(RELATIVE + tuple(3 * v for v in RELATIVE[:-1])))

# name -> (kind, grid); kind "abs" / "rel": attribute(..., damping=v); "l2": rebuild rps.
# The iterative solvers (a full solve per value) get the decades, the rest half-decades.
GRIDS = {
    "influence_explicit": ("abs", HALF),
    "influence_cg": ("abs", DECADES),
    "influence_lissa": ("abs", DECADES),
    "influence_arnoldi": ("abs", HALF),
    "influence_ekfac": ("abs", HALF),
    "influence_ekfac_ggn": ("abs", HALF),
    "influence_datainf": ("rel", RELATIVE_HALF),
    "influence_explicit_relatif": ("abs", HALF),
    "trak_1": ("rel", RELATIVE_HALF),
    "trak_5": ("rel", RELATIVE_HALF),
    "rps": ("l2", tuple(10.0 ** k for k in range(-6, 2))),
    "logra": ("rel", RELATIVE_HALF),
    "logra_5": ("rel", RELATIVE_HALF),
    "logra_exact": ("rel", RELATIVE_HALF),
}


def _log(msg):
    print(f"[damping_grid] {msg}", file=sys.stderr, flush=True)


def _lds(bench, scores):
    """Mean LDS over the test examples with a defined one; ``None`` when none has (the
    scores are NaN or constant: a failed solve)."""
    per_test = jattri.metrics.lds(np.asarray(scores), *bench.lds)
    return float(np.nanmean(per_test)) if np.isfinite(per_test).any() else None


def _scores(fn):
    """``fn()``'s scores, or the first line of the ``ValueError`` a refusal raised."""
    try:
        return np.asarray(jax.block_until_ready(fn())), ""
    except ValueError as err:
        return None, str(err).splitlines()[0][:80]


def run(bench, name: str) -> dict:
    spec = METHODS[name]
    kind, grid = GRIDS[name]
    row = {"setting": bench.name, "method": name, "kind": kind, "grid": {}, "notes": {}}
    why = dict(spec.skip).get(bench.name)
    if why is not None:
        row["skipped"] = why
        return row
    task = jattri.Task(bench.loss_fn, bench.target_fn)
    members = jattri.checkpoints(bench.models_full[:spec.num_checkpoints])
    t0 = time.perf_counter()
    if kind == "l2":
        from jattri.benchmark.registry import _rps
        for v in (None,) + grid:
            attr = _rps(task, bench) if v is None else _rps(task, bench, l2=v)
            s, note = _scores(lambda: attr.attribute(attr.cache(members, bench.train),
                                                     bench.test))
            lds = None if s is None else _lds(bench, s)
            if v is None:
                row["default"] = lds
            else:
                row["grid"][v] = lds
            if note:
                row["notes"]["default" if v is None else v] = note
    else:
        attr = spec.build(task, bench)
        state = None
        try:
            state = jax.block_until_ready(attr.cache(members, bench.train))
        except ValueError as err:
            row["default"] = None
            row["notes"]["default"] = "cache: " + str(err).splitlines()[0][:80]
        if state is not None:
            s, note = _scores(lambda: attr.attribute(state, bench.test))
            row["default"] = None if s is None else _lds(bench, s)
            if note:
                row["notes"]["default"] = note
            for v in grid:
                s, note = _scores(lambda: attr.attribute(state, bench.test, damping=v))
                row["grid"][v] = None if s is None else _lds(bench, s)
                if note:
                    row["notes"][v] = note
                _log(f"{bench.name} {name} damping={v:g}: {row['grid'][v]} {note}")
    done = [v for v in row["grid"].values() if v is not None]
    row["best"] = max(done) if done else None
    row["best_at"] = max((v for v in row["grid"] if row["grid"][v] is not None),
                         key=lambda v: row["grid"][v], default=None)
    row["passes"] = (row.get("default") is not None and row["best"] is not None
                     and row["default"] >= row["best"] - 0.03)
    row["seconds"] = time.perf_counter() - t0
    return row


def format_rows(rows) -> str:
    lines = ["| setting | method | kind | default LDS | best grid LDS (at) | passes | grid: value → LDS |",
             "|---|---|---|---|---|---|---|"]
    f = lambda x: "fail" if x is None else f"{x:.3f}"
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['setting']} | {r['method']} | | skipped: {r['skipped']} | | | |")
            continue
        grid = ", ".join(f"{v:g} → {f(x)}" for v, x in r["grid"].items())
        lines.append(f"| {r['setting']} | {r['method']} | {r['kind']} | {f(r['default'])} | "
                     f"{f(r['best'])} ({r['best_at']:g}) | {'yes' if r['passes'] else '**no**'} "
                     f"| {grid} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="digits_lr,digits_mlp")
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in GRIDS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(GRIDS)}")
    rows = []
    t0 = time.perf_counter()
    for setting in args.settings.split(","):
        bench = benchmark.load(setting, progress=None)
        for name in methods:
            _log(f"{setting}: {name}")
            rows.append(run(bench, name))
            r = rows[-1]
            _log(f"{setting}: {name}: default {r.get('default')} best {r.get('best')} "
                 f"at {r.get('best_at')} ({r.get('seconds', 0):.0f} s)")
            if args.json:  # written as it goes: a long run leaves what it finished
                with open(args.json, "w") as fh:
                    json.dump({"rows": rows}, fh, indent=1, default=str)
    print(format_rows(rows))
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "wall_s": time.perf_counter() - t0}, fh, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
