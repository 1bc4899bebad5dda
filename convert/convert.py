"""Official δ-mem adapter + Hugging Face base model → an MLX model directory, without torch."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from dmem_mlx.adapter import write_adapter
from dmem_mlx.config import CONFIG_NAME, DeltaMemConfig
from dmem_mlx.errors import ConvertError
from dmem_mlx.hub import card_base_model, download, looks_like_path

from .adapter import expected_shapes, validate_adapter
from .torch_pickle import FLOAT_DTYPES, Limits, TensorData, read_torch_checkpoint

ADAPTER_PT = "delta_mem_adapter.pt"
DTYPES = ("float16", "bfloat16", "float32")
SLACK_BYTES = 1 << 20  # on top of the expected adapter: pickle framing, odd layouts


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


def base_from_card(adapter_dir: Path) -> Optional[str]:
    """`base_model` of the adapter's model card; a relative local path is taken relative to the
    adapter directory when it names a directory there."""
    base = card_base_model(adapter_dir)
    if base and looks_like_path(base) and not Path(base).is_absolute():
        local = (adapter_dir / base).resolve()
        if local.is_dir():
            return str(local)
    return base


def fetch_base(base_model: str, config_only: bool = False) -> Path:
    """The base model directory (config.json only, first, to check the adapter cheaply)."""
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(base_model):
        raise ConvertError(f"base model {base_model}: no such directory")
    return download(base_model, ["config.json"] if config_only else DEFAULT_ALLOW_PATTERNS)


def _skeleton(base_dir: Path):
    """The mlx-lm model for the base config, weights not loaded (shapes only)."""
    from mlx_lm.utils import _get_classes, load_config

    try:
        config = load_config(base_dir)
        model_class, args_class = _get_classes(config)
        return model_class(args_class.from_dict(config))
    except FileNotFoundError:
        raise ConvertError(f"{base_dir} has no config.json: not a model directory") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ConvertError(f"base model {base_dir}: {exc}".splitlines()[0][:300]) from None


def checkpoint_limits(shapes: dict[str, tuple[int, ...]]) -> Limits:
    """What reading the checkpoint of an adapter with these tensors may cost: its values in the
    widest dtype accepted (float64), plus slack; only floating-point storages."""
    values = sum(int(np.prod(shape)) for shape in shapes.values())
    return Limits(max_bytes=8 * values + SLACK_BYTES, dtypes=FLOAT_DTYPES)


def _to_mlx(tensor: TensorData) -> mx.array:
    """float64 becomes float32 (MLX saves no float64; overflow becomes Inf and is refused by
    validation); every other dtype is kept exactly."""
    if tensor.dtype == "float64":
        with np.errstate(over="ignore"):
            return mx.array(tensor.array.astype(np.float32))
    return tensor.to_mlx()


def remove_partial_outputs(out: Path) -> None:
    """Remove `.<out>.partial-PID` directories left by conversions that were killed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d+)")
    try:
        candidates = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if match and not _running(int(match.group(1))) and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            _log(f"removed {path.name}, left by a conversion that was killed")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


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
    remove_partial_outputs(out)
    if out.exists() or out.is_symlink():
        raise ConvertError(f"{out} already exists; choose another --mlx-path or remove it")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}")

    _log(f"adapter: {hf_repo}")
    adapter_dir = fetch_adapter(hf_repo, revision)
    config = DeltaMemConfig.load(adapter_dir)
    checkpoint = adapter_dir / ADAPTER_PT
    if not checkpoint.exists():
        raise ConvertError(f"{adapter_dir} has no {ADAPTER_PT}")

    base_model = base_model or base_from_card(adapter_dir)
    if not base_model:
        raise ConvertError("the adapter's model card names no base_model; pass --base-model")
    _log(f"base model: {base_model}")
    skeleton = _skeleton(fetch_base(base_model, config_only=True))
    # restricted unpickler: never runs the pickle, never reads more than this adapter can hold
    read = read_torch_checkpoint(checkpoint, checkpoint_limits(expected_shapes(config, skeleton)))
    tensors = {k: _to_mlx(t) for k, t in read.items()}
    weights = validate_adapter(tensors, config, skeleton)
    if dtype is not None:
        weights = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    stored = sorted({str(v.dtype).split(".")[-1] for v in weights.values()})
    wide = " (float64 read, stored as float32: MLX saves no float64)" \
        if any(t.dtype == "float64" for t in read.values()) and dtype is None else ""
    _log(f"adapter OK: {len(tensors)} tensors, {sum(v.size for v in tensors.values()):,} values "
         f"({config.memory_write_granularity} writes, heads {','.join(config.delta_heads)}, "
         f"{len(config.layer_indices(len(skeleton.layers)))} layers); stored as "
         f"{'/'.join(stored)}{wide}")
    base_dir = fetch_base(base_model)

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
        write_adapter(partial, config, weights, metadata={"converted_from": hf_repo})
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
