"""The demo's domain, its tokenizer conversion, and the shipped demo model (never retrained)."""

import importlib.util
import random
from pathlib import Path

import pytest

from dmem_mlx.demo import DEMO_DIR, persona

ROOT = Path(__file__).resolve().parents[1]


def build_demo_module():
    spec = importlib.util.spec_from_file_location("build_demo", ROOT / "tools" / "build_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fact_values_are_disjoint_single_words():
    words = [v.lower() for values in persona.VALUES.values() for v in values]
    assert len(words) == len(set(words)) and all(w.isalpha() for w in words)
    for user, assistant in persona.SMALL_TALK:  # small talk never names a fact value
        assert not any(persona.mentioned(user + " " + assistant, s) for s in persona.SLOTS)


def test_exact_match_needs_the_value_and_only_it():
    assert persona.exact_match("Your name is Ada.", "name", "Ada")
    assert not persona.exact_match("Your name is Adam.", "name", "Ada")
    assert not persona.exact_match("Your name is Ada or Omar.", "name", "Ada")
    assert not persona.exact_match("I don't know.", "name", "Ada")
    assert persona.exact_match("You work as an engineer.", "job", "engineer")


def test_episodes_ask_about_told_facts():
    rng = random.Random(3)
    for _ in range(200):
        ep = persona.episode(rng)
        told = " ".join(m["content"] for conv in ep["history"] for m in conv if m["role"] == "user")
        if ep["slot"] in persona.SLOTS:
            value = ep["facts"][ep["slot"]]
            assert persona.exact_match(ep["messages"][-1]["content"], ep["slot"], value)
            assert value in told  # the answer was told in an earlier conversation
        assert ep["messages"][-1]["role"] == "assistant"


def test_tokenizer_json_matches_sentencepiece(tmp_path):
    import sentencepiece as spm
    from mlx_lm.utils import load_tokenizer

    build = build_demo_module()
    rng = random.Random(0)
    texts = [build.render(c) for _ in range(300) for e in [persona.episode(rng)]
             for c in e["history"] + [e["messages"]]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "tokenizer"), model_type="bpe",
        vocab_size=600, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, unk_id=0, bos_id=-1, eos_id=-1,
        pad_id=-1, user_defined_symbols=[*build.SPECIALS, "\n"], character_coverage=1.0,
        minloglevel=2, num_threads=1)
    build.save_hf_tokenizer(tmp_path / "tokenizer.model", tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    samples = texts[:50] + ["Ünïcode 東京 😀  two  spaces\n\n", " lead", "tail ", "a\tb"]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi! I am Ada."}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi! I am Ada.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


shipped = pytest.mark.skipif(not (DEMO_DIR / "delta_mem.safetensors").is_file(),
                             reason="the demo model is not shipped in this tree")


@shipped
def test_demo_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dmem_mlx.demo import load_demo

    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size <= 20e6
    model, tokenizer = load_demo()
    assert model.delta_mem.config.rank == 8
    assert tokenizer.eos_token == "<|im_end|>"


@shipped
def test_demo_recalls_from_memory_only():
    """Facts told in one conversation, asked in fresh ones: only δ memory holds them.

    Held-out people (a seed the demo never trained on), greedy replies: recall with the memory
    must be far above the reset model's (which is at chance)."""
    from dmem_mlx.demo import load_demo
    from dmem_mlx.runtime import ChatSession

    model, tokenizer = load_demo()
    rng = random.Random(20261203)
    hits = {"memory": 0, "reset": 0}
    asked = 0
    for _ in range(20):
        person = persona.random_person(rng)
        conversations = persona.telling_conversations(rng, person, rng.randint(1, 2), 1,
                                                      updates=False)
        questions = [(slot, rng.choice(persona.QUESTIONS[slot])) for slot in person.told]
        asked += len(questions)
        for condition in hits:
            session = ChatSession(model, tokenizer)
            if condition == "memory":
                session.feed(conversations[0])
            for slot, question in questions:
                session.new_conversation()
                session.read_only = True
                reply = "".join(c.text for c in session.reply(question, max_tokens=16))
                hits[condition] += persona.exact_match(reply, slot, person.facts[slot])
    assert hits["memory"] >= 0.5 * asked and hits["memory"] >= hits["reset"] + 0.4 * asked, \
        (hits, asked)


def test_build_script_describes_the_shipped_adapter():
    """The curriculum in tools/build_demo.py ends in the adapter shape that is shipped."""
    from dmem_mlx.config import DeltaMemConfig

    build = build_demo_module()
    data_dirs = {row[0] for row in build.CURRICULUM_DATA}
    assert all(stage[0] in data_dirs for stage in build.CURRICULUM_TRAIN)
    assert build.CURRICULUM_TRAIN[0][-1] == 0  # the first stage starts from DELTA_CONFIG
    shipped = DeltaMemConfig.load(DEMO_DIR)
    heads = build.DELTA_CONFIG["num_state_heads"] + sum(s[-1] for s in build.CURRICULUM_TRAIN)
    assert shipped.num_state_heads == heads
    assert shipped.rank == build.DELTA_CONFIG["rank"]


def test_recall_eval_restarts_and_reports(tmp_path):
    """benchmarks/recall_eval.py end to end on a small plan: memory files written in a live
    chat, a second process answers from them, and the JSON line carries every measure."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recall_eval.py"), "--people-per-size", "1",
         "--sizes", "1,4", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["people"] == 6 and len(list(tmp_path.glob("person?.mem"))) == 6
    natural = summary["delta_natural"]["of"]  # one question per fact told: 1–2 and 4–5 facts
    assert 5 <= natural <= 7 and summary["no_memory"]["of"] == natural
    assert summary["in_context"]["of"] == natural
    assert summary["not_told"]["of"] == 8  # two never-told questions per natural/casual person
    assert summary["delta_out_of_list"]["of"] >= 5 and summary["delta_casual"]["of"] >= 5
    assert set(summary["by_slot"]) == set(persona.SLOTS) and summary["acks_right"]["of"] > 0
    assert sum(c["of"] for c in summary["by_told_after"].values()) == natural
    assert "δ only, values outside the lists" in out.stdout
