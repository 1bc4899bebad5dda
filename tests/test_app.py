"""dmem-chat driven by Textual's pilot on a tiny random model and a memory file in tmp."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import pytest

from app.app import DmemChatApp, Sampling
from app.screens import ConfirmScreen, HelpScreen, HistoryScreen
from app.widgets import AssistantMessage, ChatInput, MemoryPanel, Note, UserMessage

pytestmark = pytest.mark.asyncio
SIZE = (120, 40)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dmem_mlx.tiny import make_tiny_dmem

    return make_tiny_dmem(tmp_path_factory.mktemp("tiny"))


def make_app(model, memory, **kwargs) -> DmemChatApp:
    kwargs.setdefault("sampling", Sampling(max_tokens=12, temp=0.0))
    return DmemChatApp(model, memory, **kwargs)


async def wait_until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.02)


async def wait_loaded(pilot) -> None:
    app = pilot.app
    await wait_until(pilot, lambda: app.ready)


def idle(app) -> bool:
    return not app.replying and not any(w.is_running for w in app.workers
                                        if w.group in ("command", "reply"))


def progress(app) -> tuple[int, int, int]:
    return app.replies_finished, app.commands_finished, len(app.notices)


async def send(pilot, text: str) -> None:
    """Type `text` and press Enter; waits until the reply or the command is done, or the app
    said why it could not run it."""
    app = pilot.app
    app.query_one(ChatInput).focus()
    app.query_one(ChatInput).text = text
    before = progress(app)
    await pilot.press("enter")
    await wait_until(pilot, lambda: not app.is_running or progress(app) != before)
    await wait_until(pilot, lambda: not app.is_running or idle(app))
    await pilot.pause()


def notes(app) -> str:
    return "\n".join(str(note.render()) for note in app.query(Note))


def notices(app, severity=None) -> list:
    return [n for n in app.notices if severity is None or n.severity == severity]


def counts(app) -> str:
    return str(app.query_one("#memory-counts").render())


def last_save(app) -> str:
    """The panel's line on the memory file's last save."""
    return str(app.query_one("#memory-file").render()).splitlines()[-1]


@contextmanager
def written_fragments():
    """The fragments streamed into reply boxes while in the block (AssistantMessage.write
    spied on)."""
    fragments: list[str] = []
    original = AssistantMessage.write

    async def spy(self, fragment):
        fragments.append(fragment)
        await original(self, fragment)

    AssistantMessage.write = spy
    try:
        yield fragments
    finally:
        AssistantMessage.write = original


async def open_dialog(pilot, command: str) -> ConfirmScreen:
    app = pilot.app
    app.query_one(ChatInput).text = command
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
    return app.screen


async def confirm(pilot) -> None:
    """The deliberate way: wait until the dialog is armed, Tab to its button, Enter."""
    app = pilot.app
    await wait_until(pilot, lambda: not app.screen.query_one("#confirm-yes").disabled)
    await pilot.press("tab")
    assert app.focused.id == "confirm-yes"
    await pilot.press("enter")


async def test_panel_counts_one_turn_in_memory_only_in_the_singular(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "chat.memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "My name is Ada.")
        await pilot.press("ctrl+n")
        await pilot.pause()
        await app.refresh_info()
        assert app.last_info.turns_in_memory_only == 1
        assert "only in memory  1 turn\n" in counts(app)


async def test_reply_streams_saves_and_updates_panel(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert app.last_info.tokens_written == 0
        assert "tokens written  0" in counts(app)
        with written_fragments() as chunks_seen:
            await send(pilot, "My name is Ada and I live in Paris.")
        [user] = app.query(UserMessage)
        [reply] = app.query(AssistantMessage)
        assert "Ada" in user.text
        stats = app.last_reply
        assert stats is not None and stats.tokens > 0
        assert reply.text == stats.text and "".join(chunks_seen) == stats.text
        assert "tok/s" in str(reply.border_subtitle)
        info = app.last_info
        assert info.tokens_written > 0 and info.turns == 1
        assert info.last_saved is not None
        assert f"tokens written  {info.tokens_written:,}" in counts(app)
        assert "turns           1" in counts(app)
        assert "only in memory  0 turns" in counts(app)
        heatmap = str(app.query_one("#state-heatmap").render())
        assert "L0" in heatmap and "scale ±0\n" not in heatmap + "\n"
        assert memory.exists()
        assert "saved" in str(app.query_one("#memory-file").render())


async def test_new_memory_greeting_names_what_the_demo_remembers(tiny_model, tmp_path):
    for name, expected in (("dmem-demo", "your pet and its name"),
                           (None, "Tell me about yourself")):
        app = make_app(tiny_model, tmp_path / f"{name}.memory", model_name=name)
        async with app.run_test(size=SIZE) as pilot:
            await wait_loaded(pilot)
            assert "new memory" in notes(app) and expected in notes(app)


async def test_after_a_demo_upgrade_a_new_memory_says_once_where_the_earlier_one_is(
        tiny_model, tmp_path):
    """The model (here the tiny one in the demo's place) cannot read the memory an earlier
    build wrote: dmem-chat starts on its version's own memory, says where the earlier one is
    kept, and leaves that file byte for byte as it was — also after a session and a restart."""
    from demo_memories import write_memory

    from app.main import demo_default_memory

    default = tmp_path / "dmem-demo-v4.safetensors"
    assert demo_default_memory(default, tiny_model) == (default, None)  # nothing earlier
    app = make_app(tiny_model, default, model_name="dmem-demo")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert "new memory" in notes(app) and "cannot read" not in notes(app)
        await pilot.press("ctrl+q")
    earlier = tmp_path / "dmem-demo.safetensors"
    kept = write_memory(earlier, tiny_model, adapter_sha256="e" * 64)
    path, note = demo_default_memory(default, tiny_model)
    assert path == default and note is not None
    app = make_app(tiny_model, path, model_name="dmem-demo", memory_note=note)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        shown = notes(app)
        assert "The demo model is new" in shown and f"untouched at {earlier}" in shown
        assert shown.index("cannot read") < shown.index("new memory")  # then the greeting
        assert "your pet and its name" in shown
        await send(pilot, "My name is Ada.")
        assert app.last_info.turns == 1
        await pilot.press("ctrl+q")
    assert earlier.read_bytes() == kept and default.exists()
    path, note = demo_default_memory(default, tiny_model)  # the next start: said once
    assert (path, note) == (default, None)
    app = make_app(tiny_model, path, model_name="dmem-demo", memory_note=note)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert "memory loaded" in notes(app) and "cannot read" not in notes(app)
        await pilot.press("ctrl+q")
    assert earlier.read_bytes() == kept


async def test_memory_survives_a_restart(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "Remember: my cat is called Milo.")
        written = app.last_info.tokens_written
        await pilot.press("ctrl+q")
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert app.last_info.tokens_written == written
        assert "memory loaded" in notes(app)
        assert any("Milo" in m.text for m in app.query(UserMessage))
        assert f"tokens written  {written:,}" in counts(app)
        # the conversation is read back into the context (not written again), and goes on
        await wait_until(pilot, lambda: app.last_info.kv_tokens > 0, 20)
        info = app.last_info
        assert info.tokens_written == written
        assert str(app.query_one("#context-text").render()).startswith(f"{info.kv_tokens:,} / ")
        await send(pilot, "I live in Paris.")
        assert app.last_info.tokens_written > written


async def test_a_start_up_failure_is_shown_and_exits_1(tiny_model, tmp_path):
    from dmem_mlx.runtime import MemoryFile

    memory = tmp_path / "chat.memory"
    holder = MemoryFile.open(memory)
    try:
        app = make_app(tiny_model, memory)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.start_error is not None)
            await pilot.pause()
            errors = notices(app, "error")
            assert errors and errors[0].title == "Could not start"
            assert app.session is None
            await pilot.press("ctrl+q")
        assert app.return_code == 1
    finally:
        holder.close()


async def test_commands(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory, blas="OpenBLAS (preloaded)")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert "BLAS: OpenBLAS (preloaded)" in str(app.query_one("#fingerprint").render())
        await send(pilot, "I like tea.")
        written = app.last_info.tokens_written

        await send(pilot, "/snapshot tea")
        assert "tea" in app.snapshot_names

        await send(pilot, "/new")  # conversation cleared, memory kept
        assert not app.query(UserMessage) and "memory is kept" in notes(app)
        assert app.last_info.tokens_written == written

        await send(pilot, "/readonly")
        assert app.last_info.read_only and "read-only" in counts(app)
        await send(pilot, "Secret: nothing to write.")
        assert app.last_info.tokens_written == written
        await send(pilot, "/readonly")
        assert not app.last_info.read_only

        await open_dialog(pilot, "/forget")  # asks; Escape keeps everything
        await pilot.press("escape")
        await send(pilot, "/info")
        assert app.last_info.tokens_written == written

        assert memory.with_name(memory.name + ".bak").exists()
        await open_dialog(pilot, "/forget")
        await confirm(pilot)
        await wait_until(pilot, lambda: app.last_info.tokens_written == 0)
        assert "tokens written  0" in counts(app)
        assert not memory.with_name(memory.name + ".bak").exists()  # nothing of it is left
        assert b"I like tea" not in memory.read_bytes()

        await open_dialog(pilot, "/restore tea")
        await wait_until(pilot, lambda: not app.screen.query_one("#confirm-yes").disabled)
        await pilot.click("#confirm-yes")
        await wait_until(pilot, lambda: app.last_info.tokens_written == written)

        export = tmp_path / "exported.memory"
        await send(pilot, f"/export-memory {export}")
        assert export.exists()
        await send(pilot, "/export-memory /proc/no-such-dir/x.memory")  # shown in the app
        assert any(n.title == "/export-memory failed" for n in notices(app))
        await send(pilot, "/restore nothing-by-that-name")
        assert any(n.title == "/restore failed" and "tea" in n.message for n in notices(app))

        await send(pilot, "/info")
        assert memory.name in notes(app) and "system prompt: none" in notes(app)

        await send(pilot, "/nonsense")
        assert any("unknown command" in n.message for n in notices(app))
        app.query_one(ChatInput).clear()
        await send(pilot, "/inof")  # a typo: the command meant, and the text back to fix it
        assert "did you mean /info?" in notices(app)[-1].message
        assert app.query_one(ChatInput).text == "/inof"
        app.query_one(ChatInput).clear()

        panel = app.query_one(MemoryPanel)
        await pilot.press("ctrl+b")
        assert not panel.display
        await send(pilot, "/panel")
        assert panel.display

        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")

        await send(pilot, "/quit")
        await pilot.pause()
    assert app.return_code == 0


async def test_import_refuses_a_bad_file_before_asking(tiny_model, tmp_path):
    """/import of a damaged file or a non-memory says why at once: no dialog offering to
    replace the current memory with it first (found in the s6 tmux walk-through)."""
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        export = tmp_path / "exported.memory"
        await send(pilot, f"/export-memory {export}")
        damaged = tmp_path / "damaged.memory"
        data = bytearray(export.read_bytes())
        data[-40:-36] = b"XXXX"
        damaged.write_bytes(bytes(data))
        notes_file = tmp_path / "notes.txt"
        notes_file.write_text("not a memory\n" * 10)
        before = memory.read_bytes()
        for path in (damaged, notes_file):
            app.query_one(ChatInput).text = f"/import {path}"
            failures = len(notices(app, "error"))
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen)
                             or len(notices(app, "error")) > failures)
            assert not isinstance(app.screen, ConfirmScreen)
            assert notices(app, "error")[-1].title == "/import failed"
            assert str(path) in notices(app, "error")[-1].message
        assert memory.read_bytes() == before
        await open_dialog(pilot, f"/import {export}")  # a good file still asks first
        await pilot.press("escape")


async def test_palette_runs_commands(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "chat.memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await pilot.press("ctrl+p")
        await pilot.press(*"new conversation")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: "memory is kept" in notes(app))
        await pilot.press("ctrl+p")
        await pilot.press(*"snapshot memory")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.query_one(ChatInput).text == "/snapshot ")
        assert app.focused is app.query_one(ChatInput)


def wrapped_session(model_dir, memory, ban_eos=False, before_reply=None, block=None, **kwargs):
    """open_session for the app: a ChatSession (optionally: replies never sample end-of-sequence,
    `before_reply(session)` runs before each reply, loading waits for the event `block`)."""
    import mlx.core as mx

    import dmem_mlx
    from dmem_mlx.runtime import ChatSession, MemoryFile

    def open_session():
        if block is not None:
            block.wait(30)
        model, tokenizer = dmem_mlx.load(str(model_dir))
        session = ChatSession(model, tokenizer, memory=MemoryFile.open(memory), **kwargs)
        banned = mx.array(sorted(tokenizer.eos_token_ids))
        reply = session.reply

        def no_eos(tokens, logits):
            logits[..., banned] = -1e9
            return logits

        def wrapped(*a, **k):
            if before_reply is not None:
                before_reply(session, k)
            return reply(*a, logits_processors=[no_eos] if ban_eos else [], **k)

        session.reply = wrapped
        return session
    return open_session


async def stream_then(pilot, key: str) -> None:
    """Send the input's text, wait until the reply streams, press `key`."""
    app = pilot.app
    with written_fragments() as writes:
        await pilot.press("enter")
        await wait_until(pilot, lambda: len([w for w in writes if w]) >= 2)  # streaming
        assert app.replying
        await pilot.press(key)
    await wait_until(pilot, lambda: not app.replying)


async def test_enter_while_a_reply_streams_keeps_the_message_in_the_input(tiny_model, tmp_path):
    """Typed ahead during a reply, a message is neither sent nor lost: it stays in the input,
    a notice says so, and Enter sends it once the reply has ended."""
    opened = wrapped_session(tiny_model, tmp_path / "m", ban_eos=True)

    def open_session():  # replies stream slowly, so that the reply is still going
        session = opened()
        reply = session.reply

        def slow(*a, **k):
            for chunk in reply(*a, **k):
                time.sleep(0.05)
                yield chunk
        session.reply = slow
        return session

    app = make_app(tiny_model, None, sampling=Sampling(max_tokens=200),
                   open_session=open_session)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await pilot.press(*"hi")
        with written_fragments() as writes:
            await pilot.press("enter")
            await wait_until(pilot, lambda: len([w for w in writes if w]) >= 2)
            await pilot.press(*"and you", "enter")
            await pilot.pause()
            assert app.replying and app.query_one(ChatInput).text == "and you"
            assert any("stays in the input" in n.message for n in notices(app, "warning"))
            await pilot.press("escape")
        await wait_until(pilot, lambda: idle(app))
        assert app.query_one(ChatInput).text == "and you"
        assert [m.text for m in app.query(UserMessage)] == ["hi"]
        app.sampling = Sampling(max_tokens=3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_finished == 2 and idle(app))
        assert [m.text for m in app.query(UserMessage)] == ["hi", "and you"]


@pytest.mark.parametrize("key", ["escape", "ctrl+c"])
async def test_escape_and_ctrl_c_stop_a_reply(tiny_model, tmp_path, key):
    app = make_app(tiny_model, None, sampling=Sampling(max_tokens=5000),
                   open_session=wrapped_session(tiny_model, tmp_path / "m", ban_eos=True))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        app.query_one(ChatInput).focus()
        await pilot.press(*"hi")
        await stream_then(pilot, key)
        stats = app.last_reply
        assert stats.stopped and 0 < stats.tokens < 5000
        assert "stopped" in str(app.query_one(AssistantMessage).border_subtitle)
        assert app.session.messages[-1]["content"] == stats.text  # transcript consistent
        assert app.query_one(AssistantMessage).text == stats.text  # and the screen
        assert app.is_running  # Ctrl+C stopped the reply, not the app


async def test_newline_keys(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        chat_input = app.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c", "backslash", "enter", "d")
        assert chat_input.text == "a\nb\nc\nd"
        assert not app.query(UserMessage)  # nothing was sent
        await pilot.press("enter")
        await wait_until(pilot, lambda: idle(app) and app.query(UserMessage))
        assert app.query_one(UserMessage).text == "a\nb\nc\nd"


async def test_the_users_text_is_shown_literally(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m")
    text = "line one\nline two\n# not a heading\n2*3*4 [b]x[/b] _y_"
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, text)
        shown = str(app.query_one(UserMessage).render())
        assert shown.splitlines() == text.splitlines()


async def test_a_failed_turn_is_reported_and_the_message_given_back(tiny_model, tmp_path):
    # the system prompt alone is longer than the context budget: the runtime refuses the turn
    app = make_app(tiny_model, None, open_session=wrapped_session(
        tiny_model, tmp_path / "m", system="Be brief and kind. " * 20, max_kv_tokens=16))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "Hello there, my name is Ada.")
        [error] = notices(app, "error")
        assert error.title == "Not sent" and "budget" in error.message
        assert app.query_one(ChatInput).text == "Hello there, my name is Ada."
        assert not app.query(UserMessage) and not app.query(AssistantMessage)
        assert app.session.messages[-1]["role"] == "system" and app.replies_finished == 1


async def test_a_turn_whose_save_fails_stays_on_screen_and_is_saved_later(tiny_model, tmp_path,
                                                                           disk):
    """Disk full while saving: the reply stays as it was shown, marked, with a note saying why;
    the turn is kept and goes into the file with the next save; a save that still fails at the
    end is what dmem-chat says at exit."""
    from dmem_mlx.runtime import read_memory

    memory = tmp_path / "m.safetensors"

    def users():
        return [m["content"] for m in read_memory(memory).transcript if m["role"] == "user"]
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "My name is Ada.")
        saved = last_save(app)
        assert saved.startswith("saved 20")
        disk.full = True
        await send(pilot, "I live in Paris.")
        # the panel says the file is behind: since the last save that went through, and why
        assert last_save(app) == f"not {saved.replace('saved', 'saved since')}: No space left " \
            "on device"
        assert [u.text for u in app.query(UserMessage)] == ["My name is Ada.", "I live in Paris."]
        assert footers(app)[-1].endswith(" · not saved") and "not saved" not in footers(app)[0]
        assert "The memory could not be saved: No space left on device" in notes(app)
        assert not notices(app, "error") and app.query_one(ChatInput).text == ""
        assert app.last_info.turns == 2 and users() == ["My name is Ada."]
        disk.full = False  # space freed
        await send(pilot, "I like tea.")
        assert users() == ["My name is Ada.", "I live in Paris.", "I like tea."]
        assert not any("not saved" in footer for footer in footers(app))  # in the file now
        assert [n.title for n in notices(app)] == ["Saved"]
        assert last_save(app).startswith("saved 20") and last_save(app) >= saved
        disk.full = True
        await send(pilot, "/undo")
        assert "/undo is done, but the memory could not be saved" in notes(app)
        assert last_save(app).startswith("not saved since 20")
        assert len(app.query(UserMessage)) == 2 and app.last_info.turns == 2
        await send(pilot, "I have a cat.")
        await pilot.press("ctrl+q")
    assert "could not be saved at exit (No space left on device)" in app.unsaved_at_exit
    assert users() == ["My name is Ada.", "I live in Paris.", "I like tea."]


async def test_a_turn_stopped_before_the_reply_is_given_back(tiny_model, tmp_path):
    def stop_at_once(session, kwargs):  # Escape pressed while the message is still being read
        kwargs["stop"].set()

    app = make_app(tiny_model, None, open_session=wrapped_session(
        tiny_model, tmp_path / "m", before_reply=stop_at_once))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "A long paste.")
        assert any(n.title == "Stopped" for n in notices(app))
        assert app.query_one(ChatInput).text == "A long paste."
        assert not app.query(UserMessage) and app.session.messages == []


async def test_ctrl_c_before_the_first_token_keeps_nothing(tiny_model, tmp_path):
    """Ctrl+C after the message was read but before the reply's first token: no empty reply is
    written, the memory and the file are as before, the message is back in the input."""
    from dmem_mlx.runtime import read_memory

    memory = tmp_path / "m"

    def stop_after_reading(session, kwargs):  # Ctrl+C lands just as the first token comes
        begin = session.begin_reply

        def begin_then_stop(*a, **k):
            turn = begin(*a, **k)
            kwargs["stop"].set()
            return turn
        session.begin_reply = begin_then_stop

    app = make_app(tiny_model, None, open_session=wrapped_session(
        tiny_model, memory, before_reply=stop_after_reading))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "My dog is called Biscuit.")
        assert app.session.last_reply.taken_back and app.session.last_reply.tokens == 0
        assert app.query_one(ChatInput).text == "My dog is called Biscuit."
        assert not app.query(UserMessage) and not app.query(AssistantMessage)
        assert "(empty reply)" not in notes(app) and app.session.messages == []
        assert app.last_info.tokens_written == 0 and app.last_info.kv_tokens == 0
    assert not memory.exists() or read_memory(memory).transcript == []


async def test_a_long_message_goes_into_memory_and_the_user_is_told(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m", max_kv_tokens=64)
    text = " ".join(f"Sentence {k} says that the river is long and calm." for k in range(20))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, text)
        stats = app.last_reply
        assert stats.memory_only_parts >= 1 and stats.tokens > 0
        assert "did not fit the context budget of 64 tokens" in notes(app)
        parts = stats.memory_only_parts
        assert f"({parts} part{'' if parts == 1 else 's'}, " in notes(app)
        [user] = app.query(UserMessage)
        assert user.text == text and "memory only" in str(user.border_subtitle)
        live = user.border_subtitle
        await send(pilot, "/retry")  # shown again: still the one message, as sent
        [user] = app.query(UserMessage)
        assert user.text == text and user.border_subtitle == live
        await pilot.press("ctrl+q")
    app = make_app(tiny_model, tmp_path / "m", max_kv_tokens=64)
    async with app.run_test(size=SIZE) as pilot:  # after a restart, from the memory file
        await wait_loaded(pilot)
        [user] = app.query(UserMessage)
        assert user.text == text and user.border_subtitle == live
        await send(pilot, f"/export {tmp_path / 'chat.md'}")  # as sent there too
        assert (tmp_path / "chat.md").read_text().count("## you") == 1
        await send(pilot, "/new")
        app.query_one(ChatInput).text = "/history"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen))
        await pilot.pause()
        listed = app.screen.query_one("#history-list").get_option_at_index(0).prompt
        assert "  1 turn · Sentence 0" in str(listed)
        assert str(app.screen.query_one("#history-transcript").render()).count("you\n") == 1
        await pilot.press("escape")


async def test_a_looping_reply_is_cut_and_undone(tiny_model, tmp_path):
    import mlx.core as mx

    def loop(session, kwargs):
        session.stop_repetition = True

    app = make_app(tiny_model, tmp_path / "m", sampling=Sampling(max_tokens=300))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        before = app.last_info.tokens_written
        stuck = app.session.reply

        def stuck_reply(*a, **k):  # the model stuck on one token
            def same_token(tokens, logits):
                return mx.where(mx.arange(logits.shape[-1]) == 100, 1e9, -1e9)[None]
            return stuck(*a, logits_processors=[same_token], **k)
        app.session.reply = stuck_reply
        await send(pilot, "Tell me a story.")
        stats = app.last_reply
        assert stats.finish_reason == "repetition" and 32 <= stats.tokens < 300
        assert "went round in circles" in notes(app) and "left out of the memory" in notes(app)
        [reply] = app.query(AssistantMessage)  # the screen shows what the memory kept
        assert reply.text == stats.text == app.session.messages[-1]["content"]
        assert app.session.last_reply.text == app.session.tokenizer.decode([100])
        kept = len(app.session.tokenizer.encode(stats.text, add_special_tokens=False))
        assert str(reply.border_subtitle).startswith(f"{kept} token")  # as shown after a restart
        await send(pilot, "/undo")
        assert app.last_info.tokens_written == before and not app.query(UserMessage)


async def test_typing_ahead_never_confirms_a_dialog(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        written = app.last_info.tokens_written
        app.query_one(ChatInput).text = "/forget"
        await pilot.press("enter", *"Maybe later, yes", "enter")  # typed on, dialog or not
        await wait_until(pilot, lambda: idle(app) and not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(ConfirmScreen.ARM_SECONDS + 0.2)
        assert app.last_info.tokens_written == written and app.query(UserMessage)
        assert any(n.message == "nothing forgotten" for n in notices(app))
        for key in ("y", "n", "enter"):  # no letter answers; Enter presses the focused Cancel
            await open_dialog(pilot, "/forget")
            await pilot.pause(ConfirmScreen.ARM_SECONDS + 0.2)
            await pilot.press(key)
            if key != "enter":
                assert isinstance(app.screen, ConfirmScreen)
                await pilot.press("escape")
            await wait_until(pilot, lambda: idle(app))
        assert app.last_info.tokens_written == written
        assert app.focused is app.query_one(ChatInput)  # focus back where it was


async def test_focus_comes_back_to_the_input(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        chat_input = app.query_one(ChatInput)
        app.query_one(MemoryPanel).focus()
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press(*"abc")
        assert chat_input.text == "abc" and app.focused is chat_input
        await pilot.press("tab")  # into the panel
        await pilot.press("d")
        assert chat_input.text == "abcd" and app.focused is chat_input


async def test_narrow_terminal_gives_the_chat_the_width(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "Hello, I am Ada.")
        panel, chat = app.query_one(MemoryPanel), app.query_one("#chat")
        assert not panel.display and chat.size.width >= 78
        assert app.query_one(UserMessage).size.width >= 70
        await pilot.press("ctrl+b")  # the panel replaces the chat, full width
        await pilot.pause()
        assert panel.display and not chat.display and panel.outer_size.width == 80
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert chat.display and not panel.display and app.focused is app.query_one(ChatInput)
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert panel.display and not chat.display
        await pilot.press(*"so ")  # typing in the full-screen panel: back to the chat, kept
        await pilot.pause()
        assert chat.display and not panel.display and app.focused is app.query_one(ChatInput)
        assert app.query_one(ChatInput).text == "so "


@pytest.mark.parametrize("width", [40, 80, 120])
async def test_the_footer_palette_key_covers_the_last_column(tiny_model, tmp_path, width):
    """The keys that do not fit a narrow footer scroll under the palette key docked at its right;
    the palette key must reach the last column, or a letter of them shows there ("paletten")."""
    from textual.widgets import Footer

    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=(width, 24)) as pilot:
        await wait_loaded(pilot)
        await pilot.pause(0.2)
        palette = app.query_one(Footer).query(".-command-palette")
        assert len(palette) == 1 and palette.first().region.right == width


async def test_resizing_the_terminal_moves_the_panel(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_loaded(pilot)
        panel, chat = app.query_one(MemoryPanel), app.query_one("#chat")
        assert panel.display and chat.display
        await pilot.resize_terminal(80, 24)  # narrower: the chat alone, full width
        await pilot.pause(0.2)
        assert not panel.display and chat.outer_size.width == 80
        await pilot.resize_terminal(160, 48)
        await pilot.pause(0.2)
        assert panel.display and chat.display


async def test_typing_during_start_up_is_kept_and_sent(tiny_model, tmp_path):
    loaded = threading.Event()
    app = make_app(tiny_model, None, open_session=wrapped_session(tiny_model, tmp_path / "m",
                                                                  block=loaded))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press(*"my name is ada")
        assert app.query_one(ChatInput).text == "my name is ada"
        await pilot.press("enter", *"/forget", "enter", *"maybe later", "enter")
        assert any("still loading" in n.message for n in notices(app))
        loaded.set()  # then, in order: the message is sent; the command must wait for its
        # reply, so it comes back to the input with what was typed after it — nothing is lost
        await wait_until(pilot, lambda: app.replies_finished == 1 and idle(app))
        assert app.query_one(UserMessage).text == "my name is ada"
        assert app.query_one(ChatInput).text == "/forget\nmaybe later"
        assert app.last_info.tokens_written > 0 and not isinstance(app.screen, ConfirmScreen)


@pytest.mark.parametrize("key", ["ctrl+c", "escape"])
async def test_a_message_sent_while_loading_can_be_taken_back(tiny_model, tmp_path, key):
    """Escape or Ctrl+C before the model is ready withdraws what was sent meanwhile, as it
    stops a reply that has not begun: nothing is sent or written; the text is back in the
    input, before what was typed since."""
    loaded = threading.Event()
    app = make_app(tiny_model, None, open_session=wrapped_session(tiny_model, tmp_path / "m",
                                                                  block=loaded))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press(*"whats my job", "enter", *"and", key)
        await pilot.pause()
        assert app.query_one(ChatInput).text == "whats my job\nand"
        assert any("back in the input" in n.message for n in notices(app))
        loaded.set()
        await wait_loaded(pilot)
        await pilot.pause(0.3)
        assert app.replies_finished == 0 and not app.query(UserMessage)
        assert app.last_info.tokens_written == 0
        assert app.query_one(ChatInput).text == "whats my job\nand"


async def test_undo_retry_edit_survive_a_restart(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "My name is Ada.")
        first = app.last_info.tokens_written
        await send(pilot, "I live in Paris.")
        await pilot.press("ctrl+q")
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert "undo steps      2" in counts(app)
        await send(pilot, "/undo")
        assert app.last_info.tokens_written == first
        assert [m.text for m in app.query(UserMessage)] == ["My name is Ada."]
        assert "undone" in notes(app)
        await send(pilot, "/retry")
        assert "temperature" in notes(app)
        assert [m.text for m in app.query(UserMessage)] == ["My name is Ada."]
        assert len(app.query(AssistantMessage)) == 1 and app.last_info.turns == 1
        await send(pilot, "/edit")
        assert app.query_one(ChatInput).text == "My name is Ada."
        assert not app.query(UserMessage) and app.last_info.tokens_written == 0


async def test_a_memory_tried_and_left_leaves_no_file(tiny_model, tmp_path):
    folder = tmp_path / "here"
    folder.mkdir()
    app = make_app(tiny_model, folder / "x")  # e.g. dmem-chat --memory ../x, then Ctrl+Q
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert (folder / "x.lock").exists()  # held while the memory is open
        await pilot.press("ctrl+q")
    assert list(folder.iterdir()) == []


async def test_undo_shows_the_context_it_restored(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "My name is Ada.")
        written = app.last_info.tokens_written
        await send(pilot, "I live in Paris.")
        await send(pilot, "/undo")
        info = app.last_info
        assert info.tokens_written == written and info.kv_tokens > 0  # read back, not written
        assert str(app.query_one("#context-text").render()).startswith(f"{info.kv_tokens:,} / ")


async def test_history_export_and_copy(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory, system="Be brief.")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "My cat is called *Milo*.")
        reply = app.last_reply.text
        await send(pilot, f"/export {tmp_path / 'chat.md'}")
        await send(pilot, f"/export {tmp_path / 'chat.json'}")
        markdown = (tmp_path / "chat.md").read_text()
        assert "My cat is called *Milo*." in markdown and "Be brief." in markdown
        data = json.loads((tmp_path / "chat.json").read_text())
        assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
        await send(pilot, f"/export {tmp_path / 'no-such-dir' / 'chat.md'}")
        assert not (tmp_path / "no-such-dir").exists()
        assert any(n.title == "/export failed" for n in notices(app))
        await send(pilot, "/copy")
        assert app.clipboard == reply
        await send(pilot, "/new")
        await send(pilot, "I like tea.")
        app.query_one(ChatInput).text = "/history"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen))
        await pilot.pause()
        shown = str(app.screen.query_one("#history-transcript").render())
        assert "My cat is called *Milo*." in shown
        await pilot.press("escape")
        await wait_until(pilot, lambda: idle(app))
        assert app.focused is app.query_one(ChatInput)


async def test_fast_typing_then_enter_sends_every_character(tiny_model, tmp_path):
    from textual import events

    app = make_app(tiny_model, tmp_path / "m")
    text = "i live in lisbon with my cat pixel. next month im going to peru"
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        app.query_one(ChatInput).focus()
        for character in text:  # a burst, as a terminal delivers fast typing (or tmux send-keys)
            app.post_message(events.Key(character, character))
        app.post_message(events.Key("enter", "\r"))
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert app.query_one(UserMessage).text == text
        assert app.session.messages[0]["content"] == text


async def test_editing_keys_in_a_burst_apply_in_the_order_typed(tiny_model, tmp_path):
    from textual import events

    app = make_app(tiny_model, tmp_path / "m")
    keys = [*"forget", "ctrl+u", *"hi thre", "left", "left", "e", "end", *"xy", "backspace",
            "backspace", "!", "home", "delete", "H", "enter"]
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        app.query_one(ChatInput).focus()
        for key in keys:  # one burst, as a terminal delivers fast typing
            character = {"enter": "\r", "backspace": "\x7f"}.get(key, key if len(key) == 1
                                                                else None)
            app.post_message(events.Key(key, character))
        await wait_until(pilot, lambda: app.replies_finished == 1)
        assert app.session.messages[0]["content"] == "Hi there!"


async def test_keys_typed_ahead_of_a_dialog_stay_in_the_input(tiny_model, tmp_path):
    from textual import events

    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        written = app.last_info.tokens_written
        app.query_one(ChatInput).focus()
        for key in [*"/forget", "enter", *"maybe later, yes", "enter"]:  # one burst
            app.post_message(events.Key(key, "\r" if key == "enter" else key))
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.pause(ConfirmScreen.ARM_SECONDS + 0.2)
        assert isinstance(app.screen, ConfirmScreen)  # nothing typed answered it
        await pilot.press("enter")  # the focused button: Cancel
        await wait_until(pilot, lambda: idle(app))
        assert app.query_one(ChatInput).text == "maybe later, yes"  # kept, not sent
        assert app.last_info.tokens_written == written and len(app.query(UserMessage)) == 1
        app.query_one(ChatInput).clear()
        await open_dialog(pilot, "/forget")
        await pilot.press("ctrl+q")  # quitting with a dialog open is clean too
    assert app.return_code == 0


async def test_read_only_opens_a_locked_memory_and_saves_nothing(tiny_model, tmp_path):
    from dmem_mlx.runtime import MemoryFile

    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:  # a first chat, so that the file exists
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        written = app.last_info.tokens_written
        await pilot.press("ctrl+q")
    before = memory.read_bytes()
    holder = MemoryFile.open(memory)  # another dmem-chat has it open for writing
    try:
        app = make_app(tiny_model, memory, read_only=True)
        async with app.run_test(size=SIZE) as pilot:
            await wait_loaded(pilot)
            assert app.last_info.read_only and "read-only" in notes(app)
            await send(pilot, "Do you remember what I like?")
            assert app.last_reply.tokens > 0
            assert app.last_info.tokens_written == written
            await send(pilot, "/readonly")  # cannot start writing into a file opened read-only
            assert "start dmem-chat without --read-only" in notices(app, "error")[-1].message
            assert "--read-only" in str(app.query_one("#mode-bar").render())
            assert app.last_info.read_only
            await send(pilot, "/undo")  # the read-only turn goes; the file is not touched
            assert not any(m.text.startswith("Do you") for m in app.query(UserMessage))
    finally:
        holder.close()
    assert memory.read_bytes() == before


async def test_memory_of_another_model_is_refused_in_the_app(tiny_model, tmp_path):
    from dmem_mlx.tiny import make_tiny_dmem

    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        await pilot.press("ctrl+q")
    before = memory.read_bytes()
    other = make_tiny_dmem(tmp_path / "other", seed=7)
    app = make_app(other, memory)  # (dmem-chat refuses it before the UI; the app checks too)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.start_error is not None)
        [error] = notices(app, "error")
        assert error.title == "Could not start" and "refused" in error.message
        assert app.session is None
        await pilot.press("ctrl+q")
    assert app.return_code == 1 and memory.read_bytes() == before


async def test_info_counts_in_the_singular_and_the_plural(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "chat.memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        await send(pilot, "/info")
        info = app.query(Note).last().render()
        assert app.last_info.turns == 1 and app.last_info.undo_depth == 1
        assert "· 1 turn (0 only in memory) ·" in str(info)
        assert "· 1 undo step ·" in str(info) and "· 0 past conversations ·" in str(info)
        await send(pilot, "/new")
        await send(pilot, "I like green tea.")
        await send(pilot, "I also like coffee.")
        await send(pilot, "/info")
        info = str(app.query(Note).last().render())
        assert "· 3 turns (1 only in memory) ·" in info and "· 2 undo steps ·" in info
        assert "· 1 past conversation ·" in info
        await pilot.press("ctrl+q")


async def test_text_typed_while_a_dialog_is_open_goes_on_in_the_input(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path / "chat.memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "I like tea.")
        written = app.last_info.tokens_written
        chat_input = app.query_one(ChatInput)
        await open_dialog(pilot, "/forget")
        assert chat_input.text == ""
        await pilot.press(*"maybe latr", "backspace", *"er, yes y")  # a person typing on
        await pilot.pause(ConfirmScreen.ARM_SECONDS + 0.2)
        assert isinstance(app.screen, ConfirmScreen)  # no letter answered it
        assert chat_input.text == "maybe later, yes y"  # kept, behind the dialog
        await pilot.press("escape")
        await wait_until(pilot, lambda: idle(app) and not isinstance(app.screen, ConfirmScreen))
        await pilot.press(*" please")  # and typing goes on where it was
        assert chat_input.text == "maybe later, yes y please"
        assert app.focused is chat_input and app.last_info.tokens_written == written
        chat_input.clear()
        chat_input.text = "/history"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen))
        await pilot.press(*"ok", "escape")
        await wait_until(pilot, lambda: idle(app) and not isinstance(app.screen, HistoryScreen))
        assert chat_input.text == "ok"
        await pilot.press("ctrl+q")


async def test_sigterm_stops_the_reply_saves_and_releases_the_memory(tiny_model, tmp_path):
    """SIGTERM while a reply streams ends dmem-chat as Ctrl+Q does: the reply stops, the turn is
    saved as shown, the lock is released; the exit code is 128 + 15. (Run in a subprocess, with
    its terminal, by test_app_cli's signal tests.)"""
    import os
    import signal

    from dmem_mlx.runtime import MemoryFile, read_memory

    memory = tmp_path / "m"
    caught = []  # without the app's own handler, the signal would only land here
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        app = make_app(tiny_model, None, sampling=Sampling(max_tokens=5000),
                       open_session=wrapped_session(tiny_model, memory, ban_eos=True))
        async with app.run_test(size=SIZE) as pilot:
            await wait_loaded(pilot)
            app.query_one(ChatInput).focus()
            await pilot.press(*"hi")
            with written_fragments() as writes:
                await pilot.press("enter")
                await wait_until(pilot, lambda: len([w for w in writes if w]) >= 2)
            assert app.replying
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_until(pilot, lambda: not app.is_running)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not caught and app.return_code == 128 + signal.SIGTERM
    stats = app.last_reply or app.session.last_reply
    assert stats.stopped and 0 < stats.tokens < 5000
    saved = read_memory(memory)
    assert [m["role"] for m in saved.transcript] == ["user", "assistant"]
    assert saved.transcript[-1]["content"] == stats.text
    MemoryFile.open(memory).close()  # the lock was released


async def test_sigterm_before_the_first_token_quits_cleanly(tiny_model, tmp_path):
    """SIGTERM right after Enter, before the reply's first token: the turn is taken back (the
    runtime keeps nothing of it) while the app closes — no error, exit code 128 + 15."""
    import os
    import signal

    from dmem_mlx.runtime import MemoryFile, read_memory

    memory = tmp_path / "m"
    caught = []

    def term_first(session, kwargs):  # the signal arrives before the first token is sampled
        os.kill(os.getpid(), signal.SIGTERM)
        kwargs["stop"].wait(10)
        time.sleep(0.2)  # the app's quit gets under way meanwhile

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        app = make_app(tiny_model, None, open_session=wrapped_session(
            tiny_model, memory, before_reply=term_first))
        async with app.run_test(size=SIZE) as pilot:
            await wait_loaded(pilot)
            app.query_one(ChatInput).text = "hi"
            await pilot.press("enter")
            await wait_until(pilot, lambda: not app.is_running)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not caught and app.return_code == 128 + signal.SIGTERM
    assert app.session.last_reply.taken_back
    assert not memory.exists() or not read_memory(memory).transcript
    MemoryFile.open(memory).close()  # the lock was released


def assert_apart(*widgets) -> None:
    """No two of `widgets` share a cell of the screen."""
    for i, a in enumerate(widgets):
        for b in widgets[i + 1:]:
            assert not a.region.overlaps(b.region), (a, a.region, b, b.region)


@pytest.mark.parametrize("size", [SIZE, (80, 24)])
async def test_read_only_is_shown_above_the_input_and_nothing_covers_the_panel(tiny_model,
                                                                              tmp_path, size):
    """Ctrl+R's mode is a line laid out above the input (not a notification drawn over the
    panel's border); notifications keep to the chat's column when the panel is beside it."""
    from app.widgets import ModeBar

    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=size, notifications=True) as pilot:
        await wait_loaded(pilot)
        bar, chat_input = app.query_one(ModeBar), app.query_one(ChatInput)
        assert not bar.display
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.last_info.read_only and bar.display)
        await pilot.press("ctrl+c")  # idle: a notification ("Ctrl+Q quits")
        await wait_until(pilot, lambda: app.screen.query("Toast"), 10)
        await pilot.pause()
        footer, view = app.query_one("Footer"), app.query_one("#conversation")
        assert "Ctrl+R writes again" in str(bar.render())
        assert bar.region.height == 1 and bar.region.bottom == chat_input.region.y
        assert_apart(view, bar, chat_input, footer)
        panel = app.query_one(MemoryPanel)
        if panel.display:  # beside the chat: whole, and nothing drawn over it
            assert_apart(panel, bar, footer)
            assert panel.region.bottom <= footer.region.y
            for toast in app.screen.query("Toast"):
                assert not toast.region.overlaps(panel.region), (toast.region, panel.region, app.screen.classes, toast.styles.margin)
        assert "read-only from here" in notes(app)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: not app.last_info.read_only and not bar.display)
        assert "writing again from here" in notes(app)


def scripted_session(model_dir, memory, replies, lose_held_back=False):
    """open_session for the app: each reply is the next text of `replies`, token for token as
    the tokenizer spells it, then end-of-sequence. lose_held_back: the stream loses the text
    the detokenizer held back to the end (as if it had spelled the reply otherwise)."""
    import mlx.core as mx

    import dmem_mlx
    from dmem_mlx.runtime import ChatSession, MemoryFile

    def open_session():
        model, tokenizer = dmem_mlx.load(str(model_dir))
        session = ChatSession(model, tokenizer, memory=MemoryFile.open(memory))
        reply, script = session.reply, iter(replies)
        eos = sorted(tokenizer.eos_token_ids)[0]

        def scripted(*a, **k):
            tokens = iter([*tokenizer.encode(next(script), add_special_tokens=False), eos])

            def processor(_, logits):
                return mx.where(mx.arange(logits.shape[-1]) == next(tokens), 1e9, -1e9)[None]
            stream = reply(*a, logits_processors=[processor], **k)
            return (c for c in stream if not (lose_held_back and c.token < 0))
        session.reply = scripted
        return session
    return open_session


def footers(app) -> list[str]:
    return [str(reply.border_subtitle) for reply in app.query(AssistantMessage)]


async def test_replies_shown_again_keep_a_footer_like_live_ones(tiny_model, tmp_path):
    """A reply shown from the memory file (after a restart) has the footer of its length in
    tokens, as a live one has (its speed is of the live run only); replies that stay on screen
    through /undo keep theirs as they were."""
    memory, replies = tmp_path / "m", ["Nice to meet you, Ada!", "", "Paris it is."]
    app = make_app(tiny_model, None, sampling=Sampling(max_tokens=64),
                   open_session=scripted_session(tiny_model, memory, replies))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        await send(pilot, "my name is ada")
        first = app.last_reply.tokens
        await send(pilot, "ok")  # an empty reply
        live = footers(app)
        assert live[0].startswith(f"{first} tokens · ") and live[0].endswith(" tok/s")
        assert live[1] == "0 tokens"  # an empty reply has no speed
        assert app.query(AssistantMessage)[1].source == "*(empty reply)*"
        await send(pilot, "i live in paris")
        await send(pilot, "/undo")  # the turns that stay keep their footers
        assert footers(app) == live
        await pilot.press("ctrl+q")
    app = make_app(tiny_model, None, sampling=Sampling(max_tokens=64),
                   open_session=scripted_session(tiny_model, memory, replies[2:]))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert footers(app) == [f"{first} tokens", "0 tokens"]  # no speed: not known
        assert app.query(AssistantMessage)[1].source == "*(empty reply)*"
        await send(pilot, "i live in paris")
        assert footers(app)[:2] == [f"{first} tokens", "0 tokens"]
        assert footers(app)[2].endswith(" tok/s")
        await send(pilot, "/undo")
        assert footers(app) == [f"{first} tokens", "0 tokens"]


@pytest.mark.parametrize("lose_held_back", [False, True])
async def test_a_reply_ends_on_screen_as_the_memory_keeps_it(tiny_model, tmp_path,
                                                             lose_held_back):
    """A trailing space the detokenizer holds back streams last; were the streamed text ever
    to differ from the text kept (a detokenizer that changes earlier text), the screen ends
    with the kept one."""
    memory = tmp_path / "m"
    app = make_app(tiny_model, None, sampling=Sampling(max_tokens=64),
                   open_session=scripted_session(tiny_model, memory, ["Hello there "],
                                                 lose_held_back))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        with written_fragments() as streamed:
            await send(pilot, "hi")
        assert app.last_reply.text == "Hello there " == app.session.messages[-1]["content"]
        assert ("".join(streamed) == "Hello there ") is not lose_held_back
        assert app.query_one(AssistantMessage).text == "Hello there "


def cursor_shown(chat_input: ChatInput) -> bool:
    row, top = chat_input.cursor_location[0], chat_input.scroll_offset.y
    return top <= row < top + chat_input.content_size.height


async def test_the_line_typed_on_stays_in_view_in_a_tall_input(tiny_model, tmp_path):
    """Past the input's height limit, a new line (Ctrl+J, backslash-Enter) and a long message
    given back (/edit) show the cursor's line, not the line before it."""
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot)
        chat_input = app.query_one(ChatInput)
        for i in range(12):
            await pilot.press(*f"line {i}", "ctrl+j")
            await pilot.pause()
            assert cursor_shown(chat_input), i
        await pilot.press(*"last\\", "enter")
        await pilot.pause()
        assert chat_input.cursor_location[0] == 13 and cursor_shown(chat_input)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_finished == 1)
        await send(pilot, "/edit")
        await pilot.pause()
        assert chat_input.text.startswith("line 0\nline 1") and cursor_shown(chat_input)


async def test_every_key_of_the_footer_fits_in_80_columns(tiny_model, tmp_path):
    """With the most keys shown (Escape's while the panel fills a narrow terminal), no key of
    the footer is drawn over another (the command palette's was, over F1's)."""
    app = make_app(tiny_model, tmp_path / "m")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_loaded(pilot)
        await pilot.press("ctrl+b")
        await pilot.pause()
        keys = list(app.query("FooterKey"))
        assert [k.key_display for k in keys] == ["^q", "esc", "^b", "^n", "^r", "f1", "^p"]
        assert_apart(*keys)
        assert all(k.region.right <= 80 for k in keys)


@pytest.mark.parametrize("stop_key", ["escape", "ctrl+c"])
async def test_a_stop_typed_right_after_enter_stops_that_reply(tiny_model, tmp_path, stop_key):
    """Enter then Escape (or Ctrl+C) in one burst — typed ahead, or while the UI was busy: the
    stop is for the reply that Enter starts, not lost because the message was on its way."""
    from textual import events

    app = make_app(tiny_model, None, sampling=Sampling(max_tokens=5000),
                   open_session=wrapped_session(tiny_model, tmp_path / "m", ban_eos=True))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        app.query_one(ChatInput).focus()
        app.query_one(ChatInput).text = "oops, not this"
        app.post_message(events.Key("enter", "\r"))
        app.post_message(events.Key(stop_key, {"escape": "\x1b", "ctrl+c": "\x03"}[stop_key]))
        await wait_until(pilot, lambda: app.replies_finished == 1)
        stats = app.session.last_reply
        assert stats.stopped or stats.taken_back
        assert stats.tokens < 5000


async def test_an_empty_reply_gives_no_speed():
    from app.widgets import reply_footer

    assert reply_footer(0, 0.0) == "0 tokens"  # not "0 tokens · 0.0 tok/s"
    assert reply_footer(0, 0.0, "read-only") == "0 tokens · read-only"
    assert reply_footer(1, 61.04, "stopped") == "1 token · 61.0 tok/s · stopped"


async def test_a_new_memory_is_not_saved_yet_and_says_why_if_its_first_save_fails():
    from types import SimpleNamespace

    from app.widgets import last_save

    behind = last_save(SimpleNamespace(save_error="No space left on device", last_saved=None))
    assert str(behind) == "not saved yet: No space left on device" and behind.style == "bold red"
    assert str(last_save(SimpleNamespace(save_error=None, last_saved=None))) == "not saved yet"
