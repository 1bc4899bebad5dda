"""The fingerprint that ties a memory file to the model that wrote it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import HubError
from ..hub import card_base_model


# The config fields that change what the memory computes (init-only and archived fields do not,
# and new fields added later with a default must not orphan existing memories).
SEMANTIC_FIELDS = ("rank", "alpha", "normalize_qk", "couple_lambda", "state_update_mode",
                   "rankwise_gates", "num_state_heads", "memory_write_granularity",
                   "target_layers", "delta_heads", "delta_o_rmsnorm", "delta_o_rmsnorm_eps",
                   "trainable_delta_scale", "delta_scale_max", "delta_scale_granularity")


def adapter_sha256(model: nn.Module) -> str:
    """sha256 of the loaded δ weights (float32, sorted by DESIGN §4 name): the same adapter gives
    the same hash wherever its files live."""
    from ..model import delta_parameters

    h = hashlib.sha256()
    for name, value in sorted(delta_parameters(model).items()):
        h.update(f"{name}:{list(value.shape)}\n".encode())
        h.update(np.asarray(value.astype(mx.float32)).tobytes())
    return h.hexdigest()


def base_model_name(source: Optional[str | Path]) -> Optional[str]:
    """`base_model` from the model card (written by the converter) of a model directory, if any.

    A card that cannot be read or names no usable base model gives None: the name is only
    compared when both sides know it.
    """
    if not source or not Path(source).is_dir():
        return None
    try:
        return card_base_model(source)
    except HubError:
        return None


def model_fingerprint(model: nn.Module, tokenizer: Any = None,
                      model_path: Optional[str | Path] = None) -> dict[str, Any]:
    """{base_model, backbone, adapter_sha256, delta_config} of a model with δ-mem attached.

    base_model comes from the model card of `model_path` (default: the directory the tokenizer
    was loaded from) and is None when unknown.
    """
    dm = model.delta_mem
    cfg = dm.config
    if model_path is None and tokenizer is not None:
        model_path = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "name_or_path", None)
    args = model.args
    backbone = (f"{getattr(args, 'model_type', type(model).__module__)} · "
                f"{len(model.layers)} layers · hidden {args.hidden_size} · "
                f"vocab {getattr(args, 'vocab_size', '?')}")
    semantics = {k: v for k, v in cfg.to_dict().items() if k in SEMANTIC_FIELDS}
    config_json = json.dumps(semantics, sort_keys=True)
    return {
        "base_model": base_model_name(model_path),
        "backbone": backbone,
        "adapter_sha256": adapter_sha256(model),
        "delta_config": {
            "rank": cfg.rank, "num_state_heads": cfg.num_state_heads,
            "layers": sorted(dm.layers), "memory_write_granularity": cfg.memory_write_granularity,
            "delta_heads": list(cfg.delta_heads),
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        },
    }


def fingerprint_from_files(model_dir: str | Path) -> Optional[dict[str, Any]]:
    """`model_fingerprint` of the model in `model_dir`, read from its files without loading it
    (config.json, the δ config and weights, the model card), so that a memory of another model
    can be refused before anything heavy runs. None when the files do not say enough (the
    session then checks once the model is loaded)."""
    from ..config import ConfigError, DeltaMemConfig

    model_dir = Path(model_dir)
    try:
        args = json.loads((model_dir / "config.json").read_text())
        cfg = DeltaMemConfig.load(model_dir)
        n_layers = int(args["num_hidden_layers"])
        backbone = (f"{args['model_type']} · {n_layers} layers · hidden {args['hidden_size']} · "
                    f"vocab {args['vocab_size']}")
        layers = cfg.layer_indices(n_layers)
        weights = mx.load(str(model_dir / "delta_mem.safetensors"))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, ConfigError):
        return None
    h = hashlib.sha256()
    for name, value in sorted(weights.items()):
        h.update(f"{name}:{list(value.shape)}\n".encode())
        h.update(np.asarray(value.astype(mx.float32)).tobytes())
    semantics = {k: v for k, v in cfg.to_dict().items() if k in SEMANTIC_FIELDS}
    return {
        "base_model": base_model_name(model_dir),
        "backbone": backbone,
        "adapter_sha256": h.hexdigest(),
        "delta_config": {
            "rank": cfg.rank, "num_state_heads": cfg.num_state_heads, "layers": layers,
            "memory_write_granularity": cfg.memory_write_granularity,
            "delta_heads": list(cfg.delta_heads),
            "config_sha256": hashlib.sha256(json.dumps(semantics, sort_keys=True).encode())
            .hexdigest(),
        },
    }
