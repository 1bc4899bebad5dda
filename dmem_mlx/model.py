"""Attaching δ-mem to mlx-lm's own model classes, and the controls of the memory.

mlx-lm's attention code runs unchanged. `DeltaMemAttention` wraps a layer's `self_attn`:
it computes the memory reads from the attention input h (DESIGN §1 steps 1–2), hands Δq/Δk/Δv
to thin wrappers around q_proj/k_proj/v_proj (step 3, so they land before q_norm/k_norm and
RoPE), lets the original attention run (steps 4–7), and adds Δo to its output (step 8).
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import DeltaKVCache, DeltaState
from .config import DeltaMemConfig
from .errors import AdapterError, ConfigError
from .delta_mem import DeltaMemory, group_means, parameter_shapes, read_state
from .scan import check_backend, default_backend, layer_step, resolve, scan, step, token_scan
from .sharding import ALL_TO_SHARDED, full_out_dim, rank_slice


class _Pending:
    """The reads of the current call, handed from the attention wrapper to the projection
    wrappers (or, from the Metal layer kernel, the corrections themselves). A plain object, so
    mlx never mistakes the array it carries for a parameter."""

    __slots__ = ("reads", "weights", "deltas")

    def __init__(self) -> None:
        self.reads: Optional[mx.array] = None  # [B, T, R] float32
        self.weights: Optional[dict] = None  # DeltaMemory.fused_weights()
        self.deltas: Optional[dict] = None  # {head: Δ [B, 1, out]}: add as is


class CorrectedProjection(nn.Module):
    """q_proj / k_proj / v_proj plus the δ correction of the current call (DESIGN §1 step 3)."""

    def __init__(self, base: nn.Module, memory: DeltaMemory, head: str, pending: _Pending):
        super().__init__()
        self.base = base
        object.__setattr__(self, "_memory", memory)  # a plain attribute: not a child module
        self._head, self._pending = head, pending

    def __call__(self, x: mx.array) -> mx.array:
        base = self["base"]  # (item access: no nn.Module attribute lookup on every call)
        out = base(x)
        pending = self._pending
        reads, pending.reads = pending.reads, None
        if reads is None:
            deltas, pending.deltas = pending.deltas, None
            return out if deltas is None else \
                out + rank_slice(base, deltas[self._head]).astype(out.dtype)
        weights = pending.weights
        if isinstance(base, ALL_TO_SHARDED):  # this rank's slice of the output (sharding.py)
            weights = {**weights, self._head: rank_slice(base, (reads, weights[self._head]))[1]}
        return self._memory.correct(self._head, out, reads, weights)


class DeltaMemAttention(nn.Module):
    """A layer's attention with δ-mem around it.

    The δ state is not held here: a call takes it from its cache entry (`DeltaKVCache`, the
    sequence's `DeltaState`) or, with any other cache, from the model's default memory.
    """

    def __init__(self, attention: nn.Module, memory: DeltaMemory, index: int,
                 controls: "DeltaMem"):
        super().__init__()
        self.attention = attention
        self.memory = memory
        self.index = index
        # Plain attributes, reached on every call without nn.Module's attribute lookup.
        object.__setattr__(self, "_controls", controls)
        object.__setattr__(self, "_default_state", controls.state)
        object.__setattr__(self, "_slots", [])
        self._corrects_o = "o" in memory.config.delta_heads
        self._token_writes = memory.config.memory_write_granularity == "token"
        for head in ("q", "k", "v"):
            if head in memory.config.delta_heads:
                pending = _Pending()
                wrapper = CorrectedProjection(getattr(attention, f"{head}_proj"), memory, head,
                                              pending)
                setattr(attention, f"{head}_proj", wrapper)
                self._slots.append(pending)

    # mlx-lm's `model.shard(group)` reaches through this wrapper (q_proj, n_heads ...): it sees
    # the attention it wraps, projections unwrapped, so sharding works before or after attaching
    # (sharding.py).
    def __getattr__(self, key: str) -> Any:
        if not self._wrapped_has(key):
            return super().__getattr__(key)
        value = getattr(self["attention"], key)
        return value.base if isinstance(value, CorrectedProjection) else value

    def __setattr__(self, key: str, value: Any) -> None:
        if not self._wrapped_has(key):
            return super().__setattr__(key, value)
        current = getattr(self["attention"], key)
        if isinstance(current, CorrectedProjection):
            current.base = value
        else:
            setattr(self["attention"], key, value)

    def _wrapped_has(self, key: str) -> bool:
        return ("attention" in self and key not in ("attention", "memory", "index")
                and key not in self and key not in self.__dict__ and not key.startswith("_")
                and hasattr(self["attention"], key))

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if type(cache) is DeltaKVCache:
            state, cache = cache.delta, cache.kv
        else:
            state = self._default_state
        memory = self["memory"]
        weights = memory.fused_weights()
        padding = _padding_validity(cache, x.shape[1])
        if x.shape[1] == 1 and resolve(self._controls.backend) == "metal":
            deltas = self.decode_in_one_kernel(x, state, padding, weights)
            if deltas is not None:
                for slot in self._slots:
                    slot.deltas = deltas
                out = self["attention"](x, mask, cache)
                return out + deltas["o"].astype(out.dtype) if self._corrects_o else out
        reads = self.read_and_write(x, state, padding, weights)
        for slot in self._slots:
            slot.reads, slot.weights = reads, weights
        out = self["attention"](x, mask, cache)
        return memory.correct("o", out, reads, weights) if self._corrects_o else out

    def read_and_write(self, h: mx.array, state: DeltaState,
                       padding: Optional[mx.array] = None,
                       weights: Optional[dict] = None) -> mx.array:
        """Reads of this call and the update of `state` (DESIGN §1 token scan, §2 granularities).

        h: [B, T, D] attention input; padding: [B, T] validity from the KV cache (left padding);
        weights: the layer's `fused_weights()` if at hand. Returns the reads [B, T, R] float32.
        """
        B, T, _ = h.shape
        i, memory, backend = self.index, self["memory"], self._controls.backend
        w = memory.fused_weights() if weights is None else weights
        start = state.begin(i, B)
        valid = state.valid
        if padding is not None:
            valid = padding if valid is None else valid * padding
        writes = state.writes_enabled
        if state.detach_inputs:
            h = mx.stop_gradient(h)
        elif T == 1 and (self._token_writes or not writes):
            reads, new_state = step(memory, h, start, valid, writes, backend, w)
            if writes:
                state.layers[i] = new_state
            return reads
        if not writes:
            return _flat(read_state(start, memory.project(h, w).q, valid))
        if not self._token_writes:
            ids = self._group_ids(state, B, T, valid)
            if ids is not None:
                groups, group_ids, active = ids
                reads = read_state(start, memory.project(h, w).q, valid)  # all read the start
                if groups:
                    means, present = group_means(h, group_ids, active, groups)
                    _, state.layers[i] = scan(start, memory.project(means, w), present, backend)
                return _flat(reads)
        reads, state.layers[i] = token_scan(memory, h, start, valid, backend, w)
        return reads

    def decode_in_one_kernel(self, h: mx.array, state: DeltaState, padding: Optional[mx.array],
                             weights: dict) -> Optional[dict]:
        """A decode token on the Metal layer kernel (DESIGN §9): the state update and every
        correction in one dispatch. Returns {head: Δ [B, 1, out]}, or None when this call is
        not one the kernel does (training's detached inputs, a message/sentence write, a
        layer that corrects no head)."""
        writes = state.writes_enabled
        if state.detach_inputs or not (self._token_writes or not writes) or not (
                self._slots or self._corrects_o):
            return None
        i = self.index
        start = state.begin(i, h.shape[0])
        valid = state.valid
        if padding is not None:
            valid = padding if valid is None else valid * padding
        deltas, new_state = layer_step(self["memory"], h, start, valid, writes, weights)
        if writes:
            state.layers[i] = new_state
        return deltas

    def _group_ids(self, state: DeltaState, B: int, T: int, valid: Optional[mx.array]):
        """(groups present in increasing order, ids [B, T], active [B, T]) or None for token writes."""
        cfg = self.memory.config
        message_ids = state.message_ids
        if message_ids is None and state.generation_message_id is not None:
            message_ids = np.full((B, T), state.generation_message_id)
        sentence_mode = cfg.memory_write_granularity == "sentence_mean"
        if message_ids is None or (sentence_mode and state.sentence_ids is None):
            if state.missing_ids == "error":
                raise ValueError(
                    f"this adapter writes per {cfg.memory_write_granularity.split('_')[0]}: "
                    "pass message ids (DeltaState.inputs) or set missing_ids='token'")
            return None
        active = message_ids >= 0
        group = message_ids
        if sentence_mode:
            active &= state.sentence_ids >= 0
            group = state.sentence_ids
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
    """The δ memory controls of a model with δ-mem attached: `model.delta_mem`.

    `state` is the model's default memory, used by every forward call whose cache carries no
    δ state of its own (plain `model(x)`, or `mlx_lm.generate` building its own cache): it
    persists across calls until `reset()`, independently of the KV cache. For memories of their
    own (sessions, users, batch rows), make states with `new_state()` and run the model with
    `dmem_mlx.cache.make_prompt_cache(model, state)`.

    The other members act on the default state (see `DeltaState` for what they do).

    `backend` picks how the state update runs: "auto" (default, or the environment variable
    DMEM_BACKEND), "reference" (delta_mem.py's per-token loop, the oracle), "chunked" (the
    portable fast path) or "metal" (the Metal kernels); see scan.py.
    """

    def __init__(self, config: DeltaMemConfig, layer_indices: list[int]):
        self.config = config
        self.layers: dict[int, DeltaMemAttention] = {}
        self._state = DeltaState(layer_indices, config.num_state_heads, config.rank)
        self.backend = default_backend()

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "backend":
            check_backend(value)
        object.__setattr__(self, key, value)

    @property
    def state(self) -> DeltaState:
        """The default memory (one object for the model's lifetime)."""
        return self._state

    def new_state(self, batch: int = 1) -> DeltaState:
        """A new, empty memory for `batch` rows (with the default state's `missing_ids`)."""
        return DeltaState(self.layers, self.config.num_state_heads, self.config.rank, batch,
                          self._state.missing_ids)

    # -- the default state ------------------------------------------------------------------
    def reset(self) -> None:
        self._state.reset()

    def undo_last_call(self) -> None:
        self._state.undo_last_call()

    def snapshot(self) -> dict[str, mx.array]:
        return self._state.snapshot()

    def restore(self, snapshot: dict[str, mx.array]) -> None:
        self._state.restore(snapshot)

    @property
    def nbytes(self) -> int:
        return self._state.nbytes

    @property
    def writes_enabled(self) -> bool:
        return self._state.writes_enabled

    @writes_enabled.setter
    def writes_enabled(self, enabled: bool) -> None:
        self._state.writes_enabled = bool(enabled)

    def read_only(self):
        return self._state.read_only()

    def detached_inputs(self, active: bool = True):
        return self._state.detached_inputs(active)

    def inputs(self, *, valid=None, message_ids=None, sentence_ids=None):
        return self._state.inputs(valid=valid, message_ids=message_ids, sentence_ids=sentence_ids)

    @property
    def missing_ids(self) -> str:
        return self._state.missing_ids

    @missing_ids.setter
    def missing_ids(self, mode: str) -> None:
        self._state.missing_ids = mode

    @property
    def generation_message_id(self) -> Optional[int]:
        return self._state.generation_message_id

    @generation_message_id.setter
    def generation_message_id(self, value: Optional[int]) -> None:
        self._state.generation_message_id = value


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__module__}: the model exposes no `layers`")
    return list(layers)


def attention_out_dims(attention: nn.Module) -> dict[str, int]:
    """Output width of an attention's q/k/v/o projections (ConfigError if it has not all four)."""
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if p not in attention]
    if missing:
        raise ConfigError(
            f"{type(attention).__module__}.{type(attention).__name__} has no {', '.join(missing)}:"
            " δ-mem needs separate q/k/v/o projections")
    return {h: full_out_dim(attention[f"{h}_proj"]) for h in ("q", "k", "v", "o")}


def delta_shapes(config: DeltaMemConfig, model: nn.Module,
                 stored: bool = False) -> dict[str, tuple[int, ...]]:
    """Shape of every δ weight (DESIGN §4 names) `config` gives an mlx-lm model without δ-mem
    attached; stored=True: what the official code saves (see `parameter_shapes`)."""
    layers = _layers(model)
    shapes = {}
    for i in config.layer_indices(len(layers)):
        out_dims = attention_out_dims(layers[i].self_attn)
        table = parameter_shapes(config, model.args.hidden_size, out_dims, stored)
        shapes.update({f"model.layers.{i}.self_attn.{k}": v for k, v in table.items()})
    return shapes


def attach_delta_mem(model: nn.Module, config: DeltaMemConfig) -> DeltaMem:
    """Wrap the attention of the target layers of an mlx-lm model; returns `model.delta_mem`.

    The δ weights start at zero (the base model exactly); load or initialise them afterwards.
    """
    if getattr(model, "delta_mem", None) is not None:
        raise ValueError("δ-mem is already attached to this model")
    layers = _layers(model)
    hidden = model.args.hidden_size
    indices = config.layer_indices(len(layers))
    controls = DeltaMem(config, indices)
    for i in indices:
        attention = layers[i].self_attn
        memory = DeltaMemory(config, hidden, attention_out_dims(attention))
        controls.layers[i] = DeltaMemAttention(attention, memory, i, controls)
        layers[i].self_attn = controls.layers[i]
    model.delta_mem = controls
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
        raise AdapterError(f"adapter is missing {len(missing)} tensor(s), first: {missing[0]}")
    if unknown := sorted(set(weights) - set(expected)):
        raise AdapterError(f"adapter has {len(unknown)} unexpected tensor(s), first: {unknown[0]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterError(f"{key} has shape {list(value.shape)}, expected "
                               f"{list(expected[key].shape)}")
    for i, layer in dm.layers.items():
        prefix = f"model.layers.{i}.self_attn."
        layer.memory.update({n: weights[prefix + n] for n in layer.memory.parameters()})
