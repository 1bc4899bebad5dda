"""The memory file: one assistant memory on disk, safe against crashes, corruption and sharing.

Format: a single safetensors file. Tensors `layers.{i}` hold the δ state of each layer, [H, r, r]
float32. The safetensors metadata holds `format` ("dmem-mlx.memory"), `format_version`, `memory`
(JSON: fingerprint of the model, transcript, counts, timestamps) and `checksum` (sha256 of the
JSON and of every tensor's name, shape and bytes), so any damaged byte is detected.
Version 2 adds the undo history (the state before each of the last UNDO_DEPTH turns: tensors
`undo.{k}.layers.{i}` and an entry per step in the JSON) and the past conversations of this
memory (their transcripts, bounded by PAST_CONVERSATIONS and PAST_CHARS); version 1 files
(neither) are read as they are and written as version 2 at the next save.

The safetensors library writes the file and reads its tensors (it checks dtypes, shapes and
offsets); the metadata is read from the same header by a bounded JSON parse (the library's bytes
API does not return it). Only regular files are read (a FIFO or a device is refused from its
`fstat`), files and headers are capped in size (the header at safetensors' own 100 MB), and a
δ state beyond ±MAX_STATE_MAGNITUDE is refused on open and on save alike.

Saving writes a temporary file in the same directory, fsyncs it, keeps the previous version as
`<file>.bak` (a hard link, or a copy where links are not supported), renames the new file over
the old one and fsyncs the directory: whenever the process dies, the file is the old version or
the new one. Loading checks everything before anything is used; a bad file is refused with one
line and never modified. A lock (an OS lock on `<file>.lock`, released if the process dies) keeps
a second process from opening the same memory for writing. The empty lock file stays next to a
memory this process wrote (as SQLite's `-shm` files do; its existence means nothing, the OS lock
does); one created for a memory that was refused, or left without being written, is removed. A symlinked memory is written
through the link (its target is the memory); a file without write permission is refused for
writing. Temporary files of killed saves, snapshots and exports are removed by the next writer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from ..errors import (MemoryFileError, MemoryLockedError, MemoryNotWritableError, MemorySaveError,
                      one_line)
from ..files import read_regular
from .memory_header import MAX_FILE, prefix_problem

FORMAT_NAME = "dmem-mlx.memory"
FORMAT_VERSION = 2
UNDO_DEPTH = 8  # turns that /undo can take back (a few KB of δ state each)
PAST_CONVERSATIONS = 50  # past conversations kept for the history view, newest last
PAST_CHARS = 1_000_000  # and at most this many characters of their transcripts
SUFFIX = ".safetensors"
MAX_JSON_ITEMS = 1_000_000  # JSON values in the memory metadata (each costs ~100 bytes parsed)
MAX_STATE_MAGNITUDE = 1e12  # far beyond any state a model writes; 3e38 would overflow next turn
ROLES = ("system", "user", "assistant", "tool")
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}")
PathLike = Union[str, Path]
_LOCKED_HERE: set[str] = set()  # lock files this process holds (to word a refusal rightly)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class UndoStep:
    """The memory as it was before a turn, enough to take the turn back: states (layer index →
    δ state [H, r, r] float32), transcript length, context start and counts, and the user's
    message of the turn (what a retry sends again)."""

    states: dict[int, np.ndarray]
    messages: int
    context_start: int
    tokens_written: int
    turns: int
    user_text: str


@dataclass
class PastConversation:
    """An earlier conversation of this memory (read-only: its turns live on in δ)."""

    transcript: list[dict[str, str]]
    started: Optional[str] = None
    ended: Optional[str] = None


def bound_past(past: list[PastConversation]) -> list[PastConversation]:
    """The newest PAST_CONVERSATIONS conversations, within PAST_CHARS characters in all."""
    kept, chars = [], 0
    for conversation in reversed(past[-PAST_CONVERSATIONS:]):
        chars += sum(len(m["content"]) for m in conversation.transcript)
        if chars > PAST_CHARS and kept:
            break
        kept.append(conversation)
    return kept[::-1]


@dataclass
class MemoryData:
    """Everything a memory file holds.

    states: layer index → δ state [H, r, r] float32. transcript: the current conversation
    ({"role", "content"} dicts); context_start: index of its first message still in the KV
    context (earlier turns live only in δ). Counts cover everything written since the last reset.
    """

    states: dict[int, np.ndarray]
    fingerprint: dict[str, Any]
    transcript: list[dict[str, str]] = field(default_factory=list)
    context_start: int = 0
    tokens_written: int = 0
    turns: int = 0
    conversations: int = 1
    created: str = field(default_factory=_now)
    saved: Optional[str] = None
    undo: list[UndoStep] = field(default_factory=list)
    past: list[PastConversation] = field(default_factory=list)
    started: Optional[str] = None  # when the current conversation started


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------
def fingerprint_mismatch(stored: dict, expected: dict) -> Optional[str]:
    """Why a memory with fingerprint `stored` does not belong to the model `expected`, or None.

    The adapter weights hash, the δ config and the backbone shape must match; the base model
    name is compared when both sides know it.
    """
    for key, label in (("adapter_sha256", "adapter weights"), ("delta_config", "δ config"),
                       ("backbone", "backbone")):
        if key in expected and stored.get(key) != expected[key]:
            return (f"it belongs to another model ({label} differ: memory has "
                    f"{_short(stored.get(key))}, model has {_short(expected[key])})")
    a, b = stored.get("base_model"), expected.get("base_model")
    if a and b and a != b:
        return f"it belongs to base model {a}, not {b}"
    return None


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:16] + "…" if isinstance(value, str) and len(text) > 16 else text[:80]


# ---------------------------------------------------------------------------------------------
# Encoding and validation
# ---------------------------------------------------------------------------------------------
def _checksum(memory_json: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(memory_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name}:{list(t.shape)}:".encode())
        h.update(np.ascontiguousarray(t, dtype="<f4").tobytes())
    return h.hexdigest()


def encode(data: MemoryData) -> bytes:
    """The bytes of a memory file (refuses a state that would not load: NaN, Inf or beyond
    ±MAX_STATE_MAGNITUDE)."""
    tensors = {f"layers.{i}": np.ascontiguousarray(s, dtype=np.float32)
               for i, s in sorted(data.states.items())}
    undo = data.undo[-UNDO_DEPTH:]
    for k, step in enumerate(undo):
        tensors.update({f"undo.{k}.layers.{i}": np.ascontiguousarray(s, dtype=np.float32)
                        for i, s in sorted(step.states.items())})
    for name, t in tensors.items():
        if (why := _bad_values(t)) is not None:
            raise MemoryFileError(f"the δ state of {name} {why}: not saved")
    memory = {
        "version": FORMAT_VERSION, "fingerprint": data.fingerprint, "created": data.created,
        "saved": data.saved, "context_start": data.context_start,
        "counts": {"tokens_written": data.tokens_written, "turns": data.turns,
                   "conversations": data.conversations},
        "transcript": _messages(data.transcript),
        "started": data.started,
        "undo": [{"messages": u.messages, "context_start": u.context_start,
                  "tokens_written": u.tokens_written, "turns": u.turns, "user": u.user_text}
                 for u in undo],
        "past": [{"started": p.started, "ended": p.ended, "transcript": _messages(p.transcript)}
                 for p in bound_past(data.past)],
    }
    memory_json = json.dumps(memory, ensure_ascii=False, separators=(",", ":"))
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "memory": memory_json, "checksum": _checksum(memory_json, tensors)}
    return safetensors.numpy.save(tensors, metadata=metadata)


def _bad_values(t: np.ndarray) -> Optional[str]:
    if not np.isfinite(t).all():
        return "holds NaN/Inf"
    if t.size and float(np.abs(t).max()) > MAX_STATE_MAGNITUDE:
        return f"holds values beyond ±{MAX_STATE_MAGNITUDE:.0e}"
    return None


def _json(text: bytes | str, fail, what: str) -> Any:
    """json.loads, any failure (bad text, nesting too deep) as one `fail` line."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise fail(f"corrupt: {what} is not valid JSON") from None
    except RecursionError:
        raise fail(f"corrupt: {what} nests too deeply") from None


def _messages(transcript: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in transcript]


def decode(raw: bytes, where: str = "memory file",
           expected: Optional[dict] = None) -> MemoryData:
    """Parse and validate the bytes of a memory file; MemoryFileError (one line) if anything is off."""

    def fail(reason: str) -> MemoryFileError:
        return MemoryFileError(f"{where}: {reason}".replace("\n", " "))

    if problem := prefix_problem(raw[:9], len(raw)):
        raise fail(problem)
    n = int.from_bytes(raw[:8], "little")
    tensors = _tensors(raw, fail)  # the library checks the header's structure first
    try:
        header = _json(str(memoryview(raw)[8:8 + n], "utf-8"), fail, "the safetensors header")
    except UnicodeDecodeError:
        raise fail("corrupt: the safetensors header is not UTF-8") from None
    if not isinstance(header, dict):
        raise fail("corrupt: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        ours = [m for m in [meta, *header.values()] if isinstance(m, dict)
                and ({"memory", "checksum"} <= set(m) or m.get("format") == FORMAT_NAME)]
        if ours:  # a memory file whose header was damaged
            raise fail("corrupt: the safetensors header is damaged")
        raise fail("not a dmem-mlx memory file (a safetensors file without memory metadata)")
    try:
        version = int(meta.get("format_version"))
    except (TypeError, ValueError):
        raise fail("corrupt: bad format_version") from None
    if version > FORMAT_VERSION:
        raise fail(f"written by a newer dmem-mlx (memory format {version}; this version reads "
                   f"up to {FORMAT_VERSION}): upgrade dmem-mlx to open it")
    if version < 1:
        raise fail(f"corrupt: bad format_version {version}")
    if bad := [name for name, t in tensors.items() if t.dtype != np.float32]:
        raise fail(f"tensor {bad[0][:60]!r} has dtype {tensors[bad[0]].dtype}, expected F32")
    memory_json, checksum = meta.get("memory"), meta.get("checksum")
    if not isinstance(memory_json, str) or not isinstance(checksum, str):
        raise fail("corrupt: memory metadata or checksum missing")
    if _checksum(memory_json, tensors) != checksum:
        raise fail("corrupt: checksum mismatch (the file was damaged)")
    if sum(memory_json.count(c) for c in "[{,:") > MAX_JSON_ITEMS:
        raise fail("corrupt: the memory metadata holds too many items")
    memory = _json(memory_json, fail, "the memory metadata")
    data = _memory_data(memory, tensors, fail)
    if expected is not None and (why := fingerprint_mismatch(data.fingerprint, expected)):
        raise fail(f"refused: {why}")
    return data


def _tensors(raw: bytes, fail) -> dict[str, np.ndarray]:
    """The tensors, read by the safetensors library: it checks the header's structure (a
    typed parse, so a hostile header costs nothing), dtypes, shapes, offsets and sizes."""
    try:
        tensors = safetensors.numpy.load(raw)
    except (SafetensorError, ValueError, TypeError) as exc:
        words = one_line(exc, 120)
        kind = "corrupt or truncated" if "incomplete" in words.lower() else "corrupt"
        raise fail(f"{kind}: not a valid safetensors file ({words})") from None
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def _memory_data(memory: Any, tensors: dict[str, np.ndarray], fail) -> MemoryData:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise fail(f"invalid memory metadata: {what}")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    need(isinstance(memory, dict), "not a JSON object")
    need(count(memory.get("version")) and memory["version"] >= 1, "bad version")
    fp = memory.get("fingerprint")
    need(isinstance(fp, dict), "fingerprint missing")
    delta = fp.get("delta_config")
    need(isinstance(delta, dict), "fingerprint has no delta_config")
    layers, rank, heads = delta.get("layers"), delta.get("rank"), delta.get("num_state_heads")
    need(isinstance(layers, list) and all(count(i) for i in layers) and count(rank) and rank > 0
         and count(heads) and heads > 0, "delta_config needs layers, rank, num_state_heads")
    counts = memory.get("counts")
    need(isinstance(counts, dict) and all(count(counts.get(k)) for k in
                                          ("tokens_written", "turns", "conversations")),
         "counts must be non-negative integers")
    def messages(value: Any) -> list:
        need(isinstance(value, list), "transcript must be a list")
        for m in value:
            need(isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES
                 and isinstance(m["content"], str), "transcript entries must be {role, content}")
        return list(value)

    transcript = messages(memory.get("transcript"))
    start = memory.get("context_start")
    need(count(start) and start <= len(transcript), "bad context_start")
    undo, past = memory.get("undo", []), memory.get("past", [])  # both absent in version 1
    need(isinstance(undo, list) and len(undo) <= UNDO_DEPTH, "bad undo history")
    for u in undo:
        need(isinstance(u, dict) and all(count(u.get(k)) for k in
                                         ("messages", "context_start", "tokens_written", "turns"))
             and u["context_start"] <= u["messages"] <= len(transcript)
             and isinstance(u.get("user"), str), "bad undo step")
    need(isinstance(past, list), "past conversations must be a list")
    for p in past:
        need(isinstance(p, dict) and all(p.get(k) is None or isinstance(p[k], str)
                                         for k in ("started", "ended")), "bad past conversation")
        messages(p.get("transcript"))
    for key in ("created", "saved", "started"):
        value = memory.get(key)
        need(value is None or isinstance(value, str), f"{key} must be a timestamp")
        if isinstance(value, str):
            try:
                datetime.fromisoformat(value)
            except ValueError:
                need(False, f"{key} is not an ISO timestamp")
    want = {f"{prefix}layers.{i}" for i in layers
            for prefix in ["", *(f"undo.{k}." for k in range(len(undo)))]}
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise fail(f"tensors do not match the model's layers (missing {missing[:3]}, "
                   f"unexpected {extra[:3]})")
    def states(prefix: str) -> dict[int, np.ndarray]:
        out = {}
        for i in layers:
            t = tensors[f"{prefix}layers.{i}"]
            if t.shape != (heads, rank, rank):
                raise fail(f"{prefix}layers.{i} has shape {list(t.shape)}, expected "
                           f"{[heads, rank, rank]}")
            if (why := _bad_values(t)) is not None:
                raise fail(f"{prefix}layers.{i} {why}")
            out[i] = t
        return out

    return MemoryData(
        states=states(""), fingerprint=fp, transcript=transcript, context_start=start,
        tokens_written=counts["tokens_written"], turns=counts["turns"],
        conversations=counts["conversations"], created=memory.get("created") or _now(),
        saved=memory.get("saved"), started=memory.get("started"),
        undo=[UndoStep(states(f"undo.{k}."), u["messages"], u["context_start"],
                       u["tokens_written"], u["turns"], u["user"]) for k, u in enumerate(undo)],
        past=[PastConversation(list(p["transcript"]), p.get("started"), p.get("ended"))
              for p in past])


def read_memory(path: PathLike, expected: Optional[dict] = None) -> MemoryData:
    """Read and validate a memory file (e.g. an export) without locking it."""
    path = Path(path)
    return decode(read_regular(path, MemoryFileError, MAX_FILE, "memory file"), str(path),
                  expected)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: PathLike, payload: bytes, backup: bool = False) -> None:
    """Replace `path` with `payload` so that it is always either the old or the new content.

    backup: keep the replaced version as `<path>.bak`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(path.parent, f".{glob.escape(path.name)}.*-*-*", dead_only=True)
    tmp, bak_tmp = _temp_name(path), _temp_name(path, "bak")
    try:
        _write_synced(tmp, payload)
        if backup and path.is_file():
            try:
                os.link(path, bak_tmp)
            except OSError:  # no hard links here: copy
                _write_synced(bak_tmp, path.read_bytes())
            os.replace(bak_tmp, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        bak_tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# The open memory
# ---------------------------------------------------------------------------------------------
def _snapshot_dir(path: Path) -> Path:
    stem = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    return path.with_name(stem + ".snapshots")


def _through_links(path: Path) -> Path:
    """A symlinked memory is its target: saves go through the link instead of replacing it."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError):
        raise MemoryFileError(f"{path}: a symlink loop, not a memory file") from None


def _check_kind(path: Path, writing: bool) -> None:
    """Refuse, without reading or locking, what cannot be a memory file: a directory, a FIFO,
    a device (and, for writing, a file without write permission)."""
    problem = _kind_problem(path, writing)
    if problem is None:
        return
    error, reason = problem
    if error is MemoryNotWritableError:
        raise MemoryNotWritableError(path, reason)
    raise MemoryFileError(f"{path}: {reason}")


def _kind_problem(path: Path, writing: bool) -> Optional[tuple[type, str]]:
    """What `_check_kind` refuses: (error class, reason without the path), or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None  # a new memory
    except OSError as exc:
        return MemoryFileError, f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(info.st_mode):
        return MemoryFileError, "is a directory, not a memory file"
    if not stat.S_ISREG(info.st_mode):
        return MemoryFileError, ("is not a regular file (a FIFO, socket or device), not a memory "
                                 "file")
    if writing and not info.st_mode & 0o222:
        return MemoryNotWritableError, f"the file is read-only (mode {info.st_mode & 0o777:o})"
    return None


def check_writable(path: PathLike) -> None:
    """Refuse (MemoryNotWritableError), creating nothing, a memory at `path` that could be read
    but never saved: a read-only file, or a directory that cannot be written or created (a
    read-only file system, no permission) — a save writes a new file beside it, then renames.
    Also refuses what cannot be a memory file at all (MemoryFileError)."""
    path = Path(path).expanduser()
    _check_kind(path, writing=True)
    path = _through_links(path)
    directory = path.parent
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    if not os.access(directory, os.W_OK):
        what = "is not writable" if directory == path.parent else "cannot be created"
        raise MemoryNotWritableError(path, f"its directory {what} (a read-only file system, or "
                                           "no permission)")


def _remove_temporaries(directory: Path, pattern: str, dead_only: bool = False) -> None:
    """Remove temporary files `pattern` in `directory` (left by killed writes); dead_only:
    only those whose writer process is gone (their name holds its pid)."""
    try:
        found = list(directory.glob(pattern)) if directory.is_dir() else []
    except OSError:
        return
    for leftover in found:
        pid = re.search(r"\.(?:tmp|bak)-(\d+)-[0-9a-f]+$", leftover.name)
        if pid is None or (dead_only and _running(int(pid.group(1)))):
            continue
        try:
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
        except OSError:
            pass


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def _release(lock: Any, remove: bool = False) -> None:
    """Release `lock`; remove: delete its file first (while still holding it), for a lock file
    this process created next to a memory it never wrote."""
    if lock is None:
        return
    if remove:
        try:
            os.unlink(lock.lock_file)
        except OSError:
            pass
    lock.release()
    _LOCKED_HERE.discard(lock.lock_file)


def _acquire(path: Path) -> tuple[Any, bool]:
    """Take the writer's lock of the memory at `path`: (the lock, whether its file was created
    here). A lock file removed by its holder while we opened it is taken again, afresh."""
    from filelock import FileLock, Timeout

    lock_path = str(path) + ".lock"
    for _ in range(3):
        created = not os.path.exists(lock_path)
        lock = FileLock(lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            where = "already open in this process" if lock_path in _LOCKED_HERE else \
                "open in another process"
            raise MemoryLockedError(path, f"this memory is {where}") from None
        except OSError as exc:
            raise MemoryFileError(f"{path}: cannot lock ({exc.strerror or exc})") from None
        if os.path.exists(lock_path):
            _LOCKED_HERE.add(lock_path)
            return lock, created
        lock.release()  # its holder removed the file as we took it: take the new one
    raise MemoryLockedError(path, "this memory is being opened and closed by another process "
                                  "(try again)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def default_memory_path(model_id: PathLike) -> Path:
    """Where the memory of a model lives by default: one file per model in the user data dir.

    model_id: a hub repo id ("org/name") or a model directory (a hub cache snapshot maps back
    to its repo id).
    """
    from platformdirs import user_data_dir

    text = str(model_id)
    path = Path(text).expanduser()
    parts = path.parts
    if "snapshots" in parts and (i := parts.index("snapshots")) > 0 and \
            parts[i - 1].startswith("models--"):
        name = parts[i - 1][len("models--"):]
    elif path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        name = path.resolve().name if path.exists() else path.name
    else:
        name = text.replace("/", "--")
    return Path(user_data_dir("dmem-mlx", appauthor=False)) / "memories" / (_slug(name) + SUFFIX)


class MemoryFile:
    """An open memory file. `MemoryFile.open(path)`; `.data` is its validated content (None for a
    new file); `.save(data)` after every turn; `.close()` releases the lock."""

    def __init__(self, path: Path, read_only: bool, lock: Any, data: Optional[MemoryData],
                 fingerprint: Optional[dict], lock_created: bool = False):
        self.path = path
        self.read_only = read_only
        self._lock = lock
        self._lock_created = lock_created  # our lock file: removed on close if nothing was saved
        self._saved = False
        self.data = data
        self.fingerprint = fingerprint if fingerprint is not None else (
            data.fingerprint if data is not None else None)
        self.last_saved: Optional[datetime] = None
        if data is not None and data.saved:
            self.last_saved = datetime.fromisoformat(data.saved)

    @classmethod
    def open(cls, path: PathLike, fingerprint: Optional[dict] = None,
             read_only: bool = False) -> "MemoryFile":
        """Open (creating on first save) the memory at `path`.

        fingerprint: the model's (see `model_fingerprint`); a file of another model is refused.
        None defers the check to `ChatSession`. read_only: take no lock and never write.
        Raises MemoryNotWritableError (MemoryLockedError: another process holds it) if it can
        only be opened read-only, MemoryFileError if it is unusable.
        """
        path = Path(path).expanduser()
        if read_only:
            _check_kind(path, writing=False)
        else:
            check_writable(path)
        path = _through_links(path)
        lock, created = None, False
        if not read_only:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MemoryFileError(f"{path}: cannot create its directory "
                                      f"({exc.strerror or exc})") from None
            lock, created = _acquire(path)
        try:
            data = read_memory(path, fingerprint) if path.exists() else None
            if lock is not None:  # we are the only writer: temporary files left by a crash go
                _remove_temporaries(path.parent, f".{glob.escape(path.name)}.*-*-*")
                _remove_temporaries(_snapshot_dir(path), ".*.*-*-*")
        except MemoryFileError as exc:
            _release(lock, remove=created)
            bak = path.with_name(path.name + ".bak")
            if bak.is_file() and path.exists():
                try:
                    read_memory(bak, fingerprint)
                    exc.args = (f"{exc.args[0]} (the previous version is intact in {bak})",)
                except MemoryFileError:
                    pass
            raise exc from None
        except BaseException:
            _release(lock, remove=created)
            raise
        return cls(path, read_only, lock, data, fingerprint, created)

    # -- the memory ------------------------------------------------------------------------
    def check_fingerprint(self, fingerprint: dict) -> None:
        """Refuse (MemoryFileError) if the loaded memory belongs to another model; then adopt it."""
        if self.data is not None and (why := fingerprint_mismatch(self.data.fingerprint,
                                                                  fingerprint)):
            raise MemoryFileError(f"{self.path}: refused: {why}")
        self.fingerprint = fingerprint

    def save(self, data: MemoryData, backup: bool = True) -> datetime:
        """Write `data` atomically, the previous version kept as `.bak` (backup=False: no
        previous version is left anywhere, e.g. after the memory was erased); returns the save
        time. Raises MemorySaveError (the file keeps its previous version) if it cannot be
        written: disk full, a read-only file system or file."""
        self._writable()
        problem = _kind_problem(self.path, writing=True)  # e.g. made read-only since it was opened
        if problem is not None:
            raise MemorySaveError(f"{self.path}: {problem[1]}", reason=problem[1])
        saved = datetime.now(timezone.utc)
        data.saved = saved.isoformat(timespec="milliseconds")
        try:
            atomic_write(self.path, encode(data), backup=backup)
            if not backup:
                self.path.with_name(self.path.name + ".bak").unlink(missing_ok=True)
                _fsync_dir(self.path.parent)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MemorySaveError(f"{self.path}: cannot save ({reason}); the previous version "
                                  "is untouched", reason=reason) from None
        self.data, self.last_saved, self._saved = data, saved, True
        return saved

    def _writable(self) -> None:
        if self.read_only:
            raise MemoryFileError(f"{self.path}: opened read-only")
        if self._lock is None:
            raise MemoryFileError(f"{self.path}: closed")

    # -- named snapshots -------------------------------------------------------------------
    @property
    def snapshot_dir(self) -> Path:
        return _snapshot_dir(self.path)

    def snapshot_path(self, name: str) -> Path:
        name = name.strip()
        if not SNAPSHOT_NAME.fullmatch(name):
            raise MemoryFileError(f"bad snapshot name {name!r}: use up to 64 letters, digits, "
                                  "spaces, '.', '_' or '-', starting with a letter or digit")
        return self.snapshot_dir / (name + SUFFIX)

    def snapshots(self) -> list[str]:
        if not self.snapshot_dir.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.snapshot_dir.glob("*" + SUFFIX)
                      if not p.name.startswith("."))

    def save_snapshot(self, name: str, data: MemoryData) -> Path:
        self._writable()
        path = self.snapshot_path(name)
        data.saved = _now()
        payload = encode(data)
        created = not path.parent.exists()
        try:
            atomic_write(path, payload)
        except OSError as exc:
            if created:  # leave no empty snapshot directory behind
                try:
                    path.parent.rmdir()
                except OSError:
                    pass
            raise MemoryFileError(f"{path}: cannot save the snapshot ({exc.strerror or exc}); "
                                  "the memory itself is untouched") from None
        return path

    def load_snapshot(self, name: str) -> MemoryData:
        path = self.snapshot_path(name)
        if not path.is_file():
            raise MemoryFileError(f"no snapshot named {name.strip()!r}")
        return read_memory(path, self.fingerprint)

    def delete_snapshot(self, name: str) -> None:
        self._writable()
        path = self.snapshot_path(name)
        if not path.is_file():
            raise MemoryFileError(f"no snapshot named {name.strip()!r}")
        try:
            path.unlink()
        except OSError as exc:
            raise MemoryFileError(f"{path}: cannot delete ({exc.strerror or exc})") from None

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock (idempotent). A lock file this process created is removed too if
        it saved nothing (a memory tried and left, or refused by the session)."""
        if self._lock is not None:
            _release(self._lock, remove=self._lock_created and not self._saved)
            self._lock = None

    @property
    def closed(self) -> bool:
        return self._lock is None and not self.read_only

    def __enter__(self) -> "MemoryFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else ("closed" if self.closed else "locked")
        return f"MemoryFile({str(self.path)!r}, {mode})"
