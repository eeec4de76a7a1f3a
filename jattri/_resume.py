"""Resumable stages (work in progress): see :func:`jattri.resumable`."""
from __future__ import annotations


def active() -> bool:
    """Whether a :func:`jattri.resumable` block is active (never, until implemented)."""
    return False


def scan(step, config, args, carry, data, size):
    raise NotImplementedError("resumable stages are not implemented yet")


def per_example(fn, fn_config, args, rows, size, *, axis=0):
    raise NotImplementedError("resumable stages are not implemented yet")
