"""The mlx_lm-style API: load, generate, stream_generate, and drop-in use with mlx-lm."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import dmem_mlx
from dmem_mlx.hub import HubError
from dmem_mlx.tiny import make_tiny_dmem


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_dmem(tmp_path_factory.mktemp("tiny"), delta_config={"delta_heads": "q,k,v,o"})


def force_eos_at(step, eos):
    """A logits processor that makes token number `step` (0-based) the EOS."""
    state = {"n": 0}

    def processor(tokens, logits):
        n = state["n"]
        state["n"] += 1
        if n == step:
            return mx.where(mx.arange(logits.shape[-1]) == eos, 1e9, -1e9)[None]
        return mx.where(mx.arange(logits.shape[-1]) == eos, -1e9, logits)
    return processor


def states(model):
    return {k: np.array(v) for k, v in model.delta_mem.snapshot().items()}


def test_load_and_generate(tiny_dir):
    model, tokenizer = dmem_mlx.load(str(tiny_dir))
    assert model.delta_mem.config.delta_heads == ("q", "k", "v", "o")
    text = dmem_mlx.generate(model, tokenizer, prompt="Hello", max_tokens=5)
    assert isinstance(text, str)
    assert any(np.abs(s).sum() > 0 for s in states(model).values())


def test_sampled_eos_is_never_written(tiny_dir):
    model, tokenizer = dmem_mlx.load(str(tiny_dir))
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode("Hello there")
    out = list(dmem_mlx.stream_generate(model, tokenizer, prompt, max_tokens=20,
                                        logits_processors=[force_eos_at(3, eos)]))
    assert out[-1].finish_reason == "stop"
    reply = [r.token for r in out[:-1]]
    assert len(reply) == 3 and eos not in reply
    got = states(model)
    # the same tokens fed by hand, without the EOS
    model.delta_mem.reset()
    model(mx.array([prompt + reply]))
    for k, v in states(model).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5)


def test_eos_as_first_token_leaves_only_the_prompt(tiny_dir):
    model, tokenizer = dmem_mlx.load(str(tiny_dir))
    prompt = tokenizer.encode("Hello")
    cache = make_prompt_cache(model)
    list(dmem_mlx.stream_generate(model, tokenizer, prompt, max_tokens=5, prompt_cache=cache,
                                  logits_processors=[force_eos_at(0, tokenizer.eos_token_id)]))
    assert cache[0].offset == len(prompt)
    got = states(model)
    model.delta_mem.reset()
    model(mx.array([prompt]))
    for k, v in states(model).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5)


def test_memory_carries_across_generate_calls_until_reset(tiny_dir):
    model, tokenizer = dmem_mlx.load(str(tiny_dir))
    dmem_mlx.generate(model, tokenizer, prompt="My name is Ada.", max_tokens=3)
    after_first = states(model)
    dmem_mlx.generate(model, tokenizer, prompt="What is my name?", max_tokens=3)
    after_second = states(model)
    model.delta_mem.reset()
    dmem_mlx.generate(model, tokenizer, prompt="What is my name?", max_tokens=3)
    fresh = states(model)
    assert any(np.abs(after_first[k]).sum() > 0 for k in after_first)
    assert any(np.abs(after_second[k] - fresh[k]).max() > 1e-4 for k in fresh)


def test_drop_in_for_mlx_lm(tiny_dir):
    model, tokenizer = dmem_mlx.load(str(tiny_dir))
    cache = make_prompt_cache(model)
    text = mlx_lm.generate(model, tokenizer, prompt="Hello", max_tokens=4, prompt_cache=cache)
    assert isinstance(text, str) and cache[0].offset > 0
    pieces = list(mlx_lm.stream_generate(model, tokenizer, "Hi", max_tokens=3))
    assert pieces and pieces[-1].generation_tokens >= 1


def test_load_is_fp32_on_cpu(tiny_dir):
    model, _ = dmem_mlx.load(str(tiny_dir))
    assert model.model.embed_tokens.weight.dtype == mx.float32


def test_missing_model_fails_with_one_line(tmp_path):
    with pytest.raises(HubError, match="no such directory"):
        dmem_mlx.load(str(tmp_path / "nope"))
    with pytest.raises(HubError, match="unreachable|no such repo|not a|cannot download"):
        dmem_mlx.load("declare-lab/this-repo-does-not-exist-dmem")


def test_backbone_without_adapter_is_refused(tmp_path):
    from dmem_mlx.tiny import make_tiny_backbone

    path = make_tiny_backbone(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no δ-mem adapter"):
        dmem_mlx.load(str(path))
