"""Recall of facts told in earlier conversations: δ memory alone, across a process restart.

Held-out people (drawn with a seed the demo never trained on) tell the assistant 1–7 groups
of facts (name, city, job, pet + pet name, trip, food, hobby) over 1–4 conversations. Each
person's memory is written through the chat runtime (`ChatSession.feed`, a new conversation
each time) and saved to a memory file. Then a *new process* loads the model, opens each memory
file and asks about every fact, each question in a fresh conversation, with nothing of the
history in the context. Exact match: the reply names the right value of the slot and no other.

Conditions:
  (a)  history only in δ memory, loaded from the file; questions as incognito turns
       (read-only, as the adapter was trained: the memory file is not modified)
  (a+) the same, with writes on and the questions asked one after the other (a normal chat:
       each question and answer is written into the memory before the next one)
  (b)  memory reset: no history anywhere — the chance level of the model's guesses
  (c)  history in the context (all earlier conversations + the question in one KV context),
       δ memory empty: what the backbone alone does with the history in front of it
  (c+) history in the context and written into δ memory as it is read (the runtime's normal
       behaviour within one long conversation)
  (live) as (a), but the facts were told in a live chat: the model wrote its own replies
       (not the data set's acknowledgements) into the memory, as `dmem-chat` does

Prints a table and one JSON line.  Example:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/recall_eval.py --people-per-size 10
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmem_mlx.demo import persona  # noqa: E402

EVAL_SEED = 20260501  # the demo trained on seed 0 (backbone documents) and 21–30 (δ data)


def make_plan(people_per_size: int, seed: int, sizes: list[int]) -> list[dict]:
    """People, the conversations that tell their facts, and one question per told fact."""
    rng = random.Random(seed)
    plan = []
    for size in sizes:
        for _ in range(people_per_size):
            person = persona.random_person(rng)
            conversations = persona.telling_conversations(
                rng, person, size, rng.randint(1, 4), updates=False)
            told = person.told  # in telling order
            questions = [{"slot": slot, "question": rng.choice(persona.QUESTIONS[slot]),
                          "expected": person.facts[slot], "told_after": len(told) - 1 - i}
                         for i, slot in enumerate(told)]
            plan.append({"groups": size, "facts": len(person.told), "conversations": conversations,
                         "questions": questions})
    return plan


def load_model(model_path: str):
    from dmem_mlx import load

    return load(model_path)


def ask(session, question: str, max_tokens: int) -> str:
    session.new_conversation()
    return "".join(chunk.text for chunk in session.reply(question, max_tokens=max_tokens))


def write_memories(model_path: str, plan: list[dict], work: Path, live: bool,
                   max_tokens: int) -> float:
    """Phase 1: every person's conversations written through the runtime into a memory file
    (and, for the live condition, told to the model, whose own replies are written too)."""
    from dmem_mlx.runtime import ChatSession, MemoryFile

    model, tokenizer = load_model(model_path)
    start = time.perf_counter()
    for i, person in enumerate(plan):
        with MemoryFile.open(work / f"person{i}.mem") as memory:
            session = ChatSession(model, tokenizer, memory=memory)
            for conversation in person["conversations"]:
                session.new_conversation()
                session.feed(conversation)
            session.close()
        if not live:
            continue
        with MemoryFile.open(work / f"person{i}.live.mem") as memory:
            session = ChatSession(model, tokenizer, memory=memory)
            for conversation in person["conversations"]:
                session.new_conversation()
                for message in conversation:
                    if message["role"] == "user":
                        for _ in session.reply(message["content"], max_tokens=max_tokens):
                            pass
            session.close()
    return time.perf_counter() - start


def ask_all(model_path: str, plan: list[dict], work: Path, max_tokens: int,
            conditions: list[str]) -> dict:
    """Phase 2 (a fresh process): the questions under every condition."""
    from dmem_mlx.runtime import ChatSession, MemoryFile

    model, tokenizer = load_model(model_path)
    results: dict[str, list] = {c: [] for c in conditions}
    examples: list[dict] = []
    for i, person in enumerate(plan):
        path = work / f"person{i}.mem"
        questions = [q["question"] for q in person["questions"]]
        for cond, file in (("a", path), ("live", work / f"person{i}.live.mem")):
            if cond not in conditions:
                continue
            with MemoryFile.open(file, read_only=True) as memory:  # the file is never changed
                session = ChatSession(model, tokenizer, memory=memory)
                replies = [ask(session, q, max_tokens) for q in questions]
                session.close()
            results[cond] += _score(person, replies, cond, examples)
        if "a+" in conditions:
            with MemoryFile.open(path) as memory:  # a normal chat: questions are written
                session = ChatSession(model, tokenizer, memory=memory)
                replies = [ask(session, q, max_tokens) for q in questions]
                session.close()
            results["a+"] += _score(person, replies, "a+", examples)
        if "b" in conditions:
            session = ChatSession(model, tokenizer)  # no memory at all
            replies = [ask(session, q, max_tokens) for q in questions]
            results["b"] += _score(person, replies, "b", examples)
        for cond in ("c", "c+"):
            if cond not in conditions:
                continue
            replies = []
            for q in questions:  # the history in the context (c: δ memory off; c+: written)
                session = ChatSession(model, tokenizer)
                session.read_only = cond == "c"
                session.feed([m for conv in person["conversations"] for m in conv])
                session.read_only = True
                replies.append("".join(c.text for c in session.reply(q, max_tokens=max_tokens)))
            results[cond] += _score(person, replies, cond, examples)
    return {"results": results, "examples": examples[:12]}


def _score(person: dict, replies: list[str], condition: str, examples: list) -> list[dict]:
    out = []
    for q, reply in zip(person["questions"], replies):
        ok = persona.exact_match(reply, q["slot"], q["expected"])
        out.append({"groups": person["groups"], "slot": q["slot"], "ok": ok,
                    "told_after": q["told_after"]})
        if len(examples) < 12 and condition == "a":
            examples.append({"q": q["question"], "expected": q["expected"], "reply": reply})
    return out


def summarize(results: dict, plan: list[dict]) -> dict:
    questions = [q for p in plan for q in p["questions"]]
    chance = sum(persona.chance(q["slot"]) for q in questions) / len(questions)
    rate = lambda rows: sum(r["ok"] for r in rows) / max(len(rows), 1)  # noqa: E731
    sizes = sorted({p["groups"] for p in plan})
    return {
        "questions": len(questions), "people": len(plan), "chance": round(chance, 4),
        **{f"recall_{k}": round(rate(v), 4) for k, v in results.items()},
        "by_groups": {str(s): {k: round(rate([r for r in v if r["groups"] == s]), 4)
                               for k, v in results.items()} for s in sizes},
        **{key: {slot: round(rate([r for r in results[c] if r["slot"] == slot]), 4)
                 for slot in persona.SLOTS if any(r["slot"] == slot for r in results[c])}
           for key, c in (("by_slot", "a"), ("by_slot_live", "live")) if c in results},
        # how recall falls with the age of a fact: the number of facts told after it
        "by_told_after": {str(n): round(rate([r for r in results["a"] if r["told_after"] == n]), 4)
                          for n in sorted({r["told_after"] for r in results["a"]})}
        if "a" in results else {},
    }


HEADERS = {"a": "(a) δ only", "a+": "(a+) writes on", "b": "(b) reset", "c": "(c) in context",
           "c+": "(c+) ctx + δ", "live": "(live) δ, chat"}


def print_table(summary: dict, plan: list[dict]) -> None:
    facts = {p["groups"]: p["facts"] for p in plan}
    print(f"\nRecall (exact match) on {summary['people']} held-out people, "
          f"{summary['questions']} questions; chance {summary['chance']:.1%}\n")
    conditions = [c for c in HEADERS if f"recall_{c}" in summary]
    print(f"{'fact groups told':>16} {'facts':>5} " + " ".join(f"{HEADERS[c]:>15}"
                                                               for c in conditions))
    for size, row in summary["by_groups"].items():
        print(f"{size:>16} {facts[int(size)]:>5} " + " ".join(f"{row[c]:>15.1%}"
                                                             for c in conditions))
    print(f"{'all':>16} {'':>5} " + " ".join(f"{summary[f'recall_{c}']:>15.1%}"
                                             for c in conditions) + "\n")
    for key, c in (("by_slot", "a"), ("by_slot_live", "live")):
        if key in summary:
            print(f"by slot ({c}): " + ", ".join(f"{k} {v:.0%}" for k, v in summary[key].items()))
    if summary["by_told_after"]:
        print("by facts told after it (a): "
              + ", ".join(f"{k} {v:.0%}" for k, v in summary["by_told_after"].items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="δ-mem recall evaluation (see the module docstring)",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", help="δ-mem model directory (default: the shipped demo)")
    p.add_argument("--people-per-size", type=int, default=10,
                   help="people per number of fact groups told (10)")
    p.add_argument("--sizes", default="1,2,3,4,5,6,7", help="numbers of fact groups told")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (24)")
    p.add_argument("--conditions", default="a,a+,b,c,c+,live",
                   help="which of a,a+,b,c,c+,live to run")
    p.add_argument("--work-dir", help="where the memory files go (default: a temp directory)")
    p.add_argument("--phase", choices=["all", "ask"], default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        from dmem_mlx import blas

        blas.reexec_with_openblas()
    except ImportError:
        pass
    if args.model is None:
        from dmem_mlx.demo import demo_model_path

        args.model = str(demo_model_path())
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        assert all(1 <= s <= len(persona.GROUPS) for s in sizes) and args.people_per_size > 0
    except (ValueError, AssertionError):
        print(f"error: --sizes must list numbers from 1 to {len(persona.GROUPS)}, and "
              "--people-per-size be positive", file=sys.stderr)
        return 2
    conditions = [c for c in HEADERS if c in args.conditions.split(",")]
    if not conditions or set(args.conditions.split(",")) - set(HEADERS):
        print("error: --conditions must list some of a,a+,b,c,c+,live", file=sys.stderr)
        return 2
    plan = make_plan(args.people_per_size, args.seed, sizes)
    if args.phase == "ask":
        work = Path(args.work_dir)
        out = ask_all(args.model, plan, work, args.max_tokens, conditions)
        (work / "answers.json").write_text(json.dumps(out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        seconds = write_memories(args.model, plan, work, "live" in conditions, args.max_tokens)
        print(f"wrote {len(plan)} memory files in {seconds:.0f} s; restarting to ask ...",
              flush=True)
        child = [sys.executable, __file__, "--phase", "ask", "--work-dir", str(work),
                 "--model", args.model, "--people-per-size", str(args.people_per_size),
                 "--sizes", args.sizes, "--seed", str(args.seed),
                 "--max-tokens", str(args.max_tokens), "--conditions", args.conditions]
        subprocess.run(child, check=True)
        out = json.loads((work / "answers.json").read_text())
    summary = summarize(out["results"], plan)
    print("\nexamples (a):")
    for e in out["examples"]:
        print(f"  {e['q']!r:42} expected {e['expected']:<12} → {e['reply']!r}")
    print_table(summary, plan)
    print(json.dumps({"benchmark": "recall_eval", "model": args.model, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
