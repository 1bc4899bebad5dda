"""The δ memory of a sequence, carried with it the way mlx-lm carries KV and recurrent state.

A `DeltaState` is the memory of one conversation, or of the rows of a batch: per attached layer
a [B, H, r, r] float32 state (DESIGN §1), plus the inputs that steer the next forward calls on
it (validity mask, message / sentence ids, writes on or off). Nothing of it lives on the model,
so any number of sessions, users and batch rows share one model without touching each other.

`make_prompt_cache(model, state)` is mlx-lm's prompt cache whose entries for δ layers also
carry `state` (a `DeltaKVCache` around mlx-lm's own KV cache): a forward call with that cache
reads and writes that state only. A call with any other cache (or none, or the cache mlx-lm's
`generate` builds by itself) uses the model's default memory, `model.delta_mem.state`.

Shapes: B batch rows, H state heads, r rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

MISSING_IDS = ("token", "error")


class DeltaState:
    """The δ memory of one sequence or a batch of rows: layer index → [B, H, r, r] float32.

    An entry is None while that layer's memory is empty (zeros). `previous` holds each layer's
    state before the last forward call that ran on it (see `undo_last_call`).

    Per-call inputs, read by the forward calls on this state:
      writes_enabled — False: every token reads the fixed state, nothing is written;
      valid [B, T] — 0 = padding (reads 0, never written); message_ids / sentence_ids [B, T]
      ints, -1 = never written (DESIGN §2); generation_message_id — message id of calls given
      none; missing_ids — what a message/sentence-granularity adapter does in a call given no
      ids: "token" writes every token (the reference's silent fallback) or "error";
      detach_inputs — training: the memory projections see stop_gradient(h).
    """

    def __init__(self, layers: Iterable[int], num_heads: int, rank: int, batch: int = 1,
                 missing_ids: str = "token"):
        self.layers: dict[int, Optional[mx.array]] = {int(i): None for i in layers}
        self.previous: dict[int, Optional[mx.array]] = dict(self.layers)
        self.num_heads, self.rank = num_heads, rank
        self._batch = batch
        self.writes_enabled = True
        self.valid: Optional[mx.array] = None
        self.message_ids: Optional[np.ndarray] = None
        self.sentence_ids: Optional[np.ndarray] = None
        self.generation_message_id: Optional[int] = None
        self.missing_ids = missing_ids
        self.detach_inputs = False

    # -- shape --------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Rows held: those of the written states, else the batch it was made for."""
        for s in self.layers.values():
            if s is not None:
                return s.shape[0]
        return self._batch

    def _tail(self) -> tuple[int, int, int]:
        return (self.num_heads, self.rank, self.rank)

    def _rows(self, i: int) -> mx.array:
        """Layer i's state with every row present: [batch_size, H, r, r]."""
        s = self.layers[i]
        return mx.zeros((self.batch_size, *self._tail()), mx.float32) if s is None else s

    @property
    def nbytes(self) -> int:
        """Bytes of δ state held (zeros counted for empty layers)."""
        return len(self.layers) * self.batch_size * self.num_heads * self.rank * self.rank * 4

    # -- a forward call -----------------------------------------------------------------------
    def begin(self, layer: int, batch: int) -> mx.array:
        """Layer `layer`'s state for a call of `batch` rows, [batch, H, r, r]; remembers it as
        the state before this call. A state of one row serves any batch (broadcast)."""
        s = self.layers[layer]
        self.previous[layer] = s
        if s is None:
            return mx.zeros((batch, *self._tail()), mx.float32)
        if s.shape[0] != batch:
            if s.shape[0] != 1:
                raise ValueError(f"δ state holds batch {s.shape[0]}, call has {batch}")
            return mx.broadcast_to(s, (batch, *s.shape[1:]))
        return s

    def undo_last_call(self) -> None:
        """Put every layer back to its state before the last forward call.

        Takes back the write of a sampled EOS: mlx-lm's `generate_step` runs the model on a
        token before yielding it, so the EOS has been fed by the time it is seen.
        """
        self.layers = dict(self.previous)

    # -- the memory as a whole ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: every layer back to zeros."""
        self.layers = {i: None for i in self.layers}
        self.previous = dict(self.layers)

    def snapshot(self) -> dict[str, mx.array]:
        """The memory as evaluated float32 arrays {"layers.{i}": [B, H, r, r]} (zeros if empty)."""
        snap = {f"layers.{i}": self._rows(i) for i in self.layers}
        mx.eval(snap)
        return snap

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Set the memory from `snapshot()` output; checks names and shapes before changing anything."""
        want = {f"layers.{i}" for i in self.layers}
        if set(snapshot) != want:
            raise ValueError(f"snapshot layers {sorted(snapshot)} do not match {sorted(want)}")
        tail = self._tail()
        rows = {tuple(v.shape)[0] if len(v.shape) == 4 else None for v in snapshot.values()}
        for name, value in snapshot.items():
            if len(value.shape) != 4 or tuple(value.shape[1:]) != tail:
                raise ValueError(f"snapshot {name} has shape {tuple(value.shape)}, "
                                 f"expected [B, *{tail}]")
        if len(rows) != 1:
            raise ValueError(f"snapshot layers hold different batch sizes {sorted(rows)}")
        self.layers = {i: mx.array(snapshot[f"layers.{i}"], dtype=mx.float32) for i in self.layers}
        self.previous = dict(self.layers)

    def copy(self) -> "DeltaState":
        """An independent state holding the same memory and settings (arrays are immutable)."""
        other = DeltaState(self.layers, self.num_heads, self.rank, self._batch, self.missing_ids)
        other.layers, other.previous = dict(self.layers), dict(self.previous)
        other.writes_enabled = self.writes_enabled
        other.generation_message_id = self.generation_message_id
        return other

    # -- batches (mirroring mlx-lm's BatchKVCache) ----------------------------------------------
    @classmethod
    def merge(cls, states: Sequence["DeltaState"]) -> "DeltaState":
        """One state whose rows are those of `states`, in order."""
        if not states:
            raise ValueError("merge needs at least one state")
        first = states[0]
        for s in states[1:]:
            if set(s.layers) != set(first.layers) or s._tail() != first._tail():
                raise ValueError("merged δ states must belong to the same model")
        merged = cls(first.layers, first.num_heads, first.rank,
                     sum(s.batch_size for s in states), first.missing_ids)
        for i in first.layers:
            if any(s.layers[i] is not None for s in states):
                merged.layers[i] = mx.concatenate([s._rows(i) for s in states], axis=0)
        merged.previous = dict(merged.layers)
        return merged

    def extract(self, index: int) -> "DeltaState":
        """Row `index` as a state of its own (batch 1)."""
        out = DeltaState(self.layers, self.num_heads, self.rank, 1, self.missing_ids)
        for i, s in self.layers.items():
            out.layers[i] = None if s is None else s[index:index + 1]
        out.previous = dict(out.layers)
        return out

    def filter(self, indices: Sequence[int]) -> None:
        """Keep only the rows `indices`, in that order (in place)."""
        idx = mx.array(list(indices), dtype=mx.int32)
        self.layers = {i: None if s is None else s[idx] for i, s in self.layers.items()}
        self.previous = dict(self.layers)
        self._batch = len(indices)

    def extend(self, other: "DeltaState") -> None:
        """Append the rows of `other` (in place)."""
        merged = DeltaState.merge([self, other])
        self.layers, self.previous, self._batch = merged.layers, merged.previous, merged._batch

    # -- per-call inputs ------------------------------------------------------------------------
    @contextmanager
    def read_only(self) -> Iterator[None]:
        """Every token reads the fixed state; nothing is written."""
        before = self.writes_enabled
        self.writes_enabled = False
        try:
            yield
        finally:
            self.writes_enabled = before

    @contextmanager
    def inputs(self, *, valid=None, message_ids=None, sentence_ids=None) -> Iterator[None]:
        """Per-token inputs for the forward calls inside the block.

        valid: [B, T] (0 = padding: reads 0, never written); message_ids / sentence_ids: [B, T]
        ints, -1 = never written (DESIGN §2).
        """
        saved = (self.valid, self.message_ids, self.sentence_ids)
        self.valid = None if valid is None else mx.array(valid)
        self.message_ids = None if message_ids is None else np.asarray(message_ids)
        self.sentence_ids = None if sentence_ids is None else np.asarray(sentence_ids)
        try:
            yield
        finally:
            self.valid, self.message_ids, self.sentence_ids = saved

    @contextmanager
    def detached_inputs(self, active: bool = True) -> Iterator[None]:
        """Training: inside the block the memory projections see stop_gradient(h).

        The gradient still flows through the state into the memory projections and gates, but
        not back through the backbone activations of the written tokens, so a write pass with no
        loss of its own needs no backward pass over the backbone (2–3× faster steps).
        """
        before = self.detach_inputs
        self.detach_inputs = bool(active)
        try:
            yield
        finally:
            self.detach_inputs = before

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "missing_ids" and value not in MISSING_IDS:
            raise ValueError("missing_ids must be 'token' or 'error'")
        object.__setattr__(self, key, value)


def _kv_attribute(name: str) -> property:
    """An attribute of `DeltaKVCache` that is the same attribute of its KV cache, read and set."""
    return property(lambda self: getattr(self.kv, name),
                    lambda self, value: setattr(self.kv, name, value))


class DeltaKVCache:
    """The cache entry of a δ layer: mlx-lm's KV cache of that layer plus the sequence's δ state.

    Everything mlx-lm asks of a cache (offset, update_and_fetch, make_mask, trim, state, ...)
    is answered by the KV cache `kv`; the δ layer takes `delta` (the DeltaState) from here.
    Batch operations (filter, extend, extract, merge) apply to both.
    """

    def __init__(self, kv: Any, delta: DeltaState, layer: int):
        self.kv, self.delta, self.layer = kv, delta, layer

    def __getattr__(self, name: str) -> Any:
        if name in ("kv", "delta", "layer"):  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.kv, name)

    # Read and written on the KV cache (mlx-lm's load_prompt_cache sets both).
    state = _kv_attribute("state")
    meta_state = _kv_attribute("meta_state")

    def to_quantized(self, *args: Any, **kwargs: Any) -> "DeltaKVCache":
        if isinstance(self.kv, mlx_cache.QuantizedKVCache):
            return self
        return DeltaKVCache(self.kv.to_quantized(*args, **kwargs), self.delta, self.layer)

    # Batches, as mlx-lm's BatchGenerator drives them: it calls the operation on every layer's
    # entry in turn. filter / extend work on this layer's rows of the shared state in place;
    # extract / merge make one new state, shared by the entries of all δ layers.
    def filter(self, batch_indices: Sequence[int]) -> None:
        self.kv.filter(batch_indices)
        s = self.delta.layers[self.layer]
        if s is not None:
            idx = mx.array(list(batch_indices), dtype=mx.int32)
            self.delta.layers[self.layer] = self.delta.previous[self.layer] = s[idx]
        self.delta._batch = len(batch_indices)

    def extend(self, other: "DeltaKVCache") -> None:
        self.kv.extend(other.kv)
        a, b = self.delta, other.delta
        rows = _shared(a, ("extend", b), lambda: a.batch_size)  # before the first layer's extend
        if a.layers[self.layer] is not None or b.layers[self.layer] is not None:
            left = a.layers[self.layer]
            if left is None:
                left = mx.zeros((rows, *a._tail()), mx.float32)
            s = mx.concatenate([left, b._rows(self.layer)], axis=0)
            a.layers[self.layer] = a.previous[self.layer] = s
        a._batch = rows + b.batch_size

    def extract(self, idx: int) -> "DeltaKVCache":
        state = _shared(self.delta, ("extract", idx), lambda: self.delta.extract(idx))
        return DeltaKVCache(self.kv.extract(idx), state, self.layer)

    @classmethod
    def merge(cls, caches: Sequence["DeltaKVCache"]) -> "DeltaKVCache":
        first, states = caches[0], [c.delta for c in caches]
        state = _shared(first.delta, ("merge", *states), lambda: DeltaState.merge(states))
        return cls(first.kv.merge([c.kv for c in caches]), state, first.layer)


def _shared(source: DeltaState, key: tuple, make) -> Any:
    """`make()` once per batch operation: the first δ layer's entry makes it, the entries of
    the other layers asking with the same key (compared by identity) get the same object."""
    memo = source.__dict__.get("_derived")
    if memo is not None and len(memo[0]) == len(key) and all(
            a is b or (type(a) is int and a == b) for a, b in zip(memo[0], key)):
        memo[2] -= 1
        if memo[2] <= 0:
            del source.__dict__["_derived"]
        return memo[1]
    made = make()
    if len(source.layers) > 1:
        source.__dict__["_derived"] = [key, made, len(source.layers) - 1]
    return made


def with_state(cache: list[Any], model: Any, state: DeltaState) -> list[Any]:
    """`cache` (a prompt cache of `model`, e.g. mlx-lm's) with its δ layers' entries carrying
    `state`; entries of other layers are left as they are. Returns a new list."""
    dm = model.delta_mem
    if set(state.layers) != set(dm.layers) or state._tail() != (
            dm.config.num_state_heads, dm.config.rank, dm.config.rank):
        raise ValueError("this δ state belongs to another model")
    out = list(cache)
    for i in dm.layers:
        kv = out[i].kv if isinstance(out[i], DeltaKVCache) else out[i]
        out[i] = DeltaKVCache(kv, state, i)
    return out


def make_prompt_cache(model: Any, state: Optional[DeltaState] = None,
                      max_kv_size: Optional[int] = None) -> list[Any]:
    """mlx-lm's prompt cache for `model` whose δ layers read and write `state` (a new empty
    one when None). Use it as mlx-lm's: `model(x, cache=...)`, `mlx_lm.generate(...,
    prompt_cache=...)`, `trim_prompt_cache`."""
    if state is None:
        state = model.delta_mem.new_state()
    return with_state(mlx_cache.make_prompt_cache(model, max_kv_size), model, state)


def state_of(cache: Optional[Sequence[Any]]) -> Optional[DeltaState]:
    """The DeltaState a prompt cache carries, or None (then calls use the model's default)."""
    for c in cache or ():
        if isinstance(c, DeltaKVCache):
            return c.delta
    return None
