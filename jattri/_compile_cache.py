"""JAX's persistent compilation cache, on by default for jattri's programs.

A researcher who runs one attribution per script pays XLA compilation in every new
process; with the cache on, a second process loads the compiled programs from disk.
:func:`enable` runs at ``import jattri`` and points JAX's cache at
``<cache dir>/xla`` (``$JATTRI_CACHE_DIR``, else ``$XDG_CACHE_HOME/jattri``, else
``~/.cache/jattri``; the same directory as the benchmark's ground truth), caching
every program however short its compilation (JAX's own default keeps only those over
1 s; a method's first call compiles a few large programs and many small ones: TRAK on
a 7,850-parameter LR compiles 29, of which 23 took under 0.1 s and together 0.45 s;
reading all 29 back takes 0.09 s).

Turned off, or moved, by the environment variable ``JATTRI_COMPILE_CACHE``: ``0``
(or ``off``, ``false``, ``no``) leaves JAX's configuration untouched; a path puts the
cache there. A cache directory the user already configured in JAX
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config.update``) is always kept.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax

ENV = "JATTRI_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 0.0


def default_dir() -> Path:
    env = os.environ.get("JATTRI_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                  ".cache")
        base = Path(root) / "jattri"
    return base / "xla"


def enable(path: Optional[str] = None) -> Optional[str]:
    """Point JAX's persistent compilation cache at ``path`` (default: the
    environment's choice, see the module docstring). Returns the directory in use, or
    ``None`` when the cache is off. Never raises: a directory that cannot be created
    leaves the cache off."""
    setting = os.environ.get(ENV, "").strip()
    if path is None and setting.lower() in ("0", "off", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    target = Path(path or setting or default_dir()).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECONDS:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return str(target)
