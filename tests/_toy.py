"""Small shared builders for the influence tests (float64 toy problems)."""
import jax
import jax.numpy as jnp


def f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def classification_data(n, d_in, classes, seed=0):
    """``(x, y)``: Gaussian inputs, labels from a random linear model plus Gumbel noise."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (n, d_in), jnp.float64)
    w = jax.random.normal(k2, (d_in, classes), jnp.float64)
    y = jnp.argmax(x @ w + jax.random.gumbel(k3, (n, classes), jnp.float64), -1)
    return x, y


def manual_mlp(params, x, deltas, names=None):
    """The Flax ReLU MLP written out by hand: ``(logits, each Dense layer's input)``,
    with the zero perturbation ``deltas[k]`` added to layer k's output. ``names``:
    the layers in order (default: sorted param names, e.g. fc1, fc2)."""
    names = sorted(params) if names is None else names
    inputs, h = [], x
    for k, name in enumerate(names):
        inputs.append(h)
        h = h @ params[name]["kernel"] + params[name]["bias"] + deltas[k]
        if k < len(names) - 1:
            h = jax.nn.relu(h)
    return h, inputs
