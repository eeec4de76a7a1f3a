"""Resumable stages: every stage of :mod:`jattri.engine` written to disk chunk by chunk
and resumed at its last finished chunk (see :func:`jattri.resumable`).

A stage is one call of :func:`jattri.engine.scan` or :func:`jattri.engine.per_example`.
Inside a :class:`resumable` block it runs as a Python loop over the same fixed-size
chunks as a stream (in-memory sets are sliced into them), one compiled
``engine._step_jit`` call per chunk. After each chunk its per-example outputs are
written into ``.npy`` memmaps and flushed, then the carry is saved with orbax, and only
then the chunk counter (``progress.json``) is replaced atomically: whatever is on disk
when a run dies covers every counted chunk, so a re-run continues from there and gives
the same bits as a run that never stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from functools import partial
from typing import Any, Callable, Optional

import jax
import numpy as np

from jattri import _checks, engine
from jattri._jit import jit

_BLOCKS: list = []   # the active resumable blocks, innermost last
_SUSPENDED = [0]     # > 0 while a stage traced inside a jit runs the usual way


def active() -> bool:
    """Whether stages are written to disk now (inside :func:`jattri.resumable`)."""
    return bool(_BLOCKS) and not _SUSPENDED[0]


class resumable:
    """Write every jattri stage run inside the block under ``directory``, and resume
    each at its last finished chunk when the same code runs again after an
    interruption (a killed job, a pre-empted machine)::

        with jattri.resumable("runs/trak"):
            attr = jattri.trak(loss_fn, proj_dim=2048)
            state = attr.cache(params, train)      # resumes here after a crash
            scores = attr.attribute(state, test)   # a finished stage is loaded, not rerun

    **Stages.** Each call of a stage (a pass over the data: TRAK's featurisation,
    EK-FAC's covariance then eigenvalue passes, a scoring pass, ...) gets the next
    subdirectory ``NNN-<stage name>`` in call order. Run the same code in the same
    order to resume; a method's later stages resume like its first.

    **What is stored** per stage: ``meta.json`` (what identifies the run: stage name,
    kind, chunk size, the static config field by field with functions as
    ``module.qualname`` (the loss function among them), the args' structure and for
    every array leaf its shape, dtype, SHA-256 and sum (the members' params and any
    arrays a method derives from them), the data's n, example shapes and SHA-256 (of
    the whole in-memory set; of a stream's first batch), the initial carry, the output
    layout, jattri's and jax's versions); ``progress.json`` (finished chunks and
    examples); ``carry-NNNNNN/`` (an orbax checkpoint of the carry after the last
    finished chunk: a kernel, covariance factors, a running top-k); ``out-K.npy``
    (each per-example output as a memmap, example axis first).

    **Disk use**: per stage, n · (bytes each example emits: e.g. TRAK's M·k floats of
    features) in memmaps, plus twice the carry at most while a checkpoint is replaced
    (TRAK: M·k² floats), plus a few kB of JSON. A dense scoring pass stores its
    ``(n_train, n_test)`` scores.

    **Resume rules.**

    * A stage with no ``meta.json`` starts afresh; one with ``meta.json`` must match:
      any differing field (a hyperparameter, other params, another n, chunk size,
      jattri version) raises a ``ValueError`` naming it with the saved and the current
      value. Use a new directory, or delete the stage's subdirectory to redo it.
    * An unfinished stage continues after its last counted chunk (a stream is read
      again from its start and the finished examples are skipped, not recomputed); a
      finished one returns its stored result without reading the data.
    * A truncated memmap, unreadable JSON or damaged checkpoint raises a
      ``ValueError`` naming the file; nothing else is touched. New state is written
      under a temporary name and ``os.replace``-d; existing files are never truncated.
    * The result is bit-identical to an uninterrupted resumable run (the same compiled
      step on the same chunks), and equal to rounding to the usual in-memory path.
    * A stage traced inside an enclosing ``jax.jit`` (e.g. each matrix-vector product
      of ``influence_cg``, run inside CG's loop) cannot write files: it runs the usual
      way, unrecorded, with one warning per stage name.
    * One process writes a directory at a time.
    """

    def __init__(self, directory: Any):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError("`directory` must be a path (str or os.PathLike), got "
                            f"{type(directory).__name__}")
        self.directory = os.fspath(directory)

    def __enter__(self):
        os.makedirs(self.directory, exist_ok=True)
        self.stages, self.warned = 0, set()
        _BLOCKS.append(self)
        return self

    def __exit__(self, *exc):
        _BLOCKS.remove(self)
        return False

    def _next_dir(self, name: str) -> str:
        path = os.path.join(self.directory, f"{self.stages:03d}-{name.replace(' ', '-')}")
        self.stages += 1
        return path


# ---------------------------------------------------------------------------- stages

def scan(step: Callable, config: Any, args: Any, carry: Any, data: Any, size: int) -> tuple:
    """:func:`jattri.engine.scan`, written to disk chunk by chunk: ``(carry, outs, n)``."""
    if _traced(args, carry, data):
        return _usual(engine.scan, step, step, config, args, carry, data, size)
    return _run(step, step, config, args, carry, data, size, 0)


def per_example(fn: Callable, fn_config: Any, args: Any, rows: Any, size: int, *,
                axis: int = 0):
    """:func:`jattri.engine.per_example`, written to disk chunk by chunk."""
    if _traced(args, rows):
        return _usual(engine.per_example, fn, fn, fn_config, args, rows, size, axis=axis)
    if not engine.is_stream(rows):
        size = min(int(size), _checks.num_examples(rows))
    return _run(engine._self_step, fn, (fn, fn_config), args, None, rows, size, axis)[1]


def _traced(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


def _usual(run, fn, *a, **kw):
    block = _BLOCKS[-1]
    name = engine._stage_name(fn)
    if name not in block.warned:
        block.warned.add(name)
        warnings.warn(f"jattri.resumable: stage {name!r} runs inside an enclosing jit, so "
                      "it cannot be written to disk; it runs as usual (not resumable)",
                      stacklevel=4)
    _SUSPENDED[0] += 1
    try:
        return run(*a, **kw)
    finally:
        _SUSPENDED[0] -= 1


def _run(step, named, config, args, carry, data, size, axis):
    """Run ``step`` over every chunk of ``data`` under the stage's directory; returns
    ``(carry, outs, n)`` with outs along ``axis``."""
    stream = engine.is_stream(data)
    if stream:
        data = engine.as_stream(data)
    name = engine._stage_name(named)
    stage = _Stage(_BLOCKS[-1]._next_dir(name))
    example = engine.first_example(data)  # ShapeDtypeStruct leaves
    chunk_spec = engine.Chunk(
        jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((size,) + s.shape, s.dtype),
                               example),
        jax.ShapeDtypeStruct((size,), np.int32), jax.ShapeDtypeStruct((size,), np.bool_))
    carry_spec, out_spec = jax.eval_shape(lambda a, c, x: step(config, a, c, x), args,
                                          carry, chunk_spec)
    n = None if stream else _checks.num_examples(data)
    meta = {
        "stage": name,
        "kind": "scan" if step is not engine._self_step else "per_example",
        "chunk_size": int(size),
        "axis": int(axis),
        "config": _describe(config),
        "data": {"n": n, "kind": "stream" if stream else "in memory",
                 "example": _spec(example),
                 "sha256": _data_hash(data.peek() if stream else data)},
        "args": _describe_tree(args),
        "carry": _describe_tree(carry),
        "jattri_version": _version(),
    }
    outs = _Outputs(stage.path, out_spec, axis)
    meta["layout"] = {"outputs": outs.layout, "carry": _spec(carry_spec)}
    meta["jax_version"] = jax.__version__
    progress = stage.open(meta, outs, n)

    with engine._stage(named, n, args, carry, data) as report:
        if progress["finished"]:
            n = progress["done"]
            carry = stage.load_carry(progress, carry_spec, carry)
            if report is not None:
                report.update(n)
            return carry, outs.read(n), n
        chunks, done = progress["chunks"], progress["done"]
        if chunks:
            carry = stage.load_carry(progress, carry_spec, carry)
        for i, chunk, count in _chunks(data, size, chunks, done, stage.path):
            carry, out = engine._step_jit(step, config, args, carry, chunk)
            outs.write(out, done, count, n)
            done += count
            stage.commit(i + 1, done, carry)
            if report is not None:
                report.update(done)
        outs.finish(done)
        if stream:
            meta["data"]["n"] = done
            _write_json(os.path.join(stage.path, "meta.json"), meta)
        stage.commit(stage.chunks, done, carry, finished=True)
        return carry, outs.read(done), done


def _chunks(data, size, skip, done, where):
    """``(i, Chunk, count)`` for chunks ``skip, skip + 1, ...`` (the first ``skip`` hold
    the ``done`` examples finished before): a stream's from :func:`engine.stream_chunks`
    (the skipped ones read, not computed), an in-memory set's sliced the same way
    (padded at the end, positions from the dataset)."""
    if engine.is_stream(data):
        skipped = 0
        for i, (chunk, count) in enumerate(engine.stream_chunks(data, size)):
            if i < skip:
                skipped += count
                continue
            if i == skip and skipped != done:
                break
            yield i, chunk, count
        if skipped != done:
            raise ValueError(f"jattri.resumable: {where} finished {done} examples of this "
                             f"stream, but the stream now has {skipped} in those chunks: "
                             "it is not the stream the stage began with. Use another "
                             "directory, or delete this stage's directory to redo it")
        return
    n = _checks.num_examples(data)
    for i in range(skip, -(-n // size)):
        start = i * size
        count = min(size, n - start)
        rows = jax.tree_util.tree_map(lambda x: engine._pad_rows(_rows(x, start, count), size),
                                      data)
        pos = np.arange(start, start + size, dtype=np.int32)
        valid = np.arange(size) < count
        yield i, engine.Chunk(rows, np.where(valid, pos, 0).astype(np.int32), valid), count


@partial(jit, static_argnames="count")
def _slice_jit(x, start, count):
    return jax.lax.dynamic_slice_in_dim(x, start, count)


def _rows(x, start, count):
    if isinstance(x, jax.Array):
        # one compiled slice per chunk size, not one per start position
        return _slice_jit(x, np.int32(start), count)
    return np.asarray(x)[start:start + count]


# ------------------------------------------------------------------------ on disk

class _Stage:
    """One stage's directory: its metadata, progress counter and carry checkpoints."""

    def __init__(self, path: str):
        self.path, self.chunks = path, 0
        self.current: Optional[str] = None  # the carry checkpoint progress.json names
        self._checkpointer = None

    def _bad(self, file: str, what: str) -> ValueError:
        return ValueError(
            f"jattri.resumable: {os.path.join(self.path, file)} {what}. The stage's files "
            f"are damaged; delete the directory {self.path} to redo this stage (the other "
            "stages are kept), or use another directory")

    def open(self, meta: dict, outs: "_Outputs", n: Optional[int]) -> dict:
        """Check (or create) the stage's files; the progress to resume from."""
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.exists(meta_path):
            os.makedirs(self.path, exist_ok=True)
            outs.create(n)
            _write_json(meta_path, meta)
            self.chunks = 0
            return {"chunks": 0, "done": 0, "finished": False, "carry": None}
        saved = self._read_json("meta.json")
        _compare(saved, meta, self.path)
        progress_path = os.path.join(self.path, "progress.json")
        progress = ({"chunks": 0, "done": 0, "finished": False, "carry": None}
                    if not os.path.exists(progress_path) else self._read_json("progress.json"))
        if not (isinstance(progress, dict)
                and all(isinstance(progress.get(k), int) for k in ("chunks", "done"))
                and isinstance(progress.get("finished"), bool)):
            raise self._bad("progress.json", "does not hold a chunk count")
        outs.open(progress["done"], n, self._bad)
        for entry in os.listdir(self.path):  # leftovers of a write the counter never covered
            if (entry.startswith("carry-") and entry != progress.get("carry")) \
                    or ".tmp-" in entry:
                _remove(os.path.join(self.path, entry))
        self.chunks = progress["chunks"]
        return progress

    def _read_json(self, file: str) -> Any:
        try:
            with open(os.path.join(self.path, file), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise self._bad(file, f"cannot be read as JSON ({e})") from None

    def commit(self, chunks: int, done: int, carry: Any, finished: bool = False) -> None:
        """Save the carry, then count the chunks (outputs are flushed already)."""
        old, leaves = self.current, jax.tree_util.tree_leaves(carry)
        name = f"carry-{chunks:06d}" if leaves else None
        if name is not None and name != old:
            path = os.path.join(self.path, name)
            _remove(path)
            self.checkpointer().save(os.path.abspath(path),
                                     {str(j): x for j, x in enumerate(leaves)})
        _write_json(os.path.join(self.path, "progress.json"),
                    {"chunks": chunks, "done": done, "finished": finished, "carry": name})
        if old is not None and old != name:
            _remove(os.path.join(self.path, old))
        self.chunks, self.current = chunks, name

    def checkpointer(self):
        if self._checkpointer is None:
            import orbax.checkpoint as ocp
            self._checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        return self._checkpointer

    def load_carry(self, progress: dict, spec: Any, like: Any) -> Any:
        self.current = progress.get("carry")
        leaves, treedef = jax.tree_util.tree_flatten(spec)
        if not leaves:
            return jax.tree_util.tree_unflatten(treedef, [])
        if not isinstance(self.current, str):
            raise self._bad("progress.json", "names no carry checkpoint")
        shardings = [getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
                     for x in jax.tree_util.tree_leaves(like)]
        if len(shardings) != len(leaves):
            shardings = [None] * len(leaves)
        target = {str(j): jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                  for j, (s, sh) in enumerate(zip(leaves, shardings))}
        path = os.path.join(self.path, self.current)
        try:
            got = self.checkpointer().restore(os.path.abspath(path), target)
            values = [got[str(j)] for j in range(len(leaves))]
        except Exception as e:  # orbax raises many kinds on a damaged checkpoint
            raise self._bad(self.current, f"(an orbax checkpoint) cannot be restored "
                                          f"({type(e).__name__}: {str(e)[:300]})") from None
        for v, s in zip(values, leaves):
            if v.shape != s.shape or v.dtype != s.dtype:
                raise self._bad(self.current, f"holds a {v.dtype}{list(v.shape)} leaf where "
                                              f"{s.dtype}{list(s.shape)} is recorded")
        return jax.tree_util.tree_unflatten(treedef, values)


class _Outputs:
    """The per-example outputs of a stage, one ``out-K.npy`` memmap per leaf with the
    example axis first (rows of a chunk are contiguous whatever ``axis`` is)."""

    def __init__(self, path: str, out_spec: Any, axis: int):
        self.path, self.axis = path, axis
        leaves, self.treedef = jax.tree_util.tree_flatten(out_spec)
        self.rows = [(s.shape[:axis] + s.shape[axis + 1:], np.dtype(s.dtype)) for s in leaves]
        self.files = [os.path.join(path, f"out-{k}.npy") for k in range(len(leaves))]
        self.layout = [{"file": os.path.basename(f), "row_shape": list(shape),
                        "dtype": str(dtype), "axis": axis}
                       for f, (shape, dtype) in zip(self.files, self.rows)]

    @staticmethod
    def _storage(dtype: np.dtype) -> np.dtype:
        # .npy headers know numpy's own dtypes only: bfloat16 & co are stored as raw bits.
        # numpy's own kinds by their kind, not ``isbuiltin``: a float32 read back by
        # pickle (an executable's avals) is a copy with ``isbuiltin`` 0, and its outputs
        # were stored as raw bits (seen with the program index, whole suite, warm cache)
        if dtype.kind in "biufc":
            return np.dtype(dtype.str)
        return dtype if dtype.isbuiltin else np.dtype(f"u{dtype.itemsize}")

    def create(self, n: Optional[int]) -> None:
        """New files of n rows (a stream's grow chunk by chunk from none)."""
        for f, (shape, dtype) in zip(self.files, self.rows):
            m = np.lib.format.open_memmap(f, mode="w+", dtype=self._storage(dtype),
                                          shape=(n or 0,) + shape)
            m.flush()
            del m

    def open(self, done: int, n: Optional[int], bad: Callable) -> None:
        """Check that every file holds the rows recorded (``bad(file, what)`` raises)."""
        for f, (shape, dtype) in zip(self.files, self.rows):
            name = os.path.basename(f)
            try:
                with open(f, "rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    rows_shape, _, stored = (np.lib.format.read_array_header_1_0(fh)
                                             if version == (1, 0) else
                                             np.lib.format.read_array_header_2_0(fh))
                    offset = fh.tell()
            except (OSError, ValueError) as e:
                raise bad(name, f"cannot be read as a .npy memmap ({e})") from None
            if stored != self._storage(dtype) or tuple(rows_shape[1:]) != shape:
                raise bad(name, f"holds {stored}{list(rows_shape)} where rows of "
                                f"{dtype}{list(shape)} are recorded")
            need = rows_shape[0] if n is None else n
            if rows_shape[0] != need or need < done:
                raise bad(name, f"has {rows_shape[0]} rows where {need} are recorded")
            row_bytes = int(np.prod(shape, dtype=np.int64)) * stored.itemsize
            size = os.path.getsize(f)
            if size < offset + need * row_bytes:
                raise bad(name, f"is shorter than recorded ({size} bytes, {need} rows of "
                                f"{row_bytes} bytes after a {offset}-byte header need "
                                f"{offset + need * row_bytes}): it was truncated")

    def _map(self, k: int, rows: Optional[int] = None):
        """Leaf k's memmap (grown first to ``rows`` rows, for a stream)."""
        f = self.files[k]
        if rows is not None:
            _grow_npy(f, rows)
        return np.lib.format.open_memmap(f, mode="r+")

    def write(self, out: Any, start: int, count: int, n: Optional[int]) -> None:
        for k, y in enumerate(jax.tree_util.tree_leaves(out)):
            y = np.moveaxis(np.asarray(y), self.axis, 0)[:count]
            m = self._map(k, None if n is not None else start + count)
            m[start:start + count] = y.view(m.dtype) if y.dtype != m.dtype else y
            m.flush()
            del m

    def finish(self, done: int) -> None:
        for f in self.files:
            _grow_npy(f, done, shrink=True)

    def read(self, n: int) -> Any:
        if not self.files:
            return jax.tree_util.tree_unflatten(self.treedef, [])
        values = []
        for f, (shape, dtype) in zip(self.files, self.rows):
            m = np.load(f, mmap_mode="r")[:n]
            y = np.moveaxis(m.view(dtype) if m.dtype != dtype else m, 0, self.axis)
            values.append(jax.numpy.asarray(y))
            del m
        return jax.tree_util.tree_unflatten(self.treedef, values)


def _grow_npy(path: str, rows: int, shrink: bool = False) -> None:
    """Set the rows of a ``.npy`` file in place (numpy pads its header so the first
    axis can grow without moving the data), extending the file to match (cut only
    with ``shrink``, at the end of a stream's stage: the tail past its last row)."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if shape[0] == rows or (rows < shape[0] and not shrink):
            return
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
                  "shape": (rows,) + tuple(shape[1:])}
        f.seek(0)
        write = (np.lib.format.write_array_header_1_0 if version == (1, 0)
                 else np.lib.format.write_array_header_2_0)
        write(f, header)
        if f.tell() != offset:
            raise RuntimeError(f"the .npy header of {path} changed length")  # never: padded
        f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


# ------------------------------------------------------------------ what identifies a run

def _version() -> str:
    import jattri
    return getattr(jattri, "__version__", "unknown")


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


def _describe(value: Any) -> Any:
    """A JSON description of a static config, field by field: functions by
    ``module.qualname``, partials by function and bound arguments, arrays by hash."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = value.item() if isinstance(value, np.generic) else value
        return v if isinstance(v, int) or np.isfinite(v) else repr(v)
    if isinstance(value, np.dtype):
        return str(value)
    if isinstance(value, type):
        return f"class {_name(value)}"
    if hasattr(value, "_fields") and isinstance(value, tuple):
        return {type(value).__name__: {f: _describe(getattr(value, f)) for f in value._fields}}
    if dataclasses.is_dataclass(value):
        return {type(value).__name__: {f.name: _describe(getattr(value, f.name))
                                       for f in dataclasses.fields(value)}}
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return _array(value)
    if hasattr(value, "func") and hasattr(value, "args"):  # functools / jax partial
        return {"partial": _describe(value.func), "args": _describe(list(value.args)),
                "keywords": _describe(dict(getattr(value, "keywords", None) or {}))}
    if callable(value):
        return f"function {_name(value)}"
    return f"{_name(type(value))} {_ADDRESS.sub('', repr(value))}"


def _describe_tree(tree: Any) -> dict:
    """A pytree's structure and, per leaf path, its description (arrays: shape, dtype,
    SHA-256 of the bytes and their sum; functions: ``module.qualname``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {"structure": _ADDRESS.sub("", str(treedef)),
            "leaves": {jax.tree_util.keystr(p): _describe(x) for p, x in leaves}}


def _host(x: Any) -> np.ndarray:
    """``x`` on the host; numpy's own kinds with numpy's own dtype object (a float32
    read back by pickle, as an executable's avals are, is a copy with ``isbuiltin``
    0, which :func:`_array` would describe as raw bits without the small values)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    if a.dtype.kind in "biufc" and not a.dtype.isbuiltin:
        a = a.view(np.dtype(a.dtype.str))
    return a


def _array(x: Any) -> dict:
    a = _host(x)
    bits = a.view(np.dtype(f"u{a.dtype.itemsize}")) if not a.dtype.isbuiltin else a
    with np.errstate(all="ignore"):
        total = (float(np.sum(a, dtype=np.float64))
                 if a.dtype.kind in "biuf" or not a.dtype.isbuiltin else None)
    out = {"shape": list(a.shape), "dtype": str(x.dtype),
           "sha256": hashlib.sha256(np.ascontiguousarray(bits).tobytes()).hexdigest()[:32],
           "sum": total if total is None or np.isfinite(total) else repr(total)}
    if a.size <= 4 and a.dtype.isbuiltin and a.dtype.kind in "biuf":  # a hyperparameter
        out["value"] = _describe(a.tolist())
    return out


def _spec(tree: Any) -> Any:
    return [[list(s.shape), str(s.dtype)] for s in jax.tree_util.tree_leaves(tree)]


def _data_hash(data: Any) -> str:
    h = hashlib.sha256()
    for x in jax.tree_util.tree_leaves(data):
        a = np.ascontiguousarray(_host(x))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()[:32]


def _compare(saved: Any, now: dict, where: str) -> None:
    """Refuse a stage directory written for other settings, naming the first field
    that differs (``layout`` and versions other than jattri's are derived/informative)."""
    if not isinstance(saved, dict):
        raise ValueError(f"jattri.resumable: {where}/meta.json does not hold a stage "
                         "description; delete that directory to redo the stage")
    for key in ("jattri_version", "stage", "kind", "chunk_size", "axis", "config", "data",
                "args", "carry"):
        a, b = saved.get(key), now.get(key)
        if key == "data" and isinstance(a, dict) and b.get("n") is None:
            a = {**a, "n": None}  # a stream's n is known only once it is read
        field = _differs(a, b, key)
        if field is not None:
            path, x, y = field
            raise ValueError(
                f"jattri.resumable: {where} was written for other settings: {path} differs "
                f"(saved {_short(x)}, now {_short(y)}). Use another directory for these "
                "settings, or delete this stage's directory to redo it")


_ARRAY = {"shape", "dtype", "sha256", "sum"}


def _differs(a: Any, b: Any, path: str):
    b = json.loads(json.dumps(b))  # compare as stored (tuples are lists, keys strings)
    if isinstance(a, dict) and isinstance(b, dict) and not _ARRAY <= set(a):  # arrays: whole
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return (f"{path}.{k}", a.get(k, "(absent)"), b.get(k, "(absent)"))
            d = _differs(a[k], b[k], f"{path}.{k}" if not k.startswith("[") else path + k)
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _differs(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else (path, a, b)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."
