"""Benchmark settings with retraining ground truth (LDS, LOO).

``jattri.benchmark.load(name)`` returns a :class:`Benchmark` for an embedded setting
(``digits_lr``, ``digits_mlp``, ``digits_cnn`` on scikit-learn's digits; ``text_nanogpt``,
a character-level nanoGPT on Python's own ``pydoc_data.topics``): trained checkpoints,
data and LDS ground truth, the latter computed once by vmapped retraining and cached on
disk (see ``cache_dir``).
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from jattri.benchmark import digits, text
from jattri.benchmark._cache import cache_dir, cached
from jattri.benchmark._types import Benchmark
from jattri.benchmark.dattri import load_dattri

EMBEDDED = tuple(digits.SETTINGS) + tuple(text.SETTINGS)


def _family(name: str):
    """The module that defines setting ``name`` (looked up at call time, so a setting
    added to a ``SETTINGS`` dict, as the tests add tiny ones, is found)."""
    for module in (digits, text):
        if name in module.SETTINGS:
            return module
    return None


def _stderr(msg: str) -> None:
    print(f"[jattri.benchmark] {msg}", file=sys.stderr, flush=True)


def load(name: str, *, cache: Optional[str] = None, refresh: bool = False,
         progress: Optional[Callable[[str], None]] = _stderr) -> Benchmark:
    """Load an embedded setting, computing and caching its ground truth on first use.

    Args:
      name: one of ``EMBEDDED`` (``"digits_lr"``, ``"digits_mlp"``, ``"digits_cnn"``,
        ``"text_nanogpt"``).
      cache: cache directory (default ``cache_dir()``). refresh: recompute.
      progress: callable receiving progress messages (``None``: silent).
    """
    family = _family(name)
    if family is None:
        raise ValueError(f"unknown benchmark setting {name!r}; embedded settings: "
                         f"{', '.join(EMBEDDED)} (published dattri settings: "
                         "jattri.benchmark.load_dattri)")
    cfg = family.SETTINGS[name]
    say = progress or (lambda m: None)

    def compute():
        say(f"{name}: computing ground truth (first run; cached afterwards)")
        return family.compute(cfg, progress=say)

    init_fn, apply_fn, loss_fn = family.model_fns(cfg)
    theta, unravel = ravel_pytree(init_fn(jax.random.PRNGKey(0)))
    directory = None if cache is None else Path(cache)
    key = dataclasses.asdict(cfg)
    if family is text:
        key["text_sha256"] = text.text_fingerprint()
    arrays, path, hit = cached(name, key, compute, directory=directory, refresh=refresh)
    if hit and any(np.shape(arrays[k])[1:] != theta.shape for k in ("full", "half")):
        # Written by another version of the setting's model: recompute, never misread.
        warnings.warn(f"ground-truth cache {path} holds models with "
                      f"{np.shape(arrays['full'])[1:]} parameters, the {name} model has "
                      f"{theta.shape}; recomputing")
        arrays, path, hit = cached(name, key, compute, directory=directory, refresh=True)
    if hit:
        say(f"{name}: ground truth from cache {path}")
    to_params = lambda flat: [unravel(jax.numpy.asarray(v)) for v in flat]
    if family is digits:
        train, test = digits.digits_split(cfg.n_train, cfg.n_test)
    else:
        train, test = text.text_split(cfg)
    return Benchmark(
        name=name, loss_fn=loss_fn, target_fn=loss_fn, apply_fn=apply_fn,
        models_full=to_params(arrays["full"]), models_half=to_params(arrays["half"]),
        train=train, test=test,
        lds=(np.asarray(arrays["subsets"]), np.asarray(arrays["targets"])), loo=None,
        info={**dataclasses.asdict(cfg), "cache_path": str(path),
              "train_seconds": float(arrays["train_seconds"])})


__all__ = ["Benchmark", "EMBEDDED", "cache_dir", "load", "load_dattri"]
