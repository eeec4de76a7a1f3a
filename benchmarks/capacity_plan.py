"""Capacity plan (issue 11): time, memory and storage to attribute GPT-2 small (124M)
over 1M training sequences of 512 tokens with TRAK (k = 4096) and with LoGra (16 × 16
per linear layer), on 1, 8 and 64 accelerators, from measured per-example costs and
memory formulas.

What is measured, here, when the script runs:

* FLOPs of one per-example gradient of GPT-2 small on 512 tokens: XLA's cost analysis
  of the compiled ``jax.grad`` of the loss (``compiled.cost_analysis()``);
* bytes all-reduced per step of a sharded stage: the after-optimisation HLO of the
  engine's scan (``--xla_dump_to``) for TRAK and LoGra on a small nanoGPT sharded over 8
  simulated devices, every ``all-reduce`` inside the loop body summed;
* the layers LoGra finds in GPT-2 small (``jattri.func.layers.linear_layers``).

What is read from runs of ``benchmarks/scale.py`` on this machine (``--trak`` /
``--logra`` JSON files, GPT-2 small, 512 tokens, chunk 2): seconds per training
example of the cache and peak resident memory.

What is assumed, and printed as such: an accelerator's sustained throughput on these
programs (``--accel-tflops``, default 100 TFLOP/s: about 20% of an H100's dense TF32
peak, 7% of its BF16; no GPU was lent to measure it) and its memory (``--accel-gib``).

Usage::

    python benchmarks/scale.py --parts gpt2 --gpt2-method trak --proj-dim 4096 \\
        --gpt2-n-train 8 --gpt2-n-test 2 --json trak.json
    python benchmarks/scale.py --parts gpt2 --gpt2-method logra \\
        --gpt2-n-train 8 --gpt2-n-test 2 --json logra.json
    python benchmarks/capacity_plan.py --trak trak.json --logra logra.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import GPT2, QUICK_NANOGPT, lm_loss, machine  # noqa: E402

N_TRAIN, SEQ, K_TRAK, LOGRA_K = 1_000_000, 512, 4096, 16 * 16
ACCELERATORS = (1, 8, 64)
PER_HOST = 8  # accelerators per host


def gpt2_facts() -> dict:
    """d, FLOPs and bytes of one per-example gradient (XLA cost analysis), LoGra layers."""
    import jax
    import jax.numpy as jnp

    from jattri.func.layers import linear_layers
    from jattri.models import build
    model = build("gpt2", **GPT2)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))["params"]
    d = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    block = jax.ShapeDtypeStruct((SEQ + 1,), jnp.int32)
    loss = partial(lm_loss, model.module)
    compiled = jax.jit(jax.grad(loss)).lower(params, block).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    layers = linear_layers(loss, params, block)
    return dict(d=d, flops=float(cost["flops"]), bytes=float(cost.get("bytes accessed", 0)),
                logra_layers=len(layers),
                logra_shapes=sorted({(l.d_in, l.d_out) for l in layers.values()}))


ALLREDUCE_CHILD = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           f"--xla_dump_to={sys.argv[1]} --xla_dump_hlo_as_text")
sys.path.insert(0, sys.argv[2])
import jax, numpy as np
from functools import partial
from jax.sharding import Mesh
import jattri
from jattri.models import build
from scale import QUICK_NANOGPT, lm_loss, token_blocks
model = build("nanogpt", **QUICK_NANOGPT)
params = model.init(jax.random.PRNGKey(0))["params"]
blocks = token_blocks(32, QUICK_NANOGPT["block_size"], QUICK_NANOGPT["vocab_size"])
train = jattri.shard(blocks, Mesh(np.array(jax.devices()), ("data",)))
loss = partial(lm_loss, model.module)
attr = {"trak": lambda: jattri.trak(loss, proj_dim=int(sys.argv[4]), projection="sjlt", chunk_size=2),
        "logra": lambda: jattri.logra(loss, chunk_size=2)}[sys.argv[3]]()
jax.block_until_ready(attr.cache(params, train))
from jattri.func.layers import linear_layers
print("LAYERS", len(linear_layers(loss, params, blocks[0])))
"""

def _allreduce_bytes(text: str) -> list:
    """Bytes of every all-reduce inside a scan's loop body (its op_name carries
    ``/while/body/``) in an HLO module's text."""
    sizes = []
    for line in text.splitlines():
        if ("all-reduce(" not in line and "all-reduce-start(" not in line) \
                or "/while/body/" not in line:
            continue
        result = line.split(" = ", 1)[1].split(" all-reduce", 1)[0]  # a shape or a tuple
        for dtype, dims in re.findall(r"(f32|f64|bf16|s32)\[([\d,]*)\]", result):
            n = 1
            for part in dims.split(","):
                n *= int(part) if part else 1
            sizes.append(n * {"f64": 8, "bf16": 2}.get(dtype, 4))
    return sizes


def allreduce_per_step(method: str, k: int) -> tuple:
    """``(bytes all-reduced per step of the method's train-side scan on 8 devices,
    linear layers of the model)``, on the small nanoGPT."""
    with tempfile.TemporaryDirectory() as dump:
        env = {**os.environ, "JATTRI_COMPILE_CACHE": "0", "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([sys.executable, "-c", ALLREDUCE_CHILD, dump,
                              os.path.dirname(os.path.abspath(__file__)), method, str(k)],
                             check=True, env=env, capture_output=True, text=True)
        layers = int(run.stdout.split("LAYERS")[-1].split()[0])
        best = 0
        for path in glob.glob(os.path.join(dump, "*_scan_jit*after_optimizations.txt")):
            with open(path) as f:
                best = max(best, sum(_allreduce_bytes(f.read())))
        return best, layers


def _gb(b):
    return f"{b / 1e9:,.1f} GB"


def _time(s):
    if s < 3600:
        return f"{s / 60:,.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.1f} days"


def plan(facts: dict, runs: dict, ar: dict, args) -> str:
    d, flops = facts["d"], facts["flops"]
    out = [f"GPT-2 small: d = {d:,}; one per-example gradient on {SEQ} tokens = "
           f"{flops / 1e9:,.0f} GFLOP (XLA cost analysis); LoGra finds "
           f"{facts['logra_layers']} linear layers ({facts['logra_shapes']})."]
    feats = {"TRAK k=4096": K_TRAK, "LoGra 16x16": facts["logra_layers"] * LOGRA_K}
    rows = ["| method | accelerators | hosts | time (this CPU's measured rate, per device) "
            "| time (accelerator at the assumed rate) | all-reduce per step | memory per "
            "device (featurise) | feature storage, total / per host |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, key in (("TRAK k=4096", "trak"), ("LoGra 16x16", "logra")):
        run = runs.get(key)
        per_cpu = None if run is None else run["cache_s"] / run["n_train"]
        # an accelerator's time per example: the gradient's FLOPs at the assumed rate
        # for TRAK (its projection measured at 5-18% of the gradient on CPU), scaled by
        # the measured CPU ratio to TRAK for LoGra (which needs no d-float gradient)
        trak = runs.get("trak")
        ratio = 1.0 if (key == "trak" or run is None or trak is None) else (
            per_cpu / (trak["cache_s"] / trak["n_train"]))
        k_feat = feats[name]
        storage = N_TRAIN * k_feat * 4
        step_ar = ar.get(key)
        chunk = args.chunk
        # featurise memory per device: params + per example in flight what the CPU run
        # held above its state before the call ((peak RSS - RSS before) / its chunk:
        # TRAK's d-float gradient, activations, temporaries) + TRAK's Gram and its copy
        act = None
        if run is not None:
            act = max(run["peak_rss"] - run["rss_before"], 0) / max(run["chunk_size"], 1)
        mem = 4 * d + chunk * (act or 0) + (2 * K_TRAK ** 2 * 4 if key == "trak" else 0)
        for n_acc in ACCELERATORS:
            hosts = max(1, n_acc // PER_HOST)
            t_cpu = "-" if per_cpu is None else _time(N_TRAIN * per_cpu / n_acc)
            t_acc_example = flops * ratio / (args.accel_tflops * 1e12)
            step_s = chunk * t_acc_example
            comm = 0.0 if n_acc == 1 or step_ar is None else (
                2 * step_ar / (args.link_gbs * 1e9))  # ring all-reduce ~ 2x the bytes
            t_acc = N_TRAIN * t_acc_example / n_acc * (1 + comm / step_s)
            ar_text = "-" if step_ar is None or n_acc == 1 else (
                f"{step_ar / 1e6:,.0f} MB ({100 * comm / step_s:,.0f}% of a step)")
            rows.append(f"| {name} | {n_acc} | {hosts} | {t_cpu} | {_time(t_acc)} | {ar_text} "
                        f"| {_gb(mem)} | {_gb(storage)} / {_gb(storage / hosts)} |")
    out += ["", *rows]
    return "\n".join(out)


def _load(path):
    """The GPT-2 run of a ``scale.py --json`` file: its result and spec merged."""
    with open(path) as f:
        data = json.load(f)
    for r in data.get("runs", []):
        if "result" in r and "cache_s" in r["result"]:
            return {**r["spec"], **r["result"]}
    raise ValueError(f"{path}: no run with cache_s in it")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trak", help="scale.py --json of GPT-2 TRAK k=4096")
    p.add_argument("--logra", help="scale.py --json of GPT-2 LoGra")
    p.add_argument("--quiet-s-per-example", type=float,
                   help="seconds per example of the TRAK cache measured on a quiet machine; "
                   "both runs' times are rescaled by quiet / (the --trak-ref run's)")
    p.add_argument("--trak-ref", help="scale.py --json of a TRAK run taken side by side "
                   "with --trak / --logra whose quiet time is --quiet-s-per-example")
    p.add_argument("--accel-tflops", type=float, default=100.0,
                   help="assumed sustained TFLOP/s of one accelerator (100)")
    p.add_argument("--link-gbs", type=float, default=50.0,
                   help="assumed all-reduce bandwidth per accelerator, GB/s (50)")
    p.add_argument("--chunk", type=int, default=8, help="sequences per device per step (8)")
    p.add_argument("--json", help="write the inputs and table here")
    args = p.parse_args(argv)
    facts = gpt2_facts()
    factor = None
    if args.quiet_s_per_example and args.trak_ref:
        ref = _load(args.trak_ref)
        factor = args.quiet_s_per_example / (ref["cache_s"] / ref["n_train"])
    runs = {}
    for key, path in (("trak", args.trak), ("logra", args.logra)):
        if path:
            run = _load(path)
            if factor is not None:
                run["measured_s_per_example"] = run["cache_s"] / run["n_train"]
                run["cache_s"] *= factor
            runs[key] = run
    # measured on a small nanoGPT: TRAK's is its k x k Gram (independent of the model);
    # LoGra's one (k_in k_out)^2 Fisher per linear layer, scaled to GPT-2's layer count
    trak_ar, _ = allreduce_per_step("trak", K_TRAK)
    logra_ar, small_layers = allreduce_per_step("logra", 0)
    ar = {"trak": trak_ar, "logra": logra_ar // small_layers * facts["logra_layers"],
          "measured": {"trak_k4096": trak_ar, "logra_small_nanogpt": logra_ar,
                       "small_nanogpt_layers": small_layers}}
    print(machine())
    print(json.dumps(dict(facts=facts, allreduce_bytes_per_step=ar,
                          time_factor=factor,
                          runs={k: {f: r.get(f) for f in ("cache_s", "n_train", "peak_rss",
                                                          "rss_before", "chunk_size",
                                                          "measured_s_per_example")}
                                for k, r in runs.items()})))
    table = plan(facts, runs, ar, args)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(facts=facts, allreduce=ar, table=table), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
