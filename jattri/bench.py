"""``python -m jattri.bench``: run attribution methods on benchmark settings, report LDS.

Default: every registered method on ``digits_lr`` and ``digits_mlp``; also available:
``digits_cnn`` and ``text_nanogpt`` (a character-level nanoGPT on Python's own
``pydoc_data.topics``). Ground truth is computed on first use and cached
(``jattri.benchmark.cache_dir()``).

Examples::

    python -m jattri.bench
    python -m jattri.bench --setting digits_lr --methods influence_explicit,trak_1
    python -m jattri.bench --setting text_nanogpt
    python -m jattri.bench --json results.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import List, Optional

import jax
import numpy as np

import jattri
from jattri import benchmark
from jattri.benchmark._cli import fail as _fail
from jattri.benchmark._cli import split as _split
from jattri.benchmark._cli import usable_dir, writable_file
from jattri.benchmark.registry import METHODS

DEFAULT_SETTINGS = ("digits_lr", "digits_mlp")


def _log(msg: str) -> None:
    print(f"[jattri.bench] {msg}", file=sys.stderr, flush=True)


def _num_params(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def run_method(bench, name: str) -> dict:
    """Run one registered method on a loaded Benchmark; returns a result row (LDS
    ``None`` and a note when the method is skipped or refuses the setting with a
    ``ValueError``)."""
    spec = METHODS[name]
    row = {"setting": bench.name, "method": name, "lds": None, "cache_s": None,
           "attribute_s": None, "total_s": None, "note": ""}
    d = _num_params(bench.models_full[0])
    if spec.max_params is not None and d > spec.max_params:
        row["note"] = f"skipped: {d} params > max_params {spec.max_params}"
        return row
    why = dict(spec.skip).get(bench.name)
    if why is not None:
        row["note"] = f"skipped: {why}"
        return row
    if len(bench.models_full) < spec.num_checkpoints:
        row["note"] = f"skipped: needs {spec.num_checkpoints} checkpoints"
        return row
    task = jattri.Task(bench.loss_fn, bench.target_fn)
    members = jattri.checkpoints(bench.models_full[:spec.num_checkpoints])
    attr = spec.build(task, bench)
    t0 = time.perf_counter()
    try:
        state = jax.block_until_ready(attr.cache(members, bench.train))
        t1 = time.perf_counter()
        scores = np.asarray(jax.block_until_ready(attr.attribute(state, bench.test)))
    except ValueError as err:
        # A documented refusal (an indefinite Hessian for this damping, a diverging
        # LiSSA): one row says so and the other methods still run.
        row["note"] = f"failed: {str(err).splitlines()[0]}"
        return row
    t2 = time.perf_counter()
    per_test = jattri.metrics.lds(scores, *bench.lds)
    row.update(lds=float(np.nanmean(per_test)), cache_s=t1 - t0, attribute_s=t2 - t1,
               total_s=t2 - t0)
    if np.isnan(per_test).any():
        row["note"] = f"{int(np.isnan(per_test).sum())} test examples with NaN LDS"
    return row


def format_table(rows: List[dict]) -> str:
    head = f"{'setting':<12} {'method':<22} {'LDS':>7} {'cache s':>8} {'attr s':>8} {'total s':>8}  note"
    lines = [head, "-" * len(head)]
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
    for r in rows:
        lines.append(f"{r['setting']:<12} {r['method']:<22} {fmt(r['lds'], 3):>7} "
                     f"{fmt(r['cache_s'], 2):>8} {fmt(r['attribute_s'], 2):>8} "
                     f"{fmt(r['total_s'], 2):>8}  {r['note']}")
    return "\n".join(lines)


def machine() -> str:
    import os
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"jax {jax.__version__} on {jax.default_backend()}")


def _settings() -> tuple:
    """Every embedded setting, read at call time (tests add tiny ones to the dicts)."""
    return tuple(benchmark.digits.SETTINGS) + tuple(benchmark.text.SETTINGS)


def _validate(args) -> tuple:
    """Every argument checked before any work: ``(settings, methods)``."""
    import math
    settings = _split(args.setting, _settings(), "setting", "--setting") \
        if args.setting is not None else list(DEFAULT_SETTINGS)
    methods = _split(args.methods, tuple(METHODS), "method", "--methods")
    if args.mislabel is not None or args.ensemble:
        # Both experiments retrain digits classifiers (label flips, dropout/LoRA members).
        other = [s for s in settings if s not in benchmark.digits.SETTINGS]
        if other:
            raise _fail(f"--{'mislabel' if args.mislabel is not None else 'ensemble'} runs "
                        f"on the digits settings only, not {', '.join(other)}")
    if args.mislabel is not None:
        if not math.isfinite(args.mislabel) or not 0.0 < args.mislabel < 0.5:
            raise _fail(f"--mislabel must be a fraction in (0, 0.5) of training labels to "
                        f"flip, got {args.mislabel}")
        if args.ensemble:
            raise _fail("--mislabel and --ensemble are separate experiments; give one")
    if args.ensemble:
        if args.methods is not None:
            raise _fail("--methods does not apply to --ensemble; run python -m "
                        "jattri.benchmark.ensembles --methods ... instead")
        if args.setting is not None and len(settings) != 1:
            raise _fail("--ensemble runs on one --setting")
    if args.json:
        writable_file(args.json, "--json")
    if args.cache:
        usable_dir(args.cache, "--cache")
    return settings, methods


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jattri.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", help=f"comma-separated, of {','.join(_settings())} "
                                          f"(default: {','.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--methods", help=f"comma-separated (default: all: {','.join(METHODS)})")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--cache", metavar="DIR", help="ground-truth cache directory")
    parser.add_argument("--refresh", action="store_true", help="recompute ground truth")
    parser.add_argument("--ensemble", action="store_true",
                        help="run the ensemble experiment instead (jattri.benchmark.ensembles; "
                             "its own options: python -m jattri.benchmark.ensembles --help)")
    parser.add_argument("--mislabel", nargs="?", type=float, const=0.1, metavar="FRACTION",
                        help="mislabel detection instead of LDS: flip FRACTION (default 0.1, "
                             "in (0, 0.5)) of the training labels, retrain, report each "
                             "method's AUC of ranking the flipped examples by self-influence")
    args = parser.parse_args(argv)
    settings, methods = _validate(args)
    if args.mislabel is not None:
        from jattri.benchmark.mislabel import format_rows, run_mislabel
        rows = []
        for setting in settings:
            _log(f"{setting}: mislabel detection, {args.mislabel:.0%} flipped labels")
            rows += run_mislabel(setting, methods, fraction=args.mislabel)
        print(format_rows(rows))
        print(f"\nmachine: {machine()}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "machine": machine()}, f, indent=2)
        return 0
    if args.ensemble:
        from jattri.benchmark import ensembles
        return ensembles.main(sum((["--" + k, v] for k, v in (("setting", args.setting),
                                  ("json", args.json), ("cache", args.cache)) if v), []))

    rows = []
    t_start = time.perf_counter()
    for setting in settings:
        _log(f"loading {setting}")
        bench = benchmark.load(setting, cache=args.cache, refresh=args.refresh, progress=_log)
        for k, name in enumerate(methods):
            _log(f"{setting}: [{k + 1}/{len(methods)}] {name} ...")
            with jattri.progress(every=5.0):  # stages longer than 5 s report on stderr
                row = run_method(bench, name)
            _log(f"{setting}: {name}: LDS={row['lds']} {row['note']}")
            rows.append(row)
    table = format_table(rows)
    print(table)
    total = time.perf_counter() - t_start
    print(f"\nmachine: {machine()}\nwall time: {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": machine(), "wall_s": total}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
