"""Read PyTorch ``.pt`` checkpoints into numpy without importing torch or running code.

The format (``torch.save`` since torch 1.6) is a zip archive with one top folder
``<name>/`` holding ``data.pkl`` (the object, pickled; each tensor refers to a storage
by a persistent id ``("storage", StorageType, key, location, numel)``), the raw storages
``data/<key>``, ``byteorder`` (``little``/``big``) and ``version``. A tensor is rebuilt
by ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
hooks[, metadata])`` (``_v3`` adds the dtype of an untyped byte storage, for float8,
uint16-64 and the other newer dtypes): element ``index`` of the tensor is
``storage[offset + Σ_k index_k · stride_k]``, then conjugated if ``metadata`` holds
``{"conj": True}`` and negated if it holds ``{"neg": True}`` (torch's lazy conj/neg bits).

``load_pt`` unpickles ``data.pkl`` through the allow-list unpickler of
``jattri.interop.unpickle``: tensor and storage rebuilds, ``torch.Size``, torch dtypes,
``collections.OrderedDict`` and a few plain builtins. Any other global is refused
(``UnsafePickleError``) before anything is called. Tensors come out of the pickle as
records; storages are read, and arrays made, only afterwards, each tensor named by its
key path, against a byte budget proportional to the file's size (``max_expansion``), so
a small hostile file cannot decompress or expand into gigabytes.
"""
from __future__ import annotations

import math
import os
import re
import stat
import zipfile
import zlib
from typing import Any, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from jattri.interop import unpickle as _up
from jattri.interop.unpickle import CorruptFileError, ExpansionLimitError, UnsafePickleError

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
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
    # torch's opaque bit containers: torch does no arithmetic on them either
    "bits8": np.uint8, "bits16": np.uint16, "bits1x8": np.uint8, "bits2x4": np.uint8,
    "bits4x2": np.uint8,
}
# Torch dtypes and storages that numpy cannot hold: named in a clear refusal.
_QUANTIZED = "quantized tensors are not supported; save their .dequantize()"
_UNSUPPORTED = {
    "complex32": "numpy has no complex32 (complex half); save the tensor as complex64",
    "chalf": "numpy has no complex32 (complex half); save the tensor as complex64",
    "float4_e2m1fn_x2": "numpy has no packed pair-of-float4 type; save the tensor as "
                        "float16 or bfloat16",
    **{n: _QUANTIZED for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4",
                               "QInt8Storage", "QUInt8Storage", "QInt32Storage",
                               "QUInt4x2Storage", "QUInt2x4Storage")},
    **{f"{u}int{b}": "numpy has no sub-byte integer type; save the tensor as (u)int8"
       for u in ("", "u") for b in range(1, 8)},
}
# Negation is not representable in these dtypes (torch never sets the bit on them).
_NO_NEGATION = (np.dtype(ml_dtypes.float8_e8m0fnu),)

# However small the file, loading may use this many bytes (a tiny file can hold an
# honest expanded tensor); beyond it, at most max_expansion × the file's size.
_LIMIT_FLOOR = 16 << 20
_CHUNK = 16 << 20
_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def _fmt(n: float) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
    return f"{int(n):,} bytes"


class _Record:
    """An immutable record made while unpickling (the pickle's BUILD cannot patch it)."""

    __slots__ = ()

    def __init__(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, k, v):
        raise UnsafePickleError(f"the pickle tries to set attribute {k!r} on a "
                                f"{type(self).__name__.strip('_')}")


class _Storage(_Record):
    """A storage of the archive (record ``data/<key>``), not read yet."""

    __slots__ = ("key", "kind", "dtype", "numel")


class _Tensor(_Record):
    """A tensor of the pickle: where its elements are; made into an array by ``_Reader``."""

    __slots__ = ("storage", "dtype", "offset", "size", "stride", "conj", "neg")

    @property
    def span(self) -> int:
        """How many storage elements (from ``offset``) the tensor reads."""
        return 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))

    def describe(self) -> str:
        return f"size {self.size}, stride {self.stride}, {self.dtype}"


def _ints(x, what: str) -> Tuple[int, ...]:
    if not isinstance(x, tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in x):
        raise CorruptFileError(f"tensor {what} must be a tuple of ints, got {x!r}")
    return x


def _dtype(token) -> np.dtype:
    if isinstance(token, _up._Global) and isinstance(token.value, np.dtype):
        return token.value
    if isinstance(token, _up._Global) and token.name.split(".")[-1] in _UNSUPPORTED:
        raise CorruptFileError(f"{token.name} tensors are not supported: "
                               f"{_UNSUPPORTED[token.name.split('.')[-1]]}")
    raise CorruptFileError(f"tensor dtype must be a torch dtype, got {token!r}")


def _bits(metadata, dtype: np.dtype) -> Tuple[bool, bool]:
    """torch's pending conjugation and negation bits (``get_tensor_metadata``)."""
    if metadata is None:
        return False, False
    if not isinstance(metadata, dict):
        raise CorruptFileError(f"tensor metadata must be a dict, got {metadata!r}")
    unknown = sorted(str(k) for k in metadata if k not in ("conj", "neg"))
    if unknown:
        raise CorruptFileError(f"tensor metadata {unknown} is not supported (only torch's "
                               "'conj' and 'neg' bits are); the tensor would load wrong")
    conj, neg = metadata.get("conj", False), metadata.get("neg", False)
    if not (isinstance(conj, bool) and isinstance(neg, bool)):
        raise CorruptFileError(f"tensor conj/neg bits must be bools, got {metadata!r}")
    if neg and (dtype.kind in "bu" or dtype in _NO_NEGATION):
        raise CorruptFileError(f"a {dtype} tensor has the negation bit set, which {dtype} "
                               "cannot represent")
    return conj, neg


def _tensor(storage, offset, size, stride, dtype=None, metadata=None) -> _Tensor:
    """Check a tensor's geometry against its storage; read nothing yet."""
    if not isinstance(storage, _Storage):
        raise CorruptFileError(f"a tensor's storage must be a persistent storage record, "
                               f"got {type(storage).__name__}")
    nbytes = storage.numel * storage.dtype.itemsize
    dtype = storage.dtype if dtype is None else _dtype(dtype)
    if nbytes % dtype.itemsize:
        raise CorruptFileError(f"storage data/{storage.key} holds {nbytes} bytes, not a "
                               f"multiple of {dtype} ({dtype.itemsize} bytes)")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise CorruptFileError(f"tensor storage offset must be an int, got {offset!r}")
    if len(size) != len(stride):
        raise CorruptFileError(f"tensor size {size} and stride {stride} differ in length")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise CorruptFileError(f"negative tensor offset/size/stride: {offset}, {size}, {stride}")
    conj, neg = _bits(metadata, dtype)
    # The stride of a length-0/1 dimension is never used; huge ones must not reach numpy.
    stride = tuple(s if n > 1 else 0 for n, s in zip(size, stride))
    t = _Tensor(storage=storage, dtype=dtype, offset=offset, size=size, stride=stride,
                conj=conj, neg=neg)
    numel = nbytes // dtype.itemsize
    if math.prod(size) and offset + t.span > numel:
        raise CorruptFileError(
            f"storage data/{storage.key} is too short: it holds {numel} elements, the "
            f"tensor of size {size}, stride {stride}, offset {offset} reads element "
            f"{offset + t.span - 1}")
    return t


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks
    return _tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    del requires_grad, backward_hooks
    return _tensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    if not isinstance(data, _Tensor):
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


def _unsupported(what: str):
    def refuse(*args, **kwargs):
        del args, kwargs
        raise CorruptFileError(f"{what} are not supported")
    return refuse


def _layout(name):
    if not isinstance(name, str):
        raise CorruptFileError(f"a torch layout is named by a string, got {name!r}")
    return name


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
        "torch._utils._rebuild_qtensor": _unsupported("quantized tensors (save their "
                                                      ".dequantize())"),
        "torch._utils._rebuild_sparse_tensor": _unsupported("sparse tensors (save their "
                                                            ".to_dense())"),
        "torch._utils._rebuild_nested_tensor": _unsupported("nested tensors"),
        "torch.serialization._get_layout": _layout,
        "torch._utils._rebuild_meta_tensor_no_storage": _unsupported(
            "meta tensors (they hold no values)"),
    }),
    **{f"torch.{n}": _up.token(f"torch.{n}", np.dtype(t)) for n, t in _STORAGE_DTYPES.items()},
    "torch.storage.UntypedStorage": _up.token("torch.storage.UntypedStorage", np.dtype(np.uint8)),
    "torch.UntypedStorage": _up.token("torch.UntypedStorage", np.dtype(np.uint8)),
    **{f"torch.{n}": _up.token(f"torch.{n}", np.dtype(t)) for n, t in _TORCH_DTYPES.items()},
    # as values (a config's dtype) they load as their names, as tensor dtypes they refuse
    **{f"torch.{n}": _up.token(f"torch.{n}", f"torch.{n}") for n in _UNSUPPORTED},
    **{n: _up.token(n) for n in _TENSOR_TYPES},
    # layouts (as older torch names them) only reach the sparse rebuild, which refuses
    **{f"torch.{n}": _up.token(f"torch.{n}", f"torch.{n}") for n in (
        "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc")},
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


class _Reader:
    """Reads one archive's records and makes its tensors, within a byte budget."""

    def __init__(self, zf: zipfile.ZipFile, path: str, prefix: str, file_size: int,
                 max_expansion: Optional[float], views: bool):
        self.zf, self.path, self.prefix, self.views = zf, path, prefix, views
        self.file_size, self.max_expansion = file_size, max_expansion
        self.limit = (math.inf if max_expansion is None
                      else max(max_expansion * file_size, _LIMIT_FLOOR))
        self.used = 0
        self.byteorder = "little"
        self.storages: Dict[str, _Storage] = {}
        self.raw: Dict[Any, np.ndarray] = {}
        self.arrays: Dict[int, Tuple[_Tensor, np.ndarray]] = {}

    def take(self, nbytes: int, what: str, hint: str = "") -> None:
        """Count ``nbytes`` against the budget, or refuse ``what`` before allocating it."""
        if self.used + nbytes > self.limit:
            raise ExpansionLimitError(
                f"{what} needs {_fmt(nbytes)}, which would bring this file's loaded bytes "
                f"to {_fmt(self.used + nbytes)}, over the limit of {_fmt(self.limit)} "
                f"(max_expansion={self.max_expansion:g} × the file's {_fmt(self.file_size)}"
                f", at least {_fmt(_LIMIT_FLOOR)}).{hint} If the file is trusted, pass a "
                "larger load_pt(..., max_expansion=...) (None: no limit).")
        self.used += nbytes

    def info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.zf.getinfo(f"{self.prefix}/{name}")
        except KeyError:
            raise CorruptFileError(f"missing record {self.prefix + '/' + name!r}") from None

    def read(self, name: str, what: str) -> bytearray:
        """Record ``name`` in full, refused before decompression if over the budget; the
        read stops at the size the zip directory declares, whatever the stream holds."""
        info = self.info(name)
        size = info.file_size
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # zipfile decompresses bzip2/lzma without an output bound: a few bytes of the
            # stream could expand to gigabytes before the declared size cuts them
            method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise CorruptFileError(f"record {info.filename!r} is {method}-compressed; only "
                                   "stored (as torch.save writes) or deflated records are read")
        how = ("stored" if info.compress_type == zipfile.ZIP_STORED
               else f"compressed to {_fmt(info.compress_size)} in the file")
        self.take(size, f"{what}: record {info.filename} ({_fmt(size)}, {how})")
        buf = bytearray(size)
        got = 0
        try:
            with self.zf.open(info) as f:
                while got < size:
                    chunk = f.read(min(_CHUNK, size - got))
                    if not chunk:
                        break
                    buf[got:got + len(chunk)] = chunk
                    got += len(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
                RuntimeError, NotImplementedError) as err:
            raise CorruptFileError(f"cannot read record {info.filename!r}: {err}") from None
        if got != size:
            raise CorruptFileError(f"record {info.filename!r} ends after {got} of its "
                                   f"{size} bytes (truncated)")
        return buf

    def persistent(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptFileError(f"unsupported persistent id {pid!r}")
        _, kind, key, location, numel = pid
        if isinstance(kind, _up._Global) and isinstance(kind.value, str):
            why = _UNSUPPORTED.get(kind.name.split(".")[-1], "not a storage type")
            raise CorruptFileError(f"storage type {kind.name}: {why}")
        if not (isinstance(kind, _up._Global) and isinstance(kind.value, np.dtype)
                and "Storage" in kind.name):
            raise CorruptFileError(f"unknown storage type {kind!r}")
        if not (isinstance(key, str) and _KEY.match(key) and isinstance(location, str)
                and isinstance(numel, int) and not isinstance(numel, bool) and numel >= 0):
            raise CorruptFileError(f"malformed storage record {pid!r}")
        if key in self.storages:
            if self.storages[key].kind is not kind:
                raise CorruptFileError(f"storage {key!r} used with two types")
            return self.storages[key]
        info, expect = self.info(f"data/{key}"), numel * kind.value.itemsize
        if info.file_size != expect:
            raise CorruptFileError(f"record {info.filename!r} holds {info.file_size} bytes, "
                                   f"expected {expect} (truncated or corrupt storage)")
        self.storages[key] = _Storage(key=key, kind=kind, dtype=kind.value, numel=numel)
        return self.storages[key]

    def storage_bytes(self, t: _Tensor, what: str) -> np.ndarray:
        """The storage of ``t`` as read-only bytes in native order for ``t.dtype``."""
        key = t.storage.key
        if key not in self.raw:
            raw = np.frombuffer(self.read(f"data/{key}", what), np.uint8)
            raw.flags.writeable = False
            self.raw[key] = raw
        raw = self.raw[key]
        # Swap within each scalar: complex numbers are two floats of half the size.
        unit = t.dtype.itemsize // 2 if t.dtype.kind == "c" else t.dtype.itemsize
        if self.byteorder == "little" or unit == 1:
            return raw
        if (key, unit) not in self.raw:
            self.take(raw.nbytes, f"{what}: byte-swapping storage data/{key}")
            swapped = raw.view(f"u{unit}").byteswap().view(np.uint8)
            swapped.flags.writeable = False
            self.raw[key, unit] = swapped
        return self.raw[key, unit]

    def leaf(self, x, path: tuple):
        if not isinstance(x, _Tensor):
            return x
        if id(x) not in self.arrays:  # a tensor the pickle shares stays one array
            self.arrays[id(x)] = (x, self.array(x, f"tensor {_up.path_name(path)!r}"))
        return self.arrays[id(x)][1]

    def array(self, t: _Tensor, what: str) -> np.ndarray:
        n = math.prod(t.size)
        if n == 0:
            return _numpy(what, t, lambda: np.zeros(t.size, t.dtype), writeable=not self.views)
        raw = self.storage_bytes(t, what)
        if self.views and (t.conj or t.neg):
            # the bits apply to a copy of the storage, so the view still costs no more
            self.take(raw.nbytes, f"{what} (conj/neg of storage data/{t.storage.key})")
            raw = _apply_bits(raw.view(t.dtype).copy(), t).view(np.uint8)
        if not self.views:
            hint = ""
            if n > t.span:
                hint = (f" It is an expanded view (stride 0 or overlapping) that reads only "
                        f"{t.span} element(s) of storage data/{t.storage.key}; "
                        "load_pt(..., views=True) keeps tensors as read-only views of their "
                        "storages, at no cost.")
            self.take(n * t.dtype.itemsize, f"{what} ({t.describe()})", hint)
        view = _numpy(what, t, lambda: np.ndarray(
            t.size, t.dtype, buffer=raw, offset=t.offset * t.dtype.itemsize,
            strides=[s * t.dtype.itemsize for s in t.stride]), writeable=False)
        return view if self.views else _apply_bits(np.array(view, order="C"), t)


def _numpy(what: str, t: _Tensor, make, writeable: bool) -> np.ndarray:
    try:
        a = make()
    except ValueError as err:  # sizes numpy cannot index
        raise CorruptFileError(f"{what} ({t.describe()}) cannot be made: {err}") from None
    a.flags.writeable = writeable
    return a


def _apply_bits(a: np.ndarray, t: _Tensor) -> np.ndarray:
    """Apply torch's pending conj/neg bits to ``a`` in place."""
    if t.conj and a.dtype.kind == "c":
        np.conjugate(a, out=a)
    if t.neg:
        np.negative(a, out=a)
    return a


_FILE_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket")]


def _require_regular(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a plain file")
        link = " (through a symbolic link)" if os.path.islink(path) else ""
        raise CorruptFileError(f"{path}: is {kind}{link}, not a regular file; checkpoints "
                               "are read only from regular files")


def _open_regular(path: str):
    """Open ``path`` for reading only if it is a regular file (never a device or FIFO,
    which could block or never end), checked before and after opening."""
    try:
        _require_regular(os.stat(path), path)
        # O_NONBLOCK: were the path swapped for a FIFO after the check, open cannot hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise FileNotFoundError(f"cannot read checkpoint {path}: {err}") from None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(f.fileno())
        _require_regular(st, path)
    except BaseException:
        f.close()
        raise
    return f, st.st_size


def load_pt(path: "str | os.PathLike", *, max_expansion: Optional[float] = 8.0,
            views: bool = False) -> Any:
    """Load a ``torch.save`` file as nested dicts/lists/tuples of numpy arrays.

    No torch import, no code from the file: tensors become numpy arrays of the same dtype
    (``bfloat16``/``float8`` via ``ml_dtypes``; torch's ``bits*`` as unsigned ints) and
    value (pending conj/neg bits applied), ``Parameter`` becomes its data,
    ``OrderedDict`` stays, ``torch.Size`` becomes a tuple, torch dtypes become numpy
    dtypes. By default every tensor is its own C-contiguous copy, even when several
    shared one storage; a tensor the pickle shares (tied weights) stays one array.

    Loading is bounded: the bytes decompressed plus the bytes of the arrays made stay
    within ``max(max_expansion × file size, 16 MiB)``; a record or tensor beyond it is
    refused (``ExpansionLimitError``, naming it and the sizes) before it is allocated.

    Args:
      path: a regular zip-format ``.pt`` / ``.pth`` / ``.bin`` file written by
        ``torch.save`` (torch ≥ 1.6, the default format).
      max_expansion: the budget as a multiple of the file size (``None``: unbounded).
        An honest file needs about 2× (its storages, then the copies).
      views: return each tensor as a read-only numpy view of its storage, as torch keeps
        it: expanded (stride-0) tensors then cost nothing, but converting one (e.g.
        ``jnp.asarray``) materialises it.
    Returns:
      the saved object (e.g. a ``state_dict``: ``OrderedDict[str, np.ndarray]``).
    Raises:
      UnsafePickleError: the pickle names a global outside the allow-list.
      CorruptFileError: not a regular file; missing, truncated or corrupt file; the
        legacy format; a tensor of a dtype numpy cannot hold.
      ExpansionLimitError: the file would decompress or expand beyond the budget.
    """
    if max_expansion is not None and (
            isinstance(max_expansion, bool) or not isinstance(max_expansion, (int, float))
            or not max_expansion > 0):
        raise ValueError(f"max_expansion must be a positive number or None, "
                         f"got {max_expansion!r}")
    if not isinstance(views, bool):
        raise ValueError(f"views must be True or False, got {views!r}")
    path = os.fspath(path)
    f, file_size = _open_regular(path)
    with f:
        try:
            head = f.read(len(_LEGACY_MAGIC))
            is_zip = zipfile.is_zipfile(f)
        except OSError as err:
            raise FileNotFoundError(f"cannot read checkpoint {path}: {err}") from None
        if not is_zip:
            if head.startswith(_LEGACY_MAGIC):
                raise CorruptFileError(
                    f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                    "re-save it with torch >= 1.6: torch.save(torch.load(p), p)")
            what = ("a truncated or corrupt zip archive" if head.startswith(b"PK")
                    else "not a zip archive")
            raise CorruptFileError(f"{path}: {what}, so not a torch.save checkpoint")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise CorruptFileError(f"{path}: corrupt zip archive: {err}") from None
        with zf:
            return _load(zf, path, file_size, max_expansion, views)


def _load(zf, path, file_size, max_expansion, views) -> Any:
    prefix = _find_prefix(zf.namelist(), path)
    reader = _Reader(zf, path, prefix, file_size, max_expansion, views)
    where = f"{path} ({prefix}/data.pkl)"
    try:
        if f"{prefix}/byteorder" in zf.namelist():
            if reader.info("byteorder").file_size > 16:
                raise CorruptFileError(f"bad byteorder record of "
                                       f"{reader.info('byteorder').file_size} bytes")
            reader.byteorder = bytes(reader.read("byteorder", "byteorder")).decode(
                "ascii", "replace")
            if reader.byteorder not in ("little", "big"):
                raise CorruptFileError(f"bad byteorder record {reader.byteorder!r}")
        data = bytes(reader.read("data.pkl", "the pickle"))
    except (CorruptFileError, ExpansionLimitError) as err:
        raise type(err)(f"{path}: {err}") from None
    return _up.safe_loads(data, allowed=TORCH_ALLOWED, where=where,
                          persistent=reader.persistent, leaf=reader.leaf)
