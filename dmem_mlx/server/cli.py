"""`dmem-serve`: the command line (flags in mlx_lm.server's style), then uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DmemError, UsageError, user_message
from ..flags import Parser, add_generation_flags, generation_flags_problem

PROG = "dmem-serve"
API_KEY_ENV = "DMEM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="An OpenAI-compatible HTTP server for a δ-mem model that "
                                      "keeps one memory per user (the request's `user` field or "
                                      "an X-Dmem-Memory header).")
    add_generation_flags(p, serving=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument("--memories", help="directory of the memory files, one per user id "
                                      "(default: a directory per model in dmem-chat's data "
                                      "directory)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: the "
                                     f"{API_KEY_ENV} environment variable; none: no key)")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the most max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=8,
                   help="replies decoded together in one batch (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond those; more are answered 429 "
                        "(default: %(default)s)")
    p.add_argument("--hold-arrivals", action=argparse.BooleanOptionalAction, default=True,
                   help="a request arriving while others decode waits one decode step, so that "
                        "what arrives meanwhile shares its prefill (default: %(default)s)")
    p.add_argument("--max-open", type=int, default=64,
                   help="memories kept open with their KV context (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body (default: %(default)s)")
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch: split the layers over the ranks (pipeline parallel) "
                        "instead of sharding every layer (tensor parallel)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="logging level (default: %(default)s)")
    return p


def check(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the flags, or None."""
    if not 0 <= args.port <= 65535:
        return f"--port must be in [0, 65535], got {args.port}"
    if why := generation_flags_problem(args):
        return why
    for flag in ("max_tokens_limit", "max_concurrent", "max_open", "max_body_bytes"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}"
    if args.max_queue < 0:
        return f"--max-queue must be ≥ 0, got {args.max_queue}"
    if args.max_tokens > args.max_tokens_limit:
        return "--max-tokens must not exceed --max-tokens-limit"
    return None


def resolve(args: argparse.Namespace) -> tuple[Path, str, Path, Optional[str]]:
    """(model directory, model id, memories directory, the line to log about an earlier demo's
    memories or None); a DmemError (one line) if not usable."""
    from ..adapter import is_adapter_dir
    from ..hub import resolve_model_path
    from ..runtime import default_memory_path

    if args.model:
        model_id = memory_id = args.model
        path = resolve_model_path(args.model, extra_patterns=["delta_mem_config.json",
                                                              "delta_mem.safetensors"])
    else:  # the demo is served as `dmem-demo`; its memories are per demo version
        from ..demo import DEMO_MEMORY, DEMO_NAME, demo_model_path

        path, model_id, memory_id = demo_model_path(), DEMO_NAME, DEMO_MEMORY
    if not (Path(path) / "config.json").is_file() or not is_adapter_dir(Path(path)):
        raise UsageError(f"{path} is not a converted δ-mem model directory")
    notice = None
    if args.memories:
        memories = Path(args.memories).expanduser()
    else:  # next to dmem-chat's memory of this model: <data>/memories/<model>/<id>.safetensors
        default = default_memory_path(memory_id)
        memories = default.with_name(default.name[:-len(".safetensors")])
        if not args.model:
            memories, notice = demo_memories(memories, Path(path))
    if memories.exists() and not memories.is_dir():
        raise UsageError(f"--memories {memories}: not a directory")
    return Path(path), Path(model_id).name or model_id, memories, notice


def demo_memories(default: Path, model_path: Path) -> tuple[Path, Optional[str]]:
    """The demo's memories directory — its version's own (`default`), or its directory under
    an earlier name — and, when it is new while an earlier demo model's memories are kept, the
    line that says where they are (dmem_mlx.demo.memory). Nothing is moved or written."""
    from ..demo.memory import default_demo_memory, upgrade_notice

    memory = default_demo_memory(default, model_path)
    if notice := upgrade_notice(memory, plural=True):
        notice = f"{notice[0].lower() + notice[1:]}; new memories go to {memory.path}"
    return memory.path, notice


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..blas import reexec_with_openblas

    reexec_with_openblas()
    args = build_parser().parse_args(argv)
    if why := check(args):
        print(f"{PROG}: error: {why}", file=sys.stderr)
        return 1
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s - %(levelname)s - %(message)s")
    try:
        model_path, model_id, memories, notice = resolve(args)
    except (DmemError, OSError) as exc:
        print(f"{PROG}: error: {user_message(exc)}", file=sys.stderr)
        return 1
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    import mlx.core as mx
    import uvicorn

    from ..utils import load
    from . import build_app
    from .schemas import Limits

    world = mx.distributed.init()  # a group of one unless started by mlx.launch
    if world.rank() == 0:  # what concerns the server as a whole: said and done once, by
        try:               # its HTTP rank, which alone opens memory files (distributed.py)
            memories.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"{PROG}: error: {user_message(exc)}", file=sys.stderr)
            return 1
        if notice:
            logging.warning("%s", notice)
        if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            logging.warning("listening on %s without an API key: anyone who can reach it can "
                            "read and change every memory (set --api-key or %s)", args.host,
                            API_KEY_ENV)
    logging.info("loading %s", model_path)
    try:
        if world.size() > 1:  # rank 0 serves HTTP, every rank runs the model (distributed.py)
            from ..distributed import sharded_load

            group = {"pipeline_group" if args.pipeline else "tensor_group": world}
            model, tokenizer = sharded_load(str(model_path), **group)
        else:
            model, tokenizer = load(str(model_path))
    except (DmemError, OSError) as exc:  # a damaged adapter or model: one line
        print(f"{PROG}: error: {user_message(exc)}", file=sys.stderr)
        return 1
    if world.size() > 1:
        from .distributed import build_sharded

        if world.rank() != 0:
            build_sharded(model, tokenizer, memories, world, max_kv_tokens=args.max_kv_tokens,
                          max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                          max_open=args.max_open, hold_arrivals=args.hold_arrivals)._run()
            return 0
    limits = Limits(max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
                    temperature=args.temp, top_p=args.top_p)
    app = build_app(model, tokenizer, memories, model_id, limits, api_key=api_key,
                    max_kv_tokens=args.max_kv_tokens, max_concurrent=args.max_concurrent,
                    max_queue=args.max_queue, max_open=args.max_open,
                    max_body_bytes=args.max_body_bytes, group=world,
                    hold_arrivals=args.hold_arrivals)
    # The engine thread hands every token to the HTTP thread: switch between them promptly
    # (Python's default 5 ms switch interval would add up to 5 ms to each token).
    sys.setswitchinterval(0.0005)
    logging.info("serving %s on http://%s:%d/v1 (memories in %s)", model_id, args.host,
                 args.port, memories)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=10)
    return 0
