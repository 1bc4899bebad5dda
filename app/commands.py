"""Slash commands (typed in the input) and the same commands in Textual's command palette."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from textual.command import DiscoveryHit, Hit, Hits, Provider

from dmem_mlx.errors import CommandError

from .screens import ConfirmScreen

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


class SessionCommands:
    """The commands' work, mixed into the app: `command_<name>(argument)`, run by its
    `run_command` worker (which turns exceptions into notifications). Destructive ones ask first."""

    session: Any
    snapshot_names: list[str]
    last_info: Any

    async def command_new(self, _: str) -> None:
        await self.on_engine(self.session.new_conversation)
        await self.show_transcript([])
        await self.add_note("new conversation — the memory is kept")
        await self.refresh_info()

    async def command_forget(self, _: str) -> None:
        if not await self.push_screen_wait(ConfirmScreen(
                "Forget everything? The memory and the conversation are erased, "
                "and the memory file is overwritten.", yes="Forget")):
            self.notify("nothing forgotten")
            return
        await self.on_engine(self.session.forget)
        await self.show_transcript([])
        await self.add_note("memory erased")
        await self.refresh_info()

    async def command_readonly(self, _: str) -> None:
        def toggle() -> bool:
            self.session.read_only = not self.session.read_only
            return self.session.read_only
        read_only = await self.on_engine(toggle)
        self.notify("read-only: turns are not written to memory" if read_only
                    else "writing: turns are written to memory again")
        await self.refresh_info()

    async def command_snapshot(self, name: str) -> None:
        if name in self.snapshot_names and not await self.push_screen_wait(
                ConfirmScreen(f"Snapshot {name!r} exists. Replace it?", yes="Replace")):
            return
        await self.on_engine(self.session.snapshot, name)
        self.snapshot_names = list(await self.on_engine(self.session.snapshots))
        self.notify(f"snapshot {name!r} saved")

    async def command_restore(self, name: str) -> None:
        if name not in self.snapshot_names:
            listed = ", ".join(self.snapshot_names) or "none yet (/snapshot NAME)"
            raise CommandError(f"no snapshot {name!r}; snapshots: {listed}")
        if not await self.push_screen_wait(ConfirmScreen(
                f"Restore snapshot {name!r}? The current memory is replaced "
                "(take a /snapshot first to keep it).", yes="Restore")):
            return
        await self.on_engine(self.session.restore, name)
        await self.show_transcript(list(self.session.messages))
        await self.add_note(f"restored snapshot {name!r}")
        await self.refresh_info()

    async def command_snapshots(self, _: str) -> None:
        self.snapshot_names = list(await self.on_engine(self.session.snapshots))
        await self.add_note("snapshots: " + (", ".join(self.snapshot_names) or "none"))

    async def command_export(self, path: str) -> None:
        target = Path(path).expanduser()
        if target.exists() and not await self.push_screen_wait(
                ConfirmScreen(f"{target} exists. Overwrite it?", yes="Overwrite")):
            return
        await self.on_engine(self.session.export, target)
        self.notify(f"memory exported to {target}")

    async def command_import(self, path: str) -> None:
        source = Path(path).expanduser()
        if not source.exists():
            raise CommandError(f"{source}: no such file")
        if not await self.push_screen_wait(ConfirmScreen(
                f"Replace the current memory by {source}? (take a /snapshot first to keep it)",
                yes="Import")):
            return
        await self.on_engine(self.session.import_, source)
        await self.show_transcript(list(self.session.messages))
        await self.add_note(f"imported {source}")
        await self.refresh_info()

    async def command_info(self, _: str) -> None:
        await self.refresh_info()
        info = self.last_info
        budget = f"{info.kv_budget:,}" if info.kv_budget else "∞"
        await self.add_note(
            f"memory {info.memory_path or '(none)'} · {info.tokens_written:,} tokens written · "
            f"{info.turns} turns ({info.turns_in_memory_only} only in memory) · context "
            f"{info.kv_tokens:,}/{budget} tokens · {'read-only' if info.read_only else 'writing'}")

    async def command_panel(self, _: str) -> None:
        self.action_toggle_panel()

    async def command_help(self, _: str) -> None:
        self.action_help()

    async def command_quit(self, _: str) -> None:
        await self.action_quit()
