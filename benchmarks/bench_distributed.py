"""δ-mem tokens/s in one process vs 2 ranks on this machine (tensor and pipeline parallel).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_distributed.py [--shapes tiny,mid] [--repeats 3]

Writes a random δ-mem model per shape (Qwen3 architecture, heads q and o, rank 8), then runs
the same measurement, interleaved and repeated, as one process and as `mlx.launch --backend
ring -n 2` ranks on localhost with tensor and with pipeline parallelism: prefill tokens/s of a
prompt (writes on) and decode tokens/s (greedy, one token per call, δ state written each step).
Medians; ratios against the single process of the same repetition round. Two ranks on one
machine share its cores, so no speed-up is expected here: the figures price the path (the
collectives per layer or per stage) rather than the hardware. A table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_speed as speed  # noqa: E402

MODES = ("single", "tensor", "pipeline")
# bench_speed's tiny shape and adapter, and a mid-sized model of 8 layers
SHAPES = {
    "tiny": speed.SHAPES["tiny"],
    "mid": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=3072,
                num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=32000),
}
DELTA_CONFIG = speed.DELTA_CONFIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,mid", help=f"of {','.join(SHAPES)} (tiny,mid)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three modes (3)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prefill length (256)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps (32)")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    return p


# -- one run (one process, or one rank) -------------------------------------------------------

def worker(mode: str, path: str, prompt_tokens: int, decode_tokens: int) -> None:
    import mlx.core as mx

    import dmem_mlx
    from dmem_mlx.cache import make_prompt_cache
    from dmem_mlx.distributed import sharded_load

    world = mx.distributed.init()
    if mode == "single":
        model, _ = dmem_mlx.load(path)
    else:
        model, _ = sharded_load(path, **{f"{mode}_group": world})
    vocab = model.args.vocab_size
    prompt = mx.random.randint(0, vocab, (1, prompt_tokens), key=mx.random.key(0))

    def run(n_prompt: int, n_decode: int) -> tuple[float, float]:
        cache = make_prompt_cache(model)
        tic = time.perf_counter()
        y = mx.argmax(model(prompt[:, :n_prompt], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        prefill = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(n_decode):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(y)
        return n_prompt / prefill, n_decode / (time.perf_counter() - tic)

    run(16, 4)  # warm-up (compilation, buffers)
    prefill_tps, decode_tps = run(prompt_tokens, decode_tokens)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))
    if world.rank() == 0:
        print(json.dumps({"prefill_tps": prefill_tps, "decode_tps": decode_tps}), flush=True)


# -- the driver -------------------------------------------------------------------------------

def run_mode(mode: str, path: Path, args) -> dict:
    from dmem_mlx.distributed import free_port_pair

    me = [str(Path(__file__).resolve()), "--worker", mode, str(path),
          "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if mode == "single":
        cmd = [sys.executable, *me]
    else:
        launch = Path(sys.executable).parent / "mlx.launch"
        extra = [f"--env=PYTHONPATH={ROOT}"]
        if os.environ.get("LD_PRELOAD"):
            extra.append(f"--env=LD_PRELOAD={os.environ['LD_PRELOAD']}")
        cmd = [str(launch), "--backend", "ring", "-n", "2", "-p", str(free_port_pair()),
               "--python", sys.executable, *extra, "--", *me]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{mode}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_shape(shape: str, args, tmp: Path) -> dict:
    from dmem_mlx.tiny import make_tiny_dmem

    path = make_tiny_dmem(tmp / shape, "qwen3", delta_config=DELTA_CONFIG, **SHAPES[shape])
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(run_mode(mode, path, args))
    out = {"shape": shape, **SHAPES[shape]}
    for mode in MODES:
        for key in ("prefill_tps", "decode_tps"):
            out[f"{mode}_{key}"] = statistics.median(r[key] for r in runs[mode])
            if mode != "single":
                out[f"{mode}_{key}_ratio"] = statistics.median(
                    r[key] / s[key] for r, s in zip(runs[mode], runs["single"]))
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(*args.worker, args.prompt_tokens, args.decode_tokens)
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    if bad := [s for s in shapes if s not in SHAPES]:
        print(f"error: unknown shape(s) {bad}; choose from {','.join(SHAPES)}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_shape(s, args, Path(tmp)) for s in shapes]
    print(f"{'shape':6} {'mode':9} {'prefill tok/s':>14} {'ratio':>6} {'decode tok/s':>13} "
          f"{'ratio':>6}")
    for row in rows:
        for mode in MODES:
            ratio = lambda k: ("" if mode == "single"  # noqa: E731
                               else f"{row[f'{mode}_{k}_ratio']:.2f}")
            print(f"{row['shape']:6} {mode:9} {row[f'{mode}_prefill_tps']:14.1f} "
                  f"{ratio('prefill_tps'):>6} {row[f'{mode}_decode_tps']:13.1f} "
                  f"{ratio('decode_tps'):>6}")
    print(json.dumps({"bench": "distributed", "repeats": args.repeats,
                      "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                      "openblas": bool(os.environ.get("LD_PRELOAD")),
                      "load_average": os.getloadavg()[0], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
