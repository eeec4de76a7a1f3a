"""jattri against dattri 0.3.0 (PyTorch, CPU), side by side, in fresh processes (issue 15).

Workload: MNIST-shaped (784 features, 10 classes) from scikit-learn's bundled digits,
upsampled 8x8 -> 28x28 and augmented by small shifts and pixel noise (nothing is
downloaded). Models: dattri's own ``LogisticRegressionMnist`` (7,850 params) and
``MLPMnist`` (109,386 params, eval mode), briefly trained with torch SGD; the weights
are saved with ``torch.save`` and read by jattri through ``jattri.interop.load_pt``
(dattri reads them with ``torch.load``). jattri's side of the model is the same forward
pass written in plain JAX over those arrays (checked against jattri's Flax port before
any timed process); ``--jattri-model flax`` uses the Flax port and
``jattri.interop.convert`` instead, and its processes then also import flax.

Every (method, library) run is its own process (``--worker``); per repetition the order
alternates (dattri first, then jattri first), and jattri runs twice from one fresh
``JATTRI_COMPILE_CACHE`` directory: "cold" (empty persistent compilation cache) then
"warm" (the same directory again). Each process reports

- first call: the first ``cache`` + ``attribute`` in the process (compilation included),
- compiled: the second ``cache`` + ``attribute`` of the same work in the same process,
- end to end: from just before the parent spawns the process to the moment the child
  holds the first scores (imports, weight and data loading included),
- peak memory: the child's VmHWM from /proc/self/status at exit,

with every installed module byte-compiled: pip compiles dattri's and torch's on
install, and the parent compiles jattri's source tree once before the first process
(an editable install under ``PYTHONDONTWRITEBYTECODE=1`` never writes them, and every
jattri process would recompile its 14,000 lines: ``import jattri`` took 0.23-0.26 s
instead of 0.05 s on a 2-core box where ``import jax`` takes 1.5 s),

and the parent computes the Pearson correlation of the two libraries' score matrices
(both orient scores the same way: > 0 = the training example lowers the test loss;
dattri's influence functions return g_iᵀ(H + λI)⁻¹g_t exactly as jattri's, so no sign
is flipped; RPS differs by the positive factor 1/n).

    pip install -e ".[compare]"
    python benchmarks/vs_dattri.py --quick                 # 500 x 50, 1 repetition
    python benchmarks/vs_dattri.py                         # 5,000 x 500, LR and MLP, 3 reps
    python benchmarks/vs_dattri.py --models lr --methods grad_dot,if_cg --json runs.json
    python benchmarks/vs_dattri.py --models mlp --methods trak,trak_bf16   # bfloat16 product
    # CG on the MLP where dattri fits in 24 GiB (1,000 train): H + 0.168·I, the rule's
    # damping there, is indefinite (jattri raises), so λ is given
    python benchmarks/vs_dattri.py --models mlp --methods if_cg --n-train 1000 --n-test 50 \
        --damping 1.0

Hyperparameters are mapped method by method (``_settings``): the same damping, the
same full-batch Hessian (dattri's full-train loader is one batch), the same projection
dimension, the same CG/LiSSA/Arnoldi iteration counts; where the two libraries
parametrise differently the mapping is stated next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

METHODS = ("grad_dot", "grad_cos", "tracin", "trak", "if_explicit", "if_cg", "if_lissa",
           "if_arnoldi", "if_datainf", "if_ekfac", "rps", "tracin_kron", "trak_kron",
           "tracin_bf16", "trak_bf16")
#: jattri variants timed against dattri's method of the same name: TracIn and TRAK with
#: ``projection="kronecker"`` (dattri has only dense projections; same k), and with
#: ``projection_dtype="bfloat16"`` (the dense projection's product in bfloat16).
VARIANTS = {"tracin_kron": "tracin", "trak_kron": "trak", "tracin_bf16": "tracin",
            "trak_bf16": "trak"}
#: What runs without ``--methods``: the bfloat16 variants (an option, not jattri's
#: default) only when named.
DEFAULT_METHODS = tuple(m for m in METHODS if not m.endswith("_bf16"))
MODELS = ("lr", "mlp")
#: The environment's OpenBLAS thread timeout before this process imports jattri (which
#: sets one, jattri._blas): dattri's workers get the environment as the user left it.
_USER_BLAS_TIMEOUT = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
#: Deterministic methods whose scores must agree (Pearson >= 0.99, issue 15).
DETERMINISTIC = ("grad_dot", "grad_cos", "if_explicit", "if_cg")
LR_EPOCHS = (1, 2, 3)     # checkpoints saved after these epochs; the last one is scored
LR_SGD = 0.05
RPS_DATTRI_EPOCHS = 200


# ----------------------------------------------------------------------------- data

def _make_data(n_train: int, n_test: int):
    """Digits upsampled to 28x28 in [0, 1], shifted by up to 2 pixels, with noise."""
    import numpy as np
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = np.stack([zoom(im / 16.0, 3.5, order=1) for im in digits.images])  # (1797, 28, 28)
    rng = np.random.default_rng(0)
    n = n_train + n_test
    idx = rng.integers(0, len(base), n)
    shifts = rng.integers(-2, 3, (n, 2))
    x = np.stack([np.roll(base[i], tuple(s), axis=(0, 1)) for i, s in zip(idx, shifts)])
    x = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0.0, 1.0).astype(np.float32)
    x = x.reshape(n, 784)
    y = digits.target[idx].astype(np.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _torch_model(name: str):
    from dattri.benchmark.models.logistic_regression.logistic_regression import (
        LogisticRegressionMnist)
    from dattri.benchmark.models.mlp.mlp import MLPMnist
    model = LogisticRegressionMnist() if name == "lr" else MLPMnist()
    return model.eval()


def _dense_params(state_dict) -> dict:
    """dattri's MNIST model as a pure-JAX user holds it, from the state_dict that
    ``jattri.interop.load_pt`` reads: ``{layer: {"kernel": (in, out), "bias": (out,)}}``
    (torch's ``Linear.weight`` is ``(out, in)``)."""
    import jax
    import numpy as np
    layers = sorted({k.rsplit(".", 1)[0] for k in state_dict})
    return {name: {"kernel": jax.device_put(np.ascontiguousarray(
                       np.asarray(state_dict[f"{name}.weight"]).T)),
                   "bias": jax.device_put(np.asarray(state_dict[f"{name}.bias"]))}
            for name in layers}


def _dense_logits(p: dict, x):
    """The eval-mode forward of ``LogisticRegressionMnist`` (``linear``) and ``MLPMnist``
    (``fc1``-``fc3``, ReLU between, dropout off) on ``_dense_params``: ``(..., 784) ->
    (..., 10)``. Each layer is ``jattri.func.dense`` (``x @ kernel + bias``), the way a
    plain-JAX model names its linear layers to jattri's factored routes."""
    import jax
    from jattri.func import dense
    layers = sorted(p)
    for k, name in enumerate(layers):
        x = dense(x, p[name]["kernel"], p[name]["bias"])
        if k < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def _prepare(work: str, model_name: str, n_train: int, n_test: int,
             jattri_model: str = "jax", damping: float | None = None) -> dict:
    """Data, trained checkpoints (torch.save) and the mapped hyperparameters;
    ``damping`` (``--damping``) replaces the rule's λ, and LiSSA's scale with it."""
    import numpy as np
    import torch

    os.makedirs(work, exist_ok=True)
    xtr, ytr, xte, yte = _make_data(n_train, n_test)
    np.savez(os.path.join(work, "data.npz"), xtr=xtr, ytr=ytr, xte=xte, yte=yte)
    torch.manual_seed(0)
    model = _torch_model(model_name).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR_SGD)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    ckpts = []
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, max(LR_EPOCHS) + 1):
        perm = torch.randperm(n_train, generator=gen)
        for b in range(0, n_train, 64):
            i = perm[b:b + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i]), yt[i]).backward()
            opt.step()
        if epoch in LR_EPOCHS:
            path = os.path.join(work, f"ckpt_{epoch}.pt")
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
            ckpts.append(path)
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    settings = _settings(model_name, ckpts[-1], xtr, ytr, damping)
    settings.update(ckpts=ckpts, test_accuracy=acc, n_train=n_train, n_test=n_test,
                    model=model_name, jattri_model=jattri_model)
    with open(os.path.join(work, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return settings


def _settings(model_name: str, ckpt: str, xtr, ytr, damping: float | None = None) -> dict:
    """Hyperparameters of both libraries, from curvature statistics of the scored
    checkpoint (computed once here, outside every timed process); ``damping`` replaces
    the rule's λ (everything made from λ follows it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    import jattri

    params = jattri.interop.convert(jattri.interop.load_pt(ckpt), f"mnist_{model_name}")["params"]
    module = jattri.models.build(f"mnist_{model_name}").module
    x, y = jnp.asarray(xtr), jnp.asarray(ytr.astype(np.int32))
    # the two jattri-side definitions of the model (--jattri-model) compute the same logits
    gap = float(jnp.max(jnp.abs(_dense_logits(_dense_params(jattri.interop.load_pt(ckpt)), x)
                                - module.apply({"params": params}, x))))
    if not gap <= 1e-4:
        raise AssertionError(f"pure-JAX and Flax logits differ by {gap:.3g}")

    def loss(p, xi, yi):
        return -jax.nn.log_softmax(module.apply({"params": p}, xi))[yi]

    def mean_loss(p):
        return jnp.mean(jax.vmap(loss, (None, 0, 0))(p, x, y))

    flat, unravel = ravel_pytree(params)
    hvp = jax.jit(lambda v: ravel_pytree(
        jax.jvp(jax.grad(mean_loss), (params,), (unravel(v),))[1])[0])
    v = jax.random.normal(jax.random.PRNGKey(1), flat.shape)
    for _ in range(30):  # power iteration: the largest |eigenvalue| of H
        w = hvp(v / jnp.linalg.norm(v))
        top = float(jnp.linalg.norm(w))
        v = w
    # mean squared per-example gradient per layer (DataInf's λ_l = damping · this)
    grads = jax.jit(jax.vmap(jax.grad(loss), (None, 0, 0)))
    sums = None
    for b in range(0, len(xtr), 500):
        g = grads(params, x[b:b + 500], y[b:b + 500])
        s = {k: sum(float(jnp.sum(leaf ** 2)) for leaf in jax.tree_util.tree_leaves(g[k]))
             for k in g}
        sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    sizes = {k: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params[k]))
             for k in params}
    n = len(xtr)
    layer_stat = {k: sums[k] / (n * sizes[k]) for k in sums}
    overall_stat = sum(sums.values()) / (n * sum(sizes.values()))
    # λ = 1% of the top eigenvalue (LR), 10% (MLP: its Hessian is indefinite)
    if damping is None:
        damping = float(f"{(0.01 if model_name == 'lr' else 0.1) * top:.3g}")
    damping = float(damping)
    datainf = 0.1
    return dict(
        top_eigenvalue=top, damping=damping,
        cg_maxiter=20,
        lissa=dict(depth=100 if model_name == "lr" else 30, batch_size=100,
                   scale=float(f"{2.0 * top + damping:.3g}")),
        arnoldi=dict(rank=50, num_iters=100),
        # k < n, so that the unregularised TRAK kernel (dattri's default λ = 0) is invertible
        proj_dim=min(512, len(xtr) // 2), trak_damping=0.0, rps_l2=0.003,
        # dattri's refit: SGD with line search, `epoch` steps (default 3000, minutes per
        # call here); jattri's: L-BFGS to a gradient-norm tolerance
        rps_dattri_epochs=RPS_DATTRI_EPOCHS,
        datainf_damping=datainf,
        # dattri's regularization is one absolute λ for all layers; jattri's is relative
        # per layer (λ_l = damping · mean ‖g_l‖²/d_l): exact on the LR (one layer), the
        # parameter-weighted mean on the MLP
        datainf_dattri_reg=datainf * (layer_stat[next(iter(layer_stat))]
                                      if len(layer_stat) == 1 else overall_stat),
        datainf_layer_stat=layer_stat,
        # dattri's DataInf holds a (train batch, test batch, d) tensor: 50 x 50 x d
        datainf_test_batch=50,
    )


# --------------------------------------------------------------------------- workers

def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _jattri_worker(method: str, work: str, cfg: dict):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jattri

    compiles = {"n": 0}

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    data = np.load(os.path.join(work, "data.npz"))
    # jax.device_put, not jnp.asarray: under jax 0.10 each jnp.asarray of a numpy array
    # compiles a small program per shape (about 0.02 s each on a first call)
    train = jax.device_put((data["xtr"], data["ytr"].astype(np.int32)))
    test = jax.device_put((data["xte"], data["yte"].astype(np.int32)))
    if cfg["jattri_model"] == "flax":  # jattri's Flax port (imports flax: ~0.4 s here)
        arch = f"mnist_{cfg['model']}"
        module = jattri.models.build(arch).module
        ckpts = [jattri.interop.convert(jattri.interop.load_pt(p), arch)["params"]
                 for p in cfg["ckpts"]]
        logits_fn = lambda p, x: module.apply({"params": p}, x)
    else:  # the same model in plain JAX (jattri.func.dense layers), without Flax
        ckpts = [_dense_params(jattri.interop.load_pt(p)) for p in cfg["ckpts"]]
        logits_fn = _dense_logits
    params = ckpts[-1]

    def loss_fn(p, z):
        xi, yi = z
        return -jax.nn.log_softmax(logits_fn(p, xi))[yi]

    lam = cfg["damping"]
    members = params
    if method == "grad_dot":
        attr = jattri.grad_dot(loss_fn)
    elif method == "grad_cos":
        attr = jattri.grad_cos(loss_fn)
    elif method in ("tracin", "tracin_kron", "tracin_bf16"):
        members = jattri.checkpoints(ckpts)
        attr = jattri.tracin(loss_fn, weights=[LR_SGD] * len(ckpts), proj_dim=cfg["proj_dim"],
                             projection="kronecker" if method == "tracin_kron" else "auto",
                             projection_dtype="bfloat16" if method == "tracin_bf16" else None)
    elif method in ("trak", "trak_kron", "trak_bf16"):
        attr = jattri.trak(loss_fn, proj_dim=cfg["proj_dim"], damping=cfg["trak_damping"],
                           projection="kronecker" if method == "trak_kron" else "auto",
                           projection_dtype="bfloat16" if method == "trak_bf16" else None)
    elif method == "if_explicit":
        attr = jattri.influence_explicit(loss_fn, damping=lam)
    elif method == "if_cg":
        attr = jattri.influence_cg(loss_fn, damping=lam, maxiter=cfg["cg_maxiter"])
    elif method == "if_lissa":
        ls = cfg["lissa"]
        attr = jattri.influence_lissa(loss_fn, damping=lam, depth=ls["depth"],
                                      batch_size=ls["batch_size"], scale=ls["scale"])
    elif method == "if_arnoldi":
        ar = cfg["arnoldi"]
        attr = jattri.influence_arnoldi(loss_fn, rank=ar["rank"], num_iters=ar["num_iters"],
                                        damping=lam)
    elif method == "if_datainf":
        attr = jattri.influence_datainf(loss_fn, damping=cfg["datainf_damping"])
    elif method == "if_ekfac":
        attr = jattri.influence_ekfac(loss_fn, damping=lam)
    elif method == "rps":
        def features_fn(p, z):
            h = z[0]
            if cfg["model"] == "mlp":
                h = jax.nn.relu(h @ p["fc1"]["kernel"] + p["fc1"]["bias"])
                h = jax.nn.relu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
            return h

        attr = jattri.rps(features_fn=features_fn,
                          logits_fn=lambda p, z: logits_fn(p, z[0]),
                          label_fn=lambda z: z[1], l2=cfg["rps_l2"], bias=False)
    else:
        raise ValueError(method)

    def once():
        state = attr.cache(members, train)
        return np.asarray(jax.block_until_ready(attr.attribute(state, test)))

    return once, compiles


def _dattri_worker(method: str, work: str, cfg: dict):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.algorithm import (IFAttributorArnoldi, IFAttributorCG, IFAttributorDataInf,
                                  IFAttributorEKFAC, IFAttributorExplicit, IFAttributorLiSSA,
                                  RPSAttributor, TRAKAttributor, TracInAttributor)
    from dattri.task import AttributionTask

    method = VARIANTS.get(method, method)

    data = np.load(os.path.join(work, "data.npz"))
    xtr, ytr = torch.from_numpy(data["xtr"]), torch.from_numpy(data["ytr"])
    xte, yte = torch.from_numpy(data["xte"]), torch.from_numpy(data["yte"])
    n_train, n_test = len(xtr), len(xte)
    model = _torch_model(cfg["model"])
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in cfg["ckpts"]]
    model.load_state_dict(ckpts[-1])
    model.eval()

    def loss_func(params, data):
        # one example ((784,), ()) on the TracIn/TRAK path, (1, 784) on the IF path, a
        # batch (b, 784) for EK-FAC's covariances: the mean cross-entropy of the rows
        image, label = data
        yhat = torch.func.functional_call(model, params, image.reshape(-1, 784))
        return torch.nn.functional.cross_entropy(yhat, label.reshape(-1).long())

    def margin_func(params, data):  # TRAK's f = log p - log(1 - p), as dattri's examples
        logp = -loss_func(params, data)
        return logp - torch.log(1 - torch.exp(logp))

    def prob_func(params, data):
        return torch.exp(-loss_func(params, data))

    def rps_target(pre_activation, soft_labels):  # dattri's RPS target: CE on features
        return torch.nn.functional.cross_entropy(pre_activation, soft_labels)

    test_batch = cfg["datainf_test_batch"] if method == "if_datainf" else n_test
    full = DataLoader(TensorDataset(xtr, ytr), batch_size=n_train, shuffle=False)
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=n_train, shuffle=False)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=test_batch, shuffle=False)
    lam = cfg["damping"]

    def task(loss=loss_func, checkpoints=None, target=None):
        return AttributionTask(loss_func=loss, model=model,
                               checkpoints=ckpts[-1] if checkpoints is None else checkpoints,
                               target_func=target)

    if method in ("grad_dot", "grad_cos"):
        attr = TracInAttributor(task(), weight_list=torch.ones(1),
                                normalized_grad=method == "grad_cos")
        attr.projector_kwargs = None  # raw gradients (the class has no argument for it)
    elif method == "tracin":
        attr = TracInAttributor(task(checkpoints=ckpts),
                                weight_list=torch.full((len(ckpts),), LR_SGD),
                                normalized_grad=False,
                                projector_kwargs={"proj_dim": cfg["proj_dim"], "device": "cpu"})
    elif method == "trak":
        attr = TRAKAttributor(task(loss=margin_func), correct_probability_func=prob_func,
                              projector_kwargs={"proj_dim": cfg["proj_dim"], "device": "cpu"},
                              regularization=cfg["trak_damping"])
    elif method == "if_explicit":
        attr = IFAttributorExplicit(task(), regularization=lam)
    elif method == "if_cg":
        attr = IFAttributorCG(task(), max_iter=cfg["cg_maxiter"], regularization=lam)
    elif method == "if_lissa":
        ls = cfg["lissa"]
        # dattri: h <- v + (1 - d) h - H_S h / s, result h / s = (H + d·s I)^-1 v, so its
        # damping d is jattri's λ / s
        attr = IFAttributorLiSSA(task(), batch_size=ls["batch_size"],
                                 recursion_depth=ls["depth"], damping=lam / ls["scale"],
                                 scaling=ls["scale"])
    elif method == "if_arnoldi":
        ar = cfg["arnoldi"]
        attr = IFAttributorArnoldi(task(), proj_dim=ar["rank"], max_iter=ar["num_iters"],
                                   regularization=lam)
    elif method == "if_datainf":
        attr = IFAttributorDataInf(task(), regularization=cfg["datainf_dattri_reg"])
    elif method == "if_ekfac":
        attr = IFAttributorEKFAC(task(), damping=lam)
    elif method == "rps":
        attr = RPSAttributor(task(target=rps_target),
                             final_linear_layer_name="linear" if cfg["model"] == "lr" else "fc3",
                             l2_strength=cfg["rps_l2"], epoch=cfg["rps_dattri_epochs"])
    else:
        raise ValueError(method)

    def once():
        if method == "trak":
            attr.cache(full)
            scores = attr.attribute(test_loader)
        elif method in ("grad_dot", "grad_cos", "tracin"):
            attr.cache()
            scores = attr.attribute(train_loader, test_loader)
        else:
            attr.cache(full)
            scores = attr.attribute(train_loader, test_loader)
        return scores.detach().numpy()

    return once, None


def worker(lib: str, method: str, work: str, start: float, save: str | None,
           calls: int = 2) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    with open(os.path.join(work, "settings.json")) as f:
        cfg = json.load(f)
    make = _jattri_worker if lib == "jattri" else _dattri_worker
    once, compiles = make(method, work, cfg)
    t0 = time.time()
    scores = once()
    t1 = time.time()
    first_compiles = None if compiles is None else compiles["n"]
    scores2 = once() if calls == 2 else None  # calls=1: a dattri call of many minutes
    t2 = time.time()
    import numpy as np
    if save:
        np.save(save, scores.astype(np.float32))
    return dict(first_s=t1 - t0, compiled_s=t2 - t1 if calls == 2 else None, scores_at=t1,
                e2e_child_s=t1 - start, peak_mib=_vmhwm_mib(),
                finite=bool(np.all(np.isfinite(scores))),
                repeatable=None if scores2 is None else float(
                    np.max(np.abs(scores2 - scores)) / max(float(np.max(np.abs(scores))),
                                                          1e-30)),
                compiles=first_compiles,
                compiles_second=None if compiles is None else compiles["n"] - first_compiles)


# ---------------------------------------------------------------------------- parent

def _rss_gib(pid: int) -> float:
    """Resident memory of ``pid`` in GiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _spawn(lib: str, method: str, work: str, cache_dir: str | None, save: str | None,
           timeout: float, calls: int = 2, max_rss_gib: float = float("inf")) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if lib == "dattri":
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
        if _USER_BLAS_TIMEOUT is not None:
            env["OPENBLAS_THREAD_TIMEOUT"] = _USER_BLAS_TIMEOUT
    if cache_dir is not None:
        env["JATTRI_COMPILE_CACHE"] = cache_dir
    start = time.time()
    cmd = ([sys.executable, os.path.abspath(__file__), "--worker", lib, "--method", method,
            "--work", work, "--start", repr(start), "--calls", str(calls)]
           + (["--save", save] if save else []))
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
        peak = 0.0
        while proc.poll() is None:  # watch the child: a run that would exhaust the
            rss = _rss_gib(proc.pid)  # machine's memory is stopped before the kernel's
            peak = max(peak, rss)     # out-of-memory killer picks a victim
            if rss > max_rss_gib or time.time() - start > timeout:
                proc.kill()
                proc.wait()
                why = (f"timeout after {timeout:.0f} s" if rss <= max_rss_gib else
                       f"stopped at {rss:.1f} GiB resident (--max-rss-gib {max_rss_gib:g}) "
                       f"after {time.time() - start:.0f} s")
                return dict(error=why, peak_seen_gib=peak)
            time.sleep(0.2)
        out_f.seek(0)
        err_f.seek(0)
        out = subprocess.CompletedProcess(cmd, proc.returncode, out_f.read(), err_f.read())
    exit_s = time.time() - start
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        return dict(error=tail[0][:300])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["e2e_s"] = res["scores_at"] - start   # parent's clock: spawn to scores in hand
    res["exit_s"] = exit_s
    res["load1"] = os.getloadavg()[0]
    return res


def _pearson(a_path: str, b_path: str) -> float:
    import numpy as np
    a, b = np.load(a_path).ravel().astype(np.float64), np.load(b_path).ravel().astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def _byte_compile_jattri() -> None:
    """Write jattri's ``.pyc`` files as pip does for an installed package (dattri's and
    torch's were written on install), so no timed process recompiles jattri's source."""
    import compileall
    import importlib.util
    spec = importlib.util.find_spec("jattri")
    for where in spec.submodule_search_locations or ():
        compileall.compile_dir(where, quiet=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=("jattri", "dattri"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--start", type=float, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="500 train x 50 test, 1 repetition")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="default: all but the bfloat16 variants "
                        f"({', '.join(m for m in METHODS if m not in DEFAULT_METHODS)})")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; --quick 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per process")
    p.add_argument("--max-rss-gib", type=float, default=None,
                   help="stop a process whose resident memory passes this (default: 85%% "
                        "of physical memory), reported as an error instead of the kernel's "
                        "out-of-memory killer ending it or another process")
    p.add_argument("--jattri-model", choices=("jax", "flax"), default="jax",
                   help="jattri's side of the model: written in plain JAX over the "
                        "state_dict's arrays (default), or jattri.models' Flax port with "
                        "jattri.interop.convert (its process also imports flax)")
    p.add_argument("--damping", type=float, default=None,
                   help="the influence methods' damping λ for both libraries (default: 1%% "
                        "of H's top eigenvalue on the LR, 10%% on the MLP); e.g. where "
                        "H + λI is indefinite at a smaller --n-train")
    p.add_argument("--json", help="write every run here")
    p.add_argument("--calls", type=int, choices=(1, 2), default=2, help=argparse.SUPPRESS)
    p.add_argument("--dattri-calls", type=int, choices=(1, 2), default=2,
                   help="1: dattri's process makes only the first call (for methods whose "
                        "dattri call takes many minutes); its compiled column is then "
                        "empty and the compiled ratio is taken against dattri's first call, "
                        "marked *")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.method, args.work, args.start, args.save,
                                args.calls)))
        return 0
    if args.max_rss_gib is None:
        args.max_rss_gib = 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    n_train = args.n_train or (500 if args.quick else 5000)
    n_test = args.n_test or (50 if args.quick else 500)
    reps = args.reps or (1 if args.quick else 3)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(models) - set(MODELS)) + sorted(set(methods) - set(METHODS))
    if args.damping is not None and not args.damping > 0:
        p.error(f"--damping must be > 0, got {args.damping}")
    if bad or not models or not methods or reps < 1 or n_train < 1 or n_test < 1:
        p.error(f"--models from {','.join(MODELS)}, --methods from {','.join(METHODS)}, "
                f"positive sizes and --reps (unknown: {bad})")
    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as e:
            p.error(f"--json {args.json}: {e}")

    _byte_compile_jattri()
    root = tempfile.mkdtemp(prefix="vs_dattri_")
    rows, loads = [], []
    try:
        for model in models:
            work = os.path.join(root, model)
            t = time.time()
            cfg = _prepare(work, model, n_train, n_test, args.jattri_model, args.damping)
            print(f"[{model}] {n_train} x {n_test}, test accuracy {cfg['test_accuracy']:.3f}, "
                  f"top |eig| of H {cfg['top_eigenvalue']:.3g}, damping {cfg['damping']:.3g} "
                  f"(prepared in {time.time() - t:.0f} s)", flush=True)
            for method in methods:
                if method == "if_explicit" and model == "mlp":
                    continue  # a dense 109,386² Hessian (48 GB) in both libraries
                runs = {"dattri": [], "jattri_cold": [], "jattri_warm": []}
                saves = {lib: os.path.join(work, f"{method}_{lib}.npy")
                         for lib in ("dattri", "jattri")}
                for rep in range(reps):
                    xla = tempfile.mkdtemp(prefix="jattri_xla_", dir=root)
                    first = rep == 0

                    def run_dattri():
                        runs["dattri"].append(_spawn("dattri", method, work, None,
                                                     saves["dattri"] if first else None,
                                                     args.timeout, args.dattri_calls,
                                                     args.max_rss_gib))

                    def run_jattri():
                        runs["jattri_cold"].append(_spawn("jattri", method, work, xla,
                                                          saves["jattri"] if first else None,
                                                          args.timeout, 2, args.max_rss_gib))
                        runs["jattri_warm"].append(_spawn("jattri", method, work, xla, None,
                                                          args.timeout, 2, args.max_rss_gib))

                    order = (run_dattri, run_jattri) if rep % 2 == 0 else (run_jattri, run_dattri)
                    for fn in order:
                        fn()
                    shutil.rmtree(xla, ignore_errors=True)
                    loads.append(os.getloadavg())
                ok = {k: [r for r in v if "error" not in r] for k, v in runs.items()}
                med = lambda k, key: _median([r[key] for r in ok[k]])
                pearson = (_pearson(saves["jattri"], saves["dattri"])
                           if all(os.path.exists(s) for s in saves.values()) else None)
                row = dict(model=model, method=method, pearson=pearson, runs=runs,
                           errors={k: [r["error"] for r in v if "error" in r]
                                   for k, v in runs.items()})
                for k in runs:
                    for key in ("first_s", "compiled_s", "e2e_s", "peak_mib"):
                        row[f"{k}_{key}"] = med(k, key)
                    row[f"{k}_finite"] = all(r.get("finite", False) for r in ok[k]) and bool(ok[k])
                row["jattri_compiles"] = med("jattri_cold", "compiles")
                rows.append(row)
                d, c, w = (row["dattri_e2e_s"], row["jattri_cold_e2e_s"],
                           row["jattri_warm_e2e_s"])
                print(f"[{model}] {method:<12} e2e dattri {_fmt(d)} s, jattri cold {_fmt(c)} s, "
                      f"warm {_fmt(w)} s; compiled dattri {_fmt(row['dattri_compiled_s'], '.3f')} "
                      f"s, jattri {_fmt(row['jattri_warm_compiled_s'], '.3f')} s; pearson "
                      f"{_fmt(pearson, '.4f')}; load {os.getloadavg()[0]:.1f}"
                      + ("; errors " + json.dumps(row["errors"])
                         if any(row["errors"].values()) else ""), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ratio = lambda a, b: None if a is None or b is None or b == 0 else a / b
    print(f"\n{n_train} train x {n_test} test; median of {reps} alternated repetitions; "
          "times in seconds, peak = VmHWM in MiB; ratios jattri / dattri; "
          "e2e = process start to scores; jattri cold = empty persistent compilation cache, "
          "warm = the same cache directory again\n")
    print("| model | method | dattri first | jattri first (cold) | dattri compiled | "
          "jattri compiled | compiled ratio | dattri e2e | jattri e2e cold | jattri e2e warm | "
          "e2e cold ratio | e2e warm ratio | peak dattri | peak jattri | Pearson |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        comp = _median([r["jattri_cold_compiled_s"], r["jattri_warm_compiled_s"]])
        r["jattri_compiled_s"] = comp
        single = r["dattri_compiled_s"] is None  # --dattri-calls 1: against its first call
        r["ratio_compiled"] = ratio(comp, r["dattri_first_s" if single else
                                            "dattri_compiled_s"])
        r["ratio_e2e_cold"] = ratio(r["jattri_cold_e2e_s"], r["dattri_e2e_s"])
        r["ratio_e2e_warm"] = ratio(r["jattri_warm_e2e_s"], r["dattri_e2e_s"])
        nan = lambda lib: "" if r[f"{lib}_finite"] else " (non-finite)"
        print(f"| {r['model']} | {r['method']} | {_fmt(r['dattri_first_s'])}{nan('dattri')} | "
              f"{_fmt(r['jattri_cold_first_s'])}{nan('jattri_cold')} | "
              f"{_fmt(r['dattri_compiled_s'], '.3f')} | {_fmt(comp, '.3f')} | "
              f"{_fmt(r['ratio_compiled'])}{'*' if single else ''} | "
              f"{_fmt(r['dattri_e2e_s'])} | "
              f"{_fmt(r['jattri_cold_e2e_s'])} | {_fmt(r['jattri_warm_e2e_s'])} | "
              f"{_fmt(r['ratio_e2e_cold'])} | {_fmt(r['ratio_e2e_warm'])} | "
              f"{_fmt(r['dattri_peak_mib'], '.0f')} | "
              f"{_fmt(_median([r['jattri_cold_peak_mib'], r['jattri_warm_peak_mib']]), '.0f')} | "
              f"{_fmt(r['pearson'], '.4f')} |")
    machine = (f"{platform.platform()}, {os.cpu_count()} CPUs, python "
               f"{platform.python_version()}")
    load = [round(l[0], 2) for l in loads]
    print(f"\nmachine: {machine}; 1-min load average after each repetition: "
          f"min {min(load) if load else '–'}, max {max(load) if load else '–'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": machine, "reps": reps, "n_train": n_train,
                       "n_test": n_test, "load_after_reps": loads}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
