"""Representer point selection (Yeh et al., 2018, "Representer Point Selection for
Explaining Deep Neural Networks").

The last layer is refit on the model's own features f_i by

    W* = argmin_W  (1/n) Σ_i CE(softmax(f_i W), p_i) + λ ‖W‖²

with targets p_i the one-hot training labels y_i (``targets="labels"``, the default: the
paper's Theorem 3.1 applied to the training loss) or the model's own predictions
softmax(logits_i) (``targets="predictions"``, as in the paper's reference code and
dattri); f_i gets a trailing 1 when ``bias=True``, so the bias is part of W. Its
stationarity condition 2λW* + (1/n) Σ_i f_iᵀ (softmax(f_i W*) − p_i) = 0 gives the
representer decomposition of the refit's logits,

    f_t W* = Σ_i α_i ⟨f_i, f_t⟩,   α_i = (p_i − softmax(f_i W*)) / (2λn)   (a C-vector),

With label targets α_i[y_i] = (1 − q_i[y_i]) / (2λn) > 0 grows as the refit fails to
fit example i's label, so self-attribution ranks mislabelled examples first (ROC AUC
0.984 on digits LR, 0.988 on the digits MLP, 10% flipped labels, default ``l2``); with
prediction targets α_i[y_i] has no fixed sign and the same ranking is reversed (AUC
0.01 on the LR; ``benchmarks/RESULTS.md``, "RPS defaults").

and score(i, t) = α_i[y_t] ⟨f_i, f_t⟩ is training example i's contribution to the
test example's logit of class y_t. Sign convention: positive = i raises the logit of
y_t, i.e. pushes the prediction towards y_t (helps it when y_t is the true label),
the orientation of every jattri method. Members are averaged: each member m has its
own features, refit and α (score = mean_m α_m,i[y_t,m] ⟨f_m,i, f_m,t⟩).

Stages: ``cache`` reads the training set once (forward passes: features and logits of
every member), then refits every member's last layer on the stored features;
``attribute`` featurises the test set and scores stored rows tile by tile (dense or
top-k). No gradients of the model are taken.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jattri import _checks, engine
from jattri._jit import jit
from jattri._products import transposed_copy
from jattri.func.grads import as_partial
from jattri.methods import _common
from jattri.methods._common import Attributor
from jattri.task import Members, as_members, as_task

PyTree = Any


class RPSState(NamedTuple):
    """members: the Members scored. train: the in-memory training set (a reference) or
    ``None`` if streamed. features: ``(n, M, p)`` train features (with the bias 1).
    alpha: ``(n, M, C)`` representer values. labels: ``(n, M)`` the class each
    training example explains (its label, or each member's prediction).
    weights: ``(M, p, C)`` refit last layers.
    grad_norm: ``(M,)`` norm of the refit objective's gradient at ``weights`` (how far
    from stationary, i.e. how exact the decomposition is). l2: ``(M,)`` the refit's λ
    for every member (given, or chosen by the default rule). made: its
    :class:`jattri.methods._common.Provenance` (checked by ``attribute``).

    Memory: n·M·(p + C) + M·p·C floats."""

    members: Members
    train: PyTree
    features: jax.Array
    alpha: jax.Array
    labels: jax.Array
    weights: jax.Array
    grad_norm: jax.Array
    l2: jax.Array
    made: _common.Provenance


#: L-BFGS history pairs of the refit, at most (a longer history is cut to
#: :data:`LBFGS_MEMORY_BYTES`; at least optax's default of 10). On the MNIST LR's refit
#: (784 × 10, l2 = 3e-3; optax's zoom line search, used then) 10 pairs took 190
#: iterations and 0.89 s, 80 pairs 78 iterations and 0.41-0.46 s; more pairs did not
#: reduce the iterations further. With the backtracking search, 80 pairs: 78 iterations.
LBFGS_MEMORY = 80
LBFGS_MEMORY_BYTES = 64 * 2**20
#: Halvings of the refit's step at most, per L-BFGS iteration.
REFIT_BACKTRACKING_STEPS = 40


def lbfgs_memory(num_weights: int) -> int:
    """History pairs for ``num_weights`` weights: two (num_weights,) vectors per pair,
    :data:`LBFGS_MEMORY` at most, within :data:`LBFGS_MEMORY_BYTES` of float32, and at
    least 10."""
    return int(max(10, min(LBFGS_MEMORY, LBFGS_MEMORY_BYTES // (8 * max(num_weights, 1)))))


def _compact_direction(g, pairs, sy, yy, stored, gamma):
    """−H g, H the L-BFGS inverse-Hessian approximation in compact form (Byrd, Nocedal &
    Schnabel, 1994, eq. 3.1). ``pairs`` ``(2m, P)``: the s's then the y's by circular
    slot, pair ``stored - 1`` (mod m) the newest, empty slots zero; ``sy[i, j] =
    s_iᵀy_j``, ``yy[i, j] = y_iᵀy_j`` by slot; ``gamma`` the initial scale γ; ``g``
    any shape of P elements."""
    m = sy.shape[0]
    dtype = pairs.dtype
    order = (stored + jnp.arange(m)) % m  # oldest first; empty slots before them
    used = jnp.arange(m) >= m - jnp.minimum(stored, m)
    ab = pairs @ g.reshape(-1)
    a, b = ab[:m][order], gamma * ab[m:][order]
    syo = sy[order][:, order]
    r = jnp.triu(syo) + jnp.diag(jnp.where(used, 0.0, 1.0).astype(dtype))
    r1 = jax.scipy.linalg.solve_triangular(r, a, lower=False)
    inner = jnp.diagonal(syo) * r1 + gamma * (yy[order][:, order] @ r1) - b
    top = jax.scipy.linalg.solve_triangular(r, inner, lower=False, trans="T")
    coef = jnp.zeros(2 * m, dtype).at[order].set(top).at[m + order].set(-gamma * r1)
    return -(gamma * g + (coef @ pairs).reshape(g.shape))


#: L-BFGS steps between two progress reports of a refit under ``jattri.progress``.
REFIT_REPORT_EVERY = 10


def refit_last_layer(features: jax.Array, probs: jax.Array, l2: float, *,
                     maxiter: int = 1000, tol: float = 1e-6):
    """L2-regularised soft-label refit of a softmax layer by L-BFGS (Nocedal & Wright,
    2006, "Numerical Optimization", Algorithm 7.5) with a backtracking line search.

    Minimises (1/n) Σ_i CE(softmax(f_i W), p_i) + l2 ‖W‖² (strictly convex for l2 > 0).
    The inverse-Hessian approximation is applied in its compact form (Byrd, Nocedal &
    Schnabel, 1994, "Representations of quasi-Newton matrices and their use in limited
    memory methods", eq. 3.1): two products with the stored pairs and two m × m
    triangular solves per step, instead of the two-loop recursion's 2m dependent
    vector operations: those were 40% of a refit on 5,000 × 784 MNIST-shaped features,
    whose refit is now 15-21% faster, and as fast as before on 64 features
    (``benchmarks/RESULTS.md``, "RPS's refit in compact form; explicit influence's
    factor stored upper"). The history holds
    :func:`lbfgs_memory` of the p·C weights; a pair with sᵀy ≤ 0 (only by rounding: the
    objective is strictly convex) is not stored. The first direction is −g/max(1, ‖g‖),
    later ones start from γI, γ = sᵀy/yᵀy of the newest pair. Each line search starts at
    t = min(1.5·t_previous, 1) and halves t (:data:`REFIT_BACKTRACKING_STEPS` times at
    most) until f(W + tD) ≤ f(W)(1 + 10⁻⁶) + 10⁻⁴·t·∇fᵀD, the 10⁻⁶ being float32's
    rounding of f (without it the search stalls near the optimum); a search that only
    meets non-finite values takes no step.

    Args:
      features: ``(n, p)``. probs: ``(n, C)`` target probabilities. l2: λ > 0.
      maxiter: L-BFGS iterations at most. tol: stop when ‖∇‖ ≤ tol.
    Returns:
      ``(W (p, C), ‖∇objective(W)‖)``.

    Memory: the features, 2·m·p·C floats of history (m = :func:`lbfgs_memory`), and a
    transposed copy of the features when they fit in ``engine.DEFAULT_CHUNK_BYTES``.
    """
    n, p = features.shape
    c = probs.shape[1]
    dtype = features.dtype
    m = lbfgs_memory(p * c)
    rowsum = jnp.sum(probs, axis=-1, keepdims=True)
    if features.size * features.dtype.itemsize <= engine.DEFAULT_CHUNK_BYTES:
        # the gradient's Fᵀ(softmax − P) reads a transposed copy made once: XLA would
        # otherwise transpose F inside every iteration (MNIST LR refit 0.43 -> 0.33 s)
        transposed = transposed_copy(features)
    else:
        transposed = None

    def value(w):
        """(f(W), softmax(F W)): the objective and what its gradient reuses (one exp
        per logit: recomputing the softmax for the gradient cost about 0.1 ms per
        iteration on 5,000 × 10 logits)."""
        z = features @ w
        z = z - jnp.max(z, axis=-1, keepdims=True)
        e = jnp.exp(z)
        total = jnp.sum(e, axis=-1, keepdims=True)
        logp = z - jnp.log(total)
        return -jnp.sum(probs * logp) / n + l2 * jnp.sum(w * w), e / total

    def gradient(w, q):
        r = (q * rowsum - probs) / n
        fr = transposed @ r if transposed is not None else features.T @ r
        return fr + 2.0 * l2 * w

    def search(w, f, g, d, t_prev):
        """The accepted (t, W + tD, f there, its softmax)."""
        slope = jnp.sum(g * d)

        def excess(t, f_new):
            e = f_new - (1.0 + 1e-6) * f - t * 1e-4 * slope
            return jnp.where(jnp.isnan(e), jnp.inf, jnp.maximum(e, 0.0))

        def trying(s):
            return (s[4] > 0) & (s[5] <= REFIT_BACKTRACKING_STEPS)

        def halve(s):
            t, _, _, _, _, i = s
            t = jnp.where(i > 0, 0.5 * t, t)
            w_new = w + t * d
            f_new, q = value(w_new)
            return t, w_new, f_new, q, excess(t, f_new), i + 1

        t0 = jnp.minimum(1.5 * t_prev, 1.0).astype(dtype)
        first = (t0, w, f, jnp.zeros((n, c), dtype), jnp.asarray(jnp.inf, dtype), 0)
        t, w_new, f_new, q, e, _ = jax.lax.while_loop(trying, halve, first)
        return jnp.isfinite(e), t, w_new, f_new, q

    def running(s):
        return (s[0] < maxiter) & (jnp.linalg.norm(s[3]) > tol)

    def step(s):
        k, w, f, g, t_prev, pairs, sy, yy, stored, gamma = s
        d = _compact_direction(g, pairs, sy, yy, stored, gamma)
        ok, t, w_new, f_new, q = search(w, f, g, d, t_prev)
        g_new = gradient(w_new, q)
        w_new, f_new, g_new = (jnp.where(ok, new, old) for new, old in
                               ((w_new, w), (f_new, f), (g_new, g)))
        s_, y_ = (w_new - w).reshape(-1), (g_new - g).reshape(-1)
        sty = s_ @ y_
        keep = ok & (sty > 0)
        slot = stored % m
        # a pair not kept rewrites its slot's old contents: the history is updated in
        # place, not copied by a select
        s_, y_ = jnp.where(keep, s_, pairs[slot]), jnp.where(keep, y_, pairs[m + slot])
        pairs = pairs.at[slot].set(s_).at[m + slot].set(y_)
        prods = pairs @ jnp.stack([s_, y_], axis=1)  # (2m, 2): S s, S y, Y s, Y y
        sy_new = sy.at[slot, :].set(prods[m:, 0]).at[:, slot].set(prods[:m, 1])
        yy_new = yy.at[slot, :].set(prods[m:, 1]).at[:, slot].set(prods[m:, 1])
        sy, yy = jnp.where(keep, sy_new, sy), jnp.where(keep, yy_new, yy)
        gamma = jnp.where(keep, sty / (y_ @ y_), gamma)
        engine.solved_every(REFIT_REPORT_EVERY, k + 1, g_new)  # while reporting
        return (k + 1, w_new, f_new, g_new, jnp.where(ok, t, 0.0).astype(dtype), pairs,
                sy, yy, stored + keep.astype(jnp.int32), gamma)

    w0 = jnp.zeros((p, c), dtype)
    f0, q0 = value(w0)
    g0 = gradient(w0, q0)
    gamma0 = jnp.minimum(1.0, 1.0 / jnp.linalg.norm(g0)).astype(dtype)
    init = (0, w0, f0, g0, jnp.asarray(1.0, dtype), jnp.zeros((2 * m, p * c), dtype),
            jnp.zeros((m, m), dtype), jnp.zeros((m, m), dtype), 0, gamma0)
    out = jax.lax.while_loop(running, step, init)
    engine.solved_rest(REFIT_REPORT_EVERY, out[0], out[3])
    return out[1], jnp.linalg.norm(out[3])


def representer_values(features: jax.Array, probs: jax.Array, w: jax.Array,
                       l2: float) -> jax.Array:
    """α_i = (p_i − softmax(f_i W)) / (2λn): ``(n, C)`` (see the module docstring)."""
    n = features.shape[0]
    return (probs - jax.nn.softmax(features @ w, axis=-1)) / (2.0 * l2 * n)


def _targets(y, logits, labels):
    """``(n, C)`` refit targets: the one-hot classes (``labels``) or softmax(logits)."""
    return (jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype) if labels
            else jax.nn.softmax(logits, axis=-1))


def logit_fidelity(refit_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Pearson correlation of two ``(n, C)`` logit matrices after removing each row's
    mean (softmax ignores it): Σ ẑ·l̂ / (‖ẑ‖‖l̂‖), a scalar in [−1, 1] (0 where either
    is constant)."""
    z = refit_logits - jnp.mean(refit_logits, axis=-1, keepdims=True)
    lg = logits - jnp.mean(logits, axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(z * z) * jnp.sum(lg * lg))
    return jnp.where(norm > 0, jnp.sum(z * lg) / jnp.where(norm > 0, norm, 1), 0.0)


#: The fidelity rule's search: log10 λ on FIDELITY_POINTS points a step apart around
#: FIDELITY_CENTRE, step 1 (10^-6.5 … 10^1.5), then twice more around the best so far,
#: each step 4× finer (final resolution 1/16 decade).
FIDELITY_CENTRE = -2.5
FIDELITY_POINTS = 9
FIDELITY_ROUNDS = 3


def _fidelity_refit(features, logits, targets, maxiter, tol):
    """``(λ, W, ‖∇‖)``: :func:`fidelity_l2`'s λ and the refit there."""
    dtype = features.dtype
    offsets = jnp.arange(FIDELITY_POINTS, dtype=dtype) - (FIDELITY_POINTS - 1) / 2

    def refit_at(log_l2):
        w, gnorm = refit_last_layer(features, targets, 10.0 ** log_l2, maxiter=maxiter,
                                    tol=tol)
        value = logit_fidelity(features @ w, logits)
        return jnp.where(jnp.isfinite(value), value, -jnp.inf), w, gnorm

    def round_(r, carry):
        centre = carry[0]
        grid = centre + offsets * 4.0 ** -r.astype(dtype)
        values, ws, gnorms = jax.lax.map(refit_at, grid)
        best = jnp.argmax(values)  # (the first of equals)
        return grid[best], ws[best], gnorms[best]

    p, c = features.shape[1], targets.shape[1]
    start = (jnp.asarray(FIDELITY_CENTRE, dtype), jnp.zeros((p, c), dtype),
             jnp.zeros((), dtype))
    log_l2, w, gnorm = jax.lax.fori_loop(0, FIDELITY_ROUNDS, round_, start)
    return 10.0 ** log_l2, w, gnorm


def fidelity_l2(features: jax.Array, logits: jax.Array, targets: jax.Array, *,
                maxiter: int = 1000, tol: float = 1e-6) -> jax.Array:
    """The refit's λ whose logits f W*(λ) best reproduce the model's own logits:
    argmax_λ :func:`logit_fidelity` (f W*(λ), logits), W*(λ) the refit of
    :func:`refit_last_layer` on ``targets``.

    Why: Theorem 3.1 of Yeh et al. (2018) decomposes the refit's pre-softmax outputs,
    f_t W* = Σ_i α_i ⟨f_i, f_t⟩; the decomposition explains the model only as far as
    those outputs are the model's, which the paper checks by their correlation with the
    model's outputs. Here that check chooses λ: too little and the refit fits the
    targets past the model (its logits grow where the model's stay graded), too much
    and it flattens them. Logits, not probabilities: on a confident model the softmax
    saturates and the probabilities' correlation only rewards fitting the labels.
    Uses no ground truth and no pass over the model: only the stored features and
    logits.

    Search: log10 λ on 9 points a decade apart (10^-6.5 … 10^1.5), then twice on 9
    points around the best so far, 4× finer each time (final resolution 1/16 decade):
    27 refits, one after another.

    Args:
      features: ``(n, p)``. logits: ``(n, C)`` the model's. targets: ``(n, C)`` the
        refit's target probabilities.
    Returns:
      λ, a scalar.
    """
    return _fidelity_refit(features, logits, targets, maxiter, tol)[0]


def _refit_members(features, logits, y, l2, tol, *, maxiter, labels):
    """:func:`_refit_members_jit`. Under :func:`jattri.progress` the refit is a stage of
    its own, ``"rps refit"``, counting L-BFGS steps (no total: each refit stops at its
    tolerance; the fidelity rule makes 27 refits per member), reported every
    :data:`REFIT_REPORT_EVERY` steps and at each refit's end: its own program, read to
    the end before the stage closes."""
    return engine.reported(
        "rps refit", None,
        lambda report: _refit_members_jit(features, logits, y, l2, tol, maxiter=maxiter,
                                          labels=labels, report=report),
        features, unit="L-BFGS steps")


@partial(jit, static_argnames=("maxiter", "labels", "report"), closed=True)
def _refit_members_jit(features, logits, y, l2, tol, *, maxiter, labels, report):
    """Every member's refit: features ``(n, M, p)``, logits ``(n, M, C)``, classes
    ``(n, M)``, one λ or ``None`` (each member's :func:`fidelity_l2`) -> ``(alpha (n, M,
    C), weights (M, p, C), grad_norm (M,), l2 (M,))``, one member at a time; targets
    the one-hot classes (``labels``) or the softmax of the logits."""
    with engine.reporting_solves(report):
        return _refit_members_traced(features, logits, y, l2, tol, maxiter, labels)


def _refit_members_traced(features, logits, y, l2, tol, maxiter, labels):
    def one(fly):
        f, lg, yj = fly
        probs = _targets(yj, lg, labels)
        if l2 is None:
            lam, w, gnorm = _fidelity_refit(f, lg, probs, maxiter, tol)
        else:
            lam = jnp.asarray(l2, f.dtype)
            w, gnorm = refit_last_layer(f, probs, lam, maxiter=maxiter, tol=tol)
        return representer_values(f, probs, w, lam), w, gnorm, lam

    alpha, w, gnorm, lam = jax.lax.map(one, (jnp.swapaxes(features, 0, 1),
                                             jnp.swapaxes(logits, 0, 1),
                                             jnp.swapaxes(y, 0, 1)))
    return jnp.swapaxes(alpha, 0, 1), w, gnorm, lam


# config = bias (static); args = (features_fn, logits_fn, label_fn or None, members).

def _features_logits(bias, args, chunk):
    """``(size, M, p)`` features (with the bias 1) and ``(size, M, C)`` logits."""
    features_fn, logits_fn, _, members = args

    def one(params, aux):
        del aux  # RPS sees the members' params only
        def example(z):
            f = jnp.ravel(features_fn(params, z))
            if bias:
                f = jnp.concatenate([f, jnp.ones((1,), f.dtype)])
            return f, logits_fn(params, z)
        return jax.vmap(example)(chunk.data)

    f, lg = _common.member_map(one, members)
    return jnp.swapaxes(f, 0, 1), jnp.swapaxes(lg, 0, 1)


def _classes(args, chunk, logits):
    """``(size, M)`` classes explained: ``label_fn(z)`` for every member, or (no
    ``label_fn``: ``label_fn="predicted"``) each member's prediction."""
    label_fn, members = args[2:]
    if label_fn is None:
        return jnp.argmax(logits, axis=-1)
    y = jax.vmap(label_fn)(chunk.data)
    return jnp.broadcast_to(y[:, None], (y.shape[0], members.num))


def _test_side(bias, args, chunk):
    f, lg = _features_logits(bias, args, chunk)
    return f, _classes(args, chunk, lg)


def _default_label(example):
    """The label of an ``(x, y)`` example: ``example[1]``."""
    return example[1]


def _train_side(bias, args, chunk):
    f, lg = _features_logits(bias, args, chunk)
    return f, lg, _classes(args, chunk, lg)


def _tile(config, args, chunk):
    """score[b, t] = mean_m α_b,m[y_t,m] ⟨f_b,m, f_t,m⟩ for one chunk of stored rows."""
    f_test, y_test = args  # (n_test, M, p), (n_test, M)
    f, alpha = chunk.data  # (b, M, p), (b, M, C)
    a = jnp.take_along_axis(alpha, y_test.T[None], axis=2)  # (b, M, n_test)
    return jnp.mean(a * jnp.einsum("bmp,tmp->bmt", f, f_test), axis=1)


def _label_loss(logits_fn, label, params, z, i, aux):
    """Cross-entropy of the model's logits at the example's label: the training loss
    whose stationary L2 sets the default ``l2``."""
    del i, aux
    logits = logits_fn(params, z)
    return -jax.nn.log_softmax(logits)[label(z)]


@partial(jit, once=True, closed=True)
def _self_values(alpha, labels, features):
    """``(n,)`` mean_m α_i[y_i] ‖f_i‖², in one program (not six eager ops)."""
    a = jnp.take_along_axis(alpha, labels[..., None], axis=2)[..., 0]
    return jnp.mean(a * jnp.sum(features ** 2, axis=-1), axis=1)


def rps(task: Any = None, *, features_fn: Callable, logits_fn: Callable,
        label_fn: Any = None, targets: str = "labels", l2: Optional[float] = None,
        bias: bool = False, maxiter: int = 1000, tol: float = 1e-6,
        chunk_size: Optional[int] = None) -> Attributor:
    """Representer points: score(i, t) = α_i[y_t] ⟨f_i, f_t⟩, mean over members.

    The user names the last layer by functions, not module names:

    Args:
      task: optional and unused (a Task or a loss callable may be passed first, like
        every method, but RPS needs no loss: only the members' params given to
        ``cache`` reach ``features_fn`` / ``logits_fn``).
      features_fn: ``features_fn(params, example) -> (p,)``: the input of the last
        layer for ONE example (e.g. the penultimate activations); ``params`` are one
        member's.
      logits_fn: ``logits_fn(params, example) -> (C,)``: the model's logits for ONE
        example (C classes; the refit's targets with ``targets="predictions"``).
      label_fn: ``label_fn(example) -> int``: the class of an example: the training
        label the refit fits (``targets="labels"``) and the class y_t explained on a
        test example. Default (``None``): ``example[1]``, the label of an ``(x, y)``
        example, i.e. the loss's own label. ``"predicted"``: each member's predicted
        class argmax logits.
      targets: ``"labels"`` (default) or ``"predictions"`` (module docstring).
      l2: λ > 0, the refit's L2 regularisation (α scales as 1/λ). Default ``None``:
        for every member, the λ whose refit reproduces the model's own logits best
        (:func:`fidelity_l2`: the centred correlation of f W*(λ) with ``logits_fn``'s
        outputs on the training set, the fidelity check of Yeh et al. turned into the
        choice of λ; no ground truth, no extra pass, 27 refits). ``"stationary"``: λ̂/2,
        λ̂ the stationary L2 of the whole model under the cross-entropy of
        ``logits_fn`` at the labels (``jattri.stationary_damping``'s rule, one gradient
        pass; 1e-3 where λ̂ ≤ 0 or with ``label_fn="predicted"``): the training
        objective's own penalty (λ/2)‖θ‖², λ‖W‖² in the refit's convention, right when
        the last layer is at the refit's optimum (a trained linear model) and far too
        small otherwise. On the embedded digits settings, LDS with the default /
        ``"stationary"`` / the best of a grid: LR 0.606 / 0.606 / 0.613, MLP 0.274 /
        0.174 / 0.280, CNN 0.189 / 0.181 / 0.213 (``benchmarks/RESULTS.md``). The λ
        used is ``state.l2``.
      bias: append a constant 1 feature (the last layer's bias, refit and regularised
        like the weights); off by default, as in the paper (a bias changes no score
        ranking of note: LDS within 0.01 on digits).
      maxiter, tol: L-BFGS iterations and gradient-norm tolerance of the refit.
      chunk_size: examples per compiled step of the feature extraction and scoring.

    Memory: state n·M·(p + C) + M·p·C floats (the refit holds one member's n·(p + C)
    at a time); a scoring tile ``chunk_size·M·n_test``; the test side n_test·M·p.
    """
    if isinstance(l2, str):
        if l2 != "stationary":
            raise TypeError(f"`l2` must be a real number > 0, None or 'stationary', got "
                            f"{l2!r}")
    else:
        _checks.real(l2, "l2", low=0, open_low=True, none=True)  # α divides by it
    _checks.flag(bias, "bias")
    _checks.integer(maxiter, "maxiter")
    _checks.real(tol, "tol", low=0)
    for name, fn in (("features_fn", features_fn), ("logits_fn", logits_fn)):
        if not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    if not (label_fn is None or label_fn == "predicted" or callable(label_fn)):
        raise TypeError(f"`label_fn` must be callable, None or 'predicted', got "
                        f"{label_fn!r}")
    _checks.choice(targets, "targets", ("labels", "predictions"))
    if task is not None:
        as_task(task)  # validated for uniformity; RPS does not use the loss
    chunk_size = engine.check_chunk_size(chunk_size)
    label = _default_label if label_fn is None else label_fn
    fns = (as_partial(features_fn), as_partial(logits_fn),
           None if label == "predicted" else as_partial(label))
    made = _common.hyper(features_fn=features_fn, logits_fn=logits_fn, label_fn=label,
                         targets=targets, l2=l2, bias=bias, maxiter=maxiter, tol=tol)

    passed = set()  # signatures of (params, one example) the functions passed on

    def check(members, data, name, like=None):
        if not engine.is_stream(data):
            _checks.check_data(data, name)
            if like is not None and not engine.is_stream(like):
                _checks.check_like(data, like, name, "train")
        params = _common.row_spec(members.params)
        z = engine.first_example(data)
        key = _checks.signature((params, z))
        if key in passed:  # traced once per shape: a compiled call retraces nothing
            return
        try:
            f, lg = jax.eval_shape(lambda p, z: (jnp.ravel(features_fn(p, z)),
                                                 logits_fn(p, z)), params, z)
        except Exception as err:
            raise TypeError(f"`features_fn`/`logits_fn` failed on one unbatched example of "
                            f"`{name}`: {type(err).__name__}: {err}") from err
        if lg.ndim != 1:
            raise TypeError(f"`logits_fn` must return a (C,) vector for ONE example, got "
                            f"shape {lg.shape}")
        if label != "predicted":
            try:
                y = jax.eval_shape(label, z)
            except Exception as err:
                raise TypeError(f"`label_fn` failed on one example of `{name}` (the "
                                "default reads example[1], the label of an (x, y) example;"
                                f" pass label_fn): {type(err).__name__}: {err}") from err
            if y.shape != () or not jnp.issubdtype(y.dtype, jnp.integer):
                raise TypeError(f"`label_fn` must return an integer scalar, got shape "
                                f"{y.shape} dtype {y.dtype}")
        passed.add(key)

    def size(members, data, floats=None):
        return _common.chunk_size_for(chunk_size, members, data, floats)

    def default_l2(members, train):
        """``l2="stationary"``: λ̂/2, one gradient pass of the label cross-entropy."""
        if label == "predicted":
            return 1e-3
        from jattri.methods.influence import _stationary_damping
        loss = Partial(_label_loss, fns[1], fns[2])
        return _stationary_damping(loss, members, train, size(members, train)) / 2

    def cache(members, train) -> RPSState:
        members = as_members(members)
        check(members, train, "train")
        f, lg, y = engine.per_example(_train_side, bool(bias), fns + (members,), train,
                                      size(members, train))
        lam = default_l2(members, train) if l2 == "stationary" else l2
        alpha, w, gnorm, lam = _refit_members(f, lg, y, lam, tol, maxiter=int(maxiter),
                                              labels=targets == "labels")
        return RPSState(members, _common.stored_train(train), f, alpha, y, w, gnorm, lam,
                        _common.provenance("rps", made, members, train, f.shape[0]))

    def attribute(state: RPSState, test, *, train=None, top_k=None, lowest=False):
        """``(n_train, n_test)`` scores (or a TopK); ``train`` is not needed (the
        features and α are stored) and ignored."""
        _common.check_state(state, RPSState, "rps", made, train=train)
        check(state.members, test, "test", like=state.train)
        f_test, y_test = engine.per_example(_test_side, bool(bias),
                                            fns + (state.members,), test,
                                            size(state.members, test))
        rows = (state.features, state.alpha)
        n_test = f_test.shape[0]
        floats = state.members.num * (state.features.shape[-1] + n_test)
        return engine.score(_tile, None, (f_test, y_test), rows,
                            size(state.members, rows, floats), n_test, f_test.dtype,
                            top_k=top_k, lowest=lowest)

    def self_attribute(state: RPSState, *, train=None):
        """score(i, i) = mean_m α_i[y_i] ‖f_i‖², y_i = ``label_fn(z_i)`` or each
        member's prediction (stored by ``cache``; ``train`` is not needed)."""
        _common.check_state(state, RPSState, "rps", made, train=train)
        return _self_values(state.alpha, state.labels, state.features)

    return Attributor(cache, engine.bucketed(attribute), self_attribute)
