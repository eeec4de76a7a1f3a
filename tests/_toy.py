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
