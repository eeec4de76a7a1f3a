"""Block CG against one CG per system, on the workload of ``vs_dattri.py``'s LR row:
dattri's 7,850-parameter logistic regression trained 3 epochs on 5,000 MNIST-shaped
digits, 500 test gradients, λ = 1% of the Hessian's top eigenvalue (0.108), the
systems (H + λI) u_t = g_t of ``influence_cg``.

Two parts:

- ``--part accuracy``: the float64 solution from the explicit Hessian (numpy) is the
  reference. ``jattri.func.hessian.block_cg_solve`` (``block`` > 1) and ``cg_solve``
  (``block`` = 1) run in float32 for a fixed number of steps (``tol=0``), with the
  float32 Hessian as the product. Reported: the largest true relative residual
  ‖g_t − (H + λI) u_t‖ / ‖g_t‖ over the 500 systems, and the largest error of the
  scores u_tᵀ g_i over all 500 × 5,000 pairs relative to the largest score. Also the
  steps each block size takes to ``tol=1e-6`` (``influence_cg``'s default).
- ``--part time``: ``influence_cg(maxiter=20)`` ``cache`` + ``attribute``, one process,
  the block sizes alternated ``--reps`` rounds after one compiling round; medians.

    python benchmarks/block_cg.py --part accuracy
    python benchmarks/block_cg.py --part time --reps 3

Needs the ``compare`` extra (torch trains dattri's model, as in ``vs_dattri.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def _workload(work):
    import numpy as np

    import jattri
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vs_dattri

    if not os.path.exists(os.path.join(work, "settings.json")):
        vs_dattri._prepare(work, "lr", 5000, 500)
    with open(os.path.join(work, "settings.json")) as f:
        cfg = json.load(f)
    data = np.load(os.path.join(work, "data.npz"))
    params = vs_dattri._dense_params(jattri.interop.load_pt(cfg["ckpts"][-1]))
    return cfg, data, params, vs_dattri._dense_logits


def _reference(data, params, lam):
    """float64 (H + λI), the test gradients, the training gradients' factors."""
    import numpy as np
    w = np.concatenate([np.asarray(params["linear"]["kernel"]),
                        np.asarray(params["linear"]["bias"])[None]], 0).astype(np.float64)

    def side(x, y):
        x = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], 1)
        z = x @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = p.copy()
        r[np.arange(len(y)), y] -= 1
        return x, p, r

    x, p, r = side(data["xtr"], data["ytr"])
    xt, _, rt = side(data["xte"], data["yte"])
    n, d_in = x.shape
    h = np.zeros((d_in, 10, d_in, 10))
    for c in range(10):
        for e in range(c, 10):
            blk = (x * (p[:, c] * ((c == e) - p[:, e]))[:, None]).T @ x / n
            h[:, c, :, e] = blk
            h[:, e, :, c] = blk
    h = h.reshape(d_in * 10, d_in * 10) + lam * np.eye(d_in * 10)
    b = (xt[:, :, None] * rt[:, None, :]).reshape(len(xt), -1)   # rows: ∇θ loss, (in, class)
    g = (x[:, :, None] * r[:, None, :]).reshape(n, -1)
    return h, b, g


def _accuracy(args, data, params, cfg):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jattri.func.hessian import block_cg_solve, cg_solve

    h, b, g = _reference(data, params, cfg["damping"])
    exact = np.linalg.solve(h, b.T).T
    s_exact = exact @ g.T
    h32, b32 = jnp.asarray(h, jnp.float32), jnp.asarray(b, jnp.float32)
    matmat = lambda v: v @ h32                          # h is symmetric

    def solve(block, steps, tol):
        if block == 1:
            return cg_solve(lambda v: h32 @ v, b32, maxiter=steps, tol=tol)
        return block_cg_solve(matmat, b32, maxiter=steps, tol=tol, block=block)

    run = jax.jit(solve, static_argnums=(0, 1, 2))
    if args.steps:
        print("| block | " + " | ".join(f"{k} steps" for k in args.steps) + " |")
        print("|---|" + "---|" * len(args.steps))
    for block in args.blocks if args.steps else ():
        cells = []
        for k in args.steps:
            u = np.asarray(run(block, k, 0.0), np.float64)
            res = np.linalg.norm(b - u @ h, axis=1) / np.linalg.norm(b, axis=1)
            err = np.abs(u @ g.T - s_exact).max() / np.abs(s_exact).max()
            cells.append(f"{res.max():.1e} / {err:.1e}")
        print(f"| {block} | " + " | ".join(cells) + " |", flush=True)
    print("\n(cells: largest true relative residual / largest score error relative to the "
          "largest score)\n")
    for block in args.blocks:   # steps to tol = 1e-6: the first k after which it stops
        last = np.asarray(run(block, 20, 1e-6))
        if not np.array_equal(last, np.asarray(run(block, 21, 1e-6))):
            steps = None        # still running after 20 steps
        else:
            steps = next(k for k in range(1, 21)
                         if np.array_equal(np.asarray(run(block, k, 1e-6)), last))
        u6 = np.asarray(last, np.float64)
        res = np.linalg.norm(b - u6 @ h, axis=1) / np.linalg.norm(b, axis=1)
        err = np.abs(u6 @ g.T - s_exact).max() / np.abs(s_exact).max()
        print(f"block {block}: tol 1e-6 reached in "
              f"{steps if steps else 'more than 20'} steps; after them (or 20), true "
              f"residual max {res.max():.1e}, score error {err:.1e}", flush=True)


def _time(args, data, params, cfg, logits):
    import jax
    import numpy as np
    import jattri

    train = jax.device_put((data["xtr"], data["ytr"].astype(np.int32)))
    test = jax.device_put((data["xte"], data["yte"].astype(np.int32)))

    def loss(p, z):
        xi, yi = z
        return -jax.nn.log_softmax(logits(p, xi))[yi]

    attrs = {blk: jattri.influence_cg(loss, damping=cfg["damping"], maxiter=20, block=blk)
             for blk in args.blocks}
    times = {blk: [] for blk in args.blocks}
    scores = {}
    for rnd in range(args.reps + 1):        # round 0 compiles
        for blk, attr in attrs.items():
            t = time.perf_counter()
            scores[blk] = np.asarray(attr.attribute(attr.cache(params, train), test))
            dt = time.perf_counter() - t
            if rnd:
                times[blk].append(dt)
            print(f"round {rnd} block {blk}: {dt:.3f} s", flush=True)
    base = scores[args.blocks[0]]
    print("\n| block | compiled calls, s | median s | Pearson with block "
          f"{args.blocks[0]} |\n|---|---|---|---|")
    for blk in args.blocks:
        r = np.corrcoef(scores[blk].ravel(), base.ravel())[0, 1]
        print(f"| {blk} | {', '.join(f'{t:.2f}' for t in times[blk])} | "
              f"{np.median(times[blk]):.2f} | {r:.6f} |")


# One configuration in a fresh process: a linear model (d_in features, 10 classes), 640
# training and 512 test examples (more training examples: the test side is solved), `influence_cg(maxiter=2)`; the attribute call compiled
# ahead of time, its own peak resident memory (high-water mark reset just before it).
_MEMORY_RUN = r"""
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
import jattri

d_in, block, chunk = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
chunk = None if chunk == "default" else int(chunk)
page = os.sysconf("SC_PAGE_SIZE")
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(d_in, 10)) * 0.01, jnp.float32),
          "b": jnp.zeros(10, jnp.float32)}
data = lambda n: (jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32),
                  jnp.asarray(rng.integers(0, 10, n), jnp.int32))
train, test = data(640), data(512)
loss = lambda p, z: -jax.nn.log_softmax(z[0] @ p["w"] + p["b"])[z[1]]
attr = jattri.influence_cg(loss, damping=0.1, maxiter=2, block=block, chunk_size=chunk)
state = jax.block_until_ready(attr.cache(params, train))
run = jax.jit(lambda s, t: attr.attribute(s, t)).lower(state, test).compile()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * page
t = time.perf_counter()
scores = jax.block_until_ready(run(state, test))
seconds = time.perf_counter() - t
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print("RESULT " + json.dumps(dict(peak=peak - before, seconds=seconds,
                                  finite=bool(jnp.all(jnp.isfinite(scores))))))
"""


def _memory(args):
    """Peak memory of ``attribute``'s solve at d = 10·d_in + 10, by default (systems as
    many at once as the chunk budget holds) and with all 512 at once (chunk_size=512)."""
    import subprocess

    import jax.numpy as jnp
    from jattri.methods import _common
    from jattri.task import as_members
    d = 10 * args.d_in + 10
    members = as_members({"w": jnp.zeros((d,), jnp.float32)})
    print(f"d = {d:,}, 512 test systems, 640 training examples, maxiter 2\n")
    print("| block | systems at once | peak of the call, MB | CG vectors, MB | time, s |")
    print("|---|---|---|---|---|")
    for block in args.blocks:
        for chunk in ("default", "512"):
            proc = subprocess.run([sys.executable, "-c", _MEMORY_RUN, str(args.d_in),
                                   str(block), chunk], capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(f"| {block} | {chunk} | failed: {proc.stderr[-300:]!r} | | |")
                continue
            out = json.loads(line[0][len("RESULT "):])
            per_row = (8 if block > 1 else 4) * d * 4       # bytes of CG vectors per system
            rows = 512 if chunk == "512" else _common.chunk_size_for(
                None, members, None, per_row // 4)
            unit = min(block, 512)                          # whole blocks, balanced groups
            groups = -(-512 // max(unit, rows // unit * unit))
            held = -(-(512 // unit) // groups) * unit if block > 1 else -(-512 // groups)
            print(f"| {block} | {'all 512' if chunk == '512' else f'{held} (default)'} | "
                  f"{out['peak'] / 1e6:,.0f} | {held * per_row / 1e6:,.0f} | "
                  f"{out['seconds']:.2f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("accuracy", "time", "memory"), required=True)
    p.add_argument("--d-in", type=int, default=50_000,
                   help="--part memory: input features of its linear model (d = 10·d_in + 10)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--blocks", default="1,32,128,512",
                   help="comma-separated block sizes (1: one CG per system)")
    p.add_argument("--steps", default="1,2,3,4,5,6,8,10,15,20")
    p.add_argument("--work", default=None, help="vs_dattri-style work dir (made if absent)")
    p.add_argument("--damping", type=float, default=None,
                   help="λ instead of the workload's 1%% of the top eigenvalue")
    args = p.parse_args(argv)
    args.blocks = [int(x) for x in args.blocks.split(",")]
    args.steps = [int(x) for x in args.steps.split(",") if x]
    import jax
    if args.part == "memory":
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"jax {jax.__version__}", flush=True)
        _memory(args)
        return 0
    work = args.work or os.path.join(tempfile.gettempdir(), "jattri_block_cg_lr")
    cfg, data, params, logits = _workload(work)
    if args.damping is not None:
        cfg["damping"] = args.damping
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}; λ = {cfg['damping']}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    if args.part == "accuracy":
        _accuracy(args, data, params, cfg)
    else:
        _time(args, data, params, cfg, logits)
    print(f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
