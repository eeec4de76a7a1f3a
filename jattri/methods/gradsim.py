"""Gradient similarity: Grad-Dot ⟨g_i, g_t⟩ and Grad-Cos ⟨g_i, g_t⟩ / (‖g_i‖‖g_t‖)
(Charpiat et al., 2019, "Input Similarity from the Neural Network Perspective"),
averaged over the task's members.

Both are TracInCP (``jattri.tracin``) with equal member weights 1/M and no projection;
they share its code.
"""
from __future__ import annotations

from typing import Optional

from jattri.methods._common import Attributor
from jattri.methods.tracin import tracin
from jattri.task import Task


def grad_dot(task: Task, *, chunk_size: Optional[int] = None) -> Attributor:
    """Grad-Dot: score(i, t) = ⟨∇loss(z_i), ∇target(z_t)⟩, mean over members."""
    return tracin(task, chunk_size=chunk_size)


def grad_cos(task: Task, *, chunk_size: Optional[int] = None) -> Attributor:
    """Grad-Cos: cosine of ∇loss(z_i) and ∇target(z_t), mean over members."""
    return tracin(task, normalize=True, chunk_size=chunk_size)
