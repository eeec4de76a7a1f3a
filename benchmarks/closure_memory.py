"""Memory a user's loss function keeps alive after its attributor is gone.

Each round makes a loss closing over 200 MB, attributes with it (Grad-Dot or TRAK on a
small LR), deletes the attributor, its state and the function, collects, and prints the
process's resident memory. ``held``: the closure only holds the array (a model object, a
dataset); ``used``: the loss computes with it, so it is a constant of the compiled
programs, which JAX's caches keep until ``jax.clear_caches()`` (the last round here
calls it).

    python benchmarks/closure_memory.py held grad_dot
    python benchmarks/closure_memory.py used trak
"""
import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jattri


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def main(mode: str, method: str, rounds: int = 4) -> None:
    x = jnp.ones((64, 8))
    y = jnp.zeros((64,), jnp.int32)
    params = {"w": jnp.zeros((8, 3))}
    print(f"{mode} {method}: start {rss_mib():.0f} MiB")
    for i in range(rounds):
        if mode == "used":
            big = jnp.full((8, 6_250_000), float(i), jnp.float32)

            def loss_fn(p, ex):
                xi, yi = ex
                return -jax.nn.log_softmax(xi @ p["w"] + jnp.sum(xi @ big[:, :3]) * 0)[yi]
        else:
            big = np.full((50_000_000,), float(i), np.float32)

            def loss_fn(p, ex, big=big):
                xi, yi = ex
                return -jax.nn.log_softmax(xi @ p["w"])[yi]
        attr = (jattri.grad_dot(loss_fn) if method == "grad_dot"
                else jattri.trak(loss_fn, proj_dim=4))
        state = attr.cache(params, (x, y))
        attr.attribute(state, (x[:4], y[:4])).block_until_ready()
        del attr, state, loss_fn, big
        if i == rounds - 1:
            jax.clear_caches()
        gc.collect()
        print(f"  round {i}: {rss_mib():.0f} MiB" + ("  (after jax.clear_caches())"
                                                     if i == rounds - 1 else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "held",
         sys.argv[2] if len(sys.argv) > 2 else "grad_dot")
