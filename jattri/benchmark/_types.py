"""The Benchmark record every setting (embedded or published) returns."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A model family, its data, trained checkpoints and retraining ground truth.

    Fields:
      name: setting name (e.g. ``"digits_lr"``).
      loss_fn: ``loss_fn(params, example, rng=None) -> scalar`` for ONE example (rng:
        dropout key, ``None`` = deterministic).
      target_fn: likewise, the attributed quantity on test examples (lower = better).
      apply_fn: ``apply_fn(params, x) -> logits`` for a batch of inputs.
      models_full: list of params trained on the full training set (different seeds).
      models_half: list of params trained on random half subsets.
      train, test: pytrees of arrays with a leading example axis (e.g. ``(x, y)``).
      lds: ``(subsets, targets)``: ``subsets`` ``(S, m)`` int train indices, ``targets``
        ``(S, n_test)`` UTILITY (= −target_fn, averaged over seeds) of models trained
        on each subset. Feed to ``jattri.metrics.lds(scores, *bench.lds)``.
      loo: ``(removed, targets)`` (``(R,)``, ``(R, n_test)``) or ``None``.
      info: free-form settings (hyperparameters, cache path, training seconds, ...).
    """

    name: str
    loss_fn: Callable
    target_fn: Callable
    apply_fn: Callable
    models_full: list
    models_half: list
    train: PyTree
    test: PyTree
    lds: Tuple[np.ndarray, np.ndarray]
    loo: Optional[Tuple[np.ndarray, np.ndarray]] = None
    info: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        n_train = len(np.asarray(_first_leaf(self.train)))
        n_test = len(np.asarray(_first_leaf(self.test)))
        return (f"Benchmark({self.name!r}, n_train={n_train}, n_test={n_test}, "
                f"models_full={len(self.models_full)}, models_half={len(self.models_half)}, "
                f"lds_subsets={len(self.lds[0])}, loo={'yes' if self.loo else 'no'})")


def _first_leaf(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)[0]
