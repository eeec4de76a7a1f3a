"""jattri.resumable: a featurisation killed mid-stage resumes at its last finished
chunk, bit-identical to an uninterrupted run; other settings and damaged files are
refused with errors that name the field or file, touching nothing."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jattri
from jattri import engine

N, CHUNK, KILL_AFTER = 30, 4, 3  # 8 chunks; the killed run finishes 3

SCRIPT = textwrap.dedent(f"""
    import os, signal, sys
    os.environ["JATTRI_COMPILE_CACHE"] = "0"
    import jax, jax.numpy as jnp, numpy as np, optax
    import jattri

    def loss(p, z):
        x, y = z
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)

    kx, ky, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    train = (jax.random.normal(kx, ({N}, 5)), jax.random.randint(ky, ({N},), 0, 3))
    test = (train[0][:6] + 0.5, train[1][:6])
    params = {{"w": jax.random.normal(kw, (5, 3)), "b": jnp.zeros(3)}}
    attr = jattri.trak(loss, proj_dim=8, chunk_size={CHUNK})

    def data(mode):
        if mode == "memory":
            return train
        return jattri.stream([jax.tree_util.tree_map(lambda a: a[i:i + 7], train)
                              for i in range(0, {N}, 7)])

    def run(directory, mode, kill_after=None):
        reports = []
        def report(p):
            if p.stage != "cache":
                return
            if kill_after is not None and p.done >= kill_after * {CHUNK}:
                if mode == "memory":  # Ctrl-C
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGKILL)  # a killed job
            reports.append(p.done)
        with jattri.progress(report), jattri.resumable(directory):
            scores = attr.attribute(attr.cache(params, data(mode)), test)
        return np.asarray(scores), reports

    what, directory, out = sys.argv[1], sys.argv[2], sys.argv[3]
    results = {{}}
    for mode in ("memory", "stream"):
        where = os.path.join(directory, mode)
        if what == "kill":  # interrupted after KILL_AFTER chunks; the stream run never returns
            try:
                run(where, mode, kill_after={KILL_AFTER})
            except KeyboardInterrupt:
                continue
        scores, reports = run(where, mode)
        results[mode + "_scores"], results[mode + "_reports"] = scores, np.asarray(reports)
        if what == "full":  # the stored stages loaded, and the usual path
            again, results[mode + "_reload_reports"] = run(where, mode)
            assert np.array_equal(again, scores)
            results[mode + "_usual"] = np.asarray(attr.attribute(attr.cache(params, data(mode)),
                                                                 test))
    np.savez(out, **results)
""")


def _run(tmp_path, what, directory):
    script = tmp_path / "featurise.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{what}.npz"
    env = dict(os.environ, JATTRI_COMPILE_CACHE="0")
    proc = subprocess.run([sys.executable, str(script), what, str(directory), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    return proc, out


def test_killed_featurisation_resumes_bit_identical(tmp_path):
    chunks = -(-N // CHUNK)
    full, out = _run(tmp_path, "full", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    want = np.load(out)
    killed = tmp_path / "killed"
    # interrupted after KILL_AFTER of `chunks` chunks: in memory by a KeyboardInterrupt,
    # then streamed by SIGKILL
    proc, _ = _run(tmp_path, "kill", killed)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    for mode in ("memory", "stream"):
        progress = json.loads((killed / mode / "000-cache" / "progress.json").read_text())
        assert progress["chunks"] == KILL_AFTER and not progress["finished"]
    resumed, out = _run(tmp_path, "resume", killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = np.load(out)
    for mode in ("memory", "stream"):
        # the uninterrupted run reported every chunk; a re-run of a finished stage
        # loads it (one report of n); the resumed run computed only the chunks left
        np.testing.assert_array_equal(want[mode + "_reports"],
                                      np.minimum(np.arange(1, chunks + 1) * CHUNK, N))
        np.testing.assert_array_equal(want[mode + "_reload_reports"], [N])
        np.testing.assert_array_equal(got[mode + "_reports"],
                                      np.minimum(np.arange(KILL_AFTER + 1, chunks + 1) * CHUNK, N))
        assert np.array_equal(got[mode + "_scores"], want[mode + "_scores"])
        np.testing.assert_allclose(got[mode + "_scores"], want[mode + "_usual"], rtol=1e-5,
                                   atol=1e-5 * np.abs(want[mode + "_usual"]).max())
    assert np.array_equal(want["memory_scores"], want["stream_scores"])


# ------------------------------------------------------------------ in-process checks

def loss(p, z):
    x, y = z
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)


def _data(n, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (n, 5)), jax.random.randint(ky, (n,), 0, 3)


def _params(seed=0):
    return {"w": jax.random.normal(jax.random.PRNGKey(100 + seed), (5, 3)), "b": jnp.zeros(3)}


def _cache(directory, *, proj_dim=4, params=None, n=12, chunk_size=4, stream=False):
    train = _data(n)
    if stream:
        train = jattri.stream([jax.tree_util.tree_map(lambda a: a[i:i + 5], train)
                               for i in range(0, n, 5)])
    attr = jattri.trak(loss, proj_dim=proj_dim, chunk_size=chunk_size)
    with jattri.resumable(directory):
        return attr.cache(_params() if params is None else params, train)


def _files(directory):
    return {p: p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, field", [
    (dict(proj_dim=8), r"config\[0\]\[2\]"),
    (dict(params=_params(1)), r"args\.leaves\[1\]\.params\['w'\]"),
    (dict(n=13), r"data\.n"),
    (dict(chunk_size=3), r"chunk_size"),
])
def test_other_settings_are_refused(tmp_path, change, field):
    _cache(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=field + r" differs \(saved .*, now .*\)"):
        _cache(tmp_path, **change)
    assert _files(tmp_path) == before


def test_other_stream_is_refused(tmp_path):
    _cache(tmp_path, stream=True)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"args\.leaves.*params\['w'\].*differs"):
        _cache(tmp_path, stream=True, params=_params(1))
    with pytest.raises(ValueError, match=r"data\.kind differs"):
        _cache(tmp_path)
    assert _files(tmp_path) == before


def _damage_npy(stage):
    path = stage / "out-0.npy"
    os.truncate(path, path.stat().st_size - 7)
    return "out-0.npy", r"shorter than recorded"


def _damage_meta(stage):
    (stage / "meta.json").write_text('{"stage": "cache", ')
    return "meta.json", r"cannot be read as JSON"


def _damage_progress(stage):
    (stage / "progress.json").write_bytes(b"\x00\x01")
    return "progress.json", r"cannot be read as JSON"


def _damage_orbax(stage):
    carry = next(stage.glob("carry-*"))
    (carry / "manifest.ocdbt").write_bytes(b"not a manifest")
    return carry.name, r"orbax checkpoint\) cannot be restored"


@pytest.mark.parametrize("damage", [_damage_npy, _damage_meta, _damage_progress, _damage_orbax])
def test_damaged_files_are_named_and_nothing_else_is_touched(tmp_path, damage):
    _cache(tmp_path)
    name, what = damage(tmp_path / "000-cache")
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=rf"000-cache/{name}.* {what}.*delete the directory"):
        _cache(tmp_path)
    assert _files(tmp_path) == before


def _pair_fn(config, args, chunk):
    x, _ = chunk.data
    return jnp.stack([x @ args, -(x @ args)]), chunk.index[None]  # (2, size, 3), (1, size)


@pytest.mark.parametrize("stream", [False, True])
def test_per_example_along_axis_1(tmp_path, stream):
    train = _data(11)
    rows = (jattri.stream([jax.tree_util.tree_map(lambda a: a[i:i + 4], train)
                           for i in range(0, 11, 4)]) if stream else train)
    w = _params()["w"]
    want = engine.per_example(_pair_fn, None, w, rows, 3, axis=1)
    for _ in range(2):  # written, then loaded
        with jattri.resumable(tmp_path):
            got = engine.per_example(_pair_fn, None, w, rows, 3, axis=1)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    assert got[0].shape == (2, 11, 3)
    stored = np.load(tmp_path / "000-pair" / "out-0.npy")
    np.testing.assert_array_equal(stored, np.moveaxis(want[0], 1, 0))


def _sum_step(config, args, carry, chunk):
    x, _ = chunk.data
    return carry + jnp.sum(jnp.where(chunk.valid[:, None], x, 0.0), 0) * args, None


def test_stage_inside_jit_runs_as_usual(tmp_path):
    train = _data(10)

    @jax.jit
    def total(scale):
        return engine.scan(_sum_step, None, scale, jnp.zeros(5), train, 4)[0]

    with jattri.resumable(tmp_path), pytest.warns(UserWarning, match="enclosing jit"):
        got = total(2.0)
    np.testing.assert_allclose(got, 2.0 * np.asarray(train[0]).sum(0), rtol=1e-5)
    assert not list(tmp_path.iterdir())


def test_ekfac_stages_each_resume_and_other_damping_is_refused(tmp_path):
    """EK-FAC's covariance and eigenvalue passes are stages of their own; another
    damping reuses them and is refused where it enters (the test side's args)."""
    import flax.linen as nn

    model = nn.Dense(3)
    train = _data(20)
    params = model.init(jax.random.PRNGKey(1), train[0][:1])["params"]

    def dense_loss(p, z):
        logits = model.apply({"params": p}, z[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, z[1])

    test = jax.tree_util.tree_map(lambda a: a[:4], train)
    attr = jattri.influence_ekfac(dense_loss, damping=1e-3, chunk_size=8)
    with jattri.resumable(tmp_path):
        scores = attr.attribute(attr.cache(params, train), test)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000-ekfac-covariance", "001-ekfac-eigenvalue", "002-basis-test", "003-score"]
    np.testing.assert_allclose(scores, attr.attribute(attr.cache(params, train), test),
                               rtol=1e-5, atol=1e-5 * np.abs(scores).max())
    before = _files(tmp_path)
    other = jattri.influence_ekfac(dense_loss, damping=1e-2, chunk_size=8)
    refused = r"002-basis-test .* args\.leaves\[\d+\] differs \(saved .*0\.001.*, now .*0\.0(1|0999)"
    with jattri.resumable(tmp_path), pytest.raises(ValueError, match=refused):
        other.attribute(other.cache(params, train), test)
    assert _files(tmp_path) == before


def test_a_copied_numpy_dtype_is_stored_as_itself():
    """A float32 read back by pickle (as JAX's deserialized executables hold their avals)
    is a non-builtin copy; the outputs' files still hold float32, not raw bits."""
    import pickle

    from jattri._resume import _Outputs

    copy = pickle.loads(pickle.dumps(np.dtype("float32")))
    assert copy == np.float32 and not copy.isbuiltin
    assert _Outputs._storage(copy) is np.dtype("float32")


def test_a_copied_numpy_dtype_is_described_as_itself():
    """A saved stage's inputs are described alike whether an array's float32 is numpy's
    own or a copy read back by pickle (a carry made by an executable from the
    persistent cache): else a resumed run would find its own inputs changed."""
    import pickle

    from jattri._resume import _array, _data_hash

    copy = pickle.loads(pickle.dumps(np.dtype("float32")))
    for values in ([0.5, 2.0], np.arange(12.0).reshape(3, 4)):
        own = np.asarray(values, np.float32)
        copied = np.asarray(values, copy)
        assert not copied.dtype.isbuiltin
        assert _array(copied) == _array(own)
        assert _data_hash(copied) == _data_hash(own)
    assert "value" in _array(np.asarray([0.5, 2.0], copy))  # a hyperparameter, by value
