"""Read PyTorch ``.pt`` checkpoints into numpy without importing torch or running code.

The format (``torch.save`` since torch 1.6) is a zip archive with one top folder
``<name>/`` holding ``data.pkl`` (the object, pickled; each tensor refers to a storage
by a persistent id ``("storage", StorageType, key, location, numel)``), the raw storages
``data/<key>``, ``byteorder`` (``little``/``big``) and ``version``. A tensor is rebuilt
by ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``: element
``index`` of the tensor is ``storage[offset + Σ_k index_k · stride_k]``.

``load_pt`` unpickles ``data.pkl`` through the allow-list unpickler of
``jattri.interop.unpickle``: tensor and storage rebuilds, ``torch.Size``, torch dtypes,
``collections.OrderedDict`` and a few plain builtins. Any other global is refused
(``UnsafePickleError``) before anything is called.
"""
from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

from jattri.interop import unpickle as _up
from jattri.interop.unpickle import CorruptFileError, UnsafePickleError

# Typed storages of torch.save (one per dtype) and the dtypes of _rebuild_tensor_v3.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64,
    "double": np.float64, "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "cfloat": np.complex64, "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


class _Storage:
    """A storage of the archive: its elements as a read-only 1-D numpy array."""

    __slots__ = ("key", "array", "byteorder")

    def __init__(self, key: str, array: np.ndarray, byteorder: str):
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "byteorder", byteorder)

    def __setattr__(self, k, v):
        raise UnsafePickleError(f"the pickle tries to set attribute {k!r} on a storage")


def _ints(x, what: str) -> Tuple[int, ...]:
    if not isinstance(x, tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in x):
        raise CorruptFileError(f"tensor {what} must be a tuple of ints, got {x!r}")
    return x


def _strided(storage, offset, size, stride, dtype=None) -> np.ndarray:
    """The tensor ``t[i] = storage[offset + Σ i_k stride_k]`` as a fresh C-contiguous array."""
    if not isinstance(storage, _Storage):
        raise CorruptFileError(f"a tensor's storage must be a persistent storage record, "
                               f"got {type(storage).__name__}")
    flat = storage.array
    if dtype is not None:  # v3: an untyped (byte) storage reinterpreted as `dtype`
        if not isinstance(dtype, _up._Global) or not isinstance(dtype.value, np.dtype):
            raise CorruptFileError(f"tensor dtype must be a torch dtype, got {dtype!r}")
        dtype = dtype.value
        if flat.nbytes % dtype.itemsize:
            raise CorruptFileError(f"storage data/{storage.key} holds {flat.nbytes} bytes, "
                                   f"not a multiple of {dtype} ({dtype.itemsize} bytes)")
        flat = _from_bytes(flat.tobytes(), dtype, storage.byteorder)
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise CorruptFileError(f"tensor storage offset must be an int, got {offset!r}")
    if len(size) != len(stride):
        raise CorruptFileError(f"tensor size {size} and stride {stride} differ in length")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise CorruptFileError(f"negative tensor offset/size/stride: {offset}, {size}, {stride}")
    if math.prod(size) == 0:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CorruptFileError(
            f"storage data/{storage.key} is too short: it holds {flat.size} elements, the "
            f"tensor of size {size}, stride {stride}, offset {offset} reads element {last}")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride],
        writeable=False)
    return np.array(view, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _strided(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _strided(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    if not isinstance(data, np.ndarray):
        raise CorruptFileError(f"a Parameter must wrap a tensor, got {type(data).__name__}")
    return data


_TENSOR_TYPES = ("torch.Tensor", "torch.nn.parameter.Parameter")


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensors that carry Python attributes (t.foo = 1): rebuild the plain tensor and drop
    # the attributes; only the plain tensor types and our own rebuild functions pass.
    del state
    if not (isinstance(new_type, _up._Global) and new_type.name in _TENSOR_TYPES):
        raise UnsafePickleError(f"tensor subclass {new_type!r} refused")
    if not (isinstance(func, _up._Global) and func.name in _REBUILDS):
        raise UnsafePickleError(f"tensor rebuild function {func!r} refused")
    if not isinstance(args, tuple):
        raise CorruptFileError("_rebuild_from_type_v2 arguments must be a tuple")
    return func(*args)


def _size(*args):
    if len(args) != 1:
        raise CorruptFileError("torch.Size takes one tuple of ints")
    return _ints(tuple(args[0]) if isinstance(args[0], (list, tuple)) else args[0], "Size")


_REBUILDS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}

TORCH_ALLOWED = {
    **_up.allow({
        **_REBUILDS,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Size": _size,
        "torch.device": lambda *a: ":".join(str(v) for v in a),
    }),
    **{f"torch.{n}": _up.token(f"torch.{n}", np.dtype(t)) for n, t in _STORAGE_DTYPES.items()},
    "torch.storage.UntypedStorage": _up.token("torch.storage.UntypedStorage", np.dtype(np.uint8)),
    "torch.UntypedStorage": _up.token("torch.UntypedStorage", np.dtype(np.uint8)),
    **{f"torch.{n}": _up.token(f"torch.{n}", np.dtype(t)) for n, t in _TORCH_DTYPES.items()},
    **{n: _up.token(n) for n in _TENSOR_TYPES},
    **_up.BUILTINS,
    **_up.NUMPY,
}

# The pickle magic number that starts the legacy (pre-zip) torch.save format.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_KEY = re.compile(r"^[A-Za-z0-9_.]+$")


def _find_prefix(names, path) -> str:
    prefixes = sorted(n[:-len("/data.pkl")] for n in names
                      if n.endswith("/data.pkl") and n.count("/") == 1)
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        hint = (" (it looks like a TorchScript archive; save the state_dict instead)"
                if any(n.endswith("/constants.pkl") for n in names) else "")
        raise CorruptFileError(f"{path}: zip archive has no '<name>/data.pkl' record, so it "
                               f"is not a torch.save checkpoint{hint}")
    raise CorruptFileError(f"{path}: zip archive has several data.pkl records: {prefixes}")


def _read(zf: zipfile.ZipFile, name: str, path, expect_size=None) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CorruptFileError(f"{path}: missing record {name!r}") from None
    if expect_size is not None and info.file_size != expect_size:
        raise CorruptFileError(f"{path}: record {name!r} holds {info.file_size} bytes, "
                               f"expected {expect_size} (truncated or corrupt storage)")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: cannot read record {name!r}: {err}") from None


def load_pt(path: "str | os.PathLike") -> Any:
    """Load a ``torch.save`` file as nested dicts/lists/tuples of numpy arrays.

    No torch import, no code from the file: tensors become C-contiguous numpy arrays of
    the same dtype (``bfloat16``/``float8`` via ``ml_dtypes``), ``Parameter`` becomes its
    data, ``OrderedDict`` stays, ``torch.Size`` becomes a tuple, torch dtypes become numpy
    dtypes. Views keep their values (offsets and strides are applied); every tensor is
    its own copy, even when several shared one storage.

    Args:
      path: a zip-format ``.pt`` / ``.pth`` / ``.bin`` written by ``torch.save``
        (torch ≥ 1.6, the default format).
    Returns:
      the saved object (e.g. a ``state_dict``: ``OrderedDict[str, np.ndarray]``).
    Raises:
      UnsafePickleError: the pickle names a global outside the allow-list.
      CorruptFileError: missing, truncated or corrupt file, or the legacy format.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as err:
        raise FileNotFoundError(f"cannot read checkpoint {path}: {err}") from None
    if not zipfile.is_zipfile(path):
        if head.startswith(_LEGACY_MAGIC):
            raise CorruptFileError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                "re-save it with torch >= 1.6: torch.save(torch.load(p), p)")
        what = ("a truncated or corrupt zip archive" if head.startswith(b"PK")
                else "not a zip archive")
        raise CorruptFileError(f"{path}: {what}, so not a torch.save checkpoint")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: corrupt zip archive: {err}") from None
    with zf:
        prefix = _find_prefix(zf.namelist(), path)
        byteorder = "little"
        if f"{prefix}/byteorder" in zf.namelist():
            byteorder = _read(zf, f"{prefix}/byteorder", path).decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise CorruptFileError(f"{path}: bad byteorder record {byteorder!r}")
        storages: Dict[str, Tuple[Any, _Storage]] = {}

        def persistent(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise CorruptFileError(f"unsupported persistent id {pid!r}")
            _, kind, key, location, numel = pid
            if not (isinstance(kind, _up._Global) and isinstance(kind.value, np.dtype)
                    and "Storage" in kind.name):
                raise CorruptFileError(f"unknown storage type {kind!r}")
            if not (isinstance(key, str) and _KEY.match(key) and isinstance(location, str)
                    and isinstance(numel, int) and numel >= 0):
                raise CorruptFileError(f"malformed storage record {pid!r}")
            if key in storages:
                if storages[key][0] is not kind:
                    raise CorruptFileError(f"storage {key!r} used with two types")
                return storages[key][1]
            dtype = kind.value
            raw = _read(zf, f"{prefix}/data/{key}", path, expect_size=numel * dtype.itemsize)
            storage = _Storage(key, _from_bytes(raw, dtype, byteorder), byteorder)
            storages[key] = (kind, storage)
            return storage

        data = _read(zf, f"{prefix}/data.pkl", path)
        return _up.safe_loads(data, allowed=TORCH_ALLOWED, where=f"{path} ({prefix}/data.pkl)",
                              persistent=persistent)


def _from_bytes(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
    flat = np.frombuffer(raw, dtype)
    if byteorder == "big" and dtype.itemsize > 1:
        # Swap within each scalar: complex numbers are two floats of half the size.
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        flat = np.frombuffer(raw, f"u{unit}").byteswap().view(dtype)
    return flat
