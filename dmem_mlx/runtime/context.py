"""The tokens a model has processed: its KV cache, the δ writes they made, and rollback.

`Context` feeds tokens to a δ-mem model in calls that either all happen or none does (an
exception or Ctrl-C mid-call puts the KV cache and δ state back), remembers for every token
whether it was written into δ, and keeps a δ snapshot at the start of every ingest so that the
context can be rolled back to an earlier position when the conversation's tokens diverge.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as cache_lib

from ..cache import DeltaState, make_prompt_cache


class Stopped(Exception):
    """Raised between prefill chunks when the caller asked to stop."""


class _LastPosition(nn.Module):
    """Stands in for the final norm so that the LM head runs on one position per row only:
    the last, or `positions` [B] (the last real token of each right-padded row)."""

    def __init__(self, norm: nn.Module, positions: Optional[mx.array] = None):
        super().__init__()
        self.norm = norm
        self.positions = positions

    def __call__(self, h: mx.array) -> mx.array:
        if self.positions is None:
            return self.norm(h[:, -1:])
        return self.norm(h[mx.arange(h.shape[0]), self.positions][:, None])


@contextmanager
def last_position_only(model: nn.Module, positions: Optional[mx.array] = None) -> Iterator[None]:
    """Logits [B, 1, vocab] of the last position only (a prompt's other logits would cost
    T × vocab), or of position `positions[b]` in row b. Without a final norm to stand in for
    (an unknown architecture), the model's logits are left as they are: [B, T, vocab]."""
    inner = getattr(model, "model", None)
    norm = inner.get("norm") if isinstance(inner, nn.Module) else None
    if not isinstance(norm, nn.Module):
        yield
        return
    inner.norm = _LastPosition(norm, positions)
    try:
        yield
    finally:
        inner.norm = norm


class Context:
    """Token ids in the KV cache of `model`, with their δ writes into `state` (the sequence's
    δ memory, carried by the cache; a new empty one when None).

    ids[t]: the token at position t; wrote[t]: whether it was written into δ (for message /
    sentence granularity: fed with writes on and part of a message / sentence); owners[t]: the
    caller's label for it (the session's message index). n_written = sum(wrote).
    """

    def __init__(self, model: nn.Module, prefill_step: int = 512,
                 state: Optional[DeltaState] = None):
        self.model = model
        self.memory = model.delta_mem
        self.state = state if state is not None else model.delta_mem.new_state()
        self.granularity = self.memory.config.memory_write_granularity
        self.prefill_step = prefill_step
        self.reset()

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty KV cache (the δ state is left as it is)."""
        self.cache = make_prompt_cache(self.model, self.state)
        self.ids: list[int] = []
        self.wrote: list[bool] = []
        self.owners: list[int] = []
        self.n_written = 0
        self._marks: list[tuple[int, dict]] = []  # (position, δ state before it)

    def states(self) -> dict:
        """Layer index → δ state [B, H, r, r] (None = empty) of this context's memory."""
        return dict(self.state.layers)

    def set_states(self, states: dict) -> None:
        self.state.layers = dict(states)

    def __len__(self) -> int:
        return len(self.ids)

    def common_prefix(self, ids: Sequence[int]) -> int:
        n = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            n += 1
        return n

    def mark(self) -> None:
        """Remember the δ state at the current position (a point to roll back to)."""
        if not self._marks or self._marks[-1][0] < len(self.ids):
            self._marks.append((len(self.ids), self.states()))

    def truncate(self, n: int) -> None:
        """Drop positions ≥ n from the KV cache (all of it if the cache cannot be trimmed).
        The δ state is not touched."""
        if n >= len(self.ids):
            return
        if cache_lib.can_trim_prompt_cache(self.cache):
            cache_lib.trim_prompt_cache(self.cache, len(self.ids) - n)
        else:
            self.cache, n = make_prompt_cache(self.model, self.state), 0
        self.n_written -= sum(self.wrote[n:])
        del self.ids[n:], self.wrote[n:], self.owners[n:]
        self._marks = [m for m in self._marks if m[0] <= n]

    def rollback(self, position: int) -> set[int]:
        """Go back to the last mark at or before `position`: δ state as it was there, KV cache
        trimmed. Returns the owners of dropped tokens whose δ writes were undone."""
        marks = [m for m in self._marks if m[0] <= position]
        if not marks:  # nothing was fed
            return set()
        at, states = marks[-1]
        undone = {o for o, w in zip(self.owners[at:], self.wrote[at:]) if w}
        self.set_states(states)
        self.truncate(at)
        return undone

    # -- feeding the model -----------------------------------------------------------------
    def _call(self, ids: Sequence[int], write: bool, message_ids, sentence_ids,
              logits: bool, wait: bool = True) -> Optional[mx.array]:
        """One forward call; on any exception the KV cache and δ state are put back.
        wait=False: start the computation and return (the next read of the logits waits)."""
        states = self.states()
        offsets = [getattr(c, "offset", None) for c in self.cache]
        try:
            inputs = {}
            if message_ids is not None:
                inputs = {"message_ids": [list(message_ids)],
                          "sentence_ids": None if sentence_ids is None else [list(sentence_ids)]}
            with (nullcontext() if write else self.state.read_only()), \
                    self.state.inputs(**inputs), \
                    (last_position_only(self.model) if logits and len(ids) > 1
                     else nullcontext()):
                out = self.model(mx.array(ids)[None], cache=self.cache)
            if logits:  # the logits depend on every layer's cache update, not on new δ states
                out = out[0, -1].astype(mx.float32)
                (mx.eval if wait else mx.async_eval)(out, list(self.states().values()))
                return out
            mx.eval([c.state for c in self.cache], list(self.states().values()))
        except BaseException:
            self.set_states(states)
            for c, offset in zip(self.cache, offsets):
                if offset is None or not c.is_trimmable():
                    self.cache = make_prompt_cache(self.model, self.state)
                    self.ids, self.wrote, self.owners, self._marks = [], [], [], []
                    self.n_written = 0
                    break
                if c.offset > offset:
                    c.trim(c.offset - offset)
            raise
        return None

    def _chunks(self, n: int, groups: Optional[Sequence[int]]) -> list[tuple[int, int]]:
        """Call boundaries: `prefill_step` tokens, or for group writes whole groups together
        (all tokens of a call read the state of the call's start, DESIGN §2) unless one is longer."""
        step = self.prefill_step
        if groups is None:
            return [(a, min(a + step, n)) for a in range(0, n, step)]
        edges = [0] + [t for t in range(1, n) if groups[t] != groups[t - 1]] + [n]
        chunks, a, end = [], 0, 0
        for e in edges[1:]:  # [end, e) is the next group
            if e - a > step and end > a:
                chunks.append((a, end))
                a = end
            while e - a > step:  # a single group longer than a chunk is split
                chunks.append((a, a + step))
                a += step
            end = e
        if a < n:
            chunks.append((a, n))
        return chunks

    def ingest(self, ids: Sequence[int], write: bool = True,
               message_ids: Optional[Sequence[int]] = None,
               sentence_ids: Optional[Sequence[int]] = None, logits: bool = False,
               stop: Optional[Callable[[], bool]] = None,
               owners: Optional[Sequence[int]] = None) -> Optional[mx.array]:
        """Feed `ids` after the current position (in chunks); logits of the last token if asked.

        write: write into δ (else the tokens only read it). message_ids / sentence_ids: per
        token, for message/sentence-granularity adapters. stop: checked between chunks
        (raises Stopped; the chunks already fed stay).
        """
        if not ids:
            return None
        self.mark()
        groups = message_ids if (write and message_ids is not None) else None
        out = None
        chunks = self._chunks(len(ids), groups)
        for k, (a, b) in enumerate(chunks):
            if stop is not None and stop():
                raise Stopped()
            last = k == len(chunks) - 1
            out = self._call(ids[a:b], write,
                             None if message_ids is None else message_ids[a:b],
                             None if sentence_ids is None else sentence_ids[a:b],
                             logits and last)
            self._append(ids[a:b], write, message_ids and message_ids[a:b],
                         sentence_ids and sentence_ids[a:b])
            self.owners += list(owners[a:b]) if owners is not None else [-1] * (b - a)
        return out

    def step(self, token: int, write: bool = True, message_id: Optional[int] = None,
             sentence_id: Optional[int] = None, owner: int = -1) -> mx.array:
        """Feed one generated token; its logits [vocab] float32 (being computed: the caller can
        build on them, e.g. sample, while the step runs)."""
        out = self._call([token], write, None if message_id is None else [message_id],
                         None if sentence_id is None else [sentence_id], True, wait=False)
        self._append([token], write, None if message_id is None else [message_id],
                     None if sentence_id is None else [sentence_id])
        self.owners.append(owner)
        return out

    def record(self, ids: Sequence[int], write: bool, owner: int = -1,
               owners: Optional[Sequence[int]] = None) -> None:
        """Note tokens fed to this context's sequence by someone else (a batched call, token
        writes) as if `ingest` had fed them; labelled `owner`, or per token `owners`."""
        self._append(list(ids), write, None, None)
        self.owners += list(owners) if owners is not None else [owner] * len(ids)

    def _append(self, ids, write, message_ids, sentence_ids) -> None:
        if not write:
            wrote = [False] * len(ids)
        elif self.granularity == "token" or message_ids is None:
            wrote = [True] * len(ids)
        elif self.granularity == "message_mean" or sentence_ids is None:
            wrote = [m >= 0 for m in message_ids]
        else:
            wrote = [m >= 0 and s >= 0 for m, s in zip(message_ids, sentence_ids)]
        self.ids += ids
        self.wrote += wrote
        self.n_written += sum(wrote)

