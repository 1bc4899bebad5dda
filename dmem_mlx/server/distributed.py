"""dmem-serve under `mlx.launch`: rank 0 answers HTTP, every rank runs the engine in lockstep.

As mlx-lm's server does it: once per engine round, rank 0 broadcasts what arrived (new chat
requests and memory calls, which requests were cancelled, whether to stop); every rank then
takes the same decisions on the same jobs, so the model runs the same calls everywhere. Rank 0
alone opens memory files: whether a memory opened (or the one-line error) is broadcast, then
each session starts from rank 0's bytes (`ShardedChatSession`, DESIGN §12). A request without
a seed gets one from rank 0, so sampled replies agree on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

from ..distributed import ShardedChatSession, broadcast_bytes
from ..runtime import MemoryFile
from .engine import CallJob, ChatJob, Engine
from .schemas import APIError, ChatRequest
from .store import MemoryStore



def _ignore(kind: str, value: Any) -> None:
    """The `emit` of a job on a rank without HTTP: its events go nowhere."""


class ShardedMemoryStore(MemoryStore):
    """A MemoryStore whose files only rank 0 touches; the other ranks keep the same sessions."""

    def __init__(self, *args: Any, group: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group
        self.main = group.rank() == 0

    def _open_file(self, memory: str) -> Optional[MemoryFile]:
        error = None
        file = None
        if self.main:
            try:
                file = super()._open_file(memory)
            except APIError as exc:
                error = [exc.status, exc.message, exc.param, exc.code]
        shared = json.loads(broadcast_bytes(json.dumps(error).encode(), self.group))
        if shared is not None:
            raise APIError(*shared)
        return file

    def info(self, memory: str) -> dict:
        return super().info(memory) if self.main else {}

    def delete(self, memory: str) -> dict:
        if self.main:
            return super().delete(memory)
        if memory in self._open:  # closed on every rank, in step
            self._close(memory)
        return {}


class ShardedEngine(Engine):
    """The engine on every rank; rank 0's inbox is shared with the others each round. Memory
    files are written on the worker (no writer thread): a save's gather involves every rank,
    and a key held for its write on rank 0 alone would take the ranks out of step."""

    def __init__(self, *args: Any, group: Any, **kwargs: Any):
        super().__init__(*args, write_behind=False, **kwargs)
        self.group = group
        self.main = group.rank() == 0
        self._jobs: dict[int, tuple[Any, Any]] = {}  # id → (job as submitted, the engine's copy)
        self._ids = 0

    def _round(self, block: bool) -> bool:
        """Take in this round's jobs on every rank; False when the server stops."""
        message = None
        if self.main:
            before = len(self._waiting)
            self._admit(block)
            arrived = [self._waiting.pop() for _ in range(len(self._waiting) - before)][::-1]
            copies = [self._copy(job) for job in arrived]
            self._waiting.extend(copy for _, copy in copies)
            message = {"stop": self._stop.is_set(), "jobs": [d for d, _ in copies],
                       "cancelled": [i for i, (job, copy) in self._jobs.items()
                                     if job.cancelled.is_set() and not copy.cancelled.is_set()]}
        message = json.loads(broadcast_bytes(json.dumps(message).encode() if self.main
                                             else None, self.group))
        if not self.main:
            self._waiting.extend(self._rebuild(d) for d in message["jobs"])
        for i in message["cancelled"]:
            self._jobs[i][1].cancelled.set()
        for i in [i for i, (_, copy) in self._jobs.items()
                  if copy.key not in self._busy and copy not in self._waiting]:
            del self._jobs[i]  # done on every rank: no more cancellations to share
        return not message["stop"]

    def _copy(self, job: Any) -> tuple[dict, Any]:
        """(description for the other ranks, the job this engine runs) of a submitted job."""
        self._ids += 1
        if isinstance(job, ChatJob):
            request = job.request
            if request.seed is None:  # one seed for every rank's sampler
                request = dataclasses.replace(request, seed=secrets.randbits(63))
            copy = ChatJob(request, job.emit, queued=job.queued)
            description = {"id": self._ids, "chat": dataclasses.asdict(request)}
            self._jobs[self._ids] = (job, copy)
        else:  # memory calls are never cancelled
            copy = job
            description = {"id": self._ids, "call": [job.key, *(job.op or ("", ))]}
        return description, copy

    def _rebuild(self, description: dict) -> Any:
        if "chat" in description:
            job = ChatJob(ChatRequest(**description["chat"]), _ignore)
        else:
            key, name, *args = description["call"]
            return CallJob(key, self._operation(name, key, args), op=(name, *args))
        self._jobs[description["id"]] = (job, job)
        return job

    def _operation(self, name: str, key: str, args: list) -> Callable[[], Any]:
        if name not in ("memory_info", "memory_delete", "memory_snapshot"):
            return lambda: None  # nothing the model takes part in
        method = getattr(self, name)
        return lambda: method(key, *args)


def build_sharded(model: Any, tokenizer: Any, memories: Path, group: Any,
                  max_kv_tokens: Optional[int] = None, max_concurrent: int = 8,
                  max_queue: int = 64, max_open: int = 64,
                  hold_arrivals: bool = True) -> ShardedEngine:
    """The engine of one rank (rank 0 wraps it in the HTTP app; the others run `_run`)."""
    from ..runtime import model_fingerprint

    fingerprint = model_fingerprint(model, tokenizer)

    def session(memory: Any) -> ShardedChatSession:
        return ShardedChatSession(model, tokenizer, memory=memory, max_kv_tokens=max_kv_tokens,
                                  fingerprint=fingerprint)

    store = ShardedMemoryStore(Path(memories), fingerprint, session, max_open=max_open,
                               group=group)
    return ShardedEngine(model, tokenizer, store, max_concurrent=max_concurrent,
                         max_queue=max_queue, group=group, hold_arrivals=hold_arrivals)
