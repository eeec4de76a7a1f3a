"""Readers of the published benchmarks' data from standard LOCAL files (nothing downloads).

Each reader returns numpy arrays in the order of the original files, preprocessed like
the reference (dattri) so that its checkpoints and ground truth apply unchanged:

* MNIST (``train-images-idx3-ubyte[.gz]`` ...; ``root``, ``root/MNIST/raw`` or
  ``root/mnist``): ``x = (pixels/255 − 0.1307)/0.3081`` float32 ``(n, 784)``, labels int32.
* CIFAR-10 (``cifar-10-batches-py/`` pickles read through the allow-list unpickler, or
  ``cifar-10-batches-bin/``): uint8 images ``(n, 3, 32, 32)`` (channels first, as
  stored), labels int32. CIFAR-2 keeps cat (3) → 0 and dog (5) → 1 in file order, with
  ``x = (pixels/255 − 0.5)/0.5``.
* Shakespeare (nanoGPT's ``shakespeare_char``: ``train.bin``/``val.bin`` uint16 token ids
  with ``meta.pkl``, or the raw ``input.txt``): non-overlapping blocks ``x = ids[bT:(b+1)T]``,
  ``y = ids[bT+1:(b+1)T+1]`` (zero-padded at the very end), as dattri's dataset.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np

from jattri.interop import unpickle as _up
from jattri.interop.unpickle import CorruptFileError

Split = Tuple[np.ndarray, np.ndarray]
PathLike = Union[str, os.PathLike]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _find(root, subdirs: Sequence[str], names: Sequence[str], what: str) -> Path:
    """The first existing ``root/subdir/name``; the error lists every place looked in."""
    root = Path(root)
    tried = []
    for sub in subdirs:
        for name in names:
            path = root / sub / name if sub else root / name
            if path.is_file():
                return path
            tried.append(str(path))
    raise FileNotFoundError(f"{what} not found; expected one of:\n  " + "\n  ".join(tried))


# --- MNIST ------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (MNIST's format; ``.gz`` is decompressed) as a native-endian array.

    Layout: two zero bytes, a dtype code, the number of dimensions d, d big-endian
    uint32 sizes, then the data in C order, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise CorruptFileError(f"{path}: cannot read IDX file: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise CorruptFileError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFileError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != need:
        raise CorruptFileError(f"{path}: IDX data holds {len(raw) - header} bytes, shape "
                               f"{shape} of {dtype} needs {need} (truncated or corrupt)")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx(root, stem: str) -> np.ndarray:
    names = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    return read_idx(_find(root, ["", "MNIST/raw", "mnist", "MNIST"], names, f"MNIST file {stem}"))


def load_mnist(root: PathLike) -> Tuple[Split, Split]:
    """MNIST from its four IDX files, normalised like dattri (torchvision ``Normalize``).

    Returns:
      ``((x_train (60000, 784) float32, y_train (60000,) int32), (x_test, y_test))``.
    """
    out = []
    for prefix in ("train", "t10k"):
        images = _idx(root, f"{prefix}-images-idx3-ubyte")
        labels = _idx(root, f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CorruptFileError(f"MNIST {prefix}: images {images.shape} and labels "
                                   f"{labels.shape} do not match")
        x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
        x = (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
        out.append((x, labels.astype(np.int32)))
    return out[0], out[1]


# --- CIFAR-10 / CIFAR-2 -----------------------------------------------------------

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _cifar_python(path: Path) -> Split:
    # Python-2 pickles of {"data": uint8 (n, 3072), "labels": [...], ...}: only numpy
    # array reconstruction is allowed, read with latin1 as numpy requires.
    batch = _up.safe_loads(path.read_bytes(), allowed={**_up.NUMPY, **_up.BUILTINS},
                           where=str(path), encoding="latin1")
    if not isinstance(batch, dict):
        raise CorruptFileError(f"{path}: expected a dict batch, got {type(batch).__name__}")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data")
    labels = batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
        raise CorruptFileError(f"{path}: not a CIFAR-10 python batch (need 'data' uint8 "
                               "(n, 3072) and as many 'labels')")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, np.int32)


def _cifar_binary(path: Path) -> Split:
    raw = np.fromfile(path, np.uint8)
    if raw.size % 3073:
        raise CorruptFileError(f"{path}: {raw.size} bytes is not a whole number of "
                               "3073-byte CIFAR-10 records (truncated or corrupt)")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int32)


def read_cifar10(root: PathLike) -> Tuple[Split, Split]:
    """CIFAR-10 from the python batches (preferred) or the binary batches.

    Returns:
      ``((x_train (50000, 3, 32, 32) uint8, y_train int32), (x_test (10000, ...), y_test))``.
    """
    root = Path(root)
    for sub, suffix, reader in (("cifar-10-batches-py", "", _cifar_python),
                                ("cifar-10-batches-bin", ".bin", _cifar_binary)):
        for base in (root / sub, root):
            if (base / f"test_batch{suffix}").is_file():
                train = [reader(_find(base, [""], [b + suffix], "CIFAR-10 batch"))
                         for b in CIFAR_BATCHES]
                test = reader(base / f"test_batch{suffix}")
                return ((np.concatenate([x for x, _ in train]),
                         np.concatenate([y for _, y in train])), test)
    raise FileNotFoundError(
        f"CIFAR-10 not found under {root}; expected {root}/cifar-10-batches-py/"
        "{data_batch_1..5,test_batch} (python version) or "
        f"{root}/cifar-10-batches-bin/{{data_batch_1..5,test_batch}}.bin")


def load_cifar2(root: PathLike, classes: Tuple[int, int] = (3, 5)) -> Tuple[Split, Split]:
    """dattri's CIFAR-2: cat (3) → 0 and dog (5) → 1, file order kept, ``(x/255 − 0.5)/0.5``.

    Returns:
      ``((x (n, 3, 32, 32) float32, y int32), (x_test, y_test))``; n = 10000, 2000.
    """
    out = []
    for x, y in read_cifar10(root):
        keep = (y == classes[0]) | (y == classes[1])
        xs = (x[keep].astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
        out.append((xs, (y[keep] == classes[1]).astype(np.int32)))
    return out[0], out[1]


# --- Shakespeare (character level) --------------------------------------------------

def _blocks(ids: np.ndarray, block_size: int) -> Split:
    n = len(ids) // block_size
    if n == 0:
        raise CorruptFileError(f"{len(ids)} tokens hold no block of {block_size}")
    x = ids[: n * block_size].reshape(n, block_size).astype(np.int32)
    y = np.zeros(n * block_size, np.int32)
    shifted = ids[1: n * block_size + 1]
    y[: len(shifted)] = shifted
    return x, y.reshape(n, block_size)


def load_shakespeare_char(root: PathLike, block_size: int = 256) -> Tuple[Split, Split, dict]:
    """nanoGPT's character-level Shakespeare as dattri's blocks.

    Reads ``train.bin``/``val.bin`` (uint16 ids; ``meta.pkl`` through the allow-list
    unpickler) if present, else encodes ``input.txt`` as nanoGPT's ``prepare.py`` does
    (sorted characters; first 90% train, rest validation).

    Returns:
      ``((x_train (n, T) int32, y_train (n, T) int32), (x_val, y_val), meta)`` with
      ``meta = {"vocab_size", "itos", "stoi"}`` (``{}`` if ``meta.pkl`` is absent).
    """
    root = Path(root)
    for base in (root, root / "shakespeare_char"):
        if (base / "train.bin").is_file() and (base / "val.bin").is_file():
            ids = [np.fromfile(base / f, np.uint16) for f in ("train.bin", "val.bin")]
            meta = {}
            if (base / "meta.pkl").is_file():
                meta = _up.safe_loads((base / "meta.pkl").read_bytes(),
                                      allowed=dict(_up.BUILTINS), where=str(base / "meta.pkl"))
                if not isinstance(meta, dict):
                    raise CorruptFileError(f"{base / 'meta.pkl'}: expected a dict")
            return _blocks(ids[0], block_size), _blocks(ids[1], block_size), meta
    text_path = _find(root, ["", "shakespeare_char"], ["input.txt"],
                      "Shakespeare data (train.bin + val.bin, or input.txt)")
    text = text_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], np.uint16)
    cut = int(len(text) * 0.9)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    return _blocks(ids[:cut], block_size), _blocks(ids[cut:], block_size), meta


__all__ = ["load_cifar2", "load_mnist", "load_shakespeare_char", "read_cifar10", "read_idx"]
