"""Shapes of two inner products that XLA's CPU runs at very different speeds (issue 15).

1. EK-FAC's scores on a one-position layer (``jattri.func.fisher._rank_one_scores``):
   Σ_jk left_bj right_bk U[t, j, k] over a chunk of ``b`` training examples and ``t``
   test examples, ``left (b, i)``, ``right (b, o)``, ``U (t, i, o)``; formed as the
   ``(b, t, o)`` product and contracted, or scanned over o (one (b × i) · (i × t)
   product per step, scaled by a column of ``right``).
2. Arnoldi's one-layer Hessian product (``jattri.methods.influence._layer_product``):
   the thin (n × i) · (i × o) and (i × n) · (n × o) products, at width o or zero-padded
   to a wider one (``_product_width``).

    python benchmarks/kernel_shapes.py                 # the LR's shapes and a few widths
    python benchmarks/kernel_shapes.py --widths 4,6,10,16,20

Medians of 5 timed runs after one warm-up, float32, seconds.
"""
from __future__ import annotations

import argparse


def _median_time(fn, *args, reps=5) -> float:
    import numpy as np
    from floors import _best  # benchmarks/ is on sys.path when run as a script
    return _best(fn, *args, reps=reps, stat=np.median)


def scores(b: int, i: int, o: int, t: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jattri.func import fisher

    rng = np.random.default_rng(0)
    u3 = jnp.asarray(rng.standard_normal((t, i, o), np.float32))
    left = jnp.asarray(rng.standard_normal((b, i), np.float32))
    right = jnp.asarray(rng.standard_normal((b, o), np.float32))
    out = {}
    for name, rank in (("formed", 0), ("scanned", 10 ** 9)):
        saved, fisher._SCANNED_RANK = fisher._SCANNED_RANK, rank
        try:  # traced (and so decided) at the first call, inside this block
            fn = jax.jit(lambda *a: fisher._rank_one_scores(*a))  # a trace of its own
            out[name] = _median_time(fn, left, right, u3)
        finally:
            fisher._SCANNED_RANK = saved
    out["library's choice"] = "scanned" if o <= fisher._SCANNED_RANK else "formed"
    return out


def products(n: int, i: int, o: int, wide: int, steps: int = 50) -> float:
    """``steps`` one-layer Hessian products (``influence._output_space_product``: both
    thin products and the output Hessians) at width ``wide`` (= o: unpadded), chained in
    one compiled loop; the arrays are arguments, not constants of the program."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jattri.methods.influence import _output_space_product

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.random((n, i), np.float32))
    at = jnp.asarray(np.asarray(a).T.copy())
    h = jnp.asarray(rng.standard_normal((n, o, o), np.float32))
    v = jnp.asarray(rng.standard_normal((i, wide), np.float32)).at[:, o:].set(0)

    def run(a, at, h, v):
        step = lambda k, w: _output_space_product(a, at, h, w) / (1000.0 * n)
        return jax.lax.fori_loop(0, steps, step, v)

    return _median_time(jax.jit(run), a, at, h, v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="6,10,20,33")
    args = p.parse_args(argv)
    from jattri.methods.influence import _product_width

    for b, i, o, t, what in ((5000, 785, 10, 500, "the LR, 5,000 x 500"),
                             (556, 785, 128, 500, "the MLP's first layer, a chunk of 556")):
        got = scores(b, i, o, t)
        print(f"EK-FAC scores, {what} (b={b}, i={i}, o={o}, t={t}): "
              + ", ".join(f"{k} {v:.4f} s" if isinstance(v, float) else f"{k} {v}"
                          for k, v in got.items()))
    for o in (int(x) for x in args.widths.split(",")):
        wider = -(-o // 8) * 8 if o % 8 else o + 8
        plain, padded = products(5000, 785, o, o), products(5000, 785, o, wider)
        print(f"50 one-layer products, n=5000, i=785, o={o}: unpadded {plain:.4f} s, "
              f"padded to {wider} {padded:.4f} s (library width {_product_width(o)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
