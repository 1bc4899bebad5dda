"""Memory ids → memory files in one directory, opened as chat sessions (same format and locks as
dmem-chat: a memory the server has open is refused to a second process, and the other way round).

`<directory>/<id>.safetensors` holds the memory of user `id` (its `.bak`, `.lock` and
`.snapshots/` sit next to it). Sessions stay open (locked, their KV context kept) while used;
the least recently used idle ones are closed beyond `max_open` — their memory was saved after
every turn, and the next request reopens it and re-reads the context without writing.
Only the engine's worker thread calls a store.
"""

from __future__ import annotations

import glob
import shutil
from collections import OrderedDict
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock, Timeout

from ..runtime import (ChatSession, MemoryFile, MemoryFileError, MemoryLockedError,
                       MemoryNotWritableError, read_memory)
from ..runtime.memory_file import SUFFIX
from .schemas import APIError


class MemoryStore:
    """Open sessions by memory id. `session_factory(memory)` builds a ChatSession on a
    MemoryFile (or on None: an ephemeral memory, never saved)."""

    def __init__(self, directory: Path, fingerprint: dict,
                 session_factory: Callable[[Optional[MemoryFile]], ChatSession],
                 max_open: int = 64):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self._factory = session_factory
        self.max_open = max_open
        self._open: OrderedDict[str, ChatSession] = OrderedDict()
        # (memory, write) → None: hands the memory files' writes to a writer thread (the
        # engine's); None: sessions write before returning
        self.write_behind: Optional[Callable[[str, Callable[[], Any]], None]] = None

    def path(self, memory: str) -> Path:
        return self.directory / (memory + SUFFIX)

    def __contains__(self, memory: str) -> bool:
        """Whether `memory` is open here."""
        return memory in self._open

    def exists(self, memory: str) -> bool:
        return memory in self._open or self.path(memory).is_file()

    def check_exists(self, memory: str) -> None:
        if not self.exists(memory):
            raise APIError(404, f"no memory {memory!r}", "id", "memory_not_found")

    # -- sessions ------------------------------------------------------------------------------
    def session(self, memory: Optional[str]) -> ChatSession:
        """The open session of `memory` (opened, and locked, if needed); None: an ephemeral one."""
        if memory is None:
            return self._factory(None)
        if memory in self._open:
            self._open.move_to_end(memory)
            return self._open[memory]
        file = self._open_file(memory)  # None on a rank that does not hold the files
        try:
            session = self._factory(file)
        except BaseException:
            if file is not None:
                file.close()
            raise
        if self.write_behind is not None:
            session.write_behind = partial(self.write_behind, memory)
        self._open[memory] = session
        return session

    def _open_file(self, memory: str) -> Optional[MemoryFile]:
        """The memory file of `memory`, opened and locked; APIError 409 if it cannot be."""
        try:
            return MemoryFile.open(self.path(memory), self.fingerprint)
        except MemoryLockedError:
            raise APIError(409, f"memory {memory!r} is open in another process",
                           code="memory_locked") from None
        except MemoryNotWritableError as exc:  # the server saves every turn: it cannot use it
            raise APIError(409, f"memory {memory!r} cannot be used: the server cannot save it "
                                f"({exc.reason})", code="memory_unusable") from None
        except MemoryFileError as exc:
            raise APIError(409, f"memory {memory!r} cannot be used: "
                                f"{_tail(str(exc), self.path(memory))}",
                           code="memory_unusable") from None

    def trim(self, busy: set) -> list[ChatSession]:
        """Close the least recently used idle sessions beyond `max_open`; returns them."""
        closed = []
        for memory in list(self._open):
            if len(self._open) <= self.max_open:
                break
            if memory not in busy:
                closed.append(self._close(memory))
        return closed

    def _close(self, memory: str) -> ChatSession:
        session = self._open.pop(memory)
        session.close()
        return session

    def close(self) -> None:
        for memory in list(self._open):
            self._close(memory)

    # -- the memory endpoints ----------------------------------------------------------------
    def info(self, memory: str) -> dict:
        """What GET /v1/memories/{id} answers; APIError 404 if there is no such memory.

        `loaded`: the memory is open in this server; the fields about its open session
        (`kv_tokens`, `turns_in_memory_only`) are then numbers, else null (not 0: a memory
        opened again re-reads its last conversation into the context at its next turn)."""
        path = self.path(memory)
        if memory in self._open:
            session = self._open[memory]
            i = session.info()
            data = dict(loaded=True, tokens_written=i.tokens_written, turns=i.turns,
                        conversations=i.conversations, messages=len(session.messages),
                        turns_in_memory_only=i.turns_in_memory_only, kv_tokens=i.kv_tokens,
                        state_bytes=i.memory_bytes,
                        last_saved=i.last_saved.isoformat(timespec="milliseconds")
                        if i.last_saved else None)  # as the file writes it
        elif path.is_file():
            try:
                d = read_memory(path, self.fingerprint)
            except MemoryFileError as exc:
                raise APIError(409, f"memory {memory!r} cannot be used: {_tail(str(exc), path)}",
                               code="memory_unusable") from None
            data = dict(loaded=False, tokens_written=d.tokens_written, turns=d.turns,
                        conversations=d.conversations, messages=len(d.transcript),
                        turns_in_memory_only=None, kv_tokens=None,
                        state_bytes=sum(s.nbytes for s in d.states.values()),
                        last_saved=d.saved)
        else:
            self.check_exists(memory)
        size = path.stat().st_size if path.is_file() else 0
        snapshots = sorted(p.name[:-len(SUFFIX)] for p in self._snapshot_dir(memory).glob(
            "*" + SUFFIX)) if self._snapshot_dir(memory).is_dir() else []
        return {"id": memory, "object": "memory", "bytes": size, **data,
                "snapshots": snapshots}

    def delete(self, memory: str) -> dict:
        """Forget a memory: its file, backup, snapshots and lock (the memory is locked first, so
        a memory open in another process is refused)."""
        self.check_exists(memory)
        if memory in self._open:
            self._close(memory)
        path = self.path(memory)
        lock = FileLock(str(path) + ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise APIError(409, f"memory {memory!r} is open in another process",
                           code="memory_locked") from None
        try:
            for p in (path, path.with_name(path.name + ".bak")):
                p.unlink(missing_ok=True)
            shutil.rmtree(self._snapshot_dir(memory), ignore_errors=True)
            for leftover in path.parent.glob(f".{glob.escape(path.name)}.*-*-*"):
                leftover.unlink(missing_ok=True)
        finally:
            lock.release()
        Path(str(path) + ".lock").unlink(missing_ok=True)
        return {"id": memory, "object": "memory", "deleted": True}

    def snapshot(self, session: ChatSession, memory: str, name: Optional[str]) -> dict:
        """Save `memory` (open as `session`) under a snapshot name (default: the time)."""
        name = name or datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        try:
            session.snapshot(name)
        except MemoryFileError as exc:
            raise APIError(400, str(exc), "name", "invalid_snapshot_name") from None
        return {"id": memory, "object": "memory.snapshot", "name": name.strip()}

    def _snapshot_dir(self, memory: str) -> Path:
        return self.directory / (memory + ".snapshots")


def _tail(message: str, path: Path) -> str:
    """An error message without the server's file path (clients need not see it)."""
    return message.replace(f"{path}: ", "").replace(str(path.parent), "<memories>")

