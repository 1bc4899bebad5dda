"""The memory file: round trip, session persistence, lock, crash safety, refusal of bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import dmem_mlx
from dmem_mlx.runtime import (ChatSession, MemoryData, MemoryFile, MemoryFileError,
                              MemoryLockedError, MemoryNotWritableError, MemorySaveError,
                              default_memory_path, read_memory)
from dmem_mlx.runtime.memory_file import FORMAT_NAME, FORMAT_VERSION, _checksum, encode
from dmem_mlx.tiny import make_tiny_dmem
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."
FP = {"base_model": "org/base", "backbone": "qwen3 · 4 layers", "adapter_sha256": "a" * 64,
      "delta_config": {"rank": 8, "num_state_heads": 1, "layers": [0, 1, 2, 3],
                       "memory_write_granularity": "token"}}


def sample(k=1.0, fingerprint=FP, **kw):
    rng = np.random.default_rng(int(k))
    states = {i: rng.standard_normal((1, 8, 8)).astype(np.float32) for i in range(4)}
    return MemoryData(states=states, fingerprint=fingerprint,
                      transcript=[{"role": "system", "content": "Be nice."},
                                  {"role": "user", "content": "Hi, I am Ada ✓"},
                                  {"role": "assistant", "content": "Hello Ada."}],
                      tokens_written=42, turns=1, **kw)


def states_of(session):
    return {i: np.array(s) for i, s in session.info().layer_states.items()}


# -- format -----------------------------------------------------------------------------------
def test_round_trip_and_standard_safetensors(tmp_path):
    data = sample()
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        assert mem.data is None and not path.exists()  # created on first save
        mem.save(data)
    back = read_memory(path, FP)
    assert back.transcript == data.transcript and back.tokens_written == 42
    assert back.turns == 1 and back.saved is not None and back.fingerprint == FP
    for i in range(4):
        np.testing.assert_array_equal(back.states[i], data.states[i])
    plain = safetensors.numpy.load_file(str(path))  # any safetensors reader opens it
    assert sorted(plain) == [f"layers.{i}" for i in range(4)]
    np.testing.assert_array_equal(plain["layers.2"], data.states[2])
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_save_keeps_the_previous_version_as_bak(tmp_path):
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        mem.save(sample(1))
        assert not path.with_name(path.name + ".bak").exists()
        mem.save(sample(2))
    bak = read_memory(path.with_name(path.name + ".bak"), FP)
    np.testing.assert_array_equal(bak.states[0], sample(1).states[0])
    np.testing.assert_array_equal(read_memory(path, FP).states[0], sample(2).states[0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_state_with_nan_is_never_saved(tmp_path):
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        mem.save(sample())
        before = path.read_bytes()
        bad = sample()
        bad.states[1][0, 0, 0] = np.nan
        with pytest.raises(MemoryFileError, match="NaN"):
            mem.save(bad)
    assert path.read_bytes() == before


def test_default_memory_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    repo = default_memory_path("declare-lab/delta-mem_qwen3_4b-instruct")
    assert repo.name == "declare-lab--delta-mem_qwen3_4b-instruct.safetensors"
    assert repo.parent == tmp_path / "data" / "dmem-mlx" / "memories"
    model_dir = tmp_path / "models" / "my model"
    model_dir.mkdir(parents=True)
    assert default_memory_path(model_dir).name == "my-model.safetensors"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert default_memory_path(snapshot).name == "org--name.safetensors"


def test_model_fingerprint(tiny, tiny_dir, tmp_path):
    from dmem_mlx.runtime import model_fingerprint
    from dmem_mlx.runtime.memory_file import fingerprint_mismatch

    model, tok = tiny
    fp = model_fingerprint(model, tok)
    assert fp == model_fingerprint(*dmem_mlx.load(str(tiny_dir)))  # same adapter, same print
    assert fp["base_model"] is None and fp["delta_config"]["layers"] == [0, 1, 2, 3]
    (tmp_path / "README.md").write_text('---\nbase_model: "Qwen/Qwen3-4B-Instruct-2507"\n---\n')
    assert model_fingerprint(model, model_path=tmp_path)["base_model"] == \
        "Qwen/Qwen3-4B-Instruct-2507"
    other = model_fingerprint(*dmem_mlx.load(str(make_tiny_dmem(tmp_path / "other", seed=9))))
    assert other["adapter_sha256"] != fp["adapter_sha256"]
    assert "adapter weights" in fingerprint_mismatch(other, fp)
    assert fingerprint_mismatch(fp, fp) is None


# -- the bad-file corpus ----------------------------------------------------------------------
def craft(tensors, memory, **meta):
    """A safetensors file with memory metadata and a valid checksum (content possibly bad)."""
    memory_json = memory if isinstance(memory, str) else json.dumps(memory)
    f32 = {k: v for k, v in tensors.items() if v.dtype == np.float32}
    metadata = {"format": FORMAT_NAME, "format_version": "1", "memory": memory_json,
                "checksum": _checksum(memory_json, f32)}
    metadata.update(meta)
    return safetensors.numpy.save(tensors, metadata=metadata)


def good_memory():
    data = sample()
    raw = encode(data)
    n = int.from_bytes(raw[:8], "little")
    memory = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["memory"])
    tensors = {f"layers.{i}": s for i, s in data.states.items()}
    return raw, memory, tensors


def bad_corpus():
    raw, memory, tensors = good_memory()
    n = int.from_bytes(raw[:8], "little")
    header_end = 8 + n
    corpus = {
        "empty": b"", "three bytes": b"abc", "text": b"I am not a memory file at all.\n",
        "json": b'{"transcript": []}', "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "random": np.random.default_rng(0).bytes(4096),
        "huge header length": (1 << 40).to_bytes(8, "little") + b"{" + bytes(100),
        "header not json": (20).to_bytes(8, "little") + b"{not json at all!!!}" + bytes(64),
        "trailing bytes": raw + bytes(8),
        "plain safetensors": safetensors.numpy.save({"w": np.ones(4, np.float32)}),
        "other metadata": safetensors.numpy.save({"layers.0": np.ones((1, 8, 8), np.float32)},
                                                  metadata={"format": "pt"}),
    }
    for cut in (8, 9, 40, header_end - 1, header_end, header_end + 1, header_end + 100,
                len(raw) - 4, len(raw) - 1):
        corpus[f"truncated at {cut}"] = raw[:cut]
    memory_at = raw.index(b'"memory"')
    checksum_at = raw.index(b'"checksum"') + 14
    for name, at in (("length field", 2), ("header json", 20), ("memory json", memory_at + 40),
                     ("checksum", checksum_at), ("first tensor", header_end + 3),
                     ("middle tensor", header_end + 520), ("last tensor", len(raw) - 2)):
        flipped = bytearray(raw)
        flipped[at] ^= 0x10
        corpus[f"bit flip in {name}"] = bytes(flipped)
    nan = {k: v.copy() for k, v in tensors.items()}
    nan["layers.1"][0, 2, 3] = np.nan
    inf = {k: v.copy() for k, v in tensors.items()}
    inf["layers.3"][0, 0, 0] = -np.inf
    other = dict(memory, fingerprint=dict(FP, adapter_sha256="b" * 64))
    other_base = dict(memory, fingerprint=dict(FP, base_model="org/another"))
    counts = dict(memory, counts=dict(memory["counts"], turns=-1))
    corpus.update({
        "nan": craft(nan, memory), "inf": craft(inf, memory),
        "future version": craft(tensors, dict(memory, version=FORMAT_VERSION + 1),
                                 format_version=str(FORMAT_VERSION + 1)),
        "version zero": craft(tensors, memory, format_version="0"),
        "no checksum": safetensors.numpy.save(tensors, metadata={
            "format": FORMAT_NAME, "format_version": "1", "memory": json.dumps(memory)}),
        "memory not json": craft(tensors, "{transcript: oops"),
        "memory a list": craft(tensors, [1, 2, 3]),
        "wrong model": craft(tensors, other), "other base model": craft(tensors, other_base),
        "negative count": craft(tensors, counts),
        "bad role": craft(tensors, dict(memory, transcript=[{"role": "x", "content": "hi"}])),
        "extra key": craft(tensors, dict(memory, transcript=[
            {"role": "user", "content": "hi", "name": "x"}])),
        "content not text": craft(tensors, dict(memory, transcript=[
            {"role": "user", "content": 3}])),
        "context_start too far": craft(tensors, dict(memory, context_start=99)),
        "bad timestamp": craft(tensors, dict(memory, created="yesterday")),
        "no fingerprint": craft(tensors, {k: v for k, v in memory.items() if k != "fingerprint"}),
        "missing layer": craft({k: v for k, v in tensors.items() if k != "layers.2"}, memory),
        "extra tensor": craft(dict(tensors, extra=np.zeros(3, np.float32)), memory),
        "wrong shape": craft(dict(tensors, **{"layers.0": np.zeros((1, 4, 4), np.float32)}),
                             memory),
        "float16": craft(dict(tensors, **{"layers.0": tensors["layers.0"].astype(np.float16)}),
                         memory),
    })
    return corpus


CORPUS = bad_corpus()


def test_corpus_is_large_and_every_file_differs_from_the_good_one():
    raw = good_memory()[0]
    assert len(CORPUS) >= 40 and all(bad != raw for bad in CORPUS.values())
    read_memory_bytes = __import__("dmem_mlx.runtime.memory_file", fromlist=["decode"]).decode
    read_memory_bytes(raw, "good", FP)  # the original is fine


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_file_is_refused_with_one_line_and_left_untouched(tmp_path, name):
    path = tmp_path / "memory.safetensors"
    path.write_bytes(CORPUS[name])
    with pytest.raises(MemoryFileError) as info:
        MemoryFile.open(path, fingerprint=FP)
    message = str(info.value)
    assert not isinstance(info.value, MemoryLockedError)
    assert "\n" not in message and message.startswith(str(path)) and len(message) < 300
    assert path.read_bytes() == CORPUS[name]
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]  # no lock file left
    with pytest.raises(MemoryFileError):  # the lock was released: refused again, not "locked"
        MemoryFile.open(path, fingerprint=FP)


def test_refusal_points_to_an_intact_backup(tmp_path):
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        mem.save(sample(1))
        mem.save(sample(2))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MemoryFileError, match=r"truncated.*previous version is intact"):
        MemoryFile.open(path, fingerprint=FP)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(MemoryFileError, match="directory"):
        MemoryFile.open(tmp_path, fingerprint=FP)


def test_another_models_memory_is_refused_by_the_session(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    raw = encode(sample())  # FP: same layers and shapes, another adapter hash
    path.write_bytes(raw)
    mem = MemoryFile.open(path)  # no fingerprint given: the session checks it
    with pytest.raises(MemoryFileError, match="another model"):
        ChatSession(model, tok, memory=mem)
    mem.close()
    assert path.read_bytes() == raw


# -- locking ----------------------------------------------------------------------------------
LOCK_PROBE = r"""
import sys
from dmem_mlx.runtime import memory_file as mf
try:
    mf.MemoryFile.open(sys.argv[1], read_only=sys.argv[2] == "ro")
    print("opened")
except mf.MemoryLockedError as exc:
    print("locked:", exc)
"""


def probe(path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's dmem_mlx
    return subprocess.run([sys.executable, "-c", LOCK_PROBE, str(path), mode], env=env,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def test_second_process_is_refused_and_may_open_read_only(tmp_path):
    path = tmp_path / "m.safetensors"
    mem = MemoryFile.open(path, fingerprint=FP)
    mem.save(sample())
    before = path.read_bytes()
    out = probe(path, "rw")
    assert out.startswith("locked:") and "another process" in out
    assert probe(path, "ro") == "opened"
    with pytest.raises(MemoryLockedError) as info:
        MemoryFile.open(path, fingerprint=FP)  # a second opener in this process too
    assert isinstance(info.value, MemoryNotWritableError)  # it opens read-only
    assert (info.value.path, info.value.reason) == (path, "this memory is already open in this "
                                                          "process")
    assert path.read_bytes() == before
    mem.close()
    assert probe(path, "rw") == "opened"


def test_a_lock_file_stays_only_next_to_a_memory_written_here(tmp_path):
    path = tmp_path / "m.safetensors"
    MemoryFile.open(path, fingerprint=FP).close()  # tried and left: nothing at all
    assert list(tmp_path.iterdir()) == []
    with MemoryFile.open(path, fingerprint=FP) as mem:
        assert (tmp_path / "m.safetensors.lock").exists()
        mem.save(sample())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.lock"]
    with MemoryFile.open(path, fingerprint=FP):  # its lock file was there already: it stays
        pass
    assert (tmp_path / "m.safetensors.lock").exists()
    (tmp_path / "m.safetensors.lock").unlink()
    with MemoryFile.open(path, fingerprint=FP):  # read and left: the lock file created goes
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert probe(path, "rw") == "opened"  # a process that ends without closing leaves it
    assert (tmp_path / "m.safetensors.lock").exists()
    MemoryFile.open(path, fingerprint=FP).close()  # harmless: the OS lock is what counts


def test_crash_during_saves_always_leaves_a_loadable_version(tmp_path):
    crash = load_script("benchmarks/crash_saves.py")
    # rounds of 10 kills until 3 have landed inside a write (how many do depends on the
    # machine's speed; each round must survive every kill whatever it hits)
    mid_write = 0
    for seed in range(1, 9):
        result = crash.run(kills=10, layers=36, directory=tmp_path, seed=seed)
        assert result["survived"] == 10 and result["versions_written"] >= 10
        mid_write += result["killed_mid_write"]
        if mid_write >= 3:
            break
    assert mid_write >= 3  # the kills did land inside saves


# -- the session and its file -----------------------------------------------------------------
def test_session_saves_every_turn_and_resumes(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    session = ChatSession(model, tok, memory=MemoryFile.open(path), system=SYSTEM)
    list(session.reply("Hello! My name is Ada.", max_tokens=6))
    first = read_memory(path)
    list(session.reply("I live in Paris.", max_tokens=6))
    info, messages, states = session.info(), session.messages, states_of(session)
    assert info.last_saved is not None and info.memory_path == path
    session.close()
    saved = read_memory(path)
    assert saved.transcript == messages and saved.turns == 2 == info.turns
    assert saved.tokens_written == info.tokens_written
    assert read_memory(path.with_name(path.name + ".bak")).turns == first.turns == 1

    model.delta_mem.reset()
    again = ChatSession(model, tok, memory=MemoryFile.open(path))
    assert again.messages == messages and again.system == SYSTEM
    for i, s in states_of(again).items():
        np.testing.assert_array_equal(s, states[i])
    assert again.info().kv_tokens == 0
    written = again.info().tokens_written
    list(again.reply("What is my name?", max_tokens=6))
    # the restored conversation was re-read into the context, not written again
    new = again._ctx.n_written
    assert again.info().tokens_written - written == new
    assert new < len(again._ctx) and again._ctx.wrote[:len(again._ctx) - new] == \
        [False] * (len(again._ctx) - new)
    again.close()


def test_read_only_memory_is_never_written(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    owner = ChatSession(model, tok, memory=MemoryFile.open(path))
    list(owner.reply("Hello!", max_tokens=4))
    before = path.read_bytes()
    viewer = ChatSession(model, tok, memory=MemoryFile.open(path, read_only=True))
    assert viewer.read_only
    with pytest.raises(MemoryFileError, match="read-only"):
        viewer.read_only = False
    list(viewer.reply("Hi again.", max_tokens=4))
    viewer.forget()
    assert path.read_bytes() == before
    viewer.close()
    owner.close()


def test_incognito_turns_are_not_saved(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    session = ChatSession(model, tok, memory=MemoryFile.open(path))
    list(session.reply("Hello!", max_tokens=4))
    before = path.read_bytes()
    session.read_only = True
    list(session.reply("A secret.", max_tokens=4))
    assert path.read_bytes() == before
    session.read_only = False
    list(session.reply("Back.", max_tokens=4))
    saved = read_memory(path)
    assert [m["content"] for m in saved.transcript if m["role"] == "user"] == ["Hello!", "Back."]
    session.close()


def test_snapshots_export_and_import(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    session = ChatSession(model, tok, memory=MemoryFile.open(path), system=SYSTEM)
    list(session.reply("My name is Ada.", max_tokens=4))
    kept, messages = states_of(session), session.messages
    session.snapshot("after intro")
    assert session.snapshots() == ["after intro"]
    list(session.reply("I live in Paris.", max_tokens=4))
    session.restore("after intro")
    assert session.messages == messages and session.info().turns == 1
    for i, s in states_of(session).items():
        np.testing.assert_array_equal(s, kept[i])
    assert read_memory(path).turns == 1  # restoring saved
    with pytest.raises(MemoryFileError, match="no snapshot"):
        session.restore("missing")
    with pytest.raises(MemoryFileError, match="bad snapshot name"):
        session.snapshot("../escape")
    exported = session.export(tmp_path / "out" / "ada.safetensors")
    with pytest.raises(MemoryFileError, match="own memory file"):
        session.export(path)
    session.forget()
    assert session.info().turns == 0
    session.import_(exported)
    assert session.messages == messages
    for i, s in states_of(session).items():
        np.testing.assert_array_equal(s, kept[i])
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(encode(sample()))
    with pytest.raises(MemoryFileError, match="another model"):
        session.import_(foreign)
    assert session.messages == messages
    session.delete_snapshot("after intro")
    assert session.snapshots() == []
    session.close()


# -- write safety (issue 14) ------------------------------------------------------------------
def test_a_symlinked_memory_is_written_through_the_link(tmp_path):
    target = tmp_path / "real" / "memory.safetensors"
    target.parent.mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with MemoryFile.open(link, fingerprint=FP) as mem:
        mem.save(sample(1))
        mem.save(sample(2))
    assert link.is_symlink() and target.is_file()
    assert read_memory(link).tokens_written == read_memory(target).tokens_written


def test_a_read_only_file_is_refused_for_writing_and_opens_read_only(tmp_path):
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        mem.save(sample())
    path.chmod(0o444)
    before = path.read_bytes()
    with pytest.raises(MemoryNotWritableError) as info:
        MemoryFile.open(path, fingerprint=FP)
    # the situation, as fields; the way on is each front end's to say (no flag, no "open it")
    assert (info.value.path, info.value.reason) == (path, "the file is read-only (mode 444)")
    assert str(info.value) == f"{path}: the file is read-only (mode 444)"
    assert MemoryFile.open(path, fingerprint=FP, read_only=True).data is not None
    assert path.read_bytes() == before


def test_a_memory_whose_directory_cannot_be_written_is_refused_for_writing(tmp_path, mount):
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        mem.save(sample())
    mount.read_only = True
    with pytest.raises(MemoryNotWritableError) as info:
        MemoryFile.open(path, fingerprint=FP)
    assert info.value.reason == ("its directory is not writable (a read-only file system, or no "
                                 "permission)")
    deeper = tmp_path / "new" / "m.safetensors"
    with pytest.raises(MemoryNotWritableError, match="its directory cannot be created"):
        MemoryFile.open(deeper, fingerprint=FP)
    assert not deeper.parent.exists()
    assert MemoryFile.open(path, fingerprint=FP, read_only=True).data is not None


def test_a_full_disk_during_a_snapshot_is_a_memory_file_error(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "m.safetensors"
    mem = MemoryFile.open(path, fingerprint=FP)
    mem.save(sample())

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(MemoryFileError, match="No space left"):
        mem.save_snapshot("trip", sample())
    monkeypatch.undo()
    assert not mem.snapshot_dir.exists()  # no empty directory left behind
    assert read_memory(path).turns == sample().turns
    mem.close()


def test_a_full_disk_while_saving_keeps_the_previous_version(tmp_path, disk):
    path = tmp_path / "m.safetensors"
    mem = MemoryFile.open(path, fingerprint=FP)
    mem.save(sample(1))
    before = path.read_bytes()
    disk.full = True
    with pytest.raises(MemorySaveError, match="cannot save \\(No space left on device\\)") as info:
        mem.save(sample(2))
    assert info.value.reason == "No space left on device" and "\n" not in str(info.value)
    assert isinstance(info.value, MemoryFileError)  # callers that caught that still do
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.lock"]
    disk.full = False  # space freed: the next save goes through
    mem.save(sample(3))
    assert np.array_equal(read_memory(path).states[0], sample(3).states[0])
    mem.close()


def test_a_memory_made_read_only_while_open_is_a_save_error(tmp_path):
    path = tmp_path / "m.safetensors"
    mem = MemoryFile.open(path, fingerprint=FP)
    mem.save(sample(1))
    path.chmod(0o444)
    with pytest.raises(MemorySaveError, match="read-only") as info:
        mem.save(sample(2))
    assert info.value.reason == "the file is read-only (mode 444)"
    assert str(info.value) == f"{path}: the file is read-only (mode 444)"
    mem.close()


def test_temporaries_of_killed_snapshots_and_exports_are_removed(tmp_path):
    path = tmp_path / "m.safetensors"
    with MemoryFile.open(path, fingerprint=FP) as mem:
        mem.save_snapshot("a", sample())
        snapshots = mem.snapshot_dir
    dead = 2 ** 22 + 12345  # above any pid_max default: no such process
    stale = [path.with_name(f".m.safetensors.tmp-{dead}-00ff00ff"),
             snapshots / f".a.safetensors.tmp-{dead}-0badf00d"]
    export = tmp_path / "out" / "x.safetensors"
    export.parent.mkdir()
    stale.append(export.with_name(f".x.safetensors.tmp-{dead}-12345678"))
    for p in stale:
        p.write_bytes(b"half written")
    with MemoryFile.open(path, fingerprint=FP):  # the writer cleans its own and its snapshots'
        pass
    assert not stale[0].exists() and not stale[1].exists()
    from dmem_mlx.runtime.memory_file import atomic_write
    atomic_write(export, encode(sample()))  # an export cleans the dead ones next to it
    assert not stale[2].exists() and export.is_file()


def test_a_state_beyond_the_sane_bound_is_refused_on_save_as_on_open(tmp_path):
    path = tmp_path / "m.safetensors"
    data = sample()
    data.states[0] = np.full((1, 8, 8), 3e38, np.float32)
    with MemoryFile.open(path, fingerprint=FP) as mem:
        with pytest.raises(MemoryFileError, match="beyond"):
            mem.save(data)
    assert not path.exists()
