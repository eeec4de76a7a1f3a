"""The methods ``python -m jattri.bench`` knows, by name.

Each entry builds an Attributor from the benchmark's :class:`jattri.Task` (its loss and
target functions, no arrays); ``python -m jattri.bench`` caches it on
``jattri.checkpoints(models_full[:num_checkpoints])`` and scores the test set. ``max_params`` skips a method on models too large for it
(the dense Hessian of ``influence_explicit``, say) with a note instead of a crash.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import jax

import jattri


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    build: Callable  # (task, bench) -> Attributor
    num_checkpoints: int = 1
    max_params: Optional[int] = None
    description: str = ""
    skip: Tuple[Tuple[str, str], ...] = ()  # (setting, why): not run on that setting


# The trained CNN's Hessian is indefinite at its training L2 (smallest eigenvalue
# −0.14 with damping 1e-3): iterative solvers of H + λI do not converge there, and CG
# runs its 100 iterations per test point for many minutes before saying so.
_INDEFINITE = (("digits_cnn", "H + damping*I indefinite on this setting"),)


# RPS refits a last layer on per-example features against each example's class label,
# and KNN-Shapley ranks neighbours by their labels: a text block has neither (it is
# block_size next-token predictions, each with its own label and features).
_NO_CLASS_LABEL = (("text_nanogpt", "needs one class label and one feature vector per "
                    "example; a text block has block_size next-token predictions"),)


# EK-FAC's Gauss-Newton factors hold the loss's Hessian at each layer output over every
# position, (T·d_out)² per example and layer: on text_nanogpt's (32, 192) c_fc outputs the
# run asked for 1.9 TB.
_SEQUENCE_GGN = (("text_nanogpt", "GGN factors need (block_size*d_out)^2 floats per "
                  "example and layer (1.9 TB asked here)"),)


def _damping(bench, default: float = 1e-3) -> float:
    """IF damping = the L2 coefficient the setting was trained with (its Hessian term)."""
    return float(bench.info.get("weight_decay", default)) or default


def _last_layer_input(bench):
    """``features_fn(params, (x, y))``: the input of the model's last Dense layer (LR:
    the pixels; MLP: the fc2 activations), read hook-free by ``jattri.func.layers``."""
    from jattri.func.layers import layer_inputs, linear_layers
    z0 = jax.tree_util.tree_map(lambda a: a[0], bench.train)
    layers = linear_layers(bench.loss_fn, bench.models_full[0], z0)
    last = list(layers)[-1]
    return lambda p, z: layer_inputs(bench.loss_fn, p, z, layers={last: layers[last]})[last][0]


def _rps(task, b):
    return jattri.rps(task, features_fn=_last_layer_input(b),
                      logits_fn=lambda p, z: b.apply_fn(p, z[0][None])[0],
                      label_fn=lambda z: z[1], l2=1e-3)


METHODS = {
    "influence_explicit": MethodSpec(
        lambda task, b: jattri.influence_explicit(task, damping=_damping(b)),
        max_params=5_000, description="IF, dense Hessian"),
    "influence_cg": MethodSpec(lambda task, b: jattri.influence_cg(task, damping=_damping(b)),
                               max_params=5_000, description="IF, conjugate gradients",
                               skip=_INDEFINITE),
    "influence_lissa": MethodSpec(
        lambda task, b: jattri.influence_lissa(task, damping=_damping(b), depth=1000,
                                               batch_size=100),
        max_params=5_000, description="IF, LiSSA depth 1000, minibatch 100",
        skip=_INDEFINITE),
    "influence_arnoldi": MethodSpec(
        lambda task, b: jattri.influence_arnoldi(task, damping=_damping(b), rank=100),
        description="IF, top-100 Hessian eigenpairs by Arnoldi"),
    "influence_ekfac": MethodSpec(lambda task, b: jattri.influence_ekfac(task, damping=1e-3),
                                  description="IF, EK-FAC (empirical Fisher), damping 1e-3"),
    "influence_ekfac_ggn": MethodSpec(
        lambda task, b: jattri.influence_ekfac(task, damping=1e-3, curvature="ggn"),
        description="IF, EK-FAC (Gauss-Newton), damping 1e-3", skip=_SEQUENCE_GGN),
    "influence_datainf": MethodSpec(lambda task, b: jattri.influence_datainf(task),
                                    description="IF, DataInf (relative damping 0.1)"),
    "influence_explicit_relatif": MethodSpec(
        lambda task, b: jattri.influence_explicit(task, damping=_damping(b), relatif="l"),
        max_params=5_000, description="RelatIF (l), dense Hessian"),
    "grad_dot": MethodSpec(lambda task, b: jattri.grad_dot(task)),
    "grad_cos": MethodSpec(lambda task, b: jattri.grad_cos(task)),
    "trak_1": MethodSpec(lambda task, b: jattri.trak(task, proj_dim=512), num_checkpoints=1,
                         description="TRAK, 1 checkpoint"),
    "trak_5": MethodSpec(lambda task, b: jattri.trak(task, proj_dim=512), num_checkpoints=5,
                         description="TRAK, 5 independent checkpoints"),
    "tracin_5": MethodSpec(lambda task, b: jattri.tracin(task), num_checkpoints=5,
                           description="TracInCP, 5 independent checkpoints, equal weights"),
    "tracin_sjlt_5": MethodSpec(
        lambda task, b: jattri.tracin(task, proj_dim=512, projection="sjlt"),
        num_checkpoints=5, description="TracInCP, SJLT k=512, 5 checkpoints"),
    "rps": MethodSpec(_rps, description="representer points, l2=1e-3, true label",
                      skip=_NO_CLASS_LABEL),
    "knn_shapley": MethodSpec(
        lambda task, b: jattri.knn_shapley(10, features_fn=_last_layer_input(b)),
        description="KNN-Shapley K=10 on last-layer inputs (model-free for LR)",
        skip=_NO_CLASS_LABEL),
    "logra": MethodSpec(lambda task, b: jattri.logra(task, proj_dim_in=16, proj_dim_out=16),
                        description="LoGra, 16x16 Kronecker projection per Dense layer"),
    "logra_5": MethodSpec(lambda task, b: jattri.logra(task, proj_dim_in=16, proj_dim_out=16),
                          num_checkpoints=5, description="LoGra 16x16, 5 checkpoints"),
    "logra_exact": MethodSpec(
        lambda task, b: jattri.logra(task, proj_dim_in=None, proj_dim_out=None),
        max_params=5_000, description="LoGra, identity projections (exact layer blocks)"),
}
