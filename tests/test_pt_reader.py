"""The torch-free .pt reader: exact values against torch-written fixtures, refusal of
code-running pickles (proved by side effects that do not happen), clear errors on
corrupt files. No torch needed: fixtures come from tests/make_pt_fixtures.py."""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jattri.interop import CorruptFileError, UnsafePickleError, load_pt
from jattri.interop import pt as pt_module

FIX = Path(__file__).parent / "fixtures" / "pt"


def _get(obj, path):
    for part in path.split("/"):
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


# --- exact values of torch-written fixtures --------------------------------------

def test_every_tensor_matches_torch_bit_for_bit():
    loaded = load_pt(FIX / "tensors.pt")
    expected = np.load(FIX / "tensors.npz")
    assert len(expected.files) >= 30
    for key in expected.files:
        got, want = _get(loaded, key), expected[key]
        assert isinstance(got, np.ndarray), key
        assert _bits(got).dtype == want.dtype, key
        assert got.shape == want.shape, key
        assert _bits(got).tobytes() == want.tobytes(), key
        assert got.flags.c_contiguous and got.flags.owndata, key


def test_dtypes_and_views():
    t = load_pt(FIX / "tensors.pt")
    assert t["bfloat16"].dtype == ml_dtypes.bfloat16
    for name in ["float32", "float16", "float64", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "complex64"]:
        assert t[name].dtype == np.dtype(name), name
    base = t["base"]
    np.testing.assert_array_equal(t["row_view"], base[2])
    np.testing.assert_array_equal(t["col_view"], base[:, 3])
    np.testing.assert_array_equal(t["slice_view"], base[1:3, 2:5])
    np.testing.assert_array_equal(t["transposed"], base.T)
    np.testing.assert_array_equal(t["stepped"], base[::2, ::3])
    np.testing.assert_array_equal(t["expanded"], np.broadcast_to(base[0, :1], (3, 4)))
    assert t["zero_size"].shape == (0, 3) and t["zero_view"].shape == (0, 6)
    assert t["scalar"].shape == () and float(t["scalar"]) == 2.5
    assert t["scalar_view"] == base[3, 5]
    assert int(t["scalar_int"]) == -7
    # tensors that shared a storage come back as independent arrays
    t["row_view"][0] = 123.0
    assert base[2, 0] != 123.0


def test_containers_and_python_values():
    t = load_pt(FIX / "tensors.pt")
    assert t["size"] == (2, 3, 4) and type(t["size"]) is tuple
    assert t["dtype"] == np.dtype(ml_dtypes.bfloat16)
    assert t["py"] == {"int": 12345678901234567890, "float": 0.1, "str": "héllo",
                       "none": None, "bool": True, "bytes": b"\x00\xff", "neg": -3}
    odict = t["nested"]["odict"]
    assert type(odict) is collections.OrderedDict and list(odict) == ["z", "a"]
    assert t["nested"]["tuple"][1:] == ("text", 3)
    assert isinstance(t["nested"]["list"][1], list)
    np.testing.assert_array_equal(t["tagged"], np.arange(4, dtype=np.float32))


def test_nanogpt_checkpoint_with_optimizer_state():
    ckpt = load_pt(FIX / "nanogpt_ckpt.pt")
    want = np.load(FIX / "nanogpt_ckpt.npz")
    model = ckpt["model"]
    assert list(model)[0].startswith("_orig_mod.")
    for k, v in model.items():
        np.testing.assert_array_equal(v, want[k])
    assert ckpt["model_args"]["n_embd"] == 8 and ckpt["model_args"]["bias"] is False
    assert ckpt["iter_num"] == 250 and ckpt["config"]["dtype"] == "bfloat16"
    np.testing.assert_allclose(ckpt["best_val_loss"], 1.4697, rtol=1e-6)
    opt = ckpt["optimizer"]
    assert opt["param_groups"][0]["betas"] == (0.9, 0.99)
    np.testing.assert_array_equal(opt["state"][0]["exp_avg"], want["exp_avg_0"])


def test_state_dict_loads_without_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from jattri.interop import load_pt\n"
            f"sd = load_pt({str(FIX / 'dattri_mnist_lr/models_full/0/model_weights_0.pt')!r})\n"
            "assert list(sd) == ['linear.weight', 'linear.bias'], list(sd)\n"
            "assert sd['linear.weight'].shape == (10, 784)\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_legacy_format_is_refused_with_a_message():
    with pytest.raises(CorruptFileError, match="legacy .*not supported"):
        load_pt(FIX / "legacy.pt")


# --- hand-built archives (no torch) ----------------------------------------------

def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tuple(xs) -> bytes:
    return b"(" + b"".join(_int(x) for x in xs) + b"t"


def _tensor_pickle(kind="FloatStorage", key="0", numel=4, offset=0, size=(4,), stride=(1,)):
    """Protocol-2 opcodes of one tensor, as torch.save writes them."""
    pid = (b"(" + _str("storage") + _global("torch", kind) + _str(key) + _str("cpu")
           + _int(numel) + b"tQ")
    return (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid
            + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89"
            + _global("collections", "OrderedDict") + b")R" + b"tR.")


def _write_pt(path: Path, records: dict, prefix="archive") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in {"byteorder": b"little", "version": b"3\n", **records}.items():
            zf.writestr(f"{prefix}/{name}", data)
    return path


def test_hand_built_tensor_reads(tmp_path):
    data = np.arange(4, dtype=np.float32)
    p = _write_pt(tmp_path / "ok.pt", {"data.pkl": _tensor_pickle(),
                                       "data/0": data.tobytes()}, prefix="anything")
    np.testing.assert_array_equal(load_pt(p), data)
    p = _write_pt(tmp_path / "strided.pt", {
        "data.pkl": _tensor_pickle(numel=4, offset=1, size=(2, 2), stride=(0, 2)),
        "data/0": data.tobytes()})
    np.testing.assert_array_equal(load_pt(p), [[1, 3], [1, 3]])


def test_big_endian_archive(tmp_path):
    src = zipfile.ZipFile(FIX / "tensors.pt")
    prefix = src.namelist()[0].split("/")[0]
    ref = load_pt(FIX / "tensors.pt")
    # dtype of each storage: a recording unpickler over the (trusted) fixture
    item = {}

    class Record(pickle.Unpickler):
        def find_class(self, module, name):
            if name.endswith("Storage"):
                return np.dtype(pt_module._STORAGE_DTYPES[name])
            if module in ("collections", "_codecs"):
                return super().find_class(module, name)
            return lambda *a, **k: None

        def persistent_load(self, pid):
            item[pid[2]] = pid[1]

    Record(io.BytesIO(src.read(f"{prefix}/data.pkl"))).load()
    assert len(item) > 10
    out = tmp_path / "big.pt"
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            data = src.read(info)
            rel = info.filename[len(prefix) + 1:]
            if rel == "byteorder":
                data = b"big"
            elif rel.startswith("data/"):
                dt = item[rel[5:]]
                unit = dt.itemsize // 2 if dt.kind == "c" else dt.itemsize
                if unit > 1:
                    data = np.frombuffer(data, f"u{unit}").byteswap().tobytes()
            zf.writestr(info.filename, data)
    big = load_pt(out)
    for key in np.load(FIX / "tensors.npz").files:
        a, b = _get(big, key), _get(ref, key)
        assert a.dtype == b.dtype and _bits(a).tobytes() == _bits(b).tobytes(), key


# --- security: refused, and nothing runs -----------------------------------------

class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class Evil:
    """An arbitrary class whose __reduce__ would construct it (with a side effect)."""

    def __init__(self, marker):
        Path(marker).write_text("ran")

    def __reduce__(self):
        return Evil, ("never-called",)


def _payloads(marker: Path):
    m = str(marker)
    touch = f"open({m!r}, 'w').write('ran')"
    return {
        "os.system": pickle.dumps(_Reduce(os.system, (f"touch {m}",)), protocol=2),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, (["touch", m],)),
                                         protocol=4),
        "builtins.eval": pickle.dumps(_Reduce(eval, (touch,)), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(exec, (touch,)), protocol=5),
        "class __reduce__": pickle.dumps(_Reduce(Evil, (m,)), protocol=2),
        "posix.system raw": b"\x80\x02" + _global("posix", "system") + b"(" + _str(
            f"touch {m}") + b"tR.",
        "unknown module": b"\x80\x02" + _global("no_such_module_xyz", "f") + b")R.",
        "builtins.getattr": b"\x80\x04" + b"\x8c\x08builtins\x8c\x07getattr\x93" + b")R.",
        "os.system in a dict": pickle.dumps({"w": [1, _Reduce(os.system, (f"touch {m}",))]},
                                            protocol=2),
        "storage type os.system": _tensor_pickle().replace(
            _global("torch", "FloatStorage"), _global("os", "system")),
    }


def _execute(data: bytes):
    """What plain pickle would do (the positive control)."""
    obj = pickle.loads(data)
    if isinstance(obj, subprocess.Popen):
        obj.wait()


def test_payloads_are_live_with_plain_pickle(tmp_path):
    # Proves the refusal test below can fail: the same bytes do run code under pickle.
    for name in ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec",
                 "class __reduce__"]:
        marker = tmp_path / f"live_{name.replace(' ', '_')}"
        _execute(_payloads(marker)[name])
        assert marker.exists(), name


@pytest.mark.parametrize("name", list(_payloads(Path("x"))))
def test_malicious_pickles_are_refused_and_run_nothing(tmp_path, name):
    marker = tmp_path / "marker"
    data = _payloads(marker)[name]
    path = _write_pt(tmp_path / "evil.pt", {"data.pkl": data,
                                            "data/0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(UnsafePickleError, match="refusing to load the global") as err:
        load_pt(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    assert isinstance(err.value, ValueError)


def test_build_cannot_patch_allowed_functions(tmp_path):
    defaults = pt_module._rebuild_tensor_v2.__defaults__
    data = (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"}"
            + _str("__defaults__") + b"(" + _int(1) + b"ts" + b"b.")
    path = _write_pt(tmp_path / "build.pt", {"data.pkl": data})
    with pytest.raises(ValueError):
        load_pt(path)
    assert pt_module._rebuild_tensor_v2.__defaults__ == defaults
    slot = (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"N}"
            + _str("fn") + _global("collections", "OrderedDict") + b"s\x86b.")
    with pytest.raises(UnsafePickleError, match="set attribute"):
        load_pt(_write_pt(tmp_path / "slot.pt", {"data.pkl": slot}))


def test_tensor_subclass_is_refused(tmp_path):
    data = (b"\x80\x02" + _global("torch._tensor", "_rebuild_from_type_v2") + b"("
            + _global("torch._utils", "_rebuild_tensor_v2")
            + _global("collections", "OrderedDict") + b")N" + b"tR.")
    with pytest.raises(UnsafePickleError, match="subclass"):
        load_pt(_write_pt(tmp_path / "sub.pt", {"data.pkl": data}))


# --- corrupt or truncated files ---------------------------------------------------

def _rewrite(tmp_path, edit, name="edited.pt") -> Path:
    src = zipfile.ZipFile(FIX / "tensors.pt")
    out = tmp_path / name
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            data = edit(info.filename.split("/", 1)[1], src.read(info))
            if data is not None:
                zf.writestr(info.filename, data)
    return out


@pytest.mark.parametrize("case,pattern", [
    ("truncated", "truncated or corrupt zip"),
    ("not_zip", "not a zip archive"),
    ("no_data_pkl", "no '<name>/data.pkl' record"),
    ("missing_storage", "missing record .*data/0"),
    ("short_storage", "holds 8 bytes, expected"),
    ("bad_pickle", "malformed or truncated pickle"),
    ("truncated_pickle", "malformed or truncated pickle"),
    ("bad_byteorder", "bad byteorder"),
    ("crc", "cannot read record|Bad CRC"),
])
def test_corrupt_files_give_clear_errors(tmp_path, case, pattern):
    raw = (FIX / "tensors.pt").read_bytes()
    if case == "truncated":
        path = tmp_path / "t.pt"
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "not_zip":
        path = tmp_path / "t.pt"
        path.write_bytes(b"hello, this is not a checkpoint" * 4)
    elif case == "no_data_pkl":
        path = _rewrite(tmp_path, lambda n, d: None if n == "data.pkl" else d)
    elif case == "missing_storage":
        path = _rewrite(tmp_path, lambda n, d: None if n == "data/0" else d)
    elif case == "short_storage":
        path = _rewrite(tmp_path, lambda n, d: d[:8] if n == "data/0" else d)
    elif case == "bad_pickle":
        path = _rewrite(tmp_path, lambda n, d: b"\x80\x02garbage" if n == "data.pkl" else d)
    elif case == "truncated_pickle":
        path = _rewrite(tmp_path, lambda n, d: d[: len(d) // 2] if n == "data.pkl" else d)
    elif case == "bad_byteorder":
        path = _rewrite(tmp_path, lambda n, d: b"middle" if n == "byteorder" else d)
    else:  # flip one byte inside a stored storage: the zip CRC check catches it
        zf = zipfile.ZipFile(FIX / "tensors.pt")
        info = zf.getinfo(zf.namelist()[0].split("/")[0] + "/data/0")
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                      info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        corrupted = bytearray(raw)
        corrupted[start + 2] ^= 0xFF
        path = tmp_path / "t.pt"
        path.write_bytes(bytes(corrupted))
    with pytest.raises(CorruptFileError, match=pattern) as err:
        load_pt(path)
    assert str(path) in str(err.value)


def test_strides_past_the_storage_are_refused(tmp_path):
    four = np.arange(4, dtype=np.float32).tobytes()
    for kwargs in [dict(offset=1), dict(size=(2, 2), stride=(3, 1)), dict(size=(5,))]:
        p = _write_pt(tmp_path / "s.pt", {"data.pkl": _tensor_pickle(**kwargs),
                                          "data/0": four})
        with pytest.raises(CorruptFileError, match="too short"):
            load_pt(p)
    p = _write_pt(tmp_path / "n.pt", {"data.pkl": _tensor_pickle(stride=(-1,)),
                                      "data/0": four})
    with pytest.raises(CorruptFileError, match="negative"):
        load_pt(p)
    p = _write_pt(tmp_path / "k.pt", {"data.pkl": _tensor_pickle(numel=5), "data/0": four})
    with pytest.raises(CorruptFileError, match="holds 16 bytes, expected 20"):
        load_pt(p)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        load_pt("/nonexistent/no_such.pt")


def test_bare_pickle_is_not_accepted(tmp_path):
    # A bare pickle (not a zip) is refused before any unpickling.
    path = tmp_path / "bare.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CorruptFileError, match="not a zip archive"):
        load_pt(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_python_values_in_every_protocol(protocol):
    from jattri.interop.unpickle import BUILTINS, safe_loads
    value = {"set": {1, 2}, "frozen": frozenset("ab"), "complex": 1 - 2j, "bytes": b"\x00\x01",
             "bytearray": bytearray(b"xy"), "odict": collections.OrderedDict(a=1),
             "nested": [(1, 2.5, None, True, "s")]}
    assert safe_loads(pickle.dumps(value, protocol=protocol), allowed=BUILTINS,
                      where="mem") == value


def test_allowed_builtins_cannot_allocate_from_a_count():
    from jattri.interop.unpickle import BUILTINS, safe_loads
    data = b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x7f\x85R."  # bytearray(2**31 - ...)
    with pytest.raises(CorruptFileError, match="bytearray is allowed only"):
        safe_loads(data, allowed=BUILTINS, where="mem")
    with pytest.raises(CorruptFileError, match="_codecs.encode is allowed only"):
        safe_loads(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-7\x86R.",
                   allowed=BUILTINS, where="mem")
