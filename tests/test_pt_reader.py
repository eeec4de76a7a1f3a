"""The torch-free .pt reader: exact values against torch-written fixtures, refusal of
code-running pickles (proved by side effects that do not happen), clear errors on
corrupt files, bounded memory on hostile ones (resource bombs, devices, FIFOs). No torch
needed: fixtures come from tests/make_pt_fixtures.py, hostile files are built here."""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import pytest

from jattri.interop import CorruptFileError, ExpansionLimitError, UnsafePickleError, load_pt
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


# --- hostile and unusual files: bounded, regular files only, never silently wrong ----

class _G(NamedTuple):
    """A global, as the pickle names it."""
    module: str
    name: str


class _Call(NamedTuple):
    """``fn(*args)`` (the REDUCE opcode)."""
    fn: Any
    args: tuple


class _Pid(NamedTuple):
    """A persistent id (torch's storage records)."""
    pid: tuple


def _ops(x) -> bytes:
    """Protocol-2 opcodes building ``x`` (no memo: every reference is a new object)."""
    if isinstance(x, _G):
        return _global(x.module, x.name)
    if isinstance(x, _Call):
        return _ops(x.fn) + _ops(tuple(x.args)) + b"R"
    if isinstance(x, _Pid):
        return _ops(x.pid) + b"Q"
    if x is None or isinstance(x, bool):
        return {None: b"N", True: b"\x88", False: b"\x89"}[x]
    if isinstance(x, int):
        return _int(x) if -2 ** 31 <= x < 2 ** 31 else b"\x8a\x08" + x.to_bytes(8, "little",
                                                                                  signed=True)
    if isinstance(x, str):
        return _str(x)
    if isinstance(x, tuple):
        return b"(" + b"".join(map(_ops, x)) + b"t"
    if isinstance(x, list):
        return b"](" + b"".join(map(_ops, x)) + b"e"
    if isinstance(x, dict):
        return b"}(" + b"".join(_ops(k) + _ops(v) for k, v in x.items()) + b"u"
    raise TypeError(type(x))


def _dumps(x) -> bytes:
    return b"\x80\x02" + _ops(x) + b"."


def _t(size, stride, *, kind="FloatStorage", key="0", numel=1, offset=0, dtype=None,
       metadata=None):
    """A tensor as torch.save pickles it; with ``dtype``, _rebuild_tensor_v3 over an
    untyped byte storage (float8, uint16-64, ...)."""
    kind = _G("torch.storage", "UntypedStorage") if dtype else _G("torch", kind)
    args = (_Pid(("storage", kind, key, "cpu", numel)), offset, tuple(size), tuple(stride),
            False, _Call(_G("collections", "OrderedDict"), ()))
    if dtype:
        args += (_G("torch", dtype),)
    if metadata is not None:
        args += (metadata,)
    return _Call(_G("torch._utils", "_rebuild_tensor_v3" if dtype else "_rebuild_tensor_v2"),
                 args)


def _peak(fn) -> int:
    """Peak bytes Python and numpy allocate while ``fn()`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


GiB = 1 << 30


def test_zero_stride_bomb_is_refused_naming_the_tensor(tmp_path):
    # 1 GiB of float32 over a one-element storage: torch keeps it as a view
    p = _write_pt(tmp_path / "bomb.pt", {
        "data.pkl": _dumps({"model": {"w": _t((GiB // 4,), (0,))}}),
        "data/0": np.float32(1.5).tobytes()})
    assert p.stat().st_size < 1000

    def load():
        with pytest.raises(ExpansionLimitError) as err:
            load_pt(p)
        msg = str(err.value)
        assert str(p) in msg and "tensor 'model/w'" in msg and "size (268435456,)" in msg
        assert "1.00 GiB" in msg and "max_expansion" in msg and "views=True" in msg

    assert _peak(load) < 1 << 20


def test_expanded_tensors_stay_views_on_request(tmp_path):
    p = _write_pt(tmp_path / "bomb.pt", {
        "data.pkl": _dumps({"w": _t((1 << 15, 1 << 15), (0, 0), numel=4),
                            "row": _t((4, 1 << 20), (1, 0), numel=4)}),
        "data/0": np.arange(4, dtype=np.float32).tobytes()})
    out = {}
    assert _peak(lambda: out.update(load_pt(p, views=True))) < 1 << 20
    w, row = out["w"], out["row"]
    assert w.shape == (1 << 15, 1 << 15) and w.strides == (0, 0) and w[123, 4567] == 0.0
    assert row.shape == (4, 1 << 20) and row[3, 99999] == 3.0 and row[1, 5] == 1.0
    assert not w.flags.writeable and not row.flags.writeable


def test_many_copies_of_one_storage_hit_the_limit(tmp_path):
    # 256 tensors over one 4 MiB storage: 1 GiB if each became its own copy
    n = 1 << 20
    p = _write_pt(tmp_path / "copies.pt", {
        "data.pkl": _dumps({"copies": [_t((n,), (1,), numel=n) for _ in range(256)]}),
        "data/0": np.zeros(n, np.float32).tobytes()})
    size = p.stat().st_size

    def load():
        with pytest.raises(ExpansionLimitError, match=r"tensor 'copies/\d+'.*over the limit"):
            load_pt(p)

    assert _peak(load) < 10 * size
    assert len(load_pt(p, views=True)["copies"]) == 256


def _raw_zip(path: Path, entries) -> Path:
    """A zip written byte by byte: each entry ``(name, payload, method, crc, size)`` holds
    ``payload`` as given (already compressed) under headers claiming ``crc`` and ``size``."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, size in entries:
        raw_name, offset = name.encode(), len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc,
                           len(payload), size, len(raw_name), 0) + raw_name + payload
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc,
                               len(payload), size, len(raw_name), 0, 0, 0, 0, 0,
                               offset) + raw_name
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                                 len(central), len(out), 0)
    path.write_bytes(bytes(out))
    return path


def _stored(name: str, data: bytes):
    return name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)


@pytest.fixture(scope="module")
def zeros_gib():
    """A raw deflate stream of 1 GiB of zeros (1 MB), built from one compressed MiB:
    after a full flush the stream restarts byte-aligned, so its blocks repeat."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    payload = mib * 1024 + c.flush()
    crc, zeros = 0, bytes(1 << 20)
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    return payload, crc


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_deflate_bomb_is_refused_before_decompressing(tmp_path, zeros_gib, record):
    payload, crc = zeros_gib
    bomb = (f"archive/{record}", payload, zipfile.ZIP_DEFLATED, crc, GiB)
    if record == "data/0":
        entries = [_stored("archive/data.pkl", _dumps({"w": _t((GiB // 4,), (1,),
                                                               numel=GiB // 4)})), bomb]
    else:
        entries = [bomb]
    p = _raw_zip(tmp_path / "bomb.pt", entries + [_stored("archive/byteorder", b"little")])
    assert p.stat().st_size < 1_100_000

    def load():
        with pytest.raises(ExpansionLimitError) as err:
            load_pt(p)
        msg = str(err.value)
        assert f"archive/{record}" in msg and "1.00 GiB" in msg and "compressed" in msg
        assert ("tensor 'w'" in msg) == (record == "data/0")

    assert _peak(load) < p.stat().st_size


def test_lying_zip_header_cannot_unlock_the_stream(tmp_path, zeros_gib):
    # the directory claims 4 bytes (with their CRC) for a stream of 1 GiB: 4 bytes are read
    payload, _ = zeros_gib
    p = _raw_zip(tmp_path / "liar.pt", [
        _stored("archive/data.pkl", _dumps({"w": _t((1,), (1,))})),
        ("archive/data/0", payload, zipfile.ZIP_DEFLATED, zlib.crc32(bytes(4)), 4)])
    out = {}
    assert _peak(lambda: out.update(load_pt(p))) < p.stat().st_size
    np.testing.assert_array_equal(out["w"], [0.0])


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_unbounded_compression_methods_are_refused(tmp_path, method):
    # zipfile inflates bzip2/lzma without an output bound (208 bytes of bzip2 hold 256 MiB
    # of zeros, all decompressed before a lying size cuts them): refused unread
    p = tmp_path / "m.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", _dumps({"w": _t((1,), (1,))}))
        zf.writestr("archive/data/0", bytes(4), compress_type=method)
    with pytest.raises(CorruptFileError, match=r"data/0' is (bzip2|lzma)-compressed"):
        load_pt(p)


def test_bombs_keep_peak_memory_small_in_a_fresh_process(tmp_path, zeros_gib):
    """Peak RSS, which also sees what zlib and the OS allocate outside Python."""
    payload, crc = zeros_gib
    zero_stride = _write_pt(tmp_path / "stride.pt", {
        "data.pkl": _dumps({"w": _t((GiB // 4,), (0,))}), "data/0": bytes(4)})
    deflate = _raw_zip(tmp_path / "deflate.pt", [
        _stored("archive/data.pkl", _dumps({"w": _t((GiB // 4,), (1,), numel=GiB // 4)})),
        ("archive/data/0", payload, zipfile.ZIP_DEFLATED, crc, GiB)])
    zero = tmp_path / "zero.pt"
    zero.symlink_to("/dev/zero")
    code = ("import resource, sys\n"
            "from jattri.interop import load_pt\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        load_pt(p)\n"
            "    except ValueError as err:\n"
            "        print(type(err).__name__)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(zero_stride), str(deflate), str(zero)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    *kinds, grown = out.stdout.split()
    assert kinds == ["ExpansionLimitError", "ExpansionLimitError", "CorruptFileError"]
    assert int(grown) < 32 << 20


def test_limit_is_relative_to_the_file_with_a_floor(tmp_path):
    def expanded(n):
        return _write_pt(tmp_path / f"e{n}.pt", {"data.pkl": _dumps({"e": _t((n,), (0,))}),
                                                 "data/0": np.float32(2).tobytes()})

    small = load_pt(expanded(1 << 18))["e"]  # 1 MiB from a tiny file: under the floor
    assert small.shape == (1 << 18,) and small.flags.owndata and (small == 2).all()
    big = expanded(1 << 23)  # 32 MiB
    with pytest.raises(ExpansionLimitError, match="32.0 MiB"):
        load_pt(big)
    assert load_pt(big, max_expansion=None)["e"].nbytes == 32 << 20
    assert load_pt(big, max_expansion=2e6)["e"].shape == (1 << 23,)
    for bad in [0, -1.0, float("nan"), "8", True]:
        with pytest.raises(ValueError, match="max_expansion must be a positive number"):
            load_pt(big, max_expansion=bad)
    with pytest.raises(ValueError, match="views must be True or False"):
        load_pt(big, views=1)


def test_honest_files_load_within_the_default_limit_and_as_views():
    def arrays(obj):  # every array of a loaded object, keyed by its path
        if isinstance(obj, np.ndarray):
            return {"": obj}
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        return {f"{k}/{p}": a for k, v in items if isinstance(v, (dict, list, tuple, np.ndarray))
                for p, a in arrays(v).items()}

    for name in ["tensors.pt", "nanogpt_ckpt.pt", "dtypes.pt"]:
        copies, views = arrays(load_pt(FIX / name, max_expansion=4)), arrays(
            load_pt(FIX / name, views=True))
        assert copies.keys() == views.keys() and len(copies) > 10
        for key, a in copies.items():
            v = views[key]
            assert _bits(a).tobytes() == _bits(np.ascontiguousarray(v)).tobytes(), key
            assert a.flags.owndata and not v.flags.writeable, key
    tied = load_pt(FIX / "nanogpt_ckpt.pt")["model"]  # one tensor object, one array
    assert tied["_orig_mod.lm_head.weight"] is tied["_orig_mod.transformer.wte.weight"]


def _special(tmp_path, kind) -> Path:
    p = tmp_path / kind
    if kind == "dev_zero_link":
        p.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "directory_link":
        (tmp_path / "d").mkdir()
        p.symlink_to(tmp_path / "d")
    return p


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
@pytest.mark.parametrize("kind,what", [
    ("dev_zero_link", r"a character device \(through a symbolic link\)"),
    ("fifo", r"a FIFO \(named pipe\)"),
    ("directory", "a directory"),
    ("directory_link", r"a directory \(through a symbolic link\)"),
])
def test_only_regular_files_are_read(tmp_path, kind, what):
    p = _special(tmp_path, kind)

    def timeout(*_):
        raise TimeoutError(f"load_pt blocked on {kind}")

    old = signal.signal(signal.SIGALRM, timeout)  # opening a FIFO may block for ever
    signal.alarm(20)
    try:
        with pytest.raises(CorruptFileError, match=f"{what}, not a regular file") as err:
            load_pt(p)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert str(p) in str(err.value)


_NUMPY_OF = {"bits8": np.uint8, "bits1x8": np.uint8, "bits2x4": np.uint8,
             "bits4x2": np.uint8, "bits16": np.uint16}


def test_every_dtype_and_pending_bit_matches_torch():
    # dtypes.pt: every torch dtype numpy/ml_dtypes hold (float8_e5m2, e8m0fnu, uint16-64
    # and bits* through _rebuild_tensor_v3), and tensors saved with torch's lazy conj/neg
    loaded = load_pt(FIX / "dtypes.pt")
    want = np.load(FIX / "dtypes.npz")
    names = [k.split("/", 1)[1] for k in want.files if k.startswith("bytes/")]
    assert {"float8_e5m2", "float8_e8m0fnu", "uint64", "bits16", "conj", "conj_imag",
            "neg_int", "conj_neg"} <= set(names)
    for name in names:
        got, torch_dtype = loaded[name], str(want[f"dtype/{name}"])
        dtype = _NUMPY_OF.get(torch_dtype) or getattr(ml_dtypes, torch_dtype, None) or torch_dtype
        assert got.dtype == np.dtype(dtype), name
        assert got.shape == tuple(want[f"shape/{name}"]), name
        assert got.tobytes() == want[f"bytes/{name}"].tobytes(), name


@pytest.mark.parametrize("name,reason", [
    ("complex32", "numpy has no complex32"), ("float4_e2m1fn_x2", "packed pair-of-float4"),
    ("qint8", "quantized tensors are not supported")])
def test_dtypes_numpy_cannot_hold_are_refused_by_name(name, reason):
    with pytest.raises(CorruptFileError, match=reason) as err:
        load_pt(FIX / "dtypes_unsupported" / f"{name}.pt")
    assert "dtypes_unsupported" in str(err.value)


def test_float8_e5m2_hand_built(tmp_path):
    values = np.array([1.5, -2.0, 0.25, 57344.0], ml_dtypes.float8_e5m2)
    p = _write_pt(tmp_path / "f8.pt", {
        "data.pkl": _dumps({"w": _t((2,), (2,), numel=4, offset=1, dtype="float8_e5m2")}),
        "data/0": values.tobytes()})
    w = load_pt(p)["w"]
    assert w.dtype == ml_dtypes.float8_e5m2
    np.testing.assert_array_equal(w.astype(np.float32), [-2.0, 57344.0])


def test_big_endian_untyped_storage(tmp_path):
    p = _write_pt(tmp_path / "be.pt", {
        "data.pkl": _dumps({"w": _t((3,), (1,), numel=6, dtype="uint16")}),
        "data/0": np.array([1, 258, 65535], ">u2").tobytes(), "byteorder": b"big"})
    np.testing.assert_array_equal(load_pt(p)["w"], [1, 258, 65535])
    np.testing.assert_array_equal(load_pt(p, views=True)["w"], [1, 258, 65535])


def test_conj_and_neg_bits_are_honoured(tmp_path):
    c = np.array([1 + 2j, 3 - 4j], np.complex64)
    obj = {"plain": _t((2,), (1,), kind="ComplexFloatStorage", numel=2),
           "conj": _t((2,), (1,), kind="ComplexFloatStorage", numel=2, metadata={"conj": True}),
           "neg": _t((2,), (1,), kind="ComplexFloatStorage", numel=2, metadata={"neg": True}),
           "both": _t((2, 2), (0, 1), kind="ComplexFloatStorage", numel=2,
                      metadata={"conj": True, "neg": True}),
           "off": _t((2,), (1,), kind="ComplexFloatStorage", numel=2,
                     metadata={"conj": False})}
    p = _write_pt(tmp_path / "bits.pt", {"data.pkl": _dumps(obj), "data/0": c.tobytes()})
    for views in [False, True]:
        t = load_pt(p, views=views)
        np.testing.assert_array_equal(t["plain"], c)  # the shared storage is left alone
        np.testing.assert_array_equal(t["conj"], np.conj(c))
        np.testing.assert_array_equal(t["neg"], -c)
        np.testing.assert_array_equal(t["both"], np.broadcast_to(-np.conj(c), (2, 2)))
        np.testing.assert_array_equal(t["off"], c)
    f = _write_pt(tmp_path / "negf.pt", {
        "data.pkl": _dumps(_t((3,), (1,), kind="HalfStorage", numel=3, metadata={"neg": True})),
        "data/0": np.array([1, -2, 0.5], np.float16).tobytes()})
    np.testing.assert_array_equal(load_pt(f), [-1, 2, -0.5])


@pytest.mark.parametrize("kind,metadata,pattern", [
    ("ByteStorage", {"neg": True}, "uint8 tensor has the negation bit"),
    ("BoolStorage", {"neg": True}, "bool tensor has the negation bit"),
    ("FloatStorage", {"zero": True}, r"metadata \['zero'\] is not supported"),
    ("FloatStorage", {"neg": 1}, "must be bools"),
    ("FloatStorage", ["conj"], "metadata must be a dict"),
])
def test_tensor_bits_that_cannot_be_honoured_are_refused(tmp_path, kind, metadata, pattern):
    p = _write_pt(tmp_path / "bits.pt", {
        "data.pkl": _dumps(_t((1,), (1,), kind=kind, metadata=metadata)),
        "data/0": bytes(np.dtype(pt_module._STORAGE_DTYPES[kind]).itemsize)})
    with pytest.raises(CorruptFileError, match=pattern):
        load_pt(p)


def test_tensors_in_sets_or_as_keys_are_refused(tmp_path):
    for obj in [_Call(_G("builtins", "set"), ([_t((1,), (1,))],)), {_t((1,), (1,)): 1}]:
        p = _write_pt(tmp_path / "s.pt", {"data.pkl": _dumps(obj), "data/0": bytes(4)})
        with pytest.raises(CorruptFileError, match="tensor (in a set|used as a dict key)"):
            load_pt(p)
