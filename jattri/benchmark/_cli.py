"""Command-line argument checks shared by ``python -m jattri.bench`` and
``python -m jattri.benchmark.ensembles``: every argument is checked before any work
starts, and a bad one ends the run with one line and exit status 2."""
from __future__ import annotations

import os
import sys
from typing import Optional


def fail(msg: str) -> SystemExit:
    """Print a one-line error; the SystemExit (status 2) to raise before any work."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return SystemExit(2)


def split(arg: Optional[str], choices, what: str, option: str) -> list:
    if arg is None:
        return list(choices)
    items = [a.strip() for a in arg.split(",") if a.strip()]
    if not items:
        raise fail(f"{option} {arg!r} names no {what}; choose from {', '.join(choices)}")
    unknown = [a for a in items if a not in choices]
    if unknown:
        raise fail(f"{option}: unknown {what}: {', '.join(unknown)}; choose from "
                    f"{', '.join(choices)}")
    return items


def writable_file(path: str, option: str) -> None:
    """``path`` can be written (an existing file, or a new one in an existing
    directory), checked without touching an existing file's contents."""
    if os.path.isdir(path):
        raise fail(f"{option} {path!r} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise fail(f"{option} {path!r}: directory {parent!r} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise fail(f"{option} {path!r} is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"{option} {path!r}: directory {parent!r} is not writable")


def usable_dir(path: str, option: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise fail(f"{option} {path!r} exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise fail(f"{option} {path!r}: {probe!r} is not writable")


