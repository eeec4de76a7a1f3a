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
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jattri import _checks
from jattri.func.grads import map_examples
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class KnnShapleyState(NamedTuple):
    """train: data. features: ``(M, n, p)`` train features per member (M = 1 without a
    task). labels: ``(n,)`` integer train labels."""

    train: PyTree
    features: jax.Array
    labels: jax.Array


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


def knn_shapley(k: int, *, features_fn: Optional[Callable] = None,
                label_fn: Optional[Callable] = None, distance: Optional[Callable] = None,
                task: Optional[Task] = None, chunk_size: Optional[int] = 128) -> Attributor:
    """Exact KNN-Shapley values: scores[i, t] = Shapley value of training point i in
    the K-NN utility of test point t (see the module docstring). Model-free: no
    gradients; a Task is only used when the features come from a model.

    Args:
      k: K, the number of neighbours (≥ 1).
      features_fn: ``features_fn(params, example) -> (p,)`` features of ONE example;
        ``params`` is a member's params when ``task`` is given, else ``None``. Default:
        the flattened first field of an ``(x, y)`` example, ``ravel(example[0])``.
      label_fn: ``label_fn(example) -> int`` label of ONE example (default
        ``example[1]``).
      distance: ``distance(f_train (p,), f_test (p,)) -> scalar``, smaller = nearer
        (default squared Euclidean).
      task: optional Task whose members' params feed ``features_fn``; the values are
        averaged over members (each member defines its own neighbours).
      chunk_size: test points valued at a time (memory ``chunk_size × n_train × p``
        for the default distance); ``None``: all at once.
    Returns:
      An Attributor with ``(n_train, n_test)`` scores; ``self_attribute`` values each
      training point as its own test point (it is its own nearest neighbour).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}")
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task or None, got {type(task).__name__}")
    for name, fn in (("features_fn", features_fn), ("label_fn", label_fn),
                     ("distance", distance)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    features_fn = features_fn or (lambda params, z: jnp.ravel(z[0]))
    label_fn = label_fn or (lambda z: z[1])
    distance = distance or squared_euclidean
    params = [None] if task is None else [m.params for m in task.members]

    @jax.jit
    def featurize(p, data):
        return map_examples(lambda z: jnp.ravel(features_fn(p, z)), data, None)

    def column(f_train, y_train, ft, yt):
        dist = jax.vmap(distance, (0, None))(f_train, ft)
        return knn_shapley_values(dist, y_train == yt, k)

    @jax.jit
    def value_matrix(f_train, y_train, f_test, y_test):
        one = lambda fy: column(f_train, y_train, *fy)
        return map_examples(one, (f_test, y_test), chunk_size).T  # (n_train, n_test)

    @jax.jit
    def self_values(f_train, y_train):
        one = lambda fyi: column(f_train, y_train, fyi[0], fyi[1])[fyi[2]]
        idx = jnp.arange(f_train.shape[0])
        return map_examples(one, (f_train, y_train, idx), chunk_size)

    def check(data, name):
        _checks.check_data(data, name)
        z = _checks.first_example(data)
        try:
            y = jax.eval_shape(label_fn, z)
            f = jax.eval_shape(lambda z: jnp.ravel(features_fn(params[0], z)), z)
            dist = jax.eval_shape(distance, f, f)
        except Exception as err:
            raise TypeError(f"`features_fn`/`label_fn`/`distance` failed on one unbatched "
                            f"example of `{name}`: {type(err).__name__}: {err}") from err
        if y.shape != () or not jnp.issubdtype(y.dtype, jnp.integer):
            raise TypeError(f"`label_fn` must return an integer scalar, got shape {y.shape} "
                            f"dtype {y.dtype}")
        if dist.shape != ():
            raise TypeError(f"`distance` must return a scalar, got shape {dist.shape}")

    def cache(train: PyTree) -> KnnShapleyState:
        check(train, "train")
        feats = jnp.stack([featurize(p, train) for p in params])
        return KnnShapleyState(train, feats, jax.vmap(label_fn)(train))

    def attribute(state: KnnShapleyState, test: PyTree) -> jax.Array:
        check(test, "test")
        _checks.check_like(test, state.train, "test", "train")
        y_test = jax.vmap(label_fn)(test)
        total = 0.0
        for m, p in enumerate(params):
            total = total + value_matrix(state.features[m], state.labels,
                                         featurize(p, test), y_test)
        return total / len(params)

    def self_attribute(state: KnnShapleyState) -> jax.Array:
        total = 0.0
        for m in range(len(params)):
            total = total + self_values(state.features[m], state.labels)
        return total / len(params)

    return Attributor(cache, attribute, self_attribute)
