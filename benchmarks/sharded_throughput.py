"""Throughput of TRAK featurisation sharded over 1, 2, 4, 8 devices (issue 11).

nanoGPT at dattri's Shakespeare configuration (10,745,088 parameters, blocks of 256
characters of ``pydoc_data.topics``; random weights), TRAK with k = 2048 and the sparse
JL projection: ``attr.cache(params, jattri.shard(train, mesh))`` with the training
blocks split over a mesh of D devices, ``chunk`` blocks per device per step. Each D runs
in its own process: on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=D``
(simulated devices sharing this machine's cores: the point is that it runs and what it
costs, not speed-up), on GPU over the first D of the visible GPUs (``--gpu``).

Reported per D: the first call (compilation included) and the second call's seconds,
examples per second of the second call, its ratio to one device, peak resident memory
and (GPU) peak device memory of device 0; and, as a check, the relative difference of
the features to the one-device run's (stored per run, compared by the driver).

Usage::

    python benchmarks/sharded_throughput.py                   # CPU: D = 1, 2, 4, 8
    python benchmarks/sharded_throughput.py --quick           # a tiny model (a minute)
    python benchmarks/sharded_throughput.py --gpu             # GPUs: D = 1, 2, 4, ... all
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import NANOGPT, QUICK_NANOGPT, lm_loss, machine, token_blocks  # noqa: E402


def worker(spec: dict) -> dict:
    if not spec["gpu"]:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import jattri
    from jattri.models import build
    from scale import _device_peak, _rss_bytes

    devices = jax.devices()[:spec["devices"]]
    assert len(devices) == spec["devices"], jax.devices()
    model = build("nanogpt", **spec["config"])
    params = model.init(jax.random.PRNGKey(0))["params"]
    d = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    blocks = token_blocks(spec["n_train"], spec["config"]["block_size"],
                          spec["config"]["vocab_size"])
    train = jattri.shard(blocks, Mesh(np.array(devices), ("data",)))
    attr = jattri.trak(partial(lm_loss, model.module), proj_dim=spec["proj_dim"],
                       projection="sjlt", chunk_size=spec["chunk"])
    members = jattri.task.as_members(params)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        state = attr.cache(members, train)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    phi = np.asarray(jax.device_get(state.phi), np.float32)
    np.save(spec["phi_file"], phi)
    return dict(devices=len(devices), d=d, first_s=times[0], second_s=times[1],
                per_second=spec["n_train"] / times[1], peak_rss=_rss_bytes(),
                device_peak=_device_peak(), phi_spread=len(state.phi.sharding.device_set),
                backend=jax.default_backend(), load=os.getloadavg()[0])


def run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(devices=spec["devices"], error=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(devices=spec["devices"], error=" | ".join(tail)[-400:])


def table(rows, n, chunk, k) -> str:
    import numpy as np
    base = next((r for r in rows if r.get("devices") == 1 and "error" not in r), None)
    ref = None if base is None else np.load(base["phi_file"])
    lines = [f"TRAK featurisation (`cache`), nanoGPT d = {rows[0].get('d', '?'):,}, "
             f"{n} blocks, k = {k} SJLT, {chunk} blocks per device per step",
             "", "| devices | first call s | second call s | examples/s | vs 1 device | "
             "peak RSS GiB | device 0 peak GiB | features on | max rel. diff vs 1 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | error: {r['error']} |||||||")
            continue
        rel = "-"
        if ref is not None:
            phi = np.load(r["phi_file"])
            rel = f"{np.abs(phi - ref).max() / np.abs(ref).max():.1e}"
        speed = "-" if base is None else f"{r['per_second'] / base['per_second']:.2f}"
        dev = "-" if r.get("device_peak") is None else f"{r['device_peak'] / 2**30:.2f}"
        lines.append(f"| {r['devices']} | {r['first_s']:.1f} | {r['second_s']:.1f} | "
                     f"{r['per_second']:.2f} | {speed} | {r['peak_rss'] / 2**30:.2f} | {dev} "
                     f"| {r['phi_spread']} devices | {rel} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true", help="shard over the visible GPUs")
    p.add_argument("--devices", help="comma-separated device counts (CPU: 1,2,4,8; GPU: "
                   "powers of two up to all)")
    p.add_argument("--quick", action="store_true", help="a tiny nanoGPT (smoke run)")
    p.add_argument("--n-train", type=int, default=64, help="training blocks (64)")
    p.add_argument("--chunk", type=int, default=4, help="blocks per device per step (4)")
    p.add_argument("--proj-dim", type=int, default=2048, help="TRAK k (2048)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.devices:
        counts = [int(c) for c in args.devices.split(",")]
    elif args.gpu:
        import jax
        total = jax.device_count()
        counts = [c for c in (1, 2, 4, 8, 16, 32, 64) if c < total] + [total]
    else:
        counts = [1, 2, 4, 8]
    bad = [c for c in counts if c < 1 or args.n_train % c]
    if bad:
        p.error(f"--n-train {args.n_train} must divide over every device count; not {bad}")
    config = QUICK_NANOGPT if args.quick else NANOGPT
    out = tempfile.mkdtemp(prefix="jattri_sharded_")
    rows = []
    for c in counts:
        spec = dict(devices=c, gpu=args.gpu, config=config, n_train=args.n_train,
                    chunk=args.chunk, proj_dim=args.proj_dim,
                    phi_file=os.path.join(out, f"phi_{c}.npy"))
        t0 = time.perf_counter()
        row = run(spec, args.timeout)
        row.update(phi_file=spec["phi_file"], wall_s=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "phi_file"}), flush=True)
    print()
    print(machine())
    print(table(rows, args.n_train, args.chunk, args.proj_dim))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
