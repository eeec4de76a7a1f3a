"""Compilation cost of ensemble members: does scoring a dropout ensemble compile one
program per member, or share them like checkpoints of one model do?

For TRAK (proj_dim 512) and Grad-Dot on ``digits_mlp`` (1,000 train / 200 test), and a
Task of 4 identical checkpoints, a 4-mask dropout ensemble (member mode) and one in
example mode: wall time and number of XLA compilations of a first attributor (cold)
and of a second, freshly built attributor on the same Task (warm), side by side in one
process (after one warm-up attributor on the plain model per method).

    python benchmarks/ensemble_compile.py
"""
import logging
import time

import jax
import jax.numpy as jnp

import jattri
from jattri.bench import machine
from jattri.benchmark import load
from jattri.ensemble import dropout


class _Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.n = 0

    def emit(self, record):
        if "Compiling " in record.getMessage():
            self.n += 1


def main():
    bench = load("digits_mlp", progress=False)
    train = tuple(jnp.asarray(a) for a in bench.train)
    test = tuple(jnp.asarray(a) for a in bench.test)
    params = bench.models_full[0]
    base = jattri.Task(bench.loss_fn, [params], bench.target_fn)
    tasks = {
        "4 checkpoints": jattri.Task(bench.loss_fn, [params] * 4, bench.target_fn),
        "dropout 4, member": dropout(base, 4, jax.random.PRNGKey(0)),
        "dropout 4, example": dropout(base, 4, jax.random.PRNGKey(1), mode="example"),
    }
    methods = {"trak": lambda t: jattri.trak(t, proj_dim=512), "grad_dot": jattri.grad_dot}
    counter = _Count()
    logging.getLogger("jax").addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    print(f"{'method':<10} {'task':<20} {'cold s':>7} {'compiles':>8} {'warm s':>7} {'compiles':>8}")
    print("-" * 66)
    for name, make in methods.items():
        warm_up = make(base)  # the one-member model: process-wide one-off compilations
        warm_up.attribute(warm_up.cache(train), test).block_until_ready()
        for label, task in tasks.items():
            row = []
            for _ in range(2):
                counter.n = 0
                t0 = time.perf_counter()
                attr = make(task)
                attr.attribute(attr.cache(train), test).block_until_ready()
                row += [time.perf_counter() - t0, counter.n]
            print(f"{name:<10} {label:<20} {row[0]:7.2f} {row[1]:8d} {row[2]:7.2f} {row[3]:8d}")
    jax.config.update("jax_log_compiles", False)
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
