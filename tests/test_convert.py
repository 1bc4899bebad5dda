"""`python -m convert` on official-format adapters that the tests write themselves (no torch)."""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import dmem_mlx
from convert.__main__ import main as convert_main
from dmem_mlx.config import DELTA_HEADS, DeltaMemConfig
from dmem_mlx.tiny import make_tiny_dmem
from torch_format import (call_payload, rewrite_records, save_torch_checkpoint, truncate,
                          write_legacy_checkpoint)

IDS = mx.array([[3, 14, 15, 92, 65, 35, 89]])


def official_tensors(model_dir: Path, dtype=mx.float32) -> dict:
    """The δ weights of a converted model under the official key set (inactive heads as zeros)."""
    model, _ = dmem_mlx.load(str(model_dir))
    cfg = model.delta_mem.config
    out = {}
    for i, layer in model.delta_mem.layers.items():
        params = layer.memory.parameters()
        attn = layer.attention
        for head in DELTA_HEADS:
            name = f"delta_{head}_proj"
            if name not in params:
                params[name] = mx.zeros((attn[f"{head}_proj"].weight.shape[0], cfg.state_dim))
        for name, value in params.items():
            out[f"model.layers.{i}.self_attn.{name}"] = value.astype(dtype)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model, and its adapter rewritten in the official format."""
    root = tmp_path_factory.mktemp("src")
    model_dir = make_tiny_dmem(root / "model", delta_config={
        "delta_heads": ["q", "v", "o"], "couple_lambda": False, "delta_o_rmsnorm": True,
        "trainable_delta_scale": True, "delta_scale_granularity": "head"})
    return model_dir, official_tensors(model_dir)


def write_adapter(directory: Path, tensors: dict, config: dict, base: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "delta_mem_config.json").write_text(json.dumps(config))
    save_torch_checkpoint(directory / "delta_mem_adapter.pt", tensors)
    if base:
        (directory / "README.md").write_text(f"---\nbase_model: {base}\n---\n\n# adapter\n")
    return directory


def official_config(model_dir: Path) -> dict:
    return DeltaMemConfig.load(model_dir).to_dict()


def run(args, capsys):
    code = convert_main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(code, err, out: Path, pattern: str):
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert pattern in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_round_trip_matches_the_source_model(source, tmp_path, capsys):
    model_dir, tensors = source
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir),
                            base=str(model_dir))
    out = tmp_path / "out"
    code, err = run(["--hf-repo", adapter, "--mlx-path", out], capsys)  # base from model card
    assert code == 0, err
    converted, _ = dmem_mlx.load(str(out))
    original, _ = dmem_mlx.load(str(model_dir))
    np.testing.assert_array_equal(np.array(converted(IDS)), np.array(original(IDS)))
    assert "base_model" in (out / "README.md").read_text()


def test_bf16_checkpoint_is_kept_bit_exact(source, tmp_path, capsys):
    model_dir, tensors = source
    bf16 = {k: v.astype(mx.bfloat16) for k, v in tensors.items()}
    adapter = write_adapter(tmp_path / "adapter", bf16, official_config(model_dir))
    out = tmp_path / "out"
    assert run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)[0] == 0
    stored = mx.load(str(out / "delta_mem.safetensors"))
    for key, value in stored.items():
        assert value.dtype == mx.bfloat16
        assert mx.array_equal(value.view(mx.uint16), bf16[key].view(mx.uint16))
    out32 = tmp_path / "out32"
    assert run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out32,
                "--dtype", "float32"], capsys)[0] == 0
    assert all(v.dtype == mx.float32 for v in mx.load(str(out32 / "delta_mem.safetensors")).values())


def test_quantized_backbone(source, tmp_path, capsys):
    import mlx.nn as nn

    model_dir, tensors = source
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    out = tmp_path / "q4"
    code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out, "-q",
                     "--q-group-size", "32"], capsys)
    assert code == 0, err
    model, tokenizer = dmem_mlx.load(str(out))
    assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert model.delta_mem.layers[0].memory.memory_q_proj.dtype == mx.float32
    assert isinstance(dmem_mlx.generate(model, tokenizer, prompt="Hello", max_tokens=3), str)


def test_hostile_pickle_is_never_executed(source, tmp_path, capsys):
    model_dir, tensors = source
    marker = tmp_path / "pwned"
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    for module, name in (("os", "system"), ("posix", "system"), ("builtins", "eval")):
        arg = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
        rewrite_records(adapter / "delta_mem_adapter.pt", {"data.pkl": call_payload(module, name, arg)})
        out = tmp_path / "out"
        code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)
        assert_refused(code, err, out, f"{module}.{name}")
        assert not marker.exists()


@pytest.mark.parametrize("damage,pattern", [
    ("truncate", "unreadable zip"),
    ("legacy", "legacy"),
    ("drop_data", "adapter_pt"),
    ("missing_key", "missing"),
    ("extra_key", "unexpected"),
    ("wrong_shape", "shape"),
    ("nan", "NaN"),
    ("int_dtype", "dtype"),
])
def test_broken_adapters_are_refused(source, tmp_path, capsys, damage, pattern):
    model_dir, tensors = source
    tensors = dict(tensors)
    key = "model.layers.1.self_attn.memory_k_proj"
    if damage == "missing_key":
        del tensors[key]
    elif damage == "extra_key":
        tensors["model.layers.1.self_attn.slot_router"] = mx.zeros((2,))
    elif damage == "wrong_shape":
        tensors[key] = mx.zeros((8, 32))
    elif damage == "nan":
        tensors[key] = tensors[key] * math.nan
    elif damage == "int_dtype":
        tensors[key] = tensors[key].astype(mx.int32)
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    pt = adapter / "delta_mem_adapter.pt"
    if damage == "truncate":
        truncate(pt, pt.stat().st_size // 2)
    elif damage == "legacy":
        write_legacy_checkpoint(pt)
    elif damage == "drop_data":
        rewrite_records(pt, {"data/3": None})
        pattern = "data/3"
    out = tmp_path / "out"
    code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)
    assert_refused(code, err, out, pattern)


@pytest.mark.parametrize("field,value,pattern", [
    ("slot_router_temperature", 1.0, "unknown δ-mem config field 'slot_router_temperature'"),
    ("num_memory_partitions", 4, "num_memory_partitions=4 is an archived"),
    ("memory_readout_mode", "synthetic_kv", "memory_readout_mode"),
    ("state_update_mode", "fancy", "state_update_mode"),
    ("memory_write_granularity", "message_proposals", "memory_write_granularity"),
])
def test_unimplemented_options_are_refused_by_name(source, tmp_path, capsys, field, value, pattern):
    model_dir, tensors = source
    config = {**official_config(model_dir), field: value}
    adapter = write_adapter(tmp_path / "adapter", tensors, config)
    out = tmp_path / "out"
    code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)
    assert_refused(code, err, out, pattern)


def test_config_that_does_not_fit_the_base_is_refused(source, tmp_path, capsys):
    model_dir, tensors = source
    config = {**official_config(model_dir), "target_layers": [7]}
    adapter = write_adapter(tmp_path / "adapter", tensors, config)
    out = tmp_path / "out"
    code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)
    assert_refused(code, err, out, "target_layers [7] out of range")


def test_existing_output_is_left_alone(source, tmp_path, capsys):
    model_dir, tensors = source
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)
    assert code == 1 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_failing_backbone_conversion_leaves_nothing(source, tmp_path, capsys):
    import shutil

    model_dir, tensors = source
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    (base / "model.safetensors").write_bytes(b"garbage")
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    out = tmp_path / "out"
    code, err = run(["--hf-repo", adapter, "--base-model", base, "--mlx-path", out], capsys)
    assert_refused(code, err, out, "converting the backbone failed")


def test_missing_inputs_fail_fast_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["--hf-repo", tmp_path / "nope", "--mlx-path", out], capsys)
    assert_refused(code, err, out, "not an adapter directory")
    code, err = run(["--hf-repo", "declare-lab/no-such-dmem-adapter-xyz", "--mlx-path", out], capsys)
    assert_refused(code, err, out, "declare-lab/no-such-dmem-adapter-xyz")


def test_adapter_without_base_model_asks_for_one(source, tmp_path, capsys):
    model_dir, tensors = source
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    out = tmp_path / "out"
    code, err = run(["--hf-repo", adapter, "--mlx-path", out], capsys)
    assert_refused(code, err, out, "--base-model")


def test_float64_adapter_is_stored_as_float32(source, tmp_path, capsys):
    model_dir, tensors = source
    f64 = {k: np.array(v, dtype=np.float64) for k, v in tensors.items()}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "delta_mem_config.json").write_text(json.dumps(official_config(model_dir)))
    save_torch_checkpoint(adapter / "delta_mem_adapter.pt", f64)
    out = tmp_path / "out"
    code = convert_main(["--hf-repo", str(adapter), "--base-model", str(model_dir),
                         "--mlx-path", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "float64 read, stored as float32" in captured.out
    stored = mx.load(str(out / "delta_mem.safetensors"))
    assert all(v.dtype == mx.float32 for v in stored.values())
    converted, _ = dmem_mlx.load(str(out))
    original, _ = dmem_mlx.load(str(model_dir))
    np.testing.assert_allclose(np.array(converted(IDS)), np.array(original(IDS)), atol=1e-5)


def test_partial_output_of_a_killed_run_is_removed_by_the_next(source, tmp_path, capsys):
    model_dir, tensors = source
    adapter = write_adapter(tmp_path / "adapter", tensors, official_config(model_dir))
    out = tmp_path / "out"
    dead = tmp_path / f".out.partial-{2 ** 22 + 12345}"  # no such process
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".other.partial-1"  # another output's: not ours to touch
    other.mkdir()
    code, err = run(["--hf-repo", adapter, "--base-model", model_dir, "--mlx-path", out], capsys)
    assert code == 0, err
    assert not dead.exists() and other.exists() and out.is_dir()
