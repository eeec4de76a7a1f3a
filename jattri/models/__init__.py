"""Flax ports of the benchmark architectures."""
from jattri.models.mlp import MLP, LogisticRegression

__all__ = ["MLP", "LogisticRegression"]
