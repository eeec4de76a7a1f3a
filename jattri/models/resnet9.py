"""ResNet-9 of dattri's CIFAR-2 benchmark (Flax linen).

Same layers and names as the reference ``ResNet9`` (He et al., 2016, "Deep Residual
Learning for Image Recognition", in the 9-layer variant dattri trains on CIFAR-2):

    conv1 (3x3, widths[0]) - bn1 - ReLU - dropout
    layer1: BasicBlock(widths[1], stride 1)
    layer2: BasicBlock(widths[2], stride 2)
    layer3: BasicBlock(widths[3], stride 2)
    global average pool - linear (num_classes)

Every convolution is bias-free and followed by BatchNorm. BatchNorm's running statistics
live in the ``batch_stats`` collection; by default they are used (inference mode, as in
PyTorch's ``model.eval()``), so ``apply({"params": p, "batch_stats": s}, x)`` is a pure
function of ``p``. ``use_running_average=False`` normalises with batch statistics and
needs ``mutable=["batch_stats"]`` (training).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def _batch_norm(use_running_average: bool, name: str) -> nn.BatchNorm:
    # PyTorch's BatchNorm2d: eps 1e-5, running = 0.9 running + 0.1 batch.
    return nn.BatchNorm(use_running_average=use_running_average, momentum=0.9,
                        epsilon=1e-5, use_fast_variance=False, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers plus a shortcut: ``(n, H, W, C) -> (n, H/s, W/s, planes)``.

    The shortcut is the identity when shape is kept, else a 1x1 strided conv + BN
    (``shortcut_conv``, ``shortcut_bn``; the reference's ``shortcut.0``/``shortcut.1``).
    """

    planes: int
    stride: int = 1
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, use_running_average: bool = True):
        s = self.stride
        drop = lambda h: nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        # Explicit symmetric padding: PyTorch's padding=1, which "SAME" is not for stride 2.
        out = nn.Conv(self.planes, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)),
                      use_bias=False, name="conv1")(x)
        out = drop(nn.relu(_batch_norm(use_running_average, "bn1")(out)))
        out = nn.Conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                      name="conv2")(out)
        out = drop(nn.relu(_batch_norm(use_running_average, "bn2")(out)))
        shortcut = x
        if s != 1 or x.shape[-1] != self.planes:
            shortcut = nn.Conv(self.planes, (1, 1), strides=(s, s), padding="VALID",
                               use_bias=False, name="shortcut_conv")(x)
            shortcut = drop(_batch_norm(use_running_average, "shortcut_bn")(shortcut))
        return nn.relu(out + shortcut)


class ResNet9(nn.Module):
    """``images (n, C, H, W) -> logits (n, num_classes)`` (``(n, H, W, C)`` if not
    ``channels_first``).

    ``widths=(64, 128, 256, 512)``, ``num_classes=2`` is dattri's CIFAR-2 model; smaller
    widths keep the parameter names. Dropout (after every BN, as in the reference) is
    active with ``deterministic=False`` and ``rngs={"dropout": key}``; dattri trains this
    model with rate 0.
    """

    num_classes: int = 2
    widths: Sequence[int] = (64, 128, 256, 512)
    dropout_rate: float = 0.1
    channels_first: bool = True

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, use_running_average: bool = True):
        if len(self.widths) != 4:
            raise ValueError(f"widths must have 4 entries, got {tuple(self.widths)}")
        if self.channels_first:
            x = jnp.moveaxis(x, -3, -1)
        out = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                      name="conv1")(x)
        out = nn.relu(_batch_norm(use_running_average, "bn1")(out))
        out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
        for k, (planes, stride) in enumerate(zip(self.widths[1:], (1, 2, 2))):
            out = BasicBlock(planes, stride, self.dropout_rate, name=f"layer{k + 1}")(
                out, deterministic=deterministic, use_running_average=use_running_average)
        out = out.mean(axis=(-3, -2))
        return nn.Dense(self.num_classes, name="linear")(out)
