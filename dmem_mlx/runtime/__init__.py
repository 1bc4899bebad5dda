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

from ..lazy import lazy_exports

# public name → the submodule defining it
_EXPORTS = {
    **dict.fromkeys(("ChatSession", "ContextTooLongError", "SessionBusyError", "ReplyChunk",
                     "ReplyStats", "SessionInfo", "Turn", "default_kv_budget",
                     "NothingToUndoError"), "session"),
    **dict.fromkeys(("MemoryFile", "MemoryFileError", "MemoryNotWritableError",
                     "MemoryLockedError", "MemorySaveError", "MemoryData", "read_memory",
                     "check_writable", "default_memory_path", "FORMAT_VERSION", "UndoStep",
                     "PastConversation"), "memory_file"),
    **dict.fromkeys(("model_fingerprint", "fingerprint_from_files"), "fingerprint"),
    **dict.fromkeys(("Rendered", "render", "closing_tokens", "sentence_spans"), "template"),
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
