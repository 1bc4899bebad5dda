"""dmem-serve: an OpenAI-compatible HTTP server for a δ-mem model, one memory per user.

    dmem-serve                                  # the demo model on http://127.0.0.1:8080/v1
    python -m dmem_mlx.server --model DIR --api-key KEY

From Python (e.g. tests): `build_app(model, tokenizer, memories=DIR)` returns the ASGI app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .schemas import APIError, Limits


def build_app(model: Any, tokenizer: Any, memories: Path, model_id: str = "dmem",
              limits: Optional[Limits] = None, api_key: Optional[str] = None,
              max_kv_tokens: Optional[int] = None, max_concurrent: int = 8,
              max_queue: int = 64, max_open: int = 64, max_body_bytes: int = 1 << 20,
              group: Any = None, hold_arrivals: bool = True) -> Any:
    """The ASGI app serving a loaded δ-mem model; memory files live in `memories`.

    hold_arrivals: a request arriving while others decode waits one decode step, to share its
    prefill with what arrives meanwhile (see `Engine`).

    group: the `mx.distributed` group of a sharded model (rank 0 serves; the other ranks run
    `distributed.build_sharded(...)._run()`).
    """
    from ..runtime import ChatSession, model_fingerprint
    from .app import create_app
    from .engine import Engine
    from .store import MemoryStore

    if group is not None and group.size() > 1:
        from .distributed import build_sharded

        engine = build_sharded(model, tokenizer, memories, group, max_kv_tokens=max_kv_tokens,
                               max_concurrent=max_concurrent, max_queue=max_queue,
                               max_open=max_open, hold_arrivals=hold_arrivals)
        return create_app(engine, model_id, limits or Limits(), api_key=api_key,
                          max_body_bytes=max_body_bytes)
    fingerprint = model_fingerprint(model, tokenizer)

    def session(memory: Any) -> ChatSession:
        return ChatSession(model, tokenizer, memory=memory, max_kv_tokens=max_kv_tokens,
                           fingerprint=fingerprint)

    store = MemoryStore(Path(memories), fingerprint, session, max_open=max_open)
    engine = Engine(model, tokenizer, store, max_concurrent=max_concurrent, max_queue=max_queue,
                    hold_arrivals=hold_arrivals)
    return create_app(engine, model_id, limits or Limits(), api_key=api_key,
                      max_body_bytes=max_body_bytes)


def main(argv: Optional[list] = None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)


__all__ = ["build_app", "main", "APIError", "Limits"]
