"""Official δ-mem adapter + Hugging Face base model → an MLX model directory, without torch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx

from dmem_mlx.adapter import WEIGHTS_NAME
from dmem_mlx.config import CONFIG_NAME, DeltaMemConfig
from dmem_mlx.errors import ConvertError
from dmem_mlx.hub import download, looks_like_path

from .adapter import validate_adapter
from .torch_pickle import load_torch_checkpoint

ADAPTER_PT = "delta_mem_adapter.pt"
DTYPES = ("float16", "bfloat16", "float32")


def _log(message: str) -> None:
    print(f"[dmem] {message}", flush=True)


def fetch_adapter(hf_repo: str, revision: Optional[str] = None) -> Path:
    """The adapter directory: local as is, or downloaded (config, checkpoint, model card)."""
    path = Path(hf_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or looks_like_path(hf_repo):
        raise ConvertError(f"{hf_repo}: not an adapter directory")
    return download(hf_repo, [CONFIG_NAME, ADAPTER_PT, "README.md"], revision)


def card_base_model(adapter_dir: Path) -> Optional[str]:
    """`base_model` from the YAML front matter of the adapter's model card, if any."""
    readme = adapter_dir / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        base = ModelCard.load(readme).data.base_model
    except Exception:  # a malformed card only means we cannot infer the base model
        return None
    if isinstance(base, list):
        base = base[0] if base else None
    if base and looks_like_path(base) and not Path(base).is_absolute():
        local = (adapter_dir / base).resolve()  # a card may name a base relative to itself
        if local.is_dir():
            return str(local)
    return base


def fetch_base(base_model: str) -> Path:
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(base_model):
        raise ConvertError(f"base model {base_model}: no such directory")
    return download(base_model, DEFAULT_ALLOW_PATTERNS)


def _skeleton(base_dir: Path):
    """The mlx-lm model for the base config, weights not loaded (shapes only)."""
    from mlx_lm.utils import _get_classes, load_config

    try:
        config = load_config(base_dir)
        model_class, args_class = _get_classes(config)
        return model_class(args_class.from_dict(config))
    except FileNotFoundError:
        raise ConvertError(f"{base_dir} has no config.json: not a model directory") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConvertError(f"base model {base_dir}: {exc}".splitlines()[0]) from None


def convert(
    hf_repo: str,
    mlx_path: str = "mlx_model",
    base_model: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    revision: Optional[str] = None,
) -> Path:
    """Convert; everything is validated before the output directory is written, atomically."""
    out = Path(mlx_path).expanduser()
    if out.exists():
        raise ConvertError(f"{out} already exists; choose another --mlx-path or remove it")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}")

    _log(f"adapter: {hf_repo}")
    adapter_dir = fetch_adapter(hf_repo, revision)
    config = DeltaMemConfig.load(adapter_dir)
    checkpoint = adapter_dir / ADAPTER_PT
    if not checkpoint.is_file():
        raise ConvertError(f"{adapter_dir} has no {ADAPTER_PT}")
    tensors = load_torch_checkpoint(checkpoint)  # restricted unpickler: never runs the pickle

    base_model = base_model or card_base_model(adapter_dir)
    if not base_model:
        raise ConvertError("the adapter's model card names no base_model; pass --base-model")
    _log(f"base model: {base_model}")
    base_dir = fetch_base(base_model)
    weights = validate_adapter(tensors, config, _skeleton(base_dir))
    if dtype is not None:
        weights = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    stored = sorted({str(v.dtype).split(".")[-1] for v in weights.values()})
    _log(f"adapter OK: {len(tensors)} tensors, {sum(v.size for v in tensors.values()):,} values "
         f"({config.memory_write_granularity} writes, heads {','.join(config.delta_heads)}, "
         f"{len(config.layer_indices(len(_skeleton(base_dir).layers)))} layers); stored as "
         f"{'/'.join(stored)}")

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        from mlx_lm.convert import convert as mlx_convert

        _log("converting the backbone with mlx-lm" + (" (quantizing)" if quantize else ""))
        try:
            mlx_convert(str(base_dir), str(partial), quantize=quantize, q_bits=q_bits,
                        q_group_size=q_group_size, dtype=dtype)
        except (ValueError, RuntimeError, KeyError, FileNotFoundError) as exc:
            raise ConvertError(f"converting the backbone failed: {exc}".splitlines()[0]) from None
        mx.save_safetensors(str(partial / WEIGHTS_NAME), weights, metadata={"format": "mlx"})
        config.save(partial)
        _write_card(partial, hf_repo, base_model, config, quantize, q_bits)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _log(f"wrote {out}")
    return out


def _write_card(directory: Path, adapter: str, base: str, config: DeltaMemConfig,
                quantized: bool, q_bits: Optional[int]) -> None:
    quant = f"{q_bits or 4}-bit quantized " if quantized else ""
    front = {"library_name": "mlx", "pipeline_tag": "text-generation", "tags": ["mlx", "delta-mem"],
             "base_model": base}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             f"# {directory.name.split('.partial')[0].lstrip('.')}", "",
             f"A {quant}MLX conversion of `{base}` with the δ-mem adapter `{adapter}` "
             f"(rank {config.rank}, {config.num_state_heads} state head(s), "
             f"{config.memory_write_granularity} writes, Δ on {', '.join(config.delta_heads)}).",
             "", "```python", "from dmem_mlx import load, generate", "",
             "model, tokenizer = load(\"path/to/this/directory\")",
             "print(generate(model, tokenizer, prompt=\"hi\"))", "```", ""]
    (directory / "README.md").write_text("\n".join(lines))
