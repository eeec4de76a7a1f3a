"""RPS variants on the embedded digits settings (issue 12): mislabel-detection AUC
(10% flipped labels, jattri.benchmark.mislabel) and LDS, for refit targets
"predictions" / "labels", with and without a bias feature, at l2 = 1e-3 and 1e-2;
float64, alpha computed from jattri.methods.rps.refit_last_layer.

    python benchmarks/rps_defaults.py digits_lr
    python benchmarks/rps_defaults.py digits_mlp
"""
import numpy as np, jax, jax.numpy as jnp
from jattri.benchmark.mislabel import noisy_benchmark
from jattri.benchmark import registry, load
from jattri.methods.rps import refit_last_layer
from jattri import metrics
import sys
setting = sys.argv[1] if len(sys.argv) > 1 else "digits_lr"
def feats(b, params, data):
    f = registry._last_layer_input(b)
    F = jax.vmap(lambda x, y: f(params, (x, y)))(*data)
    L = jax.vmap(lambda x: b.apply_fn(params, x[None])[0])(data[0])
    return np.asarray(F, np.float64), np.asarray(L, np.float64)
jax.config.update("jax_enable_x64", True)
def alphas(F, L, y, l2, targets, bias):
    if bias: F = np.concatenate([F, np.ones((len(F),1))], 1)
    C = L.shape[1]
    P = jax.nn.softmax(L) if targets == "pred" else jax.nn.one_hot(y, C)
    w, g = refit_last_layer(jnp.asarray(F), jnp.asarray(P), l2, maxiter=2000, tol=1e-8)
    Q = jax.nn.softmax(F @ np.asarray(w))
    return F, np.asarray(P - Q) / (2*l2*len(F))
b, noisy = noisy_benchmark(setting)
params = b.models_full[0]
F, L = feats(b, params, b.train)
y = np.asarray(b.train[1])
for targets in ("pred", "labels"):
    for bias in (False, True):
        for l2 in (1e-3, 1e-2):
            Fb, A = alphas(F, L, y, l2, targets, bias)
            s = A[np.arange(len(y)), y] * np.sum(Fb**2, 1)
            print(setting, targets, "bias" if bias else "nobias", l2, "mislabel AUC", round(float(metrics.mislabel_auc(s, noisy)),3), "neg", round(float(metrics.mislabel_auc(-s, noisy)),3), flush=True)
# LDS on clean bench
bc = load(setting, progress=None)
params = bc.models_full[0]
F, L = feats(bc, params, bc.train); Ft, Lt = feats(bc, params, bc.test)
y = np.asarray(bc.train[1]); yt = np.asarray(bc.test[1])
for targets in ("pred", "labels"):
    for bias in (False, True):
        for l2 in (1e-3, 1e-2):
            Fb, A = alphas(F, L, y, l2, targets, bias)
            Ftb = np.concatenate([Ft, np.ones((len(Ft),1))], 1) if bias else Ft
            S = A[:, yt] * (Fb @ Ftb.T)
            print(setting, targets, "bias" if bias else "nobias", l2, "LDS", round(float(np.nanmean(metrics.lds(S, *bc.lds))),3), flush=True)
