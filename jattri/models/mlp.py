"""Logistic regression and the MLP of the dattri MNIST/digits benchmarks (Flax linen).

Layer names follow the reference PyTorch models so state_dicts convert by name:
``LogisticRegression`` has one Dense ``linear``; ``MLP`` has ``fc1``, ``fc2``, ``fc3``
with ReLU and dropout after each hidden layer. With the default widths they are dattri's
``LogisticRegressionMnist`` (784 -> 10) and ``MLPMnist`` (784 -> 128 -> 64 -> 10).

The reference flattens each image before its first layer (``x.view(n, -1)``); here the
trailing ``feature_ndim`` axes of ``x`` are the features of one example and are flattened
the same way (row-major), so MNIST images ``(n, 1, 28, 28)`` go in with ``feature_ndim=3``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def _flatten_features(x, feature_ndim: int):
    """``(..., f_1, ..., f_k) -> (..., f_1 * ... * f_k)`` for ``k = feature_ndim``."""
    return x.reshape(x.shape[:x.ndim - feature_ndim] + (-1,))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``x (..., d_in) -> logits (..., num_classes)``."""

    num_classes: int = 10
    feature_ndim: int = 1

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        del deterministic
        x = _flatten_features(x, self.feature_ndim)
        return nn.Dense(self.num_classes, name="linear")(x)


class MLP(nn.Module):
    """``x (..., d_in) -> logits``: Dense-ReLU-Dropout per hidden width, then Dense.

    ``hidden=(128, 64)`` with ``num_classes=10`` gives the reference layers
    ``fc1``, ``fc2``, ``fc3``. Dropout is active when ``deterministic=False`` (pass
    ``rngs={"dropout": key}`` to ``apply``).
    """

    hidden: Sequence[int] = (128, 64)
    num_classes: int = 10
    dropout_rate: float = 0.1
    feature_ndim: int = 1

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        h = _flatten_features(x, self.feature_ndim)
        for k, width in enumerate(self.hidden):
            h = nn.Dense(width, name=f"fc{k + 1}")(h)
            h = nn.relu(h)
            h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(h)
