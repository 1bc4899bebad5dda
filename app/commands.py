"""Slash commands (typed in the input) and the same commands in Textual's command palette."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Optional

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from .app import DmemChatApp


@dataclass(frozen=True)
class Command:
    name: str
    title: str
    help: str
    argument: Optional[str] = None  # name of the required argument, if any


COMMANDS = [
    Command("new", "New conversation", "start a new conversation; the memory is kept"),
    Command("forget", "Forget everything", "erase the memory and the conversation (asks first)"),
    Command("readonly", "Toggle read-only", "incognito turns: nothing is written to memory"),
    Command("snapshot", "Snapshot memory", "save the memory under a name", "NAME"),
    Command("restore", "Restore snapshot", "go back to a named snapshot (asks first)", "NAME"),
    Command("snapshots", "List snapshots", "list the named snapshots"),
    Command("export", "Export memory", "copy the memory file to PATH", "PATH"),
    Command("import", "Import memory", "replace the memory by the file at PATH (asks first)", "PATH"),
    Command("info", "Memory info", "counts, context use, file and model of the memory"),
    Command("panel", "Toggle memory panel", "show or hide the memory panel"),
    Command("help", "Help", "commands and keys"),
    Command("quit", "Quit", "save and leave (the memory is saved after every turn)"),
]
BY_NAME = {command.name: command for command in COMMANDS}


class CommandError(ValueError):
    """A slash command that cannot run as typed; the message is shown to the user."""


def parse_command(text: str) -> tuple[Command, str]:
    """'/snapshot before trip' → (Command snapshot, 'before trip'). Raises CommandError."""
    name, _, argument = text.strip()[1:].partition(" ")
    name, argument = name.lower(), argument.strip()
    command = BY_NAME.get(name)
    if command is None:
        raise CommandError(f"unknown command /{name} — /help lists the commands")
    if command.argument and not argument:
        raise CommandError(f"/{name} needs {command.argument}: /{name} {command.argument}")
    if not command.argument and argument:
        raise CommandError(f"/{name} takes no argument")
    return command, argument


def help_markdown() -> str:
    rows = "\n".join(
        f"| `/{c.name}{' ' + c.argument if c.argument else ''}` | {c.help} |" for c in COMMANDS)
    return (
        "# dmem-chat\n\nA local assistant whose δ memory lives in a file: what you tell it is "
        "written into a small state per layer and kept across restarts.\n\n"
        "## Commands\n\n| command | what it does |\n|---|---|\n" + rows + "\n\n"
        "## Keys\n\n| key | |\n|---|---|\n"
        "| `Enter` | send |\n| `Shift+Enter`, `Ctrl+J`, `Alt+Enter` | new line |\n"
        "| `Escape` | stop the reply |\n| `Ctrl+B` | memory panel |\n"
        "| `Ctrl+N` | new conversation |\n| `Ctrl+R` | read-only toggle |\n"
        "| `Ctrl+P` | command palette |\n| `F1` | this help |\n| `Ctrl+Q` | quit |\n")


class MemoryCommands(Provider):
    """dmem-chat's commands in the command palette (plus one entry per snapshot to restore)."""

    @property
    def chat(self) -> "DmemChatApp":
        return self.app  # type: ignore[return-value]

    def _entries(self) -> list[tuple[str, str, object]]:
        entries = []
        for command in COMMANDS:
            if command.name == "restore":
                continue
            entries.append((f"{command.title}", command.help,
                            partial(self.chat.palette_command, command.name)))
        for name in self.chat.snapshot_names:
            entries.append((f"Restore snapshot: {name}", "go back to this snapshot (asks first)",
                            partial(self.chat.run_command, "restore", name)))
        return entries

    async def discover(self) -> Hits:
        for title, help_text, callback in self._entries():
            yield DiscoveryHit(title, callback, help=help_text)  # type: ignore[arg-type]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._entries():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback,  # type: ignore[arg-type]
                          help=help_text)
