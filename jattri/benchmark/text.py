"""Embedded generative setting ``text_nanogpt``: a character-level nanoGPT on text that
ships with Python (``pydoc_data.topics``; nothing downloads).

Data: the topics concatenated in sorted key order; characters are ids by frequency over
the whole text (the ``vocab_size - 1`` most frequent get ``0 .. vocab_size - 2``, every
other character ``vocab_size - 1``); the text is cut into consecutive non-overlapping
blocks of ``block_size + 1`` ids, and a permutation of the blocks by
``np.random.default_rng(split_seed)`` gives train = the first ``n_train``, test = the
next ``n_test``. An example is one block ``(block_size + 1,)`` int32; its loss (and the
target on a test block) is the mean next-token cross-entropy over its ``block_size``
positions.

Model: :class:`jattri.models.NanoGPT` (a few layers, tens of thousands of parameters),
minibatch Adam on the mean block loss + (λ/2)‖θ‖². Ground truth for LDS as in
:mod:`jattri.benchmark.digits`: ``num_subsets`` random half subsets × ``num_seeds``
seeds, all models trained in one compiled program (``vmap`` over models).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattri._jit import jit
from jattri.benchmark import digits
from jattri.models import NanoGPT


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Hyperparameters of the text setting; all of them key the ground-truth cache."""

    block_size: int = 32         # positions predicted per block (a block holds +1 ids)
    vocab_size: int = 48         # most frequent characters + one "other" id
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 48
    dropout: float = 0.0         # model dropout (training, and loss_fn's rng)
    epochs: int = 12
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3   # L2 coefficient λ of (λ/2)‖θ‖² added to the mean loss
    num_full: int = 5            # models trained on the full training set
    num_subsets: int = 64        # LDS subsets
    num_seeds: int = 2           # seeds per LDS subset
    subset_fraction: float = 0.5
    lds_seed: int = 0
    split_seed: int = 0
    n_train: int = 256
    n_test: int = 64


SETTINGS = {"text_nanogpt": TextConfig()}


def _text() -> str:
    from pydoc_data import topics
    return "".join(topics.topics[k] for k in sorted(topics.topics))


def text_fingerprint() -> str:
    """SHA-256 of the text (``pydoc_data.topics`` changes between Python versions), part
    of the ground-truth cache key."""
    import hashlib
    return hashlib.sha256(_text().encode("utf-8")).hexdigest()[:16]


def char_ids(text: str, vocab_size: int) -> np.ndarray:
    """Character ids by frequency: the ``vocab_size - 1`` most frequent characters get
    ``0 ..`` in order of frequency (ties: first seen), all others ``vocab_size - 1``.

    (The tokenizer of ``benchmarks/scale.py``'s ``token_blocks``, copied here with the
    vocabulary size as a parameter, so the library does not import the benchmarks.)"""
    common = [c for c, _ in collections.Counter(text).most_common(vocab_size - 1)]
    table = {c: i for i, c in enumerate(common)}
    return np.array([table.get(c, vocab_size - 1) for c in text], np.int32)


def text_split(cfg: TextConfig):
    """The fixed split: ``(train, test)``, int32 blocks ``(n, block_size + 1)``."""
    ids = char_ids(_text(), cfg.vocab_size)
    span = cfg.block_size + 1
    blocks = ids[:len(ids) // span * span].reshape(-1, span)
    if cfg.n_train + cfg.n_test > len(blocks):
        raise ValueError(f"n_train + n_test = {cfg.n_train + cfg.n_test} exceeds the "
                         f"{len(blocks)} blocks of {span} characters in the text")
    perm = np.random.default_rng(cfg.split_seed).permutation(len(blocks))
    return (blocks[perm[:cfg.n_train]],
            blocks[perm[cfg.n_train:cfg.n_train + cfg.n_test]])


def make_model(cfg: TextConfig) -> NanoGPT:
    return NanoGPT(vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                   n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                   dropout=cfg.dropout, bias=False)


@functools.lru_cache(maxsize=None)
def model_fns(cfg: TextConfig):
    """``(init_fn, apply_fn, loss_fn)`` of the setting's model; the same function objects
    for equal configurations, so every load of a setting shares compiled programs.

    ``apply_fn(params, tokens, rng=None)``: ``(n, T) -> (n, T, vocab)`` logits.
    ``loss_fn(params, block, rng=None)``: mean next-token cross-entropy of ONE block
    ``(T + 1,)``; ``rng`` turns dropout on under that key (``None``: deterministic), the
    contract of ``jattri.ensemble.dropout``.
    """
    model = make_model(cfg)

    def init_fn(key):
        return model.init(key, jnp.zeros((1, cfg.block_size), jnp.int32))["params"]

    def apply_fn(params, tokens, rng=None):
        if rng is None:
            return model.apply({"params": params}, tokens)
        return model.apply({"params": params}, tokens, deterministic=False,
                           rngs={"dropout": rng})

    def loss_fn(params, block, rng=None):
        logits = apply_fn(params, block[None, :-1], rng)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, block[1:]).mean()

    return init_fn, apply_fn, loss_fn


def train_models(cfg: TextConfig, blocks, subsets, seeds):
    """Train one model per row of ``subsets`` with the matching seed, all vmapped.

    Args:
      blocks: ``(n, T + 1)`` int training blocks. subsets: ``(M, m)`` int indices of the
      blocks each model sees. seeds: ``(M,)`` ints (init, order, dropout).
    Returns:
      params pytree with a leading model axis ``M``.
    """
    init_fn, apply_fn, _ = model_fns(cfg)
    blocks = jnp.asarray(blocks, jnp.int32)
    subsets, seeds = jnp.asarray(subsets, jnp.int32), jnp.asarray(seeds, jnp.uint32)
    m = subsets.shape[1]
    bs = min(cfg.batch_size, m)
    steps_per_epoch = m // bs
    opt = optax.adam(cfg.learning_rate)
    train_mode = cfg.dropout > 0

    def objective(params, batch, key):
        logits = apply_fn(params, batch[:, :-1], key if train_mode else None)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        l2 = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return ce + 0.5 * cfg.weight_decay * l2

    def train_one(subset, seed):
        k_init, k_order, k_drop = jax.random.split(jax.random.PRNGKey(seed), 3)
        params = init_fn(k_init)

        def step(carry, s):
            params, state = carry
            epoch, b = s // steps_per_epoch, s % steps_per_epoch
            order = jax.random.permutation(jax.random.fold_in(k_order, epoch), subset)
            idx = jax.lax.dynamic_slice_in_dim(order, b * bs, bs)
            grads = jax.grad(objective)(params, blocks[idx], jax.random.fold_in(k_drop, s))
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                      jnp.arange(cfg.epochs * steps_per_epoch))
        return params

    return jit(jax.vmap(train_one))(subsets, seeds)


def block_losses(cfg: TextConfig, params_stack, blocks):
    """``(M, n)`` deterministic mean token loss of every model on every block."""
    _, _, loss_fn = model_fns(cfg)
    per_model = lambda p, b: jax.vmap(lambda z: loss_fn(p, z))(b)
    return jit(jax.vmap(per_model, in_axes=(0, None)))(params_stack,
                                                      jnp.asarray(blocks, jnp.int32))


def compute(cfg: TextConfig, progress=None) -> dict:
    """Train everything the setting needs; returns numpy arrays (the cache content),
    with the keys of :func:`jattri.benchmark.digits.compute` (``full``, ``half``,
    ``subsets``, ``targets`` = −mean test-block loss over seeds, ``train_seconds``)."""
    from jax.flatten_util import ravel_pytree

    say = progress or (lambda msg: None)
    train, test = text_split(cfg)
    t0 = time.perf_counter()
    say(f"training {cfg.num_full} full models")
    full_idx = np.tile(np.arange(cfg.n_train, dtype=np.int32), (cfg.num_full, 1))
    full = train_models(cfg, train, full_idx, np.arange(cfg.num_full))
    subsets = digits.lds_subsets(cfg)  # the same fields: lds_seed, subset_fraction, ...
    S, K = cfg.num_subsets, cfg.num_seeds
    say(f"training {S * K} models for LDS ({S} subsets x {K} seeds, vmapped)")
    half = train_models(cfg, train, np.repeat(subsets, K, axis=0), 1000 + np.arange(S * K))
    losses = np.asarray(block_losses(cfg, half, test)).reshape(S, K, -1)
    train_seconds = time.perf_counter() - t0
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])
    return {"full": np.asarray(flat(full)),
            "half": np.asarray(flat(half)).reshape(S, K, -1)[:, 0], "subsets": subsets,
            "targets": -losses.mean(axis=1), "train_seconds": np.float64(train_seconds)}
