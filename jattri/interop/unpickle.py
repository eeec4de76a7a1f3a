"""An allow-list unpickler: reads pickles of plain data without running their code.

``pickle.load`` calls whatever callable a file names (``os.system``, ``builtins.eval``,
any class's ``__reduce__``), so loading an untrusted checkpoint with it runs the file's
code. ``safe_loads`` resolves every global a pickle names through an explicit
allow-list of small functions written here, and refuses any other global before it is
imported or called: nothing from the file executes beyond those functions.

Why the returned globals are wrapped: the pickle ``BUILD`` opcode sets attributes on an
object of the stream (``obj.__dict__.update(state)``). Handing out the real function or
class objects would let a file patch them (their ``__defaults__``, say) for the rest of
the process; ``_Global`` has no ``__dict__`` and refuses ``setattr``.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np


class UnsafePickleError(ValueError):
    """A pickle names a global outside the allow-list (it would run code on load)."""


class CorruptFileError(ValueError):
    """A file is truncated, malformed or not in the expected format."""


class ExpansionLimitError(ValueError):
    """Loading a file would decompress or materialise more bytes than its size allows
    (a resource bomb, or a legitimate expansion that needs a higher limit)."""


class _Global:
    """An allow-listed global: an immutable callable (or a non-callable token)."""

    __slots__ = ("name", "fn", "value")

    def __init__(self, name: str, fn: Optional[Callable] = None, value: Any = None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "value", value)

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"the pickle tries to set attribute {key!r} on the "
                                f"global {self.name}")

    def __call__(self, *args, **kwargs):
        if self.fn is None:
            raise CorruptFileError(f"the pickle calls {self.name}, which is not callable")
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.name}>"


Allowed = Dict[str, _Global]


def allow(entries: Mapping[str, Any]) -> Allowed:
    """An allow-list from ``{"module.name": fn or _Global}`` (plain callables are wrapped)."""
    return {k: v if isinstance(v, _Global) else _Global(k, v) for k, v in entries.items()}


def token(name: str, value: Any = None) -> _Global:
    """A non-callable global (a type marker such as ``numpy.ndarray``), optionally
    standing for ``value`` in the loaded result (e.g. ``torch.float32`` → a numpy dtype)."""
    return _Global(name, None, value)


# --- plain Python -----------------------------------------------------------------

def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise CorruptFileError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return obj.encode("latin-1", errors)


def _bytearray(data=b"", encoding=None):
    # Only the forms pickle writes (bytes, or str + "latin-1"); never bytearray(n), which
    # would let a tiny file allocate any amount of memory.
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, "latin-1")
    raise CorruptFileError("bytearray is allowed only from bytes or a latin-1 str")


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


BUILTINS = allow({
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": lambda *a: set(*a),
    "builtins.frozenset": lambda *a: frozenset(*a),
    "builtins.complex": lambda *a: complex(*a),
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _codecs_encode,
})


# --- numpy arrays (CIFAR python batches, numpy values inside checkpoints) ---------

_NDARRAY = token("numpy.ndarray")


def _safe_dtype(spec, align=False, copy=False):
    del copy
    if not isinstance(spec, str):
        raise CorruptFileError(f"numpy.dtype spec must be a string, got {type(spec).__name__}")
    # Always a fresh copy: the BUILD that follows calls __setstate__ on it, which must
    # never touch numpy's shared builtin dtype objects.
    dt = np.dtype(spec, align=bool(align), copy=True)
    if dt.hasobject:
        raise UnsafePickleError("object arrays are refused (their items would be unpickled "
                                "as Python objects)")
    return dt


def _reconstruct(cls, shape, typecode):
    # numpy's own _reconstruct(ndarray, (0,), b'b') followed by BUILD → ndarray.__setstate__;
    # only the plain ndarray type is accepted, no subclass.
    if cls is not _NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct of {cls!r} refused; only numpy.ndarray")
    del shape, typecode
    return np.ndarray((0,), np.uint8)


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar with an object dtype refused")
    if isinstance(data, str):  # py2 pickles read with encoding="latin1"
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise CorruptFileError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes")
    return np.frombuffer(bytes(data), dtype)[0]


NUMPY = allow({
    **{f"{m}._reconstruct": _reconstruct
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{f"{m}.scalar": _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    "numpy.ndarray": _NDARRAY,
    "numpy.dtype": _safe_dtype,
})


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed: Allowed, persistent: Optional[Callable], encoding: str):
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module, name):
        # Python-2 pickles (protocol <= 2) spell the builtins module "__builtin__".
        module = "builtins" if module == "__builtin__" else module
        key = f"{module}.{name}"
        if key not in self._allowed:
            raise UnsafePickleError(
                f"refusing to load the global {key!r}: it is not on the allow-list of "
                "plain-data globals, and loading it could run code from the file")
        return self._allowed[key]

    def persistent_load(self, pid):
        if self._persistent is None:
            raise CorruptFileError(f"unexpected persistent id {pid!r} in a plain pickle")
        return self._persistent(pid)


def _check_result(obj, leaf: Optional[Callable[[Any, tuple], Any]] = None) -> Any:
    """Replace value tokens (torch dtypes) by their values, and every other leaf ``x``
    at key path ``path`` (a tuple) by ``leaf(x, path)``; refuse object arrays."""
    seen = set()

    def walk(x, path):
        if isinstance(x, _Global):
            return x if x.value is None else x.value
        if isinstance(x, np.ndarray) and x.dtype.hasobject:
            raise UnsafePickleError("object arrays are refused")
        if id(x) in seen:
            return x
        if isinstance(x, dict):
            seen.add(id(x))
            items = [(walk(k, path + ("<key>",)), walk(v, path + (k,))) for k, v in x.items()]
            try:
                x.clear()
                x.update(items)
            except TypeError:  # a key that became unhashable: a tensor used as a key
                raise CorruptFileError(f"unsupported dict key at {path_name(path)} (a tensor "
                                       "used as a dict key)") from None
        elif isinstance(x, list):
            seen.add(id(x))
            x[:] = [walk(v, path + (i,)) for i, v in enumerate(x)]
        elif type(x) is tuple:
            return tuple(walk(v, path + (i,)) for i, v in enumerate(x))
        elif type(x) in (set, frozenset):
            members = [walk(v, path + ("<member>",)) for v in x]
            try:
                return type(x)(members)
            except TypeError:
                raise CorruptFileError(f"unsupported set member at {path_name(path)} (a tensor "
                                       "in a set)") from None
        elif leaf is not None:
            return leaf(x, path)
        return x

    return walk(obj, ())


def path_name(path: tuple) -> str:
    """A key path ``("model", "fc.weight")`` as ``model/fc.weight``."""
    return "/".join(str(k) for k in path) if path else "<top level>"


def safe_loads(data: bytes, *, allowed: Allowed, where: str,
               persistent: Optional[Callable] = None, encoding: str = "ASCII",
               leaf: Optional[Callable[[Any, tuple], Any]] = None) -> Any:
    """Unpickle ``data`` resolving globals only through ``allowed``.

    Args:
      data: the pickle bytes. allowed: ``{"module.name": _Global}`` (``allow``/``token``).
      where: the file (and record) named in error messages.
      persistent: handler of persistent ids (``None``: a persistent id is an error).
      encoding: how Python-2 ``str`` objects decode (``"latin1"`` for numpy py2 pickles).
      leaf: replaces each non-container value ``x`` of the loaded object by
        ``leaf(x, path)``, ``path`` the tuple of keys/indices leading to it (how the
        torch reader turns tensor records into arrays, knowing their names).
    Raises:
      UnsafePickleError: a global outside the allow-list (nothing was called).
      CorruptFileError: any other failure (truncated or malformed pickle).
      ExpansionLimitError: raised by ``persistent`` or ``leaf``, passed on.
    """
    try:
        obj = _Unpickler(io.BytesIO(data), allowed, persistent, encoding).load()
        return _check_result(obj, leaf)
    except (UnsafePickleError, CorruptFileError, ExpansionLimitError) as err:
        raise type(err)(f"{where}: {err}") from None
    except RecursionError:
        raise CorruptFileError(f"{where}: pickle nests too deeply") from None
    except Exception as err:  # noqa: BLE001 - every other failure means a bad pickle
        raise CorruptFileError(f"{where}: malformed or truncated pickle "
                               f"({type(err).__name__}: {err})") from None
