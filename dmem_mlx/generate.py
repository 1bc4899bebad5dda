"""Text generation with a δ-mem model, as mlx-lm's `generate.py`: `generate`,
`stream_generate` and the command line (`python -m dmem_mlx.generate`) in one module.

`from dmem_mlx import generate` is the function, also after this module has been imported
(the package keeps the function under that name, as mlx-lm does).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Generator, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generation_stream
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.models import cache as cache_lib
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import state_of


def stream_generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompt: Union[str, mx.array, list[int]],
    max_tokens: int = 256,
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """`mlx_lm.stream_generate`, except that a sampled EOS is never written into the memory.

    mlx-lm runs the model on each token before yielding it, so by the time the EOS is seen it
    has been fed; here its δ write is undone (and it is trimmed from a caller's prompt_cache).
    The δ state written by the prompt and the reply stays for the next call until reset: the
    state carried by `prompt_cache` (`dmem_mlx.cache.make_prompt_cache`), else the model's
    default memory.
    """
    prompt_cache = kwargs.get("prompt_cache")
    state = state_of(prompt_cache) or model.delta_mem.state
    for response in _mlx_stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if response.finish_reason == "stop":
            state.undo_last_call()
            if prompt_cache is not None and cache_lib.can_trim_prompt_cache(prompt_cache):
                cache_lib.trim_prompt_cache(prompt_cache, 1)
        yield response


def generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompt: Union[str, mx.array, list[int]],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response (mlx_lm.generate's arguments); see `stream_generate`."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, "
              f"{response.generation_tps:.3f} tokens-per-sec")
        state = state_of(kwargs.get("prompt_cache")) or model.delta_mem.state
        print(f"δ memory: {state.nbytes:,} bytes")
    return text


# -- command line ----------------------------------------------------------------------------

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
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch: split the layers over the ranks (pipeline parallel) "
                        "instead of sharding every layer (tensor parallel)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlx_lm.sample_utils import make_sampler

    from .errors import DmemError, user_message
    from .utils import load

    world = mx.distributed.init()  # a group of one unless started by mlx.launch
    main_rank = world.rank() == 0  # under mlx.launch, rank 0 alone prints
    try:
        if world.size() > 1:
            from .distributed import sharded_load

            group = {"pipeline_group" if args.pipeline else "tensor_group": world}
            model, tokenizer = sharded_load(args.model, **group)
        else:
            model, tokenizer = load(args.model)
    except (DmemError, OSError) as exc:
        if main_rank:
            print(f"error: {user_message(exc)}", file=sys.stderr)
        return 1
    if args.seed is not None:
        mx.random.seed(args.seed)
    elif world.size() > 1:  # every rank must sample the same tokens
        mx.random.seed(int(mx.distributed.all_sum(
            mx.array(int(time.time()) % 2**31 if main_rank else 0), group=world,
            stream=mx.cpu).item()))
    sampler = make_sampler(args.temp, args.top_p)
    for user_text in args.prompt:
        prompt = user_text
        if not args.no_chat_template and tokenizer.has_chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                                   add_generation_prompt=True, tokenize=False)
        if args.verbose and main_rank:
            print(f"> {user_text}")
        text = generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                        verbose=args.verbose and main_rank)
        if not args.verbose and main_rank:
            print(text)
    if world.size() > 1:  # finish the work in flight (the next token) together before exiting
        mx.synchronize(generation_stream)
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
