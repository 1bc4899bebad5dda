"""Memory file save/load time at Qwen3-4B size, and decode speed under KV eviction.

1. Save and load of a memory shaped like the release adapter's (36 layers, H = 1, r = 8) with a
   realistic transcript: atomic save (temp file, fsync, .bak, rename, directory fsync) and a
   fully validated load. Target: < 20 ms each.
2. Decode speed of a long conversation with a small KV budget: once the oldest turns start
   leaving the context (and live on only in δ), tokens/s stays flat while the KV cache stays
   bounded. Uses a small random model (no download), fp32.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/bench_memory_file.py [--repeats 50] [--turns 24]

Prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmem_mlx.runtime.memory_file import MemoryData, MemoryFile  # noqa: E402


def qwen3_4b_memory(turns: int = 40) -> MemoryData:
    rng = np.random.default_rng(0)
    fingerprint = {"base_model": "Qwen/Qwen3-4B-Instruct-2507", "backbone": "qwen3 · 36 layers",
                   "adapter_sha256": "0" * 64,
                   "delta_config": {"rank": 8, "num_state_heads": 1, "layers": list(range(36)),
                                    "memory_write_granularity": "token"}}
    transcript = [{"role": "system", "content": "You are a helpful assistant."}]
    for k in range(turns):
        transcript.append({"role": "user", "content": f"Message {k}: " + "some words " * 30})
        transcript.append({"role": "assistant", "content": f"Reply {k}: " + "an answer " * 60})
    return MemoryData(states={i: rng.standard_normal((1, 8, 8)).astype(np.float32)
                              for i in range(36)},
                      fingerprint=fingerprint, transcript=transcript, tokens_written=123456,
                      turns=turns)


def bench_file(repeats: int, directory: str | None) -> dict:
    data = qwen3_4b_memory()
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "memory.safetensors"
        mem = MemoryFile.open(path, fingerprint=data.fingerprint)
        mem.save(data)
        saves, loads = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            mem.save(data)
            saves.append(time.perf_counter() - start)
        mem.close()
        for _ in range(repeats):
            start = time.perf_counter()
            with MemoryFile.open(path, fingerprint=data.fingerprint) as loaded:
                assert loaded.data is not None
            loads.append(time.perf_counter() - start)
        size = path.stat().st_size
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    p95 = lambda xs: 1000 * sorted(xs)[int(0.95 * (len(xs) - 1))]  # noqa: E731
    return {"save_ms": round(ms(saves), 2), "save_p95_ms": round(p95(saves), 2),
            "load_ms": round(ms(loads), 2), "load_p95_ms": round(p95(loads), 2),
            "file_bytes": size, "transcript_messages": len(data.transcript)}


def bench_eviction(turns: int, max_tokens: int, budget: int, probes: int) -> tuple[list, dict]:
    """The same conversation with an unbounded and an evicting KV context, turns interleaved
    (two copies of the model: sessions on one model share its δ state). Then decode speed is
    probed (best of `probes` replies, alternating, so that load from other processes on the
    machine does not decide the result) on a fresh session and on both long ones."""
    import mlx.core as mx

    import dmem_mlx
    from dmem_mlx.runtime import ChatSession
    from dmem_mlx.tiny import make_tiny_dmem

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_dmem(tmp, hidden_size=512, num_hidden_layers=8, intermediate_size=1536,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=64)
        for label, kv_budget in (("fresh", 1 << 20), ("unbounded", 1 << 20),
                                 ("evicting", budget)):
            model, tokenizer = dmem_mlx.load(str(path))
            sessions[label] = ChatSession(model, tokenizer, max_kv_tokens=kv_budget)
    eos = tokenizer.eos_token_id
    no_eos = lambda _, logits: mx.where(mx.arange(logits.shape[-1]) == eos, -1e9, logits)  # noqa

    def turn(session, text, n):
        for _ in session.reply(text, max_tokens=n, logits_processors=[no_eos]):
            pass
        return session.last_reply.tokens_per_sec

    rows = []
    for k in range(turns):
        for label in ("unbounded", "evicting"):
            session = sessions[label]
            tok_s = turn(session, f"Turn {k}: I like tea, books and long walks by the river.",
                         max_tokens)
            info = session.info()
            rows.append({"kv": label, "turn": k + 1, "tok_s": tok_s, "kv_tokens": info.kv_tokens,
                         "in_memory_only": info.turns_in_memory_only})
    best = {label: 0.0 for label in sessions}
    kv = {}
    for _ in range(probes):
        for label, session in sessions.items():
            if label == "fresh":
                session.new_conversation()
            best[label] = max(best[label], turn(session, "Tell me about the river.", 32))
            kv[label] = session.info().kv_tokens
    return rows, {"best_tok_s": best, "kv_tokens": kv}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="saves and loads timed (50)")
    parser.add_argument("--dir", default=None, help="directory for the file (default: temp)")
    parser.add_argument("--turns", type=int, default=24, help="turns of the eviction run (24)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (48)")
    parser.add_argument("--budget", type=int, default=512, help="KV budget when evicting (512)")
    parser.add_argument("--probes", type=int, default=5, help="decode speed probes (best of 5)")
    parser.add_argument("--skip-decode", action="store_true", help="only time the file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.turns < 2 or args.max_tokens < 1 or args.budget < 64:
        parser.error("--repeats >= 1, --turns >= 2, --max-tokens >= 1, --budget >= 64")

    f = bench_file(args.repeats, args.dir)
    print("memory file, Qwen3-4B size (36 layers, H=1, r=8, "
          f"{f['transcript_messages']} messages, {f['file_bytes']:,} bytes)")
    print(f"{'':6} {'median ms':>10} {'p95 ms':>8} {'target':>8}")
    for op in ("save", "load"):
        ok = "ok" if f[f"{op}_ms"] < 20 else "MISSED"
        print(f"{op:6} {f[op + '_ms']:>10.2f} {f[op + '_p95_ms']:>8.2f} {'< 20':>6} {ok}")
    result = {"benchmark": "memory_file", **f}
    if not args.skip_decode:
        rows, probe = bench_eviction(args.turns, args.max_tokens, args.budget, args.probes)
        print(f"\nlong conversation (KV budget {args.budget} tokens when evicting, "
              f"{args.max_tokens} tokens/reply; wall tok/s is at the mercy of machine load)")
        print(f"{'turn':>5} {'unbounded tok/s':>16} {'kv':>6} {'evicting tok/s':>15} {'kv':>6} "
              f"{'in δ only':>10}")
        by = {(r["kv"], r["turn"]): r for r in rows}
        for turn in range(1, args.turns + 1):
            u, e = by[("unbounded", turn)], by[("evicting", turn)]
            print(f"{turn:>5} {u['tok_s']:>16.1f} {u['kv_tokens']:>6} {e['tok_s']:>15.1f} "
                  f"{e['kv_tokens']:>6} {e['in_memory_only']:>10}")
        best, kv = probe["best_tok_s"], probe["kv_tokens"]
        print(f"\ndecode speed, best of {args.probes} probes of 32 tokens")
        print(f"{'session':>10} {'kv tokens':>10} {'tok/s':>8} {'vs fresh':>9}")
        for label in ("fresh", "evicting", "unbounded"):
            print(f"{label:>10} {kv[label]:>10} {best[label]:>8.1f} "
                  f"{best[label] / best['fresh']:>8.2f}x")
        result.update({
            "decode_tok_s_fresh": round(best["fresh"], 1),
            "decode_tok_s_evicting": round(best["evicting"], 1),
            "decode_tok_s_unbounded": round(best["unbounded"], 1),
            "evicting_vs_fresh": round(best["evicting"] / best["fresh"], 3),
            "evicting_max_kv": max(by[("evicting", t)]["kv_tokens"]
                                   for t in range(1, args.turns + 1)),
            "unbounded_final_kv": by[("unbounded", args.turns)]["kv_tokens"],
            "turns_in_memory_only": by[("evicting", args.turns)]["in_memory_only"]})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
