"""The one family of errors a user can cause: every one is a `DmemError` with a one-line message.

    DmemError
    ├── ConfigError            a δ-mem config this project cannot run exactly (ValueError too)
    ├── AdapterError           adapter weights missing, misshapen, not finite, unreadable (ValueError)
    ├── CheckpointError        a torch checkpoint the converter's reader refuses
    │   ├── UnsafeCheckpointError       it would run code (a refused global or opcode)
    │   ├── CorruptCheckpointError      malformed, truncated, inconsistent or oversized
    │   └── UnsupportedCheckpointError  well formed, deliberately not read (legacy format, dtype)
    ├── ConvertError           a conversion that cannot go on
    ├── HubError               a model or adapter found neither locally nor on the hub
    ├── ModelError             a model directory mlx-lm cannot load (files, architecture)
    ├── DistributedError       a sharding or pipeline split that cannot run (mx.distributed)
    ├── MemoryFileError        a memory file that cannot be read or written
    │   ├── MemoryNotWritableError  one that can be read, not written here (opens read-only)
    │   │   └── MemoryLockedError   ... because it is open for writing elsewhere
    │   └── MemorySaveError    a save that failed (disk full …): the file keeps its last version
    ├── SessionError           a chat session asked for something it cannot do
    │   ├── ContextTooLongError  a message longer than the whole KV budget (ValueError too)
    │   ├── SessionBusyError     an operation asked for while a reply streams (RuntimeError too)
    │   └── NothingToUndoError   undo or retry with no turn to take back (ValueError too)
    ├── DataError              training data that cannot be used (ValueError too)
    ├── TrainError             a training run that cannot start or go on
    └── UsageError             a command line that cannot run (flags, environment)
        └── CommandError       a slash command of dmem-chat that cannot run as typed (ValueError)

Every class stays importable where it lived before (`dmem_mlx.config.ConfigError`,
`dmem_mlx.runtime.MemoryFileError`, `convert.torch_pickle.CheckpointError`, ...). The built-in
bases kept on some classes are for callers that caught them before; new code catches DmemError.
A CLI catches DmemError and prints `error: <message>` (one line) with exit status 1.

This module imports nothing heavy (no mlx, no numpy): anything may import it.
"""

from __future__ import annotations

import reprlib

__all__ = [
    "DmemError", "ConfigError", "AdapterError", "CheckpointError", "UnsafeCheckpointError",
    "CorruptCheckpointError", "UnsupportedCheckpointError", "ConvertError", "HubError", "ModelError",
    "DistributedError", "MemoryFileError", "MemoryNotWritableError", "MemoryLockedError",
    "MemorySaveError", "SessionError",
    "ContextTooLongError", "SessionBusyError", "NothingToUndoError", "DataError", "TrainError", "UsageError",
    "CommandError", "brief", "one_line", "user_message",
]


class DmemError(Exception):
    """Root of every error a user of dmem-mlx can cause; str() is one line for the user."""


class ConfigError(DmemError, ValueError):
    """A δ-mem config that this project cannot run exactly as the reference would."""


class AdapterError(DmemError, ValueError):
    """Adapter weights that do not fit their config or the base model, or cannot be read."""


class CheckpointError(DmemError):
    """A torch checkpoint file that the converter's reader does not accept."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global or an opcode outside the allow-list (it would run code)."""


class CorruptCheckpointError(CheckpointError):
    """The archive or pickle is malformed, truncated, inconsistent or larger than allowed."""


class UnsupportedCheckpointError(CheckpointError):
    """A well-formed file in a format deliberately not read (legacy format, dtype)."""


class ConvertError(DmemError):
    """A conversion that cannot go on."""


class HubError(DmemError):
    """A model or adapter could not be found locally nor downloaded."""


class ModelError(DmemError):
    """A model directory that mlx-lm cannot load (missing files, unsupported architecture)."""


class DistributedError(DmemError):
    """A model that cannot be sharded or split as asked, or steps taken in the wrong order."""


class MemoryFileError(DmemError):
    """A memory file that cannot be used (message: one line naming the file and the reason)."""


class MemoryNotWritableError(MemoryFileError):
    """A memory that can be read but not written here (a read-only file, a directory that
    cannot be written): opened read-only it can be used. The message states the situation; each
    front end words the way on (dmem-chat: its --read-only flag). `path`: the memory; `reason`:
    why it cannot be written, without the path."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class MemoryLockedError(MemoryNotWritableError):
    """The memory is open for writing elsewhere (another process, or this one)."""


class MemorySaveError(MemoryFileError):
    """A save failed (disk full, a file system gone read-only, the file made read-only): the
    file keeps its previous version and what was to be saved stays where it was (a chat session
    keeps it and writes it with its next save). `reason`: why, in the system's words."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class SessionError(DmemError):
    """A chat session cannot do what was asked."""


class ContextTooLongError(SessionError, ValueError):
    """A message that does not fit the KV budget even with every earlier turn evicted."""


class SessionBusyError(SessionError, RuntimeError):
    """Another operation was asked for while a reply is being generated."""


class NothingToUndoError(SessionError, ValueError):
    """undo() or retry() with no turn to take back in this conversation."""


class DataError(DmemError, ValueError):
    """Training data that cannot be used."""


class TrainError(DmemError):
    """A training run that cannot start or go on."""


class UsageError(DmemError):
    """A mistake on the command line or in the environment."""


class CommandError(UsageError, ValueError):
    """A slash command that cannot run as typed; the message is shown to the user."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = 4


def brief(value: object) -> str:
    """A short repr of any value, for messages: bounded depth and width, never the whole object
    (a hostile value may be a huge or exponentially shared structure)."""
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


def one_line(text: object, limit: int = 300) -> str:
    """`text` as one line of at most `limit` characters (whitespace runs collapsed)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def user_message(exc: BaseException) -> str:
    """The one line a CLI prints for a DmemError or an OSError (strerror and file name)."""
    if isinstance(exc, OSError) and not isinstance(exc, DmemError) and exc.strerror:
        name = f": {exc.filename}" if exc.filename is not None else ""
        return one_line(f"{exc.strerror}{name}")
    return one_line(exc)
