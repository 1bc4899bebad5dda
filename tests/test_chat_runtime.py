"""The chat runtime's undo/retry history, past conversations, too-long messages, looping replies
and erasure (issue 13), on a tiny random model and memory files in tmp."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dmem_mlx.runtime import (ChatSession, MemoryFile, MemorySaveError, NothingToUndoError,
                              read_memory)
from dmem_mlx.runtime.memory_file import (FORMAT_VERSION, PAST_CONVERSATIONS, UNDO_DEPTH, decode,
                                          encode)
from dmem_mlx.runtime.session import loop_start, looping

V1_FILE = Path(__file__).parent / "fixtures" / "memory" / "v1.safetensors"


def states(session):
    return {i: np.array(a) for i, a in session.info().layer_states.items()}


def same(a, b):
    return all(np.array_equal(a[i], b[i]) for i in a)


def say(session, text, **kwargs):
    kwargs.setdefault("max_tokens", 6)
    return "".join(chunk.text for chunk in session.reply(text, **kwargs))


def test_undo_takes_back_the_last_turn_and_survives_a_restart(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        say(session, "My name is Ada.")
        before, info = states(session), session.info()
        say(session, "I live in Paris.")
        assert not same(before, states(session))
        assert session.undo_depth == 2
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:  # a restart
        assert session.undo_depth == 2
        step = session.undo()
        assert step.user_text == "I live in Paris."
        assert same(before, states(session))
        after = session.info()
        assert (after.tokens_written, after.turns) == (info.tokens_written, info.turns)
        assert [m["content"] for m in session.messages][-2] == "My name is Ada."
        say(session, "I live in Rome.")  # the conversation goes on from there
    data = read_memory(path)
    assert [m["content"] for m in data.transcript if m["role"] == "user"] == [
        "My name is Ada.", "I live in Rome."]
    assert len(data.undo) == 2


def test_retry_answers_again_from_the_state_before(tiny):
    model, tok = tiny
    session = ChatSession(model, tok)
    say(session, "My name is Ada.")
    first, written = session.last_reply.text, states(session)
    again = "".join(c.text for c in session.retry(max_tokens=6))
    assert again == first  # greedy: the same reply from the same state
    assert same(written, states(session))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    session.undo()
    with pytest.raises(NothingToUndoError):
        session.undo()
    with pytest.raises(NothingToUndoError):
        session.retry()


def test_undo_history_is_bounded_and_ends_with_the_conversation(tiny):
    model, tok = tiny
    session = ChatSession(model, tok)
    for k in range(UNDO_DEPTH + 2):
        say(session, f"Fact number {k}.", max_tokens=2)
    assert session.undo_depth == UNDO_DEPTH
    session.new_conversation()
    assert session.undo_depth == 0
    [past] = session.past_conversations()
    assert sum(m["role"] == "user" for m in past.transcript) == UNDO_DEPTH + 2
    assert past.ended is not None


def test_past_conversations_are_kept_in_the_file(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        say(session, "My name is Ada.")
        session.new_conversation()
        say(session, "I have a cat.")
        session.new_conversation()
        session.new_conversation()  # an empty conversation is not kept
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        past = session.past_conversations()
        assert [p.transcript[0]["content"] for p in past] == ["My name is Ada.", "I have a cat."]
        assert session.info().past_conversations == 2


def test_forget_leaves_no_previous_version(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        say(session, "My secret is quokka.")
        session.new_conversation()
        say(session, "My other secret is xylophone.")
        assert path.with_name(path.name + ".bak").exists()
        session.forget()
        assert session.undo_depth == 0 and not session.past_conversations()
    assert not path.with_name(path.name + ".bak").exists()
    raw = path.read_bytes()
    # words no hex digest or timestamp in the file can spell (digits could: the checksum)
    assert b"quokka" not in raw and b"xylophone" not in raw
    data = read_memory(path)
    assert not data.transcript and not data.undo and not data.past
    assert all(not s.any() for s in data.states.values())


def users(path):
    return [m["content"] for m in read_memory(path).transcript if m["role"] == "user"]


def test_a_turn_whose_save_fails_is_kept_and_saved_by_the_next_save(tiny, tmp_path, disk):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    session = ChatSession(model, tok, memory=MemoryFile.open(path))
    say(session, "My name is Ada.")
    disk.full = True
    chunks = []
    with pytest.raises(MemorySaveError, match="No space left on device"):
        for chunk in session.reply("I live in Paris.", max_tokens=6):
            chunks.append(chunk.text)
    reply = session.last_reply
    assert reply is not None and not reply.taken_back and "".join(chunks) == reply.text
    assert [m["content"] for m in session.messages] == [
        "My name is Ada.", session.messages[1]["content"], "I live in Paris.", reply.text]
    assert session.save_error is not None and session.info().turns == 2
    assert users(path) == ["My name is Ada."]  # the file is the last good one
    disk.full = False  # space freed: the next turn saves both
    say(session, "I like tea.")
    assert session.save_error is None
    assert users(path) == ["My name is Ada.", "I live in Paris.", "I like tea."]
    assert read_memory(path).turns == 3
    disk.full = True
    with pytest.raises(MemorySaveError):
        session.undo()
    assert session.save_error is not None and len(session.messages) == 4
    disk.full = False
    session.close()  # closing saves what the failed save left behind
    assert session.save_error is None and users(path) == ["My name is Ada.", "I live in Paris."]
    MemoryFile.open(path).close()  # the lock was released


def test_a_failed_save_at_close_is_told_and_the_file_kept(tiny, tmp_path, disk):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    session = ChatSession(model, tok, memory=MemoryFile.open(path))
    say(session, "My name is Ada.")
    disk.full = True
    with pytest.raises(MemorySaveError):
        say(session, "I live in Paris.")
    session.close()
    assert "No space left on device" in str(session.save_error)
    assert users(path) == ["My name is Ada."]
    MemoryFile.open(path).close()


def test_a_forget_whose_save_failed_leaves_no_previous_version_later(tiny, tmp_path, disk):
    model, tok = tiny
    path = tmp_path / "m.safetensors"
    bak = path.with_name(path.name + ".bak")
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        say(session, "My secret is quokka.")
        say(session, "And xylophone.")
        disk.full = True
        with pytest.raises(MemorySaveError):
            session.forget()
        disk.full = False
        say(session, "Hello again.")  # the save that writes the forget keeps no backup
        assert not bak.exists()
        say(session, "And again.")  # later saves keep one again
        assert bak.exists() and b"quokka" not in bak.read_bytes()
    assert b"quokka" not in path.read_bytes()


def test_a_message_longer_than_the_context_goes_into_memory_in_parts(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, max_kv_tokens=64)
    text = " ".join(f"Sentence {k} says that the river is long and calm." for k in range(30))
    reply = say(session, text, max_tokens=4)
    stats = session.last_reply
    assert stats.memory_only_parts >= 2 and stats.tokens > 0 and reply == stats.text
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert "".join(users) == text and len(users) == stats.memory_only_parts + 1
    assert stats.memory_only_chars == len(text) - len(users[-1])
    info = session.info()
    assert info.kv_tokens <= 64 and info.tokens_written > len(tok.encode(text))
    session.undo()  # the whole message goes, parts and all
    assert session.messages == [] and session.info().tokens_written == 0


def test_stopping_during_the_parts_takes_the_turn_back(tiny):
    import threading

    model, tok = tiny
    session = ChatSession(model, tok, max_kv_tokens=64)
    say(session, "Hello.")
    before, messages = states(session), session.messages
    stop = threading.Event()
    stop.set()
    text = " ".join(f"Sentence {k} is long." for k in range(40))
    assert list(session.reply(text, stop=stop)) == []
    assert session.last_reply.taken_back
    assert session.messages == messages and same(before, states(session))


def test_looping_detects_repeated_spans():
    assert looping([5] * 32)
    assert not looping([5] * 31)
    assert looping([1, 2, 3] * 11)
    assert not looping(list(range(100)))
    assert looping(list(range(40)) + list(range(10)) * 4)  # period 10, 40 tokens
    assert not looping([1, 2] * 10 + list(range(20)))


def test_a_looping_reply_is_cut(tiny):
    model, tok = tiny
    session = ChatSession(model, tok)
    eos = sorted(tok.eos_token_ids)

    def same_token(tokens, logits):  # a model stuck on one token
        hot = mx.arange(logits.shape[-1]) == 100
        return mx.where(hot, 1e9, -1e9)[None]

    say(session, "Hello.", max_tokens=200, logits_processors=[same_token])
    stats = session.last_reply
    assert stats.finish_reason == "repetition" and stats.tokens == 32
    assert eos  # (EOS is masked out by the processor: only the loop check ended the reply)
    session.stop_repetition = False
    say(session, "Hello.", max_tokens=50, logits_processors=[same_token])
    assert session.last_reply.finish_reason == "length"


def test_a_version_1_file_is_read_and_written_as_version_2(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "v1.safetensors"
    shutil.copy(V1_FILE, path)
    old = read_memory(path)
    assert old.undo == [] and old.past == [] and old.turns == 3
    assert [m["content"] for m in old.transcript if m["role"] == "user"] == [
        "I have a cat called Milo."]
    assert decode(encode(old)).transcript == old.transcript
    with ChatSession(model, tok, memory=MemoryFile.open(path),
                     fingerprint=old.fingerprint) as session:
        assert same(old.states, states(session))
        say(session, "What is my cat called?")
        session.undo()
        assert same(old.states, states(session))
        say(session, "What is my cat called?")
    new = read_memory(path)
    assert new.transcript[:len(old.transcript)] == old.transcript and len(new.undo) == 1
    assert f'"format_version":"{FORMAT_VERSION}"'.encode() in path.read_bytes()[:4000]


def test_past_conversations_are_bounded(tiny):
    model, tok = tiny
    session = ChatSession(model, tok)
    for k in range(PAST_CONVERSATIONS + 3):
        session.feed([{"role": "user", "content": f"Conversation {k}."}])
        session.new_conversation()
    past = session.past_conversations()
    assert len(past) == PAST_CONVERSATIONS
    assert past[-1].transcript[0]["content"] == f"Conversation {PAST_CONVERSATIONS + 2}."


def test_a_reply_stopped_before_its_first_token_is_taken_back(tiny, tmp_path):
    """Stopped after the message was read, before any token of the reply: no empty assistant
    turn; message, δ writes, KV context and file as before; the next turn is exact."""
    import threading

    model, tok = tiny
    path = tmp_path / "m.safetensors"
    with ChatSession(model, tok, memory=MemoryFile.open(path)) as session:
        say(session, "My name is Ada.")
        before, info, saved = states(session), session.info(), path.read_bytes()
        stop = threading.Event()
        begin = session.begin_reply

        def begin_then_stop(*a, **k):
            turn = begin(*a, **k)
            stop.set()
            return turn
        session.begin_reply = begin_then_stop
        assert say(session, "I live in Paris.", stop=stop) == ""
        del session.begin_reply
        assert session.last_reply.taken_back and session.last_reply.tokens == 0
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        after = session.info()
        assert same(before, states(session)) and path.read_bytes() == saved
        assert (after.tokens_written, after.kv_tokens, after.undo_depth) == (
            info.tokens_written, info.kv_tokens, info.undo_depth)
        went_on = say(session, "I live in Rome.")
    fresh = ChatSession(model, tok)
    say(fresh, "My name is Ada.")
    assert say(fresh, "I live in Rome.") == went_on and same(states(fresh), states(session))


def test_a_special_token_ends_the_reply_and_is_never_shown_or_written(tiny):
    """A control token the model samples mid-reply (here ChatML's <|im_start|>, which
    `all_special_ids` leaves out) ends the reply: not streamed, not in the transcript, not fed."""
    model, tok = tiny
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start not in (tok.eos_token_ids or []) and start not in tok.all_special_ids
    calls = []

    def third_is_im_start(tokens, logits):
        calls.append(1)
        if len(calls) != 3:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == start, 1e9, -1e9)[None]

    session = ChatSession(model, tok)
    session.stop_repetition = False
    chunks = list(session.reply("Hello there.", max_tokens=20,
                                logits_processors=[third_is_im_start]))
    stats = session.last_reply
    assert stats.finish_reason == "stop" and stats.tokens == 2
    assert all(c.token != start for c in chunks)
    assert "<|im_start|>" not in "".join(c.text for c in chunks)
    assert "<|im_start|>" not in session.messages[-1]["content"]
    assert session.messages[-1]["content"] == stats.text == "".join(c.text for c in chunks)


def test_loop_start_keeps_one_round_of_the_loop():
    assert loop_start([5] * 32) == 1
    assert loop_start([7, 8] + [5] * 40) == 3
    assert loop_start([9] + [1, 2, 3] * 11) == 4
    assert loop_start(list(range(40)) + list(range(10)) * 4) == 50
    assert loop_start(list(range(100))) is None


def test_a_looping_reply_keeps_its_repeats_out_of_memory(tiny):
    """Cut at the loop, the reply keeps its first round only: transcript, KV context and δ are
    those of a conversation whose reply was just that (the repeats were read out again)."""
    model, tok = tiny
    session = ChatSession(model, tok)
    story = [281, 276, 288] + [278, 268] * 20  # "You live in" + " name is" …

    def scripted(tokens, logits):  # a model that says three words, then loops on two
        n = len(tokens) - prompt_tokens[0]
        hot = mx.arange(logits.shape[-1]) == story[min(n, len(story) - 1)]
        return mx.where(hot, 1e9, -1e9)[None]

    prompt_tokens = [0]
    begin = session.begin_reply

    def begin_and_count(*a, **k):
        turn = begin(*a, **k)
        prompt_tokens[0] = turn.context_tokens
        return turn
    session.begin_reply = begin_and_count
    streamed = say(session, "Tell me a story.", max_tokens=200, logits_processors=[scripted])
    stats = session.last_reply
    assert stats.finish_reason == "repetition" and stats.tokens == 3 + 32
    kept = tok.decode(story[:5])
    assert stats.text.strip() == kept.strip() and len(stats.text) < len(streamed)
    assert session.messages[-1]["content"] == stats.text
    fresh = ChatSession(model, tok)
    fresh.feed(session.messages)
    assert session.info().kv_tokens == fresh.info().kv_tokens
    a, b = states(session), states(fresh)
    assert all(np.allclose(a[i], b[i], atol=1e-5) for i in a)
