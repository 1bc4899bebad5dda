"""Read PyTorch zip checkpoints (`torch.save` of a plain dict name -> tensor) without torch.

A torch ≥ 1.6 checkpoint is a zip archive:

    <prefix>/data.pkl      pickle (protocol 2) of the dict; each tensor is
                           `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
                           requires_grad, backward_hooks)`, its storage a persistent id
                           ('storage', torch.<T>Storage, key, location, numel)
    <prefix>/data/<key>    raw bytes of storage <key> (numel elements, no header)
    <prefix>/byteorder     "little" or "big" (absent in old files: little)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id  (ignored)

Unpickling is the dangerous part: a pickle can call any importable callable. The unpickler
below resolves only the handful of names a dict of dense tensors needs, to local stand-ins
(torch is never imported), and refuses every other global before anything is called.

Cost is the other danger: a tiny file can declare gigabytes. Everything is bounded before it
is allocated (`Limits`): the file and pickle sizes, the number of pickle opcodes, memo indices,
dict keys (strings only, so no hash walks a shared-reference bomb), every storage's declared
size against its record and the total budget, compression methods and ratios (records are
read in bounded chunks, never inflated whole), each view's size before it is copied, and the
length of every value quoted in a message.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Optional

import numpy as np

from dmem_mlx.errors import (CheckpointError, CorruptCheckpointError, UnsafeCheckpointError,
                             UnsupportedCheckpointError, brief)
from dmem_mlx.files import open_regular

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "TensorData",
    "Limits",
    "read_torch_checkpoint",
    "load_torch_checkpoint",
    "load_torch_checkpoint_numpy",
]


# torch storage class name -> (torch dtype name, little-endian numpy dtype of the raw bytes).
# bfloat16 has no numpy dtype: its raw bits are kept as uint16.
STORAGE_DTYPES: dict[str, tuple[str, str]] = {
    "FloatStorage": ("float32", "<f4"),
    "DoubleStorage": ("float64", "<f8"),
    "HalfStorage": ("float16", "<f2"),
    "BFloat16Storage": ("bfloat16", "<u2"),
    "LongStorage": ("int64", "<i8"),
    "IntStorage": ("int32", "<i4"),
    "ShortStorage": ("int16", "<i2"),
    "CharStorage": ("int8", "<i1"),
    "ByteStorage": ("uint8", "<u1"),
    "BoolStorage": ("bool", "<u1"),  # read as bytes, checked to be 0/1, then viewed as bool
}


FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
MAX_NDIM = 16


@dataclass(frozen=True)
class Limits:
    """What a checkpoint may cost to read; anything beyond is refused before it is allocated.

    max_bytes: total bytes of storage data read, and separately of tensors built from it (a
        view never costs more than this, whatever its strides). The converter passes the expected adapter size
        plus slack. max_pickle_bytes / max_pickle_ops: the size and opcode count of data.pkl.
    max_ratio: the largest inflated/compressed ratio of a record (deflate cannot exceed ~1032).
    dtypes: storage dtypes accepted (None: every dtype in STORAGE_DTYPES).
    """

    max_bytes: int = 1 << 30
    max_pickle_bytes: int = 4 << 20
    max_pickle_ops: int = 200_000
    max_ratio: float = 1100.0
    dtypes: Optional[Collection[str]] = None

    @property
    def max_file_bytes(self) -> int:
        """The checkpoint file itself: data, pickle and zip overhead."""
        return self.max_bytes + self.max_pickle_bytes + (1 << 20)


@dataclass(frozen=True)
class TensorData:
    """One tensor read from a checkpoint, dtype preserved exactly.

    `dtype` is the torch dtype name without `torch.` (a value of STORAGE_DTYPES, e.g.
    "bfloat16"). `array` is a C-contiguous, native-byte-order numpy array with the tensor's
    shape (`()` for 0-d tensors) holding the values; for "bfloat16" it holds the raw bit
    patterns as uint16, because numpy has no bfloat16.
    """

    dtype: str
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def to_numpy(self) -> np.ndarray:
        """Values as numpy; bfloat16 is widened to float32 (exact: bf16 is the top half of f32)."""
        if self.dtype == "bfloat16":
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array

    def to_mlx(self) -> Any:
        """Values as an mlx.core.array of the same dtype (bfloat16 bit-exact)."""
        import mlx.core as mx

        if self.dtype == "bfloat16":
            return mx.array(self.array).view(mx.bfloat16)
        dtype = mx.bool_ if self.dtype == "bool" else getattr(mx, self.dtype)
        return mx.array(self.array, dtype=dtype)  # explicit: mx.array would narrow float64


def read_torch_checkpoint(path: str | Path, limits: Limits = Limits()) -> dict[str, TensorData]:
    """Read a torch zip checkpoint holding a dict name -> tensor, in the file's key order.

    Raises a CheckpointError subclass for any bad content (also for anything beyond `limits`),
    OSError if the file can't be read.
    """
    path = Path(path)
    f, size = open_regular(path, CorruptCheckpointError, limits.max_file_bytes,
                           "checkpoint")
    with f:
        if size == 0:
            raise CorruptCheckpointError(f"{path}: empty file")
        head = f.read(512)
        if not head.startswith(b"PK\x03\x04"):
            if head[:1] == b"\x80" or head[257:262] == b"ustar":
                raise UnsupportedCheckpointError(
                    f"{path}: legacy (non-zip) torch.save format; re-save it with torch>=1.6 "
                    "defaults (_use_new_zipfile_serialization=True)")
            raise CorruptCheckpointError(
                f"{path}: not a PyTorch zip checkpoint (no zip signature)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf:
                return _read_archive(path, zf, limits)
        except CheckpointError:
            raise
        except _ZIP_ERRORS as exc:
            raise CorruptCheckpointError(
                f"{path}: unreadable zip archive: {_one_line(exc)}") from None


def load_torch_checkpoint(path: str | Path, limits: Limits = Limits()) -> dict[str, Any]:
    """Read a checkpoint as {name: mlx.core.array}, dtypes preserved (bf16 stays bf16 bit-exact)."""
    return {k: t.to_mlx() for k, t in read_torch_checkpoint(path, limits).items()}


def load_torch_checkpoint_numpy(path: str | Path,
                                limits: Limits = Limits()) -> dict[str, np.ndarray]:
    """Read a checkpoint as {name: numpy array}; bfloat16 tensors come back as exact float32."""
    return {k: t.to_numpy() for k, t in read_torch_checkpoint(path, limits).items()}


# --- internals -----------------------------------------------------------------------------


# What zipfile raises on damaged archives (RuntimeError: encrypted; NotImplementedError:
# unknown compression; OSError/EOFError: truncation; KeyError: dangling central directory).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError,
               NotImplementedError, RuntimeError)
_CHUNK = 1 << 20


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Sealed:
    """Base of the stand-ins the unpickler hands out: slotted, and a pickle BUILD on one fails
    (so a hostile pickle can't rewrite a storage's array or a rebuild function's defaults)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CorruptCheckpointError(f"pickle tries to set state on {type(self).__name__}")


class _StorageType(_Sealed):
    """Stand-in for a torch.<T>Storage class named in the pickle."""

    __slots__ = ("name", "dtype", "np_dtype")

    def __init__(self, name: str, dtype: str, np_dtype: str):
        self.name, self.dtype, self.np_dtype = name, dtype, np_dtype


class _Storage(_Sealed):
    """A loaded storage: 1-D array of its elements (bool still as uint8)."""

    __slots__ = ("key", "type", "array")

    def __init__(self, key: str, stype: _StorageType, array: np.ndarray):
        self.key, self.type, self.array = key, stype, array


class _Tensor(_Sealed):
    """A rebuilt tensor inside the unpickler; becomes a TensorData once the load is done."""

    __slots__ = ("data",)

    def __init__(self, data: TensorData):
        self.data = data


class _Function(_Sealed):
    """An allowed callable global (REDUCE calls it with the pickle's arguments)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _empty_ordered_dict(*args: Any) -> collections.OrderedDict:
    """OrderedDict() as pickled (protocol 2 reduces it to a call without arguments; the items
    come after, through SETITEMS, where keys are checked)."""
    if args:
        raise CorruptCheckpointError("OrderedDict is called with arguments")
    return collections.OrderedDict()


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # backward_hooks, and the top level of a state_dict() (BUILD then sets its _metadata)
    ("collections", "OrderedDict"): _Function(_empty_ordered_dict),
    **{("torch", name): _StorageType(name, *types) for name, types in STORAGE_DTYPES.items()},
}
_REBUILD_NAMES = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


# Opcodes of plain data, memo, globals (checked by find_class), REDUCE, BUILD and BINPERSID:
# what torch.save of a dict / state_dict of tensors emits, in any protocol. Refused before
# unpickling: INST/OBJ/NEWOBJ(_EX) (instantiate classes), EXT1/2/4 (copyreg registry), text
# PERSID, protocol-5 out-of-band buffers, and sets (never saved by torch; their items hash).
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "APPEND",
    "APPENDS", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
})


def _check_opcodes(data: bytes, limits: Limits) -> None:
    """Refuse opcodes outside _ALLOWED_OPCODES and pickles too long, without executing anything."""
    count = 0
    for op, _arg, _pos in pickletools.genops(data):
        if op.name not in _ALLOWED_OPCODES:
            raise UnsafeCheckpointError(f"refused pickle opcode {op.name}")
        count += 1
        if count > limits.max_pickle_ops:
            raise CorruptCheckpointError(
                f"the pickle has more than {limits.max_pickle_ops:,} opcodes")


def _checked_keys(keys: Any) -> None:
    for key in keys:
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"key {brief(key)} is not a string")


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only _ALLOWED_GLOBALS; storages come from the archive via persistent ids.

    The pure-Python unpickler (its memo is a dict, so a huge memo index costs nothing) with the
    dict-building opcodes checked: keys are strings, so no hash ever walks a hostile structure.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, big_endian: bool,
                 limits: Limits):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._big, self._limits = zf, prefix, big_endian, limits
        self._storages: dict[str, _Storage] = {}
        self._spent = {"read": 0, "built": 0}  # storage bytes read, tensor bytes built

    def _spend(self, kind: str, nbytes: int, what: str) -> None:
        """Count `nbytes` more of `kind` against limits.max_bytes, before they are allocated."""
        if self._spent[kind] + nbytes > self._limits.max_bytes:
            raise CorruptCheckpointError(
                f"{what} would take the checkpoint past {self._limits.max_bytes:,} bytes, more "
                "than an adapter of this size holds")
        self._spent[kind] += nbytes

    def _load_setitem(self) -> None:
        _checked_keys([self.stack[-2]])
        pickle._Unpickler.load_setitem(self)

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        _checked_keys(items[0::2])
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        _checked_keys(items[0::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILD_NAMES:
            return _Function(self._rebuild_tensor)
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name.endswith("Storage"):
            raise UnsupportedCheckpointError(
                f"unsupported storage type {brief(module)[1:-1]}.{brief(name)[1:-1]}")
        raise UnsafeCheckpointError(f"refused global {brief(module)[1:-1]}.{brief(name)[1:-1]} "
                                    "(only tensors are allowed)")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptCheckpointError(f"bad persistent id {brief(pid)}")
        _, stype, key, _location, numel = pid  # location ignored: everything loads to CPU
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel) \
                or numel < 0:
            raise CorruptCheckpointError(f"bad persistent id {brief(pid)}")
        allowed = self._limits.dtypes
        if allowed is not None and stype.dtype not in allowed:
            raise UnsupportedCheckpointError(
                f"storage {brief(key)} has dtype {stype.dtype}; an adapter's dtypes are "
                f"{', '.join(sorted(allowed))}")
        if key in self._storages:
            cached = self._storages[key]
            if cached.type is not stype or len(cached.array) != numel:
                raise CorruptCheckpointError(
                    f"storage {brief(key)} is referenced with different types")
            return cached
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise CorruptCheckpointError(f"missing data record {brief(name)}") from None
        file_dtype = np.dtype(stype.np_dtype).newbyteorder(">" if self._big else "<")
        if info.file_size != numel * file_dtype.itemsize:  # checked before inflating anything
            raise CorruptCheckpointError(
                f"data record {brief(name)} has {info.file_size} bytes, expected "
                f"{brief(numel)} x {file_dtype.itemsize}")
        self._spend("read", info.file_size, f"storage {brief(key)} ({info.file_size:,} bytes)")
        raw = _read_record(self._zf, info, self._limits)
        arr = np.frombuffer(raw, dtype=file_dtype)
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # native byte order
        if stype.dtype == "bool" and arr.size and arr.max() > 1:
            raise CorruptCheckpointError(f"bool storage {brief(name)} holds bytes other than 0/1")
        storage = _Storage(key, stype, arr)
        self._storages[key] = storage
        return storage

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                        requires_grad: Any = False, backward_hooks: Any = None,
                        metadata: Any = None) -> _Tensor:
        """torch.Tensor.as_strided on the storage, validated, then copied contiguous.

        requires_grad, hooks (an empty OrderedDict when saved) and metadata don't affect values.
        """
        if not isinstance(storage, _Storage):
            raise CorruptCheckpointError(
                f"tensor storage is {type(storage).__name__}, not a storage")
        if not _is_int(storage_offset) or storage_offset < 0:
            raise CorruptCheckpointError(f"bad storage offset {brief(storage_offset)}")
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
            raise CorruptCheckpointError("tensor size/stride are not tuples")
        if len(size) > MAX_NDIM or len(size) != len(stride) or \
                not all(_is_int(v) and v >= 0 for v in (*size, *stride)):
            raise CorruptCheckpointError(f"bad tensor size {brief(size)} / stride {brief(stride)}")
        data = storage.array
        numel = len(data)
        if 0 in size:
            end = storage_offset  # an empty tensor reads nothing
        else:
            end = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
        if end > numel:
            raise CorruptCheckpointError(
                f"storage {brief(storage.key)} has {numel} elements, tensor size "
                f"{brief(tuple(size))} stride {brief(tuple(stride))} offset {storage_offset} "
                f"needs {brief(end)}")
        # The copy costs numel x itemsize whatever the strides (a stride-0 view of a small
        # storage can be huge): count it before making it.
        self._spend("built", math.prod(size) * data.itemsize, f"a tensor of shape {brief(tuple(size))}")
        if 0 in size:
            out = np.empty(tuple(size), dtype=data.dtype)
        else:
            view = np.lib.stride_tricks.as_strided(
                data[storage_offset:], shape=tuple(size),
                strides=tuple(s * data.itemsize for s in stride), writeable=False)
            out = np.array(view, order="C")  # a contiguous copy, never aliasing the storage
        if storage.type.dtype == "bool":
            out = out.view(np.bool_)
        return _Tensor(TensorData(storage.type.dtype, out))


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits) -> bytes:
    """The bytes of one record, exactly its declared size, read in bounded chunks (a record
    whose data inflates past its declared size, or ends before it, is refused)."""
    name = brief(info.filename)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsupportedCheckpointError(
            f"record {name} uses compression method {info.compress_type} (torch.save stores)")
    if info.compress_type == zipfile.ZIP_DEFLATED and \
            info.file_size > limits.max_ratio * max(info.compress_size, 1) + 4096:
        raise CorruptCheckpointError(
            f"record {name} claims to inflate {info.compress_size:,} bytes into "
            f"{info.file_size:,} (a zip bomb?)")
    out = bytearray(info.file_size)
    filled = 0
    try:
        with zf.open(info) as f:
            while filled < info.file_size:
                chunk = f.read(min(_CHUNK, info.file_size - filled))
                if not chunk:
                    break
                out[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled == info.file_size and f.read(1):
                filled += 1
    except _ZIP_ERRORS as exc:
        raise CorruptCheckpointError(f"unreadable record {name}: {_one_line(exc)}") from None
    if filled != info.file_size:
        raise CorruptCheckpointError(
            f"record {name} holds {'more' if filled > info.file_size else 'fewer'} bytes than "
            f"the {info.file_size:,} its header declares")
    return bytes(out)


def _read_archive(path: Path, zf: zipfile.ZipFile, limits: Limits) -> dict[str, TensorData]:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CorruptCheckpointError(
            f"{path}: expected one <prefix>/data.pkl record, found {len(pkls)}")
    prefix = pkls[0][: -len("data.pkl")]
    big = False
    if f"{prefix}byteorder" in names:
        info = zf.getinfo(f"{prefix}byteorder")
        raw = _read_record(zf, info, limits) if info.file_size <= 16 else b"?"
        order = raw.decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CorruptCheckpointError(f"{path}: unknown byteorder {brief(order)}")
        big = order == "big"
    info = zf.getinfo(pkls[0])
    if info.file_size > limits.max_pickle_bytes:
        raise CorruptCheckpointError(
            f"{path}: data.pkl declares {info.file_size:,} bytes, more than the "
            f"{limits.max_pickle_bytes:,} a dict of tensors needs")
    try:
        data = _read_record(zf, info, limits)
        _check_opcodes(data, limits)
        obj = _RestrictedUnpickler(data, zf, prefix, big, limits).load()
    except CheckpointError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: pickle nests too deeply") from None
    except MemoryError:
        raise CorruptCheckpointError(f"{path}: the pickle asks for too much memory") from None
    except Exception as exc:  # any other failure of hostile/garbled pickle data
        raise CorruptCheckpointError(f"{path}: bad pickle: {_one_line(exc)}") from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(
            f"{path}: top-level object is {type(obj).__name__}, expected a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{path}: key {brief(key)} is not a string")
        if not isinstance(value, _Tensor):
            raise CorruptCheckpointError(
                f"{path}: value of {brief(key)} is {type(value).__name__}, not a tensor")
    return {key: value.data for key, value in obj.items()}
