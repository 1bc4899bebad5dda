"""Which memory the demo model uses by default, across demo upgrades.

A memory belongs to the model that wrote it (its fingerprint, DESIGN §11): a new demo model
cannot read the last one's. So each shipped demo has its own default memory, named after its
version — `<data>/memories/dmem-demo-v4.safetensors` for dmem-chat, the directory
`<data>/memories/dmem-demo-v4/` for dmem-serve — and an upgrade starts on a new memory instead
of refusing to start. An earlier demo's memory is left where it is, untouched, and named once
(`upgrade_notice`). The demos before versioned names (up to v4) used `dmem-demo`; a memory under
an earlier name that this very model wrote (v4's own) is used where it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import DEMO_NAME, DEMO_VERSION

SUFFIX = ".safetensors"
VERSIONED = re.compile(rf"{re.escape(DEMO_NAME)}(?:-v(\d+))?")  # 0: the name before versions


@dataclass
class DemoMemory:
    """The demo's default memory: `path` (a file, or dmem-serve's directory) and, when it is a
    new one that replaces another demo model's, that memory (`earlier`, kept as it is) and its
    demo version (0: before versioned names)."""

    path: Path
    earlier: Optional[Path] = None
    earlier_version: int = 0


def other_demo_memories(default: Path) -> list[tuple[int, Path]]:
    """(version, path) of the memories next to `default` (this demo's default memory file or
    directory) named after another demo version, the newest version first. Directories count
    only when they hold a memory file."""
    directory = default.suffix != SUFFIX
    found = []
    try:
        entries = list(default.parent.iterdir()) if default.parent.is_dir() else []
    except OSError:
        return []
    for path in entries:
        if path == default:
            continue
        if directory:
            match = VERSIONED.fullmatch(path.name)
            usable = match is not None and path.is_dir() and bool(memory_files(path))
        else:
            match = VERSIONED.fullmatch(path.name[:-len(SUFFIX)]) \
                if path.name.endswith(SUFFIX) else None
            usable = match is not None and path.is_file()
        if usable:
            found.append((int(match.group(1) or 0), path))  # type: ignore[union-attr]
    return sorted(found, reverse=True)


def memory_files(directory: Path) -> list[Path]:
    """The memory files in a dmem-serve directory, the last saved first."""
    try:
        files = [p for p in directory.glob("*" + SUFFIX)
                 if not p.name.startswith(".") and p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []


def written_by(path: Path, fingerprint: Optional[dict]) -> bool:
    """The memory file `path` (a directory: its last saved one) was written by the model of
    `fingerprint`. Anything unreadable, damaged or not a memory is not; nothing is written."""
    from ..errors import DmemError
    from ..runtime.memory_file import fingerprint_mismatch, read_memory
    from ..runtime.memory_header import check_prefix

    if fingerprint is None:
        return False
    if path.is_dir():
        files = memory_files(path)
        if not files:
            return False
        path = files[0]
    try:
        check_prefix(path)  # a file that cannot be a memory is not read further
        stored = read_memory(path).fingerprint
    except (DmemError, OSError):
        return False
    return fingerprint_mismatch(stored, fingerprint) is None


def default_demo_memory(default: Path, model_dir: Path) -> DemoMemory:
    """The demo's default memory, given `default` (this version's file or directory, as
    `default_memory_path(DEMO_MEMORY)` names it) and the demo model's directory: `default` if it
    exists; else a memory under another demo's name that this model wrote; else `default`, new,
    with the newest other demo's memory as `earlier`. Reads at most those memories."""
    if default.exists():
        return DemoMemory(default)
    others = other_demo_memories(default)
    if not others:
        return DemoMemory(default)
    from ..runtime.fingerprint import fingerprint_from_files

    fingerprint = fingerprint_from_files(model_dir)
    for _, path in others:
        if written_by(path, fingerprint):
            return DemoMemory(path)
    version, path = others[0]
    return DemoMemory(default, path, version)


def upgrade_notice(memory: DemoMemory, plural: bool = False) -> Optional[str]:
    """What to tell the user, once, when `memory` is new and another demo's is kept (else None);
    plural: the memories of dmem-serve's directory."""
    if memory.earlier is None:
        return None
    which = "an earlier" if memory.earlier_version < DEMO_VERSION else "another"
    what = "memories" if plural else "memory"
    where = "in" if plural else "at"
    return (f"The demo model is new (v{DEMO_VERSION}): it cannot read the {what} {which} demo "
            f"model wrote, kept untouched {where} {memory.earlier}")


__all__ = ["DemoMemory", "default_demo_memory", "other_demo_memories", "upgrade_notice"]
