"""Shared machinery of the attribution methods: the Attributor type, member reductions,
per-chunk gradients, and the generic scoring entry points over ``jattri.engine``."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattri import _checks, engine
from jattri._jit import jit, outside_any_trace
from jattri.func.projection import project_leaves
from jattri.task import Members, Task, as_members, member

PyTree = Any


class Attributor(NamedTuple):
    """A method: three pure functions over a pytree state.

    * ``cache(members, train) -> state``: the train-side work (curvature, projected
      features, factors), done once. ``members`` are :class:`jattri.Members` (or one
      params pytree); ``train`` a pytree with a leading example axis or a
      :class:`jattri.Stream` of batches.
    * ``attribute(state, test, *, train=None, top_k=None, lowest=False)``:
      ``(n_train, n_test)`` scores (larger = training example i lowers test example
      t's target more, i.e. helps it), or with ``top_k=K`` a :class:`jattri.TopK`
      computed in tiles without the dense matrix. ``train`` is needed only when the
      state references no in-memory training set (it was streamed) and the method
      recomputes training gradients at scoring time; it is ignored otherwise.
    * ``self_attribute(state, *, train=None) -> (n_train,)``: score(i, i).

    All three are jittable (for in-memory data): params and every array are traced
    arguments, never constants.
    """

    cache: Callable
    attribute: Callable
    self_attribute: Callable


def member_map(fn: Callable, members: Members, *per_member: PyTree) -> PyTree:
    """``fn(params_j, aux_j, *per_member_j)`` for every member j, stacked on a leading
    axis M; sequential over members (``lax.map``) so memory is one member's.
    ``per_member``: pytrees with a leading axis M (e.g. each member's projection key)."""
    def one(j):
        rows = jax.tree_util.tree_map(lambda x: x[j], per_member)
        return fn(*member(members, j), *rows)

    if members.num == 1:
        return jax.tree_util.tree_map(lambda x: x[None], one(0))
    return jax.lax.map(one, jnp.arange(members.num))


def each_member(fn: Callable, *xs: PyTree) -> PyTree:
    """``fn`` over the leading member axis of ``xs`` (pytrees), one member after another
    (``lax.map``), results stacked; one member without ``lax.map``, whose slicing of a
    stacked operand would copy it. Matrix factorisations of several members are made
    this way, unbatched: in jaxlib 0.10.2 on CPU, Cholesky factorisations batched over
    members in several blocks of one program deadlocked XLA's thread pool after a few
    dozen calls (LoGra; ``tests/test_logra.py::test_many_calls_with_many_members_return``)."""
    if jax.tree_util.tree_leaves(xs)[0].shape[0] == 1:
        return jax.tree_util.tree_map(
            lambda y: y[None], fn(*jax.tree_util.tree_map(lambda x: x[0], xs)))
    return jax.lax.map(lambda args: fn(*args), xs)


def spec_of(tree: PyTree) -> PyTree:
    """Every leaf's shape and dtype (``jax.ShapeDtypeStruct``); as an ``engine.scan``
    carry, zeros of those shapes made inside the compiled scan."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def scalar(x, dtype) -> jax.Array:
    """``jnp.asarray(x, dtype)``; a Python or numpy number converted on the host (an
    eager conversion is a compilation of its own on first use)."""
    if isinstance(x, (int, float, np.number, np.ndarray)):
        return jax.device_put(np.asarray(x, np.dtype(dtype)))
    return jnp.asarray(x, dtype)


def row_floats(x) -> int:
    """Elements of one row of ``x`` (``x[0].size`` without slicing: an eager slice is a
    compilation of its own on first use)."""
    return int(np.prod(np.shape(x)[1:], dtype=np.int64))


def default_key() -> jax.Array:
    """``jax.random.PRNGKey(0)``, without its eager compilation under JAX's default
    threefry implementation (where that key is the two words ``[0, 0]``)."""
    if jax.config.jax_default_prng_impl == "threefry2x32":
        return jax.device_put(np.zeros(2, np.uint32))
    return jax.random.PRNGKey(0)


def member_keys(key: jax.Array, num: int) -> jax.Array:
    """``(num,)`` keys ``fold_in(key, j)``: member j's own projection (or mask) key.

    A concrete raw key of JAX's default threefry implementation is folded in numpy
    (:func:`_threefry_fold_in`, the same words): compiling the threefry program took
    0.175 s of a cold first call of TRAK on dattri's LR."""
    words = _raw_threefry_words(key)
    if words is not None:
        return jax.device_put(_threefry_fold_in(words, np.arange(num, dtype=np.uint32)))
    return _member_keys(key, num)


@functools.partial(jit, static_argnums=1)
def _member_keys(key, num):
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num))


def _raw_threefry_words(key) -> Optional[np.ndarray]:
    """``(2,)`` uint32 words of ``key`` when it is a concrete raw key (not a typed key,
    not traced) of the default implementation, threefry2x32; else ``None``."""
    if (isinstance(key, jax.core.Tracer) or not outside_any_trace()
            or jax.config.jax_default_prng_impl != "threefry2x32"):
        return None
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        return None
    words = np.asarray(key)
    return words if words.shape == (2,) and words.dtype == np.uint32 else None


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_fold_in(key_words: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``(len(data), 2)`` uint32: ``jax.random.fold_in(key, d)`` for each d, in numpy.
    fold_in is Threefry-2x32 (Salmon et al., 2011, "Parallel random numbers: as easy as
    1, 2, 3"; 20 rounds, JAX's key schedule) of the counter pair ``(0, d)`` under the
    key's two words."""
    k0, k1 = (np.full(len(data), w, np.uint32) for w in key_words)
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = ks[0].copy(), np.asarray(data, np.uint32) + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return np.stack([x0, x1], axis=1)


def flat_grad(fn: Callable, params: PyTree, example: PyTree, index, aux) -> jax.Array:
    """``(d,)`` gradient of ``fn(params, example, index, aux)`` w.r.t. params, raveled."""
    return ravel_pytree(jax.grad(fn)(params, example, index, aux))[0]


def chunk_grads(fn: Callable, params: PyTree, aux: PyTree, chunk: engine.Chunk,
                transform: Optional[Callable] = None) -> jax.Array:
    """``(size, d)`` per-example gradients of one chunk (zero on padding rows), or
    ``(size, k)`` = ``transform(grads)``. A projector of :mod:`jattri.func.projection`
    meets the gradients leaf by leaf (:func:`~jattri.func.projection.project_leaves`):
    the raveled ``(size, d)`` copy is never made."""
    if transform is None:
        g = jax.vmap(lambda z, i: flat_grad(fn, params, z, i, aux))(chunk.data, chunk.index)
    else:
        g = jax.vmap(lambda z, i: jax.grad(fn)(params, z, i, aux))(chunk.data, chunk.index)
        g = project_leaves(transform, jax.tree_util.tree_leaves(g))
    return g * chunk.valid[:, None].astype(g.dtype)


def row_blocks(params: PyTree, mat: jax.Array, axis: int = 0) -> tuple:
    """``mat``'s blocks along ``axis`` (of length d), one per leaf of ``params`` in
    ``ravel_pytree`` order: the operand of :func:`chunk_grads_times`."""
    sizes = [int(np.prod(x.shape if hasattr(x, "shape") else np.shape(x)))
             for x in jax.tree_util.tree_leaves(params)]
    ends = np.cumsum(sizes)
    return tuple(jax.lax.slice_in_dim(mat, int(e - s), int(e), axis=axis)
                 for s, e in zip(sizes, ends))


def chunk_grads_times(fn: Callable, params: PyTree, aux: PyTree, chunk: engine.Chunk,
                      blocks: tuple) -> jax.Array:
    """``(size, k)`` per-example gradients of one chunk times a ``(d, k)`` matrix given
    as its :func:`row_blocks`, leaf by leaf (zero on padding rows): the same as
    ``chunk_grads(...) @ mat`` without forming, concatenating and copying the raveled
    ``(size, d)`` gradients (on dattri's 109,386-parameter MLP, 5,000 examples, that
    concatenation and copy took 0.4 s beside the product's 0.6 s)."""
    g = jax.vmap(lambda z, i: jax.grad(fn)(params, z, i, aux))(chunk.data, chunk.index)
    out = sum(leaf.reshape(leaf.shape[0], -1).astype(b.dtype) @ b
              for leaf, b in zip(jax.tree_util.tree_leaves(g), blocks))
    return out * chunk.valid[:, None].astype(out.dtype)


def grad_sum(fn: Callable, params: PyTree, aux: PyTree, chunk: engine.Chunk,
             weights: Optional[jax.Array] = None, *, flat: bool = True) -> Any:
    """``(d,)`` Σ_i w_i ∇fn(z_i) over the chunk's valid examples (w = 1 without
    ``weights``): one backward pass of the weighted sum, no per-example gradient.
    ``flat=False``: the gradient as a pytree like ``params`` (no concatenation)."""
    w = chunk.valid if weights is None else weights * chunk.valid

    def total(p):
        f = jax.vmap(fn, (None, 0, 0, None))(p, chunk.data, chunk.index, aux)
        return jnp.sum(jax.lax.stop_gradient(w).astype(f.dtype) * f)

    g = jax.grad(total)(params)
    return ravel_pytree(g)[0] if flat else g


def row_spec(tree: PyTree) -> PyTree:
    """Shapes and dtypes of one row (leading axis dropped): one member's params or aux."""
    return _checks.first_example(tree)


def example_spec(data: Any) -> PyTree:
    """Shapes and dtypes of one example of an in-memory dataset or a stream."""
    return spec_of(engine.first_example(data))


def num_params(members: Members) -> int:
    return int(sum(np.prod(np.shape(x)[1:], dtype=np.int64)
                   for x in jax.tree_util.tree_leaves(members.params)))


def param_dtype(members: Members):
    leaves = jax.tree_util.tree_leaves(members.params)
    return jnp.result_type(*[jnp.result_type(x) for x in leaves], jnp.float32)


#: Chunk budget multiplier for steps that project gradients: a projection call has a
#: fixed cost (the SJLT hash or the Gaussian rows of all d coordinates) that larger
#: chunks amortise (nanoGPT 10.7M, k = 2048: 27% of featurise time at 6 examples a
#: chunk, 17% at 16; benchmarks/RESULTS.md, "Scale").
PROJECTED_CHUNK_FACTOR = 4

#: On the CPU, a step that forms a chunk's ``(size, d)`` per-example gradients and
#: projects them densely at once (TRAK's and TracIn's Gaussian, Rademacher or SJLT
#: features) keeps that block within a last-level cache of this size when a block of at
#: least :data:`CACHE_BLOCK_MIN_ROWS` examples fits there, so that the product can read
#: the block from the cache (the likely reason; no cache counters were read). The
#: projection's rows are then drawn once per chunk, a cost included in the figures. On
#: dattri's 7,850-parameter LR (5,000 examples, k = 512, a 32 MiB L3) TRAK's compiled
#: call took 0.313-0.366 s in 5 chunks of 1,000 against 0.384-0.438 s in one of 5,000
#: (``benchmarks/RESULTS.md``, "Dense projections in cache-sized chunks"). Larger
#: gradients keep the memory budget's chunks: on dattri's 109,386-parameter MLP smaller
#: chunks were slower (TRAK 4.40 s in chunks of 556 against 4.01 s).
CACHE_BLOCK_BYTES = 32 * 2**20
CACHE_BLOCK_MIN_ROWS = 1024


def chunk_size_for(chunk_size: Optional[int], members: Members, data: Any = None,
                   per_example_floats: Optional[int] = None, *,
                   projected: bool = False, blocked: bool = False) -> int:
    """The user's ``chunk_size``, or :func:`jattri.engine.default_chunk_size` for
    ``per_example_floats`` (default d, one gradient) floats per example; with
    ``projected``, a :data:`PROJECTED_CHUNK_FACTOR` times larger budget; with
    ``blocked`` (a dense projection of the chunk's d-float gradients), on the CPU, at
    most :data:`CACHE_BLOCK_BYTES` of gradients where that is
    :data:`CACHE_BLOCK_MIN_ROWS` examples or more."""
    n = None if data is None else engine.num_examples(data)
    if chunk_size is not None:
        return chunk_size if n is None else max(1, min(chunk_size, n))
    d = num_params(members)
    floats = d if per_example_floats is None else per_example_floats
    if projected:
        floats = max(1, floats // PROJECTED_CHUNK_FACTOR)
    size = engine.default_chunk_size(4 * floats, n)
    rows = CACHE_BLOCK_BYTES // (4 * d)
    if blocked and CACHE_BLOCK_MIN_ROWS <= rows < size and jax.default_backend() == "cpu":
        size = engine.balanced_chunk(rows, n)
    return size


def step_chunk_size(chunk_size: Optional[int], proj_dim: Optional[int], members: Members,
                    data: Any = None, per_example_floats: Optional[int] = None,
                    dense: bool = False) -> int:
    """Examples per chunk of a TRAK or TracIn step (:func:`chunk_size_for`): a step
    given no ``per_example_floats`` forms gradients, ``projected`` when ``proj_dim`` is
    given, and ``blocked`` when it also projects them densely (``dense``: not
    Kronecker-factored)."""
    projected = per_example_floats is None and proj_dim is not None
    return chunk_size_for(chunk_size, members, data, per_example_floats,
                          projected=projected, blocked=projected and dense)


def check_fits(nbytes: int, what: str, argument: str) -> None:
    """Refuse, before allocating, an array larger than this machine's physical
    memory (a typo such as ``proj_dim=10**6`` would otherwise end in an allocator
    error deep inside XLA)."""
    total = _checks.physical_memory()
    if total is not None and nbytes > total:
        raise ValueError(f"{what} would take {nbytes / 2**30:.1f} GiB, more than this "
                         f"machine's {total / 2**30:.1f} GiB of memory: reduce `{argument}`")


def setup(task: Task, members: Any, train: Any, name: str = "train") -> Members:
    """Boundary checks of ``cache``: ``members`` validated (a bare params pytree is one
    checkpoint); ``train`` checked (in memory: every leaf, and the loss on one example;
    a stream: its first batch)."""
    members = as_members(members)
    check_data(task, members, train, name, target=False)
    return members


def check_data(task: Task, members: Members, data: Any, name: str, *, target: bool,
               like: Any = None) -> Optional[int]:
    """Validate a dataset (in memory or streamed) and the loss/target on one example."""
    if data is None:
        raise ValueError(f"`{name}` is required here")
    n = None
    if not engine.is_stream(data):
        n = _checks.check_data(data, name)
        if like is not None and not engine.is_stream(like):
            _checks.check_like(data, like, name, "train")
    if is_concrete(members):
        params, aux = _checks.first_example((members.params, members.aux))
        z = engine.first_example(data)
        fn, fname = (task.target, "target_fn") if target else (task.loss, "loss_fn")
        _checks.check_scalar_fn(
            fn, params, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
                (1,) + x.shape, x.dtype), z),
            fname, jax.ShapeDtypeStruct((), jnp.int32), aux)
    return n


def is_concrete(tree) -> bool:
    """No leaf of ``tree`` is a tracer and no trace is active: values computed from it
    can be read now (value checks run only then). Under an outer ``jax.jit`` even
    arrays closed over give traced results."""
    return outside_any_trace() and not any(isinstance(x, jax.core.Tracer)
                                           for x in jax.tree_util.tree_leaves(tree))


def stored_train(train: Any) -> Any:
    """What a state keeps of the training set: the in-memory pytree itself (a
    reference, no copy) or ``None`` for a stream."""
    return None if engine.is_stream(train) else train


def train_for(state_train: Any, train: Any) -> Any:
    """The training set a scoring call reads: the one given, else the state's."""
    if train is not None:
        return train
    if state_train is None:
        raise ValueError("`train` is required: this state was cached from a stream, and "
                         "the method recomputes training gradients at scoring time; pass "
                         "the same stream again as attribute(..., train=...)")
    return state_train


# ------------------------------------------------------------------ state provenance

@functools.partial(jax.tree_util.register_dataclass, data_fields=["members"],
                   meta_fields=["method", "hyper", "n_train"])
@dataclasses.dataclass(frozen=True)
class Provenance:
    """What made a state, carried in its ``made`` field and checked by every stage
    that takes the state. Under ``jit`` method, hyper and n_train are static (part of
    the treedef); the members' fingerprint is an array leaf, so states of different
    checkpoints share one compiled program.

    method: the factory's name. hyper: ``((name, value), ...)``, the hyperparameters
    the state depends on (keys as their integers, functions by qualified name).
    members: :func:`fingerprint` of the members at ``cache`` time, ``(5,)`` uint32.
    n_train: training examples cached (``None`` when streamed and not counted).
    """

    method: str
    hyper: tuple
    members: Any
    n_train: Optional[int]


#: Arrays of at most this many elements stand in a state's hyperparameters by their
#: values (a key, TracIn's checkpoint weights); larger ones (what a
#: ``jax.tree_util.Partial`` loss holds: a frozen backbone) by :func:`_array_digest`.
HYPER_VALUES_MAX = 256


def _array_digest(value: Any) -> tuple:
    """``("array", shape, dtype, digest)`` of a concrete array: its shape, dtype, sum and
    sum of squares, as :func:`fingerprint` reads members (one pass, in place on the
    CPU). Before 2026-12-07 such arrays stood as tuples of all their values: for a
    ``Partial`` loss holding a 784 × 16,384 float32 matrix, building the attributor
    took 1.1-1.4 s and the process peaked 0.9 GB higher
    (``benchmarks/closure_constants.py``), and every call compared the tuples again."""
    return ("array", tuple(np.shape(value)), str(value.dtype),
            hashlib.sha1(_sums([value])).hexdigest()[:16])


def _plain(value: Any) -> Any:
    """A hashable, comparable stand-in for a hyperparameter value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, functools.partial):
        return ("partial", _plain(value.func), tuple(_plain(a) for a in value.args))
    if callable(value):
        func = getattr(value, "func", value)  # jax.tree_util.Partial
        return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
    if isinstance(value, (jax.Array, np.ndarray)):
        if isinstance(value, jax.core.Tracer):
            return "<traced>"
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        if np.size(value) <= HYPER_VALUES_MAX:
            return tuple(np.asarray(value).ravel().tolist())
        return _array_digest(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return repr(value)


def hyper(task: Optional[Task] = None, **values: Any) -> tuple:
    """Hyperparameters as :attr:`Provenance.hyper` (with the task's functions)."""
    if task is not None:
        fns = task.user_fns or (task.loss, task.target)
        values = dict(values, loss_fn=fns[0], target_fn=fns[1])
    return tuple((k, _plain(v)) for k, v in sorted(values.items()))


@jit
def _leaf_sums(leaves):
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                 jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def _host_sums(leaves) -> bytes:
    """:func:`_leaf_sums` computed by numpy on CPU-held leaves (read in place, no
    copy): a compiled program of its own cost 0.03-0.08 s of XLA compilation in every
    method's first call."""
    out = []
    for x in leaves:
        flat = np.asarray(x).reshape(-1)
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        out.append((np.sum(flat, dtype=np.float64), float(np.dot(flat, flat))))
    return np.asarray(out, np.float64).tobytes()


def _sums(leaves) -> bytes:
    """Every leaf's sum and sum of squares, as bytes: by numpy where the leaves are held
    on the CPU (:func:`_host_sums`), else by :func:`_leaf_sums` on their devices."""
    return _host_sums(leaves) if _checks.on_cpu(leaves) else np.asarray(
        _leaf_sums(leaves)).tobytes()


def fingerprint(members: Optional[Members]) -> np.ndarray:
    """``(5,)`` uint32: a flag (1: values hashed, 0: traced members, structure only)
    and 128 bits of a hash of the members' tree structure, shapes, dtypes and, when
    concrete, every real leaf's sum and sum of squares (one pass over the params)."""
    if members is None:
        return np.zeros(5, np.uint32)
    leaves = jax.tree_util.tree_leaves((members.params, members.aux))
    h = hashlib.sha1(repr((members.num, jax.tree_util.tree_structure(
        (members.params, members.aux)), [(np.shape(x), str(jnp.result_type(x)))
                                          for x in leaves])).encode())
    reals = [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.integer)
             or jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    concrete = is_concrete(leaves)
    if concrete and reals:
        h.update(_sums(reals))
    return np.concatenate([np.array([int(concrete)], np.uint32),
                           np.frombuffer(h.digest()[:16], np.uint32)])


def _same_members(a, b) -> bool:
    """Fingerprints ``a``, ``b`` agree, or cannot be compared (traced)."""
    if not (is_concrete(a) and is_concrete(b)):
        return True
    a, b = np.asarray(a), np.asarray(b)
    return not (a[0] and b[0]) or bool(np.array_equal(a, b))


def provenance(method: str, hyper_: tuple, members: Optional[Members], train: Any,
               n: Optional[int] = None) -> Provenance:
    """The :class:`Provenance` of a state cached on ``members`` and ``train``."""
    if train is not None and not engine.is_stream(train):
        n = engine.num_examples(train)
    return Provenance(method, hyper_, jax.device_put(fingerprint(members)),
                      None if n is None else int(n))


def check_state(state: Any, cls: type, method: str, hyper_: tuple, *,
                train: Any = None) -> None:
    """Refuse a state this attributor did not make, naming what differs: its type, the
    method, a hyperparameter, the members (changed since ``cache``) or the training
    set's size (``train``, when given in memory)."""
    if not isinstance(state, cls):
        made = getattr(state, "made", None)
        by = f" (made by {made.method})" if isinstance(made, Provenance) else ""
        raise TypeError(f"`state` is a {type(state).__name__}{by}; {method} takes the "
                        f"{cls.__name__} of its own cache()")
    made = state.made
    if not isinstance(made, Provenance):
        raise TypeError(f"`state` carries no provenance (its `made` field is "
                        f"{type(made).__name__}); build states with {method}(...).cache")
    if made.method != method:
        raise ValueError(f"`state` was cached by {made.method}; this attributor is {method}")
    if made.hyper != hyper_:
        ours = dict(hyper_)
        for name, value in made.hyper:
            if ours.get(name, value) != value:
                raise ValueError(f"`state` was cached with {name}={value!r}; this {method} "
                                 f"has {name}={ours[name]!r}")
        raise ValueError(f"`state` was cached with hyperparameters {made.hyper}; this "
                         f"{method} has {hyper_}")
    if not _same_members(made.members, fingerprint(state.members)):
        raise ValueError("`state.members` differ from the members the state was cached "
                         "on (their fingerprints differ); cache again")
    if train is not None and made.n_train is not None and not engine.is_stream(train):
        n = engine.num_examples(train)
        if n != made.n_train:
            raise ValueError(f"`train` has {n} examples; the state was cached on "
                             f"{made.n_train}: pass the training set it was cached on")


__all__ = ["Provenance", "check_state", "fingerprint", "hyper", "provenance",
           "Attributor", "chunk_grads", "chunk_size_for", "check_data", "flat_grad",
           "each_member", "member_map", "num_params", "param_dtype", "setup", "stored_train",
           "train_for"]
