"""Logistic regression and the MLP of the dattri MNIST/digits benchmarks (Flax linen).

Layer names follow the reference PyTorch models so state_dicts convert by name:
``LogisticRegression`` has one Dense ``linear``; ``MLP`` has ``fc1``, ``fc2``, ``fc3``
with ReLU and dropout after each hidden layer.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``x (..., d_in) -> logits (..., num_classes)``."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        del deterministic
        return nn.Dense(self.num_classes, name="linear")(x.reshape(x.shape[:-1] + (-1,)))


class MLP(nn.Module):
    """``x (..., d_in) -> logits``: Dense-ReLU-Dropout per hidden width, then Dense.

    ``hidden=(128, 64)`` with ``num_classes=10`` gives the reference layers
    ``fc1``, ``fc2``, ``fc3``. Dropout is active when ``deterministic=False`` (pass
    ``rngs={"dropout": key}`` to ``apply``).
    """

    hidden: Sequence[int] = (128, 64)
    num_classes: int = 10
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        h = x
        for k, width in enumerate(self.hidden):
            h = nn.Dense(width, name=f"fc{k + 1}")(h)
            h = nn.relu(h)
            h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(h)
