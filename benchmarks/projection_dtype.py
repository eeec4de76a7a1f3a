"""The dense projection's product in bfloat16 (``projection_dtype="bfloat16"``) against
float32, side by side: time and accuracy.

Time: ``benchmarks/vs_dattri.py``'s LR (7,850 parameters) and MLP (109,386), 5,000
train × 500 test, k = 512, its checkpoints and hyperparameters; TRAK (one checkpoint)
and TracIn (three), float32 and bfloat16 alternated in fresh processes with
vs_dattri's protocol (a cold persistent compilation cache, then the same cache warm;
first call and compiled second call). Medians, and bfloat16 / float32.

Accuracy: the embedded ``digits_lr`` and ``digits_mlp`` settings (ground truth from
the package): LDS of TRAK-1, TRAK-5 and TracIn-5 (k = 512) in float32 and bfloat16 on
the same members, the Pearson correlation of the two score matrices, and as the
yardstick the Pearson correlation of float32 scores under two projection keys (the
JL error the projection itself brings).

Pieces: where a bfloat16 call's time goes, on one chunk of per-example gradients of an
MLP shaped as dattri's (784-128-64-10, 109,386 parameters; random weights and inputs:
the times do not depend on them), k = 512, each program best of ``--reps`` in one
process: the per-example gradients materialised (float32 and bfloat16, each also in the
order the dense layers' gradients are made in, (out, in), with no transposing copy), P
generated whole, gradients and projection as TRAK runs them (``project_leaves``), and
the product alone with bfloat16 inputs given, the part no bfloat16 projection can go
below.

    python benchmarks/projection_dtype.py                  # time and accuracy
    python benchmarks/projection_dtype.py --part time --reps 3
    python benchmarks/projection_dtype.py --part accuracy
    python benchmarks/projection_dtype.py --part pieces --chunk 1667 --reps 5
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def time_part(models, methods, reps, n_train, n_test) -> list:
    import vs_dattri
    vs_dattri._byte_compile_jattri()
    root = tempfile.mkdtemp(prefix="projection_dtype_")
    rows = []
    try:
        for model in models:
            work = os.path.join(root, model)
            vs_dattri._prepare(work, model, n_train, n_test)
            for method in methods:
                pair = (method, method + "_bf16")
                runs = {m: {"cold": [], "warm": []} for m in pair}
                for rep in range(reps):
                    for m in (pair if rep % 2 == 0 else pair[::-1]):
                        xla = tempfile.mkdtemp(prefix="xla_", dir=root)
                        for phase in ("cold", "warm"):
                            r = vs_dattri._spawn("jattri", m, work, xla, None, 900)
                            if "error" in r:
                                raise RuntimeError(f"{model} {m} {phase}: {r['error']}")
                            runs[m][phase].append(r)
                        shutil.rmtree(xla, ignore_errors=True)
                row = {"model": model, "method": method}
                for m in pair:
                    tag = "bf16" if m.endswith("_bf16") else "f32"
                    every = runs[m]["cold"] + runs[m]["warm"]
                    row[f"{tag}_compiled"] = _median([r["compiled_s"] for r in every])
                    row[f"{tag}_compiled_all"] = [round(r["compiled_s"], 3) for r in every]
                    row[f"{tag}_cold_first"] = _median([r["first_s"] for r in runs[m]["cold"]])
                    row[f"{tag}_warm_first"] = _median([r["first_s"] for r in runs[m]["warm"]])
                rows.append(row)
                print(f"[{model}] {method}: compiled f32 {row['f32_compiled']:.3f} s "
                      f"{row['f32_compiled_all']}, bf16 {row['bf16_compiled']:.3f} s "
                      f"{row['bf16_compiled_all']}; first (cold) f32 "
                      f"{row['f32_cold_first']:.2f} s, bf16 {row['bf16_cold_first']:.2f} s; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| model | method | compiled f32 | compiled bf16 | ratio | first cold f32 | "
          "first cold bf16 | first warm f32 | first warm bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['f32_compiled']:.3f} | "
              f"{r['bf16_compiled']:.3f} | {r['bf16_compiled'] / r['f32_compiled']:.2f} | "
              f"{r['f32_cold_first']:.2f} | {r['bf16_cold_first']:.2f} | "
              f"{r['f32_warm_first']:.2f} | {r['bf16_warm_first']:.2f} |")
    return rows


def accuracy_part(settings) -> list:
    import jax
    import numpy as np

    import jattri
    from jattri import benchmark

    builds = {
        "trak_1": (1, lambda task, **kw: jattri.trak(task, proj_dim=512, **kw)),
        "trak_5": (5, lambda task, **kw: jattri.trak(task, proj_dim=512, **kw)),
        "tracin_5": (5, lambda task, **kw: jattri.tracin(task, proj_dim=512,
                                                         projection="gaussian", **kw)),
    }
    rows = []
    for setting in settings:
        bench = benchmark.load(setting, progress=None)
        task = jattri.Task(bench.loss_fn, bench.target_fn)
        for name, (m, build) in builds.items():
            members = jattri.checkpoints(bench.models_full[:m])
            scores = {}
            for tag, kw in (("f32", {}), ("bf16", {"projection_dtype": "bfloat16"}),
                            ("f32_key1", {"key": jax.random.PRNGKey(1)})):
                attr = build(task, **kw)
                scores[tag] = np.asarray(jax.block_until_ready(
                    attr.attribute(attr.cache(members, bench.train), bench.test)), np.float64)
            lds = {t: float(np.nanmean(jattri.metrics.lds(s, *bench.lds)))
                   for t, s in scores.items()}
            corr = lambda a, b: float(np.corrcoef(scores[a].ravel(), scores[b].ravel())[0, 1])
            rel = float(np.linalg.norm(scores["bf16"] - scores["f32"])
                        / np.linalg.norm(scores["f32"]))
            row = dict(setting=setting, method=name, lds_f32=lds["f32"], lds_bf16=lds["bf16"],
                       lds_f32_key1=lds["f32_key1"], pearson_bf16=corr("bf16", "f32"),
                       pearson_key=corr("f32_key1", "f32"), rel_diff=rel)
            rows.append(row)
            print(f"[{setting}] {name}: LDS f32 {row['lds_f32']:.4f}, bf16 "
                  f"{row['lds_bf16']:.4f}, f32 other key {row['lds_f32_key1']:.4f}; "
                  f"Pearson bf16~f32 {row['pearson_bf16']:.5f}, other key~f32 "
                  f"{row['pearson_key']:.5f}; relative difference {rel:.2e}", flush=True)
    print("\n| setting | method | LDS f32 | LDS bf16 | LDS f32, key 1 | Pearson bf16 vs f32 | "
          "Pearson key 1 vs key 0 | ‖bf16 − f32‖ / ‖f32‖ |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['lds_f32']:.4f} | {r['lds_bf16']:.4f} | "
              f"{r['lds_f32_key1']:.4f} | {r['pearson_bf16']:.5f} | {r['pearson_key']:.5f} | "
              f"{r['rel_diff']:.2e} |")
    return rows


def pieces_part(n, reps, k=512) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import floors
    from jattri.func import projection as proj

    dims = ((784, 128), (128, 64), (64, 10))
    keys = jax.random.split(jax.random.PRNGKey(0), len(dims) + 1)
    params = [{"kernel": jax.random.normal(kk, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
              for kk, (a, b) in zip(keys, dims)]
    d = sum(a * b + b for a, b in dims)
    x = jax.random.normal(keys[-1], (n, 784))
    y = jnp.arange(n) % 10

    def loss(p, xi, yi):
        h = xi
        for i, layer in enumerate(p):
            h = h @ layer["kernel"] + layer["bias"]
            h = jax.nn.relu(h) if i < len(p) - 1 else h
        return -jax.nn.log_softmax(h)[yi]

    def grads(p, x, y):
        return jax.tree_util.tree_leaves(jax.vmap(jax.grad(loss), (None, 0, 0))(p, x, y))

    best = partial(floors._best, reps=reps)  # the least of reps calls after a warm-up

    seed = proj.seed_words(jax.random.PRNGKey(0))
    make_p = jax.jit(lambda s: proj._gaussian_seeded(s, jnp.arange(d), k, jnp.float32)
                     .astype(jnp.bfloat16))
    p_low = make_p(seed)
    g_low = jax.random.normal(keys[-1], (n, d)).astype(jnp.bfloat16)
    bf16 = proj.gaussian_projection(jax.random.PRNGKey(0), d, k, dtype="bfloat16")
    f32 = proj.gaussian_projection(jax.random.PRNGKey(0), d, k)
    row = {
        "gradients float32": best(jax.jit(grads), params, x, y),
        "gradients float32, (in, out) swapped": best(jax.jit(
            lambda *a: [jnp.swapaxes(g, 1, 2) if g.ndim == 3 else g for g in grads(*a)]),
            params, x, y),
        "gradients bfloat16": best(jax.jit(
            lambda *a: [g.astype(jnp.bfloat16) for g in grads(*a)]), params, x, y),
        "gradients bfloat16, (in, out) swapped": best(jax.jit(
            lambda *a: [(jnp.swapaxes(g, 1, 2) if g.ndim == 3 else g).astype(jnp.bfloat16)
                        for g in grads(*a)]), params, x, y),
        "P generated whole (bfloat16)": best(make_p, seed),
        "gradients + projection, float32": best(jax.jit(
            lambda *a: proj.project_leaves(f32, grads(*a))), params, x, y),
        "gradients + projection, bfloat16": best(jax.jit(
            lambda *a: proj.project_leaves(bf16, grads(*a))), params, x, y),
        "product alone, bfloat16 inputs given": best(jax.jit(
            lambda g, m: jnp.dot(g, m, preferred_element_type=jnp.float32)), g_low, p_low),
    }
    flops = 2.0 * n * d * k
    print(f"\n{n} per-example gradients of {d:,} parameters, k = {k}, best of {reps}:")
    print("| piece | s | GFLOP/s of the n·d·k product |")
    print("|---|---|---|")
    for name, t in row.items():
        rate = f"{flops / t / 1e9:.0f}" if "projection" in name or "product" in name else ""
        print(f"| {name} | {t:.3f} | {rate} |")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("time", "accuracy", "pieces", "both"), default="both")
    p.add_argument("--models", default="lr,mlp")
    p.add_argument("--methods", default="trak,tracin")
    p.add_argument("--reps", type=int, default=3, help="alternated repetitions per variant")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--settings", default="digits_lr,digits_mlp")
    p.add_argument("--chunk", type=int, default=1667,
                   help="pieces: examples per chunk (TRAK's default on the MLP: 1,667)")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.part in ("time", "both"):
        time_part(args.models.split(","), args.methods.split(","), args.reps, args.n_train,
                  args.n_test)
    if args.part in ("accuracy", "both"):
        accuracy_part(args.settings.split(","))
    if args.part == "pieces":
        pieces_part(args.chunk, args.reps)
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; 1-min load {os.getloadavg()[0]:.2f}; wall "
          f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
