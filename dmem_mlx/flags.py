"""Command-line flags that dmem-chat and dmem-serve share: the parser's one-line errors, the
model, sampling and context-budget flags, and their checks. Imports nothing heavy (a refused
command line costs no mlx-lm import)."""

from __future__ import annotations

import argparse
from typing import NoReturn, Optional


class Parser(argparse.ArgumentParser):
    """argparse with its usage error as one line that points to --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_generation_flags(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    """--model, --temp, --top-p, --max-tokens and --max-kv-tokens (serving: the sampling flags
    are defaults a request may override, the budget is per memory)."""
    default = "default " if serving else ""
    parser.add_argument("--model", help="converted δ-mem model: a directory or a Hugging Face "
                                        "repo (default: the bundled demo model)")
    parser.add_argument("--temp", type=float, default=0.0,
                        help=f"{default}sampling temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help=f"{default}nucleus sampling threshold in (0, 1] "
                             "(default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help=f"{default or 'longest '}reply length in tokens "
                             "(default: %(default)s)")
    parser.add_argument("--max-kv-tokens", type=int, default=None,
                        help=f"context budget{' per memory' if serving else ''} in tokens; "
                             "older turns (and the start of longer messages) then live only in "
                             "the δ memory (default: from the model)")


def generation_flags_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the flags of `add_generation_flags`, or None."""
    if args.temp < 0:
        return f"--temp must be ≥ 0, got {args.temp}"
    if not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if args.max_tokens < 1:
        return f"--max-tokens must be ≥ 1, got {args.max_tokens}"
    if args.max_kv_tokens is not None and args.max_kv_tokens < 16:
        return f"--max-kv-tokens must be ≥ 16, got {args.max_kv_tokens}"
    return None
