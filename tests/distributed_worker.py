"""One rank of tests/test_distributed.py, started by `mlx.launch` (not a test module itself).

    mlx.launch --backend ring -n 2 --python PY tests/distributed_worker.py OUT.json DIR...

Each DIR is a tiny δ-mem model. Every rank runs the same single-process model as the reference,
then the model sharded over the 2 ranks (tensor parallel in both attach orders, pipeline
parallel), and a chat saved to a memory file by rank 0; rank 0 writes the figures to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import dmem_mlx
from dmem_mlx.cache import make_prompt_cache, state_of
from dmem_mlx.distributed import (ShardedChatSession, gather_states, pipeline_load, shard,
                                  sharded_load)
from dmem_mlx.runtime import ChatSession, MemoryFile, MemoryFileError
from dmem_mlx.runtime.memory_file import read_memory

PROMPT = [[5, 17, 33, 101, 7, 9, 250, 3, 44, 12, 61, 2]]
TURNS = ["My name is Ada and I live in Paris.", "I have a cat.", "Where do I live?"]
WORLD = mx.distributed.init()


def two_calls(model):
    """Logits of a prefill and of one decode step sharing a cache, and the δ states after."""
    cache = make_prompt_cache(model)  # with a new, empty δ state
    first = model(mx.array(PROMPT), cache=cache)
    second = model(mx.array([[77]]), cache=cache)
    states = dict(state_of(cache).layers)
    mx.eval(first, second, [c.state for c in cache], list(states.values()))
    return first, second, states


def max_diff(a, b) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def same_on_every_rank(states: dict) -> bool:
    """True when every rank holds bit-identical arrays (compared on rank 0, the answer shared)."""
    mine = mx.stack([states[i] for i in sorted(states)])
    everyone = np.array(mx.distributed.all_gather(mine[None], group=WORLD, stream=mx.cpu))
    same = all(np.array_equal(everyone[0].view(np.uint32), e.view(np.uint32))
               for e in everyone[1:])
    agreed = mx.distributed.all_sum(mx.array([int(same)]), group=WORLD, stream=mx.cpu)
    return int(agreed.item()) == WORLD.size()


def compare(ref, model, states_of_owner: bool) -> dict:
    r1, r2, ref_states = ref
    s1, s2, states = two_calls(model)
    full = gather_states(model, states)
    return {
        "logits_prefill": max_diff(r1, s1), "logits_decode": max_diff(r2, s2),
        "state_vs_single": max(max_diff(full[i], ref_states[i]) for i in ref_states),
        # pipeline: each layer is held by one rank; after the gather every rank holds all
        "state_identical_across_ranks": same_on_every_rank(full if states_of_owner else states),
    }


def chat(session_cls, model, tokenizer, path, **kwargs):
    memory = MemoryFile.open(path) if path is not None else None
    with session_cls(model, tokenizer, memory=memory, **kwargs) as session:
        for text in TURNS:
            for _ in session.reply(text, max_tokens=6):
                pass
        session.undo()  # the last turn taken back; the file keeps the earlier undo steps
        transcript = session.messages
    if memory is not None:
        memory.close()
    return transcript


def file_figures(reference: Path, sharded: Path) -> dict:
    a, b = read_memory(reference), read_memory(sharded)
    undo_states = [(x.states, y.states) for x, y in zip(a.undo, b.undo)]
    return {
        "file_layers_equal": sorted(a.states) == sorted(b.states),
        "file_state_max_diff": max(float(np.abs(x[i] - y[i]).max())
                                   for x, y in [(a.states, b.states), *undo_states] for i in x),
        "file_undo_steps": [len(a.undo), len(b.undo)],
        "file_transcript_equal": a.transcript == b.transcript,
        "file_counts_equal": (a.tokens_written, a.turns) == (b.tokens_written, b.turns),
        "file_fingerprint_equal": a.fingerprint == b.fingerprint,
    }


def reload_figures(model, tokenizer, path: Path) -> dict:
    """Open the saved file again: rank 0 reads it, every rank must end up with its state."""
    main = WORLD.rank() == 0
    memory = MemoryFile.open(path, read_only=True) if main else None
    session = ShardedChatSession(model, tokenizer, memory=memory)
    states = {i: s[0] for i, s in session.state.layers.items()}
    saved = read_memory(path).states  # every rank can read the file here (one machine)
    exact = all(np.array_equal(np.array(states[i]), saved[i]) for i in saved)
    agreed = mx.distributed.all_sum(mx.array([int(exact)]), group=WORLD, stream=mx.cpu)
    session.close()
    if memory is not None:
        memory.close()
    return {"reload_exact_on_every_rank": int(agreed.item()) == WORLD.size()}


def refusal_figures(model, tokenizer, foreign: Path) -> dict:
    """A memory file of another model: refused on every rank (none left waiting), one line."""
    memory = MemoryFile.open(foreign, read_only=True) if WORLD.rank() == 0 else None
    try:
        ShardedChatSession(model, tokenizer, memory=memory).close()
        refused, line = False, ""
    except MemoryFileError as exc:
        refused, line = True, str(exc)
    if memory is not None:
        memory.close()
    agreed = mx.distributed.all_sum(mx.array([int(refused)]), group=WORLD, stream=mx.cpu)
    return {"foreign_file_refused_on_every_rank": int(agreed.item()) == WORLD.size(),
            "foreign_file_message_one_line": refused and "\n" not in line}


def main() -> None:
    out, directories = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    main_rank = WORLD.rank() == 0
    figures = {}
    for directory in directories:
        name = directory.name
        ref_model, tokenizer = dmem_mlx.load(str(directory))
        ref = two_calls(ref_model)
        row = {}

        model, _ = sharded_load(str(directory), tensor_group=WORLD)  # shard, then attach
        row["tensor"] = compare(ref, model, states_of_owner=False)
        del model

        model, _ = dmem_mlx.load(str(directory))  # attach, then mlx-lm's own shard()
        shard(model, WORLD)
        row["tensor_attach_first"] = compare(ref, model, states_of_owner=False)
        del model

        model, _ = pipeline_load(str(directory))
        row["pipeline"] = compare(ref, model, states_of_owner=True)
        del model

        work = out.parent / name
        single_file = work / "single.safetensors"
        if main_rank:
            work.mkdir(parents=True, exist_ok=True)
            chat(ChatSession, ref_model, tokenizer, single_file)
        for mode in ("tensor", "pipeline"):
            kwargs = {"tensor_group": WORLD} if mode == "tensor" else {"pipeline_group": WORLD}
            model, tok = sharded_load(str(directory), **kwargs)
            path = work / f"{mode}.safetensors"
            chat(ShardedChatSession, model, tok, path if main_rank else None)
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=WORLD, stream=mx.cpu))
            if main_rank:
                row[mode].update(file_figures(single_file, path))
            row[mode].update(reload_figures(model, tok, path))
            if figures:  # the first backbone's memory, offered to this one
                first = out.parent / directories[0].name / "single.safetensors"
                row[mode].update(refusal_figures(model, tok, first))
            del model
        figures[name] = row
    if main_rank:
        out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
