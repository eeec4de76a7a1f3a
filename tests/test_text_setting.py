"""The embedded generative setting (text_nanogpt) on a tiny configuration: data,
vmapped retraining, cached ground truth, methods through the bench runner."""
import dataclasses
import json

import numpy as np
import pytest

from jattri import bench, benchmark
from jattri.benchmark import text

TINY = text.TextConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=16,
                       epochs=3, batch_size=8, learning_rate=1e-2, num_full=2,
                       num_subsets=6, num_seeds=2, n_train=32, n_test=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny setting, built once into a temp cache: ``(benchmark, cache_dir)``."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(text.SETTINGS, "text_tiny", TINY)
        yield benchmark.load("text_tiny", cache=str(cache), progress=None), cache


def test_split_is_deterministic_and_built_from_the_text():
    train, test = text.text_split(TINY)
    again = text.text_split(TINY)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert train.shape == (32, 9) and test.shape == (6, 9) and train.dtype == np.int32
    assert 0 <= train.min() and train.max() < TINY.vocab_size
    # Obviously-correct reference: cut the id sequence into 9-id blocks, permute by seed.
    ids = text.char_ids(text._text(), TINY.vocab_size)
    blocks = ids[:len(ids) // 9 * 9].reshape(-1, 9)
    perm = np.random.default_rng(0).permutation(len(blocks))
    np.testing.assert_array_equal(train, blocks[perm[:32]])
    np.testing.assert_array_equal(test, blocks[perm[32:38]])
    other, _ = text.text_split(dataclasses.replace(TINY, split_seed=1))
    assert not np.array_equal(train, other)
    # The most frequent character gets id 0, characters outside the vocabulary the last.
    counts = np.bincount(ids, minlength=TINY.vocab_size)
    assert np.all(np.diff(counts[:-1]) <= 0) and counts[-1] > 0


def test_tiny_setting_shapes_targets_and_cache(tiny, monkeypatch):
    b, cache = tiny
    assert len(b.models_full) == 2 and len(b.models_half) == 6
    assert b.train.shape == (32, 9) and b.test.shape == (6, 9)
    subsets, targets = b.lds
    assert subsets.shape == (6, 16) and targets.shape == (6, 6)
    assert np.isfinite(targets).all()
    # targets are utilities: minus the test loss of the half models (mean over 2 seeds)
    util0 = -np.mean([float(b.loss_fn(b.models_half[0], z)) for z in b.test])
    assert abs(util0 - targets[0].mean()) < 0.2 * abs(util0)
    z = b.train[0]
    assert float(b.loss_fn(b.models_full[0], z)) == float(b.loss_fn(b.models_full[0], z, None))
    assert len(list(cache.glob("text_tiny-*.npz"))) == 1

    def no_training(*a, **k):
        raise AssertionError("trained although the ground truth is cached")

    monkeypatch.setattr(text, "train_models", no_training)
    again = benchmark.load("text_tiny", cache=str(cache), progress=None)
    np.testing.assert_array_equal(again.lds[1], targets)
    np.testing.assert_array_equal(np.asarray(again.models_full[1]["wte"]["embedding"]),
                                  np.asarray(b.models_full[1]["wte"]["embedding"]))
    # Another configuration is another cache entry: it would train.
    monkeypatch.setitem(text.SETTINGS, "text_tiny", dataclasses.replace(TINY, epochs=4))
    with pytest.raises(AssertionError, match="trained although"):
        benchmark.load("text_tiny", cache=str(cache), progress=None)


def test_methods_run_on_the_tiny_setting(tiny, tmp_path):
    b, cache = tiny
    for name in ("grad_dot", "trak_1"):
        row = bench.run_method(b, name)
        assert row["lds"] is not None and np.isfinite(row["lds"]), row
        assert -1.0 <= row["lds"] <= 1.0
    named = dataclasses.replace(b, name="text_nanogpt")  # skips are keyed by setting
    for name in ("rps", "knn_shapley"):  # no class label per text block
        assert bench.run_method(named, name)["note"].startswith("skipped: needs one class label")

    # Through the CLI (ground truth from the cache; grad_dot's programs are shared,
    # since the setting's functions are the same objects on every load).
    out = tmp_path / "rows.json"
    assert bench.main(["--setting", "text_tiny", "--methods", "grad_dot", "--cache",
                       str(cache), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["method"] == "grad_dot" and np.isfinite(row["lds"])


def test_cli_accepts_text_nanogpt_and_refuses_label_experiments(capsys):
    args = bench.argparse.Namespace(setting="text_nanogpt,digits_lr", methods=None,
                                    mislabel=None, ensemble=False, json=None, cache=None)
    assert bench._validate(args)[0] == ["text_nanogpt", "digits_lr"]
    for extra in (["--mislabel", "0.1"], ["--ensemble"]):
        with pytest.raises(SystemExit) as info:
            bench.main(["--setting", "text_nanogpt"] + extra)
        assert info.value.code == 2
        assert "digits settings only" in capsys.readouterr().err
