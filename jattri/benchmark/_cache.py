"""On-disk cache of ground truth, keyed by the settings that produced it."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$JATTRI_CACHE_DIR``, else ``$XDG_CACHE_HOME/jattri``, else ``~/.cache/jattri``."""
    env = os.environ.get("JATTRI_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jattri"


def cache_key(name: str, settings: dict) -> str:
    blob = json.dumps({"name": name, "version": CACHE_VERSION, **settings}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cached(name: str, settings: dict, compute: Callable[[], dict], *,
           directory: Optional[Path] = None, refresh: bool = False) -> tuple:
    """Return ``(arrays, path, hit)``: load ``<dir>/<key>.npz`` or compute and write it.

    The write is atomic (temp file + rename), so an interrupted run never leaves a
    half-written cache; an unreadable cache file is recomputed with a warning.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / (cache_key(name, settings) + ".npz")
    if path.exists() and not refresh:
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}, path, True
        except Exception as err:  # corrupt or truncated file: recompute
            warnings.warn(f"ignoring unreadable ground-truth cache {path}: {err}")
    arrays = compute()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return arrays, path, False
