"""The engine: one worker thread that owns the model and serves every request.

Requests for different memories decode together in one batch (continuous batching: a request
joins after its own prefill and leaves when its reply ends); each batch row carries its own KV
cache and δ state, so a row never sees another's memory. Requests for the same memory wait for
each other. Each turn goes through the memory's `ChatSession` (the chat semantics of DESIGN §3:
only what is new is written, a sampled end token is never fed, old turns leave the context at
the budget) and the memory file is saved when the turn ends.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from ..cache import state_of, with_state
from ..runtime import ChatSession, ContextTooLongError, MemoryFileError, Turn
from .schemas import APIError, ChatRequest
from .store import MemoryStore

log = logging.getLogger("dmem_mlx.server")


@dataclass
class Reply:
    """How a request's reply went (the last event of a chat job)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class ChatJob:
    """A chat request waiting for, or being given, its reply. `emit(kind, value)` is called from
    the worker: ("delta", text) pieces, then ("done", Reply) or ("error", APIError)."""

    request: ChatRequest
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> Any:
        return self.request.memory if self.request.memory is not None else self


@dataclass(eq=False)
class CallJob:
    """A memory operation run on the worker once its memory is idle."""

    key: str
    fn: Callable[[], Any]
    op: Optional[tuple] = None  # (engine method name, *args): replayed by the other ranks
    future: Future = field(default_factory=Future)


class Row:
    """One reply being decoded: its session and turn, sampler, detokenizer and next token."""

    def __init__(self, job: ChatJob, session: ChatSession, turn: Turn, tokenizer: Any):
        req = job.request
        self.job, self.session, self.turn = job, session, turn
        self.temperature, self.top_p = req.temperature, req.top_p
        self.key = mx.random.key(req.seed if req.seed is not None else secrets.randbits(63))
        self.stop = req.stop
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # chars kept back for stops
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.sent = 0  # characters of the text streamed out
        self.finish: Optional[str] = None  # set when the reply has ended
        self.forced: list[int] = []  # closing tokens still to feed after it ended
        self.text: Optional[str] = None  # set when a stop string cut the reply
        self.y = self.sample(turn.logits)

    def sample(self, logits: mx.array) -> mx.array:
        """The next token from logits [vocab]: greedy at temperature 0, else top-p sampling with
        this row's own random key (a seed gives the same reply whatever the batch holds)."""
        if self.temperature == 0:
            y = mx.argmax(logits, axis=-1)
        else:
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            if self.top_p < 1.0:
                logprobs = apply_top_p(logprobs[None], self.top_p)[0]
            self.key, k = mx.random.split(self.key)
            y = mx.random.categorical(logprobs * (1 / self.temperature), key=k)
        mx.async_eval(y)
        return y

    def accept(self, token: int) -> Optional[str]:
        """Take a sampled token; the finish reason if the reply ends before feeding it."""
        if self.session.is_end(token):
            return "stop"
        if self.job.cancelled.is_set():
            return "stopped"
        self.detok.add_token(token)
        if self.stop:
            text = self.detok.text
            cuts = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop)
                    if i >= 0]
            if cuts:
                self.text = text[:min(cuts)]
                return "stop"
        return None

    def flush(self, final: bool = False) -> None:
        """Stream out the text that can no longer turn into a stop string."""
        text = self.text if self.text is not None else self.detok.text
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if end > self.sent:
            self.job.emit("delta", text[self.sent:end])
            self.sent = end


class Batch:
    """The rows decoding together: one prompt cache whose entries are mlx-lm's BatchKVCache
    (rows left-padded to a common length; padding is masked and was never fed through δ)
    carrying one DeltaState [B, H, r, r] per layer (DESIGN §1) — each row its own memory.

    A row joins after its own prefill (its session's cache is merged in) and leaves with its
    KV cache and δ state handed back to its session.
    """

    def __init__(self, model: Any):
        self.model = model
        self.rows: list[Row] = []
        self.cache: list[Any] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row) -> None:
        one = [c.merge([c]) for c in row.session._ctx.cache]
        if not self.rows:
            self.cache = one
        else:
            for mine, other in zip(self.cache, one):
                mine.extend(other)
        self.rows.append(row)

    def remove(self, row: Row) -> None:
        """Take `row` out: its KV cache (padding stripped) and δ state go back to its session."""
        i = self.rows.index(row)
        own = [c.extract(i) for c in self.cache]
        keep = [j for j in range(len(self.rows)) if j != i]
        del self.rows[i]
        if keep:
            for c in self.cache:
                c.filter(keep)
        else:
            self.cache = []
        context = row.session._ctx
        state = state_of(own)
        context.set_states(state.layers)
        context.cache = with_state([getattr(c, "kv", c) for c in own], self.model, context.state)
        mx.eval([c.state for c in context.cache], [s for s in state.layers.values()
                                                   if s is not None])

    def step(self, tokens: list[int]) -> mx.array:
        """Feed one token per row (writes on); logits [B, vocab] float32, being computed."""
        logits = self.model(mx.array(tokens)[:, None], cache=self.cache)[:, -1, :]
        logits = logits.astype(mx.float32)
        state = state_of(self.cache)
        mx.async_eval(logits, [c.keys for c in self.cache if getattr(c, "keys", None) is not None],
                      [s for s in (state.layers.values() if state else ()) if s is not None])
        return logits


class Engine:
    """Serves chat jobs and memory calls on one worker thread.

    max_concurrent: rows decoding at once; max_queue: jobs waiting beyond them (more: 429).
    """

    def __init__(self, model: Any, tokenizer: Any, store: MemoryStore, max_concurrent: int = 8,
                 max_queue: int = 64):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.batchable = model.delta_mem.config.memory_write_granularity == "token"
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque = deque()
        self._pending = 0  # jobs submitted and not yet started (for 429)
        self._lock = threading.Lock()
        self._busy: set = set()  # keys with a row decoding
        self._batch = Batch(model)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmem-engine", daemon=True)
        self.healthy = True
        self.stats = {"requests": 0, "tokens": 0, "max_batch": 0}

    # -- the HTTP side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _enqueue(self, job: Any) -> None:
        with self._lock:
            if self._pending >= self.max_queue + self.max_concurrent:
                raise APIError(429, "the server is busy: too many requests waiting; retry later",
                               code="rate_limit_exceeded")
            self._pending += 1
        self._inbox.put(job)

    def submit(self, job: ChatJob) -> None:
        self._enqueue(job)

    def call(self, key: str, fn: Callable[[], Any], op: Optional[tuple] = None) -> Future:
        job = CallJob(key, fn, op)
        self._enqueue(job)
        return job.future

    # -- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(block=not self._batch.rows)
                self._start_ready()
                if self._batch.rows:
                    self._step()
            except Exception:  # a bug: fail every row cleanly, keep serving
                log.exception("engine step failed")
                for row in list(self._batch.rows):
                    self._fail(row, APIError(500, "internal error while generating"))
        for row in list(self._batch.rows):
            self._finish(row, "stopped")
        self.store.close()

    def _admit(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=0.5) if block and not self._waiting else \
                self._inbox.get_nowait()
            while True:
                if job is not None:
                    self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _start_ready(self) -> None:
        held = set(self._busy)
        for job in list(self._waiting):
            key = job.key
            if key in held:
                held.add(key)
                continue
            if isinstance(job, ChatJob) and len(self._batch) >= (
                    self.max_concurrent if self.batchable else 1):
                held.add(key)
                continue
            self._waiting.remove(job)
            with self._lock:
                self._pending -= 1
            held.add(key)
            if isinstance(job, CallJob):
                self._run_call(job)
                continue
            try:
                self._start_chat(job)
            except Exception:  # a bug: this request fails cleanly, the others go on
                log.exception("starting a reply failed")
                job.emit("error", APIError(500, "internal error while starting the reply"))
        self.store.trim(self._busy)

    def _run_call(self, job: CallJob) -> None:
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:
            job.future.set_exception(exc)

    # Memory operations (run them with `call`, on the worker).
    def memory_info(self, memory: str) -> dict:
        return self.store.info(memory)

    def memory_delete(self, memory: str) -> dict:
        return self.store.delete(memory)

    def memory_snapshot(self, memory: str, name: Optional[str]) -> dict:
        self.store.check_exists(memory)
        return self.store.snapshot(self.store.session(memory), memory, name)

    def _start_chat(self, job: ChatJob) -> None:
        req = job.request
        if job.cancelled.is_set():
            return
        session = None
        try:
            session = self.store.session(req.memory)
            session.follow(req.history)
            turn = session.begin_reply(req.user_text, req.max_tokens, job.cancelled.is_set)
        except APIError as exc:
            job.emit("error", exc)
            return
        except ContextTooLongError as exc:
            job.emit("error", APIError(400, str(exc), "messages", "context_length_exceeded"))
            return
        except MemoryFileError as exc:
            job.emit("error", APIError(409, f"memory {req.memory!r}: {exc}", None,
                                       "memory_unusable"))
            return
        except Exception:
            log.exception("starting a reply failed")
            job.emit("error", APIError(500, "internal error while reading the conversation"))
            return
        if turn is None:  # the client left during the prefill: the turn was taken back
            return
        row = Row(job, session, turn, self.tokenizer)
        self._busy.add(job.key)
        self.stats["requests"] += 1
        log.info("reply %s: memory %s, %d prompt tokens (%d new), waited %.0f ms",
                 req.id[-8:], req.memory or "-", turn.context_tokens, turn.prompt_tokens,
                 1000 * (time.perf_counter() - job.queued))
        if turn.max_tokens < 1:
            self._finish_row(row, "length")
            return
        self._batch.add(row)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self._batch))

    def _step(self) -> None:
        """One token for every row: a sampled token of its reply, or once the reply has ended,
        the next of the template's closing tokens (fed here, in the batch, so that ending the
        turn has nothing left to ingest); rows with nothing left to feed leave."""
        rows = list(self._batch.rows)
        mx.eval([r.y for r in rows if r.finish is None])
        feed = []
        for row in rows:
            if row.finish is None:
                token = int(row.y.item())
                finish = row.accept(token)
                if finish is None:
                    feed.append((row, token, True))
                    continue
                self._close(row, finish)
            if row.forced:
                feed.append((row, row.forced.pop(0), False))
            else:
                self._finish(row, row.finish)
        if not feed:
            return
        logits = self._batch.step([t for _, t, _ in feed])
        greedy = mx.argmax(logits, axis=-1)  # one op for every row sampled greedily
        for k, (row, token, reply) in enumerate(feed):
            row.session.record_token(row.turn, token, reply)
            if not reply:
                continue
            self.stats["tokens"] += 1
            row.flush()
            if len(row.turn.tokens) >= row.turn.max_tokens:
                self._close(row, "length")
            elif row.session.repeating(row.turn):  # a looping reply is cut (as in dmem-chat)
                self._close(row, "repetition")
            else:
                row.y = greedy[k] if row.temperature == 0 else row.sample(logits[k])

    def _close(self, row: Row, finish: str) -> None:
        """The reply ended: its closing tokens are fed next (unless a stop string cut its text,
        which end_reply re-reads anyway)."""
        row.finish = finish
        row.forced = row.session.closing_tokens if row.text is None else []

    def _finish(self, row: Row, finish: str) -> None:
        self._batch.remove(row)
        self._finish_row(row, finish)

    def _finish_row(self, row: Row, finish: str) -> None:
        self._busy.discard(row.job.key)
        try:
            row.detok.finalize()
            text = row.text if row.text is not None else row.detok.text
            stats = row.session.end_reply(row.turn, finish, text)
        except Exception:
            log.exception("ending a reply failed")
            row.job.emit("error", APIError(500, "internal error while saving the turn"))
            return
        row.flush(final=True)
        t = row.turn
        log.info("reply %s: %d tokens, %s, %.1f tokens/s", row.job.request.id[-8:], stats.tokens,
                 finish, stats.tokens_per_sec)
        # usage: the prompt is what was reused from the KV context plus every token read for
        # this request (parts of a long message written into δ only included)
        cached = max(0, t.context_tokens - (t.prompt_tokens - t.head_tokens))
        row.job.emit("done", Reply(text=stats.text, finish_reason="length" if finish == "length"
                                   else "stop", prompt_tokens=cached + t.prompt_tokens,
                                   cached_tokens=cached, completion_tokens=stats.tokens))

    def _fail(self, row: Row, error: APIError) -> None:
        try:
            self._finish(row, "interrupted")
        except Exception:
            log.exception("could not close a failed reply")
            self._busy.discard(row.job.key)
        row.job.emit("error", error)
