"""dmem-chat: decode speed inside the app vs the library alone (issue 6: app ≥ 0.9× library),
and start-up times (issue 13).

Start-up (`--what startup`): `dmem-chat` on the bundled demo model run in a pseudo-terminal
(160×48, a fresh data directory, OpenBLAS re-exec as a user gets it), timed from the command to
the first screen with the input box ("ui"), and to the model loaded and the memory shown
("ready"); `dmem-chat --help`; and refusing a bad path (`--memory /no/such/dir/x`, a text file
as `--memory`, `--model /no/such/model`). The reference is plain mlx-lm loading the same model in a fresh process
(`python -c "import mlx_lm; mlx_lm.load(demo)"`, under the same OpenBLAS preload), measured in
the same run. Targets: ready ≤ 2 s, --help ≤ 0.5 s, a bad path refused ≤ 0.5 s.

Three copies of the model hold three sessions with their own memory files: two consumed by
`ChatSession.reply` in a plain loop (library A and B) and one in the Textual app running headless
(`App.run_test`) — the message submitted as if typed, the reply streamed into the Markdown view,
the memory panel redrawn after each turn. Each prompt is answered by A, then the app, then B, all
greedy, so all three produce the same tokens. app/lib is the app's speed over the mean of A and B
for that prompt (load from other processes on a shared machine hits all three alike); B/A, the
same comparison between two identical library sessions, shows the noise of the measurement.
Medians over all prompts are reported.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/bench_app.py [--model DIR] [--max-tokens 200] [--rounds 5]

Headless Textual skips turning screen updates into terminal output; here the headless driver
claims to be a terminal, so that the app does all the work of a real one except the final write.

decode tok/s: as measured by the runtime (ReplyStats.tokens_per_sec). wall tok/s: tokens / time
from sending the message to the reply being on screen (prefill, save and panel included).
UI CPU: CPU time of the UI thread / wall time during the app's turns.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import pty
import re
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ANSI = re.compile(r"\x1b(\[[0-9;?<>=$]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

PROMPTS = [
    "Hello! My name is Ada and I live in Paris.",
    "I have a cat called Milo. He likes long walks by the river.",
    "What do you know about me so far?",
    "Tell me a long story about tea, books and the weather.",
]


def library_turn(session, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    for _ in session.reply(prompt, max_tokens=max_tokens, temp=0.0):
        pass
    wall = time.perf_counter() - start
    stats = session.last_reply
    return {"tokens": stats.tokens, "tok_s": stats.tokens_per_sec, "wall": wall}


async def app_turn(app, prompt: str) -> dict:
    from app.widgets import ChatInput

    chat_input = app.query_one(ChatInput)
    done = app.replies_finished + 1
    start, cpu = time.perf_counter(), time.thread_time()
    chat_input.post_message(ChatInput.Submitted(chat_input, prompt))  # = typed, then Enter
    while app.replies_finished < done:
        await asyncio.sleep(0.005)
    wall = time.perf_counter() - start
    stats = app.last_reply
    return {"tokens": stats.tokens, "tok_s": stats.tokens_per_sec, "wall": wall,
            "ui_cpu": (time.thread_time() - cpu) / wall}


async def run(model_dir: Path, tmp: Path, max_tokens: int, rounds: int) -> list[tuple[dict, ...]]:
    import dmem_mlx
    from dmem_mlx.runtime import ChatSession
    from textual.drivers.headless_driver import HeadlessDriver

    from app.app import DmemChatApp, Sampling
    from app.main import open_memory

    libraries = [ChatSession(*dmem_mlx.load(str(model_dir)), memory=open_memory(tmp / f"{n}.memory"))
                 for n in ("a", "b")]
    app_model = dmem_mlx.load(str(model_dir))
    HeadlessDriver.is_headless = property(lambda self: False)  # render output, write nothing
    app = DmemChatApp(model_dir, None, sampling=Sampling(max_tokens=max_tokens, temp=0.0),
                      open_session=lambda: ChatSession(*app_model,
                                                       memory=open_memory(tmp / "app.memory")))
    triples = []
    async with app.run_test(size=(120, 40)) as pilot:
        while app.last_info is None:
            if app.start_error:
                raise SystemExit(f"the app could not start: {app.start_error}")
            await pilot.pause(0.02)
        for library in libraries:
            library_turn(library, "warm up", max_tokens)
        await app_turn(app, "warm up")
        for _ in range(rounds):
            for library in libraries:
                library.new_conversation()
            await app.on_engine(app.session.new_conversation)
            for prompt in PROMPTS:
                a = library_turn(libraries[0], prompt, max_tokens)
                in_app = await app_turn(app, prompt)
                b = library_turn(libraries[1], prompt, max_tokens)
                triples.append((a, in_app, b))
        await app.action_quit()
    for library in libraries:
        library.close()
    return triples


def in_terminal(argv: list[str], env: dict, marks: dict[str, str], size=(48, 160),
                timeout: float = 60.0) -> dict[str, float]:
    """Run `argv` in a pseudo-terminal of `size` (rows, columns); seconds until each text of
    `marks` (name → text) is on screen; then Ctrl+Q."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal size first, then the command
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        os.execvpe(argv[0], argv, env)
    start, raw, seen = time.perf_counter(), b"", {}
    try:
        while len(seen) < len(marks) and time.perf_counter() - start < timeout:
            ready, _, _ = select.select([fd], [], [], 0.01)
            if ready:
                try:
                    raw += os.read(fd, 1 << 16)
                except OSError:
                    break
                text = ANSI.sub("", raw.decode(errors="ignore"))
                for name, mark in marks.items():
                    if name not in seen and mark in text:
                        seen[name] = time.perf_counter() - start
        os.write(fd, b"\x11")  # Ctrl+Q
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            try:
                select.select([fd], [], [], 0.05) and os.read(fd, 1 << 16)
            except OSError:  # the terminal closed: the process is exiting
                pass
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        os.close(fd)
    if len(seen) < len(marks):
        raise SystemExit(f"{argv}: never showed {set(marks) - set(seen)}")
    return seen


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, timeout=120)
    return time.perf_counter() - start


def startup(rounds: int) -> dict:
    from dmem_mlx.demo import demo_model_path

    base = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
    base.pop("LD_PRELOAD", None)
    base.pop("DMEM_NO_OPENBLAS", None)
    preloaded = {**base, "LD_PRELOAD": OPENBLAS} if Path(OPENBLAS).is_file() else base
    chat = [sys.executable, "-m", "app.main"]
    reference = [sys.executable, "-c", f"import mlx_lm; mlx_lm.load({str(demo_model_path())!r})"]
    rows: dict[str, list[float]] = {k: [] for k in ("ui", "ready", "mlx_lm_load", "help",
                                                     "bad_memory", "not_a_memory",
                                                     "bad_model")}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as data:
            seen = in_terminal(chat, {**base, "XDG_DATA_HOME": data},
                               {"ui": "Enter sends", "ready": "new memory —"})
            notes = Path(data) / "notes.txt"
            notes.write_text("my notes\n")
            rows["not_a_memory"].append(timed([*chat, "--memory", str(notes)], base))
        rows["ui"].append(seen["ui"])
        rows["ready"].append(seen["ready"])
        rows["mlx_lm_load"].append(timed(reference, preloaded))
        rows["help"].append(timed([*chat, "--help"], base))
        rows["bad_memory"].append(timed([*chat, "--memory", "/no/such/dir/x.safetensors"], base))
        rows["bad_model"].append(timed([*chat, "--model", "/no/such/model"], base))
    result = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    result["ready_over_mlx_lm_load"] = round(result["ready"] / result["mlx_lm_load"], 2)
    targets = {"ready": 2.0, "help": 0.5, "bad_memory": 0.5, "not_a_memory": 0.5,
               "bad_model": 0.5}
    print(f"{'start-up (s, median of ' + str(rounds) + ')':34}{'time':>8}{'target':>8}")
    for key, label in [("ui", "first screen, input usable"), ("ready", "demo loaded, memory shown"),
                       ("mlx_lm_load", "plain mlx-lm load (reference)"),
                       ("help", "dmem-chat --help"), ("bad_memory", "bad --memory refused"),
                       ("not_a_memory", "text file as --memory refused"),
                       ("bad_model", "bad --model refused")]:
        target = f"≤ {targets[key]}" if key in targets else ""
        print(f"{label:34}{result[key]:>8.3f}{target:>8}")
    print(f"ready / plain mlx-lm load: {result['ready_over_mlx_lm_load']}")
    return {"bench": "app_startup", "rounds": rounds, **result,
            "openblas": Path(OPENBLAS).is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["decode", "startup", "all"], default="all")
    parser.add_argument("--model", help="converted δ-mem model (default: a tiny random one)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.what in ("startup", "all"):
        print(json.dumps(startup(args.rounds)))
    if args.what == "startup":
        return

    from dmem_mlx.tiny import make_tiny_dmem

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else make_tiny_dmem(tmp / "tiny")
        triples = asyncio.run(run(model_dir, tmp, args.max_tokens, args.rounds))

    def rate(row, key):
        return row["tok_s"] if key == "tok_s" else row["tokens"] / row["wall"]

    def median(rows, key):
        return statistics.median(rate(row, key) for row in rows)

    def app_over_lib(key):
        return statistics.median(rate(app, key) / ((rate(a, key) + rate(b, key)) / 2)
                                 for a, app, b in triples)

    def b_over_a(key):
        return statistics.median(rate(b, key) / rate(a, key) for a, _, b in triples)

    lib = [t[0] for t in triples] + [t[2] for t in triples]
    app = [t[1] for t in triples]
    result = {
        "bench": "app_decode", "model": str(args.model) if args.model else "tiny",
        "prompts": len(triples), "app_tokens": sum(r["tokens"] for r in app),
        "max_tokens": args.max_tokens,
        "library_tok_s": round(median(lib, "tok_s"), 1), "app_tok_s": round(median(app, "tok_s"), 1),
        "ratio": round(app_over_lib("tok_s"), 3), "control_ratio": round(b_over_a("tok_s"), 3),
        "library_wall_tok_s": round(median(lib, "wall"), 1),
        "app_wall_tok_s": round(median(app, "wall"), 1),
        "wall_ratio": round(app_over_lib("wall"), 3), "control_wall_ratio": round(b_over_a("wall"), 3),
        "ui_cpu_share": round(statistics.median(r["ui_cpu"] for r in app), 3),
        "tokens_match": all(a["tokens"] == x["tokens"] == b["tokens"] for a, x, b in triples),
    }

    print(f"{'':16}{'library':>10}{'app':>10}{'app/lib':>9}{'B/A':>7}")
    print(f"{'decode tok/s':16}{result['library_tok_s']:>10}{result['app_tok_s']:>10}"
          f"{result['ratio']:>9}{result['control_ratio']:>7}")
    print(f"{'wall tok/s':16}{result['library_wall_tok_s']:>10}{result['app_wall_tok_s']:>10}"
          f"{result['wall_ratio']:>9}{result['control_wall_ratio']:>7}")
    print(f"{'UI thread CPU':16}{'':>10}{result['ui_cpu_share']:>10.1%}")
    print(f"({len(triples)} prompts × (library A, app, library B), {result['app_tokens']} app "
          "tokens; medians; B/A = noise control; target app/lib ≥ 0.9)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
