"""Hostile and careless inputs (issue 14): is each refused cleanly, how long, how much memory?

Every case of tests/hostile_corpus.py is written at the issue's sizes (512 MiB zip bombs,
10^12-fold reference fan-out, sparse multi-GB files ...), then refused by its CLI in a fresh
subprocess, one per case. For each: exit code and stderr (clean = exit 1, one `error:` line,
no traceback), the refusal's own time (measured inside the child after warming up its imports:
mlx, mlx-lm, transformers, huggingface_hub), the child's
wall time, and its peak RSS (`wait4` rusage). A baseline child opens a valid memory file with
the same imports (what any run costs). Prints a table and one JSON line.

    python benchmarks/bench_hostile.py [--only SUBSTRING] [--scale bench|test]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import hostile_corpus as corpus  # noqa: E402

BASELINE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1] + "/tests")
import hostile_corpus as corpus
corpus.warm_up()
from dmem_mlx.runtime import MemoryFile
start = time.perf_counter()
with MemoryFile.open(sys.argv[2]) as memory:
    assert memory.data is not None
print(json.dumps({"code": 0, "stderr": "", "seconds": time.perf_counter() - start}))
"""


def spawn_measured(argv: list[str]) -> dict:
    """Run `python argv` → its JSON result, wall seconds and peak RSS in MB (its own rusage,
    from wait4)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stdout → pipe, stderr → /dev/null, then exec
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(r)
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, *argv], env)
    os.close(w)
    chunks = []
    while data := os.read(r, 1 << 16):
        chunks.append(data)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    out = b"".join(chunks).decode(errors="replace")
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"code": os.waitstatus_to_exitcode(status), "stderr": out[-2000:], "seconds": wall}
    result.update(wall=wall, rss_mb=usage.ru_maxrss / 1024)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--scale", choices=["bench", "test"], default="bench")
    args = parser.parse_args()
    names = [n for n in corpus.CASES if args.only in n]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        root = Path(tmp)
        corpus.prepare(root)
        good = root / "good.safetensors"
        good.write_bytes(corpus.memory_bytes())
        baseline = spawn_measured(["-c", BASELINE, str(ROOT), str(good)])
        for name in names:
            d, argv = corpus.build_case(name, root, args.scale)
            before = corpus.snapshot(d)
            result = spawn_measured([str(ROOT / "tests" / "hostile_corpus.py"), name,
                                     json.dumps(argv)])
            after = corpus.snapshot(d)
            unchanged = {k: v for k, v in before.items() if not k.endswith(".lock")} == \
                {k: v for k, v in after.items() if not k.endswith(".lock")}
            clean = corpus.refused_cleanly(result["code"], result["stderr"])
            rows.append({"case": name, "clean": clean, "unchanged": unchanged,
                         "traceback": "Traceback" in result["stderr"],
                         "seconds": round(result["seconds"], 3), "wall": round(result["wall"], 2),
                         "rss_mb": round(result["rss_mb"], 1),
                         "message": result["stderr"].strip().splitlines()[-1][:90]
                         if result["stderr"].strip() else ""})
            print(f"{'ok ' if clean and unchanged else 'BAD'} {rows[-1]['seconds']:6.2f}s "
                  f"{rows[-1]['wall']:5.1f}s {rows[-1]['rss_mb']:7.1f} MB  {name}", flush=True)
    print()
    print(f"{'case':58} {'clean':>5} {'same':>5} {'refuse s':>8} {'wall s':>6} {'RSS MB':>7}")
    for row in rows:
        print(f"{row['case'][:58]:58} {str(row['clean']):>5} {str(row['unchanged']):>5} "
              f"{row['seconds']:8.3f} {row['wall']:6.2f} {row['rss_mb']:7.1f}")
    print(f"{'baseline: open a valid memory (same imports)':58} {'':>5} {'':>5} "
          f"{baseline['seconds']:8.3f} {baseline['wall']:6.2f} {baseline['rss_mb']:7.1f}")
    worst_time = max(rows, key=lambda r: r["seconds"])
    worst_rss = max(rows, key=lambda r: r["rss_mb"])
    summary = {
        "benchmark": "hostile", "scale": args.scale, "cases": len(rows),
        "refused_cleanly": sum(r["clean"] and r["unchanged"] for r in rows),
        "tracebacks": sum(r["traceback"] for r in rows),
        "worst_refusal_seconds": worst_time["seconds"], "worst_time_case": worst_time["case"],
        "worst_wall_seconds": max(r["wall"] for r in rows),
        "peak_rss_mb": worst_rss["rss_mb"], "peak_rss_case": worst_rss["case"],
        "baseline_rss_mb": round(baseline["rss_mb"], 1),
        "baseline_wall_seconds": round(baseline["wall"], 2),
    }
    print(json.dumps(summary))
    return 0 if summary["refused_cleanly"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
