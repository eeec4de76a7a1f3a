"""The dense projection's product in float32 against bfloat16 inputs with float32
accumulation, on the LR's TRAK shape (5,500 × 7,850) · (7,850 × 512), one process.

A measured lead for a later change (issue 15), not used by any method yet: a
bfloat16 projection would round each input to 8 significant bits, an error of about
0.2% per projected feature against the JL error of about 6% at k = 512.

    python benchmarks/bf16_product.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

N, D, K = 5500, 7850, 512


def _best(f, *args, reps=7):
    f(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times), sorted(times)[reps // 2]


def main():
    x = jax.random.normal(jax.random.key(0), (N, D))
    p = jax.random.normal(jax.random.key(1), (D, K))
    f32 = jax.jit(lambda x, p: x @ p)
    cast = jax.jit(lambda x, p: jnp.dot(x.astype(jnp.bfloat16), p.astype(jnp.bfloat16),
                                        preferred_element_type=jnp.float32))
    given = jax.jit(lambda x, p: jnp.dot(x, p, preferred_element_type=jnp.float32))
    xb, pb = x.astype(jnp.bfloat16), p.astype(jnp.bfloat16)
    for name, f, args in (("float32", f32, (x, p)), ("bfloat16, cast in the program", cast, (x, p)),
                          ("bfloat16, inputs given", given, (xb, pb))):
        best, median = _best(f, *args)
        print(f"{name}: best {best:.4f} s, median {median:.4f} s, "
              f"{2 * N * D * K / best / 1e9:.0f} GFLOP/s")
    exact = np.asarray(f32(x, p))
    err = np.linalg.norm(np.asarray(cast(x, p)) - exact) / np.linalg.norm(exact)
    print(f"relative error of the bfloat16 product: {err:.2e}")


if __name__ == "__main__":
    main()
