"""A chat session over a δ-mem model: the conversation, its KV context, the δ memory and the
memory file, kept consistent with each other (DESIGN §3).

Each turn renders the whole conversation with the chat template and ingests only the tokens not
yet processed; if the rendered tokens diverge inside what was processed (a reply re-tokenized
differently, an edited message), the context goes back to the last point before the divergence
— KV cache trimmed, δ state restored — and is rebuilt from there. Replies are decoded token by
token; a sampled end-of-sequence or other special token (a ChatML <|im_start|> …) ends the reply
and is never fed to the model (so never shown or written), and the template's closing tokens of
the assistant turn are ingested after the reply.

Context budget: when a turn would not fit `max_kv_tokens`, the oldest turns leave the KV
context. They were written into δ already, so the shortened context is ingested with writes
off; they live on only in δ memory — the regime the adapter was trained for (DESIGN §3).
A message too long for the budget by itself is written into δ in parts (each a user message
of its own that then leaves the context); the reply sees its last part in context.

Undo: before each turn the session keeps what it needs to take the turn back — the δ state (a
few KB), the transcript length and the counts (`UndoStep`); the last UNDO_DEPTH are saved in
the memory file. `undo()` takes the last turn back, `retry()` answers its message again.

A reply that loops (the same span of at most REPEAT_PERIOD tokens repeated over its last
REPEAT_SPAN or more tokens) is cut there (finish_reason "repetition"). `reply()` then keeps the
reply up to the first round of the loop: the repeats are re-read out of the KV context and δ
(the context goes back to the reply's start and the kept text is written again), so the
transcript, the context and the memory hold no repeats; `undo()` takes the whole turn back.
"""

from __future__ import annotations

import codecs
import threading
from bisect import bisect_left
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.sample_utils import make_sampler

from ..cache import state_of, with_state
from ..errors import ContextTooLongError, MemorySaveError, NothingToUndoError, SessionBusyError
from .context import Context, Stopped
from .fingerprint import model_fingerprint
from .memory_file import (UNDO_DEPTH, MemoryData, MemoryFile, MemoryFileError, PastConversation,
                          PathLike, UndoStep, atomic_write, bound_past, encode, read_memory)
from .template import closing_tokens, count_sentences, render, sentence_spans
from .template import encode as encode_text

DEFAULT_KV_CAP = 8192
REPEAT_PERIOD = 16  # longest repeated span (tokens) that counts as a loop
REPEAT_SPAN = 32  # a loop is cut once it covers this many tokens (and at least 4 repetitions)


@dataclass
class ReplyChunk:
    """A streamed piece of a reply: its text and the token that produced it (-1 for text held
    back by the detokenizer and released at the end)."""

    text: str
    token: int


@dataclass
class ReplyStats:
    """How a reply went. finish_reason: "stop" (end-of-sequence sampled), "length" (max_tokens),
    "stopped" (stop event or the consumer closed the stream), "interrupted" (KeyboardInterrupt)."""

    text: str
    tokens: int
    tokens_per_sec: float
    prompt_tokens: int
    stopped: bool
    finish_reason: str
    prompt_tps: float = 0.0
    rebuilt: bool = False
    evicted_turns: int = 0
    taken_back: bool = False  # stopped before the reply began: the turn was not kept at all
    memory_only_parts: int = 0  # leading parts of a too-long message, written into δ only
    memory_only_tokens: int = 0
    memory_only_chars: int = 0


@dataclass
class Pending:
    """The end of a prompt left for the caller to feed (`begin_reply(defer=True)`): `ids` to
    feed with writes on after the context, each labelled with its `owners` entry."""

    ids: list[int]
    owners: list[int]


@dataclass
class Turn:
    """A reply under way (`ChatSession.begin_reply`): `logits` [vocab] float32 of its next token
    (None while `pending` tokens of the prompt are still to be fed), its tokens so far, and what
    feeding the next one and closing the turn need."""

    logits: Optional[mx.array]
    max_tokens: int
    prompt_tokens: int
    prompt_time: float
    rolled: bool
    evicted: int
    writing: bool
    message_id: int
    first_sentence: int
    previous_message_id: Optional[int]
    before: UndoStep  # the state before the turn (undo)
    context_states: dict = field(default_factory=dict)  # the KV context's δ state before it
    head: list[str] = field(default_factory=list)  # leading parts written into δ only
    head_tokens: int = 0
    context_tokens: int = 0  # the KV context when the reply starts (the whole prompt)
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0
    pending: Optional[Pending] = None


@dataclass
class SessionInfo:
    """The memory at a glance. tokens_written / turns: written into δ since the last reset (all
    conversations); turns_in_memory_only: of those, turns no longer in the KV context (evicted or
    from earlier conversations); kv_tokens / kv_budget: the KV context; layer_states: layer index →
    δ state [H, r, r]; fingerprint: the model the memory belongs to; save_error: why the memory
    file is behind (its last save failed, see `ChatSession.save_error`), else None."""

    tokens_written: int
    turns: int
    turns_in_memory_only: int
    kv_tokens: int
    kv_budget: int
    layer_states: dict[int, np.ndarray]
    memory_path: Optional[Path]
    last_saved: Optional[datetime]
    fingerprint: dict
    read_only: bool
    conversations: int = 1
    memory_bytes: int = 0
    granularity: str = "token"
    system: Optional[str] = None
    undo_depth: int = 0
    past_conversations: int = 0
    save_error: Optional[str] = None


def default_kv_budget(model: nn.Module) -> int:
    """The model's max_position_embeddings, capped at DEFAULT_KV_CAP tokens."""
    n = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return min(int(n), DEFAULT_KV_CAP) if n else DEFAULT_KV_CAP


class ChatSession:
    """A conversation with a δ-mem model whose memory persists in an optional `MemoryFile`.

    The session owns its δ memory (`state`, a `DeltaState`): from the memory file, or empty
    without one. Any number of sessions can share one model; each reads and writes only its own
    memory (the model's default memory, `model.delta_mem.state`, is not touched).

    system: system prompt of new conversations (a saved conversation with another one is not
    resumed). max_kv_tokens: KV context budget (default `default_kv_budget(model)`).
    prefill_step: tokens per prefill call. fingerprint: the model's (default computed:
    `model_fingerprint(model, tokenizer)`); a memory of another model is refused.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, memory: Optional[MemoryFile] = None,
                 system: Optional[str] = None, max_kv_tokens: Optional[int] = None,
                 prefill_step: int = 512, fingerprint: Optional[dict] = None):
        if getattr(model, "delta_mem", None) is None:
            raise ValueError("the model has no δ-mem attached (load it with dmem_mlx.load)")
        if max_kv_tokens is not None and (not isinstance(max_kv_tokens, int)
                                          or max_kv_tokens < 16):
            raise ValueError(f"max_kv_tokens must be an integer >= 16, got {max_kv_tokens!r}")
        self.model, self.tokenizer, self.memory, self.system = model, tokenizer, memory, system
        self.fingerprint = fingerprint or model_fingerprint(model, tokenizer)
        if memory is not None:
            memory.check_fingerprint(self.fingerprint)
        self.max_kv_tokens = max_kv_tokens or default_kv_budget(model)
        self._delta = model.delta_mem
        self.state = self._delta.new_state()
        self._groups = self._delta.config.memory_write_granularity != "token"
        self._ctx = Context(model, prefill_step, self.state)
        self._closing = closing_tokens(tokenizer)
        self._prefixes: dict = {}  # the last render's prefix renders (template.render)
        # a reply ends at end-of-sequence and at any special (control) token, e.g. a ChatML
        # <|im_start|>: such a token is never fed, shown or written as text
        self._eos = set(getattr(tokenizer, "eos_token_ids", None) or []) | special_ids(tokenizer)
        self._read_only = memory is not None and memory.read_only
        self._busy = False
        self._closed = False
        self._ram_snapshots: dict[str, MemoryData] = {}
        self._undo_steps: list[tuple[UndoStep, bool]] = []  # (step, incognito turn?)
        self._past: list[PastConversation] = []
        self._started: Optional[str] = None
        self.stop_repetition = True
        self._last_end = 0  # committed part of the last rendered context, in tokens
        self.last_reply: Optional[ReplyStats] = None
        # None: the memory file is written before a change returns; else each write is handed
        # to this callable, to be run later in the order given (a server's writer thread)
        self.write_behind: Optional[Callable[[Callable[[], Any]], None]] = None
        self._save_error: Optional[MemorySaveError] = None  # the memory file is behind
        self._keep_no_backup = False  # a save without backup (forget) is still to be done
        if memory is not None and memory.data is not None:
            self._apply(memory.data)
        else:
            self._start_memory()

    # -- the conversation --------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        """The current conversation ({"role", "content"} copies; system prompt first if any)."""
        return [dict(m) for m in self._messages]

    @property
    def read_only(self) -> bool:
        """Incognito: turns read the memory but write nothing and are not saved."""
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        if not value and self.memory is not None and self.memory.read_only:
            raise MemoryFileError(f"{self.memory.path}: opened read-only; reopen it to write")
        self._read_only = bool(value)

    def reply(self, user_text: str, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
              seed: Optional[int] = None, stop: Optional[threading.Event] = None,
              logits_processors: Optional[Sequence[Callable]] = None) -> Iterator[ReplyChunk]:
        """Answer `user_text`, streaming ReplyChunks; then `last_reply` holds the ReplyStats and
        the memory file has been saved.

        stop: an Event checked between tokens and between prefill chunks. A turn stopped before
        its first token is taken back entirely (`last_reply.taken_back`: no empty reply is
        written). Stopping later, closing the stream or Ctrl-C keeps the partial reply,
        consistently in transcript, KV context and δ memory. If the memory file cannot be
        written (disk full …) the stream raises MemorySaveError after the turn: the turn is kept
        (`last_reply`, `save_error`) and written by the next save.
        """
        if not isinstance(user_text, str):
            raise TypeError("user_text must be a str")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self._check_idle()
        return self._reply(user_text, max_tokens, make_sampler(temp, top_p), seed, stop,
                           list(logits_processors or []))

    def feed(self, messages: Sequence[dict[str, str]]) -> None:
        """Append messages (e.g. an earlier conversation) and ingest them without replying:
        written into δ unless read-only, then saved."""
        self._check_idle()
        messages = [_checked_message(m) for m in messages]
        turns: list[list[dict]] = []
        for m in messages:  # one turn at a time, so that eviction only drops what was written
            if not turns or m["role"] == "user":
                turns.append([])
            turns[-1].append(m)
        self._busy = True
        try:
            for turn in turns:
                n, states, written = len(self._messages), self._ctx.states(), self._tokens_written
                self._messages += turn
                self._incognito += [self._read_only] * len(turn)
                try:
                    self._sync(False, strict=True)
                except BaseException:
                    self._undo(n, states, written)
                    raise
                self._committed = len(self._messages)
                if not self._read_only:
                    self._turns += sum(m["role"] == "user" for m in turn)
        finally:
            self._busy = False
            self._save()

    def follow(self, history: Sequence[dict[str, str]]) -> int:
        """Take the conversation a client resends (its messages before the new one, system
        prompt first if any) as this one (DESIGN §3). The messages it shares with the
        transcript stay as they are (written once). The transcript's messages after the first
        difference are dropped (an edited message, a regenerated reply) — their δ writes taken
        back: exactly while they are in this process's KV context (rolled back), else with the
        undo history where it reaches (the context is then re-read) — and the client's from
        there are fed (written, saved). A history that begins further on in the transcript (the client
        dropped its oldest messages) leaves the skipped ones in δ only; one that shares nothing
        with it, or has another system prompt, starts a new conversation (δ kept). Returns how
        many messages were fed."""
        self._check_idle()
        history = [_checked_message(m) for m in history]
        system = history[0]["content"] if history and history[0]["role"] == "system" else None
        body = history[1:] if system is not None else history
        own = 1 if self._messages and self._messages[0]["role"] == "system" else 0
        mine = self._messages[own:]
        start, shared = 0, 0  # where the history begins in the transcript, and for how long
        for j in range(len(mine)):
            n = 0
            while n < len(body) and j + n < len(mine) and mine[j + n] == body[n]:
                n += 1
            if n > shared:
                start, shared = j, n
        if system != self.system or (mine and not shared):
            self.system = system
            if mine:
                self.new_conversation()
            else:  # nothing said yet: only the system prompt changes
                self._messages = [{"role": "system", "content": system}] if system else []
                self._incognito = [False] * len(self._messages)
                self._context_start, self._committed = len(self._messages), 0
                self._ctx.reset()
            start = shared = 0
        else:
            cut = own + start + shared
            if cut < len(self._messages) and cut not in self._ctx.owners:
                # not in this process's KV context: the undo history takes them back
                while self._undo_steps and self._undo_steps[-1][0].messages >= cut:
                    self._restore_step(self._undo_steps.pop()[0])
            if cut < len(self._messages):  # the next sync rolls the KV context back (exact)
                in_context = set(self._ctx.owners)
                self._turns -= sum(1 for i in range(cut, self._committed)
                                   if i in in_context and self._messages[i]["role"] == "user"
                                   and not self._incognito[i])
                del self._messages[cut:], self._incognito[cut:]
                self._committed = min(self._committed, cut)
                self._undo_steps = [u for u in self._undo_steps if u[0].messages < cut]
            if own + start > self._context_start:
                self._context_start = own + start
                self._ctx.reset()
        if shared < len(body):
            self.feed(body[shared:])
        return len(body) - shared

    def edit_message(self, index: int, content: str) -> None:
        """Change an earlier message. At the next turn the context goes back to the last point
        before it (δ writes made since then undone while they are still in this process's
        context) and is rebuilt from there."""
        self._check_idle()
        if not 0 <= index < len(self._messages):
            raise IndexError(f"no message {index}")
        self._messages[index] = {"role": self._messages[index]["role"], "content": str(content)}

    def new_conversation(self) -> None:
        """Clear the transcript and the KV context; the δ memory is kept. The conversation
        joins the past conversations (`past_conversations`) and its undo history ends."""
        self._check_idle()
        self._archive()
        self._messages = [{"role": "system", "content": self.system}] if self.system else []
        self._incognito = [False] * len(self._messages)
        self._context_start = len(self._messages)
        self._committed = 0  # the system prompt is written with the first turn (DESIGN §2)
        self._conversations += 1
        self._ctx.reset()
        self._save()

    def forget(self) -> None:
        """Reset the δ memory, the counts, the transcript, the undo history and the past
        conversations, and save without keeping the previous version (no .bak is left; named
        snapshots are kept)."""
        self._check_idle()
        self.state.reset()
        self._start_memory()
        self._save(force=True, backup=False)

    # -- undo, retry, past conversations ---------------------------------------------------
    @property
    def undo_depth(self) -> int:
        """How many turns `undo()` can take back (this conversation, at most UNDO_DEPTH)."""
        return len(self._undo_steps)

    def undo(self) -> UndoStep:
        """Take back the last turn: δ state, transcript, counts and KV context as they were
        before it (the context is read again now, see `read_context`); saved. Returns the step
        (its `user_text` is the message taken back). Raises NothingToUndoError."""
        self._check_idle()
        if not self._undo_steps:
            raise NothingToUndoError("nothing to undo in this conversation")
        step, incognito = self._undo_steps.pop()
        self._restore_step(step)
        self._sync(False)
        self._save(force=not incognito)
        return step

    def read_context(self, stop: Optional[Callable[[], bool]] = None) -> int:
        """Read the conversation into the KV context now, without writing into δ (it is there
        already) — what the next turn would do first; e.g. right after loading a memory, so that
        the context is shown as it is. stop: checked between prefill chunks (what was read
        stays; the next turn reads the rest). Returns the context's length in tokens."""
        self._check_idle()
        self._busy = True
        try:
            self._sync(False, stop=stop)
        except Stopped:
            pass
        finally:
            self._busy = False
        return len(self._ctx)

    def retry(self, max_tokens: int = 256, **kwargs: Any) -> Iterator[ReplyChunk]:
        """Answer the last turn's message again from the state before it (`undo()`, then
        `reply()` with the same text and the same keyword arguments)."""
        self._check_idle()
        if not self._undo_steps:
            raise NothingToUndoError("nothing to retry in this conversation")
        return self.reply(self.undo().user_text, max_tokens, **kwargs)

    def past_conversations(self) -> list[PastConversation]:
        """The earlier conversations of this memory, oldest first (bounded, see memory_file)."""
        return [PastConversation([dict(m) for m in p.transcript], p.started, p.ended)
                for p in self._past]

    # -- snapshots, export, import --------------------------------------------------------
    def snapshot(self, name: str) -> None:
        """Save the memory (δ state, transcript, counts) under `name` (replacing one of that name)."""
        self._check_idle()
        if self.memory is None:
            self._ram_snapshots[_checked_name(name)] = self._data()
        else:
            self.memory.save_snapshot(name, self._data())

    def restore(self, name: str) -> None:
        """Go back to a named snapshot (the current memory is replaced, then saved)."""
        self._check_idle()
        if self.memory is None:
            if _checked_name(name) not in self._ram_snapshots:
                raise MemoryFileError(f"no snapshot named {name.strip()!r}")
            data = self._ram_snapshots[_checked_name(name)]
        else:
            data = self.memory.load_snapshot(name)
        self._apply(data)
        self._save(force=True)

    def snapshots(self) -> list[str]:
        if self.memory is None:
            return sorted(self._ram_snapshots)
        return self.memory.snapshots()

    def delete_snapshot(self, name: str) -> None:
        self._check_idle()
        if self.memory is None:
            if self._ram_snapshots.pop(_checked_name(name), None) is None:
                raise MemoryFileError(f"no snapshot named {name.strip()!r}")
        else:
            self.memory.delete_snapshot(name)

    def export(self, path: PathLike) -> Path:
        """Write the memory to a standalone memory file at `path`."""
        self._check_idle()
        path = Path(path).expanduser()
        if self.memory is not None and path.resolve() == self.memory.path.resolve():
            raise MemoryFileError(f"{path}: is this session's own memory file; export elsewhere")
        data = self._data()
        data.saved = datetime.now().astimezone().isoformat(timespec="milliseconds")
        try:
            atomic_write(path, encode(data))
        except OSError as exc:
            raise MemoryFileError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return path

    def check_import(self, path: PathLike) -> None:
        """Raise MemoryFileError unless `path` is a memory file import_ would take."""
        read_memory(Path(path).expanduser(), self.fingerprint)

    def import_(self, path: PathLike) -> None:
        """Replace the memory with an exported memory file (validated, same model), then save."""
        self._check_idle()
        self._apply(read_memory(Path(path).expanduser(), self.fingerprint))
        self._save(force=True)

    # -- state -------------------------------------------------------------------------------
    def info(self) -> SessionInfo:
        states = {}
        for i, s in self._ctx.states().items():
            cfg = self._delta.config
            states[i] = (np.zeros((cfg.num_state_heads, cfg.rank, cfg.rank), np.float32)
                         if s is None else np.array(s[0], dtype=np.float32))
        in_context = sum(1 for i in self._context_indices()
                         if self._messages[i]["role"] == "user" and i < self._committed
                         and not self._incognito[i])
        return SessionInfo(
            tokens_written=self._tokens_written, turns=self._turns,
            turns_in_memory_only=max(0, self._turns - in_context), kv_tokens=len(self._ctx),
            kv_budget=self.max_kv_tokens, layer_states=states,
            memory_path=self.memory.path if self.memory is not None else None,
            last_saved=self.memory.last_saved if self.memory is not None else None,
            fingerprint=dict(self.fingerprint), read_only=self._read_only,
            conversations=self._conversations,
            memory_bytes=sum(s.nbytes for s in states.values()),
            granularity=self._delta.config.memory_write_granularity, system=self.system,
            undo_depth=len(self._undo_steps), past_conversations=len(self._past),
            save_error=self._save_error.reason or str(self._save_error)
            if self._save_error is not None else None)

    def close(self) -> None:
        """Release the memory file's lock (idempotent; the memory was saved after every turn).
        If the last save failed, it is tried once more first; `save_error` says if it failed
        again (what it held is then lost)."""
        if self._save_error is not None and not self._closed and not self.memory.closed:
            try:
                self._write(self._data(), backup=True)
            except MemorySaveError:
                pass
        if self.memory is not None:
            self.memory.close()
        self._closed = True

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals: memory data --------------------------------------------------------------
    def _start_memory(self) -> None:
        self._tokens_written = self._turns = 0
        self._conversations = 1
        self._created = datetime.now().astimezone().isoformat(timespec="milliseconds")
        self._started = None
        self._undo_steps, self._past = [], []
        self._messages = [{"role": "system", "content": self.system}] if self.system else []
        self._incognito = [False] * len(self._messages)
        self._context_start = len(self._messages)
        self._committed = 0  # the system prompt is written with the first turn (DESIGN §2)
        self._ctx.reset()

    def _apply(self, data: MemoryData) -> None:
        """Take over a validated memory: δ state, transcript, counts. The KV context restarts."""
        cfg = self._delta.config
        shape = (cfg.num_state_heads, cfg.rank, cfg.rank)
        if set(data.states) != set(self._delta.layers) or any(
                s.shape != shape for s in data.states.values()):
            raise MemoryFileError("the memory's δ state does not fit this model's layers")
        self._load_states(data.states)
        self._tokens_written, self._turns = data.tokens_written, data.turns
        self._conversations, self._created = data.conversations, data.created
        self._past = list(data.past)
        self._undo_steps = [(step, False) for step in data.undo]
        self._started = data.started
        messages = [dict(m) for m in data.transcript]
        saved_system = messages[0]["content"] if messages and messages[0]["role"] == "system" \
            else None
        if self.system is None:
            self.system = saved_system
        self._messages, self._incognito = messages, [False] * len(messages)
        self._committed = len(messages)
        if self.system != saved_system:  # another system prompt: a new conversation starts
            self._conversations += any(m["role"] != "system" for m in messages)
            self._archive()
            messages = [{"role": "system", "content": self.system}] if self.system else []
            self._messages, self._incognito = messages, [False] * len(messages)
            self._context_start, self._committed = len(messages), 0
        else:  # the saved conversation goes on: all of it is in δ already
            self._context_start = min(data.context_start, len(messages))
        self._ctx.reset()

    def _state_arrays(self) -> dict[int, np.ndarray]:
        """The δ state of every layer as numpy [H, r, r] float32 (zeros before any write).
        The evaluated [1, H, r, r] arrays are copied whole and sliced in NumPy: slicing them in
        MLX would be one more evaluation each, waiting for whatever the stream is computing
        (a server's batch step)."""
        return {int(name.split(".")[1]): np.array(value, dtype=np.float32)[0]
                for name, value in self.state.snapshot().items()}

    def _load_states(self, states: dict[int, np.ndarray]) -> None:
        self.state.restore({f"layers.{i}": mx.array(s[None]) for i, s in states.items()})

    def _archive(self) -> None:
        """The current conversation (what was saved of it) joins the past conversations; its
        undo history ends."""
        transcript = [dict(self._messages[i]) for i in range(min(self._committed,
                                                                 len(self._messages)))
                      if not self._incognito[i]]
        if any(m["role"] == "user" for m in transcript):
            ended = datetime.now().astimezone().isoformat(timespec="milliseconds")
            self._past = bound_past([*self._past,
                                     PastConversation(transcript, self._started, ended)])
        self._started = None
        self._undo_steps = []

    def _push_undo(self, user_text: str) -> None:
        step = UndoStep(self._state_arrays(), len(self._messages), self._context_start,
                        self._tokens_written, self._turns, user_text)
        self._undo_steps = [*self._undo_steps, (step, self._read_only)][-UNDO_DEPTH:]

    def _restore_step(self, step: UndoStep) -> None:
        """δ state, transcript, counts as in `step`; the KV context restarts (the transcript
        that stays is in δ already: it is re-read, not written again)."""
        self._load_states(step.states)
        del self._messages[step.messages:], self._incognito[step.messages:]
        self._context_start = min(step.context_start, len(self._messages))
        self._committed = len(self._messages)
        self._tokens_written, self._turns = step.tokens_written, step.turns
        self._ctx.reset()

    def _data(self) -> MemoryData:
        """The memory as saved: incognito messages (and their undo steps) are left out."""
        keep = [i for i in range(len(self._messages)) if not self._incognito[i]]

        def kept(n: int) -> int:  # index in the saved transcript of message index n
            return sum(1 for i in keep if i < min(n, self._committed))

        undo = [UndoStep(step.states, kept(step.messages), kept(step.context_start),
                         step.tokens_written, step.turns, step.user_text)
                for step, incognito in self._undo_steps if not incognito]
        return MemoryData(
            states=self._state_arrays(), fingerprint=self.fingerprint,
            transcript=[dict(self._messages[i]) for i in keep if i < self._committed],
            context_start=kept(self._context_start),
            tokens_written=self._tokens_written, turns=self._turns,
            conversations=self._conversations, created=self._created, undo=undo,
            past=list(self._past), started=self._started)

    def _save(self, force: bool = False, backup: bool = True) -> None:
        """Save after a change (not in incognito unless forced, never for a read-only file)."""
        if self.memory is None or self.memory.read_only or (self._read_only and not force):
            return
        self._write(self._data(), backup)

    def _write(self, data: MemoryData, backup: bool) -> None:
        """Write `data` to the memory file now, or hand the write to `write_behind` (the data
        is taken now: later changes are not in it). A write that fails now leaves the change
        in the session (`save_error`); the next save writes it."""
        memory = self.memory
        if self.write_behind is not None:
            self.write_behind(lambda: memory.save(data, backup=backup))
            return
        backup = backup and not self._keep_no_backup  # a failed forget leaves no .bak later
        try:
            memory.save(data, backup=backup)
        except MemorySaveError as exc:
            self._save_error, self._keep_no_backup = exc, not backup
            raise
        self._save_error, self._keep_no_backup = None, False

    @property
    def save_error(self) -> Optional[MemorySaveError]:
        """Why the memory file is behind this session (its last save failed: disk full …), or
        None. What was not saved stays in the session; the next save (or `close`) writes it."""
        return self._save_error

    def _check_idle(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed")
        if self._busy:
            raise SessionBusyError("a reply is being generated: stop it or wait for it")

    def _undo(self, n_messages: int, states: dict, written: int) -> None:
        """Take back a turn that did not get to reply: transcript, δ state, KV context."""
        del self._messages[n_messages:], self._incognito[n_messages:]
        self._committed = min(self._committed, n_messages)
        self._ctx.set_states(states)
        self._ctx.truncate(self._last_end)
        self._tokens_written = written

    # -- internals: context ------------------------------------------------------------------
    def _context_indices(self) -> list[int]:
        system = 1 if self._messages and self._messages[0]["role"] == "system" else 0
        return list(range(system)) + list(range(max(self._context_start, system),
                                                len(self._messages)))

    def _numbering(self) -> tuple[list[int], list[int]]:
        """Message id and first sentence id of every message of the conversation (DESIGN §2)."""
        numbers, sentence_starts, n, s = [], [], 0, 0
        for m in self._messages:
            written = m["role"] != "system"
            numbers.append(n if written else -1)
            sentence_starts.append(s)
            if written:
                n += 1
                s += count_sentences(m["content"])
        return numbers, sentence_starts

    def _render(self, generation_prompt: bool):
        """The context rendered, and the token index where its committed messages end."""
        idx = self._context_indices()
        numbers, starts = self._numbering()
        r = render(self.tokenizer, [self._messages[i] for i in idx], generation_prompt,
                   [numbers[i] for i in idx], [starts[i] for i in idx], self._prefixes)
        k = sum(1 for i in idx if i < self._committed)
        return r, (r.block_ends[k - 1] if k else 0)

    def _evict(self, r, reserve: int) -> int:
        """Move the oldest turns out of the KV context until `reserve` more tokens fit (the turn
        being answered stays). Returns how many turns left; the KV context is then empty."""
        idx = self._context_indices()
        lengths = dict(zip(idx, np.diff([0, *r.block_ends]).tolist()))
        users = [i for i in idx if self._messages[i]["role"] == "user"
                 and self._context_start < i <= self._committed]  # only written turns leave
        excess = len(r.ids) + reserve - self.max_kv_tokens
        new_start = self._context_start
        for i in users:
            new_start = i
            if sum(lengths[j] for j in idx if self._context_start <= j < i) >= excess:
                break
        turns = sum(1 for j in range(self._context_start, new_start)
                    if self._messages[j]["role"] == "user")
        if new_start != self._context_start:
            self._context_start = new_start
            self._ctx.reset()
        return turns

    def _sync(self, generation_prompt: bool, reserve: int = 0, logits: bool = False,
              stop: Optional[Callable[[], bool]] = None, strict: bool = False,
              defer: bool = False):
        """Bring the KV context and δ memory in line with the transcript, evicting old turns
        if `reserve` more tokens would not fit (strict: refuse what does not fit even then;
        otherwise the turn being answered may overflow the budget by what its reply's
        re-tokenization adds). defer (with logits): the last call, if it writes every token
        and fits one prefill call, is left to the caller.

        Returns (logits of the last token, or the deferred `Pending`, or None; tokens ingested
        or to be fed; rolled back?; turns evicted).
        """
        r, end = self._render(generation_prompt)
        evicted = 0
        if len(r.ids) + reserve > self.max_kv_tokens:
            evicted = self._evict(r, reserve)
            if evicted:
                r, end = self._render(generation_prompt)
            need = len(r.ids) + (len(self._closing) + 1 if reserve else 0)
            if strict and need > self.max_kv_tokens:
                raise ContextTooLongError(
                    f"the message needs {need} tokens of context, more than the KV budget of "
                    f"{self.max_kv_tokens} allows even with every earlier turn in memory only")
        self._last_end = end
        ctx, ids = self._ctx, r.ids
        written = ctx.n_written
        idx = self._context_indices()
        owners = [idx[b] if b < len(idx) else -1 for b in r.blocks]
        rolled, undone = False, set()
        shared = ctx.common_prefix(ids)
        if shared < len(ctx) or (logits and shared == len(ids)):
            undone = ctx.rollback(min(shared, len(ids) - 1))
            rolled = True
        start = len(ctx)
        # Committed messages are in δ already: re-read only, unless their writes were undone.
        flags = [owners[t] in undone if t < end else not self._read_only
                 for t in range(start, len(ids))]
        out, t = None, start
        while t < len(ids):
            u = t
            while u < len(ids) and flags[u - start] == flags[t - start]:
                u += 1
            if (defer and logits and u == len(ids) and flags[t - start] and not self._groups
                    and u - t <= ctx.prefill_step):
                ctx.mark()
                return Pending(ids[t:u], owners[t:u]), len(ids) - start, rolled, evicted
            groups = {}
            if self._groups:
                groups = {"message_ids": r.message_ids[t:u], "sentence_ids": r.sentence_ids[t:u]}
            try:
                out = ctx.ingest(ids[t:u], flags[t - start], logits=logits and u == len(ids),
                                 stop=stop, owners=owners[t:u], **groups)
            finally:
                self._tokens_written += ctx.n_written - written
                written = ctx.n_written
            t = u
        return out, len(ids) - start, rolled, evicted

    # -- internals: a turn -------------------------------------------------------------------
    # -- a turn, step by step (a server decoding several sessions in one batch) ---------------
    def begin_reply(self, user_text: str, max_tokens: int = 256,
                    stop: Optional[Callable[[], bool]] = None,
                    defer: bool = False) -> Optional[Turn]:
        """Add `user_text` and ingest the conversation up to the reply (evicting old turns, or
        writing a too-long message into δ in parts, as the budget asks). Returns the Turn,
        holding the logits of the reply's first token, or None if `stop()` turned true before
        that (the turn is then taken back). The session stays busy until `end_reply`; tokens go
        in with `feed_token` (or `record_token`).

        defer (token writes): the prompt's last call may be left to the caller, e.g. to prefill
        several sessions in one batch: the Turn then has `pending` tokens and no logits; feed
        them and give the result to `complete_prompt` (or take the turn back: `cancel_reply`).
        """
        if not isinstance(user_text, str):
            raise TypeError("user_text must be a str")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self._check_idle()
        self._busy = True
        n, states, written = len(self._messages), self._ctx.states(), self._tokens_written
        before = UndoStep(self._state_arrays(), n, self._context_start, written, self._turns,
                          user_text)
        writing = not self._read_only
        head: list[str] = []
        tic = time.perf_counter()
        try:
            *head, in_context = self._parts(user_text, max_tokens)
            head_tokens = 0
            for part in head:  # too long for the context: the leading parts go to δ only
                self._messages.append({"role": "user", "content": part})
                self._incognito.append(not writing)
                head_tokens += self._sync(False, stop=stop, strict=True)[1]
                self._committed = len(self._messages)
            self._messages.append({"role": "user", "content": in_context})
            self._incognito.append(not writing)
            logits, prompt_tokens, rolled, evicted = self._sync(
                True, max_tokens + len(self._closing), logits=True, stop=stop, strict=True,
                defer=defer)
        except BaseException as exc:
            if head:
                self._restore_step(before)
            else:
                self._undo(n, states, written)
            self._busy = False
            if not isinstance(exc, Stopped):
                raise
            self.last_reply = ReplyStats("", 0, 0.0, 0, True, "stopped", taken_back=True)
            return None
        pending = logits if isinstance(logits, Pending) else None
        context = len(self._ctx) + (len(pending.ids) if pending else 0)
        numbers, sentence_starts = self._numbering()
        turn = Turn(
            logits=None if pending else logits, writing=writing,
            prompt_tokens=prompt_tokens + head_tokens,
            prompt_time=time.perf_counter() - tic, rolled=rolled, evicted=evicted,
            max_tokens=min(max_tokens, self.max_kv_tokens - context - len(self._closing)),
            message_id=numbers[-1] + 1,  # the user message just added has numbers[-1] >= 0
            first_sentence=sentence_starts[-1] + count_sentences(in_context),
            previous_message_id=self.state.generation_message_id, before=before, head=head,
            head_tokens=head_tokens, context_tokens=context, context_states=states,
            pending=pending)
        self.state.generation_message_id = turn.message_id
        if pending is None:
            self._ctx.mark()
        turn.started = time.perf_counter()
        return turn

    def complete_prompt(self, turn: Turn, logits: mx.array, cache: list[Any]) -> None:
        """The `pending` tokens of `turn` were fed by the caller: `cache` is this sequence's
        prompt cache after them (its KV and δ state are taken over), `logits` [vocab] float32
        those of the reply's first token."""
        pending, ctx = turn.pending, self._ctx
        ctx.cache = with_state([getattr(c, "kv", c) for c in cache], self.model, ctx.state)
        ctx.set_states(state_of(cache).layers)
        written = ctx.n_written
        ctx.record(pending.ids, True, owners=pending.owners)
        self._tokens_written += ctx.n_written - written
        turn.logits, turn.pending = logits, None
        turn.prompt_time += time.perf_counter() - turn.started
        ctx.mark()
        turn.started = time.perf_counter()

    def is_end(self, token: int) -> bool:
        """Whether `token` ends a reply (end-of-sequence or the template's end of turn)."""
        return token in self._eos

    def repeating(self, turn: Turn) -> bool:
        """Whether the reply loops (and `stop_repetition` asks to cut it there)."""
        return self.stop_repetition and looping(turn.tokens)

    def feed_token(self, turn: Turn, token: int) -> mx.array:
        """Feed a sampled token (never an end token) of `turn`; the logits of the next one
        [vocab] float32, being computed."""
        message_id, sentence_id = None, None
        if self._groups:
            message_id = turn.message_id
            sentence_id = self._sentence_id(turn.tokens, token, turn.first_sentence)
        logits = self._ctx.step(token, turn.writing, message_id, sentence_id,
                                owner=len(self._messages))
        self._record(turn, token)
        return logits

    @property
    def closing_tokens(self) -> list[int]:
        """The tokens the chat template puts after a reply (ingested when a turn ends)."""
        return list(self._closing)

    def record_token(self, turn: Turn, token: int, reply: bool = True) -> None:
        """Note a token of `turn` (token writes) that a batched forward call fed: a token of the
        reply, or (reply=False) one of its `closing_tokens` fed ahead of `end_reply`, which then
        has nothing left to ingest. Its KV and δ write live in the batch's cache until they are
        handed back to this session's."""
        self._ctx.record([token], turn.writing, owner=len(self._messages))
        if reply:
            self._record(turn, token)
        else:
            self._tokens_written += self._ctx.wrote[-1]

    def end_reply(self, turn: Turn, finish: str, text: Optional[str] = None) -> ReplyStats:
        """Close `turn`: the reply (`text`, default the decoded tokens; a shorter text, e.g.
        cut at a stop string, is re-read so that context and δ hold exactly it) goes into the
        transcript, the template's closing tokens are ingested, the memory file is saved.
        finish: "stop", "length", "repetition", "stopped" or "interrupted"."""
        decode_time = time.perf_counter() - turn.started
        try:
            if text is None:
                text = self.tokenizer.decode(turn.tokens)
            self._messages.append({"role": "assistant", "content": text})
            self._incognito.append(not turn.writing)
            rolled = self._sync(False)[2] or turn.rolled
            self._committed = len(self._messages)
            if turn.writing:
                self._turns += 1
            self._undo_steps = [*self._undo_steps, (turn.before, not turn.writing)][-UNDO_DEPTH:]
            if self._started is None:
                self._started = datetime.now().astimezone().isoformat(timespec="milliseconds")
            self.last_reply = ReplyStats(
                text=text, tokens=len(turn.tokens),
                tokens_per_sec=len(turn.tokens) / decode_time if decode_time > 0 else 0.0,
                prompt_tokens=turn.prompt_tokens, stopped=finish in ("stopped", "interrupted"),
                finish_reason=finish,
                prompt_tps=turn.prompt_tokens / turn.prompt_time if turn.prompt_time > 0 else 0.0,
                rebuilt=rolled, evicted_turns=turn.evicted, memory_only_parts=len(turn.head),
                memory_only_tokens=turn.head_tokens,
                memory_only_chars=sum(map(len, turn.head)))
            self._save()
        finally:
            self.state.generation_message_id = turn.previous_message_id
            self._busy = False
        return self.last_reply

    def cancel_reply(self, turn: Turn) -> ReplyStats:
        """Take back `turn` before any of its reply was fed (stopped before its first token):
        its message, its δ writes and its context go, as if it had not been sent; nothing is
        saved. `last_reply` says so (taken_back)."""
        try:
            if turn.head:
                self._restore_step(turn.before)
            else:
                self._undo(turn.before.messages, turn.context_states, turn.before.tokens_written)
        finally:
            self.state.generation_message_id = turn.previous_message_id
            self._busy = False
        self.last_reply = ReplyStats("", 0, 0.0, 0, True, "stopped", taken_back=True)
        return self.last_reply

    def _record(self, turn: Turn, token: int) -> None:
        turn.tokens.append(token)
        self._tokens_written += self._ctx.wrote[-1]

    # -- internals: a turn -------------------------------------------------------------------
    def _reply(self, user_text: str, max_tokens: int, sampler: Callable, seed: Optional[int],
               stop: Optional[threading.Event], processors: list) -> Iterator[ReplyChunk]:
        turn = self.begin_reply(user_text, max_tokens, stop.is_set if stop is not None else None)
        if turn is None:
            return
        if seed is not None:
            mx.random.seed(seed)
        detok = self.tokenizer.detokenizer
        detok.reset()
        finish, error, closed = "length", None, False

        def sample(logits: mx.array) -> mx.array:
            for processor in processors:
                logits = processor(mx.array(self._ctx.ids), logits[None])[0]
            y = sampler((logits - mx.logsumexp(logits, keepdims=True))[None])
            mx.async_eval(y)
            return y

        try:
            # The next token is sampled while the current one is streamed out; it is fed only
            # once known not to be the EOS and if no stop was asked for in between.
            y = sample(turn.logits)
            while len(turn.tokens) < turn.max_tokens:
                token = int(y.item())
                if self.is_end(token):
                    finish = "stop"
                    break
                if stop is not None and stop.is_set():
                    finish = "stopped"
                    break
                logits = self.feed_token(turn, token)
                if len(turn.tokens) < turn.max_tokens:
                    y = sample(logits)
                detok.add_token(token)
                yield ReplyChunk(detok.last_segment, token)
                if self.repeating(turn):
                    finish = "repetition"
                    break
        except GeneratorExit:  # the consumer closed the stream (or dropped it)
            finish, closed = "stopped", True
        except BaseException as exc:  # Ctrl-C or an error: what was fed so far stays consistent
            finish, error = "interrupted", exc
        if finish == "stopped" and not turn.tokens:  # before the first token: nothing kept
            self.cancel_reply(turn)
            return
        text = final_text(detok)
        tail = "" if closed else text[detok.offset:]
        if finish == "repetition":  # kept up to the loop's first round (last_reply.text)
            detok.reset()
            for token in turn.tokens[:loop_start(turn.tokens)]:
                detok.add_token(token)
            text, tail = final_text(detok), ""
        unsaved = None
        try:
            self.end_reply(turn, finish, text)
        except MemorySaveError as exc:  # the turn is kept all the same: said after its text
            unsaved = exc
        if error is not None:
            raise error
        if tail:
            yield ReplyChunk(tail, -1)
        if unsaved is not None:
            raise unsaved

    def _parts(self, text: str, max_tokens: int) -> list[str]:
        """`text` cut into parts that each fit the context budget with room for a reply (at
        least a quarter of the budget, or max_tokens), at paragraph, sentence or word breaks;
        a message that fits is one part. Joined, the parts are `text`."""
        system = self._messages[:1] if self._messages and \
            self._messages[0]["role"] == "system" else []
        overhead = len(render(self.tokenizer, [*system, {"role": "user", "content": ""}],
                              True).ids)
        room = min(max_tokens, self.max_kv_tokens // 4) + len(self._closing) + 1
        fits = self.max_kv_tokens - overhead - room
        ids, starts = encode_text(self.tokenizer, text)
        if len(ids) <= fits or fits < 16:
            return [text]
        target = max(8, int(fits * 0.9))  # parts are re-tokenized alone: keep a margin
        parts, a, k = [], 0, 0
        while len(ids) - k > target:
            cut = starts[k + target]
            window = text[a:cut]
            for mark in ("\n\n", "\n", ". ", "? ", "! ", " "):
                j = window.rfind(mark, len(window) // 2)
                if j > 0:
                    cut = a + j + len(mark)
                    break
            if cut <= a:
                break
            parts.append(text[a:cut])
            a = cut
            k = bisect_left(starts, cut)
        return [*parts, text[a:]]

    def _sentence_id(self, tokens: list[int], token: int, first: int) -> int:
        """Sentence id of a generated token: the reply's sentence holding its first character."""
        before = self.tokenizer.decode(tokens)
        text = self.tokenizer.decode([*tokens, token])
        at = len(before) if text.startswith(before) else len(text) - 1
        spans = sentence_spans(text)
        k = sum(1 for a, _ in spans if a <= at)
        return first + max(k - 1, 0)


def final_text(detokenizer: Any) -> str:
    """Flush an mlx-lm streaming `detokenizer` and return the reply's whole text, less a
    trailing incomplete UTF-8 character: a reply cut mid-character (a stop, max_tokens, a
    repetition cut) would otherwise end in U+FFFD. Only the end is touched, and only an
    incomplete sequence: a complete U+FFFD the model produced stays. The one way a reply's
    text is finished (dmem-chat and dmem-serve)."""
    detokenizer.finalize()
    text = detokenizer.text
    if text.endswith("\ufffd") and _ends_mid_character(detokenizer):
        text = text[:-1]  # an incomplete sequence decodes to a single U+FFFD
    return text


def _ends_mid_character(detokenizer: Any) -> bool:
    """True when the bytes of the detokenizer's tokens end inside a UTF-8 character (False
    when its tokens' bytes are unknown, e.g. mlx-lm's naive detokenizer)."""
    tail = b""
    for token in reversed(detokenizer.tokens):
        piece = _token_bytes(detokenizer, token)
        if piece is None:
            return False
        tail = piece + tail
        if len(tail) >= 4:  # the longest UTF-8 character
            break
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(tail)
    return bool(decoder.getstate()[0])  # bytes held waiting for the rest of a character


def _token_bytes(detokenizer: Any, token: int) -> Optional[bytes]:
    """The bytes of `token` as the detokenizer spells it: SentencePiece pieces are bytes
    (byte-fallback tokens their one byte); byte-level BPE pieces map char by char to bytes."""
    tokenmap = getattr(detokenizer, "tokenmap", None)
    if tokenmap is None or not 0 <= token < len(tokenmap):
        return None
    piece = tokenmap[token]
    if isinstance(piece, bytes):
        return piece
    from mlx_lm.tokenizer_utils import _byte_decoder  # the table mlx-lm's BPE detokenizer uses
    table = _byte_decoder()
    return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)


def special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens: its named specials and every added token marked special
    (the chat template's control tokens, which `all_special_ids` can leave out)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {int(i) for i, token in added.items() if getattr(token, "special", False)}


def looping(tokens: Sequence[int]) -> bool:
    """True when the last REPEAT_SPAN or more tokens repeat one span of at most REPEAT_PERIOD
    tokens (at least four times): a reply going round in circles."""
    return loop_start(tokens) is not None


def loop_start(tokens: Sequence[int]) -> Optional[int]:
    """For a looping reply (see `looping`), how many of its tokens to keep: those before the
    loop and one round of it (the repeats start there); None if it does not loop."""
    for period in range(1, REPEAT_PERIOD + 1):
        span = max(REPEAT_SPAN, 4 * period)
        if len(tokens) < span:
            break
        tail = tokens[-span:]
        if tail[period:] == tail[:-period]:
            start = len(tokens) - span
            while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
                start -= 1
            return start + period
    return None


def _checked_message(m: Any) -> dict[str, str]:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
        raise ValueError("messages must be {'role': str, 'content': str} dicts")
    if m["role"] not in ("system", "user", "assistant", "tool"):
        raise ValueError(f"unknown role {m['role']!r}")
    return {"role": m["role"], "content": m["content"]}


def _checked_name(name: str) -> str:
    from .memory_file import SNAPSHOT_NAME

    name = str(name).strip()
    if not SNAPSHOT_NAME.fullmatch(name):
        raise MemoryFileError(f"bad snapshot name {name!r}")
    return name
