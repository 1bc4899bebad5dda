"""The MLX adapter files: `delta_mem_config.json` + `delta_mem.safetensors` (SPEC §4 key names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import CONFIG_NAME, ConfigError, DeltaMemConfig
from .model import DeltaMem, attach_delta_mem, delta_parameters, load_delta_parameters

WEIGHTS_NAME = "delta_mem.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def save_adapter(model: nn.Module, directory: str | Path, dtype: Optional[mx.Dtype] = None,
                 metadata: Optional[dict] = None) -> None:
    """Write the δ weights (as stored, or cast to `dtype`) and the config into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = delta_parameters(model)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    meta = {"format": "mlx", "delta_mem": json.dumps(metadata or {})}
    mx.save_safetensors(str(directory / WEIGHTS_NAME), weights, metadata=meta)
    model.delta_mem.config.save(directory)


def load_adapter(model: nn.Module, directory: str | Path,
                 compute_dtype: mx.Dtype = mx.float32) -> DeltaMem:
    """Attach δ-mem to an mlx-lm model and load the adapter in `directory` into it.

    δ weights are held in `compute_dtype` (float32 by default: the memory math is fp32).
    """
    directory = Path(directory)
    config = DeltaMemConfig.load(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        weights = mx.load(str(path))
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError on bad files
        raise ConfigError(f"{path} cannot be read as safetensors: {exc}") from None
    weights = {k: v.astype(compute_dtype) for k, v in weights.items()}
    if not all(bool(mx.all(mx.isfinite(v))) for v in weights.values()):
        raise ConfigError(f"{path} holds NaN or Inf values")
    dm = attach_delta_mem(model, config)
    load_delta_parameters(model, weights)
    mx.eval(model.parameters())
    return dm
