"""The mlx_lm-style API: `load`, `generate`, `stream_generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm import stream_generate as _mlx_stream_generate
from mlx_lm.generate import GenerationResponse
from mlx_lm.models import cache as cache_lib
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as _mlx_load

from .adapter import WEIGHTS_NAME, is_adapter_dir, load_adapter
from .blas import raise_cpu_cache_limit
from .config import CONFIG_NAME
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
    adapter_path: Optional[str] = None,
    tokenizer_config: Optional[dict] = None,
    dtype: Optional[mx.Dtype] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a converted δ-mem model (a local directory or a Hugging Face repo) → (model, tokenizer).

    The model is mlx-lm's own model class with δ-mem attached (`model.delta_mem` controls the
    memory), so it also works with `mlx_lm.generate`, `mlx_lm.stream_generate` and
    `mlx_lm.models.cache.make_prompt_cache`.

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
        raise FileNotFoundError(
            f"{adapter_dir} holds no δ-mem adapter ({CONFIG_NAME} + {WEIGHTS_NAME}); "
            "convert one with `python -m convert`")
    model, tokenizer = _mlx_load(str(model_path), tokenizer_config=tokenizer_config, lazy=lazy)
    if on_cpu():
        raise_cpu_cache_limit()  # reuse large prefill buffers (see blas.py)
        dtype = mx.float32 if dtype is None else dtype
    if dtype is not None:
        cast_floats(model, dtype)
    load_adapter(model, adapter_dir)
    return model, tokenizer


def stream_generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompt: Union[str, mx.array, list[int]],
    max_tokens: int = 256,
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """`mlx_lm.stream_generate`, except that a sampled EOS is never written into the memory.

    mlx-lm runs the model on each token before yielding it, so by the time the EOS is seen it
    has been fed; here its δ write is undone (and it is trimmed from a caller's prompt_cache).
    The δ state written by the prompt and the reply stays for the next call until reset.
    """
    prompt_cache = kwargs.get("prompt_cache")
    for response in _mlx_stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if response.finish_reason == "stop":
            model.delta_mem.undo_last_call()
            if prompt_cache is not None and cache_lib.can_trim_prompt_cache(prompt_cache):
                cache_lib.trim_prompt_cache(prompt_cache, 1)
        yield response


def generate(
    model: nn.Module,
    tokenizer: Union[TokenizerWrapper, Any],
    prompt: Union[str, mx.array, list[int]],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response (mlx_lm.generate's arguments); see `stream_generate`."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, "
              f"{response.generation_tps:.3f} tokens-per-sec")
        print(f"δ memory: {model.delta_mem.nbytes:,} bytes")
    return text
