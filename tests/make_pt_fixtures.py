"""Write the torch-generated fixtures of tests/test_pt_reader.py and tests/test_load_dattri.py.

Run by hand, with a CPU build of torch that is NOT a dependency of jattri:

    pip install --target /tmp/torch_target torch==2.13.0     # CPU wheel, local disk
    PYTHONPATH=/tmp/torch_target python tests/make_pt_fixtures.py [dtypes]

It rewrites tests/fixtures/pt/ (about 1 MB, deterministic given the torch version):

* ``tensors.pt``: every dtype the reader supports, views with storage offsets, transposes
  (non-contiguous), expanded (stride-0) tensors, several tensors sharing one storage,
  zero-size tensors, 0-d scalars, a Parameter, nested list/tuple/dict/OrderedDict,
  ``torch.Size``, torch dtypes, Python scalars and strings.
  ``tensors.npz``: the same tensors' values, torch-free (bfloat16 as its uint16 bits),
  keyed by their path in the object (``nested/list/0``).
* ``nanogpt_ckpt.pt``: the dict nanoGPT's train.py saves (``model`` with the
  ``_orig_mod.`` prefix of ``torch.compile``, ``optimizer`` state of AdamW,
  ``model_args``, ``iter_num``, ``best_val_loss``, ``config``), tiny sizes.
* ``dtypes.pt``: every torch dtype numpy or ml_dtypes can hold (float8 variants and
  uint16-64 go through ``_rebuild_tensor_v3`` over an untyped storage; ``bits*`` are
  opaque bytes), strided and expanded views of them, and tensors saved with a pending
  conjugation or negation bit (``conj()``, ``conj().imag``, ``_neg_view``).
  ``dtypes.npz``: per name, the resolved (conj/neg applied) tensor's bytes, its shape
  and its dtype name; ``dtypes_unsupported/<dtype>.pt``: one tensor each of the dtypes
  numpy cannot hold (complex32, float4_e2m1fn_x2, qint8), which the reader refuses.
* ``legacy.pt``: the pre-1.6 non-zip format (the reader refuses it with a message).
* ``dattri_mnist_lr/`` and ``dattri_mnist_mlp/``: dattri's benchmark layout
  (``models_full/<i>/model_weights_0.pt``, ``models_half/<i>/model_weights_0.pt``,
  ``lds/indices_lds.pt``, ``lds/target_values_lds.pt``, ``loo/...``) for models of the
  reference architectures (``LogisticRegressionMnist``: ``linear``; ``MLPMnist``:
  ``fc1``/``fc2``/``fc3``) trained on a tiny synthetic MNIST (``data/``: idx files,
  64 train / 16 test images) normalised like dattri (``(x/255 − 0.1307)/0.3081``).
  Ground truth follows dattri's ``calculate_lds_ground_truth`` (targets = −loss of the
  model retrained on each kept subset, ``(S, n_test)``; indices ``(S, m)`` kept) and
  ``calculate_loo_ground_truth`` (targets = loss of the model retrained without train
  point ``r``, ``(R, n_test)``; indices ``(R,)`` float). ``expected.npz`` holds torch's
  logits of the saved models on the test images.
"""
from __future__ import annotations

import collections
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "fixtures" / "pt"
MEAN, STD = 0.1307, 0.3081


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def tensors_fixture():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    big = torch.arange(2 * 3 * 5, dtype=torch.float64).reshape(2, 3, 5)
    obj = {
        "float32": torch.randn(3, 4, generator=g),
        "float16": torch.randn(5, generator=g).half(),
        "bfloat16": torch.randn(2, 3, generator=g).bfloat16(),
        "float64": torch.randn(2, 2, generator=g).double(),
        "int64": torch.tensor([-(2 ** 62), -1, 0, 2 ** 62], dtype=torch.int64),
        "int32": torch.tensor([[-(2 ** 31), 7], [2 ** 31 - 1, 0]], dtype=torch.int32),
        "int16": torch.tensor([-32768, 32767, 5], dtype=torch.int16),
        "int8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "uint8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
        "special": torch.tensor([float("inf"), -float("inf"), -0.0, 1e-45]),
        # views into one storage: offset, strides, transpose, stride-0 expand
        "base": base,
        "row_view": base[2],
        "col_view": base[:, 3],
        "slice_view": base[1:3, 2:5],
        "transposed": base.t(),
        "stepped": base[::2, ::3],
        "expanded": base[0, :1].expand(3, 4),
        "permuted": big.permute(2, 0, 1),
        "narrow3d": big[:, 1:, 2:4],
        "zero_size": torch.zeros(0, 3),
        "zero_view": base[4:],
        "scalar": torch.tensor(2.5),
        "scalar_int": torch.tensor(-7, dtype=torch.int64),
        "scalar_view": base[3, 5],
        "param": nn.Parameter(torch.randn(2, 2, generator=g)),
        "param_frozen": nn.Parameter(torch.ones(3), requires_grad=False),
        "nested": {
            "list": [torch.arange(3, dtype=torch.int32), [torch.ones(1, dtype=torch.float16)]],
            "tuple": (torch.zeros(2, dtype=torch.int8), "text", 3),
            "odict": collections.OrderedDict([("z", torch.tensor([1.0])),
                                              ("a", torch.tensor([2.0]))]),
        },
        "size": torch.Size([2, 3, 4]),
        "dtype": torch.bfloat16,
        "py": {"int": 12345678901234567890, "float": 0.1, "str": "héllo", "none": None,
               "bool": True, "bytes": b"\x00\xff", "neg": -3},
    }
    # a tensor with Python attributes goes through torch._tensor._rebuild_from_type_v2
    tagged = torch.arange(4, dtype=torch.float32)
    tagged.note = "attr"
    obj["tagged"] = tagged
    torch.save(obj, OUT / "tensors.pt")

    flat = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            flat[path] = _np(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}" if path else k)
        elif isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")

    walk(obj, "")
    np.savez(OUT / "tensors.npz", **flat)


def nanogpt_fixture():
    g = torch.Generator().manual_seed(1)
    n_embd, vocab, block = 8, 11, 4
    model = collections.OrderedDict()
    model["_orig_mod.transformer.wte.weight"] = torch.randn(vocab, n_embd, generator=g)
    model["_orig_mod.transformer.wpe.weight"] = torch.randn(block, n_embd, generator=g)
    model["_orig_mod.transformer.h.0.attn.c_attn.weight"] = torch.randn(3 * n_embd, n_embd,
                                                                        generator=g)
    model["_orig_mod.transformer.ln_f.weight"] = torch.ones(n_embd)
    # weight tying: lm_head shares wte's storage
    model["_orig_mod.lm_head.weight"] = model["_orig_mod.transformer.wte.weight"]
    params = [nn.Parameter(v.clone()) for v in list(model.values())[:3]]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    sum((p ** 2).sum() for p in params).backward()
    opt.step()
    ckpt = {
        "model": model,
        "optimizer": opt.state_dict(),
        "model_args": dict(n_layer=1, n_head=2, n_embd=n_embd, block_size=block,
                           bias=False, vocab_size=vocab, dropout=0.0),
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"out_dir": "out-shakespeare-char", "dtype": "bfloat16",
                   "compile": True, "learning_rate": 1e-3},
    }
    torch.save(ckpt, OUT / "nanogpt_ckpt.pt")
    np.savez(OUT / "nanogpt_ckpt.npz", **{k: _np(v) for k, v in model.items()},
             exp_avg_0=_np(opt.state_dict()["state"][0]["exp_avg"]))


def dtypes_fixture():
    f = torch.tensor([0.0, 1.5, -2.25, 3e-3, 57344.0, -0.0, 1e-7, 448.0])
    c = torch.tensor([[1 + 2j, -3.5 + 0.25j], [0.5 - 1j, 4j]], dtype=torch.complex64)
    u8 = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    obj = {name: f.to(getattr(torch, name)) for name in [
        "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz", "float8_e5m2fnuz"]}
    obj.update({
        "float8_e8m0fnu": torch.tensor([1.0, 2.0, 0.5, 2.0 ** 100]).to(torch.float8_e8m0fnu),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "int16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "int32": torch.tensor([-(2 ** 31), 2 ** 31 - 1], dtype=torch.int32),
        "int64": torch.tensor([-(2 ** 63), 2 ** 63 - 1], dtype=torch.int64),
        "uint8": u8,
        "uint16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "uint32": torch.tensor([0, 1, 2 ** 32 - 1], dtype=torch.uint32),
        "uint64": torch.tensor([0, 1, 2 ** 64 - 1], dtype=torch.uint64),
        "bool": torch.tensor([True, False]),
        "complex64": c,
        "complex128": c.to(torch.complex128),
        # (torch.save refuses two dtypes over one storage: each view gets its own copy)
        "bits8": u8.clone().view(torch.bits8), "bits1x8": u8.clone().view(torch.bits1x8),
        "bits2x4": u8.clone().view(torch.bits2x4), "bits4x2": u8.clone().view(torch.bits4x2),
        "bits16": torch.tensor([0, 1, 65535], dtype=torch.uint16).view(torch.bits16),
        # views of the v3 dtypes: offset, step, stride 0
        "e5m2_stepped": f.to(torch.float8_e5m2)[1::3],
        "e4m3_expanded": f.to(torch.float8_e4m3fn)[2:3].expand(2, 3),
        "uint16_transposed": torch.arange(6).to(torch.uint16).reshape(2, 3).t(),
        # pending conjugation / negation bits (torch resolves them lazily)
        "conj": c.conj(),
        "conj_transposed": c.t().conj(),
        "conj128": c.to(torch.complex128).conj(),
        "conj_imag": c.clone().conj().imag,  # a float view with the negation bit
        "neg_view": torch._neg_view(f),
        "neg_int": torch._neg_view(torch.tensor([3, -4, 0], dtype=torch.int64)),
        "conj_neg": torch._neg_view(c.conj()),
        "conj_expanded": c[0, :1].conj().expand(3, 2),
    })
    assert obj["conj"].is_conj() and obj["conj_imag"].is_neg() and obj["neg_view"].is_neg()
    assert obj["conj_neg"].is_conj() and obj["conj_neg"].is_neg()
    torch.save(obj, OUT / "dtypes.pt")
    flat = {}
    for name, t in obj.items():
        t = t.resolve_conj().resolve_neg().contiguous()
        flat[f"bytes/{name}"] = t.view(torch.uint8).numpy().copy()
        flat[f"shape/{name}"] = np.array(t.shape, np.int64)
        flat[f"dtype/{name}"] = np.array(str(t.dtype).split(".")[1])
    np.savez(OUT / "dtypes.npz", **flat)
    bad = OUT / "dtypes_unsupported"
    bad.mkdir(exist_ok=True)
    torch.save({"t": f.to(torch.complex32)}, bad / "complex32.pt")
    torch.save({"t": u8.view(torch.float4_e2m1fn_x2)}, bad / "float4_e2m1fn_x2.pt")
    torch.save({"t": torch.quantize_per_tensor(f, 0.1, 0, torch.qint8)}, bad / "qint8.pt")


def legacy_fixture():
    torch.save({"w": torch.ones(2)}, OUT / "legacy.pt", _use_new_zipfile_serialization=False)


# --- dattri layout on a tiny synthetic MNIST ---------------------------------------

class LogisticRegressionMnist(nn.Module):  # dattri.benchmark.models.logistic_regression
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.linear(x.view(x.shape[0], -1))


class MLPMnist(nn.Module):  # dattri.benchmark.models.mlp (eval mode: dropout off)
    def __init__(self, dropout_rate=0.1):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(128, 64)
        self.dropout2 = nn.Dropout(dropout_rate)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = self.dropout1(torch.relu(self.fc1(x)))
        x = self.dropout2(torch.relu(self.fc2(x)))
        return self.fc3(x)


def write_idx(path: Path, array: np.ndarray, gz: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.GzipFile(path.with_name(path.name + ".gz"), "wb", mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def tiny_mnist(rng, n):
    """Ten noisy class prototypes: linearly separable-ish 28x28 uint8 digits."""
    protos = np.random.default_rng(123).uniform(0, 255, size=(10, 28, 28))
    y = rng.integers(0, 10, size=n).astype(np.uint8)
    x = protos[y] * 0.5 + rng.uniform(0, 127, size=(n, 28, 28))
    return np.clip(x, 0, 255).astype(np.uint8), y


def normalise(x_u8):
    return (torch.from_numpy(x_u8).float().div(255) - MEAN) / STD


def train(make, x, y, seed, steps, lr):
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):  # full batch: deterministic given (seed, subset)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_loss(model, x, y):
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none")


def dattri_fixture(name, make, num_full, num_half, num_lds, loo, steps, lr):
    root = OUT / f"dattri_{name}"
    data = OUT / "dattri_mnist_data"
    rng = np.random.default_rng(7)
    x_tr_u8, y_tr = tiny_mnist(rng, 64)
    x_te_u8, y_te = tiny_mnist(rng, 16)
    if not data.exists():
        data.mkdir(parents=True)
        write_idx(data / "train-images-idx3-ubyte", x_tr_u8, gz=True)
        write_idx(data / "train-labels-idx1-ubyte", y_tr, gz=True)
        write_idx(data / "t10k-images-idx3-ubyte", x_te_u8, gz=False)
        write_idx(data / "t10k-labels-idx1-ubyte", y_te, gz=False)
    x_tr, x_te = normalise(x_tr_u8), normalise(x_te_u8)
    y_tr_t, y_te_t = torch.from_numpy(y_tr).long(), torch.from_numpy(y_te).long()
    n = len(y_tr)

    def save(model, sub):
        path = root / sub / "model_weights_0.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)

    logits = {}
    for i in range(num_full):
        model = train(make, x_tr, y_tr_t, seed=i, steps=steps, lr=lr)
        save(model, f"models_full/{i}")
        with torch.no_grad():
            logits[f"full_{i}"] = model(x_te).numpy()
    subsets = np.stack([np.sort(np.random.default_rng(100 + s).permutation(n)[: n // 2])
                        for s in range(num_lds)])
    values = torch.zeros(num_lds, len(y_te))
    for s, idx in enumerate(subsets):
        t = torch.from_numpy(idx)
        model = train(make, x_tr[t], y_tr_t[t], seed=0, steps=steps, lr=lr)
        values[s] = test_loss(model, x_te, y_te_t)
        if s < num_half:
            save(model, f"models_half/{s}")
    (root / "lds").mkdir(parents=True, exist_ok=True)
    torch.save(-values, root / "lds" / "target_values_lds.pt")  # dattri flips: utility
    torch.save(torch.from_numpy(subsets), root / "lds" / "indices_lds.pt")
    if loo:
        removed = torch.empty(n)  # dattri: a float tensor of removed indices
        loo_values = torch.zeros(n, len(y_te))
        for r in range(n):
            keep = torch.tensor([j for j in range(n) if j != r])
            model = train(make, x_tr[keep], y_tr_t[keep], seed=0, steps=steps, lr=lr)
            loo_values[r] = test_loss(model, x_te, y_te_t)  # dattri: not flipped
            removed[r] = r
        (root / "loo").mkdir(parents=True, exist_ok=True)
        torch.save(loo_values, root / "loo" / "target_values_loo.pt")
        torch.save(removed, root / "loo" / "indices_loo.pt")
    np.savez(root / "expected.npz", **logits)


if __name__ == "__main__":
    import sys

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["dtypes"]:  # only the dtype fixtures, leaving the others as they are
        dtypes_fixture()
        sys.exit()
    tensors_fixture()
    dtypes_fixture()
    nanogpt_fixture()
    legacy_fixture()
    dattri_fixture("mnist_lr", LogisticRegressionMnist, num_full=3, num_half=3, num_lds=12,
                   loo=True, steps=60, lr=0.05)
    dattri_fixture("mnist_mlp", MLPMnist, num_full=1, num_half=1, num_lds=6, loo=False,
                   steps=40, lr=0.05)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
