"""δ-mem across processes: 2 ranks on localhost with `mlx.launch --backend ring`.

One launch of tests/distributed_worker.py covers tensor parallelism (both attach orders) and
pipeline parallelism on a Qwen3 and a SmolLM3 tiny backbone, then the memory file of a chat;
the tests read its figures. Skipped with the reason when the launcher cannot start here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
import uvicorn
from mlx_lm.models.pipeline import PipelineMixin

import dmem_mlx
from dmem_mlx import attach_delta_mem
from dmem_mlx.cache import make_prompt_cache
from dmem_mlx.config import DeltaMemConfig
from dmem_mlx.errors import DistributedError
from dmem_mlx.distributed import free_port_pair, pipeline, pipeline_split
from dmem_mlx.generate import main as generate_main
from dmem_mlx.model import delta_parameters, load_delta_parameters
from dmem_mlx.runtime import read_memory
from dmem_mlx.server import build_app
from dmem_mlx.tiny import build_model, make_tiny_dmem, tiny_args

HERE = Path(__file__).parent
ROOT = HERE.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
TOLERANCE = 1e-5
BACKBONES = ("qwen3", "smollm3")


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n 2` on localhost, this interpreter, this checkout first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", "-p", str(free_port_pair()),
           "--python", sys.executable, "--env", f"PYTHONPATH={env['PYTHONPATH']}", "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """Skip unless two ranks can start here and sum across each other."""
    if not LAUNCH.exists():
        pytest.skip(f"mlx.launch not found next to {sys.executable}")
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text("import mlx.core as mx\n"
                     "g = mx.distributed.init()\n"
                     "print(g.size(), mx.distributed.all_sum(mx.array(1.0)).item())\n")
    try:
        done = launch(str(probe), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("mlx.launch --backend ring -n 2 did not finish a probe in 120 s")
    if done.returncode != 0 or done.stdout.split() != ["2", "2.0"] * 2:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"mlx.launch --backend ring -n 2 cannot run here: {last}")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny δ-mem models with all four Δ heads (Δq/Δk/Δv split with the heads, Δo is not)."""
    base = tmp_path_factory.mktemp("distributed")
    return {name: make_tiny_dmem(base / name, name,
                                 delta_config={"delta_heads": ["q", "k", "v", "o"]})
            for name in BACKBONES}


@pytest.fixture(scope="module")
def figures(launcher, tiny_dirs):
    """The worker's figures {backbone: {mode: {...}}} from one 2-rank launch."""
    out = tiny_dirs[BACKBONES[0]].parent / "out" / "figures.json"
    done = launch(str(HERE / "distributed_worker.py"), str(out), *map(str, tiny_dirs.values()))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["tensor", "tensor_attach_first", "pipeline"])
def test_logits_and_state_match_one_process(figures, backbone, mode):
    row = figures[backbone][mode]
    assert row["logits_prefill"] <= TOLERANCE and row["logits_decode"] <= TOLERANCE, row
    assert row["state_vs_single"] <= TOLERANCE, row
    assert row["state_identical_across_ranks"], row


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_memory_file_matches_one_process(figures, backbone, mode):
    row = figures[backbone][mode]
    assert row["file_layers_equal"] and row["file_transcript_equal"], row
    assert row["file_counts_equal"] and row["file_fingerprint_equal"], row
    assert row["file_undo_steps"][0] == row["file_undo_steps"][1] > 0, row
    assert row["file_state_max_diff"] <= TOLERANCE, row  # the state and every undo step
    assert row["reload_exact_on_every_rank"], row  # broadcast on load
    if backbone != BACKBONES[0]:  # offered the first backbone's memory file: refused by all
        assert row["foreign_file_refused_on_every_rank"], row
        assert row["foreign_file_message_one_line"], row


@pytest.mark.parametrize("extra", [[], ["--pipeline"]])
def test_generate_cli_under_mlx_launch(launcher, tiny_dirs, capsys, extra):
    """`python -m dmem_mlx.generate` on 2 ranks prints once, the single process's replies."""
    argv = ["--model", str(tiny_dirs["qwen3"]), "--prompt", "My name is Ada.",
            "--prompt", "What is my name?", "-m", "8"]
    assert generate_main(argv) == 0  # one process: this one
    single = capsys.readouterr().out
    done = launch("-m", "dmem_mlx.generate", *argv, *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == single
    assert "[ring]" not in done.stderr, done.stderr[-2000:]  # nothing left in flight at exit


# -- in one process -------------------------------------------------------------------------

class _Group:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _Layers(PipelineMixin):
    def __init__(self, n: int):
        super().__init__()
        self.layers = list(range(n))


@pytest.mark.parametrize("layers,size", [(4, 2), (5, 2), (7, 3), (36, 4)])
def test_pipeline_split_is_mlx_lms(layers, size):
    for rank in range(size):
        theirs = _Layers(layers)
        theirs.pipeline(_Group(rank, size))
        assert pipeline_split(layers, size)[rank] == (theirs.start_idx, theirs.end_idx)


def test_pipeline_split_refuses_bad_split():
    with pytest.raises(DistributedError, match="pipeline split"):
        pipeline_split(4, 2, [4, 0])


def test_one_stage_pipeline_is_the_model_and_late_attach_is_refused():
    args = tiny_args("qwen3")
    config = DeltaMemConfig.from_dict({"delta_heads": ["q", "o"]})
    plain, split = build_model(args), build_model(args)
    mx.random.seed(1)
    weights = None
    for model in (plain, split):
        attach_delta_mem(model, config)
        weights = weights or {k: mx.random.normal(v.shape) * 0.3
                              for k, v in delta_parameters(model).items()}
        load_delta_parameters(model, weights)
    pipeline(split, mx.distributed.init())  # a group of one outside mlx.launch
    x = mx.array([[3, 1, 4, 1, 5]])
    assert mx.array_equal(plain(x, cache=make_prompt_cache(plain)),
                          split(x, cache=make_prompt_cache(split)))
    late = build_model(args)
    pipeline(late, mx.distributed.init())
    with pytest.raises(DistributedError, match="before splitting the pipeline") as info:
        attach_delta_mem(late, config)
    assert "\n" not in str(info.value)


def test_shard_refuses_heads_that_do_not_split():
    """mlx-lm's shard() would floor 1 key/value head to 0 over 2 ranks; refused instead."""
    from dmem_mlx.distributed import shard

    model = build_model(tiny_args("qwen3", num_key_value_heads=1))
    with pytest.raises(DistributedError, match="1 key/value heads"):
        shard(model, _Group(0, 2))  # refused before any communication


# -- dmem-serve on 2 ranks ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conversation(url: str) -> dict:
    """Replies and memory calls, the first two requests sent together (one batch)."""
    model = httpx.get(url + "/v1/models", timeout=300).json()["data"][0]["id"]

    def chat(user: str, text: str, **sampling) -> str:
        body = {"model": model, "user": user, "max_tokens": 8,
                "messages": [{"role": "user", "content": text}], **sampling}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    out: dict = {}
    pair = [threading.Thread(target=lambda: out.update(ada=chat("ada", "My name is Ada."))),
            threading.Thread(target=lambda: out.update(bob=chat(
                "bob", "I live in Paris.", temperature=0.8, seed=3)))]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    out["ada2"] = chat("ada", "What is my name?")
    out["info"] = httpx.get(url + "/v1/memories/ada", timeout=300).json()["turns"]
    out["snapshot"] = httpx.post(url + "/v1/memories/ada/snapshot", json={"name": "s1"},
                                 timeout=300).status_code
    out["delete"] = httpx.delete(url + "/v1/memories/bob", timeout=300).status_code
    out["carol"] = chat("carol", "I have a cat.")  # the ranks are still in step
    return out


def test_dmem_serve_under_mlx_launch(launcher, tiny_dirs, tmp_path):
    """dmem-serve on 2 ranks (pipeline parallel): the replies and memory files of one process."""
    path = tiny_dirs["qwen3"]
    model, tokenizer = dmem_mlx.load(str(path))
    server = uvicorn.Server(uvicorn.Config(build_app(model, tokenizer, tmp_path / "single"),
                                           host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    try:
        single = _conversation(f"http://127.0.0.1:{server.config.port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DMEM_NO_OPENBLAS="1")
    ranks = subprocess.Popen(
        [str(LAUNCH), "--backend", "ring", "-n", "2", "-p", str(free_port_pair()), "--python",
         sys.executable, "--env", f"PYTHONPATH={ROOT}", "--env", "DMEM_NO_OPENBLAS=1", "--",
         "-m", "dmem_mlx.server", "--model", str(path), "--memories", str(tmp_path / "two"),
         "--port", str(port), "--pipeline", "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            assert ranks.poll() is None, ranks.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "the 2-rank server did not start"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        two = _conversation(url)
    finally:
        os.killpg(ranks.pid, signal.SIGTERM)  # the launcher and both ranks (their own group)
        try:
            ranks.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ranks.pid, signal.SIGKILL)
    assert two == single
    for user in ("ada", "carol"):
        a = read_memory(tmp_path / "single" / f"{user}.safetensors")
        b = read_memory(tmp_path / "two" / f"{user}.safetensors")
        assert a.transcript == b.transcript and sorted(a.states) == sorted(b.states)
        for i in a.states:
            assert float(abs(a.states[i] - b.states[i]).max()) <= TOLERANCE
    assert (tmp_path / "two" / "ada.snapshots" / "s1.safetensors").is_file()
    assert not (tmp_path / "two" / "bob.safetensors").exists()
