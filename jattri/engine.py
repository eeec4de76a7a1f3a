"""How work flows, once for every method: data in chunks (in memory or streamed), a
method's per-chunk math folded over them, scores out in tiles (dense or top-k).

A method states only its per-chunk math as module-level functions
``step(config, args, carry, chunk) -> (carry, out)`` (``config`` static and hashable,
``args`` and ``carry`` pytrees of arrays). :func:`scan` runs it over every chunk of a
dataset: for an in-memory pytree inside one compiled ``lax.scan`` (so stages stay
jittable end to end), for a :class:`Stream` as a Python loop over batches calling one
compiled step. Both paths see the same fixed-size chunks, padded at the end and
masked by ``chunk.valid``, so streamed and in-memory results agree to rounding.
:func:`per_example` (per-example outputs only) writes each chunk's outputs in place
into one preallocated array, along any axis; its last in-memory chunk overlaps the one
before instead of being padded.

Memory: one chunk of ``size`` examples is live at a time; what a step emits per example
is what a method keeps (projected features, a scalar), never ``(n, d)`` gradients
unless the method asks for them.
"""
from __future__ import annotations

import collections.abc
import functools
import itertools
import weakref
from functools import partial
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jattri import _checks
from jattri._jit import jit

PyTree = Any

def _chunk_budget() -> int:
    """``$JATTRI_CHUNK_BYTES`` (a positive int, in bytes; e.g. more on a large
    accelerator), else 256 MiB; at most an eighth of this machine's physical memory."""
    import os
    budget = 256 * 2**20
    text = os.environ.get("JATTRI_CHUNK_BYTES", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"JATTRI_CHUNK_BYTES must be a positive number of bytes, got "
                             f"{text!r}")
        budget = int(text)
    total = _checks.physical_memory()
    return max(budget if total is None else min(budget, total // 8), 1)


#: Bytes of per-example gradients one chunk may hold when ``chunk_size`` is not given
#: (read at import: ``$JATTRI_CHUNK_BYTES`` or 256 MiB, at most 1/8 of physical memory).
DEFAULT_CHUNK_BYTES = _chunk_budget()
#: The most examples a default chunk holds. Small models reach it (the budget above holds
#: 8,548 gradients of dattri's 7,850-parameter LR). Raised from 1,024, with chunks
#: balanced (:func:`default_chunk_size`): on dattri's LR at 5,000 examples the TRAK and
#: TracIn Kronecker first calls 0.05-0.15 s shorter, EK-FAC's compiled call 0-0.06 s
#: longer; on its MLP (9 chunks of 556, not 5,517 padded rows) EK-FAC and Arnoldi
#: compiled 6-8% faster (``benchmarks/RESULTS.md``).
MAX_DEFAULT_CHUNK = 8192


class Chunk(NamedTuple):
    """``size`` examples: ``data`` (leading axis ``size``), ``index`` their int32
    positions in the dataset, ``valid`` False on the padding of the last chunk."""

    data: PyTree
    index: jax.Array
    valid: jax.Array


class Stream:
    """A training (or test) set streamed as batches that do not fit in memory at once.

    ``source`` is a re-iterable of batches (a list of pytrees, each with a leading
    example axis) or a zero-argument callable returning a fresh iterator of them, so a
    method can read the set more than once (EK-FAC reads it twice; scoring against
    recomputed training gradients reads it again). A one-shot iterator (a generator)
    is accepted for a single pass and refused, with a clear error, on a second; its
    first batch may be looked at (:meth:`peek`, for input checks) without being lost.
    Batches may have any sizes; they are re-cut into a method's fixed chunks.

    With ``mesh`` (and optionally ``axes``, as in :func:`shard`), every chunk is placed
    on the mesh with its examples split over those devices before a stage's step runs
    on it: ``chunk_size`` examples per device, so a chunk holds ``devices ·
    chunk_size`` examples (one process; each process of a multi-host run should shard
    an in-memory set with ``jax.make_array_from_process_local_data`` instead).
    """

    _ONE_SHOT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __new__(cls, source: Any, mesh: Any = None, axes: Any = None):
        if isinstance(source, Stream) and mesh is None:
            return source
        if isinstance(source, collections.abc.Iterator):
            try:  # one Stream per iterator, so its consumption is remembered
                return cls._ONE_SHOT.setdefault(source, super().__new__(cls))
            except TypeError:
                pass
        return super().__new__(cls)

    def __init__(self, source: Any, mesh: Any = None, axes: Any = None):
        if isinstance(source, Stream):
            if mesh is not None:  # the same batches, placed on a mesh
                self.__dict__.update(source.__dict__)
                self.layout = _mesh_layout(mesh, axes)
            return
        if getattr(self, "source", None) is source:
            return
        self.layout = None if mesh is None else _mesh_layout(mesh, axes)
        if not (callable(source) or isinstance(source, collections.abc.Iterable)):
            raise TypeError("`Stream` takes a re-iterable of batches or a zero-argument "
                            f"callable returning an iterator, got {type(source).__name__}")
        self.source = source
        self.one_shot = isinstance(source, collections.abc.Iterator)
        self._used = False
        self._peeked: list = []

    def peek(self) -> PyTree:
        """The first batch, without consuming a one-shot source."""
        if self.one_shot:
            if self._used:
                raise self._consumed()
            if not self._peeked:
                try:
                    self._peeked.append(next(self.source))
                except StopIteration:
                    raise ValueError("the stream yielded no batches") from None
            return self._peeked[0]
        for batch in self:
            return batch
        raise ValueError("the stream yielded no batches")

    @staticmethod
    def _consumed() -> ValueError:
        return ValueError("this Stream wraps a one-shot iterator that was already consumed; "
                          "pass a list of batches (jattri.stream([...])) or a zero-argument "
                          "callable returning a fresh iterator")

    def __iter__(self) -> Iterator[PyTree]:
        if not self.one_shot:
            return iter(self.source() if callable(self.source) else self.source)
        if self._used:
            raise self._consumed()
        self._used = True
        return itertools.chain(self._peeked, self.source)


def stream(source: Any, *, mesh: Any = None, axes: Any = None) -> Stream:
    """Wrap batches as a :class:`Stream` (see there); with ``mesh``, each chunk is
    split over the mesh's devices (``axes``: which mesh axes, default all)."""
    return Stream(source, mesh, axes)


def is_stream(data: Any) -> bool:
    return isinstance(data, Stream) or isinstance(data, collections.abc.Iterator)


def as_stream(data: Any) -> Stream:
    return Stream(data)


def default_chunk_size(bytes_per_example: int, n: Optional[int] = None) -> int:
    """Examples per chunk when the user gives none: as many as fit
    :data:`DEFAULT_CHUNK_BYTES` of per-example arrays (gradients: 4·d bytes each), at
    most :data:`MAX_DEFAULT_CHUNK`; with ``n`` known, the n examples in the fewest
    chunks of at most that size, as equal as they can be (so the last chunk pads at
    most one row per chunk: 5,000 examples at a cap of 1,024 went in 5 chunks padded
    to 5,120)."""
    size = max(1, min(MAX_DEFAULT_CHUNK, DEFAULT_CHUNK_BYTES // max(int(bytes_per_example), 1)))
    return balanced_chunk(size, n)


def balanced_chunk(size: int, n: Optional[int] = None) -> int:
    """``size``, or with ``n`` known the size of the fewest chunks of at most ``size``
    that hold n examples, as equal as they can be."""
    if n is None:
        return size
    n = max(1, int(n))
    return -(-n // -(-n // size))


def check_chunk_size(chunk_size: Any, name: str = "chunk_size") -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"`{name}` must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


# ------------------------------------------------------------------- test-set buckets

#: ``attribute`` pads an in-memory test set of n examples to :func:`bucket_size` (n)
#: rows (its last example repeated) and returns the scores of the n real ones, so a
#: later call whose count falls in the same bucket runs the programs already compiled.
#: ``False``: every count compiles its own programs, nothing padded.
TEST_BUCKETS = True
#: Dense scores are padded only while ``n_train × bucket_size(n_test)`` is at most this
#: many entries (256 MiB of float32). Trimming copies the real columns out beside the
#: padded matrix (in host memory, once more into the returned array), so above it the
#: copies cost more memory than a compilation costs time. Top-k scores are always padded.
BUCKET_MAX_SCORES = 2 ** 26


def bucket_size(n: int) -> int:
    """The number of rows a test set of ``n`` examples is padded to: ``n`` up to 16,
    else ``n`` rounded up to a multiple of 2^(⌈log₂ n⌉ − 4). Eight sizes per doubling
    (…, 288, 320, …, 480, 512, 576, …), so at most n/8 padded rows, about 1/32 of n on
    average: a test set of 500 examples runs as 512, and so do 481-511."""
    n = int(n)
    if n <= 16:
        return n
    step = 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


@partial(jit, static_argnums=1, once=True, closed=True)
def _repeat_last(data, extra):
    return jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]), data)


@partial(jit, static_argnums=(1, 2), once=True, closed=True)
def _leading(out, n, axis):
    return jax.tree_util.tree_map(lambda x: jax.lax.slice_in_dim(x, 0, n, axis=axis), out)


def _in_host_memory(tree: PyTree) -> bool:
    """Every leaf a numpy array or a concrete jax array on one CPU device (numpy reads
    it in place)."""
    def host(x):
        if isinstance(x, np.ndarray):
            return True
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return False
        devices = x.devices()
        return len(devices) == 1 and next(iter(devices)).platform == "cpu"
    return all(host(x) for x in jax.tree_util.tree_leaves(tree))


def _like(y: np.ndarray, x: Any) -> Any:
    """``y`` as ``x`` was held: numpy stays numpy; a jax array goes to ``x``'s device,
    committed there only if ``x`` was."""
    if isinstance(x, np.ndarray):
        return y
    return jax.device_put(y, x.sharding if x.committed else None)


def pad_examples(data: PyTree, rows: int) -> PyTree:
    """``data`` (a pytree of arrays with a leading example axis n ≤ ``rows``) with its
    last example repeated up to ``rows``. In host memory (numpy, or jax arrays on the
    CPU) by numpy: no compilation (two small programs per shape were 0.06 s of a
    first call); numpy leaves stay numpy. Elsewhere (an accelerator, a trace) by one
    compiled program per shape."""
    n = _checks.num_examples(data)
    if rows == n:
        return data
    if not _in_host_memory(data):
        return _repeat_last(data, rows - n)

    def pad(x):
        y = np.asarray(x)
        return _like(np.concatenate([y, np.repeat(y[-1:], rows - n, axis=0)]), x)
    return jax.tree_util.tree_map(pad, data)


def leading_examples(out: PyTree, n: int, axis: int) -> PyTree:
    """The first ``n`` entries of ``out``'s leaves along ``axis`` (scores of a padded
    test set), by numpy for arrays on the CPU (no compilation), else by one compiled
    program per shape."""
    if not _in_host_memory(out):
        return _leading(out, n, axis)
    return jax.tree_util.tree_map(lambda x: _like(np.ascontiguousarray(
        np.asarray(x)[(slice(None),) * axis + (slice(0, n),)]), x), out)


def padded_count(data: Any, n_train: Optional[int], top_k: Any) -> Optional[int]:
    """The padded test count :func:`bucketed` uses for ``data``, or ``None`` (run as
    given): a stream, a dataset sharded over devices, leaves that are not arrays of one
    leading size, a count already on a bucket, or dense scores over
    :data:`BUCKET_MAX_SCORES` entries (``n_train`` unknown: streamed)."""
    if not TEST_BUCKETS or is_stream(data):
        return None
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves or any(np.ndim(x) == 0 for x in leaves):
        return None  # the method's own check names what is wrong
    n = np.shape(leaves[0])[0]
    if n < 1 or any(np.shape(x)[0] != n for x in leaves):
        return None
    rows = bucket_size(n)
    if rows == n or (top_k is None and (n_train is None or n_train * rows > BUCKET_MAX_SCORES)):
        return None
    try:
        sharded = layout_of(data) is not None
    except ValueError:
        return None  # the method's own check refuses it
    return None if sharded else rows


def bucketed(attribute: Callable) -> Callable:
    """``attribute(state, test, *, top_k=None, ...)`` run on the test set padded to
    :func:`bucket_size` rows (:func:`padded_count`), its scores trimmed back to the n real
    test examples: dense ``(n_train, n)`` columns, or a :class:`TopK`'s first n rows.
    Test examples are scored independently by every method, so the real examples' scores
    are the unpadded call's (to rounding: another shape may order a sum differently).

    Cost: up to n/8 more test examples' work (1/32 on average) and, for dense scores, a
    trimmed copy of the ``(n_train, n)`` matrix, briefly beside the padded one. Trimmed
    in host memory (by numpy), the scores are computed when ``attribute`` returns: a
    padded call does not return before its result as an unpadded one does. Inside
    :class:`progress`, the test side's stages count the padded rows."""
    @functools.wraps(attribute)
    def padded(state, test, *args, top_k=None, **kwargs):
        made = getattr(state, "made", None)
        rows = padded_count(test, getattr(made, "n_train", None), top_k)
        if rows is None:
            return attribute(state, test, *args, top_k=top_k, **kwargs)
        n = _checks.num_examples(test)
        out = attribute(state, pad_examples(test, rows), *args, top_k=top_k, **kwargs)
        return leading_examples(out, n, 0 if isinstance(out, TopK) else 1)

    return padded


# ----------------------------------------------------------------------------- chunks

def _pad_rows(x, size):
    n = x.shape[0]
    if n == size:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[:1], size - n, axis=0)])


class Layout(NamedTuple):
    """How an in-memory dataset's examples lie over devices: its leading axis split
    into equal blocks over the mesh axis (or axes) ``axes`` of ``mesh`` (a
    ``NamedSharding`` whose spec starts with ``axes``). Static (hashable)."""

    mesh: Any
    axes: Any  # a mesh axis name, or a tuple of names

    @property
    def devices(self) -> int:
        names = self.axes if isinstance(self.axes, tuple) else (self.axes,)
        return int(np.prod([self.mesh.shape[a] for a in names]))

    def sharding(self, axis: int = 0):
        """Examples along ``axis`` split over the mesh, other axes replicated."""
        from jax.sharding import NamedSharding, PartitionSpec
        return NamedSharding(self.mesh, PartitionSpec(*([None] * axis), self.axes))

    def constrain(self, tree: PyTree, axis: int = 0) -> PyTree:
        return jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, self.sharding(axis)), tree)


def layout_of(data: Any) -> Optional[Layout]:
    """The :class:`Layout` of an in-memory dataset whose array leaves are sharded
    along their example axis over more than one device (``None`` otherwise: one
    device, host arrays, a stream). Leaves split over different mesh axes are
    refused."""
    if is_stream(data):
        return None
    leaves = jax.tree_util.tree_leaves(data)
    if leaves and all(id(x) in _ASSUMED and _ASSUMED[id(x)][0] is x for x in leaves):
        return _ASSUMED[id(leaves[0])][1]
    found = set()
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        if not isinstance(leaf, jax.Array) or spec is None or not len(spec) or spec[0] is None:
            continue
        layout = Layout(sharding.mesh, spec[0])
        if layout.devices > 1:
            found.add(layout)
    if len(found) > 1:
        raise ValueError("the dataset's leaves are sharded over different meshes or mesh "
                         f"axes ({sorted(str(l.axes) for l in found)}): shard every leaf's "
                         "example axis the same way (jattri.shard)")
    return found.pop() if found else None


_ASSUMED: dict = {}  # id(tracer) -> (tracer, Layout), while a function is traced


def traced_with_layout(layout: Optional[Layout], data: Any, fn: Callable) -> Any:
    """``fn()``, traced inside a jitted function whose traced argument ``data`` had
    ``layout`` outside it (a tracer carries no sharding): the engine's stages on
    exactly those arrays (not slices of them) keep the device-local layout. The caller
    makes ``layout`` a static argument of its jit (``layout_of`` outside), so a
    program traced for one layout never serves another."""
    if layout is None or is_stream(data):
        return fn()
    leaves = jax.tree_util.tree_leaves(data)
    for x in leaves:
        _ASSUMED[id(x)] = (x, layout)
    try:
        return fn()
    finally:
        for x in leaves:
            _ASSUMED.pop(id(x), None)


def _mesh_layout(mesh: Any, axes: Any = None) -> Layout:
    """The :class:`Layout` splitting examples over ``axes`` of ``mesh`` (checked)."""
    from jax.sharding import Mesh
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = tuple(mesh.axis_names) if axes is None else axes
    names = axes if isinstance(axes, tuple) else (axes,)
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown or not names:
        raise ValueError(f"`axes` {axes!r} names no axis of the mesh (its axes: "
                         f"{mesh.axis_names})")
    return Layout(mesh, names if len(names) > 1 else names[0])


def _placed(chunk: Chunk, layout: Optional[Layout]) -> Chunk:
    """A host chunk of a stream on its mesh (``layout``), examples split."""
    if layout is None:
        return chunk
    if jax.process_count() > 1:
        raise NotImplementedError(
            "a Stream placed on a mesh runs in one process; in a multi-host run, build "
            "each process's slice with jax.make_array_from_process_local_data")
    return jax.device_put(chunk, layout.sharding())


def shard(data: PyTree, mesh: Any, axes: Any = None) -> PyTree:
    """``data`` (a pytree of arrays with a leading example axis) placed on ``mesh``
    with its examples split evenly over the mesh axis (or axes) ``axes`` (default:
    every axis of the mesh). Every jattri stage run on the result is spread over those
    devices (:class:`Layout`): per-example gradients, projections and per-example
    outputs stay on the device holding the example, and sums over examples (Gram,
    Fisher, Kronecker factors, top-k) are reduced by XLA collectives. n must be a
    multiple of the number of devices (pad or drop examples first).

    Multi-host: build the global array from each process's own slice with
    ``jax.make_array_from_process_local_data(NamedSharding(mesh, P(axes)), local)``
    instead; jattri reads its layout the same way.
    """
    layout = _mesh_layout(mesh, axes)
    n = _checks.check_data(data, "data")
    if n % layout.devices:
        raise ValueError(f"`data` has {n} examples, not a multiple of the {layout.devices} "
                         f"devices of mesh axes {layout.axes!r}: pad or drop "
                         f"{n % layout.devices} examples first")
    return jax.device_put(data, layout.sharding())


def _spread(layout: Optional[Layout]) -> int:
    return 1 if layout is None else layout.devices


def _laid_out(x, devices: int, n_local: int, size: int):
    """``x`` ``(n, ...)`` as ``(n_chunks, devices·size, ...)``: chunk c holds, from
    every device's block of ``n_local`` examples, its rows ``c·size ... (c+1)·size``
    (padded by repeating the block's first row). Under a sharded layout every reshape
    and transpose here is local to a device: no example moves."""
    x = jnp.asarray(x)
    rest = x.shape[1:]
    n_chunks = -(-n_local // size)
    x = x.reshape((devices, n_local) + rest)
    if n_chunks * size > n_local:
        x = jnp.concatenate([x, jnp.repeat(x[:, :1], n_chunks * size - n_local, axis=1)],
                            axis=1)
    x = x.reshape((devices, n_chunks, size) + rest)
    return jnp.swapaxes(x, 0, 1).reshape((n_chunks, devices * size) + rest)


def _stacked_chunks(data: PyTree, size: int, layout: Optional[Layout] = None) -> tuple:
    """The in-memory dataset as ``(n_chunks, chunk, ...)`` chunks (padded), with its
    index and valid arrays likewise; ``chunk`` = ``size`` on one device, ``devices ·
    size`` examples (``size`` per device) under a sharded ``layout``."""
    n = _checks.num_examples(data)
    d = _spread(layout)
    n_local = n // d
    n_chunks = -(-n_local // size)
    stacked = jax.tree_util.tree_map(lambda x: _laid_out(x, d, n_local, size), data)
    local = jnp.arange(n_chunks * size, dtype=jnp.int32).reshape(n_chunks, 1, size)
    start = n_local * jnp.arange(d, dtype=jnp.int32).reshape(1, d, 1)
    valid = jnp.broadcast_to(local < n_local, (n_chunks, d, size))
    index = jnp.where(valid, start + local, 0)
    chunks = Chunk(stacked, index.reshape(n_chunks, d * size),
                   valid.reshape(n_chunks, d * size))
    return (chunks if layout is None else layout.constrain(chunks, axis=1)), n


def _unlaid(y, devices: int, n: int, size: int):
    """Per-example outputs ``(n_chunks, devices·size, ...)`` back in dataset order,
    ``(n, ...)``: the inverse of :func:`_laid_out` (local to each device)."""
    rest = y.shape[2:]
    y = y.reshape((y.shape[0], devices, size) + rest)
    y = jnp.swapaxes(y, 0, 1).reshape((devices, -1) + rest)[:, :n // devices]
    return y.reshape((n,) + rest)


def stream_chunks(data: Stream, size: int) -> Iterator[tuple]:
    """``(Chunk, count)`` of a stream, re-cut into chunks of ``size`` (the last padded)."""
    pending, have, start = [], 0, 0

    def emit(parts, count):
        nonlocal start
        if len(parts) == 1:
            block = parts[0]
        else:
            block = jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                                           *parts)
        block = jax.tree_util.tree_map(lambda x: _pad_rows(x, size), block)
        pos = np.arange(start, start + size, dtype=np.int32)
        valid = np.arange(size) < count
        start += count
        return Chunk(block, np.where(valid, pos, 0).astype(np.int32), valid), count

    def take(batch, k):
        return (jax.tree_util.tree_map(lambda x: x[:k], batch),
                jax.tree_util.tree_map(lambda x: x[k:], batch))

    seen_any, first = False, None
    for b, batch in enumerate(data):
        n_b = _checks.check_data(batch, f"batch {b} of the stream")
        if first is None:
            first = batch
        else:
            _checks.check_like(batch, first, f"batch {b} of the stream",
                               "batch 0 of the stream")
        seen_any = True
        while n_b:
            k = min(size - have, n_b)
            head, batch = take(batch, k) if k < n_b else (batch, None)
            pending.append(head)
            have += k
            n_b -= k
            if have == size:
                yield emit(pending, size)
                pending, have = [], 0
    if have:
        yield emit(pending, have)
    if not seen_any:
        raise ValueError("the stream yielded no batches")


def first_example(data: Any) -> PyTree:
    """One example of an in-memory dataset or a stream (reads its first batch)."""
    if is_stream(data):
        return _checks.first_example(as_stream(data).peek())
    return _checks.first_example(data)


# -------------------------------------------------------------------------- progress

class Progress(NamedTuple):
    """One progress report: ``stage`` (the step's name, e.g. ``"ekfac covariance"``),
    ``done`` of ``total`` (``None`` for a stream), ``seconds`` since the stage began
    (compilation included), counted in ``unit``: ``"examples"`` for every stage but
    Arnoldi's fit (``"Krylov steps"``), LiSSA's solve (``"LiSSA steps"``) and RPS's
    refit (``"L-BFGS steps"``, no total)."""

    stage: str
    done: int
    total: Optional[int]
    seconds: float
    unit: str = "examples"

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("nan")


class _Printer:
    """The default reporter: one line on stderr at most every ``every`` seconds per
    stage, and a last line for every stage that took that long."""

    def __init__(self, every: float = 2.0):
        self.every, self.last = float(every), {}

    def __call__(self, p: Progress, final: bool = False) -> None:
        import sys
        key = p.stage
        if final:
            printed = self.last.pop(key, None) is not None
            if not printed and p.seconds < self.every:
                return
        elif p.seconds - self.last.get(key, 0.0) < self.every:
            return
        else:
            self.last[key] = p.seconds
        total = "" if p.total is None else f"/{p.total}"
        print(f"[jattri] {p.stage}: {p.done}{total} {p.unit}, {p.seconds:.1f} s, "
              f"{p.per_second:.1f} {p.unit}/s{' (done)' if final else ''}",
              file=sys.stderr, flush=True)


_REPORTERS: list = []
_STAGES: list = []


class _Stage:
    def __init__(self, name: str, total: Optional[int], report: Callable):
        import time
        self.name, self.total, self.report = name, total, report
        self.start, self.done, self.clock = time.perf_counter(), 0, time.perf_counter
        self.unit = "examples"

    def update(self, done: int) -> None:
        self.done = done if self.total is None else min(int(done), self.total)
        self.report(Progress(self.name, self.done, self.total, self.clock() - self.start,
                             self.unit))

    def finish(self) -> None:
        p = Progress(self.name, self.done, self.total, self.clock() - self.start, self.unit)
        try:
            self.report(p, final=True)
        except TypeError:  # a user callback of one argument
            pass


def _stage_name(fn: Callable) -> str:
    name = getattr(fn, "__name__", type(fn).__name__).strip("_")
    for suffix in ("_step", "_fn"):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    return name.replace("_", " ")


class _stage:
    """Context of one stage: ``None`` (nothing reported) unless :func:`progress` is on."""

    def __init__(self, fn: Callable, total: Optional[int], *traced: Any):
        tracing = any(isinstance(x, jax.core.Tracer)
                      for x in jax.tree_util.tree_leaves(traced))
        # inside an enclosing jit nothing runs now: the stage stays silent there
        self.stage = (_Stage(_stage_name(fn), total, _REPORTERS[-1])
                      if _REPORTERS and not tracing else None)

    def __enter__(self):
        if self.stage is not None:
            _STAGES.append(self.stage)
        return self.stage

    def __exit__(self, *exc):
        if self.stage is not None:
            _STAGES.pop()
            if exc[0] is None:
                self.stage.finish()
        return False


def _tick_add(count) -> None:
    """Called from inside a compiled solve (``jax.debug.callback``) after each group of
    systems (or each step): ``count`` more done."""
    if _STAGES:
        _STAGES[-1].update(_STAGES[-1].done + int(count))


class solve_stage(_stage):
    """The stage of an iterative solve: CG's counts the examples whose systems are
    solved, a group of systems (one program call) at a time; LiSSA's its recursion
    steps and Arnoldi's fit its Krylov steps, a segment of steps (one program call) at
    a time, all reported from the host (:func:`reported_calls`); RPS's refit its
    L-BFGS steps (``unit``), reported from inside its compiled program
    (:func:`solved`). ``None`` unless :func:`progress` is on. A program with the
    callbacks is not stored by the persistent compilation cache."""

    def __init__(self, name: str, total: Optional[int], *traced: Any,
                 unit: str = "examples"):
        super().__init__(lambda: None, total, *traced)
        if self.stage is not None:
            self.stage.name, self.stage.unit = name, unit


_SOLVES_REPORT: list = []  # trace time: whether the solve being traced reports


class reporting_solves:
    """Trace-time context: :func:`solved` inside it compiles a host callback (for a
    program traced under a :class:`solve_stage`; the caller makes the flag a static
    argument of its jit, so programs traced without it carry no callback)."""

    def __init__(self, on: bool):
        self.on = bool(on)

    def __enter__(self):
        _SOLVES_REPORT.append(self.on)

    def __exit__(self, *exc):
        _SOLVES_REPORT.pop()
        return False


def solves_report() -> bool:
    """Whether the solve being traced reports (inside ``reporting_solves(True)``)."""
    return bool(_SOLVES_REPORT and _SOLVES_REPORT[-1])


def solved(count: int, after: Any) -> None:
    """In a solve traced inside ``reporting_solves(True)``: report ``count`` more
    systems solved (or steps taken) to the current stage once ``after`` (the group's
    solutions, the step's vector) is computed (a ``jax.debug.callback`` reading one of
    its entries); elsewhere nothing."""
    if solves_report():
        first = jnp.ravel(after)[:1]
        jax.debug.callback(lambda c, _: _tick_add(c), count, first)


def solved_every(every: int, steps: Any, after: Any) -> None:
    """In a loop step of a reporting solve that brings its count to ``steps``
    (traced): report ``every`` more steps whenever ``steps`` is a multiple of
    ``every``; elsewhere nothing (the quiet program has no branch)."""
    if solves_report():
        jax.lax.cond(steps % every == 0, lambda: solved(every, after), lambda: None)


def solved_rest(every: int, steps: Any, after: Any) -> None:
    """After a loop of ``steps`` steps reported by :func:`solved_every`: the steps
    since its last report; elsewhere nothing."""
    if solves_report():
        rest = steps % every
        jax.lax.cond(rest > 0, lambda: solved(rest, after), lambda: None)


def reported(name: str, total: Optional[int], run: Callable, *traced: Any,
             unit: str = "examples") -> Any:
    """``run(report)``, a compiled solve taking ``report`` as a static flag, as a
    :class:`solve_stage`: with :func:`progress` on, the program with the callbacks,
    read to its end before the stage closes; otherwise the quiet program, dispatched
    and left running while the caller goes on."""
    with solve_stage(name, total, *traced, unit=unit) as stage:
        out = run(stage is not None)
        if stage is not None:
            jax.block_until_ready(out)
    return out


class progress:
    """Report the progress of jattri's stages inside the block (silent otherwise)::

        with jattri.progress():                  # lines on stderr, every 2 s
            state = attr.cache(params, train)
        with jattri.progress(lambda p: log(p.stage, p.done, p.per_second)):
            ...

    ``report(p: Progress)`` is called after each chunk of every stage; a reporter that
    also accepts ``final=True`` gets one last call per stage. Default: a line on stderr
    at most every ``every`` seconds, with examples per second. The CLI turns it on.

    Inside the block an in-memory stage of more than one chunk runs one compiled
    program per chunk, reported from the host between them (outside it, one program
    for all chunks): neither carries a host callback, so both are stored by the
    persistent compilation cache and a second process starts warm. So are CG's
    solves, one call per group of systems, and LiSSA's recursion and Arnoldi's fit,
    one call per segment of steps. RPS's refit (:class:`solve_stage`) reports from
    inside its compiled loops through ``jax.debug.callback``, compiled in only while
    reporting; that program is compiled again in every process.
    """

    def __init__(self, report: Optional[Callable] = None, *, every: float = 2.0):
        self.report = _Printer(every) if report is None else report

    def __enter__(self):
        _REPORTERS.append(self.report)
        return self.report

    def __exit__(self, *exc):
        _REPORTERS.remove(self.report)
        return False


# ------------------------------------------------------------------------------ scan

def _split_zeros(carry: PyTree) -> tuple:
    """``(leaves, spec)``: the carry's leaves with those given as
    ``jax.ShapeDtypeStruct`` (zeros to start from) replaced by ``None``, and the static
    ``(treedef, ((shape, dtype) | None per leaf))`` that :func:`_join_zeros` rebuilds
    them from inside a compiled program (eager ``jnp.zeros`` is a compilation per
    shape); ``spec`` is ``None`` when no leaf is a ``ShapeDtypeStruct``."""
    leaves, tree = jax.tree_util.tree_flatten(carry)
    zeros = tuple((tuple(x.shape), np.dtype(x.dtype)) if isinstance(x, jax.ShapeDtypeStruct)
                  else None for x in leaves)
    if all(z is None for z in zeros):
        return leaves, None
    return [None if z else x for x, z in zip(leaves, zeros)], (tree, zeros)


def _join_zeros(leaves, spec) -> PyTree:
    tree, zeros = spec
    return jax.tree_util.tree_unflatten(
        tree, [x if z is None else jnp.zeros(*z) for x, z in zip(leaves, zeros)])


_zeros_jit = jit(_join_zeros, static_argnums=1)


def _partial_start(carry, layout):
    """Zero partial sums of ``carry``'s shapes, one per device (a leading sharded axis)."""
    return layout.constrain(jax.tree_util.tree_map(
        lambda x: jnp.zeros((layout.devices,) + jnp.shape(x), jnp.result_type(x)), carry))


def _partial_end(start, carry):
    """``start`` plus the devices' partial sums ``carry``."""
    return jax.tree_util.tree_map(
        lambda c0, c: c0 + jnp.sum(c, axis=0).astype(jnp.result_type(c0)), start, carry)


def _scan_one(step, config, args, carry, chunk, layout, partial_sums):
    """One chunk's ``step`` (``chunk`` of ``devices · size`` examples); with
    ``partial_sums`` every device adds its own rows into its own partial carry."""
    if layout is not None:
        chunk = layout.constrain(chunk)
    if not partial_sums:
        return step(config, args, carry, chunk)
    d = layout.devices
    per_device = layout.constrain(jax.tree_util.tree_map(
        lambda y: y.reshape((d, y.shape[0] // d) + y.shape[1:]), chunk))
    carry, out = jax.vmap(lambda cj, chunk_j: step(config, args, cj, chunk_j))(carry, per_device)
    return carry, jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:]), out)


@partial(jit, static_argnames=("step", "config", "size", "layout", "sums", "zeros"))
def _scan_jit(step, config, args, carry, data, size, layout=None, sums=False, zeros=None):
    # Chunked, scanned and trimmed inside one program: outside it, the padding,
    # reshapes and slices would each be an eager op (a compilation of its own on first
    # use) and leave a full copy (2.56 GiB of test gradients on a 10.7M-parameter
    # model) until Python's next garbage collection.
    if zeros is not None:
        carry = _join_zeros(carry, zeros)
    chunks, n = _stacked_chunks(data, size, layout)
    d = _spread(layout)
    # A sum over examples under a sharded layout: every device adds its own rows into a
    # partial sum of its own (a leading device axis, sharded), so a step needs no
    # communication; the partials are reduced once, after the last chunk. Otherwise the
    # carry is replicated and XLA all-reduces each step's contribution (TRAK's k x k
    # Gram: 67 MB a step at k = 4096).
    partial_sums = sums and layout is not None
    start = carry
    if partial_sums:
        carry = _partial_start(carry, layout)

    def body(c, chunk):
        return _scan_one(step, config, args, c, chunk, layout, partial_sums)

    carry, outs = jax.lax.scan(body, carry, chunks)
    if partial_sums:
        carry = _partial_end(start, carry)
    outs = jax.tree_util.tree_map(lambda y: _unlaid(y, d, n, size), outs)
    return carry, (outs if layout is None else layout.constrain(outs))


@partial(jit, static_argnames=("step", "config"))
def _step_jit(step, config, args, carry, chunk):
    return step(config, args, carry, chunk)


# ------------------------------------------------- chunk by chunk, for progress
#
# Inside `progress` an in-memory stage runs one compiled program per chunk, driven and
# reported from here, instead of one scan whose host callback reports each chunk: JAX's
# persistent compilation cache never stores a program with a host callback, so those
# were compiled again in every process (the benchmark CLI, which reports, never started
# warm). The chunk programs have no callback; each is compiled once per stage shape and
# stored like the quiet programs. The rows of a chunk are sliced from the dataset in
# place (the last chunk overlaps the one before it), and its outputs are written into
# buffers donated from call to call: no stacked or padded copy of the dataset or of the
# outputs.

def _blocks(data: PyTree, d: int, n_local: int, layout: Optional[Layout]) -> PyTree:
    """``data`` ``(n, ...)`` viewed as ``(d, n_local, ...)``, a block per device (local
    under a sharded layout: a reshape, no copy)."""
    blocks = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x).reshape((d, n_local) + x.shape[1:]), data)
    return blocks if layout is None else layout.constrain(blocks)


def _chunk_at(blocks: PyTree, start, size: int, layout: Optional[Layout],
              first=None) -> Chunk:
    """Rows ``start ... start + size`` of every device's block, as one chunk of
    ``d · size`` examples; rows before ``first`` (traced; the overlap of a last chunk
    with the one before it) are marked not valid."""
    leaf = jax.tree_util.tree_leaves(blocks)[0]
    d, n_local = leaf.shape[0], leaf.shape[1]
    rows = jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1).reshape(
            (d * size,) + x.shape[2:]), blocks)
    local = start + jnp.arange(size, dtype=jnp.int32)
    index = (n_local * jnp.arange(d, dtype=jnp.int32)[:, None] + local[None]).reshape(-1)
    valid = (jnp.ones((d * size,), bool) if first is None
             else jnp.broadcast_to(local >= first, (d, size)).reshape(-1))
    chunk = Chunk(rows, index, valid)
    return chunk if layout is None else layout.constrain(chunk)


def _split_at(y, axis: int, d: int):
    """``(..., d·size, ...)`` at ``axis`` -> ``(..., d, size, ...)``."""
    return y.reshape(y.shape[:axis] + (d, y.shape[axis] // d) + y.shape[axis + 1:])


def _write_rows(out, y, start, axis: int, d: int, valid=None):
    """Write a chunk's outputs ``y`` (``d · size`` rows at ``axis``) into ``out``
    (``d, n_local`` there) at row ``start`` of every block; rows not ``valid`` keep
    ``out``'s values."""
    y = _split_at(y, axis, d).astype(out.dtype)
    if valid is not None:
        old = jax.lax.dynamic_slice_in_dim(out, start, y.shape[axis + 1], axis + 1)
        keep = valid.reshape((1,) * axis + (d, -1) + (1,) * (y.ndim - axis - 2))
        y = jnp.where(keep, y, old)
    return jax.lax.dynamic_update_slice_in_dim(out, y, start, axis + 1)


def _starts(n_local: int, size: int) -> np.ndarray:
    """Chunk starts covering ``n_local`` rows ``size`` at a time, every chunk full: the
    last one overlaps the one before it (``size ≤ n_local``)."""
    return np.minimum(np.arange(-(-n_local // size)) * size, n_local - size).astype(np.int32)


def _output_zeros(spec, layout, axis):
    """Zero buffers of ``spec`` (:func:`_buffer_spec`), laid out as the dataset."""
    out = _join_zeros([None] * len(spec[1]), spec)
    return out if layout is None else layout.constrain(out, axis)


_zero_outputs = jit(_output_zeros, static_argnames=("spec", "layout", "axis"))


def _buffer_spec(shapes: PyTree, axis: int, d: int, n_local: int) -> tuple:
    """A hashable spec of output buffers for per-chunk outputs of ``shapes``
    (``jax.ShapeDtypeStruct`` leaves with the chunk's ``d · size`` rows at ``axis``): the
    same with ``(d, n_local)`` there."""
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    return tree, tuple((tuple(s.shape[:axis]) + (d, n_local) + tuple(s.shape[axis + 1:]),
                        np.dtype(s.dtype)) for s in leaves)


def _merged(out, n, layout, axis):
    """Output buffers ``(d, n_local)`` at ``axis`` as ``(n,)`` there."""
    out = jax.tree_util.tree_map(
        lambda o: o.reshape(o.shape[:axis] + (n,) + o.shape[axis + 2:]), out)
    return out if layout is None else layout.constrain(out, axis)


_merged_outputs = jit(_merged, static_argnames=("n", "layout", "axis"))


_partial_zeros = jit(_partial_start, static_argnames=("layout",))


@partial(jit, static_argnames=("step", "config", "size", "n", "layout", "partial_sums"),
         donate_argnames=("outs",))
def _scan_chunk_jit(step, config, args, carry, outs, data, start, first, size, n, layout,
                    partial_sums):
    d = _spread(layout)
    chunk = _chunk_at(_blocks(data, d, n // d, layout), start, size, layout, first)
    carry, out = _scan_one(step, config, args, carry, chunk, layout, partial_sums)
    if outs is not None:
        outs = jax.tree_util.tree_map(
            lambda o, y: _write_rows(o, y, start, 0, d, chunk.valid), outs, out)
    return carry, outs, token((carry, out))


@partial(jit, static_argnames=("n", "layout", "partial_sums"))
def _scan_end_jit(start, carry, outs, n, layout, partial_sums):
    if partial_sums:
        carry = _partial_end(start, carry)
    if outs is not None:
        outs = _merged(outs, n, layout, 0)
    return carry, outs


def token(tree) -> jax.Array:
    """One entry of ``tree``, an output of a host-driven call's program of its own
    (a chunk's, a group's, a segment's): what the host waits on before reporting the
    call (:func:`reported_calls`; the program's other outputs are donated to the next
    call's)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.size(x)]
    return jnp.zeros((1,), jnp.float32) if not leaves else jnp.ravel(leaves[0])[:1]


def _scan_outputs(step, config, args, carry, data, size, n, layout):
    """One chunk's per-example outputs of a :func:`scan` step (for their shapes)."""
    d = _spread(layout)
    chunk = _chunk_at(_blocks(data, d, n // d, layout), 0, size, layout, 0)
    return _scan_one(step, config, args, carry, chunk, layout, False)[1]


def _fill_outputs(fn, config, args, data, size, n, layout):
    """One chunk's outputs of a :func:`per_example` function (for their shapes)."""
    d = _spread(layout)
    return _fill_step(fn, config, args,
                      _chunk_at(_blocks(data, d, n // d, layout), 0, size, layout))


# A chunk's step as a jitted function of its own, called while tracing only: jit keeps
# its trace by signature, so ``_fill_jit`` traces the step once for the outputs' shapes
# and reuses it for the scan's body (the user's function was traced twice; on dattri's
# LR, 5,000 examples, Grad-Dot's warm first call found its fill program in 0.087 s
# instead of 0.099 s, medians of 5 alternated processes).
@partial(jax.jit, static_argnums=(0, 1))
def _fill_step(fn, config, args, chunk):
    return fn(config, args, chunk)


# their shapes by ``.eval_shape``, which jit traces once per signature: a stage called
# again does not trace its step again for them (on a 7,850-parameter LR in 40 chunks,
# tracing them on every call took 90 ms of TRAK's 0.59 s call)
_scan_outputs_jit = jit(_scan_outputs, static_argnames=("step", "config", "size", "n",
                                                        "layout"))
_fill_outputs_jit = jit(_fill_outputs, static_argnames=("fn", "config", "size", "n",
                                                        "layout"))


def _on_device(data: PyTree) -> PyTree:
    """Host leaves of ``data`` placed on the device once: a program called per chunk
    would otherwise copy the whole dataset in at every call (TRAK on 40,000 × 784
    numpy inputs in 40 chunks: 2.23-2.26 s a cache, against 0.82-0.88 s placed once)."""
    return jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), data)


def reported_chunks(stage, run, starts, per_chunk: int, n: int) -> None:
    """Run ``run(k, start) -> token`` for every chunk start, reporting to ``stage`` as
    each chunk is done (:func:`reported_calls`)."""
    reported_calls(stage, ((partial(run, k, at), min(n, (k + 1) * per_chunk))
                           for k, at in enumerate(starts)))


def reported_calls(stage, calls) -> None:
    """Run ``call() -> token`` for every ``(call, done)`` of ``calls``, reporting
    ``done`` to ``stage`` once the call's token is ready: the next call is dispatched
    before the host waits on the last one's token, so the device does not wait for the
    host between calls."""
    waiting = None
    for call, done in calls:
        token = call()
        if waiting is not None:
            jax.block_until_ready(waiting[0])
            stage.update(waiting[1])
        waiting = token, done
    if waiting is not None:
        jax.block_until_ready(waiting[0])
        stage.update(waiting[1])


def _scan_reported(stage, step, config, args, carry, data, size, layout, sums):
    """:func:`scan` over an in-memory set, one chunk program at a time, each chunk
    reported to ``stage``; ``carry`` concrete, ``size`` ≤ the rows per device."""
    n = num_examples(data)
    d = _spread(layout)
    n_local = n // d
    partial_sums = bool(sums) and layout is not None
    data = _on_device(data)
    shapes = _scan_outputs_jit.eval_shape(step, config, args, carry, data, size=size, n=n,
                                          layout=layout)
    state = {"outs": None if shapes is None else
             _zero_outputs(_buffer_spec(shapes, 0, d, n_local), layout, 0),
             "carry": _partial_zeros(carry, layout) if partial_sums else carry}

    def run(k, at):
        state["carry"], state["outs"], token = _scan_chunk_jit(
            step, config, args, state["carry"], state["outs"], data, at, np.int32(k * size),
            size=size, n=n, layout=layout, partial_sums=partial_sums)
        return token

    reported_chunks(stage, run, _starts(n_local, size), size * d, n)
    return _scan_end_jit(carry, state["carry"], state["outs"], n, layout, partial_sums)


def scan(step: Callable, config: Any, args: PyTree, carry: PyTree, data: Any,
         size: int, *, sums: bool = False) -> tuple:
    """Run ``step(config, args, carry, chunk) -> (carry, out)`` over every chunk of
    ``data`` (a pytree in memory, or a :class:`Stream`).

    ``out`` is a pytree of per-example arrays with leading axis ``size``; they come
    back concatenated over the dataset and trimmed to n (``None`` leaves nothing).
    Returns ``(carry, outs, n)``. Inside :class:`progress` every chunk is reported.
    ``sums=True`` declares that the step only adds to its carry (``carry + f(chunk)``,
    f a sum over the chunk's examples): on a sharded dataset each device then keeps a
    partial sum, reduced once at the end instead of at every step.
    Inside :func:`jattri.resumable` the stage is written to disk as it runs.
    ``carry`` leaves given as ``jax.ShapeDtypeStruct`` start as zeros made inside the
    compiled program (no eager ``jnp.zeros``, a compilation per shape on first use).
    """
    from jattri import _resume
    leaves, zeros = _split_zeros(carry)
    if zeros is not None and (_resume.active() or is_stream(data)):
        carry, zeros = _zeros_jit(leaves, zeros), None  # one program for every zero
    if _resume.active():
        return _resume.scan(step, config, args, carry, data, int(size))
    with _stage(step, num_examples(data), args, carry, data) as stage:
        if not is_stream(data):
            layout = layout_of(data)
            size = int(size) if layout is None else min(
                int(size), num_examples(data) // layout.devices)
            n = num_examples(data)
            if stage is not None and n // _spread(layout) > size:
                if zeros is not None:
                    carry, zeros = _zeros_jit(leaves, zeros), None
                carry, outs = _scan_reported(stage, step, config, args, carry, data, size,
                                             layout, sums)
                return carry, outs, n
            carry, outs = _scan_jit(step, config, args, carry if zeros is None else leaves,
                                    data, size, layout=layout,
                                    sums=bool(sums) and layout is not None, zeros=zeros)
            if stage is not None:  # one chunk: reported when it is done
                jax.block_until_ready((carry, outs))
                stage.update(n)
            return carry, outs, n
        outs, n = [], 0
        layout = as_stream(data).layout
        for chunk, count in stream_chunks(as_stream(data), size * _spread(layout)):
            carry, out = _step_jit(step, config, args, carry, _placed(chunk, layout))
            outs.append(jax.tree_util.tree_map(lambda y, c=count: y[:c], out))
            n += count
            if stage is not None:
                jax.block_until_ready(carry)
                stage.update(n)
        outs = jax.tree_util.tree_map(lambda *ys: jnp.concatenate(ys), *outs) if outs else None
        return carry, outs, n


def num_examples(data: Any) -> Optional[int]:
    """n of an in-memory dataset; ``None`` for a stream (unknown until read)."""
    return None if is_stream(data) else _checks.num_examples(data)


# ----------------------------------------------------------------------------- scores

class TopK(NamedTuple):
    """The ``k`` highest-scoring training examples per test example, best first:
    ``indices`` ``(n_test, k)`` int32 training positions, ``scores`` ``(n_test, k)``.
    With ``lowest=True``, ``lowest_indices`` / ``lowest_scores`` hold the k lowest
    (most harmful first); else ``None``."""

    indices: jax.Array
    scores: jax.Array
    lowest_indices: Optional[jax.Array] = None
    lowest_scores: Optional[jax.Array] = None


def check_top_k(top_k: Any) -> Optional[int]:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive int or None, got {top_k!r}")
    return int(top_k)


def _merge(best, tile, index, valid, k, sign):
    """Running top-k ``(scores (t, k), indices (t, k))`` merged with a tile
    ``(size, t)`` of scores of training rows ``index`` (``sign`` -1 for the lowest)."""
    scores, indices = best
    fill = jnp.asarray(-jnp.inf, tile.dtype)
    s = jnp.where(valid[:, None], sign * tile, fill).T  # (t, size)
    all_s = jnp.concatenate([scores, s], axis=1)
    all_i = jnp.concatenate([indices, jnp.broadcast_to(index, s.shape)], axis=1)
    top, pos = jax.lax.top_k(all_s, k)
    return top, jnp.take_along_axis(all_i, pos, axis=1)


def _score_step(config, args, carry, chunk):
    tile_fn, tile_config, k, lowest = config
    tile = tile_fn(tile_config, args, chunk)  # (size, n_test)
    if k is None:
        return carry, tile
    top = _merge(carry[0], tile, chunk.index, chunk.valid, k, 1.0)
    bottom = _merge(carry[1], tile, chunk.index, chunk.valid, k, -1.0) if lowest else None
    return (top, bottom), None


def score(tile_fn: Callable, tile_config: Any, args: PyTree, rows: Any, size: int,
          n_test: int, dtype, *, top_k: Optional[int] = None, lowest: bool = False):
    """Scores of every training row against every test example, tile by tile.

    ``tile_fn(tile_config, args, chunk) -> (size, n_test)`` scores one chunk of
    ``rows`` (stored per-example training arrays, or training data whose gradients the
    tile recomputes). Dense: the ``(n_train, n_test)`` matrix. ``top_k=K``: a
    :class:`TopK`, merged tile by tile, so memory is ``O((K + size) · n_test)`` and
    never the dense matrix.
    """
    k = check_top_k(top_k)
    _checks.flag(lowest, "lowest")
    if k is None:
        _, dense, _ = scan(_score_step, (tile_fn, tile_config, None, False), args, None,
                           rows, size)
        return dense
    n = num_examples(rows)
    if n is not None and k > n:
        raise ValueError(f"`top_k`={k} exceeds the number of training examples {n}")
    empty = (jnp.full((n_test, k), -jnp.inf, dtype), jnp.full((n_test, k), -1, jnp.int32))
    carry = (empty, empty if lowest else None)
    (top, bottom), _, n = scan(_score_step, (tile_fn, tile_config, k, bool(lowest)), args,
                               carry, rows, size)
    if k > n:
        raise ValueError(f"`top_k`={k} exceeds the number of training examples {n}")
    if bottom is None:
        return TopK(top[1], top[0])
    return TopK(top[1], top[0], bottom[1], -bottom[0])


def _self_step(config, args, carry, chunk):
    fn, fn_config = config
    return carry, fn(fn_config, args, chunk)


@partial(jit, static_argnames=("fn", "config", "size", "axis", "n", "layout"))
def _fill_jit(fn, config, args, data, starts, size, axis, n, layout=None):
    # Rows are viewed as (devices, n_local, ...) blocks (one block on one device; under
    # a sharded layout each device's own examples): a chunk takes rows start ...
    # start + size of every block, so no example leaves its device.
    d = _spread(layout)
    blocks = _blocks(data, d, n // d, layout)
    shapes = jax.eval_shape(lambda: _fill_outputs(fn, config, args, data, size, n, layout))
    # The output is created inside the program and written in place chunk by chunk:
    # no stacked (n_chunks, size, ...) copy, no trimming copy, no transpose.
    out = _output_zeros(_buffer_spec(shapes, axis, d, n // d), layout, axis)

    def body(out, start):
        new = _fill_step(fn, config, args, _chunk_at(blocks, start, size, layout))
        return jax.tree_util.tree_map(lambda o, y: _write_rows(o, y, start, axis, d),
                                      out, new), None

    out, _ = jax.lax.scan(body, out, starts)
    return _merged(out, n, layout, axis)


@partial(jit, static_argnames=("fn", "config", "size", "axis", "n", "layout"),
         donate_argnames=("out",))
def _fill_chunk_jit(fn, config, args, data, out, start, size, axis, n, layout=None):
    # _fill_jit's step, one chunk per program (inside `progress`): ``out`` is donated,
    # so the rows are written in place
    d = _spread(layout)
    new = fn(config, args, _chunk_at(_blocks(data, d, n // d, layout), start, size, layout))
    return (jax.tree_util.tree_map(lambda o, y: _write_rows(o, y, start, axis, d), out, new),
            token(new))


def _fill_reported(stage, fn, config, args, data, size, axis, n, layout):
    """:func:`per_example` over an in-memory set, one chunk program at a time, each
    chunk reported to ``stage``."""
    d = _spread(layout)
    n_local = n // d
    data = _on_device(data)
    shapes = _fill_outputs_jit.eval_shape(fn, config, args, data, size=size, n=n,
                                          layout=layout)
    state = {"out": _zero_outputs(_buffer_spec(shapes, axis, d, n_local), layout, axis)}

    def run(k, at):
        state["out"], token = _fill_chunk_jit(fn, config, args, data, state["out"], at,
                                              size=size, axis=axis, n=n, layout=layout)
        return token

    reported_chunks(stage, run, _starts(n_local, size), size * d, n)
    return _merged_outputs(state["out"], n, layout, axis)


def per_example(fn: Callable, fn_config: Any, args: PyTree, rows: Any, size: int, *,
                axis: int = 0):
    """``fn(fn_config, args, chunk)`` over every chunk of ``rows``, its outputs
    concatenated along ``axis`` (where each output leaf has its ``size`` per-chunk
    examples; ``axis=1`` for ``(M, size, ...)`` per-member outputs).

    ``fn`` must treat examples independently. An in-memory set runs as one compiled
    scan writing into the output in place: with n ≥ ``size`` the last chunk overlaps
    the one before (every chunk full, nothing padded), else one chunk of n; so the
    output is the only copy held (a stream concatenates its chunks' outputs at the
    end: twice the output, briefly).
    """
    from jattri import _resume
    if _resume.active():
        return _resume.per_example(fn, fn_config, args, rows, int(size), axis=axis)
    with _stage(fn, num_examples(rows), args, rows) as stage:
        if is_stream(rows):
            parts, done = [], 0
            layout = as_stream(rows).layout
            for chunk, count in stream_chunks(as_stream(rows), size * _spread(layout)):
                out = _step_jit(_self_step, (fn, fn_config), args, None,
                                _placed(chunk, layout))[1]
                parts.append(jax.tree_util.tree_map(
                    lambda y, c=count: jax.lax.slice_in_dim(y, 0, c, axis=axis), out))
                done += count
                if stage is not None:
                    jax.block_until_ready(out)
                    stage.update(done)
            return jax.tree_util.tree_map(lambda *ys: jnp.concatenate(ys, axis=axis), *parts)
        n = _checks.num_examples(rows)
        layout = layout_of(rows)
        n_local = n // _spread(layout)
        size = min(int(size), n_local)
        if stage is not None and n_local > size:
            return _fill_reported(stage, fn, fn_config, args, rows, size, axis, n, layout)
        out = _fill_jit(fn, fn_config, args, rows, _starts(n_local, size), size, axis, n,
                        layout=layout)
        if stage is not None:
            jax.block_until_ready(out)
            stage.update(n)
        return out


__all__ = ["Chunk", "DEFAULT_CHUNK_BYTES", "Layout", "Progress", "Stream", "TopK", "bucket_size",
           "balanced_chunk", "bucketed", "check_chunk_size", "check_top_k",
           "default_chunk_size", "first_example",
           "is_stream", "layout_of", "leading_examples", "num_examples", "pad_examples",
           "padded_count", "per_example", "progress", "scan", "score", "shard", "stream",
           "stream_chunks"]
