"""Recall of facts told in a live chat, asked after a restart: the held-out evaluation.

Everything said to the model comes from a hand-written file, benchmarks/heldout/recall.json,
kept apart from the training data generator (dmem_mlx/demo/persona.py never uses its phrasings
or its out-of-list values; tests/test_train_demo.py checks that). Held-out people tell the
assistant 1–7 groups of facts (name, city, job, pet + its name, trip, food, hobby) over 1–3
conversations in a *live chat*: the model answers every message and its own replies are
written into the δ memory with the user's, as `dmem-chat` does. The memory file is saved, then
a *new process* opens it read-only and asks about every fact, each question in a fresh
conversation: only the δ memory holds the answer. A reply is right when it names the expected
value (a whole word, any case) and no other value of that kind from the file.

People come in three kinds:
  natural      values from the file's in_list (values the demo's lists hold), typed normally
  casual       the same, typed in lowercase, without final punctuation, apostrophes sometimes
               dropped and one light typo (swapped, dropped or doubled letter) in some messages
  out_of_list  values no training list holds (Priya, Kyoto, a goat, moussaka ...)

Measures (counts and rates):
  δ-only recall  natural / casual / out_of_list people, across the restart (by kind of fact, by
                 number of facts told, by age: the number of facts told after it — natural)
  not told       questions about facts never told (natural and casual people), answered as not
                 told: a phrase of the file's not_told_phrases and no value of that kind
  no memory      the natural questions with the memory reset (chance level of guesses)
  in context     the natural people's whole chat (model's replies, δ memory empty and never
                 written) in one context, then each question in it: what the backbone copies
  acks           of the live chat's messages telling one fact, the replies naming that value
                 and the replies naming another value of its kind

Prints a table and one JSON line. `--quick` (28 people, a few minutes) checks a build stage;
the default (112 people) gives the README's figures. Example:
    python benchmarks/recall_eval.py --quick --model /work/demo-build/model
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HELDOUT = ROOT / "benchmarks" / "heldout" / "recall.json"
EVAL_SEED = 20261204
SLOTS = ("name", "city", "job", "pet", "pet_name", "trip", "food", "hobby")
GROUPS = (("name",), ("city",), ("job",), ("pet", "pet_name"), ("trip",), ("food",), ("hobby",))
KINDS = ("natural", "casual", "out_of_list")
CONDITIONS = ("delta", "not_told", "no_memory", "in_context")


def load_heldout(path: Path = HELDOUT) -> dict:
    return json.loads(Path(path).read_text())


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def fill(template: str, facts: dict[str, str]) -> str:
    text = template.format(**facts, a_job=_article(facts["job"]), a_pet=_article(facts["pet"]))
    return text[0].upper() + text[1:]


def casual(text: str, rng: random.Random, protect: set[str]) -> str:
    """Typed casually: lowercase, no final punctuation, apostrophes sometimes dropped, and
    (in 60 % of messages) one light typo in a word that is not a fact value."""
    text = text.lower().rstrip(".!?")
    if rng.random() < 0.5:
        text = text.replace("'", "")
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words)
                  if len(w) >= 4 and w.isalpha() and w not in protect]
    if candidates and rng.random() < 0.6:
        i = rng.choice(candidates)
        w, j = words[i], rng.randrange(1, len(words[i]) - 1)
        kind = rng.choice(["swap", "drop", "double"])
        if kind == "swap":
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif kind == "drop":
            w = w[:j] + w[j + 1:]
        else:
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    return " ".join(words)


def make_person(rng: random.Random, data: dict, kind: str, num_groups: int) -> dict:
    """One held-out person: their facts, the conversations telling them (user messages only:
    the model writes its own replies), the questions about told and never-told facts."""
    pool = data["out_of_list" if kind == "out_of_list" else "in_list"]
    facts = {slot: rng.choice(pool[slot]) for slot in SLOTS}
    groups = rng.sample(GROUPS, num_groups)
    if ("name",) in groups:  # people introduce themselves first
        groups.remove(("name",))
        groups.insert(0, ("name",))
    messages: list[dict] = []  # {"text", "slots"}
    i = 0
    while i < len(groups):
        pair = "+".join(groups[i] + groups[i + 1]) if i + 1 < len(groups) else ""
        if pair in data["tell_pairs"] and rng.random() < 0.5:
            messages.append({"text": fill(rng.choice(data["tell_pairs"][pair]), facts),
                             "slots": [*groups[i], *groups[i + 1]]})
            i += 2
            continue
        slot = groups[i][0]
        messages.append({"text": fill(rng.choice(data["tell"][slot]), facts),
                         "slots": list(groups[i])})
        i += 1
    told = [s for m in messages for s in m["slots"]]
    cuts = sorted(rng.sample(range(1, len(messages)), min(rng.randint(0, 2), len(messages) - 1)))
    conversations = [messages[a:b] for a, b in zip([0, *cuts], [*cuts, len(messages)])]
    for conv in conversations:
        if rng.random() < 0.4:
            user, _ = rng.choice(data["small_talk"])
            conv.insert(rng.randint(0, len(conv)), {"text": user, "slots": []})
    questions = [{"slot": s, "text": fill(rng.choice(data["ask"][s]), facts),
                  "expected": facts[s], "told_after": len(told) - 1 - n, "facts": len(told)}
                 for n, s in enumerate(told)]
    untold = [s for s in SLOTS if s not in told and s != "pet_name"]
    never = [{"slot": s, "text": fill(rng.choice(data["ask"][s]), facts)}
             for s in rng.sample(untold, min(2, len(untold)))]
    if kind == "casual":
        protect = {v.lower() for v in facts.values()}
        for conv in conversations:
            for m in conv:
                m["text"] = casual(m["text"], rng, protect)
        for q in questions + never:
            q["text"] = casual(q["text"], rng, protect)
    return {"kind": kind, "facts": facts, "told": told, "conversations": conversations,
            "questions": questions, "never_told": never}


def make_plan(data: dict, people_per_size: int, seed: int,
              sizes: tuple[int, ...] = tuple(range(1, len(GROUPS) + 1))) -> list[dict]:
    """people_per_size natural people per number of fact groups told (`sizes`, 1–7); half as
    many casual and out-of-list people (at least one per size)."""
    rng = random.Random(seed)
    plan = []
    for kind, per_size in (("natural", people_per_size),
                           ("casual", max(1, people_per_size // 2)),
                           ("out_of_list", max(1, people_per_size // 2))):
        for size in sizes:
            plan += [make_person(rng, data, kind, size) for _ in range(per_size)]
    return plan


# -- scoring ----------------------------------------------------------------------------------
def names_value(reply: str, value: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(value.lower())}(?![\w])",
                     reply.lower().replace("’", "'")) is not None


def exact(reply: str, slot: str, expected: str, data: dict) -> bool:
    """The reply names the expected value and no other value of that kind from the file."""
    others = {v for pool in ("in_list", "out_of_list") for v in data[pool][slot]} - {expected}
    return names_value(reply, expected) and not any(names_value(reply, v) for v in others)


def answered_not_told(reply: str, slot: str, data: dict) -> bool:
    text = reply.lower().replace("’", "'")
    values = {v for pool in ("in_list", "out_of_list") for v in data[pool][slot]}
    return (any(p in text for p in data["not_told_phrases"])
            and not any(names_value(reply, v) for v in values))


# -- the two phases ---------------------------------------------------------------------------
def load_model(model_path: str):
    from dmem_mlx import load

    return load(model_path)


def ask(session, text: str, max_tokens: int) -> str:
    session.new_conversation()
    return "".join(chunk.text for chunk in session.reply(text, max_tokens=max_tokens))


def tell_live(model_path: str, plan: list[dict], work: Path, max_tokens: int,
              conditions: list[str]) -> dict:
    """Phase 1: every person's chat, live, into a memory file (the model's replies written);
    the in-context condition too (it needs no restart)."""
    from dmem_mlx.runtime import ChatSession, MemoryFile

    model, tokenizer = load_model(model_path)
    data = load_heldout()
    start = time.perf_counter()
    acks, in_context, transcripts = [], [], []
    for i, person in enumerate(plan):
        with MemoryFile.open(work / f"person{i}.mem") as memory:
            session = ChatSession(model, tokenizer, memory=memory)
            chat = []
            for conversation in person["conversations"]:
                session.new_conversation()
                for message in conversation:
                    reply = "".join(c.text for c in session.reply(message["text"],
                                                                    max_tokens=max_tokens))
                    chat.append([message["text"], reply])
                    if len(message["slots"]) == 1 or message["slots"] == ["pet", "pet_name"]:
                        slot = message["slots"][-1]
                        value = person["facts"][slot]
                        others = set(data["in_list"][slot] + data["out_of_list"][slot]) - {value}
                        acks.append({"kind": person["kind"], "slot": slot,
                                     "right": names_value(reply, value),
                                     "wrong": any(names_value(reply, v) for v in others)})
            session.close()
        transcripts.append(chat)
        if "in_context" not in conditions or person["kind"] != "natural":
            continue
        session = ChatSession(model, tokenizer)  # δ empty, never written: the context only
        session.read_only = True
        history = []
        for conversation in person["conversations"]:
            for message in conversation:
                reply = "".join(c.text for c in session.reply(message["text"],
                                                                max_tokens=max_tokens))
                history += [{"role": "user", "content": message["text"]},
                            {"role": "assistant", "content": reply}]
        for q in person["questions"]:
            session = ChatSession(model, tokenizer)
            session.read_only = True
            session.feed(history)
            reply = "".join(c.text for c in session.reply(q["text"], max_tokens=max_tokens))
            in_context.append(_row(person, q, exact(reply, q["slot"], q["expected"], data),
                                   reply))
    return {"seconds": time.perf_counter() - start, "acks": acks, "in_context": in_context,
            "transcripts": transcripts}


def ask_after_restart(model_path: str, plan: list[dict], work: Path, max_tokens: int,
                      conditions: list[str]) -> dict:
    """Phase 2 (a new process): questions from the memory files, read-only; no-memory baseline."""
    from dmem_mlx.runtime import ChatSession, MemoryFile

    model, tokenizer = load_model(model_path)
    data = load_heldout()
    out: dict[str, list] = {"delta": [], "not_told": [], "no_memory": []}
    for i, person in enumerate(plan):
        with MemoryFile.open(work / f"person{i}.mem", read_only=True) as memory:
            session = ChatSession(model, tokenizer, memory=memory)
            for q in person["questions"] if "delta" in conditions else []:
                reply = ask(session, q["text"], max_tokens)
                out["delta"].append(_row(person, q, exact(reply, q["slot"], q["expected"], data),
                                         reply))
            if "not_told" in conditions and person["kind"] != "out_of_list":
                for q in person["never_told"]:
                    reply = ask(session, q["text"], max_tokens)
                    out["not_told"].append(_row(person, q, answered_not_told(reply, q["slot"],
                                                                             data), reply))
            session.close()
        if "no_memory" in conditions and person["kind"] == "natural":
            session = ChatSession(model, tokenizer)
            for q in person["questions"]:
                reply = ask(session, q["text"], max_tokens)
                out["no_memory"].append(_row(person, q, exact(reply, q["slot"], q["expected"],
                                                              data), reply))
    return out


def _row(person: dict, q: dict, ok: bool, reply: str) -> dict:
    return {"kind": person["kind"], "slot": q["slot"], "ok": bool(ok), "q": q["text"],
            "expected": q.get("expected"), "reply": reply, "facts": q.get("facts"),
            "told_after": q.get("told_after")}


# -- report -----------------------------------------------------------------------------------
def count(rows: list[dict]) -> dict:
    hits = sum(r["ok"] for r in rows)
    return {"right": hits, "of": len(rows), "rate": round(hits / len(rows), 4) if rows else None}


def summarize(phase1: dict, phase2: dict) -> dict:
    delta = phase2["delta"]
    natural = [r for r in delta if r["kind"] == "natural"]
    acks = phase1["acks"]
    return {
        **{f"delta_{k}": count([r for r in delta if r["kind"] == k]) for k in KINDS},
        "not_told": count(phase2["not_told"]),
        "no_memory": count(phase2["no_memory"]),
        "in_context": count(phase1["in_context"]),
        "acks_right": count([{"ok": a["right"]} for a in acks]),
        "acks_wrong": count([{"ok": a["wrong"]} for a in acks]),
        "by_slot": {s: count([r for r in natural if r["slot"] == s]) for s in SLOTS},
        "by_slot_casual": {s: count([r for r in delta if r["kind"] == "casual" and r["slot"] == s])
                           for s in SLOTS},
        "by_slot_out_of_list": {s: count([r for r in delta if r["kind"] == "out_of_list"
                                          and r["slot"] == s]) for s in SLOTS},
        "by_facts_told": {str(n): count([r for r in natural if r["facts"] == n])
                          for n in sorted({r["facts"] for r in natural})},
        "by_told_after": {str(n): count([r for r in natural if r["told_after"] == n])
                          for n in sorted({r["told_after"] for r in natural})},
    }


def _fmt(c: dict) -> str:
    return "—" if not c["of"] else f"{c['rate']:6.1%} ({c['right']}/{c['of']})"


def print_report(summary: dict, examples: list[dict]) -> None:
    print("\nexamples:")
    for e in examples:
        print(f"  {e['q']!r:40} expected {e['expected']:<10} → {e['reply']!r}")
    print(f"\n{'measure (held-out, live chat, restart)':<48} recall")
    for label, key in [("δ only, natural phrasings", "delta_natural"),
                       ("δ only, lowercase / no punctuation / typos", "delta_casual"),
                       ("δ only, values outside the lists", "delta_out_of_list"),
                       ("never told, answered as not told", "not_told"),
                       ("no memory (reset)", "no_memory"),
                       ("in context, δ empty", "in_context"),
                       ("acknowledgement names the told value", "acks_right"),
                       ("acknowledgement names another value", "acks_wrong")]:
        print(f"{label:<48} {_fmt(summary[key])}")
    for title, key in [("by kind of fact (natural)", "by_slot"),
                       ("by kind of fact (casual)", "by_slot_casual"),
                       ("by kind of fact (out of list)", "by_slot_out_of_list"),
                       ("by number of facts told (natural)", "by_facts_told"),
                       ("by facts told after it (natural)", "by_told_after")]:
        print(f"{title}: " + ", ".join(f"{k} {_fmt(v).strip()}" for k, v in summary[key].items()
                                       if v["of"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="δ-mem recall on the held-out set (module docstring)",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", help="δ-mem model directory (default: the shipped demo)")
    p.add_argument("--quick", action="store_true", help="2 natural people per size (28 people)")
    p.add_argument("--people-per-size", type=int, default=8,
                   help="natural people per number of fact groups 1–7 (8; half as many casual "
                        "and out-of-list)")
    p.add_argument("--sizes", default="1,2,3,4,5,6,7", help="numbers of fact groups told")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per reply (24)")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="which of delta,not_told,no_memory,in_context to measure (all)")
    p.add_argument("--work-dir", help="where the memory files go (default: a temp directory)")
    p.add_argument("--json-out", help="also write the summary and every reply to this file")
    p.add_argument("--phase", choices=["all", "ask"], default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        from dmem_mlx import blas

        blas.reexec_with_openblas()
    except ImportError:
        pass
    conditions = args.conditions.split(",")
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        assert all(1 <= s <= len(GROUPS) for s in sizes)
    except (ValueError, AssertionError):
        sizes = ()
    if set(conditions) - set(CONDITIONS) or args.people_per_size < 1 or not sizes:
        print(f"error: --conditions must list some of {','.join(CONDITIONS)}, --sizes numbers "
              f"from 1 to {len(GROUPS)}, and --people-per-size be positive", file=sys.stderr)
        return 2
    if args.model is None:
        from dmem_mlx.demo import demo_model_path

        args.model = str(demo_model_path())
    from dmem_mlx.adapter import is_adapter_dir

    if not is_adapter_dir(args.model) or not (Path(args.model) / "config.json").is_file():
        print(f"error: {args.model} is not a δ-mem model directory (config.json and a δ "
              "adapter)", file=sys.stderr)
        return 2
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        print(f"error: --json-out: no directory {Path(args.json_out).parent}", file=sys.stderr)
        return 2
    per_size = 2 if args.quick else args.people_per_size
    plan = make_plan(load_heldout(), per_size, args.seed, sizes)
    if args.phase == "ask":
        work = Path(args.work_dir)
        out = ask_after_restart(args.model, plan, work, args.max_tokens, conditions)
        (work / "answers.json").write_text(json.dumps(out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        phase1 = tell_live(args.model, plan, work, args.max_tokens, conditions)
        print(f"{len(plan)} people told their facts in a live chat in {phase1['seconds']:.0f} s; "
              "restarting to ask ...", flush=True)
        phase2 = {"delta": [], "not_told": [], "no_memory": []}
        if set(conditions) & set(phase2):
            child = [sys.executable, __file__, "--phase", "ask", "--work-dir", str(work),
                     "--model", args.model, "--people-per-size", str(per_size),
                     "--sizes", args.sizes, "--seed", str(args.seed), "--max-tokens", str(args.max_tokens),
                     "--conditions", args.conditions]
            subprocess.run(child, check=True)
            phase2 = json.loads((work / "answers.json").read_text())
    summary = summarize(phase1, phase2)
    examples = [r for r in phase2["delta"] if r["kind"] == "natural"][:10] or \
        phase1["in_context"][:10]
    print_report(summary, examples)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "phase1": phase1,
                                                   "phase2": phase2}, indent=1))
    print(json.dumps({"benchmark": "recall_eval", "model": args.model,
                      "people": len(plan), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
