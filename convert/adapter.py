"""Validating an official δ-mem adapter (DESIGN §4) against its config and the base model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from dmem_mlx.config import DELTA_HEADS, DeltaMemConfig
from dmem_mlx.errors import AdapterError
from dmem_mlx.model import _out_dims


def expected_shapes(config: DeltaMemConfig, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor the official code saves for this config and base model, with its shape."""
    R, G, D = config.state_dim, config.gate_dim, model.args.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for i in config.layer_indices(len(model.layers)):
        out = _out_dims(model.layers[i].self_attn)
        p = f"model.layers.{i}.self_attn."
        if config.trainable_delta_scale:
            shapes[p + "delta_scale_raw"] = (4 if config.delta_scale_granularity == "head" else 1,)
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            shapes[p + name] = (R, D)
        for head in DELTA_HEADS:  # inactive heads are stored too, as zeros
            shapes[p + f"delta_{head}_proj"] = (out[head], R)
        if config.delta_o_rmsnorm:
            shapes[p + "delta_o_rmsnorm_weight"] = (out["o"],)
        shapes[p + "beta_proj"], shapes[p + "beta_bias"] = (G, D), (G,)
        if not config.couple_lambda:
            shapes[p + "lambda_proj"], shapes[p + "lambda_bias"] = (G, D), (G,)
    return shapes


def validate_adapter(tensors: dict[str, mx.array], config: DeltaMemConfig,
                     model: nn.Module) -> dict[str, mx.array]:
    """Check keys, shapes and values; return the tensors δ-mem uses (inactive heads dropped).

    Raises AdapterError naming the first problem.
    """
    shapes = expected_shapes(config, model)
    if missing := [k for k in shapes if k not in tensors]:
        raise AdapterError(f"adapter is missing {len(missing)} tensor(s), first: {missing[0]}")
    if unknown := [k for k in tensors if k not in shapes]:
        raise AdapterError(f"adapter has {len(unknown)} unexpected tensor(s), first: {unknown[0]}")
    for key, shape in shapes.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise AdapterError(f"{key} has shape {list(value.shape)}, expected {list(shape)} "
                               "for this config and base model")
        if not mx.issubdtype(value.dtype, mx.floating):
            raise AdapterError(f"{key} has dtype {value.dtype}, expected a floating-point tensor")
        if not bool(mx.all(mx.isfinite(value))):
            raise AdapterError(f"{key} holds NaN or Inf values")
    inactive = [h for h in DELTA_HEADS if h not in config.delta_heads]
    dropped = {f"delta_{h}_proj" for h in inactive}
    if "o" in inactive:
        dropped.add("delta_o_rmsnorm_weight")
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[1] not in dropped}
