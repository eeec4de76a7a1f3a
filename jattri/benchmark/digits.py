"""Embedded benchmark settings on scikit-learn's bundled *digits* (no download).

Split (fixed so results compare across libraries): ``X = pixels / 16`` (float32, 64
features), ``perm = np.random.default_rng(0).permutation(1797)``, train = ``perm[:1000]``,
test = ``perm[1000:1200]``.

* ``digits_lr``: multinomial logistic regression (one Dense), full-batch Adam on the
  L2-regularised mean cross-entropy, trained to (near) convergence.
* ``digits_mlp``: 64-128-64-10 MLP (``fc1``, ``fc2``, ``fc3``; ReLU, dropout 0.1),
  minibatch Adam with weight decay.

Ground truth for LDS: retrain on ``num_subsets`` random half subsets × ``num_seeds``
seeds, all models in one compiled program (``vmap`` over models), record the test loss.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattri._jit import jit
from jattri.models import MLP, LogisticRegression, SmallCNN


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """Hyperparameters of a digits setting; all of them key the ground-truth cache."""

    model: str                   # "lr" | "mlp" | "cnn"
    epochs: int
    batch_size: Optional[int]    # None = full batch
    learning_rate: float
    weight_decay: float          # L2 coefficient λ of (λ/2)‖θ‖² added to the mean loss
    dropout: float = 0.0
    num_full: int = 5            # models trained on the full training set
    num_subsets: int = 50        # LDS subsets
    num_seeds: int = 3           # seeds per LDS subset
    subset_fraction: float = 0.5
    lds_seed: int = 0
    n_train: int = 1000
    n_test: int = 200


SETTINGS = {
    "digits_lr": DigitsConfig(model="lr", epochs=600, batch_size=None, learning_rate=0.05,
                              weight_decay=1e-2),
    "digits_mlp": DigitsConfig(model="mlp", epochs=40, batch_size=50, learning_rate=3e-3,
                               weight_decay=1e-4, dropout=0.1, num_full=10),
    # Opt-in (not in the default run): Conv layers, small enough for a dense Hessian.
    "digits_cnn": DigitsConfig(model="cnn", epochs=40, batch_size=50, learning_rate=3e-3,
                               weight_decay=1e-3),
}


def digits_split(n_train: int = 1000, n_test: int = 200):
    """The fixed split: ``((x_train, y_train), (x_test, y_test))`` as numpy arrays."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits settings need scikit-learn (bundled data): "
                          "pip install 'jattri[bench]'") from err
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    return (x[tr], y[tr]), (x[te], y[te])


def make_model(cfg: DigitsConfig) -> nn.Module:
    if cfg.model == "lr":
        return LogisticRegression(num_classes=10)
    if cfg.model == "mlp":
        return MLP(hidden=(128, 64), num_classes=10, dropout_rate=cfg.dropout)
    if cfg.model == "cnn":
        return SmallCNN(num_classes=10)
    raise ValueError(f"unknown model {cfg.model!r}; expected 'lr', 'mlp' or 'cnn'")


def model_fns(cfg: DigitsConfig):
    """``(init_fn, apply_fn, loss_fn)`` of the setting's model.

    ``loss_fn(params, example, rng=None)``: cross-entropy of ONE example; ``rng`` turns
    dropout on under that key (``None``: deterministic), the contract of
    ``jattri.ensemble.dropout``.
    """
    model = make_model(cfg)

    def init_fn(key):
        return model.init(key, jnp.zeros((1, 64), jnp.float32))["params"]

    def apply_fn(params, x, rng=None):
        if rng is None:
            return model.apply({"params": params}, x)
        return model.apply({"params": params}, x, deterministic=False, rngs={"dropout": rng})

    def loss_fn(params, example, rng=None):
        x, y = example
        logits = apply_fn(params, x[None], rng)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return init_fn, apply_fn, loss_fn


def train_models(cfg: DigitsConfig, x, y, subsets, seeds):
    """Train one model per row of ``subsets`` with the matching seed, all vmapped.

    Args:
      x: ``(n, 64)``; y: ``(n,)`` labels. subsets: ``(M, m)`` int indices of the
      training examples each model sees. seeds: ``(M,)`` ints (init, order, dropout).
    Returns:
      params pytree with a leading model axis ``M``.
    """
    init_fn, apply_fn, _ = model_fns(cfg)
    x, y = jnp.asarray(x), jnp.asarray(y)
    subsets, seeds = jnp.asarray(subsets, jnp.int32), jnp.asarray(seeds, jnp.uint32)
    m = subsets.shape[1]
    bs = m if cfg.batch_size is None else min(cfg.batch_size, m)
    steps_per_epoch = m // bs
    num_steps = cfg.epochs * steps_per_epoch
    opt = optax.adam(cfg.learning_rate)
    train_mode = cfg.dropout > 0

    def objective(params, xb, yb, key):
        logits = apply_fn(params, xb, key if train_mode else None)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        l2 = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return ce + 0.5 * cfg.weight_decay * l2

    def train_one(subset, seed):
        key = jax.random.PRNGKey(seed)
        k_init, k_order, k_drop = jax.random.split(key, 3)
        params = init_fn(k_init)
        state = opt.init(params)

        def step(carry, s):
            params, state = carry
            epoch, b = s // steps_per_epoch, s % steps_per_epoch
            order = jax.random.permutation(jax.random.fold_in(k_order, epoch), subset)
            idx = jax.lax.dynamic_slice_in_dim(order, b * bs, bs)
            grads = jax.grad(objective)(params, x[idx], y[idx], jax.random.fold_in(k_drop, s))
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, state), jnp.arange(num_steps))
        return params

    return jit(jax.vmap(train_one))(subsets, seeds)


def test_losses(cfg: DigitsConfig, params_stack, x, y):
    """``(M, n_test)`` deterministic cross-entropy of every model on every example."""
    _, apply_fn, _ = model_fns(cfg)

    @jit
    def run(ps, x, y):
        logits = jax.vmap(lambda p: apply_fn(p, x))(ps)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])

    return run(params_stack, jnp.asarray(x), jnp.asarray(y))


def lds_subsets(cfg: DigitsConfig) -> np.ndarray:
    """``(num_subsets, m)`` sorted random subsets of the training indices."""
    rng = np.random.default_rng(cfg.lds_seed)
    m = int(round(cfg.subset_fraction * cfg.n_train))
    return np.stack([np.sort(rng.choice(cfg.n_train, m, replace=False))
                     for _ in range(cfg.num_subsets)]).astype(np.int32)


def compute(cfg: DigitsConfig, progress=None) -> dict:
    """Train everything a setting needs; returns numpy arrays (the cache content).

    Keys: ``full`` (flat params ``(num_full, d)``), ``half`` (``(num_subsets, d)``,
    seed 0 of each subset), ``subsets``, ``targets`` (utility = −test loss, mean over
    seeds, ``(num_subsets, n_test)``), ``train_seconds``.
    """
    import time
    from jax.flatten_util import ravel_pytree

    say = progress or (lambda msg: None)
    (xtr, ytr), (xte, yte) = digits_split(cfg.n_train, cfg.n_test)
    t0 = time.perf_counter()
    say(f"training {cfg.num_full} full models")
    full_idx = np.tile(np.arange(cfg.n_train, dtype=np.int32), (cfg.num_full, 1))
    full = train_models(cfg, xtr, ytr, full_idx, np.arange(cfg.num_full))
    subsets = lds_subsets(cfg)
    S, K = cfg.num_subsets, cfg.num_seeds
    say(f"training {S * K} models for LDS ({S} subsets x {K} seeds, vmapped)")
    rep = np.repeat(subsets, K, axis=0)
    seeds = 1000 + np.arange(S * K)
    half = train_models(cfg, xtr, ytr, rep, seeds)
    losses = np.asarray(test_losses(cfg, half, xte, yte)).reshape(S, K, -1)
    train_seconds = time.perf_counter() - t0
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])
    half_flat = np.asarray(flat(half)).reshape(S, K, -1)[:, 0]
    return {"full": np.asarray(flat(full)), "half": half_flat, "subsets": subsets,
            "targets": -losses.mean(axis=1), "train_seconds": np.float64(train_seconds)}
