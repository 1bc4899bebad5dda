"""dmem-chat: a Textual chat app whose δ memory lives in a file and is shown on screen.

All model work (load, replies, memory commands) runs on one engine thread: MLX streams are
per-thread, so arrays made on one thread must not be evaluated on another. Textual workers
await that thread, which keeps the UI responsive. The reply text is handed over through a small
buffer that the worker drains every FLUSH_SECONDS or more: each screen update (Markdown parse,
layout, render) costs the UI thread milliseconds of CPU and the GIL, which the decoder would lose,
so the interval stretches until the UI thread uses at most UI_CPU_SHARE of the time
(`FlushPacer`). benchmarks/bench_app.py measures the result against the library alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, LoadingIndicator

from .commands import (BY_NAME, CommandError, MemoryCommands, SessionCommands, help_markdown,
                       parse_command)
from .screens import HelpScreen
from .widgets import AssistantMessage, ChatInput, MemoryPanel, Note, UserMessage

T = TypeVar("T")
BUSY_OK = {"help", "panel", "quit"}  # commands that may run while a reply streams


@dataclass
class Sampling:
    """Generation settings, in mlx-lm's names."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None


class ReplyBuffer:
    """Text handed from the engine thread to the UI: append is cheap, take empties it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[str] = []

    def append(self, text: str) -> None:
        with self._lock:
            self._pieces.append(text)

    def take(self) -> str:
        with self._lock:
            text, self._pieces = "".join(self._pieces), []
        return text


class FlushPacer:
    """How long to wait before the next screen update of a streaming reply.

    After each update, the share of wall time the UI thread spent on the CPU since the last one
    (`time.thread_time`, measured on the UI thread) sets the next interval so that this share
    approaches `target`: interval = cost / target, between `shortest` and `longest`.
    """

    def __init__(self, shortest: float, longest: float, target: float) -> None:
        self.shortest, self.longest, self.target = shortest, longest, target
        self.interval = shortest
        self._cpu, self._wall = time.thread_time(), time.perf_counter()

    def next_interval(self) -> float:
        cpu, wall = time.thread_time(), time.perf_counter()
        share = (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._cpu, self._wall = cpu, wall
        wanted = self.interval * share / self.target
        self.interval = min(self.longest, max(self.shortest, wanted))
        return self.interval


@dataclass
class Loaded:
    session: Any
    info: Any
    snapshots: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)


class DmemChatApp(SessionCommands, App[int]):
    """Chat with a δ-mem model; the memory panel shows what it has written."""

    CSS_PATH = Path(__file__).with_name("app.tcss")
    TITLE = "dmem-chat"
    COMMANDS = App.COMMANDS | {MemoryCommands}
    BINDINGS = [
        Binding("escape", "stop_reply", "Stop reply"),
        Binding("ctrl+b", "toggle_panel", "Memory"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+r", "toggle_read_only", "Read-only"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    replying: reactive[bool] = reactive(False, bindings=True)
    """A reply is streaming (the Stop binding shows only then)."""

    FLUSH_SECONDS = 0.05  # shortest interval between two screen updates of a streaming reply
    FLUSH_LONGEST = 1.0
    UI_CPU_SHARE = 0.03  # the UI thread's CPU share while streaming, at most (see FlushPacer)

    def __init__(self, model_path: Union[str, Path], memory: Any = None, *,
                 open_session: Optional[Callable[[], Any]] = None,
                 sampling: Optional[Sampling] = None, system: Optional[str] = None,
                 max_kv_tokens: Optional[int] = None, read_only: bool = False,
                 startup_hint: Optional[str] = None, model_name: Optional[str] = None) -> None:
        """model_path: a converted model directory. memory: an open `MemoryFile`, a path to open
        (a lock held elsewhere is then reported in the app), or None for no file.
        open_session: replaces the loading step (a callable returning a ChatSession).
        startup_hint: a warning shown once the model is loaded (e.g. the OpenBLAS hint).
        model_name: shown in the header (default: the directory's name)."""
        super().__init__()
        self.model_path = Path(model_path)
        self.model_name = model_name or self.model_path.name
        self.memory = memory
        self.sampling = sampling or Sampling()
        self.system = system
        self.max_kv_tokens = max_kv_tokens
        self.start_read_only = read_only
        self.startup_hint = startup_hint
        self._open_session = open_session or self._load_session
        self.session: Any = None
        self.snapshot_names: list[str] = []
        self.start_error: Optional[str] = None
        self.replies_finished = 0  # count of replies done (finished, stopped or failed)
        self.last_reply: Any = None
        self.last_info: Any = None
        self._stop = threading.Event()
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dmem-engine")
        self._session_closed = False

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                with VerticalScroll(id="conversation"):
                    yield Note(f"loading {self.model_name} …", id="loading-note")
                    yield LoadingIndicator(id="loading")
                yield ChatInput(id="input", disabled=True, show_line_numbers=False,
                                placeholder="Message (Enter sends, Shift+Enter/Ctrl+J new line, "
                                            "/help)")
            yield MemoryPanel(id="memory-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.model_name
        if self.size.width < 100:  # narrow terminal: the conversation first (Ctrl+B shows it)
            self.query_one(MemoryPanel).display = False
        self.query_one("#conversation", VerticalScroll).anchor()
        self.load()

    # ---------------------------------------------------------------- engine
    async def on_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread (the only thread that touches MLX)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine, partial(fn, *args))

    def _load_session(self) -> Any:
        import dmem_mlx
        from dmem_mlx.runtime import ChatSession

        from .main import open_memory

        model, tokenizer = dmem_mlx.load(str(self.model_path))
        if isinstance(self.memory, (str, Path)):
            self.memory = open_memory(self.memory, read_only=self.start_read_only)
        return ChatSession(model, tokenizer, memory=self.memory, system=self.system,
                           max_kv_tokens=self.max_kv_tokens)

    def _start(self) -> Loaded:
        session = self._open_session()
        self.session = session
        if self.start_read_only:
            session.read_only = True
        return Loaded(session, session.info(), list(session.snapshots()), list(session.messages))

    @work(group="load")
    async def load(self) -> None:
        try:
            loaded = await self.on_engine(self._start)
        except Exception as exc:  # shown in the app; the UI stays up so the user can read it
            self.query_one("#loading").display = False
            self.start_error = str(exc)
            self.query_one("#loading-note", Note).update(
                Text(f"Could not start: {exc}\nCtrl+Q quits.", "red"))
            self.notify(str(exc), title="Could not start", severity="error", timeout=30)
            return
        self.query_one("#loading").remove()
        self.query_one("#loading-note").remove()
        self.snapshot_names = loaded.snapshots
        await self.show_transcript(loaded.messages)
        self.show_info(loaded.info)
        info = loaded.info
        where = info.memory_path or "nowhere (this chat is not saved)"
        if info.turns or info.tokens_written:
            turns = f"{info.turns} turn" + ("s" if info.turns != 1 else "")
            await self.add_note(f"memory loaded: {info.tokens_written:,} tokens written over "
                                f"{turns} — {where}\nThe last conversation goes on; Ctrl+N "
                                "starts a new one with only the memory.")
        else:
            await self.add_note(f"new memory — {where}. Tell me about yourself; "
                                "I will remember it next time.")
        if info.read_only:
            await self.add_note("read-only: nothing you say now is written or saved", "yellow")
        if self.startup_hint:
            self.notify(self.startup_hint, severity="warning", timeout=15)
        chat_input = self.query_one(ChatInput)
        chat_input.disabled = False
        chat_input.focus()

    def not_ready(self) -> str:
        if self.start_error:
            return f"could not start ({self.start_error}); Ctrl+Q quits"
        return "the model is still loading"

    def show_info(self, info: Any) -> None:
        self.last_info = info
        self.query_one(MemoryPanel).show(info)
        memory = Path(info.memory_path).name if info.memory_path else "no memory file"
        self.sub_title = " · ".join([self.model_name, memory] +
                                    (["read-only"] if info.read_only else []))

    async def refresh_info(self) -> None:
        self.show_info(await self.on_engine(self.session.info))

    # ---------------------------------------------------------------- conversation
    async def add_note(self, text: str, style: str = "") -> None:
        await self.query_one("#conversation").mount(Note(Text(text, style)))

    async def show_transcript(self, messages: list[dict]) -> None:
        conversation = self.query_one("#conversation")
        await conversation.remove_children()
        widgets = []
        for message in messages:
            if message["role"] == "user":
                widgets.append(UserMessage(message["content"]))
            elif message["role"] == "assistant":
                widgets.append(AssistantMessage(message["content"]))
        if widgets:
            await conversation.mount_all(widgets)

    @on(ChatInput.Submitted)
    async def submit(self, event: ChatInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if text.startswith("/"):
            try:
                command, argument = parse_command(text)
            except CommandError as exc:
                self.notify(str(exc), severity="error")
                return
            event.chat_input.clear()
            self.run_command(command.name, argument)
            return
        if self.session is None:
            self.notify(self.not_ready(), severity="warning")
            return
        if self.replying:
            self.notify("a reply is streaming — Escape stops it", severity="warning")
            return
        event.chat_input.clear()
        conversation = self.query_one("#conversation", VerticalScroll)
        reply = AssistantMessage()
        await conversation.mount_all([UserMessage(text), reply])
        conversation.anchor()
        self.replying = True
        self._stop.clear()
        self.call_after_refresh(self.generate, text, reply)  # draw the turn, then decode

    def _reply(self, text: str, buffer: ReplyBuffer) -> tuple[Any, Any]:
        """Engine thread: stream the reply into `buffer`; the runtime saves the memory after it."""
        s = self.sampling
        for chunk in self.session.reply(text, max_tokens=s.max_tokens, temp=s.temp, top_p=s.top_p,
                                        seed=s.seed, stop=self._stop):
            buffer.append(chunk.text)
        return self.session.last_reply, self.session.info()

    @work(group="reply")
    async def generate(self, text: str, reply: AssistantMessage) -> None:
        buffer = ReplyBuffer()
        future = asyncio.ensure_future(self.on_engine(self._reply, text, buffer))
        pacer = FlushPacer(self.FLUSH_SECONDS, self.FLUSH_LONGEST, self.UI_CPU_SHARE)
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=pacer.next_interval())
                if piece := buffer.take():
                    await reply.write(piece)
            await reply.write(buffer.take())
            try:
                stats, info = future.result()
            except Exception as exc:  # the runtime kept its state consistent; say what happened
                await reply.finish("failed")
                self.notify(f"reply failed: {exc}", title="Error", severity="error", timeout=15)
                if self.session is not None:
                    await self.refresh_info()
                return
            self.last_reply = stats
            note = f"{stats.tokens} tokens · {stats.tokens_per_sec:.1f} tok/s"
            if stats.stopped:
                note += " · stopped"
            if info.read_only:
                note += " · read-only"
            await reply.finish(note)
            self.show_info(info)
        finally:
            self.replying = False
            self.replies_finished += 1

    # ---------------------------------------------------------------- commands
    def palette_command(self, name: str) -> None:
        """From the palette: run it, or for commands with an argument, type it for the user."""
        command = BY_NAME[name]
        if command.argument:
            chat_input = self.query_one(ChatInput)
            chat_input.text = f"/{name} "
            chat_input.move_cursor(chat_input.document.end)
            chat_input.focus()
        else:
            self.run_command(name, "")

    @work(group="command")
    async def run_command(self, name: str, argument: str = "") -> None:
        if name not in BUSY_OK:
            if self.session is None:
                self.notify(self.not_ready(), severity="warning")
                return
            if self.replying:
                self.notify(f"/{name} must wait: a reply is streaming (Escape stops it)",
                            severity="warning")
                return
        try:
            await getattr(self, f"command_{name}")(argument)
        except Exception as exc:  # runtime errors (missing snapshot, locked file …) → notification
            self.notify(str(exc), title=f"/{name} failed", severity="error", timeout=10)

    # ---------------------------------------------------------------- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> Optional[bool]:
        if action == "stop_reply":
            return self.replying
        return True

    def action_stop_reply(self) -> None:
        if self.replying:
            self._stop.set()

    def action_toggle_panel(self) -> None:
        panel = self.query_one(MemoryPanel)
        panel.display = not panel.display

    def action_new_conversation(self) -> None:
        self.run_command("new")

    def action_toggle_read_only(self) -> None:
        self.run_command("readonly")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(help_markdown()))

    async def action_quit(self) -> None:
        """Stop a streaming reply (the runtime keeps what was said consistent), close, exit."""
        self._stop.set()
        await self.close_session()
        self.exit(0)

    async def close_session(self) -> None:
        """Release the memory lock after the engine finishes (saves happen after every turn)."""
        if self._session_closed:
            return
        self._session_closed = True
        self._stop.set()

        def close() -> None:
            if self.session is not None:
                self.session.close()
            elif hasattr(self.memory, "close"):
                self.memory.close()
        try:
            await self.on_engine(close)
        finally:
            self._engine.shutdown(wait=False)

    async def on_unmount(self) -> None:
        await self.close_session()
