"""Grad-Dot / Grad-Cos with factored ("ghost") inner products against materialised
per-example gradients, side by side in one process (issue 15).

MNIST-shaped inputs (784 features, 10 classes, random weights and Gaussian inputs),
5,000 train x 500 test, on the LR (7,850 params) and dattri's MLP shape 784-128-64-10
(109,386 params). Each row is three ``cache`` + ``attribute`` calls (the first one
compiles); the two paths' scores are compared.

    python benchmarks/factored_grad_dot.py
"""
import platform
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jattri


class MLP(nn.Module):
    hidden: tuple

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(10)(x)


def main(n=5000, n_test=500):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (n, 784))
    y = jnp.arange(n) % 10
    print("| model | method | path | call 1 s | call 2 s | call 3 s | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for label, hidden in (("LR 7,850", ()), ("MLP 109,386", (128, 64))):
        model = MLP(hidden)
        params = model.init(key, x[:1])["params"]

        def loss(p, z):
            logits = model.apply({"params": p}, z[0][None])[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, z[1])

        for name in ("grad_dot", "grad_cos"):
            scores = {}
            for path, factored in (("dense", False), ("factored", None)):
                attr = getattr(jattri, name)(loss, factored=factored)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    s = jax.block_until_ready(attr.attribute(attr.cache(params, (x, y)),
                                                             (x[:n_test], y[:n_test])))
                    times.append(time.perf_counter() - t0)
                scores[path] = np.asarray(s)
                diff = ("" if path == "dense" else
                        f"{np.abs(s - scores['dense']).max() / np.abs(scores['dense']).max():.1e}")
                print(f"| {label} | {name} | {path} | " + " | ".join(f"{t:.3f}" for t in times)
                      + f" | {diff} |", flush=True)
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}")


if __name__ == "__main__":
    main()
