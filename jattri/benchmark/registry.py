"""The methods ``python -m jattri.bench`` knows, by name.

Each entry builds an Attributor from the benchmark's :class:`jattri.Task` (its loss and
target functions, no arrays); ``python -m jattri.bench`` caches it on
``jattri.checkpoints(models_full[:num_checkpoints])`` and scores the test set. ``max_params`` skips a method on models too large for it
(the dense Hessian of ``influence_explicit`` on the 59,376-parameter ``text_nanogpt``,
say) with a note instead of a crash. Every method runs with its factory's default
damping / regularisation (``benchmarks/damping_grid.py`` compares those with a grid);
the influence family uses the Gauss-Newton matrix on the non-convex MLP.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Tuple

import jax
import optax

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


@functools.lru_cache(maxsize=None)
def _split(apply_fn):
    """The Gauss-Newton split of a digits loss (cross-entropy of the logits):
    ``(output_fn, output_loss_fn)``, one pair per model so methods share compiled code."""
    output = lambda p, z: apply_fn(p, z[0][None])[0]
    output_loss = lambda logits, z: optax.softmax_cross_entropy_with_integer_labels(logits, z[1])
    return output, output_loss


def _ggn_task(task, b):
    """``task`` with its Gauss-Newton split (``curvature="ggn"``); digits settings only."""
    output, output_loss = _split(b.apply_fn)
    return jattri.Task(b.loss_fn, b.target_fn, output_fn=output, output_loss_fn=output_loss)


# Settings whose Hessian is indefinite at the trained weights (the MLP's smallest
# eigenvalue is −0.0046 in float64): the influence family runs there on the
# Gauss-Newton matrix, positive semi-definite (``curvature="ggn"``, the Task's split).
# (digits_cnn is opt-in; its iterative solvers stay skipped, ``_INDEFINITE``.)
_GGN_SETTINGS = ("digits_mlp",)

# Explicit IF, RelatIF, CG and LiSSA on the MLP: the Gauss-Newton matrix of the last
# layer fc3 only (650 of the 17,226 parameters; fc1 and fc2 fixed), the top-layer
# influence of Koh & Liang (2017, section 5.1), so that the three solvers of one system
# can be compared as on the LR. Full-parameter, they do not fit the 3-minute budget of
# the whole default run on 2 cores: the dense 17,226² matrix costs a 17,226-row
# Cholesky (33 s measured here) and its sum (n·10·d² multiply-adds, 60 s at the 48
# G/s a GEMM reached here) per build, twice (with RelatIF; fc2 + fc3, 8,906 parameters, took 87 s to
# build); full-parameter CG (100 iterations) and LiSSA (depth 1000) took 107 s and
# 148 s (RESULTS.md, "Every method on digits_mlp"). Arnoldi runs on all parameters;
# the full-parameter explicit run is benchmarks/explicit_memory.py.
_SOLVER_LAYERS = ("fc3",)


def _influence(factory, layers=None, **kwargs):
    """Build of an influence factory with its default damping: Koh & Liang's Hessian,
    or ``curvature="ggn"`` on ``_GGN_SETTINGS``. ``layers``: top-level parameter
    names; on ``_GGN_SETTINGS`` the method is restricted to them (see ``_on_layers``)."""
    def build(task, b):
        if b.name not in _GGN_SETTINGS:
            return factory(task, **kwargs)
        if layers is not None:
            return _on_layers(factory, layers, b, curvature="ggn", **kwargs)
        return factory(_ggn_task(task, b), curvature="ggn", **kwargs)
    return build


def _on_layers(factory, layers, b, **kwargs):
    """``factory`` attributing through the parameters of ``layers`` only: the other
    parameters enter the loss as each member's ``aux`` (arrays not differentiated), so
    gradients, curvature and scores are those of the sub-model in ``layers`` (the
    top-layer influence of Koh & Liang, 2017, section 5.1). Its default damping (no
    ``damping`` given to the factory or to ``attribute``) is the stationary L2 of the
    whole model (``whole_model_damping`` below)."""
    output, output_loss = _split(b.apply_fn)
    join = lambda p, a: {**a, **p}
    task = jattri.Task.from_member_fns(
        lambda p, z, i, a: b.loss_fn(join(p, a), z),
        None if b.target_fn is b.loss_fn else lambda p, z, i, a: b.target_fn(join(p, a), z),
        output=lambda p, z, i, a: output(join(p, a), z),
        output_loss=lambda o, z, i, a: output_loss(o, z))

    def whole_model_damping(members, train) -> float:
        """The default damping of a sub-model: the stationary L2 of the WHOLE model
        (``jattri.stationary_damping`` over all its parameters). The training objective
        has one L2 coefficient for every parameter, and its estimate from all of them
        is the one the sub-block H_fc3 + λI of the objective's Hessian needs; from fc3
        alone it reads the noise of one layer's distance from stationarity (digits_mlp:
        3.2e-4 from fc3, 8.8e-5 from all 17,226 parameters, trained with 1e-4)."""
        return float(jattri.stationary_damping(b.loss_fn, members, train))

    # With no damping given, the state is cached at the whole model's λ̂ (one gradient
    # pass, once) and attributed by a factory built at the state's damping.
    at = (lambda damping: factory(task, **kwargs)) if "damping" in kwargs else (
        lambda damping: factory(task, damping=damping, **kwargs))

    def cache(members, train):
        params = members.params
        sub = jattri.Members({k: v for k, v in params.items() if k in layers},
                             {k: v for k, v in params.items() if k not in layers},
                             num=members.num)
        lam = None if "damping" in kwargs else whole_model_damping(members, train)
        return at(lam).cache(sub, train)

    return jattri.Attributor(
        cache, lambda state, *a, **kw: at(float(state.damping)).attribute(state, *a, **kw),
        lambda state, **kw: at(float(state.damping)).self_attribute(state, **kw))


def _last_layer_input(bench):
    """``features_fn(params, (x, y))``: the input of the model's last Dense layer (LR:
    the pixels; MLP: the fc2 activations), read hook-free by ``jattri.func.layers``."""
    from jattri.func.layers import layer_inputs, linear_layers
    z0 = jax.tree_util.tree_map(lambda a: a[0], bench.train)
    layers = linear_layers(bench.loss_fn, bench.models_full[0], z0)
    last = list(layers)[-1]
    return lambda p, z: layer_inputs(bench.loss_fn, p, z, layers={last: layers[last]})[last][0]


def _rps(task, b, **kwargs):
    return jattri.rps(task, features_fn=_last_layer_input(b),
                      logits_fn=lambda p, z: b.apply_fn(p, z[0][None])[0],
                      label_fn=lambda z: z[1], **kwargs)


METHODS = {
    "influence_explicit": MethodSpec(
        _influence(jattri.influence_explicit, layers=_SOLVER_LAYERS),
        max_params=20_000, description="IF, dense Hessian (MLP: Gauss-Newton of fc3)"),
    "influence_cg": MethodSpec(_influence(jattri.influence_cg, layers=_SOLVER_LAYERS),
                               max_params=20_000,
                               description="IF, conjugate gradients (MLP: Gauss-Newton of fc3)",
                               skip=_INDEFINITE),
    "influence_lissa": MethodSpec(
        _influence(jattri.influence_lissa, layers=_SOLVER_LAYERS, depth=1000, batch_size=100),
        max_params=20_000,
        description="IF, LiSSA depth 1000, minibatch 100 (MLP: Gauss-Newton of fc3)",
        skip=_INDEFINITE),
    "influence_arnoldi": MethodSpec(
        _influence(jattri.influence_arnoldi, rank=100),
        description="IF, top-100 eigenpairs by Arnoldi (MLP: Gauss-Newton)"),
    "influence_ekfac": MethodSpec(lambda task, b: jattri.influence_ekfac(task),
                                  description="IF, EK-FAC (empirical Fisher)"),
    "influence_ekfac_ggn": MethodSpec(
        lambda task, b: jattri.influence_ekfac(task, curvature="ggn"),
        description="IF, EK-FAC (Gauss-Newton)", skip=_SEQUENCE_GGN),
    "influence_datainf": MethodSpec(lambda task, b: jattri.influence_datainf(task),
                                    description="IF, DataInf"),
    "influence_explicit_relatif": MethodSpec(
        _influence(jattri.influence_explicit, layers=_SOLVER_LAYERS, relatif="l"),
        max_params=20_000, description="RelatIF (l), dense Hessian (MLP: as explicit)"),
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
    "rps": MethodSpec(_rps, description="representer points, true label",
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
        max_params=20_000, description="LoGra, identity projections (exact layer blocks)"),
}
