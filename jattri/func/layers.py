"""Layer inputs and output gradients of Flax ``nn.Dense`` layers, without hooks.

K-FAC, EK-FAC and LoGra need, for every Dense layer ``y = a W + b`` and one example,
the layer input ``a`` and the gradient of the loss with respect to the layer output
``s = ∂loss/∂y``; the per-example kernel gradient is then ``Σ_t a_t s_tᵀ`` and the
bias gradient ``Σ_t s_t`` (t runs over the positions of the example: tokens, or the
single row of an ``x[None]`` batch).

jattri gets them from the user's UNCHANGED ``loss_fn``: the call is wrapped in
``flax.linen.intercept_methods``; the interceptor records every ``nn.Dense`` call's
input and adds a zero perturbation δ to its output. The gradient with respect to δ
(at δ = 0) is ``s``. Layer names and shapes are found first with ``jax.eval_shape``.

Layers are named by their module path joined with ``"/"`` (``"fc1"``,
``"encoder/fc2"``); for the usual ``model.apply({"params": params}, ...)`` this is
also the key path of the layer's ``{"kernel", "bias"}`` sub-tree in ``params``
(``layer_params``). A Dense module called several times (weight sharing) has its
calls concatenated along the position axis.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class DenseLayer(NamedTuple):
    """Static description of one Dense layer seen while evaluating ``loss_fn``.

    name: module path joined by ``"/"``. d_in, d_out: feature sizes. use_bias: whether
    the layer has a bias. positions: rows per example, summed over calls (T).
    out_shapes: shape of the output of each call (for the δ perturbations).
    """

    name: str
    d_in: int
    d_out: int
    use_bias: bool
    positions: int
    out_shapes: Tuple[Tuple[Tuple[int, ...], Any], ...]


def _is_dense_call(context) -> bool:
    return isinstance(context.module, nn.Dense) and context.method_name == "__call__"


def _name(module) -> str:
    return "/".join(str(p) for p in module.path)


def dense_layers(loss_fn: Callable, params: PyTree, example: PyTree, *args) -> Dict[str, DenseLayer]:
    """Discover the Dense layers that ``loss_fn(params, example, *args)`` calls.

    Abstract evaluation only (``jax.eval_shape``): nothing is computed.

    Returns:
      ``{name: DenseLayer}`` in call order; empty if the loss calls no ``nn.Dense``.
    """
    calls: Dict[str, list] = {}
    info: Dict[str, tuple] = {}

    def interceptor(next_fun, call_args, kwargs, context):
        out = next_fun(*call_args, **kwargs)
        if _is_dense_call(context):
            name = _name(context.module)
            x = call_args[0]
            calls.setdefault(name, []).append((tuple(out.shape), out.dtype))
            info[name] = (int(x.shape[-1]), int(out.shape[-1]), bool(context.module.use_bias))
        return out

    def run(p, z, *rest):
        with nn.intercept_methods(interceptor):
            return loss_fn(p, z, *rest)

    jax.eval_shape(run, params, example, *args)
    out = {}
    for name, shapes in calls.items():
        d_in, d_out, bias = info[name]
        positions = sum(int(np.prod(s[:-1], dtype=np.int64)) for s, _ in shapes)
        out[name] = DenseLayer(name, d_in, d_out, bias, positions, tuple(shapes))
    return out


def layer_io(loss_fn: Callable, params: PyTree, example: PyTree, *args,
             layers: Dict[str, DenseLayer] = None) -> Dict[str, Tuple[jax.Array, jax.Array]]:
    """Inputs ``a`` and output gradients ``s`` of every Dense layer, for ONE example.

    For a Dense layer ``y = a W + b`` called on positions t = 1..T:
    ``∂loss/∂W = Σ_t a_t s_tᵀ`` and ``∂loss/∂b = Σ_t s_t``.

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar`` (the user's function,
        unchanged; any ``nn.Dense`` it calls through ``Module.apply`` is seen).
      params: the params pytree passed to ``loss_fn``.
      example: one unbatched example. args: extra arguments of ``loss_fn``.
      layers: the result of ``dense_layers`` (recomputed when omitted).

    Returns:
      ``{name: (a, s)}`` with ``a: (T, d_in)`` and ``s: (T, d_out)``. Pure and
      vmappable over examples: ``jax.vmap(lambda z: layer_io(f, params, z))(data)``.
    """
    if layers is None:
        layers = dense_layers(loss_fn, params, example, *args)
    deltas = {name: [jnp.zeros(s, dt) for s, dt in layer.out_shapes]
              for name, layer in layers.items()}

    def perturbed_loss(deltas):
        inputs: Dict[str, list] = {}

        def interceptor(next_fun, call_args, kwargs, context):
            out = next_fun(*call_args, **kwargs)
            if _is_dense_call(context):
                name = _name(context.module)
                seen = inputs.setdefault(name, [])
                if name in deltas and len(seen) < len(deltas[name]):
                    # The zero perturbation is the handle on ∂loss/∂y.
                    out = out + deltas[name][len(seen)]
                seen.append(call_args[0])
            return out

        with nn.intercept_methods(interceptor):
            loss = loss_fn(params, example, *args)
        return loss, inputs

    grads, inputs = jax.grad(perturbed_loss, has_aux=True)(deltas)
    out = {}
    for name, layer in layers.items():
        a = jnp.concatenate([x.reshape(-1, layer.d_in) for x in inputs[name]], axis=0)
        s = jnp.concatenate([g.reshape(-1, layer.d_out) for g in grads[name]], axis=0)
        out[name] = (a, s)
    return out


def layer_params(params: PyTree, name: str) -> PyTree:
    """The params sub-tree of layer ``name`` (``"encoder/fc1"`` -> ``params["encoder"]["fc1"]``).

    The empty name ``""`` (a bare ``nn.Dense`` applied as the whole model) is ``params``
    itself. Raises ``KeyError`` naming the layer when ``params`` is not laid out by
    module path.
    """
    node = params
    for key in [k for k in name.split("/") if k]:
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError) as err:
            raise KeyError(f"layer {name!r}: params has no entry {key!r} on its path; "
                           "params must be the tree passed to Module.apply as "
                           "{'params': params}") from err
    return node
