"""LDS and LOO correlation against hand-computed values."""
import numpy as np

from jattri.metrics import lds, loo_corr


def test_lds_hand_example():
    scores = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, -1.0], [8.0, 3.0]])
    subsets = np.array([[0, 1], [0, 2], [1, 3], [2, 3]])
    # Column 0: predicted sums 3, 5, 10, 12 -> ranks 1, 2, 3, 4.
    # Column 1: predicted sums 1, -1, 4, 2  -> ranks 2, 1, 4, 3.
    targets = np.array([[0.1, 5.0], [0.2, 6.0], [0.4, 7.0], [0.3, 8.0]])
    # target ranks: column 0: 1, 2, 4, 3; column 1: 1, 2, 3, 4.
    got = lds(scores, subsets, targets)
    spearman = lambda a, b: 1 - 6 * np.sum((np.array(a) - np.array(b)) ** 2) / (4 * (16 - 1))
    np.testing.assert_allclose(got, [spearman([1, 2, 3, 4], [1, 2, 4, 3]),
                                     spearman([2, 1, 4, 3], [1, 2, 3, 4])])
    np.testing.assert_allclose(got, [0.8, 0.6])


def test_lds_constant_column_is_nan():
    scores = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    subsets = np.array([[0], [1], [2]])
    got = lds(scores, subsets, np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert got[0] == 1.0 and np.isnan(got[1])


def test_loo_corr_sign_and_value():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 3))
    removed = np.arange(5, 15)
    # Removing helpful examples lowers the utility: utility = c - a * score.
    targets = 2.0 - 0.5 * scores[removed] + 0.01 * rng.normal(size=(10, 3))
    got = loo_corr(scores, removed, targets)
    want = [np.corrcoef(scores[removed, t], -targets[:, t])[0, 1] for t in range(3)]
    np.testing.assert_allclose(got, want)
    assert np.all(got > 0.99)
