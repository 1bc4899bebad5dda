"""The engine: one worker thread that owns the model and serves every request.

Requests for different memories decode together in one batch (continuous batching: requests
that arrive together are prefilled together, join, and each leaves when its reply ends); each
batch row carries its own KV cache and δ state, so a row never sees another's memory. Requests
for the same memory wait for each other. Each turn goes through the memory's `ChatSession` (the
chat semantics of DESIGN §3: only what is new is written, a sampled end token is never fed, old
turns leave the context at the budget) and the memory file is saved when the turn ends — by a
writer thread, off the decoding loop; the reply is answered once its turn is on disk.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_top_p

from ..blas import BlasThreads
from ..cache import state_of, with_state
from ..runtime import ChatSession, ContextTooLongError, MemoryFileError, Turn
from ..runtime.context import last_position_only
from ..runtime.session import final_text
from .schemas import APIError, ChatRequest, usage
from .store import MemoryStore

log = logging.getLogger("dmem_mlx.server")
# New user text (characters, all requests starting together) from which their prompts are read
# on every BLAS thread rather than one: about 256 tokens, where a GEMM is large enough to share.
LONG_PROMPT_CHARS = 1024


@dataclass
class Reply:
    """How a request's reply went (the last event of a chat job)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        """The OpenAI `usage` object, the same streamed or not."""
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


@dataclass(eq=False)
class ChatJob:
    """A chat request waiting for, or being given, its reply. `emit(kind, value)` is called from
    the worker: ("delta", text) pieces, then ("done", Reply) or ("error", APIError)."""

    request: ChatRequest
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)
    held: bool = False  # kept waiting one decode step for others to share its prefill

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

    def flush(self, final: Optional[str] = None) -> None:
        """Stream out the text that can no longer turn into a stop string; final: the reply's
        whole text, streamed out to its end."""
        text = final if final is not None else self.text if self.text is not None \
            else self.detok.text
        end = len(text) if final is not None else max(self.sent, len(text) - self.hold)
        if end > self.sent:
            self.job.emit("delta", text[self.sent:end])
            self.sent = end


def merge(caches: list[list[Any]]) -> list[Any]:
    """One batch prompt cache whose rows are the sequences of `caches` (left-padded)."""
    return [entries[0].merge(list(entries)) for entries in zip(*caches)]


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

    def add(self, rows: list[Row]) -> None:
        """Rows join (their sessions' caches merged in, left-padded to a common length)."""
        new = merge([r.session._ctx.cache for r in rows])
        if not self.rows:
            self.cache = new
        else:
            for mine, other in zip(self.cache, new):
                mine.extend(other)
        self.rows.extend(rows)

    def remove(self, rows: list[Row]) -> None:
        """Take `rows` out, all in one filter of the batch's cache: each row's KV cache
        (padding stripped) and δ state go back to its session."""
        index = [self.rows.index(row) for row in rows]
        own = [[c.extract(i) for c in self.cache] for i in index]
        keep = [j for j in range(len(self.rows)) if j not in index]
        if keep:
            for c in self.cache:
                c.filter(keep)
        else:
            self.cache = []
        self.rows = [self.rows[j] for j in keep]  # (a failure above leaves them all in)
        arrays = []
        for row, cache in zip(rows, own):
            context = row.session._ctx
            state = state_of(cache)
            context.set_states(state.layers)
            context.cache = with_state([getattr(c, "kv", c) for c in cache], self.model,
                                       context.state)
            arrays += [c.state for c in context.cache]
            arrays += [s for s in state.layers.values() if s is not None]
        mx.eval(arrays)

    def step(self, tokens: list[int]) -> mx.array:
        """Feed one token per row (writes on); logits [B, vocab] float32, being computed."""
        logits = self.model(mx.array(tokens)[:, None], cache=self.cache)[:, -1, :]
        logits = logits.astype(mx.float32)
        state = state_of(self.cache)
        mx.async_eval(logits, [c.keys for c in self.cache if getattr(c, "keys", None) is not None],
                      [s for s in (state.layers.values() if state else ()) if s is not None])
        return logits


def trim_capacity(cache: Any) -> None:
    """Drop the spare room after the filled part of a BatchKVCache's buffers (mlx-lm grows
    them 256 positions at a time); the next token that needs room grows them again. Other
    caches (a BatchRotatingKVCache keeps its buffer exact while prefilling) are left as they are.

    The filled length is mlx-lm's private `_idx`: its public `size()` gives it only from mlx-lm
    0.31.2 on (before, the base class's 0), and this project supports 0.28 on. A cache without
    it is left as it is (only slower); tests/test_server.py pins what it means."""
    kv = getattr(cache, "kv", cache)
    filled = getattr(kv, "_idx", None)
    if isinstance(kv, BatchKVCache) and kv.keys is not None and filled is not None and \
            kv.keys.shape[2] > filled:
        kv.keys, kv.values = kv.keys[..., :filled, :], kv.values[..., :filled, :]


def prefill(model: Any, caches: list[list[Any]], prompts: list[list[int]]) -> tuple:
    """Feed `prompts[b]` (writes on) after the context of `caches[b]` (prompt caches of single
    sequences), all rows in one forward call; returns (logits [B, vocab] float32 of each row's
    last token, each row's prompt cache after it).

    As mlx-lm's batch generator prefills: the contexts are merged (left-padded), the prompts
    right-padded to a common length (`prepare(right_padding=...)`), and `finalize()` moves the
    padding to the left afterwards. Right padding is given `valid` = 0, so it is never written
    into any δ state (DESIGN §2); the LM head runs on each row's last real position only.
    """
    cache = merge(caches)
    lengths = [len(p) for p in prompts]
    T = max(lengths)
    padding = [T - n for n in lengths]
    tokens = mx.array([p + [0] * (T - len(p)) for p in prompts])
    valid = (mx.arange(T)[None] < mx.array(lengths)[:, None]).astype(mx.float32)
    if max(padding) > 0:
        for c in cache:
            c.prepare(lengths=lengths, right_padding=padding)
    state = state_of(cache)
    last = mx.array(lengths) - 1
    with state.inputs(valid=valid), last_position_only(model, last if T > 1 else None):
        logits = model(tokens, cache=cache)
    if logits.shape[1] > 1:  # a model whose final norm could not stand in: all positions
        logits = logits[mx.arange(len(prompts)), last][:, None]
    logits = logits[:, -1, :].astype(mx.float32)
    if max(padding) > 0:
        for c in cache:
            trim_capacity(c)  # the roll below then moves only what was fed, not spare room
            c.finalize()
    mx.eval(logits, [c.state for c in cache], [s for s in state.layers.values() if s is not None])
    return logits, [[c.extract(b) for c in cache] for b in range(len(prompts))]


class Saver:
    """Writes memory files off the decoding loop, on `threads` writer threads: the writes of one
    key run in the order they were handed over, on one thread; different keys' writes run side
    by side (a write waits mostly on fsync, and the file system commits concurrent ones
    together). `after(key, fn)` runs `fn(error)` once every write of `key` handed over so far
    is done (error: the first that failed, else None); keys with writes in flight are `busy()`.
    `wake()` is called whenever a key's writes are all done."""

    def __init__(self, wake: Callable[[], None], threads: int = 4):
        self._wake = wake
        self._lock = threading.Lock()
        self._writes: Counter = Counter()  # key → writes not done
        self._queued: Counter = Counter()  # key → items (writes, afters) not done
        self._home: dict[Any, int] = {}  # key → its thread while it has items queued
        self._load = [0] * threads
        self._failed: dict[Any, Exception] = {}
        self._queues = [queue.Queue() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True,
                                          name=f"dmem-saver-{k}")
                         for k, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def _put(self, key: Any, item: tuple) -> None:
        """Queue `item` on `key`'s thread (the least loaded one if it has nothing queued)."""
        with self._lock:
            if key not in self._home:
                self._home[key] = min(range(len(self._load)), key=self._load.__getitem__)
            k = self._home[key]
            self._load[k] += 1
            self._queued[key] += 1
            if item[1] is not None:
                self._writes[key] += 1
        self._queues[k].put(item)

    def write(self, key: Any, fn: Callable[[], Any]) -> None:
        self._put(key, (key, fn, None))

    def after(self, key: Any, fn: Callable[[Optional[Exception]], None]) -> None:
        with self._lock:
            now = not self._queued[key]
            error = self._failed.pop(key, None) if now else None
        if now:
            fn(error)
        else:
            self._put(key, (key, None, fn))

    def busy(self) -> set:
        with self._lock:
            return set(self._writes)

    def close(self) -> None:
        """Finish every write handed over, then stop."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()

    def _run(self, q: queue.Queue) -> None:
        while (item := q.get()) is not None:
            key, fn, then = item
            try:
                if fn is not None:
                    fn()
                else:  # the key's writes handed over before it are done
                    with self._lock:
                        error = self._failed.pop(key, None)
                    then(error)
            except Exception as exc:
                if fn is None:
                    log.exception("answering after a save failed")
                else:  # the previous version of the file is untouched
                    log.error("saving memory %s failed: %s", key, exc)
                    with self._lock:
                        self._failed.setdefault(key, exc)
            finally:
                with self._lock:
                    self._load[self._home[key]] -= 1
                    self._queued[key] -= 1
                    if not self._queued[key]:
                        del self._queued[key], self._home[key]
                    saved = False
                    if fn is not None:
                        self._writes[key] -= 1
                        if not self._writes[key]:
                            del self._writes[key]
                            saved = True
                if saved:
                    self._wake()


class Engine:
    """Serves chat jobs and memory calls on one worker thread.

    max_concurrent: rows decoding at once; max_queue: jobs waiting beyond them (more: 429).
    write_behind: memory files are written by a writer thread (`Saver`), each reply answered
    once its turn is on disk; False: written on the worker before the reply is answered.
    hold_arrivals: chat requests that could start while rows are decoding wait one decode step
    first, and start with whatever arrived during it: fewer, fuller prefill calls (a prefill
    call's cost grows less than its rows) for a step's delay to their first token.
    """

    def __init__(self, model: Any, tokenizer: Any, store: MemoryStore, max_concurrent: int = 8,
                 max_queue: int = 64, write_behind: bool = True, hold_arrivals: bool = True):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.hold_arrivals = hold_arrivals
        self.batchable = model.delta_mem.config.memory_write_granularity == "token"
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque = deque()
        self._pending = 0  # jobs submitted and not yet started (for 429)
        self._lock = threading.Lock()
        self._busy: set = set()  # keys with a row decoding
        self._batch = Batch(model)
        self._started = False  # whether the last round started a job
        self._blas = BlasThreads()  # decode steps and short prompts on one BLAS thread
        self._saver = Saver(lambda: self._inbox.put(None), threads=min(max_concurrent, 8)) \
            if write_behind else None
        if self._saver is not None:
            store.write_behind = self._saver.write
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
        while self._round(block=not self._batch.rows and not self._started):
            try:
                self._start_ready()
                if self._batch.rows:
                    self._step()
            except Exception:  # a bug: fail every row cleanly, keep serving
                log.exception("engine step failed")
                for row in list(self._batch.rows):
                    self._fail(row, APIError(500, "internal error while generating"))
        for row in list(self._batch.rows):
            self._finish(row, "stopped")
        if self._saver is not None:
            self._saver.close()
        self.store.close()

    def _round(self, block: bool) -> bool:
        """Take in the jobs that arrived (waiting for one if `block`); False once stopped."""
        self._admit(block)
        return not self._stop.is_set()

    def _admit(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if job is not None:
                    self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _held(self) -> set:
        """Keys whose jobs wait: a row of theirs decodes, or their memory is being written."""
        return self._busy | (self._saver.busy() if self._saver is not None else set())

    def _start_ready(self) -> None:
        """Start the waiting jobs whose memory is free, in order: memory calls run, chat
        requests are prefilled together and join the batch (a request starting alone is
        prefilled on its own cache: nothing to merge, pad or hand back)."""
        held = self._held()
        rows = len(self._batch)
        capacity = self.max_concurrent if self.batchable else 1
        chats: list[ChatJob] = []
        self._started = False
        for job in list(self._waiting):
            key = job.key
            if key in held:
                continue
            if isinstance(job, ChatJob) and rows >= capacity:
                held.add(key)
                continue
            held.add(key)
            self._started = True
            if isinstance(job, ChatJob):
                chats.append(job)
                rows += 1
                continue
            self._take(job)
            self._run_call(job)
        if (chats and self.hold_arrivals and self.batchable and self._batch.rows
                and rows < capacity and not any(job.held for job in chats)):
            for job in chats:  # they start after the next decode step, with what arrives by then
                job.held = True
            chats = []
        if chats:  # short prompts on one BLAS thread too; long ones on all (see BlasThreads)
            text = sum(len(job.request.user_text) for job in chats)
            self._blas.use(None if text >= LONG_PROMPT_CHARS else 1)
        for job in chats:
            self._take(job)
        starting: list[tuple[ChatJob, ChatSession, Turn]] = []
        for job in chats:
            try:
                opened = self._open_turn(job, defer=self.batchable and len(chats) > 1)
            except Exception:  # a bug: this request fails cleanly, the others go on
                log.exception("starting a reply failed")
                job.emit("error", APIError(500, "internal error while starting the reply"))
                continue
            if opened is not None:
                starting.append(opened)
                self._busy.add(job.key)
        if starting:
            self._join(starting)
        self.store.trim(self._held())

    def _take(self, job: Any) -> None:
        """`job` leaves the waiting list: it starts now."""
        self._waiting.remove(job)
        with self._lock:
            self._pending -= 1

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

    def _open_turn(self, job: ChatJob, defer: bool) -> Optional[tuple[ChatJob, ChatSession,
                                                                        Turn]]:
        """Begin the reply of `job` (defer: its prompt's last call left pending, to be fed
        with the other rows starting); None if it will not reply (an error was sent, or the
        client left)."""
        req = job.request
        if job.cancelled.is_set():
            return None
        session = None
        try:
            session = self.store.session(req.memory)
            session.follow(req.history)
            turn = session.begin_reply(req.user_text, req.max_tokens, job.cancelled.is_set,
                                       defer=defer)
        except APIError as exc:
            job.emit("error", exc)
            return None
        except ContextTooLongError as exc:
            job.emit("error", APIError(400, str(exc), "messages", "context_length_exceeded"))
            return None
        except MemoryFileError as exc:
            job.emit("error", APIError(409, f"memory {req.memory!r}: {exc}", None,
                                       "memory_unusable"))
            return None
        except Exception:
            log.exception("starting a reply failed")
            job.emit("error", APIError(500, "internal error while reading the conversation"))
            return None
        if turn is None:  # the client left during the prefill: the turn was taken back
            return None
        return job, session, turn

    def _join(self, starting: list[tuple[ChatJob, ChatSession, Turn]]) -> None:
        """Feed the pending prompts of the turns starting together in one batched call, then
        their rows join the batch (a turn without a reply to decode ends at once)."""
        fed = []
        for job, session, turn in starting:
            if turn.pending is None:
                continue
            if job.cancelled.is_set():  # the client left: the turn is taken back
                session.cancel_reply(turn)
                self._busy.discard(job.key)
            else:
                fed.append((job, session, turn))
        if fed:
            try:
                logits, caches = prefill(self.model, [s._ctx.cache for _, s, _ in fed],
                                         [t.pending.ids for _, _, t in fed])
            except Exception:
                log.exception("prefill failed")
                for job, session, turn in fed:
                    session.cancel_reply(turn)
                    self._busy.discard(job.key)
                    job.emit("error", APIError(500, "internal error while reading the prompt"))
                return
            for k, (_, session, turn) in enumerate(fed):
                session.complete_prompt(turn, logits[k], caches[k])
        rows = []
        for job, session, turn in starting:
            if turn.pending is not None:  # taken back above
                continue
            row = Row(job, session, turn, self.tokenizer)
            self.stats["requests"] += 1
            req = job.request
            log.info("reply %s: memory %s, %d prompt tokens (%d new), waited %.0f ms",
                     req.id[-8:], req.memory or "-", turn.context_tokens, turn.prompt_tokens,
                     1000 * (time.perf_counter() - job.queued))
            if turn.max_tokens < 1:
                self._finish_row(row, "length")
            else:
                rows.append(row)
        if rows:
            self._batch.add(rows)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(self._batch))

    def _step(self) -> None:
        """One token for every row: a sampled token of its reply, or once the reply has ended,
        the next of the template's closing tokens (fed here, in the batch, so that ending the
        turn has nothing left to ingest); rows with nothing left to feed leave, together.
        A reply token's text is streamed as soon as it is accepted, before it is fed."""
        self._blas.use(1)
        rows = list(self._batch.rows)
        mx.eval([r.y for r in rows if r.finish is None])
        feed, leaving = [], []
        for row in rows:
            if row.finish is None:
                token = int(row.y.item())
                finish = row.accept(token)
                if finish is None:
                    row.flush()
                    feed.append((row, token, True))
                    continue
                self._close(row, finish)
            if row.forced:
                feed.append((row, row.forced.pop(0), False))
            else:
                leaving.append(row)
        if leaving:
            self._batch.remove(leaving)
            for row in leaving:
                self._finish_row(row, row.finish)
        if not feed:
            return
        logits = self._batch.step([t for _, t, _ in feed])
        greedy = mx.argmax(logits, axis=-1)  # one op for every row sampled greedily
        for k, (row, token, reply) in enumerate(feed):
            row.session.record_token(row.turn, token, reply)
            if not reply:
                continue
            self.stats["tokens"] += 1
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
        self._batch.remove([row])
        self._finish_row(row, finish)

    def _finish_row(self, row: Row, finish: str) -> None:
        self._busy.discard(row.job.key)
        try:
            text = row.text if row.text is not None else final_text(row.detok)
            stats = row.session.end_reply(row.turn, finish, text)
        except Exception:
            log.exception("ending a reply failed")
            row.job.emit("error", APIError(500, "internal error while saving the turn"))
            return
        row.flush(final=stats.text)
        t = row.turn
        log.info("reply %s: %d tokens, %s, %.1f tokens/s", row.job.request.id[-8:], stats.tokens,
                 finish, stats.tokens_per_sec)
        # usage: the prompt is what was reused from the KV context plus every token read for
        # this request (parts of a long message written into δ only included)
        cached = max(0, t.context_tokens - (t.prompt_tokens - t.head_tokens))
        reply = Reply(text=stats.text, finish_reason="length" if finish == "length" else "stop",
                      prompt_tokens=cached + t.prompt_tokens, cached_tokens=cached,
                      completion_tokens=stats.tokens)
        if self._saver is None:
            row.job.emit("done", reply)
            return

        def answer(error: Optional[Exception]) -> None:  # once the turn is on disk
            if error is None:
                row.job.emit("done", reply)
            else:  # why in the system's words (disk full …), never the server's paths
                why = getattr(error, "reason", "") or "see the server log"
                row.job.emit("error", APIError(500, f"the turn could not be saved ({why}); the "
                                                    "memory file keeps the previous one",
                                               None, "save_failed"))

        self._saver.after(row.job.key, answer)

    def _fail(self, row: Row, error: APIError) -> None:
        try:
            self._finish(row, "interrupted")
        except Exception:
            log.exception("could not close a failed reply")
            self._busy.discard(row.job.key)
        row.job.emit("error", error)
