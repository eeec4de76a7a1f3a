"""Layer inputs and output gradients of the linear layers of a loss, without hooks.

K-FAC, EK-FAC and LoGra need, for every layer that is linear in its weights,
``y_t = a_t W + b`` at the positions t of one example, the layer input rows ``a_t``
and the gradient of the loss with respect to the layer output ``s_t = ∂loss/∂y_t``;
the per-example kernel gradient is then ``Σ_t a_t s_tᵀ`` and the bias gradient
``Σ_t s_t``.

Three kinds of model are seen, with the user's ``loss_fn(params, example)`` unchanged
for the first two:

* **Flax linen**: ``nn.Dense`` and ``nn.Conv`` called through
  ``model.apply({"params": params}, ...)``. Seen through
  ``flax.linen.intercept_methods``.
* **Flax NNX**: ``nnx.Linear`` and ``nnx.Conv`` of a module rebuilt from the params
  inside the loss, ``nnx.merge(graphdef, params)(x)``, with ``graphdef, params =
  nnx.split(model)`` (or ``nnx.split(model, nnx.Param, ...)`` for models with other
  state; ``params`` may be the ``nnx.State`` or ``nnx.to_pure_dict(state)``). Seen by
  wrapping ``nnx.Linear.__call__`` and ``nnx.Conv.__call__`` while jattri traces the
  loss (:func:`capturing`; the class methods are restored afterwards, and other threads
  run the original code). A layer is attributed when its kernel IS a leaf of the
  ``params`` given to the loss (matched by identity, so cast or transform the params
  after ``merge``, not before, and do not ``jit`` inside the loss).
* **Plain JAX functions**: the user names a linear layer by computing it with
  :func:`dense`, ``dense(x, params["fc1"]["w"], params["fc1"]["b"])`` in place of
  ``x @ params["fc1"]["w"] + params["fc1"]["b"]`` (the same value, and outside jattri
  the same computation). Its kernel and bias must be leaves of ``params`` (matched by
  identity, as for NNX).

* Dense / Linear: a_t is the input row; t runs over the leading axes of the call
  (tokens, or the single row of an ``x[None]`` batch).
* Conv: a_t is the input patch under the kernel at output position t, flattened
  in the kernel's ``(*kernel_size, in_features)`` order, so that W is the kernel
  reshaped to ``(prod(kernel_size)·in_features, features)`` (Grosse & Martens, 2016,
  "A Kronecker-factored approximate Fisher matrix for convolution layers"). Patches are
  computed by the layer's own convolution with an identity kernel, so every padding
  mode, stride and dilation Flax supports is handled exactly as Flax handles it. Conv
  layers with ``feature_group_count > 1`` or a ``mask`` are not treated as linear
  layers here (they are skipped).

Every captured call records its input and adds a zero perturbation δ to its output;
the gradient with respect to δ (at δ = 0) is ``s``. Layer names and shapes are found
first with ``jax.eval_shape``.

Layer names are params paths joined with ``"/"`` (an ``nnx.Variable``'s trailing
``value`` dropped): a layer whose kernel and bias are the leaves ``P/kernel`` and
``P/bias`` is named ``P`` (linen: its module path, ``"fc1"``, ``"encoder/fc2"``; NNX:
its attribute path, ``"linear1"``, ``"layers/0"``); any other layer (plain functions)
is named by its leaves, ``"fc1/w+fc1/b"`` (kernel + bias) or ``"W1"`` (no bias).
:func:`layer_keys` resolves a name in a params-like tree. A layer called several times
(weight sharing) has its calls concatenated along the position axis.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jattri import _checks

# Flax is not imported here (it costs ~1 s at `import jattri`): a loss can only call linen
# or NNX layers if the user's code imported them, so capture hooks into whichever of
# `flax.linen` / `flax.nnx` is already in `sys.modules`.

PyTree = Any


class Layer(NamedTuple):
    """Static description of one linear layer seen while evaluating ``loss_fn``.

    name: see the module docstring. kind: ``"dense"`` or ``"conv"``.
    d_in: input features per position (Conv: prod(kernel_size)·in_features).
    d_out: output features. use_bias: whether the layer has a bias. positions: rows per
    example, summed over calls (T). kernel_shape: shape of the layer's kernel
    (``(d_in, d_out)`` for Dense, ``(*kernel_size, in_features, d_out)`` for Conv).
    out_shapes: shape and dtype of the output of each call (for the δ perturbations).
    conv: for Conv, the hashable geometry ``(kernel_size, strides, padding,
    input_dilation, kernel_dilation)`` that rebuilds the patches; ``None`` for Dense.
    kernel_key, bias_key: the ``"/"``-joined params paths of the kernel and the bias
    (``None`` without bias), as :func:`leaf_key` writes them.
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
    kernel_key: str = ""
    bias_key: Optional[str] = None


def same_layers(a, b) -> bool:
    """Two sequences of :class:`Layer` name the same parameters in the same roles
    (name, kind, input and output widths, bias): what a method that projects or
    factors ``loss_fn``'s layers needs of ``target_fn``'s. Positions may differ."""
    shape = lambda ls: [(l.name, l.kind, l.d_in, l.d_out, l.use_bias) for l in ls]
    return a is not None and b is not None and shape(a) == shape(b)


# ------------------------------------------------------------------ params paths

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_key(path) -> str:
    """A pytree key path as ``"a/b/c"``; the trailing ``value`` attribute of an
    ``nnx.Variable`` (``nnx.State`` leaves) is dropped, so an ``nnx.State`` and its
    pure dict have the same keys."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def leaf_keys(tree: PyTree) -> List[Tuple[str, Any]]:
    """``[(leaf_key, leaf)]`` of every leaf of ``tree``, in leaf order."""
    return [(leaf_key(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def layer_name(kernel_key: str, bias_key: Optional[str]) -> str:
    """The name of the layer with these leaves (module docstring): ``P`` for
    ``P/kernel`` (+ ``P/bias``), else ``kernel_key`` or ``kernel_key+bias_key``."""
    parent, _, leaf = kernel_key.rpartition("/")
    if leaf == "kernel" and bias_key in (None, _join(parent, "bias")):
        return parent
    return kernel_key if bias_key is None else f"{kernel_key}+{bias_key}"


def layer_keys(tree: PyTree, name: str) -> Tuple[str, Optional[str]]:
    """``(kernel_key, bias_key)`` of layer ``name`` in ``tree`` (params, or a pytree
    like them: gradients, factors); ``bias_key`` is ``None`` when the tree holds no
    bias for it. Raises ``KeyError`` naming the layer when ``tree`` lacks its kernel."""
    keys = {k for k, _ in leaf_keys(tree)}
    if "+" in name:
        kernel, bias = name.split("+", 1)
    elif name in keys:
        kernel, bias = name, None
    else:
        kernel, bias = _join(name, "kernel"), _join(name, "bias")
    if kernel not in keys or (bias is not None and "+" in name and bias not in keys):
        raise KeyError(f"layer {name!r}: params have no leaf {kernel!r}; params must be the "
                       "tree the loss computes the layer from (linen: the tree passed to "
                       "Module.apply as {'params': params})")
    return kernel, (bias if bias in keys else None)


def layer_params(params: PyTree, name: str) -> Dict[str, Any]:
    """``{"kernel": ..., "bias": ...}`` of layer ``name`` in ``params`` (or a tree like
    them); no ``"bias"`` entry for a layer without one. ``"encoder/fc1"`` ->
    ``params["encoder"]["fc1"]``'s leaves; the empty name ``""`` (a bare ``nn.Dense``
    applied as the whole model) is ``params`` itself. Raises ``KeyError`` naming the
    layer when ``params`` do not hold it."""
    kernel, bias = layer_keys(params, name)
    leaves = dict(leaf_keys(params))
    out = {"kernel": leaves[kernel]}
    if bias is not None:
        out["bias"] = leaves[bias]
    return out


# --------------------------------------------------------------------- capture

class _Call(NamedTuple):
    """What one captured call says about its layer (static)."""
    kind: str
    kernel_shape: Tuple[int, ...]
    use_bias: bool
    conv: Any
    kernel_key: str
    bias_key: Optional[str]


class _Capture:
    """One evaluation of ``loss_fn(params, ...)``: the linear-layer calls seen.

    ``deltas is None``: discovery, every call's output shape is kept. Otherwise the
    calls of the layers in ``deltas`` get ``deltas[name][c]`` added to the output of
    their call c and their inputs are kept; other layers run unchanged."""

    def __init__(self, params: PyTree, deltas: Optional[Dict[str, list]] = None):
        self.keys = {id(x): k for k, x in leaf_keys(params)}
        self.deltas = deltas
        self.calls: Dict[str, list] = {}
        self.info: Dict[str, _Call] = {}
        self.unmatched: List[str] = []

    def key_of(self, x) -> Optional[str]:
        return None if x is None else self.keys.get(id(x))

    def seen(self, name: str, call: _Call, x, out):
        if self.deltas is None:
            self.calls.setdefault(name, []).append((tuple(out.shape), out.dtype))
            self.info[name] = call
        elif name in self.deltas:
            inputs = self.calls.setdefault(name, [])
            if len(inputs) < len(self.deltas[name]):
                out = out + self.deltas[name][len(inputs)]
            inputs.append(x)
        return out

    def seen_by_params(self, what: str, call: _Call, x, out, kernel, bias):
        """A call identified by its kernel (and bias) leaves of ``params`` (NNX, plain)."""
        kernel_key, bias_key = self.key_of(kernel), self.key_of(bias)
        if kernel_key is None or (bias is not None and bias_key is None):
            self.unmatched.append(what)
            return out
        call = call._replace(kernel_key=kernel_key, bias_key=bias_key)
        return self.seen(layer_name(kernel_key, bias_key), call, x, out)


_active = threading.local()  # per thread: the stack of running captures
_patch_lock = threading.Lock()
_patch_count = 0
_originals: Dict[type, Callable] = {}


def _current() -> Optional[_Capture]:
    stack = getattr(_active, "stack", None)
    return stack[-1] if stack else None


# -- Flax linen

def _linen_kind(context) -> str:
    """``"dense"``, ``"conv"`` or ``""`` for an intercepted linen method call."""
    if context.method_name != "__call__":
        return ""
    module = context.module
    nn = sys.modules["flax.linen"]
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, nn.Conv) and module.feature_group_count == 1 and module.mask is None:
        return "conv"
    return ""


def _kernel_size(module) -> Tuple[int, ...]:
    k = module.kernel_size
    return (k,) if isinstance(k, int) else tuple(k)


def _frozen(x):
    """Lists (Flax accepts them for padding and strides) as tuples: hashable."""
    return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def _conv_geometry(module) -> tuple:
    return (_kernel_size(module), _frozen(module.strides), _frozen(module.padding),
            _frozen(module.input_dilation), _frozen(module.kernel_dilation))


def _linen_interceptor(next_fun, call_args, kwargs, context):
    out = next_fun(*call_args, **kwargs)
    capture, kind = _current(), _linen_kind(context)
    if capture is None or not kind:
        return out
    module, x = context.module, call_args[0]
    name = "/".join(str(p) for p in module.path)
    if kind == "dense":
        kernel, geometry = (int(x.shape[-1]), int(out.shape[-1])), None
    else:
        kernel = _kernel_size(module) + (int(x.shape[-1]), int(out.shape[-1]))
        geometry = _conv_geometry(module)
    bias = bool(module.use_bias)
    call = _Call(kind, kernel, bias, geometry, _join(name, "kernel"),
                 _join(name, "bias") if bias else None)
    return capture.seen(name, call, x, out)


# -- Flax NNX

def _variable_value(v):
    if v is None:
        return None
    return v.get_value() if hasattr(v, "get_value") else v.value


def _nnx_call(cls, kind: str) -> Callable:
    original = _originals[cls]

    def __call__(self, inputs, *args, **kwargs):
        out = original(self, inputs, *args, **kwargs)
        capture = _current()
        if capture is None:
            return out
        if kind == "conv" and (self.feature_group_count != 1
                               or getattr(self, "mask", None) is not None):
            return out
        kernel, bias = _variable_value(self.kernel), _variable_value(self.bias)
        geometry = _conv_geometry(self) if kind == "conv" else None
        call = _Call(kind, tuple(int(d) for d in kernel.shape), bias is not None, geometry,
                     "", None)
        return capture.seen_by_params(f"nnx.{cls.__name__}", call, inputs, out, kernel, bias)

    __call__.__wrapped__ = original
    return __call__


def _nnx_layers() -> tuple:
    """``((nnx.Linear, "dense"), (nnx.Conv, "conv"))``, or ``()`` while the user's code has
    not imported ``flax.nnx``."""
    nnx = sys.modules.get("flax.nnx")
    return () if nnx is None else ((nnx.Linear, "dense"), (nnx.Conv, "conv"))


@contextlib.contextmanager
def _nnx_patched():
    """``nnx.Linear.__call__`` / ``nnx.Conv.__call__`` wrapped while any capture runs
    (reference-counted over threads; the originals are always restored)."""
    global _patch_count
    with _patch_lock:
        if _patch_count == 0:
            for cls, kind in _nnx_layers():
                _originals[cls] = cls.__dict__["__call__"]
                cls.__call__ = _nnx_call(cls, kind)
        _patch_count += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_count -= 1
            if _patch_count == 0:
                for cls in list(_originals):
                    cls.__call__ = _originals.pop(cls)


# -- plain functions

def dense(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of ``x``: a linear layer of a plain-JAX
    model that K-FAC, EK-FAC and LoGra see.

    Use it inside ``loss_fn(params, example)`` in place of the matrix product, with the
    kernel ``(d_in, d_out)`` and bias ``(d_out,)`` taken straight from ``params``
    (``dense(h, params["fc1"]["w"], params["fc1"]["b"])``): jattri finds the layer by
    these leaves and names it by their paths (``"fc1/w+fc1/b"``; ``"fc1"`` when they
    are ``fc1/kernel`` and ``fc1/bias``). Outside jattri it is just the product.

    Args:
      x: ``(..., d_in)``. kernel: ``(d_in, d_out)``. bias: ``(d_out,)`` or ``None``.
    Returns:
      ``(..., d_out)``.
    """
    if np.ndim(kernel) != 2 or (bias is not None and np.shape(bias) != np.shape(kernel)[1:]):
        raise ValueError(f"dense: kernel must be (d_in, d_out) and bias (d_out,), got "
                         f"{np.shape(kernel)} and {None if bias is None else np.shape(bias)}")
    out = jnp.tensordot(x, kernel, axes=1)
    if bias is not None:
        out = out + bias
    capture = _current()
    if capture is None:
        return out
    call = _Call("dense", tuple(int(d) for d in np.shape(kernel)), bias is not None, None,
                 "", None)
    return capture.seen_by_params("jattri.func.layers.dense", call, x, out, kernel, bias)


@contextlib.contextmanager
def capturing(params: PyTree, deltas: Optional[Dict[str, list]] = None):
    """Within the block, linen Dense/Conv, NNX Linear/Conv and :func:`dense` calls of a
    loss of ``params`` are recorded (and perturbed by ``deltas``): yields the
    ``_Capture``. Used by :func:`linear_layers` and :func:`perturbed_loss`."""
    capture = _Capture(params, deltas)
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    stack.append(capture)
    try:
        nn = sys.modules.get("flax.linen")
        linen = (nn.intercept_methods(_linen_interceptor) if nn is not None
                 else contextlib.nullcontext())
        with _nnx_patched(), linen:
            yield capture
    finally:
        stack.pop()


SUPPORTED = ("K-FAC/EK-FAC and LoGra see Flax linen nn.Dense / nn.Conv called through "
             "Module.apply({'params': params}, ...), Flax NNX nnx.Linear / nnx.Conv of "
             "nnx.merge(graphdef, params) with the params passed to the loss, and, in "
             "plain-JAX models, the layers the loss computes with "
             "jattri.func.layers.dense(x, params[...]['w'], params[...]['b']) in place of "
             "x @ w + b")


def no_layers_error(fn_name: str, method: str, unmatched: tuple = ()) -> ValueError:
    """The error for a loss in which no linear layer was found (what is supported,
    and how a plain-function model names its layers)."""
    extra = ""
    if unmatched:
        extra = (f" ({len(unmatched)} call(s) of {sorted(set(unmatched))} were skipped: "
                 "their kernel is not a leaf of the params passed to the loss; pass the "
                 "params leaves themselves, not a cast or transformed copy, and do not "
                 "jit inside the loss)")
    return ValueError(f"`{fn_name}` calls no linear layer that {method} can attribute "
                      f"through{extra}. {SUPPORTED}.")


def _conv_patches(geometry: tuple, x: jax.Array) -> jax.Array:
    """``(..., *out_spatial, prod(kernel_size)·in_features)``: the input patch under the
    kernel at every output position, by a Flax convolution of the layer's geometry with
    an identity kernel (the patch of kernel offset k and channel c is output channel
    k·C + c, the order of ``kernel.reshape(-1, features)``)."""
    size, strides, padding, input_dilation, kernel_dilation = geometry
    import flax.linen as nn  # only reached for a linen/NNX Conv: flax is loaded
    d = int(np.prod(size)) * x.shape[-1]
    eye = jnp.eye(d, dtype=x.dtype).reshape(size + (x.shape[-1], d))
    probe = nn.Conv(d, size, strides=strides, padding=padding,
                    input_dilation=input_dilation, kernel_dilation=kernel_dilation,
                    use_bias=False, dtype=x.dtype, param_dtype=x.dtype)
    return probe.apply({"params": {"kernel": eye}}, x)


def _discover(loss_fn: Callable, params: PyTree, example: PyTree, *args) -> _Capture:
    found = []

    def run(p, z, *rest):
        with capturing(p) as capture:
            found.append(capture)
            return loss_fn(p, z, *rest)

    jax.eval_shape(run, params, example, *args)
    return found[0]


def _layers_of(capture: _Capture) -> Dict[str, Layer]:
    out = {}
    for name, shapes in capture.calls.items():
        call = capture.info[name]
        kernel = call.kernel_shape
        positions = sum(int(np.prod(s[:-1], dtype=np.int64)) for s, _ in shapes)
        out[name] = Layer(name, call.kind, int(np.prod(kernel[:-1])), kernel[-1],
                          call.use_bias, positions, kernel, tuple(shapes), call.conv,
                          call.kernel_key, call.bias_key)
    return out


#: loss_fn -> {argument signature: (layers, unmatched)}: a function is traced for its
#: layers once per argument shapes (every method stage asks again).
_FOUND = _checks.FnMemo()


def _discovered(loss_fn: Callable, params: PyTree, example: PyTree, *args) -> tuple:
    """``({name: Layer}, unmatched)`` of :func:`_discover`, memoised."""
    key = _checks.signature((params, example, args))
    found = _FOUND.get(loss_fn, key)
    if found is None:
        capture = _discover(loss_fn, params, example, *args)
        found = (_layers_of(capture), tuple(capture.unmatched))
        _FOUND.put(loss_fn, key, found)
    return dict(found[0]), found[1]


def linear_layers(loss_fn: Callable, params: PyTree, example: PyTree,
                  *args) -> Dict[str, Layer]:
    """Discover the linear layers (module docstring) that ``loss_fn(params, example,
    *args)`` calls.

    Abstract evaluation only (``jax.eval_shape``), once per function and argument
    shapes: nothing is computed.

    Returns:
      ``{name: Layer}`` in call order; empty if the loss calls no such layer.
    """
    return _discovered(loss_fn, params, example, *args)[0]


def find_layers(loss_fn: Callable, params: PyTree, example: PyTree, *args,
                fn_name: str = "loss_fn", method: str = "K-FAC/EK-FAC") -> Dict[str, Layer]:
    """:func:`linear_layers`, raising :func:`no_layers_error` when there are none."""
    layers, unmatched = _discovered(loss_fn, params, example, *args)
    if not layers:
        raise no_layers_error(fn_name, method, unmatched)
    return layers


def perturbed_loss(loss_fn: Callable, params: PyTree, example: PyTree, args: tuple,
                   deltas: Dict[str, list]) -> Tuple[jax.Array, Dict[str, list]]:
    """``loss_fn(params, example, *args)`` with ``deltas[name][c]`` added to the output
    of call c of layer ``name`` (layers absent from ``deltas`` run unchanged).

    Returns ``(loss, inputs)``, ``inputs[name]``: the raw input of each call of each
    layer in ``deltas`` (turn them into rows with ``input_rows``). Differentiating the
    loss with respect to ``deltas`` at zero gives the output gradients ``s``.
    """
    with capturing(params, deltas) as capture:
        loss = loss_fn(params, example, *args)
    return loss, capture.calls


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
    """Inputs ``a`` and output gradients ``s`` of every linear layer, for ONE example.

    For a layer ``y_t = a_t W + b`` at positions t = 1..T:
    ``∂loss/∂W = Σ_t a_t s_tᵀ`` (Conv: reshaped to the kernel's shape) and
    ``∂loss/∂b = Σ_t s_t``.

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar`` (the user's function: its
        linen ``nn.Dense``/``nn.Conv``, NNX ``nnx.Linear``/``nnx.Conv`` and
        :func:`dense` layers are seen, module docstring).
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
    return _io(layers, grads, inputs)


def _io(layers, grads, inputs) -> Dict[str, Tuple[jax.Array, jax.Array]]:
    out = {}
    for name, layer in layers.items():
        s = jnp.concatenate([g.reshape(-1, layer.d_out) for g in grads[name]], axis=0)
        out[name] = (input_rows(layer, inputs[name]), s)
    return out


def layer_io_and_grad(loss_fn: Callable, params: PyTree, example: PyTree, *args,
                      layers: Dict[str, Layer]) -> Tuple[Dict, PyTree]:
    """``(layer_io(...), jax.grad(loss_fn)(params, example, *args))`` from ONE backward
    pass (the layer outputs' zero perturbations and the params differentiated
    together): what checking that the layers' factors rebuild the gradient needs, in
    half the program of two separate passes."""
    (pgrads, grads), inputs = jax.grad(
        lambda p, d: perturbed_loss(loss_fn, p, example, args, d), argnums=(0, 1),
        has_aux=True)(params, zero_deltas(layers))
    return _io(layers, grads, inputs), pgrads
