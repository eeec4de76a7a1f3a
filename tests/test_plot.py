"""jattri.plot: the top-examples grid and the mislabel curve on small synthetic inputs."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from jattri import plot

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

N_TRAIN, N_TEST, K = 30, 6, 3


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(N_TRAIN, N_TEST)).astype(np.float32)  # distinct: no ties
    return {"scores": scores,
            "images": rng.random((N_TRAIN, 8, 8)), "test_images": rng.random((N_TEST, 8, 8)),
            "labels": rng.integers(0, 10, N_TRAIN), "test_labels": rng.integers(0, 10, N_TEST)}


def topk_of(scores, k):
    """A TopK as `attribute(..., top_k=k, lowest=True)` returns it, built from numpy."""
    hi = np.argsort(-scores, axis=0)[:k].T
    lo = np.argsort(scores, axis=0)[:k].T
    return jattri.TopK(hi, np.take_along_axis(scores.T, hi, 1),
                       lo, np.take_along_axis(scores.T, lo, 1))


def cell_indices(fig, role):
    return [int(m.group(1)) for ax in fig.axes
            for m in [re.match(rf"{role} #(\d+)", ax.get_title())] if m]


def content(fig):
    """Everything drawn: titles, score labels, image pixels, texts."""
    out = []
    for ax in fig.axes:
        out.append((ax.get_title(), ax.get_xlabel(),
                    [np.asarray(im.get_array()).tolist() for im in ax.get_images()],
                    [t.get_text() for t in ax.texts]))
    return out


def test_grid_holds_the_argsort_of_the_scores(data):
    tests = [0, 2, 5]
    fig = plot.top_examples(data["scores"], tests, k=K, images=data["images"],
                            test_images=data["test_images"], labels=data["labels"])
    assert len(fig.axes) == len(tests) * (1 + 2 * K)
    s = data["scores"][:, tests]
    helps = np.argsort(-s, axis=0)[:K].T.ravel().tolist()
    harms = np.argsort(s, axis=0)[:K].T.ravel().tolist()
    assert cell_indices(fig, "helps") == helps
    assert cell_indices(fig, "harms") == harms
    assert cell_indices(fig, "test") == tests
    jax_index = plot.top_examples(data["scores"], jnp.asarray(tests), k=K)
    assert cell_indices(jax_index, "helps") == helps
    ax = fig.axes[1]  # first helper of test 0: its pixels, its label, its score
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), data["images"][helps[0]])
    assert f"y={data['labels'][helps[0]]}" in ax.get_title()
    assert float(ax.get_xlabel()) == pytest.approx(data["scores"][helps[0], 0], rel=1e-2)
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(),
                                  data["test_images"][0])


def test_topk_and_dense_give_the_same_figure(data):
    kw = dict(k=K, images=data["images"], test_images=data["test_images"],
              labels=data["labels"], test_labels=data["test_labels"])
    dense = plot.top_examples(data["scores"], [1, 4], **kw)
    top = plot.top_examples(topk_of(data["scores"], K + 2), [1, 4], **kw)
    assert content(dense) == content(top)


def test_helpful_only_texts_and_show(data):
    texts = [f"train example number {i} " * 20 for i in range(N_TRAIN)]
    fig = plot.top_examples(data["scores"], 3, k=2, harmful=False, texts=texts,
                            test_texts=[f"test {t}" for t in range(N_TEST)], max_chars=50)
    assert len(fig.axes) == 1 + 2
    best = int(np.argmax(data["scores"][:, 3]))
    assert fig.axes[1].texts[0].get_text().startswith(f"train example number {best} ")
    assert len(fig.axes[1].texts[0].get_text().replace("\n", " ")) <= 50
    assert fig.axes[0].texts[0].get_text() == "test 3"

    calls = []
    fig = plot.top_examples(data["scores"], [0, 1], k=1,
                            show=lambda ax, split, i: calls.append((split, i)))
    assert len(fig.axes) == 2 * 3
    s = data["scores"][:, [0, 1]]
    assert calls == [("test", 0), ("train", int(s[:, 0].argmax())), ("train", int(s[:, 0].argmin())),
                     ("test", 1), ("train", int(s[:, 1].argmax())), ("train", int(s[:, 1].argmin()))]


@pytest.mark.parametrize("kwargs, name", [
    (dict(test_index=N_TEST), "test_index"),
    (dict(test_index=[0, -1]), "test_index"),
    (dict(test_index=[]), "test_index"),
    (dict(test_index=1.0), "test_index"),
    (dict(test_index=True), "test_index"),
    (dict(test_index=[[0, 1]]), "test_index"),
    (dict(k=0), "k"),
    (dict(k=N_TRAIN + 1), "k"),
    (dict(images=np.zeros((N_TRAIN - 1, 8, 8))), "images"),
    (dict(images=np.zeros((N_TRAIN, 64))), "images"),
    (dict(images=np.zeros((N_TRAIN, 8, 8)), test_images=np.zeros((N_TEST + 1, 8, 8))),
     "test_images"),
    (dict(texts=["a"] * (N_TRAIN + 1)), "texts"),
    (dict(labels=np.zeros(N_TRAIN - 2)), "labels"),
    (dict(images=np.zeros((N_TRAIN, 8, 8)), texts=["a"] * N_TRAIN), "images"),
    (dict(test_images=np.zeros((N_TEST, 8, 8))), "test_images"),
])
def test_bad_inputs_name_the_argument(data, kwargs, name):
    kwargs = {"test_index": 0, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        plot.top_examples(data["scores"], **kwargs)


def test_bad_scores(data):
    with pytest.raises(ValueError, match="`scores_or_topk`"):
        plot.top_examples(data["scores"][:, 0], 0)
    top = topk_of(data["scores"], K)
    with pytest.raises(ValueError, match="lowest=True"):
        plot.top_examples(top._replace(lowest_indices=None, lowest_scores=None), 0)
    with pytest.raises(ValueError, match="`k`"):
        plot.top_examples(top, 0, k=K + 1)
    with pytest.raises(ValueError, match="`test_index`"):
        plot.top_examples(top, N_TEST)
    with pytest.raises(ValueError, match="`images`"):  # a TopK index past the images
        plot.top_examples(top, 0, images=np.zeros((2, 8, 8)))


def test_mislabel_curve():
    rng = np.random.default_rng(1)
    flipped = np.zeros(40, bool)
    flipped[rng.choice(40, 8, replace=False)] = True
    good = flipped + 0.1 * rng.random(40)  # every flipped example first
    fig = plot.mislabel_curve({"good": good, "random": rng.random(40)}, flipped)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    auc = jattri.metrics.mislabel_auc(good, flipped)
    assert auc == 1.0 and "good (AUC 1.000)" in lines
    x, y = lines["good (AUC 1.000)"].get_data()
    assert x[0] == 0 and y[0] == 0 and x[-1] == 1 and y[-1] == 1
    np.testing.assert_allclose(y[8:], 1.0)  # 8 inspected = all 8 flipped found
    np.testing.assert_allclose(y[:9], np.arange(9) / 8)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("random (AUC ") for t in legend)

    _, ax2 = plt.subplots()
    assert plot.mislabel_curve(good, flipped.astype(int), ax=ax2) is ax2.figure
    assert ax2.get_lines()[0].get_label() == "self-influence (AUC 1.000)"


@pytest.mark.parametrize("args, name", [
    ((np.zeros(5), np.eye(4, dtype=bool)[0]), "self_scores"),
    ((np.zeros(5), np.zeros(5, bool)), "flipped"),
    ((np.zeros(5), np.full(5, 2)), "flipped"),
    ((np.array([0, 1, np.nan, 0, 0]), np.eye(5, dtype=bool)[0]), "self_scores"),
    (({"m": np.zeros(3)}, np.eye(5, dtype=bool)[0]), r"self_scores\['m'\]"),
])
def test_mislabel_curve_bad_inputs(args, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        plot.mislabel_curve(*args)


def test_import_without_matplotlib():
    """`jattri.plot` imports without matplotlib; calling it names the `plot` extra."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import numpy as np, jattri\n"
            "try:\n"
            "    jattri.plot.mislabel_curve(np.arange(4.0), np.array([1, 0, 0, 0]))\n"
            "except ImportError as e:\n"
            "    assert 'jattri[plot]' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_topk_of_a_method_matches_its_dense_scores():
    """A real `attribute(..., top_k, lowest=True)` and its dense scores: one figure."""
    rng = np.random.default_rng(2)
    train = (rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, 20))
    test = (rng.normal(size=(5, 4)).astype(np.float32), rng.integers(0, 3, 5))
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}

    def loss_fn(params, example):
        x, y = example
        return -jax.nn.log_softmax(x @ params["w"])[y]

    attr = jattri.grad_dot(loss_fn)
    state = attr.cache(params, train)
    dense = attr.attribute(state, test)
    top = attr.attribute(state, test, top_k=4, lowest=True)
    kw = dict(k=3, show=lambda ax, split, i: ax.text(0, 0, f"{split} {i}"))
    assert content(plot.top_examples(dense, [0, 3], **kw)) == \
        content(plot.top_examples(top, [0, 3], **kw))


def test_top_texts_lines_follow_the_ranking(data):
    texts = [f"train {i}\nline two" for i in range(N_TRAIN)]
    test_texts = [f"test {t}" for t in range(N_TEST)]
    tests = [1, 4]
    fig = plot.top_texts(data["scores"], tests, texts, test_texts, k=2)
    lines = [t.get_text() for t in fig.axes[0].texts]
    assert len(lines) == len(tests) * (1 + 2 * 2)
    s = data["scores"][:, tests]
    helps, harms = np.argsort(-s, axis=0)[:2].T, np.argsort(s, axis=0)[:2].T
    for r, t in enumerate(tests):
        block = lines[r * 5:(r + 1) * 5]
        assert block[0] == f"test #{t}: test {t}"
        for line, i in zip(block[1:3], helps[r]):
            assert re.match(rf"  helps #{i}\s", line) and line.endswith(f"train {i}↵line two")
            assert float(line.split()[2]) == pytest.approx(data["scores"][i, t], rel=1e-2)
        for line, i in zip(block[3:], harms[r]):
            assert re.match(rf"  harms #{i}\s", line)
    colours = [t.get_color() for t in fig.axes[0].texts]
    assert colours[1] == plot.HELPS and colours[3] == plot.HARMS
    # the TopK of the same scores gives the same lines; helpful only drops the red ones
    same = plot.top_texts(topk_of(data["scores"], 3), tests, texts, test_texts, k=2)
    assert [t.get_text() for t in same.axes[0].texts] == lines
    only = plot.top_texts(data["scores"], tests, texts, k=2, harmful=False, max_chars=6)
    got = [t.get_text() for t in only.axes[0].texts]
    assert len(got) == len(tests) * 3 and got[0] == f"test #{tests[0]}"
    assert all(line.endswith("…") and len(line.split("  ")[-1]) == 6 for line in got[1:3])


def test_top_texts_bad_inputs(data):
    with pytest.raises(ValueError, match="texts"):
        plot.top_texts(data["scores"], 0, ["a"] * (N_TRAIN - 1))
    with pytest.raises(ValueError, match="test_texts"):
        plot.top_texts(data["scores"], 0, ["a"] * N_TRAIN, ["b"] * (N_TEST + 1))
    with pytest.raises(ValueError, match="max_chars"):
        plot.top_texts(data["scores"], 0, ["a"] * N_TRAIN, max_chars=1)
