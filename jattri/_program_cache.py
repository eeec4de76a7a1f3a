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

A program that is not ``closed`` but calls the user's functions only as
:class:`UserFn` (:func:`jattri.func.grads.as_partial` wraps every function that is not
jattri's own) is also indexed by them. Its index key (:func:`open_key`) is made like a
``closed`` digest, with the program's own function, its static arguments and its
arguments' tree rendered in full (:func:`_render`: plain values, containers, NamedTuples,
dataclasses, partials, dtypes, tree structures, jattri's and the libraries' functions
with what they close over; each user function a numbered slot; anything else, an array
or a bare user function among them, and the program is traced as before). The entry
names the stored program and, for every call of every slot's function recorded in this
process (the arguments' tree, shapes and dtypes, plain scalars by value), the digest of
that function's jaxpr traced alone at those arguments (:func:`_fingerprint`). A later
process renders the same key, traces each function alone at the recorded arguments, and
loads the program when every digest matches, without tracing the program: the
program's jaxpr is jattri's code (in the digest) around equations the user's functions
contribute, and a function's equations at given arguments are what its trace alone
gives (JAX's configuration, context managers included, is in the key; a function that
reads how it is being traced, a tracer's type, is assumed not to). The records are a superset of the calls inside any program (JAX's trace caches
hold only traces made in this process, each recorded); an entry is not written when the
trace called a ``UserFn`` outside the slots, when a function was called inside a trace
with concrete arrays (constants), or when a function's jaxpr cannot stand for it (as
below, or a custom derivative rule or primitive rule defined outside JAX, jaxlib and
jattri: a ``custom_jvp`` rule prints as "Wrapped function"). ``jax.clear_caches()``
forgets the records. ``JATTRI_PROGRAM_INDEX=0`` turns the index off. As for ``closed``
programs, jattri's own functions replaced at run time are not seen (tests that patch
them run with the caches off).

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

import contextlib
import functools
import hashlib
import inspect
import os
import re
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

ENV = "JATTRI_PROGRAM_CACHE"
SUBDIR = "jattri-programs"
#: ``0`` turns off finding programs by their user functions (:func:`open_key`): every
#: program that is not ``closed`` is then traced in every process, as before.
OPEN_ENV = "JATTRI_PROGRAM_INDEX"
_OPEN = os.environ.get(OPEN_ENV, "").strip().lower() not in ("0", "off", "false", "no")
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

#: Programs read from disk, compiled (and of those, stored) in this process; of those
#: read, found by their user functions (``opened``); index entries written (``indexed``).
stats = {"loaded": 0, "compiled": 0, "stored": 0, "opened": 0, "indexed": 0}


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


def _walk(jaxpr, digest, prims: set, others: Optional[list] = None) -> None:
    """Adds every constant of every nested closed jaxpr to ``digest``, and collects
    the primitives (and in ``others`` the equations' parameters that are not jaxprs)."""
    from jax._src import core as jcore  # jax.extend.core would import Pallas

    for eqn in jaxpr.eqns:
        prims.add(eqn.primitive)
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jcore.ClosedJaxpr):
                    _digest_consts(sub.consts, digest)
                    _walk(sub.jaxpr, digest, prims, others)
                elif isinstance(sub, jcore.Jaxpr):
                    _walk(sub, digest, prims, others)
                elif others is not None:
                    others.append(sub)


def _printed(closed) -> Optional[str]:
    """A closed jaxpr's full text, every equation's parameters and nested jaxprs
    included, or ``None`` where the text cannot stand for it: effects, a parameter
    printed as a Python object (``<... at 0x...>``: JAX prints addresses masked,
    0xXXXX) or with elided values (``...``)."""
    if closed.effects:
        return None
    text = closed.pretty_print(source_info=False, name_stack=False,
                               custom_pp_eqn_rules=False, print_effects=True)
    return None if " at 0x" in text or "..." in text else text


_NO_VALUE = object()


def _cells(fn, empty: Any = _NO_VALUE) -> list:
    """What a function closes over, an empty cell as ``empty`` (left out by default)."""
    found = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            if empty is not _NO_VALUE:
                found.append(empty)
    return found


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
        for inner in _cells(fn):
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
        # an imported module's own version (importlib.metadata parses the installed
        # METADATA file: about 2 ms each in a warm process's first call)
        version = getattr(sys.modules.get(dist), "__version__", None)
        if not isinstance(version, str):
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "-"
        digest.update(f"{dist}={version}".encode())
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
    text = _printed(closed)
    if text is None or traced._num_consts:  # (constants passed as arguments)
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
    return _write(path, entry)


def _write(path: Path, entry: bytes) -> bool:
    """Writes ``entry`` to ``path`` atomically; ``False`` when it cannot."""
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
        opened = None
        if not self._closed and _OPEN:
            try:
                opened = open_key(self._fun, static, tree, leaves, options, self._jit_kwargs)
            except Exception:  # noqa: BLE001 - what cannot be keyed is traced
                opened = None
            if opened is not None:
                compiled = _load_open(where, *opened, tree)  # found by its user functions
                if compiled is not None:
                    stats["opened"] += 1
                    return compiled
        with _watching() as called:
            traced = jitted.trace(*args, **kwargs)
        digest = closed if traced.in_tree == tree else None  # (else jit flattened
        if digest is None:                                   # the arguments otherwise)
            try:
                digest = key(traced, leaves, options, self._jit_kwargs)
            except Exception:  # noqa: BLE001 - e.g. a constant numpy cannot read
                digest = None
            compiled = _load(digest and where / digest, traced.in_tree, traced.out_tree)
            if compiled is not None:
                self._index(where, opened, called, digest, traced, tree)
                return compiled
        stats["compiled"] += 1
        if digest is None:
            return traced.lower().compile()
        compiled, fresh = _compile_afresh(traced)
        if fresh and _store(where / digest, compiled, traced.out_tree):
            stats["stored"] += 1
            self._index(where, opened, called, digest, traced, tree)
        return compiled

    @staticmethod
    def _index(where: Path, opened, called: set, digest: str, traced, tree) -> None:
        """Indexes the stored program ``digest`` by its user functions (``opened``, from
        :func:`open_key`) where every user function the trace called is among them and
        the program takes its arguments' tree as they came."""
        if opened is None or traced.in_tree != tree:
            return
        okey, slots = opened
        if called <= {id(fn) for fn in slots} and _store_open(where, okey, slots, digest):
            stats["indexed"] += 1


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


# ------------------------------------------------ programs found by their user functions

#: Modules whose functions are rendered by name (their code is in the digest: jattri's
#: source, the libraries' versions); a function from anywhere else reaches a program
#: only wrapped in :class:`UserFn`, or the program is traced in every process.
_LIBRARIES = ("jax", "jaxlib", "numpy", "optax", "scipy", "ml_dtypes")


def _ours(module: Optional[str]) -> bool:
    return bool(module) and (module == "jattri" or module.startswith("jattri."))


def _library(module: Optional[str]) -> bool:
    return bool(module) and module.split(".", 1)[0] in _LIBRARIES


class UserFn:
    """A function of the user's (anything not jattri's own code), as jattri's programs
    call it: the function itself, and the abstract arguments it has been traced with in
    this process.

    Every call made inside a trace records its arguments' tree, shapes and dtypes (and
    the values of plain Python scalars among them) before calling the function. A
    program whose arguments hold user functions only through ``UserFn`` can then be
    found again in a later process from those functions' own jaxprs at the recorded
    arguments (:func:`open_key`), without tracing jattri's code around them: the
    program's jaxpr is jattri's code (in the digest) applied to what the user functions
    compute, and a function traced alone at the same arguments gives the same
    equations. Equal when the functions are equal, so jit's caches keyed on a user's
    function keep hitting; ``inspect.signature`` and ``__name__`` are the function's.

    The function is held by a weak reference where it takes one. A ``UserFn`` sits in
    the tree structure of every program argument that carries it, and JAX's caches keep
    those structures for the life of the process; holding the function itself there
    kept it, and whatever its closure holds (a model's frozen weights, a dataset), alive
    after every attributor of it was gone: 200 MB a time for a loss closing over 200 MB
    (``benchmarks/closure_memory.py``; ``tests/test_program_cache.py``). Whoever calls it
    later holds the function as well: :func:`jattri.func.grads.as_partial` keeps it on
    the ``Partial`` it returns."""

    def __init__(self, fn: Callable):
        for name in functools.WRAPPER_ASSIGNMENTS:  # not __wrapped__: a property
            try:
                setattr(self, name, getattr(fn, name))
            except (AttributeError, TypeError):
                pass
        try:
            self._ref, self._strong = weakref.ref(fn), None
        except TypeError:  # a callable that takes no weak reference: held
            self._ref, self._strong = None, fn
        try:
            self._hash = hash(fn)
        except TypeError:  # unhashable (a callable dataclass holding arrays)
            self._hash = None
        self._name = repr(fn)
        self._calls: dict = {}   # signature text -> arguments (_Aval leaves)
        self._fingerprints: dict = {}
        self._tainted = False    # called inside a trace with concrete arrays
        _ALL_USER_FNS[id(self)] = self

    @property
    def _fn(self) -> Callable:
        fn = self._alive()
        if fn is None:
            raise RuntimeError(
                f"jattri: the function {self._name} was garbage-collected while a "
                "program still calls it; keep the function (or the Partial that "
                "jattri.func.grads.as_partial returned) alive while it is used")
        return fn

    @property
    def __wrapped__(self) -> Callable:
        return self._fn

    def _alive(self) -> Optional[Callable]:
        return self._strong if self._ref is None else self._ref()

    def _forget(self) -> None:
        """Drops what this process recorded (``jax.clear_caches()``: JAX traces its
        functions again, so a function whose globals changed is traced anew here too)."""
        self._calls, self._fingerprints, self._tainted = {}, {}, False

    def __call__(self, *args, **kwargs):
        if not _trace_state_clean():
            called = getattr(_WATCH, "called", None)
            if called is not None:
                called.add(id(self))
            self._record(args, kwargs)
        return self._fn(*args, **kwargs)

    def __eq__(self, other: Any) -> bool:
        if other is self:
            return True
        if not isinstance(other, UserFn):
            return False
        mine, theirs = self._alive(), other._alive()
        return mine is not None and theirs is not None and (theirs is mine or theirs == mine)

    def __hash__(self) -> int:
        if self._hash is None:
            raise TypeError(f"unhashable function: {self._name}")
        return self._hash

    def __repr__(self) -> str:
        return f"UserFn({self._name})"

    def _record(self, args: tuple, kwargs: dict) -> None:
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        spec = []
        for x in leaves:
            if isinstance(x, jax.core.Tracer):
                aval = x.aval
                spec.append(_Aval(tuple(aval.shape), str(aval.dtype),
                                  bool(getattr(aval, "weak_type", False))))
            elif type(x) in _PLAIN:
                spec.append(x)
            else:  # a concrete array inside a trace: a constant of the program
                self._tainted = True
                return
        text = str(tree)
        if _ADDRESS.search(text):  # functions among the arguments
            self._tainted = True
            return
        text += repr([(x.shape, x.dtype, x.weak_type) if isinstance(x, _Aval)
                      else (type(x).__name__, x) for x in spec])
        if text not in self._calls:
            self._calls[text] = jax.tree_util.tree_unflatten(tree, spec)

    def fingerprint(self, text: str, spec: Any) -> Optional[str]:
        """The digest of this function's jaxpr at the arguments ``spec`` (recorded under
        ``text``), or ``None`` when its jaxpr cannot stand for it; memoised."""
        if text not in self._fingerprints:
            self._fingerprints[text] = _fingerprint(self._fn, spec)
        return self._fingerprints[text]


def user_fn(fn: Callable) -> Callable:
    """``fn`` as jattri's programs should hold it: unchanged if it is jattri's own code
    (``jattri.benchmark``'s excepted) or already a :class:`UserFn`, else one
    ``UserFn`` per function."""
    if isinstance(fn, UserFn):
        return fn
    module = getattr(fn, "__module__", None) or type(fn).__module__
    # jattri.benchmark plays the user: its functions close over a setting's arrays
    if _ours(module) and not module.startswith("jattri.benchmark"):
        return fn
    try:  # weakly keyed: the UserFn holds the function only weakly itself
        table = _USER_FNS
        found = table.get(fn)
    except TypeError:  # no weak reference: a table that holds it (as UserFn does)
        try:
            table = _USER_FNS_HELD
            found = table.get(fn)
        except TypeError:  # unhashable (a callable dataclass holding arrays)
            return UserFn(fn)
    if found is None:
        found = table[fn] = UserFn(fn)
    return found


class _Aval:
    """A traced argument's shape, dtype (by name) and weak type, as an index entry keeps
    it. Not a ``jax.ShapeDtypeStruct``: a numpy dtype read back by ``pickle`` is a copy
    of the builtin one (``isbuiltin`` 0), and once JAX's caches held avals made from
    one, later ``eval_shape`` results carried it (an ``.npy`` written by ``jattri.resumable``
    took float32 outputs for raw bits)."""

    __slots__ = ("shape", "dtype", "weak_type")

    def __init__(self, shape: tuple, dtype: str, weak_type: bool):
        self.shape, self.dtype, self.weak_type = shape, dtype, weak_type

    def struct(self) -> jax.ShapeDtypeStruct:
        from jax import numpy as jnp

        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype),
                                    weak_type=self.weak_type)


_USER_FNS: "weakref.WeakKeyDictionary[Callable, UserFn]" = weakref.WeakKeyDictionary()
_USER_FNS_HELD: dict = {}  # functions that take no weak reference
#: Every live UserFn by id (an unhashable function's wrapper cannot sit in a WeakSet).
_ALL_USER_FNS: "weakref.WeakValueDictionary[int, UserFn]" = weakref.WeakValueDictionary()
_WATCH = threading.local()


class _UserRecords:
    """Registered with JAX's caches: ``jax.clear_caches()`` forgets every
    :class:`UserFn`'s records."""

    def cache_clear(self) -> None:
        for fn in list(_ALL_USER_FNS.values()):
            fn._forget()

    def cache_info(self) -> dict:
        return {"functions": len(_ALL_USER_FNS)}

    def cache_keys(self) -> list:
        return []


_USER_RECORDS = _UserRecords()  # (JAX holds its caches weakly)
try:
    from jax._src import util as _jax_util

    _jax_util.register_cache(_USER_RECORDS, "jattri._program_cache.UserFn")
except Exception:  # noqa: BLE001 - a JAX without it: kept until exit
    pass


@contextlib.contextmanager
def _watching():
    """The ids of the :class:`UserFn` called inside the block (a set, filled as they
    are)."""
    outer = getattr(_WATCH, "called", None)
    called: set = set()
    _WATCH.called = called
    try:
        yield called
    finally:
        _WATCH.called = outer
        if outer is not None:
            outer |= called

try:
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # a JAX that does not say: every call recorded
    def _trace_state_clean() -> bool:
        return False


def _fingerprint(fn: Callable, spec: Any) -> Optional[str]:
    """SHA-256 of ``fn``'s jaxpr at ``spec`` (``(args, kwargs)``, arrays as
    :class:`_Aval`, plain scalars as themselves), its constants and output tree;
    ``None`` where the printed jaxpr cannot stand for the function (see :func:`key`),
    or it calls a custom derivative rule or a primitive defined outside JAX."""
    try:
        leaves, tree = jax.tree_util.tree_flatten(spec)
        at = [i for i, x in enumerate(leaves) if isinstance(x, _Aval)]

        def call(*xs):
            full = list(leaves)
            for i, x in zip(at, xs):
                full[i] = x
            args, kwargs = jax.tree_util.tree_unflatten(tree, full)
            return fn(*args, **kwargs)

        closed, out = jax.make_jaxpr(call, return_shape=True)(
            *[leaves[i].struct() for i in at])
    except Exception:  # noqa: BLE001 - what cannot be traced alone is traced in place
        return None
    text = _printed(closed)
    if text is None:
        return None
    digest = hashlib.sha256()
    prims: set = set()
    others: list = []  # a user's custom derivative rule sits here, unprinted
    try:
        _digest_consts(closed.consts, digest)
        _walk(closed.jaxpr, digest, prims, others)
        if _foreign(others, set(), 0) or not _transformed_by_jax(prims):
            return None
    except Exception:  # noqa: BLE001
        return None
    return _hexdigest([text, _ADDRESS.sub("", str(jax.tree_util.tree_structure(out)))],
                      digest)


def _foreign(obj: Any, seen: set, depth: int) -> bool:
    """``obj`` is, or reaches through closures, partials and JAX's wrapped functions,
    a function defined outside JAX, jaxlib and jattri (deep: assumed so): a user's
    custom derivative rule, which a jaxpr's text does not show (``custom_jvp_call``'s
    rule prints as "Wrapped function")."""
    import types

    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return False
    if depth > 40:
        return True
    seen.add(id(obj))
    step = lambda x: _foreign(x, seen, depth + 1)
    if isinstance(obj, (tuple, list)):
        return any(step(x) for x in obj)
    if isinstance(obj, dict):
        return any(step(x) for x in obj.values())
    if type(obj).__name__ == "WrappedFun" and _library(type(obj).__module__):
        return step(obj.f) or step(obj.transforms) or step(getattr(obj, "params", ()))
    if isinstance(obj, functools.partial):
        return step(obj.func) or step(obj.args) or step(obj.keywords or {})
    if isinstance(obj, types.FunctionType):
        module = obj.__module__
        if not (_library(module) or _ours(module)):
            return True
        return step(_cells(obj)) or step(obj.__defaults__ or ())
    if callable(obj) and not isinstance(obj, type):
        return not (_library(type(obj).__module__) or _ours(type(obj).__module__))
    return False


def _transformed_by_jax(prims: set) -> bool:
    """Every primitive's lowering, differentiation and batching rules are JAX's own."""
    if not _lowered_by_jax(prims):
        return False
    from jax._src.interpreters import ad, batching

    tables = [getattr(ad, "primitive_jvps", None), getattr(ad, "primitive_transposes", None),
              getattr(batching, "fancy_primitive_batchers", None)]
    for table in (t for t in tables if isinstance(t, dict)):
        for p in prims:
            rule = table.get(p)
            if rule is not None and not _defined_in_jax(rule):
                return False
    return True


class _Unrenderable(Exception):
    """A static value or tree node the open key cannot name: the program is traced."""


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _render(value: Any, slots: list, depth: int = 0) -> str:
    """A text that determines ``value`` as a jattri program can see it, user functions
    as numbered slots (appended to ``slots``); raises :class:`_Unrenderable` for
    anything else (arrays, objects of unknown classes, a user's function not wrapped in
    :class:`UserFn`)."""
    import dataclasses
    import enum
    import types

    if depth > 64:
        raise _Unrenderable("too deep")
    r = lambda v: _render(v, slots, depth + 1)
    t = type(value)
    if t in _PLAIN:
        return repr(value)
    if t is UserFn:
        for i, s in enumerate(slots):
            if s is value:
                return f"user#{i}"
        slots.append(value)
        return f"user#{len(slots) - 1}"
    if t in (tuple, list):
        return t.__name__ + "(" + ",".join(r(v) for v in value) + ")"
    if t is dict:
        return "dict(" + ",".join(f"{r(k)}:{r(v)}" for k, v in value.items()) + ")"
    # a class's methods may run inside the program: only jattri's own and the versioned
    # libraries' classes are rendered by their fields (a Flax module is not: Flax's
    # version is not in the digest)
    known = _ours(t.__module__) or _library(t.__module__)
    if isinstance(value, tuple) and hasattr(t, "_fields") and known:  # a NamedTuple
        return _type_name(t) + "(" + ",".join(r(v) for v in value) + ")"
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and known:
        return _type_name(t) + "(" + ",".join(
            f"{f.name}={r(getattr(value, f.name))}" for f in dataclasses.fields(value)) + ")"
    if isinstance(value, np.dtype):
        return f"dtype({value})"
    if isinstance(value, np.generic):
        return f"{value.dtype}({value!r})"
    if isinstance(value, jax.tree_util.PyTreeDef):
        return _render_tree(value, slots, depth + 1)
    if isinstance(value, functools.partial):
        return (_type_name(t) + "(" + r(value.func) + ";" + r(value.args) + ";"
                + r(dict(value.keywords or {})) + ")")
    if isinstance(value, type) and (_ours(value.__module__) or _library(value.__module__)
                                    or value.__module__ == "builtins"):
        return "class " + _type_name(value)
    if isinstance(value, enum.Enum) and known:
        return _type_name(t) + "." + value.name
    if isinstance(value, types.FunctionType):
        module = value.__module__
        if not (_ours(module) or _library(module)):
            raise _Unrenderable(f"a function of {module}")
        code = value.__code__
        parts = [module, value.__qualname__, str(code.co_firstlineno),
                 hashlib.sha256(code.co_code).hexdigest()[:16]]
        if value.__defaults__:
            parts.append(r(value.__defaults__))
        if value.__kwdefaults__:
            parts.append(r(value.__kwdefaults__))
        if value.__closure__:
            parts.append(r(_cells(value, empty="<empty cell>")))
        return "fn(" + ";".join(parts) + ")"
    if isinstance(value, types.BuiltinFunctionType) and _library(
            getattr(value, "__module__", None) or ""):
        return f"builtin {value.__module__}.{value.__qualname__}"
    raise _Unrenderable(_type_name(t))


def _render_tree(tree, slots: list, depth: int) -> str:
    """A tree structure with its nodes' types and data rendered (a
    ``jax.tree_util.Partial``'s function among them)."""
    node = tree.node_data()
    if node is None:
        return "*"
    kind, data = node
    return (_type_name(kind) + "[" + _render(data, slots, depth + 1) + "]("
            + ",".join(_render_tree(c, slots, depth + 1) for c in tree.children()) + ")")


def open_key(fun: Callable, static: Any, tree, leaves: list, options: Optional[dict],
             jit_kwargs: dict) -> Optional[tuple[str, list]]:
    """``(digest, user functions)`` under which a program that is not ``closed`` is
    indexed by its user functions (:func:`_load_open`), without tracing it; ``None``
    when an argument cannot be rendered (:func:`_render`)."""
    if not _ours(getattr(fun, "__module__", None)) or not _on_default_device(leaves):
        return None
    slots: list = []
    try:  # the program's own function too: a jitted closure's captured values
        parts = [_render(fun, slots), _render(static, slots), _render_tree(tree, slots, 0)]
    except _Unrenderable:
        return None
    return _hexdigest(["open", _code_digest(), _module_constants()] + parts
                      + [_leaf_types(leaves)] + _environment(options, jit_kwargs)), slots


def _load_open(where: Path, okey: str, slots: list, tree):
    """The program the index entry ``okey`` names, if every user function it records
    gives the same jaxpr now at every recorded argument; else ``None``."""
    import pickle

    try:
        digest, records = pickle.loads((where / f"u-{okey}").read_bytes())
    except Exception:  # noqa: BLE001 - none, or unreadable: traced as usual
        return None
    for slot, text, spec, expected in records:
        if slot >= len(slots) or slots[slot].fingerprint(text, spec) != expected:
            return None
    return _load(where / digest, tree)


def _store_open(where: Path, okey: str, slots: list, digest: str) -> bool:
    """Writes the index entry ``okey`` -> ``digest`` with every call of every user
    function recorded in this process and its fingerprint; ``False`` (nothing written)
    when a function was called with constants, or a call cannot be fingerprinted or
    pickled."""
    import pickle

    records = []
    for i, fn in enumerate(slots):
        if fn._tainted:
            return False
        for text, spec in list(fn._calls.items()):
            fp = fn.fingerprint(text, spec)
            if fp is None:
                return False
            records.append((i, text, spec, fp))
    try:
        entry = pickle.dumps((digest, records), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - a user's container that does not pickle
        return False
    return _write(where / f"u-{okey}", entry)
