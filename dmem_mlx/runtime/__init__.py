"""The chat runtime: a session over a δ-mem model and the memory file that outlives it.

    from dmem_mlx.runtime import ChatSession, MemoryFile, default_memory_path
    mem = MemoryFile.open(default_memory_path("org/model"))
    session = ChatSession(model, tokenizer, memory=mem)
    for chunk in session.reply("Hi, I am Ada."):
        print(chunk.text, end="")

Names are loaded on first use (PEP 562): `dmem_mlx.runtime.memory_file` imports neither mlx
nor mlx-lm, so tools that only read or write memory files start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name → the submodule defining it
_EXPORTS = {
    **dict.fromkeys(("ChatSession", "ContextTooLongError", "SessionBusyError", "ReplyChunk",
                     "ReplyStats", "SessionInfo", "Turn", "default_kv_budget",
                     "NothingToUndoError"), "session"),
    **dict.fromkeys(("MemoryFile", "MemoryFileError", "MemoryLockedError", "MemoryData",
                     "read_memory", "default_memory_path", "FORMAT_VERSION", "UndoStep",
                     "PastConversation"), "memory_file"),
    **dict.fromkeys(("model_fingerprint", "fingerprint_from_files"), "fingerprint"),
    **dict.fromkeys(("Rendered", "render", "closing_tokens", "sentence_spans"), "template"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
