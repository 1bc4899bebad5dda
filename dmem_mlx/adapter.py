"""The MLX adapter files: `delta_mem_config.json` + `delta_mem.safetensors` (DESIGN §4 key names)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import CONFIG_NAME, ConfigError, DeltaMemConfig
from .errors import AdapterError, one_line
from .model import DeltaMem, attach_delta_mem, delta_parameters, load_delta_parameters

WEIGHTS_NAME = "delta_mem.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def save_adapter(model: nn.Module, directory: str | Path, dtype: Optional[mx.Dtype] = None,
                 metadata: Optional[dict] = None) -> None:
    """Write the δ weights (as stored, or cast to `dtype`) and the config into `directory`."""
    write_adapter(directory, model.delta_mem.config, delta_parameters(model), dtype, metadata)


def write_adapter(directory: str | Path, config: DeltaMemConfig, weights: dict[str, mx.array],
                  dtype: Optional[mx.Dtype] = None, metadata: Optional[dict] = None) -> None:
    """Write δ weights (DESIGN §4 names; as given, or cast to `dtype`) and their config into
    `directory`: the adapter files `load_adapter` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    meta = {"format": "mlx", "delta_mem": json.dumps(metadata or {})}
    mx.save_safetensors(str(directory / WEIGHTS_NAME), weights, metadata=meta)
    config.save(directory)


def read_adapter(directory: str | Path,
                 compute_dtype: mx.Dtype = mx.float32) -> tuple[DeltaMemConfig, dict]:
    """The config and δ weights (DESIGN §4 names, in `compute_dtype`) of the adapter in `directory`."""
    directory = Path(directory)
    config = DeltaMemConfig.load(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found")
    try:
        weights = mx.load(str(path))
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError on bad files
        raise AdapterError(f"{path} cannot be read as safetensors: {one_line(exc)}") from None
    weights = {k: v.astype(compute_dtype) for k, v in weights.items()}
    for key, value in weights.items():
        if not bool(mx.all(mx.isfinite(value))):
            raise AdapterError(f"{key} holds NaN or Inf values ({path})")
    return config, weights


def attach_adapter(model: nn.Module, config: DeltaMemConfig, weights: dict) -> DeltaMem:
    """Attach δ-mem with `config` to an mlx-lm model and set its weights."""
    dm = attach_delta_mem(model, config)
    load_delta_parameters(model, weights)
    mx.eval(model.parameters())
    return dm


def load_adapter(model: nn.Module, directory: str | Path,
                 compute_dtype: mx.Dtype = mx.float32) -> DeltaMem:
    """Attach δ-mem to an mlx-lm model and load the adapter in `directory` into it.

    δ weights are held in `compute_dtype` (float32 by default: the memory math is fp32).
    """
    return attach_adapter(model, *read_adapter(directory, compute_dtype))


def widen_state_heads(config: DeltaMemConfig, weights: dict, extra: int,
                      seed: int = 0) -> tuple[DeltaMemConfig, dict]:
    """The adapter with `extra` more state heads that start silent: the same model, more room.

    A new head gets fresh memory projections (the init of `DeltaMemory.initialize`), the
    initial gates, and zero read-out columns, so every output is unchanged until training
    moves them (as LoRA starts with B = 0). Heads are the trailing r rows of each R-sized axis.
    """
    if extra < 1:
        raise ConfigError("the number of added state heads must be >= 1")
    r, R = config.rank, config.state_dim
    wide = replace(config, num_state_heads=config.num_state_heads + extra)
    new_rows, new_gates = r * extra, wide.gate_dim - config.gate_dim
    keys = iter(mx.random.split(mx.random.key(seed), 3 * len(weights)))
    out = {}
    for name, w in sorted(weights.items()):
        param = name.rsplit(".", 1)[-1]
        if param in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            bound = 1.0 / math.sqrt(w.shape[1])
            fresh = mx.random.uniform(-bound, bound, (new_rows, w.shape[1]),
                                      key=next(keys))
            w = mx.concatenate([w, fresh.astype(w.dtype)], axis=0)
        elif param in ("beta_proj", "lambda_proj"):
            w = mx.concatenate([w, mx.zeros((new_gates, w.shape[1]), w.dtype)], axis=0)
        elif param in ("beta_bias", "lambda_bias"):
            init = config.beta_bias_init if param == "beta_bias" else -config.beta_bias_init
            w = mx.concatenate([w, mx.full((new_gates,), init, w.dtype)], axis=0)
        elif param.startswith("delta_") and param.endswith("_proj") and w.shape[-1] == R:
            w = mx.concatenate([w, mx.zeros((w.shape[0], new_rows), w.dtype)], axis=1)
        out[name] = w  # everything else (rms-norm weights, delta scales) has no head axis
    return wide, out
