"""Johnson–Lindenstrauss random projections, generated from a key chunk by chunk.

Every projector here maps ``x: (n, d) -> x P: (n, k)`` and is scaled so that inner
products are preserved in expectation, ``E[<xP, yP>] = <x, y>`` (the same convention
for every projector type). Every entry ``P_rj`` is hashed from ``(r, j)`` and two words
drawn from the key (a counter-based generator, :func:`_entry_words`), so the
matrix depends on the key only: applying it in chunks of any size gives the same
result, and no dense ``d × k`` matrix is ever held whole (blocks of at most
``max(chunk_size · k, 2²³)`` entries; the sparse projector never builds even a block of
P). :func:`project_leaves` applies a projector to the pieces of x (the leaves of a
batch of per-example gradients) where they lie, never concatenated.

* ``gaussian_projection``: P_rj ~ N(0, 1/k).
* ``rademacher_projection``: P_rj = ±1/√k.
* ``sjlt_projection``: sparse JL (a count sketch): coordinate r goes to one bucket
  h(r) with sign σ(r); x P is a signed scatter-add (segment sum), O(n d) work.
* ``kronecker_projection``: P_in ⊗ P_out for a layer gradient a ⊗ s, applied as
  (a P_in) ⊗ (s P_out) without forming a ⊗ s (LoGra).
"""
from __future__ import annotations

import functools
from functools import partial
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jattri._jit import jit

DEFAULT_CHUNK = 4096
PROJECTIONS = ("gaussian", "rademacher", "sjlt")
#: ``projection="auto"`` picks the dense Gaussian up to this many entries d·k of P.
AUTO_DENSE_ENTRIES = 2**27


def resolve_projection(kind: str, d: int, k: int) -> str:
    """The projector ``"auto"`` stands for at input dim d and output dim k: the dense
    Gaussian while P has at most :data:`AUTO_DENSE_ENTRIES` (2²⁷ ≈ 134M) entries, else
    the SJLT. Why: the Gaussian regenerates all d·k entries of P in every call (about
    1 s per call at 2²⁷ on a CPU core, 28 s per example at d = 10.7M, k = 2048), the
    SJLT costs O(d) per call whatever k, with the same JL error when no coordinate
    dominates the vector (``benchmarks/jl_error.py``). Other kinds are returned as
    they are."""
    if kind != "auto":
        return kind
    return "gaussian" if int(d) * int(k) <= AUTO_DENSE_ENTRIES else "sjlt"


def _float():
    """The default float dtype now (float64 under x64), read at trace time."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


#: The product dtypes a dense projector takes besides the gradients' own (``None``).
PRODUCT_DTYPES = ("bfloat16",)


def check_product_dtype(dtype, name: str = "projection_dtype") -> Optional[str]:
    """``None`` (products in the inputs' own dtype) or the name of one of
    :data:`PRODUCT_DTYPES` (a string or the dtype itself, e.g. ``jnp.bfloat16``)."""
    if dtype is None:
        return None
    try:
        named = jnp.dtype(dtype).name
    except TypeError:
        named = None
    if named not in PRODUCT_DTYPES or isinstance(dtype, bool):
        raise ValueError(f"`{name}` must be None (the gradients' own dtype) or one of "
                         f"{PRODUCT_DTYPES}, got {dtype!r}")
    return named


def _check_sizes(d, k):
    d, k = int(d), int(k)
    if d <= 0 or k <= 0:
        raise ValueError(f"projection sizes must be positive, got d={d}, k={k}")
    return d, k


#: A piece of x of at least this many chunks meets P in a loop of its own (each loop
#: is another product for XLA to compile; a join copies its pieces).
OWN_LOOP_CHUNKS = 4
#: A piece of half a chunk or more, below :data:`OWN_LOOP_CHUNKS` chunks, meets its rows
#: of P in one product of its own when they have at most this many entries (32 MiB of
#: float32): the LR's (784 × 10) weight at k = 512.
OWN_BLOCK_ENTRIES = 2**23


def _scan_rows(block_fn: Callable, x: jax.Array, row_of: Callable, k: int, chunk: int,
               acc: Optional[jax.Array] = None, width: Optional[int] = None) -> jax.Array:
    """``acc + Σ_c block_fn(row_of(cols_c), x[:, cols_c])`` over chunks of the first
    ``width`` (default all) columns of x, column j meeting row ``row_of(j)`` of P:
    ``(n, k)``.

    ``block_fn(rows (chunk,), x_chunk (n, chunk)) -> (n, k)`` is the contribution of the
    rows ``rows`` of P; ``row_of`` maps column numbers to row numbers inside each step
    (row numbers made beforehand as an array and sliced per step made the SJLT's loops
    over a nanoGPT's leaves 1.7× slower). x is sliced where it lies, never padded or
    cut: when chunk does not divide ``width``, the last chunk is moved back to end there
    and the columns an earlier chunk took are zeroed in it.
    """
    width = x.shape[1] if width is None else width
    acc = jnp.zeros((x.shape[0], k), x.dtype) if acc is None else acc
    if width <= chunk and width == x.shape[1]:
        return acc + block_fn(row_of(jnp.arange(width)), x)
    n_chunks = -(-width // chunk)

    def step(acc, c):
        start = jnp.minimum(c * chunk, width - chunk)
        cols = start + jnp.arange(chunk)
        xc = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
        if width % chunk:
            xc = jnp.where(cols >= c * chunk, xc, jnp.zeros((), xc.dtype))
        return acc + block_fn(row_of(cols), xc), None

    return jax.lax.scan(step, acc, jnp.arange(n_chunks))[0]


def _segment_rows(segments) -> Callable:
    """``row_of`` for a block joining ``segments`` ``(first row, length)`` in order:
    column j is row j + (its segment's first row − its segment's first column), from
    two arrays of one entry per segment (a range per segment, concatenated into one
    array, cost a nanoGPT's projection 0.8 s more XLA compilation)."""
    firsts = np.array([f for f, _ in segments], np.int64)
    starts = np.concatenate([[0], np.cumsum([n for _, n in segments])[:-1]])
    shift = firsts - starts
    if len(segments) == 1:
        return lambda cols: cols + int(shift[0])
    at, steps = jnp.asarray(starts[1:], jnp.int32), jnp.asarray(np.diff(shift), jnp.int32)
    return lambda cols: cols + int(shift[0]) + jnp.sum(
        jnp.where(cols[:, None] >= at, steps, 0), axis=1, dtype=cols.dtype)


def _scan_leaves(block_fn: Callable, leaves, k: int, chunk: int) -> jax.Array:
    """``(n, k)``: the rows of P met by the concatenation of ``leaves`` (each
    ``(n, ...)``, raveled per row, in order) without forming it.

    A piece of at least :data:`OWN_LOOP_CHUNKS` chunks per row is read where it lies, in
    a loop over its whole chunks. A smaller piece of half a chunk or more, whose rows of
    P have at most :data:`OWN_BLOCK_ENTRIES` entries, meets them in one product. What
    is left (the smaller pieces, and what the loops' whole chunks leave of their
    pieces) is joined into one block that meets its rows of P by index
    (:func:`_scan_rows`). The blocks of P made at a time have at most
    ``max(chunk · k, OWN_BLOCK_ENTRIES)`` entries. On dattri's 109,386-parameter MLP,
    raveling, concatenating and padding the gradients to whole chunks took 0.65-0.69 s
    of TRAK's compiled call, 6.0 s under the profiler (``benchmarks/RESULTS.md``,
    "Projected gradients without copies").
    """
    n = leaves[0].shape[0]
    flat = [leaf.reshape(n, -1) for leaf in leaves]
    dtype = jnp.result_type(*flat)
    out = jnp.zeros((n, k), dtype)
    joined, segments, start = [], [], 0
    for x in flat:
        x, d_x = x.astype(dtype), x.shape[1]
        whole = d_x // chunk if d_x >= OWN_LOOP_CHUNKS * chunk else 0
        if not whole and 2 * d_x >= chunk and d_x * k <= OWN_BLOCK_ENTRIES:
            out = out + block_fn(start + jnp.arange(d_x), x)
        else:
            if whole:
                out = _scan_rows(block_fn, x, _segment_rows([(start, d_x)]), k, chunk,
                                 acc=out, width=whole * chunk)
            if d_x > whole * chunk:
                joined.append(x[:, whole * chunk:])
                segments.append((start + whole * chunk, d_x - whole * chunk))
        start += d_x
    if joined:
        x = joined[0] if len(joined) == 1 else jnp.concatenate(joined, axis=1)
        out = _scan_rows(block_fn, x, _segment_rows(segments), k, chunk, acc=out)
    return out


def _as_applier(project: Callable, d: int) -> Callable:
    """``apply(*bound, x)``: ``project(*bound, [x])`` for x ``(n, d)`` or one ``(d,)``
    vector, shapes checked; ``apply.leaves(*bound, pieces)`` is ``project(*bound,
    pieces)``, the same product for the pieces of x (:func:`project_leaves`), where
    ``project(*bound, pieces) -> (n, k)``."""

    def apply(*args) -> jax.Array:
        *bound, x = args
        x = jnp.asarray(x)
        if x.ndim not in (1, 2) or x.shape[-1] != d:
            raise ValueError(f"projection input must have shape (n, {d}) or ({d},), got "
                             f"shape {x.shape}")
        out = project(*bound, [jnp.atleast_2d(x)])
        return out[0] if x.ndim == 1 else out

    def leaves(*args) -> jax.Array:
        *bound, parts = args
        parts = list(parts)
        total = sum(int(np.prod(p.shape[1:], dtype=np.int64)) for p in parts)
        if not parts or total != d or len({p.shape[0] for p in parts}) != 1:
            raise ValueError(f"projection pieces must be (n, ...) arrays with one n and "
                             f"{d} entries per row in all, got shapes "
                             f"{[tuple(p.shape) for p in parts]}")
        return project(*bound, parts)

    apply.leaves = leaves
    return apply


def project_leaves(projector: Callable, leaves) -> jax.Array:
    """``(n, k)``: ``projector`` applied to the ``(n, d)`` concatenation of ``leaves``
    (arrays ``(n, ...)`` raveled per row, in order, e.g. the leaves of a batch of
    per-example gradients), without forming the concatenation when ``projector`` is
    one of this module's: each piece meets its own rows of P where it lies (1,667
    gradients of dattri's 109,386-parameter MLP, k = 512: 1.08 s against 1.37 s through
    the concatenation, ``benchmarks/projection_leaves.py``). Any other callable gets
    the concatenation."""
    leaves = list(leaves)
    own = getattr(getattr(projector, "func", None), "leaves", None)
    if own is not None:
        return own(*projector.args, leaves)
    n = leaves[0].shape[0]
    return projector(jnp.concatenate([x.reshape(n, -1) for x in leaves], axis=1))


def _chunk(d: int, chunk_size: Optional[int]) -> int:
    return d if chunk_size is None else max(1, min(int(chunk_size), d))


# Rows ``rows`` of the dense projectors' P: (len(rows), k), a function of the key and of
# each entry's (row, column) only.
_GOLDEN = 0x9E3779B9  # odd: j -> j·φ is a bijection of uint32


def seed_words(key: jax.Array) -> jax.Array:
    """``(2,)`` uint32 ``(s₀, s₁)``: the two words every projector of ``key`` hashes
    with (one threefry draw; the entries themselves need none)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def _entry_words(seed, rows, k):
    """``(len(rows), k)`` uint32: entry (r, j) is ``mix(mix(mix(r ⊕ s₀) + φ·j) ⊕ s₁)``,
    with ``seed = (s₀, s₁)`` (:func:`seed_words`), ``mix`` the MurmurHash3 finaliser
    (:func:`_mix32`) and φ = 0x9E3779B9.

    A counter-based generator: every entry is hashed from its own coordinates, a few
    integer operations each, so any block of rows is made without the rest, on any
    chunking. It replaces one threefry ``normal`` draw per row (``fold_in(key, r)``),
    which took about 4× the time per entry and 3× the compilation
    (``benchmarks/RESULTS.md``, "Counter-based projections")."""
    row = _mix32(rows.astype(jnp.uint32) ^ seed[0])
    col = jnp.arange(k, dtype=jnp.uint32) * jnp.uint32(_GOLDEN)
    return _mix32(_mix32(row[:, None] + col[None, :]) ^ seed[1])


def _gaussian_seeded(seed, rows, k, dtype=None):
    """N(0, 1/k) entries: the top 23 bits of each word give u, uniform on the 2²³
    midpoints of (−1, 1) (exact in float32, never ±1), and z = √2·erf⁻¹(u) (the inverse
    CDF, as ``jax.random.normal``; |z| < 5.3), in ``dtype`` (default: the default float
    dtype)."""
    dtype = _float() if dtype is None else dtype
    u = ((_entry_words(seed, rows, k) >> 9).astype(dtype) + 0.5) * 2.0**-22 - 1.0
    return jnp.sqrt(jnp.asarray(2.0 / k, dtype)) * jax.lax.erf_inv(u)


def seeded_normal(key: jax.Array, n: int, dtype=None) -> jax.Array:
    """``(n,)`` standard normal entries hashed from ``key``'s words (:func:`key_words`)
    and each entry's index: :func:`_gaussian_seeded` with k = 1 (traceable), a random
    vector with no threefry call site in its program."""
    return _gaussian_seeded(key_words(key), jnp.arange(n), 1, dtype)[:, 0]


def _rademacher_seeded(seed, rows, k, dtype=None):
    """±1/√k entries: the top bit of each word gives the sign (in ``dtype``, default
    the default float dtype)."""
    dtype = _float() if dtype is None else dtype
    sign = 1.0 - 2.0 * (_entry_words(seed, rows, k) >> 31).astype(dtype)
    return sign / jnp.sqrt(jnp.asarray(k, dtype))


_SEEDED_ROWS = {"gaussian": _gaussian_seeded, "rademacher": _rademacher_seeded}


# Blocks of the projectors: (seed, rows, x_chunk, k) -> contribution (n, k).
def _dense_block(make_rows, seed, rows, xc, k, dtype=None):
    """``xc @ P[rows]`` (padded rows meet x = 0). With ``dtype`` (a name of
    :data:`PRODUCT_DTYPES`) both factors are rounded to it, P's rows made in float32
    and rounded once, and the product accumulates in x's own dtype: XLA runs it as a
    bfloat16 matrix product where the hardware has one."""
    if dtype is None:
        return xc @ make_rows(seed, rows, k).astype(xc.dtype)
    low = jnp.dtype(dtype)
    return jnp.dot(xc.astype(low), make_rows(seed, rows, k, jnp.float32).astype(low),
                   preferred_element_type=xc.dtype)


def _sjlt_block(seed, rows, xc, k):
    bucket, sign = _sjlt_seeded(seed, rows, k)
    signed = xc * sign.astype(xc.dtype)
    return jax.ops.segment_sum(signed.T, bucket, num_segments=k).T


_BLOCKS = {"gaussian": partial(_dense_block, _gaussian_seeded),
           "rademacher": partial(_dense_block, _rademacher_seeded), "sjlt": _sjlt_block}


def _projected(leaves, seed, kind, k, chunk, dtype=None):
    block = _BLOCKS[kind]
    if dtype is not None:  # dense kinds only (``_dense_dtype``)
        block = partial(block, dtype=dtype)
    return _scan_leaves(lambda rows, xc: block(seed, rows, xc, k), leaves, k, chunk)


@partial(jit, static_argnames=("kind", "k", "chunk", "dtype"))
def _project(leaves, key, *, kind, k, chunk, dtype=None):
    return _projected(leaves, seed_words(key), kind, k, chunk, dtype)


@partial(jit, static_argnames=("kind", "k", "chunk", "dtype"))
def _project_seeded(leaves, seed, *, kind, k, chunk, dtype=None):
    return _projected(leaves, seed, kind, k, chunk, dtype)


def _dense_dtype(kind: str, dtype) -> Optional[str]:
    """The checked product dtype of a projector ``kind``: the SJLT does no product (a
    signed sum, in the inputs' dtype) and takes none."""
    dtype = check_product_dtype(dtype, "dtype")
    if dtype is not None and kind == "sjlt":
        raise ValueError(f"`dtype` applies to the dense projections (gaussian, rademacher); "
                         f"the SJLT sums in the inputs' own dtype, got dtype={dtype!r}")
    return dtype


@functools.lru_cache(maxsize=None)
def _seeded_applier(kind, d, k, chunk, dtype=None) -> Callable:
    """``apply(seed, x)``: one object per (kind, d, k, chunk, dtype)."""
    return _as_applier(lambda seed, xs: _project_seeded(xs, seed, kind=kind, k=k,
                                                        chunk=chunk, dtype=dtype), d)


def seeded_projection(kind: str, seed: jax.Array, d: int, k: int, *,
                      chunk_size: Optional[int] = DEFAULT_CHUNK, dtype=None) -> Callable:
    """The projector ``kind`` (one of ``PROJECTIONS``) of the seed words ``seed``
    ``(2,)`` uint32 themselves: ``random_projection(kind, key, ...)`` is
    ``seeded_projection(kind, seed_words(key), ...)``. What the Kronecker factors use,
    their seeds hashed from the key by :func:`derive_key` (no threefry)."""
    if kind not in PROJECTIONS:
        raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {kind!r}")
    d, k = _check_sizes(d, k)
    dtype = _dense_dtype(kind, dtype)
    return Partial(_seeded_applier(kind, d, k, _chunk(d, chunk_size), dtype), seed)


_WORDS_SALT = (0x243F6A88, 0x85A308D3)  # arbitrary constants (π's hexadecimal digits)


def key_words(key: jax.Array) -> jax.Array:
    """``(2,)`` uint32 words of a PRNG key: a typed key's data, or a raw uint32 key
    (``jax.random.PRNGKey``) as it is; a key of more words (another PRNG
    implementation) folded to two by hashing."""
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key).reshape(-1).astype(jnp.uint32)
    if words.shape[0] == 2:
        return words
    a, b = jnp.uint32(_WORDS_SALT[0]), jnp.uint32(_WORDS_SALT[1])
    for j in range(words.shape[0]):
        a = _mix32(a ^ words[j])
        b = _mix32(b + a)
    return jnp.stack([a, b])


def derive_key(key: jax.Array, i) -> jax.Array:
    """``(2,)`` uint32: the key of counter ``i`` (an int or an integer array) under
    ``key``, hashed from :func:`key_words` with the MurmurHash3 finaliser (no threefry:
    each threefry call site in a program costs about 0.05-0.3 s of XLA compilation, and
    the Kronecker factors derived three: their program's XLA compilation on dattri's
    MLP 0.73-0.90 s → 0.23-0.34 s).
    The result is itself a raw key (for ``derive_key``, :func:`seeded_projection`)."""
    w = key_words(key)
    c = _mix32(jnp.asarray(i).astype(jnp.uint32) * jnp.uint32(_GOLDEN)
               + jnp.uint32(_WORDS_SALT[0]))
    a = _mix32(w[0] ^ c)
    return jnp.stack([a, _mix32((w[1] ^ jnp.uint32(_WORDS_SALT[1])) + a + c)])


@functools.lru_cache(maxsize=None)
def _named_applier(kind, d, k, chunk, dtype=None) -> Callable:
    """``apply(key, x)``: one object per (kind, d, k, chunk, dtype)."""
    return _as_applier(lambda key, xs: _project(xs, key, kind=kind, k=k, chunk=chunk,
                                                dtype=dtype), d)


def _named_projection(kind, key, d, k, chunk_size, dtype=None) -> Partial:
    # A Partial with the key as its traced leaf: projectors that differ only in their
    # key share every compilation, also when passed into jitted code.
    d, k = _check_sizes(d, k)
    dtype = _dense_dtype(kind, dtype)
    return Partial(_named_applier(kind, d, k, _chunk(d, chunk_size), dtype), key)


def gaussian_projection(key: jax.Array, d: int, k: int, *,
                        chunk_size: Optional[int] = DEFAULT_CHUNK, dtype=None) -> Callable:
    """Gaussian JL projector: P_rj ~ N(0, 1/k), so ``E[<xP, yP>] = <x, y>``.

    Args:
      key: PRNG key; the same key gives the same P. d: input dim. k: output dim.
      chunk_size: rows of P generated at a time.
      dtype: ``None`` (default): the product in x's own dtype. ``"bfloat16"``: x and
        P rounded to bfloat16 (8 significant bits) and their product accumulated in x's
        dtype, which XLA runs as a bfloat16 matrix product where the hardware has one
        (GPUs, TPUs, CPUs with AVX512-BF16 or AMX; elsewhere XLA may convert and
        gain nothing: measure). The projected vectors then err by about 0.2% (relative
        norm of the difference 1.7-2.4·10⁻³ at d = 7,850, k = 512), against the JL
        error √(2/k) of the projection itself (6% at k = 512); on a 2-core Zen 4 CPU
        the LR's product (5,500 × 7,850)·(7,850 × 512) took 0.15-0.17 s against
        0.24-0.26 s (``benchmarks/bf16_product.py``).
    Returns:
      ``apply(x)`` mapping ``(n, d)`` (or ``(d,)``) to ``(n, k)`` (or ``(k,)``).
    """
    return _named_projection("gaussian", key, d, k, chunk_size, dtype)


def rademacher_projection(key: jax.Array, d: int, k: int, *,
                          chunk_size: Optional[int] = DEFAULT_CHUNK,
                          dtype=None) -> Callable:
    """Rademacher JL projector (Achlioptas, 2003): P_rj = ±1/√k with equal probability,
    so ``E[<xP, yP>] = <x, y>``. Same arguments and result as ``gaussian_projection``
    (with ``dtype="bfloat16"`` P's entries ±1/√k are rounded once, the same for all).
    """
    return _named_projection("rademacher", key, d, k, chunk_size, dtype)


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (Appleby, 2008): a bijection of uint32 whose
    output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def sjlt_hash(key: jax.Array, rows: jax.Array, k: int):
    """Bucket ``h(r) ∈ [0, k)`` and sign ``σ(r) = ±1`` of input coordinates ``rows``.

    Both come from 32 bits ``mix(mix(r ⊕ s₀) ⊕ s₁)``, with ``(s₀, s₁)`` drawn once from
    ``key`` and ``mix`` the MurmurHash3 finaliser: a few integer operations per
    coordinate, so hashing all d coordinates costs about as much as reading them
    (two threefry hashes per coordinate cost ~0.3 s a call at d = 10.7M;
    benchmarks/RESULTS.md, "Scale"). Bit 0 gives the sign, the rest the bucket (the
    modulo bias is below k / 2³¹).
    """
    return _sjlt_seeded(seed_words(key), rows, k)


def _sjlt_seeded(seed, rows, k):
    bits = _mix32(_mix32(rows.astype(jnp.uint32) ^ seed[0]) ^ seed[1])
    bucket = ((bits >> 1) % jnp.uint32(k)).astype(jnp.int32)
    sign = 1 - 2 * (bits & 1).astype(jnp.int32)
    return bucket, sign


def sjlt_projection(key: jax.Array, d: int, k: int, *,
                    chunk_size: Optional[int] = DEFAULT_CHUNK) -> Callable:
    """Sparse JL transform with one nonzero per input coordinate (a count sketch;
    Kane & Nelson, 2014, "Sparser Johnson-Lindenstrauss Transforms").

    (x P)_j = Σ_{r : h(r) = j} σ(r) x_r, computed as a segment sum (scatter-add), never
    as a matmul. Each row of P has one ±1 entry, so ``E[<xP, yP>] = <x, y>`` with no
    rescaling (the hash collisions cancel in expectation through the random signs).
    Same arguments and result as ``gaussian_projection``; ``chunk_size`` is the number
    of input coordinates hashed at a time.
    """
    return _named_projection("sjlt", key, d, k, chunk_size)


_BY_NAME = {"gaussian": gaussian_projection, "rademacher": rademacher_projection,
            "sjlt": sjlt_projection}


@partial(jit, static_argnames=("kind", "d", "k"))
def projection_matrix(key: jax.Array, *, kind: str, d: int, k: int) -> jax.Array:
    """The ``(d, k)`` matrix P of the projector ``kind`` (not ``"auto"``) keyed ``key``:
    ``x P`` equals ``random_projection(kind, key, d, k)(x)``. For small d·k only (the
    Kronecker factors of a layer); the projectors themselves never hold P."""
    if kind not in PROJECTIONS:
        raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {kind!r}")
    return seeded_matrix(seed_words(key), kind=kind, d=d, k=k)


def seeded_matrix(seed: jax.Array, *, kind: str, d: int, k: int) -> jax.Array:
    """:func:`projection_matrix` from the key's :func:`seed_words` (traceable; ``kind``
    one of ``PROJECTIONS``): many matrices of many keys can share one vectorised
    threefry draw of their seeds, which is what compiles slowly."""
    rows = jnp.arange(d)
    if kind == "sjlt":
        bucket, sign = _sjlt_seeded(seed, rows, k)
        return jax.nn.one_hot(bucket, k, dtype=_float()) * sign[:, None].astype(_float())
    return _SEEDED_ROWS[kind](seed, rows, k)


def check_projection_args(projection: str, extra: tuple = (), **dims) -> None:
    """Validate a projection name (one of ``PROJECTIONS``, ``"auto"`` or ``extra``) and
    output sizes (each a positive int or ``None``)."""
    from jattri import _checks
    _checks.choice(projection, "projection", PROJECTIONS + ("auto",) + tuple(extra))
    for name, v in dims.items():
        _checks.integer(v, name, none=True)


def check_projection_dtype(projection: str, dtype, proj_dim=None) -> Optional[str]:
    """A method's ``projection_dtype``: ``None``, or a :data:`PRODUCT_DTYPES` name where
    the method projects densely (``projection`` ``"gaussian"``, ``"rademacher"`` or
    ``"auto"``, which drops it where it picks a projection with no dense product) and
    ``proj_dim`` is set."""
    dtype = check_product_dtype(dtype)
    if dtype is not None and projection not in ("gaussian", "rademacher", "auto"):
        raise ValueError(f"`projection_dtype` applies to the dense projections ('gaussian', "
                         f"'rademacher', or 'auto' where it picks one); projection="
                         f"{projection!r} does no dense product, got projection_dtype="
                         f"{dtype!r}")
    if dtype is not None and proj_dim is None:
        raise ValueError(f"`projection_dtype` applies to a projection: it needs `proj_dim`, "
                         f"got proj_dim=None and projection_dtype={dtype!r}")
    return dtype


def random_projection(kind: str, key: jax.Array, d: int, k: int, *,
                      chunk_size: Optional[int] = DEFAULT_CHUNK, dtype=None) -> Callable:
    """The projector named ``kind`` (``"gaussian"``, ``"rademacher"``, ``"sjlt"``, or
    ``"auto"``: see :func:`resolve_projection`). ``dtype``: the dense projectors'
    product dtype (:func:`gaussian_projection`); ``"auto"`` drops it where it resolves
    to the SJLT, which does no product."""
    resolved = resolve_projection(kind, d, k)
    if resolved not in _BY_NAME:
        raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {kind!r}")
    if resolved == "sjlt":
        if kind == "auto":
            check_product_dtype(dtype, "dtype")
            dtype = None
        else:
            _dense_dtype(resolved, dtype)
        return _BY_NAME[resolved](key, d, k, chunk_size=chunk_size)
    return _BY_NAME[resolved](key, d, k, chunk_size=chunk_size, dtype=dtype)


def kronecker_projection(key: jax.Array, d_in: int, d_out: int,
                         k_in: Optional[int], k_out: Optional[int], *,
                         kind: str = "gaussian",
                         chunk_size: Optional[int] = DEFAULT_CHUNK) -> Callable:
    """Kronecker-factored projection of a dense layer's per-example gradient (LoGra;
    Choe et al., 2024, "What is Your Data Worth to GPT?").

    A dense layer y = a W (W: ``(d_in, d_out)``) has per-example gradient
    G = Σ_τ a_τ ⊗ s_τ (a: layer input, s = ∂loss/∂y; τ over positions/tokens). With
    independent projectors P_in ``(d_in, k_in)`` and P_out ``(d_out, k_out)``,

        vec(G) (P_in ⊗ P_out) = vec(Σ_τ (a_τ P_in) ⊗ (s_τ P_out))      (row-major vec)

    which is computed without ever forming G. Inner products are preserved in
    expectation since each factor preserves them. ``k_in`` / ``k_out`` = ``None`` is the
    identity on that side.

    Args:
      key: PRNG key (P_in is ``seeded_projection(kind, derive_key(key, 0), ...)``,
        P_out the same with ``derive_key(key, 1)``).
      d_in, d_out: layer input and output widths. k_in, k_out: projected widths.
      kind: projector type of both factors, see ``random_projection``.
    Returns:
      ``apply(a, s)`` for ONE example: a ``(d_in,)`` or ``(T, d_in)``, s ``(d_out,)`` or
      ``(T, d_out)`` -> ``(k_in * k_out,)`` (``d_in`` / ``d_out`` where identity).
    """
    def side(sub, d, k):
        if k is None:
            return (lambda x: x), int(d)
        return seeded_projection(resolve_projection(kind, d, int(k)), derive_key(key, sub),
                                 d, int(k), chunk_size=chunk_size), int(k)

    p_in, k_in_ = side(0, d_in, k_in)
    p_out, k_out_ = side(1, d_out, k_out)

    def apply(a: jax.Array, s: jax.Array) -> jax.Array:
        a, s = jnp.atleast_2d(a), jnp.atleast_2d(s)
        if a.shape[0] != s.shape[0]:
            raise ValueError(f"layer inputs {a.shape} and output gradients {s.shape} "
                             "disagree on the number of positions")
        return (p_in(a).T @ p_out(s)).reshape(k_in_ * k_out_)

    return apply
