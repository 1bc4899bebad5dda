"""dmem-chat: a Textual chat app whose δ memory lives in a file and is shown on screen.

All model work (load, replies, memory commands) runs on one engine thread: MLX streams are
per-thread, so arrays made on one thread must not be evaluated on another. Textual workers
await that thread, which keeps the UI responsive. The reply text is handed over through a small
buffer that the worker drains every FLUSH_SECONDS or more: each screen update (Markdown parse,
layout, render) costs the UI thread milliseconds of CPU and the GIL, which the decoder would lose,
so the interval stretches until the UI thread uses at most UI_CPU_SHARE of the time
(`FlushPacer`). benchmarks/bench_app.py measures the result against the library alone.

The conversation is a `ChatView`; a reply's lifecycle is told by `ReplyStarted` and
`ReplyFinished` messages; the commands are slash commands and SystemCommands in the palette.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, TypeVar, Union

from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header

from dmem_mlx.errors import MemorySaveError

from .commands import (BY_NAME, COMMANDS, CommandError, export_target, help_markdown,
                       parse_command, transcript_json, transcript_markdown)
from .screens import ConfirmScreen, HelpScreen, HistoryScreen
from .widgets import (AssistantMessage, ChatInput, ChatView, MemoryPanel, ModeBar, Note,
                      ReplyFinished, ReplyStarted, memory_only_footer,
                      reply_footer, unsaved_note)

if TYPE_CHECKING:
    from dmem_mlx.runtime import ChatSession, MemoryFile, ReplyStats, SessionInfo

T = TypeVar("T")
QUIT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
TYPING_THROUGH = (ConfirmScreen, HelpScreen, HistoryScreen)  # typed text goes on in the input
BUSY_OK = {"help", "panel", "quit", "copy", "history"}  # may run while a reply streams
RETRY_TEMP = 0.7  # a retry under greedy decoding samples at this temperature (else: same reply)


def terminal_present() -> bool:
    """The terminal the app reads and draws on is still there (not hung up: its window open)."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal: no hang-up to tell apart
        return True
    try:
        for stream in (sys.__stdin__, sys.__stderr__):
            termios.tcgetattr(stream.fileno())  # type: ignore[union-attr]
    except (termios.error, OSError, ValueError, AttributeError):
        return False
    return True


NOT_SAVED = "not saved"  # the mark under a reply whose save failed


def plural(n: int, word: str) -> str:
    """"1 part", "2 parts"."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


@dataclass
class Sampling:
    """Generation settings, in mlx-lm's names."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None


@dataclass
class Notice:
    """A notification shown to the user (kept in `DmemChatApp.notices`)."""

    message: str
    title: str
    severity: str


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
    session: "ChatSession"
    info: "SessionInfo"
    snapshots: list[str]
    messages: list[dict[str, str]]
    reply_tokens: list[int]


class DmemChatApp(App[int]):
    """Chat with a δ-mem model; the memory panel shows what it has written."""

    CSS_PATH = Path(__file__).with_name("app.tcss")
    TITLE = "dmem-chat"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    BINDINGS = [
        Binding("escape", "escape", "Stop/close"),
        Binding("ctrl+c", "interrupt", "Stop", show=False, priority=True),
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
    WIDE = 100  # narrower terminals show the conversation only (Ctrl+B swaps in the panel)

    def __init__(self, model_path: Union[str, Path], memory: Union["MemoryFile", str, Path,
                                                                   None] = None, *,
                 open_session: Optional[Callable[[], "ChatSession"]] = None,
                 sampling: Optional[Sampling] = None, system: Optional[str] = None,
                 max_kv_tokens: Optional[int] = None, read_only: bool = False,
                 startup_hint: Optional[str] = None, model_name: Optional[str] = None,
                 blas: str = "", signals_received: Optional[list[int]] = None,
                 memory_note: Optional[str] = None) -> None:
        """model_path: a converted model directory. memory: an open `MemoryFile`, a path to open
        (a lock held elsewhere is then reported in the app), or None for no file.
        open_session: replaces the loading step (a callable returning a ChatSession).
        startup_hint: a warning shown once the model is loaded (e.g. the OpenBLAS hint).
        model_name: shown in the header (default: the directory's name). blas: the BLAS in use,
        shown in the panel. signals_received: QUIT_SIGNALS that came before the app ran (it
        quits at once for one of them). memory_note: a line shown above the first words on a
        new memory (e.g. that an earlier demo model's memory is kept elsewhere)."""
        super().__init__()
        self.model_path = Path(model_path)
        self.model_name = model_name or self.model_path.name
        self.memory = memory
        self.sampling = sampling or Sampling()
        self.system = system
        self.max_kv_tokens = max_kv_tokens
        self.start_read_only = read_only
        self.startup_hint = startup_hint
        self.memory_note = memory_note
        self.blas = blas
        self._open_session = open_session or self._load_session
        self.session: Optional["ChatSession"] = None
        self.snapshot_names: list[str] = []
        self.start_error: Optional[str] = None
        self.unsaved_at_exit: Optional[str] = None  # a failed save that closing could not redo
        self.marked_unsaved = False  # replies on screen are marked NOT_SAVED
        self.ready = False  # loaded, and the conversation and its notes are on screen
        self.replies_finished = 0  # count of replies done (finished, stopped or failed)
        self.commands_finished = 0  # count of slash commands done (run or failed)
        self.last_reply: Optional["ReplyStats"] = None
        self.last_info: Optional["SessionInfo"] = None
        self.notices: list[Notice] = []
        self.panel_open: Optional[bool] = None  # None: shown when the terminal is wide
        self.pending: list[str] = []  # sent while the model loaded: submitted once it is ready
        self._stop = threading.Event()
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dmem-engine")
        self._session_closed = False
        self._signals_received = signals_received if signals_received is not None else []
        self._signal_handlers: dict[int, object] = {}  # signal → the handler before the app's
        self._hung_up = False

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                with ChatView(id="conversation"):
                    # a still note, no animation: redrawing would take the GIL (and a core)
                    # from the engine thread importing mlx-lm
                    yield Note(f"loading {self.model_name} … (you can type already)",
                               id="loading-note")
                yield ModeBar(id="mode-bar")
                yield ChatInput(id="input", show_line_numbers=False,
                                placeholder="Message — Enter sends, Ctrl+J new line, /help")
            yield MemoryPanel(self.blas, id="memory-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.model_name
        self.layout_panel()
        self.chat_input.focus()
        self.quit_on_signals()
        self.load()

    def on_resize(self, event: events.Resize) -> None:
        self.call_after_refresh(self.layout_panel)  # once the app has taken the new size

    @property
    def chat_input(self) -> ChatInput:
        return self.query_one(ChatInput)

    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def narrow(self) -> bool:
        return self.size.width < self.WIDE

    def layout_panel(self) -> None:
        """Wide: panel beside the chat unless hidden. Narrow: the chat, or the panel alone."""
        shown = self.panel_open if self.panel_open is not None else not self.narrow
        panel = self.query_one(MemoryPanel)
        panel.display = shown
        self.query_one("#chat").display = not (shown and self.narrow)
        panel.screen.set_class(shown and not self.narrow, "-panel-beside")  # (notifications)
        self.query_one(Footer).compact = self.narrow  # every key fits in 80 columns
        if not self.query_one("#chat").display:
            panel.focus()
        elif self.focused is None or self.focused is panel and not shown:
            self.chat_input.focus()

    def notify(self, message: str, *, title: str = "", severity: str = "information",
               timeout: Optional[float] = None, markup: bool = True) -> None:
        """Textual's notification, also kept in `notices`."""
        self.notices.append(Notice(message, title, severity))
        super().notify(message, title=title, severity=severity,  # type: ignore[arg-type]
                       timeout=timeout, markup=markup)

    def on_key(self, event: events.Key) -> None:
        """Typing while the focus is elsewhere on the main screen (the panel …) goes to the input;
        typed while the panel fills a narrow terminal, it brings the chat back first. Typed while
        a dialog is open (a confirmation, help, history: none takes text), characters and
        Backspace edit the input behind it, so nothing typed is lost; the dialog's own keys (Tab,
        ←/→, Enter, Escape, the arrows) stay the dialog's."""
        if isinstance(self.screen, TYPING_THROUGH):
            if event.is_printable and event.character or event.key == "backspace":
                event.stop()
                if event.key == "backspace":
                    self.chat_input.action_delete_left()
                else:
                    self.chat_input.insert(event.character or "")
            return
        if not (event.is_printable and event.character and len(self.screen_stack) == 1
                and self.focused is not self.chat_input):
            return
        event.stop()
        if not self.query_one("#chat").display:
            self.panel_open = False
            self.layout_panel()
        self.chat_input.focus()
        self.chat_input.insert(event.character)

    # ---------------------------------------------------------------- engine
    async def on_engine(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the engine thread (the only thread that touches MLX)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine, partial(fn, *args))

    def _load_session(self) -> "ChatSession":
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
        messages = session.messages
        return Loaded(session, session.info(), list(session.snapshots()), messages,
                      self._reply_tokens(messages))

    def _reply_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Engine thread (the tokenizer is not shared across threads): the length in tokens of
        each reply in `messages`, in order, as the tokenizer spells it."""
        tokenizer = self.live.tokenizer
        return [len(tokenizer.encode(m["content"], add_special_tokens=False))
                for m in messages if m["role"] == "assistant"]

    async def show_transcript(self) -> None:
        """Show the session's conversation (after a command changed it)."""
        messages = self.live.messages
        await self.chat_view.show_transcript(
            messages, await self.on_engine(self._reply_tokens, messages))

    @work(group="load")
    async def load(self) -> None:
        try:
            loaded = await self.on_engine(self._start)
        except Exception as exc:  # shown in the app; dmem-chat repeats it on stderr, exit 1
            self.session = None
            self.start_error = str(exc)
            self.query_one("#loading-note", Note).update(
                f"Could not start: {exc}\nCtrl+Q quits.")
            self.query_one("#loading-note", Note).add_class("error")
            self.notify(str(exc), title="Could not start", severity="error", timeout=30)
            return
        if self._session_closed:  # quitting (Ctrl+Q or a signal while it loaded)
            return
        await self.query_one("#loading-note").remove()
        self.snapshot_names = loaded.snapshots
        await self.chat_view.show_transcript(loaded.messages, loaded.reply_tokens)
        self.show_info(loaded.info)
        info = loaded.info
        where = info.memory_path or "nowhere (this chat is not saved)"
        if info.turns or info.tokens_written:
            await self.add_note(f"memory loaded: {info.tokens_written:,} tokens written over "
                                f"{plural(info.turns, 'turn')} — {where}\nThe last conversation "
                                "goes on; Ctrl+N starts a new one with only the memory.")
        else:
            if self.memory_note:
                await self.add_note(self.memory_note, "yellow")
            await self.add_note(f"new memory — {where}. {self.greeting()}")
        if info.read_only:
            await self.add_note("read-only: nothing you say now is written or saved", "yellow")
        if self.startup_hint:
            self.notify(self.startup_hint, severity="warning", timeout=15)
        self.ready = True
        if any(m["role"] != "system" for m in loaded.messages):
            self.read_context()
        pending, self.pending = self.pending, []
        for text in pending:
            self.submit_text(text, queued=True)

    @work(group="context")
    async def read_context(self) -> None:
        """After loading: read the conversation into the KV context in the background (the
        next turn would do it first; a message sent meanwhile waits for it), then show the
        context as it is. Quitting stops it."""
        from dmem_mlx.errors import DmemError

        try:
            await self.on_engine(self.live.read_context, self._stop.is_set)
        except DmemError:
            return  # the next turn reads it again and says what is wrong
        if self.is_running and not self._session_closed:
            await self.refresh_info()

    def greeting(self) -> str:
        """What to tell on a new memory: for the demo, the kinds of things it can remember."""
        from dmem_mlx.demo import DEMO_GREETING, DEMO_NAME

        if self.model_name == DEMO_NAME:
            return DEMO_GREETING
        return "Tell me about yourself; I will remember it next time."

    def not_ready(self) -> str:
        if self.start_error:
            return f"could not start ({self.start_error}); Ctrl+Q quits"
        return "the model is still loading"

    def show_info(self, info: "SessionInfo") -> None:
        self.last_info = info
        if self.marked_unsaved and self.session is not None and self.session.save_error is None:
            self.saved_again()
        self.query_one(MemoryPanel).show(info)
        file = self.session.memory if self.session is not None else None
        self.query_one(ModeBar).show_mode(info.read_only, file is not None and file.read_only)
        memory = Path(info.memory_path).name if info.memory_path else "no memory file"
        self.sub_title = " · ".join([self.model_name, memory] +
                                    (["read-only"] if info.read_only else []))

    def saved_again(self) -> None:
        """A save went through after one failed: the replies marked "not saved" are in the
        file now; their mark goes."""
        self.marked_unsaved = False
        for reply in self.query(AssistantMessage):
            footer = str(reply.border_subtitle or "")
            if footer.endswith(NOT_SAVED):
                reply.border_subtitle = footer[:-len(NOT_SAVED)].removesuffix(" · ")
        self.notify("the memory is saved again, with the turns the failed save had left",
                    title="Saved", timeout=8)

    async def refresh_info(self) -> None:
        assert self.session is not None
        self.show_info(await self.on_engine(self.session.info))

    # ---------------------------------------------------------------- conversation
    async def add_note(self, text: str, style: str = "") -> None:
        await self.chat_view.add_note(text, style)

    @on(ChatInput.Submitted)
    def submitted(self, event: ChatInput.Submitted) -> None:
        self.submit_text(event.text)

    def submit_text(self, raw: str, queued: bool = False) -> None:
        """A message or a command taken from the input; what cannot run now goes back into it
        (so that keys typed ahead land in an empty input, never in a command or a dialog).
        queued: sent while the model loaded (given back after earlier ones, not before)."""
        text = raw.strip()
        if not text:
            return
        if self.session is None and not self.start_error:  # loading: in order, once loaded
            self.pending.append(raw)
            self.notify("the model is still loading: sent as soon as it is ready")
            return
        if text.startswith("/"):
            try:
                command, argument = parse_command(text)
            except CommandError as exc:
                self.notify(str(exc), severity="error")
                self.chat_input.give_back(raw, queued)
                return
            if command.name not in BUSY_OK and not self.can_run(command.name):
                self.chat_input.give_back(raw, queued)
                return
            self.run_command(command.name, argument)
            return
        if self.session is None:
            self.chat_input.give_back(raw, queued)
            self.notify(self.not_ready(), severity="error")
            return
        if self.replying or self.command_running:
            self.chat_input.give_back(raw, queued)
            self.notify("a reply is streaming: your message stays in the input, for Enter once "
                        "the reply ends (Escape or Ctrl+C stops the reply)" if self.replying
                        else "a command is still running: your message is kept in the input",
                        severity="warning")
            return
        self.start_reply(text)

    @property
    def command_running(self) -> bool:
        return any(not w.is_finished for w in self.workers if w.group == "command")

    def start_reply(self, text: str, temp: Optional[float] = None) -> None:
        self.replying = True
        self._stop.clear()
        self.generate(text, temp)

    def _reply(self, text: str, buffer: ReplyBuffer, temp: Optional[float]
               ) -> tuple["ReplyStats", "SessionInfo", Optional[str]]:
        """Engine thread: stream the reply into `buffer`; the runtime saves the memory after it
        → (stats, info, why the memory could not be saved or None: the turn is kept anyway)."""
        assert self.session is not None
        s = self.sampling
        seed = s.seed if temp is None else None
        unsaved = None
        try:
            for chunk in self.session.reply(text, max_tokens=s.max_tokens,
                                            temp=s.temp if temp is None else temp,
                                            top_p=s.top_p, seed=seed, stop=self._stop):
                buffer.append(chunk.text)
        except MemorySaveError as exc:
            unsaved = exc.reason or str(exc)
        assert self.session.last_reply is not None
        return self.session.last_reply, self.session.info(), unsaved

    @work(group="reply")
    async def generate(self, text: str, temp: Optional[float] = None) -> None:
        user, reply = await self.chat_view.add_turn(text)
        self.post_message(ReplyStarted(text, user, reply))
        await asyncio.sleep(0)  # draw the turn, then decode
        buffer = ReplyBuffer()
        future = asyncio.ensure_future(self.on_engine(self._reply, text, buffer, temp))
        pacer = FlushPacer(self.FLUSH_SECONDS, self.FLUSH_LONGEST, self.UI_CPU_SHARE)
        while not future.done():
            await asyncio.wait({future}, timeout=pacer.next_interval())
            await reply.write(buffer.take())
        await reply.write(buffer.take())
        try:
            stats, info, unsaved = future.result()
        except Exception as exc:  # the runtime took the turn back; say what happened
            self.post_message(ReplyFinished(text, user, reply, None, None, exc))
            return
        self.post_message(ReplyFinished(text, user, reply, stats, info, unsaved=unsaved))

    @on(ReplyFinished)
    async def reply_finished(self, event: ReplyFinished) -> None:
        try:
            if self._session_closed:  # quitting: the runtime kept (and saved) what it keeps
                return
            if event.error is not None or (event.stats is not None and event.stats.taken_back):
                await self.take_back_turn(event)
                return
            stats = event.stats
            assert stats is not None and event.info is not None
            self.last_reply = stats
            marks = [mark for mark, on in (("stopped", stats.stopped),
                                           ("cut: repeating", stats.finish_reason == "repetition"),
                                           ("read-only", event.info.read_only),
                                           (NOT_SAVED, event.unsaved is not None)) if on]
            if event.reply.text != stats.text:  # a loop cut; text a detokenizer changed later
                await event.reply.show_text(stats.text)  # the screen ends as the memory keeps it
            tokens = stats.tokens
            if stats.finish_reason == "repetition":  # the length of what was kept, as restored
                [tokens] = await self.on_engine(self._reply_tokens,
                                                [{"role": "assistant", "content": stats.text}])
            await event.reply.finish(reply_footer(tokens, stats.tokens_per_sec, *marks))
            if stats.memory_only_parts:
                kept = len(event.text) - stats.memory_only_chars
                event.user.border_subtitle = memory_only_footer(stats.memory_only_chars)
                await self.add_note(
                    f"Your message ({len(event.text):,} characters) did not fit the context "
                    f"budget of {event.info.kv_budget:,} tokens: its first "
                    f"{stats.memory_only_chars:,} characters "
                    f"({plural(stats.memory_only_parts, 'part')}, "
                    f"{stats.memory_only_tokens:,} tokens) were written into the memory only; "
                    f"the reply saw the last {kept:,} characters in context.", "yellow")
            if stats.finish_reason == "repetition":
                await self.add_note("The reply went round in circles: cut, and its repeats left "
                                    "out of the memory. /undo takes the exchange back; /retry "
                                    "tries again.", "yellow")
            if event.unsaved is not None:
                self.marked_unsaved = True
                await self.add_note(unsaved_note(event.unsaved), "bold red")
            self.show_info(event.info)
        finally:
            self.replying = False
            self.replies_finished += 1

    async def take_back_turn(self, event: ReplyFinished) -> None:
        """The runtime kept nothing of this turn: remove it and give the text back."""
        await event.user.remove()
        await event.reply.remove()
        self.chat_input.give_back(event.text)
        if event.error is not None:
            self.notify(f"{event.error} — your message is back in the input",
                        title="Not sent", severity="error", timeout=15)
        else:
            self.notify("stopped before the reply began: nothing was kept; your message is "
                        "back in the input", title="Stopped", timeout=8)
        self.chat_input.focus()
        if self.session is not None:
            await self.refresh_info()

    # ---------------------------------------------------------------- commands
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for command in COMMANDS:
            if command.name in ("restore", "help", "quit", "panel"):
                continue
            yield SystemCommand(command.title, command.help,
                                partial(self.palette_command, command.name))
        for name in self.snapshot_names:
            yield SystemCommand(f"Restore snapshot: {name}", "go back to this snapshot "
                                "(asks first)", partial(self.run_command, "restore", name))

    def palette_command(self, name: str) -> None:
        """From the palette: run it, or for commands with an argument, type it for the user."""
        if BY_NAME[name].argument:
            self.chat_input.text = f"/{name} "
            self.chat_input.move_cursor(self.chat_input.document.end)
            self.chat_input.focus()
        elif name in BUSY_OK or self.can_run(name):
            self.run_command(name, "")

    def can_run(self, name: str) -> bool:
        if self.command_running:
            self.notify(f"/{name} must wait: a command is still running", severity="warning")
            return False
        if self.session is None:
            self.notify(self.not_ready(), severity="warning")
            return False
        if self.replying:
            self.notify(f"/{name} must wait: a reply is streaming (Escape stops it)",
                        severity="warning")
            return False
        return True

    @work(group="command")
    async def run_command(self, name: str, argument: str = "") -> None:
        try:
            await getattr(self, f"command_{name.replace('-', '_')}")(argument)
        except MemorySaveError as exc:  # done in the session, not on disk: show it as it is
            await self.show_transcript()
            await self.add_note(unsaved_note(exc.reason or str(exc), f"/{name} is done, but "),
                                "bold red")
            await self.refresh_info()
        except Exception as exc:  # runtime errors (missing snapshot, locked file …) → notification
            self.notify(str(exc), title=f"/{name} failed", severity="error", timeout=10)
        finally:
            self.commands_finished += 1
            self.refocus()

    def refocus(self) -> None:
        """Focus back on the input, when the main screen shows the chat."""
        if len(self.screen_stack) == 1 and self.is_running and self.query_one("#chat").display:
            self.chat_input.focus()

    async def confirm(self, question: str, yes: str) -> bool:
        return bool(await self.push_screen_wait(ConfirmScreen(question, yes=yes)))

    @property
    def live(self) -> "ChatSession":
        assert self.session is not None
        return self.session

    async def show_conversation(self, note: str) -> None:
        """After a command changed the memory: its conversation, `note`, the panel."""
        await self.show_transcript()
        await self.add_note(note)
        await self.refresh_info()

    async def replace_memory(self, question: str, yes: str, done: str,
                             replace: Callable[..., object], *args: object) -> None:
        """Ask `question`; if confirmed, `replace(*args)` on the engine and say `done`."""
        if not await self.confirm(question, yes):
            return
        await self.on_engine(replace, *args)
        await self.show_conversation(done)

    async def command_new(self, _: str) -> None:
        await self.on_engine(self.live.new_conversation)
        await self.show_conversation("new conversation — the memory is kept (/history shows the "
                                     "earlier ones)")

    async def command_undo(self, _: str) -> None:
        step = await self.on_engine(self.live.undo)
        first = " ".join(step.user_text.split())
        await self.show_conversation(f"undone: “{first[:60]}{'…' if len(first) > 60 else ''}” "
                                     "— the memory, the conversation and the context are as "
                                     "before it")

    async def command_edit(self, _: str) -> None:
        if self.chat_input.text.strip():
            raise CommandError("the input is not empty: send or clear it first")
        step = await self.on_engine(self.live.undo)
        self.chat_input.give_back(step.user_text)
        await self.show_conversation("the last exchange was taken back; edit the message and "
                                     "press Enter")

    async def command_retry(self, _: str) -> None:
        step = await self.on_engine(self.live.undo)
        await self.show_transcript()
        temp = None
        if self.sampling.temp == 0:
            temp = RETRY_TEMP
            await self.add_note(f"retry: greedy decoding would give the same reply, so this one "
                                f"samples at temperature {RETRY_TEMP}")
        self.start_reply(step.user_text, temp)

    async def command_copy(self, _: str) -> None:
        replies = [m for m in (self.session.messages if self.session else [])
                   if m["role"] == "assistant"]
        if not replies:
            raise CommandError("no reply to copy yet")
        self.copy_to_clipboard(replies[-1]["content"])
        self.notify(f"last reply copied ({len(replies[-1]['content']):,} characters; through "
                    "the terminal — in tmux this needs `set -g set-clipboard on`)")

    async def command_history(self, _: str) -> None:
        if self.session is None:
            raise CommandError(self.not_ready())
        past = self.session.past_conversations() if self.replying else \
            await self.on_engine(self.session.past_conversations)
        await self.push_screen_wait(HistoryScreen(past))

    async def command_export(self, path: str) -> None:
        target = export_target(path)
        if target.exists() and not await self.confirm(f"{target} exists. Overwrite it?",
                                                      "Overwrite"):
            return
        messages = self.live.messages
        memory = self.last_info.memory_path if self.last_info else None
        write = transcript_json if target.suffix.lower() == ".json" else transcript_markdown
        target.write_text(write(messages, self.model_name, memory), encoding="utf-8")
        self.notify(f"conversation written to {target}")

    async def command_forget(self, _: str) -> None:
        snapshots = len(self.snapshot_names)
        if not await self.confirm(
                "Forget everything? The δ memory, this conversation, the past conversations and "
                "the undo history are erased; the memory file is overwritten and no backup is "
                "kept." + (f" Named snapshots ({snapshots}) stay." if snapshots else ""),
                "Forget"):
            self.notify("nothing forgotten")
            return
        await self.on_engine(self.live.forget)
        await self.show_conversation("memory erased")

    async def command_readonly(self, _: str) -> None:
        session = self.live
        if session.memory is not None and session.memory.read_only:
            raise CommandError("the memory was opened with --read-only: nothing can be written "
                               "to it; start dmem-chat without --read-only to write")

        def toggle() -> bool:
            session.read_only = not session.read_only
            return session.read_only
        read_only = await self.on_engine(toggle)
        await self.add_note("read-only from here: what you say is not written to memory"
                            if read_only else "writing again from here: what you say is "
                            "written to memory", "yellow" if read_only else "")
        await self.refresh_info()

    async def command_snapshot(self, name: str) -> None:
        if name in self.snapshot_names and not await self.confirm(
                f"Snapshot {name!r} exists. Replace it?", "Replace"):
            return
        await self.on_engine(self.live.snapshot, name)
        self.snapshot_names = list(await self.on_engine(self.live.snapshots))
        self.notify(f"snapshot {name!r} saved")

    async def command_restore(self, name: str) -> None:
        if name not in self.snapshot_names:
            listed = ", ".join(self.snapshot_names) or "none yet (/snapshot NAME)"
            raise CommandError(f"no snapshot {name!r}; snapshots: {listed}")
        await self.replace_memory(f"Restore snapshot {name!r}? The current memory is replaced "
                                  "(take a /snapshot first to keep it).", "Restore",
                                  f"restored snapshot {name!r}", self.live.restore, name)

    async def command_snapshots(self, _: str) -> None:
        self.snapshot_names = list(await self.on_engine(self.live.snapshots))
        await self.add_note("snapshots: " + (", ".join(self.snapshot_names) or "none"))

    async def command_export_memory(self, path: str) -> None:
        target = export_target(path)
        if target.exists() and not await self.confirm(f"{target} exists. Overwrite it?",
                                                      "Overwrite"):
            return
        await self.on_engine(self.live.export, target)
        self.notify(f"memory exported to {target}")

    async def command_import(self, path: str) -> None:
        source = Path(path).expanduser()
        if not source.is_file():
            raise CommandError(f"{source}: no such file")
        # a file that is damaged, not a memory or another model's is refused before the
        # question, not after the user has agreed to lose the current memory for it
        await self.on_engine(self.live.check_import, source)
        await self.replace_memory(f"Replace the current memory by {source}? (take a /snapshot "
                                  "first to keep it)", "Import", f"imported {source}",
                                  self.live.import_, source)

    async def command_info(self, _: str) -> None:
        await self.refresh_info()
        info = self.last_info
        assert info is not None
        budget = f"{info.kv_budget:,}" if info.kv_budget else "∞"
        await self.add_note(
            f"memory {info.memory_path or '(none)'} · {info.tokens_written:,} tokens written · "
            f"{plural(info.turns, 'turn')} ({info.turns_in_memory_only:,} only in memory) · "
            f"context {info.kv_tokens:,}/{budget} tokens · {plural(info.undo_depth, 'undo step')}"
            f" · {plural(info.past_conversations, 'past conversation')} · "
            f"{'read-only' if info.read_only else 'writing'}\n"
            f"system prompt: {info.system or 'none'}" + (f"\nBLAS: {self.blas}" if self.blas
                                                          else ""))

    async def command_panel(self, _: str) -> None:
        self.action_toggle_panel()

    async def command_help(self, _: str) -> None:
        self.action_help()

    async def command_quit(self, _: str) -> None:
        await self.action_quit()

    # ---------------------------------------------------------------- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> Optional[bool]:
        if action == "escape":
            return self.replying or self.waiting_to_send or (
                self.narrow and self.panel_open is True)
        return True

    def action_escape(self) -> None:
        if self.replying:
            self._stop.set()
        elif self.waiting_to_send:
            self.withdraw_pending()
        elif self.narrow and self.panel_open:
            self.action_toggle_panel()

    @property
    def waiting_to_send(self) -> bool:
        """Messages were sent while the model loads: they go out once it is ready."""
        return bool(self.pending)

    def withdraw_pending(self) -> None:
        """Escape or Ctrl+C while the model loads takes back what was sent meanwhile, as it
        stops a reply that has not begun: nothing is sent; the text goes back into the input
        (before anything typed since)."""
        pending, self.pending = self.pending, []
        self.chat_input.give_back("\n".join(pending))
        self.notify("not sent (the model was still loading): your message is back in the input",
                    title="Stopped", timeout=8)
        self.chat_input.focus()

    def action_interrupt(self) -> None:
        """Ctrl+C: stop a streaming reply; otherwise copy a selection, or say how to quit.
        A priority key, it comes ahead of keys typed before it that the input still holds (an
        Enter among them starts a reply): it is decided after them, in their order."""
        if self.replying:
            self._stop.set()
            return
        self.chat_input.call_later(self.call_later, self.interrupt_after_typed_keys)

    def interrupt_after_typed_keys(self) -> None:
        if self.replying:
            self._stop.set()
            return
        if self.waiting_to_send:
            self.withdraw_pending()
            return
        if self.focused is self.chat_input and self.chat_input.selected_text:
            self.chat_input.action_copy()
            return
        self.notify("Ctrl+Q quits (Ctrl+C stops a reply)")

    def action_toggle_panel(self) -> None:
        shown = self.query_one(MemoryPanel).display
        self.panel_open = not shown
        self.layout_panel()
        if not self.panel_open:
            self.chat_input.focus()

    def action_new_conversation(self) -> None:
        if self.can_run("new"):
            self.run_command("new")

    def action_toggle_read_only(self) -> None:
        if self.can_run("readonly"):
            self.run_command("readonly")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(help_markdown()), callback=lambda _: self.chat_input.focus())

    async def action_quit(self) -> None:
        """Stop a streaming reply (the runtime keeps what was said consistent), close, exit."""
        self._stop.set()
        await self.close_session()
        self.exit(return_code=1 if self.start_error else 0)

    def quit_on_signals(self) -> None:
        """SIGTERM and SIGHUP quit as Ctrl+Q does: the reply stops (the runtime keeps what was
        said and saves it), the memory is closed and its lock released, the terminal put back;
        dmem-chat then exits with 128 + the signal's number. Plain signal handlers, not the
        event loop's: they run even while the UI thread is stuck writing to a terminal that
        is gone."""
        self._event_loop = asyncio.get_running_loop()
        for signum in QUIT_SIGNALS:
            try:
                self._signal_handlers[signum] = signal.signal(signum, self.on_quit_signal)
            except ValueError:  # not the main thread: the defaults stay
                break
        if self._signals_received:
            self.on_quit_signal(self._signals_received[0], None)

    def on_quit_signal(self, signum: int, frame: object) -> None:
        """With the terminal still there (`kill PID`), the app quits through its event loop and
        puts the terminal back. With the terminal gone (its window closed: SIGHUP), the UI can
        no longer draw — its writes fail and then block — so the memory is closed from another
        thread, on the engine after the reply stops, and the process ends."""
        self._stop.set()
        if self.is_headless or terminal_present():
            self._event_loop.call_soon_threadsafe(self.call_later, self.quit_after_signal, signum)
        elif not self._hung_up:
            self._hung_up = True
            threading.Thread(target=self.close_and_exit, args=(128 + signum,),
                             name="dmem-hangup", daemon=True).start()

    async def quit_after_signal(self, signum: int) -> None:
        self._stop.set()
        await self.close_session()
        self.exit(return_code=128 + signum)

    def close_and_exit(self, code: int) -> None:
        """Close the memory on the engine thread (after what runs there now), then end the
        process at once: nothing is left to draw on, and the memory is saved and closed."""
        try:
            self._engine.submit(self._close_memory).result()
        except RuntimeError:  # the app closes already: wait for its close on the engine
            self._engine.shutdown(wait=True)
        finally:
            os._exit(code)

    def _close_memory(self) -> None:
        """Engine thread: release the memory (its lock file goes if nothing was written; a
        failed save is tried once more, and if it fails again dmem-chat says so at exit)."""
        if self.session is not None:
            self.session.close()
            if (error := self.session.save_error) is not None:
                self.unsaved_at_exit = (f"{self.session.memory.path}: could not be saved at exit "
                                        f"({error.reason or error}): what was said since its "
                                        "last save is lost; the file holds the memory as it was")
        elif self.memory is not None and not isinstance(self.memory, (str, Path)):
            self.memory.close()

    async def close_session(self) -> None:
        """Release the memory lock after the engine finishes (saves happen after every turn)."""
        if self._session_closed:
            return
        self._session_closed = True
        self._stop.set()
        try:
            await self.on_engine(self._close_memory)
        finally:
            self._engine.shutdown(wait=False)

    async def on_unmount(self) -> None:
        await self.close_session()
        for signum, previous in self._signal_handlers.items():  # back to what they were
            signal.signal(signum, previous)
        self._signal_handlers = {}
