"""δ-mem speed against plain mlx-lm on the same random backbone (issue 3).

Sections (all by default):
  decode   tok/s through `mlx_lm.stream_generate`, δ-mem vs plain, on Qwen3-shaped backbones
           (and δ-mem's added µs per layer per token);
  prefill  prompt tok/s at long prompts with writes on, δ-mem vs plain;
  scan     the state scan alone: the dispatcher's fast path vs the per-token reference loop;
  memory   bytes of δ state vs bytes of KV cache holding the same history;
  breakdown (only when named) where δ-mem's decode time goes (tiny backbone unless
           --breakdown-shape): per layer and token, graph building (Python) and evaluation,
           for δ-mem, δ-mem with its memory step replaced by one doing nothing, and the
           attention wrapper alone.

Both models share one set of random backbone weights (`dmem_mlx.tiny.build_model`); the δ model
carries a random adapter (TSW, rank 8, heads q and o, like the release). Repetitions alternate
the two models and medians are reported, since the machine may be shared. Run it under the
fast CPU configuration users get from the CLIs (OpenBLAS preloaded):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_speed.py [--sections decode,scan] [--shapes tiny,0.6b]

It prints a table for people and, last, one JSON line for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

SECTIONS = ("decode", "prefill", "scan", "memory", "breakdown")
DEFAULT_SECTIONS = SECTIONS[:4]
# Qwen3 shapes (config.json of the released checkpoints); "tiny" is where per-layer costs show.
SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=8, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # the 0.6B shape with a 380-token vocabulary: the LM head no longer hides the per-layer cost
    "0.6b-v380": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=380),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
DELTA_CONFIG = {"rank": 8, "alpha": 16.0, "delta_heads": ["q", "o"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} "
                        f"(default: {','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--shapes", default="tiny,0.6b,1.7b",
                   help="backbones for decode (default: tiny,0.6b,1.7b; also: 4b)")
    p.add_argument("--prefill-shape", default="0.6b", help="backbone for prefill (default 0.6b)")
    p.add_argument("--prefill-lengths", default="2048,8192", help="prompt tokens (default 2048,8192)")
    p.add_argument("--scan-lengths", default="512,2048,8192", help="tokens (default 512,2048,8192)")
    p.add_argument("--scan-heads", default="1,4", help="state heads H for the scan (default 1,4)")
    p.add_argument("--memory-lengths", default="1024,8192,32768",
                   help="history tokens for the memory table (default 1024,8192,32768)")
    p.add_argument("--memory-shapes", default="0.6b,4b", help="shapes for the memory table")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt before decoding (32)")
    p.add_argument("--decode-tokens", type=int, default=0,
                   help="tokens generated per run (default: 200 tiny, 16 for big shapes)")
    p.add_argument("--breakdown-tokens", type=int, default=1000,
                   help="tokens per variant for the breakdown (1000)")
    p.add_argument("--breakdown-shape", default="tiny",
                   help="backbone for the breakdown (default tiny; 0.6b: its per-token differences "
                        "resolve the ~1 %% a layer of that size pays, which run-level ratios cannot)")
    p.add_argument("--repeats", type=int, default=12,
                   help="alternating repetitions per model (12; tiny decode runs 3x as many)")
    p.add_argument("--prefill-repeats", type=int, default=3, help="for prefill (3)")
    p.add_argument("--default-cache-limit", action="store_true",
                   help="keep MLX's default CPU buffer cache (dmem_mlx.load raises it)")
    p.add_argument("--seed", type=int, default=0)
    return p


# -- models ---------------------------------------------------------------------------------

def build_pair(shape: str, seed: int):
    """(plain model, δ model) sharing one set of random fp32 backbone weights."""
    from mlx_lm.utils import _get_classes

    from dmem_mlx.config import DeltaMemConfig
    from dmem_mlx.model import attach_delta_mem, delta_parameters, load_delta_parameters
    from dmem_mlx.tiny import build_model, tiny_args

    args = tiny_args("qwen3", **SHAPES[shape])
    plain = build_model(args, seed)
    model_class, args_class = _get_classes(args)
    dmem = model_class(args_class.from_dict(args))
    dmem.update(plain.parameters())  # the same arrays: no copy
    attach_delta_mem(dmem, DeltaMemConfig.from_dict(DELTA_CONFIG))
    mx.random.seed(seed + 1)
    scale = {"delta_q_proj": 0.02, "delta_o_proj": 0.02, "beta_bias": 1.0, "lambda_bias": 1.0}
    weights = {k: mx.random.normal(v.shape) * scale.get(k.rsplit(".", 1)[1], 0.05)
               for k, v in delta_parameters(dmem).items()}
    load_delta_parameters(dmem, weights)
    mx.eval(dmem.parameters())
    return plain, dmem


class IdsOnlyTokenizer:
    """Just enough of a tokenizer for `mlx_lm.stream_generate` on token ids: no text, no EOS."""

    def __new__(cls):
        from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

        class Silent(StreamingDetokenizer):
            def __init__(self):
                self.reset()

            def reset(self):
                self.tokens, self.offset, self.text = [], 0, ""

            def add_token(self, token):
                self.tokens.append(token)

            def finalize(self):
                pass

            @property
            def last_segment(self):
                return ""

        wrapper = TokenizerWrapper.__new__(TokenizerWrapper)
        wrapper._detokenizer = Silent()
        wrapper._eos_token_ids = set()
        return wrapper


def generate_once(model, tokenizer, prompt: mx.array, max_tokens: int):
    """Run mlx_lm.stream_generate to the end; returns the last GenerationResponse."""
    from mlx_lm import stream_generate

    if getattr(model, "delta_mem", None) is not None:
        model.delta_mem.reset()
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pass
    return last


def alternate(run, models: dict, repeats: int) -> dict[str, list]:
    """run(model) for each model, `repeats` times, in alternating order: {name: [results]}."""
    out = {name: [] for name in models}
    names = list(models)
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            out[name].append(run(models[name]))
    return out


def compare(runs: dict[str, list], higher_is_better: bool = True) -> dict:
    """Medians of both models and the median of the per-repetition ratios δ-mem / plain.

    Each repetition runs both models back to back, so its ratio sees one load of a shared
    machine; the median of those ratios is steadier than the ratio of the medians.
    """
    pairs = [d / p if higher_is_better else p / d for p, d in zip(runs["plain"], runs["dmem"])]
    return {"plain": statistics.median(runs["plain"]), "dmem": statistics.median(runs["dmem"]),
            "ratio": statistics.median(pairs), "pair_ratios": pairs}


# -- sections -------------------------------------------------------------------------------

def bench_decode(args, shape: str) -> dict:
    plain, dmem = build_pair(shape, args.seed)
    layers = SHAPES[shape]["num_hidden_layers"]
    tokens = args.decode_tokens or (200 if shape == "tiny" else 16)
    vocab = SHAPES[shape]["vocab_size"]
    prompt = mx.random.randint(0, vocab, (args.prompt_tokens,), key=mx.random.key(args.seed))
    tok = IdsOnlyTokenizer()
    models = {"plain": plain, "dmem": dmem}
    for model in models.values():  # warm up (and compile)
        generate_once(model, tok, prompt, 4)
    runs = alternate(lambda m: generate_once(m, tok, prompt, tokens).generation_tps,
                     models, args.repeats * (3 if shape == "tiny" else 1))
    c = compare(runs)
    added = statistics.median(1 / d - 1 / p for p, d in zip(runs["plain"], runs["dmem"]))
    del plain, dmem, models
    mx.clear_cache()
    return {
        "shape": shape, "tokens": tokens, "plain_tok_s": c["plain"], "dmem_tok_s": c["dmem"],
        "ratio": c["ratio"], "added_us_per_layer_token": added / layers * 1e6, "runs": runs,
    }


def bench_breakdown(args) -> list[dict]:
    """Where δ-mem's decode time goes on `--breakdown-shape`, per layer and token.

    Plain mlx-lm and three δ-mem variants decode one token each in turn (synchronous
    `mx.eval`, so that the time of building the graph in Python and of evaluating it can be
    told apart); each variant's figures are medians of its per-token differences to the plain
    token next to it, so a changing load hits both alike. Variants: "δ-mem" as shipped;
    "no memory step": the step replaced by one returning zero reads and the state unchanged
    (the attention wrapper and the two corrections); "wrapper only": also no corrections.
    """
    import dmem_mlx.model as model_module
    from dmem_mlx.delta_mem import DeltaMemory
    from mlx_lm.models.cache import make_prompt_cache

    shape = args.breakdown_shape
    plain, dmem = build_pair(shape, args.seed)
    layers = SHAPES[shape]["num_hidden_layers"]
    rank = DELTA_CONFIG["rank"]
    shipped = (model_module.step, DeltaMemory.correct)
    zero_reads = mx.zeros((1, 1, rank))

    def no_step(memory, h, state, *rest):
        return zero_reads, state

    def no_correction(memory, head, out, reads, weights=None):
        return out

    variants = {"δ-mem": shipped, "no memory step": (no_step, shipped[1]),
                "wrapper only": (no_step, no_correction)}
    prompt = mx.random.randint(0, SHAPES[shape]["vocab_size"], (1, args.prompt_tokens),
                               key=mx.random.key(args.seed))

    def start(model):
        cache = make_prompt_cache(model)
        logits = model(prompt, cache=cache)
        mx.eval(logits)
        return [cache, mx.argmax(logits[:, -1:], axis=-1)]

    def token(model, run) -> tuple[float, float]:
        begin = time.perf_counter()
        run[1] = mx.argmax(model(run[1], cache=run[0])[:, -1:], axis=-1)
        built = time.perf_counter()
        mx.eval(run[1])
        return built - begin, time.perf_counter() - built

    names = ["plain", *variants]
    times = {name: [] for name in names}
    try:
        for _ in range(max(1, args.breakdown_tokens // 100)):  # fresh caches every 100 tokens
            runs = {}
            for name in names:
                if name != "plain":
                    model_module.step, DeltaMemory.correct = variants[name]
                    dmem.delta_mem.reset()
                runs[name] = start(plain if name == "plain" else dmem)
            for i in range(105):  # the first 5 warm up
                row = {}
                for name in (names if i % 2 == 0 else names[::-1]):
                    if name != "plain":
                        model_module.step, DeltaMemory.correct = variants[name]
                    row[name] = token(plain if name == "plain" else dmem, runs[name])
                if i >= 5:
                    for name in names:
                        times[name].append(row[name])
    finally:
        model_module.step, DeltaMemory.correct = shipped
    per_layer = 1e6 / layers
    plain_times = times["plain"]
    results = [{"shape": shape, "variant": "plain mlx-lm", "build_us": statistics.median(
        b for b, _ in plain_times) * per_layer, "eval_us": statistics.median(
        e for _, e in plain_times) * per_layer, "total_us": statistics.median(
        b + e for b, e in plain_times) * per_layer, "ratio": 1.0}]
    for name in variants:
        pairs = list(zip(times[name], plain_times))
        results.append({
            "shape": shape, "variant": name,
            "build_us": statistics.median(d[0] - p[0] for d, p in pairs) * per_layer,
            "eval_us": statistics.median(d[1] - p[1] for d, p in pairs) * per_layer,
            "total_us": statistics.median(sum(d) - sum(p) for d, p in pairs) * per_layer,
            "ratio": statistics.median(sum(p) / sum(d) for d, p in pairs)})
    del plain, dmem
    mx.clear_cache()
    return results


def bench_prefill(args) -> list[dict]:
    shape = args.prefill_shape
    plain, dmem = build_pair(shape, args.seed)
    vocab = SHAPES[shape]["vocab_size"]
    tok = IdsOnlyTokenizer()
    models = {"plain": plain, "dmem": dmem}
    results = []
    for length in _ints(args.prefill_lengths):
        prompt = mx.random.randint(0, vocab, (length,), key=mx.random.key(args.seed + length))
        for model in models.values():
            generate_once(model, tok, prompt[:256], 1)
        runs = alternate(lambda m: generate_once(m, tok, prompt, 1).prompt_tps, models,
                         args.prefill_repeats)
        c = compare(runs)
        results.append({"shape": shape, "prompt_tokens": length, "plain_tok_s": c["plain"],
                        "dmem_tok_s": c["dmem"], "ratio": c["ratio"], "runs": runs})
    del plain, dmem, models
    mx.clear_cache()
    return results


def bench_scan(args) -> list[dict]:
    from dmem_mlx.delta_mem import MemoryInputs, normalize_heads, scan_reference
    from dmem_mlx.scan import scan

    results = []
    for H in _ints(args.scan_heads):
        for T in _ints(args.scan_lengths):
            mx.random.seed(args.seed)
            n = lambda: mx.random.normal((1, T, H, 8))  # noqa: E731
            beta = mx.sigmoid(n() - 1.5)
            inputs = MemoryInputs(normalize_heads(n()), normalize_heads(n()), n(), 1 - beta,
                                  beta, beta)
            state = mx.zeros((1, H, 8, 8))
            mx.eval(inputs)
            fns = {"loop": scan_reference, "fast": scan}
            for fn in fns.values():
                mx.eval(fn(state, inputs))

            def timed(fn):
                start = time.perf_counter()
                mx.eval(fn(state, inputs))
                return time.perf_counter() - start

            runs = alternate(timed, fns, max(3, args.repeats))
            loop, fast = statistics.median(runs["loop"]), statistics.median(runs["fast"])
            speedups = [a / b for a, b in zip(runs["loop"], runs["fast"])]
            results.append({"heads": H, "tokens": T, "loop_ms": loop * 1e3,
                            "fast_ms": fast * 1e3, "speedup": statistics.median(speedups)})
    return results


def bench_memory(args) -> list[dict]:
    """Bytes per sequence: δ state (fp32, r×r per layer and head) vs KV cache (k and v)."""
    r, H = DELTA_CONFIG["rank"], 1
    results = []
    for shape in args.memory_shapes.split(","):
        s = SHAPES[shape]
        layers = s["num_hidden_layers"]
        state_bytes = layers * H * r * r * 4
        kv_per_token = 2 * layers * s["num_key_value_heads"] * s["head_dim"]
        for T in _ints(args.memory_lengths):
            results.append({"shape": shape, "history_tokens": T, "delta_state_bytes": state_bytes,
                            "kv_cache_bytes_fp32": kv_per_token * T * 4,
                            "kv_cache_bytes_bf16": kv_per_token * T * 2})
    return results


def check_memory_formula(args) -> None:
    """The memory table's formulas against real objects on the tiny shape."""
    from mlx_lm.models.cache import make_prompt_cache

    plain, dmem = build_pair("tiny", args.seed)
    cache = make_prompt_cache(dmem)
    dmem(mx.random.randint(0, 512, (1, 100)), cache=cache)
    mx.eval([c.keys_and_values() for c in cache])
    s = SHAPES["tiny"]
    kv = sum(x.nbytes for c in cache for x in c.keys_and_values())
    per_token = 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * 4
    if dmem.delta_mem.nbytes != s["num_hidden_layers"] * DELTA_CONFIG["rank"] ** 2 * 4:
        raise AssertionError(f"δ state holds {dmem.delta_mem.nbytes} bytes, formula disagrees")
    if kv != per_token * 100:
        raise AssertionError(f"KV cache holds {kv} bytes for 100 tokens, formula disagrees")
    del plain


# -- output ---------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    preload = os.environ.get("LD_PRELOAD", "")
    return {"system": platform.system(), "cpu": cpu, "cores": os.cpu_count(),
            "mlx": mx.__version__, "device": str(mx.default_device()),
            "blas": "openblas (preloaded)" if "openblas" in preload else "mlx built-in",
            "cache_limit_bytes": _cache_limit(), "load_average_start": load_average()}


def _cache_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def print_tables(result: dict) -> None:
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['system']}, MLX {m['mlx']} "
          f"({m['device']}), BLAS: {m['blas']}, cache limit {_size(m['cache_limit_bytes'])}, "
          f"load average {m['load_average_start']} -> {result['load_average_end']}")
    print("ratio = median over repetitions of (δ-mem / plain) measured back to back")
    if "decode" in result:
        _table("Decode (mlx_lm.stream_generate, fp32, greedy)", result["decode"], [
            ("backbone", 9, "shape", ""), ("tokens", 6, "tokens", ""),
            ("plain tok/s", 12, "plain_tok_s", ".2f"), ("δ-mem tok/s", 12, "dmem_tok_s", ".2f"),
            ("ratio", 6, "ratio", ".3f"),
            ("added µs/layer/token", 21, "added_us_per_layer_token", ".1f")])
    if "prefill" in result:
        _table("Prefill (prompt tok/s, writes on)", result["prefill"], [
            ("backbone", 9, "shape", ""), ("tokens", 6, "prompt_tokens", ""),
            ("plain tok/s", 12, "plain_tok_s", ".1f"), ("δ-mem tok/s", 12, "dmem_tok_s", ".1f"),
            ("ratio", 6, "ratio", ".3f")])
    if "scan" in result:
        _table("State scan alone (r = 8, batch 1)", [
            {**d, "speedup": f"{d['speedup']:.1f}x"} for d in result["scan"]], [
            ("heads", 5, "heads", ""), ("tokens", 6, "tokens", ""), ("loop ms", 10, "loop_ms", ".1f"),
            ("fast ms", 9, "fast_ms", ".2f"), ("speedup", 8, "speedup", "")])
    if "breakdown" in result:
        _table(f"Decode time per layer and token, {result['breakdown'][0]['shape']} backbone "
               "(plain: absolute; δ-mem variants: added to plain; median of per-token differences)",
               result["breakdown"], [
            ("variant", 16, "variant", ""), ("build µs", 9, "build_us", ".1f"),
            ("eval µs", 8, "eval_us", ".1f"), ("total µs", 9, "total_us", ".1f"),
            ("ratio", 6, "ratio", ".3f")])
    if "memory" in result:
        _table("Memory per sequence: δ state vs KV cache for the same history", [
            {**d, **{k: _size(d[k]) for k in ("delta_state_bytes", "kv_cache_bytes_fp32",
                                              "kv_cache_bytes_bf16")}} for d in result["memory"]], [
            ("backbone", 9, "shape", ""), ("history", 8, "history_tokens", ""),
            ("δ state", 10, "delta_state_bytes", ""), ("KV fp32", 10, "kv_cache_bytes_fp32", ""),
            ("KV bf16", 10, "kv_cache_bytes_bf16", "")])


def _table(title: str, rows: list[dict], columns: list[tuple[str, int, str, str]]) -> None:
    """Print a titled table: one line per row; columns are (header, width, key, format)."""
    print(f"\n{title}")
    print(" ".join(f"{header:>{width}}" for header, width, _, _ in columns))
    for row in rows:
        print(" ".join(f"{row[key]:>{width}{fmt}}" for _, width, key, fmt in columns))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if bad := [s for s in sections if s not in SECTIONS]:
        print(f"error: unknown section(s) {bad}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if bad := [s for s in shapes + [args.prefill_shape, args.breakdown_shape] if s not in SHAPES]:
        print(f"error: unknown shape(s) {bad}; choose from {','.join(SHAPES)}", file=sys.stderr)
        return 2
    if not args.default_cache_limit:
        from dmem_mlx.blas import raise_cpu_cache_limit

        raise_cpu_cache_limit()  # what dmem_mlx.load does on the CPU backend
    result = {"machine": machine()}
    if "memory" in sections:
        check_memory_formula(args)
        result["memory"] = bench_memory(args)
    if "scan" in sections:
        result["scan"] = bench_scan(args)
    if "decode" in sections:
        result["decode"] = []
        for shape in shapes:
            result["decode"].append(bench_decode(args, shape))
            print(f"decode {shape}: ratio {result['decode'][-1]['ratio']:.3f}", file=sys.stderr)
    if "prefill" in sections:
        result["prefill"] = bench_prefill(args)
    if "breakdown" in sections:
        result["breakdown"] = bench_breakdown(args)
    result["load_average_end"] = load_average()
    print_tables(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
