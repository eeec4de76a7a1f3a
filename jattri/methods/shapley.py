"""Exact KNN-Shapley (Jia et al., 2019, "Efficient Task-Specific Data Valuation for
Nearest Neighbor Algorithms", Theorem 1).

For a test point t with label y_t, the utility of a training subset S is the K-NN
likelihood of the right label,

    U_t(S) = (1/K) Σ_{j ≤ min(K, |S|)} 1[y_{α_j(S)} = y_t],     U_t(∅) = 0,

where α_j(S) is the j-th nearest neighbour of t in S. With the training set sorted by
distance to t (α_1 nearest, …, α_N farthest; ties broken by training index), the
Shapley values of U_t are given exactly by the recursion

    s_{α_N} = 1[y_{α_N} = y_t] / K · min(K, N) / N      (= 1[·] / N when K ≤ N)
    s_{α_j} = s_{α_{j+1}} + (1[y_{α_j} = y_t] − 1[y_{α_{j+1}} = y_t]) / K · min(K, j) / j

computed here as a reversed cumulative sum, vmapped over test points. Positive = i
raises the K-NN probability of t's label (helps), jattri's orientation; the values of
one test point sum to U_t(all) − U_t(∅) (efficiency).

Stages: ``cache`` stores the training features (model-free, or each member's
``features_fn`` output) and labels; ``attribute`` values every training point for a
chunk of test points at a time (each test point needs its distance to every training
point), keeping the dense matrix or only each test point's top-k. With members, each
member defines its own neighbours and the values are averaged.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jattri import _checks, engine
from jattri.func.grads import as_partial
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Members, as_members

PyTree = Any


class KnnShapleyState(NamedTuple):
    """members: the Members whose params feed ``features_fn``, or ``None`` (model-free).
    train: the in-memory training set (a reference) or ``None`` if streamed.
    features: ``(n, M, p)`` train features per member (M = 1 model-free).
    labels: ``(n,)`` integer train labels. made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``).

    Memory: n·M·p floats + n ints."""

    members: Optional[Members]
    train: PyTree
    features: jax.Array
    labels: jax.Array
    made: _common.Provenance


def squared_euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
    """‖a − b‖² of two ``(p,)`` feature vectors."""
    return jnp.sum((a - b) ** 2)


def knn_shapley_values(distances: jax.Array, match: jax.Array, k: int) -> jax.Array:
    """Exact Shapley values of the K-NN utility for ONE test point.

    Args:
      distances: ``(N,)`` distance of every training point to the test point.
      match: ``(N,)`` bool, 1[y_i = y_t]. k: K ≥ 1.
    Returns:
      ``(N,)`` Shapley values in training order.
    """
    n = distances.shape[0]
    order = jnp.argsort(distances, stable=True)  # ties: lower training index first
    m = match[order].astype(jnp.result_type(float))
    j = jnp.arange(1, n, dtype=m.dtype)  # positions 1 … N−1 (1-based)
    steps = (m[:-1] - m[1:]) / k * jnp.minimum(k, j) / j
    # s_{α_j} = s_{α_N} + Σ_{l ≥ j} steps_l: a reversed cumulative sum.
    tail = jnp.cumsum(steps[::-1])[::-1]
    s_sorted = m[-1] / k * min(k, n) / n + jnp.concatenate([tail, jnp.zeros((1,), m.dtype)])
    return jnp.zeros_like(s_sorted).at[order].set(s_sorted)


def knn_utility(distances: jax.Array, match: jax.Array, subset: jax.Array, k: int) -> jax.Array:
    """U_t(S) for ONE test point and a subset mask ``subset`` ``(N,)`` bool (same tie
    rule as ``knn_shapley_values``)."""
    order = jnp.argsort(distances, stable=True)
    inside = subset[order]
    rank = jnp.cumsum(inside)  # 1-based rank among the subset's members
    return jnp.sum(inside & (rank <= k) & match[order]) / k


def _default_features(params, z):
    del params
    return jnp.ravel(z[0])


def _default_label(z):
    return z[1]


# args of the stage functions: (features_fn, label_fn, distance) as Partials, then arrays.

def _featurize(config, args, chunk):
    """``(size, M, p)`` features and ``(size,)`` labels of one chunk."""
    (features_fn, label_fn, _), members = args

    def one(params, aux=None):
        del aux
        return jax.vmap(lambda z: jnp.ravel(features_fn(params, z)))(chunk.data)

    if members is None:
        f = one(None)[:, None]
    else:
        f = jnp.swapaxes(_common.member_map(one, members), 0, 1)
    return f, jax.vmap(label_fn)(chunk.data)


def _values(k, args, f_test, y_test):
    """``(b, n_train)``: the Shapley values of every training point for b test points
    ``f_test (b, M, p)``, ``y_test (b,)``, averaged over members one at a time."""
    (_, _, distance), f_train, y_train = args
    num = f_train.shape[1]

    def member(m, total):
        ft = f_train[:, m]

        def column(fq, yq):
            dist = jax.vmap(distance, (0, None))(ft, fq)
            return knn_shapley_values(dist, y_train == yq, k)

        return total + jax.vmap(column)(f_test[:, m], y_test)

    zero = jnp.zeros((f_test.shape[0], f_train.shape[0]), jnp.result_type(float))
    return jax.lax.fori_loop(0, num, member, zero) / num


def _dense_columns(k, args, chunk):
    """``(n_train, size)``: the chunk's test examples as columns (the dense output's
    layout, written in place: no transpose of the whole matrix afterwards)."""
    f_test, y_test = chunk.data
    return _values(k, args, f_test, y_test).T


def _top_rows(config, args, chunk):
    k, top_k, lowest = config
    values = _values(k, args, *chunk.data)
    top, idx = jax.lax.top_k(values, top_k)
    if not lowest:
        return top, idx
    low, low_idx = jax.lax.top_k(-values, top_k)
    return top, idx, -low, low_idx


def _self_rows(k, args, chunk):
    f, y = chunk.data
    values = _values(k, args, f, y)
    return jnp.take_along_axis(values, chunk.index[:, None], axis=1)[:, 0]


def knn_shapley(k: int, *, features_fn: Optional[Callable] = None,
                label_fn: Optional[Callable] = None, distance: Optional[Callable] = None,
                chunk_size: Optional[int] = 128) -> Attributor:
    """Exact KNN-Shapley values: scores[i, t] = Shapley value of training point i in
    the K-NN utility of test point t (see the module docstring). No gradients; a
    model is only used when the features come from one.

    ``cache(members, train)``: ``members`` = ``None`` (model-free: ``features_fn`` gets
    ``params=None``), one params pytree or :class:`jattri.Members` (values averaged over
    members, each with its own neighbours).

    Args:
      k: K, the number of neighbours (≥ 1).
      features_fn: ``features_fn(params, example) -> (p,)`` features of ONE example;
        ``params`` is one member's params, or ``None`` model-free. Default: the
        flattened first field of an ``(x, y)`` example, ``ravel(example[0])``.
      label_fn: ``label_fn(example) -> int`` label of ONE example (default
        ``example[1]``).
      distance: ``distance(f_train (p,), f_test (p,)) -> scalar``, smaller = nearer
        (default squared Euclidean).
      chunk_size: test points valued at a time (also examples featurised at a time);
        ``None``: as many as fit 256 MiB of pairwise differences.

    Memory: state n·M·p floats. Each test point needs its distance to every training
    point: a chunk holds ``chunk_size × n_train × p`` floats (default distance) and
    ``chunk_size × n_train`` values; dense scoring returns the ``n_train × n_test``
    matrix, ``top_k=K`` keeps only ``n_test × K`` (× 2 with ``lowest``).
    ``self_attribute`` values each training point as its own test point (it is its own
    nearest neighbour).
    """
    k = _checks.integer(k, "k")
    for name, fn in (("features_fn", features_fn), ("label_fn", label_fn),
                     ("distance", distance)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    chunk_size = engine.check_chunk_size(chunk_size)
    fns = (as_partial(features_fn or _default_features), as_partial(label_fn or _default_label),
           as_partial(distance or squared_euclidean))
    made = _common.hyper(k=k, features_fn=features_fn, label_fn=label_fn, distance=distance)

    passed = set()  # signatures of (params, one example) the functions passed on

    def check(members, data, name, like=None):
        if data is None:
            raise ValueError(f"`{name}` is required here")
        if not engine.is_stream(data):
            _checks.check_data(data, name)
            if like is not None and not engine.is_stream(like):
                _checks.check_like(data, like, name, "train")
        z = engine.first_example(data)
        params = None if members is None else _common.row_spec(members.params)
        key = _checks.signature((params, z))
        if key in passed:  # traced once per shape: a second call retraces nothing
            return
        try:
            y = jax.eval_shape(fns[1], z)
            f = jax.eval_shape(lambda p, z: jnp.ravel(fns[0](p, z)), params, z)
            dist = jax.eval_shape(fns[2], f, f)
        except Exception as err:
            raise TypeError(f"`features_fn`/`label_fn`/`distance` failed on one unbatched "
                            f"example of `{name}`: {type(err).__name__}: {err}") from err
        if y.shape != () or not jnp.issubdtype(y.dtype, jnp.integer):
            raise TypeError(f"`label_fn` must return an integer scalar, got shape {y.shape} "
                            f"dtype {y.dtype}")
        if dist.shape != ():
            raise TypeError(f"`distance` must return a scalar, got shape {dist.shape}")
        passed.add(key)

    def size(data, floats):
        n = engine.num_examples(data)
        if chunk_size is not None:
            return chunk_size if n is None else max(1, min(chunk_size, n))
        return engine.default_chunk_size(4 * floats, n)

    def featurize(members, data):
        floats = 1 if members is None else _common.num_params(members)
        return engine.per_example(_featurize, None, (fns, members), data, size(data, floats))

    def cache(members, train) -> KnnShapleyState:
        members = None if members is None else as_members(members)
        check(members, train, "train")
        f, y = featurize(members, train)
        return KnnShapleyState(members, _common.stored_train(train), f, y,
                               _common.provenance("knn_shapley", made, members, train,
                                                  f.shape[0]))

    def attribute(state: KnnShapleyState, test, *, train=None, top_k=None, lowest=False):
        """``(n_train, n_test)`` values, or a TopK per test point; ``train`` is not
        needed (the features are stored) and ignored."""
        _common.check_state(state, KnnShapleyState, "knn_shapley", made, train=train)
        check(state.members, test, "test", like=state.train)
        rows = featurize(state.members, test)
        args = (fns, state.features, state.labels)
        n_train, _, p = state.features.shape
        chunk = size(rows, n_train * (p + 1))
        top_k = engine.check_top_k(top_k)
        _checks.flag(lowest, "lowest")
        if top_k is None:
            return engine.per_example(_dense_columns, k, args, rows, chunk, axis=1)
        if top_k > n_train:
            raise ValueError(f"`top_k`={top_k} exceeds the number of training examples "
                             f"{n_train}")
        out = engine.per_example(_top_rows, (k, top_k, bool(lowest)), args, rows, chunk)
        if not lowest:
            return engine.TopK(out[1], out[0])
        return engine.TopK(out[1], out[0], out[3], out[2])

    def self_attribute(state: KnnShapleyState, *, train=None):
        _common.check_state(state, KnnShapleyState, "knn_shapley", made, train=train)
        rows = (state.features, state.labels)
        n_train, _, p = state.features.shape
        return engine.per_example(_self_rows, k, (fns, state.features, state.labels), rows,
                                  size(rows, n_train * (p + 1)))

    return Attributor(cache, engine.bucketed(attribute), self_attribute)
