"""The methods ``python -m jattri.bench`` knows, by name.

Each entry builds an Attributor from a Task made of ``num_checkpoints`` of the
benchmark's ``models_full``. ``max_params`` skips a method on models too large for it
(the dense Hessian of ``influence_explicit``, say) with a note instead of a crash.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jattri


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    build: Callable  # (task, bench) -> Attributor
    num_checkpoints: int = 1
    max_params: Optional[int] = None
    description: str = ""


def _damping(bench, default: float = 1e-3) -> float:
    """IF damping = the L2 coefficient the setting was trained with (its Hessian term)."""
    return float(bench.info.get("weight_decay", default)) or default


METHODS = {
    "influence_explicit": MethodSpec(
        lambda task, b: jattri.influence_explicit(task, damping=_damping(b)),
        max_params=5_000, description="IF, dense Hessian"),
    "influence_cg": MethodSpec(lambda task, b: jattri.influence_cg(task, damping=_damping(b)),
                               max_params=5_000, description="IF, conjugate gradients"),
    "grad_dot": MethodSpec(lambda task, b: jattri.grad_dot(task)),
    "grad_cos": MethodSpec(lambda task, b: jattri.grad_cos(task)),
    "trak_1": MethodSpec(lambda task, b: jattri.trak(task, proj_dim=512), num_checkpoints=1,
                         description="TRAK, 1 checkpoint"),
    "trak_5": MethodSpec(lambda task, b: jattri.trak(task, proj_dim=512), num_checkpoints=5,
                         description="TRAK, 5 independent checkpoints"),
}
