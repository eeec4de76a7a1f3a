"""Sharded runs over 8 simulated CPU devices equal single-device runs (issue 11).

A fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` scores
every method on one device and on the training set sharded over the 8
(``jattri.shard``); see tests/_sharded_run.py. Asserted: scores and top-k within 1e-5
(float32); every engine stage over the training set ran with the 8-device layout; the
per-example gradients inside a stage, the stored per-example features and the score
rows were spread over 8 devices; params split over a second mesh axis stay split; and
``jattri.shard`` refuses what it cannot place.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# LiSSA and Arnoldi take the same layout-aware path as CG and explicit influence (their
# jitted fits pass the layout statically), Grad-Dot TRAK's per-example path without its
# Gram sum: they are left out to keep the suite short.
# "trak_kron": TRAK with the Kronecker projection (its factors are replicated arguments).
METHODS = ["trak", "trak_kron", "logra", "influence_cg", "influence_ekfac",
           "influence_explicit"]


@pytest.fixture(scope="module")
def runs():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8",
           "JATTRI_COMPILE_CACHE": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(HERE / "_sharded_run.py"), *METHODS],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    def key(line):
        if "method" in line:
            return line["method"]
        if "params_method" in line:
            return "params:" + line["params_method"]
        return "stream" if "stream" in line else "errors"

    return {key(line): line for line in lines}


@pytest.mark.parametrize("name", METHODS)
def test_sharded_equals_one_device(runs, name):
    r = runs[name]
    assert r["shape"] == [64, 10]
    assert r["rel"] <= 1e-5, r
    assert r["top_k_same"] and r["top_k_rel"] <= 1e-5, r
    # every engine stage over the 64 training examples ran laid out over 8 devices
    assert r["train_stages"] >= 2 and r["train_stage_devices"] == [8], r
    # sums over the training set (Gram, Fisher, factors, curvature products) are kept
    # per device and reduced once per stage
    assert r["partial_sums"], r
    # per-example gradients inside a stage, per-example outputs and score rows: on 8
    assert r["grads_devices"] == [8] and r["grads_spec"] == ["P('data',)"], r
    assert r["probe_devices"] == 8 and r["scores_devices"] == 8, r
    # the same inside jattri.progress (its stages run chunk by chunk from the host)
    assert r["progress_rel"] <= 1e-5 and r["progress_scores_devices"] == 8, r


@pytest.mark.parametrize("name", ["trak", "trak_kron", "logra"])
def test_stored_features_stay_sharded(runs, name):
    """The per-example features a cache keeps (n along axis 0 or 1) stay spread."""
    per_example = [leaf for leaf in runs[name]["state_leaves"] if "'data'" in leaf[1]]
    assert len(per_example) >= 3  # the training inputs, labels and the features
    assert all(devices == 8 for devices, _ in per_example)


def test_shard_refusals(runs):
    e = runs["errors"]["errors"]
    assert "60 examples, not a multiple of the 8 devices" in e["ragged"]
    assert "`axes` 'model' names no axis of the mesh" in e["axis"]
    assert "`mesh` must be a jax.sharding.Mesh" in e["mesh"]
    assert "sharded over different meshes or mesh axes" in e["mixed"]


@pytest.mark.parametrize("name", ["trak", "influence_ekfac"])
def test_sharded_params_stay_sharded(runs, name):
    """Params split over a "model" mesh axis (examples over "data"): same scores, and
    the state keeps them split (nothing gathered them onto one device)."""
    r = runs["params:" + name]
    assert r["rel"] <= 1e-5, r
    assert r["kernel_specs"] == ["P(None, None, 'model')"] * 2, r


def test_stream_on_a_mesh(runs):
    """A Stream placed on the mesh (jattri.stream(batches, mesh=)): every chunk's
    gradients spread over the 8 devices, the scores those of one device in memory."""
    r = runs["stream"]
    assert r["rel"] <= 1e-5 and r["grads_devices"] == [8], r
