"""State that belongs to the sequence: DeltaState, δ-aware prompt caches, sessions on one model."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

from dmem_mlx.cache import DeltaKVCache, DeltaState, make_prompt_cache, state_of, with_state
from dmem_mlx.runtime import ChatSession
from dmem_mlx.runtime.memory_file import MemoryFile, read_memory
from test_model import dmem_model

PROMPTS = [mx.array([[5, 17, 99, 3, 250, 42, 7]]), mx.array([[64, 300, 11, 9]])]
QUERIES = [[12, 80, 7, 33, 5], [401, 2, 66]]


def arrays(state: DeltaState) -> dict:
    return {k: np.array(v) for k, v in state.snapshot().items()}


def run(model, ids, state):
    out = model(mx.array(ids), cache=make_prompt_cache(model, state))
    mx.eval(out)
    return np.array(out)


# -- DeltaState ---------------------------------------------------------------------------------

def test_a_cache_writes_only_into_its_own_state():
    model = dmem_model()
    a, b = model.delta_mem.new_state(), model.delta_mem.new_state()
    run(model, PROMPTS[0], a)
    assert all(v is None for v in b.layers.values())
    assert all(v is None for v in model.delta_mem.state.layers.values())  # default untouched
    assert any(np.abs(v).max() > 0 for v in arrays(a).values())
    # the same tokens on the default memory give the same state
    model(PROMPTS[0])
    for k, v in arrays(model.delta_mem.state).items():
        np.testing.assert_allclose(v, arrays(a)[k], atol=1e-6)


def test_snapshot_restore_copy_undo_and_nbytes():
    model = dmem_model()
    state = model.delta_mem.new_state()
    assert state.nbytes == len(model.delta_mem.layers) * 8 * 8 * 4
    run(model, PROMPTS[0], state)
    snap, copy = arrays(state), state.copy()
    run(model, PROMPTS[1], state)
    assert any(np.abs(arrays(state)[k] - snap[k]).max() > 1e-4 for k in snap)
    for k, v in arrays(copy).items():  # the copy did not move
        np.testing.assert_array_equal(v, snap[k])
    state.undo_last_call()
    for k, v in arrays(state).items():
        np.testing.assert_array_equal(v, snap[k])
    other = model.delta_mem.new_state()
    other.restore(state.snapshot())
    for k, v in arrays(other).items():
        np.testing.assert_array_equal(v, snap[k])
    with pytest.raises(ValueError, match="do not match"):
        other.restore({"layers.0": mx.zeros((1, 1, 8, 8))})
    bad = {k: mx.zeros((1, 2, 8, 8)) for k in snap}
    with pytest.raises(ValueError, match="shape"):
        other.restore(bad)
    state.reset()
    assert all(v is None for v in state.layers.values())


def test_merge_extract_filter_extend_keep_rows():
    model = dmem_model()
    states = [model.delta_mem.new_state() for _ in range(3)]
    for s, p in zip(states, [PROMPTS[0], PROMPTS[1], None]):
        if p is not None:
            run(model, p, s)
    merged = DeltaState.merge(states)
    assert merged.batch_size == 3
    for row, s in enumerate(states):
        for k, v in arrays(merged.extract(row)).items():
            np.testing.assert_array_equal(v, arrays(s)[k])
    merged.filter([2, 0])
    assert merged.batch_size == 2
    for k, v in arrays(merged).items():
        np.testing.assert_array_equal(v[1], arrays(states[0])[k][0])
        np.testing.assert_array_equal(v[0], 0)
    merged.extend(states[1])
    for k, v in arrays(merged).items():
        np.testing.assert_array_equal(v[2], arrays(states[1])[k][0])


def test_cache_entries_follow_batch_operations_together():
    """mlx-lm's BatchGenerator calls filter / extract / merge on every layer's entry in turn:
    the δ layers' entries must stay on one shared state, row for row."""
    model = dmem_model()
    states = [model.delta_mem.new_state() for _ in range(2)]
    for s, p in zip(states, PROMPTS):
        run(model, p, s)
    caches = [with_state([KVCache() for _ in model.layers], model, s) for s in states]
    for c in caches:
        for layer in c:
            layer.kv.update_and_fetch(mx.zeros((1, 2, 3, 32)), mx.zeros((1, 2, 3, 32)))
    merged = [caches[0][i].merge([c[i] for c in caches]) for i in range(len(model.layers))]
    assert len({id(c.delta) for c in merged}) == 1 and state_of(merged).batch_size == 2
    one = [c.extract(1) for c in merged]
    assert len({id(c.delta) for c in one}) == 1
    for k, v in arrays(state_of(one)).items():
        np.testing.assert_array_equal(v, arrays(states[1])[k])
    for c in merged:
        c.filter([1])
    for k, v in arrays(state_of(merged)).items():
        np.testing.assert_array_equal(v, arrays(states[1])[k])


# -- batches: each row has its own memory ---------------------------------------------------------

def test_batch_rows_with_different_memories_get_their_own_logits():
    """Left-padded batch (mlx-lm's BatchKVCache) of two rows, each with a memory of its own:
    each row gets the logits it gets alone, and padding is never written."""
    model = dmem_model()
    memories = [model.delta_mem.new_state() for _ in range(2)]
    for s, p in zip(memories, PROMPTS):
        run(model, p, s)
    alone, alone_next, alone_states = [], [], []
    for s, q in zip(memories, QUERIES):
        s = s.copy()
        cache = make_prompt_cache(model, s)
        alone.append(np.array(model(mx.array([q]), cache=cache))[0])
        alone_next.append(np.array(model(mx.array([[q[0]]]), cache=cache))[0, 0])
        alone_states.append(arrays(s))
    width = max(len(q) for q in QUERIES)
    pads = [width - len(q) for q in QUERIES]
    ids = mx.array([[0] * p + q for p, q in zip(pads, QUERIES)])
    state = DeltaState.merge([s.copy() for s in memories])
    cache = with_state([BatchKVCache(left_padding=pads) for _ in model.layers], model, state)
    out = np.array(model(ids, cache=cache))
    nxt = np.array(model(mx.array([[q[0]] for q in QUERIES]), cache=cache))
    for row, p in enumerate(pads):
        np.testing.assert_allclose(out[row, p:], alone[row], atol=1e-5, rtol=0)
        np.testing.assert_allclose(nxt[row, 0], alone_next[row], atol=1e-5, rtol=0)
        for k, v in arrays(state.extract(row)).items():
            np.testing.assert_allclose(v, alone_states[row][k], atol=1e-5, rtol=0)
    assert np.abs(alone[0][-1] - alone[1][-1]).max() > 1e-3  # the rows do differ


# -- drop-in use keeps the default memory ---------------------------------------------------------

def test_mlx_lm_generate_still_remembers(tiny):
    model, tokenizer = tiny
    dm = model.delta_mem
    dm.reset()
    mlx_lm.generate(model, tokenizer, prompt="My name is Ada.", max_tokens=3)
    first = arrays(dm.state)
    assert any(np.abs(v).max() > 0 for v in first.values())
    mlx_lm.generate(model, tokenizer, prompt="What is my name?", max_tokens=3)
    second = arrays(dm.state)
    dm.reset()
    mlx_lm.generate(model, tokenizer, prompt="What is my name?", max_tokens=3)
    fresh = arrays(dm.state)
    assert any(np.abs(second[k] - fresh[k]).max() > 1e-4 for k in fresh)
    # a δ-aware cache in mlx_lm.generate writes its own state only
    own = dm.new_state()
    mlx_lm.generate(model, tokenizer, prompt="Hello", max_tokens=3,
                    prompt_cache=make_prompt_cache(model, own))
    for k, v in arrays(dm.state).items():
        np.testing.assert_array_equal(v, fresh[k])
    assert any(np.abs(v).max() > 0 for v in arrays(own).values())
    dm.reset()


# -- sessions on one model ----------------------------------------------------------------------

TURNS = {"a": ["Hello! My name is Ada.", "I live in Paris.", "What is my name?"],
         "b": ["I am Bob and I like tea.", "My cat is called Tom.", "What do I drink?"]}


def saved(path):
    data = read_memory(path)
    return data.states, [m["content"] for m in data.transcript]


def test_interleaved_sessions_save_what_they_save_alone(tiny, tmp_path):
    model, tok = tiny
    alone = {}
    for name, turns in TURNS.items():
        path = tmp_path / f"alone_{name}.safetensors"
        with ChatSession(model, tok, memory=MemoryFile.open(path)) as s:
            for t in turns:
                list(s.reply(t, max_tokens=5))
        alone[name] = saved(path)
    paths = {name: tmp_path / f"both_{name}.safetensors" for name in TURNS}
    sessions = {name: ChatSession(model, tok, memory=MemoryFile.open(p))
                for name, p in paths.items()}
    for k in range(3):
        for name, s in sessions.items():
            list(s.reply(TURNS[name][k], max_tokens=5))
    for name, s in sessions.items():
        s.close()
        states, transcript = saved(paths[name])
        assert transcript == alone[name][1]
        for i, v in states.items():
            np.testing.assert_array_equal(v, alone[name][0][i])
    assert any(np.abs(alone["a"][0][i] - alone["b"][0][i]).max() > 1e-3 for i in alone["a"][0])


def test_read_only_viewer_forget_does_not_touch_the_writer(tiny, tmp_path):
    model, tok = tiny
    alone_path = tmp_path / "alone.safetensors"
    with ChatSession(model, tok, memory=MemoryFile.open(alone_path)) as s:
        for t in TURNS["a"][:2]:
            list(s.reply(t, max_tokens=5))
    path = tmp_path / "m.safetensors"
    writer = ChatSession(model, tok, memory=MemoryFile.open(path))
    list(writer.reply(TURNS["a"][0], max_tokens=5))
    viewer = ChatSession(model, tok, memory=MemoryFile.open(path, read_only=True))
    list(viewer.reply("Who am I?", max_tokens=5))
    viewer.forget()
    list(writer.reply(TURNS["a"][1], max_tokens=5))
    writer.close()
    viewer.close()
    states, transcript = saved(path)
    want_states, want_transcript = saved(alone_path)
    assert transcript == want_transcript
    for i, v in states.items():
        np.testing.assert_array_equal(v, want_states[i])


def test_entries_are_usable_as_mlx_lm_cache(tiny):
    model, tokenizer = tiny
    state = model.delta_mem.new_state()
    cache = make_prompt_cache(model, state)
    assert isinstance(cache[0], DeltaKVCache) and state_of(cache) is state
    text = mlx_lm.generate(model, tokenizer, prompt="Hello", max_tokens=4, prompt_cache=cache)
    assert isinstance(text, str) and cache[0].offset > 0
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    assert can_trim_prompt_cache(cache)
    offset = cache[0].offset
    trim_prompt_cache(cache, 2)
    assert cache[0].offset == offset - 2
    with pytest.raises(ValueError, match="another model"):
        with_state(cache, model, DeltaState([0], 1, 8))
