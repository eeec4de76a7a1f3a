"""``python benchmarks/ekfac_accuracy.py``: how far EK-FAC / K-FAC influence is from exact
influence, over damping (float64).

For each problem and damping λ, the scores of ``influence_ekfac`` (curvature
``"empirical"`` and ``"ggn"``; EK-FAC and K-FAC = ``correct_eigenvalues=False``) are
compared with those of ``influence_explicit`` (dense Hessian H of the mean training
loss, + λI) at the SAME λ (each method fitted once per problem, λ applied at
``attribute`` time): pooled Pearson over all (train, test) pairs, and the mean
over test points of the per-test-point Pearson and Spearman over training examples.

Damping grid: λ = rel · tr(H)/d + shift, rel ∈ {0.001, 0.01, 0.1, 1, 3, 10}, shift = 1e-3,
or 2·|λ_min(H)| when H is indefinite (the MLP), so that H + λI stays positive definite.

Problems:
  linear-mse    one Dense, squared loss, 3 outputs: H = E[ããᵀ] ⊗ I is a Kronecker
                product, so GGN-EK-FAC and GGN-K-FAC are exact.
  softmax s0/s1 one Dense, 4-class softmax, toy data (80 train / 20 test, 6-dim inputs),
                two seeds.
  binary-lr     one Dense, 2-class softmax: H = Σ_i p_i(1 − p_i) ã_i ã_iᵀ ⊗ vvᵀ
                (v = (1, −1)) is a Kronecker product too, but Q_A diagonalises E[ããᵀ],
                not the p(1 − p)-weighted sum.
  digits-lr     the ``digits_lr`` benchmark model and loss (1000 train, first 50 test).
  mlp s0/s1     ReLU MLP 6-8-4 (two Dense layers), toy data, two seeds. Also compared
                with influence under the exact Gauss-Newton matrix
                G = mean_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i (dense, built here), to separate
                H-vs-G from block-diagonal-Kronecker-vs-G.

Toy models are trained by full-batch Adam with a small L2 term (1e-3) that is not part
of the loss being attributed.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

import jattri
from jattri.bench import machine
from jattri.methods.influence import influence_ekfac, influence_explicit
from jattri.models import MLP, LogisticRegression

RELS = (0.001, 0.01, 0.1, 1.0, 3.0, 10.0)
FLOOR = 1e-3
VARIANTS = (("ekfac", "empirical", True), ("ekfac", "ggn", True),
            ("kfac", "empirical", False), ("kfac", "ggn", False))


# --------------------------------------------------------------------------- problems

def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _toy_data(n, d_in, classes, seed):
    """Gaussian inputs, labels from a random linear model plus Gumbel noise (as tests/_toy)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (n, d_in), jnp.float64)
    w = jax.random.normal(k2, (d_in, classes), jnp.float64)
    y = jnp.argmax(x @ w + jax.random.gumbel(k3, (n, classes), jnp.float64), -1)
    return x, y


def _ce_loss(model):
    def loss_fn(p, z):
        logits = model.apply({"params": p}, z[0][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1])
    return loss_fn


def _train(loss_fn, params, data, steps=300, lr=0.05, l2=1e-3):
    """Full-batch Adam on the mean loss + (l2/2)‖θ‖² (the same as tests/test_ekfac_ggn)."""
    def total(p):
        reg = 0.5 * l2 * sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))
        return jnp.mean(jax.vmap(lambda z: loss_fn(p, z))(data)) + reg

    opt = optax.adam(lr)

    @jax.jit
    def run(p):
        def step(c, _):
            p, s = c
            u, s = opt.update(jax.grad(total)(p), s)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(step, (p, opt.init(p)), None, length=steps)[0][0]

    return run(params)


def toy_softmax(model, seed, n_train=80, n_test=20, classes=4, ggn_reference=False):
    """``(loss_fn, params, train, test, logits_fn)`` of a trained toy classifier;
    ``logits_fn`` (for the exact Gauss-Newton reference) is ``None`` unless asked for."""
    x, y = _toy_data(n_train + n_test, 6, classes, seed)
    params = _f64(model.init(jax.random.PRNGKey(seed + 1), x[:1])["params"])
    loss = _ce_loss(model)
    train, test = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    params = _train(loss, params, train)
    logits = lambda p, x: model.apply({"params": p}, x[None])[0]
    return loss, params, train, test, logits if ggn_reference else None


def linear_mse(seed=5, n_train=80, n_test=20, outputs=3):
    """One Dense with 0.5‖Wx + b − t‖², fitted by least squares (its exact optimum)."""
    model = LogisticRegression(num_classes=outputs)  # one Dense, used as a linear map
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    n = n_train + n_test
    x = jax.random.normal(k1, (n, 6), jnp.float64) + 0.5
    t = x @ jax.random.normal(k2, (6, outputs), jnp.float64) + 0.3 * jax.random.normal(
        k3, (n, outputs), jnp.float64)
    train, test = (x[:n_train], t[:n_train]), (x[n_train:], t[n_train:])
    a = jnp.concatenate([train[0], jnp.ones((n_train, 1))], 1)
    w = jnp.linalg.lstsq(a, train[1])[0]
    params = {"linear": {"kernel": w[:-1], "bias": w[-1]}}
    loss = lambda p, z: 0.5 * jnp.sum((model.apply({"params": p}, z[0]) - z[1]) ** 2)
    return loss, params, train, test, None


def digits_lr(n_test=50):
    bench = jattri.benchmark.load("digits_lr", progress=None)
    params = _f64(bench.models_full[0])
    loss = lambda p, z: bench.loss_fn(p, z)
    (xtr, ytr), (xte, yte) = bench.train, bench.test
    train = (jnp.asarray(xtr, jnp.float64), jnp.asarray(ytr))
    test = (jnp.asarray(xte[:n_test], jnp.float64), jnp.asarray(yte[:n_test]))
    return loss, params, train, test, None


def problems():
    yield "linear-mse", linear_mse()
    for seed in (0, 1):
        yield f"softmax s{seed}", toy_softmax(LogisticRegression(num_classes=4), seed)
    yield "binary-lr", toy_softmax(LogisticRegression(num_classes=2), 0, classes=2)
    yield "digits-lr", digits_lr()
    for seed in (0, 1):
        yield f"mlp s{seed}", toy_softmax(MLP(hidden=(8,), num_classes=4), seed + 2,
                                          ggn_reference=True)


# ------------------------------------------------------------------ dense references

def dense_curvatures(loss, params, train, logits_fn=None):
    """``{"H": H, "G": G, "B": B}``, each ``(d, d)``: the Hessian of the mean training
    loss; when ``logits_fn`` is given also the exact Gauss-Newton matrix
    G = mean_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i of a softmax cross-entropy
    (J_i = ∂logits_i/∂θ) and B, G with the blocks between different top-level layers
    of ``params`` set to zero (what a block-diagonal method can at best reach)."""
    theta, unravel = ravel_pytree(params)
    mean_loss = lambda th: jnp.mean(jax.vmap(lambda z: loss(unravel(th), z))(train))
    out = {"H": np.asarray(jax.jit(jax.hessian(mean_loss))(theta))}
    if logits_fn is None:
        return out

    def one(x):
        jac = jax.jacobian(lambda th: logits_fn(unravel(th), x))(theta)  # (c, d)
        p = jax.nn.softmax(logits_fn(params, x))
        return jac.T @ (jnp.diag(p) - jnp.outer(p, p)) @ jac

    out["G"] = np.asarray(jnp.mean(jax.jit(jax.vmap(one))(train[0]), 0))
    layer = np.asarray(ravel_pytree({name: jax.tree_util.tree_map(
        lambda a, k=k: jnp.full(a.shape, k), params[name])
        for k, name in enumerate(sorted(params))})[0])
    out["B"] = out["G"] * (layer[:, None] == layer[None, :])
    return out


def flat_grads(loss, params, data):
    """Per-example gradients ``(n, d)`` of ``loss``, flattened by ``ravel_pytree``."""
    theta, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.vmap(
        lambda z: jax.grad(lambda th: loss(unravel(th), z))(theta)))(data))


def dense_scores(g_train, g_test, curvature, damping):
    """g_iᵀ (C + λI)⁻¹ g_t, ``(n_train, n_test)``, for a dense curvature C."""
    c = curvature + damping * np.eye(len(curvature))
    return g_train @ np.linalg.solve(c, g_test.T)


# ---------------------------------------------------------------------------- metrics

def agreement(got, want):
    """``(pooled Pearson, mean per-test Pearson, mean per-test Spearman)``; scores are
    ``(n_train, n_test)``, so a test point is a column."""
    got, want = np.asarray(got), np.asarray(want)
    pooled = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    pear = np.mean([np.corrcoef(got[:, t], want[:, t])[0, 1] for t in range(got.shape[1])])
    spear = np.mean([spearmanr(got[:, t], want[:, t])[0] for t in range(got.shape[1])])
    return float(pooled), float(pear), float(spear)


def ekfac_fit(loss, params, train, curvature, correct):
    """``(attributor, state)``: EK-FAC / K-FAC factors fitted once; every damping is
    then applied at ``attribute`` time without refitting."""
    attr = influence_ekfac(loss, curvature=curvature, correct_eigenvalues=correct)
    return attr, attr.cache(params, train)


def ekfac_scores(fitted, test, damping):
    attr, state = fitted
    return np.asarray(attr.attribute(state, test, damping=damping))


def explicit_scores(loss, params, train, test, dampings):
    """Exact influence at every damping of ``dampings`` (one eigendecomposition of H)."""
    attr = influence_explicit(loss, damping=min(dampings))
    state = attr.cache(params, train)
    return [np.asarray(attr.attribute(state, test, damping=lam)) for lam in dampings]


def dampings(h, rels=RELS):
    """``[(rel, λ)]`` with λ = rel · mean eigenvalue of ``h`` + shift (see the module
    docstring), and the eigenvalues of ``h``."""
    eig = np.linalg.eigvalsh(h)
    shift = max(FLOOR, 2 * max(0.0, -eig[0]))
    return [(rel, rel * eig.mean() + shift) for rel in rels], eig


def run_problem(name, problem, rels=RELS):
    """Rows ``(name, ref, rel, λ, {method: (pooled, pearson, spearman)})`` comparing
    every EK-FAC / K-FAC variant and Grad-Dot with dense influence under curvature
    ``ref`` (H; and G, B for the MLPs), and rows ``(name, "X~Y", rel, λ, agreement)``
    between the dense references themselves."""
    loss, params, train, test, logits_fn = problem
    curv = dense_curvatures(loss, params, train, logits_fn)
    grid, eig = dampings(curv["H"], rels)
    g_tr, g_te = flat_grads(loss, params, train), flat_grads(loss, params, test)
    info = (f"{name}: d = {len(eig)}, n_train = {len(g_tr)}, n_test = {len(g_te)}, "
            f"eig(H) in [{eig[0]:.3g}, {eig[-1]:.3g}], mean {eig.mean():.3g}")
    fitted = {f"{kind}-{c}": ekfac_fit(loss, params, train, c, correct)
              for kind, c, correct in VARIANTS}
    exacts = explicit_scores(loss, params, train, test, [lam for _, lam in grid])
    rows, ref_rows = [], []
    for (rel, lam), exact in zip(grid, exacts):
        want = {ref: dense_scores(g_tr, g_te, c, lam) for ref, c in curv.items()}
        # the hand-built route reproduces the library's exact influence
        np.testing.assert_allclose(want["H"], exact, rtol=1e-6,
                                   atol=1e-9 * np.abs(exact).max())
        approx = {k: ekfac_scores(f, test, lam) for k, f in fitted.items()}
        approx["dot"] = g_tr @ g_te.T
        for ref, w in want.items():
            rows.append((name, ref, rel, lam, {k: agreement(v, w) for k, v in approx.items()}))
        if "G" in want:
            ref_rows.append((name, "G~H", rel, lam, agreement(want["G"], want["H"])))
            ref_rows.append((name, "B~G", rel, lam, agreement(want["B"], want["G"])))
    return info, rows, ref_rows


# ---------------------------------------------------------------------------- report

METHODS = ("ekfac-empirical", "ekfac-ggn", "kfac-empirical", "kfac-ggn", "dot")
SHORT = ("EK-emp", "EK-ggn", "K-emp", "K-ggn", "dot")
METRICS = ("pooled Pearson", "mean per-test-point Pearson", "mean per-test-point Spearman")


def format_table(rows, metric):
    head = (f"{'problem':<11} {'ref':<3} {'rel':>5} {'lambda':>9}  "
            + " ".join(f"{s:>7}" for s in SHORT))
    lines = [f"{METRICS[metric]}:", head, "-" * len(head)]
    for name, ref, rel, lam, res in rows:
        lines.append(f"{name:<11} {ref:<3} {rel:>5g} {lam:>9.3g}  "
                     + " ".join(f"{res[m][metric]:>7.3f}" for m in METHODS))
    return "\n".join(lines)


def format_ref_table(rows):
    head = (f"{'problem':<11} {'pair':<4} {'rel':>5} {'lambda':>9}  {'pooled':>7} "
            f"{'pt-Pearson':>10} {'pt-Spearman':>11}")
    lines = [head, "-" * len(head)]
    for name, pair, rel, lam, (a, b, c) in rows:
        lines.append(f"{name:<11} {pair:<4} {rel:>5g} {lam:>9.3g}  {a:>7.3f} {b:>10.3f} "
                     f"{c:>11.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None,
                        help="comma-separated problem names (default: all)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    only = None if args.only is None else set(args.only.split(","))
    t0 = time.perf_counter()
    infos, rows, ref_rows = [], [], []
    for name, problem in problems():
        if only is not None and name not in only:
            continue
        t = time.perf_counter()
        info, r, g = run_problem(name, problem)
        print(f"[ekfac_accuracy] {info} ({time.perf_counter() - t:.1f} s)",
              file=sys.stderr, flush=True)
        infos.append(info)
        rows += r
        ref_rows += g
    print(__doc__.split("\n\n")[1] + "\n")
    print("EK = EK-FAC, K = K-FAC, emp/ggn = curvature; dot = Grad-Dot g_iᵀg_t (the "
          "λ → ∞ limit of every method).\nref: the dense influence compared with, "
          "H = Hessian, G = exact Gauss-Newton, B = G block-diagonal over layers.\n")
    print("\n".join(infos))
    for metric in range(3):
        print("\n" + format_table(rows, metric))
    if ref_rows:
        print("\nDense references against each other (G~H: Gauss-Newton vs Hessian "
              "influence; B~G: block-diagonal vs full Gauss-Newton):\n")
        print(format_ref_table(ref_rows))
    exact = [res[m][0] for name, ref, _, _, res in rows if name == "linear-mse"
             for m in ("ekfac-ggn", "kfac-ggn")]
    if exact:
        print(f"\nlinear-mse, GGN EK-FAC and K-FAC: max 1 - pooled Pearson = "
              f"{1 - min(exact):.1e}")
    print(f"\nmachine: {machine()}\nwall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
