"""Mislabel detection: flip a fraction of the training labels, retrain, and rank the
training examples by self-influence; report the ROC AUC of finding the flipped ones
(``jattri.metrics.mislabel_auc``), as in dattri's noisy-label benchmark.

    from jattri.benchmark.mislabel import run_mislabel
    rows = run_mislabel("digits_lr", methods=["influence_explicit", "influence_ekfac"])
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import numpy as np

import jattri
from jattri.benchmark import digits
from jattri.benchmark._types import Benchmark
from jattri.task import unstack


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int):
    """Relabel ``round(fraction · n)`` random examples to a different random class.

    Returns ``(noisy_labels, is_noisy)``; every flipped label differs from the original.
    """
    y = np.asarray(y)
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, num_classes, len(idx))) % num_classes
    is_noisy = np.zeros(len(y), bool)
    is_noisy[idx] = True
    return noisy.astype(y.dtype), is_noisy


def noisy_benchmark(setting: str = "digits_lr", *, fraction: float = 0.1, seed: int = 0,
                    num_models: int = 1):
    """The setting retrained on flipped labels: ``(Benchmark, is_noisy)``.

    ``num_models`` models are trained on the noisy training set with the setting's own
    training code (vmapped, seeds ``seed .. seed + num_models - 1``). The Benchmark has
    no ground truth (``lds`` is empty): it only feeds the method registry.
    """
    if setting not in digits.SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(digits.SETTINGS)}")
    cfg = digits.SETTINGS[setting]
    (xtr, ytr), test = digits.digits_split(cfg.n_train, cfg.n_test)
    y_noisy, is_noisy = flip_labels(ytr, fraction, 10, seed)
    subsets = np.tile(np.arange(cfg.n_train, dtype=np.int32), (num_models, 1))
    stack = digits.train_models(cfg, xtr, y_noisy, subsets, seed + np.arange(num_models))
    _, apply_fn, loss_fn = digits.model_fns(cfg)
    bench = Benchmark(
        name=f"{setting}_noisy", loss_fn=loss_fn, target_fn=loss_fn, apply_fn=apply_fn,
        models_full=unstack(stack), models_half=[], train=(xtr, y_noisy), test=test,
        lds=(np.zeros((0, 0), np.int32), np.zeros((0, len(test[1])))),
        info={**dataclasses.asdict(cfg), "noise_fraction": fraction, "noise_seed": seed})
    return bench, is_noisy


def run_mislabel(setting: str = "digits_lr", methods: Optional[Sequence[str]] = None,
                 fraction: float = 0.1, seed: int = 0) -> list:
    """Mislabel-detection AUC of registered methods on a digits setting.

    Flips ``fraction`` of the training labels (seeded), retrains the setting's model on
    the noisy labels, computes each method's self-influence
    ``self_attribute(cache(checkpoints, train))`` and its ROC AUC against the flipped
    set (highest self-influence first).

    Args:
      setting: ``"digits_lr"`` or ``"digits_mlp"``.
      methods: names from ``jattri.benchmark.registry.METHODS`` (default: the
        influence-function family that is registered).
      fraction: share of flipped labels. seed: noise, training and ordering seed.
    Returns:
      rows ``{"setting", "method", "auc", "seconds", "note"}``; a method that does not
      fit (``max_params``) or fails is reported with ``auc=None`` and a note.
    """
    from jattri.benchmark.registry import METHODS

    if methods is None:
        methods = [m for m in METHODS if m.startswith("influence_")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(METHODS)}")
    cfg = digits.SETTINGS.get(setting)
    need = max([METHODS[m].num_checkpoints for m in methods] + [1])
    bench, is_noisy = noisy_benchmark(setting, fraction=fraction, seed=seed,
                                      num_models=min(need, cfg.num_full) if cfg else need)
    d = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(bench.models_full[0]))
    rows = []
    for name in methods:
        spec = METHODS[name]
        row = {"setting": setting, "method": name, "auc": None, "seconds": None, "note": ""}
        if spec.max_params is not None and d > spec.max_params:
            row["note"] = f"skipped: {d} params > max_params {spec.max_params}"
        elif spec.num_checkpoints > len(bench.models_full):
            row["note"] = f"skipped: needs {spec.num_checkpoints} checkpoints"
        else:
            task = jattri.Task(bench.loss_fn, bench.target_fn)
            members = jattri.checkpoints(bench.models_full[:spec.num_checkpoints])
            t0 = time.perf_counter()
            try:
                attr = spec.build(task, bench)
                self_scores = np.asarray(jax.block_until_ready(
                    attr.self_attribute(attr.cache(members, bench.train))))
                row["auc"] = jattri.metrics.mislabel_auc(self_scores, is_noisy)
            except Exception as err:  # report, keep the other methods running
                row["note"] = f"failed: {type(err).__name__}: {err}"[:200]
            row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def format_rows(rows) -> str:
    head = f"{'setting':<12} {'method':<22} {'AUC':>6} {'seconds':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['setting']:<12} {r['method']:<22} {auc:>6} {sec:>8}  {r['note']}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m jattri.benchmark.mislabel [setting] [methods]
    import sys
    args = sys.argv[1:]
    print(format_rows(run_mislabel(args[0] if args else "digits_lr",
                                   args[1].split(",") if len(args) > 1 else None)))
