"""Chat session semantics (DESIGN §2–3): suffix ingest, rollback/rebuild, EOS never written,
closing tokens, stopping midway, message/sentence ids, context budget and eviction."""

import threading

import mlx.core as mx
import numpy as np
import pytest

import dmem_mlx
from dmem_mlx.runtime import (ChatSession, ContextTooLongError, MemoryFile, read_memory, render,
                              sentence_spans)
from dmem_mlx.runtime.context import Context
from dmem_mlx.runtime import template as template_module
from dmem_mlx.runtime.template import closing_tokens
from dmem_mlx.tiny import make_tiny_dmem

SYSTEM = "You are a helpful assistant."
CHAT = [{"role": "user", "content": "Hello! My name is Ada."},
        {"role": "assistant", "content": "Hello Ada. How are you today?"},
        {"role": "user", "content": "I live in Paris with my cat Milo."},
        {"role": "assistant", "content": "Paris is nice. I like cats!"},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": "Your name is Ada."}]


@pytest.fixture(scope="module")
def tiny_message_mean(tmp_path_factory):
    path = make_tiny_dmem(tmp_path_factory.mktemp("tiny_mm"), seed=3, delta_config={
        "delta_heads": ["q", "o"], "memory_write_granularity": "message_mean"})
    return dmem_mlx.load(str(path))


def delta(session):
    """The δ state now (sessions on one model share it: take it before starting another)."""
    return {i: np.array(a) for i, a in session.info().layer_states.items()}


def assert_same_delta(a, b, atol=2e-5):
    for i in a:
        np.testing.assert_allclose(a[i], b[i], atol=atol, rtol=1e-4)


def differs(a, b, atol=1e-4):
    return any(np.abs(a[i] - b[i]).max() > atol for i in a)


def fresh_ingest(model, tokenizer, messages, system=SYSTEM):
    """A new session that ingests `messages` in one go."""
    session = ChatSession(model, tokenizer, system=system)
    session.feed(messages)
    return session


def force_eos_at(step, eos):
    calls = {"n": 0}

    def processor(tokens, logits):
        n, calls["n"] = calls["n"], calls["n"] + 1
        hot = mx.arange(logits.shape[-1]) == eos
        return mx.where(hot, 1e9, -1e9)[None] if n == step else mx.where(hot, -1e9, logits)
    return processor


def force(tokens):
    """A logits processor that makes the reply exactly `tokens`."""
    calls = {"n": 0}

    def processor(_, logits):
        n, calls["n"] = calls["n"], calls["n"] + 1
        return mx.where(mx.arange(logits.shape[-1]) == tokens[n], 1e9, -1e9)[None]
    return processor


def ban(token):
    def processor(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == token, -1e9, logits)
    return processor


def rendered_ids(session):
    return render(session.tokenizer, session.messages, False).ids


# -- template ids ----------------------------------------------------------------------------
def test_message_ids_match_the_chat_template(tiny):
    _, tok = tiny
    messages = [{"role": "system", "content": SYSTEM}, *CHAT[:3]]
    r = render(tok, messages, add_generation_prompt=True)
    ids, expected = [], []
    for number, m in zip([-1, 0, 1, 2], messages):  # ChatML blocks, each tokenized on its own
        block = tok.encode(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n",
                           add_special_tokens=False)
        ids += block
        expected += [number] * len(block)
        assert r.block_ends[len(r.block_ends) - 4 + number + 1] == len(ids)
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert r.ids == ids + prompt
    assert r.message_ids == expected + [-1] * len(prompt)


def test_sentence_ids_cover_content_tokens_only(tiny):
    _, tok = tiny
    content = "Hello there. How are you?\n\nI am fine"
    assert [content[a:b].strip() for a, b in sentence_spans(content)] == \
        ["Hello there.", "How are you?", "I am fine"]
    assert len(sentence_spans('He said "yes." Then he left; fine')) == 3
    messages = [{"role": "system", "content": "Be brief. Always."},
                {"role": "user", "content": content}, {"role": "assistant", "content": "Good."}]
    r = render(tok, messages, add_generation_prompt=False)
    text_of = lambda sid: tok.decode([t for t, s in zip(r.ids, r.sentence_ids) if s == sid])
    assert text_of(0).strip() == "Hello there." and text_of(1).strip() == "How are you?"
    assert text_of(2).strip() == "I am fine" and text_of(3) == "Good."
    # system content and template tokens (headers, <|im_end|>) never get a sentence id
    for t, s, m in zip(r.ids, r.sentence_ids, r.message_ids):
        if m < 0 or t in tok.all_special_ids:
            assert s == -1
    # global numbering: a context starting later continues the counts it is given
    later = render(tok, messages[2:], False, message_numbers=[1], sentence_starts=[3])
    assert set(later.message_ids) == {1} and set(later.sentence_ids) - {-1} == {3}


def test_closing_tokens_from_the_template(tiny):
    _, tok = tiny
    assert closing_tokens(tok) == tok.encode("<|im_end|>\n", add_special_tokens=False)


# -- ingest semantics ----------------------------------------------------------------------
def test_suffix_ingest_equals_whole_ingest(tiny):
    model, tok = tiny
    a = ChatSession(model, tok, system=SYSTEM)
    a.feed(CHAT[:2])
    a.feed(CHAT[2:4])
    a_delta, a_ids = delta(a), list(a._ctx.ids)
    b = fresh_ingest(model, tok, CHAT[:4])
    assert a_ids == list(b._ctx.ids) == rendered_ids(b)
    assert_same_delta(a_delta, delta(b))
    assert a.info().tokens_written == b.info().tokens_written == len(a_ids)
    # both continue identically
    b_reply = "".join(c.text for c in b.reply("And my cat?", max_tokens=6))
    fresh = ChatSession(model, tok, system=SYSTEM)
    fresh.feed(CHAT[:2])
    fresh.feed(CHAT[2:4])
    assert "".join(c.text for c in fresh.reply("And my cat?", max_tokens=6)) == b_reply


def test_sampled_eos_is_never_written_and_closing_tokens_are(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    session = ChatSession(model, tok, system=SYSTEM)
    fed = []
    step = session._ctx.step
    session._ctx.step = lambda token, *a, **k: fed.append(token) or step(token, *a, **k)
    reply = tok.encode("Hello Ada.", add_special_tokens=False)
    chunks = list(session.reply("Hello! My name is Ada.", max_tokens=20,
                                logits_processors=[force([*reply, eos])]))
    stats = session.last_reply
    assert stats.finish_reason == "stop" and stats.tokens == len(reply) and not stats.stopped
    assert stats.text == "Hello Ada." and not stats.rebuilt
    assert fed == reply  # the decode loop never fed the EOS
    reply_tokens = [c.token for c in chunks if c.token >= 0]
    assert reply_tokens == fed
    # what the context holds is exactly the rendered conversation, closing tokens included
    assert session._ctx.ids == rendered_ids(session)
    assert session._ctx.ids[-2:] == closing_tokens(tok)
    got = delta(session)
    # the state after: prompt + reply (no EOS) + <|im_end|>\n, fed by hand
    prompt = render(tok, session.messages[:2], True).ids
    model.delta_mem.reset()
    ctx = Context(model)
    ctx.ingest(prompt)
    for t in fed:
        ctx.step(t)
    ctx.ingest(closing_tokens(tok))
    by_hand = {i: np.array(s[0]) for i, s in ctx.states().items()}
    assert_same_delta(got, by_hand)
    # controls: had the EOS been fed too, or the closing tokens not, the state would differ
    model.delta_mem.reset()
    ctx = Context(model)
    ctx.ingest(prompt + fed + [eos] + closing_tokens(tok))
    assert differs(got, {i: np.array(s[0]) for i, s in ctx.states().items()})
    model.delta_mem.reset()
    ctx = Context(model)
    ctx.ingest(prompt + fed)
    assert differs(got, {i: np.array(s[0]) for i, s in ctx.states().items()})


def test_after_a_reply_state_equals_fresh_ingest_of_the_transcript(tiny):
    """Also covers replies whose text re-tokenizes differently (rolled back and rebuilt)."""
    model, tok = tiny
    session = ChatSession(model, tok, system=SYSTEM)
    rebuilt = []
    for text in ("Hello! My name is Ada.", "Where do I live?"):
        list(session.reply(text, max_tokens=12))
        rebuilt.append(session.last_reply.rebuilt)
        assert session._ctx.ids == rendered_ids(session)
    assert any(rebuilt), "the random model's replies should not all re-tokenize identically"
    got = delta(session)
    assert_same_delta(got, delta(fresh_ingest(model, tok, session.messages[1:])))


def test_rebuild_after_an_edit_equals_fresh_ingest(tiny):
    model, tok = tiny
    a = ChatSession(model, tok, system=SYSTEM)
    a.feed(CHAT[:2])
    a.feed(CHAT[2:4])
    before = len(a._ctx)
    a.edit_message(3, "I live in Rome with my dog Rex.")
    a.feed(CHAT[4:])
    a_delta, a_written = delta(a), a.info().tokens_written
    edited = [*CHAT[:2], {"role": "user", "content": "I live in Rome with my dog Rex."},
              *CHAT[3:]]
    b = fresh_ingest(model, tok, edited)
    assert a._ctx.ids == b._ctx.ids and len(a._ctx) > before
    assert_same_delta(a_delta, delta(b))
    assert a_written == b.info().tokens_written == len(b._ctx)
    # the old message's writes were undone
    assert differs(a_delta, delta(fresh_ingest(model, tok, CHAT)))


# -- stopping --------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["event", "close", "interrupt"])
def test_stopping_midway_keeps_everything_consistent(tiny, how):
    model, tok = tiny
    session = ChatSession(model, tok, system=SYSTEM)
    session.feed(CHAT[:2])
    stop = threading.Event()
    processors = [ban(tok.eos_token_id)]
    if how == "interrupt":
        calls = {"n": 0}

        def interrupt(tokens, logits):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return logits
        processors.append(interrupt)
    stream = session.reply("Where do I live?", max_tokens=50, stop=stop,
                           logits_processors=processors)
    got = []
    if how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            for chunk in stream:
                got.append(chunk)
    else:
        for chunk in stream:
            got.append(chunk)
            if len(got) == 3:
                if how == "event":
                    stop.set()
                else:
                    break
        if how == "close":
            stream.close()
    stats = session.last_reply
    assert stats.stopped and stats.tokens == 3
    assert stats.finish_reason == {"event": "stopped", "close": "stopped",
                                   "interrupt": "interrupted"}[how]
    messages = session.messages
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"] == stats.text
    assert session._ctx.ids == rendered_ids(session)
    got = delta(session)
    assert_same_delta(got, delta(fresh_ingest(model, tok, messages[1:])))


def test_stop_before_the_first_token_takes_the_turn_back(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, system=SYSTEM)
    session.feed(CHAT[:2])
    before, messages, ids = delta(session), session.messages, list(session._ctx.ids)
    stop = threading.Event()
    stop.set()
    assert list(session.reply("Where do I live?", stop=stop)) == []
    assert session.last_reply.stopped and session.last_reply.tokens == 0
    assert session.messages == messages and session._ctx.ids == ids
    assert not differs(before, delta(session), atol=0)


# -- message ids ------------------------------------------------------------------------------
def test_message_mean_adapter_gets_template_ids(tiny_message_mean):
    model, tok = tiny_message_mean
    calls = []
    original = Context._call

    def spy(self, ids, write, message_ids, sentence_ids, logits, **kw):
        calls.append((list(ids), write, message_ids and list(message_ids),
                      self.state.generation_message_id))
        return original(self, ids, write, message_ids, sentence_ids, logits, **kw)

    Context._call = spy
    try:
        session = ChatSession(model, tok, system=SYSTEM)
        session.feed(CHAT[:2])
        calls.clear()
        reply = tok.encode("You live in Paris.", add_special_tokens=False)
        list(session.reply("Where do I live?", max_tokens=len(reply),
                           logits_processors=[force(reply)]))
    finally:
        Context._call = original
    assert not session.last_reply.rebuilt
    prefill, *steps, closing = calls
    start = len(render(tok, session.messages[:3], False).ids)
    prompt = render(tok, session.messages[:4], True)
    assert prefill[0] == prompt.ids[start:] and prefill[2] == prompt.message_ids[start:]
    header = len(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    assert set(prefill[2][:-header]) == {2} and prefill[2][-header:] == [-1] * header
    assert prefill[3] is None
    assert all(s[2] == [3] and s[3] == 3 for s in steps)  # generated: the assistant's id
    assert closing[2] == [3, 3]
    assert session.state.generation_message_id is None  # put back after the reply


def test_message_mean_never_writes_system_tokens(tiny_message_mean):
    model, tok = tiny_message_mean
    session = ChatSession(model, tok, system=SYSTEM)
    session.feed([])
    session.feed([{"role": "system", "content": "Another rule."}])
    assert not differs(delta(session), {i: np.zeros_like(s) for i, s in delta(session).items()},
                       atol=0)
    session.feed(CHAT[:1])
    assert differs(delta(session), {i: np.zeros_like(s) for i, s in delta(session).items()})


# -- context budget ---------------------------------------------------------------------------
def test_eviction_rebuilds_read_only_and_writes_nothing_twice(tiny):
    model, tok = tiny
    budget = 150
    session = ChatSession(model, tok, system=SYSTEM, max_kv_tokens=budget)
    calls = []
    original = Context._call

    def spy(self, ids, write, message_ids, sentence_ids, logits, **kw):
        calls.append((len(ids), write, {i: s for i, s in self.states().items()}))
        return original(self, ids, write, message_ids, sentence_ids, logits, **kw)

    Context._call = spy
    evictions = 0
    try:
        for k in range(8):
            calls.clear()
            before = delta(session)
            written_before = session.info().tokens_written
            list(session.reply(f"Turn {k}: I like tea, books and long walks by the river.",
                               max_tokens=10, logits_processors=[ban(tok.eos_token_id)]))
            info = session.info()
            assert info.kv_tokens <= budget
            context = [session.messages[i] for i in session._context_indices()]
            assert session._ctx.ids == render(tok, context, False).ids
            # net tokens written this turn: exactly the new turn's (user block, prompt, reply,
            # closing), even when old turns were re-ingested to rebuild the context
            full = session.messages
            new = len(render(tok, full, False).ids) - (
                len(render(tok, full[:-2], False).ids) if k else 0)  # turn 0: system too
            assert info.tokens_written - written_before == new
            if session.last_reply.evicted_turns:
                evictions += 1
                reads = [c for c in calls if not c[1]]
                first_write = next(c for c in calls if c[1])
                assert reads and calls.index(reads[-1]) < calls.index(first_write)
                # the rebuilt context was read only: δ untouched until the new turn's tokens
                state = {i: np.array(s[0]) for i, s in first_write[2].items()}
                assert not differs(before, state, atol=0)
                assert sum(n for n, w, _ in calls if not w) >= len(render(
                    tok, context[:-2], False).ids)
    finally:
        Context._call = original
    assert evictions >= 2
    info = session.info()
    assert info.turns == 8 and info.turns_in_memory_only >= 4


def test_message_too_long_for_the_budget_is_refused(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, max_kv_tokens=40)
    before = delta(session)
    with pytest.raises(ContextTooLongError):
        list(session.reply("Hello! " * 40))
    assert session.messages == [] and not differs(before, delta(session), atol=0)


# -- modes ------------------------------------------------------------------------------------
def test_read_only_turns_write_nothing(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, system=SYSTEM)
    session.feed(CHAT[:2])
    before, written = delta(session), session.info().tokens_written
    session.read_only = True
    list(session.reply("Where do I live?", max_tokens=5))
    assert not differs(before, delta(session), atol=0)
    assert session.info().tokens_written == written and session.info().turns == 1
    session.read_only = False
    list(session.reply("Thanks.", max_tokens=5))  # the incognito turn is read, never written
    assert session.info().turns == 2
    assert session._ctx.ids == rendered_ids(session)
    assert session._data().transcript == [session.messages[i] for i in (0, 1, 2, 5, 6)]


def test_new_conversation_keeps_memory_and_forget_resets_it(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, system=SYSTEM)
    session.feed(CHAT[:4])
    kept = delta(session)
    session.new_conversation()
    assert session.messages == [{"role": "system", "content": SYSTEM}]
    assert session.info().kv_tokens == 0 and session.info().turns_in_memory_only == 2
    assert not differs(kept, delta(session), atol=0)
    session.forget()
    info = session.info()
    assert info.turns == info.tokens_written == 0
    assert all(not s.any() for s in info.layer_states.values())


# -- mechanics --------------------------------------------------------------------------------
def test_last_position_logits_equal_the_full_forward(tiny):
    model, tok = tiny
    ids = render(tok, [{"role": "system", "content": SYSTEM}, *CHAT], True).ids
    model.delta_mem.reset()
    full = model(mx.array(ids)[None])[0, -1]
    model.delta_mem.reset()
    ctx = Context(model, prefill_step=32)  # several chunks, logits from the last one only
    last = ctx.ingest(ids, logits=True)
    np.testing.assert_allclose(np.array(last), np.array(full), atol=1e-4, rtol=1e-4)
    assert ctx.ids == ids and ctx.n_written == len(ids)


def test_interrupt_during_prefill_takes_the_turn_back(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, system=SYSTEM, prefill_step=8)
    session.feed(CHAT[:2])
    before, messages, ids = delta(session), session.messages, list(session._ctx.ids)
    written = session.info().tokens_written
    original, calls = Context._call, {"n": 0}

    def interrupt_second_chunk(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    Context._call = interrupt_second_chunk
    try:
        with pytest.raises(KeyboardInterrupt):
            list(session.reply("Where do I live? Tell me everything about Paris please."))
    finally:
        Context._call = original
    assert session.messages == messages and session._ctx.ids == ids
    assert session.info().tokens_written == written
    assert not differs(before, delta(session), atol=0)
    list(session.reply("Where do I live?", max_tokens=3))  # goes on normally
    assert session._ctx.ids == rendered_ids(session)


def test_sentence_mean_adapter_runs_a_conversation(tmp_path):
    path = make_tiny_dmem(tmp_path, seed=5, delta_config={
        "delta_heads": ["q", "o"], "memory_write_granularity": "sentence_mean"})
    model, tok = dmem_mlx.load(str(path))
    model.delta_mem.missing_ids = "error"  # every call must come with ids
    session = ChatSession(model, tok, system=SYSTEM)
    session.feed(CHAT[:2])
    fed = delta(session)
    assert differs(fed, {i: np.zeros_like(s) for i, s in fed.items()})
    list(session.reply("Where do I live? Tell me.", max_tokens=6))
    assert session._ctx.ids == rendered_ids(session) and session.info().turns == 2


def test_a_call_interrupted_midway_leaves_kv_and_delta_as_before(tiny, monkeypatch):
    from dmem_mlx.model import DeltaMemAttention

    model, tok = tiny
    ids = render(tok, [{"role": "system", "content": SYSTEM}, *CHAT[:2]], False).ids
    model.delta_mem.reset()
    ctx = Context(model)
    ctx.ingest(ids)
    states = ctx.states()
    offsets = [c.offset for c in ctx.cache]
    third = model.delta_mem.layers[2]
    original = DeltaMemAttention.__call__

    def interrupted(self, *args, **kw):
        if self is third:  # layers 0 and 1 have already updated their KV and δ state
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(DeltaMemAttention, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ctx.ingest(tok.encode("More words here.", add_special_tokens=False))
    monkeypatch.setattr(DeltaMemAttention, "__call__", original)
    assert [c.offset for c in ctx.cache] == offsets and ctx.ids == ids
    assert all(ctx.states()[i] is states[i] for i in states)
    more = tok.encode("More words here.", add_special_tokens=False)
    ctx.ingest(more)  # and it goes on as if nothing happened
    model.delta_mem.reset()
    whole = Context(model)
    whole.ingest(ids + more)
    assert not differs({i: np.array(s) for i, s in ctx.states().items()},
                       {i: np.array(s) for i, s in whole.states().items()})


# A template that renders history differently from the turn being answered (like Qwen3's
# hybrid templates: an empty think block on the last assistant message only).
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_history_rewriting_template_stays_consistent(tiny, tiny_dir):
    model, _ = tiny
    tok = dmem_mlx.load(str(tiny_dir))[1]  # a tokenizer of its own: its template changes
    tok._tokenizer.chat_template = THINK_TEMPLATE
    session = ChatSession(model, tok, system=SYSTEM)
    rebuilt = []
    for text in ("Hello! My name is Ada.", "Where do I live?", "Thanks."):
        reply = tok.encode("Fine, thank you.", add_special_tokens=False)
        list(session.reply(text, max_tokens=len(reply), logits_processors=[force(reply)]))
        rebuilt.append(session.last_reply.rebuilt)
        r = render(tok, session.messages, False)
        ids = r.ids
        assert session._ctx.ids == ids and r.text.count("<think>") == 1
        got = delta(session)
        model.delta_mem.reset()  # the state is that of the rendered conversation in one pass
        one_pass = Context(model)
        one_pass.ingest(ids)
        assert_same_delta(got, {i: np.array(s[0]) for i, s in one_pass.states().items()})
        session._ctx.set_states({i: mx.array(got[i][None]) for i in got})
    assert all(rebuilt)



def test_render_with_remembered_prefixes_is_the_same(tiny, tiny_dir):
    """A session's render reuses the prefix renders of its last call (one prefix rendered per
    turn, not every one): for a growing conversation, an edited message, a history-rewriting
    template and a template changed on the same tokenizer, the result equals a fresh render."""
    tok = dmem_mlx.load(str(tiny_dir))[1]  # a tokenizer of its own: its template changes
    prefixes, calls = {}, []
    real = template_module.render_text

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    def check(messages, generation_prompt):
        calls.clear()
        fresh = render(tok, messages, generation_prompt)
        n_fresh = len(calls)
        calls.clear()
        got = render(tok, messages, generation_prompt, prefixes=prefixes)
        assert got == fresh
        return n_fresh, len(calls)

    template_module.render_text = counted
    try:
        messages = [{"role": "system", "content": SYSTEM}]
        for k, (text, reply) in enumerate([("Hello! My name is Ada.", "Hi Ada."),
                                           ("Where do I live? In Paris.", "In Paris."),
                                           ("Thanks. I like tea.", "Noted: tea.")]):
            messages.append({"role": "user", "content": text})
            n_fresh, n_got = check(messages, True)
            assert k == 0 or n_got == 2 < n_fresh  # the whole text and the new message
            messages.append({"role": "assistant", "content": reply})
            n_fresh, n_got = check(messages, False)
            assert n_got == 1 < n_fresh  # the whole text only
        messages[3] = {"role": "user", "content": "Where do I live? In Rome."}  # edited
        check(messages, False)
        check(messages, False)
        tok._tokenizer.chat_template = THINK_TEMPLATE  # history rendered differently
        for _ in range(2):
            check(messages, False)
            check(messages, True)
        assert check(messages[:-1], False)[1] > 1  # its prefixes are not starts of the text
    finally:
        template_module.render_text = real


# -- a reply cut mid-character -------------------------------------------------------------------
def cut_reply(session, ids, keep, by_stop):
    """Reply `ids` cut after `keep` tokens, by max_tokens or by a stop event; the streamed text."""
    stop = threading.Event() if by_stop else None
    streamed, fed = [], 0
    for chunk in session.reply("Smile?", max_tokens=keep if not by_stop else len(ids),
                               stop=stop, logits_processors=[force(ids)]):
        streamed.append(chunk.text)
        fed += chunk.token >= 0
        if by_stop and fed == keep:
            stop.set()
    return "".join(streamed)


@pytest.fixture(scope="module")
def demo():
    """The shipped demo model: a SentencePiece tokenizer with byte fallback."""
    from dmem_mlx.demo import load_demo
    return load_demo()


@pytest.mark.parametrize("by_stop", [False, True])
@pytest.mark.parametrize("setup", ["tiny", "demo"])  # byte-level BPE, SentencePiece bytes
def test_a_reply_cut_mid_character_drops_only_the_incomplete_character(request, tmp_path,
                                                                       setup, by_stop):
    """'ok 😀' cut inside the emoji's bytes: shown, transcript, context and memory file all
    hold 'ok ' (no U+FFFD); a complete U+FFFD the model wrote mid-text stays (DESIGN §3)."""
    model, tok = request.getfixturevalue(setup)
    ids = tok.encode("a\ufffd ok 😀", add_special_tokens=False)
    keep = next(k for k in range(len(ids)) if tok.decode(ids[:k]) == "a\ufffd ok \ufffd")
    path = tmp_path / "m.safetensors"
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        shown = cut_reply(session, ids, keep, by_stop)
    assert shown == "a\ufffd ok " == session.last_reply.text
    assert session.last_reply.finish_reason == ("stopped" if by_stop else "length")
    assert session.messages[-1] == {"role": "assistant", "content": shown}
    assert read_memory(path).transcript[-1]["content"] == shown
    rendered = render(tok, session.messages, False).ids
    assert session._ctx.ids == rendered[:len(session._ctx.ids)]  # context holds the kept text
    assert len(session._ctx.ids) == len(rendered)


@pytest.mark.parametrize("setup", ["tiny", "demo"])
def test_final_text_keeps_a_complete_trailing_replacement_character(request, setup):
    """Only an incomplete sequence goes: a U+FFFD the model spelled out in full (its three
    bytes) stays at the end too."""
    from dmem_mlx.runtime.session import final_text
    _, tok = request.getfixturevalue(setup)
    for text in ["ok \ufffd", "ok 😀", "ok"]:
        ids = tok.encode(text, add_special_tokens=False)
        for k in range(len(ids) + 1):
            detok = tok.detokenizer
            for token in ids[:k]:
                detok.add_token(token)
            whole = tok.decode(ids[:k])
            # a prefix keeps its complete characters; one cut inside the last one loses it
            want = text if k == len(ids) else whole.rstrip("\ufffd")
            assert final_text(detok) == want, (text, k)


@pytest.mark.parametrize("setup", ["tiny", "demo"])  # byte-level BPE, SentencePiece bytes
def test_a_reply_cut_anywhere_streams_exactly_the_text_it_keeps(request, tmp_path, setup):
    """Spaces a streaming detokenizer holds back (byte-level BPE keeps a lone space until the
    next token) come out in the last chunk: cut after any token, by a stop or by max_tokens,
    the streamed text is the reply kept in the transcript and the memory file, trailing spaces
    and a newline included."""
    model, tok = request.getfixturevalue(setup)
    for text in ["Hi there  ", "ok \n", "é 😀 "]:
        ids = tok.encode(text, add_special_tokens=False)
        for keep in range(1, len(ids) + 1):
            for by_stop in (False, True):
                path = tmp_path / f"{len(text)}-{keep}-{by_stop}.safetensors"
                with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
                    shown = cut_reply(session, ids + [ids[0]], keep, by_stop)
                    assert shown == session.last_reply.text, (text, keep, by_stop)
                    assert session.messages[-1]["content"] == shown, (text, keep, by_stop)
                assert read_memory(path).transcript[-1]["content"] == shown
                if keep == len(ids):
                    assert shown == text.lstrip(" ")
