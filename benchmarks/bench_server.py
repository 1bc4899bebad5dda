"""dmem-serve under load: N users × M turns at once on localhost, then a SIGKILL mid-load.

Starts `python -m dmem_mlx.server` (loopback only, a fresh memories directory) and drives it
with streaming chat requests, each user one conversation (the whole message list resent every
turn, as OpenAI clients do):

1. one user alone, then N users at once, interleaved over `--repeats` rounds: aggregate decode
   tokens/s (completion tokens over the phase's wall time) and its ratio N-at-once / alone;
   p50/p95 time to first token and per-token latency (time between streamed chunks);
2. after the load: every turn a client saw completed is in its memory's transcript, every
   memory file opens (validated, checksum) — turns lost must be 0;
3. the same load again, the server SIGKILLed in the middle of it: every memory file still
   opens and holds whole turns, and no turn the client saw completed is missing.

    python benchmarks/bench_server.py [--model DIR | --tiny] [--users 8] [--turns 20]

Bounded: at most 64 users, 200 turns, `--time-limit` seconds per phase. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmem_mlx.runtime.memory_file import MemoryFileError, read_memory  # noqa: E402

QUESTIONS = ["Hi, my name is {name}.", "I live in {city}.", "I work as a nurse.",
             "My cat is called Milo.", "Next month I am going to Peru.", "What is my name?",
             "Where do I live?", "What is my job?", "I like green tea.", "What do I like?"]
NAMES = ["Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
CITIES = ["Paris", "Lima", "Oslo", "Rome", "Kyiv", "Lagos", "Quito", "Seoul"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, memories: Path, max_concurrent: int, max_kv_tokens: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dmem_mlx.server", "--host", "127.0.0.1", "--port",
               str(self.port), "--memories", str(memories), "--max-concurrent",
               str(max_concurrent), "--max-kv-tokens", str(max_kv_tokens), "--log-level",
               "WARNING"]
        if model:
            cmd += ["--model", model]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.kill()
        raise SystemExit("server did not start in 120 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class User(threading.Thread):
    """One conversation of up to `turns` turns, streamed; records what completed."""

    def __init__(self, url: str, name: str, k: int, turns: int, max_tokens: int,
                 deadline: float, stream: bool = True):
        super().__init__(daemon=True)
        self.stream = stream
        self.url, self.name, self.k, self.turns = url, name, k, turns
        self.max_tokens, self.deadline = max_tokens, deadline
        self.messages: list[dict] = []
        self.completed = 0  # turns whose stream ended with [DONE]
        self.tokens = 0
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=300) as client:
            for t in range(self.turns):
                if time.time() > self.deadline:
                    break
                text = QUESTIONS[t % len(QUESTIONS)].format(
                    name=NAMES[self.k % len(NAMES)], city=CITIES[self.k % len(CITIES)])
                messages = self.messages + [{"role": "user", "content": text}]
                try:
                    reply = self.turn(client, messages)
                except (httpx.HTTPError, ValueError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                if reply is None:
                    return
                self.messages = messages + [{"role": "assistant", "content": reply}]
                self.completed += 1

    def turn(self, client: httpx.Client, messages: list[dict]):
        body = {"messages": messages, "user": self.name, "stream": self.stream,
                "max_tokens": self.max_tokens}
        if not self.stream:
            r = client.post(self.url + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                self.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return None
            reply = r.json()
            self.tokens += reply["usage"]["completion_tokens"]
            return reply["choices"][0]["message"]["content"]
        body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        last, parts, done = None, [], False
        with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                self.errors.append(f"HTTP {r.status_code}: {r.read()[:200]!r}")
                return None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(event["error"]["message"])
                    return None
                if event.get("usage"):
                    self.tokens += event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            self.ttft.append(now - start)
                        else:
                            self.gaps.append(now - last)
                        last = now
                        parts.append(piece)
        return "".join(parts) if done else None


def load(url: str, users: int, turns: int, max_tokens: int, time_limit: float,
         prefix: str, kill_after: float = 0.0, server: ServerProcess = None,
         stream: bool = True):
    deadline = time.time() + time_limit
    crowd = [User(url, f"{prefix}{k}", k, turns, max_tokens, deadline, stream)
             for k in range(users)]
    tic = time.perf_counter()
    for u in crowd:
        u.start()
    if kill_after:
        time.sleep(kill_after)
        server.kill()
    for u in crowd:
        u.join(timeout=time_limit + 300)
    return crowd, time.perf_counter() - tic


def check_memories(memories: Path, crowd: list[User]) -> dict:
    """Turns lost (completed for the client, not in its memory's transcript as sent and
    received) and memory files that do not open or do not hold whole turns."""
    lost = invalid = 0
    for u in crowd:
        path = memories / f"{u.name}.safetensors"
        if not path.exists():
            lost += u.completed
            continue
        try:
            transcript = read_memory(path).transcript
        except MemoryFileError:
            invalid += 1
            lost += u.completed
            continue
        if len(transcript) % 2 or any(m["role"] != ("user", "assistant")[i % 2]
                                      for i, m in enumerate(transcript)):
            invalid += 1
        kept = 0
        while kept < u.completed and transcript[2 * kept:2 * kept + 2] == \
                u.messages[2 * kept:2 * kept + 2]:
            kept += 1
        lost += u.completed - kept
    return {"lost": lost, "invalid": invalid}


def isolation(model_dir: str, users: int, steps: int = 16) -> tuple[float, float]:
    """(batched vs alone, others changed): max |Δlogit| between each row of a batch of `users`
    memories (different histories, so rows are left-padded) and the same conversation decoded
    alone, over `steps` tokens; and between row 0 of that batch and row 0 of a batch whose
    other rows hold other memories (their δ states changed) and are fed other tokens. The
    first also holds the BLAS's rounding for another batch size; the second is what another
    user's memory does to a reply (0 when rows are independent)."""
    import mlx.core as mx

    from dmem_mlx import load
    from dmem_mlx.demo import demo_model_path
    from dmem_mlx.runtime import ChatSession
    from dmem_mlx.server.engine import Batch, ChatJob, Row
    from dmem_mlx.server.schemas import ChatRequest

    model, tokenizer = load(model_dir or str(demo_model_path()))
    job = ChatJob(ChatRequest([], "", "m", None), lambda *a: None)
    batches, rows, alone = [Batch(model), Batch(model)], [[], []], []
    for k in range(users):
        made = []
        for _ in range(3):
            session = ChatSession(model, tokenizer)
            for t in range(k % 3 + 1):  # histories of different lengths
                session.feed([{"role": "user", "content": QUESTIONS[(k + t) % len(QUESTIONS)]
                               .format(name=NAMES[k % len(NAMES)], city=CITIES[k % len(CITIES)])},
                              {"role": "assistant", "content": "I see."}])
            made.append((session, session.begin_reply("What is my name?", steps + 1)))
        (s, turn), (s_other, turn_other), (s_alone, turn_alone) = made
        if k > 0:  # another memory in every other row of the second batch
            state = s_other._ctx.state
            state.layers = {i: None if v is None else 0.5 - v for i, v in state.layers.items()}
        for b, (session, t) in enumerate([(s, turn), (s_other, turn_other)]):
            rows[b].append(Row(job, session, t, tokenizer))
        alone.append((s_alone, turn_alone))
    for b in range(2):
        batches[b].add(rows[b])
    worst = others = 0.0
    logits_alone = [t.logits for _, t in alone]
    logits = [mx.stack([r.turn.logits for r in rows[b]]) for b in range(2)]
    vocab = logits[0].shape[-1]

    def gap(a: mx.array, b: mx.array) -> float:
        d = float(mx.abs(a - b).max())
        return d if d == d else float("inf")  # NaN counts as the worst

    for step in range(steps):
        others = max(others, gap(logits[0][0], logits[1][0]))
        for k in range(users):
            worst = max(worst, gap(logits[0][k], logits_alone[k]))
        tokens = [10 + (37 * k + 13 * step) % (vocab - 10) for k in range(users)]  # distinct
        changed = [tokens[0]] + [10 + (tokens[k] * 7) % (vocab - 10) for k in range(1, users)]
        logits = [batches[0].step(tokens), batches[1].step(changed)]
        for k in range(users):
            rows[0][k].session.record_token(rows[0][k].turn, tokens[k])
            rows[1][k].session.record_token(rows[1][k].turn, changed[k])
            s_alone, turn_alone = alone[k]
            logits_alone[k] = s_alone.feed_token(turn_alone, tokens[k])
    return worst, others


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="model directory (default: the demo)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--throughput-turns", type=int, default=4,
                   help="turns per user in each throughput round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--kill-after", type=float, default=8.0,
                   help="seconds into the SIGKILL load (0: skip it)")
    args = p.parse_args()
    if not (1 <= args.users <= 64 and 1 <= args.turns <= 200 and args.repeats >= 1):
        raise SystemExit("--users must be in [1, 64], --turns in [1, 200]")
    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    model = args.model
    if args.tiny:
        from dmem_mlx.tiny import make_tiny_dmem

        model = str(make_tiny_dmem(work / "tiny"))
    memories = work / "memories"
    server = ServerProcess(model, memories, max_concurrent=args.users, max_kv_tokens=4096)
    tps = {"plain": ([], []), "stream": ([], [])}
    ttft, gaps = [], []
    try:
        # 1. throughput: one user alone vs all at once, interleaved rounds, plain and streamed
        for r in range(args.repeats):
            for stream in (False, True):
                mode = "stream" if stream else "plain"
                solo, t1 = load(server.url, 1, args.throughput_turns, args.max_tokens,
                                args.time_limit, f"solo-{mode}{r}-", stream=stream)
                crowd, tn = load(server.url, args.users, args.throughput_turns,
                                 args.max_tokens, args.time_limit, f"crowd-{mode}{r}-",
                                 stream=stream)
                a = sum(u.tokens for u in solo) / t1
                b = sum(u.tokens for u in crowd) / tn
                tps[mode][0].append(a)
                tps[mode][1].append(b)
                for u in crowd:
                    ttft.extend(u.ttft)
                    gaps.extend(u.gaps)
        # 2. N users × M turns, then check every memory
        crowd, elapsed = load(server.url, args.users, args.turns, args.max_tokens,
                              args.time_limit, "user")
        errors = [e for u in crowd for e in u.errors]
        check = check_memories(memories, crowd)
        completed = sum(u.completed for u in crowd)
    finally:
        server.stop()
    influence, others = isolation(model, args.users)
    # 3. SIGKILL during the same load
    killed = {"lost": 0, "invalid": 0, "completed": 0}
    if args.kill_after > 0:
        kill_dir = work / "killed"
        server = ServerProcess(model, kill_dir, max_concurrent=args.users, max_kv_tokens=4096)
        crowd_k, _ = load(server.url, args.users, args.turns, args.max_tokens,
                          args.time_limit, "k", kill_after=args.kill_after, server=server)
        killed = check_memories(kill_dir, crowd_k)
        killed["completed"] = sum(u.completed for u in crowd_k)
        killed["files"] = len(list(kill_dir.glob("*.safetensors")))
    med = {m: (statistics.median(a), statistics.median(b),
               statistics.median([y / x for x, y in zip(a, b)])) for m, (a, b) in tps.items()}
    result = {
        "users": args.users, "turns": args.turns, "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "tps_one_user": med["plain"][0], "tps_all_users": med["plain"][1],
        "ratio": med["plain"][2],
        "tps_one_user_stream": med["stream"][0], "tps_all_users_stream": med["stream"][1],
        "ratio_stream": med["stream"][2],
        "ratios": [round(y / x, 2) for x, y in zip(*tps["plain"])],
        "ratios_stream": [round(y / x, 2) for x, y in zip(*tps["stream"])],
        "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p95_ms": 1000 * pct(ttft, 0.95),
        "token_p50_ms": 1000 * pct(gaps, 0.5), "token_p95_ms": 1000 * pct(gaps, 0.95),
        "load_turns_completed": completed, "load_seconds": elapsed, "load_errors": len(errors),
        "turns_lost": check["lost"], "files_invalid": check["invalid"],
        "kill_turns_completed": killed["completed"], "kill_turns_lost": killed["lost"],
        "kill_files_invalid": killed["invalid"], "kill_files": killed.get("files", 0),
        "batched_vs_alone_max_abs_dlogit": influence, "cross_user_max_abs_dlogit": others,
    }
    n = args.users
    print("| measure (medians of %d rounds) | 1 user alone | %d users at once | ratio |"
          % (args.repeats, n))
    print("|---|---|---|---|")
    for mode, label in (("plain", "decode tokens/s, whole replies"),
                        ("stream", "decode tokens/s, streamed (SSE)")):
        one, many, ratio = med[mode]
        print(f"| {label} | {one:.1f} | {many:.1f} | {ratio:.2f}× |")
    print()
    print("| measure | value |\n|---|---|")
    print(f"| time to first token p50 / p95 ({n} users, streamed) | "
          f"{result['ttft_p50_ms']:.0f} / {result['ttft_p95_ms']:.0f} ms |")
    print(f"| per-token latency p50 / p95 (between streamed chunks) | "
          f"{result['token_p50_ms']:.1f} / {result['token_p95_ms']:.1f} ms |")
    print(f"| max |Δlogit|, {n} rows batched vs each alone | {influence:.1e} |")
    print(f"| cross-user influence: max |Δlogit| of a row when the other rows' memories and "
          f"tokens change | {others:.1e} |")
    print(f"| {n} users × {args.turns} turns: turns completed, lost, files invalid | "
          f"{completed}, {check['lost']}, {check['invalid']} ({len(errors)} errors) |")
    if args.kill_after > 0:
        print(f"| SIGKILL after {args.kill_after:g} s: turns completed, lost, files invalid | "
              f"{killed['completed']}, {killed['lost']}, {killed['invalid']} |")
    if errors:
        print("errors:", errors[:3])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
