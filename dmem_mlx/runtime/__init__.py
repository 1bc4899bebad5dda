"""The chat runtime: a session over a δ-mem model and the memory file that outlives it.

    from dmem_mlx.runtime import ChatSession, MemoryFile, default_memory_path
    mem = MemoryFile.open(default_memory_path("org/model"))
    session = ChatSession(model, tokenizer, memory=mem)
    for chunk in session.reply("Hi, I am Ada."):
        print(chunk.text, end="")
"""

from .fingerprint import model_fingerprint
from .memory_file import (FORMAT_VERSION, MemoryData, MemoryFile, MemoryFileError,
                          MemoryLockedError, default_memory_path, read_memory)
from .session import (ChatSession, ContextTooLongError, ReplyChunk, ReplyStats, SessionBusyError,
                      SessionInfo, default_kv_budget)
from .template import Rendered, closing_tokens, render, sentence_spans

__all__ = ["ChatSession", "MemoryFile", "MemoryFileError", "MemoryLockedError",
           "default_memory_path", "model_fingerprint", "MemoryData", "read_memory",
           "FORMAT_VERSION", "ContextTooLongError", "SessionBusyError", "ReplyChunk", "ReplyStats",
           "SessionInfo", "default_kv_budget", "Rendered", "render", "closing_tokens",
           "sentence_spans"]
