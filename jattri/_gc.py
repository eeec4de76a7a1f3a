"""Python's cyclic garbage collector after ``import jattri``.

After JAX and jattri are imported a process holds about 100,000 objects the collector
tracks (modules, functions, JAX's rules and caches) that live until it ends. Each full
(oldest-generation) collection walks all of them (``gc.collect()`` right after the
import: 0.047-0.066 s on a 2-core box), and the many objects a method's first call
makes while tracing set one off. On dattri's LR (5,000 examples) a first call of
Arnoldi or EK-FAC spent 0.052-0.067 s in one such collection (``benchmarks/RESULTS.md``, "The collector's pause in a first call").

So ``import jattri`` ends with :func:`gc.freeze`: every object tracked at that moment
moves to the collector's permanent generation, which later collections skip (a full
collection then took 0.1 ms). Objects made afterwards are collected as before; objects
that existed then are still freed by reference counting, but a reference cycle among
them is no longer reclaimed (at import time these are the libraries' own objects, and
whatever the user made before importing jattri).

The environment variable ``JATTRI_GC_FREEZE=0`` (or ``off``, ``false``, ``no``) leaves
the collector untouched.
"""
from __future__ import annotations

import gc
import os

ENV = "JATTRI_GC_FREEZE"


def settle() -> None:
    """At the end of ``import jattri``: the objects tracked now are frozen, unless
    ``JATTRI_GC_FREEZE`` turns it off."""
    if os.environ.get(ENV, "").strip().lower() not in ("0", "off", "false", "no"):
        gc.freeze()
