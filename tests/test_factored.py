"""Factored ("ghost") gradient inner products of Grad-Dot, Grad-Cos and TracIn.

Without a projection, when every parameter is the kernel or bias of a linear layer,
⟨g_i, g_t⟩ = Σ_ℓ Σ_τσ ⟨ã_iτ, ã_tσ⟩⟨s_iτ, s_tσ⟩. Asserted against the dense path
(per-example gradients materialised) in float64: one-position and several-position
(sequence) layers and a Conv, loss ≠ target, two members with weights, self-scores
and top-k; that the default takes the factored path where it is exact and not where
the loss has a term outside the layers; and the refusals.
"""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jattri

from _toy import classification_data, f64

tracin_module = importlib.import_module("jattri.methods.tracin")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


class SeqConv(nn.Module):
    """A Conv over a 1-D sequence, then a Dense applied at every position (T > 1),
    mean-pooled: three layers with several positions."""

    @nn.compact
    def __call__(self, x):  # x: (T, 4)
        h = jnp.tanh(nn.Conv(5, (2,))(x[None]))[0]  # (T, 5)
        h = jnp.tanh(nn.Dense(4)(h))
        return nn.Dense(3)(h.mean(0))


def _setup(model, x_shape, seed=0):
    x, y = classification_data(14, int(np.prod(x_shape)), 3, seed=seed)
    x = x.reshape((14,) + x_shape)
    params = f64(model.init(jax.random.PRNGKey(seed), x[0] if x_shape[0] > 4 else x[:1])
                 ["params"])

    def loss(p, z):
        logits = model.apply({"params": p}, z[0] if x_shape[0] > 4 else z[0][None])
        return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, 3)[0], z[1])

    def margin(p, z):  # a target other than the loss: the logit of the label
        logits = model.apply({"params": p}, z[0] if x_shape[0] > 4 else z[0][None])
        return -logits.reshape(-1, 3)[0][z[1]]

    return params, (x[:10], y[:10]), (x[10:], y[10:]), loss, margin


CASES = {"mlp": (MLP(), (5,)), "seq_conv": (SeqConv(), (6, 4))}


def _count_calls(monkeypatch, name: str) -> list:
    """A list that grows by one at every call of ``jattri.methods.tracin.<name>``."""
    calls, original = [], getattr(tracin_module, name)

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(tracin_module, name, spy)
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_factored_equals_dense(x64, case):
    params, train, test, loss, margin = _setup(*CASES[case])
    second = jax.tree_util.tree_map(lambda p: 1.3 * p, params)
    members = jattri.checkpoints([params, second])
    builds = [lambda **kw: jattri.tracin(jattri.Task(loss, margin), weights=[0.7, 0.2], **kw),
              lambda **kw: jattri.grad_cos(loss, **kw)]
    for build in builds[:1] if case == "seq_conv" else builds:
        dense, fact = build(factored=False), build(factored=True)
        sd, sf = dense.cache(members, train), fact.cache(members, train)
        want = np.asarray(dense.attribute(sd, test))
        np.testing.assert_allclose(fact.attribute(sf, test), want, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(fact.self_attribute(sf), dense.self_attribute(sd),
                                   rtol=1e-10, atol=1e-13)
        top = fact.attribute(sf, test, top_k=3)
        np.testing.assert_array_equal(np.asarray(top.indices),
                                      np.argsort(-want, axis=0, kind="stable")[:3].T)


def test_default_takes_the_factored_path_only_where_exact(x64, monkeypatch):
    params, train, test, loss, _ = _setup(*CASES["mlp"])
    calls = _count_calls(monkeypatch, "_factored_tile")
    auto = jattri.grad_dot(loss)
    dense = jattri.grad_dot(loss, factored=False)
    np.testing.assert_allclose(auto.attribute(auto.cache(params, train), test),
                               dense.attribute(dense.cache(params, train), test), rtol=1e-10)
    assert calls, "the default did not take the factored path on an MLP"

    # an L2 penalty inside the loss is a gradient term outside the layers' factors
    def penalised(p, z):
        return loss(p, z) + 1e-2 * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))

    calls.clear()
    auto, dense = jattri.grad_dot(penalised), jattri.grad_dot(penalised, factored=False)
    want = dense.attribute(dense.cache(params, train), test)
    np.testing.assert_allclose(auto.attribute(auto.cache(params, train), test), want,
                               rtol=1e-10)
    assert not calls
    # layers at several positions: only when asked (the tile grows with T²)
    sparams, strain, stest, sloss, _ = _setup(*CASES["seq_conv"])
    auto = jattri.grad_dot(sloss)
    auto.attribute(auto.cache(sparams, strain), stest)
    assert not calls
    forced = jattri.grad_dot(penalised, factored=True)  # the caller vouched, wrongly
    assert not np.allclose(forced.attribute(forced.cache(params, train), test), want,
                           rtol=1e-3)


def test_factored_check_runs_once_per_shapes(x64, monkeypatch):
    """The rebuild check of the default path runs on the first call of a factory and
    not again on later calls of the same shapes (it was a compiled check and a host
    sync on every call); a new factory checks again; the penalised loss stays dense."""
    params, train, test, loss, _ = _setup(*CASES["mlp"])
    checks = _count_calls(monkeypatch, "_rebuild_error")
    auto = jattri.grad_dot(loss)
    first = np.asarray(auto.attribute(auto.cache(params, train), test))
    assert len(checks) == 1
    again = np.asarray(auto.attribute(auto.cache(params, train), test))
    np.testing.assert_array_equal(again, first)
    assert len(checks) == 1
    other = jattri.grad_dot(loss)
    other.attribute(other.cache(params, train), test)
    assert len(checks) == 2  # a new factory checks once

    def penalised(p, z):
        return loss(p, z) + 1e-2 * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))

    auto, dense = jattri.grad_dot(penalised), jattri.grad_dot(penalised, factored=False)
    want = dense.attribute(dense.cache(params, train), test)
    for _ in range(2):  # the refusal is remembered too: still dense, not checked again
        np.testing.assert_allclose(auto.attribute(auto.cache(params, train), test), want,
                                   rtol=1e-10)
    assert len(checks) == 3


def test_factored_refusals(x64):
    params, train, test, loss, _ = _setup(*CASES["mlp"])
    scaled = {"net": params, "temperature": jnp.ones((), jnp.float64)}

    def tempered(p, z):
        return loss(p["net"], z) / p["temperature"]

    with pytest.raises(ValueError, match="temperature.*not in a linear layer"):
        attr = jattri.grad_dot(tempered, factored=True)
        attr.attribute(attr.cache(scaled, train), test)
    auto = jattri.grad_dot(tempered)  # the default falls back to dense gradients
    assert np.all(np.isfinite(auto.attribute(auto.cache(scaled, train), test)))
    with pytest.raises(ValueError, match="proj_dim=None"):
        jattri.tracin(loss, proj_dim=4, factored=True)
    with pytest.raises(TypeError, match="`factored` must be True or False"):
        jattri.grad_cos(loss, factored="yes")


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_io_and_grad_is_layer_io_and_grad(x64, case):
    """The check's single backward pass gives ``layer_io`` and ``jax.grad`` exactly as
    the two separate passes do, positions > 1 and a Conv included."""
    from jattri.func.layers import layer_io, layer_io_and_grad, linear_layers
    model, shape = CASES[case]
    params, (x, y), _, loss, _ = _setup(model, shape)
    example = (x[0], y[0])
    layers = linear_layers(loss, params, example)
    io, grads = layer_io_and_grad(loss, params, example, layers=layers)
    want = layer_io(loss, params, example, layers=layers)
    assert sorted(io) == sorted(want)
    for name in want:
        for got, ref in zip(io[name], want[name]):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    for got, ref in zip(jax.tree_util.tree_leaves(grads),
                        jax.tree_util.tree_leaves(jax.grad(loss)(params, example))):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
