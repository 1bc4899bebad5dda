"""δ-mem attached to mlx-lm's own models: exactness, state persistence, masks, granularities."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from dmem_mlx.config import DeltaMemConfig
from dmem_mlx.delta_mem import read_state, scan_reference
from dmem_mlx.model import attach_delta_mem, delta_parameters, load_delta_parameters
from dmem_mlx.tiny import build_model, tiny_args

ARCHS = ["qwen3", "smollm3", "llama", "qwen2"]
IDS = mx.array([[5, 17, 99, 3, 250, 42, 7, 64, 300, 11]])


def dmem_model(arch="qwen3", delta=None, seed=0, scale=0.3, zero=None, **args):
    model = build_model(tiny_args(arch, **args), seed)
    attach_delta_mem(model, DeltaMemConfig.from_dict(delta or {"delta_heads": ["q", "k", "v", "o"]}))
    mx.random.seed(seed + 1)
    weights = {k: mx.random.normal(v.shape) * scale for k, v in delta_parameters(model).items()}
    for key in weights:
        if zero and any(z in key for z in zero):
            weights[key] = mx.zeros_like(weights[key])
    load_delta_parameters(model, weights)
    return model


def logits(model, ids, cache=None):
    out = model(ids, cache=cache)
    mx.eval(out)
    return np.array(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_delta_weights_give_base_logits_exactly(arch):
    base = build_model(tiny_args(arch), 0)
    model = dmem_model(arch, zero=["delta_q", "delta_k", "delta_v", "delta_o"])
    np.testing.assert_array_equal(logits(model, IDS), logits(base, IDS))
    assert float(mx.abs(model.delta_mem.snapshot()["layers.0"]).sum()) > 0  # it did write


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_state_read_only_gives_base_logits_exactly(arch):
    base = build_model(tiny_args(arch), 0)
    model = dmem_model(arch)
    with model.delta_mem.read_only():
        np.testing.assert_array_equal(logits(model, IDS), logits(base, IDS))
    # ...while writing changes them (the adapter is not a no-op)
    assert np.abs(logits(model, IDS) - logits(base, IDS)).max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_one_call_equals_split_calls(arch):
    one = dmem_model(arch)
    full = logits(one, IDS, make_prompt_cache(one))
    split = dmem_model(arch)
    cache = make_prompt_cache(split)
    parts = [logits(split, IDS[:, a:b], cache) for a, b in ((0, 4), (4, 5), (5, 10))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-5)
    # One call runs the chunked scan, the split calls steps and smaller chunks: equal to fp32
    # rounding per layer, which this random model (scale 0.3) amplifies a little layer by layer.
    for name, s in one.delta_mem.snapshot().items():
        np.testing.assert_allclose(np.array(split.delta_mem.snapshot()[name]), np.array(s), atol=2e-5)


def test_read_only_leaves_state_unchanged_and_reads_it():
    model = dmem_model()
    logits(model, IDS[:, :6])
    before = {k: np.array(v) for k, v in model.delta_mem.snapshot().items()}
    with model.delta_mem.read_only():
        ro = logits(model, IDS[:, 6:])
    for k, v in model.delta_mem.snapshot().items():
        np.testing.assert_array_equal(np.array(v), before[k])
    # reading the fixed state differs from the zero state's logits
    fresh = dmem_model()
    with fresh.delta_mem.read_only():
        assert np.abs(logits(fresh, IDS[:, 6:]) - ro).max() > 1e-4


def test_state_persists_until_reset_and_snapshot_restores():
    model = dmem_model()
    first = logits(model, IDS)
    snap = model.delta_mem.snapshot()
    second = logits(model, IDS)  # same ids, memory now holds the first call
    assert np.abs(second - first).max() > 1e-4
    model.delta_mem.reset()
    np.testing.assert_allclose(logits(model, IDS), first, atol=1e-6)
    model.delta_mem.restore(snap)
    np.testing.assert_allclose(logits(model, IDS), second, atol=1e-6)
    with pytest.raises(ValueError):
        model.delta_mem.restore({"layers.0": mx.zeros((1, 1, 8, 8))})


def test_left_padding_is_never_written_and_matches_unpadded():
    """A left-padded batch row (mlx-lm's BatchKVCache) ≡ the same tokens alone."""
    from mlx_lm.models.cache import BatchKVCache

    model = dmem_model()
    padded = mx.concatenate([mx.array([[0, 0, 0]]), IDS], axis=1)
    cache = [BatchKVCache(left_padding=[3]) for _ in model.layers]
    got = logits(model, padded, cache)[:, 3:]
    padded_state = model.delta_mem.snapshot()
    clean = dmem_model()
    want = logits(clean, IDS, make_prompt_cache(clean))
    np.testing.assert_allclose(got, want, atol=1e-4)
    for k, v in clean.delta_mem.snapshot().items():
        np.testing.assert_allclose(np.array(padded_state[k]), np.array(v), rtol=1e-4, atol=1e-5)


def test_explicit_validity_mask_skips_writes():
    model = dmem_model()
    with model.delta_mem.inputs(valid=mx.array([[1] * 6 + [0] * 4])):
        logits(model, IDS)
    masked = model.delta_mem.snapshot()["layers.0"]
    clean = dmem_model()
    logits(clean, IDS[:, :6])
    np.testing.assert_allclose(np.array(masked), np.array(clean.delta_mem.snapshot()["layers.0"]),
                               atol=1e-6)


def test_layer_reads_of_padding_are_zero():
    model = dmem_model()
    layer = model.delta_mem.layers[0]
    h = mx.random.normal((1, 5, 64))
    with model.delta_mem.inputs(valid=mx.array([[1, 0, 1, 0, 1]])):
        reads = layer.read_and_write(h, model.delta_mem.state)
    np.testing.assert_array_equal(np.array(reads[0, 1]), 0)
    np.testing.assert_array_equal(np.array(reads[0, 3]), 0)


def test_target_layers_only_wrap_those_layers():
    model = dmem_model(delta={"target_layers": [1, 3], "delta_heads": "q,o"})
    assert sorted(model.delta_mem.layers) == [1, 3]
    assert type(model.layers[0].self_attn).__name__ == "Attention"


def test_message_mean_writes_one_mean_per_message_in_id_order():
    cfg = {"memory_write_granularity": "message_mean", "delta_heads": ["q", "o"]}
    model = dmem_model(delta=cfg)
    layer = model.delta_mem.layers[0]
    h = mx.random.normal((1, 7, 64), key=mx.random.key(3))
    ids = np.array([[-1, 0, 0, 1, 1, 1, -1]])
    with model.delta_mem.inputs(message_ids=ids):
        reads = layer.read_and_write(h, model.delta_mem.state)
    # every token read the start state (zero) ...
    np.testing.assert_array_equal(np.array(reads), 0)
    # ... and the state got one write per message: the mean of its tokens, id 0 then id 1
    means = mx.stack([h[0, 1:3].mean(0), h[0, 3:6].mean(0)])[None]
    _, want = scan_reference(mx.zeros((1, 1, 8, 8)), layer.memory.project(means))
    np.testing.assert_allclose(np.array(model.delta_mem.state.layers[layer.index]), np.array(want), atol=1e-6)
    # the next call reads the written state
    with model.delta_mem.inputs(message_ids=np.array([[2, 2]])):
        reads2 = layer.read_and_write(h[:, :2], model.delta_mem.state)
    np.testing.assert_allclose(np.array(reads2).reshape(1, 2, 1, 8),
                               np.array(read_state(want, layer.memory.project(h[:, :2]).q)),
                               atol=1e-6)


def test_message_mean_without_ids_is_an_explicit_choice():
    model = dmem_model(delta={"memory_write_granularity": "message_mean", "delta_heads": "q"})
    logits(model, IDS)  # default: token writes (the reference's fallback)
    assert float(mx.abs(model.delta_mem.snapshot()["layers.0"]).sum()) > 0
    model.delta_mem.missing_ids = "error"
    with pytest.raises(ValueError, match="message ids"):
        logits(model, IDS)


def test_sentence_mean_groups_by_sentence_ids():
    model = dmem_model(delta={"memory_write_granularity": "sentence_mean", "delta_heads": "o"})
    layer = model.delta_mem.layers[2]
    h = mx.random.normal((1, 6, 64), key=mx.random.key(4))
    with model.delta_mem.inputs(message_ids=np.array([[0, 0, 0, 0, 1, -1]]),
                                sentence_ids=np.array([[-1, 0, 0, 1, 2, 3]])):
        layer.read_and_write(h, model.delta_mem.state)
    means = mx.stack([h[0, 1:3].mean(0), h[0, 3], h[0, 4]])[None]
    _, want = scan_reference(mx.zeros((1, 1, 8, 8)), layer.memory.project(means))
    np.testing.assert_allclose(np.array(model.delta_mem.state.layers[layer.index]), np.array(want), atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_backbone_hosts_unquantized_delta(bits):
    base = build_model(tiny_args("qwen3"), 0)
    nn.quantize(base, group_size=32, bits=bits)
    model = build_model(tiny_args("qwen3"), 0)
    nn.quantize(model, group_size=32, bits=bits)
    attach_delta_mem(model, DeltaMemConfig(delta_heads=("q", "o")))
    assert all(v.dtype == mx.float32 for v in delta_parameters(model).values())
    with model.delta_mem.read_only():
        np.testing.assert_array_equal(logits(model, IDS), logits(base, IDS))
    mx.random.seed(0)
    load_delta_parameters(model, {k: mx.random.normal(v.shape) * 0.3
                                  for k, v in delta_parameters(model).items()})
    assert np.abs(logits(model, IDS) - logits(base, IDS)).max() > 1e-3


def test_adapter_weights_are_checked_on_load():
    model = dmem_model()
    weights = delta_parameters(model)
    key = next(iter(weights))
    with pytest.raises(ValueError, match="missing"):
        load_delta_parameters(model, {k: v for k, v in weights.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        load_delta_parameters(model, {**weights, key: mx.zeros((3,))})
