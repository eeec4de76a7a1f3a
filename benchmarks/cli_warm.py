"""The benchmark CLI (``python -m jattri.bench``, progress on) cold and warm: a fresh
persistent compilation cache, one run that fills it, then ``--warm`` runs that read it,
each in a fresh process. Prints each run's wall time (process start to exit) and the
XLA compilations of each method's call (JAX counts a program read back from its own
cache as one, taking about a millisecond: the column of those over 10 ms counts real
compilations).

``--pythonpath DIR`` runs another checkout's jattri (an A/B against an older commit:
``git worktree add /tmp/old <commit>``). Ground truth comes from the usual cache
(``JATTRI_CACHE_DIR``); a first run of a setting computes it, so run the CLI once
before timing.

    python benchmarks/cli_warm.py --setting digits_lr --warm 2
    python benchmarks/cli_warm.py --setting digits_lr --pythonpath /tmp/old
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, sys, time
import jax
events = []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **kw: events.append(d) if e == "/jax/core/compile/backend_compile_duration"
    else None)
import jattri.bench as bench
per_method = {}
run_method = bench.run_method
def counted(b, name):
    start, t = len(events), time.perf_counter()
    row = run_method(b, name)
    new = events[start:]
    per_method[f"{b.name}:{name}"] = dict(
        compiles=len(new), real=sum(1 for d in new if d > 0.01), compile_s=sum(new),
        wall_s=time.perf_counter() - t, lds=row["lds"])
    return row
bench.run_method = counted
code = bench.main(sys.argv[1:])
per_method["jattri"] = bench.__file__
print("RESULT" + json.dumps(per_method))
sys.exit(code)
"""


def _run(args, cache: str) -> dict:
    env = dict(os.environ, JATTRI_COMPILE_CACHE=cache)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _CHILD, "--setting", args.setting]
    if args.methods:
        cmd += ["--methods", args.methods]
    start = time.time()
    # (run from the cache directory: `python -c` puts the working directory first on
    # sys.path, where a checkout's own jattri would shadow --pythonpath)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cache)
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed:\n{done.stderr[-3000:]}")
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
    methods = json.loads(line[len("RESULT"):])
    return dict(wall_s=wall, jattri=os.path.dirname(methods.pop("jattri")), methods=methods)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="digits_lr,digits_mlp")
    p.add_argument("--methods", default=None)
    p.add_argument("--warm", type=int, default=2, help="warm runs after the cold one")
    p.add_argument("--pythonpath", default=None, help="another checkout's jattri")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="cli_warm_") as cache:
        for k in range(1 + args.warm):
            r = _run(args, cache)
            r["kind"] = "cold" if k == 0 else "warm"
            runs.append(r)
            m = r["methods"].values()
            if k == 0:
                print(f"jattri from {r['jattri']}")
            print(f"{r['kind']:5s} wall {r['wall_s']:6.1f} s, compilations "
                  f"{sum(x['compiles'] for x in m)} ({sum(x['real'] for x in m)} over 10 ms, "
                  f"{sum(x['compile_s'] for x in m):.2f} s)", flush=True)
    last = runs[-1]["methods"]
    print("\nlast run, methods with a compilation over 10 ms:")
    for name, x in last.items():
        if x["real"]:
            print(f"  {name:40s} {x['real']} ({x['compile_s']:.2f} s of {x['wall_s']:.2f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
