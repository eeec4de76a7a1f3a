"""The published dattri benchmark, read from a local directory in dattri's layout.

dattri (Deng et al., NeurIPS 2024 D&B) publishes, per setting, a folder::

    <root>/models_full/<i>/model_weights_0.pt   models trained on the full train subset
    <root>/models_half/<i>/model_weights_0.pt   models trained on random half subsets
    <root>/lds/indices_lds.pt                   (S, m) int: train indices KEPT in subset s
    <root>/lds/target_values_lds.pt             (S, n_test): −target of the subset models
    <root>/loo/indices_loo.pt                   (R,) (float) index removed from model r
    <root>/loo/target_values_loo.pt             (R, n_test): target of model r

Orientation (from dattri's ``calculate_lds_ground_truth``, which negates the target before
saving, and ``calculate_loo_ground_truth``, which does not): the LDS values are already
utilities (larger = better), the LOO values are losses. jattri's ``Benchmark`` holds
utilities in both, so the LDS values are kept and the LOO values negated; with jattri's
scores (positive = helps) both metrics then come out positive for a good method.

The train/test sets are the first ``n_train``/``n_test`` examples of the reference's
datasets (dattri's ``SubsetSampler(range(n))``), read from local files by
``jattri.benchmark.datasets``; checkpoints go through ``jattri.interop.load_pt`` (no
torch, no code from the files) and ``jattri.interop.convert`` into the Flax ports of
``jattri.models``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattri.benchmark import datasets
from jattri.benchmark._types import Benchmark
from jattri.interop.pt import load_pt
from jattri.interop.unpickle import CorruptFileError

PathLike = Union[str, os.PathLike]


class DattriSetting(NamedTuple):
    """How one published setting maps onto jattri.

    arch: name in ``jattri.models.build`` / ``jattri.interop.convert``.
    data: local reader (``"mnist"``, ``"cifar2"``, ``"shakespeare"``) or ``None``
      (tokenised data must be passed as ``train=``/``test=``).
    n_train, n_test: dattri's ``SubsetSampler`` sizes (``None``: the whole split).
    loss: ``"ce"`` (classification), ``"lm"`` (mean next-token CE; nanoGPT), ``"lm_shift"``
      (HF GPT-2: labels shifted inside), ``"last_token"`` (Music Transformer: CE of the
      last position only, the pad token ignored).
    """

    arch: str
    data: Optional[str]
    n_train: Optional[int]
    n_test: Optional[int]
    loss: str
    config: tuple = ()


SETTINGS = {
    "mnist_lr": DattriSetting("mnist_lr", "mnist", 5000, 500, "ce"),
    "mnist_mlp": DattriSetting("mnist_mlp", "mnist", 5000, 500, "ce"),
    "cifar2_resnet9": DattriSetting("resnet9", "cifar2", 5000, 500, "ce"),
    "shakespeare_nanogpt": DattriSetting("nanogpt", "shakespeare", None, None, "lm"),
    "maestro_musictransformer": DattriSetting("music_transformer", None, 5000, 178,
                                              "last_token"),
    "wikitext2_gpt2": DattriSetting("gpt2", None, 4656, 481, "lm_shift"),
}

_DATA_HELP = {
    "maestro_musictransformer": "pass train=(x, tgt) and test=(x, tgt): int arrays (n, 256) "
    "of MAESTRO event tokens as dattri's EPianoDataset yields them (test: its generated "
    "music set)",
    "wikitext2_gpt2": "pass train=(input_ids, labels) and test=(input_ids, labels): int "
    "arrays (n, 512) of GPT-2 tokens grouped like dattri's create_wikitext2_dataset "
    "(labels = input_ids)",
}


def _ce(logits, label):
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def _loss_fns(setting: DattriSetting, module, has_batch_stats: bool, pad_token: int):
    """``(apply_fn, loss_fn)`` of a setting; ``loss_fn`` takes ONE example.

    The losses are the reference's per-example targets (``loss_mnist_lr``, ...), with
    ``CE(z, y) = −log softmax(z)_y``: ``"ce"``: CE(f(x), y); ``"lm"``: mean_t CE(f(x)_t, y_t);
    ``"lm_shift"``: mean_{t≥1} CE(f(x)_{t−1}, y_t); ``"last_token"``: CE(f(x)_T, y_T)
    (0 for the pad token). ``apply_fn(params, x (n, ...)) -> logits``.
    """

    def variables(params):
        if has_batch_stats:
            # BatchNorm running statistics are state, not parameters: no gradient.
            return {"params": params["params"],
                    "batch_stats": jax.lax.stop_gradient(params["batch_stats"])}
        return {"params": params}

    def apply_fn(params, x, rng=None):
        if rng is None:
            return module.apply(variables(params), x)
        return module.apply(variables(params), x, deterministic=False, rngs={"dropout": rng})

    def loss_fn(params, example, rng=None):
        x, y = example
        logits = apply_fn(params, x[None], rng)[0]
        if setting.loss == "ce":
            return _ce(logits, y)
        if setting.loss == "lm":  # nanoGPT: mean over positions, ignore_index=-1
            mask = y != -1
            per = _ce(logits, jnp.where(mask, y, 0))
            return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1)
        if setting.loss == "lm_shift":  # HF GPT-2: predict labels[1:], ignore -100
            labels = y[1:]
            mask = labels != -100
            per = _ce(logits[:-1], jnp.where(mask, labels, 0))
            return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1)
        if setting.loss == "last_token":
            return jnp.where(y[-1] == pad_token, 0.0, _ce(logits[-1], y[-1]))
        raise ValueError(f"unknown loss kind {setting.loss!r}")

    return apply_fn, loss_fn


def _model_dirs(root: Path, kind: str, limit: Optional[int]) -> list:
    folder = root / kind
    if limit == 0:
        return []
    if not folder.is_dir():
        raise FileNotFoundError(f"dattri benchmark folder {folder} not found; expected "
                                f"{folder}/<i>/model_weights_0.pt for i = 0, 1, ...")
    count = sum(1 for p in folder.iterdir() if p.is_dir())
    count = count if limit is None else min(limit, count)
    paths = [folder / str(i) / "model_weights_0.pt" for i in range(count)]
    if not paths:
        raise FileNotFoundError(f"{folder} holds no model folder; expected "
                                f"{folder}/0/model_weights_0.pt, ...")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"dattri checkpoint {path} not found (expected "
                                    f"{folder}/<i>/model_weights_0.pt for i < {count})")
    return paths


def _model_config(setting: DattriSetting, checkpoint: Any, override: dict) -> dict:
    config = dict(setting.config)
    if setting.arch == "nanogpt" and isinstance(checkpoint, dict) \
            and isinstance(checkpoint.get("model_args"), dict):
        from jattri.models import NanoGPT
        fields = {f.name for f in dataclasses.fields(NanoGPT)}
        config.update({k: v for k, v in checkpoint["model_args"].items() if k in fields})
    config.update(override)
    return config


def _array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"dattri ground truth {path} not found ({what})")
    value = load_pt(path)
    if not isinstance(value, np.ndarray):
        raise CorruptFileError(f"{path}: expected a tensor ({what}), got "
                               f"{type(value).__name__}")
    if value.dtype.kind in "f" and not np.all(np.isfinite(value)):
        raise CorruptFileError(f"{path}: holds NaN or inf values ({what})")
    return value


def _integral(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise CorruptFileError(f"{path}: {what} must be integers, got {values.dtype}")


def _check_indices(idx, n_train, path, what):
    if idx.size and (idx.min() < 0 or idx.max() >= n_train):
        raise CorruptFileError(f"{path}: {what} lie in [{idx.min()}, {idx.max()}], outside "
                               f"the {n_train} training examples")


def load_lds(root: PathLike, n_train: int, n_test: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(subsets (S, m) int64, targets (S, n_test) float64)`` from ``<root>/lds/``; utilities."""
    root = Path(root)
    p_idx, p_val = root / "lds" / "indices_lds.pt", root / "lds" / "target_values_lds.pt"
    subsets = _integral(_array(p_idx, "(S, m) train indices kept in each LDS subset"),
                        p_idx, "LDS subset indices")
    values = _array(p_val, "(S, n_test) LDS target values").astype(np.float64)
    if subsets.ndim != 2:
        raise CorruptFileError(f"{p_idx}: expected (S, m) indices, got shape {subsets.shape}")
    s = subsets.shape[0]
    if values.shape != (s, n_test):
        raise CorruptFileError(f"{p_val}: expected shape (S, n_test) = {(s, n_test)} to match "
                               f"{p_idx.name} and the test set, got {values.shape}")
    _check_indices(subsets, n_train, p_idx, "LDS subset indices")
    return subsets, values  # dattri already stores −target: a utility


def load_loo(root: PathLike, n_train: int, n_test: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(removed (R,) int64, targets (R, n_test))`` from ``<root>/loo/`` (``None`` if absent).

    dattri stores the retrained model's target (a loss); it is negated into a utility.
    """
    root = Path(root)
    p_idx, p_val = root / "loo" / "indices_loo.pt", root / "loo" / "target_values_loo.pt"
    if not p_idx.exists() and not p_val.exists():
        return None
    removed = _integral(_array(p_idx, "(R,) removed train index of each LOO model"),
                        p_idx, "LOO indices").reshape(-1)
    values = _array(p_val, "(R, n_test) LOO target values").astype(np.float64)
    if values.shape != (removed.shape[0], n_test):
        raise CorruptFileError(f"{p_val}: expected shape (R, n_test) = "
                               f"{(removed.shape[0], n_test)}, got {values.shape}")
    _check_indices(removed, n_train, p_idx, "LOO indices")
    return removed, -values


def _default_data_roots(root: Path) -> list:
    return [root / "data", root / "dataset", root.parent.parent / "dataset", root]


def _read_data(setting: DattriSetting, name: str, root: Path, data_root, config: dict):
    if setting.data is None:
        raise ValueError(f"{name}: jattri has no reader for this data; "
                         f"{_DATA_HELP.get(name, 'pass train= and test=')}")
    block = int(config.get("block_size", 256))  # dattri: blocks of the model's context
    reader = {"mnist": datasets.load_mnist, "cifar2": datasets.load_cifar2,
              "shakespeare": lambda r: datasets.load_shakespeare_char(r, block)[:2]
              }[setting.data]
    candidates = [Path(data_root)] if data_root is not None else _default_data_roots(root)
    errors = []
    for cand in candidates:
        try:
            return reader(cand)
        except FileNotFoundError as err:
            errors.append(str(err))
    raise FileNotFoundError(f"{name}: {setting.data} data not found (pass data_root=):\n"
                            + "\n".join(errors))


def _first(data, n: Optional[int]):
    if n is None:
        return data
    return jax.tree_util.tree_map(lambda a: a[:n], data)


def load_dattri(root: PathLike, name: str, *, data_root: Optional[PathLike] = None,
                train=None, test=None, num_full: Optional[int] = None,
                num_half: Optional[int] = None, model_config: Optional[dict] = None,
                convert: Optional[Callable] = None) -> Benchmark:
    """A published dattri setting from a local folder in dattri's layout.

    Args:
      root: the setting's folder (holding ``models_full/``, ``models_half/``, ``lds/``,
        optionally ``loo/``), e.g. ``~/.dattri/benchmark/mnist_lr``.
      name: one of ``SETTINGS``: ``mnist_lr``, ``mnist_mlp``, ``cifar2_resnet9``,
        ``shakespeare_nanogpt``, ``maestro_musictransformer``, ``wikitext2_gpt2``.
      data_root: folder of the raw data files (MNIST idx, CIFAR-10 batches, nanoGPT's
        shakespeare_char); default: ``root/data``, ``root/dataset``,
        ``root/../../dataset`` (dattri's download folder), ``root``.
      train, test: example pytrees overriding the readers (required for MAESTRO and
        wikitext-2); the first ``n_train``/``n_test`` examples are used.
      num_full, num_half: load only the first checkpoints (``0`` skips the folder).
      model_config: overrides of the architecture's sizes (``jattri.models.build``).
      convert: ``(state_dict, arch, **config) -> variables``; default
        ``jattri.interop.convert.convert``.
    Returns:
      ``Benchmark`` with converted ``models_full``/``models_half`` (Flax params; for
      ResNet-9 ``{"params", "batch_stats"}``, the statistics excluded from gradients),
      ``train``/``test`` as ``(inputs, labels)``, ``lds``/``loo`` as utilities,
      ``loss_fn = target_fn`` (``(params, example, rng=None)``, the reference's
      per-example loss) and ``apply_fn(params, x, rng=None) -> logits``.
    """
    if name not in SETTINGS:
        raise ValueError(f"unknown dattri setting {name!r}; known: {', '.join(SETTINGS)}")
    setting = SETTINGS[name]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dattri benchmark folder {root} not found; expected the "
                                f"layout {root}/models_full/0/model_weights_0.pt, "
                                f"{root}/lds/indices_lds.pt, ...")
    full_paths = _model_dirs(root, "models_full", num_full)
    half_paths = _model_dirs(root, "models_half", num_half)

    if convert is None:
        from jattri.interop.convert import convert
    from jattri.models import build

    first = load_pt(full_paths[0])
    config = _model_config(setting, first, dict(model_config or {}))
    model = build(setting.arch, **config)

    # Data and ground truth first: they fail fast, before converting every checkpoint.
    if (train is None) != (test is None):
        raise ValueError("pass both `train` and `test`, or neither")
    if train is None:
        train, test = _read_data(setting, name, root, data_root, config)
    train, test = _first(train, setting.n_train), _first(test, setting.n_test)
    n_train = int(np.shape(jax.tree_util.tree_leaves(train)[0])[0])
    n_test = int(np.shape(jax.tree_util.tree_leaves(test)[0])[0])
    lds = load_lds(root, n_train, n_test)
    loo = load_loo(root, n_train, n_test)

    def to_params(ckpt):
        variables = convert(ckpt, setting.arch, **config)
        return dict(variables) if "batch_stats" in variables else variables["params"]

    models_full = [to_params(first)] + [to_params(load_pt(p)) for p in full_paths[1:]]
    models_half = [to_params(load_pt(p)) for p in half_paths]
    has_bs = isinstance(models_full[0], dict) and "batch_stats" in models_full[0]
    pad = config.get("vocab_size", 390) - 1  # Music Transformer: TOKEN_PAD = VOCAB_SIZE - 1
    apply_fn, loss_fn = _loss_fns(setting, model.module, has_bs, pad)
    return Benchmark(
        name=name, loss_fn=loss_fn, target_fn=loss_fn, apply_fn=apply_fn,
        models_full=models_full, models_half=models_half, train=train, test=test,
        lds=lds, loo=loo,
        info={"source": "dattri", "root": str(root), "arch": setting.arch,
              "model_config": config, "n_train": n_train, "n_test": n_test,
              "models_full_paths": [str(p) for p in full_paths],
              "models_half_paths": [str(p) for p in half_paths],
              "orientation": "lds targets as stored (dattri saves -loss); loo targets = "
                             "-stored loss"})


__all__ = ["SETTINGS", "DattriSetting", "load_dattri", "load_lds", "load_loo"]
