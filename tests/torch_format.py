"""Test helper: write PyTorch zip checkpoints without torch, byte for byte as torch.save does.

`save_torch_checkpoint` reproduces torch 2.x `torch.save(dict_of_cpu_tensors, path)`: the same
pickle (protocol 2, memo and all), the same records in the same order, and the same zip bytes
as torch's writer (miniz: stored, data descriptors, 64-byte aligned data padded with an "FB"
extra field, zip64 end records). Only `.data/serialization_id` (random in torch) differs unless
given. Checked against torch 2.13 in a scratch venv.

The rest builds hostile or broken files for the reader's refusal tests. Nothing here imports
torch: the pickle names torch globals through stand-ins whose GLOBAL opcode is written directly.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

# torch dtype name -> (storage class name, little-endian numpy dtype of the raw bytes)
STORAGES: dict[str, tuple[str, str]] = {
    "float32": ("FloatStorage", "<f4"),
    "float64": ("DoubleStorage", "<f8"),
    "float16": ("HalfStorage", "<f2"),
    "bfloat16": ("BFloat16Storage", "<u2"),
    "int64": ("LongStorage", "<i8"),
    "int32": ("IntStorage", "<i4"),
    "int16": ("ShortStorage", "<i2"),
    "int8": ("CharStorage", "<i1"),
    "uint8": ("ByteStorage", "<u1"),
    "bool": ("BoolStorage", "<u1"),
}
DEFAULT_SERIALIZATION_ID = "0123456789" * 4


class Global:
    """Stand-in for a global `module.name`; pickles as GLOBAL 'module name'."""

    def __init__(self, module: str, name: str):
        self.__module__, self.__qualname__ = module, name

    def __call__(self, *args: Any) -> Any:  # save_reduce requires a callable
        raise RuntimeError(f"stand-in for {self.__module__}.{self.__qualname__}")


REBUILD_TENSOR_V2 = Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dt: Global("torch", name) for dt, (name, _) in STORAGES.items()}


@dataclass
class Tensor:
    """A tensor as torch stores it: dtype name + raw values (bf16: uint16 bits), any shape."""

    dtype: str
    array: np.ndarray


@dataclass
class View:
    """A strided view of a 1-D storage: pass the same `storage` object to share it."""

    storage: Any  # 1-D numpy array / mlx array / Tensor
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def as_tensor(value: Any) -> Tensor:
    """numpy array, mlx array (bf16 kept bit-exact) or Tensor -> Tensor."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        name = "bool" if value.dtype == np.bool_ else value.dtype.name
        if name not in STORAGES:
            raise TypeError(f"unsupported numpy dtype {value.dtype}")
        return Tensor(name, value)
    import mlx.core as mx

    if isinstance(value, mx.array):
        if value.dtype == mx.bfloat16:
            return Tensor("bfloat16", np.array(value.view(mx.uint16)))
        return as_tensor(np.array(value))
    raise TypeError(f"cannot store {type(value).__name__} as a tensor")


class _Storage:
    def __init__(self, key: str, tensor: Tensor):
        self.key, self.tensor = key, tensor


class _TensorRef:
    """Pickles as torch.Tensor does: _rebuild_tensor_v2(storage, offset, size, stride, False,
    OrderedDict()) — requires_grad False, no backward hooks."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.args = (storage, offset, tuple(shape), tuple(stride))

    def __reduce_ex__(self, protocol: int) -> tuple:
        return REBUILD_TENSOR_V2, (*self.args, False, collections.OrderedDict())


class _Pickler(pickle._Pickler):  # the pure-Python pickler, so save_global can be replaced
    def __init__(self, file: Any):
        super().__init__(file, protocol=2)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        """Write GLOBAL without importing the module (torch) to check the name."""
        self.write(pickle.GLOBAL + f"{obj.__module__}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[Global] = save_global

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            t = obj.tensor
            return ("storage", _STORAGE_GLOBALS[t.dtype], obj.key, "cpu", t.array.size)
        return None


def dumps_state_dict(tensors: Mapping[str, Any], byteorder: str = "little"
                     ) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Pickle a dict name -> tensor like torch.save; returns (data.pkl, [(data/<key>, bytes)])."""
    storages: dict[int, _Storage] = {}

    def storage_of(obj: Any) -> _Storage:  # one storage per distinct object, as in torch
        if id(obj) not in storages:
            t = as_tensor(obj)
            storages[id(obj)] = _Storage(str(len(storages)), Tensor(t.dtype, t.array.reshape(-1)))
        return storages[id(obj)]

    refs: dict[str, Any] = {}
    for name, value in tensors.items():
        if isinstance(value, View):
            refs[name] = _TensorRef(storage_of(value.storage), value.offset, value.shape,
                                    value.stride)
        else:
            st = storage_of(value)
            shape = tuple(np.shape(value.array if isinstance(value, Tensor) else value))
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            refs[name] = _TensorRef(st, 0, shape, stride)
    buf = io.BytesIO()
    _Pickler(buf).dump(refs)
    order = "<" if byteorder == "little" else ">"
    data = []
    for st in storages.values():
        np_dtype = np.dtype(STORAGES[st.tensor.dtype][1]).newbyteorder(order)
        data.append((f"data/{st.key}", np.ascontiguousarray(st.tensor.array, np_dtype).tobytes()))
    return buf.getvalue(), data


def save_torch_checkpoint(path: str | Path, tensors: Mapping[str, Any], *,
                          archive_name: str | None = None, byteorder: str = "little",
                          serialization_id: str | None = DEFAULT_SERIALIZATION_ID) -> Path:
    """Write `tensors` (numpy / mlx arrays, Tensor, or View) as torch.save would.

    The archive prefix defaults to the file stem, as torch names it. `byteorder="big"` writes
    big-endian storages and says so in the `byteorder` record (torch.load swaps them back).
    """
    path = Path(path)
    pkl, data = dumps_state_dict(tensors, byteorder)
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", byteorder.encode()), *data, ("version", b"3\n")]
    if serialization_id is not None:
        records.append((".data/serialization_id", serialization_id.encode()))
    write_torch_zip(path, records, archive_name or path.stem)
    return path


def write_torch_zip(path: str | Path, records: Iterable[tuple[str, bytes]],
                    archive_name: str) -> None:
    """Zip `records` under `<archive_name>/` exactly as torch's PyTorchStreamWriter (miniz)."""
    out, central = bytearray(), bytearray()
    count = 0
    for name, data in records:
        fname = f"{archive_name}/{name}".encode()
        crc, offset = zlib.crc32(data), len(out)
        pad = -(offset + 30 + len(fname) + 4) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = 0x0808 if data else 0x0800  # UTF-8 names; a data descriptor unless empty
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0,
                           len(fname), len(extra)) + fname + extra + data
        if data:
            out += struct.pack("<4sIII", b"PK\x07\x08", crc, len(data), len(data))
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, flags, 0, 0, 0, crc,
                               len(data), len(data), len(fname), 0, 0, 0, 0, 0, offset) + fname
        count += 1
    cd_offset, cd_size = len(out), len(central)
    out += central
    eocd64 = len(out)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, count, count,
                       cd_size, cd_offset)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0)
    Path(path).write_bytes(bytes(out))


# --- broken and hostile files -------------------------------------------------------------


class _Call:
    """Pickles as `module.name(*args)` via __reduce__ — the classic code-execution payload."""

    def __init__(self, module: str, name: str, *args: Any):
        self.func, self.args = Global(module, name), args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def call_payload(module: str, name: str, *args: Any, protocol: int = 2) -> bytes:
    """Pickle bytes that call module.name(*args) when loaded by an unrestricted unpickler.

    protocol 2 names the callable with GLOBAL; protocol 4 with STACK_GLOBAL.
    """
    buf = io.BytesIO()
    p = _Pickler(buf)
    p.proto = protocol
    if protocol >= 4:  # STACK_GLOBAL: push module and name strings, then look them up
        def stack_global(self: _Pickler, obj: Any, name: str | None = None) -> None:
            self.save(obj.__module__)
            self.save(obj.__qualname__)
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
        p.dispatch = {**p.dispatch, Global: stack_global}
    p.dump({"weight": _Call(module, name, *args)})
    return buf.getvalue()


def write_raw_checkpoint(path: str | Path, data_pkl: bytes,
                         data: Iterable[tuple[str, bytes]] = (), archive_name: str = "archive"
                         ) -> Path:
    """A torch-layout archive with an arbitrary data.pkl (and optional data/<key> records)."""
    records = [("data.pkl", data_pkl), ("byteorder", b"little"), *data, ("version", b"3\n")]
    write_torch_zip(path, records, archive_name)
    return Path(path)


def rewrite_records(path: str | Path, changes: Mapping[str, bytes | None]) -> None:
    """Rewrite a checkpoint, replacing records (name relative to the prefix) or dropping them
    (value None). Used for missing / short data records and patched pickles."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        prefix = names[0].split("/", 1)[0]
        records = [(n.split("/", 1)[1], zf.read(n)) for n in names]
    out = [(n, changes.get(n, d)) for n, d in records]
    write_torch_zip(path, [(n, d) for n, d in out if d is not None], prefix)


def patch_pickle(path: str | Path, old: bytes, new: bytes) -> None:
    """Replace bytes inside data.pkl (e.g. rename a storage global)."""
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert old in pkl, old
    rewrite_records(path, {"data.pkl": pkl.replace(old, new)})


def truncate(path: str | Path, keep: int) -> None:
    """Cut the file to its first `keep` bytes."""
    p = Path(path)
    p.write_bytes(p.read_bytes()[:keep])


# torch's legacy (pre-1.6) format starts with this pickled magic number, then protocol version.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def write_legacy_checkpoint(path: str | Path) -> Path:
    """The head of a legacy, non-zip torch.save file (magic number, version 1001, sys info)."""
    body = LEGACY_MAGIC + pickle.dumps(1001, protocol=2) + pickle.dumps(
        {"protocol_version": 1001, "little_endian": True}, protocol=2)
    Path(path).write_bytes(body)
    return Path(path)
