"""dmem-chat driven by Textual's pilot on a tiny random model and a memory file in tmp."""

from __future__ import annotations

import time

import pytest

from app.app import DmemChatApp, Sampling
from app.screens import ConfirmScreen
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
    await wait_until(pilot, lambda: app.session is not None and not app.query_one(ChatInput).disabled)


async def send(pilot, text: str) -> None:
    """Type `text` and press Enter; waits for the reply (or the command) to finish."""
    app = pilot.app
    app.query_one(ChatInput).focus()
    app.query_one(ChatInput).text = text
    await pilot.press("enter")
    await pilot.pause()
    await wait_until(pilot, lambda: not app.replying and not any(
        w.is_running for w in app.workers if w.group == "command"))
    await pilot.pause()


def notes(app) -> str:
    return "\n".join(str(note.render()) for note in app.query(Note))


def counts(app) -> str:
    return str(app.query_one("#memory-counts").render())


async def test_reply_streams_saves_and_updates_panel(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        assert app.last_info.tokens_written == 0
        assert "tokens written  0" in counts(app)
        chunks_seen = []
        original = AssistantMessage.write

        async def spy(self, fragment):
            chunks_seen.append(fragment)
            await original(self, fragment)

        AssistantMessage.write = spy
        try:
            await send(pilot, "My name is Ada and I live in Paris.")
        finally:
            AssistantMessage.write = original
        [user] = app.query(UserMessage)
        [reply] = app.query(AssistantMessage)
        assert "Ada" in user.source
        stats = app.last_reply
        assert stats is not None and stats.tokens > 0
        assert reply.text == stats.text and "".join(chunks_seen) == stats.text
        assert "tok/s" in str(reply.border_subtitle)
        info = app.last_info
        assert info.tokens_written > 0 and info.turns == 1
        assert info.last_saved is not None
        assert f"tokens written  {info.tokens_written:,}" in counts(app)
        assert "turns           1" in counts(app)
        heatmap = str(app.query_one("#state-heatmap").render())
        assert "L0" in heatmap and "scale ±0\n" not in heatmap + "\n"
        assert memory.exists()
        assert "saved" in str(app.query_one("#memory-file").render())


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
        assert any("Milo" in m.source for m in app.query(UserMessage))
        assert f"tokens written  {written:,}" in counts(app)


async def test_locked_memory_is_reported_in_the_app(tiny_model, tmp_path):
    from dmem_mlx.runtime import MemoryFile

    memory = tmp_path / "chat.memory"
    holder = MemoryFile.open(memory)
    try:
        app = make_app(tiny_model, memory)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: not app.query_one("#loading").display
                             if app.query("#loading") else True)
            await pilot.pause()
            errors = [n for n in app._notifications if n.severity == "error"]
            assert errors and "Could not start" == errors[0].title
            assert app.session is None and app.query_one(ChatInput).disabled
    finally:
        holder.close()


async def test_commands(tiny_model, tmp_path):
    memory = tmp_path / "chat.memory"
    app = make_app(tiny_model, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
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

        app.query_one(ChatInput).text = "/forget"  # asks; cancel keeps everything
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        await send(pilot, "/info")
        assert app.last_info.tokens_written == written

        app.query_one(ChatInput).text = "/forget"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_info.tokens_written == 0)
        assert "tokens written  0" in counts(app)

        app.query_one(ChatInput).text = "/restore tea"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#confirm-yes")
        await wait_until(pilot, lambda: app.last_info.tokens_written == written)

        export = tmp_path / "exported.memory"
        await send(pilot, f"/export {export}")
        assert export.exists()
        await send(pilot, "/export /proc/no-such-dir/x.memory")  # fails: shown in the app
        assert any(n.title == "/export failed" for n in app._notifications)
        await send(pilot, "/restore nothing-by-that-name")
        assert any(n.title == "/restore failed" and "tea" in n.message for n in app._notifications)

        await send(pilot, "/info")
        assert str(memory) in notes(app) or memory.name in notes(app)

        await send(pilot, "/nonsense")
        assert any("unknown command" in n.message for n in app._notifications)

        panel = app.query_one(MemoryPanel)
        await pilot.press("ctrl+b")
        assert not panel.display
        await send(pilot, "/panel")
        assert panel.display

        await pilot.press("f1")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")

        await send(pilot, "/quit")
        await pilot.pause()
    assert app.return_code == 0


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


def session_without_eos(model_dir, memory):
    """open_session for the app: a ChatSession whose replies never sample end-of-sequence."""
    import mlx.core as mx

    import dmem_mlx
    from dmem_mlx.runtime import ChatSession, MemoryFile

    def open_session():
        model, tokenizer = dmem_mlx.load(str(model_dir))
        session = ChatSession(model, tokenizer, memory=MemoryFile.open(memory))
        banned = mx.array(sorted(tokenizer.eos_token_ids))
        reply = session.reply

        def ban_eos(tokens, logits):
            logits[..., banned] = -1e9
            return logits

        session.reply = lambda *a, **k: reply(*a, logits_processors=[ban_eos], **k)
        return session
    return open_session


async def test_input_newline_and_escape_stops_a_reply(tiny_model, tmp_path):
    app = make_app(tiny_model, None, open_session=session_without_eos(tiny_model, tmp_path / "m"),
                   sampling=Sampling(max_tokens=5000))
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot)
        chat_input = app.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert chat_input.text == "a\nb"
        writes = []
        original = AssistantMessage.write

        async def spy(self, fragment):
            writes.append(fragment)
            await original(self, fragment)

        AssistantMessage.write = spy
        try:
            await pilot.press("enter")
            await wait_until(pilot, lambda: len([w for w in writes if w]) >= 2)  # streaming
            assert app.replying
            await pilot.press("escape")
        finally:
            AssistantMessage.write = original
        await wait_until(pilot, lambda: not app.replying)
        stats = app.last_reply
        assert stats.stopped and 0 < stats.tokens < 5000
        assert "stopped" in str(app.query_one(AssistantMessage).border_subtitle)
        assert app.query_one(UserMessage).source == "a\nb"
        assert app.session.messages[-1]["content"] == stats.text  # transcript kept consistent


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
            assert any(n.severity == "error" for n in app._notifications)
            assert app.last_info.read_only
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
    app = make_app(other, memory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: any(n.severity == "error" for n in app._notifications))
        [error] = [n for n in app._notifications if n.severity == "error"]
        assert error.title == "Could not start" and "refused" in error.message
        assert app.session is None and app.query_one(ChatInput).disabled
        await pilot.press("ctrl+q")
    assert memory.read_bytes() == before
