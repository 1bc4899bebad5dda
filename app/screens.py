"""Modal screens: a confirmation for destructive commands, help, and past conversations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from .commands import as_sent

if TYPE_CHECKING:
    from dmem_mlx.runtime import PastConversation


class ConfirmScreen(ModalScreen[bool]):
    """Ask before something is destroyed; dismisses with True only when the destructive button
    is pressed. No letter answers it: Cancel has the focus, the other button takes Tab (or ←/→)
    then Enter, and it cannot be pressed during its first ARM_SECONDS — so keys typed ahead
    while the dialog was on its way (Enter included) can only cancel. Characters typed while it
    is open go on into the chat input behind it (the app's on_key), as its subtitle says."""

    ARM_SECONDS = 0.6
    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel"),
                Binding("left,right", "app.focus_next", "Other button", show=False)]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Grid(id="confirm-dialog"):
            yield Label(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button(self.yes, variant="error", id="confirm-yes", disabled=True)
                yield Button("Cancel", variant="primary", id="confirm-no")

    def on_mount(self) -> None:
        self.query_one("#confirm-dialog").border_subtitle = "Tab · Enter · Esc cancels · " \
                                                            "typing goes to your message"
        self.query_one("#confirm-no", Button).focus()
        self.set_timer(self.ARM_SECONDS, self.arm)

    def arm(self) -> None:
        self.query_one("#confirm-yes", Button).disabled = False

    @on(Button.Pressed)
    def answer(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm-yes")


class HelpScreen(ModalScreen[None]):
    """Commands and keys."""

    BINDINGS = [Binding("escape,f1", "dismiss(None)", "Close")]

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self.markdown = markdown

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog"):
            yield Markdown(self.markdown)


def conversation_title(k: int, conversation: "PastConversation") -> str:
    first = next((m["content"] for m in conversation.transcript if m["role"] == "user"), "")
    first = " ".join(first.split())
    when = (conversation.started or conversation.ended or "")[:16].replace("T", " ")
    turns = sum(role == "user" for role, _ in as_sent(conversation.transcript))
    return f"{k}. {when}  {turns} turn{'s' if turns != 1 else ''} · {first[:48]}"


class HistoryScreen(ModalScreen[None]):
    """The past conversations of this memory, newest first, read-only: pick one to read it.
    (They live on in the δ memory; only the current conversation is in the context.)"""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, past: list["PastConversation"]) -> None:
        super().__init__()
        self.past = past

    def compose(self) -> ComposeResult:
        with Vertical(id="history-dialog"):
            yield Label(f"past conversations of this memory ({len(self.past)}) — "
                        "read-only; Escape closes", id="history-title")
            options = [Option(conversation_title(k + 1, c), id=str(k))
                       for k, c in reversed(list(enumerate(self.past)))]
            yield OptionList(*options, id="history-list")
            with VerticalScroll(id="history-view"):
                yield Static(id="history-transcript")

    def on_mount(self) -> None:
        if not self.past:
            self.query_one("#history-transcript", Static).update(
                "No past conversations yet: Ctrl+N (/new) files the current one here.")
        self.query_one(OptionList).focus()

    @on(OptionList.OptionHighlighted)
    def show_conversation(self, event: OptionList.OptionHighlighted) -> None:
        conversation = self.past[int(event.option.id or 0)]
        text = Text()
        for role, parts in as_sent(conversation.transcript):
            if role == "system":
                text.append(f"system: {''.join(parts)}\n\n", "italic dim")
                continue
            text.append("you\n" if role == "user" else "assistant\n",
                        "bold blue" if role == "user" else "bold green")
            text.append("".join(parts) + "\n\n")
        self.query_one("#history-transcript", Static).update(text)
