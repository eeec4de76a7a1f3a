"""Embedded benchmark machinery on a tiny configuration: training, cache, CLI."""
import dataclasses
import json

import jax
import numpy as np
import pytest

import jattri
from jattri import bench, benchmark
from jattri.benchmark import _cache, digits
from test_ensemble import pending

TINY = digits.DigitsConfig(model="lr", epochs=30, batch_size=None, learning_rate=0.1,
                           weight_decay=1e-2, num_full=2, num_subsets=6, num_seeds=2,
                           n_train=60, n_test=8)


def test_split_is_the_fixed_one():
    (xtr, ytr), (xte, yte) = digits.digits_split()
    assert xtr.shape == (1000, 64) and xte.shape == (200, 64) and xtr.dtype == np.float32
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    from sklearn.datasets import load_digits
    d = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(ytr, d.target[perm[:1000]])
    np.testing.assert_array_equal(xte, (d.data[perm[1000:1200]] / 16).astype(np.float32))


@pytest.mark.parametrize("model", ["lr", "mlp", "cnn"])
def test_vmapped_training_equals_one_at_a_time(model):
    cfg = dataclasses.replace(TINY, model=model, batch_size=10 if model == "mlp" else None,
                              dropout=0.1 if model == "mlp" else 0.0, epochs=3)
    (x, y), _ = digits.digits_split(cfg.n_train, cfg.n_test)
    subsets = np.stack([np.arange(0, 30), np.arange(30, 60), np.arange(15, 45)])
    seeds = np.array([0, 1, 2])
    together = digits.train_models(cfg, x, y, subsets, seeds)
    for k in range(3):
        alone = digits.train_models(cfg, x, y, subsets[k:k + 1], seeds[k:k + 1])
        for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_allclose(a[k], b[0], rtol=2e-4, atol=2e-5)
    # Different subsets give different models.
    w = jax.tree_util.tree_leaves(together)[0]
    assert not np.allclose(w[0], w[1])


def test_cache_roundtrip_and_keys(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(3)}

    a, path, hit = _cache.cached("s", {"x": 1}, compute, directory=tmp_path)
    assert not hit and path.exists() and len(calls) == 1
    b, path2, hit = _cache.cached("s", {"x": 1}, compute, directory=tmp_path)
    assert hit and path2 == path and len(calls) == 1
    np.testing.assert_array_equal(b["a"], a["a"])
    _, path3, hit = _cache.cached("s", {"x": 2}, compute, directory=tmp_path)
    assert not hit and path3 != path  # keyed by the settings
    path.write_bytes(b"not an npz file")  # corrupt: recomputed with a warning
    with pytest.warns(UserWarning, match="unreadable"):
        c, _, hit = _cache.cached("s", {"x": 1}, compute, directory=tmp_path)
    assert not hit and len(calls) == 3


def test_load_tiny_setting_and_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(digits.SETTINGS, "digits_tiny", TINY)
    b = benchmark.load("digits_tiny", cache=str(tmp_path), progress=None)
    assert isinstance(b, benchmark.Benchmark)
    subsets, targets = b.lds
    assert subsets.shape == (6, 30) and targets.shape == (6, 8)
    assert len(b.models_full) == 2 and len(b.models_half) == 6
    # targets are utilities: minus the test loss of the half models (mean over seeds)
    util0 = -np.mean([float(b.loss_fn(b.models_half[0], (b.test[0][j], b.test[1][j])))
                      for j in range(8)])
    assert abs(util0 - targets[0].mean()) < 0.5 * abs(util0)
    # The loss follows the dropout contract: rng=None deterministic.
    z = (b.train[0][0], b.train[1][0])
    assert float(b.loss_fn(b.models_full[0], z)) == float(b.loss_fn(b.models_full[0], z, None))

    out = tmp_path / "rows.json"
    with pending("influence_explicit"):
        rc = bench.main(["--setting", "digits_tiny", "--methods", "grad_dot,influence_explicit",
                         "--cache", str(tmp_path), "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["grad_dot", "influence_explicit"]
    for r in rows:
        assert -1.0 <= r["lds"] <= 1.0 and r["total_s"] > 0


def test_cache_of_another_model_version_is_recomputed(tmp_path, monkeypatch):
    """A cache file under the setting's key whose models have another parameter count
    (the architecture changed since it was written) is recomputed, never misread."""
    monkeypatch.setitem(digits.SETTINGS, "digits_tiny", TINY)
    key = _cache.cache_key("digits_tiny", dataclasses.asdict(TINY))
    np.savez(tmp_path / f"{key}.npz", full=np.zeros((2, 5)), half=np.zeros((6, 5)),
             subsets=np.zeros((6, 30), np.int32), targets=np.zeros((6, 8)),
             train_seconds=np.float64(0))
    with pytest.warns(UserWarning, match="recomputing"):
        b = benchmark.load("digits_tiny", cache=str(tmp_path), progress=None)
    assert jax.tree_util.tree_leaves(b.models_full[0])[0].shape == (10,)  # the LR bias
    assert np.any(b.lds[1] != 0)
    with np.load(tmp_path / f"{key}.npz") as f:  # and the file now holds the new models
        assert f["full"].shape == (2, 64 * 10 + 10)


def test_a_method_that_refuses_the_setting_gets_a_row_not_a_crash(tmp_path, monkeypatch):
    from jattri.benchmark import registry
    monkeypatch.setitem(digits.SETTINGS, "digits_tiny", TINY)

    def refuse(members, train):
        raise ValueError("Hessian + damping*I is singular or indefinite\nmore")

    monkeypatch.setitem(registry.METHODS, "refuses", registry.MethodSpec(
        lambda task, b: jattri.Attributor(refuse, None, None)))
    out = tmp_path / "rows.json"
    rc = bench.main(["--setting", "digits_tiny", "--methods", "refuses,grad_dot",
                     "--cache", str(tmp_path), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [r["method"] for r in rows] == ["refuses", "grad_dot"]
    assert rows[0]["lds"] is None
    assert rows[0]["note"] == "failed: Hessian + damping*I is singular or indefinite"
    assert rows[1]["lds"] is not None  # the run went on

    monkeypatch.setitem(registry.METHODS, "refuses", registry.MethodSpec(
        lambda task, b: jattri.Attributor(refuse, None, None),
        skip=(("digits_tiny", "known to refuse"),)))
    assert bench.run_method(benchmark.load("digits_tiny", cache=str(tmp_path), progress=None),
                            "refuses")["note"] == "skipped: known to refuse"


def test_unknown_setting():
    with pytest.raises(ValueError, match="unknown benchmark setting"):
        benchmark.load("mnist_lr_typo")
    with pytest.raises(SystemExit) as info:
        bench.main(["--methods", "nope"])
    assert info.value.code == 2


def test_sub_model_default_damping_is_the_whole_models(tmp_path, monkeypatch):
    """The registry's top-layer influence (fc3 only, the rest held in aux) defaults to
    the stationary L2 of the whole model, not of fc3 alone (issue 12)."""
    from jattri.benchmark import registry
    tiny_mlp = dataclasses.replace(TINY, model="mlp", epochs=20, batch_size=20,
                                   learning_rate=3e-3, weight_decay=1e-3, num_full=1)
    monkeypatch.setitem(digits.SETTINGS, "digits_tiny_mlp", tiny_mlp)
    b = benchmark.load("digits_tiny_mlp", cache=str(tmp_path), progress=None)
    attr = registry._on_layers(jattri.influence_explicit, ("fc3",), b, curvature="ggn")
    members = jattri.checkpoints(b.models_full[:1])
    state = attr.cache(members, b.train)
    whole = float(jattri.stationary_damping(b.loss_fn, members, b.train))
    params = members.params
    fc3_task = jattri.Task.from_member_fns(lambda p, z, i, a: b.loss_fn({**a, **p}, z))
    own = float(jattri.stationary_damping(fc3_task, jattri.Members(
        {"fc3": params["fc3"]}, {k: v for k, v in params.items() if k != "fc3"}, num=1),
        b.train))
    assert abs(own - whole) > 0.05 * whole  # fc3's own estimate differs
    np.testing.assert_allclose(float(state.damping), whole, rtol=1e-6)  # cached at it
    scores = attr.attribute(state, b.test)
    np.testing.assert_allclose(scores, attr.attribute(state, b.test, damping=whole),
                               rtol=1e-5)
    assert not np.allclose(scores, attr.attribute(state, b.test, damping=own), rtol=1e-3)
    np.testing.assert_allclose(attr.self_attribute(state),
                               np.diag(np.asarray(attr.attribute(state, b.train))), rtol=1e-5)
