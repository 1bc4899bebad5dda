"""The mlx_lm-style API: load, generate, stream_generate, and drop-in use with mlx-lm."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import dmem_mlx
from dmem_mlx.errors import AdapterError, HubError
from dmem_mlx.tiny import make_tiny_dmem

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(AdapterError, match="no δ-mem adapter"):
        dmem_mlx.load(str(path))


# -- the package surface -----------------------------------------------------------------------
def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_generate_is_the_function_after_its_module_is_imported():
    """As in mlx-lm: the submodule generate.py holds the function and the CLI; the package name
    `generate` stays the function whichever is imported first."""
    code = ("import dmem_mlx.generate, sys, inspect\n"
            "import dmem_mlx\n"
            "from dmem_mlx import generate, stream_generate\n"
            "module = sys.modules['dmem_mlx.generate']\n"
            "assert inspect.isfunction(dmem_mlx.generate), dmem_mlx.generate\n"
            "assert generate is module.generate and stream_generate is module.stream_generate\n"
            "from dmem_mlx.generate import main\n"
            "assert callable(main)\n"
            "print('ok')")
    assert run_python(code) == "ok"
    assert inspect.isfunction(dmem_mlx.generate)  # in this process too (the tests imported it)
    assert sys.modules["dmem_mlx.generate"].generate is dmem_mlx.generate


def test_generate_cli_still_runs_as_a_module():
    out = subprocess.run([sys.executable, "-W", "error", "-m", "dmem_mlx.generate", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stderr == "" and "--prompt" in out.stdout


def test_signatures_follow_mlx_lm():
    """Every positional parameter of mlx-lm's load/generate/stream_generate is ours too, in the
    same order and with the same default."""
    import mlx_lm.utils

    mlx_generate_module = sys.modules["mlx_lm.generate"]
    pairs = [(dmem_mlx.load, mlx_lm.utils.load),
             (dmem_mlx.generate, mlx_generate_module.generate),
             (dmem_mlx.stream_generate, mlx_generate_module.stream_generate)]
    for ours, theirs in pairs:
        ours_p = list(inspect.signature(ours).parameters.values())
        for i, p in enumerate(inspect.signature(theirs).parameters.values()):
            if p.kind == p.VAR_KEYWORD or p.name in ("draft_model", "stream"):
                continue  # passed through **kwargs
            assert ours_p[i].name == p.name and ours_p[i].default == p.default, (ours, p)


@pytest.mark.parametrize("module", ["dmem_mlx.config", "dmem_mlx.runtime.memory_file"])
def test_light_modules_load_neither_mlx_lm_nor_transformers(module):
    code = (f"import sys, {module}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'mlx_lm', 'transformers', 'mlx'}))")
    assert run_python(code) == "[]"


def test_lazy_exports_resolve():
    names = run_python("import dmem_mlx; print(sorted(dmem_mlx.__all__))")
    assert "generate" in names and "DeltaMemConfig" in names
    for name in dmem_mlx.__all__:
        assert getattr(dmem_mlx, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dmem_mlx.nope  # noqa: B018
