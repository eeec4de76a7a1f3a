"""load_dattri on folders in dattri's layout, and the local data readers.

The MNIST-LR/MLP fixtures (tests/fixtures/pt/dattri_mnist_*) were written by real torch
(tests/make_pt_fixtures.py): reference-architecture models trained on a tiny synthetic
MNIST, with LDS/LOO ground truth computed as dattri does. No torch is needed here.
"""
from __future__ import annotations

import gzip
import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import jattri
from jattri.benchmark import datasets
from jattri.benchmark.dattri import SETTINGS, load_dattri
from jattri.interop import CorruptFileError, UnsafePickleError, load_pt

FIX = Path(__file__).parent / "fixtures" / "pt"
LR, MLP, DATA = FIX / "dattri_mnist_lr", FIX / "dattri_mnist_mlp", FIX / "dattri_mnist_data"
MODELS = Path(__file__).parent / "fixtures" / "models"


@pytest.fixture(scope="module")
def lr_bench():
    return load_dattri(LR, "mnist_lr", data_root=DATA)


def _scores(bench, method=jattri.grad_dot, models=None):
    task = jattri.Task(bench.loss_fn, target_fn=bench.target_fn)
    attr = method(task)
    members = jattri.checkpoints(models or [bench.models_full[0]])
    return np.asarray(attr.attribute(attr.cache(members, bench.train), bench.test))


# --- a small hand-written .pt writer (for ground-truth files; no torch) ------------

_KIND = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
         np.dtype(np.int64): "LongStorage"}


def save_pt(path: Path, array) -> None:
    """torch.save(torch.from_numpy(array)) for a C-contiguous array, byte for byte in spirit."""
    a = np.ascontiguousarray(array)
    ints = lambda xs: b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"
    s = lambda t: b"X" + struct.pack("<I", len(t)) + t.encode()
    strides = [st // a.itemsize for st in a.strides]
    pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + b"(" + s("storage")
           + f"ctorch\n{_KIND[a.dtype]}\n".encode() + s("0") + s("cpu")
           + b"J" + struct.pack("<i", a.size) + b"tQ" + b"J\0\0\0\0" + ints(a.shape)
           + ints(strides) + b"\x89ccollections\nOrderedDict\n)R" + b"tR.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/data/0", a.tobytes())
        zf.writestr("archive/version", b"3\n")


def test_save_pt_helper_roundtrip(tmp_path):
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    save_pt(tmp_path / "a.pt", a)
    np.testing.assert_array_equal(load_pt(tmp_path / "a.pt"), a)


# --- MNIST LR / MLP end to end -----------------------------------------------------

def test_lr_loads_like_dattri(lr_bench):
    b = lr_bench
    assert len(b.models_full) == 3 and len(b.models_half) == 3
    assert b.models_full[0]["linear"]["kernel"].shape == (784, 10)
    x, y = b.train
    assert x.shape == (64, 784) and x.dtype == np.float32 and y.dtype == np.int32
    assert b.test[0].shape == (16, 784)
    subsets, targets = b.lds
    assert subsets.shape == (12, 32) and subsets.dtype == np.int64
    assert targets.shape == (12, 16)
    removed, loo_targets = b.loo
    np.testing.assert_array_equal(removed, np.arange(64))
    stored = load_pt(LR / "loo" / "target_values_loo.pt")
    np.testing.assert_array_equal(loo_targets, -stored.astype(np.float64))


def test_forward_matches_torch(lr_bench):
    want = np.load(LR / "expected.npz")
    for i, params in enumerate(lr_bench.models_full):
        got = np.asarray(lr_bench.apply_fn(params, lr_bench.test[0]))
        np.testing.assert_allclose(got, want[f"full_{i}"], atol=2e-5, rtol=1e-5)


def test_ground_truth_is_a_utility(lr_bench):
    # models_half[s] is the model of LDS subset s: its test loss must be −targets[s].
    subsets, targets = lr_bench.lds
    loss = jax.vmap(lr_bench.loss_fn, in_axes=(None, 0))
    for s, params in enumerate(lr_bench.models_half):
        np.testing.assert_allclose(-np.asarray(loss(params, lr_bench.test)), targets[s],
                                   rtol=1e-4, atol=1e-5)


def test_attribution_end_to_end(lr_bench):
    scores = _scores(lr_bench)
    assert scores.shape == (64, 16)
    lds = np.nanmean(jattri.metrics.lds(scores, *lr_bench.lds))
    loo = np.nanmean(jattri.metrics.loo_corr(scores, *lr_bench.loo))
    # With jattri's orientation a sound method scores positive; a flipped ground truth
    # would give about −0.8 and −0.6 here.
    assert lds > 0.5, lds
    assert loo > 0.3, loo


def test_mlp_end_to_end():
    b = load_dattri(MLP, "mnist_mlp", data_root=DATA)
    assert sorted(b.models_full[0]) == ["fc1", "fc2", "fc3"]
    want = np.load(MLP / "expected.npz")["full_0"]
    np.testing.assert_allclose(np.asarray(b.apply_fn(b.models_full[0], b.test[0])), want,
                               atol=2e-5, rtol=1e-5)
    assert b.loo is None
    example = jax.tree_util.tree_map(lambda a: a[0], b.test)
    with_dropout = b.loss_fn(b.models_full[0], example, jax.random.key(0))
    assert np.isfinite(with_dropout) and with_dropout != b.loss_fn(b.models_full[0], example)
    lds = np.nanmean(jattri.metrics.lds(_scores(b), *b.lds))
    assert lds > 0.3, lds


def test_limits_and_overrides():
    b = load_dattri(LR, "mnist_lr", data_root=DATA, num_full=1, num_half=0)
    assert len(b.models_full) == 1 and b.models_half == []
    train, test = datasets.load_mnist(DATA)
    b2 = load_dattri(LR, "mnist_lr", train=train, test=test, num_full=1, num_half=0)
    np.testing.assert_array_equal(b2.train[0], b.train[0])


# --- missing and corrupt files -----------------------------------------------------

def _copy_lr(tmp_path) -> Path:
    root = tmp_path / "mnist_lr"
    shutil.copytree(LR, root)
    return root


@pytest.mark.parametrize("remove,pattern", [
    ("lds/target_values_lds.pt", r"lds/target_values_lds\.pt not found"),
    ("lds/indices_lds.pt", r"lds/indices_lds\.pt not found"),
    ("models_full/1/model_weights_0.pt", r"models_full/1/model_weights_0\.pt not found"),
    ("models_half", r"models_half not found; expected .*models_half/<i>/model_weights_0"),
])
def test_missing_files_say_what_is_expected_where(tmp_path, remove, pattern):
    root = _copy_lr(tmp_path)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=pattern):
        load_dattri(root, "mnist_lr", data_root=DATA)


def test_missing_data_lists_the_places_looked_in(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*\n.*MNIST/raw"):
        load_dattri(LR, "mnist_lr", data_root=tmp_path)
    with pytest.raises(ValueError, match="unknown dattri setting"):
        load_dattri(LR, "mnist_cnn")
    with pytest.raises(ValueError, match="pass train=.*wikitext2|create_wikitext2_dataset"):
        load_dattri(LR, "wikitext2_gpt2", num_full=1)


def test_corrupt_ground_truth(tmp_path):
    root = _copy_lr(tmp_path)
    values = root / "lds" / "target_values_lds.pt"
    good = values.read_bytes()
    values.write_bytes(good[:100])
    with pytest.raises(CorruptFileError, match="target_values_lds.pt"):
        load_dattri(root, "mnist_lr", data_root=DATA)
    save_pt(values, np.zeros((12, 15), np.float32))  # wrong n_test
    with pytest.raises(CorruptFileError, match=r"expected shape \(S, n_test\) = \(12, 16\)"):
        load_dattri(root, "mnist_lr", data_root=DATA)
    save_pt(values, np.full((12, 16), np.nan, np.float32))
    with pytest.raises(CorruptFileError, match="NaN"):
        load_dattri(root, "mnist_lr", data_root=DATA)
    values.write_bytes(good)
    save_pt(root / "lds" / "indices_lds.pt", np.full((12, 32), 64, np.int64))
    with pytest.raises(CorruptFileError, match="outside the 64 training examples"):
        load_dattri(root, "mnist_lr", data_root=DATA)
    shutil.copy(LR / "lds" / "indices_lds.pt", root / "lds" / "indices_lds.pt")
    save_pt(root / "loo" / "indices_loo.pt", np.linspace(0, 1, 64))
    with pytest.raises(CorruptFileError, match="LOO indices must be integers"):
        load_dattri(root, "mnist_lr", data_root=DATA)
    evil = pickle.dumps({"x": _Reduce(print, ("hi",))}, protocol=2)
    with zipfile.ZipFile(root / "loo" / "indices_loo.pt", "w") as zf:
        zf.writestr("archive/data.pkl", evil)
    with pytest.raises(UnsafePickleError, match="builtins.print"):
        load_dattri(root, "mnist_lr", data_root=DATA)


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# --- the other architectures (part B's torch fixtures, small configs) ---------------

def _manifest(case):
    path = MODELS / "manifest.json"
    if not path.exists() or not (MODELS / f"{case}.pt").exists():
        pytest.skip("model fixtures of jattri.models not present")
    return json.loads(path.read_text())[case]["config"]


def _layout(tmp_path, case, n_train, n_test, loo=False) -> Path:
    root = tmp_path / case
    for kind in ("models_full", "models_half"):
        (root / kind / "0").mkdir(parents=True)
        shutil.copy(MODELS / f"{case}.pt", root / kind / "0" / "model_weights_0.pt")
    rng = np.random.default_rng(0)
    save_pt(root / "lds" / "indices_lds.pt",
            np.stack([np.sort(rng.permutation(n_train)[: n_train // 2]) for _ in range(4)]))
    save_pt(root / "lds" / "target_values_lds.pt", rng.normal(size=(4, n_test)).astype(np.float32))
    return root


def test_shakespeare_nanogpt_reads_config_and_text(tmp_path):
    cfg = _manifest("nanogpt")
    root = _layout(tmp_path, "nanogpt", n_train=2, n_test=2)
    rng = np.random.default_rng(0)
    chars = [chr(c) for c in range(48, 48 + 65)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text("".join(rng.choice(chars, 400)))
    train, test, _ = datasets.load_shakespeare_char(tmp_path / "data", cfg["block_size"])
    n_train, n_test = len(train[0]), len(test[0])
    assert (n_train, n_test) == (22, 2)
    save_pt(root / "lds" / "target_values_lds.pt", np.zeros((4, n_test), np.float32))
    save_pt(root / "lds" / "indices_lds.pt", np.tile(np.arange(n_train // 2), (4, 1)))
    b = load_dattri(root, "shakespeare_nanogpt", data_root=tmp_path / "data")
    assert b.info["model_config"]["n_embd"] == cfg["n_embd"]  # read from the checkpoint
    assert b.train[0].shape == (22, cfg["block_size"])
    io = np.load(MODELS / "nanogpt_io.npz")
    logits = np.asarray(jax.jit(b.apply_fn)(b.models_full[0], io["x"]))
    np.testing.assert_allclose(logits, io["logits"], atol=1e-4, rtol=1e-4)
    x, y = b.train[0][0], b.train[1][0]
    logits = np.asarray(jax.jit(b.apply_fn)(b.models_full[0], x[None]))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(jax.jit(b.loss_fn)(b.models_full[0], (x, y)),
                               -logp[np.arange(len(y)), y].mean(), rtol=1e-5)


def test_cifar2_resnet9_keeps_batch_stats_out_of_gradients(tmp_path):
    cfg = _manifest("resnet9")
    root = _layout(tmp_path, "resnet9", n_train=6, n_test=3)
    io = np.load(MODELS / "resnet9_io.npz")
    rng = np.random.default_rng(1)
    train = (rng.normal(size=(6, 3, cfg["image_size"], cfg["image_size"])).astype(np.float32),
             rng.integers(0, 2, 6).astype(np.int32))
    test = (io["x"], np.array([0, 1, 1], np.int32))
    b = load_dattri(root, "cifar2_resnet9", train=train, test=test,
                    model_config=dict(cfg, widths=tuple(cfg["widths"])))
    params = b.models_full[0]
    assert set(params) == {"params", "batch_stats"}
    np.testing.assert_allclose(np.asarray(jax.jit(b.apply_fn)(params, io["x"])), io["logits"],
                               atol=1e-4, rtol=1e-4)
    example = jax.tree_util.tree_map(lambda a: a[0], train)
    grads = jax.jit(jax.grad(b.loss_fn))(params, example)
    assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(grads["batch_stats"]))
    assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["params"]))


@pytest.mark.parametrize("case,name", [("gpt2", "wikitext2_gpt2"),
                                       ("music_transformer", "maestro_musictransformer")])
def test_token_models_forward_and_loss(tmp_path, case, name):
    cfg = _manifest(case)
    io = np.load(MODELS / f"{case}_io.npz")
    ids = io["x"].astype(np.int32)
    root = _layout(tmp_path, case, n_train=len(ids), n_test=len(ids))
    b = load_dattri(root, name, train=(ids, ids), test=(ids, ids), model_config=cfg)
    logits = np.asarray(jax.jit(b.apply_fn)(b.models_full[0], ids))
    np.testing.assert_allclose(logits, io["logits"], atol=1e-4, rtol=1e-4)
    logp = logits.astype(np.float64)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    y = ids[0]
    if case == "gpt2":  # HF: mean CE of tokens 1.. predicted from 0..
        want = -logp[0, np.arange(len(y) - 1), y[1:]].mean()
    else:  # dattri's Music Transformer target: CE of the last position (pad ignored)
        want = 0.0 if y[-1] == 389 else -logp[0, -1, y[-1]]
    np.testing.assert_allclose(jax.jit(b.loss_fn)(b.models_full[0], (ids[0], y)), want,
                               rtol=1e-5)


def test_settings_cover_the_published_benchmark():
    assert set(SETTINGS) == {"mnist_lr", "mnist_mlp", "cifar2_resnet9", "shakespeare_nanogpt",
                             "maestro_musictransformer", "wikitext2_gpt2"}


# --- data readers -------------------------------------------------------------------

def _idx_bytes(a: np.ndarray, code=0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) \
        + a.astype(a.dtype.newbyteorder(">")).tobytes()


def test_read_idx_plain_gz_and_corrupt(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(a))
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(_idx_bytes(a))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a"), a)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), a)
    f32 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "f").write_bytes(_idx_bytes(f32, 0x0D))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "f"), f32)
    (tmp_path / "t").write_bytes(_idx_bytes(a)[:-1])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        datasets.read_idx(tmp_path / "t")
    (tmp_path / "m").write_bytes(b"\x01\x02\x03\x04" + bytes(10))
    with pytest.raises(CorruptFileError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "m")
    (tmp_path / "g.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CorruptFileError, match="cannot read IDX"):
        datasets.read_idx(tmp_path / "g.gz")


def test_mnist_normalisation_like_torchvision():
    (x, y), (xt, _) = datasets.load_mnist(DATA)
    raw = datasets.read_idx(DATA / "train-images-idx3-ubyte.gz").reshape(64, -1)
    np.testing.assert_allclose(x, (raw / 255.0 - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    assert y.dtype == np.int32 and y.max() < 10 and xt.shape == (16, 784)


def _cifar_arrays(seed, n):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), list(rng.integers(0, 10, n))


def _py2_cifar_pickle(data: np.ndarray, labels) -> bytes:
    """A batch as Python 2's cPickle (protocol 2) writes it: str keys and raw bytes as
    SHORT_BINSTRING/BINSTRING, numpy arrays via _reconstruct + BUILD."""
    def pystr(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else \
            (b"T" + struct.pack("<i", len(b)) + b)
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
           + b"K\x00\x85" + pystr(b"b") + b"\x87R"
           + b"(K\x01" + b"(J" + struct.pack("<i", data.shape[0]) + b"M" + struct.pack("<H", 3072)
           + b"t" + b"cnumpy\ndtype\n(" + pystr(b"u1") + b"K\x00K\x01tR"
           + b"(K\x03" + pystr(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           + b"\x89" + pystr(data.tobytes()) + b"tb")
    lab = b"]" + b"(" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    return (b"\x80\x02}(" + pystr(b"batch_label") + pystr(b"training batch 1 of 5")
            + pystr(b"data") + arr + pystr(b"labels") + lab + b"u.")


def _write_cifar(tmp_path, style):
    n = 4
    batches = {name: _cifar_arrays(i, n) for i, name in enumerate(datasets.CIFAR_BATCHES +
                                                                  ["test_batch"])}
    sub = tmp_path / ("cifar-10-batches-bin" if style == "bin" else "cifar-10-batches-py")
    sub.mkdir()
    for name, (data, labels) in batches.items():
        if style == "bin":
            rec = np.concatenate([np.asarray(labels, np.uint8)[:, None], data], axis=1)
            (sub / f"{name}.bin").write_bytes(rec.tobytes())
        elif style == "py3":
            (sub / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels},
                                                  protocol=2))
        else:
            (sub / name).write_bytes(_py2_cifar_pickle(data, labels))
    return batches


@pytest.mark.parametrize("style", ["py2", "py3", "bin"])
def test_cifar10_python_and_binary_batches(tmp_path, style):
    batches = _write_cifar(tmp_path, style)
    (x, y), (xt, yt) = datasets.read_cifar10(tmp_path)
    want_x = np.concatenate([batches[b][0] for b in datasets.CIFAR_BATCHES])
    np.testing.assert_array_equal(x.reshape(len(x), -1), want_x)
    np.testing.assert_array_equal(y, np.concatenate([batches[b][1]
                                                     for b in datasets.CIFAR_BATCHES]))
    np.testing.assert_array_equal(xt.reshape(4, -1), batches["test_batch"][0])
    assert x.shape == (20, 3, 32, 32) and yt.dtype == np.int32
    (x2, y2), _ = datasets.load_cifar2(tmp_path)
    keep = (y == 3) | (y == 5)
    np.testing.assert_array_equal(y2, (y[keep] == 5).astype(np.int32))
    np.testing.assert_allclose(x2, x[keep] / 127.5 - 1.0, atol=1e-6)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _write_cifar(tmp_path, "py3")
    marker = tmp_path / "marker"
    evil = pickle.dumps({"data": _Reduce(shutil.copy, (__file__, str(marker)))}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="data_batch_3.*shutil.copy"):
        datasets.read_cifar10(tmp_path)
    assert not marker.exists()
    obj_array = pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(obj_array)
    with pytest.raises(UnsafePickleError, match="object"):
        datasets.read_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}(U")
    with pytest.raises(CorruptFileError, match="data_batch_3"):
        datasets.read_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        datasets.read_cifar10(tmp_path / "nowhere")


def test_shakespeare_bin_and_text_agree(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 7
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "input.txt").write_text(text)
    train_t, val_t, meta_t = datasets.load_shakespeare_char(tmp_path / "txt", block_size=8)
    # nanoGPT's prepare.py, by hand
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], np.uint16)
    cut = int(len(text) * 0.9)
    binary = tmp_path / "bin" / "shakespeare_char"
    binary.mkdir(parents=True)
    ids[:cut].tofile(binary / "train.bin")
    ids[cut:].tofile(binary / "val.bin")
    with open(binary / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    train_b, val_b, meta_b = datasets.load_shakespeare_char(tmp_path / "bin", block_size=8)
    for a, b in zip(train_t + val_t, train_b + val_b):
        np.testing.assert_array_equal(a, b)
    assert meta_t == meta_b
    x, y = train_b
    assert x.shape == (cut // 8, 8)
    np.testing.assert_array_equal(x[1], ids[8:16])
    np.testing.assert_array_equal(y[1], ids[9:17])
    # the last target block is zero-padded when the split ends exactly at a block (dattri)
    exact = tmp_path / "exact"
    exact.mkdir()
    np.arange(16, dtype=np.uint16).tofile(exact / "train.bin")
    np.arange(16, dtype=np.uint16).tofile(exact / "val.bin")
    (xe, ye), _, _ = datasets.load_shakespeare_char(exact, block_size=8)
    np.testing.assert_array_equal(ye[1], [9, 10, 11, 12, 13, 14, 15, 0])
    with open(binary / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": _Reduce(eval, ("1+1",))}, f)
    with pytest.raises(UnsafePickleError, match="meta.pkl.*builtins.eval"):
        datasets.load_shakespeare_char(tmp_path / "bin", block_size=8)
