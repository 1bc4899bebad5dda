"""Loading a converted δ-mem model (`load`, as `mlx_lm.utils.load`) and backend helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as _mlx_load

from .adapter import WEIGHTS_NAME, is_adapter_dir, load_adapter
from .blas import raise_cpu_cache_limit
from .config import CONFIG_NAME
from .errors import AdapterError, ModelError, one_line
from .hub import resolve_model_path


def on_cpu() -> bool:
    """True when MLX computes on the CPU backend (no Metal, e.g. Linux)."""
    return mx.default_device() == mx.cpu or not mx.metal.is_available()


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast the floating-point (unquantized) weights of a model to `dtype`, in place."""
    model.update(tree_map(
        lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
        model.parameters()))


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[dict] = None,
    model_config: Optional[dict] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    dtype: Optional[mx.Dtype] = None,
) -> Union[tuple[nn.Module, TokenizerWrapper], tuple[nn.Module, TokenizerWrapper, dict]]:
    """Load a converted δ-mem model (a local directory or a Hugging Face repo) → (model, tokenizer).

    The model is mlx-lm's own model class with δ-mem attached (`model.delta_mem` controls the
    memory), so it also works with `mlx_lm.generate`, `mlx_lm.stream_generate` and
    `mlx_lm.models.cache.make_prompt_cache`.

    The arguments are `mlx_lm.utils.load`'s, in its order, except that
    adapter_path: a directory holding the δ adapter, if not the model directory itself.
    dtype: compute dtype of the unquantized backbone weights. Default: float32 on the CPU
        backend (bf16/fp16 matmuls are many times slower there), the stored dtype on Metal.
        On the CPU backend MLX may also keep more freed buffers for reuse
        (`dmem_mlx.blas.raise_cpu_cache_limit`: faster long prefills).
    """
    model_path = resolve_model_path(path_or_hf_repo, revision=revision,
                                    extra_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    adapter_dir = Path(adapter_path) if adapter_path else model_path
    if not is_adapter_dir(adapter_dir):
        raise AdapterError(
            f"{adapter_dir} holds no δ-mem adapter ({CONFIG_NAME} + {WEIGHTS_NAME}); "
            "convert one with `python -m convert`")
    extra: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        loaded = _mlx_load(str(model_path), tokenizer_config=tokenizer_config,
                           model_config=model_config, lazy=lazy, return_config=return_config,
                           **extra)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # what mlx-lm raises on bad files
        raise ModelError(f"{model_path}: mlx-lm cannot load this model: {one_line(exc)}") from None
    model, tokenizer = loaded[:2]
    if on_cpu():
        raise_cpu_cache_limit()  # reuse large prefill buffers (see blas.py)
        dtype = mx.float32 if dtype is None else dtype
    if dtype is not None:
        cast_floats(model, dtype)
    load_adapter(model, adapter_dir)
    return (model, tokenizer, loaded[2]) if return_config else (model, tokenizer)
