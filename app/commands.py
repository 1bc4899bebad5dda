"""Slash commands (typed in the input; also in Textual's command palette as SystemCommands)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from dmem_mlx.errors import CommandError
from dmem_mlx.runtime.memory_file import UNDO_DEPTH


@dataclass(frozen=True)
class Command:
    name: str
    title: str
    help: str
    argument: Optional[str] = None  # name of the required argument, if any


COMMANDS = [
    Command("new", "New conversation", "start a new conversation; the memory is kept"),
    Command("undo", "Undo last exchange",
            f"take back the last exchange: memory, conversation and context (up to "
            f"{UNDO_DEPTH}; kept across restarts)"),
    Command("retry", "Retry last reply", "answer the last message again from the memory "
                                         "as it was before it"),
    Command("edit", "Edit last message", "take back the last exchange and put its message "
                                         "in the input"),
    Command("copy", "Copy last reply", "copy the last reply to the clipboard"),
    Command("history", "Past conversations", "read the past conversations of this memory"),
    Command("export", "Export transcript", "write this conversation to PATH (Markdown; "
                                           "JSON if PATH ends in .json)", "PATH"),
    Command("forget", "Forget everything", "erase the memory, the conversations and the undo "
                                           "history (asks first)"),
    Command("readonly", "Toggle read-only", "incognito turns: nothing is written to memory"),
    Command("snapshot", "Snapshot memory", "save the memory under a name", "NAME"),
    Command("restore", "Restore snapshot", "go back to a named snapshot (asks first)", "NAME"),
    Command("snapshots", "List snapshots", "list the named snapshots"),
    Command("export-memory", "Export memory file", "copy the memory (δ state, transcripts) "
                                                   "to the memory file PATH", "PATH"),
    Command("import", "Import memory", "replace the memory by the memory file at PATH "
                                       "(asks first)", "PATH"),
    Command("info", "Memory info", "counts, context use, system prompt, file and model"),
    Command("panel", "Toggle memory panel", "show or hide the memory panel"),
    Command("help", "Help", "commands and keys"),
    Command("quit", "Quit", "leave (the memory is saved after every turn)"),
]
BY_NAME = {command.name: command for command in COMMANDS}
KEYS = [
    ("Enter", "send"),
    ("Ctrl+J", "new line (every terminal)"),
    ("\\ then Enter", "new line (a line ending in a backslash)"),
    ("Shift+Enter, Alt+Enter", "new line where the terminal reports them (e.g. kitty, WezTerm, "
                               "foot); most terminals and tmux send them as Enter"),
    ("Escape, Ctrl+C", "stop the reply; take back a message sent while the model loads"),
    ("Ctrl+B", "memory panel"),
    ("Ctrl+N", "new conversation"),
    ("Ctrl+R", "read-only toggle"),
    ("Ctrl+P", "command palette"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]


def parse_command(text: str) -> tuple[Command, str]:
    """'/snapshot before trip' → (Command snapshot, 'before trip'). Raises CommandError."""
    name, _, argument = text.strip()[1:].partition(" ")
    name, argument = name.lower(), argument.strip()
    command = BY_NAME.get(name)
    if command is None:
        near = difflib.get_close_matches(name, BY_NAME, n=1)
        guess = f"did you mean /{near[0]}? " if near else ""
        raise CommandError(f"unknown command /{name} — {guess}/help lists the commands")
    if command.argument and not argument:
        raise CommandError(f"/{name} needs {command.argument}: /{name} {command.argument}")
    if not command.argument and argument:
        raise CommandError(f"/{name} takes no argument")
    return command, argument


def help_markdown() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = "\n".join(
        f"| `/{c.name}{' ' + c.argument if c.argument else ''}` | {c.help} |" for c in COMMANDS)
    keys = "\n".join(f"| `{cell(key)}` | {cell(what)} |" for key, what in KEYS)
    return (
        "# dmem-chat\n\nA local assistant whose δ memory lives in a file: what you tell it is "
        "written into a small state per layer and kept across restarts.\n\n"
        "## Commands\n\n| command | what it does |\n|---|---|\n" + rows + "\n\n"
        "## Keys\n\n| key | |\n|---|---|\n" + keys + "\n")


def as_sent(messages: list[dict[str, str]]) -> list[tuple[str, list[str]]]:
    """(role, parts) of each message as the user sent it: consecutive user messages are the
    parts of one message longer than the context budget (the leading ones were written into
    the memory only; joined, they are the text sent)."""
    turns: list[tuple[str, list[str]]] = []
    for m in messages:
        if m["role"] == "user" and turns and turns[-1][0] == "user":
            turns[-1][1].append(m["content"])
        else:
            turns.append((m["role"], [m["content"]]))
    return turns


def transcript_markdown(messages: list[dict[str, str]], model: str,
                        memory: Optional[Path]) -> str:
    """A conversation as readable Markdown (the user's text in quote blocks, kept literal)."""
    lines = [f"# dmem-chat conversation", "",
             f"- model: {model}", f"- memory: {memory or 'none'}",
             f"- exported: {datetime.now().astimezone().isoformat(timespec='seconds')}", ""]
    for role, parts in as_sent(messages):
        content = "".join(parts)
        if role == "system":
            lines += ["**system prompt:**", "", *[f"> {line}" for line in
                                                 content.splitlines()], ""]
        elif role == "user":
            lines += ["## you", "", "````text", content, "````", ""]
        else:
            lines += ["## assistant", "", content, ""]
    return "\n".join(lines)


def transcript_json(messages: list[dict[str, str]], model: str, memory: Optional[Path]) -> str:
    return json.dumps({"model": model, "memory": str(memory) if memory else None,
                       "exported": datetime.now().astimezone().isoformat(timespec="seconds"),
                       "messages": messages}, ensure_ascii=False, indent=2) + "\n"


def export_target(path: str) -> Path:
    """Where an export goes: its directory must exist (none is created)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CommandError(f"{target} is a directory: give a file name")
    if not target.parent.is_dir():
        raise CommandError(f"{target.parent}: no such directory")
    return target
