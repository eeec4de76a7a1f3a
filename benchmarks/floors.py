"""What the machine itself allows for the cells of issue 15 that jattri misses
(``benchmarks/RESULTS.md``, "Floors"): the least work each method's definition needs
on the MNIST-shaped LR at 5,000 train × 500 test, written as the shortest pure-JAX
program (no jattri), timed on this machine, against the bound the issue sets
(1/10 of dattri's compiled call, 1/5 of its end-to-end time).

    python benchmarks/floors.py                # about a minute
    python benchmarks/floors.py --dattri-cg 72 ...   # dattri's times of another run

Each figure is the fastest of ``--reps`` calls of a compiled program (float32, random
data of the workload's shapes: the cost of these programs does not depend on values).
The dattri times default to those measured by ``benchmarks/vs_dattri.py`` on this
machine: the whole LR matrix at 4f31d20 and the MLP's TRAK, TracIn and Arnoldi on
2026-12-04 (RESULTS.md); pass others with the flags.

- ``ekfac``: EK-FAC scores need g_iᵀ u_t for every pair, u_t the preconditioned test
  gradient: one (5,000 × 7,850) · (7,850 × 500) product, 3.9·10¹⁰ multiply-adds, whatever
  the basis (the eigenvalue-corrected inverse is not a Kronecker product, so no
  factorisation shortens it).
- ``cg``: 20 CG iterations (and the initial residual) on 500 right-hand sides, each one
  Hessian-vector product of the softmax regression over 5,000 examples: X̃V, the 10 × 10
  softmax Hessian per example, X̃ᵀZ. Timed: the two matrix products alone (3.9·10¹⁰
  multiply-adds each), 21 times: a lower bound on one CG per system (``block=1``),
  not on ``influence_cg``'s default block CG, which needs fewer products (5 steps
  here, ``benchmarks/block_cg.py``).
- ``trak``: TRAK with the Kronecker projection (k = 510): features of 5,500 examples,
  the 510 × 510 kernel, its solve against the 500 test features, the 5,000 × 500 scores.
- ``dense``: TRAK and TracIn with a dense projection (the benchmark's ``trak`` and
  ``tracin`` cells: ``projection="auto"`` keeps the dense Gaussian at this d·k): the
  projection of 5,500 per-example gradients (5,000 train, 500 test) of 7,850 floats to
  k = 512, one (5,500 × 7,850) · (7,850 × 512) product, 2.2·10¹⁰ multiply-adds per
  member (TRAK one, TracIn three checkpoints). Timed: that product alone (the
  gradients and the projection matrix given), a lower bound on any dense projection,
  dattri's included. The same on dattri's MLP (109,386 parameters, d·k = 5.6·10⁷, also
  dense under ``"auto"``): 3.1·10¹¹ multiply-adds per member.
- ``arnoldi_lr``: Arnoldi's 100 Hessian-vector products of the softmax regression over
  5,000 examples. Timed: the two products each needs, X̃V and X̃ᵀZ (V 785 × 10), 100
  times in one compiled loop, X̃ᵀ read from a transposed copy made once (its faster
  form here); the softmax Hessian between them and the orthogonalisation left out.
- ``arnoldi_mlp``: the same on dattri's 784-128-64-10 MLP (109,386 parameters), plus
  the training coordinates (5,000 × 109,386) · (109,386 × 50). Two figures: the shortest
  pure-JAX program (100 products by ``jax.linearize`` of the mean gradient, one product
  of per-example gradients with the 50 eigenvectors), and a lower bound on any
  implementation: only the first layer's two products per Hessian-vector product
  (X·dW₁ and Xᵀ·dZ₁, 5,000 × 784 × 128 each) and the coordinates' one product.
- ``explicit``: explicit influence on the LR: the 7,850² Hessian built as its 55
  class-pair blocks X̃ᵀ diag(w) X̃ (785² each, one einsum), its Cholesky factorisation,
  the two triangular solves against the 500 test gradients, and the (5,000 × 7,850) ·
  (7,850 × 500) scores. Also reported: the same with the Hessian build halved (each
  block is symmetric, so an implementation could compute half of it; XLA has no
  symmetric rank-k product), a lower bound.
- ``import``: ``python -c "import jax"``, the least a JAX process spends before any
  work, against 1/5 of dattri's end-to-end time for the fastest methods.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

N, M, D_IN, C = 5000, 500, 785, 10


def _best(fn, *args, reps, stat=min):
    """``stat`` (default the least) of ``reps`` timed calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(stat(times))


def ekfac(reps):
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal((N, D_IN * C), np.float32))
    u = jnp.asarray(rng.standard_normal((M, D_IN * C), np.float32))
    return _best(jax.jit(lambda g, u: g @ u.T), g, u, reps=reps)


def cg(reps, iters=21):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.random((N, D_IN), np.float32))
    v = jnp.asarray(rng.standard_normal((D_IN, C * M), np.float32))
    z = jnp.asarray(rng.standard_normal((N, C * M), np.float32))
    # only the two products over the training set that every H V needs, X̃V and X̃ᵀZ
    # (the softmax Hessian between them left out): a lower bound
    return iters * (_best(jax.jit(lambda x, v: x @ v), x, v, reps=reps)
                    + _best(jax.jit(lambda x, z: x.T @ z), x, z, reps=reps))


def trak(reps):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((N, D_IN - 1), np.float32))
    xt = jnp.asarray(rng.random((M, D_IN - 1), np.float32))
    w = jnp.asarray(rng.standard_normal((D_IN - 1, C), np.float32) * 0.01)
    proj = jnp.asarray(rng.standard_normal((D_IN, 51), np.float32))

    def features(x):  # (ã P_in) ⊗ ∂margin/∂logits, never the 7,850-float gradient
        p = jax.nn.softmax(x @ w, -1)
        s = p - jax.nn.one_hot(jnp.zeros(len(x), jnp.int32), C)
        a = jnp.concatenate([x, jnp.ones((len(x), 1), x.dtype)], 1) @ proj
        return (a[:, :, None] * s[:, None, :]).reshape(len(x), -1)

    @jax.jit
    def cache(x):
        phi = features(x)
        return phi, phi.T @ phi

    @jax.jit
    def attribute(phi, kernel, xt):
        solved = jnp.linalg.solve(kernel + 1e-3 * jnp.eye(kernel.shape[0]), features(xt).T)
        return phi @ solved

    def both(x, xt):
        return attribute(*cache(x), xt)

    return _best(both, x, xt, reps=reps)


def dense(reps, d=D_IN * C, k=512, parts=1):
    """One (N + M, d) · (d, k) projection product, s (per member): ``parts`` times the
    product of 1/``parts`` of the rows (the MLP's 2.4 GB of gradients in 5 parts)."""
    rng = np.random.default_rng(6)
    g = jnp.asarray(rng.standard_normal(((N + M) // parts, d), np.float32))
    proj = jnp.asarray(rng.standard_normal((d, k), np.float32))
    return parts * _best(jax.jit(lambda g, p: g @ p), g, proj, reps=reps)


def arnoldi_lr(reps, iters=100):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.random((N, D_IN), np.float32))

    @jax.jit
    def loop(x):
        xt = x.T.copy()  # noqa: the transposed copy, made once

        def body(i, v):
            z = x @ v
            return (xt @ z) / N

        return jax.lax.fori_loop(0, iters, body, jnp.ones((D_IN, C), x.dtype))

    return _best(loop, x, reps=reps)


MLP_SIZES = (784, 128, 64, 10)
MLP_D = sum((a + 1) * b for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:]))  # 109,386


def arnoldi_mlp(reps, iters=100, rank=50):
    """(pure-JAX program, lower bound) in seconds."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((N, MLP_SIZES[0]), np.float32))
    y = jnp.asarray(rng.integers(0, C, N).astype(np.int32))
    params = [(jnp.asarray(rng.standard_normal((a, b), np.float32) / np.sqrt(a)),
               jnp.zeros(b, jnp.float32)) for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:])]
    from jax.flatten_util import ravel_pytree
    theta, unravel = ravel_pytree(params)
    d = theta.size

    def logits(p, x):
        for i, (w, b) in enumerate(p):
            x = x @ w + b
            if i < len(p) - 1:
                x = jax.nn.relu(x)
        return x

    def example_loss(t, xi, yi):
        return -jax.nn.log_softmax(logits(unravel(t), xi[None])[0])[yi]

    def mean_loss(t, x, y):
        return jnp.mean(jax.vmap(example_loss, (None, 0, 0))(t, x, y))

    @jax.jit
    def program(t, vecs, x, y):  # the data as arguments, not constants of the program
        hvp = jax.linearize(lambda t: jax.grad(mean_loss)(t, x, y), t)[1]
        v = jax.lax.fori_loop(0, iters, lambda i, v: hvp(v) / jnp.linalg.norm(v),
                              jnp.ones(d, t.dtype))
        per = jax.vmap(jax.grad(example_loss), (None, 0, 0))
        coords = jax.lax.map(lambda c: per(t, *c) @ vecs,
                             (x.reshape(10, N // 10, -1), y.reshape(10, N // 10)))
        return v, coords

    vecs = jnp.asarray(rng.standard_normal((d, rank), np.float32))
    full = _best(program, theta, vecs, x, y, reps=reps)
    h = MLP_SIZES[1]
    dw = jnp.asarray(rng.standard_normal((MLP_SIZES[0], h), np.float32))

    @jax.jit
    def first_layer(x, dw):
        xt = x.T.copy()
        return jax.lax.fori_loop(0, iters, lambda i, w: (xt @ (x @ w)) / N, dw)

    g = jnp.asarray(rng.standard_normal((N, d), np.float32))
    bound = (_best(first_layer, x, dw, reps=reps)
             + _best(jax.jit(lambda g, v: g @ v), g, vecs, reps=reps))
    return full, bound


def explicit(reps):
    """(program, lower bound with the Hessian build halved) in seconds."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.random((N, D_IN), np.float32))
    w = jnp.asarray(rng.random((N, C * (C + 1) // 2), np.float32))
    g_test = jnp.asarray(rng.standard_normal((D_IN * C, M), np.float32))
    g_train = jnp.asarray(rng.standard_normal((N, D_IN * C), np.float32))

    @jax.jit
    def build(x, w):  # the 55 symmetric class-pair blocks X̃ᵀ diag(w_pair) X̃
        return jnp.einsum("na,np,nb->pab", x, w, x)

    d = D_IN * C
    a = jnp.asarray(rng.random((d, d), np.float32))
    h = (a + a.T) / 2 + d * jnp.eye(d)  # diagonally dominant: positive definite, like H + λI

    @jax.jit
    def solve(h, g_test, g_train):
        chol = jax.scipy.linalg.cho_factor(h, lower=True)
        return g_train @ jax.scipy.linalg.cho_solve(chol, g_test)

    t_build = _best(build, x, w, reps=reps)
    t_rest = _best(solve, h, g_test, g_train, reps=reps)
    return t_build + t_rest, t_build / 2 + t_rest


def imports(reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import jax"], check=True)
        times.append(time.perf_counter() - t)
    return min(times)


#: ``--dattri-<name>`` flags: (name, default s, what dattri's time is of).
_DATTRI = (
    ("ekfac", 2.479, "compiled EK-FAC call"),
    ("cg", 41.447, "CG call"),
    ("trak", 0.955, "compiled TRAK call"),
    ("tracin", 1.932, "compiled TracIn call (3 checkpoints)"),
    ("trak-mlp", 22.388, "compiled TRAK call on the MLP"),
    ("tracin-mlp", 68.180, "compiled TracIn call on the MLP (3 checkpoints)"),
    ("e2e", 4.09, "fastest end-to-end run (Grad-Cos there)"),
    ("arnoldi-lr", 2.479, "compiled Arnoldi call on the LR"),
    ("arnoldi-mlp", 27.598, "compiled Arnoldi call on the MLP"),
    ("explicit", 40.407, "compiled explicit IF call on the LR"),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    for name, default, what in _DATTRI:
        p.add_argument(f"--dattri-{name}", type=float, default=default,
                       help=f"dattri's {what}, s")
    args = p.parse_args(argv)
    few = max(1, args.reps // 3)
    # the projection products first: after the MLP's and the explicit programs' large
    # buffers the LR's product once ran 0.44 s instead of 0.25 s in the same process
    dense_one = dense(args.reps)
    dense_mlp = dense(few, d=MLP_D, parts=5)
    mlp_program, mlp_bound = arnoldi_mlp(few)
    explicit_program, explicit_bound = explicit(few)
    rows = [
        ("EK-FAC compiled", "1/10", args.dattri_ekfac / 10, ekfac(args.reps)),
        ("CG compiled", "1/10", args.dattri_cg / 10, cg(few)),
        ("TRAK (Kronecker) compiled", "1/10", args.dattri_trak / 10, trak(args.reps)),
        ("TRAK (dense projection) compiled (the projection product only)", "1/10",
         args.dattri_trak / 10, dense_one),
        ("TracIn (dense projection, 3 checkpoints) compiled (the projection products "
         "only)", "1/10", args.dattri_tracin / 10, 3 * dense_one),
        ("Arnoldi compiled (the two products of 100 HVPs only)", "1/10",
         args.dattri_arnoldi_lr / 10, arnoldi_lr(args.reps)),
        ("explicit IF compiled (build, Cholesky, solves, scores)", "1/10",
         args.dattri_explicit / 10, explicit_program),
        ("explicit IF compiled (the same, Hessian build halved: a lower bound)", "1/10",
         args.dattri_explicit / 10, explicit_bound),
        ("MLP: Arnoldi compiled (100 linearized HVPs + coordinates, pure JAX)", "1/10",
         args.dattri_arnoldi_mlp / 10, mlp_program),
        ("MLP: Arnoldi compiled (first layer's products + coordinates' product only: "
         "a lower bound)", "1/10", args.dattri_arnoldi_mlp / 10, mlp_bound),
        ("MLP: TRAK (dense projection) compiled (the projection product only)", "1/10",
         args.dattri_trak_mlp / 10, dense_mlp),
        ("MLP: TracIn (dense projection, 3 checkpoints) compiled (the projection products "
         "only)", "1/10", args.dattri_tracin_mlp / 10, 3 * dense_mlp),
        ("end to end, warm", "1/5", args.dattri_e2e / 5, imports(max(1, args.reps // 2))),
    ]
    print("| cell (LR unless named, 5,000 × 500) | bound | bound s | least work, pure JAX, s | floor / bound |")
    print("|---|---|---|---|---|")
    for name, frac, bound, floor in rows:
        print(f"| {name} | {frac} of dattri | {bound:.3f} | {floor:.3f} | {floor / bound:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
