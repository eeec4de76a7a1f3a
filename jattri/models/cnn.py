"""A small convolutional network for 8×8 digits: the Conv-layer model of the benchmark.

``x (..., 64) -> logits (..., num_classes)``: the flat pixels are reshaped to
``image_shape`` (channels last), then conv 3×3 (``channels[0]``, SAME) - ReLU -
conv 3×3 stride 2 (``channels[1]``, SAME) - ReLU - flatten - Dense. With the defaults
(8×8×1, channels 4 and 8) it has 1,626 parameters, so exact (dense-Hessian) influence
is still affordable next to the Conv K-FAC / EK-FAC of ``influence_ekfac``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn


class SmallCNN(nn.Module):
    """``x (..., prod(image_shape)) -> logits (..., num_classes)``; layers ``conv1``,
    ``conv2`` (``nn.Conv``) and ``linear`` (``nn.Dense``)."""

    num_classes: int = 10
    image_shape: Tuple[int, int, int] = (8, 8, 1)
    channels: Sequence[int] = (4, 8)

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        del deterministic
        h = x.reshape(x.shape[:-1] + tuple(self.image_shape))
        h = nn.relu(nn.Conv(self.channels[0], (3, 3), padding="SAME", name="conv1")(h))
        h = nn.relu(nn.Conv(self.channels[1], (3, 3), strides=2, padding="SAME",
                            name="conv2")(h))
        return nn.Dense(self.num_classes, name="linear")(h.reshape(h.shape[:-3] + (-1,)))
