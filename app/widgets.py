"""The widgets of dmem-chat: the conversation, the input box and the memory panel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Label, Markdown, ProgressBar, Static, TextArea

from .commands import as_sent
from .heatmap import layer_norms, state_heatmap

if TYPE_CHECKING:
    from dmem_mlx.runtime import ReplyStats, SessionInfo


class UserMessage(Static):
    """A user turn, shown exactly as typed (never parsed as Markdown or markup)."""

    BORDER_TITLE = "you"

    def __init__(self, text: str, **kwargs: object) -> None:
        super().__init__(Text(text), **kwargs)  # type: ignore[arg-type]
        self.text = text


class AssistantMessage(Markdown):
    """An assistant turn (Markdown); its text streams in through `write`."""

    BORDER_TITLE = "assistant"

    def __init__(self, markdown: str = "", **kwargs: object) -> None:
        super().__init__(markdown, **kwargs)  # type: ignore[arg-type]
        self.text = markdown

    async def write(self, fragment: str) -> None:
        """Append a fragment of the reply (the app batches fragments between screen updates)."""
        if fragment:
            self.text += fragment
            await self.append(fragment)

    async def show_text(self, text: str) -> None:
        """Show `text` instead of what streamed (a looping reply cut to what was kept)."""
        self.text = text
        await self.update(text)

    async def finish(self, stats: Optional[str]) -> None:
        """Show the reply's statistics under it."""
        if not self.text.strip():
            await self.update("*(empty reply)*")
        self.border_subtitle = stats


def reply_footer(tokens: int, tokens_per_sec: Optional[float] = None, *marks: str) -> str:
    """The line under a reply: "12 tokens · 67.4 tok/s · stopped"; the speed is known for a
    reply made in this run only, and not for an empty one (the model ended at once)."""
    parts = [f"{tokens:,} token" + ("" if tokens == 1 else "s")]
    if tokens_per_sec is not None and tokens:
        parts.append(f"{tokens_per_sec:.1f} tok/s")
    return " · ".join([*parts, *marks])


def memory_only_footer(chars: int) -> str:
    """The line under a message too long for the context: its leading `chars` characters were
    written into the memory only."""
    return f"first {chars:,} characters in memory only"


def unsaved_note(reason: str, done: str = "") -> str:
    """What to say when the memory file could not be written (`reason`: "No space left on
    device" …) after a turn, or after a command (`done`: "/undo is done, but ")."""
    head = f"{done}the memory could not be saved" if done else "The memory could not be saved"
    return (f"{head}: {reason}. Nothing is lost yet: this session keeps it, and the next save "
            "writes it (after your next message, or when you quit); until then the memory file "
            "holds the memory as it was before.")


class Note(Static):
    """A system note in the conversation (command results, loaded memory …)."""


class ModeBar(Static):
    """One line above the input, shown while nothing is written to memory (read-only): a mode
    lasts, so it is laid out with the chat rather than told in a notification that goes."""

    def show_mode(self, read_only: bool, file_read_only: bool) -> None:
        """read_only: turns are not written; file_read_only: the memory file itself was opened
        read-only (`--read-only`), so Ctrl+R cannot switch writing back on."""
        self.display = read_only
        if file_read_only:
            self.update("read-only (--read-only): nothing you say is written or saved")
        else:
            self.update("read-only: nothing you say is written to memory — Ctrl+R writes again")


class ChatView(VerticalScroll):
    """The conversation: user and assistant turns and notes, kept scrolled to the newest."""

    can_focus = False

    def on_mount(self) -> None:
        self.anchor()

    async def add_note(self, text: str, style: str = "") -> Note:
        note = Note(Text(text, style))
        await self.mount(note)
        return note

    async def add_turn(self, text: str) -> tuple[UserMessage, AssistantMessage]:
        """A user turn and the (empty) reply box that its reply streams into."""
        user, reply = UserMessage(text), AssistantMessage()
        await self.mount_all([user, reply])
        self.anchor()
        return user, reply

    async def show_transcript(self, messages: list[dict[str, str]],
                              reply_tokens: Optional[list[int]] = None) -> None:
        """Replace the conversation by `messages` ({"role", "content"}; system prompts skipped),
        each message as it was sent (`as_sent`: one written in parts is one). The turns that
        stay as they were on screen keep their footers (a reply's speed, a stop); a reply shown
        anew (from the memory file) gets the footer of its length in tokens: `reply_tokens`,
        one per reply in order, when given."""
        shown = [(type(w), w.text, w.border_subtitle) for w in self.children
                 if isinstance(w, (UserMessage, AssistantMessage))]
        await self.remove_children()
        tokens = iter(reply_tokens or [])
        widgets: list[Union[UserMessage, AssistantMessage]] = []
        same = True  # the turns so far are those on screen
        for role, parts in as_sent(messages):
            text, footer = "".join(parts), None
            widget: Union[UserMessage, AssistantMessage]
            if role == "user":
                widget = UserMessage(text)
                if len(parts) > 1:  # its leading parts went into the memory only
                    footer = memory_only_footer(len(text) - len(parts[-1]))
            elif role == "assistant":
                widget = AssistantMessage(text)
                count = next(tokens, None)
                footer = None if count is None else reply_footer(count)
            else:
                continue
            k = len(widgets)
            same = same and k < len(shown) and shown[k][:2] == (type(widget), text)
            widget.border_subtitle = shown[k][2] if same else footer
            widgets.append(widget)
        if widgets:
            await self.mount_all(widgets)
        for widget in widgets:
            if isinstance(widget, AssistantMessage) and not widget.text.strip():
                await widget.finish(widget.border_subtitle)


class ReplyStarted(Message):
    """A reply began streaming into `reply` (the answer to `text`)."""

    def __init__(self, text: str, user: UserMessage, reply: AssistantMessage) -> None:
        super().__init__()
        self.text, self.user, self.reply = text, user, reply


class ReplyFinished(Message):
    """A reply ended: `stats` (finished, stopped, cut or taken back) and the session's `info`,
    or the `error` that ended it (the runtime then took the turn back). `unsaved`: why the
    memory file could not be written after the turn (the turn is kept all the same)."""

    def __init__(self, text: str, user: UserMessage, reply: AssistantMessage,
                 stats: Optional["ReplyStats"], info: Optional["SessionInfo"],
                 error: Optional[BaseException] = None, unsaved: Optional[str] = None) -> None:
        super().__init__()
        self.text, self.user, self.reply = text, user, reply
        self.stats, self.info, self.error, self.unsaved = stats, info, error, unsaved


def binding_actions(bindings: list) -> dict[str, str]:
    """key → action of a widget class's BINDINGS (Binding objects or (key, action, …) tuples)."""
    actions = {}
    for binding in bindings:
        keys, action = (binding.key, binding.action) if isinstance(binding, Binding) \
            else binding[:2]
        actions.update(dict.fromkeys((k.strip() for k in keys.split(",")), action))
    return actions


# The input's editing and cursor keys (TextArea's bindings), minus what the app binds itself.
EDITING_KEYS = {key: action for key, action in binding_actions(TextArea.BINDINGS).items()
                if key not in ("ctrl+c", "super+c")}


class ChatInput(TextArea):
    """Multi-line input. Enter sends (the input is emptied at once; the app gives back what it
    cannot run); Ctrl+J adds a line in every terminal, and so do
    Shift+Enter and Alt+Enter where the terminal reports them as such (most send plain Enter);
    a line ending in a backslash followed by Enter also becomes a new line."""

    NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")

    @dataclass
    class Submitted(Message):
        """The user pressed Enter; `text` is what they wrote."""

        chat_input: "ChatInput"
        text: str

    async def on_key(self, event: events.Key) -> None:
        """Enter, the newline keys and the editing keys, handled in the input's own queue (so in
        the order typed, with the characters around them) ahead of TextArea's default handling.
        TextArea's own bindings (Backspace, Delete, Ctrl+U, the arrows …) would otherwise run
        only once the key has bubbled up to the app, after characters typed later."""
        if self.read_only:
            return
        editing = next((EDITING_KEYS[k] for k in event.aliases if k in EDITING_KEYS), None)
        if editing is not None:
            event.prevent_default()
            event.stop()
            await self.run_action(editing)
            return
        if event.key not in ("enter", *self.NEWLINE_KEYS):
            return
        event.prevent_default()
        event.stop()
        if event.key != "enter":
            self.new_line(*self.selection)
            return
        row, column = self.cursor_location
        line = self.document.get_line(row)
        if column > 0 and line[column - 1] == "\\" and self.selection.is_empty:
            self.new_line((row, column - 1), (row, column))
            return
        text = self.text
        if text.strip():
            self.clear()  # what is typed next starts afresh; the app gives back what it refuses
            # straight to the app, ahead of keys typed after Enter: those still wait in this
            # input's queue, and an Escape among them must find the reply started
            self.app.post_message(self.Submitted(self, text))

    def new_line(self, start: tuple[int, int], end: tuple[int, int]) -> None:
        """Replace `start`…`end` by a line break; the cursor's new line is scrolled into view
        once the input has grown (scrolled at once, a new last line would stay hidden below
        the input's height limit)."""
        self.replace("\n", start, end, maintain_selection_offset=False)
        self.call_after_refresh(self.scroll_cursor_visible)

    def give_back(self, text: str, at_end: bool = False) -> None:
        """Put `text` back into the input: before anything typed since it was sent, or after
        what is there (`at_end`, for texts given back in the order they were sent)."""
        rest = self.text
        if not rest.strip():
            self.text = text
        else:
            self.text = f"{rest}\n{text}" if at_end else f"{text}\n{rest}"
        self.move_cursor(self.document.end)
        self.call_after_refresh(self.scroll_cursor_visible)  # once the input has grown


def last_save(info: "SessionInfo") -> Text:
    """The memory file's last save ("not saved yet" for a new file); in red while the file is
    behind (a save failed): since when, and why."""
    when = info.last_saved.astimezone().strftime("%Y-%m-%d %H:%M:%S") if info.last_saved else ""
    if info.save_error is not None:
        return Text(f"not saved {f'since {when}' if when else 'yet'}: {info.save_error}",
                    "bold red")
    return Text(f"saved {when}" if when else "not saved yet")


def fingerprint_lines(fingerprint: dict) -> str:
    """The model a memory belongs to, readable: base model, backbone, adapter hash, δ config."""
    if not fingerprint:
        return "—"
    lines = []
    for key, value in fingerprint.items():
        if key == "adapter_sha256" and isinstance(value, str):
            value = value[:16]
        elif key == "delta_config" and isinstance(value, dict):
            layers = value.get("layers")
            value = " · ".join(filter(None, [
                f"r={value.get('rank')}", f"{value.get('num_state_heads')} head(s)",
                f"{len(layers)} layers" if isinstance(layers, list) else None,
                value.get("memory_write_granularity"),
                "Δ " + ",".join(value["delta_heads"]) if value.get("delta_heads") else None]))
        elif value is None:
            value = "unknown"
        lines.append(f"{key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


class MemoryPanel(VerticalScroll):
    """What the assistant remembers: δ state per layer, counts, context use, file and model."""

    BORDER_TITLE = "δ memory"

    def __init__(self, blas: str = "", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.blas = blas

    def compose(self) -> ComposeResult:
        yield Static("loading …", id="memory-counts")
        yield Label("context (KV tokens / budget)", classes="panel-heading")
        yield ProgressBar(id="context-bar", show_eta=False)
        yield Static(id="context-text")
        yield Label("state norm per layer", classes="panel-heading")
        yield Static(id="layer-norms")
        yield Label("state per layer (r×r)", classes="panel-heading")
        yield Static(id="state-heatmap")
        yield Label("system prompt", classes="panel-heading")
        yield Static(id="system-prompt")
        yield Label("memory file", classes="panel-heading")
        yield Static(id="memory-file")
        yield Label("model", classes="panel-heading")
        yield Static(id="fingerprint")

    def show(self, info: "SessionInfo") -> None:
        """Redraw from a runtime `SessionInfo`."""
        mode = "[b red]read-only (incognito)[/]" if info.read_only else "[green]writing[/]"
        self.query_one("#memory-counts", Static).update(
            f"tokens written  [b]{info.tokens_written:,}[/]\n"
            f"turns           [b]{info.turns:,}[/]\n"
            f"only in memory  [b]{info.turns_in_memory_only:,}[/] "
            f"turn{'' if info.turns_in_memory_only == 1 else 's'}\n"
            + (f"δ state         [b]{info.memory_bytes:,}[/] bytes\n" if info.memory_bytes else "")
            + f"undo steps      [b]{info.undo_depth}[/]\n"
            f"past chats      [b]{info.past_conversations}[/]\n"
            f"mode            {mode}")
        bar = self.query_one("#context-bar", ProgressBar)
        budget = info.kv_budget or 0
        bar.update(total=budget or None, progress=min(info.kv_tokens, budget or info.kv_tokens))
        self.query_one("#context-text", Static).update(
            f"{info.kv_tokens:,} / {budget:,} tokens" if budget else f"{info.kv_tokens:,} tokens")
        bars, top = layer_norms(info.layer_states)
        self.query_one("#layer-norms", Static).update(
            Text.assemble(bars, (f"  max {top:.3g}", "dim")))
        heatmap = self.query_one("#state-heatmap", Static)
        width = heatmap.size.width or 36
        heatmap.update(state_heatmap(info.layer_states, width))
        self.query_one("#system-prompt", Static).update(Text(info.system or "none", "italic"))
        self.query_one("#memory-file", Static).update(Text.assemble(
            f"{info.memory_path or 'none (not saved)'}\n", last_save(info)))
        self.query_one("#fingerprint", Static).update(Text(
            fingerprint_lines(info.fingerprint) + (f"\nBLAS: {self.blas}" if self.blas else "")))
