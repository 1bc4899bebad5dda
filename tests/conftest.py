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
