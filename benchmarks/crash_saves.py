"""Crash safety of the memory file: SIGKILL a process while it saves, many times.

A child process opens a memory file (taking its lock) and saves new versions in a tight loop —
version k has every δ value equal to k, tokens_written = k and a transcript naming k. It is
SIGKILLed at a random moment, usually in the middle of a save. After every kill the file must
load as a complete version the child wrote, never older than the version seen after the
previous kill; the lock must be free again; `.bak` must load too.

    python benchmarks/crash_saves.py [--kills 100] [--layers 36]

Prints a table and one JSON line. The test suite runs the same check with fewer kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmem_mlx.runtime import memory_file as mf  # noqa: E402

# The child imports only the memory file module (no mlx: it starts in a fraction of a second).
CHILD = r"""
import sys
import numpy as np
from dmem_mlx.runtime import memory_file as mf
path, layers, fingerprint = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])
mem = mf.MemoryFile.open(path, fingerprint=fingerprint)
k = mem.data.tokens_written if mem.data else 0
first = True
while True:
    k += 1
    data = mf.MemoryData(
        states={i: np.full((1, 8, 8), float(k), np.float32) for i in range(layers)},
        fingerprint=fingerprint, transcript=[{"role": "user", "content": f"version {k} " + "x" * (k % 97)}],
        tokens_written=k, turns=k)
    mem.save(data)
    if first:
        print("ready", flush=True)
        first = False
"""


def fingerprint(layers: int) -> dict:
    return {"base_model": "crash-test", "backbone": "test", "adapter_sha256": "0" * 64,
            "delta_config": {"rank": 8, "num_state_heads": 1, "layers": list(range(layers)),
                             "memory_write_granularity": "token"}}


def check_version(path: Path, fp: dict) -> int:
    """Load `path`; it must be a self-consistent version k. Returns k."""
    data = mf.read_memory(path, fp)  # raises MemoryFileError if damaged
    k = data.tokens_written
    expect(data.turns == k, "counts of two versions mixed")
    expect(data.transcript[0]["content"] == f"version {k} " + "x" * (k % 97), "transcript mixed")
    expect(all((state == k).all() for state in data.states.values()), "δ of another version")
    return k


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def run(kills: int = 100, layers: int = 36, directory: str | Path | None = None,
        seed: int = 0, max_delay: float = 0.05) -> dict:
    """Kill a saving child `kills` times; returns counts (raises AssertionError on corruption)."""
    rng = random.Random(seed)
    fp = fingerprint(layers)
    # the child imports this checkout's dmem_mlx, as this process does
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "memory.safetensors"
        last, survived, mid_write, versions = 0, 0, 0, []
        for _ in range(kills):
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(path), str(layers), repr(fp)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            line = child.stdout.readline()
            if line.strip() != "ready":
                child.kill()
                raise RuntimeError(f"child failed to start: {child.stderr.read()[-500:]}")
            time.sleep(rng.uniform(0, max_delay))
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
            leftovers = list(path.parent.glob(f".{path.name}.*"))
            mid_write += bool(leftovers)
            k = check_version(path, fp)
            expect(k >= last, f"version went back from {last} to {k}")
            bak = path.with_name(path.name + ".bak")
            if bak.exists():
                # older, or the same when killed between keeping the backup and the rename
                expect(check_version(bak, fp) <= k, ".bak newer than the file")
            with mf.MemoryFile.open(path, fingerprint=fp):  # lock free, leftovers cleaned
                expect(not list(path.parent.glob(f".{path.name}.*")), "temporary files left")
            versions.append(k - last)
            last = k
            survived += 1
    return {"kills": kills, "survived": survived, "killed_mid_write": mid_write,
            "versions_written": last, "layers": layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs (default 100)")
    parser.add_argument("--layers", type=int, default=36, help="δ layers (default 36, Qwen3-4B)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kills < 1 or args.layers < 1:
        parser.error("--kills and --layers must be >= 1")
    start = time.perf_counter()
    try:
        result = run(args.kills, args.layers, seed=args.seed)
    except (AssertionError, mf.MemoryFileError) as exc:
        print(f"CORRUPTION: {exc}", file=sys.stderr)
        return 1
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{'kills':>8} {'survived':>9} {'mid-write':>10} {'versions':>9} {'seconds':>8}")
    print(f"{result['kills']:>8} {result['survived']:>9} {result['killed_mid_write']:>10} "
          f"{result['versions_written']:>9} {result['seconds']:>8}")
    print(json.dumps({"benchmark": "crash_saves", **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
