#!/usr/bin/env python3
"""Generate parity fixtures for dmem-mlx with the OFFICIAL PyTorch δ-mem code.

This is a developer tool, not part of the package: it is the only place in the
project that imports torch and the official implementation
(declare-lab/delta-Mem), which it loads from ``--official-repo`` (an
extracted checkout, never vendored into this repository).

It writes, under ``tests/fixtures/official/`` (default):

* ``backbones/qwen3`` and ``backbones/smollm3``: tiny random Hugging Face
  backbones (fp32 safetensors) plus a tiny byte-level BPE tokenizer with a
  ChatML chat template, loadable offline by ``AutoTokenizer`` / mlx-lm;
* one directory per adapter variant with ``adapter/`` (saved by the official
  ``save_delta_mem_adapter``, plus a small model card README.md) and
  ``expected.npz`` (two forward calls: fresh state + fresh DynamicCache, then
  a second call that carries both);
* ``manifest.json`` describing what was generated and with which versions.

Everything is computed on CPU in fp32 with eager attention and the pure-torch
scan (``DELTA_MEM_SCAN_IMPL=torch``).  All randomness comes from fixed seeds.

Environment used to produce the committed fixtures::

    python3 -m venv /work/scratch/torchvenv
    /work/scratch/torchvenv/bin/pip install torch==2.13.0 transformers==4.57.6 \
        numpy safetensors tokenizers
    /work/scratch/torchvenv/bin/python tools/make_official_fixtures.py \
        --official-repo /work/scratch/delta-Mem

Keys of ``expected.npz``:

    ids1 [1,T1] int32, ids2 [1,T2] int32 token ids of call 1 / call 2
    logits1 [1,T1,V], logits2 [1,T2,V] fp32  δ-mem logits
    base_logits1, base_logits2                   same calls, plain backbone
    state1, state2 [L_att,H,r,r] fp32            δ state of every attached
                                                 layer after call 1 / call 2
    layers [L_att] int32                         attached layer indices
    message_ids1, message_ids2 [1,T] int32       (message_mean variant only)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

# Must be set before any official module instance is built (read in __init__).
os.environ["DELTA_MEM_SCAN_IMPL"] = "torch"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "official"
DEFAULT_OFFICIAL = Path("/work/scratch/delta-Mem")
# Commit of declare-lab/delta-Mem the committed fixtures were generated from.
DEFAULT_OFFICIAL_COMMIT = "5cd5d9153c7f408764728d953565201e198c39e2"

VOCAB_SIZE = 320          # model vocabulary (tokenizer uses the first 300 ids)
TOKENIZER_VOCAB = 300
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOKENIZER_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\nMy cat is called Tom.<|im_end|>\n",
    "<|im_start|>assistant\nHi. Tom is a good name for a cat.<|im_end|>\n",
    "<|im_start|>user\nWhat is the name of my cat?<|im_end|>\n",
    "<|im_start|>assistant\nYour cat is called Tom.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog.",
    "A small memory state remembers facts across turns.",
]

# The conversation whose token ids feed the two calls.
CONV_USER1 = "Tom."
CONV_ASSISTANT = "Hi."
CONV_USER2 = "Ok"
CALL2_NEXT_TOKENS = 2  # tokens of the second user turn that call 2 includes

BACKBONE_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=2,
)

# name -> (backbone, seed, HFDeltaMemConfig kwargs, extra options)
VARIANTS: list[tuple[str, str, int, dict, dict]] = [
    (
        "qwen3_tsw", "qwen3", 101,
        dict(rank=8, alpha=16.0, num_state_heads=1, delta_heads=("q", "o"),
             couple_lambda=True, state_update_mode="standard", rankwise_gates=True,
             output_init="base_slice_fixed", base_slice_ref_width=8, online_gain=0.05,
             beta_bias_init=-1.5, memory_write_granularity="token"),
        {},
    ),
    (
        "qwen3_msw", "qwen3", 102,
        dict(rank=8, alpha=16.0, num_state_heads=4, delta_heads=("q", "o"),
             couple_lambda=True, state_update_mode="standard", rankwise_gates=True,
             output_init="base_slice_fixed", memory_write_granularity="token"),
        {},
    ),
    (
        "qwen3_allheads_uncoupled", "qwen3", 103,
        dict(rank=8, alpha=12.0, delta_heads=("q", "k", "v", "o"), couple_lambda=False,
             state_update_mode="standard", rankwise_gates=True, output_init="zero"),
        {},
    ),
    (
        "qwen3_lambda_outside_headgates", "qwen3", 104,
        dict(rank=8, alpha=16.0, delta_heads=("q", "k", "o"), couple_lambda=False,
             state_update_mode="lambda_outside", rankwise_gates=False, output_init="zero"),
        {},
    ),
    (
        "qwen3_scale_rmsnorm_layers", "qwen3", 105,
        dict(rank=8, alpha=16.0, delta_heads=("q", "v", "o"), couple_lambda=True,
             state_update_mode="standard", rankwise_gates=True, output_init="zero",
             trainable_delta_scale=True, delta_scale_granularity="head",
             delta_scale_max=3.0, delta_scale_init=1.0,
             delta_o_rmsnorm=True, delta_o_rmsnorm_eps=1e-5, target_layers=(0, 2)),
        {},
    ),
    (
        "smollm3_tsw", "smollm3", 106,
        dict(rank=8, alpha=16.0, delta_heads=("q", "k", "v", "o"), couple_lambda=True,
             state_update_mode="standard", rankwise_gates=True, output_init="zero",
             trainable_delta_scale=True, delta_scale_granularity="layer"),
        {},
    ),
    (
        "qwen3_bf16", "qwen3", 107,
        dict(rank=8, alpha=16.0, num_state_heads=1, delta_heads=("q", "o"),
             couple_lambda=True, state_update_mode="standard", rankwise_gates=True,
             output_init="base_slice_fixed", base_slice_ref_width=8, online_gain=0.05,
             beta_bias_init=-1.5, memory_write_granularity="token"),
        {"bf16": True},
    ),
    (
        "qwen3_message_mean", "qwen3", 108,
        dict(rank=8, alpha=16.0, delta_heads=("q", "o"), couple_lambda=True,
             state_update_mode="standard", rankwise_gates=True,
             output_init="base_slice_fixed", memory_write_granularity="message_mean"),
        {"message_ids": True},
    ),
    (
        "qwen3_no_lambda", "qwen3", 109,
        dict(rank=8, alpha=16.0, delta_heads=("v", "o"), couple_lambda=True,
             state_update_mode="no_lambda", rankwise_gates=True, output_init="zero"),
        {},
    ),
]

# Scale of the random δ parameters (normal std; rmsnorm weight is 1 + N(0, s)).
PARAM_STD = {
    "memory_q_proj": 0.3,
    "memory_k_proj": 0.3,
    "memory_v_proj": 0.3,
    "delta_q_proj": 0.2,
    "delta_k_proj": 0.2,
    "delta_v_proj": 0.2,
    "delta_o_proj": 0.2,
    "beta_proj": 0.3,
    "lambda_proj": 0.3,
    "beta_bias": 1.0,
    "lambda_bias": 1.0,
    "delta_scale_raw": 1.0,
    "delta_o_rmsnorm_weight": 0.1,
}

MIN_LOGIT_DIFF = 0.1  # δ-mem logits must differ from the base by at least this much


FIXTURE_README = """\
# Official-implementation parity fixtures

Generated by `tools/make_official_fixtures.py` with the official PyTorch δ-mem
code (declare-lab/delta-Mem @ {commit}), CPU, fp32, eager attention, torch scan.
Do not edit by hand: regenerate (see the script's docstring) and commit the result.

- `backbones/qwen3`, `backbones/smollm3`: tiny random backbones (fp32 safetensors)
  with a tiny byte-level BPE tokenizer and a ChatML chat template.
- `<variant>/adapter/`: `delta_mem_config.json` + `delta_mem_adapter.pt` as written
  by the official `save_delta_mem_adapter`, plus a model card whose `base_model`
  is the backbone path relative to the adapter directory.
- `<variant>/expected.npz`: `ids1`, `ids2`, `logits1`, `logits2`, `base_logits1`,
  `base_logits2`, `state1`, `state2` ([attached layers, H, r, r]), `layers`
  and, for `qwen3_message_mean`, `message_ids1` / `message_ids2`.
  Call 1 starts from a zero δ state and an empty KV cache; call 2 continues both.
- `manifest.json`: versions, seeds and per-variant facts.
"""

# --------------------------------------------------------------------------- utils


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez-compatible archive with fixed timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def official_commit(repo: Path, fallback: str) -> str:
    """HEAD of --official-repo if it is itself a git work tree, else ``fallback``."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == repo.resolve():
            out = git("rev-parse", "HEAD")
            if len(out) == 40:
                return out
    except Exception:
        pass
    return fallback


def import_official(repo: Path):
    if not (repo / "deltamem" / "core" / "delta_impl.py").is_file():
        raise SystemExit(f"official delta-Mem checkout not found at {repo}")
    sys.path.insert(0, str(repo))
    # No stubs are needed with transformers 4.57.x: the official scan kernel
    # module tolerates a missing triton, and the core package imports nothing else.
    from deltamem.core import delta as official  # noqa: WPS433
    from deltamem.core import delta_impl as official_impl  # noqa: WPS433

    return official, official_impl


# ---------------------------------------------------------------------- tokenizer


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= TOKENIZER_VOCAB <= VOCAB_SIZE
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 0
    assert fast.convert_tokens_to_ids("<|im_start|>") == 1
    assert fast.convert_tokens_to_ids("<|im_end|>") == 2
    return fast


def conversation_ids(tokenizer) -> dict[str, np.ndarray]:
    """Token ids of the two calls plus the message ids a session would assign."""
    def render(messages, gen):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    user1 = [{"role": "user", "content": CONV_USER1}]
    turn1 = render(user1, False)                          # user block (message 0)
    prompt1 = render(user1, True)                         # + generation prompt
    with_reply = user1 + [{"role": "assistant", "content": CONV_ASSISTANT}]
    turn2 = render(with_reply, False)                     # + assistant block (message 1)
    full = render(with_reply + [{"role": "user", "content": CONV_USER2}], False)
    assert prompt1[: len(turn1)] == turn1 and turn2[: len(prompt1)] == prompt1
    assert full[: len(turn2)] == turn2
    ids1 = prompt1
    # call 2: the rest of the assistant turn plus the first two tokens of the next
    # user turn (a message may continue in a later call: ids are global).
    ids2 = full[len(prompt1): len(turn2) + CALL2_NEXT_TOKENS]
    # call 1: user message -> 0, generation prompt -> -1 (as the official session does)
    msg1 = [0] * len(turn1) + [-1] * (len(prompt1) - len(turn1))
    # call 2: rest of the assistant message -> 1, next user message -> 2
    msg2 = [1] * (len(turn2) - len(prompt1)) + [2] * CALL2_NEXT_TOKENS
    assert len(msg2) == len(ids2)
    return {
        "ids1": np.asarray([ids1], dtype=np.int32),
        "ids2": np.asarray([ids2], dtype=np.int32),
        "message_ids1": np.asarray([msg1], dtype=np.int32),
        "message_ids2": np.asarray([msg2], dtype=np.int32),
    }


# ---------------------------------------------------------------------- backbones


def randomize_backbone(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "embed_tokens" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def build_backbones(out: Path, tokenizer) -> dict[str, dict]:
    from transformers import Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    info: dict[str, dict] = {}
    specs = {
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(
                **BACKBONE_COMMON, num_hidden_layers=3, head_dim=16, tie_word_embeddings=True,
                rope_theta=10000.0, use_sliding_window=False,
            ),
            11,
        ),
        "smollm3": (
            SmolLM3ForCausalLM,
            SmolLM3Config(
                **BACKBONE_COMMON, num_hidden_layers=4, tie_word_embeddings=False,
                rope_theta=10000.0, no_rope_layer_interval=4,
                no_rope_layers=[1, 1, 1, 0], use_sliding_window=False,
            ),
            12,
        ),
    }
    for name, (cls, config, seed) in specs.items():
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32).eval()
        randomize_backbone(model, seed)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 2
        model.generation_config.bos_token_id = None
        path = out / "backbones" / name
        if path.exists():
            shutil.rmtree(path)
        model.save_pretrained(path, safe_serialization=True)
        # chat_template inside tokenizer_config.json (readable by old and new loaders)
        tokenizer.save_pretrained(path, save_jinja_files=False)
        info[name] = {
            "path": f"backbones/{name}",
            "num_hidden_layers": config.num_hidden_layers,
            "tie_word_embeddings": config.tie_word_embeddings,
        }
        if name == "smollm3":
            info[name]["no_rope_layers"] = list(config.no_rope_layers)
    return info


def load_backbone(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", local_files_only=True,
    )
    return model.eval()


# ----------------------------------------------------------------------- adapters


def randomize_delta_params(model, official_impl, seed: int) -> None:
    """Overwrite every trainable δ parameter with clearly non-trivial values.

    Parameters the official code keeps frozen (delta heads that are not in
    ``delta_heads``) keep their zero init, as in a trained adapter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in official_impl.iter_delta_mem_modules(model):
            for sub_name, param in module.named_parameters():
                if sub_name.startswith("base."):
                    continue
                if not module.is_trainable_parameter(sub_name):
                    assert torch.count_nonzero(param) == 0, sub_name
                    continue
                std = PARAM_STD[sub_name]
                noise = std * torch.randn(param.shape, generator=gen)
                if sub_name == "delta_o_rmsnorm_weight":
                    noise = noise + 1.0
                param.copy_(noise)


def round_delta_params_to_bf16(model, official_impl) -> None:
    with torch.no_grad():
        for _, module in official_impl.iter_delta_mem_modules(model):
            for sub_name, param in module.named_parameters():
                if not sub_name.startswith("base."):
                    param.copy_(param.to(torch.bfloat16).to(torch.float32))


def save_adapter_bf16(model, official_impl, adapter_dir: Path, config) -> None:
    """Save with the official function while the δ tensors are bf16 (as released)."""
    saved = []
    for _, module in official_impl.iter_delta_mem_modules(model):
        for sub_name, param in module.named_parameters():
            if not sub_name.startswith("base."):
                saved.append((param, param.data))
                param.data = param.data.to(torch.bfloat16)
    try:
        official_impl.save_delta_mem_adapter(model, adapter_dir, config)
    finally:
        for param, data in saved:
            param.data = data


def attached_layers(model, official_impl) -> list[int]:
    return [int(module.layer_idx) for _, module in official_impl.iter_delta_mem_modules(model)]


def collect_states(model, official_impl) -> np.ndarray:
    states = []
    for _, module in official_impl.iter_delta_mem_modules(model):
        state = module.delta_state
        assert state is not None and state.size(0) == 1
        state = state[0].detach().to(torch.float32).clone()
        if state.dim() == 2:  # single state head: [r, r] -> [1, r, r]
            state = state.unsqueeze(0)
        states.append(state.numpy())
    return np.stack(states).astype(np.float32)


def run_two_calls(model, official_impl, ids: dict, use_message_ids: bool) -> dict:
    from transformers import DynamicCache

    has_delta = any(True for _ in official_impl.iter_delta_mem_modules(model))
    if has_delta:
        official_impl.reset_delta_mem_states(model)
        official_impl.set_delta_mem_write_enabled(model, True)
    cache = DynamicCache()
    result: dict[str, np.ndarray] = {}
    for call in (1, 2):
        input_ids = torch.from_numpy(ids[f"ids{call}"].astype(np.int64))
        if has_delta:
            msg = None
            if use_message_ids:
                msg = torch.from_numpy(ids[f"message_ids{call}"].astype(np.int64))
            official_impl.set_delta_mem_write_message_ids(model, msg)
        with torch.no_grad():
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, return_dict=True)
        if has_delta:
            official_impl.set_delta_mem_write_message_ids(model, None)
        cache = out.past_key_values
        result[f"logits{call}"] = out.logits.detach().to(torch.float32).numpy().copy()
        if has_delta:
            result[f"state{call}"] = collect_states(model, official_impl)
    expected_len = ids["ids1"].shape[1] + ids["ids2"].shape[1]
    assert cache.get_seq_length() == expected_len, (cache.get_seq_length(), expected_len)
    return result


def write_model_card(adapter_dir: Path, variant: str, backbone: str, cfg: dict, commit: str,
                     bf16: bool) -> None:
    heads = ",".join(cfg["delta_heads"]) or "none"
    lines = [
        "---",
        f"base_model: ../../backbones/{backbone}",
        "library_name: delta-mem",
        "tags:",
        "- delta-mem",
        "- test-fixture",
        "---",
        "",
        f"# {variant}: tiny random δ-mem adapter (test fixture)",
        "",
        "Random, untrained weights for parity tests of dmem-mlx against the official",
        "PyTorch implementation. Not a usable model.",
        "",
        f"- base model: `../../backbones/{backbone}` (relative to this directory)",
        f"- rank {cfg['rank']}, state heads {cfg['num_state_heads']}, delta heads {heads}",
        f"- write granularity `{cfg['memory_write_granularity']}`, "
        f"state update `{cfg['state_update_mode']}`",
        f"- adapter tensors stored as {'bfloat16' if bf16 else 'float32'}",
        f"- generated by `tools/make_official_fixtures.py` from declare-lab/delta-Mem @ {commit[:12]}",
        "",
    ]
    (adapter_dir / "README.md").write_text("\n".join(lines))


def make_variant(out: Path, official, official_impl, name: str, backbone: str, seed: int,
                 cfg_kwargs: dict, opts: dict, ids: dict, commit: str) -> dict:
    vdir = out / name
    if vdir.exists():
        shutil.rmtree(vdir)
    adapter_dir = vdir / "adapter"
    backbone_dir = out / "backbones" / backbone

    model = load_backbone(backbone_dir)
    use_msg = bool(opts.get("message_ids"))
    base = run_two_calls(model, official_impl, ids, use_message_ids=False)

    config = official.HFDeltaMemConfig(**cfg_kwargs)
    torch.manual_seed(seed)  # official reset_parameters() draws from the global RNG
    official.attach_delta_mem(model, config)
    model.eval()
    randomize_delta_params(model, official_impl, seed)
    if opts.get("bf16"):
        round_delta_params_to_bf16(model, official_impl)
    got = run_two_calls(model, official_impl, ids, use_message_ids=use_msg)
    layers = attached_layers(model, official_impl)

    if opts.get("bf16"):
        save_adapter_bf16(model, official_impl, adapter_dir, config)
    else:
        official_impl.save_delta_mem_adapter(model, adapter_dir, config)
    write_model_card(adapter_dir, name, backbone, config.to_dict(), commit, bool(opts.get("bf16")))

    # Non-triviality: δ must visibly change the logits of both calls.
    diff1 = float(np.abs(got["logits1"] - base["logits1"]).max())
    diff2 = float(np.abs(got["logits2"] - base["logits2"]).max())
    base_scale = float(np.abs(base["logits1"]).max())
    print(f"[{name}] layers={layers} T1={ids['ids1'].shape[1]} T2={ids['ids2'].shape[1]} "
          f"max|logits-base| call1={diff1:.4f} call2={diff2:.4f} (max|base|={base_scale:.3f}) "
          f"max|state2|={float(np.abs(got['state2']).max()):.3f}")
    if use_msg:
        # message_mean: every token of a call reads the state as it was at the
        # start of the call, so call 1 (fresh state) must equal the base model.
        if diff1 > 1e-5 or diff2 < MIN_LOGIT_DIFF:
            raise SystemExit(f"{name}: unexpected logit changes ({diff1}, {diff2})")
    elif min(diff1, diff2) < MIN_LOGIT_DIFF:
        raise SystemExit(f"{name}: δ-mem barely changes the logits ({diff1}, {diff2})")
    # The first token after a reset reads a zero state: its logits equal the base.
    first = float(np.abs(got["logits1"][:, 0] - base["logits1"][:, 0]).max())
    if first > 1e-5:
        raise SystemExit(f"{name}: first-token logits differ from base ({first})")

    # Round trip: fresh backbone + official loader must reproduce the numbers.
    model2 = load_backbone(backbone_dir)
    config2 = official.HFDeltaMemConfig.from_pretrained(adapter_dir)
    official.attach_delta_mem(model2, config2)
    official_impl.load_delta_mem_adapter(model2, adapter_dir)
    model2.eval()
    again = run_two_calls(model2, official_impl, ids, use_message_ids=use_msg)
    for key in ("logits1", "logits2", "state1", "state2"):
        err = float(np.abs(again[key] - got[key]).max())
        if err > 1e-6:
            raise SystemExit(f"{name}: reload mismatch on {key}: {err}")

    arrays = {
        "ids1": ids["ids1"],
        "ids2": ids["ids2"],
        "logits1": got["logits1"].astype(np.float32),
        "logits2": got["logits2"].astype(np.float32),
        "base_logits1": base["logits1"].astype(np.float32),
        "base_logits2": base["logits2"].astype(np.float32),
        "state1": got["state1"],
        "state2": got["state2"],
        "layers": np.asarray(layers, dtype=np.int32),
    }
    if use_msg:
        arrays["message_ids1"] = ids["message_ids1"]
        arrays["message_ids2"] = ids["message_ids2"]
    write_npz(vdir / "expected.npz", arrays)
    return {
        "backbone": backbone,
        "seed": seed,
        "adapter_dtype": "bfloat16" if opts.get("bf16") else "float32",
        "layers": layers,
        "max_abs_logit_change": [round(diff1, 4), round(diff2, 4)],
        "message_ids": use_msg,
    }


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", type=Path, default=DEFAULT_OFFICIAL,
                        help="extracted declare-lab/delta-Mem checkout (default: %(default)s)")
    parser.add_argument("--official-commit", default=DEFAULT_OFFICIAL_COMMIT,
                        help="commit recorded in the manifest when --official-repo is not a git work tree")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: %(default)s)")
    parser.add_argument("--only", nargs="*", default=None, help="regenerate only these variants")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    official, official_impl = import_official(args.official_repo.resolve())
    import transformers
    import tokenizers

    commit = official_commit(args.official_repo, args.official_commit)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    backbones = build_backbones(out, tokenizer)
    ids = conversation_ids(tokenizer)
    print(f"ids1={ids['ids1'].tolist()} ids2={ids['ids2'].tolist()}")

    variants = {}
    for name, backbone, seed, cfg_kwargs, opts in VARIANTS:
        if args.only and name not in args.only:
            continue
        variants[name] = make_variant(out, official, official_impl, name, backbone, seed,
                                      cfg_kwargs, opts, ids, commit)

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if (args.only and manifest_path.exists()) else {}
    manifest.update({
        "generator": "tools/make_official_fixtures.py",
        "official_repo": "declare-lab/delta-Mem",
        "official_commit": commit,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "scan_impl": "torch",
        "protocol": (
            "call 1: fresh δ state + fresh DynamicCache, forward ids1 (writes on); "
            "call 2: forward ids2 with the same cache and the carried δ state; "
            "no padding, no attention_mask argument"
        ),
        "backbones": backbones,
    })
    manifest.setdefault("variants", {}).update(variants)
    manifest["variants"] = dict(sorted(manifest["variants"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    (out / "README.md").write_text(FIXTURE_README.format(commit=commit))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
