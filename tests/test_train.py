"""δ-mem training: data split, the write/read recipe, gradients through the state, the CLI."""

import json
import random

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_load

import dmem_mlx
from dmem_mlx.adapter import attach_adapter, read_adapter, save_adapter, widen_state_heads
from dmem_mlx.config import ConfigError, DeltaMemConfig
from dmem_mlx.demo import persona
from dmem_mlx.model import DeltaMemAttention, attach_delta_mem
from dmem_mlx.tiny import make_tiny_backbone
from dmem_mlx.train import base_projection_weights, main
from dmem_mlx.training import ChatEncoder, batch_loss, collate, freeze_backbone, make_example


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return make_tiny_backbone(tmp_path_factory.mktemp("bb"), num_hidden_layers=3)


def episodes(n, seed=0, groups=2, conversations=2):
    rng = random.Random(seed)
    return [persona.episode(rng, num_groups=groups, num_conversations=conversations,
                            summary_rate=0, small_talk_rate=0) for _ in range(n)]


def dmem_model(path, seed=0, **config):
    model, tokenizer = mlx_load(str(path))
    bases = {i: base_projection_weights(layer.self_attn) for i, layer in enumerate(model.layers)}
    cfg = DeltaMemConfig.from_dict({"delta_heads": "q,k,v,o", "output_init": "random",
                                    "online_gain": 1.0, "beta_bias_init": 0.0, **config})
    dm = attach_delta_mem(model, cfg)
    for i, layer in dm.layers.items():
        layer.memory.initialize(bases[i], seed=seed + i)
    freeze_backbone(model)
    mx.eval(model.parameters())
    return model, tokenizer


def history_batch(tokenizer, rows, mode="history"):
    enc = ChatEncoder(tokenizer)
    return collate([make_example(enc, {"history": r["history"], "messages": r["messages"]},
                                 mode, 512) for r in rows])


def test_history_example_reads_only_the_latest_turn(backbone):
    _, tokenizer = mlx_load(str(backbone))
    row = {"history": [[{"role": "user", "content": "My name is Ada."},
                        {"role": "assistant", "content": "Nice to meet you, Ada!"}]],
           "messages": [{"role": "user", "content": "How are you?"},
                        {"role": "assistant", "content": "Fine."},
                        {"role": "user", "content": "What is my name?"},
                        {"role": "assistant", "content": "Your name is Ada."}]}
    ex = make_example(ChatEncoder(tokenizer), row, "history", 512)
    assert [s.writes for s in ex.segments] == [True, True, False]
    assert not any(any(s.loss) for s in ex.segments[:2])
    read = ex.segments[-1]
    assert tokenizer.decode(read.tokens) == (
        "<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n"
        "Your name is Ada.<|im_end|>\n")
    # loss on the reply (and its end-of-turn), nothing else
    targets = [t for t, m in zip(read.tokens, read.loss) if m]
    assert tokenizer.decode(targets) == "Your name is Ada.<|im_end|>\n"
    # message ids are global across the written conversations
    assert ex.segments[0].message_ids[0] == 0 and ex.segments[1].message_ids[0] == 2
    token = make_example(ChatEncoder(tokenizer), row, "token", 512)
    assert [s.writes for s in token.segments] == [True, True]
    assert all(any(s.loss) for s in token.segments)


def test_read_pass_never_writes(backbone, monkeypatch):
    """The trainer's last call must read the state written before it and change nothing."""
    model, tokenizer = dmem_model(backbone)
    batch = history_batch(tokenizer, episodes(3))
    calls = []
    original = DeltaMemAttention.read_and_write

    def spy(self, h, state, *args):
        before = state.layers[self.index]
        out = original(self, h, state, *args)
        calls.append((h.shape[1], state.writes_enabled, before, state.layers[self.index]))
        return out

    monkeypatch.setattr(DeltaMemAttention, "read_and_write", spy)
    loss, _ = batch_loss(model, batch)
    mx.eval(loss)
    n_layers = len(model.delta_mem.layers)
    read_width = batch.calls[-1]["tokens"].shape[1]
    read_calls = calls[-n_layers:]
    assert all(t == read_width and not enabled for t, enabled, _, _ in read_calls)
    for _, _, before, after in read_calls:
        assert before is not None and after is before  # the state object is left untouched
    assert all(enabled for _, enabled, _, _ in calls[:-n_layers])
    # the same loss computed by hand: write the history, then read with writes off
    monkeypatch.undo()
    dm = model.delta_mem
    dm.reset()
    for call in batch.calls[:-1]:
        with dm.inputs(valid=call["valid"]):
            model(mx.array(call["tokens"]))
    last = batch.calls[-1]
    with dm.read_only():
        logits = model(mx.array(last["tokens"]))
    ce = nn.losses.cross_entropy(logits, mx.array(last["targets"])) * mx.array(last["mask"])
    manual = ce.sum() / last["mask"].sum()
    assert abs(loss.item() - manual.item()) < 1e-5
    # ... and differs from a read pass that writes: the test above can fail
    dm.reset()
    for call in batch.calls:
        with dm.inputs(valid=call["valid"]):
            logits = model(mx.array(call["tokens"]))
    ce = nn.losses.cross_entropy(logits, mx.array(last["targets"])) * mx.array(last["mask"])
    assert abs((ce.sum() / last["mask"].sum()).item() - loss.item()) > 1e-4


def _memory(model, layer):
    return model.delta_mem.layers[layer].memory


def test_gradients_through_the_state_match_finite_differences(backbone):
    model, tokenizer = dmem_model(backbone, seed=3)
    batch = history_batch(tokenizer, episodes(2, seed=1, groups=1, conversations=1))
    grad_fn = nn.value_and_grad(model, lambda m: batch_loss(m, batch)[0])
    _, grads = grad_fn(model)
    layer = 1
    # memory_k_proj and beta_proj reach the read pass only through the written state
    for name in ("memory_k_proj", "beta_proj"):
        g = np.array(grads["model"]["layers"][layer]["self_attn"]["memory"][name])
        assert np.abs(g).max() > 1e-4, f"no gradient reaches {name} through the state"
        weight = getattr(_memory(model, layer), name)
        flat = np.argsort(-np.abs(g).ravel())[:3]
        for index in flat:
            idx = np.unravel_index(index, g.shape)
            eps = 1e-2
            values = []
            for sign in (1, -1):
                w = np.array(weight)
                w[idx] += sign * eps
                setattr(_memory(model, layer), name, mx.array(w))
                values.append(batch_loss(model, batch)[0].item())
            setattr(_memory(model, layer), name, weight)
            numeric = (values[0] - values[1]) / (2 * eps)
            assert numeric == pytest.approx(g[idx], rel=0.05, abs=2e-4), (name, idx)


def test_state_only_write_gradient_is_exact_for_the_last_layer(backbone):
    """write_grad="state" only drops paths through later layers' activations."""
    model, tokenizer = dmem_model(backbone, seed=5)
    batch = history_batch(tokenizer, episodes(2, seed=2))
    grads = {}
    for mode in ("full", "state"):
        _, g = nn.value_and_grad(model, lambda m: batch_loss(m, batch, mode)[0])(model)
        grads[mode] = g["model"]["layers"]
    last = max(model.delta_mem.layers)
    for name in ("memory_k_proj", "memory_v_proj", "beta_proj"):
        full = np.array(grads["full"][last]["self_attn"]["memory"][name])
        state = np.array(grads["state"][last]["self_attn"]["memory"][name])
        np.testing.assert_allclose(state, full, rtol=1e-4, atol=1e-7)
        assert np.abs(np.array(grads["state"][0]["self_attn"]["memory"][name])).max() > 0


def test_a_few_steps_lower_the_loss(backbone):
    model, tokenizer = dmem_model(backbone, seed=1, online_gain=0.05, beta_bias_init=-1.5)
    batch = history_batch(tokenizer, episodes(4, seed=4, groups=1, conversations=1))
    opt = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(model, lambda m: batch_loss(m, batch, "state")[0])
    losses = []
    for _ in range(12):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    backbone_params = [k for k, _ in _flat(model.trainable_parameters()) if ".memory." not in k]
    assert not backbone_params  # the backbone stays frozen


def _flat(tree):
    from mlx.utils import tree_flatten
    return tree_flatten(tree)


def write_data(directory, n_train=12, n_valid=4):
    directory.mkdir(parents=True, exist_ok=True)
    splits = (("train", episodes(n_train, 7, 1, 1)), ("valid", episodes(n_valid, 8, 1, 1)))
    for split, rows in splits:
        with open(directory / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"history": r["history"], "messages": r["messages"]}) + "\n")
    return directory


def test_cli_trains_saves_and_resumes(backbone, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    base = ["--model", str(backbone), "--data", str(data), "--adapter-path", str(out),
            "--batch-size", "4", "--steps-per-eval", "2", "--save-every", "2", "--no-progress",
            "--rank", "4", "--delta-heads", "q,o", "--seed", "3"]
    assert main([*base, "--iters", "2"]) == 0
    model, tokenizer = dmem_mlx.load(str(out))
    assert model.delta_mem.config.rank == 4 and model.delta_mem.config.delta_heads == ("q", "o")
    assert (out / "checkpoints" / "0000002_delta_mem.safetensors").is_file()
    assert main([*base, "--iters", "4", "--resume"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4
    log = capsys.readouterr().out
    assert '"step": 4' in log and "val_loss" in log
    # a new run initialised from the adapter keeps its config
    assert main(["--model", str(backbone), "--data", str(data), "--adapter-path",
                 str(tmp_path / "again"), "--iters", "1", "--batch-size", "2", "--no-progress",
                 "--init-from", str(out), "--mode", "token"]) == 0
    assert DeltaMemConfig.load(tmp_path / "again").rank == 4


@pytest.mark.parametrize("problem, message", [
    ("missing", "train.jsonl not found"),
    ("bad_json", "not valid JSON"),
    ("no_assistant", "no assistant message"),
    ("bad_config", "unknown δ-mem config field"),
    ("widen_alone", "--add-state-heads widens the adapter given by --init-from"),
])
def test_cli_errors_are_one_line(backbone, tmp_path, capsys, problem, message):
    data = tmp_path / "data"
    data.mkdir()
    if problem != "missing":
        line = {"bad_json": "{oops", "no_assistant": json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]})}.get(problem)
        (data / "train.jsonl").write_text((line or json.dumps(
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]})) + "\n")
    extra = {"bad_config": ["--delta-config", '{"nonsense": 1}'],
             "widen_alone": ["--add-state-heads", "2"]}.get(problem, [])
    code = main(["--model", str(backbone), "--data", str(data), "--adapter-path",
                 str(tmp_path / "out"), "--iters", "1", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and "\n" not in err and "Traceback" not in err


def test_message_mean_training_has_finite_gradients(backbone):
    """Rows of a batch hold different message ids: absent groups must not poison the gradient."""
    model, tokenizer = dmem_model(backbone, seed=2, memory_write_granularity="message_mean")
    rows = episodes(1, seed=5, groups=1, conversations=1) + episodes(1, seed=6, groups=4,
                                                                     conversations=3)
    batch = history_batch(tokenizer, rows)
    loss, grads = nn.value_and_grad(model, lambda m: batch_loss(m, batch)[0])(model)
    flat = _flat(grads)
    assert np.isfinite(loss.item())
    assert all(np.isfinite(np.array(g)).all() for _, g in flat)
    assert any(np.abs(np.array(g)).max() > 0 for k, g in flat if "memory_k_proj" in k)


def asked_share(slot: str, seed: int, count: int, **options) -> float:
    """Share of `count` episodes (all seven groups told, always a question) asking about slot."""
    rng = random.Random(seed)
    eps = [persona.episode(rng, num_groups=7, summary_rate=0, small_talk_rate=0, **options)
           for _ in range(count)]
    return sum(e["slot"] == slot for e in eps) / len(eps)


def test_persona_slot_weights_steer_the_question():
    def food_share(weights):
        return asked_share("food", 1, 80, slot_weights=weights)

    assert food_share({"food": 50.0}) > 0.7  # all seven groups told: food is always a choice
    assert food_share(None) < 0.3  # uniform over the eight told slots


def test_persona_only_limits_what_is_told():
    rng = random.Random(2)
    for _ in range(40):
        ep = persona.episode(rng, num_groups=3, summary_rate=0, small_talk_rate=0,
                             only=("food", "pet"))
        told = " ".join(m["content"] for c in ep["history"] for m in c
                        if m["role"] == "user").lower()  # (a value may start a sentence)
        facts = {slot: value.lower() for slot, value in ep["facts"].items()}
        assert ep["slot"] in ("food", "pet", "pet_name")
        assert facts["food"] in told and facts["pet_name"] in told
        assert facts["name"] not in told and facts["city"] not in told


def test_persona_older_first_asks_about_early_facts():
    def oldest_share(older_first):
        # the name is always told first when told (here: always, all seven groups are told)
        return asked_share("name", 3, 400, older_first=older_first)

    assert oldest_share(0.0) < 0.17  # uniform: 1 in 8
    assert oldest_share(3.0) > 0.2  # the oldest of 8 weighs 22 of 92 (the newest 1): 0.24


def test_persona_wrong_acks_name_someone_else():
    def own_values_acked(wrong_acks):
        rng = random.Random(4)
        hits = 0
        for _ in range(60):
            ep = persona.episode(rng, num_groups=7, num_conversations=1, wrong_acks=wrong_acks)
            acks = " ".join(m["content"] for c in ep["history"] for m in c
                            if m["role"] == "assistant")
            hits += sum(persona.mentioned(acks, s) == {v} for s, v in ep["facts"].items())
        return hits

    assert own_values_acked(0.0) > 100  # about 0.6 of seven acks name the fact just told
    assert own_values_acked(1.0) < own_values_acked(0.0) / 5  # only chance coincidences left


def test_widened_adapter_is_the_same_model_until_trained(backbone, tmp_path):
    model, tokenizer = dmem_model(backbone, seed=4, num_state_heads=2)
    save_adapter(model, tmp_path / "narrow")
    config, weights = read_adapter(tmp_path / "narrow")
    wide_config, wide_weights = widen_state_heads(config, weights, extra=3, seed=1)
    assert wide_config.num_state_heads == 5 and wide_config.rank == config.rank
    wide, _ = mlx_load(str(backbone))
    attach_adapter(wide, wide_config, wide_weights)
    tokens = mx.array([tokenizer.encode("My name is Ada. I live in Oslo. Where do I live?")])
    outputs = []
    for m in (model, wide):
        m.delta_mem.reset()
        first = m(tokens)  # writes the state
        outputs.append((first, m(tokens)))  # reads what was written
    for a, b in zip(*outputs):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    assert wide.delta_mem.snapshot()["layers.0"].shape == (1, 5, config.rank, config.rank)
    # the new heads are written (they will carry information once trained), not dead
    assert float(mx.abs(wide.delta_mem.snapshot()["layers.0"][:, 2:]).max()) > 0
    with pytest.raises(ConfigError):
        widen_state_heads(config, weights, extra=0)


def test_detached_inputs_cut_the_backbone_out_of_the_write_gradient(backbone):
    """Inside `detached_inputs` a write pass reaches the loss only through the δ state, never
    back into the backbone: d(loss)/d(embeddings of the written tokens) is exactly zero there,
    and not zero without the block (the memory projections see h otherwise)."""
    model, tokenizer = dmem_model(backbone, seed=2)
    embed = model.model.embed_tokens
    fixed = embed.weight
    written = mx.array([tokenizer.encode("My name is Ada and I live in Paris.")])
    asked = mx.array([tokenizer.encode("What is my name?")])
    probe = mx.random.normal((model.args.vocab_size,), key=mx.random.key(0))

    def loss(write_embeddings, detached):
        model.delta_mem.reset()
        embed.weight = write_embeddings  # the written tokens see these embeddings ...
        with model.delta_mem.detached_inputs(detached):
            model(written)
        embed.weight = fixed  # ... the read pass sees fixed ones
        with model.delta_mem.read_only():
            return (model(asked)[0, -1] * probe).sum()

    try:
        grads = {d: mx.grad(loss)(fixed, d) for d in (True, False)}
    finally:
        embed.weight = fixed
        model.delta_mem.reset()
    assert np.abs(np.array(grads[False])).max() > 1e-6
    assert np.abs(np.array(grads[True])).max() == 0.0
