"""Tiny random models for tests, examples and CI: no download, a few hundred KB on disk.

`make_tiny_backbone` writes an mlx-lm model directory (config, weights, a byte-level BPE
tokenizer with a ChatML chat template); `make_tiny_dmem` adds a random δ adapter to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "My name is Ada and I live in Paris with my cat Milo.",
    "What is my name? Your name is Ada. Where do I live? You live in Paris.",
    "The weather is nice. I like tea, books and long walks by the river.",
] * 20


def tiny_args(model_type: str = "qwen3", **overrides) -> dict:
    """A small config.json dict for an mlx-lm architecture (qwen3, smollm3, llama, qwen2 …)."""
    args = {
        "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 4,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": 512, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "tie_word_embeddings": True,
    }
    if model_type == "smollm3":
        args["no_rope_layers"] = [1, 1, 1, 0]
    args.update(overrides)
    return args


def build_model(args: dict, seed: int = 0) -> nn.Module:
    """An mlx-lm model of `args['model_type']` with random fp32 weights (scaled so logits vary)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(args)
    mx.random.seed(seed)  # before construction: layers initialise their biases randomly
    model = model_class(args_class.from_dict(args))
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.08
                          if p.ndim > 1 else p, model.parameters()))
    mx.eval(model.parameters())
    return model


def make_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with ChatML specials, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(directory))


def make_tiny_backbone(directory: str | Path, model_type: str = "qwen3", seed: int = 0,
                       **overrides) -> Path:
    """Write a tiny mlx-lm model directory and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    args = tiny_args(model_type, **overrides)
    model = build_model(args, seed)
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    args["eos_token_id"] = 2  # <|im_end|>
    (directory / "config.json").write_text(json.dumps(args, indent=2))
    make_tokenizer(directory, args["vocab_size"])
    return directory


def make_tiny_dmem(directory: str | Path, model_type: str = "qwen3", seed: int = 0,
                   delta_config: Optional[dict] = None, scale: float = 0.3, **overrides) -> Path:
    """A tiny backbone plus a random δ adapter (weights large enough to change the logits)."""
    from .adapter import save_adapter
    from .config import DeltaMemConfig
    from .model import attach_delta_mem, delta_parameters, load_delta_parameters

    directory = make_tiny_backbone(directory, model_type, seed, **overrides)
    config = DeltaMemConfig.from_dict(delta_config or {"delta_heads": ["q", "o"]})
    model = build_model(tiny_args(model_type, **overrides), seed)
    attach_delta_mem(model, config)
    mx.random.seed(seed + 1)
    weights = {k: mx.random.normal(v.shape) * scale for k, v in delta_parameters(model).items()}
    load_delta_parameters(model, weights)
    save_adapter(model, directory)
    return directory
