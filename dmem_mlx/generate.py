"""python -m dmem_mlx.generate: one prompt through a δ-mem model (mlx_lm.generate's flags)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dmem_mlx.generate",
        description="Generate text with a converted δ-mem model. Each --prompt is a turn: the "
                    "memory written by earlier prompts is read by later ones, with the chat "
                    "context cleared in between (the history lives only in δ memory).")
    p.add_argument("--model", required=True, help="converted model directory or hub repo")
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help="a user message (repeat for several turns)")
    p.add_argument("--max-tokens", "-m", type=int, default=100, help="tokens per reply (100)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt raw")
    p.add_argument("--verbose", action="store_true", help="print speeds and memory size")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from . import generate, load
    from .config import ConfigError
    from .hub import HubError

    try:
        model, tokenizer = load(args.model)
    except (HubError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(args.temp, args.top_p)
    for user_text in args.prompt:
        prompt = user_text
        if not args.no_chat_template and tokenizer.has_chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                                   add_generation_prompt=True, tokenize=False)
        if args.verbose:
            print(f"> {user_text}")
        text = generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                        verbose=args.verbose)
        if not args.verbose:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
