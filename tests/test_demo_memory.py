"""The demo's default memory across demo upgrades (dmem_mlx/demo/memory.py): one per demo
version, an earlier demo's memory kept untouched and named, for dmem-chat and dmem-serve."""

import hashlib
import logging

import pytest

from demo_memories import write_memory
from dmem_mlx.demo import DEMO_DIR, DEMO_MEMORY, DEMO_NAME, DEMO_SHA256, DEMO_VERSION
from dmem_mlx.demo.memory import default_demo_memory, other_demo_memories, upgrade_notice

EARLIER_ADAPTER = "e" * 64  # an earlier demo build: same backbone, another adapter


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data" / "dmem-mlx" / "memories"


@pytest.mark.skipif(not (DEMO_DIR / "delta_mem.safetensors").is_file(),
                    reason="the demo model is not in this checkout")
def test_the_demo_version_is_tied_to_the_shipped_model():
    """Shipping a demo model without a new DEMO_VERSION would give its users' memories of the
    last one as its default, refused at start: the hashes of the model's files are recorded next
    to the version."""
    actual = {name: hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest()
              for name in sorted(DEMO_SHA256)}
    assert actual == DEMO_SHA256, (
        "the shipped demo model changed: give it the next DEMO_VERSION (its memory gets a new "
        "default name; the earlier one stays where it is) and record DEMO_SHA256 = "
        f"{actual} in dmem_mlx/demo/__init__.py")
    assert {"delta_mem.safetensors", "delta_mem_config.json", "config.json",
            "model.safetensors"} <= set(DEMO_SHA256)  # what a memory's meaning depends on
    assert DEMO_MEMORY == f"dmem-demo-v{DEMO_VERSION}" and DEMO_NAME == "dmem-demo"


def test_the_default_memory_is_named_after_the_demo_version(data_home):
    from dmem_mlx.runtime import default_memory_path

    assert default_memory_path(DEMO_MEMORY) == data_home / f"dmem-demo-v{DEMO_VERSION}.safetensors"


def test_other_demo_versions_memories_are_found_newest_first(tmp_path):
    for name in ("dmem-demo.safetensors", "dmem-demo-v2.safetensors", "dmem-demo-v12.safetensors",
                 "dmem-demo.safetensors.bak", "dmem-demo-v3.safetensors.lock", "dmem-demo-vx."
                 "safetensors", "work.safetensors", f"{DEMO_MEMORY}.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dmem-demo-v1.safetensors").mkdir()  # not a file
    found = other_demo_memories(tmp_path / f"{DEMO_MEMORY}.safetensors")
    assert [(v, p.name) for v, p in found] == [
        (12, "dmem-demo-v12.safetensors"), (2, "dmem-demo-v2.safetensors"),
        (0, "dmem-demo.safetensors")]
    # dmem-serve's directories: only those holding a memory file
    (tmp_path / "dmem-demo").mkdir()
    (tmp_path / "dmem-demo" / "ada.safetensors").write_bytes(b"x")
    (tmp_path / "dmem-demo-v3").mkdir()  # empty: nothing to keep
    assert other_demo_memories(tmp_path / DEMO_MEMORY) == [(0, tmp_path / "dmem-demo")]


def test_an_earlier_demo_memory_is_kept_and_named(tmp_path):
    default = tmp_path / f"{DEMO_MEMORY}.safetensors"
    legacy = tmp_path / "dmem-demo.safetensors"
    kept = write_memory(legacy, DEMO_DIR, EARLIER_ADAPTER)
    memory = default_demo_memory(default, DEMO_DIR)
    assert memory.path == default and memory.earlier == legacy and memory.earlier_version == 0
    notice = upgrade_notice(memory)
    assert f"new (v{DEMO_VERSION})" in notice and "cannot read" in notice
    assert f"untouched at {legacy}" in notice and "earlier demo" in notice
    assert legacy.read_bytes() == kept and not default.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dmem-demo.safetensors"]
    # several: the newest earlier one is named; a later one (a downgrade) is "another"
    write_memory(tmp_path / "dmem-demo-v3.safetensors", DEMO_DIR, "3" * 64)
    assert default_demo_memory(default, DEMO_DIR).earlier.name == "dmem-demo-v3.safetensors"
    later = tmp_path / f"dmem-demo-v{DEMO_VERSION + 1}.safetensors"
    write_memory(later, DEMO_DIR, "5" * 64)
    assert "another demo model" in upgrade_notice(default_demo_memory(default, DEMO_DIR))


def test_without_an_earlier_memory_nothing_is_said(tmp_path):
    default = tmp_path / f"{DEMO_MEMORY}.safetensors"
    assert upgrade_notice(default_demo_memory(default, DEMO_DIR)) is None
    (tmp_path / "notes.safetensors").write_bytes(b"not a demo memory")
    assert upgrade_notice(default_demo_memory(default, DEMO_DIR)) is None
    # once this version's memory exists, it is the memory, whatever else is there
    write_memory(tmp_path / "dmem-demo.safetensors", DEMO_DIR, EARLIER_ADAPTER)
    write_memory(default, DEMO_DIR)
    assert default_demo_memory(default, DEMO_DIR).path == default
    assert upgrade_notice(default_demo_memory(default, DEMO_DIR)) is None


def test_this_models_memory_under_the_earlier_name_is_used_where_it_is(tmp_path):
    """v4's users had dmem-demo.safetensors before names had versions: still theirs."""
    default = tmp_path / f"{DEMO_MEMORY}.safetensors"
    legacy = tmp_path / "dmem-demo.safetensors"
    kept = write_memory(legacy, DEMO_DIR)
    write_memory(tmp_path / "dmem-demo-v2.safetensors", DEMO_DIR, "2" * 64)
    memory = default_demo_memory(default, DEMO_DIR)
    assert memory.path == legacy and memory.earlier is None and upgrade_notice(memory) is None
    assert legacy.read_bytes() == kept


def test_a_damaged_earlier_memory_is_kept_and_named(tmp_path):
    default = tmp_path / f"{DEMO_MEMORY}.safetensors"
    legacy = tmp_path / "dmem-demo.safetensors"
    legacy.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # truncated
    memory = default_demo_memory(default, DEMO_DIR)
    assert memory.path == default and memory.earlier == legacy
    assert legacy.read_bytes() == b"\x05\x00\x00\x00\x00\x00\x00\x00{\"a\""


def serve_resolve(argv=()):
    from dmem_mlx.server.cli import build_parser, resolve

    return resolve(build_parser().parse_args(list(argv)))


def test_the_server_keeps_the_demos_memories_per_version(data_home):
    path, model_id, memories, notice = serve_resolve()
    assert model_id == "dmem-demo"  # the OpenAI `model` name stays the demo's
    assert memories == data_home / DEMO_MEMORY and path == DEMO_DIR
    assert notice is None


def test_the_server_names_an_earlier_demos_memories_once(data_home):
    earlier = data_home / "dmem-demo"
    kept = write_memory(earlier / "ada.safetensors", DEMO_DIR, EARLIER_ADAPTER)
    _, model_id, memories, line = serve_resolve()
    assert memories == data_home / DEMO_MEMORY and model_id == "dmem-demo"
    assert "cannot read" in line and f"kept untouched in {earlier};" in line
    assert line.endswith(f"new memories go to {memories}")
    assert (earlier / "ada.safetensors").read_bytes() == kept
    assert sorted(p.name for p in earlier.iterdir()) == ["ada.safetensors"]
    memories.mkdir()  # as dmem-serve does at start: the next start says nothing
    assert serve_resolve()[2:] == (memories, None)
    # --memories chooses for itself
    assert serve_resolve(["--memories", str(earlier)])[2:] == (earlier, None)


class _Group:
    """A rank of a 2-process group, as `mx.distributed.init()` gives it under mlx.launch."""

    def __init__(self, rank: int):
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return 2


@pytest.mark.parametrize("rank", [0, 1])
def test_under_mlx_launch_only_rank_0_logs_what_concerns_the_server(rank, data_home, caplog,
                                                                   monkeypatch):
    """The earlier demo's memories and a missing API key are said once, by the rank that
    serves HTTP, not by every rank; only that rank, which alone opens memory files, creates
    the memories directory (the model is neither loaded nor served here)."""
    import sys
    from types import SimpleNamespace

    import mlx.core as mx
    import uvicorn

    import dmem_mlx.blas
    import dmem_mlx.distributed
    import dmem_mlx.server
    import dmem_mlx.server.distributed
    from dmem_mlx.server.cli import main

    write_memory(data_home / "dmem-demo" / "ada.safetensors", DEMO_DIR, EARLIER_ADAPTER)
    monkeypatch.delenv("DMEM_API_KEY", raising=False)
    monkeypatch.setattr(dmem_mlx.blas, "reexec_with_openblas", lambda *a, **k: None)
    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: _Group(rank))
    monkeypatch.setattr(dmem_mlx.distributed, "sharded_load", lambda *a, **k: (None, None))
    monkeypatch.setattr(dmem_mlx.server.distributed, "build_sharded",
                        lambda *a, **k: SimpleNamespace(_run=lambda: None))
    monkeypatch.setattr(dmem_mlx.server, "build_app", lambda *a, **k: None)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)
    caplog.set_level(logging.INFO)
    assert main(["--host", "0.0.0.0"]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if rank == 0:
        assert len(said) == 2 and "kept untouched in" in said[0] and "API key" in said[1]
    else:
        assert said == []
    assert (data_home / DEMO_MEMORY).is_dir() == (rank == 0)


def test_the_server_goes_on_in_the_earlier_directory_of_this_models_memories(data_home):
    earlier = data_home / "dmem-demo"
    write_memory(earlier / "ada.safetensors", DEMO_DIR)
    assert serve_resolve()[2:] == (earlier, None)
    assert not (data_home / DEMO_MEMORY).exists()
