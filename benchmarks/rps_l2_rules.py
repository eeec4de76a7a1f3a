"""RPS's `l2`: the LDS over a grid, and three ground-truth-free rules for choosing it
(issue 12), on the embedded digits settings, in float64 from the first full model's
last-layer inputs (the refit of `jattri.methods.rps.refit_last_layer`, labels as
targets, no bias: RPS's defaults).

- **relative**: the refit's curvature scale, the mean eigenvalue of the Hessian of
  (1/n) Σ CE(softmax(f_i W), y_i) at W = 0, mean‖f‖²/p · (C − 1)/C² (the
  "0.1 × mean eigenvalue" family of Kronfluence / LoGra / EK-FAC applies to this);
  also printed at the refit's optimum for every grid value.
- **evidence** (MacKay 1992): the Gaussian-prior precision α = 2·n·l2 maximising the
  marginal likelihood under the Laplace approximation, by the fixed point
  α = γ / ‖W‖², γ = Σ_j h_j / (h_j + α), h_j the eigenvalues of the summed
  Gauss-Newton matrix Σ_i f_i f_iᵀ ⊗ (diag q_i − q_i q_iᵀ) at the refit.
- **cross-validation**: 5-fold held-out negative log-likelihood of the refit.
- **logit fidelity** (the default since 2026-11-30 22:40,
  `jattri.methods.rps.fidelity_l2`): the l2 whose refit's logits correlate best, rows
  centred, with the model's own logits on the training set (Yeh et al.'s fidelity
  check turned into the choice); printed per grid value and as the rule's choice.
- **dropout as L2** (Wager, Wang & Liang, 2013, "Dropout Training as Adaptive
  Regularization"): a softmax layer trained with dropout δ on its inputs f is, to second
  order, penalised by ½·δ/(1 − δ)·(1/n) Σ_i Σ_j f_ij² w_jᵀ(diag p_i − p_i p_iᵀ)w_j
  (w_j: row j of the trained last layer W, p_i its softmax); the isotropic l2 with the
  same value at W, added to the stationary L2's λ̂/2, is the refit's penalty the
  training imposed (printed for settings trained with dropout).

    python benchmarks/rps_l2_rules.py digits_lr digits_mlp digits_cnn
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jattri import metrics
from jattri.benchmark import load, registry
from jattri.methods.rps import fidelity_l2, logit_fidelity, refit_last_layer

jax.config.update("jax_enable_x64", True)
# setting -> (last layer, dropout rate on its inputs in training: jattri.benchmark.digits)
DROPOUT = {"digits_mlp": ("fc3", 0.1)}
GRID = (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1, 0.2, 0.3, 1.0)


def features(bench, params, data):
    f = registry._last_layer_input(bench)
    return np.asarray(jax.vmap(lambda x, y: f(params, (x, y)))(*data), np.float64)


def refit(f, targets, l2):
    w, _ = refit_last_layer(jnp.asarray(f), jnp.asarray(targets), l2, maxiter=3000,
                            tol=1e-9)
    return np.asarray(w)


def dropout_l2(f, kernel, bias, rate):
    """The isotropic l2 equal at W to dropout's quadratic penalty (module docstring)."""
    probs = np.asarray(jax.nn.softmax(f @ kernel + bias))
    quad = (np.einsum("ic,jc->ij", probs, kernel ** 2)
            - np.einsum("ic,jc->ij", probs, kernel) ** 2)  # w_jᵀ A_i w_j
    return 0.5 * rate / (1 - rate) * np.sum(f ** 2 * quad) / len(f) / np.sum(kernel ** 2)


def main(settings):
    for setting in settings:
        bench = load(setting, progress=None)
        params = bench.models_full[0]
        f, ft = features(bench, params, bench.train), features(bench, params, bench.test)
        y, yt = np.asarray(bench.train[1]), np.asarray(bench.test[1])
        n, p = f.shape
        c = int(y.max()) + 1
        if setting in DROPOUT:
            last = params[DROPOUT[setting][0]]
            extra = dropout_l2(f, np.asarray(last["kernel"], np.float64),
                               np.asarray(last["bias"], np.float64), DROPOUT[setting][1])
            print(f"  dropout {DROPOUT[setting][1]} on the last layer's inputs as L2: "
                  f"{extra:.3g} (add the stationary L2's λ̂/2)", flush=True)
        onehot = np.eye(c)[y]
        logits = np.asarray(bench.apply_fn(params, bench.train[0]), np.float64)
        msq = float(np.mean(np.sum(f ** 2, 1)) / p)
        print(f"{setting}: n {n}, p {p}, C {c}; mean eigenvalue of the refit Hessian at "
              f"W = 0: {msq * (c - 1) / c ** 2:.4g}", flush=True)
        for l2 in GRID:
            w = refit(f, onehot, l2)
            q = np.asarray(jax.nn.softmax(f @ w))
            alpha = (onehot - q) / (2 * l2 * n)
            lds = float(np.nanmean(metrics.lds(alpha[:, yt] * (f @ ft.T), *bench.lds)))
            at_opt = float(np.mean(np.sum(f ** 2, 1)[:, None] * q * (1 - q)) / p)
            fid = float(logit_fidelity(jnp.asarray(f @ w), jnp.asarray(logits)))
            print(f"  l2 {l2:<6g} LDS {lds:.3f}   mean diagonal curvature at the refit "
                  f"{at_opt:.4g} (2·l2 / it = {2 * l2 / at_opt:.2f})   logit fidelity "
                  f"{fid:.5f}", flush=True)
        l2 = float(fidelity_l2(jnp.asarray(f), jnp.asarray(logits), jnp.asarray(onehot),
                               maxiter=3000, tol=1e-9))
        w = refit(f, onehot, l2)
        q = np.asarray(jax.nn.softmax(f @ w))
        alpha = (onehot - q) / (2 * l2 * n)
        lds = float(np.nanmean(metrics.lds(alpha[:, yt] * (f @ ft.T), *bench.lds)))
        print(f"  logit fidelity (the default): l2 = {l2:.3g} -> LDS {lds:.3f}", flush=True)
        l2 = 1e-3
        for _ in range(50):  # MacKay's evidence fixed point
            w = refit(f, onehot, l2)
            q = np.asarray(jax.nn.softmax(f @ w))
            a = np.einsum("ic,cd->icd", q, np.eye(c)) - np.einsum("ic,id->icd", q, q)
            h = np.einsum("ia,ib,icd->acbd", f, f, a).reshape(p * c, p * c)
            eig = np.clip(np.linalg.eigvalsh(h), 0, None)
            prec = 2 * n * l2
            new = float(np.sum(eig / (eig + prec)) / np.sum(w * w)) / (2 * n)
            converged = abs(np.log(new / l2)) < 1e-3
            l2 = new
            if converged:
                break
        print(f"  evidence (MacKay): l2 = {l2:.3g}", flush=True)
        folds = np.array_split(np.random.default_rng(0).permutation(n), 5)
        nll = {}
        for l2 in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0):
            total = 0.0
            for held in folds:
                kept = np.setdiff1d(np.arange(n), held)
                w = refit(f[kept], onehot[kept], l2)
                logq = np.asarray(jax.nn.log_softmax(f[held] @ w))
                total -= float(np.sum(logq[np.arange(len(held)), y[held]]))
            nll[l2] = total / n
        best = min(nll, key=nll.get)
        print("  5-fold CV held-out NLL: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in nll.items())
              + f" -> l2 = {best:g}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["digits_lr", "digits_mlp", "digits_cnn"])
