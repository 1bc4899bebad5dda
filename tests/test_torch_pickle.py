"""convert/torch_pickle.py: torch-free reading of torch.save zip checkpoints, and refusals.

Files are made by tests/torch_format.py (byte-identical to torch.save; checked against torch
2.13 outside the project) plus one small file written by real torch.save, embedded below.
torch is never imported.
"""

from __future__ import annotations

import base64
import io
import pickle
import sys
import zipfile
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_format as tf  # noqa: E402
from convert.torch_pickle import (  # noqa: E402
    CheckpointError,
    CorruptCheckpointError,
    TensorData,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    load_torch_checkpoint,
    load_torch_checkpoint_numpy,
    read_torch_checkpoint,
)

# torch 2.13: w = arange(6.).reshape(2, 3); torch.save({"w": w, "t": w.t(),
# "b": tensor([1.5, -2, 3.25], dtype=bfloat16), "n": tensor(7)}, "golden.pt")  (zlib + base64)
GOLDEN = (
    "eNqllT1v00AYx89x4qSGNn2BtimU9yGRaJq3po4opIrAi5EagooqlihNTGLh2n2cSyuQkCqhVuoGdGFCjHyDMlaI"
    "DwALE2JhqJjYmLmzE9d2lfTtlMtJyfP/P7/zPc+5KLF+hEIhdGiE0Qiq62pN1qZrFVyJrz5XxUIYPXWPDd8rQNEl"
    "hgjWgali3ag24uUWVtQmXzbk5Zai1spY1pq6UV5L8eCLRpeCJLhJIit1GVhLwouqXsGPrR958JuGCQgssWStrraA"
    "kzgMwUcSknwSuwUhiZWYLejbrlZ1VZWrWNG1Jr9g1GRDrt1XqpgHPlaCcxjOl6DfdMMw0CDZG2zD3wg0TL8w9WMl"
    "3xYMSgy1HdpuUNkwhpESXDBly3DRkrVBCyZpMmuzjpphSRgjniyGcdNzEyISswkTlt8lDJdLMGkGanDF5fdQ1+q2"
    "11UzJAXXiBeD4TrxisUsjxsYbpbgVitelIKhncVvDwwSSmex6wmOIr5zgvFnurFSweU12WiSRyUWuPZBJqnd7t+f"
    "r2liOrvbRZBg27WPr1xRlbq2ImtYLGS8pXGskc1QgPw6/PGRFL6eAINovgOw/ALLOj1tsTB3qrydoSoYqzJl2Lz7"
    "O8KRLFxPhn6Ud3bFdEIs3DkLgOW6kSdf8+RD5gaZH+cp0dib/bfj5I/xI4imXERJsRA7PtFeHu0VzWxfJ3Z+nXz/"
    "qTPuP9j2pQSrP/Z1mjLUk2AAzXUI7GoWTo2Q5mnm7x/qi0fX3yRK2w1gbr4pGwrpgJcVev2UlZpYmD4pSELI5DKC"
    "IGRmc9mZREaYTc8kEkIuK8xk0lkhN5tKZtPZRC5NKbUnuwtRwhE1KRkKa3M6b4TwIXLPPe4VO/t/1CX8wqAuV4jX"
    "w9nCEZfHkA91vze8Ns4uHHTZvDuwsbvfq3Z2TL/7LmSRu2+9Umf5u6WfPNKkV+qsW09Wv1ua8kqdhTfgkr4/kHZ5"
    "4s5ymHRphwOod6EWJY673Q6+wk7Zwj7Pes9nrZ8DnS7lzIb9125b64UR4CxNnxlvxf4HDc3Log=="
)
GOLDEN_SERIALIZATION_ID = "0849488847965048735008968543689721636093"


def golden_bytes() -> bytes:
    return zlib.decompress(base64.b64decode(GOLDEN))


def bf16_bits(values: list[float]) -> np.ndarray:
    """float32 values that are exact in bf16 -> their bf16 bit patterns."""
    return (np.array(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def all_dtypes() -> dict[str, object]:
    rng = np.random.default_rng(0)
    special = [np.nan, np.inf, -np.inf, -0.0]
    out: dict[str, object] = {}
    for dt in (np.float32, np.float64, np.float16):
        a = rng.standard_normal((3, 5)).astype(dt)
        a.flat[:4] = special
        out[np.dtype(dt).name] = a
    for dt in (np.int64, np.int32, np.int16, np.int8, np.uint8):
        info = np.iinfo(dt)
        out[np.dtype(dt).name] = rng.integers(info.min, info.max, (2, 3, 4), dtype=dt,
                                              endpoint=True)
    out["bool"] = rng.random((4, 2)) > 0.5
    bits = rng.integers(0, 2**16, (6, 7), dtype=np.uint16)
    bits[0, :4] = bf16_bits([np.nan, np.inf, -np.inf, -0.0])
    out["bfloat16"] = tf.Tensor("bfloat16", bits)
    return out


# --- reading ------------------------------------------------------------------------------


def test_reads_real_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "golden.pt"
    path.write_bytes(golden_bytes())
    got = read_torch_checkpoint(path)
    assert list(got) == ["w", "t", "b", "n"]
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert got["w"].dtype == "float32" and np.array_equal(got["w"].array, w)
    assert np.array_equal(got["t"].array, w.T) and got["t"].array.flags.c_contiguous
    assert got["b"].dtype == "bfloat16"
    assert np.array_equal(got["b"].array, bf16_bits([1.5, -2.0, 3.25]))
    assert got["n"].dtype == "int64" and got["n"].shape == () and int(got["n"].array) == 7


def test_writer_is_byte_identical_to_torch_save(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float32)
    path = tf.save_torch_checkpoint(tmp_path / "golden.pt", {
        "w": tf.View(w, 0, (2, 3), (3, 1)), "t": tf.View(w, 0, (3, 2), (1, 3)),
        "b": tf.Tensor("bfloat16", bf16_bits([1.5, -2.0, 3.25])), "n": np.array(7, np.int64),
    }, serialization_id=GOLDEN_SERIALIZATION_ID)
    assert path.read_bytes() == golden_bytes()


def test_round_trip_all_dtypes_exact(tmp_path: Path) -> None:
    tensors = all_dtypes()
    path = tf.save_torch_checkpoint(tmp_path / "all.pt", tensors)
    got = read_torch_checkpoint(path)
    assert list(got) == list(tensors)
    for name, want in tensors.items():
        want = tf.as_tensor(want)
        assert got[name].dtype == want.dtype == name
        assert got[name].array.dtype == (np.uint16 if name == "bfloat16" else want.array.dtype)
        assert got[name].shape == want.array.shape
        assert got[name].array.tobytes() == want.array.tobytes()  # bit-exact, NaN payloads too


def test_mlx_and_numpy_views_preserve_values(tmp_path: Path) -> None:
    tensors = all_dtypes()
    path = tf.save_torch_checkpoint(tmp_path / "all.pt", tensors)
    arrays = load_torch_checkpoint(path)
    for name, want in tensors.items():
        a = arrays[name]
        assert isinstance(a, mx.array)
        assert a.dtype == getattr(mx, "bool_" if name == "bool" else name)
        if name == "bfloat16":
            assert np.array_equal(np.array(a.view(mx.uint16)), want.array)
        else:
            assert np.array(a).tobytes() == want.tobytes()
    numpy = load_torch_checkpoint_numpy(path)
    bf = numpy["bfloat16"]
    assert bf.dtype == np.float32
    assert np.array_equal(bf.view(np.uint32), tensors["bfloat16"].array.astype(np.uint32) << 16)


def test_mlx_bf16_input_round_trips(tmp_path: Path) -> None:
    x = mx.array([[0.1, -3.0, 1e30], [7.0, 2.5e-3, -0.0]]).astype(mx.bfloat16)
    path = tf.save_torch_checkpoint(tmp_path / "a.pt", {"x": x})
    y = load_torch_checkpoint(path)["x"]
    assert y.dtype == mx.bfloat16 and y.shape == (2, 3)
    assert np.array_equal(np.array(y.view(mx.uint16)), np.array(x.view(mx.uint16)))


def test_zero_dim_and_empty(tmp_path: Path) -> None:
    path = tf.save_torch_checkpoint(tmp_path / "z.pt", {
        "s": np.array(2.5, np.float32), "b": np.array(True), "e": np.zeros((0, 4), np.int32),
        "e1": np.zeros((0,), np.float16)})
    got = read_torch_checkpoint(path)
    assert got["s"].shape == () and float(got["s"].array) == 2.5
    assert got["b"].dtype == "bool" and bool(got["b"].array) is True
    assert got["e"].shape == (0, 4) and got["e"].array.dtype == np.int32
    assert load_torch_checkpoint(path)["e1"].shape == (0,)


def test_strides_offsets_and_shared_storage(tmp_path: Path) -> None:
    base = np.arange(30, dtype=np.float64)
    bits = np.arange(12, dtype=np.uint16) * 1000
    views = {
        "transposed": tf.View(base, 0, (5, 6), (1, 5)),
        "offset_step": tf.View(base, 7, (3, 4), (8, 2)),
        "broadcast": tf.View(base, 3, (4, 3), (0, 1)),
        "scalar": tf.View(base, 29, (), ()),
        "empty": tf.View(base, 30, (0, 2), (2, 1)),
        "whole": base,
        "bf16_T": tf.View(tf.Tensor("bfloat16", bits), 1, (2, 5), (1, 2)),
    }
    path = tf.save_torch_checkpoint(tmp_path / "v.pt", views)
    got = read_torch_checkpoint(path)
    strided = np.lib.stride_tricks.as_strided
    assert np.array_equal(got["transposed"].array, base[:30].reshape(6, 5).T)
    assert np.array_equal(got["offset_step"].array, strided(base[7:], (3, 4), (64, 16)))
    assert np.array_equal(got["broadcast"].array, np.broadcast_to(base[3:6], (4, 3)))
    assert got["scalar"].shape == () and float(got["scalar"].array) == 29.0
    assert got["empty"].shape == (0, 2)
    assert np.array_equal(got["bf16_T"].array, strided(bits[1:], (2, 5), (2, 4)))
    for t in got.values():
        assert t.array.flags.c_contiguous and t.array.flags.writeable
    # one storage record serves all views of `base`
    with zipfile.ZipFile(path) as zf:
        assert sorted(n for n in zf.namelist() if "/data/" in n) == ["v/data/0", "v/data/1"]


def test_big_endian_byteorder_record(tmp_path: Path) -> None:
    tensors = all_dtypes()
    path = tf.save_torch_checkpoint(tmp_path / "be.pt", tensors, byteorder="big")
    got = read_torch_checkpoint(path)
    for name, want in tensors.items():
        assert got[name].array.tobytes() == tf.as_tensor(want).array.tobytes()


def test_archive_prefix_and_missing_byteorder(tmp_path: Path) -> None:
    pkl, data = tf.dumps_state_dict({"x": np.arange(3, dtype=np.int16)})
    path = tmp_path / "p.pt"
    tf.write_torch_zip(path, [("data.pkl", pkl), *data], "archive")  # no byteorder: little
    assert np.array_equal(read_torch_checkpoint(path)["x"].array, [0, 1, 2])


def test_ordered_dict_top_level_with_metadata(tmp_path: Path) -> None:
    """A model.state_dict() is an OrderedDict whose _metadata is set by BUILD."""
    path = tf.save_torch_checkpoint(tmp_path / "sd.pt", {"w": np.ones(2, np.float32)})
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read("sd/data.pkl")
    # OrderedDict() REDUCE in place of EMPTY_DICT, the same SETITEM, then BUILD {"_metadata": {}}
    assert pkl.startswith(b"\x80\x02}q\x00") and pkl.endswith(b"s.")
    new = (b"\x80\x02ccollections\nOrderedDict\nq\xf0)Rq\xf1" + pkl[5:-1]
           + b"}X\x09\x00\x00\x00_metadata}sb.")
    tf.rewrite_records(path, {"data.pkl": new})
    got = read_torch_checkpoint(path)
    assert list(got) == ["w"] and np.array_equal(got["w"].array, [1.0, 1.0])


# --- refusals -----------------------------------------------------------------------------


def hostile(tmp_path: Path, module: str, name: str, *args: object, protocol: int = 2) -> Path:
    payload = tf.call_payload(module, name, *args, protocol=protocol)
    return tf.write_raw_checkpoint(tmp_path / "evil.pt", payload)


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_payload_never_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "PWNED"
    path = hostile(tmp_path, "os", "system", f"touch {marker}", protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"refused global os\.system"):
        read_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("module,name,args", [
    ("builtins", "eval", ("__import__('os').system('touch PWNED')",)),
    ("builtins", "exec", ("open('PWNED', 'w')",)),
    ("posix", "system", ("touch PWNED",)),
    ("subprocess", "Popen", (["touch", "PWNED"],)),
    ("builtins", "getattr", ("x", "y")),
    ("torch.nn.modules.module", "Module", ()),
    ("torch._utils", "_rebuild_parameter", ()),
    ("torch.serialization", "_get_layout", ("torch.strided",)),
    ("collections", "defaultdict", ()),
])
def test_refuses_other_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               module: str, name: str, args: tuple) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=f"refused global {module}.{name}"):
        read_torch_checkpoint(hostile(tmp_path, module, name, *args))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("opcode,pkl", [
    ("INST", b"\x80\x02(X\x04\x00\x00\x00trueios\nsystem\n."),
    ("OBJ", b"\x80\x02(ccollections\nOrderedDict\no."),
    ("NEWOBJ", b"\x80\x02ccollections\nOrderedDict\n)\x81."),
    ("EXT1", b"\x80\x02\x82\x01."),
    ("PERSID", b"\x80\x02Pfoo\n."),
])
def test_refuses_object_building_opcodes(tmp_path: Path, opcode: str, pkl: bytes) -> None:
    path = tf.write_raw_checkpoint(tmp_path / "op.pt", pkl)
    with pytest.raises(UnsafeCheckpointError, match=f"refused pickle opcode {opcode}$"):
        read_torch_checkpoint(path)


def test_refuses_build_on_rebuild_function(tmp_path: Path) -> None:
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__Nsb."
    path = tf.write_raw_checkpoint(tmp_path / "b.pt", pkl)
    with pytest.raises(CorruptCheckpointError, match="set state"):
        read_torch_checkpoint(path)


def test_unknown_storage_type(tmp_path: Path) -> None:
    path = tf.save_torch_checkpoint(tmp_path / "c.pt", {"x": np.ones(4, np.float32)})
    tf.patch_pickle(path, b"torch\nFloatStorage\n", b"torch\nComplexFloatStorage\n")
    with pytest.raises(UnsupportedCheckpointError, match="torch.ComplexFloatStorage"):
        read_torch_checkpoint(path)


def test_legacy_format(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedCheckpointError, match="legacy"):
        read_torch_checkpoint(tf.write_legacy_checkpoint(tmp_path / "old.pt"))


def _good(tmp_path: Path) -> Path:
    return tf.save_torch_checkpoint(tmp_path / "g.pt", {"a": np.arange(8, dtype=np.float32),
                                                        "b": np.ones((2, 2), np.int64)})


def _flip_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[raw.index(np.arange(8, dtype=np.float32).tobytes()) + 5] ^= 0xFF  # inside data/0
    path.write_bytes(bytes(raw))


CORRUPT_CASES = {
    "truncated_half": (lambda p: tf.truncate(p, p.stat().st_size // 2), "zip"),
    "truncated_tiny": (lambda p: tf.truncate(p, 12), "zip"),
    "truncated_tail": (lambda p: tf.truncate(p, p.stat().st_size - 3), "zip"),
    "missing_data_record": (lambda p: tf.rewrite_records(p, {"data/1": None}), "missing data"),
    "missing_data_pkl": (lambda p: tf.rewrite_records(p, {"data.pkl": None}), "data.pkl"),
    "short_data_record": (lambda p: tf.rewrite_records(p, {"data/0": b"\0" * 28}), "28 bytes"),
    "garbled_pickle": (lambda p: tf.rewrite_records(p, {"data.pkl": b"\x80\x02}q\x00(X\xff"}),
                       "bad pickle"),
    "empty_pickle": (lambda p: tf.rewrite_records(p, {"data.pkl": b""}), "bad pickle"),
    "bad_byteorder": (lambda p: tf.rewrite_records(p, {"byteorder": b"middle"}), "byteorder"),
    "crc_mismatch": (_flip_data_byte, "Bad CRC"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_archives(tmp_path: Path, case: str) -> None:
    damage, words = CORRUPT_CASES[case]
    path = _good(tmp_path)
    damage(path)
    with pytest.raises(CorruptCheckpointError, match=words) as err:
        read_torch_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_storage_too_short_for_view(tmp_path: Path) -> None:
    base = np.arange(10, dtype=np.float32)
    path = tf.save_torch_checkpoint(tmp_path / "s.pt", {"x": tf.View(base, 4, (3, 3), (3, 1))})
    with pytest.raises(CorruptCheckpointError, match="has 10 elements.*needs 13"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("offset,shape,stride,words", [
    (-1, (2,), (1,), "offset"),
    (0, (2, 2), (1,), "size"),
    (0, (2,), (-1,), "stride"),
    (0, (2**62, 2**62), (1, 1), "needs"),
])
def test_bad_tensor_geometry(tmp_path: Path, offset: int, shape: tuple, stride: tuple,
                             words: str) -> None:
    path = tf.save_torch_checkpoint(tmp_path / "s.pt", {
        "x": tf.View(np.arange(10, dtype=np.int32), offset, shape, stride)})
    with pytest.raises(CorruptCheckpointError, match=words):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("pid", [
    ("storage",),
    ("storage", "FloatStorage", "0", "cpu", 1),  # a string, not the storage global
    ("file", tf.Global("torch", "FloatStorage"), "0", "cpu", 1),
    ("storage", tf.Global("torch", "FloatStorage"), 0, "cpu", 1),
    ("storage", tf.Global("torch", "FloatStorage"), "0", "cpu", -1),
])
def test_bad_persistent_ids(tmp_path: Path, pid: tuple) -> None:
    class P(tf._Pickler):
        def persistent_id(self, obj: object) -> object:
            return pid if obj == "STORAGE" else None
    buf = io.BytesIO()
    P(buf).dump({"x": "STORAGE"})
    path = tf.write_raw_checkpoint(tmp_path / "pid.pt", buf.getvalue(),
                                   [("data/0", b"\0" * 4)])
    with pytest.raises(CorruptCheckpointError, match="persistent id"):
        read_torch_checkpoint(path)


def test_bool_storage_must_be_0_or_1(tmp_path: Path) -> None:
    path = tf.save_torch_checkpoint(tmp_path / "b.pt", {"m": np.array([True, False])})
    tf.rewrite_records(path, {"data/0": b"\x01\x02"})
    with pytest.raises(CorruptCheckpointError, match="0/1"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("obj,words", [
    ([1, 2], "top-level object is list"),
    ("weights", "top-level object is str"),
    ({"x": 1.0}, "value of 'x' is float"),
    ({"x": [1.0]}, "value of 'x' is list"),
    ({3: "y"}, "key 3 is not a string"),
])
def test_top_level_must_be_dict_of_tensors(tmp_path: Path, obj: object, words: str) -> None:
    path = tf.write_raw_checkpoint(tmp_path / "t.pt", pickle.dumps(obj, protocol=2))
    with pytest.raises(CorruptCheckpointError, match=words):
        read_torch_checkpoint(path)


def test_value_mixing_tensor_inside_container_is_refused(tmp_path: Path) -> None:
    pkl, data = tf.dumps_state_dict({"x": np.ones(2, np.float32)})
    # {"x": [tensor]}: wrap the tensor's REDUCE result in a list (EMPTY_LIST ... APPEND)
    i = pkl.index(b"q\x01") + 2
    j = pkl.rindex(b"R")  # the tensor's REDUCE
    new = pkl[:i] + b"]" + pkl[i:j + 1] + b"a" + pkl[j + 1:]
    path = tf.write_raw_checkpoint(tmp_path / "n.pt", new, data)
    with pytest.raises(CorruptCheckpointError, match="value of 'x' is list"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("content,cls,words", [
    (b"", CorruptCheckpointError, "empty"),
    (b"hello, not a checkpoint", CorruptCheckpointError, "not a PyTorch zip"),
    (b"\x80\x02}q\x00.", UnsupportedCheckpointError, "legacy"),
])
def test_not_a_zip(tmp_path: Path, content: bytes, cls: type, words: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(cls, match=words):
        read_torch_checkpoint(path)


def test_random_damage_only_raises_checkpoint_errors(tmp_path: Path) -> None:
    """Random byte damage anywhere (zip headers, pickle, storages) must end in a clean read
    (e.g. a byte of padding changed) or a one-line CheckpointError, never another exception."""
    good = _good(tmp_path).read_bytes()
    rng = np.random.default_rng(1)
    path = tmp_path / "fuzz.pt"
    for _ in range(400):
        raw = bytearray(good)
        for i in rng.integers(0, len(raw), rng.integers(1, 4)):
            raw[i] = rng.integers(0, 256)
        path.write_bytes(bytes(raw))
        try:
            read_torch_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)


def test_error_hierarchy_and_torch_never_imported() -> None:
    for cls in (UnsafeCheckpointError, CorruptCheckpointError, UnsupportedCheckpointError):
        assert issubclass(cls, CheckpointError)
    assert TensorData("int8", np.zeros(1, np.int8)).to_numpy().dtype == np.int8
    assert "torch" not in sys.modules
