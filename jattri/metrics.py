"""Evaluation metrics of attribution scores against retraining ground truth.

Orientation: ``targets`` are UTILITIES measured on retrained models (larger = better
for the test example, e.g. minus the test loss). With jattri's score convention
(positive = helps), a good method gives positive LDS and LOO correlation.
"""
from __future__ import annotations

import numpy as np
import scipy.stats


def _as_scores(scores, name="scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"`{name}` must be (n_train, n_test), got shape {s.shape}")
    return s


def lds(scores, subsets, targets) -> np.ndarray:
    """Linear datamodeling score (Park et al., 2023), one value per test example.

    LDS(t) = Spearman over subsets S_s between Σ_{i∈S_s} scores[i, t] and
    targets[s, t].

    Args:
      scores: ``(n_train, n_test)``.
      subsets: ``(S, m)`` int indices of the training examples kept in each subset.
      targets: ``(S, n_test)`` utility of models trained on each subset.
    Returns:
      ``(n_test,)`` float64; NaN where a column is constant. Report ``np.nanmean``.
    """
    s = _as_scores(scores)
    subsets = np.asarray(subsets)
    targets = np.asarray(targets, dtype=np.float64)
    if subsets.ndim != 2 or not np.issubdtype(subsets.dtype, np.integer):
        raise ValueError(f"`subsets` must be an (S, m) integer array, got {subsets.dtype} "
                         f"of shape {subsets.shape}")
    if subsets.size and (subsets.min() < 0 or subsets.max() >= s.shape[0]):
        raise ValueError(f"`subsets` indices must lie in [0, {s.shape[0]})")
    if targets.shape != (subsets.shape[0], s.shape[1]):
        raise ValueError(f"`targets` must be (S, n_test) = {(subsets.shape[0], s.shape[1])}, "
                         f"got {targets.shape}")
    if subsets.shape[0] < 3:
        raise ValueError("`subsets` needs at least 3 subsets for a rank correlation")
    predicted = s[subsets].sum(axis=1)  # (S, n_test)
    return _columnwise(scipy.stats.spearmanr, predicted, targets)


def _columnwise(corr, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[1], np.nan)
    for t in range(a.shape[1]):
        if np.ptp(a[:, t]) > 0 and np.ptp(b[:, t]) > 0:
            out[t] = corr(a[:, t], b[:, t])[0]
    return out


def loo_corr(scores, removed, targets) -> np.ndarray:
    """Leave-one-out correlation, one Pearson value per test example.

    Removing a helpful example lowers the utility, so the per-test Pearson correlation
    is taken between ``scores[removed[j], t]`` and ``-targets[j, t]``.

    Args:
      scores: ``(n_train, n_test)``.
      removed: ``(R,)`` indices of the training examples removed one at a time.
      targets: ``(R, n_test)`` utility of the model retrained without each of them.
    Returns:
      ``(n_test,)`` float64; NaN where a column is constant.
    """
    s = _as_scores(scores)
    removed = np.asarray(removed)
    targets = np.asarray(targets, dtype=np.float64)
    if removed.ndim != 1 or not np.issubdtype(removed.dtype, np.integer):
        raise ValueError(f"`removed` must be an (R,) integer array, got shape {removed.shape}")
    if targets.shape != (removed.shape[0], s.shape[1]):
        raise ValueError(f"`targets` must be (R, n_test) = {(removed.shape[0], s.shape[1])}, "
                         f"got {targets.shape}")
    if removed.size and (removed.min() < 0 or removed.max() >= s.shape[0]):
        raise ValueError(f"`removed` indices must lie in [0, {s.shape[0]})")
    return _columnwise(scipy.stats.pearsonr, s[removed], -targets)
