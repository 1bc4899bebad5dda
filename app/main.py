"""The `dmem-chat` command: check the model and the memory, then start the app."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from dmem_mlx.errors import DmemError, UsageError, user_message

PROG = "dmem-chat"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def memory_directory() -> str:
    from platformdirs import user_data_dir

    return str(Path(user_data_dir("dmem-mlx", appauthor=False)) / "memories")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Chat in the terminal with a δ-mem model whose memory lives in a file: "
                    "what you tell it is written into a small state per layer, saved after "
                    "every turn and loaded again next time.",
        epilog="Keys: Enter sends, Shift+Enter or Ctrl+J adds a line, Escape stops a reply, "
               "Ctrl+B shows the memory panel, Ctrl+P the command palette, F1 help, Ctrl+Q "
               "quits. Type /help in the app for the slash commands.")
    parser.add_argument("--model", help="converted δ-mem model: a directory or a Hugging Face "
                                        "repo (default: the bundled demo model)")
    parser.add_argument("--memory", help="memory file: a path, or a bare name kept in "
                                         f"{memory_directory()} (default: one memory per model "
                                         "there)")
    parser.add_argument("--temp", type=float, default=0.0,
                        help="sampling temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling threshold in (0, 1] (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="longest reply, in tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-kv-tokens", type=int, default=None,
                        help="context budget in tokens; older turns then live only in the δ "
                             "memory (default: from the model)")
    parser.add_argument("--read-only", action="store_true",
                        help="incognito: the memory is read but nothing is written or saved; "
                             "also opens a memory another dmem-chat has open")
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    if args.temp < 0:
        raise UsageError(f"--temp must be ≥ 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be ≥ 1, got {args.max_tokens}")
    if args.max_kv_tokens is not None and args.max_kv_tokens < 16:
        raise UsageError(f"--max-kv-tokens must be ≥ 16, got {args.max_kv_tokens}")


def default_model() -> tuple[str, str]:
    """(directory, name) of the bundled demo model."""
    try:
        from dmem_mlx.demo import DEMO_NAME, demo_model_path

        return str(demo_model_path()), DEMO_NAME
    except (ImportError, FileNotFoundError):
        raise UsageError("no bundled demo model in this install: pass --model "
                         "(a converted δ-mem model directory or hub repo)") from None


def resolve_model(name: str) -> Path:
    """A local converted model directory (downloaded first if `name` is a hub repo)."""
    from dmem_mlx.adapter import is_adapter_dir
    from dmem_mlx.hub import resolve_model_path

    path = resolve_model_path(name, extra_patterns=["delta_mem_config.json",
                                                    "delta_mem.safetensors"])
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json)")
    if not is_adapter_dir(path):
        raise UsageError(f"{path} holds no δ-mem adapter; convert one with `dmem-convert`")
    return path


def memory_location(memory: Optional[str], model_id: str) -> Path:
    """--memory as given: a path, or a bare name (no directory, no suffix) in the data directory;
    by default the one memory of `model_id` (a hub repo id, a directory or the demo's name)."""
    from dmem_mlx.runtime import default_memory_path

    default = Path(default_memory_path(model_id))
    if memory is None:
        return default
    path = Path(memory).expanduser()
    if len(path.parts) == 1 and not path.suffix and not path.exists():
        return default.with_name(path.name + default.suffix)
    return path


def open_memory(path: Any, read_only: bool = False) -> Any:
    """Open (and lock, unless read-only) a memory file, checking its format and contents.

    Raises MemoryLockedError if another process holds it. Whether it belongs to this model is
    checked when the session starts (the model's fingerprint needs the loaded weights)."""
    from dmem_mlx.runtime import MemoryFile, MemoryLockedError

    path = Path(path).expanduser()
    try:
        return MemoryFile.open(path, read_only=read_only)
    except MemoryLockedError as exc:
        raise MemoryLockedError(f"{str(exc).split(' (')[0]}: close the dmem-chat (or program) "
                                "using it, or chat without saving: --read-only") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from dmem_mlx.blas import reexec_with_openblas
    except ImportError:
        pass
    else:
        reexec_with_openblas()
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)
        model, model_id = (args.model, args.model) if args.model else default_model()
        model_path = resolve_model(model)
        memory = open_memory(memory_location(args.memory, model_id), read_only=args.read_only)
    except (DmemError, OSError) as exc:
        print(f"{PROG}: error: {user_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

    from .app import DmemChatApp, Sampling

    try:
        from dmem_mlx.blas import openblas_hint
        hint = openblas_hint()
    except ImportError:
        hint = None

    app = DmemChatApp(model_path, memory, system=args.system, max_kv_tokens=args.max_kv_tokens,
                      read_only=args.read_only, startup_hint=hint,
                      model_name=Path(model_id).name or model_id,
                      sampling=Sampling(max_tokens=args.max_tokens, temp=args.temp,
                                        top_p=args.top_p, seed=args.seed))
    app.run()  # the app releases the memory when it closes
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
