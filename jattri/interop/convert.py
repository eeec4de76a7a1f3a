"""PyTorch ``state_dict`` -> Flax variables for the benchmark architectures.

``convert(state_dict, arch, **config)`` returns exactly what ``module.apply`` of
``jattri.models.build(arch, **config).module`` takes: ``{"params": ...}``, plus
``"batch_stats"`` (BatchNorm running mean and variance) for ResNet-9.

The Flax variables are the source of truth: the model is traced abstractly
(``jax.eval_shape``) and each of its leaves names the PyTorch entry it comes from, e.g.
``params/layer1/shortcut_conv/kernel`` <- ``layer1.0.shortcut.0.weight``. Layouts:

    Linear weight (out, in)            -> Dense kernel (in, out)     (transposed)
    HF GPT-2 Conv1D weight (in, out)   -> Dense kernel (in, out)     (as is)
    Conv2d weight (O, I, kh, kw)       -> Conv kernel (kh, kw, I, O)
    BatchNorm weight, bias             -> scale, bias                (params)
    BatchNorm running_mean/var         -> mean, var                  (batch_stats)
    LayerNorm weight, bias             -> scale, bias
    Embedding weight (n, d)            -> embedding (n, d)
    fused q/k/v (c_attn, in_proj)      -> one Dense of width 3·d, same q, k, v order

Buffers that carry no learned state are skipped (``num_batches_tracked``, nanoGPT's and
HF's causal-mask ``attn.bias``/``attn.masked_bias``, the Music Transformer's sinusoidal
``positional_encoding.pe``); an output head tied to the token embedding (``lm_head.weight``)
may be present or not, and must equal ``transformer.wte.weight`` if it is. Keys prefixed
``_orig_mod.`` (``torch.compile``) or ``module.`` (DDP) are accepted, a nanoGPT
training checkpoint ``{"model": state_dict, ...}`` is unwrapped, and GPT keys without the
``transformer.`` level (HF's headless ``GPT2Model``) are accepted.

Anything else that does not match — a missing key, an unexpected key, a shape that
differs from what ``config`` implies — raises one ``ValueError`` listing all of them.
Numbers of heads have no shape, so a wrong ``n_head``/``num_heads`` cannot be detected.

    state_dict = jattri.interop.load_pt("cifar2/models_full/0/model_weights_0.pt")
    variables = jattri.interop.convert(state_dict, "resnet9")
    model = jattri.models.build("resnet9")
    logits = model.module.apply(variables, images)      # images (n, 3, 32, 32)

On CPU the float32 logits match PyTorch's to ~1e-6 (tests/test_models_convert.py). On
GPUs XLA may use TF32 for float32 matmuls and convolutions; wrap the call in
``jax.default_matmul_precision("highest")`` to reproduce PyTorch's float32 numbers.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class _Layout(NamedTuple):
    """How one architecture's PyTorch names and layouts differ from its Flax port."""

    rename: tuple = ()               # (regex, replacement) on the dotted Flax path
    ignored: tuple = ()              # regexes of PyTorch keys that hold no parameters
    tied: tuple = ()                 # (optional key, key it must equal)
    linear_in_out: bool = False      # Linear weights stored (in, out) (HF Conv1D)
    base_prefix: str = ""            # added when a headless base model's keys lack it


_GPT_RENAME = ((r"^h_(\d+)\.", r"h.\1."), (r"^", "transformer."))
_GPT_TIED = (("lm_head.weight", "transformer.wte.weight"),)
_GPT_BASE = "transformer."

_LAYOUTS = {
    "mnist_lr": _Layout(),
    "mnist_mlp": _Layout(),
    "resnet9": _Layout(
        rename=((r"^(layer\d+)\.", r"\1.0."), (r"\.shortcut_conv\.", ".shortcut.0."),
                (r"\.shortcut_bn\.", ".shortcut.1.")),
        ignored=(r"(^|\.)num_batches_tracked$",)),
    "nanogpt": _Layout(rename=_GPT_RENAME, ignored=(r"^transformer\.h\.\d+\.attn\.bias$",),
                       tied=_GPT_TIED, base_prefix=_GPT_BASE),
    "gpt2": _Layout(rename=_GPT_RENAME,
                    ignored=(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$",),
                    tied=_GPT_TIED, linear_in_out=True, base_prefix=_GPT_BASE),
    "music_transformer": _Layout(
        rename=((r"^layers_(\d+)\.", r"transformer.encoder.layers.\1."),
                (r"^encoder_norm\.", "transformer.encoder.norm."),
                (r"\.in_proj\.(weight|bias)$", r".in_proj_\1")),
        ignored=(r"^positional_encoding\.pe$",)),
}

# (collection, Flax leaf name) -> PyTorch leaf name; other leaves (e.g. ``Er``) keep theirs.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "embedding"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_PREFIXES = ("_orig_mod.", "module.")


def _torch_key(path: tuple, layout: _Layout) -> str:
    """``("params", "layer1", "conv1", "kernel") -> "layer1.0.conv1.weight"``."""
    collection, *modules, leaf = path
    key = ".".join([*modules, _LEAF_NAMES.get((collection, leaf), leaf)])
    for pattern, replacement in layout.rename:
        key = re.sub(pattern, replacement, key)
    return key


def _to_flax(value: np.ndarray, path: tuple, layout: _Layout) -> np.ndarray:
    """PyTorch layout -> Flax layout for the leaf at ``path``."""
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)          # (O, I, kh, kw) -> (kh, kw, I, O)
    if path[-1] == "kernel" and value.ndim == 2 and not layout.linear_in_out:
        return value.T                              # (out, in) -> (in, out)
    return value


def _torch_shape(flax_shape: tuple, path: tuple, layout: _Layout) -> tuple:
    """The shape PyTorch stores a leaf of Flax shape ``flax_shape`` in (inverse of ``_to_flax``)."""
    if path[-1] == "kernel" and len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    if path[-1] == "kernel" and len(flax_shape) == 2 and not layout.linear_in_out:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _unwrap(state_dict: Mapping, layout: _Layout) -> dict:
    """Flat ``{key: array}`` from a state_dict or a checkpoint dict holding one."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got "
                        f"{type(state_dict).__name__}")
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            return _unwrap(state_dict[wrapper], layout)
    flat = {}
    for key, value in state_dict.items():
        key = str(key)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        flat[key] = value
    base = layout.base_prefix
    if base and not any(k.startswith(base) for k in flat):
        # HF's GPT2Model (e.g. the hub's pytorch_model.bin) has no "transformer." level.
        flat = {k if k.startswith("lm_head.") else base + k: v for k, v in flat.items()}
    return flat


def _shape(value) -> tuple | None:
    return tuple(np.shape(value)) if hasattr(value, "shape") else None


def convert(state_dict: Mapping[str, Any], arch: str, **config) -> dict:
    """Flax variables for ``jattri.models.build(arch, **config)`` from a PyTorch state_dict.

    Args:
      state_dict: ``{name: array}`` as saved by ``torch.save(model.state_dict())`` and read
        by ``jattri.interop.load_pt`` (numpy arrays; torch tensors work too).
      arch: ``"mnist_lr"``, ``"mnist_mlp"``, ``"resnet9"``, ``"nanogpt"``,
        ``"music_transformer"`` or ``"gpt2"``.
      **config: the sizes of the checkpoint's model, as for ``jattri.models.build``
        (defaults: dattri's benchmark models).

    Returns:
      ``{"params": ...}`` (and ``"batch_stats"`` for ``"resnet9"``) of jax arrays with the
      checkpoint's dtypes, so that ``build(arch, **config).module.apply(variables, x)``
      computes the PyTorch model's ``eval()`` forward pass.

    Raises:
      ValueError: listing every missing key, unexpected key and shape mismatch.
    """
    from flax import traverse_util  # deferred: flax costs ~1 s at `import jattri`

    from jattri.models.registry import build
    model = build(arch, **config)
    layout = _LAYOUTS[arch]
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0)))  # no eager op
    source = _unwrap(state_dict, layout)

    flat, missing, mismatched, used = {}, [], [], set()
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        key = _torch_key(path, layout)
        expected = _torch_shape(leaf.shape, path, layout)
        if key not in source:
            missing.append(key)
            continue
        used.add(key)
        got = _shape(source[key])
        if got != expected:
            mismatched.append(f"{key}: got {got}, expected {expected}")
            continue
        flat[path] = jax.device_put(_to_flax(np.asarray(source[key]), path, layout))

    untied = []
    for key, base in layout.tied:
        if key in source:
            used.add(key)
            if base in source and _shape(source[key]) != _shape(source[base]):
                mismatched.append(f"{key}: got {_shape(source[key])}, expected "
                                  f"{_shape(source[base])} (tied to {base})")
            elif base in source and not np.array_equal(np.asarray(source[key]),
                                                       np.asarray(source[base])):
                untied.append(f"{key} differs from {base}, but the model ties them")
    unexpected = [k for k in source if k not in used
                  and not any(re.search(p, k) for p in layout.ignored)]

    if missing or unexpected or mismatched or untied:
        lines = [f"state_dict does not match arch={arch!r} with config {config or '(defaults)'}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched), ("untied weights", untied)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(map(str, items)))
        raise ValueError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)
