"""dmem-serve: the OpenAI API over HTTP on localhost (official `openai` client and raw HTTP),
memory per user, batching that never mixes memories, and clean errors for bad requests."""

import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
import uvicorn

from dmem_mlx.runtime import ChatSession, MemoryFile, read_memory
from dmem_mlx.server import Limits, build_app
from dmem_mlx.server.cli import build_parser
from dmem_mlx.server.engine import Batch, ChatJob, Engine, Row, prefill, trim_capacity
from dmem_mlx.server.schemas import APIError, ChatRequest

openai = pytest.importorskip("openai")


class Server:
    """A dmem-serve app run by uvicorn in a thread on a free localhost port."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    model, tokenizer = tiny
    memories = tmp_path_factory.mktemp("memories")
    server = Server(build_app(model, tokenizer, memories, "tiny", max_concurrent=4,
                              limits=Limits(max_tokens=8, max_tokens_limit=64),
                              max_body_bytes=64 * 1024))
    yield server, memories
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, user, messages, **kw):
    r = client.chat.completions.create(model="tiny", messages=messages, user=user,
                                       max_tokens=kw.pop("max_tokens", 6), **kw)
    return r.choices[0].message.content, r


def alone(tiny, turns, max_tokens=6):
    """What a ChatSession gives for `turns` (user texts) on a fresh memory, greedy."""
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    replies = ["".join(c.text for c in session.reply(t, max_tokens=max_tokens)) for t in turns]
    return replies, session


def count_prefills(monkeypatch) -> list:
    """The number of rows of each batched prefill call the engine makes from now on."""
    from dmem_mlx.server import engine as engine_module

    calls = []
    real = engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill",
                        lambda m, caches, prompts: calls.append(len(prompts)) or
                        real(m, caches, prompts))
    return calls


def states_of(session):
    return {i: np.array(s[0]) for i, s in session._ctx.states().items() if s is not None}


# -- the OpenAI API ------------------------------------------------------------------------------
def test_openai_client_turns_are_saved_like_a_chat_session(tiny, served, client):
    _, memories = served
    history = [{"role": "user", "content": "Hi, I am Ada."}]
    first, r = ask(client, "ada", history)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": "Where do I live?"}]
    second, _ = ask(client, "ada", history)
    replies, session = alone(tiny, ["Hi, I am Ada.", "Where do I live?"])
    assert [first, second] == replies
    data = read_memory(memories / "ada.safetensors")
    assert data.transcript == session.messages  # written once: the resent turn not again
    assert data.turns == 2 and data.tokens_written == session.info().tokens_written
    for i, s in states_of(session).items():
        np.testing.assert_allclose(data.states[i], s, atol=1e-5)


def test_streaming_sends_chunks_usage_and_done(served):
    server, _ = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there."}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5,
            "user": "streamer"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    finish = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] <= 5
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert read_memory(served[1] / "streamer.safetensors").transcript[-1]["content"] == text


def test_streamed_usage_is_the_same_object_as_the_whole_reply(served):
    """Streamed with include_usage or not, a turn's usage is one object, prompt_tokens_details
    included: two memories given the same greedy turns agree on it, second turn too (where
    part of the prompt is already in the memory's context)."""
    server, _ = served

    def turns(memory: str, stream: bool) -> list[dict]:
        messages, usages = [], []
        for text in ("Hi, I am Ada.", "Where do I live?"):
            messages.append({"role": "user", "content": text})
            body = {"messages": messages, "user": memory, "max_tokens": 4, "temperature": 0}
            if not stream:
                reply = chat(server, body).json()
                usages.append(reply["usage"])
                messages.append(reply["choices"][0]["message"])
                continue
            body.update(stream=True, stream_options={"include_usage": True})
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                              timeout=60) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: {")]
            usages.append(events[-1]["usage"])
            messages.append({"role": "assistant", "content": "".join(
                e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])})
        return usages

    whole, streamed = turns("usage-whole", False), turns("usage-streamed", True)
    assert streamed == whole
    assert whole[1]["prompt_tokens_details"]["cached_tokens"] > 0


def test_openai_client_streams(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi!"}], stream=True, max_tokens=4)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert isinstance("".join(pieces), str)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(served[0].url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_no_memory_writes_nothing(served, client):
    before = sorted(p.name for p in served[1].iterdir())
    ask(client, None, [{"role": "user", "content": "Nobody knows me."}])
    assert sorted(p.name for p in served[1].iterdir()) == before


def test_header_chooses_the_memory(served):
    r = httpx.post(served[0].url + "/v1/chat/completions", timeout=60,
                   headers={"X-Dmem-Memory": "Header-User"},
                   json={"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 3})
    assert r.status_code == 200
    assert (served[1] / "header-user.safetensors").is_file()  # ids are case-insensitive


def test_regenerated_and_edited_messages(tiny, served, client):
    """A client that resends a turn (regenerate) or edits an earlier message: the dropped
    messages' writes are undone (they are still in the server's context), and the memory ends
    as if the conversation had always been the client's."""
    _, memories = served
    h = [{"role": "user", "content": "My cat is Milo."}]
    a1, _ = ask(client, "editor", h)
    h += [{"role": "assistant", "content": a1}, {"role": "user", "content": "And my dog?"}]
    a2, _ = ask(client, "editor", h)
    again, _ = ask(client, "editor", h)  # regenerate the last reply
    assert again == a2
    replies, session = alone(tiny, ["My cat is Milo.", "And my dog?"])
    assert read_memory(memories / "editor.safetensors").transcript == session.messages
    h[-1] = {"role": "user", "content": "And my bird?"}  # edit the last question
    a3, _ = ask(client, "editor", h)
    replies, session = alone(tiny, ["My cat is Milo.", "And my bird?"])
    assert a3 == replies[1]
    data = read_memory(memories / "editor.safetensors")
    assert data.transcript == session.messages and data.turns == 2
    for i, s in states_of(session).items():
        np.testing.assert_allclose(data.states[i], s, atol=1e-5)


def test_regenerate_after_a_restart_uses_the_undo_history(tiny, tmp_path):
    """After a restart the dropped turn is not in any KV context: the memory file's undo
    history takes it back exactly, as ChatSession.undo() would."""
    model, tokenizer = tiny
    server = Server(build_app(model, tokenizer, tmp_path / "mem", "tiny"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    h = [{"role": "user", "content": "My cat is Milo."}]
    a1, _ = ask(client, "again", h)
    h += [{"role": "assistant", "content": a1}, {"role": "user", "content": "And my dog?"}]
    ask(client, "again", h)
    server.stop()  # the lock is released
    path = tmp_path / "mem" / "again.safetensors"
    (tmp_path / "copy.safetensors").write_bytes(path.read_bytes())
    server = Server(build_app(model, tokenizer, tmp_path / "mem", "tiny"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    try:
        again, _ = ask(client, "again", h)  # regenerate the last reply
    finally:
        server.stop()
    with ChatSession(model, tokenizer, memory=MemoryFile.open(tmp_path / "copy.safetensors")) \
            as reference:
        reference.undo()
        expected = "".join(c.text for c in reference.reply("And my dog?", max_tokens=6))
        data = read_memory(path)
        assert again == expected and data.transcript == reference.messages
        assert data.turns == reference.info().turns == 2
        for i, s in states_of(reference).items():
            np.testing.assert_allclose(data.states[i], s, atol=1e-5)


def test_new_conversation_keeps_the_memory(served, client):
    _, memories = served
    ask(client, "newconv", [{"role": "user", "content": "I live in Rome."}])
    before = read_memory(memories / "newconv.safetensors")
    ask(client, "newconv", [{"role": "user", "content": "Where do I live?"}])
    after = read_memory(memories / "newconv.safetensors")
    assert after.conversations == before.conversations + 1
    assert after.transcript[0]["content"] == "Where do I live?"
    assert after.tokens_written > before.tokens_written  # the old writes are kept


def test_stop_strings_cut_the_reply_and_the_memory(served, client):
    _, memories = served
    text, r = ask(client, None, [{"role": "user", "content": "Hi, I am Ada."}], max_tokens=8)
    assert len(text) > 2
    stop = text[2:4]
    cut, r = ask(client, "stopper", [{"role": "user", "content": "Hi, I am Ada."}],
                 max_tokens=8, stop=[stop])
    assert cut == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    assert read_memory(memories / "stopper.safetensors").transcript[-1]["content"] == cut


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_mid_character_sends_and_keeps_no_replacement_character(
        tiny, served, monkeypatch, stream):
    """max_tokens inside the bytes of 'ok 😀': the client gets 'ok ' (streamed or not) and the
    memory file keeps it, as dmem-chat does; a complete U+FFFD mid-text stays."""
    server, memories = served
    _, tok = tiny
    ids = tok.encode("a\ufffd ok 😀", add_special_tokens=False)
    keep = next(k for k in range(len(ids)) if tok.decode(ids[:k]) == "a\ufffd ok \ufffd")
    # the reply is scripted: each row samples the next token of `ids`
    monkeypatch.setattr(Row, "sample", lambda row, _: mx.array(ids[len(row.turn.tokens)]))
    user = f"cut{int(stream)}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Smile?"}],
            "max_tokens": keep, "temperature": 1.0, "stream": stream, "user": user}
    if stream:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                          timeout=60) as r:
            events = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                      if line and line != "data: [DONE]"]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                       if e["choices"])
    else:
        text = chat(server, body).json()["choices"][0]["message"]["content"]
    assert text == "a\ufffd ok "
    assert read_memory(memories / f"{user}.safetensors").transcript[-1]["content"] == text


def test_memory_endpoints(served, client):
    server, memories = served
    ask(client, "memo", [{"role": "user", "content": "I like tea."}])
    info = httpx.get(server.url + "/v1/memories/memo").json()
    assert info["id"] == "memo" and info["turns"] == 1 and info["tokens_written"] > 0
    assert info["bytes"] == (memories / "memo.safetensors").stat().st_size
    assert info["last_saved"]
    snap = httpx.post(server.url + "/v1/memories/memo/snapshot", json={"name": "before"}).json()
    assert snap["name"] == "before"
    assert (memories / "memo.snapshots" / "before.safetensors").is_file()
    assert httpx.get(server.url + "/v1/memories/memo").json()["snapshots"] == ["before"]
    r = httpx.delete(server.url + "/v1/memories/memo")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not [p for p in memories.iterdir() if p.name.startswith("memo.")]
    assert httpx.get(server.url + "/v1/memories/memo").status_code == 404


def test_memory_info_open_or_not(tiny, tmp_path):
    """GET /v1/memories/{id} says whether the memory is open in the server (`loaded`); the
    fields about the open session are numbers when it is, null when not (never a 0 that
    reads as a fact); every other field is the same read from the file or from the session."""
    model, tokenizer = tiny
    from dmem_mlx.server.store import MemoryStore

    def make_store():
        return MemoryStore(tmp_path, {}, lambda m: ChatSession(model, tokenizer, memory=m))

    store = make_store()
    session = store.session("ada")
    for text in ("Hi, I am Ada.", "I live in Oslo."):
        list(session.reply(text, max_tokens=4))
    open_info = store.info("ada")
    store.close()
    restarted = make_store()
    closed_info = restarted.info("ada")
    restarted.session("ada")
    reopened_info = restarted.info("ada")
    restarted.close()
    session_only = {"loaded", "kv_tokens", "turns_in_memory_only"}
    assert open_info["loaded"] is True and reopened_info["loaded"] is True
    assert open_info["kv_tokens"] > 0 and open_info["turns_in_memory_only"] == 0
    assert closed_info["loaded"] is False
    assert closed_info["kv_tokens"] is None and closed_info["turns_in_memory_only"] is None
    assert isinstance(reopened_info["kv_tokens"], int)
    assert isinstance(reopened_info["turns_in_memory_only"], int)
    assert set(closed_info) == set(open_info)
    for key in set(open_info) - session_only:
        assert closed_info[key] == open_info[key] == reopened_info[key], key


# -- many users at once ----------------------------------------------------------------------------
def test_batch_rows_never_see_each_other(tiny):
    """Row B's logits when decoded in one batch with A (longer context: B is left-padded) equal
    B's logits served alone, step after step."""
    model, tokenizer = tiny
    a = ChatSession(model, tokenizer)
    for _ in a.reply("I am Ada and I live in Paris with my cat Milo, a very old cat.",
                     max_tokens=4):
        pass
    b, b_alone = ChatSession(model, tokenizer), ChatSession(model, tokenizer)
    turn_a = a.begin_reply("Where do I live?", 8)
    turn_b = b.begin_reply("Who am I?", 8)
    turn_ref = b_alone.begin_reply("Who am I?", 8)
    assert np.abs(np.array(turn_b.logits) - np.array(turn_ref.logits)).max() <= 1e-5
    batch = Batch(model)
    job = ChatJob(ChatRequest([], "", "tiny", None), lambda *a: None)
    rows = [Row(job, a, turn_a, tokenizer), Row(job, b, turn_b, tokenizer)]
    batch.add(rows)
    assert batch.cache[0].left_padding.tolist()[1] > 0
    tokens_a, tokens_b = [5, 17, 9, 33], [40, 2, 61, 7]
    worst = 0.0
    for ta, tb in zip(tokens_a, tokens_b):
        logits = batch.step([ta, tb])
        a.record_token(turn_a, ta)
        b.record_token(turn_b, tb)
        ref = b_alone.feed_token(turn_ref, tb)
        worst = max(worst, float(mx.abs(logits[1] - ref).max()))
    assert worst <= 1e-5
    batch.remove([rows[1]])  # B's cache and state go back to its session
    b.end_reply(turn_b, "length", None)
    b_alone.end_reply(turn_ref, "length", None)
    assert b.messages == b_alone.messages
    for i, s in states_of(b_alone).items():
        np.testing.assert_allclose(states_of(b)[i], s, atol=1e-5)
    batch.remove([rows[0]])
    a.end_reply(turn_a, "length", None)
    assert len(batch) == 0


def test_rows_leaving_together_each_get_their_own_memory_back(tiny):
    """Rows that end in the same step leave in one filter of the batch: each session gets
    back the KV context and δ state it has alone, and the row that stays decodes on as alone."""
    model, tokenizer = tiny
    texts = ["Hi.", "I am Ada and I live in Paris with my cat Milo.", "Who am I?"]
    batched, solo = [], []
    for k, text in enumerate(texts):
        pair = [ChatSession(model, tokenizer) for _ in range(2)]
        for session in pair:
            for t in range(k):  # contexts of different lengths: rows are left-padded
                session.feed([{"role": "user", "content": f"Fact {t}: the sky is blue."},
                              {"role": "assistant", "content": "Noted."}])
        batched.append((pair[0], pair[0].begin_reply(text, 8)))
        solo.append((pair[1], pair[1].begin_reply(text, 8)))
    batch = Batch(model)
    job = ChatJob(ChatRequest([], "", "tiny", None), lambda *a: None)
    rows = [Row(job, s, t, tokenizer) for s, t in batched]
    batch.add(rows)
    for step in range(3):
        tokens = [7 + 5 * k + step for k in range(3)]
        batch.step(tokens)
        for k, ((s, t), (alone_s, alone_t)) in enumerate(zip(batched, solo)):
            s.record_token(t, tokens[k])
            alone_s.feed_token(alone_t, tokens[k])
    batch.remove([rows[2], rows[0]])  # not in batch order
    assert batch.rows == [rows[1]] and batch.cache[0].keys.shape[0] == 1
    for k in (0, 2):
        (s, t), (alone_s, alone_t) = batched[k], solo[k]
        assert len(s._ctx) == len(alone_s._ctx)
        for i, state in states_of(alone_s).items():
            np.testing.assert_allclose(states_of(s)[i], state, atol=1e-5)
        ours, ref = s.feed_token(t, 11), alone_s.feed_token(alone_t, 11)
        assert float(mx.abs(ours - ref).max()) <= 1e-5
        s.end_reply(t, "length")
        alone_s.end_reply(alone_t, "length")
        assert s.messages == alone_s.messages
    (s, t), (alone_s, alone_t) = batched[1], solo[1]
    logits = batch.step([11])
    s.record_token(t, 11)
    assert float(mx.abs(logits[0] - alone_s.feed_token(alone_t, 11)).max()) <= 1e-5
    batch.remove([rows[1]])
    assert len(batch) == 0 and batch.cache == []
    for i, state in states_of(alone_s).items():
        np.testing.assert_allclose(states_of(s)[i], state, atol=1e-5)


def test_prefill_together_gives_each_row_its_solo_logits(tiny):
    """Prompts of different lengths after contexts of different lengths, prefilled in one call
    (contexts left-padded, prompts right-padded): each row's first-token logits, its δ state
    (padding never written) and its next token's logits equal those of the row alone."""
    model, tokenizer = tiny
    texts = ["Hi.", "I am Ada and I live in Paris with my cat Milo, a very old cat. "
             "She sleeps all day long.", "Who am I?"]
    solo, together = [], []
    for k, text in enumerate(texts):
        pair = [ChatSession(model, tokenizer) for _ in range(2)]
        for session in pair:
            for t in range(k + 1):  # histories of different lengths
                session.feed([{"role": "user", "content": f"Fact {t}: the sky is blue."},
                              {"role": "assistant", "content": "Noted."}])
        solo.append((pair[0], pair[0].begin_reply(text, 8)))
        together.append((pair[1], pair[1].begin_reply(text, 8, defer=True)))
    lengths = [len(t.pending.ids) for _, t in together]
    assert len(set(lengths)) == 3 and len({len(s._ctx) for s, _ in together}) == 3
    logits, caches = prefill(model, [s._ctx.cache for s, _ in together],
                             [t.pending.ids for _, t in together])
    for k, ((alone_s, alone_t), (s, t)) in enumerate(zip(solo, together)):
        s.complete_prompt(t, logits[k], caches[k])
        assert t.pending is None and len(s._ctx) == len(alone_s._ctx)
        assert float(mx.abs(t.logits - alone_t.logits).max()) <= 1e-5
        for i, state in states_of(alone_s).items():
            np.testing.assert_allclose(states_of(s)[i], state, atol=1e-5)
        step = float(mx.abs(s.feed_token(t, 11) - alone_s.feed_token(alone_t, 11)).max())
        assert step <= 1e-5
        s.end_reply(t, "length")
        alone_s.end_reply(alone_t, "length")
        assert s.messages == alone_s.messages and s.info().tokens_written == \
            alone_s.info().tokens_written


def test_prefill_rolls_only_the_fed_positions(tiny, monkeypatch):
    """Moving the prompts' right padding to the left (mlx-lm's `finalize`, a roll of the KV
    buffers) covers the positions fed, not the spare room mlx-lm's cache grows by (256 at a
    time); each row still gets its solo logits."""
    from mlx_lm.models.cache import BatchKVCache

    model, tokenizer = tiny
    sizes, real = [], BatchKVCache.finalize

    def finalize(cache):
        sizes.append((cache.keys.shape[2], cache._idx))
        real(cache)

    monkeypatch.setattr(BatchKVCache, "finalize", finalize)
    rows, solo = [], []
    for k, text in enumerate(["Hi.", "I am Ada and I live in Paris with my old cat Milo."]):
        pair = [ChatSession(model, tokenizer) for _ in range(2)]
        for session in pair:
            session.feed([{"role": "user", "content": f"Fact {k}."},
                          {"role": "assistant", "content": "Noted."}])
        solo.append(pair[0].begin_reply(text, 4).logits)
        rows.append((pair[1], pair[1].begin_reply(text, 4, defer=True)))
    logits, _ = prefill(model, [s._ctx.cache for s, _ in rows], [t.pending.ids for _, t in rows])
    assert sizes and all(size == filled for size, filled in sizes)
    for k, alone_logits in enumerate(solo):
        assert float(mx.abs(logits[k] - alone_logits).max()) <= 1e-5


def test_trim_capacity_keeps_what_mlx_lm_filled_and_leaves_a_rotating_cache_alone():
    """trim_capacity reads the fill mark of mlx-lm's BatchKVCache, `_idx` (private; its public
    `size()` exists only from mlx-lm 0.31.2): this fails if mlx-lm renames it or changes what it
    means. A rotating cache, whose `_idx` is a write position, is never cut."""
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache

    keys = mx.random.normal((2, 1, 5, 4))
    cache = BatchKVCache(left_padding=[0, 2])
    cache.update_and_fetch(keys, keys + 1)
    assert cache.keys.shape[2] > 5 and cache._idx == 5  # spare room after the 5 positions fed
    if "size" in vars(BatchKVCache):  # mlx-lm ≥ 0.31.2: the public reading agrees
        assert cache.size() == cache._idx
    trim_capacity(cache)
    assert cache.keys.shape[2] == 5
    assert mx.array_equal(cache.keys, keys) and mx.array_equal(cache.values, keys + 1)
    cache.update_and_fetch(keys[..., :1, :], keys[..., :1, :])  # room grows again
    assert cache._idx == 6 and mx.array_equal(cache.keys[..., 5, :], keys[..., 0, :])

    rotating = BatchRotatingKVCache(max_size=8, left_padding=[0, 2])
    rotating.update_and_fetch(keys, keys)
    for _ in range(4):  # past max_size: the write position wraps round
        rotating.update_and_fetch(keys[..., :1, :], keys[..., :1, :])
    before = rotating.keys
    assert rotating.rotated and rotating._idx < before.shape[2]
    trim_capacity(rotating)
    assert rotating.keys is before


def test_a_deferred_prompt_can_be_taken_back(tiny):
    """A turn whose pending prompt is never fed (the client left) leaves the session as it was."""
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    session.feed([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}])
    before = (session.messages, states_of(session), len(session._ctx),
              session.info().tokens_written)
    turn = session.begin_reply("Who am I?", 8, defer=True)
    session.cancel_reply(turn)
    assert (session.messages, len(session._ctx), session.info().tokens_written) == \
        (before[0], before[2], before[3])
    for i, state in before[1].items():
        np.testing.assert_array_equal(states_of(session)[i], state)
    reply = "".join(c.text for c in session.reply("Who am I?", max_tokens=4))
    ref = ChatSession(model, tokenizer)
    ref.feed([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}])
    assert reply == "".join(c.text for c in ref.reply("Who am I?", max_tokens=4))


def test_concurrent_users_get_what_they_get_alone(tiny, served, client):
    """Four users at once (decoded in one batch) get the replies and memories they get alone;
    requests for one memory are served one after the other."""
    _, memories = served
    users = {f"u{k}": f"Hello, my name is {name}." for k, name in
             enumerate(["Ada", "Bob", "Cleo", "Dan"])}
    results = {}

    def run(user, text):
        results[user] = ask(client, user, [{"role": "user", "content": text}], max_tokens=8)[0]

    threads = [threading.Thread(target=run, args=item) for item in users.items()]
    threads += [threading.Thread(target=run, args=("u0-again", "x"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for user, text in users.items():
        replies, session = alone(tiny, [text], max_tokens=8)
        assert results[user] == replies[0]
        data = read_memory(memories / f"{user}.safetensors")
        assert data.transcript == session.messages
        for i, s in states_of(session).items():
            np.testing.assert_allclose(data.states[i], s, atol=1e-5)


def test_same_memory_requests_are_serialized(served, client):
    _, memories = served
    threads = [threading.Thread(target=ask, args=(client, "shared",
                                                  [{"role": "user", "content": f"Turn {k}."}]))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = read_memory(memories / "shared.safetensors")
    assert data.turns == 3 and data.conversations == 3  # each a whole turn, none interleaved


# -- bad requests ----------------------------------------------------------------------------------
def check_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"]
    assert "Traceback" not in r.text and "File \"" not in r.text
    return body["error"]


def chat(server, body=None, content=None, headers=None):
    return httpx.post(server.url + "/v1/chat/completions", json=body, content=content,
                      headers=headers, timeout=60)


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 5000,
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": "hello"}).encode(),
    json.dumps({"messages": [{"role": "user"}]}).encode(),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
    json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 2}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "seed": -1}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(),
])
def test_malformed_requests_get_400(served, body):
    check_error(chat(served[0], content=body, headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize("user", ["../etc/passwd", "a/b", "a\\b", "..", "a..b", ".hidden",
                                  "x" * 65, "", "naïve", "a b", "nul\x00", 42, "end."])
def test_bad_memory_ids_get_400_and_touch_nothing(served, user):
    server, memories = served
    before = sorted(p.name for p in memories.parent.rglob("*"))
    error = check_error(chat(server, {"messages": [{"role": "user", "content": "x"}],
                                      "user": user}), 400)
    assert error["param"] == "user"
    assert sorted(p.name for p in memories.parent.rglob("*")) == before


@pytest.mark.parametrize("path", ["/v1/memories/..%2F..%2Fetc%2Fpasswd", "/v1/memories/%2e%2e",
                                  "/v1/memories/a%5Cb", "/v1/memories/" + "y" * 100])
def test_traversal_in_memory_urls_is_refused(served, path):
    r = httpx.get(served[0].url + path)
    check_error(r, 400 if r.status_code == 400 else 404)
    check_error(httpx.delete(served[0].url + path), r.status_code)


def test_unknown_routes_and_memories_get_404(served):
    check_error(httpx.get(served[0].url + "/v1/nothing"), 404)
    check_error(httpx.get(served[0].url + "/v1/memories/never-seen"), 404)
    check_error(httpx.delete(served[0].url + "/v1/memories/never-seen"), 404)
    check_error(httpx.post(served[0].url + "/v1/memories/never-seen/snapshot"), 404)
    check_error(httpx.get(served[0].url + "/v1/chat/completions"), 405)


def test_an_unknown_model_is_404_and_none_is_the_served_one(served, client):
    """As OpenAI answers a model it does not serve: 404 model_not_found (nothing written); a
    request naming no model gets the one model served (as mlx_lm.server's default)."""
    server, memories = served
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", user="wrong-model", max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert info.value.code == "model_not_found" and "'tiny'" in info.value.message
    assert not (memories / "wrong-model.safetensors").exists()
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_oversized_bodies_get_413(served):
    big = {"messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    check_error(chat(served[0], big), 413)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(70):
            yield b" " * 1024
    check_error(httpx.post(served[0].url + "/v1/chat/completions", content=chunks(),
                           timeout=60), 413)


def test_a_non_string_user_is_named_as_such(served):
    error = check_error(chat(served[0], {"messages": [{"role": "user", "content": "x"}],
                                         "user": 5}), 400)
    assert error["message"] == "user must be a string (a memory id), not int"


def test_usage_of_a_message_longer_than_the_context(tiny, tmp_path):
    """A message read into δ in parts still counts every token read; nothing is negative."""
    model, tokenizer = tiny
    server = Server(build_app(model, tokenizer, tmp_path, "tiny", max_kv_tokens=160,
                              limits=Limits(max_tokens=4, max_tokens_limit=8)))
    try:
        text = "my cat is named tom. " * 40
        r = chat(server, {"messages": [{"role": "user", "content": text}], "user": "long",
                          "max_tokens": 4})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
        assert usage["prompt_tokens"] >= len(tokenizer.encode(text))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    finally:
        server.stop()


def test_context_too_long_is_a_clean_400(tiny, tmp_path):
    model, tokenizer = tiny
    server = Server(build_app(model, tokenizer, tmp_path, "tiny", max_kv_tokens=32))
    try:
        error = check_error(chat(server, {"messages": [{"role": "user", "content": "word " * 200}],
                                          "user": "long"}), 400)
        assert error["code"] == "context_length_exceeded"
        assert not (tmp_path / "long.safetensors").exists()
    finally:
        server.stop()


def test_api_key_required_and_compared_in_constant_time(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    server = Server(build_app(model, tokenizer, tmp_path, "tiny", api_key="s3cret"))
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        check_error(chat(server, body), 401)
        check_error(chat(server, body, headers={"Authorization": "Bearer wrong"}), 401)
        check_error(chat(server, body, headers={"Authorization": "s3cret"}), 401)
        check_error(httpx.get(server.url + "/v1/memories/x"), 401)
        assert compared
        assert httpx.get(server.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope",
                          max_retries=0).models.list()
    finally:
        server.stop()


def test_requests_starting_together_share_a_prefill_and_one_alone_uses_its_own(
        tiny, tmp_path, monkeypatch):
    """Requests that start in the same round are prefilled in one batched call; a request
    starting alone is fed on its own cache (no call of `prefill`). Either way each reply and
    memory is the one the user gets alone, streamed text included."""
    model, tokenizer = tiny
    from dmem_mlx.server.store import MemoryStore

    calls = count_prefills(monkeypatch)
    store = MemoryStore(tmp_path, {}, lambda m: ChatSession(model, tokenizer, memory=m))
    engine = Engine(model, tokenizer, store, max_concurrent=4)
    texts = {"a": "Hello, my name is Ada.", "b": "I live in Paris.", "c": "Who am I?"}

    def submit(user, text):
        events, done = [], threading.Event()

        def emit(kind, value):
            events.append((kind, value))
            if kind in ("done", "error"):
                done.set()

        engine.submit(ChatJob(ChatRequest([], text, "tiny", user, max_tokens=8), emit))
        return events, done

    together = {user: submit(user, text) for user, text in texts.items()}  # before start
    engine.start()
    try:
        for events, done in together.values():
            assert done.wait(60)
        assert calls == [3]
        later = submit("d", "Tell me a story.")
        assert later[1].wait(60)
        assert calls == [3]  # alone: no batched prefill
    finally:
        engine.stop()
    for user, text in [*texts.items(), ("d", "Tell me a story.")]:
        events = together[user][0] if user in together else later[0]
        kind, reply = events[-1]
        assert kind == "done"
        replies, session = alone(tiny, [text], max_tokens=8)
        assert reply.text == replies[0] == "".join(v for k, v in events if k == "delta")
        data = read_memory(tmp_path / f"{user}.safetensors")
        assert data.transcript == session.messages
        for i, state in states_of(session).items():
            np.testing.assert_allclose(data.states[i], state, atol=1e-5)


def test_held_arrivals_share_the_next_prefill(tiny, tmp_path, monkeypatch):
    """With hold_arrivals, a request arriving while others decode waits one decode step and is
    prefilled with what arrived meanwhile (one call for both); a request arriving with nothing
    decoding starts at once. Replies and memories are still each user's alone. (The worker's
    rounds are run here by hand, so what arrives when is exact.)"""
    model, tokenizer = tiny
    from dmem_mlx.server.store import MemoryStore

    calls = count_prefills(monkeypatch)
    store = MemoryStore(tmp_path, {}, lambda m: ChatSession(model, tokenizer, memory=m))
    engine = Engine(model, tokenizer, store, max_concurrent=4, hold_arrivals=True)
    texts = {"a": "Hello, my name is Ada.", "b": "I live in Paris.", "c": "Who am I?"}
    events = {user: [] for user in texts}

    def submit(user):
        engine.submit(ChatJob(ChatRequest([], texts[user], "tiny", user, max_tokens=8),
                              lambda kind, value: events[user].append((kind, value))))

    def round_(step=True):
        engine._round(block=False)
        engine._start_ready()
        if step and engine._batch.rows:
            engine._step()

    try:
        submit("a")
        round_(step=False)
        assert len(engine._batch) == 1 and calls == []  # nothing decoding: started at once
        submit("b")
        round_(step=False)
        assert len(engine._batch) == 1 and calls == []  # held: a decodes one step first
        engine._step()
        submit("c")
        round_(step=False)
        assert len(engine._batch) == 3 and calls == [2]  # b and c in one prefill
        for _ in range(200):
            if not (engine._batch.rows or engine._waiting):
                break
            round_()
        engine._saver.close()
    finally:
        store.close()
    for user, text in texts.items():
        kind, reply = events[user][-1]
        assert kind == "done"
        replies, session = alone(tiny, [text], max_tokens=8)
        assert reply.text == replies[0]
        data = read_memory(tmp_path / f"{user}.safetensors")
        assert data.transcript == session.messages
        for i, state in states_of(session).items():
            np.testing.assert_allclose(data.states[i], state, atol=1e-5)


def test_a_full_queue_answers_429(tiny, tmp_path):
    model, tokenizer = tiny
    from dmem_mlx.server.store import MemoryStore

    store = MemoryStore(tmp_path, {}, lambda m: ChatSession(model, tokenizer, memory=m))
    engine = Engine(model, tokenizer, store, max_concurrent=1, max_queue=1)  # not started
    req = ChatRequest([], "x", "tiny", None)
    engine.submit(ChatJob(req, lambda *a: None))
    engine.submit(ChatJob(req, lambda *a: None))
    with pytest.raises(APIError) as caught:
        engine.submit(ChatJob(req, lambda *a: None))
    assert caught.value.status == 429 and caught.value.body()["error"]["type"]


def test_a_turn_that_cannot_be_saved_is_a_clean_500_and_the_file_kept(served, disk):
    server, memories = served
    path = memories / "full-disk.safetensors"
    messages = [{"role": "user", "content": "My name is Ada."}]
    r = chat(server, {"messages": messages, "user": "full-disk"})
    assert r.status_code == 200, r.text
    before = path.read_bytes()
    messages += [r.json()["choices"][0]["message"], {"role": "user", "content": "I live in Paris."}]
    disk.full = True
    for stream in (False, True):
        r = chat(server, {"messages": messages, "user": "full-disk", "stream": stream})
        if stream:  # the reply streamed, then the error event (after a 200)
            assert r.status_code == 200 and "Traceback" not in r.text
            [error] = [json.loads(line[6:])["error"] for line in r.text.splitlines()
                       if line.startswith("data: {\"error\"")]
        else:
            error = check_error(r, 500)
        assert error["code"] == "save_failed" and "No space left on device" in error["message"]
        assert str(memories) not in error["message"]
        assert path.read_bytes() == before
    disk.full = False  # space freed: the client sends again, and it is saved
    r = chat(server, {"messages": messages, "user": "full-disk"})
    assert r.status_code == 200, r.text
    assert [m["content"] for m in read_memory(path).transcript if m["role"] == "user"] == [
        "My name is Ada.", "I live in Paris."]


def test_a_memory_open_elsewhere_is_a_clean_409(served, client):
    server, memories = served
    with MemoryFile.open(memories / "taken.safetensors"):  # e.g. a dmem-chat on it
        error = check_error(chat(server, {"messages": [{"role": "user", "content": "x"}],
                                          "user": "taken"}), 409)
    assert error["code"] == "memory_locked"


def test_a_read_only_memory_file_is_a_clean_409_without_dmem_chats_way_on(tiny, served):
    """The runtime says the file cannot be written; the server words it for an HTTP client (no
    "open it read-only", no flag) and leaves the file as it is."""
    server, memories = served
    path = memories / "frozen.safetensors"
    with ChatSession(*tiny, memory=MemoryFile.open(path)) as session:
        list(session.reply("I like tea.", max_tokens=2))
    path.chmod(0o444)
    before = path.read_bytes()
    error = check_error(chat(server, {"messages": [{"role": "user", "content": "x"}],
                                      "user": "frozen"}), 409)
    assert error["code"] == "memory_unusable"
    assert error["message"] == ("memory 'frozen' cannot be used: the server cannot save it (the "
                                "file is read-only (mode 444))")
    assert path.read_bytes() == before


def test_a_damaged_memory_file_is_a_clean_409_and_left_as_it_is(served):
    server, memories = served
    path = memories / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64))
    before = path.read_bytes()
    for r in (chat(server, {"messages": [{"role": "user", "content": "x"}], "user": "junk"}),
              httpx.get(server.url + "/v1/memories/junk")):
        assert check_error(r, 409)["code"] == "memory_unusable"
    assert path.read_bytes() == before


def test_a_memories_directory_on_a_read_only_file_system_is_the_same_409(served, mount):
    """A new memory where nothing can be written: refused as unusable (the README's 409 note),
    nothing created."""
    server, memories = served
    mount.read_only = True
    try:
        error = check_error(chat(server, {"messages": [{"role": "user", "content": "x"}],
                                          "user": "nowhere"}), 409)
    finally:
        mount.read_only = False
    assert error["code"] == "memory_unusable"
    assert error["message"].startswith("memory 'nowhere' cannot be used: the server cannot save")
    assert not [p for p in memories.iterdir() if p.name.startswith("nowhere")]


def test_cli_binds_to_localhost_and_refuses_bad_flags(tmp_path):
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1"
    run = subprocess.run([sys.executable, "-m", "dmem_mlx.server", "--port", "99999"],
                         capture_output=True, text=True, timeout=120,
                         env={"DMEM_NO_OPENBLAS": "1", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "--port" in run.stderr
    assert "Traceback" not in run.stderr
