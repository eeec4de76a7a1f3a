"""Evaluation metrics of attribution scores against retraining ground truth.

Orientation: ``targets`` are UTILITIES measured on retrained models (larger = better
for the test example, e.g. minus the test loss). With jattri's score convention
(positive = helps), a good method gives positive LDS and LOO correlation.
"""
from __future__ import annotations

import numpy as np


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
    import scipy.stats  # deferred: ~0.3 s of `import jattri`
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
    import scipy.stats  # deferred: ~0.3 s of `import jattri`
    return _columnwise(scipy.stats.pearsonr, s[removed], -targets)


def mislabel_auc(self_scores, is_noisy) -> float:
    """ROC AUC of flagging noisy labels by self-influence, highest score first.

    AUC = P(score of a random noisy example > score of a random clean one), ties
    counting one half: the Mann–Whitney statistic on average ranks,
    (Σ_{i noisy} rank_i − n₊(n₊ + 1)/2) / (n₊ n₋). 1 = every noisy example ranks above
    every clean one; 0.5 = chance.

    Args:
      self_scores: ``(n,)`` self-influence (e.g. ``attributor.self_attribute(state)``).
      is_noisy: ``(n,)`` bool, True where the training label was corrupted.
    Returns:
      float in [0, 1]. Raises ``ValueError`` when a class is empty or scores are NaN.
    """
    s = np.asarray(self_scores, dtype=np.float64)
    noisy = np.asarray(is_noisy)
    if s.ndim != 1 or noisy.shape != s.shape:
        raise ValueError(f"`self_scores` and `is_noisy` must both be (n,), got {s.shape} "
                         f"and {noisy.shape}")
    if noisy.dtype != np.bool_:
        if not np.all(np.isin(noisy, (0, 1))):
            raise ValueError("`is_noisy` must be boolean (or 0/1)")
        noisy = noisy.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError("`self_scores` contains NaN or inf")
    n_pos = int(noisy.sum())
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("`is_noisy` needs both noisy and clean examples for an AUC")
    import scipy.stats  # deferred: ~0.3 s of `import jattri`
    ranks = scipy.stats.rankdata(s, method="average")  # ties share their mean rank
    return float((ranks[noisy].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brittleness(scores, k_grid, train_fn, predict_fn, *, batch_size=None,
                vectorize: bool = True) -> np.ndarray:
    """Brittleness (Ilyas et al., 2022, "Datamodels"): for each test example, the
    smallest k in ``k_grid`` such that removing its k top-scored (most helpful)
    training examples and retraining changes its prediction.

    For test example t and each k, the training weights are 1 except 0 on the k
    largest ``scores[:, t]``; ``train_fn(weights)`` retrains and ``predict_fn(params)``
    predicts. All ``n_test × len(k_grid)`` retrainings are independent, so with
    ``vectorize=True`` they run as ``jax.lax.map(train_fn, weights, batch_size=...)``
    (``vmap`` in chunks of ``batch_size``: one compiled program); ``vectorize=False``
    calls ``train_fn`` one weight vector at a time (for non-traceable trainers).

    Args:
      scores: ``(n_train, n_test)``, larger = helps more.
      k_grid: increasing positive ints ≤ n_train, the removal sizes tried.
      train_fn: ``train_fn(weights (n_train,) float) -> params``; a weight of 0 drops
        the example (a pure JAX function for ``vectorize=True``; fix its seed inside
        so only the data changes).
      predict_fn: ``predict_fn(params) -> (n_test,)`` predicted labels of all tests.
      batch_size: retrainings vmapped at once (``None``: all).
    Returns:
      ``(n_test,)`` float64: the smallest flipping k, ``inf`` where no k in the grid
      flips the prediction. The fraction of tests brittle at size k is
      ``np.mean(result <= k)``.
    """
    import jax
    import jax.numpy as jnp

    s = _as_scores(scores)
    n_train, n_test = s.shape
    grid = np.asarray(k_grid)
    if grid.ndim != 1 or grid.size == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"`k_grid` must be a non-empty 1-D list of ints, got {k_grid!r}")
    if grid.min() < 1 or grid.max() > n_train or np.any(np.diff(grid) <= 0):
        raise ValueError(f"`k_grid` must be strictly increasing within [1, {n_train}], "
                         f"got {grid.tolist()}")
    order = np.argsort(-s, axis=0, kind="stable")              # (n_train, n_test)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n_train)[:, None], axis=0)
    # weights[t, j, i] = 0 iff train example i is among the top k_j for test t
    weights = (rank.T[:, None, :] >= grid[None, :, None]).astype(np.float32)
    flat = weights.reshape(-1, n_train)

    def run(w):
        return predict_fn(train_fn(w))

    base = np.asarray(run(jnp.ones(n_train, jnp.float32)))
    if base.shape != (n_test,):
        raise ValueError(f"`predict_fn` must return (n_test,) = ({n_test},) predictions, "
                         f"got shape {base.shape}")
    if vectorize:
        preds = np.asarray(jax.lax.map(run, jnp.asarray(flat), batch_size=batch_size))
    else:
        preds = np.stack([np.asarray(run(jnp.asarray(w))) for w in flat])
    preds = preds.reshape(n_test, grid.size, n_test)
    flipped = preds[np.arange(n_test), :, np.arange(n_test)] != base[:, None]  # (n_test, K)
    first = np.where(flipped.any(axis=1), grid[np.argmax(flipped, axis=1)], np.inf)
    return first.astype(np.float64)
