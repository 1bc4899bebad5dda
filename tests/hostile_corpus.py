"""A corpus of hostile and careless inputs, each refused by a CLI in one line (issue 14).

Every case writes its input under a directory (small files, made at run time; a few are sparse
or declare sizes they do not hold), then runs one CLI on it in this process: `python -m
convert` for adapters, model cards and configs, `dmem-chat` for memory files, `python -m
dmem_mlx.generate` and `dmem-serve` for converted models. `run_case` returns (exit code,
stderr, seconds); a clean refusal is exit 1 with one `error:` line and no traceback, every
input left unchanged.

Used by tests/test_hostile.py (every case refused, inputs unchanged) and
benchmarks/bench_hostile.py (one subprocess per case: time and peak RSS). `scale="bench"`
writes the issue's sizes (512 MiB zip bombs, 10^12-fold reference fan-out); "test" the same
shapes smaller, so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_format as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = "base"  # the tiny base model directory, under the corpus directory
MODEL = "model"  # a tiny converted δ-mem model directory


@dataclass
class Case:
    name: str
    cli: str  # "convert", "chat", "generate" or "serve"
    build: Callable[[Path, str], list[str]]  # (case dir, scale) -> argv for the CLI


CASES: dict[str, Case] = {}


def case(name: str, cli: str = "convert"):
    def register(build):
        CASES[name] = Case(name, cli, build)
        return build
    return register


# --- shared pieces ---------------------------------------------------------------------------
def prepare(root: Path) -> None:
    """The tiny base model and converted model every case points at (built once)."""
    from dmem_mlx.tiny import make_tiny_backbone, make_tiny_dmem

    if not (root / BASE / "config.json").is_file():
        make_tiny_backbone(root / BASE)
    if not (root / MODEL / "config.json").is_file():
        make_tiny_dmem(root / MODEL)


def good_config(**changes) -> dict:
    config = {"rank": 8, "alpha": 16.0, "delta_heads": ["q", "o"], "target_layers": [0, 1]}
    config.update(changes)
    return config


def good_tensors(config: dict | None = None) -> dict[str, np.ndarray]:
    """Zeros of every shape the official code saves for `config` on the tiny base."""
    from convert.adapter import expected_shapes
    from dmem_mlx.config import DeltaMemConfig
    from dmem_mlx.tiny import build_model, tiny_args

    shapes = expected_shapes(DeltaMemConfig.from_dict(config or good_config()),
                             build_model(tiny_args()))
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


def adapter(d: Path, config=None, pt: bytes | None = None, card: str | None = None,
            tensors=None) -> list[str]:
    """An adapter directory (config, checkpoint, card naming the tiny base) → convert argv."""
    a = d / "adapter"
    a.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (a / "delta_mem_config.json").write_text(
            config if isinstance(config, str) else json.dumps(config))
    else:
        (a / "delta_mem_config.json").write_text(json.dumps(good_config()))
    if pt is not None:
        (a / "delta_mem_adapter.pt").write_bytes(pt)
    elif not (a / "delta_mem_adapter.pt").exists():
        tf.save_torch_checkpoint(a / "delta_mem_adapter.pt",
                                 tensors if tensors is not None else good_tensors())
    if card is None:
        card = f"---\nbase_model: {json.dumps(str(d.parent / BASE))}\n---\n# adapter\n"
    if card != "":
        (a / "README.md").write_text(card)
    return ["--hf-repo", str(a), "--mlx-path", str(d / "out")]


def raw_pt(d: Path, pkl: bytes, records=()) -> bytes:
    path = tf.write_raw_checkpoint(d / "raw.pt", pkl, records)
    data = path.read_bytes()
    path.unlink()
    return data


P = pickle  # opcode constants


def _global(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    b = s.encode()
    return P.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return P.BININT + struct.pack("<i", i)


def fanout(levels: int, width: int, memo_start: int = 100, tuples: bool = False) -> bytes:
    """Opcodes pushing one structure of `levels` nested containers, each holding `width`
    references to the level below: tiny in the pickle, width**levels leaves when walked."""
    put = lambda i: P.LONG_BINPUT + struct.pack("<I", memo_start + i)  # noqa: E731
    get = lambda i: P.LONG_BINGET + struct.pack("<I", memo_start + i)  # noqa: E731
    out = _str("leaf") + put(0)
    for level in range(1, levels + 1):
        out += P.POP + P.MARK + get(level - 1) * width + (P.TUPLE if tuples else P.LIST)
        out += put(level)
    return out


def storage_pid(key: str, numel: int, storage: str = "FloatStorage") -> bytes:
    return (P.MARK + _str("storage") + _global("torch", storage) + _str(key) + _str("cpu")
            + _int(numel) + P.TUPLE + P.BINPERSID)


def tensor_pickle(name: str, pid: bytes, offset: bytes, size: bytes, stride: bytes) -> bytes:
    """{name: _rebuild_tensor_v2(pid, offset, size, stride, False, OrderedDict())}."""
    return (P.PROTO + b"\x02" + P.EMPTY_DICT + _str(name) + _global("torch._utils",
            "_rebuild_tensor_v2") + P.MARK + pid + offset + size + stride + P.NEWFALSE
            + _global("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.TUPLE
            + P.REDUCE + P.SETITEM + P.STOP)


def zip_records(path: Path, records: list[tuple[str, bytes | tuple]], prefix="archive") -> None:
    """A zip through zipfile; a record (name, ("zeros", n)) holds n deflated zero bytes, written
    in chunks (never held whole)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records:
            if isinstance(data, tuple):
                info = zipfile.ZipInfo(f"{prefix}/{name}")
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 20)
                    left = data[1]
                    while left > 0:
                        f.write(chunk[:min(left, len(chunk))])
                        left -= len(chunk)
            else:
                zf.writestr(f"{prefix}/{name}", data)


def set_declared_size(path: Path, member: str, size: int) -> None:
    """Patch the central directory: `member` declares `size` uncompressed bytes."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    at = raw.rindex(b"PK\x01\x02" + b"", 0, raw.rindex(name) + 1)
    while raw[at + 46:at + 46 + len(name)] != name:
        at = raw.rindex(b"PK\x01\x02", 0, at)
    raw[at + 24:at + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(raw))


def sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


# --- checkpoints ------------------------------------------------------------------------------
@case("pt: persistent id fans out 10^12 (12 levels x 10 shared refs)")
def _(d, scale):
    levels = 12 if scale == "bench" else 9
    pkl = (P.PROTO + b"\x02" + P.EMPTY_DICT + _str("x") + fanout(levels, 10) + P.BINPERSID
           + P.SETITEM + P.STOP)
    return adapter(d, pt=raw_pt(d, pkl))


@case("pt: dict key is a shared-tuple hash bomb")
def _(d, scale):
    pkl = (P.PROTO + b"\x02" + P.EMPTY_DICT + fanout(40, 2, tuples=True) + _int(1) + P.SETITEM
           + P.STOP)
    return adapter(d, pt=raw_pt(d, pkl))


@case("pt: tensor size is a fan-out structure")
def _(d, scale):
    pkl = tensor_pickle("x", storage_pid("0", 4), _int(0), fanout(12, 10),
                        P.MARK + _int(1) + P.TUPLE)
    return adapter(d, pt=raw_pt(d, pkl, [("data/0", bytes(16))]))


@case("pt: stride-0 view 16384x12288 over 512 floats")
def _(d, scale):
    pkl = tensor_pickle("x", storage_pid("0", 512), _int(0),
                        P.MARK + _int(16384) + _int(12288) + P.TUPLE,
                        P.MARK + _int(0) + _int(0) + P.TUPLE)
    return adapter(d, pt=raw_pt(d, pkl, [("data/0", bytes(2048))]))


@case("pt: view of 2^62 x 2^62 elements")
def _(d, scale):
    pkl = tensor_pickle("x", storage_pid("0", 4), _int(0),
                        P.MARK + P.LONG1 + b"\x08" + (1 << 62).to_bytes(8, "little")
                        + P.LONG1 + b"\x08" + (1 << 62).to_bytes(8, "little") + P.TUPLE,
                        P.MARK + _int(0) + _int(0) + P.TUPLE)
    return adapter(d, pt=raw_pt(d, pkl, [("data/0", bytes(16))]))


@case("pt: 40-dimensional view")
def _(d, scale):
    pkl = tensor_pickle("x", storage_pid("0", 4), _int(0), P.MARK + _int(1) * 40 + P.TUPLE,
                        P.MARK + _int(1) * 40 + P.TUPLE)
    return adapter(d, pt=raw_pt(d, pkl, [("data/0", bytes(16))]))


def _bomb(d: Path, scale: str, after_stop: bool) -> list[str]:
    n = (512 << 20) if scale == "bench" else (16 << 20)
    path = d / "bomb.pt"
    if after_stop:
        pkl = tensor_pickle("x", storage_pid("0", 4), _int(0), P.MARK + _int(4) + P.TUPLE,
                            P.MARK + _int(1) + P.TUPLE)
        with zipfile.ZipFile(path, "w") as zf:
            info = zipfile.ZipInfo("archive/data.pkl")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(pkl)
                chunk = bytes(1 << 20)
                for _ in range(n >> 20):
                    f.write(chunk)
            zf.writestr("archive/data/0", bytes(16))
    else:
        pkl = tensor_pickle("x", storage_pid("0", n // 4), _int(0),
                            P.MARK + _int(n // 4) + P.TUPLE, P.MARK + _int(1) + P.TUPLE)
        zip_records(path, [("data.pkl", pkl), ("data/0", ("zeros", n))])
    pt = path.read_bytes()
    path.unlink()
    return adapter(d, pt=pt)


@case("pt: zip bomb, a record of deflated zeros (512 MiB)")
def _(d, scale):
    return _bomb(d, scale, after_stop=False)


@case("pt: zip bomb after data.pkl's STOP (512 MiB)")
def _(d, scale):
    return _bomb(d, scale, after_stop=True)


@case("pt: central directory declares 4 GB for a 2 KB record")
def _(d, scale):
    numel = 0xFFFFFFF0 // 4
    pkl = tensor_pickle("x", storage_pid("0", numel), _int(0), P.MARK + _int(numel) + P.TUPLE,
                        P.MARK + _int(1) + P.TUPLE)
    path = d / "lie.pt"
    zip_records(path, [("data.pkl", pkl), ("data/0", bytes(2048))])
    set_declared_size(path, "archive/data/0", 0xFFFFFFF0)
    pt = path.read_bytes()
    path.unlink()
    return adapter(d, pt=pt)


@case("pt: a deflated record inflates past its declared size")
def _(d, scale):
    pkl = tensor_pickle("x", storage_pid("0", 4), _int(0), P.MARK + _int(4) + P.TUPLE,
                        P.MARK + _int(1) + P.TUPLE)
    path = d / "lie.pt"
    zip_records(path, [("data.pkl", pkl), ("data/0", ("zeros", 1 << 20))])
    set_declared_size(path, "archive/data/0", 16)
    pt = path.read_bytes()
    path.unlink()
    return adapter(d, pt=pt)


@case("pt: compression method bzip2")
def _(d, scale):
    path = d / "bz.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        pkl = tensor_pickle("x", storage_pid("0", 4), _int(0), P.MARK + _int(4) + P.TUPLE,
                            P.MARK + _int(1) + P.TUPLE)
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", bytes(16))
    pt = path.read_bytes()
    path.unlink()
    return adapter(d, pt=pt)


@case("pt: data.pkl of 6 MB")
def _(d, scale):
    pkl = P.PROTO + b"\x02" + _str("x" * (6 << 20)) + P.STOP
    return adapter(d, pt=raw_pt(d, pkl))


@case("pt: 300k opcodes")
def _(d, scale):
    pkl = P.PROTO + b"\x02" + P.EMPTY_DICT + (P.NONE + P.POP) * 150_000 + P.STOP
    return adapter(d, pt=raw_pt(d, pkl))


@case("pt: memo index 2^32-1")
def _(d, scale):
    pkl = P.PROTO + b"\x02" + P.EMPTY_DICT + P.LONG_BINPUT + b"\xff\xff\xff\xff" + P.STOP
    return adapter(d, pt=raw_pt(d, pkl))


@case("pt: 100k nested lists")
def _(d, scale):
    pkl = (P.PROTO + b"\x02" + P.EMPTY_DICT + _str("x") + P.EMPTY_LIST * 100_000
           + P.APPEND * 99_999 + P.SETITEM + P.STOP)
    return adapter(d, pt=raw_pt(d, pkl))


@case("pt: storage declares 10^30 elements")
def _(d, scale):
    numel = P.LONG1 + b"\x0d" + (10 ** 30).to_bytes(13, "little")
    pid = (P.MARK + _str("storage") + _global("torch", "FloatStorage") + _str("0") + _str("cpu")
           + numel + P.TUPLE + P.BINPERSID)
    pkl = tensor_pickle("x", pid, _int(0), P.MARK + _int(1) + P.TUPLE, P.MARK + _int(1) + P.TUPLE)
    return adapter(d, pt=raw_pt(d, pkl, [("data/0", bytes(16))]))


@case("pt: key of 3 MB")
def _(d, scale):
    pkl = tensor_pickle("k" * (3 << 20), storage_pid("0", 4), _int(0),
                        P.MARK + _int(4) + P.TUPLE, P.MARK + _int(1) + P.TUPLE)
    return adapter(d, pt=raw_pt(d, pkl, [("data/0", bytes(16))]))


@case("pt: os.system payload")
def _(d, scale):
    return adapter(d, pt=raw_pt(d, tf.call_payload("os", "system", "touch /tmp/pwned")))


@case("pt: builtins.eval payload (protocol 4)")
def _(d, scale):
    return adapter(d, pt=raw_pt(d, tf.call_payload("builtins", "eval", "1", protocol=4)))


@case("pt: int64 storage")
def _(d, scale):
    tensors = good_tensors()
    key = next(iter(tensors))
    tensors[key] = tensors[key].astype(np.int64)
    return adapter(d, tensors=tensors)


@case("pt: float64 adapter holding 1e300")
def _(d, scale):
    tensors = {k: np.full(v.shape, 1e300) for k, v in good_tensors().items()}
    return adapter(d, tensors=tensors)


@case("pt: NaN weight")
def _(d, scale):
    tensors = good_tensors()
    key = sorted(tensors)[3]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    return adapter(d, tensors=tensors)


@case("pt: a tensor missing")
def _(d, scale):
    tensors = good_tensors()
    del tensors[sorted(tensors)[0]]
    return adapter(d, tensors=tensors)


@case("pt: an unexpected tensor")
def _(d, scale):
    return adapter(d, tensors={**good_tensors(), "model.layers.0.self_attn.extra": np.zeros(2)})


@case("pt: a tensor of the wrong shape")
def _(d, scale):
    tensors = good_tensors()
    tensors[sorted(tensors)[0]] = np.zeros((3, 3), np.float32)
    return adapter(d, tensors=tensors)


@case("pt: legacy format")
def _(d, scale):
    return adapter(d, pt=tf.write_legacy_checkpoint(d / "legacy.pt").read_bytes())


@case("pt: empty file")
def _(d, scale):
    return adapter(d, pt=b"")


@case("pt: text file")
def _(d, scale):
    return adapter(d, pt=b"this is not a checkpoint\n")


@case("pt: truncated zip")
def _(d, scale):
    argv = adapter(d)
    pt = d / "adapter" / "delta_mem_adapter.pt"
    pt.write_bytes(pt.read_bytes()[:300])
    return argv


@case("pt: a FIFO")
def _(d, scale):
    argv = adapter(d, pt=b"x")
    pt = d / "adapter" / "delta_mem_adapter.pt"
    pt.unlink()
    os.mkfifo(pt)
    return argv


@case("pt: a symlink to /dev/zero")
def _(d, scale):
    argv = adapter(d, pt=b"x")
    pt = d / "adapter" / "delta_mem_adapter.pt"
    pt.unlink()
    pt.symlink_to("/dev/zero")
    return argv


@case("pt: a sparse file of 8 GiB")
def _(d, scale):
    argv = adapter(d, pt=b"x")
    sparse(d / "adapter" / "delta_mem_adapter.pt", 8 << 30, b"PK\x03\x04")
    return argv


@case("pt: a directory")
def _(d, scale):
    argv = adapter(d, pt=b"x")
    pt = d / "adapter" / "delta_mem_adapter.pt"
    pt.unlink()
    pt.mkdir()
    return argv


# --- δ-mem configs ---------------------------------------------------------------------------
CONFIG_VALUES = {
    "rank is a string": {"rank": "abc"}, "rank is '8'": {"rank": "8"}, "rank is 8.5": {"rank": 8.5},
    "rank is true": {"rank": True}, "rank is 0": {"rank": 0}, "rank is 10^40": {"rank": 10 ** 40},
    "num_state_heads is 'x'": {"num_state_heads": "x"},
    "target_layers holds 'a'": {"target_layers": ["a"]},
    "target_layers holds true": {"target_layers": [True]},
    "target_layers is null": {"target_layers": None},
    "target_layers out of range": {"target_layers": [0, 99]},
    "normalize_qk is 'false'": {"normalize_qk": "false"},
    "couple_lambda is 1": {"couple_lambda": 1},
    "delta_heads holds 1": {"delta_heads": [1]},
    "delta_heads names x": {"delta_heads": ["q", "x"]},
    "alpha is a string": {"alpha": "16"}, "alpha is NaN": {"alpha": float("nan")},
    "state_update_mode is a list": {"state_update_mode": ["standard"]},
    "an unknown field": {"colour": "blue"},
    "an archived option set": {"num_memory_partitions": 4},
    "an archived option nests": {"memory_reader_layers": [[[[[1]]]]] * 50},
}
for label, change in CONFIG_VALUES.items():
    case(f"config: {label}")(lambda d, scale, change=change: adapter(d, config=good_config(**change)))


@case("config: nested 100k deep")
def _(d, scale):
    return adapter(d, config='{"rank": ' + "[" * 100_000 + "]" * 100_000 + "}")


@case("config: not an object")
def _(d, scale):
    return adapter(d, config="[1, 2, 3]")


@case("config: not JSON")
def _(d, scale):
    return adapter(d, config="rank = 8\n")


@case("config: 2 MB of whitespace")
def _(d, scale):
    return adapter(d, config=json.dumps(good_config()) + " " * (2 << 20))


@case("config: a FIFO")
def _(d, scale):
    argv = adapter(d)
    path = d / "adapter" / "delta_mem_config.json"
    path.unlink()
    os.mkfifo(path)
    return argv


@case("config: a symlink to /dev/zero")
def _(d, scale):
    argv = adapter(d)
    path = d / "adapter" / "delta_mem_config.json"
    path.unlink()
    path.symlink_to("/dev/zero")
    return argv


@case("config: missing")
def _(d, scale):
    argv = adapter(d)
    (d / "adapter" / "delta_mem_config.json").unlink()
    return argv


# --- model cards ------------------------------------------------------------------------------
CARD_VALUES = {"an int": "3", "a mapping": "{a: 1}", "a nested list": "[[a, b]]", "true": "true",
               "an empty string": "''", "a list of ints": "[1, 2]"}
for label, value in CARD_VALUES.items():
    case(f"card: base_model is {label}")(
        lambda d, scale, value=value: adapter(d, card=f"---\nbase_model: {value}\n---\n# a\n"))


@case("card: YAML alias bomb")
def _(d, scale):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    return adapter(d, card="---\n" + "\n".join(lines) + "\nbase_model: *a11\n---\n")


@case("card: flow nested 100k deep")
def _(d, scale):
    return adapter(d, card="---\nbase_model: " + "[" * 100_000 + "]" * 100_000 + "\n---\n")


@case("card: flow nested 20k deep")
def _(d, scale):
    return adapter(d, card="---\nbase_model: " + "[" * 20_000 + "]" * 20_000 + "\n---\n")


@case("card: block nested 200 deep")
def _(d, scale):
    body = "".join(" " * i + "- \n" for i in range(0, 400, 2))
    return adapter(d, card="---\nbase_model:\n" + body + "---\n")


@case("card: not YAML")
def _(d, scale):
    return adapter(d, card="---\nbase_model: [unclosed\n---\n")


@case("card: names no base model")
def _(d, scale):
    return adapter(d, card="---\nlicense: mit\n---\n")


@case("card: 2 MB")
def _(d, scale):
    return adapter(d, card="---\nlicense: mit\n---\n" + "x" * (2 << 20))


@case("card: a symlink to /dev/zero")
def _(d, scale):
    argv = adapter(d, card="")
    (d / "adapter" / "README.md").symlink_to("/dev/zero")
    return argv


@case("card: a FIFO")
def _(d, scale):
    argv = adapter(d, card="")
    os.mkfifo(d / "adapter" / "README.md")
    return argv


@case("card: base model directory without config.json")
def _(d, scale):
    (d / "empty_base").mkdir(parents=True, exist_ok=True)
    return adapter(d, card=f"---\nbase_model: {json.dumps(str(d / 'empty_base'))}\n---\n")


@case("card: base model config.json nested 100k deep")
def _(d, scale):
    (d / "bad_base").mkdir(parents=True, exist_ok=True)
    (d / "bad_base" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return adapter(d, card=f"---\nbase_model: {json.dumps(str(d / 'bad_base'))}\n---\n")


@case("convert: output is an existing file")
def _(d, scale):
    argv = adapter(d)
    (d / "out").write_text("mine")
    return argv


@case("convert: adapter is a missing directory")
def _(d, scale):
    return ["--hf-repo", str(d / "nowhere"), "--mlx-path", str(d / "out")]


# --- memory files (dmem-chat --memory) -----------------------------------------------------------
def memory_argv(d: Path, path: Path) -> list[str]:
    return ["--model", str(d.parent / MODEL), "--memory", str(path)]


def memory_bytes(states=None, memory_json=None, **meta) -> bytes:
    """A memory file with a valid checksum whose content the caller may make hostile."""
    import safetensors.numpy

    from dmem_mlx.runtime.memory_file import FORMAT_NAME, _checksum

    states = states if states is not None else {
        f"layers.{i}": np.zeros((1, 8, 8), np.float32) for i in range(2)}
    if memory_json is None:
        memory_json = json.dumps({
            "version": 1, "fingerprint": {"delta_config": {"rank": 8, "num_state_heads": 1,
                                                           "layers": [0, 1]}},
            "created": None, "saved": None, "context_start": 0,
            "counts": {"tokens_written": 0, "turns": 0, "conversations": 1}, "transcript": []})
    metadata = {"format": FORMAT_NAME, "format_version": "1", "memory": memory_json,
                "checksum": _checksum(memory_json, states), **meta}
    return safetensors.numpy.save(states, metadata=metadata)


def _plain_safetensors() -> bytes:
    import safetensors.numpy

    return safetensors.numpy.save({"w": np.ones(3, np.float32)})


def memory_case(name: str, write: Callable[[Path, str], None]) -> None:
    def build(d, scale):
        path = d / "memory.safetensors"
        d.mkdir(parents=True, exist_ok=True)
        write(path, scale)
        return memory_argv(d, path)
    case(f"memory: {name}", "chat")(build)


memory_case("a FIFO", lambda p, s: os.mkfifo(p))
memory_case("a symlink to /dev/zero", lambda p, s: p.symlink_to("/dev/zero"))
memory_case("a symlink loop", lambda p, s: (p.symlink_to(p.with_name("loop")),
                                             p.with_name("loop").symlink_to(p)))
memory_case("a sparse file declaring a 1 GiB header",
            lambda p, s: sparse(p, (1 << 30) + 16, (1 << 30).to_bytes(8, "little") + b"{"))
memory_case("a sparse 90 MB file declaring an 80 MB header",
            lambda p, s: sparse(p, 90_000_000, (80_000_000).to_bytes(8, "little") + b"{"))
memory_case("header nested 100k deep", lambda p, s: p.write_bytes(
    (200_008).to_bytes(8, "little") + b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}   "))
memory_case("metadata JSON nested 100k deep", lambda p, s: p.write_bytes(
    memory_bytes(memory_json="[" * 100_000 + "]" * 100_000)))
memory_case("metadata JSON of 1.5M tiny lists", lambda p, s: p.write_bytes(
    memory_bytes(memory_json="[" + ",".join(["[]"] * 1_500_000) + "]")))
memory_case("a state of 3e38", lambda p, s: p.write_bytes(memory_bytes(states={
    f"layers.{i}": np.full((1, 8, 8), 3e38, np.float32) for i in range(2)})))
memory_case("a NaN state", lambda p, s: p.write_bytes(memory_bytes(states={
    f"layers.{i}": np.full((1, 8, 8), np.nan, np.float32) for i in range(2)})))
memory_case("a float16 state", lambda p, s: p.write_bytes(memory_bytes(states={
    f"layers.{i}": np.zeros((1, 8, 8), np.float16) for i in range(2)})))
memory_case("a future format version", lambda p, s: p.write_bytes(
    memory_bytes(format_version="99")))
memory_case("a checksum mismatch", lambda p, s: p.write_bytes(memory_bytes(checksum="0" * 64)))
memory_case("empty", lambda p, s: p.write_bytes(b""))
memory_case("random bytes", lambda p, s: p.write_bytes(np.random.default_rng(0).bytes(4096)))
memory_case("a plain safetensors file", lambda p, s: p.write_bytes(_plain_safetensors()))
memory_case("trailing bytes", lambda p, s: p.write_bytes(memory_bytes() + bytes(8)))
memory_case("truncated", lambda p, s: p.write_bytes(memory_bytes()[:-5]))
memory_case("a directory", lambda p, s: p.mkdir())
memory_case("read-only (0444)", lambda p, s: (p.write_bytes(memory_bytes()), p.chmod(0o444)))
memory_case("a state of the wrong shape", lambda p, s: p.write_bytes(memory_bytes(states={
    f"layers.{i}": np.zeros((1, 4, 4), np.float32) for i in range(2)})))


# --- converted models (python -m dmem_mlx.generate) -------------------------------------------
def model_case(name: str, damage: Callable[[Path], None]) -> None:
    def build(d, scale):
        import shutil

        model = d / "model"
        shutil.copytree(d.parent / MODEL, model)
        damage(model)
        return ["--model", str(model), "-p", "hi", "-m", "1"]
    case(f"model: {name}", "generate")(build)


model_case("no adapter", lambda m: (m / "delta_mem.safetensors").unlink())
model_case("adapter weights not safetensors",
           lambda m: (m / "delta_mem.safetensors").write_bytes(b"garbage" * 10))
model_case("adapter config rank 'x'", lambda m: (m / "delta_mem_config.json").write_text(
    json.dumps({"rank": "x"})))
model_case("no config.json", lambda m: (m / "config.json").unlink())
model_case("unknown architecture", lambda m: (m / "config.json").write_text(json.dumps(
    {**json.loads((m / "config.json").read_text()), "model_type": "no-such-arch"})))
model_case("adapter weights with NaN", lambda m: __import__("mlx.core").core.save_safetensors(
    str(m / "delta_mem.safetensors"),
    {k: __import__("mlx.core").core.full(v.shape, float("nan"))
     for k, v in __import__("mlx.core").core.load(str(m / "delta_mem.safetensors")).items()}))


def serve_case(name: str, damage: Callable[[Path], None], memories: bool = False) -> None:
    def build(d, scale):
        import shutil

        model = d / "model"
        shutil.copytree(d.parent / MODEL, model)
        damage(model)
        argv = ["--model", str(model), "--log-level", "ERROR", "--port", "0"]
        if memories:
            (d / "memories").write_text("a file, not a directory")
            argv += ["--memories", str(d / "memories")]
        return argv
    case(f"serve: {name}", "serve")(build)


serve_case("no adapter", lambda m: (m / "delta_mem.safetensors").unlink())
serve_case("adapter weights with NaN", lambda m: __import__("mlx.core").core.save_safetensors(
    str(m / "delta_mem.safetensors"),
    {k: __import__("mlx.core").core.full(v.shape, float("nan"))
     for k, v in __import__("mlx.core").core.load(str(m / "delta_mem.safetensors")).items()}))
serve_case("unknown architecture", lambda m: (m / "config.json").write_text(json.dumps(
    {**json.loads((m / "config.json").read_text()), "model_type": "no-such-arch"})))
serve_case("--memories is a file", lambda m: None, memories=True)


# --- running -----------------------------------------------------------------------------------
def snapshot(d: Path) -> dict[str, str]:
    """Every input under `d` (names, kinds, sizes, hashes of regular files up to 64 MB)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 64 << 20 \
                else str(st.st_size)
            out[str(p)] = f"{st.st_mode:o}:{digest}"
        elif p.is_dir():
            out[str(p)] = "dir"
        else:
            out[str(p)] = "special"
    return out


def cli_main(cli: str) -> Callable[[list[str]], int]:
    import dmem_mlx.blas

    dmem_mlx.blas.reexec_with_openblas = lambda *a, **k: None  # keep this process
    if cli == "convert":
        from convert.__main__ import main
    elif cli == "generate":
        from dmem_mlx.generate import main
    elif cli == "serve":
        import uvicorn

        from dmem_mlx.server.cli import main

        def never_serve(*a, **k):  # a model that loads would start serving: fail instead
            raise SystemExit(99)
        uvicorn.run = never_serve
    else:
        import app.app
        import app.main
        from app.main import main

        app.main.not_a_terminal = lambda: None  # as if in a terminal: the memory is what is tested

        def never_run(self, *a, **k):  # a memory that opens would start the app: fail instead
            raise SystemExit(99)
        app.app.DmemChatApp.run = never_run
    return main


def run_case(name: str, argv: list[str]) -> tuple[int, str, float]:
    """Run the case's CLI in this process → (exit code, stderr, seconds)."""
    main = cli_main(CASES[name].cli)
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is what the corpus hunts
            import traceback

            traceback.print_exc(file=err)
            code = -1
    return code, err.getvalue(), time.perf_counter() - start


def refused_cleanly(code: int, stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return (code == 1 and len(lines) == 1 and "error:" in lines[0]
            and "Traceback" not in stderr)


def build_case(name: str, root: Path, scale: str = "test") -> tuple[Path, list[str]]:
    d = root / f"case-{list(CASES).index(name):03d}"
    d.mkdir(parents=True, exist_ok=True)
    return d, CASES[name].build(d, scale)


def warm_up() -> None:
    """Import what the CLIs import lazily (mlx, mlx-lm, transformers, huggingface_hub), so a
    case's time is the refusal's, not Python's first import of them."""
    import huggingface_hub.repocard  # noqa: F401
    import mlx_lm.models.qwen3  # noqa: F401
    import mlx_lm.utils  # noqa: F401
    import transformers  # noqa: F401

    import convert.convert  # noqa: F401
    import dmem_mlx.runtime.memory_file  # noqa: F401
    import dmem_mlx.utils  # noqa: F401
    for cli in ("convert", "chat", "generate", "serve"):
        cli_main(cli)


if __name__ == "__main__":  # a benchmark child: run one prepared case, print its result
    name, argv = sys.argv[1], json.loads(sys.argv[2])
    warm_up()
    code, stderr, seconds = run_case(name, argv)
    sys.__stdout__.write(json.dumps({"code": code, "stderr": stderr, "seconds": seconds}) + "\n")
