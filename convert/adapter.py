"""Validating an official δ-mem adapter (DESIGN §4) against its config and the base model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from dmem_mlx.config import DeltaMemConfig
from dmem_mlx.errors import AdapterError
from dmem_mlx.model import delta_shapes


def expected_shapes(config: DeltaMemConfig, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor the official code saves for this config and base model, with its shape."""
    return delta_shapes(config, model, stored=True)


def validate_adapter(tensors: dict[str, mx.array], config: DeltaMemConfig,
                     model: nn.Module) -> dict[str, mx.array]:
    """Check keys, shapes and values; return the tensors δ-mem uses (inactive heads dropped).

    Raises AdapterError naming the first problem.
    """
    shapes = expected_shapes(config, model)
    if missing := [k for k in shapes if k not in tensors]:
        raise AdapterError(f"adapter is missing {len(missing)} tensor(s), first: {missing[0]}")
    if unknown := [k for k in tensors if k not in shapes]:
        raise AdapterError(f"adapter has {len(unknown)} unexpected tensor(s), first: "
                           f"{unknown[0][:120]}")
    for key, shape in shapes.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise AdapterError(f"{key} has shape {list(value.shape)[:8]}, expected {list(shape)} "
                               "for this config and base model")
        if not mx.issubdtype(value.dtype, mx.floating):
            raise AdapterError(f"{key} has dtype {value.dtype}, expected a floating-point tensor")
        if not bool(mx.all(mx.isfinite(value))):
            raise AdapterError(f"{key} holds NaN or Inf values")
    used = set(delta_shapes(config, model))
    return {k: v for k, v in tensors.items() if k in used}
