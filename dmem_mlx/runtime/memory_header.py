"""The first bytes of a memory file, checked without numpy or mlx: dmem-chat refuses a file that
cannot be a memory (a text file, /etc/passwd …) before anything heavy is imported, and
`memory_file.decode` begins with the same check."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import MemoryFileError
from ..files import open_regular

MAX_HEADER = 100_000_000  # safetensors' own cap on a header
MAX_BODY = 16 << 20  # δ states: a few KB per layer
MAX_FILE = 8 + MAX_HEADER + MAX_BODY


def prefix_problem(prefix: bytes, size: int) -> Optional[str]:
    """Why a file of `size` bytes beginning with `prefix` (its first 9 bytes) cannot be a
    memory file (a safetensors file: 8 bytes of header length, then a JSON header), or None."""
    if size == 0:
        return "the file is empty: not a memory file"
    if size < 10:
        return "the file is too short to be a memory file"
    n = int.from_bytes(prefix[:8], "little")
    if prefix[8:9] != b"{" or n > MAX_HEADER:
        return "not a memory file (not a safetensors file)"
    if 8 + n > size:
        return f"truncated: the header needs {n} bytes, the file has {size - 8}"
    return None


def check_prefix(path: str | Path) -> None:
    """Refuse (MemoryFileError, one line) a path whose first bytes cannot begin a memory file."""
    f, size = open_regular(path, MemoryFileError, MAX_FILE, "memory file")
    with f:
        try:
            prefix = f.read(9)
        except OSError as exc:
            raise MemoryFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if problem := prefix_problem(prefix, size):
        raise MemoryFileError(f"{path}: {problem}")
