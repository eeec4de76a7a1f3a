"""The benchmark architectures by name: ``build(arch, **config)``.

Each name is one of dattri's benchmark models; ``config`` overrides its defaults (which
are the benchmark's sizes), e.g. smaller widths for tests. ``jattri.interop.convert``
takes the same ``arch`` and ``config`` and returns the variables ``module.apply`` takes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattri.models.gpt2 import GPT2
from jattri.models.mlp import MLP, LogisticRegression
from jattri.models.music_transformer import MusicTransformer
from jattri.models.nanogpt import NanoGPT
from jattri.models.resnet9 import ResNet9


class Model(NamedTuple):
    """A Flax module and the shape of one input batch (of one example) for ``init``.

    ``module.apply(variables, x)`` returns logits for every architecture; dropout is
    active with ``deterministic=False`` and ``rngs={"dropout": key}``.
    """

    module: nn.Module
    example_input: jax.ShapeDtypeStruct

    def init(self, key) -> dict:
        """Fresh variables: ``{"params": ...}`` (plus ``"batch_stats"`` for ResNet-9)."""
        x = jnp.zeros(self.example_input.shape, self.example_input.dtype)
        return self.module.init(key, x)


def _mnist_lr(input_shape: Sequence[int] = (784,), num_classes: int = 10) -> Model:
    """dattri's ``LogisticRegressionMnist``; ``input_shape=(1, 28, 28)`` takes raw images."""
    return Model(LogisticRegression(num_classes, feature_ndim=len(input_shape)),
                 jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))


def _mnist_mlp(input_shape: Sequence[int] = (784,), hidden: Sequence[int] = (128, 64),
               num_classes: int = 10, dropout_rate: float = 0.1) -> Model:
    """dattri's ``MLPMnist`` (``fc1``, ``fc2``, ``fc3``)."""
    return Model(MLP(tuple(hidden), num_classes, dropout_rate, feature_ndim=len(input_shape)),
                 jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))


def _resnet9(num_classes: int = 2, widths: Sequence[int] = (64, 128, 256, 512),
             dropout_rate: float = 0.1, in_channels: int = 3, image_size: int = 32,
             channels_first: bool = True) -> Model:
    """dattri's CIFAR-2 ``ResNet9``; images ``(n, 3, 32, 32)`` by default."""
    shape = ((1, in_channels, image_size, image_size) if channels_first
             else (1, image_size, image_size, in_channels))
    return Model(ResNet9(num_classes, tuple(widths), dropout_rate, channels_first),
                 jax.ShapeDtypeStruct(shape, jnp.float32))


def _tokens_model(cls) -> Callable[..., Model]:
    def make(**config) -> Model:
        return Model(cls(**config), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    make.__doc__ = f"``{cls.__name__}(**config)`` on token ids ``(n, T)``."
    return make


ARCHS: dict[str, Callable[..., Model]] = {
    "mnist_lr": _mnist_lr,
    "mnist_mlp": _mnist_mlp,
    "resnet9": _resnet9,
    "nanogpt": _tokens_model(NanoGPT),
    "music_transformer": _tokens_model(MusicTransformer),
    "gpt2": _tokens_model(GPT2),
}


def build(arch: str, **config) -> Model:
    """The Flax port of benchmark architecture ``arch`` with ``config`` overriding its defaults.

    Args:
      arch: one of ``"mnist_lr"``, ``"mnist_mlp"``, ``"resnet9"``, ``"nanogpt"``,
        ``"music_transformer"``, ``"gpt2"``.
      **config: sizes: ``input_shape``/``hidden``/``num_classes`` (MNIST models),
        ``widths``/``num_classes``/``in_channels``/``image_size`` (ResNet-9), or the fields
        of ``NanoGPT``/``MusicTransformer``/``GPT2``.

    Returns:
      ``Model(module, example_input)``; ``model.init(key)`` gives fresh variables.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch](**config)
