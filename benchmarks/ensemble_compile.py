"""Compilation cost of ensemble members: does scoring a dropout ensemble compile one
program per member, or share them like checkpoints of one model do?

For TRAK (proj_dim 512) and Grad-Dot on ``digits_mlp`` (1,000 train / 200 test), and
Members of 4 identical checkpoints, a 4-mask dropout ensemble (member mode) and one in
example mode (members are arrays: the 4 members run in one program): wall time and
number of XLA compilations of a first attributor (cold) and of a second, freshly built
attributor on the same ensemble (warm), side by side in one process (after one warm-up
attributor on the plain model per method).

    python benchmarks/ensemble_compile.py
"""
import time

import jax
import jax.numpy as jnp

import jattri
from jattri.bench import machine
from jattri.benchmark import load
from jattri.ensemble import dropout

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class _Count:
    """XLA backend compilations, counted by jax's monitoring event."""

    def __init__(self):
        self.n = 0

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            self.n += 1


def main():
    bench = load("digits_mlp", progress=False)
    train = tuple(jnp.asarray(a) for a in bench.train)
    test = tuple(jnp.asarray(a) for a in bench.test)
    params = bench.models_full[0]
    base = jattri.Task(bench.loss_fn, bench.target_fn)
    ensembles = {
        "4 checkpoints": (base, jattri.checkpoints([params] * 4)),
        "dropout 4, member": dropout(base, params, 4, jax.random.PRNGKey(0)),
        "dropout 4, example": dropout(base, params, 4, jax.random.PRNGKey(1), mode="example"),
    }
    methods = {"trak": lambda t: jattri.trak(t, proj_dim=512), "grad_dot": jattri.grad_dot}
    counter = _Count()
    jax.monitoring.register_event_duration_secs_listener(counter)
    print(f"{'method':<10} {'task':<20} {'cold s':>7} {'compiles':>8} {'warm s':>7} {'compiles':>8}")
    print("-" * 66)
    for name, make in methods.items():
        warm_up = make(base)  # the one-member model: process-wide one-off compilations
        warm_up.attribute(warm_up.cache(params, train), test).block_until_ready()
        for label, (task, members) in ensembles.items():
            row = []
            for _ in range(2):
                counter.n = 0
                t0 = time.perf_counter()
                attr = make(task)
                attr.attribute(attr.cache(members, train), test).block_until_ready()
                row += [time.perf_counter() - t0, counter.n]
            print(f"{name:<10} {label:<20} {row[0]:7.2f} {row[1]:8d} {row[2]:7.2f} {row[3]:8d}")
    jax.monitoring.unregister_event_duration_listener(counter)
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
