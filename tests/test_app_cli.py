"""dmem-chat's command line (checks made before the UI starts) and the δ-state pictures."""

from __future__ import annotations

import numpy as np
import pytest

from app.commands import COMMANDS, CommandError, parse_command
from app.heatmap import layer_norms, state_heatmap, value_color
from app.main import build_parser, main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dmem_mlx.tiny import make_tiny_dmem

    return make_tiny_dmem(tmp_path_factory.mktemp("tiny"))


def memory_with_one_turn(model_dir, path):
    """`path`, a memory of the model in `model_dir` holding one short turn (its lock released)."""
    import dmem_mlx
    from dmem_mlx.runtime import ChatSession, MemoryFile

    with ChatSession(*dmem_mlx.load(str(model_dir)), memory=MemoryFile.open(path)) as session:
        for _ in session.reply("I like tea.", max_tokens=3):
            pass
    return path


def one_line_error(captured) -> str:
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err.splitlines()) == 1, err
    return err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--memory", "--temp", "--top-p", "--max-tokens", "--seed", "--system",
                 "--max-kv-tokens", "--read-only"):
        assert flag in out


@pytest.mark.parametrize("argv", [["--temp", "hot"], ["--bogus"], ["--max-tokens", "1.5"]])
def test_bad_flags_give_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "dmem-chat: error:" in one_line_error(capsys.readouterr())


@pytest.mark.parametrize("argv, words", [
    (["--temp", "-1"], "--temp"), (["--top-p", "0"], "--top-p"),
    (["--max-tokens", "0"], "--max-tokens"), (["--max-kv-tokens", "8"], "--max-kv-tokens")])
def test_out_of_range_numbers_give_one_line(argv, words, tmp_path, capsys):
    assert main(argv + ["--model", str(tmp_path)]) == 1
    assert words in one_line_error(capsys.readouterr())


def test_missing_model_gives_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "no-such-model")]) == 1
    assert "no-such-model" in one_line_error(capsys.readouterr())


def test_directory_without_adapter_gives_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--model", str(tmp_path)]) == 1
    assert "adapter" in one_line_error(capsys.readouterr())


def test_without_demo_model_asks_for_model(capsys, monkeypatch):
    import dmem_mlx.demo

    monkeypatch.setattr(dmem_mlx.demo, "DEMO_DIR", dmem_mlx.demo.DEMO_DIR / "missing")
    assert main([]) == 1
    assert "--model" in one_line_error(capsys.readouterr())


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """The user data directory, in tmp."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


def test_memory_names_live_in_the_data_directory(tmp_path, data_home, monkeypatch):
    from dmem_mlx.demo import DEMO_MEMORY, DEMO_VERSION
    from dmem_mlx.runtime import default_memory_path

    from app.main import memory_directory, memory_location

    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()  # a directory of that name here changes nothing
    default = default_memory_path(DEMO_MEMORY)
    assert memory_location(None, DEMO_MEMORY) == default
    assert default.name == f"dmem-demo-v{DEMO_VERSION}.safetensors"  # one per demo version
    assert default.parent == memory_directory() == data_home / "dmem-mlx" / "memories"
    assert memory_location("work", "dmem-demo") == memory_directory() / "work.safetensors"
    assert memory_location("notes.txt", "dmem-demo") == memory_directory() / \
        "notes.txt.safetensors"
    assert memory_location("me.safetensors", "x") == memory_directory() / "me.safetensors"
    assert memory_location(str(tmp_path / "x.mem"), "dmem-demo") == tmp_path / "x.mem"
    assert memory_location("./work", "dmem-demo") == __import__("pathlib").Path("work")


class NoUI:
    """Stands in for the app's run(): records that the UI would have started."""

    started = 0
    app = None  # the last app that would have run

    def __call__(self, app):
        NoUI.started += 1
        NoUI.app = app


@pytest.fixture
def terminal(monkeypatch):
    """As if dmem-chat ran in a terminal (pytest captures its output)."""
    import app.main

    monkeypatch.setattr(app.main, "not_a_terminal", lambda: None)


@pytest.fixture
def no_ui(monkeypatch, terminal):
    from app.app import DmemChatApp

    NoUI.started = 0
    monkeypatch.setattr(DmemChatApp, "run", lambda self: NoUI()(self))
    return NoUI


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("dmem-chat 0.")


@pytest.mark.parametrize("where", ["text file", "missing directory", "directory", "bad name",
                                   "missing directory with a slash"])
def test_refused_memory_paths_create_nothing(where, tiny_model, tmp_path, data_home, capsys,
                                              monkeypatch, no_ui):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "folder").mkdir()
    memory = {"text file": "./notes.txt", "missing directory": "missing_dir/x.safetensors",
              "directory": "./folder", "bad name": "a*b",
              "missing directory with a slash": "./notes/"}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["--model", str(tiny_model), "--memory", memory]) == 1
    one_line_error(capsys.readouterr())
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no lock, no directory
    assert (tmp_path / "notes.txt").read_text() == "my notes\n" and no_ui.started == 0


def test_a_bare_name_is_created_in_the_data_directory(tiny_model, tmp_path, data_home,
                                                      monkeypatch, no_ui):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    assert main(["--model", str(tiny_model), "--memory", "work"]) == 0
    assert no_ui.started == 1
    assert list((tmp_path / "work").iterdir()) == []
    assert (data_home / "dmem-mlx" / "memories" / "work.safetensors.lock").exists()


def test_memory_of_another_model_is_refused_before_the_ui(tiny_model, tmp_path, capsys,
                                                         no_ui):
    from dmem_mlx.tiny import make_tiny_dmem

    path = memory_with_one_turn(tiny_model, tmp_path / "chat.safetensors")
    other = make_tiny_dmem(tmp_path / "other", seed=7)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--model", str(other), "--memory", str(path)]) == 1
    error = one_line_error(capsys.readouterr())
    assert "another model" in error and "--memory NAME" in error  # the way on is said
    assert no_ui.started == 0 and sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(["--model", str(tiny_model), "--memory", str(path)]) == 0  # its own model
    assert no_ui.started == 1


def test_a_memory_on_a_read_only_file_system_is_refused_and_opens_read_only(
        tiny_model, tmp_path, capsys, mount, no_ui):
    path = memory_with_one_turn(tiny_model, tmp_path / "chat.safetensors")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    mount.read_only = True
    assert main(["--model", str(tiny_model), "--memory", str(path)]) == 1
    assert one_line_error(capsys.readouterr()) == (
        f"dmem-chat: error: {path}: its directory is not writable (a read-only file system, or "
        "no permission); open it with --read-only to use it without saving")
    new = tmp_path / "new.safetensors"
    assert main(["--model", str(tiny_model), "--memory", str(new)]) == 1
    assert one_line_error(capsys.readouterr()) == (
        f"dmem-chat: error: {new}: its directory is not writable (a read-only file system, or "
        "no permission); chat without saving with --read-only, or give --memory a path in a "
        "directory you can write")
    assert no_ui.started == 0
    assert main(["--model", str(tiny_model), "--memory", str(path), "--read-only"]) == 0
    assert no_ui.started == 1 and no_ui.app.memory.data.turns == 1
    no_ui.app.memory.close()
    mount.read_only = False
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_data_directory_on_a_read_only_file_system_names_the_way_on(data_home, capsys, mount,
                                                                      no_ui):
    """The demo's default memory, its directory not yet made and the data directory read-only:
    refused with the way on (--read-only chats without saving), nothing created."""
    from dmem_mlx.demo import DEMO_VERSION

    mount.read_only = True
    memory = data_home / "dmem-mlx" / "memories" / f"dmem-demo-v{DEMO_VERSION}.safetensors"
    assert main([]) == 1
    assert one_line_error(capsys.readouterr()) == (
        f"dmem-chat: error: {memory}: its directory cannot be created (a read-only file system, "
        "or no permission); chat without saving with --read-only, or give --memory a path in a "
        "directory you can write")
    assert main(["--read-only"]) == 0 and no_ui.started == 1
    assert no_ui.app.memory.read_only and no_ui.app.memory.data is None
    assert not data_home.exists()


def test_a_read_only_memory_file_names_the_flag_that_opens_it(tiny_model, tmp_path, capsys,
                                                              terminal):
    path = memory_with_one_turn(tiny_model, tmp_path / "chat.safetensors")
    path.chmod(0o444)
    assert main(["--model", str(tiny_model), "--memory", str(path)]) == 1
    assert one_line_error(capsys.readouterr()) == (
        f"dmem-chat: error: {path}: the file is read-only (mode 444); open it with --read-only "
        "to use it without saving")


def test_a_memory_open_elsewhere_names_the_flag_that_opens_it(tiny_model, tmp_path, capsys,
                                                              no_ui):
    from dmem_mlx.runtime import MemoryFile

    path = memory_with_one_turn(tiny_model, tmp_path / "chat.safetensors")
    with MemoryFile.open(path):  # as another dmem-chat would hold it
        assert main(["--model", str(tiny_model), "--memory", str(path)]) == 1
        assert one_line_error(capsys.readouterr()) == (
            f"dmem-chat: error: {path}: this memory is already open in this process: close the "
            "dmem-chat (or program) using it, or chat without saving: --read-only")
        assert main(["--model", str(tiny_model), "--memory", str(path), "--read-only"]) == 0
    assert no_ui.started == 1


def test_the_demo_starts_on_its_versions_own_memory(data_home, no_ui):
    from dmem_mlx.demo import DEMO_VERSION

    assert main([]) == 0 and no_ui.started == 1
    app = no_ui.app
    app.memory.close()
    memories = data_home / "dmem-mlx" / "memories"
    assert app.memory.path == memories / f"dmem-demo-v{DEMO_VERSION}.safetensors"
    assert app.memory_note is None and app.model_name == "dmem-demo"


def test_after_a_demo_upgrade_the_demo_starts_on_a_new_memory_and_names_the_kept_one(
        data_home, no_ui):
    """The memory of an earlier demo model (the unversioned name of those before v4's tag) is
    not refused at start: a new memory, and a line that says where the earlier one is kept."""
    from demo_memories import write_memory
    from dmem_mlx.demo import DEMO_DIR, DEMO_VERSION

    memories = data_home / "dmem-mlx" / "memories"
    earlier = memories / "dmem-demo.safetensors"
    kept = write_memory(earlier, DEMO_DIR, adapter_sha256="e" * 64)
    assert main([]) == 0 and no_ui.started == 1
    app = no_ui.app
    app.memory.close()
    assert app.memory.path == memories / f"dmem-demo-v{DEMO_VERSION}.safetensors"
    assert app.memory.data is None  # new
    assert f"untouched at {earlier}" in app.memory_note and "cannot read" in app.memory_note
    assert earlier.read_bytes() == kept
    assert sorted(p.name for p in memories.iterdir()) == ["dmem-demo.safetensors"]


def test_an_earlier_demo_memory_named_explicitly_is_still_refused(data_home, capsys, no_ui):
    from demo_memories import write_memory
    from dmem_mlx.demo import DEMO_DIR

    earlier = data_home / "dmem-mlx" / "memories" / "dmem-demo.safetensors"
    kept = write_memory(earlier, DEMO_DIR, adapter_sha256="e" * 64)
    for memory in ("dmem-demo", str(earlier)):
        assert main(["--memory", memory]) == 1
        error = one_line_error(capsys.readouterr())
        assert "another model" in error and "left as it is" in error
    assert no_ui.started == 0 and earlier.read_bytes() == kept
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["dmem-demo.safetensors"]


def test_fingerprint_from_files_matches_the_loaded_model(tiny_model, tmp_path):
    import dmem_mlx
    from dmem_mlx.demo import demo_model_path
    from dmem_mlx.runtime import fingerprint_from_files, model_fingerprint
    from dmem_mlx.tiny import make_tiny_dmem

    mm = make_tiny_dmem(tmp_path / "mm", seed=3, delta_config={
        "delta_heads": ["q", "o"], "memory_write_granularity": "message_mean",
        "target_layers": [1, 2]})
    for directory in (tiny_model, demo_model_path(), mm):
        model, tokenizer = dmem_mlx.load(str(directory))
        assert fingerprint_from_files(directory) == model_fingerprint(model, tokenizer)
    assert fingerprint_from_files(tmp_path) is None  # not a model: the session checks later


def test_a_start_up_failure_in_the_app_exits_1(tiny_model, tmp_path, capsys, monkeypatch,
                                                terminal):
    from app.app import DmemChatApp

    def failed_run(self):
        self.start_error = "the model could not be loaded"
    monkeypatch.setattr(DmemChatApp, "run", failed_run)
    assert main(["--model", str(tiny_model), "--memory", str(tmp_path / "m.safetensors")]) == 1
    assert "could not be loaded" in one_line_error(capsys.readouterr())


def run_cli(*argv, env=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = ("import sys, runpy; sys.argv = ['dmem-chat', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('app.main', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    heavy = sorted(m for m in ('mlx_lm', 'mlx.core', 'textual', 'transformers',"
             " 'numpy')"
             " if m in sys.modules)\n"
             "    print('HEAVY', heavy, file=sys.stderr); raise\n")
    env = {**os.environ, "PYTHONPATH": str(root), "DMEM_NO_OPENBLAS": "1", **(env or {})}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["--version"],
                                  ["--memory", "/no/such/dir/x.safetensors"],
                                  ["--model", "/no/such/model"]])
def test_help_and_refusals_import_nothing_heavy(argv):
    result = run_cli(*argv)
    assert "HEAVY []" in result.stderr, result.stderr
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr


@pytest.mark.parametrize("memory", ["README.md", "/etc/passwd"])
def test_a_file_that_is_not_a_memory_is_refused_importing_nothing_heavy(memory, tiny_model):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / memory  # (an absolute memory stays itself)
    result = run_cli("--model", str(tiny_model), "--memory", str(path))
    assert "HEAVY []" in result.stderr, result.stderr
    assert result.returncode == 1 and "not a memory file" in result.stderr
    assert not path.with_name(path.name + ".lock").exists()


def test_the_blas_module_is_light():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys, dmem_mlx.blas; print('mlx_lm' in sys.modules, 'mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": ""}, timeout=120).stdout
    assert out.split() == ["False", "False"]


def test_locked_memory_is_refused_before_the_ui(tiny_model, tmp_path, capsys, terminal):
    from dmem_mlx.runtime import MemoryFile

    path = tmp_path / "shared.memory"
    holder = MemoryFile.open(path)
    try:
        before = path.read_bytes() if path.is_file() else None
        assert main(["--model", str(tiny_model), "--memory", str(path)]) == 1
        assert str(path.name) in one_line_error(capsys.readouterr())
        assert (path.read_bytes() if path.is_file() else None) == before
    finally:
        holder.close()


def test_parser_defaults_are_sampling_names():
    args = build_parser().parse_args([])
    assert (args.temp, args.top_p, args.seed, args.read_only) == (0.0, 1.0, None, False)


def test_slash_commands_parse():
    command, argument = parse_command("/snapshot before the trip")
    assert (command.name, argument) == ("snapshot", "before the trip")
    assert parse_command("/NEW")[0].name == "new"
    for bad in ("/nope", "/restore", "/forget everything"):
        with pytest.raises(CommandError):
            parse_command(bad)
    names = {c.name for c in COMMANDS}
    assert {"new", "forget", "readonly", "snapshot", "restore", "export", "info", "help",
            "quit"} <= names


def test_value_color_is_diverging():
    positive, negative, zero = value_color(1.0, 1.0), value_color(-1.0, 1.0), value_color(0, 1.0)
    assert positive.triplet.red > positive.triplet.blue
    assert negative.triplet.blue > negative.triplet.red
    assert zero.triplet != positive.triplet and zero.triplet != negative.triplet


def test_state_heatmap_draws_every_layer_and_head():
    states = {i: np.random.default_rng(i).normal(size=(2, 8, 8)) for i in range(5)}
    text = state_heatmap(states, width=40).plain
    for i in range(5):
        assert f"L{i}" in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 40
    cells = sum(line.count("▀") for line in lines)
    assert cells == 5 * 2 * 8 * 4  # layers × heads × columns × (rows / 2)
    # eight heads (the demo) do not fit one line of a 36-cell panel: they wrap, nothing is lost
    wide = {i: np.random.default_rng(i).normal(size=(8, 8, 8)) for i in range(4)}
    lines = state_heatmap(wide, width=36).plain.splitlines()
    assert max(len(line) for line in lines) <= 36
    assert sum(line.count("▀") for line in lines) == 4 * 8 * 8 * 4
    bars, top = layer_norms(states)
    assert len(bars.plain) == 5
    assert top == pytest.approx(max(np.linalg.norm(s) for s in states.values()), rel=1e-5)


def test_flush_pacer_keeps_the_ui_share_near_its_target(monkeypatch):
    import app.app as app_module

    clock = {"cpu": 0.0, "wall": 0.0}
    monkeypatch.setattr(app_module.time, "thread_time", lambda: clock["cpu"])
    monkeypatch.setattr(app_module.time, "perf_counter", lambda: clock["wall"])
    pacer = app_module.FlushPacer(shortest=0.05, longest=1.0, target=0.05)
    for _ in range(5):  # each update costs 20 ms of UI CPU: 0.02 / 0.05 = 0.4 s between updates
        interval = pacer.next_interval()
        clock["wall"] += interval
        clock["cpu"] += 0.02
    assert pacer.next_interval() == pytest.approx(0.4)
    for _ in range(3):  # cheap updates: back to the shortest interval
        clock["wall"] += pacer.interval
        clock["cpu"] += 0.0001
        pacer.next_interval()
    assert pacer.interval == pytest.approx(0.05)
    clock["wall"] += 0.05
    clock["cpu"] += 0.05  # the UI thread was busy all the time: capped at the longest interval
    assert pacer.next_interval() == 1.0


def test_enter_typed_while_dmem_chat_starts_stays_enter(monkeypatch):
    """Typed before the app takes the terminal, "hi⏎" reaches it as typed (a terminal in its
    normal mode would deliver "hi\\n": Ctrl+J, a new line in the input, not a send); the
    terminal's settings are put back afterwards."""
    import os
    import pty
    import sys
    import termios

    from app.main import keep_typed_keys

    master, slave = pty.openpty()
    try:
        monkeypatch.setattr(sys, "stdin", open(slave, closefd=False))
        before = termios.tcgetattr(slave)
        restore = keep_typed_keys()
        os.write(master, b"hi\r")
        got = b""
        while len(got) < 3:
            got += os.read(slave, 16)
        assert got == b"hi\r"
        restore()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("redirect", ["stdout to a file", "stdout piped", "stdin not a terminal"])
def test_refused_in_one_line_when_not_in_a_terminal(redirect, tiny_model, tmp_path):
    """`dmem-chat > out.txt`, `dmem-chat | less`, `echo hi | dmem-chat`: one line, exit 1, before
    the memory is created or locked; nothing is drawn anywhere."""
    import os
    import pty
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    memory = tmp_path / "m.safetensors"
    master, slave = pty.openpty()
    out = tmp_path / "out.txt"
    try:
        with open(out, "wb") as out_file:
            stdin, stdout = {"stdout to a file": (slave, out_file),
                             "stdout piped": (slave, subprocess.PIPE),
                             "stdin not a terminal": (subprocess.DEVNULL, slave)}[redirect]
            result = subprocess.run(
                [sys.executable, "-m", "app.main", "--model", str(tiny_model), "--memory",
                 str(memory)], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(root), "DMEM_NO_OPENBLAS": "1"},
                timeout=60)  # (an app that started would wait for keys until then)
    finally:
        os.close(master)
        os.close(slave)
    stream = "input" if redirect == "stdin not a terminal" else "output"
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"dmem-chat: error: standard {stream} is not a terminal"), err
    assert not (result.stdout or out.read_bytes())
    assert list(tmp_path.iterdir()) == [out]  # no memory, no lock file


class Terminal:
    """dmem-chat running in a pseudo-terminal of 120×40; what it draws is collected."""

    def __init__(self, *argv: str):
        import fcntl
        import os
        import pty
        import struct
        import subprocess
        import sys
        import termios
        import threading
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.settings = termios.tcgetattr(self.slave)
        self.output = b""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.main", *argv], stdin=self.slave, stdout=self.slave,
            stderr=self.slave, env={**os.environ, "PYTHONPATH": str(root),
                                    "DMEM_NO_OPENBLAS": "1", "TERM": "xterm-256color"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        import os

        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.output += data

    def wait_for(self, text: bytes, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.process.poll() is None, self.output[-2000:]
            assert time.monotonic() < deadline, f"{text!r} not shown: {self.output[-2000:]!r}"
            time.sleep(0.05)

    def type(self, keys: bytes) -> None:
        import os

        os.write(self.master, keys)

    def close(self) -> None:
        import os

        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def test_sigterm_quits_cleanly_restoring_the_terminal(tiny_model, tmp_path):
    """`kill PID` on a dmem-chat whose new memory was not written yet: exit 143, the lock file
    it created is gone, the terminal's settings and main screen are back."""
    import signal
    import termios

    memory = tmp_path / "m.safetensors"
    terminal = Terminal("--model", str(tiny_model), "--memory", str(memory))
    try:
        terminal.wait_for(b"new memory")
        assert memory.with_name(memory.name + ".lock").exists()  # held while it runs
        terminal.process.send_signal(signal.SIGTERM)
        assert terminal.process.wait(timeout=60) == 128 + signal.SIGTERM
        assert termios.tcgetattr(terminal.slave) == terminal.settings
        assert b"\x1b[?1049l" in terminal.output  # the alternate screen was left
        assert list(tmp_path.iterdir()) == []  # nothing was written: no memory, no lock file
    finally:
        terminal.close()


def test_sighup_after_drawing_into_a_closed_terminal_ends_the_process(tiny_model, tmp_path):
    """The window closed some time before SIGHUP comes: the UI's writes to the dead terminal
    (the reply, the blinking cursor) failed, then blocked its thread. SIGHUP still saves and
    releases the memory, and the process ends (exit 128 + 1) instead of hanging."""
    import os
    import signal
    import time

    from dmem_mlx.runtime import MemoryFile, read_memory

    memory = tmp_path / "m.safetensors"
    terminal = Terminal("--model", str(tiny_model), "--memory", str(memory), "--max-tokens",
                        "100000", "--temp", "1", "--seed", "3")
    try:
        terminal.wait_for(b"new memory")
        terminal.type(b"tell me everything\r")
        terminal.wait_for(b"assistant")
        os.close(terminal.master)
        time.sleep(20)  # the app draws on into the closed terminal (the cursor blinks)
        terminal.process.send_signal(signal.SIGHUP)
        assert terminal.process.wait(timeout=60) == 128 + signal.SIGHUP
    finally:
        terminal.close()
    saved = read_memory(memory)
    assert [m["content"] for m in saved.transcript][:1] == ["tell me everything"]
    MemoryFile.open(memory).close()  # unlocked


def test_sighup_after_the_terminal_closed_keeps_the_memory(tiny_model, tmp_path):
    """The terminal window closes (its pty master goes, SIGHUP comes) after a turn: the memory
    holds the turn, is readable and unlocked, and dmem-chat exits 128 + 1."""
    import os
    import signal

    from dmem_mlx.runtime import MemoryFile, read_memory

    memory = tmp_path / "m.safetensors"
    terminal = Terminal("--model", str(tiny_model), "--memory", str(memory), "--max-tokens", "8")
    try:
        terminal.wait_for(b"new memory")
        terminal.type(b"i like tea\r")
        terminal.wait_for(b"tok/s")
        os.close(terminal.master)
        terminal.process.send_signal(signal.SIGHUP)
        assert terminal.process.wait(timeout=60) == 128 + signal.SIGHUP
    finally:
        terminal.close()
    saved = read_memory(memory)
    assert [m["content"] for m in saved.transcript][:1] == ["i like tea"]
    MemoryFile.open(memory).close()  # unlocked


def test_a_signal_before_the_app_runs_is_kept_for_it(tiny_model, tmp_path):
    """SIGTERM between opening the memory and the app's start is kept, not fatal; the app then
    quits at once, closing the memory (its unwritten lock file goes)."""
    import asyncio
    import os
    import signal

    from app.app import DmemChatApp
    from app.main import open_memory, signals_kept

    before = signal.getsignal(signal.SIGTERM)
    memory_path = tmp_path / "m.safetensors"
    with signals_kept() as received:
        memory = open_memory(memory_path)
        os.kill(os.getpid(), signal.SIGTERM)
        app = DmemChatApp(tiny_model, memory, signals_received=received)

        async def run() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                while app.is_running:
                    await pilot.pause(0.05)
        asyncio.run(run())
    assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == before
    assert app.return_code == 128 + signal.SIGTERM and memory.closed
    assert list(tmp_path.iterdir()) == []
