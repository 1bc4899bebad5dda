"""Parity with the official PyTorch implementation, on fixtures it generated.

tools/make_official_fixtures.py ran declare-lab/delta-Mem (fp32, eager attention, torch scan)
on tiny Qwen3 / SmolLM3 backbones. Each variant is converted here exactly as a user would
(`python -m convert ... --dtype float32`), loaded with `dmem_mlx.load`, and run as two calls
sharing one prompt cache: a fresh state, then a second prompt with KV cache and state carried.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import dmem_mlx
from convert.__main__ import main as convert_main

FIXTURES = Path(__file__).parent / "fixtures" / "official"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
VARIANTS = sorted(MANIFEST["variants"])


def run_two_calls(model, expected):
    cache = make_prompt_cache(model)
    outs = []
    for n in ("1", "2"):
        ids = mx.array(expected[f"ids{n}"])
        if f"message_ids{n}" in expected:
            with model.delta_mem.inputs(message_ids=expected[f"message_ids{n}"]):
                logits = model(ids, cache=cache)
        else:
            logits = model(ids, cache=cache)
        states = np.stack([np.array(model.delta_mem.state.layers[i][0])
                           for i in expected["layers"]])
        outs.append((np.array(logits.astype(mx.float32)), states))
    return outs


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_official_implementation(variant, tmp_path):
    spec = MANIFEST["variants"][variant]
    base = FIXTURES / MANIFEST["backbones"][spec["backbone"]]["path"]
    out = tmp_path / "model"
    assert convert_main(["--hf-repo", str(FIXTURES / variant / "adapter"), "--base-model",
                         str(base), "--mlx-path", str(out), "--dtype", "float32"]) == 0
    model, _ = dmem_mlx.load(str(out))
    expected = dict(np.load(FIXTURES / variant / "expected.npz"))
    # the adapter must change the logits (message-mean's first call reads an empty state)
    assert np.abs(expected["logits2"] - expected["base_logits2"]).max() > 1e-2
    for n, (logits, states) in zip(("1", "2"), run_two_calls(model, expected)):
        np.testing.assert_allclose(logits, expected[f"logits{n}"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(states, expected[f"state{n}"], atol=1e-4, rtol=0)


def test_bf16_adapter_keeps_exact_values_without_dtype(tmp_path):
    """No --dtype: the bf16 adapter is stored bf16, bit for bit."""
    from convert.torch_pickle import load_torch_checkpoint

    variant = FIXTURES / "qwen3_bf16"
    out = tmp_path / "model"
    assert convert_main(["--hf-repo", str(variant / "adapter"), "--base-model",
                         str(FIXTURES / "backbones" / "qwen3"), "--mlx-path", str(out)]) == 0
    stored = mx.load(str(out / "delta_mem.safetensors"))
    original = load_torch_checkpoint(variant / "adapter" / "delta_mem_adapter.pt")
    assert stored and all(v.dtype == mx.bfloat16 for v in stored.values())
    for key, value in stored.items():
        assert mx.array_equal(value.view(mx.uint16), original[key].view(mx.uint16))
