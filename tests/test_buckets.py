"""Test sets padded to a few sizes (issue 15: "pad or bucket example counts to a few
sizes, so ... every later call share one program"): ``attribute`` runs a test set of n
examples as ``engine.bucket_size(n)`` rows and returns the n real ones' scores, equal to
the unpadded call's; a later call whose count falls in the same bucket compiles none of
the method's programs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from jattri import engine
from test_compile_sharing import METHODS, compiled_programs, small_logits
from test_ensemble import init_mlp, mlp_data, mlp_loss


def test_bucket_sizes():
    """n itself up to 16; above, eight sizes per doubling, each at most n/8 above n,
    and a bucket is its own bucket."""
    sizes = np.array([engine.bucket_size(n) for n in range(1, 4097)])
    n = np.arange(1, 4097)
    assert np.array_equal(sizes[:16], n[:16])
    assert np.all(sizes >= n) and np.all(sizes[16:] - n[16:] < n[16:] / 8)
    assert all(engine.bucket_size(b) == b for b in set(sizes.tolist()))
    for e in range(5, 13):  # counts in (2^(e-1), 2^e]
        assert len(set(sizes[2 ** (e - 1):2 ** e].tolist())) == 8
    assert engine.bucket_size(500) == 512 and engine.bucket_size(481) == 512
    assert engine.bucket_size(480) == 480


def test_which_test_sets_are_padded(monkeypatch):
    x = np.zeros((21, 3))
    assert engine.padded_count((x, np.zeros(21)), 30, None) == 22
    assert engine.padded_count((x, np.zeros(20)), 30, None) is None  # sizes disagree
    assert engine.padded_count(np.zeros((22, 3)), 30, None) is None  # already a bucket
    assert engine.padded_count(x, None, None) is None  # dense scores, n_train unknown
    assert engine.padded_count(x, None, 5) == 22       # top-k: always
    assert engine.padded_count(engine.stream(iter([x])), 30, 5) is None
    assert engine.padded_count((x, 3.0), 30, None) is None  # the method names the fault
    monkeypatch.setattr(engine, "BUCKET_MAX_SCORES", 30 * 22 - 1)
    assert engine.padded_count(x, 30, None) is None
    assert engine.padded_count(x, 30, 5) == 22
    monkeypatch.setattr(engine, "TEST_BUCKETS", False)
    assert engine.padded_count(x, 30, 5) is None


def test_padding_repeats_the_last_example():
    x, y = np.arange(6.0).reshape(3, 2), np.arange(3)
    for data in ((x, y), (jnp.asarray(x), jnp.asarray(y))):
        px, py = engine.pad_examples(data, 5)
        assert type(px) is type(data[0])
        np.testing.assert_array_equal(px, np.concatenate([x, x[[2, 2]]]))
        np.testing.assert_array_equal(py, [0, 1, 2, 2, 2])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_padded_test_sets_score_as_given(name, monkeypatch):
    """21 test examples run as 22: dense, top-k (with the lowest) and jitted scores
    equal those of the unpadded call, and have 21 columns / rows."""
    members = jattri.checkpoints([init_mlp(jax.random.PRNGKey(0)),
                                  init_mlp(jax.random.PRNGKey(1))])
    train, test = mlp_data(jax.random.PRNGKey(2), 13), mlp_data(jax.random.PRNGKey(3), 21)
    attr = METHODS[name](jattri.Task(mlp_loss), small_logits)
    state = attr.cache(members, train)
    assert engine.padded_count(test, 13, None) == 22
    got = (attr.attribute(state, test), attr.attribute(state, test, top_k=3, lowest=True),
           jax.jit(attr.attribute)(state, test))
    monkeypatch.setattr(engine, "TEST_BUCKETS", False)
    dense, top = attr.attribute(state, test), attr.attribute(state, test, top_k=3, lowest=True)
    assert got[0].shape == got[2].shape == (13, 21) and got[1].indices.shape == (21, 3)
    scale = float(jnp.max(jnp.abs(dense)))
    np.testing.assert_allclose(got[0], dense, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(got[2], dense, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(got[1], top):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["trak", "influence_ekfac", "tracin"])
def test_a_later_count_in_the_bucket_compiles_only_the_padding(name, monkeypatch):
    """After 24 test examples, 23 (numpy, then jax arrays) run the programs already
    compiled: what compiles is the padding of jax arrays and the trimming of the scores.
    Without buckets the same calls compile the method's programs again."""
    members = jattri.checkpoints([init_mlp(jax.random.PRNGKey(0), d_in=9),
                                  init_mlp(jax.random.PRNGKey(1), d_in=9)])
    train = mlp_data(jax.random.PRNGKey(2), 17, d_in=9)
    test = mlp_data(jax.random.PRNGKey(3), 24, d_in=9)
    attr = METHODS[name](jattri.Task(mlp_loss), small_logits)
    state = attr.cache(members, train)
    attr.attribute(state, test)
    smaller = (jax.tree_util.tree_map(lambda x: np.asarray(x)[:23], test),
               jax.tree_util.tree_map(lambda x: x[:23], test))
    with compiled_programs() as names:
        for data in smaller:
            assert attr.attribute(state, data).shape == (17, engine.num_examples(data))
    assert set(names) <= {"_repeat_last", "_leading"}, f"{name}: compiled {names}"
    monkeypatch.setattr(engine, "TEST_BUCKETS", False)
    with compiled_programs() as names:
        attr.attribute(state, smaller[0])
    assert set(names) - {"_repeat_last", "_leading"}, f"{name}: nothing compiled unpadded"
