"""δ-mem on several machines: mlx-lm's tensor and pipeline parallelism over `mx.distributed`.

Run under `mlx.launch` (one process per machine, or several on one):
- tensor parallel: mlx-lm's own `model.shard(group)`; the δ corrections follow the heads
  (sharding.py) and every rank computes every layer's δ state, the same bits everywhere;
- pipeline parallel: the layers split as mlx-lm's `PipelineMixin` splits them (rank 0 runs the
  last layers), for any architecture; each layer's δ state is computed by the rank running it.
The δ weights are loaded full-size on every rank (they are a few MB at most) and the memory is
a few KB: `gather_states` brings it to every rank for saving, `ShardedChatSession` runs a chat
on every rank in lockstep while rank 0 alone reads and writes the memory file (DESIGN §12).
"""

from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load as _mlx_load

from .adapter import WEIGHTS_NAME, is_adapter_dir, read_adapter
from .blas import raise_cpu_cache_limit
from .cache import DeltaKVCache
from .config import CONFIG_NAME
from .errors import AdapterError, DistributedError, ModelError, one_line
from .hub import resolve_model_path
from .model import attach_delta_mem, load_delta_parameters
from .runtime.fingerprint import model_fingerprint
from .runtime.memory_file import MemoryFile, MemoryFileError, decode, encode
from .runtime.session import ChatSession
from .utils import cast_floats, on_cpu


@dataclass
class Placement:
    """Where a sharded δ-mem model runs. owners: δ layer → rank of `pipeline_group` running it
    (empty without pipeline parallelism: every rank computes every layer)."""

    group: Any  # mx.distributed.Group: every process running the model
    pipeline_group: Any = None
    owners: dict[int, int] = field(default_factory=dict)


def placement(model: nn.Module) -> Placement:
    """The model's placement (one process, when it was not loaded sharded)."""
    found = getattr(model, "dmem_placement", None)
    return found if found is not None else Placement(mx.distributed.init())


# -- pipeline parallelism -------------------------------------------------------------------

def pipeline_split(num_layers: int, size: int, split: Optional[Sequence[int]] = None
                   ) -> list[tuple[int, int]]:
    """[start, end) of the layers of each rank, as mlx-lm's PipelineMixin: the last rank runs the
    first layers, rank 0 the last ones; an even split gives the extra layers to low ranks."""
    if split is None:
        base, extra = divmod(num_layers, size)
        split = [base + (1 if r < extra else 0) for r in range(size)]
    if len(split) != size or any(s <= 0 for s in split) or sum(split) != num_layers:
        raise DistributedError(f"pipeline split {list(split)} must be {size} positive layer "
                               f"counts summing to {num_layers}")
    return [(sum(split[r + 1:]), sum(split[r:])) for r in range(size)]


class PipelineStage(nn.Module):
    """One entry of a pipelined layer list: the layer if it runs on this rank, else a
    pass-through. The first local layer receives its input from the previous stage (rank + 1),
    the last one sends its output to the next (rank − 1); the last entry of every rank gathers
    the final hidden state of rank 0, so every rank computes the same logits."""

    def __init__(self, block: nn.Module, index: int, owner: int, group: Any,
                 receive: bool, send: bool, gather: bool):
        super().__init__()
        local = owner == group.rank()
        if local:
            self.block = block
        # plain attributes of the layer (e.g. llama's `use_sliding`) stay readable everywhere
        object.__setattr__(self, "_plain", {k: v for k, v in vars(block).items()
                                            if not k.startswith("_")})
        self.index, self.owner, self.group = index, owner, group
        self.receive, self.send, self.gather = receive and local, send and local, gather

    def __getattr__(self, key: str) -> Any:
        if key == "self_attn":  # attach_delta_mem, model.shard
            raise DistributedError(f"layer {self.index} is a pipeline stage now: attach δ-mem "
                                   "and shard the model before splitting the pipeline")
        if "block" in self:
            return getattr(self["block"], key)
        plain = self.__dict__.get("_plain", {})
        if key in plain:
            return plain[key]
        if key.startswith("_") or key == "block":
            return super().__getattr__(key)
        raise AttributeError(key)

    def __call__(self, h: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if self.receive:
            h = mx.distributed.recv_like(h, self.owner + 1, group=self.group)
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        if isinstance(cache, DeltaKVCache):
            cache = cache.kv
        if "block" in self:
            h = self["block"](h, *args, **kwargs)
        elif hasattr(cache, "update_and_fetch"):
            # The layer runs elsewhere; its cache still advances, with zero-width keys, so that
            # offsets, masks (cache[0] makes a model's mask) and batch operations stay right.
            empty = mx.zeros((h.shape[0], 1, h.shape[1], 0), h.dtype)
            cache.update_and_fetch(empty, empty)
        if self.send:
            h = mx.distributed.send(h, self.owner - 1, group=self.group)
            if getattr(cache, "keys", None) is not None:  # a prefill evaluates only the caches
                cache.keys = mx.depends(cache.keys, h)
        if self.gather:
            h = mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]
        return h


def pipeline(model: nn.Module, group: Any, split: Optional[Sequence[int]] = None) -> None:
    """Split `model`'s layers over `group` (in place); attach δ-mem first.

    The δ weights of every layer stay on every rank (the memory file and the fingerprint need
    them all); each layer's δ state is computed only by the rank running the layer.
    """
    layers = model.layers
    if any(isinstance(layer, PipelineStage) for layer in layers):
        raise DistributedError("the model is already split into pipeline stages")
    if getattr(getattr(model, "model", None), "pipeline_size", 1) > 1:
        raise DistributedError("the model was split by mlx-lm's pipeline(): load it with "
                               "dmem_mlx.distributed.sharded_load instead")
    size, rank = group.size(), group.rank()
    spans = pipeline_split(len(layers), size, split)
    owner_of = {i: r for r, (a, b) in enumerate(spans) for i in range(a, b)}
    start, end = spans[rank]
    delta = getattr(model, "delta_mem", None)
    for i, block in enumerate(list(layers)):
        layers[i] = PipelineStage(block, i, owner_of[i], group, receive=i == start
                                  and rank < size - 1, send=i == end - 1 and rank > 0,
                                  gather=i == len(layers) - 1 and size > 1)
        if delta is not None and i in delta.layers and owner_of[i] != rank:
            delta.layers[i].attention = nn.Module()  # the backbone layer lives elsewhere
    owners = {i: owner_of[i] for i in (delta.layers if delta is not None else [])}
    model.dmem_placement = Placement(group, group, owners)


# -- loading --------------------------------------------------------------------------------

def sharded_load(
    path_or_hf_repo: str,
    pipeline_group: Any = None,
    tensor_group: Any = None,
    adapter_path: Optional[str] = None,
    tokenizer_config: Optional[dict] = None,
    dtype: Optional[mx.Dtype] = None,
    revision: Optional[str] = None,
    split: Optional[Sequence[int]] = None,
) -> tuple[nn.Module, Any]:
    """`dmem_mlx.load` for a model spread over the processes of `mx.distributed`.

    Mirrors `mlx_lm.utils.sharded_load`: tensor parallel over `tensor_group` (mlx-lm's
    `model.shard`), pipeline parallel over `pipeline_group` (any architecture; `split`: layers
    per rank, rank 0 last), both or — with neither — tensor parallel over the global group.
    The backbone is loaded lazily, so each rank reads only the weights it keeps.
    """
    if pipeline_group is None and tensor_group is None:
        tensor_group = mx.distributed.init()
    model_path = resolve_model_path(path_or_hf_repo, revision=revision,
                                    extra_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    adapter_dir = Path(adapter_path) if adapter_path else model_path
    if not is_adapter_dir(adapter_dir):
        raise AdapterError(f"{adapter_dir} holds no δ-mem adapter ({CONFIG_NAME} + "
                           f"{WEIGHTS_NAME}); convert one with `python -m convert`")
    config, weights = read_adapter(adapter_dir)  # full-size on every rank
    try:
        model, tokenizer = _mlx_load(str(model_path), tokenizer_config=tokenizer_config,
                                     lazy=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # what mlx-lm raises on bad files
        raise ModelError(f"{model_path}: mlx-lm cannot load this model: {one_line(exc)}") from None
    if tensor_group is not None:
        shard(model, tensor_group)
    if on_cpu():
        raise_cpu_cache_limit()  # as dmem_mlx.load
        dtype = mx.float32 if dtype is None else dtype
    if dtype is not None:
        cast_floats(model, dtype)  # lazy: only what this rank keeps is ever computed
    attach_delta_mem(model, config)
    load_delta_parameters(model, weights)  # float32, as dmem_mlx.load
    if pipeline_group is not None:
        pipeline(model, pipeline_group, split)
    mx.eval(model.parameters(), [l.memory.parameters() for l in model.delta_mem.layers.values()])
    world = mx.distributed.init()
    group = pipeline_group if tensor_group is None else (
        tensor_group if pipeline_group is None else world)
    if pipeline_group is None:
        model.dmem_placement = Placement(group)
    else:
        model.dmem_placement.group = group
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # in step
    return model, tokenizer


def pipeline_load(path_or_hf_repo: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """`sharded_load` with pipeline parallelism over the global group (mlx-lm's pipeline_load)."""
    return sharded_load(path_or_hf_repo, pipeline_group=mx.distributed.init(), **kwargs)


def shard(model: nn.Module, group: Any) -> None:
    """mlx-lm's `model.shard(group)`, refused with one line where it cannot run.

    SmolLM3's Model has no `shard` but runs llama's LlamaModel unchanged: llama's `shard` is used.
    """
    from mlx_lm.models import llama

    n = group.size()
    for layer in model.layers:
        attention = layer.self_attn
        for name in ("n_heads", "n_kv_heads"):
            heads = getattr(attention, name, None)
            if isinstance(heads, int) and heads % n:
                raise DistributedError(f"cannot shard over {n} ranks: the attention has {heads} "
                                       f"{'key/value ' if 'kv' in name else ''}heads")
    if not hasattr(model, "shard") and isinstance(getattr(model, "model", None), llama.LlamaModel):
        llama.Model.shard(model, group)
        return
    if not hasattr(model, "shard"):
        raise DistributedError(f"mlx-lm has no tensor parallelism for {model.model_type!r} "
                               "(no Model.shard): use pipeline parallelism")
    try:
        model.shard(group)
    except ValueError as exc:  # e.g. heads not divisible by the group size
        raise DistributedError(f"cannot shard over {group.size()} ranks: "
                               f"{one_line(exc)}") from None


# -- the memory across ranks ----------------------------------------------------------------

def gather_states(model: nn.Module, states: dict[int, Any]) -> dict[int, mx.array]:
    """Every layer's δ state as computed by the rank running it, on every rank.

    states: {layer: [..] array or None (zeros)} of this rank, all of the same shape once filled.
    Tensor parallelism: returned as is (every rank computed all of them, the same bits).
    """
    where = placement(model)
    if not where.owners or where.pipeline_group.size() == 1:
        return states
    group, rank = where.pipeline_group, where.pipeline_group.rank()
    shape = next((tuple(s.shape) for s in states.values() if s is not None), None)
    if shape is None:
        return states
    layers = sorted(states)
    mine = mx.stack([mx.array(states[i], dtype=mx.float32)
                     if states[i] is not None and where.owners[i] == rank
                     else mx.zeros(shape, mx.float32) for i in layers])
    everyone = mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu)
    mx.eval(everyone)
    return {i: everyone[where.owners[i], k] for k, i in enumerate(layers)}


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p of `host` such that p and p + 1 are free: `mlx.launch --backend ring -p p` on
    one machine listens on one port per rank (tests, benchmarks)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind((host, port + 1))
            return port
        except OSError:
            continue
    raise DistributedError("no free pair of ports")


def broadcast_bytes(payload: Optional[bytes], group: Any) -> bytes:
    """Rank 0's `payload` on every rank (the others pass None)."""
    if group.size() == 1:
        return payload or b""
    mine = payload if group.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array([len(mine)], mx.int32), group=group,
                                   stream=mx.cpu).item())
    if n == 0:
        return b""
    buf = np.frombuffer(mine, np.uint8) if mine else np.zeros(n, np.uint8)
    everyone = mx.distributed.all_gather(mx.array(buf), group=group, stream=mx.cpu)
    return bytes(np.array(everyone[:n]))


class ShardedChatSession(ChatSession):
    """A `ChatSession` on every rank of a sharded model, in lockstep: call the same methods with
    the same arguments on every rank. Rank 0 alone opens the memory file (pass `memory` there
    only): its content and verdict are broadcast on start, and the δ state is gathered from
    the ranks that computed it before every save. Sampling is seeded alike on every rank.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, memory: Optional[MemoryFile] = None,
                 fingerprint: Optional[dict] = None, **kwargs: Any):
        group = placement(model).group
        main = group.rank() == 0
        if memory is not None and not main:
            raise DistributedError("only rank 0 opens the memory file")
        fingerprint = fingerprint or model_fingerprint(model, tokenizer)
        status: dict[str, Any] = {"seed": random.getrandbits(31)}
        body = b""
        if main:
            status.update(file=memory is not None,
                          read_only=bool(memory is not None and memory.read_only))
            try:
                if memory is not None:
                    memory.check_fingerprint(fingerprint)
                    if memory.data is not None:
                        body = encode(memory.data)
            except MemoryFileError as exc:
                status["error"] = str(exc)
        head = json.dumps(status).encode()
        shared = broadcast_bytes(len(head).to_bytes(4, "little") + head + body, group)
        n = int.from_bytes(shared[:4], "little")
        status, body = json.loads(shared[4:4 + n]), shared[4 + n:]
        if "error" in status:
            raise MemoryFileError(status["error"])
        mx.random.seed(status["seed"])
        # the same steps on every rank: an empty session, then the memory rank 0 read
        super().__init__(model, tokenizer, fingerprint=fingerprint, **kwargs)
        self.memory, self._read_only = memory, status["read_only"]
        self._saves = status["file"] and not status["read_only"]
        if body:
            self._apply(decode(body, "memory from rank 0"))

    def _state_arrays(self) -> dict[int, np.ndarray]:
        # every snapshot of the state (saves, undo steps) holds each layer as its rank computed it
        states = gather_states(self.model, {i: mx.array(s) for i, s in
                                            super()._state_arrays().items()})
        return {i: np.array(s, dtype=np.float32) for i, s in states.items()}

    def _save(self, force: bool = False, backup: bool = True) -> None:
        if not self._saves or (self._read_only and not force):
            return
        data = self._data()  # every rank takes part in the gather
        if self.memory is not None:
            self._write(data, backup)

    def close(self) -> None:
        """Release the memory file (rank 0); every rank finishes its work in flight together."""
        super().close()
        mx.synchronize()
        group = placement(self.model).group
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
