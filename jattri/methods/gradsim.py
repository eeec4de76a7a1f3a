"""Gradient similarity: Grad-Dot ⟨g_i, g_t⟩ and Grad-Cos ⟨g_i, g_t⟩ / (‖g_i‖‖g_t‖)
(Charpiat et al., 2019, "Input Similarity from the Neural Network Perspective"),
averaged over the members.

Both are TracInCP (``jattri.tracin``) with equal member weights 1/M and no projection;
they share its code (and its memory: nothing of size n·d is stored; training
gradients are recomputed chunk by chunk when scoring), including its factored inner
products for models made of linear layers.
"""
from __future__ import annotations

from typing import Any, Optional

from jattri.methods._common import Attributor
from jattri.methods.tracin import _tracin


def grad_dot(task: Any, *, chunk_size: Optional[int] = None,
             factored: Optional[bool] = None) -> Attributor:
    """Grad-Dot: score(i, t) = ⟨∇loss(z_i), ∇target(z_t)⟩, mean over members.

    ``factored``: inner products from the linear layers' inputs and output gradients,
    never a d-float gradient (``None``: where exact and cheaper; see
    :func:`jattri.tracin`)."""
    return _tracin("grad_dot", task, chunk_size=chunk_size, factored=factored)


def grad_cos(task: Any, *, chunk_size: Optional[int] = None,
             factored: Optional[bool] = None) -> Attributor:
    """Grad-Cos: cosine of ∇loss(z_i) and ∇target(z_t), mean over members.

    ``factored``: as for :func:`grad_dot` (norms from the same factors)."""
    return _tracin("grad_cos", task, normalize=True, chunk_size=chunk_size,
                   factored=factored)
