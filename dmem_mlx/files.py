"""Reading user-named files at a bounded cost: regular files only, sizes capped before reading.

A FIFO at a path would block a plain `open().read()` forever and a symlink to /dev/zero would
read until memory runs out; both are refused here from `fstat` alone, without reading a byte.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import DmemError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | Path, error: type[DmemError], limit: int,
                 what: str = "file") -> tuple[BinaryIO, int]:
    """Open `path` for reading if it is a regular file of at most `limit` bytes → (file, size).

    Raises `error` (one line naming the path) for a missing or unreadable path, anything that
    is not a regular file (checked on the opened descriptor: no race, no blocking) or a file
    larger than `limit`.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
            raise error(f"{path}: is {kind}, not a {what}")
        if info.st_size > limit:
            raise error(f"{path}: {info.st_size:,} bytes, more than a {what} can be "
                        f"({limit:,} at most)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, error: type[DmemError], limit: int,
                 what: str = "file") -> bytes:
    """The bytes of the regular file `path`, refused (`error`) past `limit` bytes (see
    `open_regular`); a file that grows while it is read is cut at `limit` + 1 and refused."""
    f, _ = open_regular(path, error, limit, what)
    with f:
        try:
            raw = f.read(limit + 1)
        except OSError as exc:
            raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise error(f"{path}: more than a {what} can be ({limit:,} bytes at most)")
    return raw
