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
