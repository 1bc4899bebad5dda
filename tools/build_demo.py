"""Regenerate the shipped demo model (dmem_mlx/demo/model) from scratch, with a fixed seed.

What the demo is: a small *domain* model, not a general assistant. A ~3.7M-parameter Qwen3-
architecture backbone is trained from scratch on a synthetic chat domain (dmem_mlx/demo/
persona.py: people tell the assistant their name, city, job, pet, travel plans, favourite food
and hobby over several conversations, with small talk between, and ask about them later).
The backbone is then frozen and a δ-mem adapter (8×8 state heads, token writes, the pure delta
rule) is trained on it by `python -m dmem_mlx.train` with the paper's history recipe: earlier
conversations are written into the δ state, the question turn is read in a fresh context with
writes off, the loss is on the answer. A curriculum (CURRICULUM_DATA / CURRICULUM_TRAIN) goes
from one fact in one conversation to seven over four, with four state heads per layer; the
c4 stages widen the state to eight heads, the next four stages teach food back, the next
seven ask more often about facts told long ago, and the last two make the assistant's
acknowledgements in the histories unreliable, as the model's own are in a live chat.

Stages (each can be run alone; `all` runs them in order):
    data       synthetic chats → WORK/pretrain.jsonl, WORK/{c1..c9,food}/{train,valid}.jsonl
    tokenizer  sentencepiece BPE trained on them → a tokenizer.json mlx-lm/transformers load
    backbone   the Qwen3 backbone trained from scratch with MLX → WORK/backbone
    adapter    the δ adapter on the frozen backbone (python -m dmem_mlx.train) → WORK/model
    ship       copy WORK/model into dmem_mlx/demo/model (fp16 backbone, fp32 adapter)

Run with OpenBLAS for speed:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python tools/build_demo.py all --work-dir /tmp/demo-build

Findings while building (2-core x86 CPU, fp32 + OpenBLAS): a frozen-backbone δ read-out learns
one fact kind quickly (a name told in one message: 100 % recall after 50 steps) but needs to
see each of the ~230 fact values many times, so the curriculum starts with single facts and
batches of 32; with all eight facts over four conversations it keeps improving slowly. With
four heads per layer the write gates saturate (0 or 1 per token and head) and the slots share
heads: food values were written by a single head, almost identically, and recall of food, names,
pets and cities stalled while more steps did not move them. Widening to eight heads (new heads
start silent, with open gradients) and asking more often about those slots unstuck names and
cities, but food stayed at chance (3 %) through 800 more steps at eight heads, and through 200
more asking about food ten times as often as about most slots (at eight heads, or widened to
twelve).
Trained on food alone (one fact told, the food question) the same adapter learns it in 60 steps
(100 % on validation) and forgets the rest. Mixed back in, food stays (89 %) and the others
recover (names least: 42 %; a short stage weighted toward names and jobs then gives names
60 %, food 69 %). The answers "Your name is …", "Your hobby is …" and "Your favorite food
is …" end in the same token, and the first layer's query sees only that token:
our first explanation of why those slots competed. The age of a fact turned out to matter more.
Recall fell with the age of a fact (benchmarks/recall_eval.py reports it by the number of
facts told after it): on 60 development people, 97 % for the newest fact, 77–81 % with one to
three told after it, 62–70 % with four or more. The name, always told first, is the oldest fact
whenever it is told. c8 draws its questions with weight 1 + k for a fact with k told after it
(pets ×3, food ×2 on top). Seven 100-step stages of it took recall with the history only in
δ memory (the README's (a)) from 77 % to 96 % (names 60 → 94 %, food 69 → 100 %, pets
61 → 95 %); on the development people every stage did better than the one before (82.9,
83.6, 87.4, 87.7, 90.3, 91.4, 91.8 %), by less and less.
Told in a live chat instead (the model's own acknowledgements written, as dmem-chat does),
recall was only 75 % on the development people, names 8 of 29: the small backbone greets
"Lena" as "Felix", and the memory took the later, wrong name. Two stages of c9, where half of
the acknowledgements in the histories name someone else's fact, took it to 84 % (names 13 of
29, food 14 → 24 of 31) while recall from the data set's histories held (92.2 %). On the
held-out people of the recall evaluation that is live 77 → 82 % for (a) 96 → 92 % (jobs
94 → 68 %): shipped, as the live chat is what users see.
This backbone does not copy facts from its own context (in-context recall stays low), which
the recall evaluation's condition (c) shows.

Figures for the shipped demo (2-core x86 CPU, fp32 + OpenBLAS, cores shared with evaluation
runs; tokens/s count every token of the written histories and read turns):
    data + tokenizer                  ~10 s
    backbone, 700 steps               17.5 min, 2.76 M tokens, 2,636 tokens/s, peak 0.87 GB
    δ c1 history, 400 steps           6.4 min, 2,494 tokens/s, peak 1.7 GB
    δ c2 history, 250 steps           7.0 min, 2,099 tokens/s, peak 2.6 GB
    δ c3 history, 250 steps           15 min, ~1,600 tokens/s, peak 5.7 GB (stopped at step
                                      250 of a 600-step schedule; here a 250-step schedule)
    δ c3 token, 200 steps             9.3 min, 1,123 tokens/s, peak 3.8 GB
    δ c3 history, 600 steps           37 min, 1,602 tokens/s, peak 5.5 GB
    δ c4 history, 400 steps, 8 heads  41 min, 949 tokens/s, peak 11.5 GB
    δ c4 history, 400 steps           43 min, 936 tokens/s, peak 11.3 GB
    δ food history, 60 steps          0.6 min, ~2,100 tokens/s, peak 1.1 GB
    δ c5 history, 100 steps           11 min, ~880 tokens/s, peak 10.5 GB
    δ c6 history, 300 steps           39 min, ~760 tokens/s, peak 10.7 GB
    δ c7 history, 100 steps           11 min, 943 tokens/s, peak 10.0 GB
    δ c8 history, 7 × 100 steps       75 min (9–13 min each), 740–1,140 tokens/s, peak 11.4 GB
    δ c9 history, 2 × 100 steps       25 min (11–14 min each), 750–880 tokens/s, peak 10.8 GB
    in all                            ~5.6 h (δ stages ~320 min)
Recall of the shipped demo: see README.md ("The demo model"); benchmarks/recall_eval.py
measures it.
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
# Four 8×8 state heads per layer to start (the paper's MSW shape; the c4 stages widen it to
# eight) and the pure delta rule (no decay, so a fact told 300 tokens ago is still there); the
# read-out corrects the attention output only.
DELTA_CONFIG = {"rank": 8, "alpha": 16.0, "delta_heads": ["o"], "num_state_heads": 4,
                "state_update_mode": "no_lambda", "beta_bias_init": -2.0,
                "output_init": "random", "online_gain": 0.05}
# (directory, seed offset, train episodes, max fact groups, max conversations, share of
#  "what do you know about me?" questions, share of small-talk final turns, further
#  persona.episode options: question weights by slot, only these slots told, ...). c4 asks
#  more often about the slots the c3 stages left weakest (food, name, pet, city): on all seven
#  groups the read-out had traded them for the others. "food" tells only the food; c5 to c9:
#  see CURRICULUM_TRAIN.
SLOW_SLOTS = {"food": 4.0, "name": 3.0, "pet": 3.0, "city": 3.0}
FOOD_PET_SLOTS = {"food": 10.0, "pet": 6.0, "name": 2.0, "city": 2.0}
SHARED_QUERY_SLOTS = {"food": 3.0, "name": 3.0, "hobby": 3.0, "pet": 3.0, "city": 2.0}
NAME_JOB_SLOTS = {"name": 6.0, "job": 3.0, "food": 2.0, "pet": 2.0}
PET_FOOD_SLOTS = {"pet": 3.0, "food": 2.0}
CURRICULUM_DATA = [("c1", 21, 6000, 1, 1, 0.0, 0.0, {}),
                   ("c2", 22, 8000, 3, 2, 0.3, 0.03, {}),
                   ("c3", 23, 16000, 7, 4, 0.4, 0.05, {}),
                   ("c4", 24, 16000, 7, 4, 0.3, 0.05, {"slot_weights": SLOW_SLOTS}),
                   ("food", 26, 3000, 1, 1, 0.0, 0.0, {"only": ("food",)}),
                   ("c5", 25, 16000, 7, 4, 0.2, 0.05, {"slot_weights": FOOD_PET_SLOTS}),
                   ("c6", 27, 16000, 7, 4, 0.2, 0.05, {"slot_weights": SHARED_QUERY_SLOTS}),
                   ("c7", 28, 8000, 7, 4, 0.2, 0.05, {"slot_weights": NAME_JOB_SLOTS}),
                   ("c8", 30, 8000, 7, 4, 0.2, 0.05, {"slot_weights": PET_FOOD_SLOTS,
                                                      "older_first": 1.0}),
                   ("c9", 31, 8000, 7, 4, 0.2, 0.05, {"slot_weights": PET_FOOD_SLOTS,
                                                      "older_first": 1.0, "wrong_acks": 0.5})]
# (data, --mode, steps, batch size, learning rate, --write-grad, --add-state-heads); each stage
# continues the previous one. The token stage trains the chat regime itself (every assistant
# message, writes on): without it, a memory full of facts made the model answer "Your name is …"
# to "Hello, my name is Lena." — acknowledgements and small talk were never trained. The c4
# stages widen the state from four heads to eight (the new ones start silent: the same model,
# more room) and train on questions weighted toward the slots the four heads had dropped. Food
# never came back that way: the food stage learns it alone (and forgets the rest), c5 keeps it
# while the others return, c6 balances the slots whose answers share the query token " is",
# c7 (gentler) brings names and jobs back up. Recall then fell with the number of facts told
# after a fact (the name, always told first, most of all): c8 asks more often about older facts,
# and seven short stages of it at 1e-3 kept improving every slot. In a live chat the model
# writes its own acknowledgements, often naming the wrong value ("Great to meet you, Felix."),
# and the memory believed them: c9 makes half of the acknowledgements wrong.
CURRICULUM_TRAIN = [("c1", "history", 400, 32, 3e-3, "full", 0),
                    ("c2", "history", 250, 32, 3e-3, "state", 0),
                    ("c3", "history", 250, 32, 3e-3, "state", 0),
                    ("c3", "token", 200, 16, 2e-3, "full", 0),
                    ("c3", "history", 600, 32, 2e-3, "state", 0),
                    ("c4", "history", 400, 32, 2e-3, "state", 4),
                    ("c4", "history", 400, 32, 2e-3, "state", 0),
                    ("food", "history", 60, 16, 2e-3, "state", 0),
                    ("c5", "history", 100, 32, 2e-3, "state", 0),
                    ("c6", "history", 300, 32, 2e-3, "state", 0),
                    ("c7", "history", 100, 32, 1e-3, "state", 0),
                    *[("c8", "history", 100, 32, 1e-3, "state", 0)] * 7,
                    *[("c9", "history", 100, 32, 1e-3, "state", 0)] * 2]


def render(messages: list[dict]) -> str:
    """ChatML, exactly as the shipped chat template renders it."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# -- data -------------------------------------------------------------------------------------
def stage_data(work: Path, seed: int, pretrain_episodes: int) -> None:
    """Backbone documents and δ-training episodes, from disjoint random streams."""
    # Backbone documents. Most hold a whole episode in one context with one to three questions
    # at the end: the backbone must learn to copy a fact from its context (the in-context upper
    # bound of the recall evaluation, and "Nice to meet you, Lena!"). The rest are single
    # conversations, where a question about an earlier one can only be guessed: the behaviour
    # with an empty memory.
    rng = random.Random(seed)
    with open(work / "pretrain.jsonl", "w") as f:
        for _ in range(pretrain_episodes):
            ep = persona.episode(rng)
            conversations = ep["history"] + [ep["messages"]]
            if rng.random() < 0.3:
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
    # δ data, a curriculum (CURRICULUM_DATA): one fact group in one conversation first (the read-out
    # learns a code for each of the ~230 fact values), then longer and longer histories. Many
    # final turns ask "What do you know about me?": one read pass, a target for every fact.
    for name, offset, n, groups, conversations, summary, small_talk, options in CURRICULUM_DATA:
        (work / name).mkdir(exist_ok=True)
        rng = random.Random(seed + offset)
        for split, count in (("train", n), ("valid", 96)):
            with open(work / name / f"{split}.jsonl", "w") as f:
                for _ in range(count):
                    ep = persona.episode(rng, num_groups=rng.randint(1, groups),
                                         num_conversations=rng.randint(1, conversations),
                                         summary_rate=summary if split == "train" else 0.0,
                                         small_talk_rate=small_talk if split == "train" else 0.0,
                                         **options)
                    f.write(json.dumps({"history": ep["history"], "messages": ep["messages"]})
                            + "\n")
    print(f"data: {pretrain_episodes} pretraining documents, δ curriculum "
          f"{[row[0] for row in CURRICULUM_DATA]} → {work}")


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
                   max_len: int) -> None:
    """Pretrain the Qwen3 backbone from scratch (fp32) on the rendered conversations."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, load_tokenizer
    from tqdm import tqdm

    tokenizer = load_tokenizer(work / "tokenizer")
    texts = [json.loads(line)["text"] for line in open(work / "pretrain.jsonl")]
    docs = [ids[:max_len] for ids in tokenizer._tokenizer(texts)["input_ids"]]
    args = dict(BACKBONE, vocab_size=len(tokenizer.get_vocab()))
    args["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # mlx-lm's own initialisation (uniform Linear, N(0, 1/D) embeddings). A GPT-style
    # N(0, 0.02) init kept this backbone from ever learning to copy a name from its context
    # (measured: no copying after 1,200 steps; the default init copies after 200).
    mx.random.seed(seed)
    model_class, args_class = _get_classes(args)
    model = model_class(args_class.from_dict(args))
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
    bar = tqdm(range(steps), desc="backbone", dynamic_ncols=True, mininterval=5)
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
    out = work / "backbone"
    out.mkdir(exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(args, indent=2) + "\n")
    for f in (work / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    stats = {"steps": steps, "seconds": round(elapsed), "tokens": tokens,
             "tokens_per_sec": round(tokens / elapsed), "final_loss": float(np.mean(losses[-50:])),
             "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}
    (work / "backbone_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"backbone: {json.dumps(stats)}")


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


# -- adapter + ship -----------------------------------------------------------------------------
def stage_adapter(work: Path, seed: int) -> None:
    """The δ adapter, trained on the frozen backbone by `python -m dmem_mlx.train` with the
    history recipe, stage by stage (CURRICULUM_TRAIN), each continuing from the previous one."""
    import subprocess

    previous = None
    for i, (data, mode, steps, batch_size, lr, write_grad, add_heads) in enumerate(
            CURRICULUM_TRAIN):
        out = work / ("model" if i == len(CURRICULUM_TRAIN) - 1 else f"adapter_{i + 1}_{data}")
        cmd = [sys.executable, "-m", "dmem_mlx.train", "--model", str(work / "backbone"),
               "--data", str(work / data), "--adapter-path", str(out), "--mode", mode,
               "--iters", str(steps), "--batch-size", str(batch_size), "--learning-rate", str(lr),
               "--warmup", "10", "--write-grad", write_grad, "--seed", str(seed + i),
               "--steps-per-eval", "100", "--val-batches", "3", "--steps-per-report", "50",
               "--save-every", "100"]
        cmd += ["--init-from", str(previous)] if previous else [
            "--delta-config", json.dumps(DELTA_CONFIG)]
        cmd += ["--add-state-heads", str(add_heads)] if add_heads else []
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        previous = out


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
    p.add_argument("stage", choices=["data", "tokenizer", "backbone", "adapter", "ship", "all"])
    p.add_argument("--work-dir", default="/tmp/dmem-demo-build", help="scratch directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-episodes", type=int, default=14000)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--backbone-steps", type=int, default=700)
    p.add_argument("--backbone-batch-tokens", type=int, default=4096)
    p.add_argument("--backbone-lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=640)
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = ["data", "tokenizer", "backbone", "adapter", "ship"]
    stages = stages if args.stage == "all" else [args.stage]
    for stage in stages:
        start = time.perf_counter()
        if stage == "data":
            stage_data(work, args.seed, args.pretrain_episodes)
        elif stage == "tokenizer":
            stage_tokenizer(work, args.vocab_size)
        elif stage == "backbone":
            stage_backbone(work, args.seed, args.backbone_steps, args.backbone_batch_tokens,
                           args.backbone_lr, args.max_len)
        elif stage == "adapter":
            stage_adapter(work, args.seed)
        else:
            stage_ship(work)
        print(f"[{stage}] {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
