"""Attaching δ-mem to mlx-lm's own model classes, and the controls of the memory.

mlx-lm's attention code runs unchanged. `DeltaMemAttention` wraps a layer's `self_attn`:
it computes the memory reads from the attention input h (DESIGN §1 steps 1–2), hands Δq/Δk/Δv
to thin wrappers around q_proj/k_proj/v_proj (step 3, so they land before q_norm/k_norm and
RoPE), lets the original attention run (steps 4–7), and adds Δo to its output (step 8).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fused
from .config import ConfigError, DeltaMemConfig
from .delta_mem import DeltaMemory, group_means, read_state
from .scan import scan


class _Pending:
    """A correction handed from the attention wrapper to a projection wrapper.

    A plain object, so mlx never mistakes the array it carries for a parameter.
    """

    __slots__ = ("delta",)

    def __init__(self) -> None:
        self.delta: Any = None  # Δ, or (reads, weight) for fused.add_correction


class CorrectedProjection(nn.Module):
    """q_proj / k_proj / v_proj plus the δ correction of the current call."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self._pending = _Pending()

    def __call__(self, x: mx.array) -> mx.array:
        out = self.base(x)
        delta, self._pending.delta = self._pending.delta, None
        return out if delta is None else fused.add_correction(out, delta)


class CallInputs:
    """Per-call inputs shared by every δ layer of a model (see `DeltaMem.inputs`)."""

    def __init__(self) -> None:
        self.valid: Optional[mx.array] = None  # [B, T] 1 = real token
        self.message_ids: Optional[np.ndarray] = None  # [B, T] int, -1 = never written
        self.sentence_ids: Optional[np.ndarray] = None
        self.writes_enabled = True
        self.missing_ids: Literal["token", "error"] = "token"
        self.generation_message_id: Optional[int] = None  # ids for calls given none
        self.detach_memory_inputs = False  # training: see DeltaMem.detached_inputs


class DeltaMemAttention(nn.Module):
    """A layer's attention with δ-mem around it.  State: [B, H, r, r] float32."""

    def __init__(self, attention: nn.Module, memory: DeltaMemory, inputs: CallInputs):
        super().__init__()
        self.attention = attention
        self.memory = memory
        self._inputs = inputs
        self.delta_state: Optional[mx.array] = None  # [B, H, r, r] float32; None = zeros
        self.previous_state: Optional[mx.array] = None  # before the last call (undo)
        self._slots = {}
        for head in ("q", "k", "v"):
            if head in memory.config.delta_heads:
                wrapper = CorrectedProjection(getattr(attention, f"{head}_proj"))
                setattr(attention, f"{head}_proj", wrapper)
                self._slots[head] = wrapper._pending

    def __setattr__(self, key: str, value: Any) -> None:
        # The δ state is not a parameter: keep it out of the module's dict (and out of
        # `parameters()`, `save_weights`, the optimizer ...).
        if key in ("delta_state", "previous_state"):
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        reads = self.read_and_write(x, _padding_validity(cache, x.shape[1]))  # [B, T, R] fp32
        if fused.enabled():  # each head's Δ fused into its projection (one addmm)
            deltas = fused.corrections(self.memory, reads)
        else:
            deltas = {head: self.memory.delta(head, reads) for head in self.memory.config.delta_heads}
        for head, slot in self._slots.items():
            slot.delta = deltas[head]
        out = self.attention(x, *args, **kwargs)
        if "o" in deltas:
            out = fused.add_correction(out, deltas["o"])
        return out

    def read_and_write(self, h: mx.array, padding: Optional[mx.array] = None) -> mx.array:
        """Reads of this call and the state update (DESIGN §1 token scan, §2 granularities).

        h: [B, T, D] attention input; padding: [B, T] validity from the KV cache (left padding).
        """
        B, T, _ = h.shape
        cfg, inputs = self.memory.config, self._inputs
        self.previous_state = self.delta_state
        state = self._current_state(B)
        valid = inputs.valid
        if padding is not None:
            valid = padding if valid is None else valid * padding
        if inputs.detach_memory_inputs:
            h = mx.stop_gradient(h)
        elif T == 1 and fused.enabled() and (
                not inputs.writes_enabled or cfg.memory_write_granularity == "token"):
            # Decode: one matmul + one compiled step (see fused.py).
            reads, new_state = fused.decode_step(self.memory, h, state, valid,
                                                 inputs.writes_enabled)
            if inputs.writes_enabled:
                self.delta_state = new_state
            return reads
        token = self.memory.project(h)
        if not inputs.writes_enabled:
            return _flat(read_state(state, token.q, valid))
        if cfg.memory_write_granularity != "token":
            ids = self._group_ids(B, T, valid)
            if ids is not None:
                groups, group_ids, active = ids
                reads = read_state(state, token.q, valid)  # every token reads the start state
                if groups:
                    means, present = group_means(h, group_ids, active, groups)
                    _, self.delta_state = scan(state, self.memory.project(means), present)
                return _flat(reads)
        reads, self.delta_state = scan(state, token, valid)
        return _flat(reads)

    def _current_state(self, batch: int) -> mx.array:
        cfg = self.memory.config
        if self.delta_state is None:
            return mx.zeros((batch, cfg.num_state_heads, cfg.rank, cfg.rank), mx.float32)
        if self.delta_state.shape[0] != batch:
            if self.delta_state.shape[0] != 1:
                raise ValueError(f"δ state holds batch {self.delta_state.shape[0]}, call has {batch}")
            return mx.broadcast_to(self.delta_state, (batch, *self.delta_state.shape[1:]))
        return self.delta_state

    def _group_ids(self, B: int, T: int, valid: Optional[mx.array]):
        """(groups present in increasing order, ids [B, T], active [B, T]) or None for token writes."""
        cfg, inputs = self.memory.config, self._inputs
        message_ids = inputs.message_ids
        if message_ids is None and inputs.generation_message_id is not None:
            message_ids = np.full((B, T), inputs.generation_message_id)
        sentence_mode = cfg.memory_write_granularity == "sentence_mean"
        if message_ids is None or (sentence_mode and inputs.sentence_ids is None):
            if inputs.missing_ids == "error":
                raise ValueError(
                    f"this adapter writes per {cfg.memory_write_granularity.split('_')[0]}: "
                    "pass message ids (DeltaMem.inputs) or set missing_ids='token'")
            return None
        active = message_ids >= 0
        group = message_ids
        if sentence_mode:
            active &= inputs.sentence_ids >= 0
            group = inputs.sentence_ids
        if valid is not None:
            active &= np.asarray(valid) > 0
        groups = sorted({int(g) for g in np.asarray(group)[active]})
        return groups, mx.array(group), mx.array(active)


def _padding_validity(cache: Any, length: int) -> Optional[mx.array]:
    """[B, T] validity of a left-padded batch (mlx-lm's BatchKVCache), else None.

    Before this call's update the cache offset of row b is (tokens so far − left padding), so
    token t is padding while offset + t < 0.
    """
    offset = getattr(cache, "offset", None)
    if not isinstance(offset, mx.array) or offset.ndim != 1:
        return None
    return ((offset[:, None] + mx.arange(length)[None]) >= 0).astype(mx.float32)


def _flat(reads: mx.array) -> mx.array:
    """[B, T, H, r] → [B, T, R], heads concatenated head-major."""
    return reads.reshape(*reads.shape[:2], -1)


class DeltaMem:
    """The memory of a model with δ-mem attached: `model.delta_mem`.

    The state persists across forward calls (prefill chunks, decode steps, `generate` calls)
    until `reset()`. It is independent of the KV cache.
    """

    def __init__(self, config: DeltaMemConfig, layers: dict[int, DeltaMemAttention],
                 inputs: CallInputs):
        self.config = config
        self.layers = layers
        self._inputs = inputs

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: every layer's state back to zeros."""
        for layer in self.layers.values():
            layer.delta_state = None

    def undo_last_call(self) -> None:
        """Put every layer's state back to what it was before the last forward call.

        Used to take back the write of a sampled EOS: mlx-lm's `generate_step` runs the model
        on a token before yielding it, so the EOS has been fed by the time it is seen.
        """
        for layer in self.layers.values():
            layer.delta_state = layer.previous_state

    def snapshot(self) -> dict[str, mx.array]:
        """The whole memory as plain float32 arrays {"layers.{i}": [B, H, r, r]} (zeros if empty)."""
        cfg = self.config
        empty = mx.zeros((1, cfg.num_state_heads, cfg.rank, cfg.rank), mx.float32)
        snap = {f"layers.{i}": (l.delta_state if l.delta_state is not None else empty)
                for i, l in self.layers.items()}
        mx.eval(snap)
        return snap

    def restore(self, snapshot: dict[str, mx.array]) -> None:
        """Set the memory from `snapshot()` output; checks names and shapes before changing anything."""
        cfg = self.config
        want = {f"layers.{i}" for i in self.layers}
        if set(snapshot) != want:
            raise ValueError(f"snapshot layers {sorted(snapshot)} do not match {sorted(want)}")
        tail = (cfg.num_state_heads, cfg.rank, cfg.rank)
        for name, value in snapshot.items():
            if value.ndim != 4 or tuple(value.shape[1:]) != tail:
                raise ValueError(f"snapshot {name} has shape {value.shape}, expected [B, *{tail}]")
        for i, layer in self.layers.items():
            layer.delta_state = mx.array(snapshot[f"layers.{i}"], dtype=mx.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of δ state held (batch 1 when empty)."""
        return sum(v.nbytes for v in self.snapshot().values())

    # -- writes and per-call inputs ----------------------------------------------------------
    @property
    def writes_enabled(self) -> bool:
        return self._inputs.writes_enabled

    @writes_enabled.setter
    def writes_enabled(self, enabled: bool) -> None:
        self._inputs.writes_enabled = bool(enabled)

    @contextmanager
    def read_only(self) -> Iterator[None]:
        """Every token reads the fixed state; nothing is written."""
        before = self._inputs.writes_enabled
        self._inputs.writes_enabled = False
        try:
            yield
        finally:
            self._inputs.writes_enabled = before

    @contextmanager
    def detached_inputs(self, active: bool = True) -> Iterator[None]:
        """Training: inside the block the memory projections see stop_gradient(h).

        The gradient still flows through the state into the memory projections and gates, but
        not back through the backbone activations of the written tokens, so a write pass with no
        loss of its own needs no backward pass over the backbone (2–3× faster steps).
        """
        before = self._inputs.detach_memory_inputs
        self._inputs.detach_memory_inputs = bool(active)
        try:
            yield
        finally:
            self._inputs.detach_memory_inputs = before

    @property
    def missing_ids(self) -> str:
        """What a message/sentence-granularity adapter does in a call given no ids:
        "token" writes every token (the reference's silent fallback, made explicit) or "error"."""
        return self._inputs.missing_ids

    @missing_ids.setter
    def missing_ids(self, mode: str) -> None:
        if mode not in ("token", "error"):
            raise ValueError("missing_ids must be 'token' or 'error'")
        self._inputs.missing_ids = mode

    @property
    def generation_message_id(self) -> Optional[int]:
        """Message id given to every token of calls that pass no ids (e.g. generated tokens)."""
        return self._inputs.generation_message_id

    @generation_message_id.setter
    def generation_message_id(self, value: Optional[int]) -> None:
        self._inputs.generation_message_id = value

    @contextmanager
    def inputs(self, *, valid=None, message_ids=None, sentence_ids=None) -> Iterator[None]:
        """Per-token inputs for the forward calls inside the block.

        valid: [B, T] (0 = padding: reads 0, never written); message_ids / sentence_ids: [B, T]
        ints, -1 = never written (DESIGN §2).
        """
        box = self._inputs
        saved = (box.valid, box.message_ids, box.sentence_ids)
        box.valid = None if valid is None else mx.array(valid)
        box.message_ids = None if message_ids is None else np.asarray(message_ids)
        box.sentence_ids = None if sentence_ids is None else np.asarray(sentence_ids)
        try:
            yield
        finally:
            box.valid, box.message_ids, box.sentence_ids = saved


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__module__}: the model exposes no `layers`")
    return list(layers)


def _out_dims(attention: nn.Module) -> dict[str, int]:
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if p not in attention]
    if missing:
        raise ConfigError(
            f"{type(attention).__module__}.{type(attention).__name__} has no {', '.join(missing)}:"
            " δ-mem needs separate q/k/v/o projections")
    return {h: attention[f"{h}_proj"].weight.shape[0] for h in ("q", "k", "v", "o")}


def attach_delta_mem(model: nn.Module, config: DeltaMemConfig) -> DeltaMem:
    """Wrap the attention of the target layers of an mlx-lm model; returns `model.delta_mem`.

    The δ weights start at zero (the base model exactly); load or initialise them afterwards.
    """
    if getattr(model, "delta_mem", None) is not None:
        raise ValueError("δ-mem is already attached to this model")
    layers = _layers(model)
    hidden = model.args.hidden_size
    inputs = CallInputs()
    attached: dict[int, DeltaMemAttention] = {}
    for i in config.layer_indices(len(layers)):
        attention = layers[i].self_attn
        memory = DeltaMemory(config, hidden, _out_dims(attention))
        attached[i] = DeltaMemAttention(attention, memory, inputs)
        layers[i].self_attn = attached[i]
    model.delta_mem = DeltaMem(config, attached, inputs)
    return model.delta_mem


def delta_parameters(model: nn.Module) -> dict[str, mx.array]:
    """δ weights under DESIGN §4 names: {"model.layers.{i}.self_attn.{param}": array}."""
    out = {}
    for i, layer in model.delta_mem.layers.items():
        for name, value in layer.memory.parameters().items():
            out[f"model.layers.{i}.self_attn.{name}"] = value
    return out


def load_delta_parameters(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Set δ weights from DESIGN §4 names; every expected key must be present with its shape."""
    dm = model.delta_mem
    expected = delta_parameters(model)
    if missing := sorted(set(expected) - set(weights)):
        raise ConfigError(f"adapter is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unknown := sorted(set(weights) - set(expected)):
        raise ConfigError(f"adapter has {len(unknown)} unexpected tensor(s), e.g. {unknown[0]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError(f"{key}: shape {tuple(value.shape)}, expected "
                              f"{tuple(expected[key].shape)}")
    for i, layer in dm.layers.items():
        prefix = f"model.layers.{i}.self_attn."
        layer.memory.update({n: weights[prefix + n] for n in layer.memory.parameters()})
