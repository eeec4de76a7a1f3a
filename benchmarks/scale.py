"""Attribution at the scale users work at (issue 10, item 5): peak memory and time.

nanoGPT at dattri's Shakespeare configuration (6 layers, 6 heads, 384 wide, block 256,
vocabulary 65: 10,745,088 parameters; random or briefly Adam-trained weights) on 512
training and 64 test blocks of characters of Python's own ``pydoc_data.topics`` text
(nothing downloaded): TRAK (k = 2048, sparse JL projection), LoGra, EK-FAC influence and
Grad-Dot, every one scoring with ``top_k=10``. Then GPT-2 small (124M parameters, random
weights) on 64 training sequences of 512 tokens (UTF-8 bytes of the same text) with TRAK.

Every run is its own subprocess, so its peak resident memory (``VmHWM``, else
``ru_maxrss``) is that method's alone. Stages are called as a user calls them
(``attr.cache(members, train)``, ``attr.attribute(state, test, top_k=10)``); the time
JAX spends tracing and compiling inside the call (reported by ``jax.monitoring``) is
reported apart, so time per example excludes compilation. ``--mode jit`` instead
compiles each whole stage ahead of time (``jax.jit(attr.attribute).lower(...)
.compile()``) and runs it once. Also measured:

* the share of projection in TRAK's featurise time: the same chunk of per-example
  gradients with and without the projection, and the projection alone on a
  gradient-sized array, side by side in one process (the dense Gaussian is timed on a
  slice of the coordinates and scaled to d: it costs 2·d·k flops per example);
* TRAK's cache time per training example at n_train = 64, 128, 256, 512.

Usage::

    python benchmarks/scale.py                       # everything (2-core CPU: ~30 min)
    python benchmarks/scale.py --quick               # tiny smoke run (about a minute)
    python benchmarks/scale.py --parts nanogpt --methods trak,grad_dot
    python benchmarks/scale.py --json out.json --markdown out.md

``--parts`` is any of ``nanogpt`` (the four methods), ``scaling``, ``profile``,
``gpt2``. On a GPU the same command runs on the default JAX backend and also records
each run's peak device memory (see ``benchmarks/scale_gpu.sh``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial

TOP_K = 10
PARTS = ("nanogpt", "scaling", "profile", "gpt2")
METHODS = ("trak", "logra", "ekfac", "grad_dot")

NANOGPT = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)
GPT2 = dict(dropout=0.0)  # GPT-2 small: 12 layers, 12 heads, 768 wide, vocab 50257
QUICK_NANOGPT = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
QUICK_GPT2 = dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0)


# --------------------------------------------------------------------------- data

def _text() -> str:
    from pydoc_data import topics
    return "".join(topics.topics[k] for k in sorted(topics.topics))


def token_blocks(n: int, length: int, vocab: int, start_block: int = 0):
    """``(n, length + 1)`` int32 token blocks of ``pydoc_data.topics``, cut one after
    another (wrapping around the text if it is too short). Characters are ids by
    frequency (the 64 most frequent get 0..63, the rest 64) for a 65-token vocabulary,
    UTF-8 bytes otherwise."""
    import numpy as np
    text = _text()
    if vocab == 65:
        common = [c for c, _ in collections.Counter(text).most_common(64)]
        table = {c: i for i, c in enumerate(common)}
        ids = np.array([table.get(c, 64) for c in text], np.int32)
    else:
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % vocab
    span = length + 1
    starts = (np.arange(start_block, start_block + n) * span) % (len(ids) - span)
    return ids[starts[:, None] + np.arange(span)]


def lm_loss(module, params, block):
    """Mean next-token cross-entropy of one block ``(T + 1,)``."""
    import optax
    logits = module.apply({"params": params}, block[:-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, block[1:]).mean()


# ------------------------------------------------------------------------- worker

def _rss_bytes() -> int:
    """Peak resident memory of this process: ``VmHWM`` (Linux; fresh at exec), else
    ``ru_maxrss``, which a child inherits from the parent it was forked from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _device_peak():
    import jax
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU devices have none
        return None
    return stats.get("peak_bytes_in_use")


def _block(tree):
    import jax
    return jax.tree_util.tree_map(lambda x: x.block_until_ready()
                                  if hasattr(x, "block_until_ready") else x, tree)


_COMPILE_SPANS: list = []


def _on_event(event, duration, **_):
    if event.startswith("/jax/core/compile/"):
        end = time.perf_counter()
        _COMPILE_SPANS.append((end - duration, end))


def _union(spans) -> float:
    total, reach = 0.0, -float("inf")
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def _stage(fn, *args, mode="eager"):
    """``(out, compile_s, run_s)`` of one stage.

    ``eager``: called as a user calls it (the method's own jitted pieces); compile_s is
    the union of the time spans JAX reports for tracing, lowering and compiling during
    the call (``jax.monitoring``), run_s the rest. ``jit``: the whole stage compiled
    ahead of time (``jax.jit(fn).lower(*args).compile()``), then run once.
    """
    import jax
    if mode == "jit":
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        t1 = time.perf_counter()
        out = _block(compiled(*args))
        return out, t1 - t0, time.perf_counter() - t1
    if _on_event not in _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _LISTENING.append(_on_event)
    del _COMPILE_SPANS[:]
    t0 = time.perf_counter()
    out = _block(fn(*args))
    wall = time.perf_counter() - t0
    compile_s = _union([(max(a, t0), b) for a, b in _COMPILE_SPANS if b > t0])
    return out, compile_s, wall - compile_s


_LISTENING: list = []


def _model(spec):
    from jattri.models import build
    return build(spec["arch"], **spec["config"])


def _load_params(spec, model):
    import jax
    from flax import serialization
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0))["params"]
    with open(spec["params_file"], "rb") as f:
        return serialization.from_bytes(template, f.read())


def _data(spec):
    import jax.numpy as jnp
    vocab = spec["config"].get("vocab_size", 50257)
    train = token_blocks(spec["n_train"], spec["seq_len"], vocab)
    test = token_blocks(spec["n_test"], spec["seq_len"], vocab, start_block=spec["n_train"])
    return jnp.asarray(train), jnp.asarray(test)


def _attributor(spec, loss):
    import jattri
    m, k = spec["method"], spec.get("chunk_size")
    if m == "trak":
        return jattri.trak(loss, proj_dim=spec["proj_dim"], projection=spec["projection"],
                           chunk_size=k)
    if m == "logra":
        return jattri.logra(loss, chunk_size=k)
    if m == "ekfac":
        return jattri.influence_ekfac(loss, chunk_size=k)
    if m == "grad_dot":
        return jattri.grad_dot(loss, chunk_size=k)
    raise ValueError(f"unknown method {m!r}")


def run_method(spec) -> dict:
    """cache + top-k attribute of one method; or cache only (``spec["cache_only"]``)."""
    import jax
    import jattri
    model = _model(spec)
    params = _load_params(spec, model)
    train, test = _data(spec)
    loss = partial(lm_loss, model.module)
    members = jattri.task.as_members(params)
    attr = _attributor(spec, loss)
    rss0 = _rss_bytes()
    mode = spec.get("mode", "eager")
    state, c_compile, c_run = _stage(attr.cache, members, train, mode=mode)
    out = dict(cache_compile_s=c_compile, cache_s=c_run, rss_before=rss0,
               rss_after_cache=_rss_bytes())
    if not spec.get("cache_only"):
        top, a_compile, a_run = _stage(
            lambda s, t: attr.attribute(s, t, top_k=min(spec["top_k"], spec["n_train"])),
            state, test, mode=mode)
        out.update(attribute_compile_s=a_compile, attribute_s=a_run,
                   top1=[int(i) for i in jax.device_get(top.indices[:4, 0])])
    out.update(peak_rss=_rss_bytes(), device_peak=_device_peak(),
               state_bytes=_state_bytes(state))
    return out


def _state_bytes(state) -> int:
    """Bytes a state holds besides the members and the training set it references."""
    import jax
    kept = [v for f, v in zip(getattr(state, "_fields", ()), state)
            if f not in ("members", "train")] if hasattr(state, "_fields") else [state]
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(kept)))


def _median_time(fn, *args, reps=3):
    _block(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_profile(spec) -> dict:
    """Projection vs gradient time on one chunk of TRAK's featurise step, at the default
    chunk size and at the one the benchmark uses; the SJLT hash alone; the dense
    Gaussian."""
    import jax
    import jax.numpy as jnp
    import jattri
    from jattri import engine
    from jattri.func.projection import random_projection, sjlt_hash
    from jattri.methods import _common
    model = _model(spec)
    params = _load_params(spec, model)
    train, _ = _data(spec)
    members = jattri.task.as_members(params)
    d = _common.num_params(members)
    fn = jattri.Task(partial(lm_loss, model.module)).loss
    key = jax.random.PRNGKey(0)
    k = spec["proj_dim"]
    sjlt = random_projection("sjlt", key, d, k)
    grads = jax.jit(lambda p, c: _common.chunk_grads(fn, p, None, c))
    feats = jax.jit(lambda p, c, proj: _common.chunk_grads(fn, p, None, c, proj))
    project = jax.jit(lambda g, proj: proj(g))
    sizes = {_common.chunk_size_for(c, members, train) for c in spec["chunks"]}
    sizes.add(_common.chunk_size_for(None, members, train))  # a plain gradient step's
    try:  # TRAK's own default, where the library budgets projected steps apart
        sizes.add(_common.chunk_size_for(None, members, train, projected=True))
    except TypeError:
        pass
    sizes = sorted(sizes)
    rows = []
    for size in sizes:
        chunk = engine.Chunk(train[:size], jnp.arange(size, dtype=jnp.int32),
                             jnp.ones(size, bool))
        g = grads(params, chunk)
        rows.append(dict(chunk=size, grad_s=_median_time(grads, params, chunk),
                         featurise_s=_median_time(feats, params, chunk, sjlt),
                         projection_s=_median_time(project, g, sjlt)))
        del g
    # What every SJLT call recomputes: bucket and sign of all d coordinates.
    hash_all = jax.jit(lambda key: sjlt_hash(key, jnp.arange(d, dtype=jnp.int32), k))
    t_hash = _median_time(hash_all, key)
    # The dense Gaussian on a slice of d_sub coordinates, scaled to d (its cost is
    # linear in d: d·k normal draws and 2·d·k flops per example).
    size = sizes[0]
    chunk = engine.Chunk(train[:size], jnp.arange(size, dtype=jnp.int32), jnp.ones(size, bool))
    g = grads(params, chunk)
    d_sub = min(d, spec["gaussian_coords"])
    gauss = random_projection("gaussian", key, d_sub, k)
    t_gauss_sub = _median_time(project, g[:, :d_sub], gauss, reps=1)
    return dict(d=d, proj_dim=k, rows=rows, hash_s=t_hash, gaussian_chunk=size,
                gaussian_coords=d_sub, gaussian_sub_s=t_gauss_sub,
                gaussian_s=t_gauss_sub * d / d_sub, peak_rss=_rss_bytes())


def worker(spec) -> dict:
    import jax
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    out = run_profile(spec) if spec["kind"] == "profile" else run_method(spec)
    out.update(wall_s=time.perf_counter() - t0, backend=jax.default_backend(),
               load=[load0, os.getloadavg()[0]])
    return out


def prepare(spec) -> dict:
    """Initial (or briefly Adam-trained) params written to ``spec["params_file"]``."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import serialization
    model = _model(spec)
    params = model.init(jax.random.PRNGKey(spec["seed"]))["params"]
    train, _ = _data(dict(spec, n_test=1))
    loss = partial(lm_loss, model.module)

    def batch_loss(p, batch):
        return jnp.mean(jax.vmap(loss, (None, 0))(p, batch))

    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s, batch):
        value, g = jax.value_and_grad(batch_loss)(p, batch)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    first = float(batch_loss(params, train[:8]))
    state = opt.init(params)
    for i in range(spec["adam_steps"]):
        b = (jnp.arange(8) + 8 * i) % train.shape[0]
        params, state, _ = step(params, state, train[b])
    last = float(batch_loss(params, train[:8]))
    with open(spec["params_file"], "wb") as f:
        f.write(serialization.to_bytes(params))
    d = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return dict(d=int(d), loss_init=first, loss_final=last, machine=machine())


# ------------------------------------------------------------------------- driver

def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=" | ".join(tail)[-400:] or f"exit code {proc.returncode}",
                wall_s=time.perf_counter() - t0)


def _gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def _s(x):
    return "-" if x is None else f"{x:.1f}"


def _ms(x):
    return "-" if x is None else f"{1e3 * x:.0f}"


def method_table(rows) -> str:
    head = ("| model | method | n_train | n_test | cache s | ms / train ex | attribute s | "
            "ms / train ex | compile s | peak RSS GiB | device peak GiB | note |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        res, spec = r["result"], r["spec"]
        n = spec["n_train"]
        if "error" in res:
            lines.append(f"| {r['model']} | {r['label']} | {n} | {spec['n_test']} | - | - | - "
                         f"| - | - | - | - | failed: {res['error']} |")
            continue
        att = res.get("attribute_s")
        comp = res["cache_compile_s"] + (res.get("attribute_compile_s") or 0.0)
        note = ("cache only" if spec.get("cache_only") else
                f"top_k={min(spec['top_k'], spec['n_train'])}")
        note += f", chunk {spec.get('chunk_size') or 'default'}"
        if res.get("load"):
            note += ", load " + " → ".join(f"{x:.1f}" for x in res["load"])
        lines.append(
            f"| {r['model']} | {r['label']} | {n} | {spec['n_test']} | {_s(res['cache_s'])} "
            f"| {_ms(res['cache_s'] / n)} | {_s(att)} | {_ms(None if att is None else att / n)} "
            f"| {_s(comp)} | {_gib(res['peak_rss'])} | {_gib(res.get('device_peak'))} | {note} |")
    return "\n".join(lines)


def profile_table(res) -> str:
    if "error" in res:
        return f"profile failed: {res['error']}"
    lines = [
        f"TRAK featurise on nanoGPT (d = {res['d']:,}, k = {res['proj_dim']}): one chunk of "
        "training blocks, median of 3 runs, ms per example:", "",
        "| chunk | gradients only | gradients + SJLT (featurise) | SJLT alone on the "
        "gradients | projection share (featurise − gradients) / featurise | share "
        "(alone) / (gradients + alone) |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["chunk"]
        ms = lambda x: f"{1e3 * x / c:.0f}"
        lines.append(
            f"| {c} | {ms(r['grad_s'])} | {ms(r['featurise_s'])} | {ms(r['projection_s'])} | "
            f"{100 * (r['featurise_s'] - r['grad_s']) / r['featurise_s']:.1f}% | "
            f"{100 * r['projection_s'] / (r['grad_s'] + r['projection_s']):.1f}% |")
    grad = res["rows"][0]["grad_s"] / res["rows"][0]["chunk"]
    gauss = res["gaussian_s"] / res["gaussian_chunk"]
    lines += ["", f"SJLT hash of all d coordinates alone (recomputed by every projection "
              f"call, whatever the chunk size): {res['hash_s']:.3f} s. Dense Gaussian "
              f"projection (timed on {res['gaussian_coords']:,} coordinates, scaled to d): "
              f"{1e3 * gauss:.0f} ms per example in a chunk of {res['gaussian_chunk']}, "
              f"{gauss / grad:.0f}× the gradient."]
    return "\n".join(lines)


def scaling_table(rows) -> str:
    lines = ["| n_train | cache s | ms / train example | peak RSS GiB | load avg (1 min) "
             "before, after |", "|---|---|---|---|---|"]
    for n, res in rows:
        if "error" in res:
            lines.append(f"| {n} | - | - | - | failed: {res['error']} |")
        else:
            load = ", ".join(f"{x:.1f}" for x in res.get("load", []))
            lines.append(f"| {n} | {res['cache_s']:.1f} | {1e3 * res['cache_s'] / n:.0f} "
                         f"| {_gib(res['peak_rss'])} | {load} |")
    return "\n".join(lines)


def machine() -> str:
    import jax
    try:
        import psutil
        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = ""
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{platform.platform()}, {os.cpu_count()} CPUs{mem}, python "
            f"{platform.python_version()}, jax {jax.__version__} on {jax.default_backend()} "
            f"({devices})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (smoke run)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {METHODS}")
    p.add_argument("--n-train", type=int, help="nanoGPT training blocks (512)")
    p.add_argument("--n-test", type=int, help="nanoGPT test blocks (64)")
    p.add_argument("--sizes", help="TRAK cache scaling n_train list (64,128,256,512)")
    p.add_argument("--proj-dim", type=int, help="TRAK k (2048)")
    p.add_argument("--projection", default="sjlt", help="TRAK projection (sjlt)")
    p.add_argument("--chunk-size", type=int, help="examples per step (default: the "
                   "methods' memory-based default)")
    p.add_argument("--trak-chunk-size", type=int,
                   help="nanoGPT TRAK examples per step (default: TRAK's own; every SJLT "
                   "call re-hashes all d coordinates, so larger chunks amortise it)")
    p.add_argument("--adam-steps", type=int, default=0,
                   help="Adam steps (batch 8, lr 1e-3) on the training blocks before "
                   "attributing (0: random initial weights)")
    p.add_argument("--gpt2-n-train", type=int, help="GPT-2 training sequences (64)")
    p.add_argument("--gpt2-n-test", type=int, help="GPT-2 test sequences (8)")
    p.add_argument("--gpt2-seq", type=int, help="GPT-2 tokens per sequence (512)")
    p.add_argument("--gpt2-chunk-size", type=int, default=2, help="GPT-2 examples per step")
    p.add_argument("--gpt2-method", default="trak", choices=("trak", "logra"))
    p.add_argument("--mode", default="eager", choices=("eager", "jit"),
                   help="stages called as they are (eager) or each jitted whole")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--markdown", help="write the tables here")
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        out = prepare(spec) if spec["kind"] == "prepare" else worker(spec)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    q = args.quick
    parts = [x for x in args.parts.split(",") if x]
    methods = [x for x in args.methods.split(",") if x]
    for x in parts:
        if x not in PARTS:
            raise SystemExit(f"unknown part {x!r}; choose from {PARTS}")
    for x in methods:
        if x not in METHODS:
            raise SystemExit(f"unknown method {x!r}; choose from {METHODS}")
    n_train = args.n_train or (32 if q else 512)
    n_test = args.n_test or (8 if q else 64)
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
             [4, 8, 16, 32] if q else [64, 128, 256, 512])
    k = args.proj_dim or (64 if q else 2048)
    ncfg, gcfg = (QUICK_NANOGPT, QUICK_GPT2) if q else (NANOGPT, GPT2)
    g_seq = args.gpt2_seq or (32 if q else 512)
    tmp = tempfile.mkdtemp(prefix="jattri_scale_")
    results = dict(argv=sys.argv[1:], runs=[], load_at_start=os.getloadavg()[0])
    base = {
        "nanogpt": dict(arch="nanogpt", config=ncfg, seq_len=ncfg["block_size"],
                        params_file=os.path.join(tmp, "nanogpt.msgpack"), seed=0),
        "gpt2": dict(arch="gpt2", config=gcfg, seq_len=g_seq,
                     params_file=os.path.join(tmp, "gpt2.msgpack"), seed=0),
    }
    needs = {"gpt2"} if parts == ["gpt2"] else ({"nanogpt", "gpt2"} if "gpt2" in parts
                                                 else {"nanogpt"})
    for name in sorted(needs):
        spec = dict(base[name], kind="prepare", n_train=max(8, n_train), n_test=1,
                    adam_steps=args.adam_steps)
        res = _run_child(spec, args.timeout)
        if "error" in res:
            raise SystemExit(f"preparing {name} failed: {res['error']}")
        results.setdefault("machine", res["machine"])
        print(f"{name}: {res['d']:,} params, loss {res['loss_init']:.3f} -> "
              f"{res['loss_final']:.3f} after {args.adam_steps} Adam steps", flush=True)
        results[f"{name}_params"] = res

    def run(model, label, spec):
        t0 = time.perf_counter()
        res = _run_child(spec, args.timeout)
        shown = ("FAILED " + res["error"] if "error" in res else json.dumps(
            {key: round(v, 3) if isinstance(v, float) else v for key, v in res.items()}))
        print(f"  {model} {label} n_train={spec['n_train']}: {shown} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        row = dict(model=model, label=label, spec=spec, result=res)
        results["runs"].append(row)
        return row

    nano = dict(base["nanogpt"], kind="method", n_train=n_train, n_test=n_test, top_k=TOP_K,
                chunk_size=args.chunk_size, mode=args.mode)
    trak_chunk = next((c for c in (args.trak_chunk_size, args.chunk_size) if c is not None),
                      None)
    trak_spec = dict(nano, method="trak", proj_dim=k, projection=args.projection,
                     chunk_size=trak_chunk)
    labels = dict(trak=f"TRAK k={k} {args.projection}", logra="LoGra 16x16",
                  ekfac="EK-FAC influence", grad_dot="Grad-Dot")
    method_rows, scaling_rows, profile_res = [], [], None
    if "nanogpt" in parts:
        for m in methods:
            spec = trak_spec if m == "trak" else dict(nano, method=m)
            method_rows.append(run("nanoGPT", labels[m], spec))
    if "profile" in parts:
        spec = dict(base["nanogpt"], kind="profile", n_train=n_train, n_test=1, proj_dim=k,
                    chunks=[c for c in (args.chunk_size, trak_chunk) if c is not None],
                    gaussian_coords=2**12 if q else 2**18)
        profile_res = run("nanoGPT", "projection profile", spec)["result"]
    if "scaling" in parts:
        done = {r["spec"]["n_train"]: r["result"] for r in method_rows
                if r["spec"].get("method") == "trak" and "error" not in r["result"]}
        for n in sizes:
            if n in done:
                scaling_rows.append((n, done[n]))
            else:
                spec = dict(trak_spec, n_train=n, cache_only=True)
                scaling_rows.append((n, run("nanoGPT", "TRAK cache", spec)["result"]))
    if "gpt2" in parts:
        spec = dict(base["gpt2"], kind="method", n_train=args.gpt2_n_train or (16 if q else 64),
                    n_test=args.gpt2_n_test or (4 if q else 8), top_k=TOP_K,
                    chunk_size=args.gpt2_chunk_size, method=args.gpt2_method, proj_dim=k,
                    mode=args.mode,
                    projection=args.projection)
        label = labels["trak"] if args.gpt2_method == "trak" else labels["logra"]
        method_rows.append(run(f"GPT-2 ({g_seq} tok)", label, spec))

    text = []
    if method_rows:
        text += [f"Per method (each in its own process; stages {args.mode}; compile time "
                 "apart, excluded from the stage times):",
                 "", method_table(method_rows), ""]
    if profile_res is not None:
        text += [profile_table(profile_res), ""]
    if scaling_rows:
        text += ["TRAK cache time per training example as n_train doubles:", "",
                 scaling_table(scaling_rows), ""]
    text.append(f"machine: {results['machine']}; 1-minute load average at start "
                f"{results['load_at_start']:.2f}")
    report = "\n".join(text)
    print("\n" + report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
