"""Figures of attribution results (matplotlib, the optional ``plot`` extra).

``pip install "jattri[plot]"``. matplotlib is imported when a function is called, so
``import jattri`` works without it. Every function returns a
``matplotlib.figure.Figure`` and never calls ``plt.show()``: save it with
``fig.savefig(path)``, or let a notebook display it.

    top = attr.attribute(state, test, top_k=5, lowest=True)
    fig = jattri.plot.top_examples(top, [0, 1, 2], images=x_train.reshape(-1, 8, 8),
                                   test_images=x_test.reshape(-1, 8, 8))
    fig = jattri.plot.top_texts(top, [0, 1], texts=train_texts, test_texts=test_texts)
    fig = jattri.plot.mislabel_curve(attr.self_attribute(state), is_flipped)
"""
from __future__ import annotations

import textwrap
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jattri import metrics
from jattri.engine import TopK

HELPS, HARMS = "tab:green", "tab:red"


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # the extra is optional: say which one to install
        raise ImportError("jattri.plot needs matplotlib, the optional `plot` extra: "
                          "pip install \"jattri[plot]\" (or pip install matplotlib)") from err
    return plt


def _int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an int, got {value!r}")
    return int(value)


def _test_indices(test_index: Any, n_test: int) -> np.ndarray:
    index = np.asarray(test_index)
    if index.size == 0:
        raise ValueError("`test_index` is empty: give at least one test example")
    if index.ndim > 1 or index.dtype.kind not in "iu":
        raise ValueError(f"`test_index` must be an int or a 1-D sequence of ints, got "
                         f"{test_index!r}")
    out = index.reshape(-1).astype(np.int64)
    bad = out[(out < 0) | (out >= n_test)]
    if bad.size:
        raise ValueError(f"`test_index` {int(bad[0])} is out of range [0, {n_test}) "
                         f"(n_test = {n_test})")
    return out


def ranked(scores_or_topk: Any, test_index: Any, k: int = 3, *, harmful: bool = True):
    """The k most helpful (and most harmful) training examples of some test examples.

    Args:
      scores_or_topk: dense ``(n_train, n_test)`` scores, or a :class:`jattri.TopK`
        (``indices`` ``(n_test, K)``, K ≥ k; with ``lowest=True`` for ``harmful``).
      test_index: an int or a sequence of R ints in ``[0, n_test)``.
      k: examples per side. harmful: also return the k lowest-scored (most harmful).
    Returns:
      ``(tests (R,), helpful (R, k), helpful_scores (R, k), harmful (R, k) | None,
      harmful_scores (R, k) | None)``, best first on each side (``helpful`` by
      decreasing score, ``harmful`` by increasing score), ties broken by index.
    """
    k = _int(k, "k")
    if isinstance(scores_or_topk, TopK):
        top = scores_or_topk
        indices, top_scores = np.asarray(top.indices), np.asarray(top.scores)
        if indices.ndim != 2 or top_scores.shape != indices.shape:
            raise ValueError("`scores_or_topk` TopK needs `indices` and `scores` of one "
                             f"shape (n_test, K), got {indices.shape} and {top_scores.shape}")
        if not 1 <= k <= indices.shape[1]:
            raise ValueError(f"`k`={k} must lie in [1, {indices.shape[1]}], the K of the TopK")
        tests = _test_indices(test_index, indices.shape[0])
        if harmful and top.lowest_indices is None:
            raise ValueError("`scores_or_topk` has no harmful examples: query it with "
                             "attribute(..., top_k=K, lowest=True), or pass harmful=False")
        low = (np.asarray(top.lowest_indices)[tests, :k], np.asarray(top.lowest_scores)[tests, :k]
               ) if harmful else (None, None)
        return (tests, indices[tests, :k], top_scores[tests, :k]) + low
    scores = np.asarray(scores_or_topk)
    if scores.ndim != 2:
        raise ValueError("`scores_or_topk` must be (n_train, n_test) scores or a "
                         f"jattri.TopK, got an array of shape {scores.shape}")
    n_train, n_test = scores.shape
    if not 1 <= k <= n_train:
        raise ValueError(f"`k`={k} must lie in [1, {n_train}] (n_train)")
    tests = _test_indices(test_index, n_test)
    cols = scores[:, tests].T  # (R, n_train)
    if np.isnan(cols).any():
        raise ValueError("`scores_or_topk` has NaN scores for the chosen test examples")
    helpful = np.argsort(-cols, axis=1, kind="stable")[:, :k]
    out = (tests, helpful, np.take_along_axis(cols, helpful, 1))
    if not harmful:
        return out + (None, None)
    harm = np.argsort(cols, axis=1, kind="stable")[:, :k]
    return out + (harm, np.take_along_axis(cols, harm, 1))


def _check_items(items: Any, name: str, n: Optional[int], needed: int, text: bool):
    if items is None:
        return None
    if text:
        if isinstance(items, str) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"`{name}` must be a sequence of strings")
        size = len(items)
    else:
        items = np.asarray(items)
        if items.ndim not in (3, 4):
            raise ValueError(f"`{name}` must be (n, H, W) or (n, H, W, C) images, got shape "
                             f"{items.shape}; reshape flat pixels first")
        size = items.shape[0]
    if n is not None and size != n:
        raise ValueError(f"`{name}` has {size} examples, the scores have {n}")
    if size < needed:
        raise ValueError(f"`{name}` has {size} examples, but index {needed - 1} is needed")
    return items


def _check_labels(labels: Any, name: str, n: Optional[int], needed: int):
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must be (n,), got shape {labels.shape}")
    return _check_items(list(map(str, labels.tolist())), name, n, needed, text=True)


def top_examples(scores_or_topk: Any, test_index: Any, *, k: int = 3, harmful: bool = True,
                 images: Any = None, test_images: Any = None,
                 texts: Optional[Sequence[str]] = None,
                 test_texts: Optional[Sequence[str]] = None,
                 show: Optional[Callable] = None,
                 labels: Any = None, test_labels: Any = None,
                 cmap: str = "gray_r", max_chars: int = 200, cell_size: Any = None):
    """Grid of test examples with their most helpful and most harmful training examples.

    Row r shows test example ``test_index[r]``, then its k highest-scored training
    examples (titled ``helps #i``, green) and, with ``harmful``, its k lowest-scored
    (``harms #i``, red), each with its score below. Examples are drawn from exactly one
    source (or, with none, only titled):

    - ``images``: ``(n_train, H, W)`` or ``(n_train, H, W, C)``; ``test_images``
      ``(n_test, ...)`` for the test column (e.g. digits: ``x.reshape(-1, 8, 8)``);
    - ``texts``: n_train strings (and ``test_texts``), wrapped, cut at ``max_chars``;
    - ``show``: ``show(ax, split, index)`` draws example ``index`` of ``split``
      (``"train"`` or ``"test"``) into the matplotlib Axes ``ax``.

    Args:
      scores_or_topk: dense ``(n_train, n_test)`` scores, or a :class:`jattri.TopK`
        (from ``attribute(..., top_k=K, lowest=True)``, K ≥ k); both give the same
        figure.
      test_index: an int or R ints in ``[0, n_test)``: one row each.
      k: training examples per side. harmful: add the k most harmful.
      labels, test_labels: optional ``(n_train,)`` / ``(n_test,)`` labels shown as
        ``y=...`` in the titles.
      cmap: colour map of single-channel images. cell_size: ``(w, h)`` inches per cell.
    Returns:
      a ``matplotlib.figure.Figure`` with R × (1 + k + k·harmful) Axes, row-major.
    """
    tests, helpful, helpful_scores, harm, harm_scores = ranked(
        scores_or_topk, test_index, k, harmful=harmful)
    sources = [name for name, v in (("images", images), ("texts", texts), ("show", show))
               if v is not None]
    if len(sources) > 1:
        raise ValueError(f"give one of `images`, `texts`, `show`, not {' and '.join(sources)}")
    if test_images is not None and images is None:
        raise ValueError("`test_images` needs `images` for the training examples")
    if test_texts is not None and texts is None:
        raise ValueError("`test_texts` needs `texts` for the training examples")
    if show is not None and not callable(show):
        raise ValueError(f"`show` must be callable as show(ax, split, index), got {show!r}")
    max_chars = _int(max_chars, "max_chars")
    dense = not isinstance(scores_or_topk, TopK)
    n_train, n_test = np.shape(scores_or_topk) if dense else (None, None)
    if not dense:
        n_test = np.shape(scores_or_topk.indices)[0]
    picked = [helpful] + ([harm] if harmful else [])
    need_train = int(max(p.max() for p in picked)) + 1
    if min(p.min() for p in picked) < 0:
        raise ValueError("`scores_or_topk` has negative training indices (an empty TopK?)")
    need_test = int(tests.max()) + 1
    images = _check_items(images, "images", n_train, need_train, text=False)
    test_images = _check_items(test_images, "test_images", n_test, need_test, text=False)
    texts = _check_items(texts, "texts", n_train, need_train, text=True)
    test_texts = _check_items(test_texts, "test_texts", n_test, need_test, text=True)
    labels = _check_labels(labels, "labels", n_train, need_train)
    test_labels = _check_labels(test_labels, "test_labels", n_test, need_test)

    def draw(ax, split, index):
        pool = {"train": (images, texts), "test": (test_images, test_texts)}[split]
        if show is not None:
            show(ax, split, index)
        elif pool[0] is not None:
            img = pool[0][index]
            ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img,
                      cmap=cmap if img.ndim == 2 or img.shape[-1] == 1 else None,
                      interpolation="nearest")
        elif pool[1] is not None:
            text = pool[1][index]
            text = text if len(text) <= max_chars else text[:max_chars - 1] + "…"
            ax.text(0.03, 0.97, "\n".join(textwrap.wrap(text, 28, replace_whitespace=True)
                                          or [""]),
                    va="top", ha="left", fontsize=7, family="monospace",
                    transform=ax.transAxes, clip_on=True)
        ax.set_xticks([])
        ax.set_yticks([])

    def title(role, index, lab):
        return f"{role} #{index}" + ("" if lab is None else f"\ny={lab[index]}")

    plt = _pyplot()
    rows, cols = len(tests), 1 + k * (1 + bool(harmful))
    text_mode = texts is not None
    w, h = cell_size if cell_size is not None else ((2.2, 2.0) if text_mode else (1.3, 1.6))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False,
                             constrained_layout=True)
    for r, t in enumerate(tests):
        ax = axes[r, 0]
        draw(ax, "test", int(t))
        ax.set_title(title("test", int(t), test_labels), fontsize=8, fontweight="bold")
        sides = [("helps", helpful, helpful_scores, HELPS)]
        if harmful:
            sides.append(("harms", harm, harm_scores, HARMS))
        for s, (role, idx, sc, colour) in enumerate(sides):
            for j in range(k):
                ax = axes[r, 1 + s * k + j]
                i = int(idx[r, j])
                draw(ax, "train", i)
                ax.set_title(title(role, i, labels), fontsize=8, color=colour)
                ax.set_xlabel(f"{float(sc[r, j]):+.3g}", fontsize=7)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
    return fig


def _one_line(text: str, max_chars: int) -> str:
    text = text.replace("\n", "↵").replace("\t", "→")
    return text if len(text) <= max_chars else text[:max_chars - 1] + "…"


def top_texts(scores_or_topk: Any, test_index: Any, texts: Sequence[str],
              test_texts: Optional[Sequence[str]] = None, *, k: int = 3,
              harmful: bool = True, max_chars: int = 90, width: float = 9.0):
    """Test texts with their most helpful and most harmful training texts, one line each.

    For each test example ``test_index[r]``: a bold line ``test #t: <text>``, then its k
    highest-scored training examples (``helps #i <score>  <text>``, green) and, with
    ``harmful``, its k lowest-scored (``harms #i``, red), in the order of :func:`ranked`.
    Texts are shown on one line (newline as ↵, tab as →), cut at ``max_chars``: the form
    for short texts, such as the blocks of a language model, that the image grid of
    :func:`top_examples` would leave mostly empty.

    Args:
      scores_or_topk: dense ``(n_train, n_test)`` scores or a :class:`jattri.TopK`.
      test_index: an int or R ints in ``[0, n_test)``.
      texts: n_train strings. test_texts: n_test strings (``None``: titles only).
      k: training examples per side. width: figure width in inches.
    Returns:
      a ``matplotlib.figure.Figure`` with one Axes (axis off) holding
      R·(1 + k·(1 + harmful)) text lines, top to bottom.
    """
    tests, helpful, helpful_scores, harm, harm_scores = ranked(
        scores_or_topk, test_index, k, harmful=harmful)
    max_chars = _int(max_chars, "max_chars")
    if max_chars < 2:
        raise ValueError(f"`max_chars` must be at least 2, got {max_chars}")
    if isinstance(scores_or_topk, TopK):
        n_train, n_test = None, np.shape(scores_or_topk.indices)[0]
    else:
        n_train, n_test = np.shape(scores_or_topk)
    picked = [helpful] + ([harm] if harmful else [])
    texts = _check_items(texts, "texts", n_train, int(max(p.max() for p in picked)) + 1,
                         text=True)
    if texts is None:
        raise ValueError("`texts` is required: the n_train training texts")
    test_texts = _check_items(test_texts, "test_texts", n_test, int(tests.max()) + 1,
                              text=True)
    lines = []  # (text, colour, weight)
    for r, t in enumerate(tests):
        shown = "" if test_texts is None else ": " + _one_line(test_texts[t], max_chars)
        lines.append((f"test #{t}{shown}", "black", "bold"))
        sides = [("helps", helpful, helpful_scores, HELPS)]
        if harmful:
            sides.append(("harms", harm, harm_scores, HARMS))
        for role, idx, sc, colour in sides:
            for j in range(k):
                i = int(idx[r, j])
                lines.append((f"  {role} #{i:<5d} {float(sc[r, j]):+10.3g}  "
                              f"{_one_line(texts[i], max_chars)}", colour, "normal"))
    plt = _pyplot()
    fig = plt.figure(figsize=(width, 0.2 * len(lines) + 0.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for n, (line, colour, weight) in enumerate(lines):
        ax.text(0.01, 1 - (n + 0.5) / len(lines), line, color=colour, fontweight=weight,
                family="monospace", fontsize=8, va="center", ha="left",
                transform=ax.transAxes)
    return fig


def mislabel_curve(self_scores: Any, flipped: Any, *, ax: Any = None):
    """Mislabel detection: share of flipped labels found against share of the training
    set inspected, examples inspected by decreasing self-influence.

    found(f) = |{flipped among the ⌈f·n⌉ highest self-scores}| / |flipped|. A random
    order gives the diagonal; a perfect one reaches 1 after inspecting the flipped
    share. The legend holds each curve's ROC AUC (:func:`jattri.metrics.mislabel_auc`).

    Args:
      self_scores: ``(n,)`` self-influence (``attributor.self_attribute(state)``), or a
        mapping ``{name: (n,) scores}`` for one curve per method.
      flipped: ``(n,)`` bool (or 0/1), True where the training label was flipped.
      ax: a matplotlib Axes to draw into (default: a new figure).
    Returns:
      the ``matplotlib.figure.Figure`` holding the plot.
    """
    curves = dict(self_scores) if isinstance(self_scores, Mapping) else {None: self_scores}
    if not curves:
        raise ValueError("`self_scores` is an empty mapping")
    flipped = np.asarray(flipped)
    if flipped.ndim != 1:
        raise ValueError(f"`flipped` must be (n,), got shape {flipped.shape}")
    if flipped.dtype != np.bool_:
        if not np.all(np.isin(flipped, (0, 1))):
            raise ValueError("`flipped` must be boolean (or 0/1)")
        flipped = flipped.astype(bool)
    n, n_flipped = flipped.size, int(flipped.sum())
    if n_flipped == 0 or n_flipped == n:
        raise ValueError("`flipped` needs both flipped and clean examples")
    checked = {}
    for name, s in curves.items():
        arg = "self_scores" if name is None else f"self_scores[{name!r}]"
        s = np.asarray(s, dtype=np.float64)
        if s.shape != flipped.shape:
            raise ValueError(f"`{arg}` must be (n,) = {flipped.shape} like `flipped`, got "
                             f"shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"`{arg}` contains NaN or inf")
        checked[name] = s

    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.8, 4.0), constrained_layout=True)
    else:
        fig = ax.figure
    inspected = np.arange(n + 1) / n
    for name, s in checked.items():
        order = np.argsort(-s, kind="stable")
        found = np.concatenate([[0.0], np.cumsum(flipped[order]) / n_flipped])
        auc = metrics.mislabel_auc(s, flipped)
        ax.plot(inspected, found,
                label=f"{'self-influence' if name is None else name} (AUC {auc:.3f})")
    share = n_flipped / n
    ax.plot([0, share, 1], [0, 1, 1], color="0.6", ls=":", lw=1, label="perfect")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="random (AUC 0.5)")
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    return fig
