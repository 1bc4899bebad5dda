"""The `dmem-chat` command: check the command line, the model and the memory, then start the app.

Everything that can be refused is checked before the UI starts (one line on stderr, exit 1),
without importing mlx-lm and without creating any file or directory for a refused path; the
OpenBLAS re-exec (dmem_mlx.blas) happens before any heavy import. The model itself loads in the
app, which is usable (you can type) while it does.
"""

from __future__ import annotations

import argparse
import platform
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from dmem_mlx.errors import DmemError, UsageError, user_message
from dmem_mlx.flags import Parser, add_generation_flags, generation_flags_problem

if TYPE_CHECKING:
    from dmem_mlx.runtime import MemoryFile

PROG = "dmem-chat"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}")  # a memory NAME (no directory)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def memory_directory() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("dmem-mlx", appauthor=False)) / "memories"


def version() -> str:
    from dmem_mlx import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Chat in the terminal with a δ-mem model whose memory lives in a file: "
                    "what you tell it is written into a small state per layer, saved after "
                    "every turn and loaded again next time.",
        epilog="Keys: Enter sends; Ctrl+J adds a line (Shift+Enter too, where the terminal "
               "reports it: not in tmux or most terminals); Escape or Ctrl+C stops a reply; "
               "Ctrl+B memory panel, Ctrl+P command palette, F1 help, Ctrl+Q quits. /help in "
               "the app lists the slash commands (/undo, /retry, /history, /export …).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_generation_flags(parser)
    parser.add_argument("--memory", help="memory file: a NAME (no '/') kept in "
                                         f"{memory_directory()}, or a path such as "
                                         "./me.safetensors in an existing directory (default: "
                                         "one memory per model in that directory)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--read-only", action="store_true",
                        help="incognito: the memory is read but nothing is written or saved; "
                             "also opens a memory another dmem-chat has open")
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    if why := generation_flags_problem(args):
        raise UsageError(why)


def default_model() -> tuple[Path, str]:
    """(directory, name) of the bundled demo model."""
    try:
        from dmem_mlx.demo import DEMO_NAME, demo_model_path

        return demo_model_path(), DEMO_NAME
    except (ImportError, FileNotFoundError):
        raise UsageError("no bundled demo model in this install: pass --model "
                         "(a converted δ-mem model directory or hub repo)") from None


def demo_default_memory(default: Path, model_path: Path) -> tuple[Path, Optional[str]]:
    """The demo's default memory — its version's own (`default`), or its memory under an
    earlier name — and, when it is new while an earlier demo model's is kept, the line that says
    so (dmem_mlx.demo.memory). Nothing is moved or written."""
    from dmem_mlx.demo.memory import default_demo_memory, upgrade_notice

    memory = default_demo_memory(default, model_path)
    return memory.path, upgrade_notice(memory)


def resolve_model(name: str) -> Path:
    """A local converted model directory; a hub repo id ("org/name") is downloaded first."""
    from dmem_mlx.config import CONFIG_NAME

    path = Path(name).expanduser()
    if not path.exists():
        if not HUB_ID.fullmatch(name) or name.startswith((".", "~")):
            raise UsageError(f"{name}: no such model directory")
        from dmem_mlx.hub import resolve_model_path  # imports mlx-lm: hub repos only

        path = resolve_model_path(name, extra_patterns=[CONFIG_NAME, "delta_mem.safetensors"])
    if not path.is_dir():
        raise UsageError(f"{path}: is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json)")
    if not ((path / CONFIG_NAME).is_file() and (path / "delta_mem.safetensors").is_file()):
        raise UsageError(f"{path} holds no δ-mem adapter; convert one with `dmem-convert`")
    return path


def is_path(memory: Optional[str]) -> bool:
    """--memory names a path (a '/', '~', '.' or '..'), not a NAME in the data directory."""
    return memory is not None and ("/" in memory or "\\" in memory or memory.startswith("~")
                                   or memory in (".", ".."))


def memory_location(memory: Optional[str], model_id: str) -> Path:
    """--memory as given: a NAME (no directory part) always in the data directory, else a path;
    by default the one memory of `model_id` (a hub repo id, a directory or the demo's name)."""
    if is_path(memory):
        if memory.endswith(("/", "\\")):  # type: ignore[union-attr]
            raise UsageError(f"--memory {memory!r} names a directory; give a file in it, such "
                             f"as {memory}me.safetensors")
        return Path(memory).expanduser()  # type: ignore[arg-type]
    from dmem_mlx.runtime.memory_file import SUFFIX, default_memory_path

    if memory is None:
        return default_memory_path(model_id)
    if not NAME.fullmatch(memory):
        raise UsageError(f"--memory {memory!r}: a NAME is up to 64 letters, digits, spaces, "
                         "'.', '_' or '-'; give a path with a '/' for a file elsewhere")
    return memory_directory() / (memory if memory.endswith(SUFFIX) else memory + SUFFIX)


def check_memory_path(path: Path) -> None:
    """Refuse a memory path that cannot be a memory file (cheap: no import, nothing created)."""
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not a memory file")
    if not path.exists() and path.parent != memory_directory() and not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory (dmem-chat creates none; a "
                         f"--memory NAME without '/' lives in {memory_directory()})")


def check_writable(path: Path) -> None:
    """Refuse, with the way on, a memory that could not be saved: a read-only file, or a
    directory that cannot be written or created (a read-only file system, no permission)."""
    from dmem_mlx.runtime import memory_file

    with read_only_way_on():
        memory_file.check_writable(path)


def check_memory_contents(path: Path, model_path: Path) -> None:
    """Refuse an existing memory file that is damaged, not a memory, or another model's —
    before it is locked (no lock file appears next to a refused file). The file is read first
    (its first bytes without any import, then all of it), and the model's fingerprint computed
    only for a real memory."""
    from dmem_mlx.runtime.memory_header import check_prefix

    if not path.exists():
        return
    check_prefix(path)
    from dmem_mlx.runtime.memory_file import MemoryFileError, fingerprint_mismatch, read_memory

    data = read_memory(path)
    from dmem_mlx.runtime.fingerprint import fingerprint_from_files

    expected = fingerprint_from_files(model_path)
    if expected is not None and (why := fingerprint_mismatch(data.fingerprint, expected)):
        # e.g. an earlier demo model's memory named with --memory: say the way on, keep the file
        raise MemoryFileError(f"{path}: refused: {why}; the file is left as it is: chat on "
                              "another memory with --memory NAME, or move this one away")


def open_memory(path: Path | str, read_only: bool = False) -> "MemoryFile":
    """Open (and lock, unless read-only) a memory file, checking its format and contents.

    A memory that can only be read (locked by another process, a read-only file) is refused
    with dmem-chat's way on (`--read-only`). Whether it belongs to this model is checked again
    when the session starts (with the loaded weights)."""
    from dmem_mlx.runtime.memory_file import MemoryFile

    with read_only_way_on():
        return MemoryFile.open(Path(path).expanduser(), read_only=read_only)


@contextmanager
def read_only_way_on() -> Iterator[None]:
    """A MemoryNotWritableError raised inside, said as dmem-chat's refusal (UsageError) with
    the way on: `--read-only` opens what cannot be written here."""
    from dmem_mlx.runtime.memory_file import MemoryLockedError, MemoryNotWritableError

    try:
        yield
    except MemoryLockedError as exc:
        raise UsageError(f"{exc}: close the dmem-chat (or program) using it, or chat without "
                         "saving: --read-only") from None
    except MemoryNotWritableError as exc:
        way = "open it with --read-only to use it without saving" if Path(exc.path).exists() \
            else "chat without saving with --read-only, or give --memory a path in a directory " \
            "you can write"
        raise UsageError(f"{exc}; {way}") from None


def blas_description() -> str:
    """Which BLAS the matmuls run on, for the panel and /info."""
    from dmem_mlx.blas import openblas_hint, openblas_preloaded

    if platform.system() != "Linux":
        return "MLX (Metal / Accelerate)" if platform.system() == "Darwin" else "MLX built-in"
    if openblas_preloaded():
        return "OpenBLAS (preloaded)"
    if openblas_hint():
        return "MLX's built-in BLAS (slow; apt install libopenblas0-pthread)"
    return "MLX's built-in BLAS (OpenBLAS installed, not used)"


def not_a_terminal() -> Optional[str]:
    """Which of standard input, output and error is not a terminal (the app reads keys from the
    first and draws on the last; output redirected to a file or a pipe would be left empty, or
    filled with screen drawing), or None."""
    for name, stream in (("input", sys.stdin), ("output", sys.stdout), ("error", sys.stderr)):
        try:
            if stream is None or not stream.isatty():
                return f"standard {name}"
        except (OSError, ValueError):  # closed
            return f"standard {name}"
    return None


def check_terminal() -> None:
    if stream := not_a_terminal():
        raise UsageError(f"{stream} is not a terminal: dmem-chat is a full-screen chat; run it "
                         "in a terminal, not redirected (scripts can use dmem-serve)")


@contextmanager
def signals_kept() -> Iterator[list[int]]:
    """While the memory is open and the app not yet running: SIGTERM and SIGHUP are kept in the
    list yielded, not fatal (the app quits cleanly for them as soon as it runs)."""
    received: list[int] = []
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            previous[name] = signal.signal(getattr(signal, name),
                                           lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def keep_typed_keys() -> Callable[[], None]:
    """Until the app takes the terminal, keep keys typed ahead as they are; returns the function
    that puts the terminal's settings back. A terminal in its normal mode turns a typed Return
    into a newline as it arrives (ICRNL): a message typed and sent while dmem-chat starts would
    reach the app as Ctrl+J (a new line in the input) instead of Enter. Echo and line editing
    are turned off too, as the app does once it runs."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        return lambda: None
    try:
        fd = sys.stdin.fileno()
        before = termios.tcgetattr(fd)
        after = list(before)
        after[0] &= ~termios.ICRNL  # iflag
        after[3] &= ~(termios.ICANON | termios.ECHO)  # lflag
        termios.tcsetattr(fd, termios.TCSANOW, after)
    except (OSError, ValueError, termios.error):  # stdin is not a terminal
        return lambda: None

    def restore() -> None:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, before)
        except (OSError, termios.error):
            pass
    return restore


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # --help and --version end here, before any import
    restore_terminal: list[Callable[[], None]] = []
    try:
        check_numbers(args)
        local = (args.model is None or not HUB_ID.fullmatch(args.model)
                 or Path(args.model).expanduser().exists())
        if local:  # cheap checks first: a bad path is refused before anything is imported
            model_path, model_id = (resolve_model(args.model), args.model) if args.model \
                else default_model()
            if is_path(args.memory):
                check_memory_path(memory_location(args.memory, model_id))
        from dmem_mlx.blas import reexec_with_openblas

        reexec_with_openblas(hint=False)  # before any heavy import (it restarts the process)
        restore_terminal.append(keep_typed_keys())  # after it: the settings kept are the user's
        if not local:  # a hub repo id: resolving it imports mlx-lm (and may download)
            check_terminal()
            model_path, model_id = resolve_model(args.model), args.model
        memory_note = None
        if args.model is None:  # the demo: a default memory per demo version
            from dmem_mlx.demo import DEMO_MEMORY

            memory_path = memory_location(args.memory, DEMO_MEMORY)
            if args.memory is None:
                memory_path, memory_note = demo_default_memory(memory_path, model_path)
        else:
            memory_path = memory_location(args.memory, model_id)
        check_memory_path(memory_path)
        check_memory_contents(memory_path, model_path)
        if not args.read_only:
            check_writable(memory_path)
        check_terminal()  # last of the refusals: a bad path or file is named first
        from dmem_mlx.blas import openblas_hint

        from .app import DmemChatApp, Sampling

        with signals_kept() as received:
            memory = open_memory(memory_path, read_only=args.read_only)
            app = DmemChatApp(model_path, memory, system=args.system,
                              max_kv_tokens=args.max_kv_tokens, read_only=args.read_only,
                              startup_hint=openblas_hint(),
                              model_name=Path(model_id).name or model_id,
                              blas=blas_description(), signals_received=received,
                              memory_note=memory_note,
                              sampling=Sampling(max_tokens=args.max_tokens, temp=args.temp,
                                                top_p=args.top_p, seed=args.seed))
            app.run()  # the app releases the memory when it closes
    except (DmemError, OSError) as exc:
        print(f"{PROG}: error: {user_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for restore in restore_terminal:
            restore()
    if app.start_error:
        print(f"{PROG}: error: {app.start_error}", file=sys.stderr)
        return 1
    if app.unsaved_at_exit:  # the last turns could not be saved, even at the end
        print(f"{PROG}: error: {app.unsaved_at_exit}", file=sys.stderr)
        return app.return_code or 1
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
