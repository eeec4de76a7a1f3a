"""Layer inputs and output gradients of Flax ``nn.Dense`` and ``nn.Conv`` layers,
without hooks.

K-FAC, EK-FAC and LoGra need, for every layer that is linear in its weights,
``y_t = a_t W + b`` at the positions t of one example, the layer input rows ``a_t``
and the gradient of the loss with respect to the layer output ``s_t = ∂loss/∂y_t``;
the per-example kernel gradient is then ``Σ_t a_t s_tᵀ`` and the bias gradient
``Σ_t s_t``.

* ``nn.Dense``: a_t is the input row; t runs over the leading axes of the call
  (tokens, or the single row of an ``x[None]`` batch).
* ``nn.Conv``: a_t is the input patch under the kernel at output position t, flattened
  in the kernel's ``(*kernel_size, in_features)`` order, so that W is the kernel
  reshaped to ``(prod(kernel_size)·in_features, features)`` (Grosse & Martens, 2016,
  "A Kronecker-factored approximate Fisher matrix for convolution layers"). Patches are
  computed by the layer's own convolution with an identity kernel, so every padding
  mode, stride and dilation Flax supports is handled exactly as Flax handles it. Conv
  layers with ``feature_group_count > 1`` or a ``mask`` are not treated as linear
  layers here (they are skipped).

jattri gets them from the user's UNCHANGED ``loss_fn``: the call is wrapped in
``flax.linen.intercept_methods``; the interceptor records every such call's input and
adds a zero perturbation δ to its output. The gradient with respect to δ (at δ = 0) is
``s``. Layer names and shapes are found first with ``jax.eval_shape``.

Layers are named by their module path joined with ``"/"`` (``"fc1"``,
``"encoder/fc2"``); for the usual ``model.apply({"params": params}, ...)`` this is
also the key path of the layer's ``{"kernel", "bias"}`` sub-tree in ``params``
(``layer_params``). A module called several times (weight sharing) has its calls
concatenated along the position axis.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Layer(NamedTuple):
    """Static description of one Dense or Conv layer seen while evaluating ``loss_fn``.

    name: module path joined by ``"/"``. kind: ``"dense"`` or ``"conv"``.
    d_in: input features per position (Conv: prod(kernel_size)·in_features).
    d_out: output features. use_bias: whether the layer has a bias. positions: rows per
    example, summed over calls (T). kernel_shape: shape of the layer's kernel
    (``(d_in, d_out)`` for Dense, ``(*kernel_size, in_features, d_out)`` for Conv).
    out_shapes: shape and dtype of the output of each call (for the δ perturbations).
    conv: for Conv, the hashable geometry ``(kernel_size, strides, padding,
    input_dilation, kernel_dilation)`` that rebuilds the patches; ``None`` for Dense.
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    use_bias: bool
    positions: int
    kernel_shape: Tuple[int, ...]
    out_shapes: Tuple[Tuple[Tuple[int, ...], Any], ...]
    conv: Any = None


def _kind(context) -> str:
    """``"dense"``, ``"conv"`` or ``""`` for an intercepted method call."""
    if context.method_name != "__call__":
        return ""
    module = context.module
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, nn.Conv) and module.feature_group_count == 1 and module.mask is None:
        return "conv"
    return ""


def _name(module) -> str:
    return "/".join(str(p) for p in module.path)


def _kernel_size(module) -> Tuple[int, ...]:
    k = module.kernel_size
    return (k,) if isinstance(k, int) else tuple(k)


def _frozen(x):
    """Lists (Flax accepts them for padding and strides) as tuples: hashable."""
    return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def _conv_geometry(module) -> tuple:
    return (_kernel_size(module), _frozen(module.strides), _frozen(module.padding),
            _frozen(module.input_dilation), _frozen(module.kernel_dilation))


def _conv_patches(geometry: tuple, x: jax.Array) -> jax.Array:
    """``(..., *out_spatial, prod(kernel_size)·in_features)``: the input patch under the
    kernel at every output position, by a Flax convolution of the layer's geometry with
    an identity kernel (the patch of kernel offset k and channel c is output channel
    k·C + c, the order of ``kernel.reshape(-1, features)``)."""
    size, strides, padding, input_dilation, kernel_dilation = geometry
    d = int(np.prod(size)) * x.shape[-1]
    eye = jnp.eye(d, dtype=x.dtype).reshape(size + (x.shape[-1], d))
    probe = nn.Conv(d, size, strides=strides, padding=padding,
                    input_dilation=input_dilation, kernel_dilation=kernel_dilation,
                    use_bias=False, dtype=x.dtype, param_dtype=x.dtype)
    return probe.apply({"params": {"kernel": eye}}, x)


def linear_layers(loss_fn: Callable, params: PyTree, example: PyTree,
                  *args) -> Dict[str, Layer]:
    """Discover the Dense and Conv layers that ``loss_fn(params, example, *args)`` calls.

    Abstract evaluation only (``jax.eval_shape``): nothing is computed.

    Returns:
      ``{name: Layer}`` in call order; empty if the loss calls no such layer.
    """
    calls: Dict[str, list] = {}
    info: Dict[str, tuple] = {}

    def interceptor(next_fun, call_args, kwargs, context):
        out = next_fun(*call_args, **kwargs)
        kind = _kind(context)
        if kind:
            module, x = context.module, call_args[0]
            name = _name(module)
            calls.setdefault(name, []).append((tuple(out.shape), out.dtype))
            if kind == "dense":
                kernel, geometry = (int(x.shape[-1]), int(out.shape[-1])), None
            else:
                kernel = _kernel_size(module) + (int(x.shape[-1]), int(out.shape[-1]))
                geometry = _conv_geometry(module)
            info[name] = (kind, kernel, bool(module.use_bias), geometry)
        return out

    def run(p, z, *rest):
        with nn.intercept_methods(interceptor):
            return loss_fn(p, z, *rest)

    jax.eval_shape(run, params, example, *args)
    out = {}
    for name, shapes in calls.items():
        kind, kernel, bias, geometry = info[name]
        positions = sum(int(np.prod(s[:-1], dtype=np.int64)) for s, _ in shapes)
        d_in = int(np.prod(kernel[:-1]))
        out[name] = Layer(name, kind, d_in, kernel[-1], bias, positions, kernel,
                          tuple(shapes), geometry)
    return out


def perturbed_loss(loss_fn: Callable, params: PyTree, example: PyTree, args: tuple,
                   deltas: Dict[str, list]) -> Tuple[jax.Array, Dict[str, list]]:
    """``loss_fn(params, example, *args)`` with ``deltas[name][c]`` added to the output
    of call c of layer ``name`` (layers absent from ``deltas`` run unchanged).

    Returns ``(loss, inputs)``, ``inputs[name]``: the raw input of each call of each
    layer in ``deltas`` (turn them into rows with ``input_rows``). Differentiating the
    loss with respect to ``deltas`` at zero gives the output gradients ``s``.
    """
    inputs: Dict[str, list] = {}

    def interceptor(next_fun, call_args, kwargs, context):
        out = next_fun(*call_args, **kwargs)
        if _kind(context):
            name = _name(context.module)
            if name in deltas:
                seen = inputs.setdefault(name, [])
                if len(seen) < len(deltas[name]):
                    out = out + deltas[name][len(seen)]
                seen.append(call_args[0])
        return out

    with nn.intercept_methods(interceptor):
        loss = loss_fn(params, example, *args)
    return loss, inputs


def input_rows(layer: Layer, calls: list) -> jax.Array:
    """``(T, d_in)``: the input rows a_t of ``layer`` from ``perturbed_loss``'s record
    of its calls (Conv: the kernel-ordered input patches)."""
    rows = []
    for x in calls:
        if layer.kind == "conv":
            x = _conv_patches(layer.conv, x)
        rows.append(x.reshape(-1, layer.d_in))
    return jnp.concatenate(rows, axis=0)


def zero_deltas(layers: Dict[str, Layer]) -> Dict[str, list]:
    """``{name: [zeros of each call's output]}``: the δ = 0 of ``perturbed_loss``."""
    return {name: [jnp.zeros(s, dt) for s, dt in layer.out_shapes]
            for name, layer in layers.items()}


def layer_inputs(loss_fn: Callable, params: PyTree, example: PyTree, *args,
                 layers: Dict[str, Layer]) -> Dict[str, jax.Array]:
    """Input rows ``a: (T, d_in)`` of every layer in ``layers``, for ONE example, from
    a forward pass only (``layer_io`` when the output gradients are needed too)."""
    _, inputs = perturbed_loss(loss_fn, params, example, args, zero_deltas(layers))
    return {name: input_rows(layer, inputs[name]) for name, layer in layers.items()}


def layer_io(loss_fn: Callable, params: PyTree, example: PyTree, *args,
             layers: Dict[str, Layer] = None) -> Dict[str, Tuple[jax.Array, jax.Array]]:
    """Inputs ``a`` and output gradients ``s`` of every Dense/Conv layer, for ONE example.

    For a layer ``y_t = a_t W + b`` at positions t = 1..T:
    ``∂loss/∂W = Σ_t a_t s_tᵀ`` (Conv: reshaped to the kernel's shape) and
    ``∂loss/∂b = Σ_t s_t``.

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar`` (the user's function,
        unchanged; any ``nn.Dense``/``nn.Conv`` it calls through ``Module.apply`` is seen).
      params: the params pytree passed to ``loss_fn``.
      example: one unbatched example. args: extra arguments of ``loss_fn``.
      layers: the result of ``linear_layers`` (recomputed when omitted).

    Returns:
      ``{name: (a, s)}`` with ``a: (T, d_in)`` and ``s: (T, d_out)``. Pure and
      vmappable over examples: ``jax.vmap(lambda z: layer_io(f, params, z))(data)``.
    """
    if layers is None:
        layers = linear_layers(loss_fn, params, example, *args)
    grads, inputs = jax.grad(
        lambda d: perturbed_loss(loss_fn, params, example, args, d), has_aux=True)(
            zero_deltas(layers))
    out = {}
    for name, layer in layers.items():
        s = jnp.concatenate([g.reshape(-1, layer.d_out) for g in grads[name]], axis=0)
        out[name] = (input_rows(layer, inputs[name]), s)
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
