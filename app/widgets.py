"""The widgets of dmem-chat: messages, the input box and the memory panel."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Label, Markdown, ProgressBar, Static, TextArea
from textual.widgets.markdown import MarkdownStream

from .heatmap import layer_norms, state_heatmap


class UserMessage(Markdown):
    """A user turn."""

    BORDER_TITLE = "you"


class AssistantMessage(Markdown):
    """An assistant turn; its text streams in through `stream`."""

    BORDER_TITLE = "assistant"

    def __init__(self, markdown: str = "", **kwargs: Any) -> None:
        super().__init__(markdown, **kwargs)
        self._stream: Optional[MarkdownStream] = None
        self.text = markdown

    async def write(self, fragment: str) -> None:
        """Append a fragment of the reply (fragments are coalesced when rendering lags)."""
        if self._stream is None:
            self._stream = self.get_stream(self)
        self.text += fragment
        await self._stream.write(fragment)

    async def finish(self, stats: str) -> None:
        """Flush the stream and show the reply's statistics under it."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if not self.text.strip():
            await self.update("*(empty reply)*")
        self.border_subtitle = stats


class Note(Static):
    """A one-line system note in the conversation (command results, loaded memory …)."""


class ChatInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter / Ctrl+J / Alt+Enter insert a newline."""

    NEWLINE_KEYS = ("shift+enter", "ctrl+j", "alt+enter")

    @dataclass
    class Submitted(Message):
        """The user pressed Enter; `text` is what they wrote."""

        chat_input: "ChatInput"
        text: str

    async def _on_key(self, event: events.Key) -> None:
        if self.read_only:
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        await super()._on_key(event)


def saved_when(when: Optional[datetime]) -> str:
    if when is None:
        return "not saved yet"
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fingerprint_lines(fingerprint: Any) -> str:
    """The model a memory belongs to, readable: base model, backbone, adapter hash, δ config."""
    if not fingerprint:
        return "—"
    if not isinstance(fingerprint, dict):
        return str(fingerprint)
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

    def compose(self) -> ComposeResult:
        yield Static("loading …", id="memory-counts")
        yield Label("context (KV tokens / budget)", classes="panel-heading")
        yield ProgressBar(id="context-bar", show_eta=False)
        yield Static(id="context-text")
        yield Label("state norm per layer", classes="panel-heading")
        yield Static(id="layer-norms")
        yield Label("state per layer (r×r)", classes="panel-heading")
        yield Static(id="state-heatmap")
        yield Label("memory file", classes="panel-heading")
        yield Static(id="memory-file")
        yield Label("model", classes="panel-heading")
        yield Static(id="fingerprint")

    def show(self, info: Any) -> None:
        """Redraw from a runtime `SessionInfo`."""
        mode = "[b red]read-only (incognito)[/]" if info.read_only else "[green]writing[/]"
        size = getattr(info, "memory_bytes", 0)
        self.query_one("#memory-counts", Static).update(
            f"tokens written  [b]{info.tokens_written:,}[/]\n"
            f"turns           [b]{info.turns:,}[/]\n"
            f"only in memory  [b]{info.turns_in_memory_only:,}[/] turns\n"
            + (f"δ state         [b]{size:,}[/] bytes\n" if size else "")
            + f"mode            {mode}")
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
        self.query_one("#memory-file", Static).update(Text(
            f"{info.memory_path or 'none (not saved)'}\n"
            f"saved {saved_when(info.last_saved)}"))
        self.query_one("#fingerprint", Static).update(Text(fingerprint_lines(info.fingerprint)))
