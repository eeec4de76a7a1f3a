"""Boundary checks: clear errors for bad input, naming the argument at fault.

Checks run on concrete arrays only; under ``jit`` (tracers) the value checks (NaN)
are skipped and only static shape checks apply.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import numpy as np

PyTree = Any


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def num_examples(data: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    return int(np.shape(leaves[0])[0])


def check_data(data: PyTree, name: str) -> int:
    """Validate a dataset pytree; return its number of examples n.

    Requirements: at least one array leaf, all leaves share the leading axis n ≥ 1,
    no NaN/inf in floating leaves.
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(f"`{name}` is empty: expected a pytree of arrays with a leading "
                         "example axis, got no arrays")
    sizes = []
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"`{name}` has a scalar leaf; every leaf needs a leading "
                             "example axis")
        sizes.append(shape[0])
    if len(set(sizes)) != 1:
        raise ValueError(f"`{name}` leaves disagree on the number of examples (leading "
                         f"axis sizes {sizes})")
    if sizes[0] == 0:
        raise ValueError(f"`{name}` has no examples (leading axis of size 0)")
    for leaf in leaves:
        if _is_concrete(leaf) and np.issubdtype(np.asarray(leaf).dtype, np.inexact):
            if not np.all(np.isfinite(np.asarray(leaf))):
                raise ValueError(f"`{name}` contains NaN or inf")
    return int(sizes[0])


def check_like(data: PyTree, ref: PyTree, name: str, ref_name: str) -> None:
    """``data`` must have ``ref``'s pytree structure and per-example shapes and dtypes."""
    s_data, s_ref = jax.tree_util.tree_structure(data), jax.tree_util.tree_structure(ref)
    if s_data != s_ref:
        raise ValueError(f"`{name}` has pytree structure {s_data}, but `{ref_name}` has "
                         f"{s_ref}; they must match")
    for a, b in zip(jax.tree_util.tree_leaves(data), jax.tree_util.tree_leaves(ref)):
        if np.shape(a)[1:] != np.shape(b)[1:]:
            raise ValueError(f"`{name}` has per-example shape {np.shape(a)[1:]} where "
                             f"`{ref_name}` has {np.shape(b)[1:]}")


def check_params(params: PyTree, name: str) -> None:
    """Params must hold floating arrays and no NaN/inf."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"`{name}` holds no arrays")
    for leaf in leaves:
        dtype = np.asarray(leaf).dtype if _is_concrete(leaf) else leaf.dtype
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"`{name}` has a leaf of dtype {dtype}; parameters must be "
                            "floating point")
        if _is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"`{name}` contains NaN or inf")


def first_example(data: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[0], data)


def check_scalar_fn(fn: Callable, params: PyTree, data: PyTree, name: str, *extra) -> None:
    """``fn(params, example, *extra)`` must return a real scalar (checked abstractly)."""
    try:
        out = jax.eval_shape(fn, params, first_example(data), *extra)
    except Exception as err:  # the user's function failed on one example
        raise TypeError(f"`{name}` failed on one unbatched example: "
                        f"{type(err).__name__}: {err}") from err
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise TypeError(f"`{name}` must return a scalar for ONE unbatched example, got "
                        f"shape {shape}; did you pass a batched loss?")
    if not np.issubdtype(out.dtype, np.floating):
        raise TypeError(f"`{name}` must return a floating scalar, got dtype {out.dtype}")


def check_signature(fn: Callable, name: str, **kwargs) -> None:
    """``fn(params, example, **kwargs)`` must be a valid call (``TypeError`` otherwise).

    Functions without an inspectable signature (some builtins) are accepted as they are.
    """
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None, **kwargs)
    except TypeError as err:
        extra = "".join(f", {k}=..." for k in kwargs)
        raise TypeError(f"`{name}` must accept (params, example{extra}), got signature "
                        f"{sig}") from err
