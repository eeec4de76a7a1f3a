"""Boundary checks: clear errors for bad input, naming the argument at fault.

Checks run on concrete arrays only; under ``jit`` (tracers) the value checks (NaN)
are skipped and only static shape checks apply.
"""
from __future__ import annotations

import inspect
import os
import sys
import warnings
import weakref
from typing import Any, Callable

import jax
import numpy as np

from jattri._jit import jit

PyTree = Any



def on_cpu(leaves) -> bool:
    """Every leaf is a numpy value or a concrete jax array held whole by this process
    on CPU devices (a multi-host array is not; a tracer is not): numpy can read it in
    place instead of a compiled program."""
    return all(isinstance(x, (np.ndarray, np.generic)) or
               (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                and x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))
               for x in leaves)

def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def physical_memory():
    """Bytes of physical memory of this machine, or ``None`` where unknown."""
    import os
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
    # an accelerator's or another host's arrays are checked where they are (all_finite):
    # nothing is gathered or copied to the host
    if not all_finite([x for x in leaves if np.issubdtype(_dtype(x), np.inexact)]):
        raise ValueError(f"`{name}` contains NaN or inf")
    return int(sizes[0])


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


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
        try:
            dtype = jax.numpy.result_type(leaf)
        except TypeError:  # not an array (a string, an object)
            dtype = np.asarray(leaf).dtype
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise TypeError(f"`{name}` has a leaf of dtype {dtype}; parameters must be "
                            "floating point (float32, float64, bfloat16 or float16)")
    if not all_finite(leaves):
        raise ValueError(f"`{name}` contains NaN or inf")


def _in_host_memory(x) -> bool:
    """A concrete jax array every shard of which lives on a CPU device."""
    if not isinstance(x, jax.Array) or not _is_concrete(x):
        return False
    try:
        return x.is_fully_addressable and all(d.platform == "cpu"
                                              for d in x.sharding.device_set)
    except (AttributeError, RuntimeError):  # a deleted or donated buffer
        return False


#: Elements of CPU-resident jax arrays up to which finiteness is checked in numpy
#: (no compilation, ~8 ms at this size) rather than by a compiled reduction.
HOST_CHECK_MAX = 1 << 22


#: ``id(x) -> weakref.ref(x)`` of the jax arrays :func:`all_finite` found finite. A
#: jax array is immutable, so a dataset or parameters passed again (every later
#: ``cache`` / ``attribute`` on them) are not read again (the checks took 1.7 ms of each
#: TRAK call on the 5,000 × 784 MNIST LR under cProfile). The entry goes with the array.
_FINITE: dict = {}


def _known_finite(x) -> bool:
    ref = _FINITE.get(id(x))
    return ref is not None and ref() is x and not x.is_deleted()


def _remember_finite(leaves) -> None:
    for x in leaves:
        if isinstance(x, jax.Array):
            key = id(x)
            try:
                _FINITE[key] = weakref.ref(x, lambda _, key=key: _FINITE.pop(key, None))
            except TypeError:  # not weakly referenceable: checked every time
                pass


def all_finite(tree: PyTree) -> bool:
    """No NaN or inf in the concrete arrays of ``tree`` (tracers are skipped). Numpy
    arrays, and jax arrays on the CPU backend while they total at most
    :data:`HOST_CHECK_MAX` elements (a zero-copy view), are checked with numpy: no
    compilation. The rest in one compiled reduction (on 50M floats XLA's fused
    reduction takes 43 ms, numpy's isfinite + all 94 ms). Jax arrays found finite
    before are not read again (:data:`_FINITE`)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if _is_concrete(x) and not _known_finite(x)]
    if _finite(leaves):
        _remember_finite(leaves)
        return True
    return False


def _finite(leaves) -> bool:
    cpu = [_in_host_memory(x) for x in leaves]
    small = sum(np.size(x) for x, c in zip(leaves, cpu) if c) <= HOST_CHECK_MAX
    host = [isinstance(x, (np.ndarray, np.generic)) or (c and small)
            for x, c in zip(leaves, cpu)]
    device = [x for x, h in zip(leaves, host) if not h]
    return all(np.all(np.isfinite(np.asarray(x))) for x, h in zip(leaves, host) if h) and (
        not device or bool(_all_finite(device)))


def first_example(data: PyTree) -> PyTree:
    """The shape and dtype of one example (``jax.ShapeDtypeStruct`` leaves): what
    abstract checks need, without slicing (an eager slice is a compilation)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jax.numpy.result_type(x)), data)


@jit
def _all_finite(leaves) -> jax.Array:
    return jax.numpy.all(jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x))
                                          for x in leaves]))


class FnMemo:
    """Results remembered per user function and key (an argument signature): what a
    stage called again with the same shapes need not trace again. Weak keys on the
    function: the memo keeps no user function (or what it closes over) alive; a
    function that is not weakly referenceable or hashable is simply not remembered."""

    def __init__(self):
        self._table = weakref.WeakKeyDictionary()

    def get(self, fn: Callable, key: Any, default: Any = None) -> Any:
        try:
            return self._table.get(fn, {}).get(key, default)
        except TypeError:
            return default

    def put(self, fn: Callable, key: Any, value: Any) -> None:
        try:
            self._table.setdefault(fn, {})[key] = value
        except TypeError:
            pass


#: fn -> the argument signatures it has passed :func:`check_scalar_fn` with.
_CHECKED = FnMemo()
#: fn -> whether :class:`ClosureWarning` was given for it.
_WARNED = FnMemo()


def signature(tree: PyTree) -> tuple:
    """Hashable ``(tree structure, ((shape, dtype), ...))`` of arrays or
    ``jax.ShapeDtypeStruct``s: what an abstract evaluation of a function depends on."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    return structure, tuple((np.shape(x), str(jax.numpy.result_type(x))) for x in leaves)


class ClosureWarning(UserWarning):
    """A user function computes with large arrays that are not its arguments (closed
    over, or made from numpy inside it): JAX compiles them into every program as
    constants. Filter it with ``warnings.simplefilter("ignore", jattri.ClosureWarning)``."""


#: Arrays a user function closes over, in bytes, above which :class:`ClosureWarning` is
#: given. A first Grad-Dot call on a 1,000 × 100 problem whose loss closes over a 784 ×
#: w float32 matrix, against the same matrix bound by a ``Partial``
#: (``benchmarks/closure_constants.py``): w = 2,048 (6.4 MB) 0.96-1.12 s against
#: 0.73-0.76 s; w = 16,384 (51 MB) 3.79-4.28 s against 1.40-2.08 s, and TRAK wrote 103 MB
#: to the persistent cache against 0.7 MB (``benchmarks/RESULTS.md``, "Arrays a loss
#: closes over").
CLOSURE_WARN_BYTES = 4 << 20


def _trace_one(fn: Callable, args: tuple):
    """``fn(*args)``'s closed jaxpr and output shape. A ``Partial`` is passed as an
    argument, so the arrays it binds are inputs, not constants."""
    if isinstance(fn, jax.tree_util.Partial):
        return jax.make_jaxpr(lambda f, *a: f(*a), return_shape=True)(fn, *args)
    return jax.make_jaxpr(fn, return_shape=True)(*args)


def _warn_constants(consts: list, name: str) -> bool:
    """Give a :class:`ClosureWarning` if ``consts`` hold more than
    :data:`CLOSURE_WARN_BYTES`; whether it was given."""
    arrays = [c for c in consts if hasattr(c, "nbytes") and hasattr(c, "shape")]
    total = sum(int(c.nbytes) for c in arrays)
    if total < CLOSURE_WARN_BYTES:
        return False
    big = max(arrays, key=lambda c: int(c.nbytes))
    warnings.warn(
        f"`{name}` computes with {total / 2**20:.1f} MiB of arrays that are not its "
        f"arguments ({len(arrays)} array{'s' if len(arrays) > 1 else ''}, the largest "
        f"{tuple(big.shape)} {big.dtype}), closed over or made from numpy inside it. "
        f"JAX compiles them into every program as constants: slower compilation, a copy "
        f"in every compiled program and in every entry of the persistent compilation "
        f"cache. Pass them as arguments instead: `jax.tree_util.Partial(fn, arrays)` "
        f"with `fn(arrays, params, example)`, or `jattri.Members(params, aux=arrays)`.",
        ClosureWarning, stacklevel=_outside_jattri())
    return True


def _outside_jattri() -> int:
    """The ``stacklevel`` that points a warning given by this module's caller at the
    first frame outside the jattri package: the user's line."""
    root = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(root):
        frame, level = frame.f_back, level + 1
    return level


def check_scalar_fn(fn: Callable, params: PyTree, data: PyTree, name: str, *extra) -> None:
    """``fn(params, example, *extra)`` must return a real scalar (checked abstractly,
    once per function and argument shapes). A function computing with more than
    :data:`CLOSURE_WARN_BYTES` of arrays that are not its arguments gets a
    :class:`ClosureWarning`."""
    example = first_example(data)
    # Not keyed by ``name``: a Task's target is often its loss, the same function at
    # the same shapes, and a check passed under one name passes under the other.
    signature_ = signature((params, example, extra))
    if _CHECKED.get(fn, signature_, False):
        return
    try:
        closed, out = _trace_one(fn, (params, example) + extra)
    except Exception as err:  # the user's function failed on one example
        raise TypeError(f"`{name}` failed on one unbatched example: "
                        f"{type(err).__name__}: {err}") from err
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise TypeError(f"`{name}` must return a scalar for ONE unbatched example, got "
                        f"shape {shape}; did you pass a batched loss?")
    if not np.issubdtype(out.dtype, np.floating):
        raise TypeError(f"`{name}` must return a floating scalar, got dtype {out.dtype}")
    if not _WARNED.get(fn, None, False) and _warn_constants(closed.consts, name):
        _WARNED.put(fn, None, True)  # once per function, whatever its shapes
    _CHECKED.put(fn, signature_, True)


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


# ----------------------------------------------------------- hyperparameters

def _range_text(low, high, open_low, open_high) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if open_low else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if open_high else '<='} {high}")
    return " and ".join(parts)


def real(value: Any, name: str, *, low: Any = None, high: Any = None,
         open_low: bool = False, open_high: bool = False, none: bool = False,
         array: bool = False) -> Any:
    """A real-valued hyperparameter, checked: a Python or NumPy real number (``array``:
    also a real array, every entry checked), finite, within the range. Strings,
    booleans and complex numbers are refused by type (``TypeError``), a value out of
    range or non-finite by ``ValueError``; tracers pass unchecked. Returns the value
    (a Python float for a scalar)."""
    if value is None and none:
        return None
    if isinstance(value, jax.core.Tracer):
        return value
    rng = _range_text(low, high, open_low, open_high)
    want = "a real number" + (f" {rng}" if rng else "") + (" or None" if none else "")
    dtype = getattr(value, "dtype", None)
    is_num = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
    is_arr = (dtype is not None and np.ndim(value) > 0 and array and
              (np.issubdtype(np.dtype(dtype), np.integer) or
               jax.numpy.issubdtype(dtype, jax.numpy.floating)))
    is_0d = dtype is not None and np.ndim(value) == 0 and not is_num and (
        np.issubdtype(np.dtype(dtype), np.integer) or jax.numpy.issubdtype(dtype, jax.numpy.floating))
    if not (is_num or is_arr or is_0d):
        raise TypeError(f"`{name}` must be {want}, got {value!r} of type "
                        f"{type(value).__name__}")
    v = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` must be finite ({want}), got {value!r}")
    ok = np.ones(v.shape, bool)
    if low is not None:
        ok &= (v > low) if open_low else (v >= low)
    if high is not None:
        ok &= (v < high) if open_high else (v <= high)
    if not np.all(ok):
        raise ValueError(f"`{name}` must be {want}, got {value!r}")
    return float(v) if v.ndim == 0 and not hasattr(value, "shape") else value


def integer(value: Any, name: str, *, low: int = 1, none: bool = False) -> Any:
    """An integer hyperparameter ≥ ``low`` (or ``None`` when allowed), as a Python int.
    Floats, strings and booleans are refused by type."""
    if value is None and none:
        return None
    want = f"an int >= {low}" + (" or None" if none else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be {want}, got {value!r} of type "
                        f"{type(value).__name__}")
    if value < low:
        raise ValueError(f"`{name}` must be {want}, got {value!r}")
    return int(value)


def flag(value: Any, name: str) -> bool:
    """A boolean hyperparameter (``True``/``False`` only)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r} of type "
                        f"{type(value).__name__}")
    return bool(value)


def choice(value: Any, name: str, choices) -> Any:
    """One of ``choices`` (compared by equality, strings only by type str)."""
    if not isinstance(value, (str, type(None))) or value not in tuple(choices):
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def prng_key(value: Any, name: str = "key") -> Any:
    """A JAX PRNG key (``jax.random.key`` or a raw ``PRNGKey`` uint32 array)."""
    if isinstance(value, jax.core.Tracer):
        return value
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key):
        return value
    if dtype is not None and np.dtype(dtype) == np.uint32 and np.shape(value)[-1:] in ((2,), (4,)):
        return value
    raise TypeError(f"`{name}` must be a JAX PRNG key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {value!r} of type {type(value).__name__}")


def optional_callable(value: Any, name: str) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be callable or None, got {type(value).__name__}")
    return value
