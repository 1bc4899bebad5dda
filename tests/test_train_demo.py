"""The demo's domain, its tokenizer conversion, and the shipped demo model (never retrained)."""

import random
from pathlib import Path

import pytest

from dmem_mlx.demo import DEMO_DIR, persona
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def build_demo_module():
    return load_script("tools/build_demo.py")


def test_fact_values_are_disjoint_single_words():
    words = [v.lower() for values in persona.VALUES.values() for v in values]
    assert len(words) == len(set(words)) and all(w.isalpha() for w in words)
    minimum = {"name": 1000, "city": 300, "job": 150, "food": 100, "hobby": 80, "pet": 40,
               "pet_name": 300}
    assert all(len(persona.VALUES[slot]) >= n for slot, n in minimum.items())
    for user, assistant in persona.SMALL_TALK:  # small talk never names a fact value
        assert not any(persona.mentioned(user + " " + assistant, s) for s in persona.SLOTS)


def test_heldout_set_stays_apart_from_the_training_data():
    """benchmarks/heldout/recall.json: none of its phrasings is a training phrasing (v2's or the
    wide v3 ones the build generates: frames × fact names can form one by chance, the build
    withholds those), none of its out-of-list values a training value; its in-list values are
    training values."""
    import json

    build = build_demo_module()  # (withholds the held-out phrasings from the wide ones)
    heldout = json.loads(build.HELDOUT.read_text())

    tables = (persona.TELL, persona.QUESTIONS, persona.WIDE_QUESTIONS, persona.TELL_MORE,
              persona.TELL_TOGETHER)
    training = {persona.phrasing_key(t) for table in tables for ts in table.values() for t in ts}
    training |= {persona.phrasing_key(t) for pair in persona.SMALL_TALK for t in pair}
    held = build.heldout_phrasings()
    assert len(held) > 60 and not training & {persona.phrasing_key(t) for t in held}
    assert sum(len(ts) for ts in persona.WIDE_QUESTIONS.values()) > 1000  # (withheld: a few)
    known = {v.lower() for values in persona.VALUES.values() for v in values}
    assert not known & {v.lower() for vs in heldout["out_of_list"].values() for v in vs}
    assert all(v in persona.VALUES[slot] for slot, vs in heldout["in_list"].items() for v in vs)


def test_casual_typing_keeps_the_values():
    rng = random.Random(5)
    for _ in range(100):
        ep = persona.episode(rng, casual_rate=1.0, not_told_rate=0.5)
        told = " ".join(m["content"] for c in ep["history"] for m in c if m["role"] == "user")
        assert told == told.lower()
        assert all(ep["facts"][s].lower() in told for s in ep["told"])
        if ep["slot"].startswith("not_told:"):
            assert "haven't told me" in ep["messages"][-1]["content"]


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
        told = " ".join(m["content"] for conv in ep["history"] for m in conv
                        if m["role"] == "user").lower()  # (a value may start a sentence)
        if ep["slot"] in persona.SLOTS:
            value = ep["facts"][ep["slot"]]
            assert persona.exact_match(ep["messages"][-1]["content"], ep["slot"], value)
            assert value.lower() in told  # the answer was told in an earlier conversation
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


def test_backbone_stage_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A two-phase backbone run stopped inside its second phase and resumed ends with the same
    weights as one run straight through (same data order, schedules and optimizer state)."""
    import json
    import shutil

    import mlx.core as mx
    import numpy as np

    build = build_demo_module()
    monkeypatch.setattr(build, "BACKBONE", dict(build.BACKBONE, hidden_size=32,
                                                 num_hidden_layers=1, intermediate_size=64,
                                                 num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16))
    phases = [("first.jsonl", 0, False, 4, 1e-2, 1), ("second.jsonl", 100, True, 3, 5e-3, 1)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for name, offset, wide, *_ in phases:
        rng = random.Random(offset)
        docs = [json.dumps({"text": build.pretrain_document(rng, wide)}) for _ in range(150)]
        for work in (straight, resumed):
            work.mkdir(exist_ok=True)
            (work / name).write_text("\n".join(docs) + "\n")
    (straight / "pretrain.jsonl").write_text((straight / "first.jsonl").read_text())
    build.stage_tokenizer(straight, 600)
    shutil.copytree(straight / "tokenizer", resumed / "tokenizer")
    run = dict(seed=0, phases=phases, batch_tokens=1024, max_len=256, save_every=2)
    build.stage_backbone(straight, **run, resume=False)
    build.stage_backbone(resumed, **run, resume=False, stop_at=5)
    assert not (resumed / "backbone_stats.json").exists()
    assert json.loads((resumed / "backbone_ckpt" / "state.json").read_text())["steps"] == 5
    build.stage_backbone(resumed, **run, resume=True)
    a = mx.load(str(straight / "backbone" / "model.safetensors"))
    b = mx.load(str(resumed / "backbone" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k].astype(mx.float32)),
                                   np.array(b[k].astype(mx.float32)), atol=1e-3)
    stats = json.loads((resumed / "backbone_stats.json").read_text())
    assert stats["steps"] == 7 and [s["from"] for s in stats["sessions"]] == [0, 5]


def test_adapter_stages_skip_finished_and_resume_unfinished(tmp_path, monkeypatch):
    """`build_demo.py adapter`: each δ stage continues the previous one; run again, a finished
    stage is skipped and an interrupted one continues from its checkpoint (train --resume)."""
    import json
    import subprocess

    from dmem_mlx.tiny import make_tiny_backbone

    build = build_demo_module()
    make_tiny_backbone(tmp_path / "backbone")
    steps = sum(phase[3] for phase in build.BACKBONE_PHASES)
    (tmp_path / "backbone_stats.json").write_text(json.dumps({"steps": steps - 1}))
    with pytest.raises(SystemExit, match="backbone is not finished"):
        build.stage_adapter(tmp_path, seed=0, resume=True)
    (tmp_path / "backbone_stats.json").write_text(json.dumps({"steps": steps}))
    rng = random.Random(0)
    (tmp_path / "d1").mkdir()
    for split in ("train", "valid"):
        rows = [persona.episode(rng, num_groups=1, num_conversations=1, summary_rate=0,
                                small_talk_rate=0) for _ in range(8)]
        (tmp_path / "d1" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"history": r["history"], "messages": r["messages"]}) + "\n"
                    for r in rows))
    monkeypatch.setattr(build, "CURRICULUM_TRAIN", [("d1", "history", 2, 4, 1e-3, "full", 0),
                                                    ("d1", "history", 4, 4, 1e-3, "state", 0)])
    commands, evaluated = [], []
    real_run = subprocess.run
    monkeypatch.setattr(build.subprocess, "run",
                        lambda cmd, **kw: commands.append(cmd) or real_run(cmd, **kw))
    monkeypatch.setattr(build, "run_eval", lambda model_dir, *a, **kw: evaluated.append(model_dir))
    build.stage_adapter(tmp_path, seed=0, resume=False)
    first, last = build.stage_dir(tmp_path, 0), build.stage_dir(tmp_path, 1)
    assert last == tmp_path / "model" and evaluated == [first, last]
    assert "--init-from" in commands[1] and str(first) in commands[1]
    state = last / "trainer_state.json"
    assert json.loads(state.read_text())["step"] == 4
    state.write_text(json.dumps({"step": 2}) + "\n")  # as if stopped after a checkpoint at 2
    commands.clear()
    with pytest.raises(SystemExit):  # an unfinished stage is never overwritten silently
        build.stage_adapter(tmp_path, seed=0, resume=False)
    build.stage_adapter(tmp_path, seed=0, resume=True)
    assert len(commands) == 1 and "--resume" in commands[0] and str(last) in commands[0]
    assert json.loads(state.read_text())["step"] == 4


shipped = pytest.mark.skipif(not (DEMO_DIR / "delta_mem.safetensors").is_file(),
                             reason="the demo model is not shipped in this tree")


@shipped
def test_demo_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dmem_mlx.demo import load_demo

    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size <= 30e6
    model, tokenizer = load_demo()
    assert model.delta_mem.config.rank == 8
    assert tokenizer.eos_token == "<|im_end|>"


@shipped
def test_demo_recalls_from_memory_only():
    """Facts told in one conversation, asked in fresh ones: only δ memory holds them.

    Held-out people (values from the evaluation's in-list set, in the first phrasing of each
    kind, which every demo so far was trained on), greedy replies: recall with the memory must
    be far above the reset model's (which is at chance)."""
    import json

    from dmem_mlx.demo import load_demo
    from dmem_mlx.runtime import ChatSession

    values = json.loads((ROOT / "benchmarks" / "heldout" / "recall.json").read_text())["in_list"]
    model, tokenizer = load_demo()
    rng = random.Random(20261203)
    hits = {"memory": 0, "reset": 0}
    asked = 0
    for _ in range(20):
        person = persona.Person({slot: rng.choice(vs) for slot, vs in values.items()})
        groups = rng.sample(persona.GROUPS, rng.randint(1, 2))
        told = [{"role": "user", "content": person.fill(persona.TELL[g[0]][0])} for g in groups]
        conversation = [m for t in told for m in (t, {"role": "assistant", "content": "Got it, "
                                                        "I will remember that."})]
        questions = [(slot, persona.QUESTIONS[slot][0]) for g in groups for slot in g]
        asked += len(questions)
        for condition in hits:
            session = ChatSession(model, tokenizer)
            if condition == "memory":
                session.feed(conversation)
            for slot, question in questions:
                session.new_conversation()
                session.read_only = True
                reply = "".join(c.text for c in session.reply(question, max_tokens=16))
                hits[condition] += persona.exact_match(reply, slot, person.facts[slot])
    assert hits["memory"] >= 0.5 * asked and hits["memory"] >= hits["reset"] + 0.4 * asked, \
        (hits, asked)


def test_build_script_describes_the_shipped_adapter():
    """The curriculum in tools/build_demo.py ends in the δ shape that is shipped (the v1 demo,
    built at commit 6133bc1, has the same state shape as the v2 build), within the budget."""
    from dmem_mlx.config import DeltaMemConfig

    build = build_demo_module()
    data_dirs = {row[0] for row in build.CURRICULUM_DATA}
    assert all(stage[0] in data_dirs for stage in build.CURRICULUM_TRAIN)
    assert build.CURRICULUM_TRAIN[0][-1] == 0  # the first stage starts from DELTA_CONFIG
    shipped = DeltaMemConfig.load(DEMO_DIR)
    heads = build.DELTA_CONFIG["num_state_heads"] + sum(s[-1] for s in build.CURRICULUM_TRAIN)
    assert shipped.num_state_heads == heads
    assert shipped.rank == build.DELTA_CONFIG["rank"]
    assert build.SHIP_BUDGET_MB <= 30
    assert build.CURRICULUM_DATA[-1][0] == build.CURRICULUM_TRAIN[-1][0]


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
