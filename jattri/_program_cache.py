"""jattri's compiled programs found again from their jaxpr, without lowering them.

JAX's persistent compilation cache (:mod:`jattri._compile_cache`) keys a program by its
lowered module, so a second process still traces and lowers every program before it
finds the compiled one on disk: on dattri's LR (5,000 × 500), TRAK-Kronecker's first call
with a warm cache spent 0.31-0.38 s tracing, 0.29-0.38 s lowering and 0.06-0.07 s reading
the cache, of 0.80-0.98 s (``benchmarks/RESULTS.md``, "Programs found from their jaxpr
in a second process"; with this cache 0.58-0.78 s against 0.69-0.81 s).
Here a program of jattri's called outside any trace is traced, and its compiled form is
looked up under a digest of everything the compilation depends on:

- the jaxpr, printed in full (every equation's parameters, nested jaxprs included), the
  values of every constant it holds, and the input and output tree structures;
- the arguments' types and shardings, the devices, the JAX and jaxlib versions, the
  backend and its version, JAX's configuration, ``XLA_FLAGS`` and the compiler options
  jattri adds (:func:`jattri._jit.cpu_options`).

A hit deserializes the executable (:mod:`jax.experimental.serialize_executable`); a miss
lowers and compiles it, with JAX's own cache set aside for that compilation (an
executable JAX read back from its cache, serialized again, lacks its CPU kernels in a
later process: ``Function ..._kernel not found``; :func:`_compile_afresh`), and stores
it. Within a process each signature's
compiled program is kept until ``jax.clear_caches()``, so a later call runs it at once,
as ``jax.jit``'s own dispatch would.

A program declared ``closed`` (``jattri._jit.jit(..., closed=True)``: no user function
reaches it, only arrays and plain static values) is found without tracing it: its digest
is made of its module and name, the source of every module of the jattri package, the
versions of the libraries it may trace through (JAX, jaxlib, NumPy, optax, SciPy,
ml_dtypes; Python's), the static arguments' values (numbers, strings, booleans, ``None``
and tuples of them; anything else falls back to tracing), the arguments' tree, types and
memory kinds, and the same versions, devices, configuration and options as above; the
entry carries the output tree. (An output tree that cannot be pickled, such as a
``jax.tree_util.Partial`` of ``jax.linearize``'s linear function, is left out of the
entry; a traced program's key holds the tree's text, and a later process takes the tree
from its own trace.) Constants set on jattri's modules at run time are part of
the digest; jattri's functions replaced at run time are not (set
``JATTRI_PROGRAM_CACHE=0`` then). RPS's refit (then optax's L-BFGS) traced in 0.3 s of a warm
0.6 s first call on dattri's MLP; found without tracing, the whole first call took
0.27-0.28 s.

A program is not stored, only compiled as usual, when its printed jaxpr cannot stand for
it: a parameter printed as a Python object (``<... at 0x...>``) or with elided values
(``...``), effects (callbacks, prints), a primitive whose lowering rule is defined
outside JAX, a custom call other than jaxlib's LAPACK kernels and XLA's TopK
(:data:`_KNOWN_TARGETS`), constants the executable cannot carry, several processes, or
arguments not on the default device. The cache is used on the CPU backend only, where
it was measured, and only when JAX's persistent cache has a directory (jattri's default; entries go to
``<that directory>/jattri-programs``). The environment variable
``JATTRI_PROGRAM_CACHE=0`` turns it off (``jax.jit``'s own dispatch everywhere); any
failure to read an entry removes it and compiles the program instead.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

ENV = "JATTRI_PROGRAM_CACHE"
SUBDIR = "jattri-programs"
#: Bump when the key's contents or the entry's format change.
FORMAT = "jattri-program-2"
#: Object addresses in a tree structure's text (a ``jax.tree_util.Partial``'s function):
#: they differ between processes; the call's own trees flatten the arguments.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

#: Custom calls a stored program may make: jaxlib's LAPACK kernels, whose pointers
#: :func:`jattri._jit.ensure_lapack` hands over before a program read back runs (jaxlib
#: otherwise does it while lowering), and ``TopK`` (``jax.lax.top_k``: XLA's CPU
#: runtime sorts it itself; every ``top_k=`` scoring scan calls it, and left out of
#: this list those scans were compiled again in every process). A program calling
#: anything else (a host callback, a kernel initialised at its lowering) is compiled in
#: every process instead. Every program of ``python -m jattri.bench`` calls only
#: ``lapack_{spotrf,ssyevd,sgetrf,strsm}_ffi``.
_KNOWN_TARGETS = ("lapack_", "TopK")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')

#: Held while one compilation sets JAX's persistent cache aside (:func:`_compile_afresh`).
_AFRESH = threading.Lock()

#: Programs read from disk, compiled (and of those, stored) in this process.
stats = {"loaded": 0, "compiled": 0, "stored": 0}


def directory() -> Optional[Path]:
    """Where entries are stored now, or ``None`` when the cache is off. (Read at every
    call of a jattri program: the answer is memoised by its inputs.)"""
    return _directory(os.environ.get(ENV, ""), jax.config.jax_compilation_cache_dir,
                      jax.default_backend())


@functools.lru_cache(maxsize=16)
def _directory(setting: str, where: Optional[str], backend: str) -> Optional[Path]:
    if setting.strip().lower() in ("0", "off", "false", "no"):
        return None
    if not where or backend != "cpu":
        return None
    return Path(where) / SUBDIR


def _static_positions(fun: Callable, kwargs: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The positions and names ``jax.jit`` treats as static, as it infers them."""
    argnums = kwargs.get("static_argnums")
    argnames = kwargs.get("static_argnames")
    try:
        from jax._src.api_util import infer_argnums_and_argnames
        return infer_argnums_and_argnames(inspect.signature(fun), argnums, argnames)
    except Exception:  # noqa: BLE001 - no signature: as given
        as_tuple = lambda v, t: (() if v is None else (v,) if isinstance(v, t) else tuple(v))
        return as_tuple(argnums, int), as_tuple(argnames, str)


def _leaf_type(x: Any) -> Any:
    """An argument's part of a call's signature: a jax.Array's type and sharding, a
    numpy array's shape and dtype (``jax.typeof`` took 6 µs on one), else its type."""
    aval = getattr(x, "aval", None)
    if aval is not None:
        return aval, x.sharding
    if isinstance(x, np.ndarray):
        return np.ndarray, x.shape, x.dtype
    return jax.typeof(x), None


def _walk(jaxpr, digest, prims: set) -> None:
    """Adds every constant of every nested closed jaxpr to ``digest``, and collects
    the primitives."""
    from jax._src import core as jcore  # jax.extend.core would import Pallas

    for eqn in jaxpr.eqns:
        prims.add(eqn.primitive)
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jcore.ClosedJaxpr):
                    _digest_consts(sub.consts, digest)
                    _walk(sub.jaxpr, digest, prims)
                elif isinstance(sub, jcore.Jaxpr):
                    _walk(sub, digest, prims)


def _digest_consts(consts, digest) -> None:
    for c in consts:
        a = np.asarray(c)
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())


def _defined_in_jax(fn: Any) -> bool:
    """``fn``, unwrapped from partials, and the functions it closes over (as in
    ``mlir.lower_fun``) come from JAX's or jaxlib's modules."""
    while isinstance(fn, functools.partial):
        if not all(_defined_in_jax(a) for a in fn.args if callable(a)):
            return False
        fn = fn.func
    if not isinstance(fn, type) and callable(fn):
        module = getattr(fn, "__module__", None) or ""
        if not module.startswith(("jax.", "jaxlib.")):
            return False
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if inspect.isfunction(inner) and not (inner.__module__ or "").startswith(
                    ("jax.", "jaxlib.")):
                return False
    return True


def _lowered_by_jax(prims: set) -> bool:
    """Every primitive's lowering rule is JAX's own (a user's rule may change between
    processes without changing the jaxpr)."""
    from jax._src.interpreters import mlir

    for p in prims:
        for table in (mlir._platform_specific_lowerings.get("cpu", {}), mlir._lowerings):
            entry = table.get(p)
            if entry is not None:
                if not _defined_in_jax(entry.rule):
                    return False
                break
    return True


_PLAIN = (int, float, str, bool, type(None))


def _plain(value: Any) -> bool:
    """A static value whose ``repr`` is its whole meaning."""
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return type(value) in _PLAIN


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of every ``.py`` file of the jattri package (path and bytes) and of the
    versions of the libraries a jattri program traces through."""
    import importlib.metadata
    import sys

    digest = hashlib.sha256(sys.version.encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    for dist in ("jax", "jaxlib", "numpy", "optax", "scipy", "ml_dtypes"):
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist}=-".encode())
    return digest.hexdigest()


def _module_constants() -> str:
    """The plain values (numbers, strings, tuples of them) bound to public names at the
    top of every imported jattri module now: a constant set at run time (``rps.LBFGS_MEMORY = 20``)
    changes the digest of a ``closed`` program as an edit of the source would."""
    import sys

    parts = []
    for name in sorted(n for n in list(sys.modules) if n == "jattri" or n.startswith("jattri.")):
        module = sys.modules.get(name)
        values = getattr(module, "__dict__", {})
        parts.append(name + repr(sorted((k, v) for k, v in list(values.items())
                                        if not k.startswith("_") and _plain(v))))
    return "".join(parts)


def _environment(options: Optional[dict], jit_kwargs: dict) -> list:
    """What a compilation depends on besides the program and its arguments."""
    from jax._src.lib import version as jaxlib_version

    backend = jax.devices()[0].client
    return [FORMAT, jax.__version__, str(jaxlib_version), backend.platform,
            backend.platform_version, repr(jax.devices()), os.environ.get("XLA_FLAGS", ""),
            repr(sorted((options or {}).items())),
            repr(sorted((k, v) for k, v in jit_kwargs.items())),
            repr(sorted(jax.config.values.items()))]


def _hexdigest(parts: list, digest=None) -> str:
    """SHA-256 of the strings ``parts``, each ended by a NUL (continuing ``digest``)."""
    digest = digest or hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _on_default_device(leaves: list) -> bool:
    if jax.process_count() != 1:
        return False
    device = jax.devices()[0]
    return all(getattr(x, "sharding", None) is None or x.sharding.device_set == {device}
               for x in leaves)


def _leaf_types(leaves: list) -> str:
    return repr([(jax.typeof(x), getattr(getattr(x, "sharding", None), "memory_kind",
                                         "device")) for x in leaves])


def closed_key(fun: Callable, static: Any, tree, leaves: list, options: Optional[dict],
               jit_kwargs: dict) -> Optional[str]:
    """The digest a ``closed`` program is stored under for these arguments, without
    tracing it, or ``None`` (static values other than plain data, a tree that prints
    an object, arguments off the default device)."""
    text = str(tree)
    if not _plain(static) or _ADDRESS.search(text) or not _on_default_device(leaves):
        return None
    return _hexdigest(["closed", _code_digest(), _module_constants(), fun.__module__,
                       fun.__qualname__, repr(static), text, _leaf_types(leaves)]
                      + _environment(options, jit_kwargs))


def key(traced, leaves: list, options: Optional[dict], jit_kwargs: dict) -> Optional[str]:
    """The digest a traced program is stored under, or ``None`` when it cannot be
    stored (see the module docstring)."""
    if not _on_default_device(leaves):
        return None
    closed = traced.jaxpr
    if closed.effects or traced._num_consts:  # constants passed as arguments
        return None
    text = closed.pretty_print(source_info=False, name_stack=False,
                               custom_pp_eqn_rules=False, print_effects=True)
    if " at 0x" in text or "..." in text:  # (JAX prints addresses masked: 0xXXXX)
        return None
    digest = hashlib.sha256()
    prims: set = set()
    _digest_consts(closed.consts, digest)
    _walk(closed.jaxpr, digest, prims)
    if not _lowered_by_jax(prims):
        return None
    return _hexdigest(_environment(options, jit_kwargs) +
                      [_ADDRESS.sub("", str(traced.in_tree)),
                       _ADDRESS.sub("", str(traced.out_tree)), _leaf_types(leaves), text],
                      digest)


def _load(path: Optional[Path], in_tree, out_tree=None):
    """The executable stored at ``path``, loaded onto the devices it was compiled for,
    or ``None`` (no such entry; a broken entry is removed). An entry stored without its
    output tree (:func:`_store`) takes ``out_tree``, this process's trace of the
    program; without one (a ``closed`` lookup, before tracing) it is not used."""
    import pickle

    from jax.experimental import serialize_executable

    from jattri import _jit

    if path is None:
        return None
    try:
        entry = path.read_bytes()
    except OSError:
        return None
    _jit.ensure_lapack()  # (no lowering hands jaxlib its LAPACK pointers here)
    try:
        stored_tree, device_ids, payload = pickle.loads(entry)
        if stored_tree is None:
            if out_tree is None:
                return None
            stored_tree = out_tree
        by_id = {d.id: d for d in jax.devices()}
        # its own devices: by default the executable would be loaded onto every device
        # and expect as many shards of each argument
        compiled = serialize_executable.deserialize_and_load(
            payload, in_tree, stored_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception:  # noqa: BLE001 - a stale or broken entry: compile instead
        try:
            path.unlink()
        except OSError:
            pass
        return None
    stats["loaded"] += 1
    return compiled


def _store(path: Path, compiled, out_tree) -> bool:
    """Writes the executable, its devices and its output tree to ``path``
    (atomically); ``False`` when they cannot be serialized or written, which leaves
    nothing behind. An output tree that cannot be pickled (a
    ``jax.tree_util.Partial`` of ``jax.linearize``'s linear function keeps its jaxpr in
    the tree: Arnoldi's fit inside ``progress`` returns one) is left out: the key of a
    traced program holds the tree's text, and a later process has the tree from its own
    trace (:func:`_load`)."""
    import pickle

    from jax.experimental import serialize_executable

    try:
        targets = set(_CUSTOM_CALL.findall(compiled.as_text()))
        if any(not t.startswith(_KNOWN_TARGETS) for t in targets):
            return False
        device_ids = [d.id for d in compiled._executable.xla_executable.local_devices()]
        payload, _, _ = serialize_executable.serialize(compiled)
        tree = out_tree
        try:
            pickle.dumps(out_tree, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - a tree holding functions or jaxprs
            tree = None
        entry = pickle.dumps((tree, device_ids, payload), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - not serializable (host callbacks)
        return False
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(entry)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


class Programs:
    """The compiled programs of one jitted function, by signature (static arguments'
    values, the dynamic arguments' tree, types and shardings), each found on disk or
    compiled once."""

    def __init__(self, fun: Callable, jit_kwargs: dict, closed: bool = False):
        self._fun, self._closed = fun, closed
        self._argnums, self._argnames = _static_positions(fun, jit_kwargs)
        self._jit_kwargs = jit_kwargs
        self._compiled: dict = {}
        try:  # jax.clear_caches() drops these programs too, as it drops jit's
            from jax._src import util

            util.register_cache(self, "jattri._program_cache.Programs")
        except Exception:  # noqa: BLE001 - a JAX without it: kept until exit
            pass

    def __len__(self) -> int:
        return len(self._compiled)

    def cache_clear(self) -> None:
        """Forgets this function's compiled programs (``jax.clear_caches`` calls it)."""
        self._compiled.clear()

    def cache_info(self) -> dict:
        return {"signatures": len(self._compiled)}

    def cache_keys(self) -> list:
        return list(self._compiled)

    def __call__(self, jitted, options: Optional[dict], where: Path, args: tuple,
                 kwargs: dict):
        argnums, argnames = self._argnums, self._argnames
        if argnums or argnames:
            static = (tuple((i, args[i]) for i in argnums if i < len(args)),
                      tuple((k, kwargs[k]) for k in argnames if k in kwargs))
            dyn_args = tuple(a for i, a in enumerate(args) if i not in argnums)
            dyn_kwargs = {k: v for k, v in kwargs.items() if k not in argnames}
        else:
            static, dyn_args, dyn_kwargs = None, args, kwargs
        leaves, tree = jax.tree_util.tree_flatten((dyn_args, dyn_kwargs))
        try:
            signature = (static, tree, tuple(_leaf_type(x) for x in leaves))
            compiled = self._compiled.get(signature)
        except TypeError:  # an unhashable static argument: jax.jit says so
            return jitted(*args, **kwargs)
        if compiled is None:
            compiled = self._find(jitted, options, where, args, kwargs, static, tree,
                                  leaves)
            self._compiled[signature] = compiled
        return compiled(*dyn_args, **dyn_kwargs)

    def _find(self, jitted, options, where: Path, args, kwargs, static, tree, leaves):
        closed = None
        if self._closed:
            try:
                closed = closed_key(self._fun, static, tree, leaves, options,
                                    self._jit_kwargs)
            except Exception:  # noqa: BLE001 - what cannot be keyed is not stored
                closed = None
        compiled = _load(closed and where / closed, tree)  # found without tracing
        if compiled is not None:
            return compiled
        traced = jitted.trace(*args, **kwargs)
        digest = closed if traced.in_tree == tree else None  # (else jit flattened
        if digest is None:                                   # the arguments otherwise)
            try:
                digest = key(traced, leaves, options, self._jit_kwargs)
            except Exception:  # noqa: BLE001 - e.g. a constant numpy cannot read
                digest = None
            compiled = _load(digest and where / digest, traced.in_tree, traced.out_tree)
            if compiled is not None:
                return compiled
        stats["compiled"] += 1
        if digest is None:
            return traced.lower().compile()
        compiled, fresh = _compile_afresh(traced)
        if fresh and _store(where / digest, compiled, traced.out_tree):
            stats["stored"] += 1
        return compiled


def _compile_afresh(traced):
    """``(compiled, fresh)``: the program compiled without JAX's persistent cache, or,
    where that cannot be ensured, as usual with ``fresh`` False (then not stored).

    An executable JAX read back from its own cache serializes without its kernels on
    CPU: a later process fails with "Function ..._kernel not found" (first seen at the
    second warm run of a method; then across the test suite run with the caches on,
    where a program compiled earlier in the process had switched JAX's cache on for
    good). JAX decides once per process whether its cache is used
    (``compilation_cache.is_cache_used``), so ``jax_enable_compilation_cache=False``
    around one compilation is not enough: that decision is set aside for this one
    compilation and restored after. JAX's cache then holds no copy of it."""
    try:
        from jax._src import compilation_cache as cc

        saved = (cc._cache_checked, cc._cache_used)
    except (ImportError, AttributeError):  # another JAX: nothing is stored
        return traced.lower().compile(), False
    with _AFRESH:
        cc._cache_checked, cc._cache_used = True, False
        try:
            return traced.lower().compile(), True
        finally:
            cc._cache_checked, cc._cache_used = saved
