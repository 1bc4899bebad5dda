"""Shared fixtures: tiny random δ-mem models built in a temporary directory (no download)."""

import pytest

import dmem_mlx
from dmem_mlx.tiny import make_tiny_dmem


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A converted tiny model directory (qwen3, 4 layers, token writes, heads q and o)."""
    return make_tiny_dmem(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, tokenizer) of `tiny_dir`."""
    return dmem_mlx.load(str(tiny_dir))


class Disk:
    """The disk memory files are saved on; while `full`, every write of one runs out of space
    half-way (ENOSPC, as on a full file system: a part of the file was written)."""

    def __init__(self, monkeypatch):
        import errno
        import os

        from dmem_mlx.runtime import memory_file

        self.full = False
        real = memory_file._write_synced

        def write(path, payload):
            if not self.full:
                return real(path, payload)
            real(path, payload[:len(payload) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(memory_file, "_write_synced", write)


@pytest.fixture
def disk(monkeypatch):
    """A `Disk` that can be made full (no mount: the memory file's writes are wrapped)."""
    return Disk(monkeypatch)



class Mount:
    """The file systems; while `read_only`, as a read-only mount answers (root too, unlike
    chmod): opening a file for writing fails with EROFS and os.access finds nothing writable."""

    def __init__(self, monkeypatch):
        import errno
        import os

        self.read_only = False
        real_open, real_access = os.open, os.access

        def open_(name, flags, *args, **kwargs):
            if self.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))
            return real_open(name, flags, *args, **kwargs)

        def access(name, mode, **kwargs):
            return not (self.read_only and mode & os.W_OK) and real_access(name, mode, **kwargs)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "access", access)


@pytest.fixture
def mount(monkeypatch):
    """A `Mount` that can be made read-only (no real mount: os.open and os.access are wrapped)."""
    return Mount(monkeypatch)
