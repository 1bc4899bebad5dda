"""Regenerate the shipped demo model (dmem_mlx/demo/model) from scratch, with a fixed seed.

What the demo is: a small *domain* model, not a general assistant. A ~3.7M-parameter Qwen3-
architecture backbone is trained from scratch on a synthetic chat domain (dmem_mlx/demo/
persona.py: people tell the assistant their name, city, job, pet, travel plans, favourite food
and hobby over several conversations, with small talk between, and ask about them later),
with a δ-mem memory (8×8 state per layer, token writes) trained with the paper's history
recipe: earlier conversations are written into the δ state, the question turn is read in a
fresh context with writes off, the loss is on the answer.

Why a "joint" stage: with the backbone frozen, the δ read-out of this tiny model learned to
recall the ~200 fact values far too slowly for this CPU (no measurable recall after 500 steps
of `python -m dmem_mlx.train`). So the backbone's pretraining is continued with the memory
attached and everything trainable (plus the plain LM loss, memory empty): its upper layers
learn to decode what the memory holds. The result is saved as a frozen base model (fp16) and
a δ adapter, exactly the files `python -m dmem_mlx.train` writes; `--adapter-iters N` then
fine-tunes that adapter on the frozen backbone with the regular trainer.

Cost on the 2-core x86 CPU this was built on (fp32, OpenBLAS, cores shared with other jobs):
see "Figures" at the end of this docstring.

Stages (each can be run alone; `all` runs them in order):
    data       synthetic chats → WORK/pretrain.jsonl, WORK/dmem{_easy,}/{train,valid}.jsonl
    tokenizer  sentencepiece BPE trained on them → a tokenizer.json mlx-lm/transformers load
    backbone   the Qwen3 backbone trained from scratch with MLX → WORK/backbone
    joint      backbone + δ memory trained together → WORK/backbone_joint, WORK/model_joint
    adapter    optional frozen-backbone δ fine-tuning (python -m dmem_mlx.train) → WORK/model
    ship       copy WORK/model into dmem_mlx/demo/model (fp16 backbone, fp32 adapter)

Run with OpenBLAS for speed:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python tools/build_demo.py all --work-dir /tmp/demo-build

Figures (2-core x86 CPU shared with other jobs, fp32 + OpenBLAS; measured while building):
    data + tokenizer        ~10 s
    backbone, 700 steps     23 min, 2.8M tokens, ~2,000 tokens/s, peak memory 0.84 GB
    δ training (frozen)     ~2,000-2,500 tokens/s (history mode, --write-grad state,
                            batch 16), peak memory 0.4-0.9 GB, ~1 s/step
    The recall targets were NOT reached yet. Finding: the backbone never learned to copy a
    fact from its own context (neither with N(0,0.02) init in 1,200 steps nor with mlx-lm's
    init in 600 steps on pretrain.jsonl; with mlx-lm's init it copies after 200 steps on pure
    tell→echo documents), and without a copy circuit the frozen-backbone δ read-out showed no
    recall after 500 steps. Next: pretrain on copy-heavy documents from the start, check the
    copy ("Nice to meet you, <name>!"), then train δ.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmem_mlx.demo import persona  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHIP_DIR = ROOT / "dmem_mlx" / "demo" / "model"
BACKBONE = {
    "model_type": "qwen3", "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
DELTA_CONFIG = {"rank": 8, "alpha": 16.0, "delta_heads": "q,k,v,o", "num_state_heads": 1,
                "state_update_mode": "standard", "beta_bias_init": -1.5,
                "output_init": "random", "online_gain": 0.05}


def render(messages: list[dict]) -> str:
    """ChatML, exactly as the shipped chat template renders it."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# -- data -------------------------------------------------------------------------------------
def stage_data(work: Path, seed: int, pretrain_episodes: int, train_episodes: int) -> None:
    """Backbone documents and δ-training episodes, from disjoint random streams."""
    rng = random.Random(seed)
    with open(work / "pretrain.jsonl", "w") as f:
        for _ in range(pretrain_episodes):
            ep = persona.episode(rng)
            conversations = ep["history"] + [ep["messages"]]
            if rng.random() < 0.5:  # everything in one context: learn to copy facts
                f.write(json.dumps({"text": render([m for c in conversations for m in c])}) + "\n")
            else:  # each conversation alone: a later question can only be guessed
                for c in conversations:
                    f.write(json.dumps({"text": render(c)}) + "\n")
    # Copy-heavy documents for the second pretraining phase: everything in one context, several
    # questions at the end — the backbone must learn to copy facts from its context (an in-
    # context copy circuit is what the δ read-out builds on).
    rng = random.Random(seed + 2)
    with open(work / "pretrain_copy.jsonl", "w") as f:
        for _ in range(pretrain_episodes):
            ep = persona.episode(rng)
            conversations = ep["history"] + [ep["messages"]]
            if rng.random() < 0.2:
                for c in conversations:
                    f.write(json.dumps({"text": render(c)}) + "\n")
                continue
            person = persona.Person(ep["facts"], told=[s for s in persona.SLOTS if any(
                persona.mentioned(m["content"], s) for c in ep["history"] for m in c
                if m["role"] == "user")])
            extra = []
            for _ in range(rng.randint(1, 3)):
                if person.told:
                    extra += persona.question_turn(rng, person)
            messages = [m for c in conversations for m in c] + extra
            f.write(json.dumps({"text": render(messages)}) + "\n")
    # δ data in two stages: short histories first (a clear signal while the memory's read-out
    # is learned), then the full distribution (1-7 fact groups over 1-4 conversations).
    for stage, offset, groups, conversations in (("dmem_easy", 11, 3, 2), ("dmem", 1, 7, 4)):
        (work / stage).mkdir(exist_ok=True)
        rng = random.Random(seed + offset)
        for split, n in (("train", train_episodes), ("valid", 200)):
            with open(work / stage / f"{split}.jsonl", "w") as f:
                for _ in range(n):
                    ep = persona.episode(rng, num_groups=rng.randint(1, groups),
                                         num_conversations=rng.randint(1, conversations),
                                         summary_rate=0.0 if stage == "dmem_easy" else 0.08,
                                         small_talk_rate=0.05 if stage == "dmem_easy" else 0.1)
                    f.write(json.dumps({"history": ep["history"], "messages": ep["messages"]})
                            + "\n")
    print(f"data: {pretrain_episodes} pretraining episodes, 2 × {train_episodes} δ episodes → "
          f"{work}")


# -- tokenizer --------------------------------------------------------------------------------
def stage_tokenizer(work: Path, vocab_size: int) -> None:
    """A sentencepiece BPE model and the equivalent tokenizers/transformers tokenizer.json."""
    import sentencepiece as spm

    out = work / "tokenizer"
    out.mkdir(exist_ok=True)
    texts = [json.loads(line)["text"] for line in open(work / "pretrain.jsonl")][:40000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        user_defined_symbols=[*SPECIALS, "\n"], max_sentence_length=1 << 16, num_threads=1,
        minloglevel=2)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    save_hf_tokenizer(out / "tokenizer.model", out)
    print(f"tokenizer: {vocab_size} pieces → {out}")


def save_hf_tokenizer(model_file: Path, out: Path) -> None:
    """tokenizer.json (BPE with byte fallback, Metaspace) equivalent to the sentencepiece model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dmem_mlx.tiny import CHATML_TEMPLATE

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []  # every split of a piece into two pieces, ranked like sentencepiece merges
    for piece, pid in vocab.items():
        if sp.is_unknown(pid) or sp.is_byte(pid) or piece in (*SPECIALS, "\n"):
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                 split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<unk>", *SPECIALS]])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))
    # Loadable by older transformers too: a plain fast tokenizer, template in the config.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHATML_TEMPLATE,
               add_bos_token=False, add_eos_token=False)
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for text in ["<|im_start|>user\nHi! I am Ada.<|im_end|>\n", "Ünïcode 東京 😀  2  spaces"]:
        assert tok.encode(text).ids == sp.encode(text), "tokenizer.json differs from sentencepiece"


# -- backbone ---------------------------------------------------------------------------------
def stage_backbone(work: Path, seed: int, steps: int, batch_tokens: int, lr: float,
                   max_len: int, phase: str = "backbone") -> None:
    """Pretrain the Qwen3 backbone from scratch (fp32) on the rendered conversations.

    phase "copy" continues from WORK/backbone on the copy-heavy documents.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_tokenizer
    from tqdm import tqdm

    from mlx_lm.utils import _get_classes

    from dmem_mlx.utils import cast_floats

    tokenizer = load_tokenizer(work / "tokenizer")
    source = "pretrain_copy.jsonl" if phase == "copy" else "pretrain.jsonl"
    texts = [json.loads(line)["text"] for line in open(work / source)]
    docs = [ids[:max_len] for ids in tokenizer._tokenizer(texts)["input_ids"]]
    args = dict(BACKBONE, vocab_size=len(tokenizer.get_vocab()))
    args["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # mlx-lm's own initialisation (uniform Linear, N(0, 1/D) embeddings). A GPT-style
    # N(0, 0.02) init kept this backbone from ever learning to copy a name from its context
    # (measured: no copying after 1,200 steps; the default init copies after 200).
    mx.random.seed(seed)
    model_class, args_class = _get_classes(args)
    model = model_class(args_class.from_dict(args))
    if phase == "copy":
        model.load_weights(str(work / "backbone" / "model.safetensors"))
        cast_floats(model, mx.float32)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"backbone: {n_params / 1e6:.2f}M parameters, {len(docs)} documents, "
          f"{sum(map(len, docs)) / 1e6:.2f}M tokens")

    rng = np.random.default_rng(seed)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-6, lr, 50), optim.cosine_decay(lr, steps - 50, lr * 0.1)], [50])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x, y, mask):
        logits = model(x)
        ce = nn.losses.cross_entropy(logits, y) * mask
        return ce.sum() / mask.sum()

    step_fn = nn.value_and_grad(model, loss_fn)
    order = np.argsort([len(d) for d in docs])
    batches = _length_batches(order, docs, batch_tokens)
    bar = tqdm(range(steps), desc=phase, dynamic_ncols=True, mininterval=5)
    tokens, start, losses = 0, time.perf_counter(), []
    for step in bar:
        idx = batches[rng.integers(len(batches))]
        x, y, mask = _pad([docs[i] for i in idx])
        loss, grads = step_fn(model, x, y, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
        tokens += int(mask.sum().item())
        if step % 10 == 0 or step == steps - 1:
            tps = tokens / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", tok_s=f"{tps:.0f}")
    elapsed = time.perf_counter() - start
    out = work / ("backbone_copy" if phase == "copy" else "backbone")
    out.mkdir(exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(args, indent=2) + "\n")
    for f in (work / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    stats = {"steps": steps, "seconds": round(elapsed), "tokens": tokens,
             "tokens_per_sec": round(tokens / elapsed), "final_loss": float(np.mean(losses[-50:])),
             "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}
    (work / f"{phase}_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{phase}: {json.dumps(stats)}")


def _length_batches(order, docs, batch_tokens: int) -> list[list[int]]:
    batches, current, longest = [], [], 0
    for i in order:
        longest = max(longest, len(docs[i]))
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], len(docs[i])
        current.append(int(i))
    if current:
        batches.append(current)
    return batches


def _pad(seqs: list[list[int]]):
    import mlx.core as mx
    import numpy as np

    width = max(len(s) for s in seqs) - 1
    x = np.zeros((len(seqs), width), np.int32)
    y = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for row, s in enumerate(seqs):
        n = len(s) - 1
        x[row, :n], y[row, :n], mask[row, :n] = s[:-1], s[1:], 1.0
    return mx.array(x), mx.array(y), mx.array(mask)


# -- joint: the backbone learns to work with a memory ---------------------------------------------
def stage_joint(work: Path, seed: int, steps: int, batch_size: int, lr: float,
                batch_tokens: int) -> None:
    """Continue pretraining the backbone *with* a δ memory attached (everything trainable).

    A frozen from-scratch 3.7M backbone gives the δ read-out little to work with: through an 8×8
    state, a frozen model learns to recall 200 fact values very slowly. Here the backbone's
    layers above each memory learn to decode what the memory holds, while the LM loss on the
    pretraining documents (memory empty) keeps it a fluent model of the domain. The backbone is
    then frozen and saved as the base model; the δ weights become the adapter.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load as mlx_load
    from tqdm import tqdm

    from dmem_mlx.adapter import save_adapter
    from dmem_mlx.config import DeltaMemConfig
    from dmem_mlx.model import attach_delta_mem
    from dmem_mlx.train import base_projection_weights
    from dmem_mlx.training.data import ChatEncoder, iterate_batches, load_split
    from dmem_mlx.training.trainer import batch_loss
    from dmem_mlx.utils import cast_floats

    model, tokenizer = mlx_load(str(work / "backbone"))
    cast_floats(model, mx.float32)
    bases = {i: base_projection_weights(layer.self_attn) for i, layer in enumerate(model.layers)}
    dm = attach_delta_mem(model, DeltaMemConfig.from_dict(DELTA_CONFIG))
    for i, layer in dm.layers.items():
        layer.memory.initialize(bases[i], seed=seed * 1000 + i)
    model.unfreeze()
    encoder = ChatEncoder(tokenizer)
    n = steps * batch_size
    easy = load_split(work / "dmem_easy" / "train.jsonl", encoder, "history", 2048, limit=n)
    full = load_split(work / "dmem" / "train.jsonl", encoder, "history", 2048, limit=n)
    texts = [json.loads(line)["text"] for line in open(work / "pretrain.jsonl")]
    docs = [ids[:640] for ids in tokenizer._tokenizer(texts)["input_ids"]]
    lm_batches = _length_batches(np.argsort([len(d) for d in docs]), docs, batch_tokens)
    rng = np.random.default_rng(seed)
    streams = (iterate_batches(easy, batch_size, seed), iterate_batches(full, batch_size, seed))

    def loss_fn(model, hist, x, y, mask):
        memory_loss, _ = batch_loss(model, hist, "state")
        dm.reset()
        with dm.read_only():  # empty memory: the plain backbone
            ce = nn.losses.cross_entropy(model(x), y) * mask
        return memory_loss + ce.sum() / mask.sum(), memory_loss

    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-6, lr, 50), optim.cosine_decay(lr, steps - 50, lr * 0.1)], [50])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    step_fn = nn.value_and_grad(model, loss_fn)
    bar = tqdm(range(steps), desc="joint", dynamic_ncols=True, mininterval=5)
    start, memory_losses = time.perf_counter(), []
    for step in bar:
        hist = next(streams[0] if step < steps // 2 or rng.random() < 0.3 else streams[1])
        x, y, mask = _pad([docs[i] for i in lm_batches[rng.integers(len(lm_batches))]])
        (loss, memory_loss), grads = step_fn(model, hist, x, y, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        dm.reset()
        memory_losses.append(memory_loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", memory=f"{np.mean(memory_losses[-20:]):.3f}")
        if step % 100 == 0:
            print(json.dumps({"step": step, "memory_loss": float(np.mean(memory_losses[-50:]))}),
                  flush=True)
    out = work / "backbone_joint"
    out.mkdir(exist_ok=True)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if ".memory." in name:
            continue
        name = name.replace(".self_attn.attention.", ".self_attn.").replace("_proj.base.", "_proj.")
        weights[name] = value.astype(mx.float16)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    for f in (work / "backbone").iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    model_dir = work / "model_joint"
    shutil.copytree(out, model_dir, dirs_exist_ok=True)
    save_adapter(model, model_dir)
    stats = {"steps": steps, "seconds": round(time.perf_counter() - start),
             "final_memory_loss": float(np.mean(memory_losses[-50:])),
             "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}
    (work / "joint_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"joint: {json.dumps(stats)}")


# -- adapter + ship -----------------------------------------------------------------------------
def stage_adapter(work: Path, seed: int, iters: int, batch_size: int, lr: float) -> None:
    """Fine-tune the joint stage's δ weights on its frozen backbone with the history recipe
    (`python -m dmem_mlx.train`); with iters 0 the joint stage's adapter is kept as is."""
    import subprocess

    if iters <= 0:
        shutil.copytree(work / "model_joint", work / "model", dirs_exist_ok=True)
        return
    cmd = [sys.executable, "-m", "dmem_mlx.train", "--model", str(work / "backbone_joint"),
           "--data", str(work / "dmem"), "--adapter-path", str(work / "model"),
           "--init-from", str(work / "model_joint"), "--mode", "history", "--iters", str(iters),
           "--batch-size", str(batch_size), "--learning-rate", str(lr), "--warmup", "50",
           "--seed", str(seed), "--steps-per-eval", "250", "--val-batches", "5",
           "--steps-per-report", "50", "--save-every", "250", "--write-grad", "state"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def stage_ship(work: Path) -> None:
    src = work / "model"
    if SHIP_DIR.exists():
        shutil.rmtree(SHIP_DIR)
    SHIP_DIR.mkdir(parents=True)
    keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "chat_template.jinja", "special_tokens_map.json",
            "delta_mem_config.json", "delta_mem.safetensors")
    for name in keep:
        if (src / name).exists():
            shutil.copy(src / name, SHIP_DIR / name)
    size = sum(f.stat().st_size for f in SHIP_DIR.iterdir())
    print(f"ship: {size / 1e6:.1f} MB → {SHIP_DIR}")
    if size > 20e6:
        raise SystemExit(f"error: the demo is {size / 1e6:.1f} MB, over the 20 MB budget")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["data", "tokenizer", "backbone", "copy", "joint", "adapter",
                                     "ship", "all"])
    p.add_argument("--work-dir", default="/tmp/dmem-demo-build", help="scratch directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-episodes", type=int, default=14000)
    p.add_argument("--train-episodes", type=int, default=60000)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--backbone-steps", type=int, default=700)
    p.add_argument("--backbone-batch-tokens", type=int, default=4096)
    p.add_argument("--backbone-lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--copy-steps", type=int, default=600)
    p.add_argument("--copy-lr", type=float, default=1e-3)
    p.add_argument("--joint-steps", type=int, default=600)
    p.add_argument("--joint-lr", type=float, default=1e-3)
    p.add_argument("--adapter-iters", type=int, default=0,
                   help="frozen-backbone δ fine-tuning steps after the joint stage (0 = none)")
    p.add_argument("--adapter-batch-size", type=int, default=16)
    p.add_argument("--adapter-lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = ["data", "tokenizer", "backbone", "joint", "adapter", "ship"]
    stages = stages if args.stage == "all" else [args.stage]
    for stage in stages:
        start = time.perf_counter()
        if stage == "data":
            stage_data(work, args.seed, args.pretrain_episodes, args.train_episodes)
        elif stage == "tokenizer":
            stage_tokenizer(work, args.vocab_size)
        elif stage == "backbone":
            stage_backbone(work, args.seed, args.backbone_steps, args.backbone_batch_tokens,
                           args.backbone_lr, args.max_len)
        elif stage == "copy":
            stage_backbone(work, args.seed, args.copy_steps, args.backbone_batch_tokens,
                           args.copy_lr, args.max_len, phase="copy")
        elif stage == "joint":
            stage_joint(work, args.seed, args.joint_steps, args.adapter_batch_size,
                        args.joint_lr, args.backbone_batch_tokens // 2)
        elif stage == "adapter":
            stage_adapter(work, args.seed, args.adapter_iters, args.adapter_batch_size,
                          args.adapter_lr)
        else:
            stage_ship(work)
        print(f"[{stage}] {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
