"""Representer point selection (Yeh et al., 2018, "Representer Point Selection for
Explaining Deep Neural Networks").

The last layer is refit, on the model's own features f_i and predictions, by

    W* = argmin_W  (1/n) Σ_i CE(softmax(f_i W), p_i) + λ ‖W‖²,   p_i = softmax(logits_i)

(f_i gets a trailing 1 when ``bias=True``, so the bias is part of W). Its stationarity
condition 2λW* + (1/n) Σ_i f_iᵀ (softmax(f_i W*) − p_i) = 0 gives the representer
decomposition of the refit's logits,

    f_t W* = Σ_i α_i ⟨f_i, f_t⟩,   α_i = (p_i − softmax(f_i W*)) / (2λn)   (a C-vector),

and score(i, t) = α_i[y_t] ⟨f_i, f_t⟩ is training example i's contribution to the
test example's logit of class y_t. Sign convention: positive = i raises the logit of
y_t, i.e. pushes the prediction towards y_t (helps it when y_t is the true label),
the orientation of every jattri method.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jattri import _checks
from jattri.func.grads import map_examples
from jattri.methods._common import Attributor
from jattri.task import Task

PyTree = Any


class RPSState(NamedTuple):
    """train: data. features: ``(M, n, p)`` train features (with the bias 1).
    alpha: ``(M, n, C)`` representer values. weights: ``(M, p, C)`` refit last layers.
    grad_norm: ``(M,)`` norm of the refit objective's gradient at ``weights`` (how far
    from stationary, i.e. how exact the decomposition is)."""

    train: PyTree
    features: jax.Array
    alpha: jax.Array
    weights: jax.Array
    grad_norm: jax.Array


def refit_last_layer(features: jax.Array, probs: jax.Array, l2: float, *,
                     maxiter: int = 1000, tol: float = 1e-6):
    """L2-regularised soft-label refit of a softmax layer by L-BFGS (optax).

    Minimises (1/n) Σ_i CE(softmax(f_i W), p_i) + l2 ‖W‖² (strictly convex for l2 > 0).

    Args:
      features: ``(n, p)``. probs: ``(n, C)`` target probabilities. l2: λ > 0.
      maxiter: L-BFGS iterations at most. tol: stop when ‖∇‖ ≤ tol.
    Returns:
      ``(W (p, C), ‖∇objective(W)‖)``.
    """
    n = features.shape[0]

    def objective(w):
        logp = jax.nn.log_softmax(features @ w, axis=-1)
        return -jnp.sum(probs * logp) / n + l2 * jnp.sum(w * w)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad,
                                    value_fn=objective)
        return optax.apply_updates(w, updates), state

    def running(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < maxiter) & (optax.tree_utils.tree_norm(grad) > tol))

    w0 = jnp.zeros((features.shape[1], probs.shape[1]), features.dtype)
    w, _ = jax.lax.while_loop(running, step, (w0, opt.init(w0)))
    return w, jnp.linalg.norm(jax.grad(objective)(w))


_refit = jax.jit(lambda f, p, l2, maxiter, tol: refit_last_layer(f, p, l2, maxiter=maxiter,
                                                                  tol=tol),
                 static_argnums=(3,))


def representer_values(features: jax.Array, probs: jax.Array, w: jax.Array,
                       l2: float) -> jax.Array:
    """α_i = (p_i − softmax(f_i W)) / (2λn): ``(n, C)`` (see the module docstring)."""
    n = features.shape[0]
    return (probs - jax.nn.softmax(features @ w, axis=-1)) / (2.0 * l2 * n)


def rps(task: Task, *, features_fn: Callable, logits_fn: Callable,
        label_fn: Optional[Callable] = None, l2: float = 1e-3, bias: bool = True,
        maxiter: int = 1000, tol: float = 1e-6,
        chunk_size: Optional[int] = None) -> Attributor:
    """Representer points: score(i, t) = α_i[y_t] ⟨f_i, f_t⟩, mean over members.

    The user names the last layer by functions, not module names:

    Args:
      task: the Task; only its members' params are used (the loss is not).
      features_fn: ``features_fn(params, example) -> (p,)``: the input of the last
        layer for ONE example (e.g. the penultimate activations).
      logits_fn: ``logits_fn(params, example) -> (C,)``: the model's logits for ONE
        example; their softmax is the refit's target ("the model's own predictions").
      label_fn: ``label_fn(example) -> int`` class y_t explained on a test example
        (e.g. ``lambda z: z[1]`` for the true label). ``None``: the model's predicted
        class argmax logits.
      l2: λ > 0, the refit's L2 regularisation (α scales as 1/λ).
      bias: append a constant 1 feature (the last layer's bias, refit and regularised
        like the weights).
      maxiter, tol: L-BFGS iterations and gradient-norm tolerance of the refit.
      chunk_size: examples per vectorised chunk of the feature extraction.
    Returns:
      An Attributor; its state holds α, the refit weights and the refit's final
      gradient norm.
    """
    if not l2 > 0:
        raise ValueError(f"`l2` must be > 0 (α divides by it), got {l2}")
    for name, fn in (("features_fn", features_fn), ("logits_fn", logits_fn)):
        if not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")
    if label_fn is not None and not callable(label_fn):
        raise TypeError(f"`label_fn` must be callable, got {type(label_fn).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"`task` must be a jattri.Task, got {type(task).__name__}")
    params = [m.params for m in task.members]

    def one_features(p, z):
        f = jnp.ravel(features_fn(p, z))
        return jnp.concatenate([f, jnp.ones((1,), f.dtype)]) if bias else f

    @jax.jit
    def feats_logits(p, data):
        return map_examples(lambda z: (one_features(p, z), logits_fn(p, z)), data, chunk_size)

    def check(p, data, name):
        z = _checks.first_example(data)
        try:
            f, lg = jax.eval_shape(lambda z: (jnp.ravel(features_fn(p, z)), logits_fn(p, z)), z)
        except Exception as err:
            raise TypeError(f"`features_fn`/`logits_fn` failed on one unbatched example of "
                            f"`{name}`: {type(err).__name__}: {err}") from err
        if lg.ndim != 1:
            raise TypeError(f"`logits_fn` must return a (C,) vector for ONE example, got "
                            f"shape {lg.shape}")
        if label_fn is not None:
            y = jax.eval_shape(label_fn, z)
            if y.shape != () or not jnp.issubdtype(y.dtype, jnp.integer):
                raise TypeError(f"`label_fn` must return an integer scalar, got shape "
                                f"{y.shape} dtype {y.dtype}")

    def labels(data, logits):
        if label_fn is None:
            return jnp.argmax(logits, axis=-1)
        return jax.vmap(label_fn)(data)

    def cache(train: PyTree) -> RPSState:
        _checks.check_data(train, "train")
        check(params[0], train, "train")
        feats, alphas, ws, norms = [], [], [], []
        for p in params:
            f, lg = feats_logits(p, train)
            probs = jax.nn.softmax(lg, axis=-1)
            w, gnorm = _refit(f, probs, l2, maxiter, tol)
            feats.append(f)
            alphas.append(representer_values(f, probs, w, l2))
            ws.append(w)
            norms.append(gnorm)
        return RPSState(train, jnp.stack(feats), jnp.stack(alphas), jnp.stack(ws),
                        jnp.stack(norms))

    def scores(alpha, f_train, f_test, y_test):
        return alpha[:, y_test] * (f_train @ f_test.T)  # (n, m) ⊙ (n, m)

    def attribute(state: RPSState, test: PyTree) -> jax.Array:
        _checks.check_data(test, "test")
        _checks.check_like(test, state.train, "test", "train")
        check(params[0], test, "test")
        total = 0.0
        for k, p in enumerate(params):
            f, lg = feats_logits(p, test)
            total = total + scores(state.alpha[k], state.features[k], f, labels(test, lg))
        return total / len(params)

    def self_attribute(state: RPSState) -> jax.Array:
        total = 0.0
        for k, p in enumerate(params):
            f = state.features[k]
            # label_fn=None explains the ORIGINAL model's prediction, as in attribute.
            y = labels(state.train, None if label_fn is not None else
                       feats_logits(p, state.train)[1])
            a = jnp.take_along_axis(state.alpha[k], y[:, None], axis=1)[:, 0]
            total = total + a * jnp.sum(f * f, axis=-1)
        return total / len(params)

    return Attributor(cache, attribute, self_attribute)
